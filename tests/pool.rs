//! DevicePagePool on the anonymous and file backends (device dax runs in
//! its own VM; the `devdax_*` tests here run only when
//! `PERCPU_REF_DAX=/dev/daxX.Y` is set).

#![cfg(all(feature = "dax", not(percpu_ref_loom)))]

use percpu_ref::{
    Backend, DevicePage, DevicePagePool, PersistMethod, PoolError, PoolOptions, ShutdownHandle,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Barrier;
use std::time::Duration;

mod common;

const PAGE: usize = 4096;

/// How long a `fork()` child may take (it runs a few pool calls).
#[cfg(target_os = "linux")]
const FORK_LIMIT: Duration = Duration::from_secs(60);

/// A scratch file removed on drop (no tempfile dependency).
struct Scratch(PathBuf);

impl Scratch {
    fn dir() -> PathBuf {
        std::env::temp_dir()
    }

    fn new_in(dir: &Path, tag: &str, len: u64) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "percpu-ref-pool-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, SeqCst)
        );
        let path = dir.join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        Scratch(path)
    }

    fn new(tag: &str, len: u64) -> Scratch {
        Self::new_in(&Self::dir(), tag, len)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file_opts() -> PoolOptions {
    PoolOptions::new().allow_file_fallback()
}

fn is_root() -> bool {
    #[cfg(unix)]
    {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

// ------------------------------------------------------------ bad input

#[test]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn missing_path_is_not_found() {
    let e = DevicePagePool::open("/definitely/not/here/dax0.0", &PoolOptions::new()).unwrap_err();
    assert!(matches!(e, PoolError::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("/definitely/not/here/dax0.0"), "{e}");
}

#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn permission_denied() {
    // Root bypasses file modes, but not sysfs: a read-only attribute cannot
    // be opened for writing by anyone (EACCES), an honest permission error.
    let sysfs = Path::new("/sys/devices/system/cpu/possible");
    if sysfs.exists() {
        let e = DevicePagePool::open(sysfs, &file_opts()).unwrap_err();
        assert!(matches!(e, PoolError::PermissionDenied { .. }), "{e:?}");
        assert!(
            e.to_string().contains("/sys/devices/system/cpu/possible"),
            "{e}"
        );
    } else {
        eprintln!("skipped the sysfs case: {} does not exist", sysfs.display());
    }
    // A file without permissions: meaningful only for a non-root user.
    if is_root() {
        eprintln!("skipped the mode-000 case: running as root, which bypasses file modes");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let f = Scratch::new("mode000", 4 * PAGE as u64);
    std::fs::set_permissions(&f.0, std::fs::Permissions::from_mode(0o000)).unwrap();
    let e = DevicePagePool::open(&f.0, &file_opts()).unwrap_err();
    assert!(matches!(e, PoolError::PermissionDenied { .. }), "{e:?}");
}

#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn char_device_that_is_not_dax() {
    let e = DevicePagePool::open("/dev/null", &PoolOptions::new()).unwrap_err();
    match &e {
        PoolError::NotDax {
            major,
            minor,
            subsystem,
            ..
        } => {
            assert_eq!((*major, *minor), (1, 3));
            assert_eq!(subsystem, "mem");
        }
        other => panic!("expected NotDax, got {other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "/dev/null: character device 1:3 is not device dax (its sysfs subsystem is \"mem\")"
    );
}

#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn directory_and_block_device_are_refused() {
    let dir = Scratch::dir();
    let e = DevicePagePool::open(&dir, &PoolOptions::new()).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::UnsupportedFileType {
                file_type: "directory",
                ..
            }
        ),
        "{e:?}"
    );

    use std::os::unix::fs::FileTypeExt;
    let block = std::fs::read_dir("/dev").ok().and_then(|d| {
        d.filter_map(Result::ok)
            .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
            .map(|e| e.path())
    });
    match block {
        Some(dev) => {
            let e = DevicePagePool::open(&dev, &PoolOptions::new()).unwrap_err();
            assert!(
                matches!(
                    e,
                    PoolError::UnsupportedFileType {
                        file_type: "block device",
                        ..
                    }
                ),
                "{}: {e:?}",
                dev.display()
            );
            assert!(e.to_string().contains(&*dev.to_string_lossy()), "{e}");
        }
        None => eprintln!("skipped the block device case: no block device in /dev"),
    }
}

#[test]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn zero_sizes() {
    let empty = Scratch::new("empty", 0);
    let e = DevicePagePool::open(&empty.0, &file_opts()).unwrap_err();
    assert!(
        matches!(e, PoolError::TooSmall { available: 0, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the file has 0 bytes, less than one page of 4096 bytes",
            empty.0.display()
        )
    );

    let f = Scratch::new("zero", 4 * PAGE as u64);
    let e = DevicePagePool::open(&f.0, &file_opts().size(0)).unwrap_err();
    assert!(matches!(e, PoolError::ZeroSize { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("{}: the pool size is zero", f.0.display())
    );
    // An offset at the very end leaves nothing.
    let e = DevicePagePool::open(&f.0, &file_opts().offset(4 * PAGE as u64)).unwrap_err();
    assert!(matches!(e, PoolError::TooSmall { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the file has 0 bytes from offset 16384 to its end (16384 in all), \
             less than one page of 4096 bytes",
            f.0.display()
        )
    );
}

#[test]
fn anonymous_zero_size() {
    let e = DevicePagePool::anonymous(0).unwrap_err();
    assert!(matches!(e, PoolError::ZeroSize { .. }), "{e:?}");
    assert_eq!(e.to_string(), "anonymous: the pool size is zero");
}

#[test]
fn bad_page_sizes() {
    let e =
        DevicePagePool::anonymous_with(64 * PAGE, &PoolOptions::new().page_size(6000)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::PageSizeNotPowerOfTwo {
                page_size: 6000,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "anonymous: page size 6000 is not a power of two"
    );

    let e =
        DevicePagePool::anonymous_with(PAGE, &PoolOptions::new().page_size(2 * PAGE)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::PageSizeTooLarge {
                page_size: 8192,
                pool_size: 4096,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "anonymous: page size 8192 is larger than the pool size 4096"
    );

    let e =
        DevicePagePool::anonymous_with(64 * PAGE, &PoolOptions::new().page_size(1024)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::PageSizeTooSmall {
                page_size: 1024,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "anonymous: page size 1024 is smaller than the minimum 4096"
    );

    let e = DevicePagePool::anonymous(PAGE + 1).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::SizeNotPageMultiple {
                size: 4097,
                page_size: 4096,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "anonymous: pool size 4097 is not a multiple of the page size 4096"
    );
}

#[test]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn bad_page_sizes_on_files() {
    let f = Scratch::new("pagesize", 2 * PAGE as u64);
    let e = DevicePagePool::open(&f.0, &file_opts().page_size(3000)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::PageSizeNotPowerOfTwo {
                page_size: 3000,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("{}: page size 3000 is not a power of two", f.0.display())
    );
    // 8 KiB file, 16 KiB pages: not even one page.
    let e = DevicePagePool::open(&f.0, &file_opts().page_size(4 * PAGE)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::TooSmall {
                available: 8192,
                page_size: 16384,
                ..
            }
        ),
        "{e:?}"
    );
    // With an explicit size, the size is what is too small.
    let e = DevicePagePool::open(&f.0, &file_opts().page_size(4 * PAGE).size(8192)).unwrap_err();
    assert!(matches!(e, PoolError::PageSizeTooLarge { .. }), "{e:?}");
}

/// Every open error names the path and what is really wrong, in its
/// message (not only in `source()`).
#[test]
#[cfg(unix)]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn open_errors_name_the_path_and_the_cause() {
    let open = |p: &Path, o: &PoolOptions| DevicePagePool::open(p, o).unwrap_err();
    let msg = |p: &Path, o: &PoolOptions| open(p, o).to_string();

    // A file smaller than one page.
    let small = Scratch::new("hundred", 100);
    let e = open(&small.0, &file_opts());
    assert!(
        matches!(&e, PoolError::TooSmall { path, available: 100, offset: 0, page_size: 4096, .. } if *path == small.0),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the file has 100 bytes, less than one page of 4096 bytes",
            small.0.display()
        )
    );

    // A symbolic link loop.
    let dir = Scratch::dir().join(format!("percpu-ref-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let e = open(&a, &PoolOptions::new());
    assert!(matches!(e, PoolError::BadPath { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("{}: too many levels of symbolic links", a.display())
    );

    // A path through a regular file.
    let through = small.0.join("page");
    assert_eq!(
        msg(&through, &PoolOptions::new()),
        format!(
            "{}: a component of the path is not a directory",
            through.display()
        )
    );

    // A path with a NUL byte, and an empty path: quoted, so they show.
    let nul = PathBuf::from("/tmp/dax\0zero");
    let e = open(&nul, &PoolOptions::new());
    assert!(
        matches!(
            &e,
            PoolError::BadPath {
                reason: "the path contains a NUL byte",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "\"/tmp/dax\\0zero\": the path contains a NUL byte"
    );
    assert_eq!(
        msg(Path::new(""), &PoolOptions::new()),
        "\"\": the path is empty"
    );

    // An offset past the end of the file, no size asked.
    let f = Scratch::new("past", 4 * PAGE as u64);
    let e = open(&f.0, &file_opts().offset(16 * PAGE as u64));
    assert!(
        matches!(
            &e,
            PoolError::OffsetPastEnd {
                what: "file",
                offset: 65536,
                available: 16384,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{}: offset 65536 is past the end of the file (16384 bytes)",
            f.0.display()
        )
    );
    // With a size, the message is about that size.
    assert_eq!(
        msg(
            &f.0,
            &file_opts().offset(16 * PAGE as u64).size(PAGE as u64)
        ),
        format!(
            "{}: a pool of 4096 bytes at offset 65536 does not fit in the 16384 bytes available",
            f.0.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn pool_larger_than_the_file() {
    let f = Scratch::new("small", 16 * PAGE as u64);
    let e = DevicePagePool::open(&f.0, &file_opts().size(32 * PAGE as u64)).unwrap_err();
    match &e {
        PoolError::TooLarge {
            size,
            offset,
            available,
            ..
        } => assert_eq!((*size, *offset, *available), (131072, 0, 65536)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("131072") && msg.contains("65536"), "{msg}");
    assert!(msg.contains(&*f.0.to_string_lossy()), "{msg}");
    // Fits by size, not at this offset.
    let e = DevicePagePool::open(
        &f.0,
        &file_opts().size(16 * PAGE as u64).offset(PAGE as u64),
    )
    .unwrap_err();
    assert!(matches!(e, PoolError::TooLarge { .. }), "{e:?}");
    // An offset that is not a multiple of the OS page size.
    let e = DevicePagePool::open(&f.0, &file_opts().offset(100)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Unaligned {
                what: "offset",
                value: 100,
                ..
            }
        ),
        "{e:?}"
    );
}

/// Every regular-file filesystem available here that is not DAX refuses
/// MAP_SYNC: the error says so, and the opt-in file fallback works.
#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn fsdax_refused_and_file_fallback() {
    let mut dirs = vec![Scratch::dir()];
    if Path::new("/dev/shm").is_dir() {
        dirs.push(PathBuf::from("/dev/shm")); // tmpfs
    }
    for dir in dirs {
        let f = Scratch::new_in(&dir, "fsdax", 8 * PAGE as u64);
        match DevicePagePool::open(&f.0, &PoolOptions::new()) {
            Err(PoolError::FsDaxRefused { path, source }) => {
                assert_eq!(path, f.0);
                let e = PoolError::FsDaxRefused { path, source };
                assert!(e.to_string().contains("allow_file_fallback"), "{e}");
            }
            Ok(pool) => {
                // A real DAX filesystem: nothing to refuse.
                assert_eq!(pool.backend(), Backend::FsDax);
                eprintln!("{} is on a DAX filesystem", dir.display());
                continue;
            }
            Err(e) => panic!("{}: expected FsDaxRefused, got {e:?}", dir.display()),
        }
        let pool = DevicePagePool::open(&f.0, &file_opts()).unwrap();
        assert_eq!(pool.backend(), Backend::File);
        assert_eq!(pool.persist_method(), PersistMethod::Msync);
        assert_eq!(pool.page_count(), 8);
        pool.alloc().unwrap().persist().unwrap();
    }
}

// ------------------------------------------------------------ basics

#[test]
fn alloc_write_read_free() {
    let pool = DevicePagePool::anonymous(8 * PAGE).unwrap();
    assert_eq!(pool.backend(), Backend::Anonymous);
    assert_eq!(pool.persist_method(), PersistMethod::Nothing);
    let mut a = pool.alloc().unwrap();
    assert!(a.as_slice().iter().all(|&b| b == 0));
    a.as_mut_slice().unwrap().fill(0xab);
    let b = a.clone();
    assert_eq!(b.ref_count(), 2);
    assert!(a.as_mut_slice().is_none(), "shared pages are not writable");
    assert!(b.as_slice().iter().all(|&x| x == 0xab));
    assert_eq!(
        a.as_ptr() as usize - pool.as_ptr() as usize,
        a.index() * PAGE
    );
    let st = pool.stats();
    assert_eq!((st.pages, st.allocated, st.free), (8, 1, 7));
    drop((a, b));
    let st = pool.stats();
    assert_eq!((st.allocated, st.free), (0, 8));
}

#[test]
fn exhaustion_and_reuse() {
    let pool = DevicePagePool::anonymous(2 * PAGE).unwrap();
    let a = pool.alloc().unwrap();
    let b = pool.alloc().unwrap();
    assert_ne!(a.index(), b.index());
    let e = pool.alloc().unwrap_err();
    assert!(matches!(e, PoolError::Exhausted { pages: 2, .. }), "{e:?}");
    let freed = a.index();
    drop(a);
    assert_eq!(pool.alloc().unwrap().index(), freed);
}

#[test]
fn two_mib_pages() {
    let pool =
        DevicePagePool::anonymous_with(4 << 20, &PoolOptions::new().page_size(2 << 20)).unwrap();
    assert_eq!((pool.page_count(), pool.page_size()), (2, 2 << 20));
    let mut p = pool.alloc().unwrap();
    assert_eq!(p.size(), 2 << 20);
    let s = p.as_mut_slice().unwrap();
    s[(2 << 20) - 1] = 1;
    assert_eq!(p.as_slice()[(2 << 20) - 1], 1);
}

#[test]
fn lookup_finds_allocated_pages_only() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let other = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let a = pool.alloc().unwrap();
    let x = other.alloc().unwrap();
    let found = DevicePagePool::lookup(a.as_ptr().wrapping_add(PAGE - 1)).unwrap();
    assert_eq!((found.index(), found.as_ptr()), (a.index(), a.as_ptr()));
    assert_eq!(a.ref_count(), 2);
    let found_x = DevicePagePool::lookup(x.as_ptr()).unwrap();
    assert_eq!(found_x.as_ptr(), x.as_ptr());

    // A free page of a live pool.
    let free_addr = (0..4)
        .map(|i| pool.as_ptr().wrapping_add(i * PAGE))
        .find(|&p| p != a.as_ptr())
        .unwrap();
    let e = DevicePagePool::lookup(free_addr).unwrap_err();
    assert!(matches!(e, PoolError::PageNotAllocated { .. }), "{e:?}");
    // An address no pool maps.
    let local = 0u8;
    let e = DevicePagePool::lookup(&local).unwrap_err();
    assert!(matches!(e, PoolError::NotMapped { .. }), "{e:?}");
}

/// Each thread remembers the last pool it found; that must never give a
/// wrong answer: not for a pool shutting down, nor once it is unmapped and
/// its addresses are reused by another pool, nor when a read of one pool
/// finds another inside its closure.
#[test]
fn lookups_never_trust_a_dead_pool_remembered_by_the_thread() {
    let opts = PoolOptions::new().optimistic_reads();
    let a = DevicePagePool::anonymous_with(4 * PAGE, &opts).unwrap();
    let pa = a.alloc().unwrap();
    let a_addr = pa.as_ptr();
    assert_eq!(DevicePagePool::lookup(a_addr).unwrap().index(), pa.index());
    // Shutting down: refused, though the thread remembers the pool.
    let sd = a.shutdown();
    let e = DevicePagePool::lookup(a_addr).unwrap_err();
    assert!(matches!(e, PoolError::ShuttingDown { .. }), "{e:?}");
    let e = DevicePagePool::read(a_addr, |_| ()).unwrap_err();
    assert!(matches!(e, PoolError::ShuttingDown { .. }), "{e:?}");
    drop(pa);
    assert!(sd.is_complete());
    drop((a, sd));
    assert!(common::no_pool_at(a_addr, DevicePagePool::lookup(a_addr)));

    // A new pool, often at the same addresses: found, not the old one.
    let b = DevicePagePool::anonymous_with(4 * PAGE, &opts).unwrap();
    let pb: Vec<DevicePage> = (0..4).map(|_| b.alloc().unwrap()).collect();
    for p in &pb {
        let found = DevicePagePool::lookup(p.as_ptr()).unwrap();
        assert_eq!((found.as_ptr(), found.ref_count()), (p.as_ptr(), 2));
    }
    let reused = (b.as_ptr() as usize..b.as_ptr() as usize + b.len()).contains(&(a_addr as usize));
    eprintln!("the second pool reused the first one's addresses: {reused}");

    // A read of one pool that reads another inside: the inner read takes
    // the thread's memory of the outer pool; the outer pool stays pinned.
    let c = DevicePagePool::anonymous_with(4 * PAGE, &opts).unwrap();
    let mut pc = c.alloc().unwrap();
    pc.writer().unwrap().fill(3);
    let mut pb0 = pb.into_iter().next().unwrap();
    pb0.writer().unwrap().fill(7);
    let (b_addr, c_addr) = (pb0.as_ptr(), pc.as_ptr());
    let got = DevicePagePool::read(b_addr, |outer| {
        let inner = DevicePagePool::read(c_addr, |v| v.read_u8(0).unwrap()).unwrap();
        (outer.read_u8(0).unwrap(), inner)
    })
    .unwrap();
    assert_eq!(got, (7, 3));
    drop((pb0, b, pc, c));
}

#[test]
fn exclusive_writer_blocks_lookup() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let mut p = pool.alloc().unwrap();
    p.as_mut_slice().unwrap()[0] = 1;
    let e = DevicePagePool::lookup(p.as_ptr()).unwrap_err();
    assert!(matches!(e, PoolError::PageBusy { .. }), "{e:?}");
    assert_eq!(
        p.ref_count(),
        1,
        "the failed lookup gave its reference back"
    );
    // Reading through the handle ends the exclusivity.
    assert_eq!(p.as_slice()[0], 1);
    let found = DevicePagePool::lookup(p.as_ptr()).unwrap();
    assert_eq!(found.as_slice()[0], 1);
    assert!(p.as_mut_slice().is_none());
    drop(found);
    assert!(p.as_mut_slice().is_some());
}

/// A lookup of a page whose only holder is inside `as_mut_slice` (its
/// count frozen for a moment, which reads as zero to a speculative get)
/// says the page is busy, never that it is free.
#[test]
fn lookup_during_as_mut_slice_is_busy_not_free() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let mut page = pool.alloc().unwrap();
    let addr = page.as_ptr();
    // Enough busy answers that the holder was caught inside `as_mut_slice`
    // many times; bounded in time so that a slow machine cannot stall.
    let want_busy = if cfg!(miri) { 20 } else { 200_000 };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stop = AtomicBool::new(false);
    let (mut found, mut busy) = (0u64, 0u64);
    std::thread::scope(|s| {
        let stop = &stop;
        let page = &mut page;
        s.spawn(move || {
            while !stop.load(SeqCst) {
                // Freezes the count when the handle is not exclusive yet...
                let _ = page.as_mut_slice();
                // ...and this ends the exclusivity again.
                let _ = page.as_slice();
            }
        });
        while busy < want_busy && std::time::Instant::now() < deadline {
            match DevicePagePool::lookup(addr) {
                Ok(p) => {
                    assert_eq!(p.as_ptr(), addr);
                    found += 1;
                }
                Err(PoolError::PageBusy { index }) => {
                    assert_eq!(index, 0);
                    busy += 1;
                }
                Err(e) => {
                    stop.store(true, SeqCst);
                    panic!("lookup of a held page: {e} ({e:?})");
                }
            }
        }
        stop.store(true, SeqCst);
    });
    eprintln!("{found} lookups found the page, {busy} were told it is busy");
    assert_eq!(page.ref_count(), 1, "every lookup gave its reference back");
}

#[test]
fn raw_pointer_writes_from_two_threads() {
    let pool = DevicePagePool::anonymous(PAGE).unwrap();
    let page = pool.alloc().unwrap();
    std::thread::scope(|s| {
        for half in 0..2 {
            let page = page.clone();
            s.spawn(move || {
                let p = page.as_mut_ptr();
                for i in 0..PAGE / 2 {
                    // SAFETY: the two threads write disjoint halves; nothing
                    // reads the page until both are joined; `page` is alive.
                    unsafe { p.add(half * PAGE / 2 + i).write(half as u8 + 1) };
                }
            });
        }
    });
    let s = page.as_slice();
    assert!(s[..PAGE / 2].iter().all(|&b| b == 1));
    assert!(s[PAGE / 2..].iter().all(|&b| b == 2));
}

#[test]
fn persist_ranges_are_checked() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let p = pool.alloc().unwrap();
    p.persist().unwrap();
    p.persist_range(10..20).unwrap();
    let e = p.persist_range(0..PAGE + 1).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::OutOfRange {
                start: 0,
                end: 4097,
                len: 4096
            }
        ),
        "{e:?}"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let e = p.persist_range(20..10).unwrap_err();
    assert!(matches!(e, PoolError::OutOfRange { .. }), "{e:?}");
    pool.persist().unwrap();
    assert!(pool.persist_range(0..5 * PAGE).is_err());
}

// ------------------------------------------------------------ shutdown

#[test]
fn shutdown_completes_exactly_when_the_last_page_drops() {
    let pool = DevicePagePool::anonymous(8 * PAGE).unwrap();
    let mut a = pool.alloc().unwrap();
    a.as_mut_slice().unwrap().fill(7);
    let a2 = a.clone();
    let b = pool.alloc().unwrap();
    let (ia, ib) = (a.index(), b.index());

    let sd = pool.shutdown();
    // New pages and lookups are refused at once...
    assert!(matches!(pool.alloc(), Err(PoolError::ShuttingDown { .. })));
    assert!(matches!(
        DevicePagePool::lookup(a.as_ptr()),
        Err(PoolError::ShuttingDown { .. })
    ));
    assert!(pool.is_shutting_down());
    // ...held pages stay readable...
    assert!(a2.as_slice().iter().all(|&x| x == 7));
    // ...and the wait reports who holds what.
    let held = sd.wait_timeout(Duration::from_millis(1)).unwrap_err();
    let mut want = vec![ia, ib];
    want.sort_unstable();
    assert_eq!((held.count, held.indices.clone()), (2, want));
    assert!(held.to_string().contains("2 pages still held"), "{held}");

    drop(a);
    assert!(!sd.is_complete());
    drop(b);
    assert!(!sd.is_complete());
    assert_eq!(sd.held(), vec![ia]);
    assert!(a2.as_slice().iter().all(|&x| x == 7));
    drop(a2); // the last one: release runs inside this drop
    assert!(sd.is_complete());
    let report = sd.wait_timeout(Duration::ZERO).unwrap();
    assert_eq!((report.pages, report.bytes), (8, 8 * PAGE));
    assert!(report.persist_error.is_none());
    // After completion the pool is gone from the registry.
    let addr = pool.as_ptr();
    assert!(common::no_pool_at(addr, DevicePagePool::lookup(addr)));
    let st = pool.stats();
    assert_eq!((st.allocated, st.free), (0, 8));
    // A second shutdown is the same one.
    assert!(pool.shutdown().is_complete());
}

#[test]
fn racing_shutdowns_all_refuse_allocation_on_return() {
    let rounds = if cfg!(miri) { 2 } else { 50 };
    for _ in 0..rounds {
        let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
        let held = pool.alloc().unwrap();
        let handles: Vec<ShutdownHandle> = std::thread::scope(|s| {
            let ts: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let h = pool.shutdown();
                        // Whichever call did the kill, this one returned
                        // after it: allocation is refused now.
                        assert!(matches!(pool.alloc(), Err(PoolError::ShuttingDown { .. })));
                        h
                    })
                })
                .collect();
            ts.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(handles.iter().all(|h| !h.is_complete()));
        drop(held);
        assert!(handles.iter().all(ShutdownHandle::is_complete));
    }
}

#[test]
fn shutdown_without_pages_completes_at_once() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let sd = pool.shutdown();
    assert!(sd.is_complete());
    assert_eq!(sd.wait().pages, 4);
}

#[test]
fn dropping_the_pool_first_keeps_pages_mapped() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let mut p = pool.alloc().unwrap();
    p.as_mut_slice().unwrap().fill(0x5a);
    let sd = pool.shutdown();
    let addr = p.as_ptr();
    drop(pool);
    assert!(matches!(
        DevicePagePool::lookup(addr),
        Err(PoolError::ShuttingDown { .. })
    ));
    let q = p.clone();
    drop(p);
    assert!(q.as_slice().iter().all(|&x| x == 0x5a), "still mapped");
    assert!(!sd.is_complete());
    drop(q);
    assert!(sd.is_complete());
    assert!(common::no_pool_at(addr, DevicePagePool::lookup(addr)));
}

#[test]
fn dropping_the_pool_without_a_shutdown_handle() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let p = pool.alloc().unwrap();
    let addr = p.as_ptr();
    drop(pool); // implicit shutdown, nobody waits
    assert!(p.as_slice().iter().all(|&x| x == 0));
    drop(p); // unmaps and frees everything
    assert!(common::no_pool_at(addr, DevicePagePool::lookup(addr)));
}

#[test]
fn async_wait() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let p = pool.alloc().unwrap();
    let sd = pool.shutdown();
    let fut = sd.wait_async();
    let t = std::thread::spawn(move || drop(p));
    let report = common::block_on(fut, Duration::from_secs(30));
    t.join().unwrap();
    assert_eq!(report.pages, 4);
    assert!(sd.is_complete());
}

/// Two threads allocate, clone, look up and drop pages; the main thread
/// shuts the pool down in the middle. Afterwards: no page lost, the
/// shutdown completed only once every page was dropped, held pages were
/// readable (with the right contents) after the shutdown started, and
/// alloc/lookup failed with ShuttingDown.
#[test]
fn concurrent_alloc_clone_drop_with_shutdown_in_the_middle() {
    const PAGES: usize = 64;
    let rounds = if cfg!(miri) { 3 } else { 40 };
    let iters = if cfg!(miri) { 30 } else { 2_000 };
    for round in 0..rounds {
        let pool = DevicePagePool::anonymous(PAGES * PAGE).unwrap();
        let pool = &pool;
        let started = Barrier::new(3);
        let stop = AtomicBool::new(false);
        let held = AtomicUsize::new(0); // page references the test holds
        let ops = AtomicUsize::new(0); // loop iterations of both threads
        let sd: std::sync::OnceLock<ShutdownHandle> = std::sync::OnceLock::new();
        std::thread::scope(|s| {
            for t in 0..2u8 {
                let (started, stop, held, ops, sd) = (&started, &stop, &held, &ops, &sd);
                s.spawn(move || {
                    let mut mine: Vec<DevicePage> = Vec::new();
                    let tag = |p: &DevicePage| (p.index() as u8) ^ (t * 0x80);
                    let mut n = 0usize;
                    started.wait();
                    loop {
                        n += 1;
                        ops.fetch_add(1, SeqCst);
                        match pool.alloc() {
                            Ok(mut p) => {
                                held.fetch_add(1, SeqCst);
                                let v = tag(&p);
                                p.as_mut_slice().unwrap().fill(v);
                                if n % 3 == 0 {
                                    held.fetch_add(1, SeqCst);
                                    mine.push(p.clone());
                                }
                                if n % 5 == 0 {
                                    if let Ok(found) = DevicePagePool::lookup(p.as_ptr()) {
                                        held.fetch_add(1, SeqCst);
                                        assert_eq!(found.index(), p.index());
                                        mine.push(found);
                                    }
                                }
                                mine.push(p);
                            }
                            Err(PoolError::Exhausted { .. }) => {}
                            Err(PoolError::ShuttingDown { .. }) => {
                                assert!(stop.load(SeqCst) || pool.is_shutting_down());
                                break;
                            }
                            Err(e) => panic!("alloc: {e}"),
                        }
                        // Drop a few, oldest first, keeping some held.
                        while mine.len() > 6 || (n % 7 == 0 && !mine.is_empty()) {
                            held.fetch_sub(1, SeqCst);
                            drop(mine.remove(0));
                        }
                    }
                    // Shutdown has started: every page held must be intact
                    // and readable (nothing was unmapped under us), and
                    // lookups are refused.
                    let sd = sd.wait();
                    for p in &mine {
                        let v = tag(p);
                        assert!(
                            p.as_slice().iter().all(|&b| b == v),
                            "page {} corrupt",
                            p.index()
                        );
                        assert!(matches!(
                            DevicePagePool::lookup(p.as_ptr()),
                            Err(PoolError::ShuttingDown { .. })
                        ));
                    }
                    while let Some(p) = mine.pop() {
                        held.fetch_sub(1, SeqCst);
                        drop(p);
                        // Completion implies every reference is gone: the
                        // counter is decremented before each drop.
                        if sd.is_complete() {
                            assert_eq!(held.load(SeqCst), 0, "completed while pages were held");
                        }
                    }
                });
            }
            started.wait();
            // Let the threads run a while (a different number of
            // operations each round), then shut down in the middle.
            let warmup = (round % 8 + 1) * iters / 8;
            while ops.load(SeqCst) < warmup || held.load(SeqCst) < 4 {
                std::thread::yield_now();
            }
            let handle = pool.shutdown();
            stop.store(true, SeqCst);
            assert!(matches!(pool.alloc(), Err(PoolError::ShuttingDown { .. })));
            let _ = sd.set(handle);
        });
        let sd = sd.get().unwrap();
        assert!(sd.is_complete(), "round {round}: every page was dropped");
        assert_eq!(held.load(SeqCst), 0);
        let st = pool.stats();
        assert_eq!(st.allocated, 0, "round {round}: {st:?}");
        assert_eq!(st.free, PAGES, "round {round}: a page was lost: {st:?}");
        assert_eq!(st.free + st.allocated, st.pages);
        assert_eq!(sd.wait().pages, PAGES);
    }
}

// ------------------------------------------------------------ optimistic reads

fn optimistic(pages: usize) -> DevicePagePool {
    DevicePagePool::anonymous_with(pages * PAGE, &PoolOptions::new().optimistic_reads()).unwrap()
}

#[test]
fn optimistic_read_api_and_errors() {
    let pool = optimistic(4);
    let mut page = pool.alloc().unwrap();
    assert!(
        page.as_mut_slice().is_none(),
        "no &mut [u8] in an optimistic pool"
    );
    {
        let mut w = page.writer().expect("a new page is unique");
        assert_eq!(w.len(), PAGE);
        w.write(3, b"abcdefghij").unwrap(); // unaligned, across a word
        w.write_u64(PAGE - 8, 0x1122_3344_5566_7788).unwrap();
        let e = w.write(PAGE - 2, b"xyz").unwrap_err();
        assert!(
            matches!(e, PoolError::OutOfRange { start, end, len } if (start, end, len) == (PAGE - 2, PAGE + 1, PAGE)),
            "{e:?}"
        );
        assert_eq!(&w.as_slice()[3..13], b"abcdefghij");
        // While the writer is open: lookups and reads back off.
        let e = DevicePagePool::lookup(page_addr(&pool, 0)).unwrap_err();
        assert!(matches!(e, PoolError::PageBusy { .. }), "{e:?}");
    }
    let at = page.as_ptr();
    assert_eq!(&page.as_slice()[3..13], b"abcdefghij");

    // By address and by index; the view's accessors.
    let got = DevicePagePool::read(at.wrapping_add(100), |v| {
        assert_eq!(
            (v.len(), v.index(), v.is_empty()),
            (PAGE, page.index(), false)
        );
        let mut buf = [0u8; 10];
        v.read_into(3, &mut buf).unwrap();
        (buf, v.read_u64(PAGE - 8).unwrap(), v.read_u8(4).unwrap())
    })
    .unwrap();
    assert_eq!(got, (*b"abcdefghij", 0x1122_3344_5566_7788, b'b'));
    let v = pool.read_page(page.index(), |v| v.to_vec()).unwrap();
    assert_eq!(&v[3..13], b"abcdefghij");
    // Out of range inside the view: an error, not a panic.
    let e = pool
        .read_page(page.index(), |v| v.read_u64(PAGE - 4))
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, PoolError::OutOfRange { .. }), "{e:?}");
    let e = pool
        .read_page(page.index(), |v| v.read_into(usize::MAX, &mut [0; 2]))
        .unwrap();
    assert!(matches!(e, Err(PoolError::OutOfRange { .. })), "{e:?}");
    let e = pool.read_page(4, |_| ()).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::OutOfRange {
                start: 4,
                len: 4,
                ..
            }
        ),
        "{e:?}"
    );

    // A free page, an unmapped address.
    let free = (0..4).find(|&i| i != page.index()).unwrap();
    let e = pool.read_page(free, |_| ()).unwrap_err();
    assert!(
        matches!(e, PoolError::PageNotAllocated { index, .. } if index == free),
        "{e:?}"
    );
    let local = 0u8;
    let e = DevicePagePool::read(&local, |_| ()).unwrap_err();
    assert!(matches!(e, PoolError::NotMapped { .. }), "{e:?}");
    // A reference held elsewhere: no writer.
    let other = page.clone();
    assert!(page.writer().is_none());
    drop(other);
    assert!(page.writer().is_some());

    // A pool without optimistic reads refuses them, by name.
    let plain = DevicePagePool::anonymous(PAGE).unwrap();
    let mut p = plain.alloc().unwrap();
    // (A writer works in any pool, also after a leaked one.)
    std::mem::forget(p.writer().unwrap());
    p.writer().unwrap().write(1, b"xy").unwrap();
    assert_eq!(&p.as_slice()[..3], b"\0xy");
    assert!(p.as_mut_slice().is_some());
    let e = DevicePagePool::read(p.as_ptr(), |_| ()).unwrap_err();
    assert!(
        matches!(e, PoolError::OptimisticReadsDisabled { .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "pool anonymous: optimistic reads need PoolOptions::optimistic_reads() (its pages may be written through &mut [u8])"
    );

    // Shutting down: refused.
    let sd = pool.shutdown();
    let e = DevicePagePool::read(at, |_| ()).unwrap_err();
    assert!(matches!(e, PoolError::ShuttingDown { .. }), "{e:?}");
    drop(page);
    assert!(sd.is_complete());
}

fn page_addr(pool: &DevicePagePool, i: usize) -> *const u8 {
    pool.as_ptr().wrapping_add(i * PAGE)
}

/// Whatever happens to the page inside the read — freed, reallocated,
/// rewritten — the read reports it and drops the result.
#[test]
fn a_read_overlapping_a_change_of_its_page_fails() {
    let pool = optimistic(1);
    let mut page = pool.alloc().unwrap();
    page.writer().unwrap().fill(7);
    let i = page.index();
    let mut slot = Some(page);

    // Freed during the read.
    let e = pool
        .read_page(i, |v| {
            assert_eq!(v.read_u8(0).unwrap(), 7);
            drop(slot.take());
        })
        .unwrap_err();
    assert!(
        matches!(e, PoolError::PageChanged { index } if index == i),
        "{e:?}"
    );

    // A free page is not read at all.
    let e = pool
        .read_page(i, |_| unreachable!("the page is free"))
        .unwrap_err();
    assert!(matches!(e, PoolError::PageNotAllocated { .. }), "{e:?}");
    // Freed and reallocated (without a write) during the read.
    slot = Some(pool.alloc().unwrap());
    let e = pool
        .read_page(i, |_| {
            drop(slot.take());
            slot = Some(pool.alloc().unwrap());
        })
        .unwrap_err();
    assert!(matches!(e, PoolError::PageChanged { .. }), "{e:?}");

    // Rewritten during the read.
    let e = pool
        .read_page(i, |_| slot.as_mut().unwrap().writer().unwrap().fill(8))
        .unwrap_err();
    assert!(matches!(e, PoolError::PageChanged { .. }), "{e:?}");
    // A clone or a lookup is no change.
    let r = pool.read_page(i, |v| {
        let c = slot.as_ref().unwrap().clone();
        let l = DevicePagePool::lookup(page_addr(&pool, 0)).unwrap();
        drop((c, l));
        v.read_u8(0).unwrap()
    });
    assert_eq!(r.unwrap(), 8);

    // A leaked writer keeps the page busy until its handle is used again.
    std::mem::forget(slot.as_mut().unwrap().writer().unwrap());
    let e = pool.read_page(i, |_| ()).unwrap_err();
    assert!(matches!(e, PoolError::PageBusy { .. }), "{e:?}");
    assert_eq!(slot.as_ref().unwrap().as_slice()[0], 8);
    assert_eq!(pool.read_page(i, |v| v.read_u8(0).unwrap()).unwrap(), 8);
    // ...or a new writer, whose drop ends both...
    std::mem::forget(slot.as_mut().unwrap().writer().unwrap());
    slot.as_mut().unwrap().writer().unwrap().fill(9);
    assert_eq!(pool.read_page(i, |v| v.read_u8(0).unwrap()).unwrap(), 9);
    // ...or a free.
    std::mem::forget(slot.as_mut().unwrap().writer().unwrap());
    drop(slot.take());
    let p = pool.alloc().unwrap();
    assert_eq!(
        pool.read_page(p.index(), |v| v.read_u8(0).unwrap())
            .unwrap(),
        9
    );
}

/// The pool's pin: a read in progress keeps the memory mapped through a
/// whole shutdown, and the shutdown completes when the read ends.
#[test]
fn a_read_in_progress_keeps_the_pool_mapped() {
    let pool = optimistic(2);
    let mut page = pool.alloc().unwrap();
    page.writer().unwrap().fill(0x5a);
    let addr = page.as_ptr() as usize;
    let inside = Barrier::new(2);
    let release = Barrier::new(2);
    let sd = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            DevicePagePool::read(addr as *const u8, |v| {
                inside.wait();
                release.wait(); // shutdown and the last page drop happen here
                                // Still mapped (an unmapped page would fault), and a freed
                                // page keeps its bytes.
                assert!(v.to_vec().iter().all(|&b| b == 0x5a));
            })
        });
        inside.wait();
        let sd = pool.shutdown();
        drop(page); // the last page: the release would unmap now...
        assert!(!sd.is_complete(), "...but the read pins the pool");
        release.wait();
        // The page was freed during the read: its result is not returned.
        let e = reader.join().unwrap().unwrap_err();
        assert!(matches!(e, PoolError::PageChanged { .. }), "{e:?}");
        sd
    });
    assert!(sd.wait_timeout(Duration::from_secs(10)).is_ok());
}

