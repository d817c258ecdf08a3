//! Lifecycle races and panics: exactly one release per killed life, under
//! every interleaving, also when callbacks panic or revive the ref from
//! inside its own release. Every test that could hang runs under a time
//! limit, so a regression fails instead of stalling the suite.
//!
//! The races are also modelled exhaustively in `tests/loom_percpu.rs`; the
//! tests here run them on real threads, on both counting tiers.
#![cfg(not(percpu_ref_model))]

use percpu_ref::{
    Completion, KillError, Mode, NoRelease, PercpuArc, PercpuRef, Ref, ReleasePolicy, ReviveError,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

mod common;

const LIMIT: Duration = Duration::from_secs(20);

/// [`LIMIT`] times `PERCPU_REF_TEST_TIME_SCALE` (a whole number, default
/// 1), for slow machines: in the emulated arm64 guest a `membarrier` waits
/// for 4 vCPUs that share 2 host cores, and the kill-heavy loops here take
/// most of 20 s without hanging.
fn limit() -> Duration {
    let scale = std::env::var("PERCPU_REF_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(1);
    LIMIT * scale
}

fn rounds(n: usize) -> usize {
    if cfg!(miri) {
        3
    } else {
        n
    }
}

fn build<T, P: ReleasePolicy<T>>(portable: bool, value: T, policy: P) -> PercpuRef<T, P> {
    let b = PercpuRef::builder(value).release(policy);
    if portable {
        b.portable().build()
    } else {
        b.build()
    }
}

/// A `resurrect` racing `kill_and_confirm` must wait for the confirm
/// callback: inside it every `tryget_live` fails, on every thread.
#[test]
fn resurrect_waits_for_a_pending_confirm() {
    for portable in common::tiers() {
        common::within("kill_and_confirm vs resurrect", limit(), move || {
            let mut revived = 0;
            for _ in 0..rounds(3000) {
                let r = build(portable, 0u32, NoRelease);
                let go = AtomicBool::new(false);
                thread::scope(|s| {
                    let t = s.spawn(|| {
                        while !go.load(SeqCst) {
                            std::hint::spin_loop();
                        }
                        r.resurrect()
                    });
                    go.store(true, SeqCst);
                    r.kill_and_confirm(|| {
                        // Give a racing resurrect every chance to slip in.
                        thread::yield_now();
                        assert!(r.tryget_live().is_none(), "confirm ran on a live ref");
                    })
                    .unwrap();
                    revived += usize::from(t.join().unwrap().is_ok());
                });
            }
            revived
        });
    }
}

/// `reinit` must not return while the previous life's release is still
/// running on another thread.
#[test]
fn reinit_waits_for_a_running_release() {
    for portable in common::tiers() {
        common::within("reinit vs a slow release", limit(), move || {
            let running = Arc::new(AtomicBool::new(false));
            let released = Arc::new(AtomicUsize::new(0));
            let (run, rel) = (running.clone(), released.clone());
            let r = PercpuRef::builder(0u32)
                .allow_reinit()
                .release(move |_: &u32| {
                    run.store(true, SeqCst);
                    thread::sleep(Duration::from_millis(50));
                    rel.fetch_add(1, SeqCst);
                    run.store(false, SeqCst);
                });
            let r = if portable { r.portable() } else { r }.build();
            let g = Ref::into_raw(r.tryget().unwrap());
            r.kill().unwrap();
            thread::scope(|s| {
                // SAFETY: the raw reference taken above, put once.
                s.spawn(|| unsafe { g.put_many(1) });
                while !running.load(SeqCst) {
                    std::hint::spin_loop();
                }
                r.reinit().unwrap();
                assert!(!running.load(SeqCst), "reinit returned during the release");
                assert_eq!(released.load(SeqCst), 1);
            });
            assert!(r.tryget_live().is_some());
        });
    }
}

/// After a sticky underflow, every later life is still released exactly
/// once, even when `reinit` races the final put.
#[test]
fn reinit_after_underflow_never_skips_or_doubles_a_release() {
    for portable in common::tiers() {
        common::within("reinit vs final put after underflow", limit(), move || {
            let released = Arc::new(AtomicUsize::new(0));
            let rel = released.clone();
            let b = PercpuRef::builder(0u32)
                .allow_reinit()
                .release(move |_: &u32| {
                    rel.fetch_add(1, SeqCst);
                });
            let r = if portable { b.portable() } else { b }.build();
            // Documented misuse: one put too many, counted on the slots;
            // the kill's fold finds the count at zero and releases.
            // SAFETY: breaks the put_many contract on purpose, holding
            // nothing else.
            unsafe { r.put_many(1) };
            assert!(r.kill().is_err());
            assert!(r.check().is_err());
            assert_eq!(released.load(SeqCst), 1);
            let mut lives = 1;
            for _ in 0..rounds(1000) {
                r.reinit().unwrap();
                let g = Ref::into_raw(r.tryget().unwrap());
                assert!(matches!(r.kill(), Err(KillError::Underflow { .. })));
                thread::scope(|s| {
                    // SAFETY: the raw reference taken above, put once.
                    s.spawn(|| unsafe { g.put_many(1) });
                    loop {
                        match r.reinit() {
                            Ok(()) => break,
                            Err(ReviveError::NotDrained) => thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
                lives += 1;
                assert_eq!(released.load(SeqCst), lives, "a release skipped or doubled");
                let _ = r.kill();
                lives += 1;
                assert_eq!(released.load(SeqCst), lives);
            }
        });
    }
}

/// A ref whose release revives it (a `fn` pointer is a nameable policy).
type SelfReviving = PercpuRef<u32, fn(&u32)>;
static SELF_REVIVING: OnceLock<SelfReviving> = OnceLock::new();
static SELF_REVIVED: AtomicUsize = AtomicUsize::new(0);

fn reinit_from_own_release(_: &u32) {
    let r = SELF_REVIVING.get().unwrap();
    r.reinit().expect("reinit from inside the release");
    r.switch_to_atomic();
    r.switch_to_percpu().unwrap();
    SELF_REVIVED.fetch_add(1, SeqCst);
}

/// A release may switch and revive its own ref: it never runs under the
/// switch lock, also when the fold of a kill is what reached zero.
#[test]
fn a_release_may_revive_and_switch_its_own_ref() {
    common::within("release calling reinit", limit(), || {
        let r = SELF_REVIVING.get_or_init(|| {
            PercpuRef::builder(0u32)
                .allow_reinit()
                .release(reinit_from_own_release as fn(&u32))
                .build()
        });
        // A plain kill: the initial put reaches zero under the lock.
        r.kill().unwrap();
        assert_eq!(SELF_REVIVED.load(SeqCst), 1);
        assert!(!r.is_dying() && r.tryget_live().is_some());
        // An over-put counted on the slots: the kill's fold reaches zero.
        // SAFETY: documented misuse on purpose; nothing else is held.
        unsafe { r.put_many(1) };
        assert!(matches!(r.kill(), Err(KillError::Underflow { .. })));
        assert_eq!(SELF_REVIVED.load(SeqCst), 2);
        assert!(r.tryget_live().is_some());
    });
}

/// A panicking confirm callback: the kill completes (the initial reference
/// is dropped, the release runs, nothing stays locked) and the panic
/// propagates.
#[test]
fn a_panicking_confirm_still_drops_the_initial_reference() {
    for portable in common::tiers() {
        common::within("panicking confirm", limit(), move || {
            let done = Completion::new();
            let r = build(portable, 0u32, done.clone());
            let p = catch_unwind(AssertUnwindSafe(|| {
                r.kill_and_confirm(|| panic!("confirm failed"))
            }));
            assert!(p.is_err(), "the panic propagates");
            assert!(done.is_complete(), "the initial reference was not dropped");
            assert!(r.is_zero() && r.is_dying());
            assert_eq!(r.kill(), Err(KillError::AlreadyDead), "the lock is free");
        });
    }
}

/// A panicking release: the panic reaches the thread whose put ran it, the
/// ref counts the release as done (reinit works), and an owned ref's
/// allocation is still freed (the value is dropped).
#[test]
fn a_panicking_release_finishes_its_bookkeeping() {
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    struct Value;
    impl Drop for Value {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, SeqCst);
        }
    }
    common::within("panicking release", limit(), || {
        let r = PercpuArc::new(Value, |_: &Value| panic!("release failed"));
        let o = r.tryget_owned().unwrap();
        drop(r); // orphaned: the last put releases and frees
        let p = catch_unwind(AssertUnwindSafe(move || drop(o)));
        assert!(p.is_err(), "the release's panic propagates");
        assert_eq!(DROPPED.load(SeqCst), 1, "the value leaked");

        let r = PercpuRef::builder(0u32)
            .allow_reinit()
            .release(|_: &u32| panic!("release failed"))
            .build();
        assert!(catch_unwind(AssertUnwindSafe(|| r.kill())).is_err());
        r.reinit().expect("the release counts as done");
        assert!(r.tryget_live().is_some());
    });
}

/// A `kill_and_confirm` callback that touches its own ref's lock panics
/// with a message instead of deadlocking.
#[test]
fn switching_inside_confirm_panics_instead_of_deadlocking() {
    common::within("re-entrant switch", limit(), || {
        let r = PercpuRef::new(0u32, NoRelease);
        let p = catch_unwind(AssertUnwindSafe(|| {
            let _ = r.kill_and_confirm(|| r.switch_to_atomic());
        }));
        let msg = p.unwrap_err();
        let msg = msg
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| msg.downcast_ref::<&str>().copied())
            .unwrap_or("");
        assert!(msg.contains("kill_and_confirm callback"), "{msg}");
        assert!(r.is_zero(), "the kill completed");
    });
}

/// A `Completion` follows the ref across `reinit`: `wait()` waits for the
/// current life, with no manual reset.
#[test]
fn completion_waits_for_the_current_life_after_reinit() {
    common::within("completion across lives", limit(), || {
        let done = Completion::new();
        let r = PercpuRef::builder(0u32)
            .allow_reinit()
            .release(done.clone())
            .build();
        r.kill().unwrap();
        assert!(done.is_complete());
        r.reinit().unwrap();
        assert!(!done.is_complete());
        let held = r.tryget().unwrap();
        r.kill().unwrap();
        assert!(!done.wait_timeout(Duration::from_millis(10)), "held");
        thread::scope(|s| {
            s.spawn(move || {
                thread::sleep(Duration::from_millis(10));
                drop(held);
            });
            done.wait();
        });
        assert!(done.is_complete());
    });
}

/// Owned references keep the value and memory alive after every handle is
/// gone, on both tiers, while other threads clone and drop them.
#[test]
fn owned_refs_outlive_their_handles_on_both_tiers() {
    for portable in common::tiers() {
        common::within("owned refs after the handles", limit(), move || {
            for _ in 0..rounds(200) {
                let done = Completion::new();
                let b = PercpuRef::builder(vec![7u8; 64]).release(done.clone());
                let r = if portable { b.portable() } else { b }.build_arc();
                let owned: Vec<_> = (0..4).map(|_| r.tryget_live_owned().unwrap()).collect();
                let r2 = r.clone();
                thread::scope(|s| {
                    for o in owned {
                        s.spawn(move || {
                            for _ in 0..100 {
                                let c = o.clone();
                                assert_eq!(c[63], 7);
                            }
                        });
                    }
                    s.spawn(move || drop(r2));
                    drop(r);
                });
                assert!(done.is_complete());
            }
        });
    }
}

/// Revives are refused once every owner is gone.
#[test]
fn an_orphaned_ref_cannot_be_revived() {
    let r = PercpuArc::new(0u32, NoRelease);
    let o = r.tryget_owned().unwrap();
    drop(r);
    let inner = percpu_ref::OwnedRef::percpu_ref(&o);
    assert!(inner.is_dying());
    assert_eq!(inner.resurrect(), Err(ReviveError::Orphaned));
    assert_eq!(inner.mode(), Mode::Atomic);
}

/// A `fork()` child of a process whose other threads create, kill, drop
/// and wait on refs can still create, kill, switch and drop refs of its
/// own: the crate's process-wide locks (the per-CPU column arena, the
/// portable tier's keys, the wait buckets) are never inherited held.
#[test]
#[cfg(target_os = "linux")]
#[cfg_attr(miri, ignore = "fork")]
fn a_fork_child_uses_refs_while_parent_threads_churn_them() {
    for portable in common::tiers() {
        let stop = Arc::new(AtomicBool::new(false));
        // Takes and gives back columns (and keys) all the time.
        let churn = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let r = build(portable, 0u32, NoRelease);
                    drop(r.tryget());
                    r.kill().unwrap();
                }
            })
        };
        // Two threads switching one ref: the loser waits for the switch
        // lock in a wait bucket.
        let shared = Arc::new(build(portable, 0u32, NoRelease));
        let switchers: Vec<_> = (0..2)
            .map(|_| {
                let (stop, r) = (Arc::clone(&stop), Arc::clone(&shared));
                thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        r.switch_to_atomic_sync();
                        r.switch_to_percpu().unwrap();
                    }
                })
            })
            .collect();
        let inherited = build(portable, 0u32, NoRelease);
        for round in 0..rounds(200) {
            let code = common::in_fork_child(limit(), || {
                let mine = build(portable, 7u32, NoRelease);
                match mine.tryget() {
                    Some(got) if *got == 7 => drop(got),
                    _ => return 1,
                }
                mine.switch_to_atomic_sync();
                if mine.switch_to_percpu().is_err() {
                    return 4;
                }
                if mine.kill().is_err() || mine.tryget_live().is_some() {
                    return 2;
                }
                drop(mine);
                // A parent's ref no other thread used: as it was at the
                // fork. (One that another thread was switching may be
                // locked for good in the child, like any mutex.)
                if inherited.kill().is_err() {
                    return 3;
                }
                0
            });
            assert_eq!(code, 0, "round {round}: the child's check {code} failed");
        }
        stop.store(true, SeqCst);
        churn.join().unwrap();
        for s in switchers {
            s.join().unwrap();
        }
    }
}
