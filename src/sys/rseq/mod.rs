//! Restartable sequences (rseq): the current CPU id for free, and plain,
//! non-atomic updates of the current CPU's memory that are nevertheless
//! exact under preemption, migration and signals.
//!
//! Two users: the per-CPU counters ([`Gate`], [`add_imm`], [`add`]) and the
//! per-CPU free-page stacks ([`CpuStacks`], used by `dax::free`).
//!
//! glibc ≥ 2.35 registers an rseq area (`struct rseq`, Linux UAPI) for every
//! thread it creates and exports where it lives: `__rseq_offset` (from the
//! thread pointer: +2336 on x86_64, -32 on aarch64 with glibc 2.36) and
//! `__rseq_size` (0 when it did not register, e.g. under
//! `GLIBC_TUNABLES=glibc.pthread.rseq=0`; 20 on glibc 2.36). We look both
//! up with `dlsym` at run time, so the binary still links, and falls back,
//! on an older glibc or another libc (and in a static binary, where `dlsym`
//! finds nothing). Only the original 20-byte ABI is used: `cpu_id` (u32 at
//! offset 4) and `rseq_cs` (u64 at offset 8).
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the interface every architecture implements, this argument |
//! | `glibc.rs` | the area lookup, the tier choice, the fence: shared by the architectures |
//! | `x86_64.rs`, `aarch64.rs` | the sequences in asm, the CPU-id read |
//! | `fallback.rs` | everywhere else, Miri and the model checkers: nothing is added, every sequence refuses |
//! | `stack.rs` | [`CpuStacks`]: per-CPU stacks of `u32` on the sequences |
//! | `bench.rs` | hooks for `benches/` (through `percpu_ref::__bench`) |
//! | `tests.rs` | chaos tests of every sequence, and the mutant record |
//!
//! The rseq tier is compiled where `build.rs` sets `percpu_ref_rseq`
//! (x86_64 and aarch64 Linux with glibc); everywhere else
//! [`rseq_available`] is `false`, [`current_cpu`] is `None`,
//! [`fence_all_cpus`] is a `SeqCst` fence, and [`add_imm`]/[`add`] add
//! nothing and return `false`. Setting the environment variable
//! `PERCPU_REF_PORTABLE=1` (also `true`, `yes`, `on`) forces the fallback
//! at run time.
//!
//! The sequences, and why an add is neither lost nor doubled under
//! preemption, migration, signals and the gate protocol (on both
//! architectures, memory model included), are argued in
//! [`crate::docs::rseq`].

#[cfg(percpu_ref_rseq)]
mod glibc;

#[cfg(all(percpu_ref_rseq, target_arch = "x86_64"))]
mod x86_64;
#[cfg(all(percpu_ref_rseq, target_arch = "x86_64"))]
use self::x86_64 as imp;

#[cfg(all(percpu_ref_rseq, target_arch = "aarch64"))]
mod aarch64;
#[cfg(all(percpu_ref_rseq, target_arch = "aarch64"))]
use self::aarch64 as imp;

#[cfg_attr(percpu_ref_rseq, allow(dead_code))]
mod fallback;
#[cfg(not(percpu_ref_rseq))]
use self::fallback as imp;

#[cfg(not(percpu_ref_model))]
pub(crate) mod bench;
// The stacks' only user is the page pool (feature `dax`) besides tests.
#[cfg(percpu_ref_rseq)]
#[cfg_attr(not(feature = "dax"), allow(dead_code))]
mod stack;
#[cfg(percpu_ref_rseq)]
#[cfg_attr(not(feature = "dax"), allow(unused_imports))]
pub(crate) use stack::CpuStacks;

#[cfg(test)]
mod tests;

use crate::sync::{AtomicI64, AtomicPtr, AtomicU32};

/// Byte distance between two CPU rows of a slot column (the arena's row
/// stride: 16 refs' 8-byte slots per row, so two CPUs never write the same
/// cache line nor an adjacent-line prefetch pair).
pub(crate) const ROW_STRIDE: usize = 128;
/// `log2(ROW_STRIDE)`, the sequence's shift.
#[cfg_attr(not(percpu_ref_rseq), allow(dead_code))]
const ROW_SHIFT: u32 = ROW_STRIDE.trailing_zeros();
const _: () = assert!(ROW_STRIDE.is_power_of_two());

