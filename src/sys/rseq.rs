//! Restartable sequences (rseq): the current CPU id for free, and a plain,
//! non-atomic add to the current CPU's counter slot that is nevertheless
//! exact under preemption, migration and signals.
//!
//! glibc ≥ 2.35 registers an rseq area (`struct rseq`, Linux UAPI) for every
//! thread it creates and exports where it lives: `__rseq_offset` (from the
//! thread pointer) and `__rseq_size` (0 when it did not register, e.g. under
//! `GLIBC_TUNABLES=glibc.pthread.rseq=0`; 20 on glibc 2.36). We look both
//! up with `dlsym` at run time, so the binary still links, and falls back,
//! on an older glibc or another libc. Only the original 20-byte ABI is used:
//! `cpu_id` (u32 at offset 4) and `rseq_cs` (u64 at offset 8).
//!
//! The fast tier is compiled for x86_64 Linux with glibc; everywhere else,
//! and under Miri and loom, the portable fallback is selected:
//! [`rseq_available`] is `false`, [`current_cpu`] is `None`,
//! [`fence_all_cpus`] is a `SeqCst` fence, and [`percpu_add`] adds nothing
//! and returns `false`. Setting the environment variable
//! `PERCPU_REF_PORTABLE=1` (also `true`, `yes`, `on`) forces the fallback.
//!
//! # The sequence
//!
//! ```text
//!         lea   cs, [rip + DESCRIPTOR]
//!   arm:  mov   fs:[rseq + 8], cs             ; rseq->rseq_cs = &DESCRIPTOR
//!   start:mov   cpu, fs:[rseq + 4]            ; cpu = rseq->cpu_id
//!         cmp   cpu, BOUND ; jae out          ; unregistered (-1/-2) or no slot
//!         test  [gate], mask ; jnz out        ; gated: add nothing
//!         shl   cpu, log2(stride)             ; (imul for other strides)
//!         add   [slot0 + cpu], delta          ; COMMIT, the last instruction
//!   post: ...                                 ; DESCRIPTOR = {start, post - start, abort}
//!         (elsewhere) .long RSEQ_SIG
//!   abort:jmp arm                             ; restart from the beginning
//! ```
//!
//! # Why an interrupted sequence can neither lose nor double an add
//!
//! The kernel guarantees: whenever a thread is preempted, migrated, or
//! handed a signal, then before it next runs user code, if its instruction
//! pointer is in `[start, post)` of the descriptor in `rseq->rseq_cs`, the
//! pointer is moved to `abort` (which must follow the registered 4-byte
//! signature), and `rseq_cs` is cleared. Hence:
//!
//! 1. *The CPU id is right at the commit.* `cpu` is read inside the range. If
//!    the thread moves to another CPU at any point after that read and before
//!    the commit, it was preempted inside the range and is sent to `abort`,
//!    which re-arms the descriptor and reads `cpu_id` again. So when the
//!    commit executes, it executes on CPU `cpu`.
//! 2. *Nobody else writes the slot during the add.* Slot `cpu` is written
//!    only by commits executing on CPU `cpu` (1), one thread at a time, and
//!    by other code only after [`fence_all_cpus`] with the gate set (below).
//!    Another thread can run on that CPU only after ours was preempted; if
//!    that happened before our commit, we were inside the range and abort.
//!    So the non-atomic read-modify-write of `add [mem], reg` is not
//!    interleaved with any other write of the slot: interrupts and
//!    preemption happen at instruction boundaries. A signal handler that
//!    itself calls `percpu_add` is no exception: the interrupted sequence
//!    is moved to `abort` before the handler runs, and the handler arms its
//!    own descriptor.
//! 3. *Exactly once.* The commit is the single last instruction of the range
//!    and `post` is the address right after it. An interruption either
//!    arrives before the commit retires (IP in range: abort, restart, the add
//!    has not happened and happens once on the retry) or after it (IP =
//!    `post`, outside the range: no abort, the add happened once and is
//!    never repeated). There is no state in between.
//! 4. *A stale descriptor is harmless.* `rseq_cs` is re-armed at the start
//!    of every attempt (the kernel clears it on abort), and a descriptor left
//!    behind after `post` or the early exits only matches IPs inside this
//!    sequence's range, which the thread is not in.
//!
//! Without the descriptor store the same code loses updates under
//! migration; the stress tests below fail then.
//!
//! # Why no add is in flight after `fence_all_cpus()`
//!
//! The switcher first sets the gate bit (a `SeqCst` store), then calls
//! [`fence_all_cpus`], i.e. `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)`.
//! Consider any sequence of this process when the barrier runs:
//!
//! * *Its thread is running on some CPU.* The kernel IPIs that CPU, runs a
//!   full memory barrier there and marks the thread preempted for rseq, so
//!   before it returns to user space its IP is checked: inside the range it
//!   goes to `abort` and restarts; past `post` the commit already retired
//!   (and the barrier makes it visible to the switcher). The caller waits
//!   for all IPIs before `membarrier` returns.
//! * *Its thread is not running.* If it was inside a sequence it was
//!   preempted there (a sequence makes no syscalls), so it aborts before it
//!   runs user code again; the context switches give the full barriers.
//!
//! A restarted (or new) sequence reads the gate *inside* the range, after
//! the barrier; the gate store precedes the barrier, so that read sees the
//! bit and the sequence exits without adding. The only adds that can still
//! land are those whose commit already retired before the thread was
//! interrupted, and those are complete and visible when `membarrier`
//! returns. Hence, once `fence_all_cpus()` returns, no slot changes again
//! until the gate is cleared: the switcher may read or swap the slots. (This
//! is why the gate must be read inside the sequence: a read before `start`
//! could be followed by a preemption that is not an abort.) Clearing the
//! gate with a `Release` store after resetting the slots publishes the
//! resets to the next adder: its gate load is ordered before its commit
//! (x86 TSO keeps a load ordered before later stores and RMWs).

