//! Long-form documentation: internals, the ordering argument, limitations.
//!
//! These pages contain no code; they explain why the code is right.

/// # Internals of `PercpuRef`
///
/// ## The header (32 bytes)
///
/// | bytes | field | what |
/// |---|---|---|
/// | 4 | `limit` | the rseq tier's gate: CPU rows while counting per CPU, 0 otherwise (read inside every restartable sequence) |
/// | 4 | `state` | flags (mode, dead, zero crossed, releasing, released, ...), the switch lock bit and the parked bit |
/// | 8 | `column` | the slot column while counting per CPU, null otherwise |
/// | 8 | `central` | the shared count (with a bias of 2⁶⁰ while a column counts) |
/// | 4 | `key` | portable tier: the key this ref's slots carry |
/// | 4 | `heat` | adaptive refs: contended updates of the shared count seen |
///
/// The value `T` and the policy `P` follow. A ref counting per CPU also
/// holds a *column*: one 8-byte slot per possible CPU in a process-wide
/// arena (one 128-byte row of slots per CPU, so no two CPUs write the same
/// cache line). Atomic and dead refs hold no column.
///
/// ## The count
///
/// ```text
/// count = central + Σ(slots of the open column) − (BIAS while a column counts)
/// ```
///
/// | step | effect on the sum |
/// |---|---|
/// | get/put that a slot accepts (rseq: the sequence found the gate open; portable: the slot carries the ref's key) | ±1, as wanted |
/// | get/put refused by the slot | 0 there — the adder repeats the ±1 on the central count |
/// | get/put on the central count | ±1, in any mode |
/// | switch to atomic: close the gate (rseq: `limit = 0` then `membarrier`; portable: null the column), then swap every slot to 0 | −v per slot, held in the switcher's local sum |
/// | fold: `central += sum − BIAS`, column given back | +sum, and the bias is gone |
/// | switch to percpu: `central += BIAS`, take a column, reset its slots, publish it, reopen the gate | 0 |
///
/// So **no stale view of the mode can lose or double a count**: where an
/// adder counts is decided by the same step that adds — the restartable
/// sequence reads the gate inside itself and `membarrier` restarts every
/// sequence in flight; a portable compare-exchange succeeds only on a slot
/// that carries the adder's own key.
///
/// ## Reusing columns at once
///
/// A column is given back as soon as it is folded, and another ref may take
/// it at once. On the rseq tier no sequence can be inside it any more (gate
/// closed, then `membarrier`). On the portable tier a thread may have read
/// the column pointer and be preempted before its compare-exchange for any
/// length of time; it finds either a drained slot (key 0), another ref's key
/// (refused: it counts on its own central count), or its own ref's key
/// again if that ref took the same column back — then it counts there,
/// which is where its ref counts now. Keys are unique among live refs and
/// kept until a ref is dropped, so no key can come back while such a thread
/// exists. The count field of a portable slot is modular (40 bits), so the
/// slots of a ref may drift apart without bound; their sum is exact while
/// fewer than 2³⁹ references are counted on them.
///
/// ## Zero and release: one per life
///
/// Zero is only reachable on the central count, after a fold or by
/// underflow. Within a life the central count starts above zero and moves
/// by read-modify-writes, so at most one RMW takes it from `> 0` to `<= 0`.
/// The thread that made it claims the release (`RELEASING`) with one RMW
/// of the state word if the ref is killed. A kill whose own put finds the
/// count already `<= 0` (it crossed while live — an underflow) claims under
/// the lock. So every killed life whose count is `<= 0` gets exactly one
/// claim. `reinit` waits until the release has *finished* (`RELEASED`), so
/// no claim of an old life lands on a new one and two releases never
/// overlap. A release claimed under the switch lock (by the kill's fold or
/// initial put) runs after the lock is released, so a release may switch,
/// kill or revive refs — its own included.
///
/// Orderings: puts that a slot accepts are `Release`; the fold's swaps are
/// `AcqRel`; the fold's central add and central puts are `AcqRel`. So every
/// holder's last use of the value happens-before the release, through either
/// the central count's release sequence or a slot → fold → central chain
/// (the same argument as `Arc`'s drop). loom checks this with the value
/// modelled as `UnsafeCell`s (`tests/loom_percpu.rs`).
///
/// ## `tryget_live` after a kill
///
/// `kill` sets `DEAD`, closes the gate (rseq: and runs `membarrier`), folds,
/// then runs the confirm callback, all under the switch lock. A
/// `tryget_live` that starts after the callback is refused by the slot (the
/// gate is closed, the key gone), synchronises with the closing (`Acquire`
/// fence pairing with the closing store or the drain's swap), reads `DEAD`
/// and fails. One racing the kill may succeed; its reference is counted and
/// the release waits for it. `resurrect`, `reinit` and mode switches wait
/// for the lock, so the callback always runs on a dead ref.
///
/// ## The switch lock
///
/// A state bit, not a mutex (the header stays at 32 bytes); waiters sleep
/// on one of 64 process-wide condition variables chosen by the ref's
/// address (`parking_lot`'s scheme), woken by any state change they may be
/// waiting for. It is held across `membarrier` and the confirm callback,
/// never across a release.
///
/// ## `PercpuArc` and `OwnedRef`
///
/// An `OwnedRef` is a raw pointer plus one count: taking, cloning and
/// dropping it is the same per-CPU add as a borrowed `Ref`. The allocation
/// is freed when the last `PercpuArc` handle is gone (which kills the ref)
/// **and** the release has finished — by whichever of the two happens last,
/// decided by read-modify-writes of the state word.
pub mod internals {}

