//! Lifecycle scenarios on one `PercpuRef`, run under shuttle at the
//! granularity of the crate's atomic steps, and checked against invariants
//! and the sequential model.
//!
//! Shared by the `percpu_steps` fuzz target (schedule from the fuzz input,
//! [`ByteScheduler`]) and `tests/shuttle_percpu.rs` (shuttle's PCT and
//! random schedulers with fixed seeds). The crate must be built with
//! `--cfg percpu_ref_shuttle`: then every atomic operation, the switch lock
//! and every spin inside `PercpuRef` is a point where the scheduler picks
//! the next thread.
//!
//! A scenario is a setup (mode, `.dead()`, `.allow_reinit()`, release
//! policy, misuse allowed) and 2–3 threads' op lists. Each thread runs its
//! ops, then gives back what it holds; the main thread joins them, kills
//! the ref if it is live, and checks. Harness bookkeeping uses `std`
//! atomics, which are not scheduling points, so it is atomic with the
//! crate step next to it.
//!
//! Oracles, checked in every execution:
//!
//! * **release**: never two at once; never while a reference the harness
//!   counts is held (at entry, and again after a yield inside the release);
//!   never twice in one life (two releases with no revive started in
//!   between, and none in flight at the first); after a revive returned,
//!   no reference is handed out while the previous release still runs.
//! * **confirm**: inside the callback the ref is dying, `tryget_live`
//!   fails and (without misuse) `tryget` succeeds (the kill still holds the
//!   initial reference); after it, every `tryget_live` that starts and ends with no
//!   revive started since the confirm began fails.
//! * `tryget` succeeds while its thread holds a reference.
//! * **final**: after everything was given back and the ref killed: it is
//!   dying and zero, `check()` is clean, the last life was released (a
//!   release ran after the start of the last successful revive), no
//!   `OwnedRef` leaked its `Arc`, and the harness's count is zero.
//! * **no hang**: a step bound ([`MAX_STEPS`]) and shuttle's deadlock
//!   detection (no runnable thread, or a thread locking a mutex it holds).
//! * **model**: the history (each op's interval in harness time, its
//!   result, and the releases that ran inside it) must have a linearization
//!   that the sequential model of `fuzz/src/model.rs` accepts with the same
//!   results, releases in the same ops, and the same final observables. A
//!   kill is steps too: marked dead, then (a percpu-mode ref) its slots
//!   folded, so gets on the slots may fall between; then, after the
//!   confirm of a `kill_and_confirm`, the initial put and the release it
//!   claimed. So is a `resurrect` of a dying ref (its new
//!   reference counts before DEAD is cleared, so a put in between cannot
//!   reach zero while a `tryget_live` in between still fails; with puts
//!   that take no lock, no order of the two avoids that). A `tryget_live`
//!   overlapping a kill may succeed after it (the documented race the
//!   confirm exists for), and with misuse so may a `tryget` (a slot still
//!   counts until the drain reaches it, even when over-puts took the true
//!   count below zero). A `reinit` is two steps: the new life published in
//!   atomic mode, then its slots opened.
//!
//! Panics the code is meant to survive (a panicking confirm, a panicking
//! release) are thrown as [`ExpectedPanic`], caught around the op, and
//! must leave every oracle above intact.

use crate::model::Model;
use percpu_ref::{KillError, Mode, PercpuArc, PercpuRef, ReleasePolicy, ReviveError};
use shuttle::scheduler::{Schedule, Scheduler, Task, TaskId};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Once, OnceLock};

/// Threads of a scenario, besides the main thread.
pub const MAX_THREADS: usize = 3;
/// Ops per thread.
pub const MAX_OPS: usize = 12;
/// References one thread holds at most.
pub const MAX_HELD: usize = 8;
/// Scheduling points one execution may take: far more than any scenario
/// needs (a few thousand), so reaching it means a spin that never ends.
pub const MAX_STEPS: usize = 20_000;
/// Linearizations the model check tries before giving up (no finding).
pub const MODEL_BUDGET: usize = 200_000;
/// The counted value.
pub const VALUE: u64 = 0x5eed;

/// What the release does besides checking and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Only check and count.
    Count,
    /// Check, count, then panic ([`ExpectedPanic`]).
    Panic,
    /// Check, count, then call `switch_to_atomic()` on the same ref: a
    /// release must be able to call back into its ref without deadlock.
    Reenter,
}

/// Builder flags and policy of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// `.atomic()`.
    pub atomic: bool,
    /// `.dead()`.
    pub dead: bool,
    /// `.allow_reinit()`.
    pub allow_reinit: bool,
    /// Enables [`Op::OverPut`] (not with [`Policy::Panic`]).
    pub misuse: bool,
    /// The release policy.
    pub policy: Policy,
    /// The release yields to the scheduler in its middle (always, except
    /// when masked), so other threads can run while a release runs.
    pub release_yields: bool,
}

/// One operation of a thread. Indices pick a held reference modulo the
/// number held; an op whose precondition fails is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `tryget()`.
    Tryget,
    /// `tryget_live()`.
    TrygetLive,
    /// `tryget_live_owned()` (`true`) or `tryget_owned()` on the `Arc`.
    TrygetOwned(bool),
    /// Clone a held reference.
    Clone(u8),
    /// Drop a held reference.
    Drop(u8),
    /// `get_many(1 + n % 3)` while this thread holds a reference.
    GetMany(u8),
    /// `put_many` of up to `1 + n % 3` of this thread's raw references.
    PutMany(u8),
    /// Misuse (only with [`Setup::misuse`]): `put_many` of `1 + n % 3`
    /// more raw references than this thread owns.
    OverPut(u8),
    /// `kill()`.
    Kill,
    /// `kill_and_confirm` with a checking confirm.
    KillAndConfirm,
    /// `kill_and_confirm` with a checking confirm that then panics.
    KillAndConfirmPanic,
    /// `switch_to_atomic()`.
    SwitchToAtomic,
    /// `switch_to_percpu()`.
    SwitchToPercpu,
    /// `resurrect()`.
    Resurrect,
    /// `reinit()`.
    Reinit,
}

