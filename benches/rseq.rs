//! The building blocks of the rseq tier, measured alone: reading the CPU
//! id, the forms a plain memory add can take (why the counters' commit is
//! `add qword ptr [reg], imm`), and the `membarrier` fence a mode switch
//! pays.
//!
//! Run: `cargo bench --bench rseq` (quick look:
//! `cargo bench --bench rseq -- --warm-up-time 1 --measurement-time 2`).
//! Compare ratios within one run.

use criterion::{criterion_group, criterion_main, Criterion};
use percpu_ref::__bench;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

fn cpu_id(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_id");
    if __bench::current_cpu().is_some() {
        // A plain `usize` through `black_box`: an `Option<usize>` goes
        // through memory as two halves reloaded at once, a store-forwarding
        // stall that costs more than the read being measured.
        g.bench_function("rseq_area", |b| {
            b.iter(|| black_box(__bench::current_cpu().unwrap_or(usize::MAX)))
        });
    }
    #[cfg(target_os = "linux")]
    g.bench_function("sched_getcpu", |b| {
        b.iter(|| {
            // SAFETY: no preconditions; returns -1 on error.
            black_box(unsafe { libc::sched_getcpu() })
        })
    });
    g.finish();
}

/// `+1` then `-1` on one thread-local slot, in the instruction forms a
/// per-CPU commit could take. The get and the put hit the same slot, so
/// each add waits for the previous store unless the core forwards it for
/// free; on the Intel cores measured only the base-only, immediate form
/// does.
#[cfg(target_arch = "x86_64")]
fn commit_form(c: &mut Criterion) {
    use std::arch::asm;
    use std::sync::atomic::AtomicI64;
    let mut g = c.benchmark_group("commit_form_pair");
    let slot = AtomicI64::new(0);
    let p = black_box(slot.as_ptr());
    g.bench_function("add_base_imm", |b| {
        b.iter(|| {
            // SAFETY: `p` is a live, aligned i64 only this thread uses.
            unsafe {
                asm!("add qword ptr [{p}], 1", p = in(reg) p, options(nostack));
                asm!("add qword ptr [{p}], -1", p = in(reg) p, options(nostack));
            }
        })
    });
    g.bench_function("add_base_reg", |b| {
        b.iter(|| {
            // SAFETY: as above.
            unsafe {
                asm!("add qword ptr [{p}], {d}", p = in(reg) p, d = in(reg) 1i64, options(nostack));
                asm!("add qword ptr [{p}], {d}", p = in(reg) p, d = in(reg) -1i64, options(nostack));
            }
        })
    });
    g.bench_function("add_base_index_imm", |b| {
        b.iter(|| {
            let i = black_box(0usize);
            // SAFETY: as above (`p + i` is `p`).
            unsafe {
                asm!("add qword ptr [{p} + {i}], 1", p = in(reg) p, i = in(reg) i, options(nostack));
                asm!("add qword ptr [{p} + {i}], -1", p = in(reg) p, i = in(reg) i, options(nostack));
            }
        })
    });
    g.bench_function("lock_xadd", |b| {
        b.iter(|| {
            let s = black_box(&slot);
            // Relaxed: only the cost of the locked instruction matters.
            s.fetch_add(1, Relaxed);
            // Relaxed: as above.
            s.fetch_sub(1, Relaxed);
        })
    });
    g.finish();
    assert_eq!(slot.load(SeqCst), 0);
}

#[cfg(not(target_arch = "x86_64"))]
fn commit_form(_: &mut Criterion) {}

/// One `fence_all_cpus()` (`membarrier(PRIVATE_EXPEDITED_RSEQ)` on the rseq
/// tier): with no other thread of the process running, and with a sibling
/// busy on another core (each sample first waits until it ran, so the
/// kernel must interrupt it).
fn fence(c: &mut Criterion) {
    let mut g = c.benchmark_group("fence_all_cpus");
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if let Some(&c0) = cores.first() {
        core_affinity::set_for_current(c0);
    }
    g.bench_function("idle", |b| b.iter(__bench::fence_all_cpus));
    if let [c0, c1, ..] = cores[..] {
        let stop = AtomicBool::new(false);
        let ticks = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                core_affinity::set_for_current(c1);
                while !stop.load(Relaxed) {
                    ticks.fetch_add(1, Relaxed);
                }
            });
            core_affinity::set_for_current(c0);
            g.bench_function("sibling_busy", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = ticks.load(Relaxed);
                        while ticks.load(Relaxed) == t0 {
                            std::hint::spin_loop();
                        }
                        let t = Instant::now();
                        __bench::fence_all_cpus();
                        total += t.elapsed();
                    }
                    total
                })
            });
            stop.store(true, Relaxed);
        });
    }
    g.finish();
}

criterion_group!(benches, cpu_id, commit_form, fence);
criterion_main!(benches);
