//! `KillBatch` / `kill_all`: many refs killed (or switched to atomic mode)
//! with one barrier, each keeping the semantics of a single
//! `kill_and_confirm` — errors per ref, confirm before any release, every
//! release exactly once — on both counting tiers, mixed in one batch.
//! Every test that could hang runs under a time limit.
#![cfg(not(percpu_ref_model))]

use percpu_ref::{
    kill_all, Completion, KillBatch, KillError, Killable, Mode, NoRelease, PercpuArc, PercpuRef,
    ReleasePolicy, ReviveError,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

const LIMIT: Duration = Duration::from_secs(30);

fn rounds(n: usize) -> usize {
    if cfg!(miri) {
        3
    } else {
        n
    }
}

fn build<T, P: ReleasePolicy<T>>(portable: bool, value: T, policy: P) -> PercpuRef<T, P> {
    let b = PercpuRef::builder(value).release(policy).allow_reinit();
    if portable {
        b.portable().build()
    } else {
        b.build()
    }
}

/// Counts releases; flags a release that runs while a tracked holder is
/// still alive, and a second release within one life.
#[derive(Default)]
struct Probe {
    releases: AtomicUsize,
    reinits: AtomicUsize,
    holders: AtomicUsize,
    released_this_life: AtomicBool,
    bad: AtomicBool,
}

#[derive(Clone, Default)]
struct Policy(Arc<Probe>);

impl<T> ReleasePolicy<T> for Policy {
    fn release(&self, _: &T) {
        let p = &self.0;
        if p.holders.load(SeqCst) != 0 || p.released_this_life.swap(true, SeqCst) {
            p.bad.store(true, SeqCst);
        }
        p.releases.fetch_add(1, SeqCst);
    }
    fn on_reinit(&self) {
        self.0.released_this_life.store(false, SeqCst);
        self.0.reinits.fetch_add(1, SeqCst);
    }
}

impl Policy {
    fn releases(&self) -> usize {
        self.0.releases.load(SeqCst)
    }
}

#[test]
fn errors_are_per_ref_and_do_not_fail_the_others() {
    for portable in common::tiers() {
        let (pa, pb, pc) = (Policy::default(), Policy::default(), Policy::default());
        let a = build(portable, 1u32, pa.clone());
        let b = build(!portable, String::from("b"), pb.clone());
        let c = build(portable, [0u8; 3], pc.clone());
        c.kill().unwrap();
        assert_eq!(pc.releases(), 1);
        // An unbalanced raw put on `b`, detected when its slots are summed.
        let extra = b.tryget().unwrap();
        let _raw = percpu_ref::Ref::into_raw(extra);
        // SAFETY: deliberately one put too many (misuse), to see the error;
        // the count stays consistent and no release runs twice.
        unsafe { b.put_many(2) };
        let results = kill_all(&[&a, &b, &c]);
        assert_eq!(results[0], Ok(()));
        assert!(
            matches!(results[1], Err(KillError::Underflow { count }) if count < 0),
            "{results:?}"
        );
        assert_eq!(results[2], Err(KillError::AlreadyDead));
        assert!(a.is_dying() && b.is_dying() && c.is_dying());
        assert_eq!((pa.releases(), pb.releases(), pc.releases()), (1, 1, 1));
        assert!(b.check().is_err());
        // A second batch changes nothing.
        let again = kill_all(&[&c, &b, &a]);
        assert!(again.iter().all(|r| *r == Err(KillError::AlreadyDead)));
        assert_eq!((pa.releases(), pb.releases(), pc.releases()), (1, 1, 1));
    }
}

#[test]
fn duplicates_are_killed_once_and_report_already_dead() {
    for portable in common::tiers() {
        let p = Policy::default();
        let arc = PercpuArc::new(5u64, p.clone());
        let q = Policy::default();
        let r = build(portable, 0i8, q.clone());
        let inner: &PercpuRef<u64, Policy> = &arc;
        let mut batch = KillBatch::with_capacity(5);
        batch.push(&r).push(inner).push(&arc).push(&r).push(inner);
        assert_eq!(batch.len(), 5);
        let results = batch.kill();
        // The first entry of each ref gets the result; the rest were dead.
        assert_eq!(
            results,
            [
                Ok(()),
                Ok(()),
                Err(KillError::AlreadyDead),
                Err(KillError::AlreadyDead),
                Err(KillError::AlreadyDead),
            ]
        );
        assert_eq!((p.releases(), q.releases()), (1, 1));
        assert!(!p.0.bad.load(SeqCst) && !q.0.bad.load(SeqCst));
    }
}

#[test]
fn confirm_runs_once_when_every_ref_is_dead_everywhere_and_before_any_release() {
    for portable in common::tiers() {
        let policies: Vec<Policy> = (0..6).map(|_| Policy::default()).collect();
        let refs: Vec<PercpuRef<usize, Policy>> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| build(portable ^ (i % 2 == 0), i, p.clone()))
            .collect();
        // Hold one of them so its release waits for the holder.
        let held = refs[3].tryget_live().unwrap();
        let batch: KillBatch<'_> = refs.iter().map(|r| r as &dyn Killable).collect();
        let confirms = AtomicUsize::new(0);
        let results = batch.kill_and_confirm(|| {
            confirms.fetch_add(1, SeqCst);
            assert!(
                policies.iter().all(|p| p.releases() == 0),
                "a release ran before confirm"
            );
            // Every ref is dead for every thread.
            thread::scope(|s| {
                s.spawn(|| {
                    for r in &refs {
                        assert!(r.tryget_live().is_none());
                        assert!(r.is_dying());
                    }
                });
            });
        });
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(confirms.load(SeqCst), 1);
        for (i, p) in policies.iter().enumerate() {
            assert_eq!(p.releases(), usize::from(i != 3), "ref {i}");
        }
        drop(held);
        assert_eq!(policies[3].releases(), 1);
        // Confirm runs even when the batch killed nothing.
        let mut ran = false;
        let again = batch.kill_and_confirm(|| ran = true);
        assert!(ran && again.iter().all(|r| r.is_err()));
        // And on an empty batch.
        let mut ran = false;
        assert!(KillBatch::new().kill_and_confirm(|| ran = true).is_empty());
        assert!(ran);
    }
}