#[cfg(percpu_ref_rseq)]
use self::linux_x86_64 as imp;
#[cfg(not(percpu_ref_rseq))]
use portable as imp;

/// Environment variable that forces the portable tier when set to `1`
/// (`true`, `yes`, `on`; case-insensitive, surrounding blanks ignored).
pub(crate) const PORTABLE_ENV: &str = "PERCPU_REF_PORTABLE";

/// Whether a value of [`PORTABLE_ENV`] forces the portable tier.
/// Unset, empty, `0` and anything unrecognised do not.
pub(crate) fn portable_forced_by(value: Option<&std::ffi::OsStr>) -> bool {
    value.and_then(|v| v.to_str()).is_some_and(|v| {
        let v = v.trim();
        ["1", "true", "yes", "on"]
            .iter()
            .any(|yes| v.eq_ignore_ascii_case(yes))
    })
}

/// Once per process: `true` if glibc registered an rseq area of at least the
/// original 20-byte ABI, the `membarrier` `PRIVATE_EXPEDITED_RSEQ`
/// registration succeeded, the architecture is supported, and
/// `PERCPU_REF_PORTABLE` does not force the portable tier. The first call
/// does the registration (thread-safe, idempotent); later calls are one
/// load.
#[inline]
pub(crate) fn rseq_available() -> bool {
    imp::available()
}

/// Explicit early initialisation (registering `membarrier` before threads
/// exist is microseconds instead of ~20 ms); returns [`rseq_available`].
pub(crate) fn init() -> bool {
    rseq_available()
}

