//! Memory for the device page pool: mappings (`mmap`/`munmap`), what a
//! `fork()` child gets of them (`madvise`), advisory file locks
//! (`flock`), `msync`, sysfs probing of character devices, and cache-line
//! write-back (x86_64:
//! `clwb`/`clflushopt`/`clflush` + `sfence`, picked at run time by CPUID;
//! aarch64 Linux: `dc cvap`, or `dc cvac` without it, + `dsb sy`, picked by
//! `AT_HWCAP`).
//!
//! Two tiers:
//!
//! * **Linux** (not Miri): the real thing, through rustix.
//! * **portable** (other systems, and Miri): an anonymous "mapping" is a
//!   zeroed, page-aligned heap allocation; file and device mappings,
//!   sysfs and `msync` report [`io::ErrorKind::Unsupported`]; there is no
//!   flush instruction. Everything above this module works unchanged on it.
//!
//! Facts about real `/dev/dax` devices (seen on an emulated NVDIMM, and
//! checked by `tests/devdax.rs`) that the callers rely on: size and
//! alignment come only from sysfs (`fstat` says 0); mapping past the end
//! succeeds and faults later with SIGBUS (so callers bound-check first);
//! `MAP_FIXED` is never used here (with an unaligned offset it silently
//! maps offset 0); `msync` is EINVAL there.

// The portable tier (other systems, Miri) uses only part of this module.
#![cfg_attr(not(percpu_ref_linux), allow(dead_code))]

use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

#[cfg(percpu_ref_linux)]
use std::os::fd::BorrowedFd;

/// The operating system's page size (the unit of `mmap` offsets and of
/// `msync` addresses).
pub(crate) fn os_page_size() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        #[cfg(all(unix, not(miri)))]
        {
            rustix::param::page_size()
        }
        #[cfg(not(all(unix, not(miri))))]
        {
            4096
        }
    })
}

/// How a file or device is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapMode {
    /// `MAP_SHARED`: stores reach the file (after `msync`, or a cache
    /// flush on DAX).
    Shared,
    /// `MAP_SHARED_VALIDATE | MAP_SYNC`: the fsdax contract — file metadata
    /// is durable at page-fault time, so flushing the CPU caches is enough.
    /// Refused with `EOPNOTSUPP` where the filesystem is not DAX.
    SharedSync,
    /// `MAP_PRIVATE`: copy-on-write, never written back.
    Private,
}

/// What a child created by `fork()` gets of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFork {
    /// A private, zero-filled copy (`MADV_WIPEONFORK`): nothing of the
    /// parent's pages.
    Wiped,
    /// Nothing: the range is not mapped in the child (`MADV_DONTFORK`), so
    /// the child must not unmap it either (it may hold something else).
    Absent,
    /// The mapping, as `fork()` copies any mapping (the kernel refused the
    /// advice, or there is no `fork()`).
    Inherited,
}

/// A mapping (or, on the portable tier, a heap block) of `len` bytes at
/// `ptr`. It is *not* unmapped on drop: the owner calls [`RawMap::unmap`]
/// exactly once, when nothing points into it any more.
#[derive(Debug)]
pub(crate) struct RawMap {
    ptr: NonNull<u8>,
    len: usize,
    heap: bool,
    on_fork: OnFork,
}

// SAFETY: a RawMap is an address range of plain memory, not tied to the
// thread that created it; access to its bytes is synchronized by its owner.
unsafe impl Send for RawMap {}
// SAFETY: as for Send; `&RawMap` only exposes the address and the length.
unsafe impl Sync for RawMap {}

impl RawMap {
    /// Start of the mapping.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// What a `fork()` child gets of it.
    pub(crate) fn on_fork(&self) -> OnFork {
        self.on_fork
    }

