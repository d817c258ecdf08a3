//! [`Builder`]: the initial state of a [`PercpuRef`].

use super::arc::PercpuArc;
use super::counter::{Gate, PercpuRef};
use super::policy::{NoRelease, ReleasePolicy};
use super::state::*;
use crate::sync::{AtomicI64, AtomicU32};

/// Builder for a [`PercpuRef`] or [`PercpuArc`]; see [`PercpuRef::builder`].
///
/// Every flag is a method without arguments that turns the behaviour on
/// (the kernel's `PERCPU_REF_INIT_*` flags).
#[derive(Debug)]
#[must_use = "a builder does nothing until .build()"]
pub struct Builder<T, P = NoRelease> {
    value: T,
    policy: P,
    atomic: bool,
    dead: bool,
    allow_reinit: bool,
    portable: bool,
    adaptive: bool,
}

impl<T> PercpuRef<T, NoRelease> {
    /// Start building a ref around `value` (percpu mode, live, count 1,
    /// [`NoRelease`] until [`Builder::release`] sets a policy).
    ///
    /// ```
    /// use percpu_ref::{Completion, Mode, PercpuRef};
    /// let done = Completion::new();
    /// let r = PercpuRef::builder(0u64).release(done.clone()).atomic().build();
    /// assert_eq!(r.mode(), Mode::Atomic);
    /// r.kill().unwrap();
    /// assert!(done.is_complete());
    /// ```
    pub fn builder(value: T) -> Builder<T, NoRelease> {
        Builder {
            value,
            policy: NoRelease,
            atomic: false,
            dead: false,
            allow_reinit: false,
            portable: false,
            adaptive: false,
        }
    }
}

impl<T, P: ReleasePolicy<T>> PercpuRef<T, P> {
    /// A live ref in percpu mode holding its initial reference
    /// (`percpu_ref_init`).
    #[doc(alias = "percpu_ref_init")]
    pub fn new(value: T, policy: P) -> Self {
        PercpuRef::builder(value).release(policy).build()
    }
}

impl<T, P> Builder<T, P> {
    /// Set the release policy.
    pub fn release<Q: ReleasePolicy<T>>(self, policy: Q) -> Builder<T, Q> {
        Builder {
            value: self.value,
            policy,
            atomic: self.atomic,
            dead: self.dead,
            allow_reinit: self.allow_reinit,
            portable: self.portable,
            adaptive: self.adaptive,
        }
    }

    /// Start in atomic mode (the kernel's `PERCPU_REF_INIT_ATOMIC`); it
    /// stays atomic across `resurrect`/`reinit` until
    /// [`switch_to_percpu`](PercpuRef::switch_to_percpu). An atomic ref
    /// holds no per-CPU slots.
    #[doc(alias = "PERCPU_REF_INIT_ATOMIC")]
    pub fn atomic(mut self) -> Self {
        self.atomic = true;
        self
    }

    /// Start dead with a count of zero (`PERCPU_REF_INIT_DEAD`): no
    /// reference can be taken until [`reinit`](PercpuRef::reinit). Implies
    /// [`allow_reinit`](Self::allow_reinit). The release does not run for
    /// this initial state.
    #[doc(alias = "PERCPU_REF_INIT_DEAD")]
    pub fn dead(mut self) -> Self {
        self.dead = true;
        self.allow_reinit = true;
        self
    }

    /// Permit [`reinit`](PercpuRef::reinit) (and `resurrect`) after the ref
    /// was released (`PERCPU_REF_ALLOW_REINIT`).
    #[doc(alias = "PERCPU_REF_ALLOW_REINIT")]
    pub fn allow_reinit(mut self) -> Self {
        self.allow_reinit = true;
        self
    }

    /// Use the portable tier even where the rseq tier is available (the
    /// environment variable `PERCPU_REF_PORTABLE=1` does this for every
    /// ref of the process).
    pub fn portable(mut self) -> Self {
        self.portable = true;
        self
    }

    /// Start in atomic mode, holding no per-CPU slots, and switch to
    /// percpu mode by itself once updates of the shared count are seen to
    /// contend (a compare-exchange that found the count changed, 64 times).
    /// For programs with many refs of which few are hot at a time: the
    /// cold ones cost only their header. Each life starts atomic again;
    /// [`switch_to_atomic`](PercpuRef::switch_to_atomic) pins it atomic.
    /// Ignored with [`atomic`](Self::atomic).
    pub fn adaptive(mut self) -> Self {
        self.adaptive = true;
        self
    }
}

impl<T, P: ReleasePolicy<T>> Builder<T, P> {
    /// Build the ref. If it should count per CPU but no slot column can be
    /// had, it starts atomic (see
    /// [`switch_to_percpu`](PercpuRef::switch_to_percpu)).
    #[doc(alias = "percpu_ref_init")]
    pub fn build(self) -> PercpuRef<T, P> {
        let mut state = ATOMIC;
        if self.portable || !crate::sys::rseq::rseq_available() {
            state |= PORTABLE;
        }
        if self.atomic {
            state |= FORCE_ATOMIC;
        } else if self.adaptive {
            state |= ADAPTIVE;
        }
        if self.dead {
            state |= DEAD | RELEASED;
        }
        if self.allow_reinit {
            state |= ALLOW_REINIT;
        }
        let r = PercpuRef {
            gate: Gate::new(state),
            central: AtomicI64::new(if self.dead { 0 } else { 1 }),
            key: AtomicU32::new(0),
            heat: AtomicU32::new(0),
            #[cfg(not(percpu_ref_untracked))]
            tracker: super::track::Tracker::new(),
            value: self.value,
            policy: self.policy,
        };
        if state & (FORCE_ATOMIC | ADAPTIVE | DEAD) == 0 {
            // Not shared yet: no lock needed. On failure it stays atomic.
            let _ = r.open_column();
        }
        r
    }

    /// Build the ref into a [`PercpuArc`], whose owned references scale.
    #[doc(alias = "percpu_ref_init")]
    pub fn build_arc(self) -> PercpuArc<T, P> {
        PercpuArc::from_builder(self)
    }
}
