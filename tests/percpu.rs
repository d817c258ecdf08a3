//! Semantics of `PercpuRef` (tryget and tryget_live across a kill,
//! exactly-once release, modes, revives, misuse, policies) and bounded
//! stress tests. Iteration counts shrink under Miri.

use percpu_ref::{
    Completion, KillError, Mode, NoRelease, OwnedRef, PercpuArc, PercpuRef, Ref, ReleasePolicy,
    ReviveError, Tier,
};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;

const fn scaled(n: usize) -> usize {
    if cfg!(miri) {
        n / 500 + 2
    } else {
        n
    }
}

/// Both counting tiers (the rseq one only where it is available; the
/// portable one always), so every test below that loops over them checks
/// the same semantics on each.
fn tiers() -> Vec<TierChoice> {
    let mut v = vec![TierChoice::Portable];
    if percpu_ref::init() == Tier::Rseq {
        v.push(TierChoice::Default);
    }
    v
}

#[derive(Debug, Clone, Copy)]
enum TierChoice {
    Default,
    Portable,
}

impl TierChoice {
    fn build<T, P: ReleasePolicy<T>>(self, value: T, policy: P) -> PercpuRef<T, P> {
        let b = PercpuRef::builder(value).release(policy);
        let r = match self {
            TierChoice::Default => b.build(),
            TierChoice::Portable => b.portable().build(),
        };
        if let TierChoice::Portable = self {
            assert_eq!(r.tier(), Tier::Portable);
        }
        r
    }
}

/// Counts releases; asserts that no tracked reference is alive when the
/// release runs.
#[derive(Default)]
struct Probe {
    releases: AtomicUsize,
    live_refs: AtomicUsize,
    release_while_held: AtomicBool,
}

impl<T> ReleasePolicy<T> for &Probe {
    fn release(&self, _: &T) {
        if self.live_refs.load(SeqCst) != 0 {
            self.release_while_held.store(true, SeqCst);
        }
        self.releases.fetch_add(1, SeqCst);
    }
}

fn counting() -> (Arc<AtomicUsize>, impl Fn(&u32) + Send + Sync + 'static) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = Arc::clone(&n);
    (n, move |_: &u32| {
        m.fetch_add(1, SeqCst);
    })
}

// 1. tryget works while dying; tryget_live fails everywhere after confirm.
#[test]
fn tryget_succeeds_on_dying_ref_and_tryget_live_fails_after_confirm() {
    let (released, f) = counting();
    let r = PercpuRef::new(5u32, f);
    let held = r.tryget_live().unwrap();
    r.kill().unwrap();
    assert!(r.is_dying());
    let late = r.tryget().expect("tryget must succeed while the count > 0");
    assert_eq!(*late, 5);
    assert!(r.tryget_live().is_none());
    drop(late);
    assert_eq!(released.load(SeqCst), 0);
    drop(held);
    assert_eq!(released.load(SeqCst), 1);
    assert!(r.tryget().is_none(), "released: count is zero");
}

#[test]
fn tryget_live_fails_on_every_thread_once_confirm_ran() {
    for tier in tiers() {
        for _ in 0..scaled(50) {
            let r = tier.build(0u32, NoRelease);
            let confirmed = AtomicBool::new(false);
            let stop = AtomicBool::new(false);
            let violations = AtomicUsize::new(0);
            let before = AtomicUsize::new(0);
            let checked_after = AtomicUsize::new(0);
            thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        while !stop.load(SeqCst) {
                            let seen = confirmed.load(SeqCst);
                            let got = r.tryget_live();
                            match (seen, got.is_some()) {
                                (true, true) => {
                                    violations.fetch_add(1, SeqCst);
                                }
                                (true, false) => {
                                    checked_after.fetch_add(1, SeqCst);
                                }
                                (false, true) => {
                                    before.fetch_add(1, SeqCst);
                                }
                                (false, false) => {}
                            }
                        }
                    });
                }
                let keep = r.tryget().unwrap();
                // Kill while the spinners are taking references.
                while before.load(SeqCst) < 10 {
                    std::hint::spin_loop();
                }
                r.kill_and_confirm(|| confirmed.store(true, SeqCst))
                    .unwrap();
                assert!(r.tryget_live().is_none());
                // Until both spinners have checked after the confirmation.
                while checked_after.load(SeqCst) < 20 {
                    std::hint::spin_loop();
                }
                stop.store(true, SeqCst);
                drop(keep);
            });
            assert_eq!(violations.load(SeqCst), 0, "{tier:?}");
            assert!(r.is_zero());
        }
    }
}