#[test]
fn a_panicking_confirm_still_completes_every_kill() {
    for portable in common::tiers() {
        let (pa, pb) = (Policy::default(), Policy::default());
        let a = build(portable, 1u8, pa.clone());
        let b = build(!portable, 2u16, pb.clone());
        let batch: KillBatch<'_> = [&a as &dyn Killable, &b].into_iter().collect();
        let err = catch_unwind(AssertUnwindSafe(|| {
            batch.kill_and_confirm(|| panic!("confirm failed"))
        }))
        .expect_err("the confirm panic propagates");
        assert_eq!(err.downcast_ref::<&str>(), Some(&"confirm failed"));
        assert_eq!((pa.releases(), pb.releases()), (1, 1));
        // The locks were released: revive works.
        a.reinit().unwrap();
        b.reinit().unwrap();
    }
}

#[test]
fn a_panicking_release_does_not_stop_the_other_releases() {
    for portable in common::tiers() {
        let ran = Arc::new(AtomicUsize::new(0));
        let boom = {
            let ran = Arc::clone(&ran);
            move |_: &u8| {
                ran.fetch_add(1, SeqCst);
                panic!("release failed")
            }
        };
        let fine = {
            let ran = Arc::clone(&ran);
            move |_: &u8| {
                ran.fetch_add(1, SeqCst);
            }
        };
        let a = build(portable, 0u8, boom.clone());
        let b = build(portable, 0u8, fine);
        let c = build(!portable, 0u8, boom);
        let err = catch_unwind(AssertUnwindSafe(|| kill_all(&[&a, &b, &c])))
            .expect_err("the release panic propagates");
        assert_eq!(err.downcast_ref::<&str>(), Some(&"release failed"));
        assert_eq!(ran.load(SeqCst), 3, "every release ran once");
        assert!(a.is_zero() && b.is_zero() && c.is_zero());
    }
}

#[test]
fn killing_a_batch_member_from_confirm_panics_and_releases_the_locks() {
    let (pa, pb) = (Policy::default(), Policy::default());
    let a = build(true, 0u8, pa.clone());
    let b = build(true, 0u8, pb.clone());
    let err = common::within("re-entrant kill", LIMIT, move || {
        let err = catch_unwind(AssertUnwindSafe(|| {
            kill_all(&[]);
            KillBatch::from_iter([&a as &dyn Killable, &b]).kill_and_confirm(|| {
                let _ = b.kill();
            })
        }))
        .expect_err("re-entrant lock panics instead of deadlocking");
        // Both are dead and released; their locks are free again.
        assert_eq!((pa.releases(), pb.releases()), (1, 1));
        a.reinit().unwrap();
        b.reinit().unwrap();
        err.downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    });
    assert!(err.contains("switch lock"), "{err}");
}

