//! The switch lock, and sleeping until the state word changes.
//!
//! A ref has no mutex of its own (the header stays at 32 bytes): its lock is
//! the `LOCKED` bit of the state word, and a thread that must wait — for the
//! lock, for a zero crossing to be recorded, for a running release to
//! finish — sleeps on one of a few process-wide condition variables chosen
//! by the ref's address, as `parking_lot` does.
//!
//! Protocol (no lost wake-up): a waiter locks its bucket's mutex, then in
//! one compare-exchange either finds the state it waits for or sets
//! `PARKED`, and sleeps on the bucket's condition variable (which releases
//! the mutex atomically). Every state change a waiter may wait for is a
//! read-modify-write that returns the previous word; if that had `PARKED`,
//! the changer locks the bucket mutex, clears `PARKED` and wakes the whole
//! bucket. The changer's RMW either precedes the waiter's compare-exchange
//! in the word's modification order (then the waiter sees the change) or
//! follows it (then the changer sees `PARKED`, and its mutex acquisition
//! waits until the waiter sleeps). Waiters that share a bucket, or that woke
//! too early, check again and sleep again.
//!
//! The lock is not re-entrant. Re-locking from the thread that holds it
//! (e.g. `resurrect` called inside the `kill_and_confirm` callback) would
//! deadlock, so it panics with a message instead. The thread also records
//! which releases it is running, so that a release that revives its own ref
//! does not wait for itself (see `counter.rs`).

use super::state::{LOCKED, PARKED};
use crate::sync::{lock as lock_mutex, wait, AtomicU32, Condvar, Mutex, Ordering::*};
use std::cell::RefCell;

struct Bucket {
    mutex: Mutex<()>,
    cond: Condvar,
}

#[cfg(not(percpu_ref_model))]
const BUCKETS: usize = 64;
#[cfg(percpu_ref_model)]
const BUCKETS: usize = 1;

#[cfg(not(percpu_ref_model))]
crate::sync::global! {
    static PARKING: [Bucket; BUCKETS] =
        [const { Bucket { mutex: Mutex::new(()), cond: Condvar::new() } }; BUCKETS];
}
#[cfg(percpu_ref_model)]
crate::sync::global! {
    static PARKING: [Bucket; BUCKETS] =
        std::array::from_fn(|_| Bucket { mutex: Mutex::new(()), cond: Condvar::new() });
}

fn with_bucket<R>(word: &AtomicU32, f: impl FnOnce(&Bucket) -> R) -> R {
    // Before a bucket's mutex: a fork must not copy it held.
    crate::sys::fork::watch();
    // Refs are at least 8-byte aligned: drop the bits that never vary.
    #[allow(clippy::modulo_one)] // one bucket under a model checker
    let i = (word as *const AtomicU32 as usize >> 3) % BUCKETS;
    PARKING.with(|b| f(&b[i]))
}