/// A setup and each thread's ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Builder flags and policy.
    pub setup: Setup,
    /// 2..=3 op lists of at most [`MAX_OPS`] ops.
    pub threads: Vec<Vec<Op>>,
}

// ---------------------------------------------------------------- encoding

impl Op {
    /// Decode one op byte: the low nibble is the kind, the high one the
    /// argument.
    pub fn decode(b: u8) -> Op {
        let a = b >> 4;
        match b & 15 {
            0 => Op::Tryget,
            1 | 15 => Op::TrygetLive,
            2 => Op::TrygetOwned(a & 1 == 1),
            3 => Op::Clone(a),
            4 => Op::Drop(a),
            5 => Op::GetMany(a),
            6 => Op::PutMany(a),
            7 => Op::Kill,
            8 => Op::KillAndConfirm,
            9 => Op::KillAndConfirmPanic,
            10 => Op::SwitchToAtomic,
            11 => Op::SwitchToPercpu,
            12 => Op::Resurrect,
            13 => Op::Reinit,
            _ => Op::OverPut(a),
        }
    }

    /// The byte [`decode`](Self::decode) maps back to this op.
    pub fn encode(self) -> u8 {
        let (k, a) = match self {
            Op::Tryget => (0, 0),
            Op::TrygetLive => (1, 0),
            Op::TrygetOwned(live) => (2, u8::from(live)),
            Op::Clone(a) => (3, a),
            Op::Drop(a) => (4, a),
            Op::GetMany(a) => (5, a),
            Op::PutMany(a) => (6, a),
            Op::Kill => (7, 0),
            Op::KillAndConfirm => (8, 0),
            Op::KillAndConfirmPanic => (9, 0),
            Op::SwitchToAtomic => (10, 0),
            Op::SwitchToPercpu => (11, 0),
            Op::Resurrect => (12, 0),
            Op::Reinit => (13, 0),
            Op::OverPut(a) => (14, a),
        };
        k | (a & 15) << 4
    }
}

impl Scenario {
    /// Decode a fuzz input: byte 0 is the setup (bit 0 `.atomic()`, 1
    /// `.allow_reinit()`, 2 `.dead()`, 3 misuse, bits 4–5 the policy: 1
    /// panic, 2 reenter, else count; bit 6: three threads, else two), then
    /// per thread a length byte (modulo `MAX_OPS + 1`) and that many op
    /// bytes ([`Op::decode`]). The rest is the schedule for
    /// [`ByteScheduler`]. Missing bytes read as zero.
    pub fn decode(data: &[u8]) -> (Scenario, &[u8]) {
        let mut pos = 0;
        let mut next = || {
            let b = data.get(pos).copied().unwrap_or(0);
            pos += 1;
            b
        };
        let s = next();
        let policy = match (s >> 4) & 3 {
            1 => Policy::Panic,
            2 => Policy::Reenter,
            _ => Policy::Count,
        };
        let setup = Setup {
            atomic: s & 1 != 0,
            allow_reinit: s & 2 != 0,
            dead: s & 4 != 0,
            misuse: s & 8 != 0,
            policy,
            release_yields: true,
        };
        let n = if s & 64 != 0 { 3 } else { 2 };
        let threads = (0..n)
            .map(|_| {
                let len = next() as usize % (MAX_OPS + 1);
                (0..len).map(|_| Op::decode(next())).collect()
            })
            .collect();
        let rest = data.get(pos..).unwrap_or(&[]);
        (Scenario { setup, threads }, rest)
    }

