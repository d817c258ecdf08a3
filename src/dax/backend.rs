//! Opening a pool's memory: backend detection, bound checks, mapping.
//!
//! Every check happens *before* `mmap`: on device dax a mapping past the
//! end of the device succeeds and only faults (SIGBUS) when touched, and an
//! unaligned length or offset is EINVAL; sizes come from sysfs because
//! `fstat` reports 0 for the device.

// The portable tier (other systems, Miri) maps no devices.
#![cfg_attr(not(percpu_ref_linux), allow(dead_code))]

use super::error::PoolError;
use super::options::{Backend, PoolOptions, MIN_PAGE_SIZE};
use super::region::Region;
use crate::sys::mem;
use std::io;
use std::path::{Path, PathBuf};

/// Device dax alignment assumed when sysfs has no `align` attribute (older
/// kernels): the PMD size, the common default.
const DEFAULT_DAX_ALIGN: u64 = 2 << 20;

/// What to map: validated numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) pages: usize,
}

/// The path used in messages for anonymous pools.
pub(crate) fn anonymous_path() -> PathBuf {
    PathBuf::from("anonymous")
}

/// Page size: a power of two, at least [`MIN_PAGE_SIZE`].
pub(crate) fn check_page_size(path: &Path, page_size: usize) -> Result<(), PoolError> {
    if !page_size.is_power_of_two() {
        return Err(PoolError::PageSizeNotPowerOfTwo {
            path: path.into(),
            page_size,
        });
    }
    if page_size < MIN_PAGE_SIZE {
        return Err(PoolError::PageSizeTooSmall {
            path: path.into(),
            page_size,
            min: MIN_PAGE_SIZE,
        });
    }
    Ok(())
}

/// Validate a pool of `opts` inside the `available` bytes of `what`
/// (`"file"`, `"device"`, `"memory"`, for messages).
///
/// * `offset_align`: the offset must be a multiple of it (device alignment
///   for dax, OS page size for files).
/// * `size_align`: the size must be a multiple of it (device dax only).
pub(crate) fn plan(
    path: &Path,
    what: &'static str,
    opts: &PoolOptions,
    available: u64,
    offset_align: u64,
    size_align: Option<u64>,
) -> Result<Plan, PoolError> {
    let page_size = opts.page_size;
    check_page_size(path, page_size)?;
    let page = page_size as u64;
    let offset = opts.offset;
    if offset % offset_align != 0 {
        return Err(PoolError::Unaligned {
            path: path.into(),
            what: "offset",
            value: offset,
            align: offset_align,
        });
    }
    let size = match opts.size {
        Some(0) => return Err(PoolError::ZeroSize { path: path.into() }),
        Some(size) => {
            if let Some(align) = size_align {
                if size % align != 0 {
                    return Err(PoolError::Unaligned {
                        path: path.into(),
                        what: "size",
                        value: size,
                        align,
                    });
                }
            }
            if page > size {
                return Err(PoolError::PageSizeTooLarge {
                    path: path.into(),
                    page_size,
                    pool_size: size,
                });
            }
            if size % page != 0 {
                return Err(PoolError::SizeNotPageMultiple {
                    path: path.into(),
                    size,
                    page_size,
                });
            }
            if offset.checked_add(size).is_none_or(|end| end > available) {
                return Err(PoolError::TooLarge {
                    path: path.into(),
                    size,
                    offset,
                    available,
                });
            }
            size
        }
        None => {
            if offset > available {
                return Err(PoolError::OffsetPastEnd {
                    path: path.into(),
                    what,
                    offset,
                    available,
                });
            }
            let rest = available - offset;
            let unit = size_align.map_or(page, |a| a.max(page));
            // Whole pages (and whole alignment units: both are powers of
            // two, so the larger is a multiple of the smaller).
            let size = rest - rest % unit;
            if size == 0 {
                return Err(PoolError::TooSmall {
                    path: path.into(),
                    what,
                    available,
                    offset,
                    page_size,
                });
            }
            size
        }
    };
    let too_many = || PoolError::TooManyPages {
        path: path.into(),
        size,
        page_size,
    };
    let len = usize::try_from(size).map_err(|_| too_many())?;
    let pages = len / page_size;
    if u32::try_from(pages).is_err() || isize::try_from(len).is_err() {
        return Err(too_many());
    }
    Ok(Plan { offset, len, pages })
}

