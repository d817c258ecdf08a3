//! Exhaustive loom models of the portable tier.
//!
//! Run: `RUSTFLAGS="--cfg percpu_ref_loom" LOOM_MAX_PREEMPTIONS=3 cargo test
//! --release --test loom_percpu`.
//!
//! Bound: every race in the scheme is between one slot or central RMW of a
//! getter/putter and one step of a switch (set flag, swap a slot, fold, add
//! bias, reset a slot, clear flag). Exposing any such race takes at most two
//! preemptions (stop the switcher between two of its steps, stop the
//! getter between reading the mode and its RMW); three covers a second
//! getter interleaving as well. Under loom each call moves the thread to the
//! next of two slots, so the models include gets and puts of one thread
//! landing on different CPUs.
#![cfg(percpu_ref_loom)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;
use percpu_ref::{Mode, PercpuRef};
use std::sync::Arc;

type Counted = Arc<AtomicUsize>;

fn counted_ref(
    atomic: bool,
) -> (
    Arc<PercpuRef<u32, impl Fn(&u32) + Send + Sync + 'static>>,
    Counted,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    let mut b = PercpuRef::builder(7u32);
    if atomic {
        b = b.atomic();
    }
    let r = b
        .release(move |v: &u32| {
            assert_eq!(*v, 7);
            m.fetch_add(1, SeqCst);
        })
        .build();
    (Arc::new(r), n)
}

#[test]
fn get_put_vs_kill_releases_exactly_once() {
    loom::model(|| {
        let (r, released) = counted_ref(false);
        let g = r.tryget_owned().unwrap();
        let r2 = r.clone();
        let rel2 = released.clone();
        let t = thread::spawn(move || {
            let g2 = g.clone();
            drop(g);
            assert_eq!(rel2.load(SeqCst), 0, "released while a ref is held");
            drop(g2);
            drop(r2);
        });
        r.kill().unwrap();
        t.join().unwrap();
        assert_eq!(released.load(SeqCst), 1);
        assert!(r.is_zero());
    });
}

#[test]
fn two_putters_race_the_kill() {
    loom::model(|| {
        let (r, released) = counted_ref(false);
        let a = r.tryget_owned().unwrap();
        let b = r.tryget_owned().unwrap();
        let ta = thread::spawn(move || drop(a));
        let tb = thread::spawn(move || drop(b));
        r.kill().unwrap();
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(released.load(SeqCst), 1);
    });
}

#[test]
fn tryget_live_fails_after_confirm() {
    loom::model(|| {
        let (r, released) = counted_ref(false);
        let confirmed = Arc::new(AtomicBool::new(false));
        let (r2, c2) = (r.clone(), confirmed.clone());
        let t = thread::spawn(move || {
            let seen = c2.load(SeqCst);
            let got = r2.tryget_live_owned();
            if seen {
                assert!(got.is_none(), "tryget_live succeeded after confirm");
            }
            drop(got);
        });
        let c = confirmed.clone();
        r.kill_and_confirm(move || c.store(true, SeqCst)).unwrap();
        t.join().unwrap();
        assert!(r.tryget_live().is_none());
        assert_eq!(released.load(SeqCst), 1);
    });
}

/// A get and a put (on different slots: the model migrates) race a switch
/// from `start_atomic`'s mode to the other; the count must stay exact.
fn switch_with_concurrent_get_put(start_atomic: bool) {
    loom::model(move || {
        let (r, released) = counted_ref(start_atomic);
        let g = r.tryget_owned().unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let kept = r2.tryget_owned().unwrap();
            drop(g);
            kept
        });
        if start_atomic {
            r.switch_to_percpu();
            assert_eq!(r.mode(), Mode::Percpu);
        } else {
            r.switch_to_atomic();
            assert_eq!(r.mode(), Mode::Atomic);
        }
        let kept = t.join().unwrap();
        r.kill().unwrap();
        assert_eq!(released.load(SeqCst), 0, "`kept` is still held");
        drop(kept);
        assert_eq!(released.load(SeqCst), 1);
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

#[test]
fn resurrect_vs_final_put() {
    loom::model(|| {
        let (r, released) = counted_ref(false);
        let g = r.tryget_owned().unwrap();
        r.kill().unwrap();
        let t = thread::spawn(move || drop(g));
        let res = r.resurrect();
        t.join().unwrap();
        match res {
            // Resurrected before the put drained it: live, not released.
            Ok(()) => {
                assert!(!r.is_dying());
                assert_eq!(released.load(SeqCst), 0);
                assert!(r.tryget_live().is_some());
            }
            // The put drained it first: released exactly once.
            Err(e) => {
                assert_eq!(e, percpu_ref::ReviveError::ReinitNotAllowed);
                assert_eq!(released.load(SeqCst), 1);
                assert!(r.is_zero());
            }
        }
    });
}
