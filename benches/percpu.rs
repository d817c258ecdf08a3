//! get+put pair: `PercpuRef` (every tier in `contenders::PERCPU_TIERS`)
//! against `Arc` clone+drop, a shared `AtomicUsize`, a sharded counter, the
//! thread-local floor and `crossbeam_epoch::pin()`, on 1 thread and on all
//! cores at once on one shared counter, threads pinned one per core.
//!
//! Where the rseq tier is available three more rows show how close the
//! crate is to the hardware: `gate_add_imm` (the crate's `+1`/`-1`
//! sequences on an open gate, with no `PercpuRef` logic around them),
//! `gate_add_imm_area` (the same with the rseq area offset carried in a
//! register, as a handle holding the `Area` token would) and `limit` (a
//! bare gated sequence pair with every input in a register: the physical
//! limit for these semantics). The summary prints every tier's ratio to
//! `limit`.
//!
//! Run: `cargo bench --bench percpu` (quick look:
//! `cargo bench --bench percpu -- --warm-up-time 1 --measurement-time 2`).
//! Criterion reports time per iteration, where one iteration is one get+put
//! pair *on every thread*, and throughput as pairs per second over all
//! threads. A ratio summary is printed at the end: compare ratios within one
//! run, never absolute times across runs or machines.

mod contenders;
#[path = "contenders/report.rs"]
mod report;

use contenders::{all_contenders, cores, pin, run_pinned, PERCPU_TIERS};
use criterion::{Criterion, Throughput};

fn group_name(threads: usize) -> String {
    if threads == 1 {
        "get_put_1_thread".to_string()
    } else {
        format!("get_put_{threads}_threads")
    }
}

/// 1 and all cores (deduplicated on a 1-core host).
fn thread_counts(cores: &[core_affinity::CoreId]) -> Vec<usize> {
    let all = if cores.is_empty() {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        cores.len()
    };
    let mut v = vec![1, all];
    v.dedup();
    v
}

fn get_put(c: &mut Criterion, cores: &[core_affinity::CoreId]) {
    if !pin(cores, 0) {
        eprintln!("warning: could not pin the benchmark thread; results are unpinned");
    }
    for threads in thread_counts(cores) {
        let mut g = c.benchmark_group(group_name(threads));
        g.throughput(Throughput::Elements(threads as u64));
        for contender in all_contenders() {
            let counter = (contender.make)(threads);
            g.bench_function(contender.name, |b| {
                b.iter_custom(|iters| run_pinned(&*counter, threads, iters, cores))
            });
        }
        g.finish();
    }
}

fn summary(results: &report::Results, cores: &[core_affinity::CoreId]) {
    let counts = thread_counts(cores);
    let n = *counts.last().expect("at least one thread count");
    let t = |name: &str, threads: usize| results.median_ns(&group_name(threads), name);
    let names: Vec<&str> = all_contenders().iter().map(|c| c.name).collect();
    if names
        .iter()
        .all(|name| t(name, 1).is_none() && t(name, n).is_none())
    {
        return; // filtered out, `--test`, `--list`, ...
    }
    println!();
    println!("get+put summary: median ns per pair per thread, this run only");
    println!(
        "{:<26} {:>10} {:>10} {:>12}",
        "contender",
        "1 thread",
        format!("{n} threads"),
        "efficiency"
    );
    for name in &names {
        // n-thread throughput ÷ (n × 1-thread throughput) = t1 ÷ tn.
        println!(
            "{:<26} {:>10} {:>10} {:>12}",
            name,
            report::ns(t(name, 1)),
            report::ns(t(name, n)),
            report::ratio(t(name, 1), t(name, n)).trim_end_matches('×'),
        );
    }
    if t("limit", 1).is_some() {
        let mut rows: Vec<&str> = PERCPU_TIERS.iter().map(|t| t.name).collect();
        rows.extend([
            "gate_add_imm",
            "gate_add_imm_area",
            "tls_floor",
            "arc",
            "sharded",
        ]);
        for name in rows {
            println!(
                "{name} ÷ limit: {} (1 thread), {} ({n} threads)",
                report::ratio(t(name, 1), t("limit", 1)),
                report::ratio(t(name, n), t("limit", n)),
            );
        }
    }
    for tier in PERCPU_TIERS.iter().map(|t| t.name) {
        // Every way of taking a reference against `Ref` clone + drop.
        for way in ["tryget", "tryget_live", "owned", "owned_clone"] {
            let name = format!("{tier}_{way}");
            println!(
                "{name} ÷ {tier}: {} (1 thread), {} ({n} threads)",
                report::ratio(t(&name, 1), t(tier, 1)),
                report::ratio(t(&name, n), t(tier, n)),
            );
        }
        println!(
            "{tier}: arc ÷ {tier} {} (1 thread), {} ({n} threads); \
             {tier} ÷ tls_floor {} (1 thread), {} ({n} threads)",
            report::ratio(t("arc", 1), t(tier, 1)),
            report::ratio(t("arc", n), t(tier, n)),
            report::ratio(t(tier, 1), t("tls_floor", 1)),
            report::ratio(t(tier, n), t("tls_floor", n)),
        );
    }
}

fn main() {
    let results = report::Results::start();
    let cores = cores();
    let mut c = Criterion::default().configure_from_args();
    get_put(&mut c, &cores);
    c.final_summary();
    summary(&results, &cores);
}
