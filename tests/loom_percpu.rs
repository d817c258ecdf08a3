//! Exhaustive loom models of the portable tier and of the lifecycle.
//!
//! Run: `RUSTFLAGS="--cfg percpu_ref_loom" LOOM_MAX_PREEMPTIONS=3 cargo test
//! --release --no-default-features --test loom_percpu`.
//!
//! Bound: every race in the scheme is between one slot or central RMW of a
//! getter/putter and one step of a switch (set flag, close, swap a slot,
//! fold, add bias, reset a slot, publish), or between two lifecycle
//! operations each holding or waiting for the switch lock. Exposing any
//! such race takes at most two preemptions (stop one party between two of
//! its steps, stop the other between a read and its RMW); three covers a
//! third party as well. Under loom each call moves the thread to the next of
//! two slots, so the models include gets and puts of one thread landing on
//! different CPUs.
//!
//! **Happens-before, not only counts.** The counted value is a set of loom
//! `UnsafeCell`s: each holder writes its own cell while it holds a
//! reference, and the release reads every cell. loom's race detector then
//! checks the ordering argument itself: a put whose uses of the value are
//! not ordered before the release is reported as a causality violation,
//! even where the count comes out right.
//!
//! Single-ordering weakenings and the model that catches each (checked by
//! editing a scratch copy of `src/`, not in CI):
//!
//! | weakened ordering | caught by |
//! |---|---|
//! | portable put's slot compare-exchange `Release` → `Relaxed` | `holders_uses_happen_before_the_release`, `two_putters_race_the_kill`, `owned_refs_outlive_every_handle` |
//! | central put `AcqRel` → `Release` | `two_putters_race_the_kill` |
//! | central put `AcqRel` → `Acquire` | `holders_uses_happen_before_the_release`, `two_putters_race_the_kill`, `owned_refs_outlive_every_handle` |
//! | fold's slot swap `AcqRel` → `Release` | `holders_uses_happen_before_the_release`, `two_putters_race_the_kill`, `owned_refs_outlive_every_handle` |
//! | fold's central add `AcqRel` → `Acquire` | none: the kill's initial put (`AcqRel`, after the fold on the same thread) and the switch lock carry the same edge |
//! | fold's central add `AcqRel` → `Release` | none here: it matters only when the fold itself takes a killed ref to zero (an underflow) and its thread then runs the release |
//! | `open_column`'s column store `Release` → `Relaxed` | `switch_back_to_percpu_with_concurrent_get_put_keeps_count_exact`, `adaptive_promotion_keeps_count_exact` |
//! | `portable_add`'s column load `Acquire` → `Relaxed` | `switch_back_to_percpu_with_concurrent_get_put_keeps_count_exact`, `adaptive_promotion_keeps_count_exact` |
#![cfg(percpu_ref_loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;
use percpu_ref::{Mode, PercpuArc, PercpuRef, ReleasePolicy, ReviveError};
use std::sync::Arc;

/// The counted value: one cell per holder (see the module docs).
struct Cells([UnsafeCell<u64>; 3]);

// SAFETY: cell `i` is written only by holder `i` while it holds a
// reference, and read only by the release; loom checks that these accesses
// are ordered (that is what the models test).
unsafe impl Sync for Cells {}

impl Cells {
    fn new() -> Self {
        Cells(std::array::from_fn(|_| UnsafeCell::new(0)))
    }
    /// Holder `i` uses the value.
    fn touch(&self, i: usize) {
        // SAFETY: see `Sync`.
        self.0[i].with_mut(|p| unsafe { *p += 1 });
    }
    fn sum(&self) -> u64 {
        // SAFETY: see `Sync`.
        self.0.iter().map(|c| c.with(|p| unsafe { *p })).sum()
    }
}

/// Counts releases; each release reads every cell.
#[derive(Clone, Default)]
struct Count(Arc<AtomicUsize>);

impl ReleasePolicy<Cells> for Count {
    fn release(&self, v: &Cells) {
        v.sum();
        self.0.fetch_add(1, SeqCst);
    }
}

impl Count {
    fn get(&self) -> usize {
        self.0.load(SeqCst)
    }
}

fn counted(atomic: bool) -> (PercpuArc<Cells, Count>, Count) {
    let n = Count::default();
    let mut b = PercpuRef::builder(Cells::new());
    if atomic {
        b = b.atomic();
    }
    (b.release(n.clone()).build_arc(), n)
}

#[test]
fn holders_uses_happen_before_the_release() {
    loom::model(|| {
        let (r, released) = counted(false);
        let a = r.tryget_owned().unwrap();
        let ta = thread::spawn(move || {
            // A get and a put on different slots (the model migrates).
            let again = a.clone();
            a.touch(0);
            drop(a);
            again.touch(0);
        });
        r.kill().unwrap();
        ta.join().unwrap();
        assert_eq!(released.get(), 1);
        assert!(r.is_zero());
    });
}

#[test]
fn two_putters_race_the_kill() {
    loom::model(|| {
        let (r, released) = counted(false);
        let a = r.tryget_owned().unwrap();
        let b = r.tryget_owned().unwrap();
        let ta = thread::spawn(move || a.touch(0));
        let tb = thread::spawn(move || b.touch(1));
        r.kill().unwrap();
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(released.get(), 1);
    });
}