#[test]
fn a_release_may_revive_a_dying_ref_of_its_own_batch() {
    for portable in common::tiers() {
        let other: Arc<PercpuRef<u8, NoRelease>> = Arc::new(build(portable, 0, NoRelease));
        let revived = Arc::new(AtomicBool::new(false));
        let a = {
            let (other, revived) = (Arc::clone(&other), Arc::clone(&revived));
            build(portable, 0u8, move |_: &u8| {
                // Runs after the batch unlocked: taking locks is fine.
                other.resurrect().unwrap();
                revived.store(true, SeqCst);
            })
        };
        let held = other.tryget().unwrap();
        common::within("release reviving a batch member", LIMIT, {
            let other = Arc::clone(&other);
            move || {
                let results = kill_all(&[&*other, &a]);
                assert!(results.iter().all(Result::is_ok));
            }
        });
        drop(held);
        assert!(revived.load(SeqCst));
        assert!(!other.is_dying() && other.tryget_live().is_some());
    }
}

/// A release policy chosen at run time.
type DynRelease = Box<dyn Fn(&u8) + Send + Sync>;

/// Two refs in one allocation: `first` comes first in address order, so
/// the batch runs its release first.
#[repr(C)]
struct Pair<P: ReleasePolicy<u8>> {
    first: PercpuRef<u8, DynRelease>,
    second: PercpuRef<u8, P>,
}

/// The release of one batch member reinitialises another member whose
/// release the batch claimed but has not run yet: the reinit runs that
/// release itself (once), instead of waiting for the thread it is on.
#[test]
fn a_release_may_reinit_a_drained_ref_of_its_own_batch() {
    for portable in common::tiers() {
        common::within(
            "release reinitialising a drained batch member",
            LIMIT,
            move || {
                let second = Policy::default();
                let order = Arc::new(std::sync::Mutex::new(Vec::new()));
                let pair: Arc<Pair<Policy>> =
                    Arc::new_cyclic(|weak: &std::sync::Weak<Pair<Policy>>| {
                        let (weak, order) = (weak.clone(), Arc::clone(&order));
                        Pair {
                            first: build(
                                portable,
                                1,
                                Box::new(move |_: &u8| {
                                    let pair = weak.upgrade().expect("alive during the batch");
                                    order.lock().unwrap().push("first: reinit second");
                                    pair.second.reinit().expect("second drained");
                                    order.lock().unwrap().push("first: done");
                                }) as DynRelease,
                            ),
                            second: build(!portable, 2, second.clone()),
                        }
                    });
                let results = kill_all(&[&pair.second, &pair.first]);
                assert_eq!(results, [Ok(()), Ok(())]);
                assert_eq!(second.releases(), 1, "the old life released exactly once");
                assert_eq!(second.0.reinits.load(SeqCst), 1);
                assert!(!pair.second.is_dying(), "the new life is live");
                assert_eq!(
                    *order.lock().unwrap(),
                    ["first: reinit second", "first: done"]
                );
                // The new life ends normally.
                pair.second.kill().unwrap();
                assert_eq!(second.releases(), 2);
                assert!(!second.0.bad.load(SeqCst));
            },
        );
    }
}

#[test]
fn batched_switch_to_atomic_keeps_counts_and_sticks_across_revives() {
    for portable in common::tiers() {
        let done = Completion::new();
        let a = build(portable, 1u32, done.clone());
        let b = PercpuArc::new(String::new(), NoRelease);
        let held: Vec<_> = (0..10).map(|_| a.tryget().unwrap()).collect();
        let mut batch = KillBatch::new();
        batch.push(&a).push(&b).push(&a);
        batch.switch_to_atomic();
        assert_eq!((a.mode(), b.mode()), (Mode::Atomic, Mode::Atomic));
        a.kill().unwrap();
        a.resurrect().unwrap();
        assert_eq!(a.mode(), Mode::Atomic, "forced atomic survives resurrect");
        a.kill().unwrap();
        assert!(!done.is_complete());
        drop(held);
        assert!(done.is_complete(), "the folded count drained exactly");
        assert!(a.check().is_ok());
        a.switch_to_percpu().unwrap();
        b.switch_to_percpu().unwrap();
        assert_eq!(b.mode(), Mode::Percpu);
    }
}

/// Two batches with the same refs in opposite orders, racing: they lock by
/// address, so neither waits for the other in a cycle; every ref is killed
/// by exactly one of them.
#[test]
fn overlapping_batches_in_opposite_orders_never_deadlock() {
    for portable in common::tiers() {
        common::within("opposite-order batches", LIMIT, move || {
            for _ in 0..rounds(2000) {
                let policies: Vec<Policy> = (0..4).map(|_| Policy::default()).collect();
                let refs: Vec<_> = policies
                    .iter()
                    .map(|p| build(portable, 0u8, p.clone()))
                    .collect();
                let fwd: KillBatch<'_> = refs.iter().map(|r| r as &dyn Killable).collect();
                let (x, y) = thread::scope(|s| {
                    let t = s.spawn(|| {
                        let rev: Vec<&dyn Killable> =
                            refs.iter().rev().map(|r| r as &dyn Killable).collect();
                        kill_all(&rev)
                    });
                    (fwd.kill(), t.join().unwrap())
                });
                for i in 0..4 {
                    let oks = usize::from(x[i].is_ok()) + usize::from(y[3 - i].is_ok());
                    assert_eq!(oks, 1, "ref {i} killed by exactly one batch");
                    assert_eq!(policies[i].releases(), 1);
                }
            }
        });
    }
}

