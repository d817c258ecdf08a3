//! Typed errors of the device page pool.

use crate::percpu::Holders;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why opening, allocating from, looking up in, or persisting a
/// [`DevicePagePool`](crate::DevicePagePool) failed.
///
/// Every bad input gets its own variant, naming the path and the numbers
/// involved; nothing panics, and nothing is mapped that could fault later
/// (a `/dev/dax` mapping past the end of the device would succeed and then
/// raise SIGBUS on first touch, so sizes are checked before mapping).
///
/// ```
/// use percpu_ref::{DevicePagePool, PoolError, PoolOptions};
///
/// let err = DevicePagePool::open("/no/such/dax", &PoolOptions::new()).unwrap_err();
/// assert!(matches!(err, PoolError::NotFound { .. }));
/// assert_eq!(err.to_string(), "/no/such/dax: no such file or device");
/// ```
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The path does not exist.
    #[error("{}: no such file or device", show(.path))]
    NotFound {
        /// The path given to `open`.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The path itself cannot be used: it is empty, contains a NUL byte,
    /// is too long, loops through symbolic links, or goes through
    /// something that is not a directory.
    #[error("{}: {reason}", show(.path))]
    BadPath {
        /// The path given to `open`.
        path: PathBuf,
        /// What is wrong with it, e.g. `"too many levels of symbolic
        /// links"`.
        reason: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The path exists but may not be opened for reading and writing
    /// (file mode, read-only mount, or a sysfs/procfs file).
    #[error("{}: permission denied (the pool needs read-write access)", .path.display())]
    PermissionDenied {
        /// The path given to `open`.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The path is neither a `/dev/dax` character device nor a regular
    /// file (e.g. a directory or a block device).
    #[error("{}: is a {file_type}; expected a device dax character device (/dev/daxX.Y) or a regular file", .path.display())]
    UnsupportedFileType {
        /// The path given to `open`.
        path: PathBuf,
        /// What it is: `"directory"`, `"block device"`, `"fifo"`, ...
        file_type: &'static str,
    },

    /// A character device whose sysfs `subsystem` is not `dax`.
    #[error("{}: character device {major}:{minor} is not device dax (its sysfs subsystem is {subsystem:?})", .path.display())]
    NotDax {
        /// The path given to `open`.
        path: PathBuf,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
        /// Last component of `/sys/dev/char/MAJ:MIN/subsystem`, or
        /// `"unknown"` if sysfs has no entry.
        subsystem: String,
    },

    /// Another pool (in this process or another) has the file or device
    /// open: its lock is held (see
    /// [`PoolOptions::unlocked`](crate::PoolOptions::unlocked)).
    #[error("{}: already opened by another pool (in this or another process); pools that coordinate themselves can open with PoolOptions::unlocked()", .path.display())]
    AlreadyOpen {
        /// The path given to `open`.
        path: PathBuf,
    },

    /// A sysfs attribute of a dax device could not be read.
    #[error("{}: cannot read {} for this dax device: {source}", .path.display(), .attribute.display())]
    Sysfs {
        /// The device path.
        path: PathBuf,
        /// The sysfs file, e.g. `/sys/dev/char/252:0/size`.
        attribute: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// `MAP_PRIVATE` was requested for device dax, which only supports
    /// `MAP_SHARED` (the kernel would fail with EINVAL).
    #[error("{}: device dax supports only shared mappings, but map_private was requested", .path.display())]
    PrivateDevDax {
        /// The device path.
        path: PathBuf,
    },

    /// A size or offset is not a multiple of the required alignment (the
    /// device dax alignment, usually 2 MiB, or the OS page size for the
    /// offset of a file mapping).
    #[error("{}: {what} {value} is not a multiple of the alignment {align}", .path.display())]
    Unaligned {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// `"size"` or `"offset"`.
        what: &'static str,
        /// The offending value, in bytes.
        value: u64,
        /// The required alignment, in bytes.
        align: u64,
    },

    /// The requested range does not fit in the device or file.
    #[error("{}: a pool of {size} bytes at offset {offset} does not fit in the {available} bytes available", .path.display())]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Requested pool size in bytes.
        size: u64,
        /// Requested offset in bytes.
        offset: u64,
        /// Size of the device or file in bytes.
        available: u64,
    },

    /// No size was given and the offset is past the end of the device or
    /// file.
    #[error("{}: offset {offset} is past the end of the {what} ({available} bytes)", .path.display())]
    OffsetPastEnd {
        /// The path.
        path: PathBuf,
        /// `"file"` or `"device"`.
        what: &'static str,
        /// Requested offset in bytes.
        offset: u64,
        /// Size of the device or file in bytes.
        available: u64,
    },

    /// No size was given and the device or file has less than one page
    /// from the offset to its end (an empty file, an offset at the end, or
    /// a file smaller than the page size).
    #[error("{}", too_small(.path, .what, *.available, *.offset, *.page_size))]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// `"file"` or `"device"`.
        what: &'static str,
        /// Size of the device or file in bytes.
        available: u64,
        /// Requested offset in bytes.
        offset: u64,
        /// The page size.
        page_size: usize,
    },

    /// An explicit pool size of zero
    /// ([`PoolOptions::size`](crate::PoolOptions::size)`(0)`, or
    /// [`DevicePagePool::anonymous`](crate::DevicePagePool::anonymous)`(0)`).
    #[error("{}: the pool size is zero", .path.display())]
    ZeroSize {
        /// The path (or `anonymous`).
        path: PathBuf,
    },

    /// The page size is not a power of two.
    #[error("{}: page size {page_size} is not a power of two", .path.display())]
    PageSizeNotPowerOfTwo {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// The requested page size.
        page_size: usize,
    },

    /// The page size is below the minimum (4096 bytes).
    #[error("{}: page size {page_size} is smaller than the minimum {min}", .path.display())]
    PageSizeTooSmall {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// The requested page size.
        page_size: usize,
        /// The minimum.
        min: usize,
    },

    /// The page size is larger than the pool size that was asked for.
    #[error("{}: page size {page_size} is larger than the pool size {pool_size}", .path.display())]
    PageSizeTooLarge {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// The requested page size.
        page_size: usize,
        /// The pool size in bytes.
        pool_size: u64,
    },

    /// An explicit pool size that is not a whole number of pages.
    #[error("{}: pool size {size} is not a multiple of the page size {page_size}", .path.display())]
    SizeNotPageMultiple {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// The requested size.
        size: u64,
        /// The page size.
        page_size: usize,
    },

    /// More pages than a page index (`u32`) can number, or a size that
    /// does not fit in this machine's address space.
    #[error("{}: a pool of {size} bytes in pages of {page_size} bytes is too large to map or index", .path.display())]
    TooManyPages {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// The pool size in bytes.
        size: u64,
        /// The page size.
        page_size: usize,
    },

    /// A regular file could not be mapped with `MAP_SYNC` (the fsdax
    /// backend): the filesystem is not DAX (ext4 and tmpfs without `-o dax`
    /// refuse it with EOPNOTSUPP). Set
    /// [`PoolOptions::allow_file_fallback`](crate::PoolOptions::allow_file_fallback)
    /// to use the `msync` file backend instead.
    #[error("{}: MAP_SYNC mapping refused, so this file is not on a DAX filesystem; set PoolOptions::allow_file_fallback() to use the msync file backend", .path.display())]
    FsDaxRefused {
        /// The file.
        path: PathBuf,
        /// The `mmap` error (EOPNOTSUPP, or EINVAL on old kernels).
        #[source]
        source: io::Error,
    },

    /// Another I/O operation failed (`open`, `stat`, `mmap`, ...).
    #[error("{}: {op} failed: {source}", show(.path))]
    Io {
        /// The path (or `anonymous`).
        path: PathBuf,
        /// The operation, e.g. `"mmap of 4194304 bytes at offset 0"`.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// This backend is not available on this platform (the portable tier
    /// has only the anonymous backend).
    #[error("{}: {what} is not supported on this platform", .path.display())]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },

    /// The pool is shutting down (or shut down): no new pages, no lookups.
    #[error("pool {} is shutting down: no new pages or lookups", .path.display())]
    ShuttingDown {
        /// The pool's path (or `anonymous`).
        path: PathBuf,
    },

    /// The pool was opened by another process, which then called `fork()`:
    /// a child's copy of a pool does not have the parent's memory (file and
    /// device pools are not mapped in the child, anonymous pools are
    /// zero-filled there), so it cannot allocate, look up, read or persist.
    /// See [`DevicePagePool`](crate::DevicePagePool)'s section on `fork()`.
    #[error("pool {} was opened by process {parent}; process {child}, a fork() child, cannot use it", .path.display())]
    Forked {
        /// The pool's path (or `anonymous`).
        path: PathBuf,
        /// The process that opened the pool.
        parent: u32,
        /// This process.
        child: u32,
    },

    /// Every page is allocated.
    #[error("pool {}: all {pages} pages are allocated", .path.display())]
    Exhausted {
        /// The pool's path (or `anonymous`).
        path: PathBuf,
        /// Pages in the pool.
        pages: usize,
    },

    /// No live pool maps this address.
    #[error("no page pool maps address {addr:#x}")]
    NotMapped {
        /// The address looked up.
        addr: usize,
    },

    /// The address is in a pool, but its page is free.
    #[error("page {index} (address {addr:#x}) is free, not allocated")]
    PageNotAllocated {
        /// The address looked up.
        addr: usize,
        /// Its page index.
        index: usize,
    },

    /// The page is held exclusively through
    /// [`DevicePage::as_mut_slice`](crate::DevicePage::as_mut_slice).
    #[error("page {index} is held exclusively for writing")]
    PageBusy {
        /// The page index.
        index: usize,
    },

    /// An optimistic read ([`DevicePagePool::read`](crate::DevicePagePool::read))
    /// overlapped a writer, a free or a reallocation of the page: its
    /// result was dropped. Retry.
    #[error("page {index} was written, freed or reallocated during an optimistic read; retry")]
    PageChanged {
        /// The page index.
        index: usize,
    },

    /// An optimistic read of a pool opened without
    /// [`PoolOptions::optimistic_reads`](crate::PoolOptions::optimistic_reads).
    #[error("pool {}: optimistic reads need PoolOptions::optimistic_reads() (its pages may be written through &mut [u8])", .path.display())]
    OptimisticReadsDisabled {
        /// The pool's path (or `anonymous`).
        path: PathBuf,
    },

    /// A persist range reaches outside the page or pool.
    #[error("persist range {start}..{end} is outside 0..{len}")]
    OutOfRange {
        /// Range start (bytes).
        start: usize,
        /// Range end (bytes).
        end: usize,
        /// Length of the page or pool.
        len: usize,
    },

    /// Writing back to the medium failed.
    #[error("pool {}: persisting {len} bytes at offset {offset} failed", .path.display())]
    Persist {
        /// The pool's path.
        path: PathBuf,
        /// Offset in the pool.
        offset: usize,
        /// Length.
        len: usize,
        /// The underlying error (e.g. from `msync`).
        #[source]
        source: io::Error,
    },
}

/// A path in a message: as written, or quoted and escaped if it is empty
/// or holds control characters (a NUL byte), so the message shows it.
fn show(path: &Path) -> impl fmt::Display + '_ {
    struct Show<'a>(&'a Path);
    impl fmt::Display for Show<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let s = self.0.as_os_str();
            let plain = !s.is_empty() && !s.as_encoded_bytes().iter().any(u8::is_ascii_control);
            if plain {
                write!(f, "{}", self.0.display())
            } else {
                write!(f, "{:?}", self.0)
            }
        }
    }
    Show(path)
}

