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
}

/// The count of a ref went below zero: more puts than gets through the raw
/// API. Returned by [`PercpuRef::check`](crate::PercpuRef::check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("percpu_ref underflow: more puts than gets were made through the raw API")]
pub struct Underflow;
