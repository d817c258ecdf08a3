//! Running a [`Counter`] on pinned threads: shared by every bench that
//! measures per-thread operation pairs (`benches/percpu.rs`,
//! `benches/freelist.rs`, `benches/pool.rs`, `examples/scaling.rs` through
//! `contenders`).

use std::sync::Barrier;
use std::time::{Duration, Instant};

/// An operation pair under test: a reference count's get+put, a free
/// list's pop+push, a page pool's alloc+free, lookup+drop or read.
pub(crate) trait Counter: Sync {
    /// Run `iters` operation pairs as worker `worker` (`< threads` given to
    /// the constructor).
    fn run(&self, worker: usize, iters: u64);
}

/// The cores to pin workers to, worker `i` on `cores[i % len]`; empty if
/// the platform cannot tell (workers then run unpinned).
pub(crate) fn cores() -> Vec<core_affinity::CoreId> {
    core_affinity::get_core_ids().unwrap_or_default()
}

/// Pin the calling thread as worker `i`; false if pinning failed.
pub(crate) fn pin(cores: &[core_affinity::CoreId], i: usize) -> bool {
    !cores.is_empty() && core_affinity::set_for_current(cores[i % cores.len()])
}

/// Run `iters` pairs on each of `threads` workers pinned one per core, all
/// started together by a barrier, and return the slowest worker's time.
/// Worker 0 is the calling thread (already pinned to `cores[0]`), so
/// `threads` threads share `threads` cores; the others are started here,
/// once per call (one criterion sample), outside the timed part.
pub(crate) fn run_pinned(
    counter: &dyn Counter,
    threads: usize,
    iters: u64,
    cores: &[core_affinity::CoreId],
) -> Duration {
    if threads <= 1 {
        let t0 = Instant::now();
        counter.run(0, iters);
        return t0.elapsed();
    }
    let barrier = Barrier::new(threads);
    let timed = |worker: usize| {
        barrier.wait();
        let t0 = Instant::now();
        counter.run(worker, iters);
        t0.elapsed()
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..threads)
            .map(|w| {
                let timed = &timed;
                s.spawn(move || {
                    pin(cores, w);
                    timed(w)
                })
            })
            .collect();
        let mine = timed(0);
        others
            .into_iter()
            .map(|h| h.join().expect("benchmark worker panicked"))
            .fold(mine, Duration::max)
    })
}
