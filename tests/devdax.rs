//! `DevicePagePool` on a real device-dax character device (`/dev/daxX.Y`).
//!
//! Every test here is `#[ignore]`d and also skips (passes with a note)
//! unless `PERCPU_REF_DAX` names the device. They need no pmem hardware:
//! `scripts/dax-vm.sh` boots a QEMU guest with an emulated NVDIMM and a
//! devdax namespace and runs a host-built binary inside:
//!
//! ```text
//! cargo test --release --test devdax --no-run        # prints the binary path
//! scripts/dax-vm.sh --timeout 600 -- target/release/deps/devdax-<hash> \
//!     --include-ignored --test-threads=1
//! ```
//!
//! **The tests overwrite the whole device**: never point `PERCPU_REF_DAX`
//! at a device holding data you want to keep. Its contents persist from one
//! run to the next, so nothing assumes it starts zeroed: data is tagged with
//! a fresh random nonce per test. They take a process-wide lock, so they
//! may also run with several test threads. The device facts they rely on
//! (size and alignment only in sysfs, SIGBUS past the end, no
//! `MAP_PRIVATE`) are checked by the tests themselves.

#![cfg(all(feature = "dax", percpu_ref_linux))]

use percpu_ref::{Backend, DevicePage, DevicePagePool, PersistMethod, PoolError, PoolOptions};
use std::collections::VecDeque;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Barrier, Mutex, MutexGuard};
use std::time::Duration;

mod common;

const KIB4: usize = 4096;

// ---------------------------------------------------------------- helpers

/// `PERCPU_REF_DAX`, if set and non-empty.
fn dax_path() -> Option<PathBuf> {
    std::env::var_os("PERCPU_REF_DAX")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The tests share one device: one at a time (a failed test poisons the
/// lock; the next one still runs).
fn device_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What sysfs says about the device, read here independently of the crate.
#[derive(Debug)]
struct Dax {
    path: PathBuf,
    /// `/dev/...` as `/proc/self/maps` prints it.
    canonical: PathBuf,
    size: u64,
    align: u64,
}

impl Dax {
    fn align_usize(&self) -> usize {
        self.align as usize
    }
}

fn read_sysfs_u64(path: &Path) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .unwrap_or_else(|e| panic!("{}: {t:?}: {e}", path.display()))
}

/// Size and alignment from `/sys/dev/char/MAJ:MIN/{size,align}`, checked
/// against `/sys/bus/dax/devices/NAME/`.
fn device(path: &Path) -> Dax {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.file_type().is_char_device(),
        "{} is not a character device",
        path.display()
    );
    // glibc's encoding of dev_t.
    let rdev = meta.rdev();
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    let sys = PathBuf::from(format!("/sys/dev/char/{major}:{minor}"));
    let dev = fs::read_to_string(sys.join("dev")).unwrap();
    assert_eq!(dev.trim(), format!("{major}:{minor}"));
    let subsystem = fs::read_link(sys.join("subsystem")).unwrap();
    assert_eq!(
        subsystem.file_name().and_then(|n| n.to_str()),
        Some("dax"),
        "{} is not device dax",
        path.display()
    );
    let size = read_sysfs_u64(&sys.join("size"));
    let align = read_sysfs_u64(&sys.join("align"));
    // The same numbers through the bus directory.
    let name = fs::canonicalize(&sys).unwrap();
    let name = name.file_name().unwrap().to_str().unwrap();
    let bus = Path::new("/sys/bus/dax/devices").join(name);
    assert_eq!(read_sysfs_u64(&bus.join("size")), size);
    assert_eq!(read_sysfs_u64(&bus.join("align")), align);
    // What an fstat says instead: nothing useful.
    assert_eq!(meta.len(), 0, "fstat size of a dax device");
    assert!(align.is_power_of_two() && align >= KIB4 as u64, "{align}");
    assert!(size > 0 && size % align == 0, "size {size}, align {align}");
    assert!(
        size >= 32 * align,
        "the tests need a device of at least 32 alignment units, this one has {}",
        size / align
    );
    Dax {
        path: path.to_path_buf(),
        canonical: fs::canonicalize(path).unwrap(),
        size,
        align,
    }
}

/// The device under test, the lock, and its sysfs facts; `None` (skip)
/// without `PERCPU_REF_DAX`.
macro_rules! dax_or_skip {
    () => {{
        let Some(path) = dax_path() else {
            eprintln!("skipped: set PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)");
            return;
        };
        let guard = device_lock();
        (guard, device(&path))
    }};
}

/// A fresh random number per call, so that data left on the device by an
/// earlier run (or test) never matches.
fn nonce() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    static N: AtomicUsize = AtomicUsize::new(0);
    h.write_usize(N.fetch_add(1, SeqCst));
    h.finish()
}

