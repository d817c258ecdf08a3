//! Killing (or switching to atomic) many refs with **one** barrier.
//!
//! A kill has phases (see `lifecycle.rs`): under the ref's switch lock it
//! marks the ref dead and closes its gate, then — on the rseq tier — waits
//! for `membarrier` so no restartable sequence still adds to the column,
//! folds the slots, runs the confirm callback and drops the initial
//! reference; after unlocking it runs a release that became due. Only the
//! barrier costs real time (~10 µs with other CPUs busy), and one barrier
//! serves every ref whose gate was closed before it. A batch therefore runs
//! each phase over all its refs before the next phase:
//!
//! ```text
//!   pass 1, by address: lock, mark dead, close the gate
//!   one barrier (if any ref needs it), then the confirm callback
//!   pass 2: fold, drop the initial reference, unlock
//!   pass 3: run the releases that became due (no lock held)
//! ```
//!
//! The releases of pass 3 run one after another on the calling thread. A
//! release may revive (or kill) refs of its own batch; if it revives one
//! whose release is claimed but has not run yet, that revive runs the
//! pending release first (it would otherwise wait for this very thread).
//!
//! Three passes, not one per phase: with other CPUs hammering the refs,
//! each pass costs a cache miss per ref. Every ref keeps the guarantees of
//! [`PercpuRef::kill_and_confirm`]: its phases run in the same order under
//! its own lock (only the confirm point moves before the fold, which no
//! `tryget_live` can observe: the ref is dead and its gate closed on every
//! CPU once the barrier returned), so its release runs exactly once, after
//! the confirm callback, and its error is its own.
//!
//! **No deadlock.** A batch holds all its locks at once, so it takes them in
//! one global order (by the address of the ref's state word) and locks a
//! ref listed twice only once. Two batches sharing refs therefore never
//! wait for each other in a cycle, and single-ref operations hold one lock
//! at a time. The confirm callback runs with every lock of the batch held:
//! it must not switch, kill or revive a ref of the batch (that panics), and
//! should not lock other refs either (a concurrent batch holding those and
//! waiting for one of ours would deadlock).
//!
//! **Tiers.** Only rseq-tier refs with an open column need the barrier;
//! a batch of portable-tier (or atomic, or dead) refs runs none at all.

use super::arc::PercpuArc;
use super::counter::{AfterPut, PercpuRef};
use super::error::KillError;
use super::lifecycle::Killing;
use super::lock;
use super::policy::ReleasePolicy;
use crate::sync::AtomicU32;
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// Something a [`KillBatch`] can kill or switch to atomic mode: a
/// [`PercpuRef`] of any value type and release policy, a [`PercpuArc`]
/// (its ref), or a [`DevicePagePool`](crate::DevicePagePool) (its shutdown,
/// see [`DevicePagePool::shutdown_all`](crate::DevicePagePool::shutdown_all)).
///
/// Used as `&dyn Killable`, so one batch mixes refs of different `T` and
/// `P`. The trait is **sealed**: a batch holds the switch locks of all its
/// refs across the barrier and the confirm callback, and each member must
/// follow the crate's lock, close, fold and put protocol exactly, which is
/// not part of the public API. Wrap your own types by passing the refs
/// they contain.
pub trait Killable: sealed::Phases {}

pub(crate) mod sealed {
    use super::*;

    /// The phases of a batched kill or switch, each as in
    /// `PercpuRef::kill_and_confirm` (see `lifecycle.rs`). Crate-private
    /// types in the interface keep it unimplementable outside the crate.
    #[allow(private_interfaces)]
    pub trait Phases {
        /// The state word: the lock, and the ref's identity in a batch.
        fn batch_word(&self) -> &AtomicU32;
        /// Kill phase 1 (locked): mark dead, close the gate.
        fn batch_kill_begin(&self) -> Result<Killing, KillError>;
        /// Switch phase 1 (locked): ask for atomic mode, close the gate.
        fn batch_switch_begin(&self) -> Killing;
        /// Does this member need the barrier before its fold?
        fn batch_needs_barrier(&self, k: &Killing) -> bool;
        /// Phase 2 (locked, after the barrier): fold the slots.
        fn batch_fold(&self, k: &mut Killing);
        /// Kill phase 3 (locked, after confirm): drop the initial reference.
        fn batch_put(&self, k: &mut Killing) -> Result<(), KillError>;
        /// After unlocking: run a release claimed under the lock.
        fn batch_finish(&self, k: Killing) -> AfterPut;
    }
}

