//! The device page pool against what a user would write instead, at 1 and
//! 2 threads (one per core, pinned):
//!
//! | group | ours | contenders |
//! |---|---|---|
//! | `alloc_free` | `DevicePagePool::alloc` + drop | `Mutex<Vec<u32>>` pop + push, crossbeam `ArrayQueue<u32>` |
//! | `lookup_{same,adjacent,distant}` | `DevicePagePool::lookup` + drop | `Arc` pages in an `ArcSwap` table: `load_full` + drop |
//! | `read_hot` | the scoped optimistic read of one hot page | `ArcSwap::load` guard, and `lookup` + drop |
//! | `floor` | register arithmetic, no shared memory: what 2 threads can get on this machine at all | |
//!
//! Page choice per thread: *same* — both threads one page; *adjacent* —
//! thread `t` page `P + t`; *distant* — thread `t` page `P + 64 t`. At one
//! thread the three are the same workload, so one thread runs `lookup_same`
//! only. A read copies the page's first 64 bytes out.
//!
//! Run: `cargo bench --bench pool` (quick look:
//! `cargo bench --bench pool -- --warm-up-time 1 --measurement-time 2`).
//! One iteration is one operation pair *on every thread*; the summary at
//! the end prints median ns per pair per thread and the ratios the targets
//! are stated in (this run only: absolute times vary between runs). The
//! `floor` group shows what two threads get on this machine with no shared
//! memory at all: other load on a small machine lowers every 2-thread
//! number, and the summary divides the efficiencies by the floor's too.

#[path = "contenders/report.rs"]
mod report;
#[path = "contenders/run.rs"]
mod run;

use arc_swap::ArcSwap;
use criterion::{Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use percpu_ref::{DevicePage, DevicePagePool, PoolOptions};
use run::{cores, pin, run_pinned, Counter};
use std::hint::black_box;
use std::sync::Mutex;

const PAGES: usize = 1024;
const PAGE: usize = 4096;
/// First page the lookups and reads use (away from the pool's ends).
const P0: usize = 256;
/// Bytes a read copies out.
const READ: usize = 64;

/// Which page worker `w` uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spread {
    Same,
    Adjacent,
    Distant,
}

impl Spread {
    fn page(self, w: usize) -> usize {
        match self {
            Spread::Same => P0,
            Spread::Adjacent => P0 + w,
            Spread::Distant => P0 + 64 * w,
        }
    }
}

// ------------------------------------------------------------ alloc + free

struct PoolAlloc(DevicePagePool);

impl Counter for PoolAlloc {
    fn run(&self, _w: usize, iters: u64) {
        for _ in 0..iters {
            let page = self.0.alloc().expect("a free page");
            drop(black_box(page));
        }
    }
}

struct MutexVec(Mutex<Vec<u32>>);

impl Counter for MutexVec {
    fn run(&self, _w: usize, iters: u64) {
        for _ in 0..iters {
            let i = self.0.lock().unwrap().pop().expect("a free page");
            black_box(i);
            self.0.lock().unwrap().push(i);
        }
    }
}

struct Queue(ArrayQueue<u32>);

impl Counter for Queue {
    fn run(&self, _w: usize, iters: u64) {
        for _ in 0..iters {
            let i = self.0.pop().expect("a free page");
            black_box(i);
            self.0.push(i).expect("room for it");
        }
    }
}

// ------------------------------------------------------------ lookups

/// A pool with every page allocated and held, so any page can be found.
struct FullPool {
    pool: DevicePagePool,
    _held: Vec<DevicePage>,
    base: usize,
}

impl FullPool {
    fn new(opts: &PoolOptions) -> Self {
        let pool = DevicePagePool::anonymous_with(PAGES * PAGE, opts).unwrap();
        let mut held: Vec<DevicePage> = (0..PAGES).map(|_| pool.alloc().unwrap()).collect();
        held.sort_by_key(DevicePage::index);
        let base = pool.as_ptr() as usize;
        FullPool {
            pool,
            _held: held,
            base,
        }
    }

    fn addr(&self, page: usize) -> *const u8 {
        (self.base + page * PAGE + 8) as *const u8
    }
}

struct PoolLookup(FullPool, Spread);

impl Counter for PoolLookup {
    fn run(&self, w: usize, iters: u64) {
        let addr = self.0.addr(self.1.page(w));
        for _ in 0..iters {
            let page = DevicePagePool::lookup(black_box(addr)).expect("allocated");
            drop(black_box(page));
        }
    }
}

