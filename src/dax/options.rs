//! Pool options and the backend / persist-method enums.

use std::fmt;

/// The smallest page size a pool accepts (and the default).
pub const MIN_PAGE_SIZE: usize = 4096;

/// How a [`DevicePagePool`](crate::DevicePagePool) is opened.
///
/// Built like [`PercpuRef::builder`](crate::PercpuRef::builder): every
/// setting has a default that works for a whole device or file with 4 KiB
/// pages; the numbers take a value (`.page_size(2 << 20)`), and every flag
/// is a method without arguments that turns its behaviour on
/// (`.optimistic_reads()`). Each setting is a public field of the same
/// name, so a configuration reads back as `opts.page_size`; every flag
/// field is `false` by default.
///
/// ```
/// use percpu_ref::PoolOptions;
///
/// let opts = PoolOptions::new()
///     .page_size(2 << 20) // 2 MiB pages
///     .size(1 << 30) // only the first GiB...
///     .offset(0) // ...from the start
///     .allow_file_fallback() // msync if the file is not on DAX
///     .optimistic_reads(); // DevicePagePool::read; pages written by DevicePage::writer
/// assert_eq!(opts.page_size, 2 << 20);
/// assert_eq!(opts.size, Some(1 << 30));
/// assert!(opts.optimistic_reads && !opts.unlocked); // locked: the default
/// ```
///
/// The struct is `#[non_exhaustive]`: build it with [`PoolOptions::new`]
/// (or `Default`), not with a struct literal, so that new settings can be
/// added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    /// Bytes per page ([`page_size`](Self::page_size)); default 4096.
    pub page_size: usize,
    /// Pool size in bytes, if set ([`size`](Self::size)); default: the
    /// rest of the device or file.
    pub size: Option<u64>,
    /// Offset into the device or file ([`offset`](Self::offset)); default 0.
    pub offset: u64,
    /// Fall back to the `msync` file backend where fsdax is refused
    /// ([`allow_file_fallback`](Self::allow_file_fallback)).
    pub allow_file_fallback: bool,
    /// Map copy-on-write ([`map_private`](Self::map_private)).
    pub map_private: bool,
    /// Allow optimistic reads ([`optimistic_reads`](Self::optimistic_reads)).
    pub optimistic_reads: bool,
    /// Take no lock on the file or device ([`unlocked`](Self::unlocked)).
    pub unlocked: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            page_size: MIN_PAGE_SIZE,
            size: None,
            offset: 0,
            allow_file_fallback: false,
            map_private: false,
            optimistic_reads: false,
            unlocked: false,
        }
    }
}

impl PoolOptions {
    /// The defaults: 4 KiB pages, the whole device or file from offset 0,
    /// fsdax refusal is an error, shared mapping, no optimistic reads, the
    /// file locked for the pool's life.
    pub fn new() -> Self {
        Self::default()
    }

    /// Page size in bytes: a power of two, at least 4096 (the default),
    /// at most the pool size. 2 MiB matches device dax alignment.
    pub fn page_size(mut self, bytes: usize) -> Self {
        self.page_size = bytes;
        self
    }

    /// Pool size in bytes: a whole number of pages, and for device dax a
    /// multiple of the device alignment. Default: everything from
    /// [`offset`](Self::offset) to the end, rounded down to whole pages.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// Offset into the device or file, in bytes: a multiple of the device
    /// dax alignment, or of the OS page size for files. Default 0.
    pub fn offset(mut self, bytes: u64) -> Self {
        self.offset = bytes;
        self
    }

    /// When a regular file cannot be mapped with `MAP_SYNC` (it is not on a
    /// DAX filesystem), use the file backend (`MAP_SHARED`, persisted with
    /// `msync`) instead of failing with
    /// [`PoolError::FsDaxRefused`](crate::PoolError::FsDaxRefused).
    /// Off by default: silently losing the DAX guarantees is opt-in.
    pub fn allow_file_fallback(mut self) -> Self {
        self.allow_file_fallback = true;
        self
    }

