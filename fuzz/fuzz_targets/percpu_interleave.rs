//! `percpu_interleave`: kill/get/put interleavings across threads. Two
//! modes, chosen by the input (see `fuzz/README.md` for why):
//!
//! * `Scheduled`: three executor threads (pinned to different cores where
//!   possible), each with its own op list; the input's schedule picks which
//!   thread runs its next *whole* operation. Deterministic per input; the
//!   oracle is the full sequential model, as in `percpu_ops`, and references
//!   move freely between threads (got on one CPU, put on another). Besides
//!   the `percpu_ops` operations, a step may be a batched kill
//!   (`KillBatch`) of the ref, alone or with a second, fresh ref.
//! * `Free`: a controller thread (kill, kill_and_confirm, batched kills,
//!   mode switches, revive) and two worker threads (tryget, tryget_live,
//!   clone, drop, use, get_many/put_many) run their op lists at the same
//!   time, really concurrently. The oracle is invariants only: exactly-once
//!   release per drained kill, no release while any reference is held, no
//!   use after release, `tryget_live` fails once a confirm callback was
//!   seen, `tryget` succeeds while the caller holds a reference.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use percpu_ref::{KillBatch, KillError, Mode, PercpuRef, Ref, ReleasePolicy, ReviveError};
use percpu_ref_fuzz::harness::{pool, BatchKill, Harness, OnPool, Op, Setup, POOL_THREADS};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

const THREADS: usize = POOL_THREADS;
const MAX_OPS: usize = 256;

#[derive(Arbitrary, Debug)]
enum Input {
    Scheduled(Scheduled),
    Free(Free),
}

/// One step of a scheduled thread.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Step {
    /// A `percpu_ops` operation.
    Op(Op),
    /// A batched kill of the ref (with a second ref, or the ref twice).
    Batch(BatchKill),
}

/// Per-thread step lists and a schedule (thread choices; once it runs
/// out, round-robin).
#[derive(Arbitrary, Debug)]
struct Scheduled {
    setup: Setup,
    threads: [Vec<Step>; THREADS],
    schedule: Vec<u8>,
}

fn run_scheduled(input: &Scheduled) {
    let (shared, arc) = input.setup.build();
    let mut h = Harness::new(&input.setup, shared, &arc, OnPool);
    let lists: Vec<&[Step]> = input
        .threads
        .iter()
        .map(|l| &l[..l.len().min(MAX_OPS)])
        .collect();
    let mut next = [0usize; THREADS];
    let mut sched = input.schedule.iter();
    let mut rr = 0;
    loop {
        let pick = match sched.next() {
            Some(&b) => b as usize,
            None => {
                rr += 1;
                rr
            }
        };
        // The picked thread, or the next one that still has ops.
        let Some(t) = (0..THREADS)
            .map(|k| (pick + k) % THREADS)
            .find(|&t| next[t] < lists[t].len())
        else {
            break;
        };
        match lists[t][next[t]] {
            Step::Op(op) => h.step(t, op),
            Step::Batch(b) => h.kill_batch(t, b),
        }
        next[t] += 1;
    }
    h.finish();
}

/// A controller op.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum CtlOp {
    Kill,
    KillAndConfirm,
    /// A `KillBatch` of the ref, with a second fresh ref if `second`,
    /// confirmed if `confirm`: the ref's result and confirm as for
    /// `Kill`/`KillAndConfirm` (the confirm also runs if the ref was dead
    /// already, and then also stops later `tryget_live`s), the second
    /// ref's release exactly once.
    Batch {
        confirm: bool,
        second: bool,
    },
    SwitchToAtomic,
    SwitchToPercpu,
    /// Without allow_reinit: `resurrect()`. With it: `reinit()` once the
    /// release of the current kill has finished (as a user waiting on a
    /// `Completion` would), else nothing.
    Revive,
    Spin(u8),
}

/// A worker op.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum WorkOp {
    Tryget,
    TrygetLive,
    Clone(u8),
    Drop(u8),
    /// Dereference a held reference: it must not have been released.
    Use(u8),
    GetMany(u8),
    PutMany(u8),
    Spin(u8),
    Yield,
}