    /// Unmap (or free) the memory.
    ///
    /// # Safety
    ///
    /// Called at most once per `RawMap`, and no reference or pointer into
    /// the range is used afterwards.
    pub(crate) unsafe fn unmap(&self) -> io::Result<()> {
        if self.heap {
            // SAFETY: the caller guarantees a single call and no later use;
            // the block came from `heap_zeroed` with this same layout.
            unsafe { heap_free(self.ptr, self.len) };
            return Ok(());
        }
        #[cfg(percpu_ref_linux)]
        {
            // SAFETY: `ptr..ptr+len` is exactly a mapping made by `mmap`
            // below, unmapped only here, once (caller's guarantee).
            unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) }
                .map_err(io::Error::from)
        }
        #[cfg(not(percpu_ref_linux))]
        {
            unreachable!("non-heap RawMap on the portable tier")
        }
    }
}

fn heap_layout(len: usize) -> io::Result<std::alloc::Layout> {
    std::alloc::Layout::from_size_align(len.max(1), os_page_size())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

#[cfg_attr(percpu_ref_linux, allow(dead_code))]
fn heap_zeroed(len: usize) -> io::Result<RawMap> {
    let layout = heap_layout(len)?;
    // SAFETY: the layout has a non-zero size (`max(1)` above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    match NonNull::new(ptr) {
        Some(ptr) => Ok(RawMap {
            ptr,
            len,
            heap: true,
            on_fork: OnFork::Inherited,
        }),
        None => Err(io::Error::from(io::ErrorKind::OutOfMemory)),
    }
}

/// # Safety
///
/// `ptr` came from `heap_zeroed(len)` and is freed once.
unsafe fn heap_free(ptr: NonNull<u8>, len: usize) {
    if let Ok(layout) = heap_layout(len) {
        // SAFETY: allocated by `heap_zeroed` with this layout (same `len`,
        // and the page size never changes), freed once (caller).
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
    }
}

/// `len` bytes of zeroed memory: a private anonymous mapping on Linux,
/// which a `fork()` child gets zero-filled (`MADV_WIPEONFORK`; not at all,
/// `MADV_DONTFORK`, on kernels before 4.14), so parent and child never
/// share its pages; a heap block on the portable tier.
pub(crate) fn anonymous(len: usize) -> io::Result<RawMap> {
    #[cfg(percpu_ref_linux)]
    {
        use rustix::mm::{madvise, mmap_anonymous, Advice, MapFlags, ProtFlags};
        // SAFETY: a null hint without MAP_FIXED lets the kernel pick a fresh
        // range, so no existing memory is replaced; the result is owned by
        // the returned RawMap.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        // SAFETY: advice on the mapping just made, which nothing uses yet;
        // neither changes its contents in this process.
        let on_fork = if unsafe { madvise(ptr, len, Advice::LinuxWipeOnFork) }.is_ok() {
            OnFork::Wiped
        } else if unsafe { madvise(ptr, len, Advice::LinuxDontFork) }.is_ok() {
            OnFork::Absent
        } else {
            OnFork::Inherited
        };
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(RawMap {
            ptr,
            len,
            heap: false,
            on_fork,
        })
    }
    #[cfg(not(percpu_ref_linux))]
    {
        heap_zeroed(len)
    }
}

/// Map `len` bytes of `fd` at `offset` (a multiple of the OS page size;
/// the caller checked it, and that `offset + len` is inside the file or
/// device). Never `MAP_FIXED`.
#[cfg(percpu_ref_linux)]
pub(crate) fn map_fd(
    fd: BorrowedFd<'_>,
    len: usize,
    offset: u64,
    mode: MapMode,
    writable: bool,
) -> io::Result<RawMap> {
    use rustix::mm::{mmap, MapFlags, ProtFlags};
    let prot = if writable {
        ProtFlags::READ | ProtFlags::WRITE
    } else {
        ProtFlags::READ
    };
    let flags = match mode {
        MapMode::Shared => MapFlags::SHARED,
        MapMode::SharedSync => MapFlags::SHARED_VALIDATE | MapFlags::SYNC,
        MapMode::Private => MapFlags::PRIVATE,
    };
    // SAFETY: a null hint without MAP_FIXED lets the kernel pick a fresh
    // range, so no existing memory is replaced; the result is owned by the
    // returned RawMap.
    let ptr = unsafe { mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) }?;
    // A `fork()` child does not get the mapping: otherwise its copy of the
    // pool would hand out the parent's pages a second time.
    // SAFETY: advice on the mapping just made, which nothing uses yet; it
    // changes nothing in this process.
    let on_fork = match unsafe { rustix::mm::madvise(ptr, len, rustix::mm::Advice::LinuxDontFork) }
    {
        Ok(()) => OnFork::Absent,
        Err(_) => OnFork::Inherited,
    };
    let ptr = NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
    Ok(RawMap {
        ptr,
        len,
        heap: false,
        on_fork,
    })
}