/// What a user would write without the pool: `Arc` pages in an `ArcSwap`
/// table; a counted lookup is `load_full` (one shared `Arc` count per page).
struct ArcTable(Vec<ArcSwap<Vec<u8>>>, Spread);

impl ArcTable {
    fn new(spread: Spread) -> Self {
        ArcTable(
            (0..PAGES)
                .map(|i| ArcSwap::from_pointee(vec![i as u8; PAGE]))
                .collect(),
            spread,
        )
    }
}

impl Counter for ArcTable {
    fn run(&self, w: usize, iters: u64) {
        let slot = &self.0[self.1.page(w)];
        for _ in 0..iters {
            drop(black_box(slot.load_full()));
        }
    }
}

// ------------------------------------------------------------ hot reads

/// The read contender: an `ArcSwap` guard (no `Arc` count), bytes copied out.
struct ArcGuardRead(ArcTable);

impl Counter for ArcGuardRead {
    fn run(&self, w: usize, iters: u64) {
        let slot = &self.0 .0[self.0 .1.page(w)];
        let mut buf = [0u8; READ];
        for _ in 0..iters {
            let g = slot.load();
            buf.copy_from_slice(&g[..READ]);
            black_box(&buf);
        }
    }
}

/// The scoped optimistic read by address (registry, pin, version check).
struct PoolRead(FullPool, Spread);

impl Counter for PoolRead {
    fn run(&self, w: usize, iters: u64) {
        let addr = self.0.addr(self.1.page(w));
        let mut buf = [0u8; READ];
        for _ in 0..iters {
            DevicePagePool::read(black_box(addr), |v| v.read_into(0, &mut buf))
                .expect("no writer")
                .expect("in range");
            black_box(&buf);
        }
    }
}

/// The same read by page index on the pool handle: no registry.
struct PoolReadPage(FullPool, Spread);

impl Counter for PoolReadPage {
    fn run(&self, w: usize, iters: u64) {
        let page = self.1.page(w);
        let mut buf = [0u8; READ];
        for _ in 0..iters {
            self.0
                .pool
                .read_page(black_box(page), |v| v.read_into(0, &mut buf))
                .expect("no writer")
                .expect("in range");
            black_box(&buf);
        }
    }
}

/// No shared memory at all: register arithmetic. Its 2-thread efficiency
/// is what the machine allows (other load, or vCPUs that share a core,
/// lower every 2-thread number by as much).
struct Floor;

impl Counter for Floor {
    fn run(&self, w: usize, iters: u64) {
        let mut x = black_box(w as u64 + 1);
        for i in 0..iters * 16 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(black_box(i));
        }
        black_box(x);
    }
}

// ------------------------------------------------------------ plan

fn group(name: &str, threads: usize) -> String {
    format!("{name}_{threads}t")
}

type Make = Box<dyn Fn() -> Box<dyn Counter>>;

fn optimistic() -> PoolOptions {
    PoolOptions::new().optimistic_reads()
}

fn mk<W: Counter + 'static>(f: impl Fn() -> W + 'static) -> Make {
    Box::new(move || Box::new(f()))
}

/// Every (group, threads, contender) measured.
/// A group: its name, the thread counts it runs at, its contenders.
type Group = (&'static str, Vec<usize>, Vec<(&'static str, Make)>);

fn plan() -> Vec<Group> {
    let lookups = |spread: Spread| -> Vec<(&'static str, Make)> {
        vec![
            (
                "device_page_pool",
                mk(move || PoolLookup(FullPool::new(&PoolOptions::new()), spread)),
            ),
            ("arc_swap_table", mk(move || ArcTable::new(spread))),
        ]
    };
    vec![
        (
            "alloc_free",
            vec![1, 2],
            vec![
                (
                    "device_page_pool",
                    mk(|| PoolAlloc(DevicePagePool::anonymous(PAGES * PAGE).unwrap())),
                ),
                (
                    "mutex_vec",
                    mk(|| MutexVec(Mutex::new((0..PAGES as u32).collect()))),
                ),
                (
                    "array_queue",
                    mk(|| {
                        let q = ArrayQueue::new(PAGES);
                        for i in 0..PAGES as u32 {
                            q.push(i).unwrap();
                        }
                        Queue(q)
                    }),
                ),
            ],
        ),
        ("lookup_same", vec![1, 2], lookups(Spread::Same)),
        ("lookup_adjacent", vec![2], lookups(Spread::Adjacent)),
        ("lookup_distant", vec![2], lookups(Spread::Distant)),
        (
            "floor",
            vec![1, 2],
            vec![("register_arithmetic", mk(|| Floor))],
        ),
        (
            "read_hot",
            vec![1, 2],
            vec![
                (
                    "scoped_read",
                    mk(|| PoolRead(FullPool::new(&optimistic()), Spread::Same)),
                ),
                (
                    "scoped_read_by_index",
                    mk(|| PoolReadPage(FullPool::new(&optimistic()), Spread::Same)),
                ),
                (
                    "arc_swap_guard",
                    mk(|| ArcGuardRead(ArcTable::new(Spread::Same))),
                ),
            ],
        ),
    ]
}