    /// Turn off the features named in the comma-separated `mask`:
    /// `panic` (panicking confirms and releases become plain ones;
    /// `panic-confirm`, `panic-release`: only those),
    /// `reenter` (the re-entering release becomes a counting one), `misuse`
    /// (no over-puts), `release-yield` (the release runs as one step, so
    /// nothing can run while it does), `revive` (`resurrect` and `reinit`
    /// become `tryget`), `confirm` (every `kill_and_confirm` becomes a
    /// `kill`). Unknown names are ignored.
    pub fn mask(&mut self, mask: &str) {
        for name in mask.split(',').map(str::trim) {
            let s = &mut self.setup;
            match name {
                "panic" | "panic-release" | "panic-confirm" => {
                    if name != "panic-confirm" && s.policy == Policy::Panic {
                        s.policy = Policy::Count;
                    }
                    if name != "panic-release" {
                        for op in self.threads.iter_mut().flatten() {
                            if *op == Op::KillAndConfirmPanic {
                                *op = Op::KillAndConfirm;
                            }
                        }
                    }
                }
                "reenter" if s.policy == Policy::Reenter => s.policy = Policy::Count,
                "misuse" => s.misuse = false,
                "release-yield" => s.release_yields = false,
                "confirm" => {
                    for op in self.threads.iter_mut().flatten() {
                        if matches!(*op, Op::KillAndConfirm | Op::KillAndConfirmPanic) {
                            *op = Op::Kill;
                        }
                    }
                }
                "revive" => {
                    for op in self.threads.iter_mut().flatten() {
                        if matches!(*op, Op::Resurrect | Op::Reinit) {
                            *op = Op::Tryget;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The fuzz input that decodes to this scenario followed by
    /// `schedule`.
    pub fn encode(&self, schedule: &[u8]) -> Vec<u8> {
        let s = &self.setup;
        let policy = match s.policy {
            Policy::Count => 0,
            Policy::Panic => 1,
            Policy::Reenter => 2,
        };
        let mut out = vec![
            u8::from(s.atomic)
                | u8::from(s.allow_reinit) << 1
                | u8::from(s.dead) << 2
                | u8::from(s.misuse) << 3
                | policy << 4
                | u8::from(self.threads.len() == 3) << 6,
        ];
        for ops in &self.threads {
            out.push(ops.len() as u8);
            out.extend(ops.iter().map(|op| op.encode()));
        }
        out.extend_from_slice(schedule);
        out
    }
}

// ---------------------------------------------------------------- scheduler

/// A shuttle scheduler that takes every decision from a byte string, so a
/// run is a pure function of the fuzz input (and every finding replays from
/// it). One execution per runner.
///
/// At a point where more than one thread can run, the current thread keeps
/// running while its run length lasts; then two bytes are read: the next
/// run length and which runnable thread to pick (modulo their number). A
/// thread that spins ([`shuttle::hint::spin_loop`]) gives way to another
/// runnable thread, so a spin whose condition another thread will make true
/// always ends; only a spin that nothing can end hits [`MAX_STEPS`]. The
/// choice of "CPU" slot ([`shuttle::rand`], used by the crate's
/// `model_cpu()`) reads one byte. Once the bytes run out, the current
/// thread runs on (round-robin when it blocks or spins): the tail of any
/// execution is sequential.
#[derive(Debug)]
pub struct ByteScheduler {
    data: Vec<u8>,
    pos: usize,
    left: usize,
    started: bool,
    rotation: u64,
}

impl ByteScheduler {
    /// A scheduler for one execution driven by `data`.
    pub fn new(data: &[u8]) -> Self {
        ByteScheduler {
            data: data.to_vec(),
            pos: 0,
            left: 0,
            started: false,
            rotation: 0,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos += 1;
        b
    }
}

impl Scheduler for ByteScheduler {
    fn new_execution(&mut self) -> Option<Schedule> {
        if self.started {
            return None;
        }
        self.started = true;
        Some(Schedule::new(0))
    }

    fn next_task(
        &mut self,
        runnable: &[&Task],
        current: Option<TaskId>,
        is_yielding: bool,
    ) -> Option<TaskId> {
        if runnable.len() == 1 {
            return Some(runnable[0].id());
        }
        let cur = current.filter(|c| runnable.iter().any(|t| t.id() == *c));
        if let Some(c) = cur {
            if !is_yielding && self.left > 0 {
                self.left -= 1;
                return Some(c);
            }
        }
        let mut ids: Vec<TaskId> = runnable
            .iter()
            .map(|t| t.id())
            .filter(|&t| !(is_yielding && Some(t) == cur))
            .collect();
        ids.sort();
        let (Some(run), Some(pick)) = (self.byte(), self.byte()) else {
            self.pos = self.data.len();
            return Some(match cur {
                Some(c) if !is_yielding => c,
                // Round-robin from the current thread.
                _ => {
                    let after = current.map_or(0, usize::from);
                    *ids.iter()
                        .find(|&&t| usize::from(t) > after)
                        .unwrap_or(&ids[0])
                }
            });
        };
        self.left = usize::from(run);
        Some(ids[usize::from(pick) % ids.len()])
    }

    fn next_u64(&mut self) -> u64 {
        match self.byte() {
            Some(b) => u64::from(b),
            None => {
                self.rotation += 1;
                self.rotation
            }
        }
    }
}

/// The shuttle configuration of every run: the step bound, no schedule
/// files, no warning about weak orderings (loom checks those).
pub fn config() -> shuttle::Config {
    let mut c = shuttle::Config::new();
    c.max_steps = shuttle::MaxSteps::FailAfter(MAX_STEPS);
    c.failure_persistence = shuttle::FailurePersistence::None;
    c.silence_warnings = true;
    // The model check runs on the main task's stack.
    c.stack_size = 1 << 20;
    c
}

/// Run the scenario and schedule of a fuzz input once (the fuzz target).
///
/// The environment variable `PERCPU_STEPS_MASK` (read once) masks known
/// findings so a campaign can hunt for others while they are unfixed; see
/// [`Scenario::mask`]. With `PERCPU_STEPS_DEBUG` set, the decoded scenario
/// and schedule are printed first.
pub fn run_bytes(data: &[u8]) {
    static MASK: OnceLock<String> = OnceLock::new();
    static DEBUG: OnceLock<bool> = OnceLock::new();
    quiet_expected_panics();
    let (mut scenario, schedule) = Scenario::decode(data);
    scenario.mask(MASK.get_or_init(|| std::env::var("PERCPU_STEPS_MASK").unwrap_or_default()));
    if *DEBUG.get_or_init(|| std::env::var_os("PERCPU_STEPS_DEBUG").is_some()) {
        eprintln!("percpu_steps: {scenario:#?}\nschedule: {schedule:02x?}");
    }
    let scenario = Arc::new(scenario);
    shuttle::Runner::new(ByteScheduler::new(schedule), config())
        .run(move || run_scenario(&scenario));
}

// ---------------------------------------------------------------- panics

/// The payload of the panics a scenario throws on purpose (panicking
/// confirm or release).
#[derive(Debug, Clone, Copy)]
pub struct ExpectedPanic;

/// Keep [`ExpectedPanic`]s quiet: installed on top of shuttle's panic hook
/// (which reports every panic as a failing schedule) and of libFuzzer's
/// (which aborts on every panic, caught or not).
pub fn quiet_expected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Shuttle installs its hook on its first run; ours must come after.
        shuttle::Runner::new(shuttle::scheduler::RoundRobinScheduler::new(1), config()).run(|| {});
        let prev = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<ExpectedPanic>() {
                prev(info);
            }
        }));
    });
}

// ---------------------------------------------------------------- the run

/// The ref under test.
pub type Pr = PercpuRef<u64, StepRelease>;
/// The owning handle the scenario keeps (and its threads clone).
pub type Handle = PercpuArc<u64, StepRelease>;

/// Counters and flags the threads, the confirm callbacks and the release
/// share (std atomics: not scheduling points).
#[derive(Debug)]
struct Shared {
    setup: Setup,
    /// Harness time: ticks at every op start and end and at each release.
    clock: AtomicU64,
    releases: AtomicU64,
    releasing: AtomicBool,
    /// References the harness holds (Refs + raw): incremented after one
    /// is obtained, decremented before one is given back.
    outstanding: AtomicI64,
    /// An over-put broke the `put_many` contract.
    broken: AtomicBool,
    confirms: AtomicU64,
    /// `1 + revives_started` as seen by the last confirm that began with
    /// no revive in flight and ended with none started; 0: none.
    confirmed_epoch: AtomicU64,
    revives_started: AtomicU64,
    revives_done: AtomicU64,
    /// Start time of the latest revive that returned `Ok`.
    last_ok_revive_start: AtomicU64,
    last_release_time: AtomicU64,
    /// `revives_started << 1 | quiet` at the previous release, quiet = no
    /// revive in flight then; `u64::MAX`: no release yet.
    prev_release: AtomicU64,
    /// The ref under test, for a release that re-enters it (null once
    /// the scenario lets go of it).
    me: AtomicPtr<Pr>,
    /// Times the ref's allocation was freed (the policy was dropped).
    freed: AtomicU64,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst) + 1
    }
}