/// The word stored at device byte offset `off` (a multiple of 8): depends
/// on the offset in the *device*, so data written through one pool (page
/// size, offset) can be checked through another.
fn pattern(nonce: u64, off: u64) -> u64 {
    nonce ^ off.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
}

fn fill(bytes: &mut [u8], dev_off: u64, nonce: u64) {
    for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern(nonce, dev_off + 8 * i as u64).to_ne_bytes());
    }
}

/// The device offset of the first word of `bytes` (at `dev_off`) that does
/// not hold the pattern.
fn first_mismatch(bytes: &[u8], dev_off: u64, nonce: u64) -> Option<u64> {
    bytes
        .chunks_exact(8)
        .enumerate()
        .find(|(i, w)| {
            u64::from_ne_bytes((*w).try_into().unwrap()) != pattern(nonce, dev_off + 8 * *i as u64)
        })
        .map(|(i, _)| dev_off + 8 * i as u64)
}

#[track_caller]
fn assert_pattern(bytes: &[u8], dev_off: u64, nonce: u64) {
    if let Some(bad) = first_mismatch(bytes, dev_off, nonce) {
        let i = (bad - dev_off) as usize;
        let found = u64::from_ne_bytes(bytes[i..i + 8].try_into().unwrap());
        panic!(
            "device offset {bad:#x}: expected {:#018x}, found {found:#018x}",
            pattern(nonce, bad)
        );
    }
}

/// Allocate every page of `pool` (then it is exhausted), sorted by index.
fn alloc_all(pool: &DevicePagePool) -> Vec<DevicePage> {
    let mut all: Vec<DevicePage> = (0..pool.page_count())
        .map(|i| {
            pool.alloc()
                .unwrap_or_else(|e| panic!("page {i} of {}: {e}", pool.page_count()))
        })
        .collect();
    let e = pool.alloc().unwrap_err();
    assert!(
        matches!(e, PoolError::Exhausted { pages, .. } if pages == pool.page_count()),
        "{e:?}"
    );
    all.sort_by_key(DevicePage::index);
    for (i, p) in all.iter().enumerate() {
        assert_eq!(p.index(), i, "every index handed out once");
        assert_eq!(
            p.as_ptr() as usize,
            pool.as_ptr() as usize + i * pool.page_size()
        );
    }
    all
}

/// One line of `/proc/self/maps` that maps the device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    offset: u64,
}

fn dax_mappings(d: &Dax) -> Vec<Mapping> {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?.to_string();
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let (_dev, _inode) = (f.next()?, f.next()?);
            let path = f.next()?;
            if Path::new(path) != d.canonical {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(Mapping {
                start: usize::from_str_radix(a, 16).ok()?,
                end: usize::from_str_radix(b, 16).ok()?,
                perms,
                offset,
            })
        })
        .collect()
}

/// The mapping of `pool`, which must be exactly one shared read-write
/// range of the device at `offset`.
#[track_caller]
fn assert_mapped(d: &Dax, base: usize, len: usize, offset: u64) {
    let maps = dax_mappings(d);
    let m = maps
        .iter()
        .find(|m| m.start == base)
        .unwrap_or_else(|| panic!("no mapping of {} at {base:#x}: {maps:?}", d.path.display()));
    assert_eq!(
        (m.end - m.start, m.perms.as_str(), m.offset),
        (len, "rw-s", offset),
        "{m:?}"
    );
}

#[track_caller]
fn assert_unmapped(d: &Dax, base: usize) {
    let maps = dax_mappings(d);
    assert!(
        maps.iter().all(|m| m.start != base),
        "{} still mapped at {base:#x}: {maps:?}",
        d.path.display()
    );
}

/// File descriptors of this process open on the device.
fn dax_fds(d: &Dax) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| *target == d.canonical)
        .count()
}

/// The persist method the crate should pick, from the kernel's view of the
/// CPU (`-cpu max` in the guest has `clwb`).
fn expected_persist_method() -> PersistMethod {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    if has("clwb") {
        PersistMethod::Clwb
    } else if has("clflushopt") {
        PersistMethod::Clflushopt
    } else if has("clflush") {
        PersistMethod::Clflush
    } else {
        PersistMethod::Unavailable
    }
}

// ------------------------------------------------------------------ tests

