//! Shutdown latency of a `PercpuRef` that other threads are hammering:
//!
//! * `kill_confirm`: from calling `kill_and_confirm` until its confirm
//!   callback runs (from then on every `tryget_live` fails);
//! * `kill_release`: from calling `kill` until the release policy runs
//!   (the last reference dropped, on whichever thread);
//! * `membarrier`: one `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` call,
//!   the floor a membarrier-based switch cannot beat, measured the same way
//!   (Linux only).
//!
//! each with 0, 1 and all other cores busy doing `tryget_live`+drop on the
//! ref (threads pinned one per core). Every iteration uses a fresh ref; only
//! the operation itself is timed, not the setup.
//!
//! Shutdown at scale, [`REFS`] refs at once, the busy threads cycling
//! `tryget_live`+drop over all of them:
//!
//! * `one_by_one`: `kill()` on each ref in turn (one barrier each);
//! * `batched`: one `kill_all` over all of them (one barrier in total).
//!
//! in two settings: `kill1000_busy_N`, N threads cycling `tryget_live`+drop
//! over the very refs being killed (the worst case: every ref's header
//! line moves between cores during the kill), and `kill1000_elsewhere_N`,
//! N threads busy on another ref of their own (the CPUs are busy, so each
//! `membarrier` interrupts them, but the killed refs are idle: a typical
//! unmount).
//!
//! Shutdown of [`POOLS`] device page pools (`dax` feature), each with one
//! page still held (so the timed part is the shutdown itself, not the
//! unmap that follows the last page), with 0, 1 and all other cores busy
//! on a ref of their own:
//!
//! * `one_by_one`: `DevicePagePool::shutdown` on each pool (one barrier
//!   each);
//! * `batched`: one `DevicePagePool::shutdown_all` (one barrier in total).
//!
//! A ratio summary (each ÷ one `membarrier`) is printed at the end. Run:
//! `cargo bench --bench kill`.

#[path = "contenders/report.rs"]
mod report;

use criterion::Criterion;
use percpu_ref::{Killable, NoRelease, PercpuRef, ReleasePolicy};
use std::hint::{black_box, spin_loop};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The clock `Stamp` writes in: nanoseconds since this instant, plus one
/// (so zero means "not released yet").
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// A release policy that records when it ran.
struct Stamp(Arc<AtomicU64>);

impl ReleasePolicy<()> for Stamp {
    fn release(&self, _: &()) {
        let ns = base().elapsed().as_nanos() as u64 + 1;
        // Release: pairs with the Acquire load in `wait_released`; only the
        // value matters, the ordering keeps the handshake obvious.
        self.0.store(ns, Release);
    }
}

type Dev = PercpuRef<(), Stamp>;

/// The operation timed in one iteration.
#[derive(Clone, Copy)]
enum Op {
    KillConfirm,
    KillRelease,
    Membarrier(fn()),
}

/// Hand-off between the timing thread and the busy threads.
#[derive(Default)]
struct Busy {
    current: Mutex<Option<Arc<Dev>>>,
    generation: AtomicU64,
    started: AtomicUsize,
    finished: AtomicUsize,
    stop: AtomicBool,
}

