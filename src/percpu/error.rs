//! Typed errors of the `PercpuRef` state machine.

use thiserror::Error;

/// Why [`kill`](crate::PercpuRef::kill) failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KillError {
    /// The ref was already killed (or built with `.dead()`); nothing changed.
    #[error("percpu_ref already killed: a second kill would drop the initial reference twice")]
    AlreadyDead,
    /// The ref is now killed, but summing its count found more puts than
    /// gets: some user called `put_many` without a matching get.
    #[error("percpu_ref killed, but its count summed to {count} (more puts than gets)")]
    Underflow {
        /// The count found when the per-CPU slots were summed.
        count: i64,
    },
}

/// Why [`resurrect`](crate::PercpuRef::resurrect) or
/// [`reinit`](crate::PercpuRef::reinit) failed. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReviveError {
    /// The ref is live: it was never killed, or was already revived.
    #[error("percpu_ref is live: only a killed ref can be revived")]
    Live,
    /// The ref was released (its count drained to zero) and was not built
    /// with `.allow_reinit()`.
    #[error("percpu_ref was released and reinit is not allowed (build it with .allow_reinit())")]
    ReinitNotAllowed,
    /// `reinit` needs a released ref, but this one is still dying: its
    /// count has not drained to zero yet.
    #[error(
        "percpu_ref is dying with references outstanding: reinit needs it drained (use resurrect)"
    )]
    NotDrained,
    /// Every [`PercpuArc`](crate::PercpuArc) handle to the ref is gone:
    /// nobody owns it any more, so it must not come back to life (its
    /// memory is freed once it drains).
    #[error(
        "percpu_ref has no owner left (every PercpuArc handle was dropped): it cannot be revived"
    )]
    Orphaned,
}

/// The count of a ref went below zero: more puts than gets through the raw
/// API. Returned by [`PercpuRef::check`](crate::PercpuRef::check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("percpu_ref underflow: more puts than gets were made through the raw API")]
pub struct Underflow;

/// Why [`switch_to_percpu`](crate::PercpuRef::switch_to_percpu) could not
/// make a ref count per CPU. The ref stays in atomic mode, where every
/// operation keeps working (only slower under contention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// The slot arena could not grow: allocating a chunk of per-CPU slots
    /// failed.
    #[error("percpu_ref stays atomic: no per-CPU slot column of {bytes} bytes could be allocated")]
    NoSlots {
        /// Bytes one column needs (8 per possible CPU).
        bytes: usize,
    },
    /// Portable tier only: every slot key (2^24 - 1 of them) is held by a
    /// live ref that once counted per CPU.
    #[error("percpu_ref stays atomic: all 16777215 portable-tier slot keys are held by live refs")]
    NoKey,
}