shuttle::thread_local! {
    /// Releases that ran on this (shuttle) thread.
    static RELEASES_HERE: Cell<u32> = const { Cell::new(0) };
    /// The intervals of the `switch_to_atomic` calls re-entering releases
    /// made on this thread, not yet in its history.
    static RELEASE_SWITCHES: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
}

fn releases_here() -> u32 {
    RELEASES_HERE.with(Cell::get)
}

/// The release policy under test; see [`Policy`].
#[derive(Debug)]
pub struct StepRelease {
    sh: Arc<Shared>,
}

impl Drop for StepRelease {
    /// The policy is dropped with the ref's allocation: count the frees.
    fn drop(&mut self) {
        self.sh.freed.fetch_add(1, SeqCst);
    }
}

impl ReleasePolicy<u64> for StepRelease {
    fn release(&self, value: &u64) {
        let sh = &*self.sh;
        assert_eq!(*value, VALUE, "release saw another value");
        RELEASES_HERE.with(|c| c.set(c.get() + 1));
        assert!(
            !sh.releasing.swap(true, SeqCst),
            "release: two releases run at the same time"
        );
        let check_held = |when: &str| {
            if !sh.broken.load(SeqCst) {
                let out = sh.outstanding.load(SeqCst);
                assert_eq!(
                    out, 0,
                    "release ({when}): runs while the harness holds {out} references"
                );
            }
        };
        check_held("entry");
        let started = sh.revives_started.load(SeqCst);
        let quiet = started == sh.revives_done.load(SeqCst);
        let prev = sh
            .prev_release
            .swap(started << 1 | u64::from(quiet), SeqCst);
        if prev != u64::MAX {
            assert!(
                !(prev & 1 == 1 && prev >> 1 == started),
                "release ran twice in one life (no revive between two releases)"
            );
        }
        sh.releases.fetch_add(1, SeqCst);
        sh.last_release_time.store(sh.tick(), SeqCst);
        // Let other threads run while the release is in progress.
        if sh.setup.release_yields {
            shuttle::thread::yield_now();
        }
        check_held("after a yield");
        sh.releasing.store(false, SeqCst);
        match sh.setup.policy {
            Policy::Count => {}
            Policy::Panic => panic::panic_any(ExpectedPanic),
            Policy::Reenter => {
                let me = sh.me.load(SeqCst);
                if !me.is_null() {
                    let start = sh.tick();
                    // SAFETY: set once the ref is built; the allocation
                    // lives until this release has returned (and longer).
                    unsafe { &*me }.switch_to_atomic();
                    let end = sh.tick();
                    // Its own step of the history: a yield above lets
                    // other threads' steps fall between the claim and it.
                    RELEASE_SWITCHES.with(|v| v.borrow_mut().push((start, end)));
                }
            }
        }
    }
}

/// A model step of the history; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Get {
        live: bool,
        ok: bool,
    },
    Clone,
    GetMany(u64),
    Put(u64),
    /// The kill marks the ref dead; `ok`: not `AlreadyDead`. `joint`: a
    /// kill without a confirm, whose parts share one interval and whose
    /// releases are all counted in its [`Ev::KillRelease`].
    KillBegin {
        ok: bool,
        joint: bool,
    },
    /// After a successful [`Ev::KillBegin`] (same interval), up to the
    /// confirm: the per-CPU slots are drained and folded into the central
    /// count. Gets and puts on the slots may fall between the two.
    KillFold,
    /// The put of the initial reference, after the confirm if one ran
    /// (`confirmed`); `result: None`: the kill panicked.
    KillEnd {
        result: Option<Result<(), KillError>>,
        confirmed: bool,
        joint: bool,
    },
    /// The kill's lock is released and a release it claimed runs (same
    /// interval as its [`Ev::KillEnd`], after it): other threads' steps
    /// may fall between, but no revive (revives wait for the release).
    KillRelease {
        joint: bool,
    },
    SwitchToAtomic,
    SwitchToPercpu,
    /// The `switch_to_atomic` of a re-entering release ([`Policy::Reenter`]),
    /// after the step that ran the release, in its own interval.
    ReleaseSwitch,
    /// `resurrect`; if it returned `Ok`, an [`Ev::ResurrectEnd`] and an
    /// [`Ev::Reopen`] follow.
    Resurrect(Result<(), ReviveError>),
    /// The second step of a successful `resurrect` (same interval): its new
    /// reference is counted first, DEAD cleared after.
    ResurrectEnd,
    /// `reinit`; if it returned `Ok`, an [`Ev::Reopen`] follows.
    Reinit(Result<(), ReviveError>),
    /// The last step of a successful revive (same interval): the new life
    /// is live in atomic mode first, the per-CPU slots open after.
    Reopen,
}

#[derive(Debug, Clone)]
struct Event {
    ev: Ev,
    start: u64,
    end: u64,
    /// Releases that ran inside it, on its thread.
    releases: u32,
}

type Held<'a> = crate::held::Held<'a, StepRelease>;

struct Timed<R> {
    /// `None`: an [`ExpectedPanic`] was thrown.
    out: Option<R>,
    start: u64,
    end: u64,
    rel0: u32,
    releases: u32,
}

/// One thread's state.
struct Worker<'a> {
    sh: &'a Shared,
    arc: &'a Handle,
    held: Vec<Held<'a>>,
    raw: u64,
    events: Vec<Event>,
}

impl<'a> Worker<'a> {
    fn new(sh: &'a Shared, arc: &'a Handle) -> Self {
        Worker {
            sh,
            arc,
            held: Vec::new(),
            raw: 0,
            events: Vec::new(),
        }
    }

