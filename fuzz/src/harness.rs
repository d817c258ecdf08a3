//! The step executor shared by `percpu_ops` (all steps on the fuzzing
//! thread) and the scheduled mode of `percpu_interleave` (each step on the
//! OS thread the input's schedule picks).
//!
//! Every step is applied to the real `PercpuRef` and to the [`Model`];
//! afterwards every observable must agree.

use crate::model::Model;
use arbitrary::Arbitrary;
use percpu_ref::{
    KillBatch, KillError, Mode, OwnedRef, PercpuArc, PercpuRef, Ref, ReleasePolicy, Tier,
};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

/// At most this many `Ref`s are held at once (more add nothing).
pub const MAX_HELD: usize = 64;

/// One operation on the ref. Indices pick a held reference modulo the
/// number held; steps whose precondition fails (nothing held, no raw
/// reference owned, ...) are skipped on both sides.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `tryget()`.
    Tryget,
    /// `tryget_live()`.
    TrygetLive,
    /// `tryget_owned()` on the `Arc`.
    TrygetOwned,
    /// `tryget_live_owned()` on the `Arc`.
    TrygetLiveOwned,
    /// Clone a held reference.
    Clone(u8),
    /// Drop a held reference.
    Drop(u8),
    /// `Ref::into_raw` / `OwnedRef::into_raw` of a held reference.
    IntoRaw(u8),
    /// Re-wrap one owned raw reference (`true`: as an `OwnedRef`).
    FromRaw(bool),
    /// `get_many(n)`, only while some reference is held.
    GetMany(u8),
    /// `put_many(n)` with `n` at most the raw references owned.
    PutMany(u8),
    /// Documented misuse (only when the input enables it): `put_many` of
    /// 1..=3 more raw references than owned. Must be detected by `check()`
    /// and `kill`, and must never run the release twice.
    OverPut(u8),
    /// `kill()`.
    Kill,
    /// `kill_and_confirm(..)`; the callback checks its own guarantees.
    KillAndConfirm,
    /// `switch_to_atomic()`.
    SwitchToAtomic,
    /// `switch_to_atomic_sync()`.
    SwitchToAtomicSync,
    /// `switch_to_percpu()`.
    SwitchToPercpu,
    /// `resurrect()`.
    Resurrect,
    /// `reinit()`.
    Reinit,
}

/// Counters the release policy and the confirm callbacks update, plus what
/// the harness holds (an independent count, to catch a release while
/// references exist).
#[derive(Debug, Default)]
pub struct Shared {
    /// The counted value.
    pub value: u64,
    /// Times the release ran.
    pub releases: AtomicU64,
    /// Times a confirm callback ran.
    pub confirms: AtomicU64,
    /// `Ref`s + `OwnedRef`s + raw references the harness holds: incremented
    /// after one is obtained, decremented before one is given back.
    pub outstanding: AtomicI64,
    /// An `OverPut` broke the `put_many` contract: the release may then run
    /// while references exist (documented), so that check is off.
    pub contract_broken: AtomicBool,
}

/// The release policy under test: checks it runs on the right value and
/// with no reference outstanding, and counts.
#[derive(Debug, Clone)]
pub struct OnRelease(pub Arc<Shared>);

impl ReleasePolicy<u64> for OnRelease {
    fn release(&self, value: &u64) {
        assert_eq!(*value, self.0.value, "release saw a different value");
        if !self.0.contract_broken.load(SeqCst) {
            let out = self.0.outstanding.load(SeqCst);
            assert_eq!(
                out, 0,
                "release ran while the harness holds {out} references"
            );
        }
        self.0.releases.fetch_add(1, SeqCst);
    }
}

/// The ref type under test.
pub type Pr = PercpuRef<u64, OnRelease>;
/// The owning handle of the ref under test.
pub type Handle = PercpuArc<u64, OnRelease>;

/// A held reference, borrowed or owned.
pub type Held<'a> = crate::held::Held<'a, OnRelease>;

/// Where a step's calls into the ref run.
pub trait Exec<'env> {
    /// Run `f` on executor `t` (any `t`; implementations reduce it) and
    /// return its result.
    fn run<R: Send + 'env>(&self, t: usize, f: impl FnOnce() -> R + Send + 'env) -> R;
}

