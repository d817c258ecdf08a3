//! [`Completion`]: the release policy you wait on.
//!
//! A completion counts *lives*: `complete()` marks the current life done,
//! and a `reinit` of the ref it belongs to (through
//! [`ReleasePolicy::on_reinit`]) starts the next one. A waiter waits for
//! the life that was current when it started waiting, so a waiter woken by
//! the release of life *n* never goes back to sleep because life *n + 1*
//! began before it ran.
//!
//! Each future registers its own waker slot: re-polling replaces the waker
//! in place, and dropping the future removes it, so abandoned waits (a
//! timed-out request) leave nothing behind.

use super::policy::ReleasePolicy;
use crate::sync::{lock, wait, Arc, Condvar, Mutex, MutexGuard};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A policy that signals a completion: `kill` now, then [`wait`] (blocking),
/// [`wait_timeout`], or `.await` [`wait_async`] until the last reference is
/// gone — the synchronous "kill and wait".
///
/// Clones share one completion: keep one, give one to the ref. Across a
/// [`reinit`](crate::PercpuRef::reinit) it follows the ref: afterwards
/// `wait()` waits for the new life to drain (no manual [`reset`] needed).
///
/// ```
/// use percpu_ref::{Completion, PercpuRef};
/// use std::time::Duration;
///
/// let done = Completion::new();
/// let r = PercpuRef::builder(vec![1, 2, 3]).release(done.clone()).allow_reinit().build();
/// let held = r.tryget().unwrap();
/// r.kill().unwrap();
/// assert!(!done.wait_timeout(Duration::from_millis(1))); // `held` is out
/// std::thread::scope(|s| {
///     s.spawn(move || drop(held));
///     done.wait();
/// });
/// assert!(done.is_complete());
///
/// r.reinit().unwrap(); // a new life: not complete until it drains
/// assert!(!done.is_complete());
/// r.kill().unwrap();
/// assert!(done.is_complete());
/// ```
///
/// [`wait`]: Completion::wait
/// [`wait_timeout`]: Completion::wait_timeout
/// [`wait_async`]: Completion::wait_async
/// [`reset`]: Completion::reset
#[derive(Clone)]
pub struct Completion {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    cond: Condvar,
}

struct State {
    /// The current life (0-based).
    life: u64,
    /// Lives completed: life `n` is complete iff `n < completed`.
    completed: u64,
    /// One slot per registered future; `None` after a wake or a drop.
    wakers: Vec<Option<Waker>>,
    /// Free slots of `wakers`.
    free: Vec<usize>,
}

impl Default for Completion {
    fn default() -> Self {
        Completion {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    life: 0,
                    completed: 0,
                    wakers: Vec::new(),
                    free: Vec::new(),
                }),
                cond: Condvar::new(),
            }),
        }
    }
}

impl Completion {
    /// A new, not yet complete, completion.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Mark the current life complete and wake every waiter (what
    /// `release` does).
    pub fn complete(&self) {
        let wakers: Vec<Waker> = {
            let mut st = self.state();
            st.completed = st.life + 1;
            // Slots stay allocated (their futures still own them) but empty.
            st.wakers.iter_mut().filter_map(Option::take).collect()
        };
        self.inner.cond.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    /// Has the current life completed (its release run)?
    pub fn is_complete(&self) -> bool {
        let st = self.state();
        st.completed > st.life
    }

    /// Start a new life if the current one is complete (what a `reinit` of
    /// the ref does through [`ReleasePolicy::on_reinit`]); for a completion
    /// shared by hand between several kills.
    pub fn reset(&self) {
        let mut st = self.state();
        if st.completed > st.life {
            st.life += 1;
        }
    }

    /// Block until the current life is complete.
    pub fn wait(&self) {
        let mut st = self.state();
        let life = st.life;
        while st.completed <= life {
            st = wait(&self.inner.cond, st);
        }
    }

    /// Block until the current life is complete or `timeout` passed;
    /// `true` if complete.
    #[must_use = "false means the wait timed out"]
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.state();
        let life = st.life;
        while st.completed <= life {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
                // A timeout too large to represent: wait without one.
                None => Duration::from_secs(3600),
            };
            st = self.wait_for(st, left);
        }
        true
    }

    #[cfg(not(percpu_ref_model))]
    fn wait_for<'a>(&'a self, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.inner
            .cond
            .wait_timeout(st, d)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Models have no clock: a timed wait is a wait that may return early.
    #[cfg(percpu_ref_model)]
    fn wait_for<'a>(&'a self, st: MutexGuard<'a, State>, _d: Duration) -> MutexGuard<'a, State> {
        drop(st);
        crate::sync::model_yield();
        self.state()
    }

    /// A future that resolves when the current life is complete. Works
    /// with any executor; needs no runtime.
    pub fn wait_async(&self) -> CompletionFuture {
        CompletionFuture {
            life: self.state().life,
            completion: self.clone(),
            slot: None,
        }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("Completion")
            .field("complete", &(st.completed > st.life))
            .field("lives_completed", &st.completed)
            .finish()
    }
}