#[test]
fn tryget_live_fails_after_confirm() {
    loom::model(|| {
        let (r, released) = counted(false);
        let confirmed = Arc::new(AtomicBool::new(false));
        let (r2, c2) = (r.clone(), confirmed.clone());
        let t = thread::spawn(move || {
            let seen = c2.load(SeqCst);
            let got = r2.tryget_live_owned();
            if seen {
                assert!(got.is_none(), "tryget_live succeeded after confirm");
            }
        });
        let c = confirmed.clone();
        r.kill_and_confirm(move || c.store(true, SeqCst)).unwrap();
        t.join().unwrap();
        assert!(r.tryget_live().is_none());
        assert_eq!(released.get(), 1);
    });
}

/// A resurrect racing `kill_and_confirm` must wait for the confirm: inside
/// it, the ref is dead for everyone.
#[test]
fn confirm_never_runs_on_a_resurrected_ref() {
    loom::model(|| {
        let (r, released) = counted(false);
        let r2 = r.clone();
        let t = thread::spawn(move || r2.resurrect());
        let r3 = r.clone();
        r.kill_and_confirm(move || {
            assert!(r3.tryget_live().is_none(), "confirm ran on a live ref");
        })
        .unwrap();
        match t.join().unwrap() {
            Ok(()) => assert!(r.tryget_live().is_some()),
            // Before the kill (live) or after the drain (not allowed).
            Err(e) => assert!(matches!(
                e,
                ReviveError::Live | ReviveError::ReinitNotAllowed
            )),
        }
        drop(r);
        assert!(released.get() <= 1);
    });
}

/// A get and a put (on different slots: the model migrates) race a switch
/// from `start_atomic`'s mode to the other; the count must stay exact.
fn switch_with_concurrent_get_put(start_atomic: bool) {
    loom::model(move || {
        let (r, released) = counted(start_atomic);
        let g = r.tryget_owned().unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let kept = r2.tryget_owned().unwrap();
            g.touch(1);
            drop(g);
            kept
        });
        if start_atomic {
            r.switch_to_percpu().unwrap();
            assert_eq!(r.mode(), Mode::Percpu);
        } else {
            r.switch_to_atomic();
            assert_eq!(r.mode(), Mode::Atomic);
        }
        let kept = t.join().unwrap();
        r.kill().unwrap();
        assert_eq!(released.get(), 0, "`kept` is still held");
        drop(kept);
        assert_eq!(released.get(), 1);
        assert!(r.check().is_ok());
    });
}

#[test]
fn switch_to_atomic_with_concurrent_get_put_keeps_count_exact() {
    switch_with_concurrent_get_put(false);
}

#[test]
fn switch_back_to_percpu_with_concurrent_get_put_keeps_count_exact() {
    switch_with_concurrent_get_put(true);
}

/// Ref `a` gives its column back while another thread still gets and puts
/// on it; ref `b` takes that very column at once. A stale adder of `a` must
/// never count on `b`'s slots, and neither count may drift.
#[test]
fn column_reuse_across_refs_keeps_counts_exact() {
    loom::model(|| {
        let (a, released_a) = counted(false);
        let (b, released_b) = counted(true);
        let g = a.tryget_owned().unwrap();
        let t = thread::spawn(move || {
            let h = g.clone();
            drop(g);
            h
        });
        a.switch_to_atomic();
        b.switch_to_percpu().unwrap();
        let hb = b.tryget_owned().unwrap();
        let h = t.join().unwrap();
        a.kill().unwrap();
        b.kill().unwrap();
        assert_eq!((released_a.get(), released_b.get()), (0, 0));
        drop(h);
        assert_eq!(released_a.get(), 1);
        drop(hb);
        assert_eq!(released_b.get(), 1);
        assert!(a.check().is_ok() && b.check().is_ok());
    });
}

#[test]
fn resurrect_vs_final_put() {
    loom::model(|| {
        let (r, released) = counted(false);
        let g = r.tryget_owned().unwrap();
        r.kill().unwrap();
        let t = thread::spawn(move || drop(g));
        let res = r.resurrect();
        t.join().unwrap();
        match res {
            // Resurrected before the put drained it: live, not released.
            Ok(()) => {
                assert!(!r.is_dying());
                assert_eq!(released.get(), 0);
                assert!(r.tryget_live().is_some());
            }
            // The put drained it first: released exactly once.
            Err(e) => {
                assert_eq!(e, ReviveError::ReinitNotAllowed);
                assert_eq!(released.get(), 1);
                assert!(r.is_zero());
            }
        }
    });
}