#[derive(Arbitrary, Debug)]
struct Free {
    value: u64,
    atomic: bool,
    allow_reinit: bool,
    portable: bool,
    controller: Vec<CtlOp>,
    workers: [Vec<WorkOp>; 2],
}

/// What the free-mode threads share besides the ref.
#[derive(Debug, Default)]
struct FreeShared {
    value: u64,
    releases: AtomicU64,
    /// References (Refs + raw) the workers hold: incremented after one is
    /// obtained, decremented before one is given back.
    live_handles: AtomicI64,
    /// Set by the release ("the device is unmapped"), cleared by the
    /// controller before a reinit.
    unmapped: AtomicBool,
    /// Set by the confirm callback; cleared before a revive.
    confirmed: AtomicBool,
    /// Bumped (after clearing `confirmed`) before each revive.
    revives: AtomicU64,
}

#[derive(Debug, Clone)]
struct FreeRelease(Arc<FreeShared>);

impl ReleasePolicy<u64> for FreeRelease {
    fn release(&self, value: &u64) {
        let sh = &self.0;
        assert_eq!(*value, sh.value, "release saw a different value");
        let held = sh.live_handles.load(SeqCst);
        assert_eq!(held, 0, "release ran while workers hold {held} references");
        sh.unmapped.store(true, SeqCst);
        // Last, so a controller that sees the count also sees `unmapped`.
        sh.releases.fetch_add(1, SeqCst);
    }
}

type FreePr = PercpuRef<u64, FreeRelease>;

fn spin(n: u8) {
    for _ in 0..u32::from(n) * 8 {
        std::hint::spin_loop();
    }
}

fn worker(pr: &FreePr, sh: &FreeShared, ops: &[WorkOp], start: &Barrier) {
    let mut held: Vec<Ref<'_, u64, FreeRelease>> = Vec::new();
    let mut raw: u64 = 0;
    start.wait();
    for &op in ops {
        let holding = !held.is_empty() || raw > 0;
        match op {
            WorkOp::Tryget if held.len() < 64 => {
                let g = pr.tryget();
                if holding {
                    assert!(
                        g.is_some(),
                        "tryget failed while this thread holds a reference"
                    );
                }
                if let Some(g) = g {
                    sh.live_handles.fetch_add(1, SeqCst);
                    held.push(g);
                }
            }
            WorkOp::TrygetLive if held.len() < 64 => {
                let r0 = sh.revives.load(SeqCst);
                let confirmed = sh.confirmed.load(SeqCst);
                let g = pr.tryget_live();
                let r1 = sh.revives.load(SeqCst);
                if confirmed && r0 == r1 {
                    // The confirm callback ran before this call started and
                    // no revive started before it ended.
                    assert!(
                        g.is_none(),
                        "tryget_live succeeded after the kill was confirmed"
                    );
                }
                if let Some(g) = g {
                    sh.live_handles.fetch_add(1, SeqCst);
                    held.push(g);
                }
            }
            WorkOp::Clone(i) if !held.is_empty() && held.len() < 64 => {
                let c = held[i as usize % held.len()].clone();
                sh.live_handles.fetch_add(1, SeqCst);
                held.push(c);
            }
            WorkOp::Drop(i) if !held.is_empty() => {
                let g = held.swap_remove(i as usize % held.len());
                sh.live_handles.fetch_sub(1, SeqCst);
                drop(g);
            }
            WorkOp::Use(i) if !held.is_empty() => {
                let g = &held[i as usize % held.len()];
                assert_eq!(**g, sh.value, "a held reference sees another value");
                assert!(
                    !sh.unmapped.load(SeqCst),
                    "a reference was used after the release"
                );
            }
            WorkOp::GetMany(n) if holding => {
                // SAFETY: this thread holds a reference; n is small.
                unsafe { pr.get_many(n as usize) };
                raw += u64::from(n);
                sh.live_handles.fetch_add(i64::from(n), SeqCst);
            }
            WorkOp::PutMany(n) => {
                let n = u64::from(n).min(raw);
                raw -= n;
                sh.live_handles.fetch_sub(n as i64, SeqCst);
                // SAFETY: this thread owned these raw references.
                unsafe { pr.put_many(n as usize) };
            }
            WorkOp::Spin(n) => spin(n),
            WorkOp::Yield => std::thread::yield_now(),
            _ => {}
        }
    }
    for g in held.drain(..) {
        sh.live_handles.fetch_sub(1, SeqCst);
        drop(g);
    }
    sh.live_handles.fetch_sub(raw as i64, SeqCst);
    // SAFETY: this thread owns `raw` raw references.
    unsafe { pr.put_many(raw as usize) };
}