#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn open_whole_device_matches_sysfs() {
    let (_lock, d) = dax_or_skip!();
    eprintln!("{}: size {} align {}", d.path.display(), d.size, d.align);
    assert!(dax_mappings(&d).is_empty());

    // Defaults: 4 KiB pages over the whole device.
    let pool = DevicePagePool::open(&d.path, &PoolOptions::new()).unwrap();
    assert_eq!(pool.backend(), Backend::DevDax);
    assert_eq!(pool.backend().to_string(), "devdax");
    assert_eq!(pool.path(), d.path);
    assert_eq!(pool.len() as u64, d.size);
    assert_eq!(pool.page_size(), KIB4);
    assert_eq!(pool.page_count() as u64, d.size / KIB4 as u64);
    let method = pool.persist_method();
    eprintln!("persist method: {method:?}");
    assert_eq!(method, expected_persist_method());
    assert!(matches!(
        method,
        PersistMethod::Clwb | PersistMethod::Clflushopt | PersistMethod::Clflush
    ));
    // Device dax hands out mappings aligned to the device alignment.
    let base = pool.as_ptr() as usize;
    assert_eq!(base % d.align_usize(), 0, "{base:#x}");
    assert_mapped(&d, base, pool.len(), 0);
    let st = pool.stats();
    assert_eq!(
        (st.pages, st.free, st.allocated),
        (pool.page_count(), pool.page_count(), 0)
    );

    // The last 4 KiB page of the device is inside the mapping: write,
    // persist, read it (no SIGBUS).
    let nonce = nonce();
    let all = alloc_all(&pool);
    let mut last = all.into_iter().last().unwrap();
    assert_eq!(last.as_ptr() as usize, base + d.size as usize - KIB4);
    let dev_off = d.size - KIB4 as u64;
    fill(last.as_mut_slice().unwrap(), dev_off, nonce);
    last.persist().unwrap();
    assert_pattern(last.as_slice(), dev_off, nonce);
    // (The other pages were freed when the vector was consumed.)
    assert_eq!(pool.stats().allocated, 1);

    // A second pool on the same device is refused while the first holds
    // its lock...
    let opts = PoolOptions::new()
        .page_size(d.align_usize())
        .allow_file_fallback(); // irrelevant for a device
    let e = DevicePagePool::open(&d.path, &opts).unwrap_err();
    assert!(
        matches!(&e, PoolError::AlreadyOpen { path } if *path == d.path),
        "{e:?}"
    );
    // ...and opened without the lock (the caller coordinates): 2 MiB
    // (alignment-sized) pages, alive at the same time, its own mapping,
    // found by lookup, and the same bytes.
    let big = DevicePagePool::open(&d.path, &opts.unlocked()).unwrap();
    assert_eq!(big.backend(), Backend::DevDax);
    assert_eq!(big.len() as u64, d.size);
    assert_eq!(big.page_count() as u64, d.size / d.align);
    let big_base = big.as_ptr() as usize;
    assert_ne!(big_base, base);
    assert_mapped(&d, big_base, big.len(), 0);
    assert_eq!(dax_mappings(&d).len(), 2);
    let pages = alloc_all(&big);
    let tail = pages.last().unwrap();
    assert_pattern(&tail.as_slice()[d.align_usize() - KIB4..], dev_off, nonce);
    let in_big = DevicePagePool::lookup(tail.as_ptr().wrapping_add(12345)).unwrap();
    assert_eq!(
        (in_big.index(), in_big.size()),
        (tail.index(), d.align_usize())
    );
    assert_eq!(in_big.ref_count(), 2);
    let in_small = DevicePagePool::lookup(last.as_ptr()).unwrap();
    assert_eq!(
        in_small.as_ptr(),
        last.as_ptr(),
        "the 4 KiB pool's own page"
    );
    assert_eq!(in_small.size(), KIB4);
    let big_sd = big.shutdown();
    drop(pages);
    assert!(!big_sd.is_complete(), "the looked-up page is still held");
    drop((in_big, in_small));

    let report = big_sd.wait_timeout(Duration::ZERO).unwrap();
    assert_eq!(report.backend, Backend::DevDax);
    assert_eq!(report.bytes as u64, d.size);
    assert!(report.persist_error.is_none());
    assert_unmapped(&d, big_base);

    let sd = pool.shutdown();
    assert!(!sd.is_complete(), "a page is held");
    assert_mapped(&d, base, pool.len(), 0);
    drop(last);
    assert!(sd.is_complete());
    let report = sd.wait();
    assert_eq!(
        (report.pages as u64, report.bytes as u64),
        (d.size / 4096, d.size)
    );
    assert_eq!(report.persist_method, method);
    assert!(report.persist_error.is_none());
    assert!(dax_mappings(&d).is_empty());
}

#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn whole_device_write_persist_read() {
    let (_lock, d) = dax_or_skip!();
    let a = d.align_usize();
    let nonce = nonce();

    // 1. Every byte of the device, in alignment-sized (2 MiB) pages.
    let pool = DevicePagePool::open(&d.path, &PoolOptions::new().page_size(a)).unwrap();
    assert_eq!(pool.page_count() as u64, d.size / d.align);
    let base = pool.as_ptr() as usize;
    let mut pages = alloc_all(&pool);
    for p in &mut pages {
        let off = (p.index() * a) as u64;
        fill(p.as_mut_slice().unwrap(), off, nonce);
        p.persist().unwrap();
    }
    pool.persist().unwrap();
    for p in &pages {
        assert_pattern(p.as_slice(), (p.index() * a) as u64, nonce);
    }
    drop(pages);
    assert_eq!(pool.stats().free, pool.page_count());
    let report = pool.shutdown().wait_timeout(Duration::ZERO).unwrap();
    assert_eq!(report.bytes as u64, d.size);
    assert!(report.persist_error.is_none());
    drop(pool);
    assert_unmapped(&d, base);

    // 2. Read back through a new mapping with 4 KiB pages: the whole
    //    device, every word where it was written.
    let pool = DevicePagePool::open(&d.path, &PoolOptions::new()).unwrap();
    let base = pool.as_ptr() as usize;
    for p in alloc_all(&pool) {
        assert_pattern(p.as_slice(), (p.index() * KIB4) as u64, nonce);
    }
    drop(pool);
    assert_unmapped(&d, base);
}