impl Busy {
    /// A busy thread: for each new ref, `tryget_live`+drop until the kill
    /// makes it fail.
    fn work(&self) {
        let mut seen = 0;
        loop {
            let generation = loop {
                // Acquire: pairs with the Release store in `measure`.
                if self.stop.load(Acquire) {
                    return;
                }
                // Acquire: pairs with the Release increment in `measure`, so
                // `current` already holds this generation's ref.
                let g = self.generation.load(Acquire);
                if g != seen {
                    break g;
                }
                spin_loop();
            };
            seen = generation;
            let dev = lock(&self.current)
                .clone()
                .expect("a ref is published with its generation");
            // Release: publishes nothing but keeps the handshake obvious.
            self.started.fetch_add(1, Release);
            while let Some(r) = dev.tryget_live() {
                drop(black_box(r));
            }
            drop(dev);
            // Release: our last put happens before the timing thread reuses
            // the hand-off for the next ref.
            self.finished.fetch_add(1, Release);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn spin_until(done: impl Fn() -> bool) {
    while !done() {
        spin_loop();
    }
}

/// Time `iters` runs of `op`, each on a fresh ref with `busy` threads
/// hammering it; returns the sum of the timed parts.
fn measure(op: Op, busy: usize, iters: u64, cores: &[core_affinity::CoreId]) -> Duration {
    let hand = Busy::default();
    let released_at = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for i in 0..busy {
            let hand = &hand;
            s.spawn(move || {
                if let Some(&core) = cores.get((i + 1) % cores.len().max(1)) {
                    core_affinity::set_for_current(core);
                }
                hand.work();
            });
        }
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            // Relaxed: no busy thread touches these between refs.
            released_at.store(0, Relaxed);
            hand.started.store(0, Relaxed);
            hand.finished.store(0, Relaxed);
            let dev = Arc::new(PercpuRef::new((), Stamp(Arc::clone(&released_at))));
            *lock(&hand.current) = Some(Arc::clone(&dev));
            // Release: pairs with the Acquire load in `Busy::work`.
            hand.generation.fetch_add(1, Release);
            // Acquire: pairs with the Release increment in `Busy::work`.
            spin_until(|| hand.started.load(Acquire) == busy);

            let t0 = Instant::now();
            match op {
                Op::KillConfirm => {
                    let mut confirmed = None;
                    dev.kill_and_confirm(|| confirmed = Some(Instant::now()))
                        .expect("a fresh ref is live");
                    total += confirmed.expect("confirm ran").duration_since(t0);
                }
                Op::KillRelease => {
                    dev.kill().expect("a fresh ref is live");
                    // Acquire: pairs with the Release store in `Stamp`.
                    spin_until(|| released_at.load(Acquire) != 0);
                    let at = base() + Duration::from_nanos(released_at.load(Relaxed) - 1);
                    total += at.saturating_duration_since(t0);
                }
                Op::Membarrier(barrier) => {
                    barrier();
                    total += t0.elapsed();
                    dev.kill().expect("a fresh ref is live");
                }
            }
            // Acquire: pairs with the Release increment in `Busy::work`.
            spin_until(|| hand.finished.load(Acquire) == busy);
            *lock(&hand.current) = None;
        }
        // Release: pairs with the Acquire load in `Busy::work`.
        hand.stop.store(true, Release);
        total
    })
}

/// Refs killed at once in the `kill_many` groups.
const REFS: usize = 1000;

/// How the `kill_many` groups kill their refs.
#[derive(Clone, Copy)]
enum Many {
    OneByOne,
    Batched,
}

/// Where the busy threads of the `kill_many` groups work.
#[derive(Clone, Copy, PartialEq)]
enum Busy1000 {
    /// On the refs being killed.
    SameRefs,
    /// On a ref of their own, until the kill is over.
    Elsewhere,
}

/// Hand-off for the `kill_many` groups: a generation of [`REFS`] refs.
#[derive(Default)]
struct BusyMany {
    current: Mutex<Option<Arc<Vec<PercpuRef<()>>>>>,
    generation: AtomicU64,
    /// The generation whose refs were killed (for `Busy1000::Elsewhere`).
    killed: AtomicU64,
    started: AtomicUsize,
    finished: AtomicUsize,
    stop: AtomicBool,
}

impl BusyMany {
    /// A busy thread: for each new generation, cycle `tryget_live`+drop
    /// over its refs until a whole pass finds every one of them killed.
    fn work(&self, me: usize, busy: Busy1000) {
        let mine = PercpuRef::new((), NoRelease);
        let mut seen = 0;
        loop {
            let generation = loop {
                // Acquire: pairs with the Release store in `measure_many`.
                if self.stop.load(Acquire) {
                    return;
                }
                // Acquire: pairs with the Release increment in
                // `measure_many`, so `current` holds this generation.
                let g = self.generation.load(Acquire);
                if g != seen {
                    break g;
                }
                spin_loop();
            };
            seen = generation;
            let refs = lock(&self.current)
                .clone()
                .expect("refs are published with their generation");
            // Release: keeps the handshake obvious.
            self.started.fetch_add(1, Release);
            // Acquire: pairs with the Release store after the kill.
            while busy == Busy1000::Elsewhere && self.killed.load(Acquire) != generation {
                drop(black_box(mine.tryget_live()));
            }
            let mut live = busy == Busy1000::SameRefs;
            while live {
                live = false;
                // Start each busy thread elsewhere in the set.
                for r in refs[me % REFS..].iter().chain(&refs[..me % REFS]) {
                    if let Some(g) = r.tryget_live() {
                        drop(black_box(g));
                        live = true;
                    }
                }
            }
            drop(refs);
            // Release: our last put happens before the next generation.
            self.finished.fetch_add(1, Release);
        }
    }
}