/// Everything on the calling thread.
#[derive(Debug, Clone, Copy)]
pub struct Inline;

impl<'env> Exec<'env> for Inline {
    fn run<R: Send + 'env>(&self, _t: usize, f: impl FnOnce() -> R + Send + 'env) -> R {
        f()
    }
}

/// Persistent executor threads, created once per process (spawning threads
/// per fuzz case costs more than the case). Thread `i` is pinned to core
/// `i` modulo the cores, so executors use different per-CPU slots.
#[derive(Debug)]
pub struct Pool {
    queues: Vec<Mutex<mpsc::Sender<Job>>>,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Executor threads in [`pool`].
pub const POOL_THREADS: usize = 3;

/// The process-wide executor pool.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let queues = (0..POOL_THREADS)
            .map(|i| {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name(format!("fuzz-exec-{i}"))
                    .spawn(move || {
                        pin_to_core(i);
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawn executor thread");
                Mutex::new(tx)
            })
            .collect();
        Pool { queues }
    })
}

impl Pool {
    /// Start `f` on executor `t % POOL_THREADS`; the returned [`Pending`]
    /// must be waited for (it aborts the process if dropped unwaited).
    pub fn start<'a, R: Send + 'a>(
        &self,
        t: usize,
        f: impl FnOnce() -> R + Send + 'a,
    ) -> Pending<'a, R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Box<dyn FnOnce() + Send + 'a> = Box::new(move || {
            let _ = tx.send(f());
        });
        // SAFETY: only the lifetime is erased. `Pending::wait` blocks until
        // the job has run (the result, or the sender dropped by a panic, is
        // received), and an unwaited `Pending` aborts the process in its
        // drop, so everything the job borrows outlives its execution.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, Job>(job) };
        let q = self.queues[t % POOL_THREADS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.send(job).is_err() {
            std::process::abort();
        }
        Pending {
            rx: Some(rx),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Run `f` on executor `t % POOL_THREADS` and wait for it.
    pub fn run<'a, R: Send + 'a>(&self, t: usize, f: impl FnOnce() -> R + Send + 'a) -> R {
        self.start(t, f).wait()
    }
}

/// A job started with [`Pool::start`].
#[derive(Debug)]
#[must_use = "an unwaited job aborts the process"]
pub struct Pending<'a, R> {
    rx: Option<mpsc::Receiver<R>>,
    _borrow: std::marker::PhantomData<&'a ()>,
}

impl<R> Pending<'_, R> {
    /// Wait for the job's result. A job that panicked (the panic is already
    /// reported) aborts the process.
    pub fn wait(mut self) -> R {
        match self.rx.take().map(|rx| rx.recv()) {
            Some(Ok(r)) => r,
            _ => std::process::abort(),
        }
    }
}

impl<R> Drop for Pending<'_, R> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            // Never let borrowed data go while the job may still run.
            let _ = rx.recv();
            std::process::abort();
        }
    }
}

/// Each step on pool executor `t`, one whole operation at a time, while
/// the caller waits: interleaving at operation granularity, fully
/// determined by the input.
#[derive(Debug, Clone, Copy)]
pub struct OnPool;

impl<'env> Exec<'env> for OnPool {
    fn run<R: Send + 'env>(&self, t: usize, f: impl FnOnce() -> R + Send + 'env) -> R {
        pool().run(t, f)
    }
}

/// Pin the calling thread to core `i` modulo the machine's cores, so
/// executor threads use different per-CPU slots. Best effort.
pub fn pin_to_core(i: usize) {
    static CORES: OnceLock<Vec<core_affinity::CoreId>> = OnceLock::new();
    let cores = CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default());
    if !cores.is_empty() {
        core_affinity::set_for_current(cores[i % cores.len()]);
    }
}

/// Builder flags of a fuzz case.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Setup {
    /// The counted value.
    pub value: u64,
    /// `.atomic()`.
    pub atomic: bool,
    /// `.dead()`.
    pub dead: bool,
    /// `.allow_reinit()`.
    pub allow_reinit: bool,
    /// `.portable()`: the portable tier instead of the rseq tier (where
    /// the machine has it).
    pub portable: bool,
    /// Enables [`Op::OverPut`].
    pub misuse: bool,
}

