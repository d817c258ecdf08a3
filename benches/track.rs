//! Cost of holder tracking per get+put, on one thread and on two threads
//! sharing one ref. Run it twice and compare:
//!
//! ```text
//! cargo bench --bench track                     # feature off: the baseline
//! cargo bench --bench track --features track    # every reference recorded
//! ```
//!
//! The group is named `track_on` or `track_off` after the build. Times
//! differ between runs on a shared machine, so each run also measures an
//! `Arc` clone+drop as a yardstick, and the summary prints every operation
//! as ns per pair and ÷ that yardstick: compare the ratios of the two runs.

#[path = "contenders/report.rs"]
mod report;

use criterion::Criterion;
use percpu_ref::{NoRelease, PercpuArc, PercpuRef};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;

const TRACK: bool = cfg!(feature = "track");

fn group(on: bool) -> &'static str {
    if on {
        "track_on"
    } else {
        "track_off"
    }
}

/// The measured operations: each is one get and one put.
const OPS: [&str; 6] = [
    "tryget_live+drop",
    "clone+drop",
    "owned+drop",
    "get_many+put_many",
    "tryget_live+drop_2threads",
    "arc_clone+drop",
];

fn run(op: &str, r: &PercpuArc<u64>, iters: u64) {
    match op {
        "tryget_live+drop" => {
            for _ in 0..iters {
                drop(black_box(r.tryget_live()));
            }
        }
        "clone+drop" => {
            let held = r.tryget_live().expect("live");
            for _ in 0..iters {
                drop(black_box(held.clone()));
            }
        }
        "owned+drop" => {
            for _ in 0..iters {
                drop(black_box(r.tryget_live_owned()));
            }
        }
        "get_many+put_many" => {
            let held = r.tryget_live().expect("live");
            for _ in 0..iters {
                // SAFETY: `held` keeps the count above zero; every get is
                // put right away.
                unsafe {
                    r.get_many(black_box(1));
                    r.put_many(black_box(1));
                }
            }
            drop(held);
        }
        _ => unreachable!("{op}"),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group(group(TRACK));
    let r: PercpuArc<u64> = PercpuRef::builder(7).build_arc();
    for op in &OPS[..4] {
        g.bench_function(*op, |b| b.iter_custom(|iters| time(|| run(op, &r, iters))));
    }
    // Two threads on one ref: the sharded records must not serialise them.
    g.bench_function(OPS[4], |b| {
        b.iter_custom(|iters| {
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    // Acquire: pairs with the Release store below.
                    while !stop.load(Acquire) {
                        run("tryget_live+drop", &r, 64);
                    }
                });
                let t = time(|| run("tryget_live+drop", &r, iters));
                // Release: pairs with the Acquire load above.
                stop.store(true, Release);
                t
            })
        })
    });
    let yardstick = Arc::new(NoRelease);
    g.bench_function(OPS[5], |b| {
        b.iter(|| drop(black_box(Arc::clone(&yardstick))))
    });
    g.finish();
}

fn time(f: impl FnOnce()) -> std::time::Duration {
    let t0 = std::time::Instant::now();
    f();
    t0.elapsed()
}

fn summary(results: &report::Results) {
    let arc = results.median_ns(group(TRACK), OPS[5]);
    let rows: Vec<_> = OPS[..5]
        .iter()
        .map(|op| (op, results.median_ns(group(TRACK), op)))
        .collect();
    if rows.iter().all(|r| r.1.is_none()) {
        return;
    }
    println!();
    println!(
        "holder tracking {}: median ns per get+put, this run only",
        if TRACK { "on" } else { "off" }
    );
    println!("{:>26} {:>10} {:>10}", "operation", "ns", "÷Arc");
    for (op, t) in rows {
        println!(
            "{:>26} {:>10} {:>10}",
            op,
            report::ns(t),
            report::ratio(t, arc)
        );
    }
    println!("{:>26} {:>10}", OPS[5], report::ns(arc));
}

fn main() {
    let results = report::Results::start();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary(&results);
}
