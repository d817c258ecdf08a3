//! Hooks for the crate's own benchmarks, re-exported (hidden) as
//! `percpu_ref::__bench`. Not API: they exist so `benches/` can measure the
//! sequences without any `PercpuRef` logic around them, and may change in
//! any release.

use super::{Gate, ROW_STRIDE};
use crate::sync::{AtomicI64, AtomicUsize, Ordering::*};

/// One CPU row of a private slot column, as in the crate's arena.
#[repr(align(128))]
struct Row([AtomicI64; ROW_STRIDE / 8]);

/// A gate (`sys::rseq::Gate`) open on a private column of per-CPU slots: what a `PercpuRef`
/// in percpu mode gives the sequences.
pub struct GateBench {
    gate: Gate,
    rows: Box<[Row]>,
    refused: AtomicUsize,
}

impl GateBench {
    /// An open gate on a fresh zeroed column, or `None` where the rseq tier
    /// is not available.
    pub fn new() -> Option<Self> {
        if !super::rseq_available() {
            return None;
        }
        let n = crate::sys::cpu::possible();
        let rows: Box<[Row]> = (0..n)
            .map(|_| Row(std::array::from_fn(|_| AtomicI64::new(0))))
            .collect();
        let gate = Gate::new(0);
        // Relaxed: published by the Release store of `limit` below.
        gate.column.store(rows[0].0[5].as_ptr().cast(), Relaxed);
        // Release: the open protocol (column first, then the limit).
        gate.limit
            .store(u32::try_from(n).expect("fewer than 2^32 CPUs"), Release);
        Some(GateBench {
            gate,
            rows,
            refused: AtomicUsize::new(0),
        })
    }

    /// `add_imm::<1>` then `add_imm::<-1>` on the gate: the crate's
    /// get+put sequences with nothing around them.
    #[inline]
    pub fn get_put(&self) {
        // SAFETY: `new` saw `rseq_available()`; the column has a row for
        // every CPU below the limit, its slots are written only by the
        // sequences, and the gate is never closed while `self` lives.
        if !unsafe { super::add_imm::<1>(&self.gate) } {
            self.refuse();
        }
        // SAFETY: as above.
        if !unsafe { super::add_imm::<-1>(&self.gate) } {
            self.refuse();
        }
    }

    /// The area token to pass to [`GateBench::get_put_in`], or `None`
    /// without the rseq tier.
    pub fn area(&self) -> Option<BenchArea> {
        super::Area::get().map(BenchArea)
    }

    /// [`GateBench::get_put`] with the area offset from `area` (keep it in a
    /// local, as a reference handle would carry it): `add_imm_in`.
    #[inline]
    pub fn get_put_in(&self, area: BenchArea) {
        // SAFETY: as in `get_put`; `area` came from `Area::get`.
        if !unsafe { super::add_imm_in::<1>(area.0, &self.gate) } {
            self.refuse();
        }
        // SAFETY: as above.
        if !unsafe { super::add_imm_in::<-1>(area.0, &self.gate) } {
            self.refuse();
        }
    }

    #[cold]
    #[inline(never)]
    fn refuse(&self) {
        // Relaxed: a statistic.
        self.refused.fetch_add(1, Relaxed);
    }

    /// `iters` pairs of the bare gated sequence with every input in a
    /// register (the `limit` contender); returns the number of pairs that
    /// did not run (a refused sequence stops the loop).
    pub fn limit_pairs(&self, iters: u64) -> u64 {
        #[cfg(percpu_ref_rseq)]
        {
            // Relaxed: stored before `self` was shared.
            let column = self.gate.column.load(Relaxed);
            // SAFETY: as in `get_put`; `column` is the gate's column.
            unsafe { super::imp::limit_pairs(&self.gate, column, iters) }
        }
        #[cfg(not(percpu_ref_rseq))]
        {
            iters
        }
    }

    /// Sequences refused so far (0 unless something is wrong).
    pub fn refused(&self) -> usize {
        // Relaxed: a statistic.
        self.refused.load(Relaxed)
    }

    /// Sum of the column: `0` after balanced pairs.
    pub fn sum(&self) -> i64 {
        // Relaxed: read when the benchmark threads are joined.
        self.rows.iter().map(|r| r.0[5].load(Relaxed)).sum()
    }
}

impl std::fmt::Debug for GateBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateBench")
            .field("gate", &self.gate)
            .field("refused", &self.refused())
            .finish()
    }
}

/// The rseq area token ([`GateBench::area`]): the area's offset from the
/// thread pointer, `Copy`, one register.
#[derive(Clone, Copy, Debug)]
pub struct BenchArea(super::Area);

/// The current CPU from the rseq area (`None` without one).
#[inline]
pub fn current_cpu() -> Option<usize> {
    super::current_cpu()
}

/// The fence the owner of a gate calls after closing it
/// (`membarrier(PRIVATE_EXPEDITED_RSEQ)`, or a `SeqCst` fence).
pub fn fence_all_cpus() {
    super::fence_all_cpus();
}

/// Whether the rseq tier is available in this process.
pub fn rseq_available() -> bool {
    super::rseq_available()
}