/// A writer rewrites one page over and over (and another thread frees
/// and reallocates pages) while readers read them optimistically: every
/// read that succeeds saw one consistent version, whole; the others were
/// told to retry. Under Miri this also checks that no access races.
#[test]
fn concurrent_writers_and_optimistic_readers_never_see_torn_pages() {
    let pool = optimistic(8);
    let iters: u64 = if cfg!(miri) { 30 } else { 20_000 };
    let mut hot = pool.alloc().unwrap();
    hot.writer().unwrap().fill(0);
    let hot_index = hot.index();
    // The recycled page: its current address, published by the recycler.
    let published = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (ok, retried) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        // Rewriter: version v fills every byte with v.
        let hot = &mut hot;
        let stop_ref = &stop;
        s.spawn(move || {
            for v in 1..=iters {
                hot.writer().unwrap().fill(v as u8);
            }
            stop_ref.store(true, SeqCst);
        });
        // Recycler: a fresh page per version, its first word the version,
        // the rest derived from it; published, then the old one freed.
        s.spawn(|| {
            let mut cur: Option<DevicePage> = None;
            let mut v = 0u64;
            while !stop.load(SeqCst) {
                v += 1;
                let mut p = match pool.alloc() {
                    Ok(p) => p,
                    Err(PoolError::Exhausted { .. }) => continue,
                    Err(e) => panic!("{e}"),
                };
                let Some(mut w) = p.writer() else { continue };
                for k in 0..PAGE / 8 {
                    w.write_u64(k * 8, v.wrapping_mul(k as u64 + 1)).unwrap();
                }
                drop(w);
                published.store(p.as_ptr() as usize, SeqCst);
                cur = Some(p);
            }
            drop(cur);
        });
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(SeqCst) {
                    let r = pool.read_page(hot_index, |v| {
                        let b = v.to_vec();
                        b.iter().all(|&x| x == b[0])
                    });
                    match r {
                        Ok(consistent) => {
                            assert!(consistent, "a validated read saw a torn page");
                            ok.fetch_add(1, SeqCst);
                        }
                        Err(PoolError::PageChanged { .. } | PoolError::PageBusy { .. }) => {
                            retried.fetch_add(1, SeqCst);
                        }
                        Err(e) => panic!("read of the hot page: {e}"),
                    }
                    let addr = published.load(SeqCst);
                    if addr == 0 {
                        continue;
                    }
                    let r = DevicePagePool::read(addr as *const u8, |v| {
                        let first = v.read_u64(0).unwrap();
                        (1..PAGE / 8)
                            .all(|k| v.read_u64(k * 8).unwrap() == first.wrapping_mul(k as u64 + 1))
                    });
                    match r {
                        Ok(consistent) => assert!(consistent, "a validated read saw a torn page"),
                        Err(
                            PoolError::PageChanged { .. }
                            | PoolError::PageBusy { .. }
                            | PoolError::PageNotAllocated { .. },
                        ) => {}
                        Err(e) => panic!("read of a recycled page: {e}"),
                    }
                }
            });
        }
    });
    eprintln!(
        "{} validated reads, {} retries",
        ok.load(SeqCst),
        retried.load(SeqCst)
    );
    let st = pool.stats();
    assert_eq!((st.allocated, st.free), (1, 7), "no page lost");
}

