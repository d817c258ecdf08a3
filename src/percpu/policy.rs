//! Release policies: what runs, exactly once, when a killed ref drains to
//! zero.
//!
//! | policy | runs where | runs when |
//! |---|---|---|
//! | any `Fn(&T)` | the thread that drops the last reference | immediately, inside that `put` |
//! | [`NoRelease`] | nowhere | never |
//! | [`Completion`] | signals on the dropping thread; waiters wake on theirs | immediately; waiters wake right after |
//! | [`Deferred`] (feature `epoch`) | a thread that later pins the epoch and collects garbage | after every thread pinned at drain time has unpinned |
//! | [`OnRayon`] (feature `rayon`) | a rayon worker thread | as soon as the pool schedules the job |
//!
//! "The thread that drops the last reference" is whichever thread's `put`
//! takes the count to zero; if no reference was outstanding at `kill`, it
//! is the killing thread, inside `kill`.

pub use super::completion::{Completion, CompletionFuture};
#[cfg(any(feature = "epoch", feature = "rayon"))]
use std::fmt;
#[cfg(any(feature = "epoch", feature = "rayon"))]
use std::sync::Arc;

/// What runs exactly once when a killed [`PercpuRef`](crate::PercpuRef)
/// drains to zero.
///
/// Implemented for every `Fn(&T)`, so a closure is a policy. Writing your
/// own takes a few lines:
///
/// ```
/// use percpu_ref::{PercpuRef, ReleasePolicy};
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// /// Counts releases in a shared counter.
/// struct CountReleases<'a>(&'a AtomicUsize);
///
/// impl<T> ReleasePolicy<T> for CountReleases<'_> {
///     fn release(&self, _value: &T) {
///         self.0.fetch_add(1, Ordering::SeqCst);
///     }
/// }
///
/// let released = AtomicUsize::new(0);
/// let r = PercpuRef::new("device", CountReleases(&released));
/// let held = r.tryget().unwrap();
/// r.kill().unwrap();
/// assert_eq!(released.load(Ordering::SeqCst), 0); // `held` is outstanding
/// drop(held);
/// assert_eq!(released.load(Ordering::SeqCst), 1);
/// ```
pub trait ReleasePolicy<T: ?Sized> {
    /// Called exactly once per kill, when the count of the killed ref
    /// reaches zero, on the thread whose `put` took it there.
    ///
    /// It must not block on references to the same ref being dropped (they
    /// are all gone) and should be quick: it runs inside someone's `put`.
    /// It may switch, kill, resurrect or reinit refs, this one included: it
    /// never runs under a lock of the crate. If it panics, the ref still
    /// counts the release as done (a `reinit` can follow), and the panic
    /// propagates out of the `put` (or `kill`) that ran it.
    fn release(&self, value: &T);

    /// Called by [`reinit`](crate::PercpuRef::reinit) (and a `resurrect`
    /// that reinitialises) before the ref's new life starts, after the
    /// previous life's release has returned. The default does nothing;
    /// [`Completion`] starts waiting for the new life.
    ///
    /// It runs under the ref's switch lock: it must not switch, kill or
    /// revive this ref.
    fn on_reinit(&self) {}
}

impl<T: ?Sized, F: Fn(&T)> ReleasePolicy<T> for F {
    fn release(&self, value: &T) {
        self(value)
    }
}

/// A policy that does nothing (the kernel's `percpu_ref` with a no-op
/// release). Useful when only [`is_zero`](crate::PercpuRef::is_zero) is
/// polled.
///
/// ```
/// use percpu_ref::{NoRelease, PercpuRef};
/// let r = PercpuRef::new(1u32, NoRelease);
/// r.kill().unwrap();
/// assert!(r.is_zero());
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoRelease;

impl<T: ?Sized> ReleasePolicy<T> for NoRelease {
    fn release(&self, _value: &T) {}
}