// 2. Exactly once, when the last reference drops, from whichever thread.
#[test]
fn release_runs_once_on_the_thread_dropping_the_last_reference() {
    let release_thread = Arc::new(std::sync::Mutex::new(None));
    let rt = Arc::clone(&release_thread);
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let r = PercpuArc::new(1u32, move |_: &u32| {
        c.fetch_add(1, SeqCst);
        *rt.lock().unwrap() = Some(thread::current().id());
    });
    let held: OwnedRef<u32, _> = r.tryget_owned().unwrap();
    r.kill().unwrap();
    assert_eq!(count.load(SeqCst), 0, "a reference is outstanding");
    let dropper = thread::spawn(move || {
        drop(held);
        thread::current().id()
    });
    let dropper_id = dropper.join().unwrap();
    assert_eq!(count.load(SeqCst), 1);
    assert_eq!(*release_thread.lock().unwrap(), Some(dropper_id));
}

#[test]
fn release_never_runs_while_a_ref_exists_and_never_without_kill() {
    let probe = Probe::default();
    {
        let r = PercpuRef::new(0u32, &probe);
        let a = r.tryget().unwrap();
        let b = a.clone();
        drop(a);
        drop(b);
        // Never killed: dropping the ref does not release.
    }
    assert_eq!(probe.releases.load(SeqCst), 0);

    let r = PercpuRef::new(0u32, &probe);
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..scaled(10_000) {
                    if let Some(g) = r.tryget() {
                        probe.live_refs.fetch_add(1, SeqCst);
                        let g2 = g.clone();
                        drop(g);
                        probe.live_refs.fetch_sub(1, SeqCst);
                        drop(g2);
                    }
                }
            });
        }
        thread::yield_now();
        r.kill().unwrap();
    });
    assert_eq!(probe.releases.load(SeqCst), 1);
    assert!(!probe.release_while_held.load(SeqCst));
}

// 3. confirm runs exactly once, and before the release.
#[test]
fn confirm_runs_once_before_release() {
    let order = std::sync::Mutex::new(Vec::new());
    let r = PercpuRef::new(0u32, |_: &u32| order.lock().unwrap().push("release"));
    r.kill_and_confirm(|| order.lock().unwrap().push("confirm"))
        .unwrap();
    assert_eq!(
        r.kill_and_confirm(|| order.lock().unwrap().push("confirm")),
        Err(KillError::AlreadyDead)
    );
    assert_eq!(*order.lock().unwrap(), ["confirm", "release"]);
}