    fn timed<R>(&self, f: impl FnOnce() -> R) -> Timed<R> {
        let rel0 = releases_here();
        let start = self.sh.tick();
        let r = panic::catch_unwind(AssertUnwindSafe(f));
        let end = self.sh.tick();
        let releases = releases_here() - rel0;
        let out = match r {
            Ok(v) => Some(v),
            Err(p) if p.is::<ExpectedPanic>() => None,
            Err(p) => panic::resume_unwind(p),
        };
        Timed {
            out,
            start,
            end,
            rel0,
            releases,
        }
    }

    fn push<R>(&mut self, ev: Ev, t: &Timed<R>) {
        self.events.push(Event {
            ev,
            start: t.start,
            end: t.end,
            releases: t.releases,
        });
    }

    fn holding(&self) -> bool {
        !self.held.is_empty() || self.raw > 0
    }

    fn broken(&self) -> bool {
        self.sh.broken.load(SeqCst)
    }

    fn got(&mut self, h: Held<'a>) {
        self.sh.outstanding.fetch_add(1, SeqCst);
        assert_eq!(h.value(), VALUE, "a reference sees another value");
        if !self.broken() {
            assert!(
                !self.sh.releasing.load(SeqCst),
                "a reference was handed out while a release is still running \
                 (a revive returned before the previous release finished)"
            );
        }
        self.held.push(h);
    }

    fn op(&mut self, op: Op) {
        self.op_steps(op);
        self.push_release_switches();
    }

    /// The switches re-entering releases made during the last op, as steps
    /// after it.
    fn push_release_switches(&mut self) {
        for (start, end) in RELEASE_SWITCHES.with(|v| std::mem::take(&mut *v.borrow_mut())) {
            self.events.push(Event {
                ev: Ev::ReleaseSwitch,
                start,
                end,
                releases: 0,
            });
        }
    }

    fn op_steps(&mut self, op: Op) {
        let (sh, arc) = (self.sh, self.arc);
        let pr: &'a Pr = arc;
        match op {
            Op::Tryget | Op::TrygetLive | Op::TrygetOwned(_) => {
                if self.held.len() >= MAX_HELD {
                    return;
                }
                let live = matches!(op, Op::TrygetLive | Op::TrygetOwned(true));
                let holding = self.holding();
                let epoch = sh.confirmed_epoch.load(SeqCst);
                let s0 = sh.revives_started.load(SeqCst);
                let t = self.timed(|| match op {
                    Op::Tryget => pr.tryget().map(Held::B),
                    Op::TrygetLive => pr.tryget_live().map(Held::B),
                    Op::TrygetOwned(true) => arc.tryget_live_owned().map(Held::O),
                    _ => arc.tryget_owned().map(Held::O),
                });
                let s1 = sh.revives_started.load(SeqCst);
                let got = t.out.as_ref().expect("a get never runs the release");
                let ok = got.is_some();
                if live && epoch != 0 && epoch - 1 == s0 && s0 == s1 {
                    assert!(
                        !ok,
                        "tryget_live succeeded after a kill was confirmed (no revive since)"
                    );
                }
                if !live && holding && !self.broken() {
                    assert!(ok, "tryget failed while this thread holds a reference");
                }
                self.push(Ev::Get { live, ok }, &t);
                if let Some(Some(h)) = t.out {
                    self.got(h);
                }
            }
            Op::Clone(i) => {
                if self.held.is_empty() || self.held.len() >= MAX_HELD {
                    return;
                }
                let h = &self.held[usize::from(i) % self.held.len()];
                let t = self.timed(|| h.clone());
                self.push(Ev::Clone, &t);
                self.got(t.out.expect("a get never runs the release"));
            }
            Op::Drop(i) => {
                if self.held.is_empty() {
                    return;
                }
                let h = self.held.swap_remove(usize::from(i) % self.held.len());
                sh.outstanding.fetch_sub(1, SeqCst);
                let t = self.timed(move || drop(h));
                self.push(Ev::Put(1), &t);
            }
            Op::GetMany(n) => {
                // Contract: the caller holds a reference.
                if !self.holding() {
                    return;
                }
                let n = 1 + u64::from(n % 3);
                // SAFETY: this thread holds a reference for the whole call.
                let t = self.timed(|| unsafe { pr.get_many(n as usize) });
                self.raw += n;
                sh.outstanding.fetch_add(n as i64, SeqCst);
                self.push(Ev::GetMany(n), &t);
            }
            Op::PutMany(n) => {
                let n = (1 + u64::from(n % 3)).min(self.raw);
                if n == 0 {
                    return;
                }
                self.put_raw(n);
            }
            Op::OverPut(k) => {
                if !sh.setup.misuse || sh.setup.policy == Policy::Panic {
                    return;
                }
                let n = self.raw + 1 + u64::from(k % 3);
                sh.broken.store(true, SeqCst);
                sh.outstanding.fetch_sub(self.raw as i64, SeqCst);
                self.raw = 0;
                // SAFETY: deliberately breaks put_many's contract (more puts
                // than owned raw references): a logic error the crate
                // detects (`check`, `kill`); memory stays valid, the value is
                // a plain u64 inside the ref and the release only counts.
                let t = self.timed(|| unsafe { pr.put_many(n as usize) });
                self.push(Ev::Put(n), &t);
            }
            Op::Kill | Op::KillAndConfirm | Op::KillAndConfirmPanic => self.kill(op),
            Op::SwitchToAtomic => {
                let t = self.timed(|| pr.switch_to_atomic());
                self.push(Ev::SwitchToAtomic, &t);
            }
            Op::SwitchToPercpu => {
                let t = self.timed(|| pr.switch_to_percpu());
                self.push(Ev::SwitchToPercpu, &t);
            }
            Op::Resurrect | Op::Reinit => {
                sh.revives_started.fetch_add(1, SeqCst);
                let t = self.timed(|| {
                    if op == Op::Resurrect {
                        pr.resurrect()
                    } else {
                        pr.reinit()
                    }
                });
                sh.revives_done.fetch_add(1, SeqCst);
                let r = t.out.clone().expect("a revive never runs the release");
                if r.is_ok() {
                    sh.last_ok_revive_start.fetch_max(t.start, SeqCst);
                }
                let ok = r.is_ok();
                let steps: &[Ev] = if op == Op::Reinit {
                    self.push(Ev::Reinit(r), &t);
                    &[Ev::Reopen]
                } else {
                    self.push(Ev::Resurrect(r), &t);
                    &[Ev::ResurrectEnd, Ev::Reopen]
                };
                if ok {
                    for ev in steps {
                        self.events.push(Event {
                            ev: ev.clone(),
                            start: t.start,
                            end: t.end,
                            releases: 0,
                        });
                    }
                }
            }
        }
    }