#[allow(private_interfaces)]
impl<T, P: ReleasePolicy<T>> sealed::Phases for PercpuRef<T, P> {
    fn batch_word(&self) -> &AtomicU32 {
        self.state()
    }
    fn batch_kill_begin(&self) -> Result<Killing, KillError> {
        self.kill_begin()
    }
    fn batch_switch_begin(&self) -> Killing {
        self.switch_begin()
    }
    fn batch_needs_barrier(&self, k: &Killing) -> bool {
        k.needs_barrier(self.kind())
    }
    fn batch_fold(&self, k: &mut Killing) {
        self.kill_fold(k)
    }
    fn batch_put(&self, k: &mut Killing) -> Result<(), KillError> {
        self.kill_put(k)
    }
    fn batch_finish(&self, k: Killing) -> AfterPut {
        self.kill_finish(k)
    }
}

impl<T, P: ReleasePolicy<T>> Killable for PercpuRef<T, P> {}

/// A handle derefs to its ref; the batch treats both as the same ref.
#[allow(private_interfaces)]
impl<T, P: ReleasePolicy<T>> sealed::Phases for PercpuArc<T, P> {
    fn batch_word(&self) -> &AtomicU32 {
        (**self).batch_word()
    }
    fn batch_kill_begin(&self) -> Result<Killing, KillError> {
        (**self).batch_kill_begin()
    }
    fn batch_switch_begin(&self) -> Killing {
        (**self).batch_switch_begin()
    }
    fn batch_needs_barrier(&self, k: &Killing) -> bool {
        (**self).batch_needs_barrier(k)
    }
    fn batch_fold(&self, k: &mut Killing) {
        (**self).batch_fold(k)
    }
    fn batch_put(&self, k: &mut Killing) -> Result<(), KillError> {
        (**self).batch_put(k)
    }
    fn batch_finish(&self, k: Killing) -> AfterPut {
        (**self).batch_finish(k)
    }
}

impl<T, P: ReleasePolicy<T>> Killable for PercpuArc<T, P> {}

/// A pool in a batch is its "pgmap", the `PercpuRef` whose kill is the
/// pool's shutdown: killing it is exactly
/// [`DevicePagePool::shutdown`](crate::DevicePagePool::shutdown) (allocation,
/// lookup and reads refused once the batch returns, held pages valid until
/// dropped, then persist and unmap), and `AlreadyDead` reports a pool whose
/// shutdown had started already. Switching it to atomic mode leaves the
/// pool working, counting its pages on one shared counter.
#[cfg(all(feature = "dax", not(percpu_ref_model)))]
#[allow(private_interfaces)]
impl sealed::Phases for crate::DevicePagePool {
    fn batch_word(&self) -> &AtomicU32 {
        self.pgmap().batch_word()
    }
    fn batch_kill_begin(&self) -> Result<Killing, KillError> {
        self.pgmap().batch_kill_begin()
    }
    fn batch_switch_begin(&self) -> Killing {
        self.pgmap().batch_switch_begin()
    }
    fn batch_needs_barrier(&self, k: &Killing) -> bool {
        self.pgmap().batch_needs_barrier(k)
    }
    fn batch_fold(&self, k: &mut Killing) {
        self.pgmap().batch_fold(k)
    }
    fn batch_put(&self, k: &mut Killing) -> Result<(), KillError> {
        self.pgmap().batch_put(k)
    }
    fn batch_finish(&self, k: Killing) -> AfterPut {
        self.pgmap().batch_finish(k)
    }
}

#[cfg(all(feature = "dax", not(percpu_ref_model)))]
impl Killable for crate::DevicePagePool {}

/// A set of refs killed (or switched to atomic mode) together, paying
/// **one** `membarrier` for all of them instead of one each.
///
/// Refs of different value types and release policies mix freely (they
/// are held as `&dyn Killable`). Results come back in the order the refs
/// were pushed; a ref listed twice is handled once, and its later entries
/// report [`KillError::AlreadyDead`].
///
/// ```
/// use percpu_ref::{Completion, KillBatch, KillError, NoRelease, PercpuArc, PercpuRef};
///
/// let done = Completion::new();
/// let disk = PercpuRef::new(String::from("nvme0"), done.clone());
/// let cache = PercpuArc::new(vec![0u8; 16], NoRelease);
/// let log = PercpuRef::new(7u64, |_: &u64| {});
/// log.kill().unwrap(); // already dead: reported, the others still die
///
/// let held = disk.tryget_live().unwrap();
/// let mut batch = KillBatch::new();
/// batch.push(&disk).push(&cache).push(&log).push(&disk);
/// let mut confirmed = false;
/// let results = batch.kill_and_confirm(|| confirmed = true);
/// assert!(confirmed); // once, after every CPU sees all of them dead
/// assert_eq!(
///     results,
///     [Ok(()), Ok(()), Err(KillError::AlreadyDead), Err(KillError::AlreadyDead)]
/// );
/// assert!(disk.tryget_live().is_none() && cache.tryget_live().is_none());
/// assert!(!done.is_complete()); // `held` keeps `disk` alive...
/// drop(held);
/// assert!(done.is_complete()); // ...and its release ran exactly once
/// ```
#[derive(Default)]
#[must_use = "a batch does nothing until it is killed or switched"]
pub struct KillBatch<'a> {
    members: Vec<&'a dyn Killable>,
}