/// Time `iters` shutdowns of [`REFS`] fresh refs with `busy` threads
/// hammering them; returns the sum of the timed parts.
fn measure_many(
    how: Many,
    (busy, on): (usize, Busy1000),
    iters: u64,
    cores: &[core_affinity::CoreId],
) -> Duration {
    let hand = BusyMany::default();
    std::thread::scope(|s| {
        for i in 0..busy {
            let hand = &hand;
            s.spawn(move || {
                if let Some(&core) = cores.get((i + 1) % cores.len().max(1)) {
                    core_affinity::set_for_current(core);
                }
                hand.work(i * 397, on);
            });
        }
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            // Relaxed: no busy thread touches these between generations.
            hand.started.store(0, Relaxed);
            hand.finished.store(0, Relaxed);
            let refs: Arc<Vec<PercpuRef<()>>> =
                Arc::new((0..REFS).map(|_| PercpuRef::new((), NoRelease)).collect());
            *lock(&hand.current) = Some(Arc::clone(&refs));
            // Release: pairs with the Acquire load in `BusyMany::work`.
            hand.generation.fetch_add(1, Release);
            // Acquire: pairs with the Release increment in `BusyMany::work`.
            spin_until(|| hand.started.load(Acquire) == busy);

            let t0 = Instant::now();
            match how {
                Many::OneByOne => {
                    for r in refs.iter() {
                        r.kill().expect("a fresh ref is live");
                    }
                }
                Many::Batched => {
                    let all: Vec<&dyn Killable> = refs.iter().map(|r| r as &dyn Killable).collect();
                    let results = percpu_ref::kill_all(&all);
                    assert!(results.iter().all(Result::is_ok), "fresh refs are live");
                }
            }
            total += t0.elapsed();
            // Release: pairs with the Acquire load in `BusyMany::work`.
            hand.killed.store(hand.generation.load(Relaxed), Release);
            // Acquire: pairs with the Release increment in `BusyMany::work`.
            spin_until(|| hand.finished.load(Acquire) == busy);
            *lock(&hand.current) = None;
            assert!(refs.iter().all(PercpuRef::is_zero), "every ref drained");
        }
        // Release: pairs with the Acquire load in `BusyMany::work`.
        hand.stop.store(true, Release);
        total
    })
}

fn many_group_name((busy, on): (usize, Busy1000)) -> String {
    match on {
        Busy1000::SameRefs => format!("kill{REFS}_busy_{busy}"),
        Busy1000::Elsewhere => format!("kill{REFS}_elsewhere_{busy}"),
    }
}

/// The settings of the `kill_many` groups: busy on the same refs (0, 1,
/// all other cores), then busy elsewhere (1, all other cores).
fn many_settings(cores: usize) -> Vec<(usize, Busy1000)> {
    let same = busy_counts(cores)
        .into_iter()
        .map(|b| (b, Busy1000::SameRefs));
    let elsewhere = busy_counts(cores)
        .into_iter()
        .filter(|&b| b > 0)
        .map(|b| (b, Busy1000::Elsewhere));
    same.chain(elsewhere).collect()
}

fn kill_many(c: &mut Criterion, cores: &[core_affinity::CoreId]) {
    for setting in many_settings(cores.len().max(1)) {
        let mut g = c.benchmark_group(many_group_name(setting));
        // One-by-one costs ~REFS barriers per iteration (~15 ms busy).
        g.sample_size(10);
        for (name, how) in [("one_by_one", Many::OneByOne), ("batched", Many::Batched)] {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| measure_many(how, setting, iters, cores))
            });
        }
        g.finish();
    }
}

/// Pools shut down at once in the `shutdown_pools` groups.
#[cfg(feature = "dax")]
const POOLS: usize = 100;

/// How the `shutdown_pools` groups start the shutdowns.
#[cfg(feature = "dax")]
#[derive(Clone, Copy)]
enum PoolShutdown {
    OneByOne,
    Batched,
}

#[cfg(feature = "dax")]
fn pools_group_name(busy: usize) -> String {
    format!("shutdown{POOLS}_pools_busy_{busy}")
}