/// Every bucket's mutex, held across a `fork()` (`percpu::hold_for_fork`).
#[cfg(percpu_ref_linux)]
pub(crate) type ForkHeld = [crate::sync::MutexGuard<'static, ()>; BUCKETS];

/// Take every bucket's mutex for a `fork()`, in index order (nothing else
/// holds two). Each is held only for a compare-exchange, or a wake-up, at
/// a time.
#[cfg(percpu_ref_linux)]
pub(crate) fn lock_for_fork() -> ForkHeld {
    std::array::from_fn(|i| lock_mutex(&PARKING.0[i].mutex))
}

/// Spins before sleeping: short waits (a lock held for a fold, a release
/// that only signals) are over before a sleep would start.
const SPINS: usize = if cfg!(percpu_ref_model) { 1 } else { 100 };

/// Block until `ready(state)`; returns the state that satisfied it.
///
/// Acquire on every read that returns: pairs with the Release (or stronger)
/// RMW that made the state ready, so the caller sees what the changer did
/// before (e.g. a release's effects, a lock holder's writes).
pub(crate) fn wait_until(word: &AtomicU32, ready: impl Fn(u32) -> bool) -> u32 {
    for _ in 0..SPINS {
        let s = word.load(Acquire);
        if ready(s) {
            return s;
        }
        crate::sync::spin_loop();
    }
    with_bucket(word, |b| {
        let mut g = lock_mutex(&b.mutex);
        loop {
            // Acquire: as above. Relaxed is not enough for a word we may
            // return; the compare-exchange below is the other read.
            let s = word.load(Acquire);
            if ready(s) {
                return s;
            }
            if s & PARKED != 0
                // Acquire on success: we read `s` and may sleep on it;
                // Relaxed on failure: we read again at the loop head.
                || word
                    .compare_exchange(s, s | PARKED, Acquire, Relaxed)
                    .is_ok()
            {
                g = wait(&b.cond, g);
            }
        }
    })
}

/// Wake every thread waiting on `word` if `prev` (the value an RMW just
/// replaced) had `PARKED` set.
#[inline]
pub(crate) fn wake_if_parked(word: &AtomicU32, prev: u32) {
    if prev & PARKED != 0 {
        wake(word);
    }
}

#[cold]
fn wake(word: &AtomicU32) {
    with_bucket(word, |b| {
        let _g = lock_mutex(&b.mutex);
        // Relaxed: the bucket mutex orders this with the waiters' CAS.
        word.fetch_and(!PARKED, Relaxed);
        b.cond.notify_all();
    });
}

#[derive(Default)]
struct Held {
    /// Addresses of the state words this thread has locked.
    locks: Vec<usize>,
    /// State words whose release this thread is running, and whether a
    /// revive from inside that release already finished it.
    releasing: Vec<(usize, bool)>,
    /// State words whose release a batch on this thread claimed and has
    /// not run yet (it runs them one after another).
    pending: Vec<usize>,
}

crate::sync::thread_local_cell! {
    static HELD: RefCell<Held> = RefCell::new(Held { locks: Vec::new(), releasing: Vec::new(), pending: Vec::new() });
}

fn addr(word: &AtomicU32) -> usize {
    word as *const AtomicU32 as usize
}

/// Take the switch lock of `word`.
///
/// # Panics
///
/// If this thread already holds it (a re-entrant call from a callback that
/// runs under the lock would otherwise deadlock).
pub(crate) fn lock(word: &AtomicU32) {
    let a = addr(word);
    HELD.with(|h| {
        assert!(
            !h.borrow().locks.contains(&a),
            "percpu_ref: this thread already holds the ref's switch lock: a mode switch, \
             kill, resurrect or reinit of a ref must not be called from its own \
             kill_and_confirm callback (it would deadlock)"
        );
    });
    loop {
        if try_lock_raw(word) {
            break;
        }
        wait_until(word, |s| s & LOCKED == 0);
    }
    HELD.with(|h| h.borrow_mut().locks.push(a));
}

/// Take the switch locks of `words`, in the order given, calling
/// `locked(n)` right after taking `words[n]`. A batch passes them sorted by
/// address and without duplicates, so two batches (and any single-lock
/// operation) always lock in one global order and cannot deadlock. The
/// re-entrancy check runs once for the whole batch, so locking `n` refs
/// costs `O(n)`, not `O(n^2)`.
///
/// # Panics
///
/// If this thread already holds one of them (see [`lock`]).
pub(crate) fn lock_all(words: &[&AtomicU32], mut locked: impl FnMut(usize)) {
    HELD.with(|h| {
        let h = h.borrow();
        assert!(
            !words.iter().any(|w| h.locks.contains(&addr(w))),
            "percpu_ref: this thread already holds the switch lock of a ref in this batch: \
             a batch must not be killed or switched from a kill_and_confirm callback of \
             one of its refs (it would deadlock)"
        );
    });
    for (n, w) in words.iter().enumerate() {
        while !try_lock_raw(w) {
            wait_until(w, |s| s & LOCKED == 0);
        }
        HELD.with(|h| h.borrow_mut().locks.push(addr(w)));
        locked(n);
    }
}

/// Release the switch lock of `word` (held by this thread) **without**
/// dropping it from this thread's list of held locks: a batch unlocks its
/// refs one by one in the pass that also drops their initial references,
/// then forgets them all at once with [`forget_all`].
pub(crate) fn unlock_only(word: &AtomicU32) {
    // Release: as in `unlock`, pairs with the Acquire of the next lock
    // holder and of waiters. Acquire: harmless here (kept as in `unlock`).
    let prev = word.fetch_and(!LOCKED, AcqRel);
    debug_assert!(prev & LOCKED != 0);
    wake_if_parked(word, prev);
}

/// Forget `words` (locked by [`lock_all`], each released with
/// [`unlock_only`]) from this thread's list of held locks, in `O(n)`.
pub(crate) fn forget_all(words: &[&AtomicU32]) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        // `lock_all` pushed them last and in this order; any lock taken
        // since (by a confirm callback) was released again.
        let n = h.locks.len();
        let tail = n.checked_sub(words.len());
        if tail.is_some_and(|t| h.locks[t..].iter().zip(words).all(|(&a, w)| a == addr(w))) {
            h.locks.truncate(n - words.len());
        } else {
            let gone: std::collections::HashSet<usize> = words.iter().map(|w| addr(w)).collect();
            h.locks.retain(|a| !gone.contains(a));
        }
    });
}