/// Release deferred through crossbeam-epoch (feature `epoch`): the release
/// function runs only after every thread that was pinned when the ref
/// drained has unpinned, so lock-free readers that found the object through
/// an epoch-protected pointer finish first.
///
/// The value is cloned into the deferred job (use an `Arc` for a cheap
/// clone), so the job stays valid even if the `PercpuRef` is dropped first.
/// The job runs on whichever thread later collects epoch garbage (any
/// `crossbeam_epoch::pin`), not necessarily soon: call
/// `crossbeam_epoch::pin().flush()` to push it along.
///
/// ```
/// # #[cfg(feature = "epoch")] {
/// use percpu_ref::{Deferred, PercpuRef};
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
///
/// static FREED: AtomicBool = AtomicBool::new(false);
/// let r = PercpuRef::new(Arc::new(5), Deferred::new(|_v: Arc<i32>| {
///     FREED.store(true, Ordering::SeqCst);
/// }));
/// r.kill().unwrap();
/// for _ in 0..1000 {
///     if FREED.load(Ordering::SeqCst) { break; }
///     crossbeam_epoch::pin().flush();
/// }
/// assert!(FREED.load(Ordering::SeqCst));
/// # }
/// ```
#[cfg(feature = "epoch")]
pub struct Deferred<F> {
    f: Arc<F>,
}

#[cfg(feature = "epoch")]
impl<F> Deferred<F> {
    /// Defer `f(value)` until the epoch advances past the drain.
    pub fn new(f: F) -> Self {
        Self { f: Arc::new(f) }
    }
}

#[cfg(feature = "epoch")]
impl<F> fmt::Debug for Deferred<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred").finish_non_exhaustive()
    }
}

#[cfg(feature = "epoch")]
impl<T, F> ReleasePolicy<T> for Deferred<F>
where
    T: Clone + Send + 'static,
    F: Fn(T) + Send + Sync + 'static,
{
    fn release(&self, value: &T) {
        let f = Arc::clone(&self.f);
        let value = value.clone();
        let guard = crossbeam_epoch::pin();
        guard.defer(move || f(value));
        guard.flush();
    }
}

/// Release on a rayon thread pool (feature `rayon`), so the last `put` on a
/// hot path only enqueues a job and never runs heavy work itself.
///
/// The value is cloned into the job (use an `Arc` for a cheap clone). The
/// job runs on a worker of the given pool, or of rayon's global pool.
///
/// ```
/// # #[cfg(feature = "rayon")] {
/// use percpu_ref::{Completion, OnRayon, PercpuRef};
/// use std::sync::Arc;
///
/// let done = Completion::new();
/// let signal = done.clone();
/// let r = PercpuRef::new(Arc::new("big"), OnRayon::new(move |_v: Arc<&str>| {
///     assert!(rayon::current_thread_index().is_some()); // on a worker
///     signal.complete();
/// }));
/// r.kill().unwrap();
/// done.wait();
/// # }
/// ```
#[cfg(feature = "rayon")]
pub struct OnRayon<F> {
    f: Arc<F>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

#[cfg(feature = "rayon")]
impl<F> OnRayon<F> {
    /// Run `f(value)` on rayon's global pool.
    pub fn new(f: F) -> Self {
        Self {
            f: Arc::new(f),
            pool: None,
        }
    }

    /// Run `f(value)` on `pool`.
    pub fn with_pool(pool: Arc<rayon::ThreadPool>, f: F) -> Self {
        Self {
            f: Arc::new(f),
            pool: Some(pool),
        }
    }
}

#[cfg(feature = "rayon")]
impl<F> fmt::Debug for OnRayon<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnRayon")
            .field("global_pool", &self.pool.is_none())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "rayon")]
impl<T, F> ReleasePolicy<T> for OnRayon<F>
where
    T: Clone + Send + 'static,
    F: Fn(T) + Send + Sync + 'static,
{
    fn release(&self, value: &T) {
        let f = Arc::clone(&self.f);
        let value = value.clone();
        match &self.pool {
            Some(pool) => pool.spawn(move || f(value)),
            None => rayon::spawn(move || f(value)),
        }
    }
}