    /// Map copy-on-write (`MAP_PRIVATE`): writes never reach the file and
    /// `persist` does nothing. Only for files (and anonymous pools); device
    /// dax refuses it with
    /// [`PoolError::PrivateDevDax`](crate::PoolError::PrivateDevDax).
    /// The file is then opened read-only.
    pub fn map_private(mut self) -> Self {
        self.map_private = true;
        self
    }

    /// Allow optimistic reads ([`DevicePagePool::read`](crate::DevicePagePool::read)):
    /// any thread may then read any page at any time without a page
    /// reference, validating a per-page version afterwards. For that to be
    /// sound, pages are written only through
    /// [`DevicePage::writer`](crate::DevicePage::writer) (atomic stores) and
    /// [`DevicePage::as_mut_slice`](crate::DevicePage::as_mut_slice) always
    /// returns `None`. Off by default.
    pub fn optimistic_reads(mut self) -> Self {
        self.optimistic_reads = true;
        self
    }

    /// Take no lock on the file or device, for users who coordinate the
    /// openers themselves (e.g. disjoint [`offset`](Self::offset) ranges
    /// of one device). Two pools over the same bytes are then the caller's
    /// to keep apart.
    ///
    /// By default a pool locks its file or device for its life: an
    /// advisory `flock`, exclusive — or shared with
    /// [`map_private`](Self::map_private), so that private pools of one
    /// file can coexist but not with a shared one. A second
    /// [`DevicePagePool::open`](crate::DevicePagePool::open) of the same
    /// file, in this process or another, then fails with
    /// [`PoolError::AlreadyOpen`](crate::PoolError::AlreadyOpen) instead of
    /// handing out the same bytes as another pool's pages. The lock is
    /// released when the pool's memory is unmapped (its shutdown
    /// completed). It is advisory and per file: another path to the same
    /// device node (a symbolic link) is the same file, but a second device
    /// node for the same device (`mknod`) is not.
    pub fn unlocked(mut self) -> Self {
        self.unlocked = true;
        self
    }
}

/// Where a pool's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// A `/dev/daxX.Y` character device (persistent memory, no page
    /// cache), mapped `MAP_SHARED`; persisted with cache-line write-back.
    DevDax,
    /// A file on a DAX filesystem, mapped `MAP_SHARED_VALIDATE | MAP_SYNC`;
    /// persisted with cache-line write-back.
    FsDax,
    /// A regular file through the page cache, persisted with `msync`.
    File,
    /// A regular file mapped `MAP_PRIVATE` (see
    /// [`PoolOptions::map_private`]): nothing is written back.
    FilePrivate,
    /// Anonymous shared memory (`memfd`; a heap block on other platforms):
    /// nothing to persist, works on every machine.
    Anonymous,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::DevDax => "devdax",
            Backend::FsDax => "fsdax",
            Backend::File => "file",
            Backend::FilePrivate => "file (private)",
            Backend::Anonymous => "anonymous",
        })
    }
}

/// How [`persist`](crate::DevicePage::persist) makes stores durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PersistMethod {
    /// `clwb` per cache line, then `sfence` (keeps lines cached).
    Clwb,
    /// `clflushopt` per cache line, then `sfence`.
    Clflushopt,
    /// `clflush` per cache line, then `sfence` (oldest, slowest).
    Clflush,
    /// aarch64: `dc cvap` (clean to the point of persistence) per cache
    /// line, then `dsb sy`.
    DcCvap,
    /// aarch64 without `dc cvap`: `dc cvac` (clean to the point of
    /// coherency) per cache line, then `dsb sy`.
    DcCvac,
    /// `msync(MS_SYNC)` of the covering OS pages.
    Msync,
    /// Nothing to do (anonymous or private memory is not durable).
    Nothing,
    /// A DAX mapping on a CPU (or platform) without a known flush
    /// instruction: `persist` fails with an error instead of pretending.
    Unavailable,
}