    fn put_raw(&mut self, n: u64) {
        let pr: &Pr = self.arc;
        self.raw -= n;
        self.sh.outstanding.fetch_sub(n as i64, SeqCst);
        // SAFETY: this thread owned these `n` raw references.
        let t = self.timed(|| unsafe { pr.put_many(n as usize) });
        self.push(Ev::Put(n), &t);
    }

    fn kill(&mut self, op: Op) {
        let sh = self.sh;
        let pr: &Pr = self.arc;
        let confirm = op != Op::Kill;
        let panics = op == Op::KillAndConfirmPanic;
        // (time, releases on this thread) at the confirm's start; its end.
        let began: Cell<Option<(u64, u32)>> = Cell::new(None);
        let ended: Cell<Option<u64>> = Cell::new(None);
        let t = self.timed(|| {
            if !confirm {
                return pr.kill();
            }
            pr.kill_and_confirm(|| {
                began.set(Some((sh.tick(), releases_here())));
                confirm_checks(sh, pr);
                ended.set(Some(sh.tick()));
                if panics {
                    panic::panic_any(ExpectedPanic);
                }
            })
        });
        let result = t.out.clone();
        if result == Some(Err(KillError::AlreadyDead)) {
            let ev = Ev::KillBegin {
                ok: false,
                joint: false,
            };
            self.push(ev, &t);
            return;
        }
        match (began.get(), ended.get()) {
            (Some((b, rel)), Some(e)) => {
                let before = rel - t.rel0;
                self.events.push(Event {
                    ev: Ev::KillBegin {
                        ok: true,
                        joint: false,
                    },
                    start: t.start,
                    end: b,
                    releases: 0,
                });
                self.events.push(Event {
                    ev: Ev::KillFold,
                    start: t.start,
                    end: b,
                    releases: before,
                });
                self.events.push(Event {
                    ev: Ev::KillEnd {
                        result,
                        confirmed: true,
                        joint: false,
                    },
                    start: e,
                    end: t.end,
                    releases: 0,
                });
                self.events.push(Event {
                    ev: Ev::KillRelease { joint: false },
                    start: e,
                    end: t.end,
                    releases: t.releases - before,
                });
            }
            // No confirm ran: the halves are only known to lie inside the
            // call, in this order (other threads' steps may fall between).
            _ => {
                self.events.push(Event {
                    ev: Ev::KillBegin {
                        ok: true,
                        joint: true,
                    },
                    start: t.start,
                    end: t.end,
                    releases: 0,
                });
                self.events.push(Event {
                    ev: Ev::KillFold,
                    start: t.start,
                    end: t.end,
                    releases: 0,
                });
                self.events.push(Event {
                    ev: Ev::KillEnd {
                        result,
                        confirmed: false,
                        joint: true,
                    },
                    start: t.start,
                    end: t.end,
                    releases: 0,
                });
                let ev = Ev::KillRelease { joint: true };
                self.push(ev, &t);
            }
        }
    }

    /// Give back everything this thread holds.
    fn finish(&mut self) {
        while !self.held.is_empty() {
            self.op(Op::Drop(0));
        }
        if self.raw > 0 {
            self.put_raw(self.raw);
            self.push_release_switches();
        }
    }
}

/// What a confirm callback checks; see the module docs.
fn confirm_checks(sh: &Shared, pr: &Pr) {
    let s0 = sh.revives_started.load(SeqCst);
    let quiet = s0 == sh.revives_done.load(SeqCst);
    assert!(pr.is_dying(), "confirm: the ref is not dying");
    assert!(
        pr.tryget_live().is_none(),
        "confirm: tryget_live succeeded inside the confirm callback (the ref is live again)"
    );
    // Not with misuse allowed: the count may be at or below zero then, and
    // this get and put are not in the history the model checks.
    if !sh.setup.misuse {
        let g = pr.tryget();
        assert!(
            g.is_some(),
            "confirm: tryget failed though the kill still holds the initial reference"
        );
        drop(g);
    }
    sh.confirms.fetch_add(1, SeqCst);
    if quiet && sh.revives_started.load(SeqCst) == s0 {
        sh.confirmed_epoch.store(s0 + 1, SeqCst);
    }
}

/// Build the ref of `setup` and its shared state.
fn build(setup: Setup) -> (Arc<Shared>, Handle) {
    let sh = Arc::new(Shared {
        setup,
        clock: AtomicU64::new(0),
        releases: AtomicU64::new(0),
        releasing: AtomicBool::new(false),
        outstanding: AtomicI64::new(0),
        broken: AtomicBool::new(false),
        confirms: AtomicU64::new(0),
        confirmed_epoch: AtomicU64::new(0),
        revives_started: AtomicU64::new(0),
        revives_done: AtomicU64::new(0),
        last_ok_revive_start: AtomicU64::new(0),
        last_release_time: AtomicU64::new(0),
        prev_release: AtomicU64::new(u64::MAX),
        me: AtomicPtr::new(std::ptr::null_mut()),
        freed: AtomicU64::new(0),
    });
    let policy_sh = Arc::clone(&sh);
    let arc = {
        let mut b = PercpuRef::builder(VALUE).release(StepRelease { sh: policy_sh });
        if setup.atomic {
            b = b.atomic();
        }
        if setup.dead {
            b = b.dead();
        }
        if setup.allow_reinit {
            b = b.allow_reinit();
        }
        b.build_arc()
    };
    let me: &Pr = &arc;
    sh.me.store(std::ptr::from_ref(me).cast_mut(), SeqCst);
    (sh, arc)
}