/// Take a non-blocking advisory lock (`flock`) on `fd`'s open file:
/// exclusive, or shared. `Ok(false)` if another open file holds a
/// conflicting lock (in this process or another). The lock lasts until
/// every descriptor of this open file is closed.
#[cfg(percpu_ref_linux)]
pub(crate) fn try_lock(fd: BorrowedFd<'_>, exclusive: bool) -> io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    let op = if exclusive {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::NonBlockingLockShared
    };
    match flock(fd, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Release the advisory lock of `fd`'s open file (taken by [`try_lock`]),
/// also for every other descriptor of that open file — such as the copies
/// a `fork()` child inherited, which would otherwise keep it locked until
/// they are closed.
#[cfg(percpu_ref_linux)]
pub(crate) fn unlock(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::fs::flock(fd, rustix::fs::FlockOperation::Unlock).map_err(io::Error::from)
}

/// `msync(MS_SYNC)` of the OS pages covering `ptr..ptr+len`.
///
/// # Safety
///
/// The range lies inside one live mapping made by [`map_fd`].
pub(crate) unsafe fn msync(ptr: *const u8, len: usize) -> io::Result<()> {
    #[cfg(percpu_ref_linux)]
    {
        let page = os_page_size();
        let start = ptr as usize & !(page - 1);
        let end = (ptr as usize).saturating_add(len);
        let start_ptr = ptr.wrapping_sub(ptr as usize - start);
        // SAFETY: the caller's mapping starts on a page boundary, so
        // rounding down stays inside it; msync only reads the page tables.
        unsafe {
            rustix::mm::msync(
                start_ptr as *mut _,
                end - start,
                rustix::mm::MsyncFlags::SYNC,
            )
        }
        .map_err(io::Error::from)
    }
    #[cfg(not(percpu_ref_linux))]
    {
        let _ = (ptr, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "msync is not available on this platform",
        ))
    }
}

// ------------------------------------------------------------------ sysfs

/// What sysfs says about a character device.
#[derive(Debug, Clone)]
pub(crate) struct CharDevice {
    /// `/sys/dev/char/MAJ:MIN`.
    pub(crate) sysfs: PathBuf,
    /// Last component of the `subsystem` link, e.g. `dax` or `mem`.
    pub(crate) subsystem: String,
}

/// Major and minor number of a device number (`st_rdev`).
pub(crate) fn major_minor(rdev: u64) -> (u32, u32) {
    #[cfg(percpu_ref_linux)]
    {
        (rustix::fs::major(rdev), rustix::fs::minor(rdev))
    }
    #[cfg(not(percpu_ref_linux))]
    {
        // glibc's encoding, so messages still show something sensible.
        let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
        let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
        (major as u32, minor as u32)
    }
}

/// Probe `/sys/dev/char/MAJ:MIN/subsystem` (a symlink such as
/// `../../../bus/dax`, or `/sys/class/mem` for `/dev/null`).
pub(crate) fn char_device(major: u32, minor: u32) -> io::Result<CharDevice> {
    let sysfs = PathBuf::from(format!("/sys/dev/char/{major}:{minor}"));
    if cfg!(not(percpu_ref_linux)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "sysfs is only probed on Linux",
        ));
    }
    let link = std::fs::read_link(sysfs.join("subsystem"))?;
    let subsystem = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(CharDevice { sysfs, subsystem })
}

/// Read a sysfs attribute holding one number (decimal, or hex with `0x`).
pub(crate) fn read_sysfs_u64(path: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    parse_sysfs_u64(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected a number, found {:?}", text.trim()),
        )
    })
}