/// Validate a device dax pool: shared mappings only, offset and size
/// multiples of the device alignment (`align`, from sysfs), inside the
/// device's `size` bytes.
pub(crate) fn plan_devdax(
    path: &Path,
    opts: &PoolOptions,
    size: u64,
    align: u64,
) -> Result<Plan, PoolError> {
    if opts.map_private {
        return Err(PoolError::PrivateDevDax { path: path.into() });
    }
    let align = align.max(mem::os_page_size() as u64);
    plan(path, "device", opts, size, align, Some(align))
}

/// What is wrong with a path, if `e` (from `stat` or `open`) says the path
/// itself is the problem.
fn bad_path_reason(e: &io::Error) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        match e.raw_os_error().map(Errno::from_raw_os_error) {
            Some(Errno::LOOP) => Some("too many levels of symbolic links"),
            Some(Errno::NOTDIR) => Some("a component of the path is not a directory"),
            Some(Errno::NAMETOOLONG) => Some("the path is too long"),
            _ => None,
        }
    }
    #[cfg(not(unix))]
    {
        match e.kind() {
            io::ErrorKind::NotADirectory => Some("a component of the path is not a directory"),
            _ => None,
        }
    }
}

/// Classify an `open`/`stat` error.
fn io_error(path: &Path, op: &str, source: io::Error) -> PoolError {
    if let Some(reason) = bad_path_reason(&source) {
        return PoolError::BadPath {
            path: path.into(),
            reason,
            source,
        };
    }
    match source.kind() {
        io::ErrorKind::NotFound => PoolError::NotFound {
            path: path.into(),
            source,
        },
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            PoolError::PermissionDenied {
                path: path.into(),
                source,
            }
        }
        _ => PoolError::Io {
            path: path.into(),
            op: op.into(),
            source,
        },
    }
}

/// Refuse a path that cannot name anything before asking the system (which
/// would say "not found" for an empty path, "invalid input" for a NUL).
fn check_path(path: &Path) -> Result<(), PoolError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    let reason = if bytes.is_empty() {
        "the path is empty"
    } else if bytes.contains(&0) {
        "the path contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(PoolError::BadPath {
        path: path.into(),
        reason,
        source: io::Error::new(io::ErrorKind::InvalidInput, reason),
    })
}

/// An anonymous (memfd) region of `size` bytes.
pub(crate) fn anonymous(size: usize, opts: &PoolOptions) -> Result<(Region, Plan), PoolError> {
    let path = anonymous_path();
    let opts = PoolOptions {
        size: Some(size as u64),
        offset: 0,
        ..opts.clone()
    };
    let plan = plan(&path, "memory", &opts, size as u64, 1, None)?;
    let map = mem::anonymous(plan.len).map_err(|source| PoolError::Io {
        path: path.clone(),
        op: format!("memfd mapping of {} bytes", plan.len),
        source,
    })?;
    Ok((Region::new(map, Backend::Anonymous, path), plan))
}

/// Open `path`: device dax, fsdax, or (opt-in) file.
pub(crate) fn open(path: &Path, opts: &PoolOptions) -> Result<(Region, Plan), PoolError> {
    check_path(path)?;
    check_page_size(path, opts.page_size)?;
    imp::open(path, opts)
}

#[cfg(percpu_ref_linux)]
mod imp {
    use super::*;
    use crate::sys::mem::MapMode;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    pub(super) fn open(path: &Path, opts: &PoolOptions) -> Result<(Region, Plan), PoolError> {
        // stat first: never open an arbitrary character device (opening
        // some, like a watchdog, has side effects) before knowing it is dax.
        let meta = std::fs::metadata(path).map_err(|e| io_error(path, "stat", e))?;
        let ft = meta.file_type();
        let unsupported = |file_type| PoolError::UnsupportedFileType {
            path: path.into(),
            file_type,
        };
        if ft.is_dir() {
            Err(unsupported("directory"))
        } else if ft.is_block_device() {
            Err(unsupported("block device"))
        } else if ft.is_fifo() {
            Err(unsupported("fifo"))
        } else if ft.is_socket() {
            Err(unsupported("socket"))
        } else if ft.is_char_device() {
            open_devdax(path, meta.rdev(), opts)
        } else if ft.is_file() {
            open_file(path, opts)
        } else {
            Err(unsupported("special file"))
        }
    }

