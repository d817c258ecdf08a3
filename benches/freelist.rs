//! Free-page lists, pop+push pair: the pool's `FreeLists` (rseq per-CPU
//! stacks where available, and the portable try-lock magazines) against a
//! `Mutex<Vec<u32>>` (two lock round trips), on 1 thread and on all cores
//! at once on one shared list, threads pinned one per core.
//!
//! Run: `cargo bench --bench freelist` (quick look:
//! `cargo bench --bench freelist -- --warm-up-time 1 --measurement-time 2`).
//! One iteration is one pop+push pair *on every thread*. The summary at the
//! end prints ratios from this run only.

#[path = "contenders/report.rs"]
mod report;
#[path = "contenders/run.rs"]
mod run;

use criterion::{Criterion, Throughput};
use percpu_ref::__bench::FreeLists;
use percpu_ref::Tier;
use run::{cores, pin, run_pinned, Counter};
use std::hint::black_box;
use std::sync::Mutex;

/// Pages in every list: enough that no thread ever finds them all taken.
const PAGES: usize = 4096;

/// `FreeLists::pop` + `push` of the same page.
struct Free(FreeLists);

impl Counter for Free {
    fn run(&self, _worker: usize, iters: u64) {
        let f = black_box(&self.0);
        for _ in 0..iters {
            let i = f.pop().expect("a page is free");
            f.push(black_box(i));
        }
    }
}

/// `Mutex<Vec<u32>>`: lock, pop, unlock; lock, push, unlock.
struct MutexVec(Mutex<Vec<u32>>);

impl Counter for MutexVec {
    fn run(&self, _worker: usize, iters: u64) {
        let m = black_box(&self.0);
        for _ in 0..iters {
            let i = m.lock().unwrap().pop().expect("a page is free");
            m.lock().unwrap().push(black_box(i));
        }
    }
}

type Make = Box<dyn Fn() -> Box<dyn Counter>>;

fn contenders() -> Vec<(&'static str, Make)> {
    let mut v: Vec<(&'static str, Make)> = Vec::new();
    if FreeLists::with_tier(1, Tier::Rseq).tier() == Tier::Rseq {
        v.push((
            "freelists_rseq",
            Box::new(|| Box::new(Free(FreeLists::with_tier(PAGES, Tier::Rseq)))),
        ));
    }
    v.push((
        "freelists_portable",
        Box::new(|| Box::new(Free(FreeLists::with_tier(PAGES, Tier::Portable)))),
    ));
    v.push((
        "mutex_vec",
        Box::new(|| Box::new(MutexVec(Mutex::new((0..PAGES as u32).collect())))),
    ));
    v
}

fn group_name(threads: usize) -> String {
    format!(
        "pop_push_{threads}_thread{}",
        if threads == 1 { "" } else { "s" }
    )
}

fn thread_counts(cores: &[core_affinity::CoreId]) -> Vec<usize> {
    let mut v = vec![1, cores.len().max(1)];
    v.dedup();
    v
}

fn main() {
    let results = report::Results::start();
    let cores = cores();
    if !pin(&cores, 0) {
        eprintln!("warning: could not pin the benchmark thread; results are unpinned");
    }
    let mut c = Criterion::default().configure_from_args();
    let counts = thread_counts(&cores);
    for &threads in &counts {
        let mut g = c.benchmark_group(group_name(threads));
        g.throughput(Throughput::Elements(threads as u64));
        for (name, make) in contenders() {
            let list = make();
            g.bench_function(name, |b| {
                b.iter_custom(|iters| run_pinned(&*list, threads, iters, &cores))
            });
        }
        g.finish();
    }
    c.final_summary();

    let n = *counts.last().expect("at least one thread count");
    let t = |name: &str, threads: usize| results.median_ns(&group_name(threads), name);
    let names: Vec<&str> = contenders().iter().map(|(name, _)| *name).collect();
    if names.iter().all(|name| t(name, 1).is_none()) {
        return; // filtered out, `--test`, `--list`, ...
    }
    println!();
    println!("pop+push summary: median ns per pair per thread, this run only");
    println!(
        "{:<20} {:>10} {:>10} {:>11} {:>16} {:>16}",
        "contender",
        "1 thread",
        format!("{n} threads"),
        "efficiency",
        "÷ mutex (1 thr)",
        format!("÷ mutex ({n} thr)"),
    );
    for name in names {
        println!(
            "{:<20} {:>10} {:>10} {:>11} {:>16} {:>16}",
            name,
            report::ns(t(name, 1)),
            report::ns(t(name, n)),
            report::ratio(t(name, 1), t(name, n)).trim_end_matches('×'),
            report::ratio(t(name, 1), t("mutex_vec", 1)),
            report::ratio(t(name, n), t("mutex_vec", n)),
        );
    }
}