/// # Limitations
///
/// * The count is an `i64` with a bias of 2⁶⁰; more than 2⁵⁹ references at
///   once are not supported. On the portable tier at most 2³⁹ references
///   may be counted on one ref's slots at once, and at most 2²⁴ − 1 live
///   refs that have counted per CPU at some point (each keeps a slot key
///   until it is dropped); beyond that, `switch_to_percpu` returns
///   `SwitchError::NoKey` and the ref stays atomic.
/// * Slot memory is never returned to the allocator: free columns are
///   reused, so slot memory is bounded by the peak number of refs counting
///   per CPU at once (8 bytes per possible CPU each).
/// * `is_zero` only answers `true` in atomic mode (per-CPU counts are not
///   summed on the fly), as in the kernel.
/// * Underflow in percpu mode is only detected when the slots are summed
///   (the next switch to atomic mode or kill).
/// * The confirm callback of `kill_and_confirm` runs on the killing thread,
///   under the ref's switch lock, before the initial reference is dropped.
/// * **`membarrier` failing after a successful registration aborts the
///   process.** The rseq tier registers `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ`
///   once; if a later call fails (e.g. a seccomp filter installed after the
///   registration forbids it), slots could no longer be folded safely, and
///   counting on would silently lose references, so the process aborts with
///   a message. Install seccomp filters before the first `PercpuRef` is
///   built, or set `PERCPU_REF_PORTABLE=1`.
/// * **The crate cannot be unloaded** (`dlclose` of a shared object that
///   contains it) while any thread may still be inside one of its
///   restartable sequences: the kernel keeps the thread's pointer to the
///   sequence's descriptor, which lives in the crate's static data. Rust
///   programs do not unload code in practice; plugins that do must stop
///   every thread using the crate first.
/// * **A file truncated under a live pool** (by another process, or by this
///   one) makes touching the pages past the new end raise `SIGBUS`, as for
///   any `mmap` of a file. The pool holds an advisory lock on the file, which
///   cooperating programs respect; nothing stops an uncooperative one. See
///   the pool's limitations (and its section on `fork()`).
pub mod limitations {}