    fn sysfs_error(path: &Path, attribute: PathBuf, source: io::Error) -> PoolError {
        PoolError::Sysfs {
            path: path.into(),
            attribute,
            source,
        }
    }

    fn open_devdax(
        path: &Path,
        rdev: u64,
        opts: &PoolOptions,
    ) -> Result<(Region, Plan), PoolError> {
        let (major, minor) = mem::major_minor(rdev);
        let dev = match mem::char_device(major, minor) {
            Ok(dev) => dev,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PoolError::NotDax {
                    path: path.into(),
                    major,
                    minor,
                    subsystem: "unknown".into(),
                })
            }
            Err(e) => {
                let attr = PathBuf::from(format!("/sys/dev/char/{major}:{minor}/subsystem"));
                return Err(sysfs_error(path, attr, e));
            }
        };
        if dev.subsystem != "dax" {
            return Err(PoolError::NotDax {
                path: path.into(),
                major,
                minor,
                subsystem: dev.subsystem,
            });
        }
        if opts.map_private {
            // Before reading sysfs: the answer does not depend on it.
            return Err(PoolError::PrivateDevDax { path: path.into() });
        }
        let size_attr = dev.sysfs.join("size");
        let size = mem::read_sysfs_u64(&size_attr).map_err(|e| sysfs_error(path, size_attr, e))?;
        let align_attr = dev.sysfs.join("align");
        let align = match mem::read_sysfs_u64(&align_attr) {
            Ok(0) => DEFAULT_DAX_ALIGN,
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DEFAULT_DAX_ALIGN,
            Err(e) => return Err(sysfs_error(path, align_attr, e)),
        };
        let plan = plan_devdax(path, opts, size, align)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, "open", e))?;
        // The path could have been replaced since the stat: re-check.
        let now = file.metadata().map_err(|e| io_error(path, "fstat", e))?;
        if !now.file_type().is_char_device() || now.rdev() != rdev {
            return Err(PoolError::Io {
                path: path.into(),
                op: "open".into(),
                source: io::Error::other("the device changed while it was being opened"),
            });
        }
        lock(path, &file, opts)?;
        let map = map(path, &file, plan, MapMode::Shared, true)?;
        Ok((
            Region::new(map, Backend::DevDax, path.into()).hold(file),
            plan,
        ))
    }

    /// Take the pool's lock on `file` (see `PoolOptions::unlocked`).
    fn lock(path: &Path, file: &File, opts: &PoolOptions) -> Result<(), PoolError> {
        if opts.unlocked {
            return Ok(());
        }
        match mem::try_lock(file.as_fd(), !opts.map_private) {
            Ok(true) => Ok(()),
            Ok(false) => Err(PoolError::AlreadyOpen { path: path.into() }),
            Err(source) => Err(PoolError::Io {
                path: path.into(),
                op: "flock (PoolOptions::unlocked opens without the lock)".into(),
                source,
            }),
        }
    }

    fn map(
        path: &Path,
        file: &File,
        plan: Plan,
        mode: MapMode,
        writable: bool,
    ) -> Result<mem::RawMap, PoolError> {
        mem::map_fd(file.as_fd(), plan.len, plan.offset, mode, writable).map_err(|source| {
            PoolError::Io {
                path: path.into(),
                op: format!("mmap of {} bytes at offset {}", plan.len, plan.offset),
                source,
            }
        })
    }

    fn open_file(path: &Path, opts: &PoolOptions) -> Result<(Region, Plan), PoolError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.map_private)
            .open(path)
            .map_err(|e| io_error(path, "open", e))?;
        let meta = file.metadata().map_err(|e| io_error(path, "fstat", e))?;
        if !meta.file_type().is_file() {
            return Err(PoolError::Io {
                path: path.into(),
                op: "open".into(),
                source: io::Error::other("the file changed while it was being opened"),
            });
        }
        let plan = plan(
            path,
            "file",
            opts,
            meta.len(),
            mem::os_page_size() as u64,
            None,
        )?;
        lock(path, &file, opts)?;
        if opts.map_private {
            let map = map(path, &file, plan, MapMode::Private, true)?;
            return Ok((
                Region::new(map, Backend::FilePrivate, path.into()).hold(file),
                plan,
            ));
        }
        match mem::map_fd(
            file.as_fd(),
            plan.len,
            plan.offset,
            MapMode::SharedSync,
            true,
        ) {
            Ok(map) => Ok((
                Region::new(map, Backend::FsDax, path.into()).hold(file),
                plan,
            )),
            // EOPNOTSUPP: not a DAX filesystem. EINVAL: a kernel older than
            // 4.15 that does not know MAP_SHARED_VALIDATE (our numbers were
            // checked above, so they are not the cause).
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                if !opts.allow_file_fallback {
                    return Err(PoolError::FsDaxRefused {
                        path: path.into(),
                        source: e,
                    });
                }
                let map = map(path, &file, plan, MapMode::Shared, true)?;
                Ok((
                    Region::new(map, Backend::File, path.into()).hold(file),
                    plan,
                ))
            }
            Err(source) => Err(PoolError::Io {
                path: path.into(),
                op: format!(
                    "mmap (MAP_SYNC) of {} bytes at offset {}",
                    plan.len, plan.offset
                ),
                source,
            }),
        }
    }
}