/// Observables compared with the model at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    dying: bool,
    mode: Mode,
    zero: bool,
    underflow: bool,
    confirms: u64,
    releases: u64,
}

/// One execution of `scenario`: must run inside a shuttle test (a
/// `Runner`, `check_pct`, ...). Panics on any finding.
pub fn run_scenario(scenario: &Scenario) {
    let (sh, arc) = build(scenario.setup);
    let handles: Vec<_> = scenario
        .threads
        .iter()
        .take(MAX_THREADS)
        .map(|ops| {
            let ops: Vec<Op> = ops.iter().copied().take(MAX_OPS).collect();
            let (sh, arc) = (Arc::clone(&sh), arc.clone());
            shuttle::thread::spawn(move || {
                let mut w = Worker::new(&sh, &arc);
                for op in ops {
                    w.op(op);
                }
                w.finish();
                std::mem::take(&mut w.events)
            })
        })
        .collect();
    let mut histories: Vec<Vec<Event>> = handles
        .into_iter()
        .map(|h| h.join().expect("a scenario thread panicked"))
        .collect();

    // Everything was given back: kill if live, so the last life drains.
    let mut main = Worker::new(&sh, &arc);
    if !arc.is_dying() {
        main.op(Op::Kill);
    }
    histories.push(std::mem::take(&mut main.events));
    drop(main);

    let broken = sh.broken.load(SeqCst);
    // A failed final check prints the history, like the model check.
    let check = |ok: bool, what: String| {
        assert!(
            ok,
            "final: {what}\nsetup: {:?}\nhistory (per thread, the last is the final kill):\n{}",
            scenario.setup,
            DisplayHist(&histories)
        );
    };
    check(
        sh.outstanding.load(SeqCst) == 0,
        "harness bookkeeping".into(),
    );
    check(
        !sh.releasing.load(SeqCst),
        "a release is still running".into(),
    );
    check(arc.is_dying(), "not dying after the final kill".into());
    if !broken {
        check(
            arc.is_zero(),
            format!("not zero after every reference was given back: {arc:?}"),
        );
        check(
            arc.check().is_ok(),
            format!("underflow without misuse: {arc:?}"),
        );
        let revived = sh.last_ok_revive_start.load(SeqCst);
        if !(scenario.setup.dead && revived == 0) {
            let released = sh.last_release_time.load(SeqCst);
            check(
                released > revived,
                format!(
                    "the last life was never released (last release at t={released}, last \
                     successful revive started at t={revived}): {arc:?}"
                ),
            );
        }
    }
    let observed = Observed {
        dying: arc.is_dying(),
        mode: arc.mode(),
        zero: arc.is_zero(),
        underflow: arc.check().is_err(),
        confirms: sh.confirms.load(SeqCst),
        releases: sh.releases.load(SeqCst),
    };
    // The last handle: a released ref's memory is freed now, or was by the
    // release's thread if every handle had gone first.
    let released = arc.is_zero();
    sh.me.store(std::ptr::null_mut(), SeqCst);
    drop(arc);
    if released && !broken {
        check(
            sh.freed.load(SeqCst) == 1,
            "the ref's allocation was not freed once released and orphaned (a panicking \
             release skipped its bookkeeping?)"
                .into(),
        );
    }
    if scenario.setup.misuse && revive_overlaps_others(&histories) {
        // Over-puts with a revive racing other threads' steps: the model
        // does not follow the count through those (see fuzz/README.md);
        // the invariants above and the release's own checks still apply.
        return;
    }
    if let Err(why) = check_model(&scenario.setup, &histories, &observed) {
        panic!("{why}");
    }
}

/// Does a successful revive overlap in time a step of another thread?
fn revive_overlaps_others(hist: &[Vec<Event>]) -> bool {
    hist.iter().enumerate().any(|(i, h)| {
        h.iter()
            .filter(|e| matches!(e.ev, Ev::Resurrect(Ok(())) | Ev::Reinit(Ok(()))))
            .any(|e| {
                hist.iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .flat_map(|(_, o)| o)
                    .any(|f| f.start < e.end && e.start < f.end)
            })
    })
}

// ---------------------------------------------------------------- model check

/// Does the ref spin forever in a `reinit` (or a `resurrect` that
/// reinits) from model state `m`? The real one waits for a release claim
/// that never comes; no real history linearizes there.
fn would_spin(m: &Model) -> bool {
    m.dead && m.allow_reinit && m.count <= 0 && !m.released
}

