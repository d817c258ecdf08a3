//! [`CpuStacks`]: one bounded stack of `u32` per CPU, pushed and popped by
//! restartable sequences on the current CPU's row, with a per-row gate so
//! another thread can take a row's items when it must.
//!
//! # Exactness
//!
//! Every sequence reads the CPU id, checks it against the row count, checks
//! its row's `gate`, reads `len`, and commits with a single store of the
//! new `len`, the last instruction of its range. Before the
//! commit a push writes the item to `items[len]` (a batch push to
//! `items[len..len + k]`), above the committed length, and a batch pop
//! copies `items[len - k..len]` to the caller's buffer: both are invisible
//! to everyone else until the commit, and a restart simply repeats them.
//! So by the parent module's argument (1–5) each sequence either takes
//! effect exactly once on the row of the CPU it committed on, or not at all:
//! an item is never lost nor handed out twice under preemption, migration
//! and signals, including signal handlers that push or pop themselves.
//!
//! # Remote access (gate)
//!
//! [`CpuStacks::with_all_closed`] sets every row's gate (`SeqCst`), then
//! calls [`fence_all_cpus`]: by the parent module's argument, when it
//! returns no sequence is in flight on any row and every later one reads a
//! closed gate and refuses, so the closure may read and rewrite every row
//! with plain atomic accesses. Reopening stores the gates with `Release`
//! after the rows were rewritten, so a sequence that reads an open gate
//! sees the new `len` and items. One closer at a time (a mutex).
//!
//! # Ordering for the items' users
//!
//! A `pop` that returns an item happens-after the `push` that stored it, as
//! a lock round trip would give. The page pool relies on this (a freed
//! page's metadata is reset before the push). Two ways an item travels:
//!
//! * *Within a row.* Both sequences committed on the row's CPU (parent
//!   module, point 1), so the push's commit precedes the pop in that CPU's
//!   own instruction stream. Between two threads, that CPU went through a
//!   context switch, which the kernel makes a full memory barrier, and a
//!   thread that migrated before its push carried its earlier accesses
//!   along the same way. On x86_64 the commit is moreover a plain store,
//!   `Release` under TSO, and the loads `Acquire`.
//! * *Through a drain.* [`CpuStacks::with_all_closed`] closes and fences
//!   (every commit before the fence is visible to the drainer's `Acquire`
//!   loads), and reopens with `Release` stores of the gates, which pair
//!   with the gate load at the start of every sequence: a plain load on
//!   x86_64 (`Acquire` under TSO), `ldar` on aarch64. So a sequence that
//!   finds its gate open sees the `len` and items the drainer wrote.

use super::{fence_all_cpus, imp::stack as seq, rseq_available};
use crate::sync::{lock, AtomicU32, Mutex, Ordering::*};

/// Items per CPU row.
pub(crate) const CAP: usize = 62;
/// `log2` of the row size in bytes: two rows never share a cache line nor
/// an adjacent-line prefetch pair.
pub(super) const SHIFT: u32 = 8;

/// One CPU's stack. The sequences use the field offsets: `len` at 0,
/// `gate` at 4, `items` at 8.
#[repr(C, align(256))]
struct Row {
    /// Items in use, `<= CAP`; the committing word of every sequence.
    len: AtomicU32,
    /// Non-zero: closed, every sequence on this row refuses.
    gate: AtomicU32,
    items: [AtomicU32; CAP],
}

const _: () = {
    assert!(std::mem::size_of::<Row>() == 1 << SHIFT);
    assert!(std::mem::offset_of!(Row, len) == 0);
    assert!(std::mem::offset_of!(Row, gate) == 4);
    assert!(std::mem::offset_of!(Row, items) == 8);
};

/// One bounded stack of `u32` per possible CPU, on restartable sequences.
pub(crate) struct CpuStacks {
    rows: Box<[Row]>,
    /// `rows.len()`, the sequences' bound for the CPU id.
    n: u32,
    /// Serializes [`CpuStacks::with_all_closed`].
    closer: Mutex<()>,
}

impl CpuStacks {
    /// Items per CPU.
    pub(crate) const CAP: usize = CAP;

    /// Empty stacks for every possible CPU, or `None` if the rseq tier is
    /// not available.
    pub(crate) fn new() -> Option<Self> {
        if !rseq_available() {
            return None;
        }
        let n = crate::sys::cpu::possible();
        Some(CpuStacks {
            rows: (0..n)
                .map(|_| Row {
                    len: AtomicU32::new(0),
                    gate: AtomicU32::new(0),
                    items: std::array::from_fn(|_| AtomicU32::new(0)),
                })
                .collect(),
            n: u32::try_from(n).expect("fewer than 2^32 CPUs"),
            closer: Mutex::new(()),
        })
    }

    #[inline(always)]
    fn base(&self) -> *mut u8 {
        // The sequences write through this pointer: every field is an
        // atomic (interior mutability), so writes through a pointer derived
        // from `&self` are allowed.
        self.rows.as_ptr().cast::<u8>().cast_mut()
    }