// 4. Mode switches under concurrent get/put keep the count exact.
#[test]
fn mode_switches_under_concurrent_get_put_keep_count_exact() {
    let (released, f) = counting();
    let r = PercpuRef::new(0u32, f);
    let stop = AtomicBool::new(false);
    let outstanding = std::sync::Mutex::new(Vec::<Ref<'_, u32, _>>::new());
    let started = AtomicUsize::new(0);
    thread::scope(|s| {
        for t in 0..2 {
            let r = &r;
            let outstanding = &outstanding;
            let stop = &stop;
            let started = &started;
            s.spawn(move || {
                let mut mine = Vec::new();
                let mut i = 0usize;
                while !stop.load(SeqCst) {
                    i += 1;
                    if i == 100 {
                        started.fetch_add(1, SeqCst);
                    }
                    let g = r.tryget().unwrap();
                    // Keep some references across switches, drop others.
                    if (i + t) % 7 == 0 {
                        mine.push(g.clone());
                    }
                    if mine.len() > 20 {
                        drop(mine.swap_remove(i % mine.len()));
                    }
                }
                outstanding.lock().unwrap().extend(mine);
            });
        }
        while started.load(SeqCst) < 2 {
            thread::yield_now();
        }
        for i in 0..scaled(2000) {
            if i % 2 == 0 {
                r.switch_to_atomic();
                assert_eq!(r.mode(), Mode::Atomic);
            } else {
                r.switch_to_percpu().unwrap();
                assert_eq!(r.mode(), Mode::Percpu);
            }
        }
        stop.store(true, SeqCst);
    });
    let held = outstanding.into_inner().unwrap();
    assert!(!held.is_empty(), "both threads ran 100+ iterations");
    assert!(r.check().is_ok());
    r.kill().unwrap();
    // Exact: the count is precisely the references still held.
    assert_eq!(released.load(SeqCst), 0);
    let n = held.len();
    for (i, g) in held.into_iter().enumerate() {
        assert!(!r.is_zero(), "count hit zero with {} refs left", n - i);
        drop(g);
    }
    assert!(r.is_zero());
    assert_eq!(released.load(SeqCst), 1);
}

#[test]
fn switch_to_percpu_on_a_dead_ref_applies_at_resurrect() {
    let r = PercpuRef::builder(0u32).atomic().build();
    let g = r.tryget().unwrap();
    r.kill().unwrap();
    r.switch_to_percpu().unwrap();
    assert_eq!(r.mode(), Mode::Atomic, "dead refs stay atomic");
    r.resurrect().unwrap();
    assert_eq!(r.mode(), Mode::Percpu);
    drop(g);
    assert!(!r.is_zero());
}

#[test]
fn forced_atomic_stays_atomic_across_resurrect() {
    let r = PercpuRef::new(0u32, NoRelease);
    r.switch_to_atomic_sync();
    let g = r.tryget().unwrap();
    r.kill().unwrap();
    r.resurrect().unwrap();
    assert_eq!(r.mode(), Mode::Atomic);
    drop(g);
    r.switch_to_percpu().unwrap();
    assert_eq!(r.mode(), Mode::Percpu);
}

// 5. resurrect, reinit and their misuse.
#[test]
fn resurrect_makes_a_dying_ref_live_again() {
    let (released, f) = counting();
    let r = PercpuRef::new(0u32, f);
    let g = r.tryget().unwrap();
    r.kill().unwrap();
    assert!(r.tryget_live().is_none());
    r.resurrect().unwrap();
    assert!(!r.is_dying());
    assert_eq!(r.mode(), Mode::Percpu);
    assert!(r.tryget_live().is_some());
    drop(g);
    assert_eq!(released.load(SeqCst), 0, "resurrected: initial ref back");
    r.kill().unwrap();
    assert_eq!(released.load(SeqCst), 1);
}

#[test]
fn misuse_returns_typed_errors_and_changes_nothing() {
    let (released, f) = counting();
    let r = PercpuRef::new(0u32, f);
    assert_eq!(r.resurrect(), Err(ReviveError::Live));
    assert_eq!(r.reinit(), Err(ReviveError::Live));
    assert_eq!(r.mode(), Mode::Percpu);
    assert!(!r.is_dying());

    let g = r.tryget().unwrap();
    r.kill().unwrap();
    assert_eq!(r.kill(), Err(KillError::AlreadyDead));
    assert!(
        !r.is_zero(),
        "a second kill must not drop another reference"
    );
    drop(g);
    assert_eq!(released.load(SeqCst), 1);
    // Released without allow_reinit.
    assert_eq!(r.resurrect(), Err(ReviveError::ReinitNotAllowed));
    assert_eq!(r.reinit(), Err(ReviveError::ReinitNotAllowed));
    assert!(r.is_zero() && r.is_dying());
    assert!(r.tryget().is_none());
    assert_eq!(released.load(SeqCst), 1);
    // Errors render with a reason.
    assert!(ReviveError::ReinitNotAllowed
        .to_string()
        .contains("allow_reinit"));
}

#[test]
fn reinit_after_release_needs_allow_reinit_and_works_repeatedly() {
    let (released, f) = counting();
    let r = PercpuRef::builder(0u32).release(f).allow_reinit().build();
    for round in 1..=3 {
        let g = r.tryget().unwrap();
        r.kill().unwrap();
        assert_eq!(r.reinit(), Err(ReviveError::NotDrained));
        drop(g);
        assert_eq!(released.load(SeqCst), round);
        r.reinit().unwrap();
        assert!(!r.is_dying());
        assert_eq!(r.mode(), Mode::Percpu);
        assert!(r.tryget_live().is_some());
    }
    // resurrect on a released ref with allow_reinit is a reinit.
    r.kill().unwrap();
    assert_eq!(released.load(SeqCst), 4);
    r.resurrect().unwrap();
    assert!(r.tryget_live().is_some());
}

#[test]
fn dead_builder_starts_released_and_reinit_activates_it() {
    let (released, f) = counting();
    let r = PercpuRef::builder(0u32).release(f).dead().build();
    assert!(r.is_dying() && r.is_zero());
    assert!(r.tryget().is_none() && r.tryget_live().is_none());
    assert_eq!(r.kill(), Err(KillError::AlreadyDead));
    assert_eq!(released.load(SeqCst), 0, "no release for the initial state");
    r.reinit().unwrap();
    assert!(r.tryget_live().is_some());
    r.kill().unwrap();
    assert_eq!(released.load(SeqCst), 1);
}

// 6. Underflow: detected when summed, reported, never a second release.
#[test]
fn underflow_is_detected_when_summed_and_never_releases_twice() {
    let (released, f) = counting();
    let r = PercpuRef::new(0u32, f);
    // SAFETY: (test) deliberately unbalanced, to exercise detection. No
    // `Ref` is alive, so no one relies on the count.
    unsafe { r.put_many(3) };
    assert!(
        r.check().is_ok(),
        "percpu puts are only checked when summed"
    );
    match r.kill() {
        Err(KillError::Underflow { count }) => assert_eq!(count, -3),
        other => panic!("expected underflow, got {other:?}"),
    }
    assert!(r.check().is_err());
    assert!(released.load(SeqCst) <= 1);
    // SAFETY: (test) as above.
    unsafe {
        r.get_many(3);
        r.put_many(3);
    }
    assert!(released.load(SeqCst) <= 1, "release ran twice");
}

#[test]
fn underflow_in_atomic_mode_is_flagged_without_release() {
    let (released, f) = counting();
    let r = PercpuRef::builder(0u32).release(f).atomic().build();
    // SAFETY: (test) deliberately drops the owner's initial reference.
    unsafe { r.put_many(1) };
    assert!(r.check().is_err(), "zero on a live ref is an underflow");
    assert_eq!(released.load(SeqCst), 0, "never released without kill");
}

// 7. Dropping a never-killed ref drops T, no release.
#[test]
fn dropping_a_live_ref_drops_the_value_without_release() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let released = AtomicBool::new(false);
    {
        let r = PercpuRef::new(Flag(Arc::clone(&dropped)), |_: &Flag| {
            released.store(true, SeqCst)
        });
        let _g = r.tryget().unwrap();
    }
    assert!(dropped.load(SeqCst));
    assert!(!released.load(SeqCst));
}