/// Parse a sysfs number: decimal, or hex with a `0x` prefix.
pub(crate) fn parse_sysfs_u64(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

// ------------------------------------------------------ cache-line flush

/// The instruction that writes a cache line back to (persistent) memory,
/// best first.
// `detect_flush` builds only its own architecture's variants; the others
// are matched but never built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlushInsn {
    /// `clwb`: write back, keep the line cached.
    #[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
    Clwb,
    /// `clflushopt`: write back and evict, weakly ordered.
    #[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
    Clflushopt,
    /// `clflush`: write back and evict, serialized (slowest).
    #[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
    Clflush,
    /// `dc cvap`: clean to the point of persistence, keep the line cached
    /// (ARMv8.2 DCPOP, `HWCAP_DCPOP`).
    #[cfg_attr(not(all(target_arch = "aarch64", percpu_ref_linux)), allow(dead_code))]
    DcCvap,
    /// `dc cvac`: clean to the point of coherency, every ARMv8 CPU: what
    /// the Linux kernel uses for pmem where DCPOP is missing.
    #[cfg_attr(not(all(target_arch = "aarch64", percpu_ref_linux)), allow(dead_code))]
    DcCvac,
}

/// The best flush instruction this CPU has (x86_64: CPUID; aarch64 Linux:
/// `AT_HWCAP`) and its cache-line size; `None` on other architectures and
/// under Miri.
pub(crate) fn flush_insn() -> Option<(FlushInsn, usize)> {
    static DETECTED: OnceLock<Option<(FlushInsn, usize)>> = OnceLock::new();
    *DETECTED.get_or_init(detect_flush)
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
fn detect_flush() -> Option<(FlushInsn, usize)> {
    use std::arch::x86_64::{__cpuid, __cpuid_count, __get_cpuid_max};
    #[allow(unused_unsafe)] // the intrinsics are safe on newer toolchains
    // SAFETY: CPUID exists on every x86_64 CPU; these only read registers,
    // and leaf 7 is read only if the CPU reports it.
    let (leaf1, leaf7) = unsafe {
        let max = __get_cpuid_max(0).0;
        let leaf7 = if max >= 7 {
            Some(__cpuid_count(7, 0))
        } else {
            None
        };
        (__cpuid(1), leaf7)
    };
    // CPUID.1:EBX[15:8] = CLFLUSH line size in 8-byte units.
    let line = match ((leaf1.ebx >> 8) & 0xff) as usize * 8 {
        0 => 64,
        n => n,
    };
    let ebx7 = leaf7.map_or(0, |l| l.ebx);
    if ebx7 & (1 << 24) != 0 {
        Some((FlushInsn::Clwb, line))
    } else if ebx7 & (1 << 23) != 0 {
        Some((FlushInsn::Clflushopt, line))
    } else if leaf1.edx & (1 << 19) != 0 {
        Some((FlushInsn::Clflush, line))
    } else {
        None
    }
}

#[cfg(all(target_arch = "aarch64", percpu_ref_linux))]
fn detect_flush() -> Option<(FlushInsn, usize)> {
    use std::arch::asm;
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects; Linux lets user space
    // read it (or emulates the read).
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    // CTR_EL0.DminLine [19:16]: log2 of the words (4 bytes) in the smallest
    // data cache line, so stepping by it reaches every line.
    let line = 4usize << ((ctr >> 16) & 0xf);
    // SAFETY: getauxval has no preconditions; 0 if the entry is absent.
    let hwcap = unsafe { libc::getauxval(libc::AT_HWCAP) };
    if hwcap & libc::HWCAP_DCPOP != 0 {
        Some((FlushInsn::DcCvap, line))
    } else {
        Some((FlushInsn::DcCvac, line))
    }
}

#[cfg(not(any(
    all(target_arch = "x86_64", not(miri)),
    all(target_arch = "aarch64", percpu_ref_linux)
)))]
fn detect_flush() -> Option<(FlushInsn, usize)> {
    None
}