// ------------------------------------------------------------ fork

/// After `fork()`, the child's copy of an anonymous pool shares no page
/// with the parent's (it reads zeros, and its writes stay its own), and
/// every use that would hand out or touch pages fails with `Forked`.
#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "fork")]
fn a_fork_child_gets_none_of_the_parents_anonymous_pages() {
    let opts = PoolOptions::new().optimistic_reads();
    let pool = DevicePagePool::anonymous_with(4 * PAGE, &opts).unwrap();
    let mut page = pool.alloc().unwrap();
    page.writer().unwrap().fill(0xab);
    let addr = page.as_ptr();
    let parent = std::process::id();
    let mut slot = Some(page);
    let code = common::in_fork_child(FORK_LIMIT, || {
        let page = slot.take().unwrap();
        let forked = |e: &PoolError| {
            matches!(e, PoolError::Forked { parent: p, child, .. }
                if *p == parent && *child == std::process::id())
        };
        if !pool.alloc().is_err_and(|e| forked(&e)) {
            return 1;
        }
        if !DevicePagePool::lookup(addr).is_err_and(|e| forked(&e)) {
            return 2;
        }
        if !DevicePagePool::read(addr, |_| ()).is_err_and(|e| forked(&e)) {
            return 3;
        }
        if !page.persist().is_err_and(|e| forked(&e)) {
            return 4;
        }
        if !pool
            .read_page(page.index(), |_| ())
            .is_err_and(|e| forked(&e))
        {
            return 8;
        }
        let msg = pool.alloc().unwrap_err().to_string();
        let want = format!(
            "pool anonymous was opened by process {parent}; process {}, a fork() child, cannot use it",
            std::process::id()
        );
        if msg != want {
            return 5;
        }
        // The child's copy of the page: zero-filled, and its own.
        if page.as_slice().iter().any(|&b| b != 0) {
            return 6;
        }
        // SAFETY: this process's private copy of the page; nothing else in
        // the child uses it.
        unsafe { page.as_mut_ptr().write_bytes(0xcd, PAGE) };
        // Dropping the child's copies (its shutdown) must not crash.
        drop(page);
        let sd = pool.shutdown();
        if !sd.is_complete() {
            return 7;
        }
        0
    });
    assert_eq!(code, 0, "the child's check number {code} failed");
    let page = slot.unwrap();
    // The parent's page is untouched, and the pool works.
    assert!(page.as_slice().iter().all(|&b| b == 0xab));
    assert_eq!(
        DevicePagePool::read(addr, |v| v.read_u8(0))
            .unwrap()
            .unwrap(),
        0xab
    );
    let other = pool.alloc().unwrap();
    assert_ne!(other.index(), page.index());
}

