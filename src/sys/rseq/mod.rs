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
//! # The frame
//!
//! Every sequence of both architectures is one `asm!` block built by the
//! architecture's `rseq_asm!` macro around the same frame and local labels:
//!
//! | label | what |
//! |---|---|
//! | `2:` | arm: store the address of this copy's descriptor to `rseq->rseq_cs` (the abort handler comes back here: the kernel cleared it) |
//! | `4:` | `start_ip`: the body reads the CPU id, its gate, and so on |
//! | `5:` | `post_commit_ip`, right after the body's last instruction, the single commit |
//! | `6:` | out of line: the refusal exit; sets the result register to 0, back to `5:` |
//! | `7:` | out of line, after the 4-byte `RSEQ_SIG`: `abort_ip`, back to `2:` |
//! | `3:` | the descriptor `{ 0, 0, 4b, 5b - 4b, 7b }` in `__rseq_cs` (writable: the absolute addresses need dynamic relocations in a PIE) |
//!
//! Bodies use the labels `20:` and up. Each inlined copy of a sequence
//! assembles its own labels and descriptor. The result comes back in a
//! register that is never 0 after a commit (the row address), so no flag
//! is set and tested around the sequence.
//!
//! # The counter sequence
//!
//! x86_64:
//!
//! ```text
//!   2:  lea   r, [rip + DESC]           ; (re)arm: the abort handler jumps here
//!       mov   fs:[off + 8], r           ; rseq->rseq_cs = &DESC
//!   4:  mov   r32, fs:[off + 4]         ; start: r = rseq->cpu_id
//!       cmp   r32, dword [gate]         ; gate->limit: gate, bound and tier at once
//!       jae   6f                        ; closed (0), id too big, or unregistered (-1/-2)
//!       shl   r, 7                      ; r = cpu * ROW_STRIDE
//!       add   r, qword [gate + 8]       ; r += gate->column (row address, base only)
//!       add   qword [r], D              ; COMMIT: the single last instruction
//!   5:                                  ; post-commit; r != 0 says "added"
//!   (__rseq_failure section)
//!   6:  xor   r32, r32 ; jmp 5b         ; refused: r = 0
//!       .long RSEQ_SIG                  ; (inside a `ud1` encoding)
//!   7:  jmp   2b                        ; abort: re-arm, restart from the top
//!   (__rseq_cs) DESC = { 0, 0, 4b, 5b - 4b, 7b }
//! ```
//!
//! The commit has a base-only address and an immediate operand: on the
//! Intel cores measured this is the only form of a memory add that does not
//! wait for the previous store to the same slot (a get and its put hit the
//! same slot), see DESIGN.md §4. `off` is `__rseq_offset`, one load of a
//! static, or a register with [`add_imm_in`] (`glibc.rs` says how the
//! static is addressed). `asm goto` (Rust 1.87, above this crate's MSRV
//! 1.86) would save only the `test`/`jz` the caller does on `r`.
//!
//! aarch64 (a get as compiled, `sxtw` of the area token and the caller's
//! `cbz` included; `x19` holds the gate, `w20` the token):
//!
//! ```text
//!       sxtw  x8, w20                   ; off
//!       mrs   x9, tpidr_el0             ; the thread pointer: fixed for the thread
//!       add   x9, x9, x8                ; x9 = &struct rseq
//!   2:  adrp  x10, DESC                 ; (re)arm
//!       add   x10, x10, :lo12:DESC
//!       str   x10, [x9, #8]             ; rseq->rseq_cs = &DESC
//!   4:  ldr   w10, [x9, #4]             ; start: cpu_id
//!       ldar  w11, [x19]                ; gate->limit, Acquire
//!       cmp   w10, w11
//!       b.hs  6f                        ; closed (0), id too big, or -1/-2
//!       ldr   x11, [x19, #8]            ; gate->column (after the ldar)
//!       add   x10, x11, x10, lsl #7     ; row address
//!       ldr   x11, [x10]                ; the slot
//!       add   x11, x11, #1              ; (a put: sub #1)
//!       str   x11, [x10]                ; COMMIT: the single last instruction
//!   5:  cbz   x10, slow                 ; the caller: refused?
//!   (subsection 1: the end of the function's own section)
//!   6:  mov   x10, xzr ; b 5b           ; refused
//!       brk   #0x45e0                   ; RSEQ_SIG 0xd428bc00
//!   7:  b     2b                        ; abort
//! ```
//!
//! The out-of-line code goes to the end of the function's own section,
//! not to a section of its own as on x86_64: an aarch64 conditional branch
//! reaches only ±1 MiB, less than the distance between sections in a test
//! binary.
//!
//! # Why an add is neither lost nor doubled
//!
//! The kernel guarantees: whenever a thread is preempted, migrated, or
//! handed a signal, then before it next runs user code, if its instruction
//! pointer is in `[start, post)` of the descriptor in `rseq->rseq_cs`, the
//! pointer is moved to `abort` (which must follow the registered 4-byte
//! signature), and `rseq_cs` is cleared. Hence:
//!
//! 1. *The CPU id is right at the commit.* `cpu_id` is read inside the
//!    range. If the thread moves to another CPU at any point after that read
//!    and before the commit, it was preempted inside the range and is sent to
//!    `abort`, which re-arms the descriptor and reads `cpu_id` again. So
//!    when the commit executes, it executes on CPU `cpu`.
//! 2. *Nobody else writes the slot during the add.* Row `cpu` of a column is
//!    written only by commits executing on CPU `cpu` (1), one thread at a
//!    time, and by the owner only while the gate is closed and fenced
//!    (below). Another thread can run on that CPU only after ours was
//!    preempted; if that happened before our commit, we were inside the
//!    range and abort. So the non-atomic read-modify-write (`add [r], D` on
//!    x86_64; `ldr`/`add`/`str` on aarch64, all three inside the range) is
//!    never interleaved with another write of the slot: interrupts and
//!    preemption happen at instruction boundaries (both architectures take
//!    exceptions precisely). A restart re-reads the slot; a value loaded
//!    before an abort is never stored.
//! 3. *Exactly once.* The commit is the single last instruction of the range
//!    and `post` is the address right after it. An interruption either
//!    arrives before the commit retires (IP in range: abort, restart, the add
//!    has not happened and happens once on the retry) or after it (IP =
//!    `post`, outside the range: no abort, the add happened once and is
//!    never repeated). There is no state in between. A fault *on* the
//!    commit (a page fault of the slot) reports the commit's own address
//!    with nothing written: the commit runs again, or, if the fault slept
//!    (a preemption), the sequence aborts and restarts; once either way.
//! 4. *Signals, including handlers that take references.* Signal delivery
//!    is one of the events above: the interrupted sequence is moved to
//!    `abort` (and `rseq_cs` cleared) *before* the handler runs. A handler
//!    that adds arms the descriptor itself, and its own sequence is exact by
//!    1–3 (a nested signal aborts it the same way). When the handler
//!    returns, `sigreturn` resumes the interrupted code at `abort`, which
//!    re-arms and restarts: the interrupted add had not happened, and
//!    happens once.
//! 5. *A stale descriptor is harmless.* `rseq_cs` is re-armed at the start
//!    of every attempt, and a descriptor left behind after `post` or the
//!    early exit only matches IPs inside its own sequence, which the thread
//!    is no longer in. Every inlined copy of a sequence has its own
//!    descriptor.
//! 6. *Never torn.* The commit writes the whole aligned 8-byte slot in one
//!    instruction, single-copy atomic on both architectures, so a
//!    concurrent atomic load of the slot (an owner's snapshot, a sum) sees
//!    the value before or after the add, never a mix.
//!
//! # The gate and the column: why nothing is in flight after the fence
//!
//! [`Gate::limit`] is the number of CPU rows while the column is open and 0
//! while it is closed; [`Gate::column`] is only meaningful while it is open.
//! The owner follows this protocol:
//!
//! * **close**: store `limit = 0` (`SeqCst` or `Release`), then call
//!   [`fence_all_cpus`], i.e. `membarrier(PRIVATE_EXPEDITED_RSEQ)`. Only then
//!   read, swap or zero the slots, or take the column away.
//! * **open**: make the column's slots hold their starting values and store
//!   the column pointer, *then* store `limit = rows` with `Release`.
//!
//! Consider any sequence of this process when the fence runs. If its thread
//! is running on some CPU, the kernel interrupts that CPU (IPI), runs a full
//! memory barrier there (`smp_mb()`, a `dmb ish` on arm64) and marks the
//! thread for an rseq check, so before it returns to user space its IP is
//! checked: inside the range it aborts and restarts; past `post` the commit
//! already retired, and the barrier orders it, with everything the thread
//! did before it, before the owner's accesses after the fence. The syscall
//! returns after every IPI was handled, and has full barriers at its own
//! entry and exit. If its thread is not running and was inside a sequence,
//! it was preempted there (a sequence makes no syscalls), so it aborts
//! before it runs user code again; the context switches give the full
//! barriers. This is the guarantee `membarrier(2)` documents for every
//! architecture; nothing in it is x86-specific.
//!
//! A restarted (or new) sequence reads `limit` *inside* the range after the
//! fence; the owner's store precedes the fence (the syscall's entry barrier
//! orders it before the IPIs), so that read sees 0 and the sequence
//! refuses. Hence once `fence_all_cpus()` returns no slot of the column
//! changes until the gate opens again: the owner may read, swap, zero or
//! reassign them. This is why `limit` *and* `column` must be read inside
//! the sequence: with either read before `start`, a thread preempted
//! between that read and `start` is not aborted, and later commits to a
//! column the owner has closed, harvested or handed to another ref.
//!
//! Opening has no fence, so the loads of a sequence must be ordered by
//! themselves. The sequence reads `limit`, then `column`, then the slot, and
//! must see, once it reads the new non-zero `limit`, the column pointer and
//! the slot values the owner stored before its `Release` store of the
//! limit:
//!
//! * x86_64 keeps loads ordered with loads and stores after loads (TSO):
//!   the plain `cmp` with `limit` is enough.
//! * arm64 does not: it may satisfy the `column` load before the `limit`
//!   load (they are independent; the `b.hs` between them is a control
//!   dependency, which does not order loads), so a sequence could pair the
//!   new limit with the previous column, one the owner has harvested or
//!   handed to another ref. The limit is therefore read with `ldar`
//!   (Acquire, pairing with the owner's `Release` store): no later load or
//!   store of the sequence is performed before it. The slot load depends on
//!   the column through its address, which arm64 orders as well, and the
//!   commit `str` comes after the `ldar` in program order, so it is ordered
//!   after the owner's reset of the slot. (`ldar` waits only for earlier
//!   `stlr`s, and a sequence has none; an `ldr` plus an artificial address
//!   dependency would do as well, at two more instructions.)
//!
//! A sequence that read the *old* non-zero limit before a close is still
//! inside its range when the close's fence runs, so it aborts and re-reads
//! everything.
//!
//! The arming store of `rseq_cs` needs no barrier: only the kernel reads
//! it, on the thread's own CPU while handling an exception of that thread,
//! and a CPU sees its own earlier stores.
//!
//! The same reasoning covers [`CpuStacks`], whose per-CPU gate is read
//! inside each of its sequences before anything else of the row (with
//! `ldar` on aarch64); see `stack.rs`.
//!
//! # What the emulated arm64 guest can and cannot show
//!
//! The aarch64 sequences run the chaos tests (`tests.rs`) in a QEMU guest
//! (`scripts/arm64-vm.sh`, TCG on an x86_64 host). TCG performs the guest's
//! loads and stores as host loads and stores, which the x86 host keeps in
//! TSO order, so no reordering that arm64 hardware allows happens there: a
//! missing `ldar` passes every test in the guest (`tests.rs` records that
//! mutant too). The barrier argument above is what covers it. The guest
//! does show what is not about the memory model: the arming, the
//! descriptor, the signature, the commit being last, what is read inside
//! the range, and `membarrier`.
//!
//! # Other architectures
//!
//! A port adds `<arch>.rs` next to `x86_64.rs` and `aarch64.rs` with the
//! same functions (see the `imp` list below), extends `percpu_ref_rseq` in
//! `build.rs`, and checks the argument above against its memory model:
//! every gate read must be ordered before the row's other loads, the
//! commit must be one store instruction, last in the range, and the
//! signature is that architecture's `RSEQ_SIG` as glibc registers it.

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