/// Write back every cache line overlapping `ptr..ptr+len` with `insn`,
/// then `sfence`, so the stores before this call are durable on a DAX
/// mapping when it returns.
///
/// # Safety
///
/// The range lies inside one live mapping, `insn` and `line` come from
/// [`flush_insn`] (so the CPU has the instruction).
#[cfg(all(target_arch = "x86_64", not(miri)))]
pub(crate) unsafe fn flush_range(ptr: *const u8, len: usize, insn: FlushInsn, line: usize) {
    use std::arch::asm;
    if len == 0 {
        return;
    }
    let start = ptr as usize & !(line - 1);
    let end = ptr as usize + len;
    let mut p = ptr.wrapping_sub(ptr as usize - start);
    while (p as usize) < end {
        // SAFETY: `p` points into a cache line that overlaps the caller's
        // live mapping (lines never straddle pages, and mappings are page
        // aligned); the instruction is present (caller). These only write
        // back cache contents: no memory is changed, no flags touched.
        unsafe {
            match insn {
                FlushInsn::Clwb => asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags)),
                FlushInsn::Clflushopt => {
                    asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
                // The aarch64 variants never come from `flush_insn` here;
                // `clflush` (every x86_64 CPU) would write the line back.
                FlushInsn::Clflush | FlushInsn::DcCvap | FlushInsn::DcCvac => {
                    asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
            }
        }
        p = p.wrapping_add(line);
    }
    // SAFETY: sfence has no preconditions; it orders the write-backs above
    // before any later store (the persistence barrier).
    unsafe { asm!("sfence", options(nostack, preserves_flags)) };
}