/// A file pool is not mapped at all in a `fork()` child: the child refuses
/// to use it, and its shutdown neither touches nor unmaps the range (which
/// the child may have reused); the parent's lock on the file stays.
#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "fork")]
fn a_fork_child_neither_uses_nor_unmaps_a_file_pool() {
    let f = Scratch::new("fork", 4 * PAGE as u64);
    let pool = DevicePagePool::open(&f.0, &file_opts()).unwrap();
    let mut page = pool.alloc().unwrap();
    page.as_mut_slice().unwrap().fill(0x11);
    let (base, len) = (pool.as_ptr() as usize, pool.len());
    let mut slot = Some(page);
    let maps = |pid: u32| common::is_mapped_in(&pid.to_string(), base);
    assert!(maps(std::process::id()));
    let code = common::in_fork_child(FORK_LIMIT, || {
        let page = slot.take().unwrap();
        if maps(std::process::id()) {
            return 1; // the child got the mapping
        }
        if !matches!(pool.alloc(), Err(PoolError::Forked { .. })) {
            return 2;
        }
        if !matches!(pool.persist(), Err(PoolError::Forked { .. })) {
            return 3;
        }
        // Something else of the child's at the same address...
        // SAFETY: MAP_FIXED_NOREPLACE maps only if the range is free (it is:
        // the pool's mapping was not inherited), replacing nothing.
        let mine = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if mine as usize != base {
            return 4;
        }
        // ...survives the child's copy of the pool shutting down.
        drop(page);
        let report = pool.shutdown().wait();
        if !matches!(
            report.persist_error.as_deref(),
            Some(PoolError::Forked { .. })
        ) {
            return 5;
        }
        if !maps(std::process::id()) {
            return 6; // the shutdown unmapped the child's own mapping
        }
        0
    });
    assert_eq!(code, 0, "the child's check number {code} failed");
    let page = slot.unwrap();
    assert!(page.as_slice().iter().all(|&b| b == 0x11));
    let e = DevicePagePool::open(&f.0, &file_opts()).unwrap_err();
    assert!(matches!(e, PoolError::AlreadyOpen { .. }), "{e:?}");
    page.persist().unwrap();
}

