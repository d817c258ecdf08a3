//! Long-form documentation: internals, the ordering argument, limitations.
//!
//! These pages contain no code; they explain why the code is right.

/// # Internals of `PercpuRef`
///
/// ## The count
///
/// A ref has a state word, a central `i64` count and one 8-byte slot per
/// possible CPU (in a process-wide arena, one 128-byte row of slots per
/// CPU, so no two CPUs write the same cache line). Define
///
/// ```text
/// count = central + Σ(slots that are not drained) − (BIAS if the bias is present)
/// ```
///
/// The bias is present from the start of a switch to percpu mode (or
/// construction in percpu mode) until the fold of the next switch to atomic
/// mode. Every operation below keeps that sum equal to the number of
/// references:
///
/// | step | effect on the sum |
/// |---|---|
/// | get/put on a slot that is not drained | ±1, as wanted |
/// | get/put on a drained slot | 0 (drained slots do not count) — the adder sees the marker in the value its `fetch_add` returned and repeats the ±1 on the central count |
/// | get/put on the central count | ±1, in any mode |
/// | switch to atomic: `swap(slot, DRAINED)` | −v, held in the switcher's local sum |
/// | fold: `central += sum − BIAS` | +sum, and the bias is gone |
/// | switch to percpu: `central += BIAS` | 0, the bias is present again |
/// | reset: `swap(slot, 0)` on a drained slot | 0 |
///
/// So **no stale view of the mode can lose or double a count**: the mode
/// word only says where to try first, and the slot's read-modify-write tells
/// the truth about whether the slot still counts.
///
/// ## Zero and release
///
/// While the bias is present the central count is ≥ `BIAS − (puts that
/// landed there)`, far from zero; so zero is only reachable after a fold,
/// in atomic mode, when the central count *is* the count. A live ref holds
/// its initial reference, so zero on a live ref is an underflow (flagged,
/// never released). On a killed ref, the put that takes the central count
/// to zero claims `RELEASED` with one `fetch_or` and runs the policy: at
/// most once, even under underflow.
///
/// Orderings: puts on a slot are `Release`; the drain's swap is `AcqRel`;
/// the fold and central puts are `AcqRel`. So every holder's last use of the
/// value happens-before the release, through either the central count's
/// release sequence or a slot → fold → central chain (the same argument as
/// `Arc`'s drop).
///
/// ## `tryget_live` after a kill
///
/// `kill` sets `DEAD` (and `ATOMIC`), then drains the slots, then runs the
/// confirm callback. A `tryget_live` that starts after the callback (ordered
/// after it by some synchronisation) either
///
/// * reads `DEAD` from the state word and fails, or
/// * read a stale percpu mode — impossible for a call ordered after the
///   callback, but the code does not rely on that: its `fetch_add` on the
///   slot comes after the drain's swap in the slot's modification order, so
///   it sees the marker, issues an `Acquire` fence that synchronises with the
///   drain's `Release` swap, re-reads the state, sees `DEAD` and fails.
///
/// A `tryget_live` racing the kill itself may succeed; its reference is
/// then counted (before the fold, on a slot; or after it, on the central
/// count with `inc_not_zero`) and the release waits for it. A `tryget` (not
/// live) on a drained slot uses `inc_not_zero` on the central count, so it
/// can never resurrect a released ref.
///
/// ## Mode switches, kill and revive
///
/// These serialise on a mutex that `get`/`put` never touch. Switching to
/// percpu adds the bias *before* resetting the slots and clears `ATOMIC`
/// last, so a put that lands on the central count during the switch can
/// never see zero while slots hold uncounted gets. `resurrect` takes its new
/// initial reference with `inc_not_zero`: if the final put got there first,
/// the ref is released and only `reinit` (with `allow_reinit`) may follow;
/// `reinit` waits for that put's `RELEASED` claim so the release can never
/// be skipped or run against the revived state.
///
/// ## What loom checks
///
/// `tests/loom_percpu.rs` models, exhaustively up to three preemptions, with
/// every call of a thread landing on the next of two slots (migration):
/// get/put vs kill, two putters vs kill, `tryget_live` vs
/// `kill_and_confirm`, switches in both directions under concurrent get/put,
/// and resurrect vs the final put. Removing the marker check makes four of
/// the six models fail.
pub mod internals {}

/// # Limitations
///
/// * The count is an `i64` with a bias of 2⁶⁰; more than 2⁵⁹ references at
///   once are not supported.
/// * Slot memory is never returned to the allocator; it is recycled for new
///   refs, so memory is bounded by the peak number of live refs (8 bytes per
///   possible CPU each).
/// * `is_zero` only answers `true` in atomic mode (percpu counts are not
///   summed on the fly), as in the kernel.
/// * Underflow in percpu mode is only detected when the slots are summed
///   (the next switch to atomic mode or kill).
/// * The confirm callback of `kill_and_confirm` runs on the killing thread,
///   inside the call, before the initial reference is dropped.
/// * Truncating the file under a live `DevicePagePool` raises `SIGBUS` on
///   the next access to a page past the new end; see the pool's
///   limitations (and its section on `fork()`).
pub mod limitations {}