/// In one restartable sequence: read the current CPU id, load `*gate`, and
/// if `*gate & gate_mask != 0` exit returning `false`; otherwise add `delta`
/// to the `i64` at `slot0 + cpu * stride_bytes` with a plain (non-atomic)
/// add as the single commit instruction and return `true`. A sequence cut
/// by preemption, migration or a signal restarts from the beginning.
///
/// `false` means *nothing was added*, and the caller must count `delta`
/// another way (the central atomic count). Besides a set gate bit this also
/// happens, in principle, if the thread has no usable CPU id (no rseq
/// registration for this thread, or an id `>=` the possible CPUs); neither
/// occurs with glibc, which aborts a process whose new thread fails to
/// register, and whose kernel ids are always below the possible CPUs. The
/// portable fallback always returns `false`.
///
/// # Safety
///
/// * [`rseq_available`] returned `true` (on this or another thread; it
///   happens-before this call).
/// * For every `cpu < `[`possible()`](super::cpu::possible),
///   `slot0 + cpu * stride_bytes` is a valid, 8-aligned `i64`, distinct
///   for distinct CPUs (`stride_bytes >= 8`; 128 keeps them on separate
///   cache lines), written only
///   by this function, except while no call on it can be in flight: before
///   the slots are shared, or between a [`fence_all_cpus`] that followed
///   setting the gate bit and clearing the bit again. Reads (atomic loads)
///   from anywhere are fine.
/// * `gate` is valid for reads for the duration of the call (normally an
///   `AtomicUsize`'s `as_ptr()`).
#[allow(dead_code)] // replaced by the gate sequences
#[inline(always)]
pub(crate) unsafe fn percpu_add(
    slot0: *mut i64,
    stride_bytes: usize,
    gate: *const usize,
    gate_mask: usize,
    delta: i64,
) -> bool {
    // SAFETY: forwarded; the caller upholds this function's contract, which
    // is the implementation's.
    unsafe { imp::percpu_add(slot0, stride_bytes, gate, gate_mask, delta) }
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)` on the rseq tier: on
/// return every restartable sequence that was in flight on any CPU has
/// either committed (visibly) or been aborted, and will re-read the gate.
/// The portable fallback is a `SeqCst` fence.
///
/// Costs ~10 µs with another thread of the process busy on another CPU
/// (IPIs), well under 1 µs when none is running.
pub(crate) fn fence_all_cpus() {
    imp::fence_all_cpus();
}

/// The current CPU, read from this thread's rseq area, if glibc registered
/// one (independent of [`PORTABLE_ENV`] and of `membarrier`: it is just a
/// faster `sched_getcpu`). Like any CPU id it may be stale by the time it is
/// used.
#[inline]
pub(crate) fn current_cpu() -> Option<usize> {
    imp::current_cpu()
}

/// The fallback everywhere the rseq tier is not compiled in. Always built,
/// so its behaviour is unit-tested on every platform.
#[cfg_attr(percpu_ref_rseq, allow(dead_code))]
mod portable {
    pub(super) fn available() -> bool {
        false
    }

    /// Adds nothing: the caller counts on the central count instead.
    ///
    /// # Safety
    ///
    /// None needed (no memory is accessed); `unsafe` to match the real one.
    #[allow(dead_code)] // replaced by the gate sequences
    #[inline(always)]
    pub(super) unsafe fn percpu_add(
        _slot0: *mut i64,
        _stride_bytes: usize,
        _gate: *const usize,
        _gate_mask: usize,
        _delta: i64,
    ) -> bool {
        false
    }

    pub(super) fn fence_all_cpus() {
        crate::sync::fence(crate::sync::Ordering::SeqCst);
    }

    #[inline]
    pub(super) fn current_cpu() -> Option<usize> {
        None
    }
}

#[cfg(percpu_ref_rseq)]
mod linux_x86_64 {
    use crate::sync::{AtomicI64, AtomicU32, Ordering::Relaxed};
    use std::arch::asm;
    use std::sync::OnceLock;

    /// `struct rseq` is at least this big when registered (original ABI).
    const RSEQ_ORIG_SIZE: u32 = 20;
    /// [`OFFSET`] before the lookup ran.
    const UNRESOLVED: i64 = i64::MIN;
    /// [`OFFSET`] when glibc did not register an area.
    const ABSENT: i64 = i64::MIN + 1;

    /// `__rseq_offset`, or one of the two sentinels.
    static OFFSET: AtomicI64 = AtomicI64::new(UNRESOLVED);
    /// Rows of the slot arena (`possible()` CPUs), stored before
    /// [`available`] first returns `true`; 0 (every add refused) before.
    static CPU_BOUND: AtomicU32 = AtomicU32::new(0);

    /// Look up glibc's `__rseq_size` / `__rseq_offset` with `dlsym`.
    #[cold]
    fn resolve() -> i64 {
        // SAFETY: `dlsym` with `RTLD_DEFAULT` and a NUL-terminated name is
        // always safe to call; it returns null if the symbol is absent.
        let size = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) };
        // SAFETY: as above.
        let offset = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) };
        let off = if size.is_null() || offset.is_null() {
            ABSENT
        } else {
            // SAFETY: glibc defines `const unsigned int __rseq_size` and
            // `const ptrdiff_t __rseq_offset` (aligned, initialised before
            // any user code runs and never written again).
            let (size, offset) = unsafe { (*size.cast::<u32>(), *offset.cast::<isize>() as i64) };
            if size >= RSEQ_ORIG_SIZE && offset > ABSENT {
                offset
            } else {
                ABSENT
            }
        };
        // Relaxed: the value is self-contained and every thread computes the
        // same one, so a racing lookup stores the same number.
        OFFSET.store(off, Relaxed);
        off
    }

    /// The rseq area's offset from the thread pointer, if glibc registered
    /// one.
    #[inline]
    fn area_offset() -> Option<i64> {
        // Relaxed: see `resolve`; a stale UNRESOLVED only repeats the lookup.
        match OFFSET.load(Relaxed) {
            UNRESOLVED => match resolve() {
                ABSENT => None,
                off => Some(off),
            },
            ABSENT => None,
            off => Some(off),
        }
    }

    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if super::portable_forced_by(std::env::var_os(super::PORTABLE_ENV).as_deref()) {
                return false;
            }
            if area_offset().is_none() || !crate::sys::membarrier::register_private_expedited_rseq()
            {
                return false;
            }
            let bound = u32::try_from(crate::sys::cpu::possible()).unwrap_or(u32::MAX);
            // Relaxed: published by the OnceLock, whose completion
            // (Release) every caller observes (Acquire) before it may call
            // `percpu_add`.
            CPU_BOUND.store(bound, Relaxed);
            true
        })
    }

    #[inline]
    pub(super) fn current_cpu() -> Option<usize> {
        let off = area_offset()?;
        let cpu: u32;
        // SAFETY: glibc registered a `struct rseq` at thread pointer +
        // `off` for every thread it created (the `fs` segment base is the
        // thread pointer on x86_64); `cpu_id` is the aligned u32 at offset
        // 4, readable by its own thread. The kernel updates it
        // asynchronously, so this is not `pure`.
        unsafe {
            asm!(
                "mov {cpu:e}, dword ptr fs:[{off} + 4]",
                off = in(reg) off,
                cpu = out(reg) cpu,
                options(nostack, readonly, preserves_flags),
            );
        }
        // RSEQ_CPU_ID_UNINITIALIZED (-1) / _REGISTRATION_FAILED (-2).
        i32::try_from(cpu).ok().map(|c| c as usize)
    }

    /// # Safety
    ///
    /// As for [`super::percpu_add`].
    #[allow(dead_code)] // replaced by the gate sequences
    #[inline(always)]
    pub(super) unsafe fn percpu_add(
        slot0: *mut i64,
        stride_bytes: usize,
        gate: *const usize,
        gate_mask: usize,
        delta: i64,
    ) -> bool {
        // Relaxed (both): written before the OnceLock in `available`
        // completed, and the caller observed that completion (precondition),
        // so these loads see the final values.
        let off = OFFSET.load(Relaxed);
        let bound = CPU_BOUND.load(Relaxed);
        debug_assert!(off > ABSENT, "percpu_add before rseq_available()");
        let ok: u32;
        // The sequence; `$scale` turns the CPU id in `{cpu}` into the row's
        // byte offset (a 1-cycle shift for power-of-two strides, which the
        // arena uses, else a 3-cycle `imul`: the branch folds away for a
        // constant stride).
        macro_rules! sequence {
            ($scale:literal, $($scale_operand:tt)*) => {
                asm!(
                    "lea {cs}, [rip + 3f]",
                    "mov {ok:e}, 1",
                    // Arm (again, after an abort: the kernel cleared rseq_cs).
                    "2:",
                    "mov qword ptr fs:[{off} + 8], {cs}",
                    // start_ip
                    "4:",
                    "mov {cpu:e}, dword ptr fs:[{off} + 4]",
                    "cmp {cpu:e}, {bound:e}",
                    "jae 6f",
                    "test qword ptr [{gate}], {mask}",
                    "jnz 6f",
                    $scale,
                    // The commit: the single last instruction of the range.
                    "add qword ptr [{slot0} + {cpu}], {delta}",
                    // post_commit_ip
                    "5:",
                    // Out of line: the early exit and the abort handler.
                    ".pushsection __rseq_failure, \"ax\"",
                    "6:",
                    "xor {ok:e}, {ok:e}",
                    "jmp 5b",
                    // RSEQ_SIG 0x53053053 as `ud1 0x53053053(%rip), %edi`, so
                    // a disassembler stays in sync; it must directly precede
                    // the abort label.
                    ".byte 0x0f, 0xb9, 0x3d",
                    ".long 0x53053053",
                    // abort_ip
                    "8:",
                    "jmp 2b",
                    ".popsection",
                    // struct rseq_cs { u32 version, flags; u64 start_ip,
                    // post_commit_offset, abort_ip }, 32-byte aligned. The
                    // section must be writable: the absolute addresses need
                    // dynamic relocations in a PIE.
                    ".pushsection __rseq_cs, \"aw\"",
                    ".balign 32",
                    "3:",
                    ".long 0, 0",
                    ".quad 4b, 5b - 4b, 8b",
                    ".popsection",
                    off = in(reg) off,
                    bound = in(reg) bound,
                    gate = in(reg) gate,
                    mask = in(reg) gate_mask,
                    slot0 = in(reg) slot0,
                    delta = in(reg) delta,
                    $($scale_operand)*
                    cs = out(reg) _,
                    cpu = out(reg) _,
                    ok = out(reg) ok,
                    options(nostack),
                )
            };
        }
        // SAFETY: the rseq area is registered for this thread at fs:off
        // (glibc registers every thread it creates; precondition); writing
        // `rseq_cs` (offset 8) is how user space arms a sequence, and the
        // descriptor lives in static, 32-byte aligned memory with the
        // signature before the abort label, as the kernel requires. `cpu`
        // is checked `< bound = possible()` inside the sequence, so the slot
        // address is one the caller guarantees valid; `gate` is readable.
        // The module docs argue exactness. No stack use, no calls.
        unsafe {
            if stride_bytes.is_power_of_two() {
                sequence!("shl {cpu}, cl", in("ecx") stride_bytes.trailing_zeros(),);
            } else {
                sequence!("imul {cpu}, {stride}", stride = in(reg) stride_bytes,);
            }
        }
        ok != 0
    }

    pub(super) fn fence_all_cpus() {
        if available() {
            crate::sys::membarrier::private_expedited_rseq();
        } else {
            crate::sync::fence(crate::sync::Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn env_parsing() {
        let forced = |v: &str| portable_forced_by(Some(OsStr::new(v)));
        assert!(!portable_forced_by(None));
        for yes in ["1", "true", "TRUE", " yes\n", "On"] {
            assert!(forced(yes), "{yes:?}");
        }
        for no in ["", "0", "false", "no", "off", "2", "portable"] {
            assert!(!forced(no), "{no:?}");
        }
    }

    #[test]
    fn portable_fallback_adds_nothing() {
        let slot = crate::sync::AtomicI64::new(5);
        let gate = crate::sync::AtomicUsize::new(0);
        assert!(!portable::available());
        assert_eq!(portable::current_cpu(), None);
        // SAFETY: the fallback touches no memory.
        let added = unsafe { portable::percpu_add(slot.as_ptr(), 128, gate.as_ptr(), 1, 3) };
        assert!(!added);
        assert_eq!(slot.load(crate::sync::Ordering::SeqCst), 5);
        portable::fence_all_cpus();
    }

    #[test]
    fn init_is_idempotent() {
        assert_eq!(init(), rseq_available());
        assert_eq!(init(), rseq_available());
        fence_all_cpus();
        if let Some(cpu) = current_cpu() {
            assert!(cpu < crate::sys::cpu::possible());
        }
    }
}

#[cfg(all(test, percpu_ref_rseq))]
mod rseq_tests {
    use super::*;
    use crate::sync::{AtomicBool, AtomicI64, AtomicUsize, Ordering::SeqCst};
    use std::sync::Mutex;

    const COLS: usize = 16;
    const STRIDE: usize = std::mem::size_of::<Row>();
    const GATE: usize = 1 << 3;

    /// One CPU's row of a test slot arena, like `percpu::slots`.
    #[repr(align(128))]
    struct Row([AtomicI64; COLS]);

    /// `rows_per_cpu` rows per CPU, of which the first is the CPU's.
    struct Arena(Vec<Row>, usize);

    impl Arena {
        fn new() -> Self {
            Self::with_rows_per_cpu(1)
        }
        fn with_rows_per_cpu(n: usize) -> Self {
            Arena(
                (0..crate::sys::cpu::possible() * n)
                    .map(|_| Row(std::array::from_fn(|_| AtomicI64::new(0))))
                    .collect(),
                n,
            )
        }
        fn slot0(&self, col: usize) -> *mut i64 {
            self.0[0].0[col].as_ptr()
        }
        /// Every row's slot `col` (also the rows no CPU owns).
        fn column(&self, col: usize) -> Vec<i64> {
            self.0.iter().map(|r| r.0[col].load(SeqCst)).collect()
        }
        fn sum(&self, col: usize) -> i64 {
            self.column(col).iter().sum()
        }
        /// Add through the sequence; the arena outlives every caller and its
        /// slots are written only by `percpu_add`.
        fn add(&self, col: usize, gate: &AtomicUsize, delta: i64) -> bool {
            // SAFETY: rseq_available() was checked by the test; every row
            // exists for cpu < possible(), rows are 128-byte aligned so each
            // slot is 8-aligned; slots are written only here; `gate` is a
            // live atomic.
            unsafe { percpu_add(self.slot0(col), STRIDE * self.1, gate.as_ptr(), GATE, delta) }
        }
    }

    fn rseq_or_skip() -> bool {
        let ok = rseq_available();
        if !ok {
            eprintln!("rseq tier unavailable here (old glibc/kernel or forced portable): skipped");
        }
        ok
    }

    fn core_ids() -> Vec<core_affinity::CoreId> {
        core_affinity::get_core_ids().unwrap_or_default()
    }

    /// SIGURG (ignored by default elsewhere) with a no-op handler, so a
    /// signal storm interrupts sequences.
    fn install_sigurg_handler() {
        extern "C" fn on_sigurg(_: libc::c_int) {
            SIGNALS.fetch_add(1, SeqCst);
        }
        // SAFETY: a zeroed sigaction is valid; the handler only does an
        // atomic add (async-signal-safe) and never unwinds.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigurg as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()), 0);
        }
    }
    static SIGNALS: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn current_cpu_matches_sched_getcpu_when_pinned() {
        if current_cpu().is_none() {
            eprintln!("no rseq area registered: skipped");
            return;
        }
        for core in core_ids() {
            std::thread::spawn(move || {
                if !core_affinity::set_for_current(core) {
                    eprintln!("cannot pin to {core:?}: skipped");
                    return;
                }
                for _ in 0..100 {
                    let c = current_cpu();
                    assert_eq!(c, Some(rustix::thread::sched_getcpu()));
                    assert_eq!(c, Some(core.id));
                    assert_eq!(crate::sys::cpu::current(), core.id);
                    std::thread::yield_now();
                }
            })
            .join()
            .unwrap();
        }
    }

    /// Run `body(t)` for `t in 0..threads`, each on its own thread, while a
    /// chaos thread moves them between the cores *asynchronously*
    /// (`sched_setaffinity` on their thread ids, so a migration can land
    /// anywhere inside a sequence) and sends them SIGURG. `body` gets the
    /// number of chaos rounds so far, to run until enough happened. Returns
    /// the number of migrations done.
    fn under_chaos(threads: usize, body: impl Fn(usize, &AtomicUsize) + Sync) -> usize {
        install_sigurg_handler();
        let cores = core_ids();
        let targets = Mutex::new(Vec::new());
        let finished = AtomicUsize::new(0);
        let chaos_over = AtomicBool::new(false);
        let rounds = AtomicUsize::new(0);
        let mut migrations = 0;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (body, targets, rounds) = (&body, &targets, &rounds);
                let (finished, chaos_over) = (&finished, &chaos_over);
                s.spawn(move || {
                    // Counted as finished even if `body` panics, so the chaos
                    // thread (and the scope) still ends.
                    struct Done<'a>(&'a AtomicUsize, &'a AtomicBool);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_add(1, SeqCst);
                            // Stay alive (a valid kill/affinity target, tid not
                            // reused) until the chaos thread is done with us.
                            while !self.1.load(SeqCst) {
                                std::thread::yield_now();
                            }
                        }
                    }
                    // SAFETY: pthread_self has no preconditions.
                    let me = (unsafe { libc::pthread_self() }, rustix::thread::gettid());
                    targets.lock().unwrap().push(me);
                    let _done = Done(finished, chaos_over);
                    body(t, rounds);
                });
            }
            s.spawn(|| {
                for round in 0usize.. {
                    let done = finished.load(SeqCst) == threads;
                    for (k, &(pthread, tid)) in targets.lock().unwrap().iter().enumerate() {
                        if cores.len() > 1 {
                            let mut set = rustix::thread::CpuSet::new();
                            set.set(cores[(k + round) % cores.len()].id);
                            migrations += usize::from(
                                rustix::thread::sched_setaffinity(Some(tid), &set).is_ok(),
                            );
                        }
                        if round % 4 == 0 {
                            // SAFETY: every registered thread stays alive
                            // until `chaos_over` is set below.
                            unsafe { libc::pthread_kill(pthread, libc::SIGURG) };
                        }
                    }
                    if done {
                        break;
                    }
                    rounds.fetch_add(1, SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
                chaos_over.store(true, SeqCst);
            });
        });
        migrations
    }

    /// Threads add through the sequence while being migrated between the
    /// cores asynchronously, oversubscribed (preemption) and signalled.
    ///
    /// Checked against mutants on the 2-vCPU dev VM: without the `rseq_cs`
    /// store this lost 3–30 adds per ~2000 migrations (and the gate test
    /// failed on every run); the gate test also failed on every run with the
    /// membarrier replaced by a fence, and with the gate read before `start`.
    #[test]
    fn adds_are_exact_under_migration_and_signals() {
        if !rseq_or_skip() {
            return;
        }
        const THREADS: usize = 4;
        // Each thread does at least MIN_OPS iterations and keeps going until
        // the chaos thread has done MIN_ROUNDS rounds of migrations.
        const MIN_OPS: usize = 100_000;
        const MIN_ROUNDS: usize = if cfg!(debug_assertions) { 100 } else { 500 };
        // +1 +1 -1 +2 -1 ... on the net column; the count column gets +1 per
        // op, so a lost or doubled add of either sign shows.
        const PATTERN: [i64; 5] = [1, 1, -1, 2, -1];
        let arena = Arena::new();
        let gate = AtomicUsize::new(0);
        let (ops, net) = (AtomicI64::new(0), AtomicI64::new(0));
        let signals_before = SIGNALS.load(SeqCst);
        let migrations = under_chaos(THREADS, |_, rounds| {
            let (mut i, mut sum) = (0, 0);
            while i < MIN_OPS || rounds.load(SeqCst) < MIN_ROUNDS {
                for _ in 0..1000 {
                    let delta = PATTERN[i % PATTERN.len()];
                    assert!(arena.add(0, &gate, delta));
                    assert!(arena.add(1, &gate, 1));
                    (i, sum) = (i + 1, sum + delta);
                }
            }
            ops.fetch_add(i as i64, SeqCst);
            net.fetch_add(sum, SeqCst);
        });
        eprintln!(
            "exactness: {} adds, {migrations} migrations, {} signals, per-CPU counts {:?}",
            2 * ops.load(SeqCst),
            SIGNALS.load(SeqCst) - signals_before,
            arena.column(1)
        );
        assert_eq!(arena.sum(1), ops.load(SeqCst));
        assert_eq!(arena.sum(0), net.load(SeqCst));
    }

    /// A stride that is not a power of two takes the `imul` path.
    #[test]
    fn odd_stride_is_exact() {
        if !rseq_or_skip() {
            return;
        }
        let arena = Arena::with_rows_per_cpu(3);
        let gate = AtomicUsize::new(0);
        let ops = AtomicI64::new(0);
        under_chaos(3, |_, rounds| {
            let mut i = 0;
            while i < 20_000 || rounds.load(SeqCst) < 50 {
                assert!(arena.add(5, &gate, 1));
                i += 1;
            }
            ops.fetch_add(i, SeqCst);
        });
        let column = arena.column(5);
        assert_eq!(column.iter().sum::<i64>(), ops.load(SeqCst));
        for (row, v) in column.iter().enumerate() {
            assert!(row % 3 == 0 || *v == 0, "row {row} is no CPU's but has {v}");
        }
    }

    /// While the gate is set and `fence_all_cpus()` has returned, no slot
    /// changes; every refused add is counted elsewhere, so the total stays
    /// exact.
    #[test]
    fn gate_and_fence_stop_every_add() {
        if !rseq_or_skip() {
            return;
        }
        const ADDERS: usize = 3;
        const MIN_OPS: usize = 20_000;
        const ROUNDS: usize = if cfg!(debug_assertions) { 200 } else { 300 };
        let arena = Arena::new();
        let gate = AtomicUsize::new(0b101); // other bits do not gate
        let refused = AtomicI64::new(0);
        let attempted = AtomicI64::new(0);
        let flipper_done = AtomicBool::new(false);
        under_chaos(ADDERS + 1, |t, _| {
            if t == ADDERS {
                // The switcher. Adders run until it is done, even if it panics.
                struct Done<'a>(&'a AtomicBool);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.store(true, SeqCst);
                    }
                }
                let _done = Done(&flipper_done);
                for _ in 0..ROUNDS {
                    gate.fetch_or(GATE, SeqCst);
                    fence_all_cpus();
                    let snapshot = arena.column(2);
                    let refused_at_gate = refused.load(SeqCst);
                    // Hold the gate until an adder has been refused, checking
                    // that no slot moves.
                    for tries in 0..100_000 {
                        assert_eq!(arena.column(2), snapshot, "a slot changed while gated");
                        if refused.load(SeqCst) > refused_at_gate {
                            break;
                        }
                        if tries % 1024 == 1023 {
                            std::thread::yield_now();
                        }
                    }
                    assert_eq!(arena.column(2), snapshot, "a slot changed while gated");
                    gate.fetch_and(!GATE, SeqCst);
                    // Let the adders add for a while.
                    for _ in 0..20_000 {
                        std::hint::spin_loop();
                    }
                }
                return;
            }
            let mut i = 0i64;
            while i < MIN_OPS as i64 || !flipper_done.load(SeqCst) {
                if !arena.add(2, &gate, 1) {
                    refused.fetch_add(1, SeqCst);
                }
                i += 1;
            }
            attempted.fetch_add(i, SeqCst);
        });
        let refused = refused.load(SeqCst);
        eprintln!(
            "gate: {} attempted, {refused} refused while gated",
            attempted.load(SeqCst),
        );
        assert!(refused > 0, "the gate never refused an add");
        assert_eq!(arena.sum(2) + refused, attempted.load(SeqCst));
    }

    /// Not a test: numbers for the report. Run with
    /// `cargo test --release --lib rseq_bench -- --ignored --nocapture`.
    #[test]
    #[ignore = "micro-benchmark, prints numbers only"]
    fn rseq_bench() {
        use std::hint::black_box;
        if !rseq_or_skip() {
            return;
        }
        const PAIRS: usize = 50_000_000;
        // This thread's CPU time, not wall time: the machine is shared, and
        // time spent descheduled is not the loop's cost.
        #[derive(Clone, Copy)]
        struct Instant(i128);
        impl Instant {
            fn now() -> Self {
                // SAFETY: a zeroed timespec is valid; clock_gettime only
                // writes it.
                let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
                // SAFETY: valid clock id and out-pointer.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                Instant(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128)
            }
        }
        fn ns(start: Instant, n: usize) -> f64 {
            (Instant::now().0 - start.0) as f64 / n as f64
        }
        let arena = Arena::new();
        let gate = AtomicUsize::new(0);
        // As the counter will call it: slot pointer in a register, constant
        // stride (not `Arena::add`, which re-derives both after every asm).
        let per_pair = |arena: &Arena| {
            let (slot0, gate) = (arena.slot0(3), gate.as_ptr());
            let t = Instant::now();
            for _ in 0..PAIRS {
                // SAFETY: as in `Arena::add`.
                unsafe {
                    percpu_add(slot0, STRIDE, gate, GATE, 1);
                    percpu_add(slot0, STRIDE, gate, GATE, -1);
                }
            }
            ns(t, PAIRS)
        };
        for _ in 0..2 {
            eprintln!(
                "percpu_add +1/-1, 1 thread: {:.2} ns/pair",
                per_pair(&arena)
            );
        }
        let two: Vec<f64> = std::thread::scope(|s| {
            let hs: Vec<_> = core_ids()
                .into_iter()
                .map(|c| {
                    let (arena, per_pair) = (&arena, &per_pair);
                    s.spawn(move || {
                        core_affinity::set_for_current(c);
                        per_pair(arena)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        eprintln!("percpu_add +1/-1, 2 threads (one per core), same column: {two:.2?} ns/pair");
        assert_eq!(arena.sum(3), 0);

        std::thread_local! {
            static LOCAL: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
        }
        let p = LOCAL.with(|c| c.as_ptr());
        for _ in 0..2 {
            let t = Instant::now();
            for _ in 0..PAIRS {
                // SAFETY: `p` is this thread's live thread-local.
                unsafe {
                    std::arch::asm!("add qword ptr [{p}], {d}", p = in(reg) p, d = in(reg) 1i64, options(nostack));
                    std::arch::asm!("add qword ptr [{p}], {d}", p = in(reg) p, d = in(reg) -1i64, options(nostack));
                }
            }
            eprintln!(
                "thread-local plain add [ptr] +1/-1: {:.2} ns/pair",
                ns(t, PAIRS)
            );
        }
        let t = Instant::now();
        for _ in 0..PAIRS {
            // SAFETY: `p + 0` is this thread's live thread-local.
            unsafe {
                std::arch::asm!("add qword ptr [{p} + {i}], {d}", p = in(reg) p, i = in(reg) black_box(0usize), d = in(reg) 1i64, options(nostack));
                std::arch::asm!("add qword ptr [{p} + {i}], {d}", p = in(reg) p, i = in(reg) black_box(0usize), d = in(reg) -1i64, options(nostack));
            }
        }
        eprintln!(
            "thread-local plain add [ptr + index] +1/-1 (no memory renaming): {:.2} ns/pair",
            ns(t, PAIRS)
        );
        let t = Instant::now();
        for _ in 0..PAIRS {
            LOCAL.with(|c| c.set(black_box(c.get() + 1)));
            LOCAL.with(|c| c.set(black_box(c.get() - 1)));
        }
        eprintln!(
            "thread_local! Cell inc/dec (black_box): {:.2} ns/pair",
            ns(t, PAIRS)
        );
        let local = AtomicI64::new(0);
        let t = Instant::now();
        for _ in 0..PAIRS {
            black_box(&local).fetch_add(1, crate::sync::Ordering::Relaxed);
            black_box(&local).fetch_sub(1, crate::sync::Ordering::Relaxed);
        }
        eprintln!("uncontended lock xadd +1/-1: {:.2} ns/pair", ns(t, PAIRS));

        const READS: usize = 20_000_000;
        let t = Instant::now();
        for _ in 0..READS {
            black_box(current_cpu());
        }
        eprintln!("current_cpu(): {:.2} ns", ns(t, READS));
        let t = Instant::now();
        for _ in 0..READS {
            black_box(crate::sys::cpu::current());
        }
        eprintln!("cpu::current(): {:.2} ns", ns(t, READS));
        let t = Instant::now();
        for _ in 0..READS {
            black_box(rustix::thread::sched_getcpu());
        }
        eprintln!("rustix sched_getcpu(): {:.2} ns", ns(t, READS));

        const FENCES: usize = 2_000;
        // `sibling`: a counter a busy thread of this process bumps; each
        // sample first waits until it moved, so that thread was just running
        // on its CPU (the machine is shared) and membarrier must IPI it.
        let fences = |label: &str, sibling: Option<&AtomicUsize>| {
            let mut v: Vec<u128> = (0..FENCES)
                .map(|_| {
                    if let Some(ticks) = sibling {
                        let t0 = ticks.load(SeqCst);
                        while ticks.load(SeqCst) == t0 {
                            std::hint::spin_loop();
                        }
                    }
                    let t = std::time::Instant::now();
                    fence_all_cpus();
                    t.elapsed().as_nanos()
                })
                .collect();
            v.sort_unstable();
            eprintln!(
                "fence_all_cpus() {label}: median {:.2} us, p10 {:.2} us, p90 {:.2} us",
                v[FENCES / 2] as f64 / 1e3,
                v[FENCES / 10] as f64 / 1e3,
                v[FENCES * 9 / 10] as f64 / 1e3,
            );
        };
        fences("no other thread running", None);
        let stop = AtomicBool::new(false);
        let ticks = AtomicUsize::new(0);
        let cores = core_ids();
        std::thread::scope(|s| {
            if let [c0, c1, ..] = cores[..] {
                let (stop, ticks) = (&stop, &ticks);
                s.spawn(move || {
                    core_affinity::set_for_current(c1);
                    while !stop.load(SeqCst) {
                        ticks.fetch_add(1, SeqCst);
                    }
                });
                core_affinity::set_for_current(c0);
                fences("sibling thread busy on the other core", Some(ticks));
                stop.store(true, SeqCst);
            }
        });
    }

    /// Re-run `child_probe` in a child process with the rseq tier disabled.
    fn run_child(env: (&str, &str)) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "sys::rseq::rseq_tests::child_probe",
                "--exact",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env("PERCPU_REF_RSEQ_CHILD", env.0)
            .env(
                "PERCPU_REF_RSEQ_AREA",
                if current_cpu().is_some() { "1" } else { "0" },
            )
            .env(env.0, env.1)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("1 passed"),
            "child test did not run: {stdout}"
        );
    }

    #[test]
    fn portable_env_forces_fallback() {
        run_child((PORTABLE_ENV, "1"));
    }

    #[test]
    fn no_glibc_registration_falls_back() {
        run_child(("GLIBC_TUNABLES", "glibc.pthread.rseq=0"));
    }

    /// Only meaningful in the child spawned by the two tests above.
    #[test]
    fn child_probe() {
        let Ok(which) = std::env::var("PERCPU_REF_RSEQ_CHILD") else {
            return;
        };
        assert!(!rseq_available());
        assert!(!init());
        fence_all_cpus();
        assert!(crate::sys::cpu::current() < crate::sys::cpu::possible());
        if which == "GLIBC_TUNABLES" {
            assert_eq!(current_cpu(), None);
        } else {
            // Forcing the portable tier still lets the CPU id be read.
            let parent_had_area = std::env::var("PERCPU_REF_RSEQ_AREA").as_deref() == Ok("1");
            assert_eq!(current_cpu().is_some(), parent_had_area);
        }
    }
}
