//! Page refcount benchmarks: `PageRef<NoHook>` against a bare `AtomicU32`,
//! device pages (hooked to a `PercpuRef`) against ordinary pages on the hot
//! path (target: device ÷ ordinary ≤ 1.05), and the cost of the terminal
//! transitions, where the hook runs.
//!
//! Run: `cargo bench --bench page -- --warm-up-time 1 --measurement-time 2`.
//! Timings on a shared machine are noisy; compare ratios within one run.
//! The exact, repeatable check of the zero-cost claim is
//! `scripts/zero-cost.sh` (callgrind instruction counts).

use criterion::{criterion_group, Criterion};
use percpu_ref::{
    ArcPercpuRefHook, MixedHook, NoHook, NoRelease, PageRef, PageRefHook, PercpuRef, PercpuRefHook,
};
use std::hint::black_box;
use std::sync::atomic::{fence, AtomicU32, Ordering::*};
use std::sync::Arc;

/// get + put of a page that stays referenced (count 1 → 2 → 1).
fn get_put<H: PageRefHook>(page: &PageRef<H>) {
    let p = black_box(page);
    p.inc();
    black_box(p.dec_and_test());
}

/// Speculative get + put of a referenced page.
fn lookup_put<H: PageRefHook>(page: &PageRef<H>) {
    let p = black_box(page);
    black_box(p.get_unless_zero());
    black_box(p.dec_and_test());
}

/// Allocate + final put (0 → 1 → 0): both terminal transitions.
fn alloc_free<H: PageRefHook>(page: &PageRef<H>) {
    let p = black_box(page);
    black_box(p.first_ref().is_ok());
    black_box(p.dec_and_test());
}

fn allocated<H: PageRefHook>(hook: H) -> PageRef<H> {
    let p = PageRef::new(hook);
    p.first_ref().unwrap();
    p
}

