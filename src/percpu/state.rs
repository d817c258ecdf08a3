//! The state word of a `PercpuRef` and the constants of the counting scheme.
//!
//! ```text
//!  bit            set by                         cleared by
//!  ATOMIC         switch_to_atomic, kill         switch_to_percpu, resurrect, reinit
//!  DEAD           kill, builder .dead()          resurrect, reinit
//!  RELEASED       the put that drains a killed   reinit
//!                 ref to zero (claims release)
//!  FORCE_ATOMIC   switch_to_atomic, .atomic()    switch_to_percpu
//!  ALLOW_REINIT   .allow_reinit(), .dead()       never
//!  UNDERFLOW      a put or a fold that took the  never (sticky diagnostic)
//!                 count below zero
//!  PORTABLE       build (forced, or no rseq)     never: the tier is per ref
//!
//!  state          ATOMIC DEAD RELEASED   count lives in
//!  percpu-live      0     0      0       central (with BIAS) + slots
//!  atomic-live      1     0      0       central
//!  dying            1     1      0       central (> 0)
//!  released         1     1      1       central (== 0)
//! ```

/// Counting goes to the central count; slots are drained.
pub(crate) const ATOMIC: usize = 1 << 0;
/// Killed: `tryget_live` fails.
pub(crate) const DEAD: usize = 1 << 1;
/// The count of a killed ref reached zero and release was claimed.
pub(crate) const RELEASED: usize = 1 << 2;
/// The user asked for atomic mode; `resurrect`/`reinit` stay atomic.
pub(crate) const FORCE_ATOMIC: usize = 1 << 3;
/// `reinit` is permitted.
pub(crate) const ALLOW_REINIT: usize = 1 << 4;
/// More puts than gets were seen.
pub(crate) const UNDERFLOW: usize = 1 << 5;
/// This ref counts with atomic `fetch_add` on its slots (the portable
/// tier); clear: with the rseq tier's plain adds.
pub(crate) const PORTABLE: usize = 1 << 6;

/// Added to the central count while in percpu mode (as the kernel's
/// `PERCPU_COUNT_BIAS`): the true count is `central - BIAS + Σ slots`, and
/// puts that land on the central count during a switch can never take it to
/// zero before the slots are folded in.
pub(crate) const BIAS: i64 = 1 << 60;

/// A drained slot holds this value (plus the deltas of late adders). Any
/// slot value at or below `DRAINED / 2` means "drained".
pub(crate) const DRAINED: i64 = i64::MIN / 2;

/// Did a slot read-modify-write find the slot drained?
#[inline(always)]
pub(crate) fn is_drained(v: i64) -> bool {
    v <= DRAINED / 2
}