#[cfg(not(percpu_ref_linux))]
mod imp {
    use super::*;

    pub(super) fn open(path: &Path, _opts: &PoolOptions) -> Result<(Region, Plan), PoolError> {
        match std::fs::metadata(path) {
            Err(e) => Err(io_error(path, "stat", e)),
            Ok(_) => Err(PoolError::Unsupported {
                path: path.into(),
                what: "opening a file or device (only anonymous pools are portable)",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PathBuf {
        PathBuf::from("/dev/dax0.0")
    }
    const MIB: u64 = 1 << 20;
    const DEV: u64 = 1_040_187_392; // a 1 GiB emulated NVDIMM's devdax namespace

    fn devdax(opts: PoolOptions) -> Result<Plan, PoolError> {
        plan_devdax(&p(), &opts, DEV, 2 * MIB)
    }

    #[test]
    fn devdax_refuses_map_private() {
        let e = devdax(PoolOptions::new().map_private()).unwrap_err();
        assert!(matches!(e, PoolError::PrivateDevDax { .. }));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: device dax supports only shared mappings, but map_private was requested"
        );
    }

    #[test]
    fn devdax_whole_device_default() {
        let plan = devdax(PoolOptions::new()).unwrap();
        assert_eq!(plan.offset, 0);
        assert_eq!(plan.len as u64, DEV);
        assert_eq!(plan.pages as u64, DEV / 4096);
        let plan = devdax(PoolOptions::new().page_size(2 << 20)).unwrap();
        assert_eq!(plan.pages as u64, DEV / (2 * MIB));
    }

    #[test]
    fn devdax_unaligned_size_and_offset() {
        let e = devdax(PoolOptions::new().size(3 * MIB)).unwrap_err();
        assert!(
            matches!(e, PoolError::Unaligned { what: "size", value, align, .. }
            if value == 3 * MIB && align == 2 * MIB)
        );
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: size 3145728 is not a multiple of the alignment 2097152"
        );
        let e = devdax(PoolOptions::new().offset(4096)).unwrap_err();
        assert!(matches!(
            e,
            PoolError::Unaligned {
                what: "offset",
                value: 4096,
                ..
            }
        ));
    }

    #[test]
    fn devdax_larger_than_device() {
        let e = devdax(PoolOptions::new().size(DEV + 2 * MIB)).unwrap_err();
        assert!(
            matches!(e, PoolError::TooLarge { size, available: DEV, .. } if size == DEV + 2 * MIB)
        );
        assert!(e.to_string().contains("1040187392 bytes available"), "{e}");
        // Fits by size, but not at this offset.
        let e = devdax(PoolOptions::new().size(DEV).offset(2 * MIB)).unwrap_err();
        assert!(matches!(e, PoolError::TooLarge { .. }));
        // An offset past the end, whole-device default: the offset is the
        // problem, not a size nobody asked for.
        let e = devdax(PoolOptions::new().offset(DEV + 2 * MIB)).unwrap_err();
        assert!(matches!(e, PoolError::OffsetPastEnd { what: "device", .. }));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: offset 1042284544 is past the end of the device (1040187392 bytes)"
        );
        // Offset exactly at the end: nothing left.
        let e = devdax(PoolOptions::new().offset(DEV)).unwrap_err();
        assert!(matches!(e, PoolError::TooSmall { .. }));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: the device has 0 bytes from offset 1040187392 to its end \
             (1040187392 in all), less than one page of 4096 bytes"
        );
        // Overflowing offset + size is an error, not a wrap.
        let e = devdax(PoolOptions::new().size(2 * MIB).offset(u64::MAX - MIB + 1)).unwrap_err();
        assert!(matches!(
            e,
            PoolError::Unaligned { .. } | PoolError::TooLarge { .. }
        ));
    }