/// What a restartable sequence reads of one counter. `#[repr(C)]`: the asm
/// uses the field offsets (`limit` at 0, `column` at 8).
#[repr(C)]
pub(crate) struct Gate {
    /// The sequences count only if the CPU id is `< limit`: the number of CPU
    /// rows while counting on the column is open; 0 = closed, every add is
    /// refused. Read inside the sequence, first.
    pub(crate) limit: AtomicU32,
    /// Never read by the sequences: the owner's word (`PercpuRef` keeps its
    /// state flags here).
    pub(crate) word: AtomicU32,
    /// Row-0 slot of the column; row `cpu` is `ROW_STRIDE * cpu` bytes on.
    /// Read inside the sequence after the limit check; valid whenever
    /// `limit != 0` was read in the same sequence.
    pub(crate) column: AtomicPtr<AtomicI64>,
}

#[cfg(not(percpu_ref_model))]
const _: () = {
    assert!(std::mem::offset_of!(Gate, limit) == 0);
    assert!(std::mem::offset_of!(Gate, column) == 8);
};

impl Gate {
    /// A closed gate (`limit` 0) with no column and `word`.
    pub(crate) fn new(word: u32) -> Self {
        Gate {
            limit: AtomicU32::new(0),
            word: AtomicU32::new(word),
            column: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::sync::Ordering::Relaxed;
        // Relaxed: a diagnostic snapshot, no ordering needed.
        f.debug_struct("Gate")
            .field("limit", &self.limit.load(Relaxed))
            .field("word", &self.word.load(Relaxed))
            .field("column", &self.column.load(Relaxed))
            .finish()
    }
}

/// Environment variable that forces the portable tier when set to `1`
/// (`true`, `yes`, `on`; case-insensitive, surrounding blanks ignored).
#[cfg_attr(not(percpu_ref_rseq), allow(dead_code))]
pub(crate) const PORTABLE_ENV: &str = "PERCPU_REF_PORTABLE";

/// Whether a value of [`PORTABLE_ENV`] forces the portable tier.
/// Unset, empty, `0` and anything unrecognised do not.
#[cfg_attr(not(percpu_ref_rseq), allow(dead_code))]
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
    let yes = imp::available();
    #[cfg(percpu_ref_rseq)]
    if yes && Area::get().is_none() {
        Area::publish();
    }
    yes
}

/// Explicit early initialisation (registering `membarrier` before threads
/// exist is microseconds instead of ~20 ms); returns [`rseq_available`].
pub(crate) fn init() -> bool {
    rseq_available()
}

/// `+D` (a compile-time constant, `+1` for get and `-1` for put, any value
/// that fits an `i32`) on this CPU's slot of `g`'s column, inside one
/// restartable sequence that reads `g.limit` and `g.column` itself.
/// `false`: nothing was added (closed gate, no rseq area for this thread, a
/// CPU id `>= limit`, or the fallback tier), and the caller counts `D`
/// elsewhere.
///
/// # Safety
///
/// * [`rseq_available`] returned `true` (on this or another thread; it
///   happens-before this call).
/// * While `g.limit != 0`, `g.column` points to a column whose slots for
///   every `cpu < limit` (at `column + ROW_STRIDE * cpu` bytes) are valid,
///   8-aligned `i64`s, written only by these sequences ([`add_imm`],
///   [`add`]); reads (atomic loads) from anywhere are fine.
/// * The owner writes the slots, or invalidates or reassigns the column,
///   only after closing the gate (`limit = 0`, `SeqCst` or `Release`) and
///   then calling [`fence_all_cpus`]; it stores the new column pointer and
///   the slots' starting values *before* storing a non-zero `limit` with
///   `Release` (or `SeqCst`).
#[inline(always)]
pub(crate) unsafe fn add_imm<const D: i64>(g: &Gate) -> bool {
    // SAFETY: forwarded; the caller upholds this function's contract, which
    // is the implementation's.
    unsafe { imp::add_imm::<D>(g) }
}