impl<'a> KillBatch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `n` refs.
    pub fn with_capacity(n: usize) -> Self {
        KillBatch {
            members: Vec::with_capacity(n),
        }
    }

    /// Add a ref (or [`PercpuArc`]); its result will be at index
    /// `len() - 1` after this call.
    pub fn push(&mut self, r: &'a dyn Killable) -> &mut Self {
        self.members.push(r);
        self
    }

    /// Refs pushed so far (duplicates included).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// No refs pushed yet?
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kill every ref: [`PercpuRef::kill`] for each, with one barrier.
    ///
    /// Returns each ref's result in push order:
    /// [`KillError::AlreadyDead`] for a ref that was already killed (or is
    /// listed again), [`KillError::Underflow`] for one whose count summed
    /// below zero (it is killed regardless). An error of one ref never
    /// stops the others.
    ///
    /// # Panics
    ///
    /// If a release that this call ran panics: every ref is killed and
    /// every due release has run first; the first panic is re-raised.
    pub fn kill(&self) -> Vec<Result<(), KillError>> {
        self.kill_and_confirm(|| {})
    }

    /// Kill every ref, and run `confirm` once, when every later
    /// `tryget_live` of **any** ref of the batch on any thread is
    /// guaranteed to fail — before any ref's initial reference is dropped,
    /// so before any release of this batch.
    ///
    /// Unlike [`PercpuRef::kill_and_confirm`], `confirm` runs even if no
    /// ref was killed by this call (each was already dead): it still marks
    /// the point after which the whole set is dead everywhere.
    ///
    /// `confirm` runs with every ref's switch lock held: it must not
    /// switch, kill, resurrect or reinit a ref of the batch (that panics),
    /// and should not lock other refs (see the module docs). If it panics,
    /// the kills still complete, then the panic propagates.
    ///
    /// # Errors
    ///
    /// Per ref, as [`kill`](Self::kill).
    pub fn kill_and_confirm(&self, confirm: impl FnOnce()) -> Vec<Result<(), KillError>> {
        let mut results = vec![Err(KillError::AlreadyDead); self.members.len()];
        let mut killing = Vec::with_capacity(self.members.len());
        let mut barrier = false;
        // Pass 1: lock each ref (by address) and mark it dead.
        let mut locked = self.lock_each(|i| {
            let m = self.members[i];
            match m.batch_kill_begin() {
                Ok(k) => {
                    barrier |= m.batch_needs_barrier(&k);
                    killing.push((i, k));
                }
                Err(e) => results[i] = Err(e),
            }
        });
        if barrier {
            crate::sys::rseq::fence_all_cpus();
        }
        // Every ref is dead and its gate closed on every CPU: the confirm
        // point (the fold below changes nothing a `tryget_live` can see).
        let confirmed = catch_unwind(AssertUnwindSafe(confirm));
        // Pass 2, in locking order: fold, drop the initial reference,
        // unlock. A ref that failed pass 1 is only unlocked.
        let mut next = killing.iter_mut().peekable();
        for n in 0..locked.order.len() {
            let i = locked.order[n];
            if let Some((_, k)) = next.next_if(|(j, _)| *j == i) {
                self.members[i].batch_fold(k);
                results[i] = self.members[i].batch_put(k);
            }
            locked.unlock_next();
        }
        drop(locked);
        // Pass 3: the releases that became due, with no lock held.
        let panic = self.finish(killing);
        if let Err(p) = confirmed {
            resume_unwind(p);
        }
        if let Some(p) = panic {
            resume_unwind(p);
        }
        results
    }

    /// [`PercpuRef::switch_to_atomic`] for every ref, with one barrier:
    /// each counts on its shared count and stays atomic across revives
    /// until its own `switch_to_percpu`. Dead refs only remember the
    /// request (as the single-ref call).
    pub fn switch_to_atomic(&self) {
        let mut switching = Vec::with_capacity(self.members.len());
        let mut barrier = false;
        let mut locked = self.lock_each(|i| {
            let m = self.members[i];
            let k = m.batch_switch_begin();
            barrier |= m.batch_needs_barrier(&k);
            switching.push((i, k));
        });
        if barrier {
            crate::sys::rseq::fence_all_cpus();
        }
        // In locking order, as `switching` was filled.
        for (i, k) in &mut switching {
            self.members[*i].batch_fold(k);
            locked.unlock_next();
        }
        drop(locked);
        // A live ref's fold never claims a release, and a dead ref has no
        // column to fold: there is nothing to run.
        if let Some(p) = self.finish(switching) {
            resume_unwind(p);
        }
    }

    /// Lock every distinct ref in address order, running `begin` on each
    /// right after taking its lock (one pass over the refs' cache lines).
    fn lock_each(&self, mut begin: impl FnMut(usize)) -> Locked<'_> {
        let addr = |i: usize| self.members[i].batch_word() as *const AtomicU32 as usize;
        let mut order: Vec<usize> = (0..self.members.len()).collect();
        // By address, and among duplicates the first pushed first: it is
        // the one that gets the real result.
        order.sort_unstable_by_key(|&i| (addr(i), i));
        order.dedup_by_key(|i| addr(*i));
        let words: Vec<&AtomicU32> = order
            .iter()
            .map(|&i| self.members[i].batch_word())
            .collect();
        lock::lock_all(&words, |n| begin(order[n]));
        Locked {
            order,
            words,
            unlocked: 0,
        }
    }

    /// After unlocking: run the releases that became due; the first panic.
    fn finish(&self, done: Vec<(usize, Killing)>) -> Option<Box<dyn std::any::Any + Send>> {
        // A release run here may revive a later ref of the batch whose
        // release is claimed but not run yet: mark them pending, so that
        // revive runs it rather than wait for this thread (`lock.rs`).
        for (i, k) in done.iter().rev() {
            if k.has_claim() {
                lock::add_pending(self.members[*i].batch_word());
            }
        }
        let mut panic = None;
        for (i, mut k) in done {
            if k.has_claim() && !lock::take_pending(self.members[i].batch_word()) {
                k.release_ran_elsewhere();
            }
            let after = self.members[i].batch_finish(k);
            // Members are borrowed, so none is an orphaned allocation.
            debug_assert!(!after.free);
            if let Some(p) = after.panic {
                panic.get_or_insert(p);
            }
        }
        panic
    }
}