fn too_small(path: &Path, what: &str, available: u64, offset: u64, page_size: usize) -> String {
    let path = path.display();
    let rest = available.saturating_sub(offset);
    if offset == 0 {
        format!("{path}: the {what} has {available} bytes, less than one page of {page_size} bytes")
    } else {
        format!(
            "{path}: the {what} has {rest} bytes from offset {offset} to its end \
             ({available} in all), less than one page of {page_size} bytes"
        )
    }
}

/// [`ShutdownHandle::wait_timeout`](crate::ShutdownHandle::wait_timeout)
/// expired with pages still held: which, and (feature `track`) who holds
/// them. Its `Display` is a leak report:
///
/// ```text
/// shutdown of pool /dev/dax0.0 timed out: 2 pages still held (indices [3, 17]):
///   page 3: 1 by thread 'main' (ThreadId(1))
///   page 17: 2 by thread 'io-3' (ThreadId(4), label compaction) at:
///    0: ...
/// ```
///
/// one line per page and holder group (thread, label), with the backtrace
/// of where its first reference was made when one was captured
/// (`RUST_BACKTRACE`, `RUST_LIB_BACKTRACE`). Without the `track` feature it
/// names the pages only, and says how to get the holders.
///
/// ```
/// use percpu_ref::DevicePagePool;
/// use std::time::Duration;
///
/// let pool = DevicePagePool::anonymous(8 << 12).unwrap();
/// let page = pool.alloc().unwrap();
/// let shutdown = pool.shutdown();
/// let held = shutdown.wait_timeout(Duration::from_millis(1)).unwrap_err();
/// assert_eq!((held.count, held.indices.as_slice()), (1, &[page.index()][..]));
/// assert!(held.to_string().starts_with("shutdown of pool anonymous timed out: 1 page still held"));
/// drop(page);
/// assert!(shutdown.wait_timeout(Duration::from_millis(1)).is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StillHeld {
    /// The pool's path (or `anonymous`).
    pub path: PathBuf,
    /// Number of pages still referenced when the wait gave up.
    pub count: usize,
    /// Their page indices, ascending.
    pub indices: Vec<usize>,
    /// Who held them (feature `track`; a snapshot taken right after the
    /// indices): one holder per `DevicePage`, see
    /// [`DevicePagePool::holders`](crate::DevicePagePool::holders).
    pub holders: Holders,
}

impl fmt::Display for StillHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pages = if self.count == 1 { "page" } else { "pages" };
        write!(
            f,
            "shutdown of pool {} timed out: {} {pages} still held (indices {:?})",
            self.path.display(),
            self.count,
            self.indices
        )?;
        if !self.holders.is_tracked() {
            return f
                .write_str("; build percpu-ref with the `track` feature to see who holds them");
        }
        f.write_str(":")?;
        self.holders.fmt_lines(f)
    }
}

impl std::error::Error for StillHeld {}