fn bench_hot_path(c: &mut Criterion) {
    let device = Arc::new(PercpuRef::new((), NoRelease));
    // SAFETY: only the PageRefs call the hooks; every bench iteration puts
    // what it gets.
    let dev = unsafe { PercpuRefHook::new(&*device) };
    // SAFETY: as above.
    let arc_dev = unsafe { ArcPercpuRefHook::new(Arc::clone(&device)) };

    let bare = AtomicU32::new(1);
    let ordinary = allocated(NoHook);
    let device_page = allocated(dev);
    let arc_device_page = allocated(arc_dev);
    let mixed_device = allocated(MixedHook::device(dev));
    let mixed_ordinary = allocated(MixedHook::<PercpuRefHook<'_, ()>>::ordinary());

    let mut g = c.benchmark_group("page/get_put");
    g.bench_function("bare_atomic_u32", |b| {
        b.iter(|| {
            let a = black_box(&bare);
            a.fetch_add(1, Relaxed);
            let last = a.fetch_sub(1, Release) == 1;
            if last {
                fence(Acquire);
            }
            black_box(last)
        })
    });
    g.bench_function("ordinary_nohook", |b| b.iter(|| get_put(&ordinary)));
    g.bench_function("device_percpu_hook", |b| b.iter(|| get_put(&device_page)));
    g.bench_function("device_arc_percpu_hook", |b| {
        b.iter(|| get_put(&arc_device_page))
    });
    g.bench_function("mixed_device", |b| b.iter(|| get_put(&mixed_device)));
    g.bench_function("mixed_ordinary", |b| b.iter(|| get_put(&mixed_ordinary)));
    g.finish();

    let mut g = c.benchmark_group("page/lookup_put");
    g.bench_function("bare_atomic_u32", |b| {
        b.iter(|| {
            let a = black_box(&bare);
            let mut cur = a.load(Relaxed);
            let got = loop {
                if cur == 0 {
                    break false;
                }
                match a.compare_exchange_weak(cur, cur + 1, Acquire, Relaxed) {
                    Ok(_) => break true,
                    Err(found) => cur = found,
                }
            };
            black_box(got);
            let last = a.fetch_sub(1, Release) == 1;
            if last {
                fence(Acquire);
            }
            black_box(last)
        })
    });
    g.bench_function("ordinary_nohook", |b| b.iter(|| lookup_put(&ordinary)));
    g.bench_function("device_percpu_hook", |b| {
        b.iter(|| lookup_put(&device_page))
    });
    g.finish();

    assert_eq!(ordinary.count(), 1);
    assert_eq!(device_page.count(), 1);
}

fn bench_transitions(c: &mut Criterion) {
    let device = Arc::new(PercpuRef::new((), NoRelease));
    let atomic_device = PercpuRef::builder(()).atomic().build();
    // SAFETY: only the PageRefs call the hooks; every iteration frees what
    // it allocates.
    let dev = unsafe { PercpuRefHook::new(&*device) };
    // SAFETY: as above.
    let atomic_dev = unsafe { PercpuRefHook::new(&atomic_device) };
    // SAFETY: as above.
    let arc_dev = unsafe { ArcPercpuRefHook::new(Arc::clone(&device)) };

    let ordinary = PageRef::new(NoHook);
    let device_page = PageRef::new(dev);
    let atomic_device_page = PageRef::new(atomic_dev);
    let arc_device_page = PageRef::new(arc_dev);
    let mixed_ordinary = PageRef::new(MixedHook::<PercpuRefHook<'_, ()>>::ordinary());

    let mut g = c.benchmark_group("page/alloc_free");
    g.bench_function("ordinary_nohook", |b| b.iter(|| alloc_free(&ordinary)));
    g.bench_function("mixed_ordinary", |b| b.iter(|| alloc_free(&mixed_ordinary)));
    g.bench_function("device_percpu_hook", |b| {
        b.iter(|| alloc_free(&device_page))
    });
    g.bench_function("device_arc_percpu_hook", |b| {
        b.iter(|| alloc_free(&arc_device_page))
    });
    g.bench_function("device_percpu_hook_atomic_mode", |b| {
        b.iter(|| alloc_free(&atomic_device_page))
    });
    g.finish();

    assert_eq!(device_page.count(), 0);
}

criterion_group!(benches, bench_hot_path, bench_transitions);

/// Interleaved A/B rounds, best of each: on a shared machine other load
/// only ever adds time, so the minimum over many short rounds, taken in
/// alternation, gives a much steadier ratio than two separate means.
fn interleaved_ratios() {
    const OPS: u64 = 200_000;
    const ROUNDS: usize = 40;

    fn run<H: PageRefHook>(page: &PageRef<H>) {
        let p = black_box(page);
        for _ in 0..OPS {
            p.inc();
            black_box(p.dec_and_test());
        }
    }

    let device = PercpuRef::new((), NoRelease);
    // SAFETY: only the PageRefs call the hooks; every get is put.
    let dev = unsafe { PercpuRefHook::new(&device) };
    let bare = AtomicU32::new(1);
    let ordinary = allocated(NoHook);
    let device_page = allocated(dev);
    let mixed_device = allocated(MixedHook::device(dev));
    let mixed_ordinary = allocated(MixedHook::<PercpuRefHook<'_, ()>>::ordinary());

    let bare_run = || {
        let a = black_box(&bare);
        for _ in 0..OPS {
            a.fetch_add(1, Relaxed);
            let last = a.fetch_sub(1, Release) == 1;
            if last {
                fence(Acquire);
            }
            black_box(last);
        }
    };
    let variants: [(&str, &dyn Fn()); 5] = [
        ("bare AtomicU32", &bare_run),
        ("ordinary page (NoHook)", &|| run(&ordinary)),
        ("device page (PercpuRefHook)", &|| run(&device_page)),
        ("mixed, ordinary page", &|| run(&mixed_ordinary)),
        ("mixed, device page", &|| run(&mixed_device)),
    ];
    let mut best = [f64::INFINITY; 5];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in variants.iter().enumerate() {
            let t = std::time::Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_nanos() as f64 / OPS as f64);
        }
    }
    println!(
        "\npage/interleaved: best of {ROUNDS} alternating rounds of {OPS} inc+dec_and_test pairs"
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        println!(
            "  {name:<28} {:>6.2} ns/pair  ratio to ordinary page {:.3}",
            best[i],
            best[i] / best[1]
        );
    }
}

fn main() {
    benches();
    interleaved_ratios();
    Criterion::default().configure_from_args().final_summary();
}