/// The locks of a batch, in locking order: released one by one with
/// `unlock_next`, the rest when dropped (also on unwind).
struct Locked<'w> {
    order: Vec<usize>,
    words: Vec<&'w AtomicU32>,
    /// `words[..unlocked]` are unlocked already.
    unlocked: usize,
}

impl Locked<'_> {
    fn unlock_next(&mut self) {
        lock::unlock_only(self.words[self.unlocked]);
        self.unlocked += 1;
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        for w in &self.words[self.unlocked..] {
            lock::unlock_only(w);
        }
        lock::forget_all(&self.words);
    }
}

impl<'a> Extend<&'a dyn Killable> for KillBatch<'a> {
    fn extend<I: IntoIterator<Item = &'a dyn Killable>>(&mut self, iter: I) {
        self.members.extend(iter);
    }
}

impl<'a> FromIterator<&'a dyn Killable> for KillBatch<'a> {
    fn from_iter<I: IntoIterator<Item = &'a dyn Killable>>(iter: I) -> Self {
        KillBatch {
            members: iter.into_iter().collect(),
        }
    }
}

impl fmt::Debug for KillBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KillBatch")
            .field("len", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// Kill every ref in `refs` with one barrier; a shorthand for a
/// [`KillBatch`] (see there for errors and panics). Results are in the
/// order of `refs`.
///
/// ```
/// use percpu_ref::{NoRelease, PercpuRef};
/// let a = PercpuRef::new(1u8, NoRelease);
/// let b = PercpuRef::new("two", |_: &&str| {});
/// let results = percpu_ref::kill_all(&[&a, &b, &a]);
/// assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
/// assert!(a.is_dying() && b.is_dying());
/// ```
pub fn kill_all(refs: &[&dyn Killable]) -> Vec<Result<(), KillError>> {
    refs.iter().copied().collect::<KillBatch<'_>>().kill()
}