// Raw references round-trip.
#[test]
fn raw_references_round_trip() {
    let (released, f) = counting();
    let r = PercpuRef::new(9u32, f);
    let raw = Ref::into_raw(r.tryget().unwrap());
    r.kill().unwrap();
    assert_eq!(released.load(SeqCst), 0, "the raw reference holds it");
    // SAFETY: `raw` carries the one reference taken above.
    let back = unsafe { Ref::from_raw(raw) };
    assert_eq!(*back, 9);
    drop(back);
    assert_eq!(released.load(SeqCst), 1);

    let r2 = PercpuArc::new(1u32, NoRelease);
    let owned = r2.tryget_owned().unwrap();
    let raw = OwnedRef::into_raw(owned);
    // SAFETY: the count from `owned` is still held by `raw`.
    unsafe { r2.get_many(2) };
    // SAFETY: puts the two from get_many.
    unsafe { r2.put_many(2) };
    // SAFETY: `raw` came from `into_raw` and still holds its count.
    drop(unsafe { OwnedRef::from_raw(raw) });
    r2.kill().unwrap();
    assert!(r2.is_zero());
    assert!(r2.check().is_ok());
}

// Completion policy: blocking, timeout, async.
#[test]
fn completion_wait_timeout_and_future() {
    let done = Completion::new();
    let r = PercpuArc::new(0u32, done.clone());
    let g = r.tryget_owned().unwrap();
    r.kill().unwrap();
    assert!(!done.wait_timeout(std::time::Duration::from_millis(1)));
    let mut fut = Box::pin(done.wait_async());
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    thread::spawn(move || drop(g)).join().unwrap();
    assert!(fut.as_mut().poll(&mut cx).is_ready());
    done.wait();
    assert!(done.wait_timeout(std::time::Duration::ZERO));
    done.reset();
    assert!(!done.is_complete());
    drop(r);
}