/// A `fork()` child inherits the descriptor that holds a pool's lock; the
/// parent's unmap still releases the lock while the child lives (and, in
/// `a_fork_child_neither_uses_nor_unmaps_a_file_pool`, the child's
/// shutdown does not release the parent's).
#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "fork")]
fn a_fork_child_does_not_keep_the_parents_lock() {
    let f = Scratch::new("forklock", 4 * PAGE as u64);
    let pool = DevicePagePool::open(&f.0, &file_opts()).unwrap();
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fork; the child only blocks on the pipe and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: reads one byte into `b` from our pipe; then exit.
        unsafe {
            libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // The child is alive, holding a copy of the pool's descriptor.
    pool.shutdown().wait();
    drop(pool);
    let again = DevicePagePool::open(&f.0, &file_opts());
    // SAFETY: wakes the child (one byte from a valid buffer), then reaps it.
    unsafe {
        libc::write(fds[1], [1u8].as_ptr().cast(), 1);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    again.expect("the unmap released the lock, though a child holds the descriptor");
}

// ------------------------------------------------------------ persistence

#[test]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn data_persisted_to_a_file_survives_reopen() {
    let f = Scratch::new("persist", 16 * PAGE as u64);
    let written: Vec<(usize, u8)>;
    {
        let pool = DevicePagePool::open(&f.0, &file_opts()).unwrap();
        assert_eq!(pool.page_count(), 16);
        let mut pages: Vec<DevicePage> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        written = pages
            .iter_mut()
            .map(|p| {
                let v = 0x40 + p.index() as u8;
                p.as_mut_slice().unwrap().fill(v);
                p.persist().unwrap();
                (p.index(), v)
            })
            .collect();
        let sd = pool.shutdown();
        drop(pages);
        let report = sd.wait();
        assert_eq!(report.backend, Backend::File);
        assert!(report.persist_error.is_none());
    }
    // The bytes are in the file...
    let bytes = std::fs::read(&f.0).unwrap();
    for &(i, v) in &written {
        assert!(
            bytes[i * PAGE..(i + 1) * PAGE].iter().all(|&b| b == v),
            "page {i} in the file"
        );
    }
    // ...and in a reopened pool.
    let pool = DevicePagePool::open(&f.0, &file_opts()).unwrap();
    let all: Vec<DevicePage> = (0..16).map(|_| pool.alloc().unwrap()).collect();
    for &(i, v) in &written {
        let p = all.iter().find(|p| p.index() == i).unwrap();
        assert!(
            p.as_slice().iter().all(|&b| b == v),
            "page {i} after reopen"
        );
    }
}

/// Two pools over the same file would hand out the same bytes as two
/// unique pages: the second open is refused while the first pool's memory
/// is mapped, unless both opt out of the lock.
#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn a_file_is_opened_by_one_pool_at_a_time() {
    let f = Scratch::new("lock", 8 * PAGE as u64);
    let first = DevicePagePool::open(&f.0, &file_opts()).unwrap();
    let e = DevicePagePool::open(&f.0, &file_opts()).unwrap_err();
    assert!(
        matches!(&e, PoolError::AlreadyOpen { path } if *path == f.0),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{}: already opened by another pool (in this or another process); \
             pools that coordinate themselves can open with PoolOptions::unlocked()",
            f.0.display()
        )
    );
    // Through a symbolic link: the same file.
    let link = f.0.with_extension("link");
    std::os::unix::fs::symlink(&f.0, &link).unwrap();
    let e = DevicePagePool::open(&link, &file_opts()).unwrap_err();
    std::fs::remove_file(&link).unwrap();
    assert!(matches!(e, PoolError::AlreadyOpen { .. }), "{e:?}");
    // A private mapping conflicts with a shared one too.
    let e = DevicePagePool::open(&f.0, &PoolOptions::new().map_private()).unwrap_err();
    assert!(matches!(e, PoolError::AlreadyOpen { .. }), "{e:?}");

    // The lock lives as long as the mapping: a held page keeps it...
    let page = first.alloc().unwrap();
    let sd = first.shutdown();
    drop(first);
    let e = DevicePagePool::open(&f.0, &file_opts()).unwrap_err();
    assert!(matches!(e, PoolError::AlreadyOpen { .. }), "{e:?}");
    // ...and the unmap releases it.
    drop(page);
    assert!(sd.is_complete());
    let again = DevicePagePool::open(&f.0, &file_opts()).unwrap();
    drop(again);

    // Private pools of one file may coexist; a shared one may not join.
    let private = PoolOptions::new().map_private();
    let p1 = DevicePagePool::open(&f.0, &private).unwrap();
    let p2 = DevicePagePool::open(&f.0, &private).unwrap();
    let e = DevicePagePool::open(&f.0, &file_opts()).unwrap_err();
    assert!(matches!(e, PoolError::AlreadyOpen { .. }), "{e:?}");
    drop((p1, p2));

    // The explicit opt-out: both openers take no lock (and must keep
    // their pools apart themselves — here, disjoint halves of the file).
    let unlocked = file_opts().unlocked().size(4 * PAGE as u64);
    let low = DevicePagePool::open(&f.0, &unlocked).unwrap();
    let high = DevicePagePool::open(&f.0, &unlocked.clone().offset(4 * PAGE as u64)).unwrap();
    assert_eq!((low.page_count(), high.page_count()), (4, 4));
    // A locking opener still gets in: nobody holds the lock.
    drop(DevicePagePool::open(&f.0, &file_opts()).unwrap());
}