fn main() {
    let results = report::Results::start();
    let cores = cores();
    if !pin(&cores, 0) {
        eprintln!("warning: could not pin the benchmark thread; results are unpinned");
    }
    let mut c = Criterion::default().configure_from_args();
    for (name, threads, contenders) in plan() {
        for &t in &threads {
            let mut g = c.benchmark_group(group(name, t));
            g.throughput(Throughput::Elements(t as u64));
            for (who, make) in &contenders {
                let work = make();
                g.bench_function(*who, |b| {
                    b.iter_custom(|iters| run_pinned(&*work, t, iters, &cores))
                });
            }
            g.finish();
        }
    }
    c.final_summary();
    summary(&results);
}

fn summary(results: &report::Results) {
    // Medians from criterion; only this run's (`None` when filtered out).
    let t = |g: &str, threads: usize, who: &str| results.median_ns(&group(g, threads), who);
    let rows: Vec<(String, Option<f64>, Option<f64>)> = plan()
        .into_iter()
        .flat_map(|(g, _, contenders)| {
            contenders
                .into_iter()
                .map(move |(who, _)| (format!("{g} {who}"), t(g, 1, who), t(g, 2, who)))
        })
        .collect();
    if rows.iter().all(|(_, a, b)| a.is_none() && b.is_none()) {
        return; // filtered out, `--test`, `--list`, ...
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!();
    println!("pool summary: median ns per pair per thread, this run only ({cpu})");
    println!("{:<40} {:>10} {:>10}", "workload", "1 thread", "2 threads");
    for (name, a, b) in &rows {
        println!("{:<40} {:>10} {:>10}", name, report::ns(*a), report::ns(*b));
    }
    let pool = "device_page_pool";
    println!();
    for other in ["mutex_vec", "array_queue"] {
        println!(
            "alloc+free ÷ {other}: {} (1 thread), {} (2 threads)",
            report::ratio(t("alloc_free", 1, pool), t("alloc_free", 1, other)),
            report::ratio(t("alloc_free", 2, pool), t("alloc_free", 2, other)),
        );
    }
    // Efficiency = 1-thread time ÷ 2-thread time per pair per thread. The
    // floor's is the most any workload gets on this machine in this run
    // (other load on it lowers every 2-thread number alike).
    let eff = |g1: &str, g2: &str, who: &str| match (t(g1, 1, who), t(g2, 2, who)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let floor = eff("floor", "floor", "register_arithmetic");
    let show = |e: Option<f64>| e.map_or_else(|| "-".into(), |e| format!("{e:.2}"));
    println!(
        "machine floor (no shared memory at all): 2-thread efficiency {}",
        show(floor)
    );
    for spread in ["adjacent", "distant", "same"] {
        let e = eff("lookup_same", &format!("lookup_{spread}"), pool);
        println!(
            "lookup+drop, {} page{}: 2-thread efficiency {} (÷ floor: {}){}",
            if spread == "same" { "one" } else { spread },
            if spread == "same" {
                ""
            } else {
                "s, one per thread"
            },
            show(e),
            show(e.zip(floor).map(|(e, f)| e / f)),
            if spread == "same" {
                ""
            } else {
                " (target ≥ 0.9)"
            },
        );
    }
    for who in ["scoped_read", "scoped_read_by_index"] {
        if t("read_hot", 1, who).is_none() && t("read_hot", 2, who).is_none() {
            continue;
        }
        println!(
            "{who} of one hot page: 2 threads ÷ 1 thread {} (target ≤ 2), ÷ lookup+drop of one page at 2 threads {} (target ≤ 0.2)",
            report::ratio(t("read_hot", 2, who), t("read_hot", 1, who)),
            report::ratio(t("read_hot", 2, who), t("lookup_same", 2, pool)),
        );
    }
}