#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn sub_range_with_4k_pages_lands_at_its_offset() {
    let (_lock, d) = dax_or_skip!();
    let a = d.align;
    let nonce = nonce();
    let offset = 4 * a;
    let opts = PoolOptions::new().offset(offset).size(2 * a);
    let pool = DevicePagePool::open(&d.path, &opts).unwrap();
    assert_eq!(pool.len() as u64, 2 * a);
    assert_eq!(pool.page_count() as u64, 2 * a / KIB4 as u64);
    let base = pool.as_ptr() as usize;
    assert_mapped(&d, base, pool.len(), offset);
    // The pool keeps one descriptor: it holds the device's lock.
    assert_eq!(dax_fds(&d), 1);
    let mut pages = alloc_all(&pool);
    for p in &mut pages {
        let off = offset + (p.index() * KIB4) as u64;
        fill(p.as_mut_slice().unwrap(), off, nonce);
        p.persist().unwrap();
    }
    // Lookups resolve exactly the pool's range.
    let end = base + pool.len();
    let last = DevicePagePool::lookup((end - 1) as *const u8).unwrap();
    assert_eq!(last.index(), pool.page_count() - 1);
    let first = DevicePagePool::lookup(base as *const u8).unwrap();
    assert_eq!(first.index(), 0);
    for addr in [end, base - 1] {
        let e = DevicePagePool::lookup(addr as *const u8).unwrap_err();
        assert!(matches!(e, PoolError::NotMapped { .. }), "{addr:#x}: {e:?}");
    }
    pool.persist_range(pool.len() - 64..pool.len()).unwrap();
    drop((pages, first, last));
    assert!(pool
        .shutdown()
        .wait_timeout(Duration::ZERO)
        .unwrap()
        .persist_error
        .is_none());
    drop(pool);
    assert_unmapped(&d, base);
    assert_eq!(dax_fds(&d), 0, "the unmap closed it");

    // Through the whole device in 2 MiB pages: the data is in units 4 and
    // 5, and the words just outside them were not written.
    let pool = DevicePagePool::open(&d.path, &PoolOptions::new().page_size(a as usize)).unwrap();
    let pages = alloc_all(&pool);
    assert_pattern(pages[4].as_slice(), offset, nonce);
    assert_pattern(pages[5].as_slice(), offset + a, nonce);
    let before = &pages[3].as_slice()[a as usize - 8..];
    assert_eq!(first_mismatch(before, offset - 8, nonce), Some(offset - 8));
    let after = &pages[6].as_slice()[..8];
    assert_eq!(
        first_mismatch(after, offset + 2 * a, nonce),
        Some(offset + 2 * a)
    );
}

#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn persisted_data_is_read_back_by_a_second_open() {
    let (_lock, d) = dax_or_skip!();
    let a = d.align;
    let nonce = nonce();
    eprintln!("nonce {nonce:#018x}");
    let offset = 8 * a;
    let opts = PoolOptions::new().offset(offset).size(a);

    // First instance: write the nonce pattern, persist, shut down while one
    // page is still held, then drop it; the release persists and unmaps.
    let (held, base) = {
        let pool = DevicePagePool::open(&d.path, &opts).unwrap();
        assert_eq!(pool.backend(), Backend::DevDax);
        let base = pool.as_ptr() as usize;
        let mut pages = alloc_all(&pool);
        for p in &mut pages {
            let off = offset + (p.index() * KIB4) as u64;
            let bytes = p.as_mut_slice().unwrap();
            // Stale data of an earlier run must not pass for ours.
            assert!(first_mismatch(bytes, off, nonce).is_some());
            fill(bytes, off, nonce);
            p.persist_range(0..KIB4).unwrap();
        }
        let keep = pages.pop().unwrap();
        drop(pages);
        let sd = pool.shutdown();
        drop(pool);
        assert!(!sd.is_complete());
        assert_mapped(&d, base, a as usize, offset);
        let held = keep.index();
        drop(keep);
        let report = sd.wait_timeout(Duration::ZERO).unwrap();
        assert!(report.persist_error.is_none());
        assert_eq!(report.bytes as u64, a);
        (held, base)
    };
    assert_unmapped(&d, base);

    // Second instance, same options: every page reads back.
    let pool = DevicePagePool::open(&d.path, &opts).unwrap();
    for p in alloc_all(&pool) {
        assert_pattern(p.as_slice(), offset + (p.index() * KIB4) as u64, nonce);
    }
    drop(pool);

    // Third, one page over the same range: the same bytes, including the
    // page that was held across the shutdown.
    let pool = DevicePagePool::open(&d.path, &opts.clone().page_size(a as usize)).unwrap();
    let p = pool.alloc().unwrap();
    assert_pattern(p.as_slice(), offset, nonce);
    let h = held * KIB4;
    assert_pattern(&p.as_slice()[h..h + KIB4], offset + h as u64, nonce);
}