#[cfg(feature = "rayon")]
#[test]
fn on_rayon_releases_on_a_worker_thread() {
    use percpu_ref::OnRayon;
    let done = Completion::new();
    let on_worker = Arc::new(AtomicBool::new(false));
    let (d, w) = (done.clone(), Arc::clone(&on_worker));
    let r = PercpuRef::new(
        Arc::new(1u32),
        OnRayon::new(move |v: Arc<u32>| {
            assert_eq!(*v, 1);
            w.store(rayon::current_thread_index().is_some(), SeqCst);
            d.complete();
        }),
    );
    r.kill().unwrap();
    drop(r); // the job owns a clone of the value
    done.wait();
    assert!(on_worker.load(SeqCst));
}

#[cfg(feature = "epoch")]
#[test]
fn deferred_waits_for_readers_pinned_at_drain() {
    use percpu_ref::Deferred;
    let ran = Arc::new(AtomicBool::new(false));
    let r2 = Arc::clone(&ran);
    let r = PercpuRef::new(
        Arc::new(0u32),
        Deferred::new(move |_v: Arc<u32>| r2.store(true, SeqCst)),
    );
    let reader = crossbeam_epoch::pin();
    r.kill().unwrap();
    for _ in 0..scaled(2000) {
        crossbeam_epoch::pin().flush();
    }
    assert!(
        !ran.load(SeqCst),
        "ran while a reader pinned at drain was pinned"
    );
    drop(reader);
    for _ in 0..scaled(100_000) {
        if ran.load(SeqCst) {
            break;
        }
        crossbeam_epoch::pin().flush();
    }
    assert!(ran.load(SeqCst));
}

// 8. Send/Sync bounds.
#[test]
fn send_sync_bounds() {
    fn send_sync<X: Send + Sync>() {}
    fn send<X: Send>() {}
    send_sync::<PercpuRef<u32, NoRelease>>();
    send_sync::<PercpuRef<Vec<u8>, Completion>>();
    send_sync::<Ref<'static, u32, NoRelease>>();
    send::<OwnedRef<u32, NoRelease>>();
    send_sync::<OwnedRef<String, Completion>>();
}

// Stress: ≥ 1e5 create/get/put/kill cycles over 2 threads.
#[test]
fn stress_create_get_put_kill_cycles() {
    let cycles = scaled(50_000);
    let total_releases = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for i in 0..cycles {
                    let released = AtomicUsize::new(0);
                    let r = PercpuRef::new(i, |_: &usize| {
                        released.fetch_add(1, SeqCst);
                    });
                    let a = r.tryget().unwrap();
                    let b = a.clone();
                    if i % 3 == 0 {
                        r.switch_to_atomic();
                    }
                    drop(a);
                    r.kill().unwrap();
                    assert_eq!(released.load(SeqCst), 0);
                    drop(b);
                    assert_eq!(released.load(SeqCst), 1);
                    total_releases.fetch_add(1, SeqCst);
                }
            });
        }
    });
    assert_eq!(total_releases.load(SeqCst), 2 * cycles);
}