/// What the controller did: kills that succeeded, resurrects that found
/// the count non-zero (those kills never drain), whether it left it live.
#[derive(Debug, Default)]
struct CtlStats {
    kills: u64,
    resurrected: u64,
    live: bool,
}

fn controller(
    pr: &FreePr,
    sh: &FreeShared,
    ops: &[CtlOp],
    allow_reinit: bool,
    start: &Barrier,
) -> CtlStats {
    let mut st = CtlStats {
        live: true,
        ..CtlStats::default()
    };
    let mut confirmed_epoch = false;
    start.wait();
    for &op in ops {
        match op {
            CtlOp::Kill | CtlOp::KillAndConfirm => {
                let confirm = matches!(op, CtlOp::KillAndConfirm);
                // Releases so far: every earlier kill drained except the
                // ones resurrected.
                let drained_before = st.kills - st.resurrected;
                let res = if confirm {
                    pr.kill_and_confirm(|| {
                        assert_eq!(
                            sh.releases.load(SeqCst),
                            drained_before,
                            "confirm: the release ran before confirm"
                        );
                        assert!(pr.tryget_live().is_none(), "confirm: tryget_live succeeded");
                        sh.confirmed.store(true, SeqCst);
                    })
                } else {
                    pr.kill()
                };
                if st.live {
                    assert_eq!(res, Ok(()), "kill of a live ref");
                    st.live = false;
                    st.kills += 1;
                    confirmed_epoch = confirm;
                } else {
                    assert_eq!(res, Err(KillError::AlreadyDead), "kill of a dead ref");
                }
            }
            CtlOp::Batch { confirm, second } => {
                let drained_before = st.kills - st.resurrected;
                let was_live = st.live;
                let other_released = Arc::new(AtomicU64::new(0));
                let other = second.then(|| {
                    let n = Arc::clone(&other_released);
                    PercpuRef::new(7u32, move |_: &u32| {
                        n.fetch_add(1, SeqCst);
                    })
                });
                let mut batch = KillBatch::new();
                batch.push(pr);
                if let Some(o) = &other {
                    batch.push(o);
                }
                let res = if confirm {
                    batch.kill_and_confirm(|| {
                        if was_live {
                            assert_eq!(
                                sh.releases.load(SeqCst),
                                drained_before,
                                "batch confirm: the release ran before confirm"
                            );
                        }
                        assert!(
                            pr.tryget_live().is_none(),
                            "batch confirm: tryget_live succeeded"
                        );
                        if let Some(o) = &other {
                            assert!(o.tryget_live().is_none(), "batch confirm: second ref");
                            assert_eq!(other_released.load(SeqCst), 0, "second ref: early");
                        }
                        // Also when the ref was dead already: the batch's
                        // confirm says the whole set is dead everywhere.
                        sh.confirmed.store(true, SeqCst);
                    })
                } else {
                    batch.kill()
                };
                if st.live {
                    assert_eq!(res[0], Ok(()), "batch kill of a live ref");
                    st.live = false;
                    st.kills += 1;
                    confirmed_epoch = confirm;
                } else {
                    assert_eq!(
                        res[0],
                        Err(KillError::AlreadyDead),
                        "batch kill of a dead ref"
                    );
                    confirmed_epoch |= confirm;
                }
                if let Some(o) = &other {
                    assert_eq!(res[1], Ok(()), "batch kill of the second ref");
                    assert!(o.is_zero(), "second ref drained");
                    assert_eq!(other_released.load(SeqCst), 1, "second ref released once");
                }
            }
            CtlOp::SwitchToAtomic => {
                pr.switch_to_atomic();
                assert_eq!(pr.mode(), Mode::Atomic, "switch_to_atomic");
            }
            CtlOp::SwitchToPercpu => {
                pr.switch_to_percpu()
                    .expect("the slot arena can always grow here");
                let want = if st.live { Mode::Percpu } else { Mode::Atomic };
                assert_eq!(pr.mode(), want, "switch_to_percpu (live: {})", st.live);
            }
            CtlOp::Revive if st.live => {
                let want = Err(ReviveError::Live);
                if allow_reinit {
                    assert_eq!(pr.reinit(), want, "reinit of a live ref");
                } else {
                    assert_eq!(pr.resurrect(), want, "resurrect of a live ref");
                }
            }
            CtlOp::Revive if !allow_reinit => {
                sh.confirmed.store(false, SeqCst);
                sh.revives.fetch_add(1, SeqCst);
                match pr.resurrect() {
                    Ok(()) => {
                        st.live = true;
                        st.resurrected += 1;
                    }
                    // Drained: dead for good (no reinit allowed).
                    Err(ReviveError::ReinitNotAllowed) => {
                        sh.confirmed.store(confirmed_epoch, SeqCst);
                    }
                    Err(e) => panic!("resurrect of a dead ref: {e:?}"),
                }
            }
            CtlOp::Revive => {
                // Reinit only once this kill's release has finished (the
                // release of a drained kill is claimed before it runs, so
                // reinit alone does not wait for the callback).
                if sh.releases.load(SeqCst) == st.kills - st.resurrected {
                    sh.confirmed.store(false, SeqCst);
                    sh.revives.fetch_add(1, SeqCst);
                    sh.unmapped.store(false, SeqCst);
                    assert_eq!(pr.reinit(), Ok(()), "reinit after the release finished");
                    st.live = true;
                }
            }
            CtlOp::Spin(n) => spin(n),
        }
        assert_eq!(pr.is_dying(), !st.live, "is_dying after {op:?}");
    }
    st
}