/// Apply `e` to `m`; `false` if the model disagrees with what happened.
fn apply(setup: &Setup, m: &mut Model, e: &Event, fuzzy_kill: bool) -> bool {
    let rel0 = m.releases;
    // A kill that panicked has no result. Under misuse the underflow a
    // kill reports is read after its put, so a concurrent over-put that
    // linearizes on either side may or may not be in it: any result goes.
    let same_kill = |got: &Option<Result<(), KillError>>, want: &Result<(), KillError>| match got {
        Some(g) if !setup.misuse => g == want,
        _ => true,
    };
    let ok = match &e.ev {
        Ev::Get { live, ok } => {
            let mut t = m.clone();
            if t.tryget(*live) == *ok {
                *m = t;
                true
            } else if *ok && fuzzy_kill && m.dead && (m.count > 0 || setup.misuse) {
                // A tryget_live racing a kill may still succeed (the kill
                // sets DEAD before it drains the slots). So may a tryget
                // after an over-put took the true count below zero: until
                // the drain reaches its slot it counts there.
                m.get(1);
                true
            } else {
                false
            }
        }
        Ev::Clone => {
            m.get(1);
            true
        }
        Ev::GetMany(n) => {
            m.get(*n);
            true
        }
        Ev::Put(n) => {
            if m.killing && e.releases == 0 {
                // It may have landed between the kill's closing and its
                // fold: then the kill releases, not this put.
                m.put_before_kill_fold(*n);
            } else {
                m.put(*n);
            }
            true
        }
        // A revive holds the switch lock across its two halves.
        Ev::KillBegin { ok: true, .. } if m.reviving => false,
        Ev::KillBegin { ok, .. } => m.kill_mark().is_ok() == *ok,
        Ev::KillFold => {
            m.kill_fold();
            true
        }
        Ev::KillEnd {
            result, confirmed, ..
        } => {
            let want = m.kill_end(*confirmed);
            same_kill(result, &want)
        }
        // A kill holds the switch lock from its begin to its end, a revive
        // across its two halves: nothing that takes the lock linearizes in
        // between.
        Ev::SwitchToAtomic
        | Ev::ReleaseSwitch
        | Ev::SwitchToPercpu
        | Ev::Resurrect(_)
        | Ev::Reinit(_)
            if m.killing || m.reviving =>
        {
            false
        }
        // A revive waits for a claimed release to finish.
        Ev::Resurrect(_) | Ev::Reinit(_) if m.release_due => false,
        Ev::KillRelease { .. } => {
            m.kill_release();
            true
        }
        Ev::SwitchToAtomic | Ev::ReleaseSwitch => {
            m.switch_to_atomic();
            true
        }
        Ev::SwitchToPercpu => {
            m.switch_to_percpu();
            true
        }
        Ev::Resurrect(r) => {
            let ok = if m.dead && m.count > 0 {
                // inc_not_zero succeeds: the new reference counts at once,
                // the ref stays dying until the ResurrectEnd. The new life
                // gets its own release (misused puts may have run the old
                // one before gets brought the count back).
                m.count += 1;
                m.released = false;
                r.is_ok()
            } else {
                // A drained ref: a reinit, whose slots open at the
                // Reopen.
                !would_spin(m) && m.reinit_begin() == *r
            };
            m.reviving = ok && r.is_ok();
            ok
        }
        Ev::ResurrectEnd => {
            m.dead = false;
            true
        }
        Ev::Reinit(r) => {
            let ok = !would_spin(m) && m.reinit_begin() == *r;
            m.reviving = ok && r.is_ok();
            ok
        }
        Ev::Reopen => {
            m.reviving = false;
            m.reopen();
            true
        }
    };
    // Without misuse every release belongs to one step: a put that crosses
    // zero on a killed ref, or the kill's end. With misuse (an over-put) the
    // count can cross zero while the ref is live and a racing kill be seen
    // by that put's claim, so which step ran a life's release is not
    // determined by a linearization: only the total is compared, at the end
    // (`Observed::releases`); exactly-once per life is checked by the
    // release itself.
    ok && (setup.misuse || m.releases - rel0 == u64::from(e.releases))
}

fn observed(m: &Model) -> Observed {
    Observed {
        dying: m.dead,
        mode: m.mode(),
        zero: m.is_zero(),
        underflow: m.underflow,
        confirms: m.confirms,
        releases: m.releases,
    }
}

/// Search a linearization of `hist` the model accepts (depth first, with
/// the failed (position, model) pairs memoized).
fn check_model(setup: &Setup, hist: &[Vec<Event>], fin: &Observed) -> Result<(), String> {
    // Kill intervals: a get overlapping one may succeed after it.
    let kills: Vec<(u64, u64)> = hist
        .iter()
        .flatten()
        .filter(|e| matches!(e.ev, Ev::KillBegin { ok: true, .. }))
        .map(|e| (e.start, e.end))
        .collect();
    let fuzzy = |e: &Event| kills.iter().any(|&(s, t)| s < e.end && e.start < t);
    let start = Model::new(setup.atomic, setup.dead, setup.allow_reinit);
    let n = hist.len();
    let mut seen: HashSet<(Vec<usize>, Model)> = HashSet::new();
    let mut budget = MODEL_BUDGET;
    // Depth-first: (positions, model) to expand.
    let mut stack: Vec<(Vec<usize>, Model)> = vec![(vec![0; n], start)];
    while let Some((pos, m)) = stack.pop() {
        if pos.iter().zip(hist).all(|(&p, h)| p == h.len()) {
            if observed(&m) == *fin {
                return Ok(());
            }
            continue;
        }
        if !seen.insert((pos.clone(), m.clone())) {
            continue;
        }
        if budget == 0 {
            // Inconclusive: too many interleavings to search.
            return Ok(());
        }
        budget -= 1;
        // The earliest end among the next events: only an event that
        // starts before it can be linearized first.
        let min_end = (0..n)
            .filter_map(|t| hist[t].get(pos[t]))
            .map(|e| e.end)
            .min()
            .expect("not at the leaf");
        for t in (0..n).rev() {
            let Some(e) = hist[t].get(pos[t]) else {
                continue;
            };
            if e.start > min_end {
                continue;
            }
            let mut m2 = m.clone();
            if apply(setup, &mut m2, e, fuzzy(e)) {
                let mut p2 = pos.clone();
                p2[t] += 1;
                stack.push((p2, m2));
            }
        }
    }
    Err(format!(
        "model: no linearization of this history matches the sequential model\n\
         setup: {setup:?}\nfinal: {fin:?}\nhistory (per thread, the last is the final kill):\n{}",
        DisplayHist(hist)
    ))
}

struct DisplayHist<'a>(&'a [Vec<Event>]);

impl fmt::Display for DisplayHist<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (t, h) in self.0.iter().enumerate() {
            for e in h {
                writeln!(
                    f,
                    "  t{t} [{:>3}, {:>3}] {:?}{}",
                    e.start,
                    e.end,
                    e.ev,
                    if e.releases > 0 {
                        format!(" (ran {} release)", e.releases)
                    } else {
                        String::new()
                    }
                )?;
            }
        }
        Ok(())
    }
}

/// A scenario from a setup and per-thread op lists.
pub fn scenario(setup: Setup, threads: &[&[Op]]) -> Scenario {
    Scenario {
        setup,
        threads: threads.iter().map(|t| t.to_vec()).collect(),
    }
}

/// The default setup: percpu mode, live, no reinit, counting release.
pub const PLAIN: Setup = Setup {
    atomic: false,
    dead: false,
    allow_reinit: false,
    misuse: false,
    policy: Policy::Count,
    release_yields: true,
};