    #[test]
    fn page_size_checks() {
        let e = devdax(PoolOptions::new().page_size(6000)).unwrap_err();
        assert!(matches!(
            e,
            PoolError::PageSizeNotPowerOfTwo {
                page_size: 6000,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: page size 6000 is not a power of two"
        );
        let e = devdax(PoolOptions::new().page_size(0)).unwrap_err();
        assert!(matches!(
            e,
            PoolError::PageSizeNotPowerOfTwo { page_size: 0, .. }
        ));
        let e = devdax(PoolOptions::new().page_size(512)).unwrap_err();
        assert!(matches!(
            e,
            PoolError::PageSizeTooSmall { page_size: 512, .. }
        ));
        let e = devdax(PoolOptions::new().page_size(4 << 20).size(2 * MIB)).unwrap_err();
        assert!(matches!(e, PoolError::PageSizeTooLarge { .. }));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: page size 4194304 is larger than the pool size 2097152"
        );
        // A file smaller than one page: the file is what is too small.
        let e = plan(&p(), "file", &PoolOptions::new(), 100, 4096, None).unwrap_err();
        assert!(matches!(
            e,
            PoolError::TooSmall {
                available: 100,
                offset: 0,
                page_size: 4096,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: the file has 100 bytes, less than one page of 4096 bytes"
        );
    }

    #[test]
    fn zero_and_ragged_sizes() {
        let e = plan(
            &p(),
            "file",
            &PoolOptions::new().size(0),
            1 << 20,
            4096,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, PoolError::ZeroSize { .. }));
        let e = plan(&p(), "file", &PoolOptions::new(), 0, 4096, None).unwrap_err();
        assert!(matches!(e, PoolError::TooSmall { available: 0, .. }));
        assert_eq!(
            e.to_string(),
            "/dev/dax0.0: the file has 0 bytes, less than one page of 4096 bytes"
        );
        let e = plan(
            &p(),
            "file",
            &PoolOptions::new().size(6000),
            1 << 20,
            4096,
            None,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            PoolError::SizeNotPageMultiple {
                size: 6000,
                page_size: 4096,
                ..
            }
        ));
        // Default size rounds a ragged file down to whole pages.
        let plan = plan(&p(), "file", &PoolOptions::new(), 10_000, 4096, None).unwrap();
        assert_eq!((plan.len, plan.pages), (8192, 2));
    }

    #[test]
    fn too_many_pages() {
        let e = plan(&p(), "device", &PoolOptions::new(), u64::MAX, 4096, None).unwrap_err();
        assert!(matches!(e, PoolError::TooManyPages { .. }), "{e}");
    }
}