/// Batches (with duplicates, both tiers mixed) race threads that get and
/// put and a thread that resurrects: every killed life releases exactly
/// once, never while a holder is alive, and the final count drains.
#[test]
fn stress_batches_racing_get_put_and_resurrect() {
    common::within("batch stress", LIMIT, || {
        const REFS: usize = 8;
        let tiers = common::tiers();
        let policies: Vec<Policy> = (0..REFS).map(|_| Policy::default()).collect();
        let refs: Vec<PercpuRef<usize, Policy>> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| build(tiers[i % tiers.len()], i, p.clone()))
            .collect();
        let stop = AtomicBool::new(false);
        let kills = AtomicUsize::new(0);
        let revives = AtomicUsize::new(0);
        thread::scope(|s| {
            for t in 0..2 {
                let (refs, policies, stop) = (&refs, &policies, &stop);
                s.spawn(move || {
                    let mut i = t;
                    while !stop.load(SeqCst) {
                        i = (i + 1) % REFS;
                        let got = if i % 2 == 0 {
                            refs[i].tryget_live()
                        } else {
                            refs[i].tryget()
                        };
                        if let Some(r) = got {
                            policies[i].0.holders.fetch_add(1, SeqCst);
                            let again = r.clone();
                            assert_eq!(*again, i);
                            policies[i].0.holders.fetch_sub(1, SeqCst);
                            drop((r, again));
                        }
                    }
                });
            }
            {
                let (refs, stop, revives) = (&refs, &stop, &revives);
                s.spawn(move || {
                    let mut i = 0;
                    while !stop.load(SeqCst) {
                        i = (i + 3) % REFS;
                        match refs[i].resurrect() {
                            Ok(()) => {
                                revives.fetch_add(1, SeqCst);
                            }
                            Err(ReviveError::Live) => thread::yield_now(),
                            Err(e) => panic!("resurrect: {e}"),
                        }
                    }
                });
            }
            let start = Instant::now();
            let mut round = 0;
            while kills.load(SeqCst) < rounds(5000) && start.elapsed() < Duration::from_secs(10) {
                round += 1;
                // Revive one ref here too, so lives keep coming.
                if refs[round % REFS].resurrect().is_ok() {
                    revives.fetch_add(1, SeqCst);
                }
                // A rotating subset, with a duplicate.
                let mut batch = KillBatch::new();
                for k in 0..5 {
                    batch.push(&refs[(round + k * 3) % REFS]);
                }
                batch.push(&refs[round % REFS]);
                for r in batch.kill() {
                    match r {
                        Ok(()) => {
                            kills.fetch_add(1, SeqCst);
                        }
                        Err(KillError::AlreadyDead) => {}
                        Err(e) => panic!("kill: {e}"),
                    }
                }
                if round % 7 == 0 {
                    KillBatch::from_iter(refs.iter().map(|r| r as &dyn Killable))
                        .switch_to_atomic();
                    for r in &refs {
                        let _ = r.switch_to_percpu();
                    }
                }
            }
            stop.store(true, SeqCst);
        });
        // Quiet now: kill what is live, every life drains.
        for r in kill_all(&refs.iter().map(|r| r as &dyn Killable).collect::<Vec<_>>()) {
            if r.is_ok() {
                kills.fetch_add(1, SeqCst);
            }
        }
        let releases: usize = policies.iter().map(Policy::releases).sum();
        let reinits: usize = policies.iter().map(|p| p.0.reinits.load(SeqCst)).sum();
        // Each killed life ends in exactly one release, or in a resurrect
        // that did not reinitialise (a reinit follows a release).
        let resurrected_dying = revives.load(SeqCst) - reinits;
        assert!(kills.load(SeqCst) > rounds(500), "too few lives to stress");
        assert_eq!(releases + resurrected_dying, kills.load(SeqCst));
        for (i, (r, p)) in refs.iter().zip(&policies).enumerate() {
            assert!(
                !p.0.bad.load(SeqCst),
                "ref {i}: release while held or twice"
            );
            assert!(r.is_zero(), "ref {i} drained");
            assert!(r.check().is_ok(), "ref {i}: count exact");
        }
    });
}