impl Setup {
    /// The shared counters and the ref under test.
    pub fn build(&self) -> (Arc<Shared>, Handle) {
        let shared = Arc::new(Shared {
            value: self.value,
            ..Shared::default()
        });
        let mut b = PercpuRef::builder(self.value).release(OnRelease(Arc::clone(&shared)));
        if self.atomic {
            b = b.atomic();
        }
        if self.dead {
            b = b.dead();
        }
        if self.allow_reinit {
            b = b.allow_reinit();
        }
        if self.portable {
            b = b.portable();
        }
        let r = b.build_arc();
        let tier = if self.portable {
            Tier::Portable
        } else {
            percpu_ref::init()
        };
        assert_eq!(r.tier(), tier, "tier of {self:?}");
        (shared, r)
    }
}

/// A batched kill of the harness's ref (`KillBatch`), alone or with a
/// second, fresh ref of another type.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchKill {
    /// `kill_and_confirm` (else `kill`).
    pub confirm: bool,
    /// List the harness's ref a second time (its second entry must report
    /// `AlreadyDead`).
    pub twice: bool,
    /// A second ref in the same batch.
    pub second: Option<SecondRef>,
}

/// The second ref of a [`BatchKill`]: built fresh for the batch, checked
/// for its own exactly-once release.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondRef {
    /// `.portable()`.
    pub portable: bool,
    /// `.atomic()`.
    pub atomic: bool,
    /// Killed before the batch (the batch must report `AlreadyDead`).
    pub dead: bool,
    /// A raw reference held across the batch and put afterwards, on the
    /// next executor (its release must wait for that put).
    pub held: bool,
}

/// What the second ref's release policy checks and counts.
#[derive(Debug, Default)]
struct SecondShared {
    releases: AtomicU64,
    /// Raw references the harness holds on it.
    held: AtomicI64,
}

#[derive(Debug, Clone)]
struct SecondRelease(Arc<SecondShared>);

impl ReleasePolicy<&'static str> for SecondRelease {
    fn release(&self, value: &&'static str) {
        assert_eq!(*value, "second", "release saw a different value");
        let held = self.0.held.load(SeqCst);
        assert_eq!(held, 0, "second ref: released while {held} references held");
        self.0.releases.fetch_add(1, SeqCst);
    }
}

/// The real ref, the model, and what the harness holds.
#[derive(Debug)]
pub struct Harness<'env, E> {
    arc: &'env Handle,
    shared: Arc<Shared>,
    misuse: bool,
    /// The reference model.
    pub model: Model,
    held: Vec<Held<'env>>,
    raw: u64,
    exec: E,
}