#[test]
#[cfg_attr(miri, ignore = "needs the filesystem")]
fn private_file_mapping_writes_nothing_back() {
    let f = Scratch::new("private", 4 * PAGE as u64);
    let pool = DevicePagePool::open(&f.0, &PoolOptions::new().map_private()).unwrap();
    assert_eq!(pool.backend(), Backend::FilePrivate);
    let mut p = pool.alloc().unwrap();
    p.as_mut_slice().unwrap().fill(9);
    p.persist().unwrap();
    drop(p);
    pool.shutdown().wait();
    assert!(std::fs::read(&f.0).unwrap().iter().all(|&b| b == 0));
}

// ------------------------------------------------------------ device dax

/// `PERCPU_REF_DAX=/dev/daxX.Y`, or skip.
fn dax_device() -> Option<PathBuf> {
    match std::env::var_os("PERCPU_REF_DAX") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: set PERCPU_REF_DAX=/dev/daxX.Y to run the device dax tests");
            None
        }
    }
}

#[test]
#[cfg_attr(miri, ignore = "needs a device")]
fn devdax_bad_input() {
    let Some(dev) = dax_device() else { return };
    let e = DevicePagePool::open(&dev, &PoolOptions::new().map_private()).unwrap_err();
    assert!(matches!(e, PoolError::PrivateDevDax { .. }), "{e:?}");
    let e = DevicePagePool::open(&dev, &PoolOptions::new().size(3 << 20)).unwrap_err();
    assert!(
        matches!(e, PoolError::Unaligned { what: "size", .. }),
        "{e:?}"
    );
    let e = DevicePagePool::open(&dev, &PoolOptions::new().size(2 << 20).offset(4096)).unwrap_err();
    assert!(
        matches!(e, PoolError::Unaligned { what: "offset", .. }),
        "{e:?}"
    );
    let e = DevicePagePool::open(&dev, &PoolOptions::new().size(1 << 50)).unwrap_err();
    assert!(matches!(e, PoolError::TooLarge { .. }), "{e:?}");
}

#[test]
#[cfg_attr(miri, ignore = "needs a device")]
fn devdax_write_persist_reopen() {
    let Some(dev) = dax_device() else { return };
    let opts = PoolOptions::new().size(4 << 20);
    let (index, v) = {
        let pool = DevicePagePool::open(&dev, &opts).unwrap();
        assert_eq!(pool.backend(), Backend::DevDax);
        assert!(matches!(
            pool.persist_method(),
            PersistMethod::Clwb | PersistMethod::Clflushopt | PersistMethod::Clflush
        ));
        let mut p = pool.alloc().unwrap();
        let v = (std::process::id() as u8) | 1;
        p.as_mut_slice().unwrap().fill(v);
        p.persist().unwrap();
        let i = p.index();
        let sd = pool.shutdown();
        drop(p);
        assert!(sd.wait().persist_error.is_none());
        (i, v)
    };
    let pool = DevicePagePool::open(&dev, &opts).unwrap();
    let all: Vec<DevicePage> = (0..pool.page_count())
        .map(|_| pool.alloc().unwrap())
        .collect();
    let p = all.iter().find(|p| p.index() == index).unwrap();
    assert!(p.as_slice().iter().all(|&b| b == v));
}