#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn hot_shutdown_with_pages_held_by_two_threads() {
    let (_lock, d) = dax_or_skip!();
    let a = d.align;
    let offset = 16 * a;
    let opts = PoolOptions::new().offset(offset).size(8 * a);
    let pool = DevicePagePool::open(&d.path, &opts).unwrap();
    let base = pool.as_ptr() as usize;
    let len = pool.len();
    let pages = pool.page_count();
    let nonce = nonce();
    const THREADS: usize = 2;
    const WARMUP: usize = 2_000; // allocations per thread before the shutdown
    const MAX_OPS: usize = 2_000_000; // bound: a shutdown that is never seen
    const HOLD: usize = 64; // pages each thread holds at most
    let progress: [AtomicUsize; THREADS] = Default::default();
    let barrier = Barrier::new(THREADS + 1);
    let (tx, rx) = mpsc::channel::<(DevicePage, u64)>();

    // A page's tag: first and last word.
    let tag = |t: usize, op: usize| nonce ^ ((t as u64) << 56) ^ op as u64;
    let check = |p: &DevicePage, tag: u64| {
        let s = p.as_slice();
        let first = u64::from_ne_bytes(s[..8].try_into().unwrap());
        let last = u64::from_ne_bytes(s[KIB4 - 8..].try_into().unwrap());
        assert_eq!((first, last), (tag, tag), "page {}", p.index());
    };

    let (keep, keep_tag) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (pool, progress, barrier, tx, d) = (&pool, &progress, &barrier, tx.clone(), &d);
                s.spawn(move || {
                    let mut held: VecDeque<(DevicePage, u64)> = VecDeque::new();
                    let mut op = 0;
                    loop {
                        assert!(op < MAX_OPS, "thread {t}: no shutdown seen");
                        let mut p = match pool.alloc() {
                            Ok(p) => p,
                            Err(PoolError::ShuttingDown { path }) => {
                                assert_eq!(path, d.path);
                                break;
                            }
                            Err(e) => panic!("thread {t}: {e}"),
                        };
                        assert!(p.index() < pages);
                        assert_eq!(p.as_ptr() as usize, base + p.index() * KIB4);
                        let g = tag(t, op);
                        let bytes = p.as_mut_slice().expect("a new page is unique");
                        bytes[..8].copy_from_slice(&g.to_ne_bytes());
                        bytes[KIB4 - 8..].copy_from_slice(&g.to_ne_bytes());
                        let c = p.clone();
                        check(&c, g);
                        drop(c);
                        if op % 4 == 0 {
                            held.push_back((p, g));
                            if held.len() > HOLD {
                                let (old, g) = held.pop_front().unwrap();
                                check(&old, g);
                            }
                        }
                        op += 1;
                        progress[t].store(op, SeqCst);
                    }
                    // Shut down under our feet: what we hold is still
                    // mapped, readable and persistable.
                    assert!(!held.is_empty());
                    for (p, g) in &held {
                        check(p, *g);
                        p.persist().unwrap();
                    }
                    if t == 0 {
                        let (p, g) = &held[0];
                        tx.send((p.clone(), *g)).unwrap();
                    }
                    let mine: Vec<usize> = held.iter().map(|(p, _)| p.index()).collect();
                    barrier.wait(); // 1: the main thread inspects
                    barrier.wait(); // 2: both threads drop their pages at once
                    for (p, g) in held.drain(..) {
                        check(&p, g);
                    }
                    (op, mine)
                })
            })
            .collect();
        drop(tx);

        // Let both threads get going, then shut down while they allocate.
        while progress.iter().any(|p| p.load(SeqCst) < WARMUP) {
            assert!(
                !workers.iter().any(|w| w.is_finished()),
                "a worker ended early"
            );
            std::thread::yield_now();
        }
        let sd = pool.shutdown();
        assert!(pool.is_shutting_down());
        assert!(matches!(pool.alloc(), Err(PoolError::ShuttingDown { .. })));
        let (keep, keep_tag) = rx.recv().unwrap();

        barrier.wait(); // 1
        assert!(!sd.is_complete(), "pages are held");
        let held = sd.held();
        assert!(
            held.len() >= THREADS && held.contains(&keep.index()),
            "{held:?}"
        );
        let still = sd.wait_timeout(Duration::from_millis(1)).unwrap_err();
        assert_eq!((still.count, &still.indices), (held.len(), &held));
        assert!(matches!(
            DevicePagePool::lookup(keep.as_ptr()),
            Err(PoolError::ShuttingDown { .. })
        ));
        pool.persist().unwrap(); // still mapped: persisting is fine
        assert_mapped(&d, base, len, offset);
        check(&keep, keep_tag);
        barrier.wait(); // 2

        let mut all: Vec<usize> = Vec::new();
        for w in workers {
            let (ops, mine) = w.join().unwrap();
            assert!(ops >= WARMUP);
            all.extend(mine);
        }
        all.sort_unstable();
        assert_eq!(all, held, "held() named exactly the threads' pages");
        (keep, keep_tag)
    });

    // Only the main thread's clone is left: still not complete, still
    // mapped, even with the pool handle gone.
    let sd = pool.shutdown();
    drop(pool);
    assert_eq!(sd.held(), vec![keep.index()]);
    assert!(!sd.is_complete());
    assert_mapped(&d, base, len, offset);
    check(&keep, keep_tag);
    drop(keep); // the last page: persist and unmap happen in this drop
    assert!(sd.is_complete());
    assert_unmapped(&d, base);
    let report = sd.wait();
    assert_eq!((report.pages, report.bytes), (pages, len));
    assert!(report.persist_error.is_none());
    let e = DevicePagePool::lookup(base as *const u8).unwrap_err();
    assert!(matches!(e, PoolError::NotMapped { .. }), "{e:?}");
}