    /// Pop from the current CPU's stack; `None` if it is empty, its gate is
    /// closed, or the thread has no usable CPU id.
    #[inline(always)]
    pub(crate) fn pop(&self) -> Option<u32> {
        // SAFETY: `new` saw `rseq_available()`; `base()` points to `n` rows
        // of the sequences' layout, `len <= CAP` always (only the sequences
        // and `with_all_closed` write it, both keep it in range), and rows
        // are written outside the sequences only inside `with_all_closed`,
        // between closing + fencing and reopening.
        unsafe { seq::pop(self.base(), self.n) }
    }

    /// Push on the current CPU's stack; `false` (nothing pushed) if it is
    /// full, its gate is closed, or the thread has no usable CPU id.
    #[inline(always)]
    pub(crate) fn push(&self, item: u32) -> bool {
        // SAFETY: as in `pop`.
        unsafe { seq::push(self.base(), self.n, item) }
    }

    /// Push all of `items` on the current CPU's stack in one step; `false`
    /// (nothing pushed) if they do not fit, the gate is closed, or the
    /// thread has no usable CPU id.
    pub(crate) fn push_batch(&self, items: &[u32]) -> bool {
        // SAFETY: as in `pop`.
        unsafe { seq::push_batch(self.base(), self.n, items) }
    }

    /// Pop exactly `out.len()` items of the current CPU's stack into `out`
    /// in one step (the former top last); `false` (nothing popped, `out`
    /// unspecified) if there are fewer, the gate is closed, or the thread
    /// has no usable CPU id.
    pub(crate) fn pop_batch(&self, out: &mut [u32]) -> bool {
        // SAFETY: as in `pop`.
        unsafe { seq::pop_batch(self.base(), self.n, out) }
    }

    /// Items on all stacks (a snapshot; exact when nothing runs).
    pub(crate) fn len(&self) -> usize {
        self.rows
            .iter()
            // Relaxed: a snapshot; callers that need more close the gates.
            .map(|r| r.len.load(Relaxed) as usize)
            .sum()
    }

    /// Number of rows (possible CPUs).
    pub(crate) fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Close every row, wait until no sequence is in flight, run `f` with
    /// exclusive access to every row, then reopen them (also if `f`
    /// panics). Costs one `membarrier` (~10 µs with other threads of the
    /// process running). Sequences that run meanwhile refuse.
    pub(crate) fn with_all_closed<R>(&self, f: impl FnOnce(&mut Closed<'_>) -> R) -> R {
        let _one_closer = lock(&self.closer);
        for r in self.rows.iter() {
            // SeqCst: the fence below orders it before every sequence that
            // starts after the fence (module docs).
            r.gate.store(1, SeqCst);
        }
        fence_all_cpus();
        struct Reopen<'a>(&'a [Row]);
        impl Drop for Reopen<'_> {
            fn drop(&mut self) {
                for r in self.0 {
                    // Release: pairs with the gate load inside the next
                    // sequence on this row (Acquire: a TSO load on x86_64,
                    // `ldar` on aarch64), which then sees the `len` and
                    // items written while closed.
                    r.gate.store(0, Release);
                }
            }
        }
        let _reopen = Reopen(&self.rows);
        f(&mut Closed { rows: &self.rows })
    }
}

/// Every row of a [`CpuStacks`] while all gates are closed and fenced.
pub(crate) struct Closed<'a> {
    rows: &'a [Row],
}

impl Closed<'_> {
    /// Items on row `row`.
    pub(crate) fn len(&self, row: usize) -> usize {
        // Acquire: the sequences' committing stores were made visible by
        // the fence (a full barrier on every CPU that ran one); Acquire
        // keeps the item loads that follow after this one.
        self.rows[row].len.load(Acquire) as usize
    }

    /// Move every item of every row to `out` (each row bottom first).
    pub(crate) fn drain_into(&mut self, out: &mut Vec<u32>) {
        for row in 0..self.rows.len() {
            self.drain_row_into(row, out);
        }
    }

    /// Move every item of row `row` to `out`, bottom first.
    pub(crate) fn drain_row_into(&mut self, row: usize, out: &mut Vec<u32>) {
        let len = self.len(row).min(CAP);
        let r = &self.rows[row];
        // Relaxed: ordered after the Acquire load of `len` above; no
        // sequence writes the row while it is closed.
        out.extend(r.items[..len].iter().map(|i| i.load(Relaxed)));
        // Relaxed: published by the Release reopening of the gate.
        r.len.store(0, Relaxed);
    }

    /// Push `items` on row `row`; returns how many did not fit (the tail of
    /// `items` that was left out).
    #[cfg(test)]
    pub(crate) fn push_row(&mut self, row: usize, items: &[u32]) -> usize {
        let r = &self.rows[row];
        let len = self.len(row);
        let fit = (CAP - len).min(items.len());
        for (slot, &i) in r.items[len..len + fit].iter().zip(items) {
            // Relaxed: published by the Release reopening of the gate.
            slot.store(i, Relaxed);
        }
        // Relaxed: as above.
        r.len.store((len + fit) as u32, Relaxed);
        items.len() - fit
    }
}

impl std::fmt::Debug for CpuStacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuStacks")
            .field("rows", &self.rows.len())
            .field("items", &self.len())
            .finish()
    }
}

impl std::fmt::Debug for Closed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closed")
            .field("rows", &self.rows.len())
            .finish()
    }
}