impl<T: ?Sized> ReleasePolicy<T> for Completion {
    fn release(&self, _value: &T) {
        self.complete();
    }

    fn on_reinit(&self) {
        self.reset();
    }
}

/// Future returned by [`Completion::wait_async`]. Dropping it removes its
/// waker from the completion.
#[must_use = "futures do nothing unless polled"]
pub struct CompletionFuture {
    completion: Completion,
    /// The life it waits for.
    life: u64,
    /// Its waker slot, once registered.
    slot: Option<usize>,
}

impl Future for CompletionFuture {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut st = this.completion.state();
        if st.completed > this.life {
            if let Some(i) = this.slot.take() {
                st.wakers[i] = None;
                st.free.push(i);
            }
            return Poll::Ready(());
        }
        match this.slot {
            Some(i) => match &mut st.wakers[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            },
            None => {
                let w = Some(cx.waker().clone());
                let i = match st.free.pop() {
                    Some(i) => {
                        st.wakers[i] = w;
                        i
                    }
                    None => {
                        st.wakers.push(w);
                        st.wakers.len() - 1
                    }
                };
                this.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for CompletionFuture {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            let mut st = self.completion.state();
            st.wakers[i] = None;
            st.free.push(i);
        }
    }
}

impl fmt::Debug for CompletionFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionFuture")
            .field("life", &self.life)
            .field("registered", &self.slot.is_some())
            .finish()
    }
}

impl Completion {
    /// Registered waker slots in use (for tests: futures that were dropped
    /// or resolved hold none).
    #[cfg(all(test, not(percpu_ref_model)))]
    pub(crate) fn registered(&self) -> usize {
        let st = self.state();
        st.wakers.len() - st.free.len()
    }
}

#[cfg(all(test, not(percpu_ref_model)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn poll(f: &mut CompletionFuture, w: &Waker) -> Poll<()> {
        Pin::new(f).poll(&mut Context::from_waker(w))
    }

    #[test]
    fn dropped_and_repolled_futures_leave_no_waker_behind() {
        let done = Completion::new();
        let counts: Vec<_> = (0..3)
            .map(|_| std::sync::Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        let mut a = done.wait_async();
        assert!(poll(&mut a, &wakers[0]).is_pending());
        // Re-polled with another waker: replaces, does not add.
        assert!(poll(&mut a, &wakers[1]).is_pending());
        assert_eq!(done.registered(), 1);
        // A timed-out request drops its future: its slot goes away.
        for _ in 0..100 {
            let mut b = done.wait_async();
            assert!(poll(&mut b, &wakers[2]).is_pending());
        }
        assert_eq!(done.registered(), 1);
        done.complete();
        // Only the live future's current waker is woken.
        assert_eq!(counts[0].0.load(SeqCst), 0);
        assert_eq!(counts[1].0.load(SeqCst), 1);
        assert_eq!(counts[2].0.load(SeqCst), 0);
        assert!(poll(&mut a, &wakers[1]).is_ready());
        assert_eq!(done.registered(), 0);
    }

    #[test]
    fn a_waiter_of_an_old_life_is_not_put_back_to_sleep() {
        let done = Completion::new();
        let w = Waker::from(std::sync::Arc::new(Count(AtomicUsize::new(0))));
        let mut old = done.wait_async();
        assert!(poll(&mut old, &w).is_pending());
        done.complete();
        done.reset(); // the next life starts before the waiter runs
        assert!(!done.is_complete());
        assert!(poll(&mut old, &w).is_ready());
        let mut new = done.wait_async();
        assert!(poll(&mut new, &w).is_pending());
        // A blocked waiter of the new life wakes at its completion.
        std::thread::scope(|s| {
            s.spawn(|| done.complete());
            done.wait();
        });
        assert!(poll(&mut new, &w).is_ready());
    }
}