#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn bad_input_returns_typed_errors_before_mapping() {
    let (_lock, d) = dax_or_skip!();
    let (s, a) = (d.size, d.align);
    let p = d.path.display().to_string();
    let open = |o: PoolOptions| {
        let e = DevicePagePool::open(&d.path, &o).unwrap_err();
        // Refused before anything was mapped, and nothing leaked.
        assert!(dax_mappings(&d).is_empty(), "{e}: {:?}", dax_mappings(&d));
        assert_eq!(dax_fds(&d), 0, "{e}: a descriptor of the device leaked");
        e
    };

    // Unaligned length.
    for size in [a + KIB4 as u64, a / 2, 3 * a / 2] {
        let e = open(PoolOptions::new().size(size));
        assert!(
            matches!(&e, PoolError::Unaligned { path, what: "size", value, align }
                if *path == d.path && *value == size && *align == a),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{p}: size {size} is not a multiple of the alignment {a}")
        );
    }

    // Unaligned offset (with a valid size, and with the default size).
    for o in [
        PoolOptions::new().offset(KIB4 as u64).size(a),
        PoolOptions::new().offset(a / 2),
        PoolOptions::new()
            .offset(a + KIB4 as u64)
            .page_size(a as usize),
    ] {
        let off = o.offset;
        let e = open(o);
        assert!(
            matches!(&e, PoolError::Unaligned { what: "offset", value, align, .. }
                if *value == off && *align == a),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{p}: offset {off} is not a multiple of the alignment {a}")
        );
    }

    // Larger than the device: by size, and by size + offset.
    for (size, offset) in [(s + a, 0), (s, a), (2 * a, s - a)] {
        let e = open(PoolOptions::new().size(size).offset(offset));
        assert!(
            matches!(&e, PoolError::TooLarge { size: sz, offset: off, available, .. }
                if (*sz, *off, *available) == (size, offset, s)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{p}: a pool of {size} bytes at offset {offset} does not fit in the {s} bytes available")
        );
    }

    // Offset at or past the end. A raw mmap there succeeds and faults on
    // the first touch (`raw_mmap_past_the_end_faults`): refused up front.
    let e = open(PoolOptions::new().offset(s));
    assert!(
        matches!(&e, PoolError::TooSmall { path, what: "device", available, offset, .. }
            if *path == d.path && *available == s && *offset == s),
        "{e:?}"
    );
    let e = open(PoolOptions::new().offset(s + a));
    assert!(
        matches!(&e, PoolError::OffsetPastEnd { what: "device", offset, available, .. }
            if *offset == s + a && *available == s),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{p}: offset {} is past the end of the device ({s} bytes)",
            s + a
        )
    );
    for (size, offset) in [(a, s), (a, s + a), (a, 64 * s)] {
        let e = open(PoolOptions::new().offset(offset).size(size));
        assert!(
            matches!(&e, PoolError::TooLarge { offset: off, available, .. }
                if *off == offset && *available == s),
            "{e:?}"
        );
    }
    // Offset + size overflowing u64: an error, not a wrap-around.
    let e = open(PoolOptions::new().offset(u64::MAX - a + 1).size(a));
    assert!(matches!(&e, PoolError::TooLarge { .. }), "{e:?}");

    // MAP_PRIVATE: refused (the kernel would say EINVAL), even when the
    // numbers are fine, and before they are looked at.
    for o in [
        PoolOptions::new().map_private(),
        PoolOptions::new().map_private().size(a),
        PoolOptions::new().map_private().size(a + 1),
    ] {
        let e = open(o);
        assert!(
            matches!(&e, PoolError::PrivateDevDax { path } if *path == d.path),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{p}: device dax supports only shared mappings, but map_private was requested")
        );
    }

    // Page sizes that cannot fit.
    let huge = (s + 1).next_power_of_two() as usize;
    let e = open(PoolOptions::new().page_size(huge));
    assert!(
        matches!(&e, PoolError::TooSmall { page_size, available, offset: 0, .. } if *page_size == huge && *available == s),
        "{e:?}"
    );
    let e = open(PoolOptions::new().page_size(2 * a as usize).size(a));
    assert!(matches!(&e, PoolError::PageSizeTooLarge { .. }), "{e:?}");

    // The largest valid offset works, up to the device's last byte.
    let pool = DevicePagePool::open(&d.path, &PoolOptions::new().offset(s - a)).unwrap();
    assert_eq!(pool.len() as u64, a);
    let nonce = nonce();
    let mut page = alloc_all(&pool).pop().unwrap();
    let off = s - KIB4 as u64;
    fill(page.as_mut_slice().unwrap(), off, nonce);
    page.persist().unwrap();
    assert_pattern(page.as_slice(), off, nonce);
}

