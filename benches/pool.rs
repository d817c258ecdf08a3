//! alloc+free pair: `DevicePagePool` (per-CPU free-page caches in front of
//! a shared list, a page refcount, one pool `PercpuRef` reference per
//! allocated page) against the free lists a user would write instead: a
//! `Mutex<Vec<u32>>` and a crossbeam `ArrayQueue<u32>` of page indices.
//! 1 thread, and 2 threads (one per core, pinned) on one pool.
//!
//! Run: `cargo bench --bench pool` (quick look:
//! `cargo bench --bench pool -- --warm-up-time 1 --measurement-time 2`).
//! One iteration is one alloc+free pair *on every thread*; the summary at
//! the end prints median ns per pair and the ratios (this run only).
//! Target (issue 6): ours with 2 threads ≤ 0.3× `Mutex<Vec>` with 2 threads.

#[path = "contenders/report.rs"]
mod report;

use criterion::{Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use percpu_ref::DevicePagePool;
use std::hint::black_box;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

const PAGES: usize = 1024;

/// One free list under test.
trait FreeList: Sync {
    /// Allocate one page and give it back.
    fn pair(&self);
}

struct Pool(DevicePagePool);

impl FreeList for Pool {
    #[inline]
    fn pair(&self) {
        let page = self.0.alloc().expect("a free page");
        black_box(&page);
        drop(page);
    }
}

struct MutexVec(Mutex<Vec<u32>>);

impl FreeList for MutexVec {
    #[inline]
    fn pair(&self) {
        let i = self.0.lock().unwrap().pop().expect("a free page");
        black_box(i);
        self.0.lock().unwrap().push(i);
    }
}

struct Queue(ArrayQueue<u32>);

impl FreeList for Queue {
    #[inline]
    fn pair(&self) {
        let i = self.0.pop().expect("a free page");
        black_box(i);
        self.0.push(i).expect("room for it");
    }
}

type Make = fn() -> Box<dyn FreeList>;

const CONTENDERS: &[(&str, Make)] = &[
    ("device_page_pool", || {
        Box::new(Pool(DevicePagePool::anonymous(PAGES * 4096).unwrap()))
    }),
    ("mutex_vec", || {
        Box::new(MutexVec(Mutex::new((0..PAGES as u32).collect())))
    }),
    ("array_queue", || {
        let q = ArrayQueue::new(PAGES);
        for i in 0..PAGES as u32 {
            q.push(i).unwrap();
        }
        Box::new(Queue(q))
    }),
];

fn pin(cores: &[core_affinity::CoreId], i: usize) -> bool {
    !cores.is_empty() && core_affinity::set_for_current(cores[i % cores.len()])
}

/// `iters` pairs on each of `threads` workers started together; the
/// slowest worker's time. Worker 0 is the calling thread.
fn run(
    list: &dyn FreeList,
    threads: usize,
    iters: u64,
    cores: &[core_affinity::CoreId],
) -> Duration {
    let work = || {
        for _ in 0..iters {
            list.pair();
        }
    };
    if threads <= 1 {
        let t0 = Instant::now();
        work();
        return t0.elapsed();
    }
    let barrier = Barrier::new(threads);
    let timed = || {
        barrier.wait();
        let t0 = Instant::now();
        work();
        t0.elapsed()
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..threads)
            .map(|w| {
                let timed = &timed;
                s.spawn(move || {
                    pin(cores, w);
                    timed()
                })
            })
            .collect();
        let mine = timed();
        others
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .fold(mine, Duration::max)
    })
}

fn group(threads: usize) -> String {
    format!(
        "alloc_free_{threads}_thread{}",
        if threads == 1 { "" } else { "s" }
    )
}

fn main() {
    let results = report::Results::start();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if !pin(&cores, 0) {
        eprintln!("warning: could not pin the benchmark thread; results are unpinned");
    }
    let many = cores.len().max(2);
    let counts = [1, 2.min(many)];
    let mut c = Criterion::default().configure_from_args();
    for &threads in &counts {
        let mut g = c.benchmark_group(group(threads));
        g.throughput(Throughput::Elements(threads as u64));
        for (name, make) in CONTENDERS {
            let list = make();
            g.bench_function(*name, |b| {
                b.iter_custom(|iters| run(&*list, threads, iters, &cores))
            });
        }
        g.finish();
    }
    c.final_summary();

    let t = |name: &str, threads: usize| results.median_ns(&group(threads), name);
    if CONTENDERS
        .iter()
        .all(|(n, _)| t(n, 1).is_none() && t(n, 2).is_none())
    {
        return; // filtered out, `--test`, `--list`, ...
    }
    println!();
    println!("alloc+free summary: median ns per pair per thread, this run only");
    println!("{:<20} {:>10} {:>10}", "contender", "1 thread", "2 threads");
    for (name, _) in CONTENDERS {
        println!(
            "{:<20} {:>10} {:>10}",
            name,
            report::ns(t(name, 1)),
            report::ns(t(name, 2))
        );
    }
    for other in ["mutex_vec", "array_queue"] {
        println!(
            "device_page_pool ÷ {other}: {} (1 thread), {} (2 threads)",
            report::ratio(t("device_page_pool", 1), t(other, 1)),
            report::ratio(t("device_page_pool", 2), t(other, 2)),
        );
    }
    println!("target: device_page_pool ÷ mutex_vec ≤ 0.30× with 2 threads");
}
