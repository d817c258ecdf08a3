//! Holder tracking (feature `track`): who holds a ref's references.
//! Run: `cargo test --features track --test track`.
#![cfg(all(feature = "track", not(percpu_ref_model)))]

use percpu_ref::{
    holder_label, kill_all, Completion, HolderKind, Holders, NoRelease, PercpuArc, PercpuRef, Ref,
};
use std::backtrace::{Backtrace, BacktraceStatus};
use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

mod common;

const LIMIT: Duration = Duration::from_secs(30);

/// (thread name, label, kind) → references held.
fn tally(h: &Holders) -> HashMap<(Option<String>, Option<&'static str>, HolderKind), usize> {
    let mut m = HashMap::new();
    for x in h {
        *m.entry((x.thread_name().map(str::to_owned), x.label(), x.kind()))
            .or_insert(0) += x.count();
    }
    m
}

#[test]
fn a_leaked_reference_is_reported_with_its_label_and_thread() {
    let done = Completion::new();
    let r = Arc::new(PercpuRef::new(String::from("pmem0"), done.clone()));
    let leaker = {
        let r = Arc::clone(&r);
        thread::Builder::new()
            .name("io-3".into())
            .spawn(move || {
                std::mem::forget(r.tryget_live_tagged("compaction").unwrap());
                thread::current().id()
            })
            .unwrap()
            .join()
            .unwrap()
    };
    let fine = r.tryget_live().unwrap();
    drop(fine);
    r.kill().unwrap();
    assert!(
        !done.wait_timeout(Duration::from_millis(10)),
        "the leak keeps it"
    );
    let report = r.holders();
    assert!(report.is_tracked());
    assert_eq!(report.count(), 1);
    let h = report.iter().next().unwrap();
    assert_eq!(h.thread_name(), Some("io-3"));
    assert_eq!(h.thread_id(), leaker);
    assert_eq!(h.label(), Some("compaction"));
    assert_eq!(h.kind(), HolderKind::Ref);
    let text = report.to_string();
    assert!(
        text.starts_with(&format!(
            "1 reference still held:\n  1 by thread 'io-3' ({leaker:?}, label compaction)"
        )),
        "{text}"
    );
    // A backtrace exactly when the environment asks for one.
    let wanted = Backtrace::capture().status() == BacktraceStatus::Captured;
    assert_eq!(h.backtrace().is_some(), wanted);
    assert_eq!(text.contains(" at:\n"), wanted);
    // A reference leaked as a raw one (`into_raw`, never put) is reported
    // too; putting it empties the report and runs the release.
    let done2 = Completion::new();
    let r2 = PercpuRef::new(0u8, done2.clone());
    let _ = Ref::into_raw(r2.tryget_live_tagged("scrub").unwrap());
    r2.kill().unwrap();
    let text = r2.holders().to_string();
    assert!(
        text.starts_with("1 reference still held:\n  1 raw by thread"),
        "{text}"
    );
    assert!(text.contains("label scrub"), "{text}");
    // SAFETY: the raw reference taken above, put once.
    unsafe { r2.put_many(1) };
    assert!(done2.is_complete());
    assert_eq!(r2.holders().to_string(), "no references held");
}

#[test]
fn labels_come_from_the_call_the_scope_or_the_original() {
    let r = PercpuArc::new(0u32, NoRelease);
    let plain = r.tryget_live().unwrap();
    let (scoped, owned, tagged_in_scope) = {
        let _outer = holder_label("outer");
        let _inner = holder_label("flush");
        (
            r.tryget().unwrap(),
            r.tryget_live_owned().unwrap(),
            r.tryget_live_tagged("explicit").unwrap(),
        )
    };
    let after_scope = {
        let _s = holder_label("outer");
        let _x = holder_label("inner");
        drop(_x);
        r.tryget().unwrap() // the outer label is back
    };
    let clone_of_tagged = tagged_in_scope.clone(); // inherits "explicit"
    let clone_in_scope = {
        let _s = holder_label("cloned-here");
        plain.clone()
    };
    let t = tally(&r.holders());
    let me = thread::current().name().map(str::to_owned);
    let get = |label, kind| t.get(&(me.clone(), label, kind)).copied().unwrap_or(0);
    assert_eq!(get(None, HolderKind::Ref), 1);
    assert_eq!(get(Some("flush"), HolderKind::Ref), 1);
    assert_eq!(get(Some("flush"), HolderKind::OwnedRef), 1);
    assert_eq!(get(Some("explicit"), HolderKind::Ref), 2);
    assert_eq!(get(Some("outer"), HolderKind::Ref), 1);
    assert_eq!(get(Some("cloned-here"), HolderKind::Ref), 1);
    assert_eq!(r.holders().count(), 7);
    drop((plain, scoped, owned, tagged_in_scope, after_scope));
    drop((clone_of_tagged, clone_in_scope));
    assert!(r.holders().is_empty());
}