/// Time `iters` shutdowns of [`POOLS`] fresh pools, each with one page
/// held, while `busy` threads do `tryget_live`+drop on refs of their own;
/// returns the sum of the timed parts (from the first call until every
/// pool refuses allocation). Pages and pools are dropped afterwards,
/// untimed: that is where each pool is persisted and unmapped.
#[cfg(feature = "dax")]
fn measure_pools(
    how: PoolShutdown,
    busy: usize,
    iters: u64,
    cores: &[core_affinity::CoreId],
) -> Duration {
    use percpu_ref::{DevicePagePool, PoolError};
    let stop = AtomicBool::new(false);
    let started = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..busy {
            let (stop, started) = (&stop, &started);
            s.spawn(move || {
                if let Some(&core) = cores.get((i + 1) % cores.len().max(1)) {
                    core_affinity::set_for_current(core);
                }
                let mine = PercpuRef::new((), NoRelease);
                // Release: keeps the handshake obvious.
                started.fetch_add(1, Release);
                // Acquire: pairs with the Release store below.
                while !stop.load(Acquire) {
                    drop(black_box(mine.tryget_live()));
                }
            });
        }
        // Acquire: pairs with the Release increment above.
        spin_until(|| started.load(Acquire) == busy);
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let pools: Vec<DevicePagePool> = (0..POOLS)
                .map(|_| DevicePagePool::anonymous(4 * 4096).expect("an anonymous pool"))
                .collect();
            let pages: Vec<_> = pools
                .iter()
                .map(|p| p.alloc().expect("a fresh pool has pages"))
                .collect();
            let t0 = Instant::now();
            let handles = match how {
                PoolShutdown::OneByOne => pools.iter().map(DevicePagePool::shutdown).collect(),
                PoolShutdown::Batched => DevicePagePool::shutdown_all(&pools),
            };
            total += t0.elapsed();
            assert!(
                pools
                    .iter()
                    .all(|p| matches!(p.alloc(), Err(PoolError::ShuttingDown { .. }))),
                "every pool refuses allocation"
            );
            drop(pages);
            assert!(
                handles.iter().all(|h| h.is_complete()),
                "every pool drained"
            );
        }
        // Release: pairs with the Acquire loads of the busy threads.
        stop.store(true, Release);
        total
    })
}

#[cfg(feature = "dax")]
fn shutdown_pools(c: &mut Criterion, cores: &[core_affinity::CoreId]) {
    for busy in busy_counts(cores.len().max(1)) {
        let mut g = c.benchmark_group(pools_group_name(busy));
        // One by one costs ~POOLS barriers per iteration (~1.5 ms busy).
        g.sample_size(10);
        for (name, how) in [
            ("one_by_one", PoolShutdown::OneByOne),
            ("batched", PoolShutdown::Batched),
        ] {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| measure_pools(how, busy, iters, cores))
            });
        }
        g.finish();
    }
}

#[cfg(not(feature = "dax"))]
fn shutdown_pools(_: &mut Criterion, _: &[core_affinity::CoreId]) {}

/// One `membarrier(PRIVATE_EXPEDITED)`, after registering for it; `None`
/// where the kernel (or OS) does not offer it.
#[cfg(target_os = "linux")]
fn membarrier_floor() -> Option<fn()> {
    use rustix::thread::{membarrier, MembarrierCommand};
    match membarrier(MembarrierCommand::RegisterPrivateExpedited) {
        Ok(()) => Some(|| {
            membarrier(MembarrierCommand::PrivateExpedited).expect("registered above");
        }),
        Err(e) => {
            eprintln!("membarrier(REGISTER_PRIVATE_EXPEDITED) failed ({e}): no floor");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn membarrier_floor() -> Option<fn()> {
    None
}

/// 0, 1 and all other cores busy (deduplicated; only 0 on one core).
fn busy_counts(cores: usize) -> Vec<usize> {
    let others = cores.saturating_sub(1);
    let mut v: Vec<usize> = [0, 1, others]
        .into_iter()
        .filter(|&b| b <= others)
        .collect();
    v.dedup();
    v
}

fn group_name(busy: usize) -> String {
    format!("kill_busy_{busy}")
}

fn kill(c: &mut Criterion, cores: &[core_affinity::CoreId], floor: Option<fn()>) {
    let mut ops = vec![
        ("kill_confirm", Op::KillConfirm),
        ("kill_release", Op::KillRelease),
    ];
    if let Some(f) = floor {
        ops.push(("membarrier", Op::Membarrier(f)));
    }
    for busy in busy_counts(cores.len().max(1)) {
        let mut g = c.benchmark_group(group_name(busy));
        for &(name, op) in &ops {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| measure(op, busy, iters, cores))
            });
        }
        g.finish();
    }
}