impl<'env, E: Exec<'env>> Harness<'env, E> {
    /// Start checking `arc` (fresh from `setup.build()`).
    pub fn new(setup: &Setup, shared: Arc<Shared>, arc: &'env Handle, exec: E) -> Self {
        let h = Harness {
            arc,
            shared,
            misuse: setup.misuse,
            model: Model::new(setup.atomic, setup.dead, setup.allow_reinit),
            held: Vec::new(),
            raw: 0,
            exec,
        };
        h.check_observables("build");
        h
    }

    fn give_back_outstanding(&self, n: u64) {
        self.shared.outstanding.fetch_sub(n as i64, SeqCst);
    }

    fn took_outstanding(&self, n: u64) {
        self.shared.outstanding.fetch_add(n as i64, SeqCst);
    }

    /// Apply `op` on executor `t`, to the ref and the model, then compare.
    pub fn step(&mut self, t: usize, op: Op) {
        let arc: &'env Handle = self.arc;
        let pr: &'env Pr = arc;
        match op {
            Op::Tryget | Op::TrygetLive | Op::TrygetOwned | Op::TrygetLiveOwned => {
                if self.held.len() >= MAX_HELD {
                    return;
                }
                let got = self.exec.run(t, move || match op {
                    Op::Tryget => pr.tryget().map(Held::B),
                    Op::TrygetLive => pr.tryget_live().map(Held::B),
                    Op::TrygetOwned => arc.tryget_owned().map(Held::O),
                    _ => arc.tryget_live_owned().map(Held::O),
                });
                let live = matches!(op, Op::TrygetLive | Op::TrygetLiveOwned);
                let want = self.model.tryget(live);
                assert_eq!(
                    got.is_some(),
                    want,
                    "{op:?}: success differs from the model"
                );
                if let Some(g) = got {
                    self.took_outstanding(1);
                    self.held.push(g);
                }
            }
            Op::Clone(i) => {
                if self.held.is_empty() || self.held.len() >= MAX_HELD {
                    return;
                }
                let h = self.held.swap_remove(i as usize % self.held.len());
                let (h, c) = self.exec.run(t, move || {
                    let c = h.clone();
                    (h, c)
                });
                self.model.get(1);
                self.took_outstanding(1);
                self.held.push(h);
                self.held.push(c);
            }
            Op::Drop(i) => {
                if self.held.is_empty() {
                    return;
                }
                let h = self.held.swap_remove(i as usize % self.held.len());
                self.give_back_outstanding(1);
                self.exec.run(t, move || drop(h));
                self.model.put(1);
            }
            Op::IntoRaw(i) => {
                if self.held.is_empty() {
                    return;
                }
                let h = self.held.swap_remove(i as usize % self.held.len());
                self.exec.run(t, move || match h {
                    Held::B(r) => {
                        let _: &Pr = Ref::into_raw(r);
                    }
                    Held::O(r) => drop(OwnedRef::into_raw(r)),
                });
                self.raw += 1;
            }
            Op::FromRaw(owned) => {
                if self.raw == 0 || self.held.len() >= MAX_HELD {
                    return;
                }
                self.raw -= 1;
                let h = self.exec.run(t, move || {
                    if owned {
                        // SAFETY: the harness owns `raw` > 0 raw references
                        // and gives one up here.
                        Held::O(unsafe { OwnedRef::from_raw(PercpuArc::as_ptr(arc)) })
                    } else {
                        // SAFETY: as above.
                        Held::B(unsafe { Ref::from_raw(pr) })
                    }
                });
                self.held.push(h);
            }
            Op::GetMany(n) => {
                // Contract: the caller holds a reference (a Ref, a raw one,
                // or the owner's before kill).
                if self.held.is_empty() && self.raw == 0 && self.model.dead {
                    return;
                }
                let n = u64::from(n);
                // SAFETY: a reference is held (checked above) and n is small.
                self.exec.run(t, move || unsafe { pr.get_many(n as usize) });
                self.model.get(n);
                self.raw += n;
                self.took_outstanding(n);
            }
            Op::PutMany(n) => {
                let n = u64::from(n).min(self.raw);
                self.raw -= n;
                self.give_back_outstanding(n);
                // SAFETY: the harness owned these `n` raw references.
                self.exec.run(t, move || unsafe { pr.put_many(n as usize) });
                self.model.put(n);
            }
            Op::OverPut(k) => {
                if !self.misuse {
                    return;
                }
                let n = self.raw + 1 + u64::from(k % 3);
                self.shared.contract_broken.store(true, SeqCst);
                self.give_back_outstanding(self.raw);
                self.raw = 0;
                // SAFETY: deliberately violates put_many's contract (more
                // puts than owned raw references). That is a logic error the
                // crate documents as detected (`check`, `kill`) and harmless
                // to memory here: the value is a plain u64 that lives in the
                // `PercpuRef` until it is dropped, and the release only
                // counts.
                self.exec.run(t, move || unsafe { pr.put_many(n as usize) });
                self.model.put(n);
            }
            Op::Kill | Op::KillAndConfirm => self.kill(t, op == Op::KillAndConfirm),
            Op::SwitchToAtomic | Op::SwitchToAtomicSync => {
                let sync = op == Op::SwitchToAtomicSync;
                self.exec.run(t, move || {
                    if sync {
                        pr.switch_to_atomic_sync()
                    } else {
                        pr.switch_to_atomic()
                    }
                });
                self.model.switch_to_atomic();
            }
            Op::SwitchToPercpu => {
                self.exec
                    .run(t, move || pr.switch_to_percpu())
                    .expect("the slot arena can always grow here");
                self.model.switch_to_percpu();
            }
            Op::Resurrect => {
                // Model first: it refuses (panics) where the real one would
                // spin forever.
                let want = self.model.resurrect();
                let got = self.exec.run(t, move || pr.resurrect());
                assert_eq!(got, want, "resurrect result differs from the model");
            }
            Op::Reinit => {
                let want = self.model.reinit();
                let got = self.exec.run(t, move || pr.reinit());
                assert_eq!(got, want, "reinit result differs from the model");
            }
        }
        self.check_observables(op);
    }

    fn kill(&mut self, t: usize, confirm: bool) {
        let pr: &'env Pr = self.arc;
        let mut after = self.model.clone();
        let begin = after.kill_begin();
        // What the confirm callback must see: dead, folded, the initial
        // reference still held.
        let rel_at_confirm = after.releases;
        let count_at_confirm = after.count;
        let got = if confirm {
            let shared = Arc::clone(&self.shared);
            self.exec.run(t, move || {
                pr.kill_and_confirm(move || {
                    assert_eq!(
                        shared.releases.load(SeqCst),
                        rel_at_confirm,
                        "confirm: release count differs (the release must come after confirm)"
                    );
                    assert!(pr.is_dying(), "confirm: not dying");
                    assert_eq!(pr.mode(), Mode::Atomic, "confirm: a killed ref is atomic");
                    assert!(pr.tryget_live().is_none(), "confirm: tryget_live succeeded");
                    let g = pr.tryget();
                    assert_eq!(
                        g.is_some(),
                        count_at_confirm > 0,
                        "confirm: tryget must succeed while the initial reference is held"
                    );
                    drop(g);
                    shared.confirms.fetch_add(1, SeqCst);
                })
            })
        } else {
            self.exec.run(t, move || pr.kill())
        };
        match begin {
            Err(e) => assert_eq!(got, Err(e), "kill of a dead ref"),
            Ok(()) => {
                self.model = after;
                let want = self.model.kill_end(confirm);
                self.model.kill_release();
                assert_eq!(got, want, "kill result differs from the model");
            }
        }
    }

    /// A batched kill of the harness's ref ([`BatchKill`]) on executor
    /// `t`, checked like [`Op::Kill`]/[`Op::KillAndConfirm`]: the same
    /// result as the model's kill, the confirm callback's guarantees (it
    /// runs even when the harness's ref was already dead: then the model
    /// does not count it), every release exactly once; and the second
    /// ref's own result and release.
    pub fn kill_batch(&mut self, t: usize, b: BatchKill) {
        let pr: &'env Pr = self.arc;
        let mut after = self.model.clone();
        let begin = after.kill_begin();
        let rel_at_confirm = after.releases;
        let count_at_confirm = after.count;
        let counted = begin.is_ok();
        let second = b.second.map(|s| {
            let sh = Arc::new(SecondShared::default());
            let mut builder = PercpuRef::builder("second").release(SecondRelease(Arc::clone(&sh)));
            if s.portable {
                builder = builder.portable();
            }
            if s.atomic {
                builder = builder.atomic();
            }
            let r = Arc::new(builder.build());
            if s.held {
                sh.held.fetch_add(1, SeqCst);
                // SAFETY: the owner's initial reference is held (not
                // killed yet); put below, once.
                unsafe { r.get_many(1) };
            }
            if s.dead {
                assert_eq!(r.kill(), Ok(()), "second ref: kill before the batch");
            }
            (s, sh, r)
        });
        let shared = Arc::clone(&self.shared);
        let in_batch = second
            .as_ref()
            .map(|(s, sh, r)| (*s, Arc::clone(sh), Arc::clone(r)));
        let got = self.exec.run(t, move || {
            let mut batch = KillBatch::new();
            batch.push(pr);
            if let Some((_, _, r)) = &in_batch {
                batch.push(&**r);
            }
            if b.twice {
                batch.push(pr);
            }
            if !b.confirm {
                return batch.kill();
            }
            batch.kill_and_confirm(|| {
                assert_eq!(
                    shared.releases.load(SeqCst),
                    rel_at_confirm,
                    "batch confirm: release count differs (the release must come after confirm)"
                );
                assert!(pr.is_dying(), "batch confirm: not dying");
                assert_eq!(
                    pr.mode(),
                    Mode::Atomic,
                    "batch confirm: a killed ref is atomic"
                );
                assert!(
                    pr.tryget_live().is_none(),
                    "batch confirm: tryget_live succeeded"
                );
                // The batch confirms before it folds: a `tryget` may still
                // count on the biased central count, so only its success
                // while the true count of a ref killed here is positive is
                // a guarantee.
                let g = pr.tryget();
                if counted && count_at_confirm > 0 {
                    assert!(
                        g.is_some(),
                        "batch confirm: tryget must succeed while the initial reference is held"
                    );
                }
                drop(g);
                if let Some((s, sh, r)) = &in_batch {
                    assert!(
                        r.tryget_live().is_none(),
                        "batch confirm: second tryget_live"
                    );
                    let early = u64::from(s.dead && !s.held);
                    assert_eq!(
                        sh.releases.load(SeqCst),
                        early,
                        "batch confirm: the second ref was released before confirm"
                    );
                }
                if counted {
                    shared.confirms.fetch_add(1, SeqCst);
                }
            })
        });
        let want_len = 1 + usize::from(second.is_some()) + usize::from(b.twice);
        assert_eq!(got.len(), want_len, "one result per entry");
        if b.twice {
            assert_eq!(
                got[want_len - 1],
                Err(KillError::AlreadyDead),
                "a ref listed twice is killed once"
            );
        }
        match begin {
            Err(e) => assert_eq!(got[0], Err(e), "batch kill of a dead ref"),
            Ok(()) => {
                self.model = after;
                let want = self.model.kill_end(b.confirm);
                self.model.kill_release();
                assert_eq!(got[0], want, "batch kill result differs from the model");
            }
        }
        if let Some((s, sh, r)) = second {
            let want = if s.dead {
                Err(KillError::AlreadyDead)
            } else {
                Ok(())
            };
            assert_eq!(got[1], want, "second ref's batch result");
            assert!(r.is_dying() && r.tryget_live().is_none(), "second ref dead");
            if s.held {
                assert_eq!(
                    sh.releases.load(SeqCst),
                    0,
                    "second ref released while held"
                );
                let r2 = Arc::clone(&r);
                let sh2 = Arc::clone(&sh);
                self.exec.run(t + 1, move || {
                    sh2.held.fetch_sub(1, SeqCst);
                    // SAFETY: the raw reference taken above, put once.
                    unsafe { r2.put_many(1) };
                });
            }
            assert_eq!(
                sh.releases.load(SeqCst),
                1,
                "second ref released exactly once"
            );
            assert!(r.is_zero() && r.check().is_ok(), "second ref drained");
        }
        self.check_observables(b);
    }

    /// Compare every observable with the model.
    pub fn check_observables(&self, after: impl std::fmt::Debug) {
        let pr: &Pr = self.arc;
        let m = &self.model;
        assert_eq!(
            pr.is_dying(),
            m.dead,
            "after {after:?}: is_dying; model {m:?}"
        );
        assert_eq!(pr.mode(), m.mode(), "after {after:?}: mode; model {m:?}");
        assert_eq!(
            pr.is_zero(),
            m.is_zero(),
            "after {after:?}: is_zero; model {m:?}"
        );
        assert_eq!(
            pr.check().is_err(),
            m.underflow,
            "after {after:?}: check(); model {m:?}"
        );
        assert_eq!(
            self.shared.releases.load(SeqCst),
            m.releases,
            "after {after:?}: release count; model {m:?}"
        );
        assert_eq!(
            self.shared.confirms.load(SeqCst),
            m.confirms,
            "after {after:?}: confirm count; model {m:?}"
        );
        for h in &self.held {
            assert_eq!(
                h.value(),
                self.shared.value,
                "a held reference sees another value"
            );
        }
    }

    /// Give everything back (spread over executors), kill if live, and
    /// check the final drain: count zero, released exactly as modelled.
    pub fn finish(mut self) {
        let mut t = 0;
        while !self.held.is_empty() {
            self.step(t, Op::Drop(0));
            t += 1;
        }
        while self.raw > 0 {
            let n = self.raw.min(255) as u8;
            self.step(t, Op::PutMany(n));
            t += 1;
        }
        if !self.model.dead {
            self.step(t, Op::Kill);
        }
        let pr: &Pr = self.arc;
        let _ = format!("{pr:?}");
        if !self.shared.contract_broken.load(SeqCst) {
            assert_eq!(self.model.count, 0, "model: final count");
            assert!(
                pr.is_zero(),
                "final: not zero after every reference was put"
            );
            assert!(self.model.released, "final: not released");
            assert!(pr.check().is_ok(), "final: underflow without misuse");
        }
    }
}