#[test]
fn raw_references_form_an_exact_ledger() {
    let r = PercpuRef::new(0u8, NoRelease);
    let held = r.tryget_live().unwrap();
    {
        let _s = holder_label("pool");
        // SAFETY: `held` keeps the count above zero.
        unsafe { r.get_many(3) };
    }
    let raw = Ref::into_raw(r.tryget_live_tagged("page").unwrap());
    let count_raw = |h: &Holders| {
        h.iter()
            .filter(|x| x.kind() == HolderKind::Raw)
            .map(|x| x.count())
            .sum::<usize>()
    };
    let h = r.holders();
    assert_eq!((count_raw(&h), h.count()), (4, 5));
    assert!(h.to_string().contains("3 raw by thread"), "{h}");
    assert!(h.to_string().contains("label page"), "{h}");
    // Puts from another thread retire raw references, oldest first.
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: two of the raw references taken above.
            unsafe { r.put_many(2) }
        });
    });
    let h = r.holders();
    assert_eq!(count_raw(&h), 2);
    // `from_raw` turns one raw reference back into a tracked `Ref`.
    // SAFETY: one raw reference we own.
    let back = unsafe { Ref::from_raw(raw) };
    assert_eq!(count_raw(&r.holders()), 1);
    // SAFETY: the last raw reference.
    unsafe { r.put_many(1) };
    drop((back, held));
    assert!(r.holders().is_empty());
    assert!(r.check().is_ok());
}

/// Many threads get and put concurrently; at a barrier each holds a known
/// set of references, and the report must match it exactly; once they
/// drop everything, it must be empty — on both tiers.
#[test]
fn reports_are_exact_under_concurrent_get_and_put() {
    common::within("concurrent tracking", LIMIT, || {
        for portable in [true, false] {
            let b = PercpuRef::builder(0u64);
            let r = Arc::new(if portable { b.portable() } else { b }.build_arc());
            const THREADS: usize = 6;
            let barrier = Arc::new(Barrier::new(THREADS + 1));
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (r, barrier) = (Arc::clone(&r), Arc::clone(&barrier));
                    thread::Builder::new()
                        .name(format!("worker-{t}"))
                        .spawn(move || {
                            let label: &'static str = ["a", "b", "c"][t % 3];
                            for round in 0..3 {
                                // Churn: take and drop many references.
                                for i in 0..2000 {
                                    let x = r.tryget_live_tagged(label).unwrap();
                                    let y = x.clone();
                                    let o = r.tryget_live_owned();
                                    drop((x, o));
                                    if i % 3 == 0 {
                                        drop(y.clone());
                                    }
                                }
                                // Hold t + 1 tagged refs and one owned ref.
                                let held: Vec<_> = (0..=t)
                                    .map(|_| r.tryget_live_tagged(label).unwrap())
                                    .collect();
                                let owned = r.tryget_live_owned().unwrap();
                                barrier.wait(); // the main thread checks
                                barrier.wait();
                                drop((held, owned));
                                let _ = round;
                            }
                        })
                        .unwrap()
                })
                .collect();
            for _ in 0..3 {
                barrier.wait();
                let t = tally(&r.holders());
                for w in 0..THREADS {
                    let name = Some(format!("worker-{w}"));
                    let label = ["a", "b", "c"][w % 3];
                    assert_eq!(
                        t.get(&(name.clone(), Some(label), HolderKind::Ref)),
                        Some(&(w + 1)),
                        "worker {w}"
                    );
                    assert_eq!(
                        t.get(&(name, None, HolderKind::OwnedRef)),
                        Some(&1),
                        "worker {w}"
                    );
                }
                let expected: usize = (1..=THREADS).sum::<usize>() + THREADS;
                assert_eq!(r.holders().count(), expected);
                assert_eq!(t.len(), 2 * THREADS, "no other holders");
                barrier.wait();
            }
            for h in handles {
                h.join().unwrap();
            }
            assert!(r.holders().is_empty(), "{}", r.holders());
        }
    });
}

/// A batched kill under tracking: exactly one release per ref, and the
/// report names exactly the references that keep a ref alive.
#[test]
fn batched_kill_reports_what_keeps_each_ref_alive() {
    let dones: Vec<Completion> = (0..4).map(|_| Completion::new()).collect();
    let refs: Vec<PercpuRef<usize, Completion>> = dones
        .iter()
        .enumerate()
        .map(|(i, d)| PercpuRef::builder(i).release(d.clone()).build())
        .collect();
    let held = refs[2].tryget_live_tagged("scrub").unwrap();
    let all: Vec<&dyn percpu_ref::Killable> = refs.iter().map(|r| r as _).collect();
    assert!(kill_all(&all).iter().all(Result::is_ok));
    for (i, (r, d)) in refs.iter().zip(&dones).enumerate() {
        assert_eq!(d.is_complete(), i != 2);
        assert_eq!(r.holders().count(), usize::from(i == 2));
    }
    assert!(refs[2].holders().to_string().contains("label scrub"));
    drop(held);
    assert!(dones[2].is_complete());
    assert!(refs[2].holders().is_empty());
}