fn summary(results: &report::Results, cores: usize) {
    let rows: Vec<_> = busy_counts(cores)
        .into_iter()
        .map(|busy| {
            let t = |name| results.median_ns(&group_name(busy), name);
            (busy, t("kill_confirm"), t("kill_release"), t("membarrier"))
        })
        .collect();
    // Nothing measured (filtered out, `--test`, `--list`, ...): no table.
    if rows
        .iter()
        .any(|r| r.1.is_some() || r.2.is_some() || r.3.is_some())
    {
        single_table(rows);
    }
    let many: Vec<_> = many_settings(cores)
        .into_iter()
        .map(|setting| {
            let t = |name| results.median_ns(&many_group_name(setting), name);
            let floor = results.median_ns(&group_name(setting.0), "membarrier");
            (setting, t("one_by_one"), t("batched"), floor)
        })
        .filter(|r| r.1.is_some() || r.2.is_some())
        .collect();
    #[cfg(feature = "dax")]
    pools_table(results, cores);
    if many.is_empty() {
        return;
    }
    println!();
    println!("killing {REFS} refs: median ns per shutdown, this run only");
    println!(
        "{:>16} {:>13} {:>13} {:>11} {:>17} {:>17}",
        "busy", "one by one", "batched", "membarrier", "one÷membarrier", "batched÷membarrier"
    );
    for ((busy, on), one, batched, floor) in many {
        let on = match on {
            Busy1000::SameRefs => "on these refs",
            Busy1000::Elsewhere => "elsewhere",
        };
        println!(
            "{:>16} {:>13} {:>13} {:>11} {:>17} {:>17}",
            format!("{busy} {on}"),
            report::ns(one),
            report::ns(batched),
            report::ns(floor),
            report::ratio(one, floor),
            report::ratio(batched, floor),
        );
    }
}

#[cfg(feature = "dax")]
fn pools_table(results: &report::Results, cores: usize) {
    let rows: Vec<Row> = busy_counts(cores)
        .into_iter()
        .map(|busy| {
            let t = |name| results.median_ns(&pools_group_name(busy), name);
            let floor = results.median_ns(&group_name(busy), "membarrier");
            (busy, t("one_by_one"), t("batched"), floor)
        })
        .filter(|r| r.1.is_some() || r.2.is_some())
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("shutting down {POOLS} pools (one page held in each): median ns, this run only");
    println!(
        "{:>5} {:>13} {:>13} {:>11} {:>17} {:>19}",
        "busy", "one by one", "batched", "membarrier", "one÷membarrier", "batched÷membarrier"
    );
    for (busy, one, batched, floor) in rows {
        println!(
            "{:>5} {:>13} {:>13} {:>11} {:>17} {:>19}",
            busy,
            report::ns(one),
            report::ns(batched),
            report::ns(floor),
            report::ratio(one, floor),
            report::ratio(batched, floor),
        );
    }
}

type Row = (usize, Option<f64>, Option<f64>, Option<f64>);

fn single_table(rows: Vec<Row>) {
    println!();
    println!("kill summary: median ns, this run only");
    println!(
        "{:>5} {:>13} {:>13} {:>11} {:>17}",
        "busy", "kill→confirm", "kill→release", "membarrier", "confirm÷membarrier"
    );
    for (busy, confirm, release, floor) in rows {
        println!(
            "{:>5} {:>13} {:>13} {:>11} {:>17}",
            busy,
            report::ns(confirm),
            report::ns(release),
            report::ns(floor),
            report::ratio(confirm, floor),
        );
    }
}

fn main() {
    let results = report::Results::start();
    base();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if !cores
        .first()
        .is_some_and(|&c| core_affinity::set_for_current(c))
    {
        eprintln!("warning: could not pin the benchmark thread; results are unpinned");
    }
    let floor = membarrier_floor();
    let mut c = Criterion::default().configure_from_args();
    kill(&mut c, &cores, floor);
    kill_many(&mut c, &cores);
    shutdown_pools(&mut c, &cores);
    c.final_summary();
    summary(&results, cores.len().max(1));
}