/// The rseq area's place, as a token: holding one proves that
/// [`rseq_available`] returned `true`, and it carries the area's offset
/// from the thread pointer, a process-wide constant. `Copy`, one register.
///
/// [`add_imm`] loads the offset from a static in every sequence, and the
/// compiler cannot keep it in a register across sequences (the sequences
/// write memory, and the static is an atomic): that reload sits on the
/// critical path of the CPU-id load and costs ~0.3 ns per get+put pair on
/// the measured Intel core, a third of the whole pair. A caller that keeps
/// an `Area` next to its pointer (for example in a reference handle, so a
/// clone copies it) gives [`add_imm_in`] the offset in a register instead,
/// which measures the same as the bare `limit` sequence.
///
/// Four bytes with a niche: the offset is never 0 (the thread pointer
/// itself points at the thread control block, not at the rseq area), so an
/// `Option<Area>` is four bytes too.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Area {
    off: std::num::NonZeroI32,
}

/// The area offset once [`rseq_available`] found the tier available; 0
/// before (or where it is not). Each `PercpuRef` is built after that call,
/// so every reference handle taken on one finds it set.
#[cfg(percpu_ref_rseq)]
static AREA: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

impl Area {
    /// `Some` where the rseq tier is available (see [`rseq_available`])
    /// and was checked by this process: one load.
    #[inline(always)]
    pub(crate) fn get() -> Option<Area> {
        #[cfg(percpu_ref_rseq)]
        {
            // Relaxed: the offset is the only data this load carries; the
            // sequences need nothing else from the thread that stored it
            // (glibc registered every thread's area before user code ran).
            let off = AREA.load(std::sync::atomic::Ordering::Relaxed);
            std::num::NonZeroI32::new(off).map(|off| Area { off })
        }
        #[cfg(not(percpu_ref_rseq))]
        {
            None
        }
    }

    /// Publish the offset (once the tier is known to be available).
    #[cfg(percpu_ref_rseq)]
    fn publish() {
        // glibc's offsets are small (2336 on x86_64, -32 on aarch64); one
        // that does not fit an `i32`, or 0, leaves the handles without a
        // token, on the slow path.
        if let Ok(off) = i32::try_from(imp::resolved_offset()) {
            // Relaxed: see `get`.
            AREA.store(off, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// [`add_imm`] with the area offset from `area` (in a register) instead of
/// a static; see [`Area`].
///
/// # Safety
///
/// As for [`add_imm`], except the first point (`area` proves it).
#[inline(always)]
pub(crate) unsafe fn add_imm_in<const D: i64>(area: Area, g: &Gate) -> bool {
    // SAFETY: forwarded; `area` was made by `Area::get`, so the tier is
    // available and `off` is the resolved offset.
    unsafe { imp::add_imm_off::<D>(i64::from(area.off.get()), g) }
}

/// [`add`] with the area offset from `area`; see [`Area`].
///
/// # Safety
///
/// As for [`add_imm_in`].
#[allow(dead_code)] // the counter's bulk adds use `add`
#[inline(always)]
pub(crate) unsafe fn add_in(area: Area, g: &Gate, d: i64) -> bool {
    // SAFETY: as in `add_imm_in`.
    unsafe { imp::add_off(i64::from(area.off.get()), g, d) }
}

/// [`add_imm`] with a run-time delta (`get_many`/`put_many`). The commit is
/// `add [r], reg`, which on the measured cores waits for the previous store
/// to the slot: fine for bulk adjustments, use [`add_imm`] for ±1.
///
/// # Safety
///
/// As for [`add_imm`].
#[cfg_attr(not(percpu_ref_rseq), allow(dead_code))] // the counter's rseq path
#[inline(always)]
pub(crate) unsafe fn add(g: &Gate, d: i64) -> bool {
    // SAFETY: forwarded, as in `add_imm`.
    unsafe { imp::add(g, d) }
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)` on the rseq tier: on
/// return every restartable sequence that was in flight on any CPU has
/// either committed (visibly) or been aborted, and will re-read its gate.
/// The fallback is a `SeqCst` fence.
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