/// Take the switch lock if it is free.
pub(crate) fn try_lock(word: &AtomicU32) -> bool {
    let a = addr(word);
    if HELD.with(|h| h.borrow().locks.contains(&a)) || !try_lock_raw(word) {
        return false;
    }
    HELD.with(|h| h.borrow_mut().locks.push(a));
    true
}

fn try_lock_raw(word: &AtomicU32) -> bool {
    // Relaxed: a first guess for the CAS.
    let mut s = word.load(Relaxed);
    while s & LOCKED == 0 {
        // Acquire on success: pairs with the Release of `unlock`, so the
        // new holder sees everything the previous one did. Relaxed on
        // failure: we only retry.
        match word.compare_exchange_weak(s, s | LOCKED, Acquire, Relaxed) {
            Ok(_) => return true,
            Err(now) => s = now,
        }
    }
    false
}

/// Release the switch lock of `word` (held by this thread); returns the
/// state word as it was just before.
pub(crate) fn unlock(word: &AtomicU32) -> u32 {
    let a = addr(word);
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        let at = h.locks.iter().rposition(|&x| x == a);
        debug_assert!(at.is_some(), "unlock of a lock this thread does not hold");
        if let Some(at) = at {
            h.locks.swap_remove(at);
        }
    });
    // Release: pairs with the Acquire of the next `lock`/`try_lock` and of
    // waiters, publishing the holder's changes. Acquire: pairs with a
    // `finish_release` that came first, for the orphaning handle drop that
    // frees the ref on what this read returns (arc.rs).
    let prev = word.fetch_and(!LOCKED, AcqRel);
    debug_assert!(prev & LOCKED != 0);
    wake_if_parked(word, prev);
    prev
}

/// The lock of `word`, released when dropped (also on unwind).
pub(crate) struct Guard<'a>(&'a AtomicU32);

impl<'a> Guard<'a> {
    pub(crate) fn new(word: &'a AtomicU32) -> Self {
        lock(word);
        Guard(word)
    }
}

impl Guard<'_> {
    /// Unlock now, returning the state word as it was just before.
    pub(crate) fn unlock(self) -> u32 {
        let word = self.0;
        std::mem::forget(self);
        unlock(word)
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        unlock(self.0);
    }
}

/// Marks this thread as running the release of `word` until dropped.
pub(crate) struct Releasing(usize);

impl Releasing {
    pub(crate) fn enter(word: &AtomicU32) -> Self {
        let a = addr(word);
        HELD.with(|h| h.borrow_mut().releasing.push((a, false)));
        Releasing(a)
    }

    /// Did a revive from inside the release already finish it?
    pub(crate) fn finished_inside(self) -> bool {
        let a = self.0;
        std::mem::forget(self);
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            let at = h.releasing.iter().rposition(|&(x, _)| x == a);
            at.is_some_and(|at| h.releasing.remove(at).1)
        })
    }
}

impl Drop for Releasing {
    /// Unwinding out of the release: forget the entry.
    fn drop(&mut self) {
        let a = self.0;
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(at) = h.releasing.iter().rposition(|&(x, _)| x == a) {
                h.releasing.remove(at);
            }
        });
    }
}

/// If this thread is running the release of `word` (and no revive inside
/// it finished it yet), mark it finished and return `true`: the caller
/// finishes the release now, and the release's runner will not.
pub(crate) fn finish_own_release(word: &AtomicU32) -> bool {
    let a = addr(word);
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        match h
            .releasing
            .iter_mut()
            .rev()
            .find(|(x, done)| *x == a && !*done)
        {
            Some(entry) => {
                entry.1 = true;
                true
            }
            None => false,
        }
    })
}

/// A batch claimed the release of `word` and will run it on this thread
/// after the releases before it. Marked so that a revive of this ref from
/// inside one of those releases runs it ([`take_pending`]) instead of
/// waiting for a release that cannot start until it returns. A batch adds
/// its claims in the reverse of the order it runs them, so each of its own
/// `take_pending` calls finds the word last.
pub(crate) fn add_pending(word: &AtomicU32) {
    HELD.with(|h| h.borrow_mut().pending.push(addr(word)));
}

/// Take `word` off this thread's pending releases: `true` if it was there
/// (the caller now runs the release), `false` if someone on this thread
/// already took it.
pub(crate) fn take_pending(word: &AtomicU32) -> bool {
    let a = addr(word);
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        match h.pending.iter().rposition(|&x| x == a) {
            Some(at) => {
                h.pending.remove(at);
                true
            }
            None => false,
        }
    })
}
