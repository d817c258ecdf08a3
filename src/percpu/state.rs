//! The state word of a `PercpuRef` and the constants of the counting scheme.
//!
//! ```text
//!  bit            set by                               cleared by
//!  ATOMIC         switch_to_atomic, kill, build        switch_to_percpu, revive
//!  DEAD           kill, builder .dead()                resurrect, reinit
//!  RELEASING      the claim of this life's release:    finish_release
//!                 the put (or fold) whose RMW took
//!                 the count from > 0 to <= 0, or the
//!                 kill whose put found it <= 0
//!  RELEASED       finish_release (the release          reinit, resurrect
//!                 returned or panicked), .dead()
//!  FORCE_ATOMIC   switch_to_atomic, .atomic()          switch_to_percpu
//!  ALLOW_REINIT   .allow_reinit(), .dead()             never
//!  UNDERFLOW      a put or fold that took the count    never (sticky diagnostic)
//!                 below zero, or to zero while live
//!  PORTABLE       build (forced, or no rseq)           never: the tier is per ref
//!  ADAPTIVE       .adaptive()                          never
//!  IN_ARC         PercpuArc::new                       never
//!  ORPHANED       the last PercpuArc handle dropped    never
//!  LOCKED         lock()                               unlock()
//!  PARKED         a thread waiting on this word        the waker
//!
//!  life state     ATOMIC DEAD RELEASING RELEASED   count lives in
//!  percpu-live      0     0      0        0       central (+ BIAS) + column
//!  atomic-live      1     0      0        0       central
//!  dying            1     1      0        0       central (> 0)
//!  releasing        1     1      1        0       central (<= 0), release running
//!  released         1     1      0        1       central (<= 0)
//! ```
//!
//! Every write to the word is a read-modify-write, so no update is lost and
//! each RMW reads the latest value (two claims of one release cannot both
//! win).

/// Counting goes to the central count; the ref holds no column.
pub(crate) const ATOMIC: u32 = 1 << 0;
/// Killed: `tryget_live` fails.
pub(crate) const DEAD: u32 = 1 << 1;
/// This life's release was claimed and is running.
pub(crate) const RELEASING: u32 = 1 << 2;
/// This life's release ran (or the ref was built dead).
pub(crate) const RELEASED: u32 = 1 << 3;
/// The user asked for atomic mode; `resurrect`/`reinit` stay atomic.
pub(crate) const FORCE_ATOMIC: u32 = 1 << 4;
/// `reinit` is permitted.
pub(crate) const ALLOW_REINIT: u32 = 1 << 5;
/// More puts than gets were seen.
pub(crate) const UNDERFLOW: u32 = 1 << 6;
/// This ref counts with atomic compare-exchanges on its slots (the portable
/// tier); clear: with the rseq tier's plain adds.
pub(crate) const PORTABLE: u32 = 1 << 7;
/// Starts atomic and promotes itself to percpu under contention.
pub(crate) const ADAPTIVE: u32 = 1 << 8;
/// The ref lives inside a `PercpuArc` allocation.
pub(crate) const IN_ARC: u32 = 1 << 9;
/// Every `PercpuArc` handle is gone: nobody can revive the ref, and the
/// allocation is freed when the release has finished.
pub(crate) const ORPHANED: u32 = 1 << 10;
/// The switch lock (mode switches, kill, revive).
pub(crate) const LOCKED: u32 = 1 << 11;
/// Some thread sleeps until this word changes (see `lock.rs`).
pub(crate) const PARKED: u32 = 1 << 12;

/// Added to the central count while the ref counts on a column (as the
/// kernel's `PERCPU_COUNT_BIAS`): the true count is `central - BIAS + Σ
/// slots`, and puts that land on the central count during a switch can
/// never take it to zero before the slots are folded in.
pub(crate) const BIAS: i64 = 1 << 60;