/// Clean every cache line overlapping `ptr..ptr+len` to the point of
/// persistence (`dc cvap`) or coherency (`dc cvac`), then `dsb sy`, so the
/// stores before this call are durable on a DAX mapping when it returns
/// (as the Linux kernel's `arch_wb_cache_pmem` + `pmem_wmb` on arm64). A
/// cache clean by address is ordered after this thread's earlier stores to
/// the same line, and the `dsb` waits until every clean completed.
///
/// # Safety
///
/// The range lies inside one live mapping; `insn` and `line` come from
/// [`flush_insn`].
#[cfg(all(target_arch = "aarch64", percpu_ref_linux))]
pub(crate) unsafe fn flush_range(ptr: *const u8, len: usize, insn: FlushInsn, line: usize) {
    use std::arch::asm;
    if len == 0 {
        return;
    }
    let start = ptr as usize & !(line - 1);
    let end = ptr as usize + len;
    let mut p = ptr.wrapping_sub(ptr as usize - start);
    while (p as usize) < end {
        // SAFETY: `p` points into a cache line that overlaps the caller's
        // live mapping (lines never straddle pages, and mappings are page
        // aligned). A clean writes back cache contents and changes no
        // memory. `dc cvap` is spelled as its `sys` encoding (`sys #3, c7,
        // c12, #1`), which the assembler accepts without the `dpb` target
        // feature; `flush_insn` picked it only if the CPU has it.
        unsafe {
            match insn {
                FlushInsn::DcCvap => {
                    asm!("sys #3, c7, c12, #1, {0}", in(reg) p, options(nostack, preserves_flags))
                }
                _ => asm!("dc cvac, {0}", in(reg) p, options(nostack, preserves_flags)),
            }
        }
        p = p.wrapping_add(line);
    }
    // SAFETY: a full-system data synchronization barrier has no
    // preconditions; it completes the cleans above before any later
    // memory access (the persistence barrier).
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Portable tier: there is no flush instruction ([`flush_insn`] is `None`),
/// so this is never called; a fence keeps it meaningful if it were.
///
/// # Safety
///
/// None beyond the x86_64 version's (kept for one signature).
#[cfg(not(any(
    all(target_arch = "x86_64", not(miri)),
    all(target_arch = "aarch64", percpu_ref_linux)
)))]
pub(crate) unsafe fn flush_range(_ptr: *const u8, _len: usize, _insn: FlushInsn, _line: usize) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_numbers_parse() {
        assert_eq!(parse_sysfs_u64("1040187392\n"), Some(1_040_187_392));
        assert_eq!(parse_sysfs_u64("0x200000\n"), Some(2 << 20));
        assert_eq!(parse_sysfs_u64("  4096 "), Some(4096));
        assert_eq!(parse_sysfs_u64("max"), None);
        assert_eq!(parse_sysfs_u64(""), None);
    }

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(os_page_size().is_power_of_two());
    }

    #[test]
    fn anonymous_memory_is_zeroed_and_writable() {
        let m = anonymous(2 * os_page_size()).unwrap();
        // SAFETY: the mapping is live, writable, and only used here.
        unsafe {
            let s = std::slice::from_raw_parts_mut(m.ptr().as_ptr(), m.len());
            assert!(s.iter().all(|&b| b == 0));
            s[0] = 7;
            s[m.len() - 1] = 9;
            assert_eq!(s[0] + s[m.len() - 1], 16);
            m.unmap().unwrap();
        }
    }

    #[cfg(percpu_ref_linux)]
    #[test]
    fn fork_children_get_none_of_the_mappings() {
        let m = anonymous(os_page_size()).unwrap();
        // This kernel has MADV_WIPEONFORK (4.14+); older ones give Absent.
        assert_eq!(m.on_fork(), OnFork::Wiped);
        // SAFETY: unmapped once, not used afterwards.
        unsafe { m.unmap().unwrap() };
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let m = map_fd(
            std::os::fd::AsFd::as_fd(&f),
            os_page_size(),
            0,
            MapMode::Private,
            false,
        )
        .unwrap();
        assert_eq!(m.on_fork(), OnFork::Absent);
        // SAFETY: as above.
        unsafe { m.unmap().unwrap() };
    }

    /// Every aarch64 Linux machine has at least `dc cvac`; the flush runs
    /// (no SIGILL) over an unaligned range of several lines of anonymous
    /// memory and leaves the data as written.
    #[cfg(all(target_arch = "aarch64", percpu_ref_linux))]
    #[test]
    fn aarch64_cleans_a_range_to_persistence_or_coherency() {
        let (insn, line) = flush_insn().expect("dc cvac exists on every ARMv8 CPU");
        assert!(matches!(insn, FlushInsn::DcCvap | FlushInsn::DcCvac));
        assert!(
            line.is_power_of_two() && (16..=2048).contains(&line),
            "{line}"
        );
        // SAFETY: getauxval has no preconditions.
        let dcpop = unsafe { libc::getauxval(libc::AT_HWCAP) } & libc::HWCAP_DCPOP != 0;
        assert_eq!(insn == FlushInsn::DcCvap, dcpop);
        eprintln!("flush: {insn:?}, {line}-byte lines");
        let m = anonymous(2 * os_page_size()).unwrap();
        // SAFETY: the mapping is live, writable, and only used here; the
        // flushed range lies inside it.
        unsafe {
            let s = std::slice::from_raw_parts_mut(m.ptr().as_ptr(), m.len());
            for (i, b) in s.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            flush_range(s.as_ptr().add(line / 2 + 3), 5 * line + 7, insn, line);
            flush_range(s.as_ptr(), s.len(), insn, line);
            // `dc cvac` exists everywhere, whatever `flush_insn` picked.
            flush_range(s.as_ptr().add(1), s.len() - 1, FlushInsn::DcCvac, line);
            assert!(s.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            m.unmap().unwrap();
        }
    }

    #[test]
    fn flushing_a_range_is_harmless() {
        let m = anonymous(os_page_size()).unwrap();
        if let Some((insn, line)) = flush_insn() {
            assert!(line.is_power_of_two());
            // SAFETY: the range is inside the live mapping; insn from CPUID.
            unsafe { flush_range(m.ptr().as_ptr().wrapping_add(10), 100, insn, line) };
        }
        // SAFETY: unmapped once, not used afterwards.
        unsafe { m.unmap().unwrap() };
    }

    #[cfg(percpu_ref_linux)]
    #[test]
    fn dev_null_is_a_mem_device() {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata("/dev/null").unwrap().rdev();
        let (major, minor) = major_minor(rdev);
        assert_eq!((major, minor), (1, 3));
        if let Ok(dev) = char_device(major, minor) {
            assert_eq!(dev.subsystem, "mem");
        }
    }
}