fn run_free(input: &Free) {
    let sh = Arc::new(FreeShared {
        value: input.value,
        ..FreeShared::default()
    });
    let mut b = PercpuRef::builder(input.value).release(FreeRelease(Arc::clone(&sh)));
    if input.atomic {
        b = b.atomic();
    }
    if input.allow_reinit {
        b = b.allow_reinit();
    }
    if input.portable {
        b = b.portable();
    }
    let pr = b.build();
    let start = Barrier::new(3);
    let cap = |v: &[WorkOp]| v.len().min(MAX_OPS);
    let workers: Vec<_> = input
        .workers
        .iter()
        .enumerate()
        .map(|(i, ops)| {
            let (pr, sh, start) = (&pr, &*sh, &start);
            pool().start(i, move || worker(pr, sh, &ops[..cap(ops)], start))
        })
        .collect();
    let ctl = &input.controller[..input.controller.len().min(MAX_OPS)];
    let st = controller(&pr, &sh, ctl, input.allow_reinit, &start);
    for w in workers {
        w.wait();
    }
    // Everything was given back; the last epoch must drain now.
    let mut kills = st.kills;
    if st.live {
        assert_eq!(pr.kill(), Ok(()), "final kill");
        kills += 1;
    }
    assert_eq!(sh.live_handles.load(SeqCst), 0, "harness bookkeeping");
    assert!(pr.is_dying() && pr.is_zero(), "final: not drained: {pr:?}");
    assert!(pr.check().is_ok(), "final: underflow without misuse");
    assert_eq!(
        sh.releases.load(SeqCst),
        kills - st.resurrected,
        "release must run exactly once per drained kill ({kills} kills, {} resurrected)",
        st.resurrected
    );
}

fuzz_target!(|input: Input| {
    match &input {
        Input::Scheduled(s) => run_scheduled(s),
        Input::Free(f) => run_free(f),
    }
});