/// A release that is still running when `reinit` is called: `reinit` must
/// not return before it has finished, and the next life's release must
/// run too — also after an underflow made the `UNDERFLOW` flag sticky.
fn reinit_vs_final_put(underflowed_before: bool) {
    loom::model(move || {
        let running = Arc::new(AtomicBool::new(false));
        let released = Arc::new(AtomicUsize::new(0));
        let (run, rel) = (running.clone(), released.clone());
        let r = PercpuRef::builder(Cells::new())
            .atomic()
            .allow_reinit()
            .release(move |_: &Cells| {
                run.store(true, SeqCst);
                rel.fetch_add(1, SeqCst);
                run.store(false, SeqCst);
            })
            .build_arc();
        let mut lives = 0;
        if underflowed_before {
            // Documented misuse: one put too many, then the life ends.
            // SAFETY: breaks the put_many contract on purpose; nothing else
            // holds a reference.
            unsafe { r.put_many(1) };
            assert!(r.check().is_err());
            let _ = r.kill();
            r.reinit().unwrap();
            lives = 1;
        }
        assert_eq!(released.load(SeqCst), lives);
        let g = r.tryget_owned().unwrap();
        // The sticky flag makes every later kill report the underflow.
        assert_eq!(r.kill().is_ok(), !underflowed_before);
        let t = thread::spawn(move || drop(g));
        loop {
            match r.reinit() {
                Ok(()) => break,
                Err(ReviveError::NotDrained) => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!running.load(SeqCst), "reinit returned during the release");
        assert_eq!(released.load(SeqCst), lives + 1);
        t.join().unwrap();
        assert_eq!(released.load(SeqCst), lives + 1);
        assert!(r.tryget_live().is_some());
        let _ = r.kill();
        assert_eq!(released.load(SeqCst), lives + 2);
    });
}

#[test]
fn reinit_waits_for_the_release_of_the_final_put() {
    reinit_vs_final_put(false);
}

#[test]
fn reinit_after_a_sticky_underflow_still_releases_every_life_once() {
    reinit_vs_final_put(true);
}

/// Every owner drops its handle while another thread still holds an owned
/// reference: the value stays alive for it, the release runs once, and the
/// allocation is freed exactly once (loom reports a leak or a double free).
#[test]
fn owned_refs_outlive_every_handle() {
    loom::model(|| {
        let (r, released) = counted(false);
        let o = r.tryget_live_owned().unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let o2 = o.clone();
            drop(o);
            o2.touch(2);
        });
        let t2 = thread::spawn(move || drop(r2));
        drop(r);
        t.join().unwrap();
        t2.join().unwrap();
        assert_eq!(released.get(), 1);
    });
}

/// An adaptive ref promotes itself while other threads get and put.
#[test]
fn adaptive_promotion_keeps_count_exact() {
    // Outside the model: did any execution promote?
    static PROMOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    loom::model(|| {
        let n = Count::default();
        let r = PercpuRef::builder(Cells::new())
            .adaptive()
            .release(n.clone())
            .build_arc();
        assert_eq!(r.mode(), Mode::Atomic);
        let a = r.tryget_owned().unwrap();
        let t = thread::spawn(move || {
            let b = a.clone();
            drop(a);
            b
        });
        let c = r.tryget_owned().unwrap();
        drop(c);
        let b = t.join().unwrap();
        if r.mode() == Mode::Percpu {
            PROMOTED.store(true, SeqCst);
        }
        r.kill().unwrap();
        assert_eq!(n.get(), 0);
        drop(b);
        assert_eq!(n.get(), 1);
        assert!(r.check().is_ok());
    });
    assert!(
        PROMOTED.load(SeqCst),
        "no execution saw contention promote the ref"
    );
}

/// Two refs in one allocation, so their address order (which fixes the
/// batch's lock order) is the same in every execution loom explores.
#[repr(C)]
struct Pair {
    a: PercpuRef<Cells, Count>,
    b: PercpuRef<Cells, Count>,
}

/// A batch kills two refs (one barrier for both) while a holder of each
/// puts on another thread: each ref releases exactly once, after its
/// holder's uses of the value, and both kills succeed. The two refs'
/// phases interleave with the puts at every step of the batch (lock both,
/// begin both, barrier, fold both, put both, unlock, run the releases).
#[test]
fn batch_of_two_refs_racing_puts() {
    loom::model(|| {
        let (released_a, released_b) = (Count::default(), Count::default());
        let build = |n: &Count| PercpuRef::builder(Cells::new()).release(n.clone()).build();
        let pair = Arc::new(Pair {
            a: build(&released_a),
            b: build(&released_b),
        });
        // One raw reference on each, given back by its holder thread.
        let _ = percpu_ref::Ref::into_raw(pair.a.tryget().unwrap());
        let _ = percpu_ref::Ref::into_raw(pair.b.tryget().unwrap());
        let (pa, pb) = (Arc::clone(&pair), Arc::clone(&pair));
        let ta = thread::spawn(move || {
            pa.a.value().touch(0);
            // SAFETY: the raw reference taken above, put once.
            unsafe { pa.a.put_many(1) };
        });
        let tb = thread::spawn(move || {
            pb.b.value().touch(1);
            // SAFETY: as above.
            unsafe { pb.b.put_many(1) };
        });
        let results = percpu_ref::kill_all(&[&pair.b, &pair.a]);
        assert_eq!(results, [Ok(()), Ok(())]);
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!((released_a.get(), released_b.get()), (1, 1));
        assert!(pair.a.is_zero() && pair.b.is_zero());
    });
}