/// Why the pool must bound-check before mapping: on device dax a mapping
/// past the end is *accepted* by `mmap` and the first touch raises SIGBUS
/// Checked in a forked child, so the test survives it.
#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn raw_mmap_past_the_end_faults() {
    use std::os::fd::AsRawFd;
    let (_lock, d) = dax_or_skip!();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d.path)
        .unwrap();
    let len = d.align_usize();
    // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), replacing
    // nothing; unmapped below and never touched in this process.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            d.size as libc::off_t,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap past the end of {} failed ({}); on device dax it succeeds",
        d.path.display(),
        std::io::Error::last_os_error()
    );
    // The child only stores to the mapping: the store faults (the point of
    // the test) or the child exits with 0.
    let code = common::in_fork_child(Duration::from_secs(60), || {
        // SAFETY: in the child, the mapping is ours alone to touch.
        unsafe { std::ptr::write_volatile(ptr.cast::<u8>(), 1) };
        0
    });
    // SAFETY: our mapping from above, untouched in this process.
    assert_eq!(unsafe { libc::munmap(ptr, len) }, 0);
    assert_eq!(
        code,
        100 + libc::SIGBUS,
        "touching a mapping past the end should raise SIGBUS (100 + signal)"
    );
    // The pool refuses the same range with a typed error.
    let e = DevicePagePool::open(&d.path, &PoolOptions::new().offset(d.size).size(d.align))
        .unwrap_err();
    assert!(matches!(e, PoolError::TooLarge { .. }), "{e:?}");
}

/// A user who may not write the device gets `PermissionDenied` (checked
/// in a copy of this test binary run as `nobody`; root may open anything).
#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn unprivileged_open_is_permission_denied() {
    use std::os::unix::process::CommandExt;
    const AS_NOBODY: &str = "PERCPU_REF_DAX_TEST_AS_NOBODY";
    let (_lock, d) = dax_or_skip!();
    if std::env::var_os(AS_NOBODY).is_some() {
        // The child, running as nobody.
        let e = DevicePagePool::open(&d.path, &PoolOptions::new()).unwrap_err();
        assert!(
            matches!(&e, PoolError::PermissionDenied { path, .. } if *path == d.path),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{}: permission denied (the pool needs read-write access)",
                d.path.display()
            )
        );
        assert!(dax_mappings(&d).is_empty() && dax_fds(&d) == 0);
        return;
    }
    let meta = fs::metadata(&d.path).unwrap();
    if !matches!(fs::read_to_string("/proc/self/status"), Ok(s) if s.lines().any(|l| l.starts_with("Uid:\t0\t")))
    {
        eprintln!("skipped: needs root to run a copy as nobody");
        return;
    }
    if meta.mode() & 0o002 != 0 {
        eprintln!("skipped: {} is world-writable", d.path.display());
        return;
    }
    let run = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unprivileged_open_is_permission_denied",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(AS_NOBODY, "1")
        .uid(65534)
        .gid(65534)
        .output();
    let out = match run {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: nobody may not run this binary: {e}");
            return;
        }
        Err(e) => panic!("running a copy as nobody: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}\n{text}", out.status);
    assert!(text.contains("1 passed"), "{text}");
}