#[test]
fn stress_shared_ref_kill_while_two_threads_hammer() {
    for _ in 0..scaled(500) {
        let released = AtomicUsize::new(0);
        let r = PercpuRef::new(0u32, |_: &u32| {
            released.fetch_add(1, SeqCst);
        });
        thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..scaled(200) {
                        match r.tryget() {
                            Some(g) => {
                                assert_eq!(released.load(SeqCst), 0);
                                drop(g.clone());
                            }
                            None => break,
                        }
                    }
                });
            }
            r.kill().unwrap();
        });
        assert_eq!(released.load(SeqCst), 1);
        assert!(r.is_zero());
    }
}

/// Threads migrate between CPUs (pinned with core_affinity to each core in
/// turn) while they get/put and the main thread flips modes and then kills:
/// the count must stay exact (zero exactly at the last put) and the release
/// must run once. Runs on both tiers: for the rseq tier this is the test of
/// the restartable sequence under migration and membarrier mode switches.
#[test]
fn stress_migration_mode_flips_and_kill_keep_count_exact() {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for tier in tiers() {
        for _round in 0..scaled(10) {
            let released = AtomicUsize::new(0);
            let r = tier.build(0u32, |_: &u32| {
                released.fetch_add(1, SeqCst);
            });
            let barrier = std::sync::Barrier::new(3);
            let workers_started = AtomicUsize::new(0);
            thread::scope(|s| {
                for w in 0..2usize {
                    let (r, barrier, cores, released) = (&r, &barrier, &cores, &released);
                    let started = &workers_started;
                    s.spawn(move || {
                        let base = r.tryget().expect("live");
                        let mut held = Vec::new();
                        for i in 0..scaled(40_000) {
                            if i % 512 == 0 && !cores.is_empty() {
                                core_affinity::set_for_current(cores[(i / 512 + w) % cores.len()]);
                            }
                            if i == scaled(1000) {
                                started.fetch_add(1, SeqCst);
                            }
                            // `base` keeps the count > 0: tryget succeeds even
                            // once the ref is dying.
                            let g = r.tryget().expect("count > 0");
                            if i % 3 == 0 {
                                held.push(g.clone());
                            }
                            if held.len() > 16 {
                                drop(held.swap_remove(i % 16));
                            }
                        }
                        drop(held);
                        barrier.wait(); // all but the bases dropped
                        barrier.wait(); // main checked
                        if w == 0 {
                            drop(base);
                            barrier.wait();
                        } else {
                            barrier.wait(); // worker 0 dropped its base
                            assert_eq!(released.load(SeqCst), 0, "one base left");
                            drop(base);
                        }
                    });
                }
                while workers_started.load(SeqCst) < 2 {
                    std::hint::spin_loop();
                }
                for i in 0..scaled(200) {
                    if i % 2 == 0 {
                        r.switch_to_atomic();
                    } else {
                        r.switch_to_percpu().unwrap();
                    }
                }
                r.kill().unwrap();
                barrier.wait();
                assert_eq!(released.load(SeqCst), 0, "bases still held");
                assert!(!r.is_zero());
                barrier.wait();
                barrier.wait();
            });
            assert_eq!(released.load(SeqCst), 1, "{tier:?}");
            assert!(r.is_zero());
            assert!(r.check().is_ok());
        }
    }
}

#[test]
fn portable_builder_forces_the_portable_tier() {
    let r = PercpuRef::builder(0u8).portable().build();
    assert_eq!(r.tier(), Tier::Portable);
    let d = PercpuRef::new(0u8, NoRelease);
    assert_eq!(d.tier(), percpu_ref::init());
    if std::env::var_os("PERCPU_REF_PORTABLE").is_some_and(|v| v == "1") {
        assert_eq!(d.tier(), Tier::Portable, "the environment forces it");
    }
}