/// One pool per device: a second open is refused while the first pool's
/// memory is mapped (also through a symbolic link to the node), even with
/// disjoint ranges, unless both opt out of the lock; the unmap releases it.
#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn a_device_is_opened_by_one_pool_at_a_time() {
    let (_lock, d) = dax_or_skip!();
    let a = d.align;
    let first = DevicePagePool::open(&d.path, &PoolOptions::new().size(a)).unwrap();
    let e = DevicePagePool::open(&d.path, &PoolOptions::new().size(a).offset(a)).unwrap_err();
    assert!(
        matches!(&e, PoolError::AlreadyOpen { path } if *path == d.path),
        "{e:?}"
    );
    let link = std::env::temp_dir().join(format!("percpu-ref-dax-link-{}", std::process::id()));
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&d.path, &link).unwrap();
    let e = DevicePagePool::open(&link, &PoolOptions::new().size(a)).unwrap_err();
    fs::remove_file(&link).unwrap();
    assert!(matches!(e, PoolError::AlreadyOpen { .. }), "{e:?}");
    let page = first.alloc().unwrap();
    let sd = first.shutdown();
    drop(first);
    assert!(DevicePagePool::open(&d.path, &PoolOptions::new().size(a)).is_err());
    drop(page);
    assert!(sd.is_complete());
    assert_eq!(dax_fds(&d), 0);
    // The unmap released it; and without the lock, two pools coexist.
    let unlocked = PoolOptions::new().size(a).unlocked();
    let low = DevicePagePool::open(&d.path, &unlocked).unwrap();
    let high = DevicePagePool::open(&d.path, &unlocked.offset(a)).unwrap();
    assert_eq!(dax_mappings(&d).len(), 2);
    drop((low, high));
    assert!(dax_mappings(&d).is_empty());
}

/// A `fork()` child gets no mapping of the device (so it cannot hand out
/// the parent's pages), refuses to use its copy of the pool, and its
/// shutdown leaves the parent's pool alone.
#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn a_fork_child_gets_no_mapping_of_the_device() {
    let (_lock, d) = dax_or_skip!();
    let a = d.align;
    let pool = DevicePagePool::open(&d.path, &PoolOptions::new().size(a)).unwrap();
    let base = pool.as_ptr() as usize;
    let mut page = pool.alloc().unwrap();
    let nonce = nonce();
    fill(page.as_mut_slice().unwrap(), 0, nonce);
    let mut slot = Some((pool, page));
    // SAFETY: fork; the child only uses this test's pool and memory and
    // `_exit`s (no unwinding into the harness).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let (pool, page) = slot.take().unwrap();
        let code = if dax_mappings(&d).iter().any(|m| m.start == base) {
            1
        } else if !matches!(pool.alloc(), Err(PoolError::Forked { .. })) {
            2
        } else if !matches!(page.persist(), Err(PoolError::Forked { .. })) {
            3
        } else {
            drop(page);
            let report = pool.shutdown().wait();
            if matches!(
                report.persist_error.as_deref(),
                Some(PoolError::Forked { .. })
            ) {
                0
            } else {
                4
            }
        };
        // SAFETY: ends the child without running the parent's handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: our own child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    let (pool, page) = slot.unwrap();
    assert_mapped(&d, base, a as usize, 0);
    assert_pattern(page.as_slice(), 0, nonce);
    page.persist().unwrap();
    drop(page);
    assert!(pool.shutdown().wait().persist_error.is_none());
    assert_unmapped(&d, base);
}

/// Optimistic reads of device pages: a writer rewrites a page under two
/// readers; every validated read is one whole version.
#[test]
#[ignore = "needs PERCPU_REF_DAX=/dev/daxX.Y (scripts/dax-vm.sh)"]
fn optimistic_reads_of_device_pages() {
    let (_lock, d) = dax_or_skip!();
    let opts = PoolOptions::new().size(d.align).optimistic_reads();
    let pool = DevicePagePool::open(&d.path, &opts).unwrap();
    let mut page = pool.alloc().unwrap();
    assert!(page.as_mut_slice().is_none());
    page.writer().unwrap().fill(0);
    let index = page.index();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let validated = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (page, stop) = (&mut page, &stop);
        s.spawn(move || {
            for v in 1..=2_000u32 {
                page.writer().unwrap().fill(v as u8);
            }
            stop.store(true, SeqCst);
        });
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(SeqCst) {
                    match pool.read_page(index, |v| {
                        let b = v.to_vec();
                        b.iter().all(|&x| x == b[0])
                    }) {
                        Ok(whole) => {
                            assert!(whole, "a validated read saw a torn page");
                            validated.fetch_add(1, SeqCst);
                        }
                        Err(PoolError::PageChanged { .. } | PoolError::PageBusy { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    eprintln!("{} validated reads", validated.load(SeqCst));
    assert_eq!(
        pool.read_page(index, |v| v.read_u8(0).unwrap()).unwrap(),
        (2_000u32 % 256) as u8
    );
}
