//! Per-CPU slot columns, and the arena they come from.
//!
//! A ref counts per CPU only while it holds a *column*: one 8-byte slot per
//! possible CPU. Columns are packed per CPU in a process-wide arena, like
//! the kernel's percpu allocator: a chunk holds [`COLUMNS_PER_CHUNK`]
//! columns, laid out as one row per CPU of `ROW_STRIDE` (128) bytes, so two
//! CPUs never write the same cache line (nor an adjacent-line prefetch
//! pair). A ref takes a column when it starts counting per CPU and gives it
//! back when it switches to atomic mode, is killed, or is dropped; chunks
//! are never freed, so a stale pointer to a column always points to valid
//! atomics, and memory is bounded by the peak number of refs counting per
//! CPU at once.
//!
//! The two tiers keep separate free lists, because their slots hold
//! different things:
//!
//! * **rseq**: a plain count per slot, written only by the restartable
//!   sequences of the CPU's row. A column is given back after the gate was
//!   closed, `membarrier` passed and the fold zeroed every slot: no
//!   sequence can still be inside it.
//! * **portable**: a thread may read the column pointer and be preempted
//!   for any length of time before its read-modify-write of the slot, so a
//!   column given back may still be written by such a *stale* adder after
//!   another ref took it. Each slot therefore holds a **key** beside its
//!   count ([`keyed`]): the key of the ref the column is assigned to (0 when
//!   drained or free). Every portable update is a compare-exchange that
//!   succeeds only if the slot carries the adder's own key. Keys are unique
//!   among live refs and a ref keeps its key until it is dropped (which
//!   needs `&mut`, so no adder of it can be in flight), so a stale adder
//!   either finds its own ref's current column — and counts there, exactly
//!   once, which is as correct as counting on the column it read — or fails
//!   and counts on the central count.
//!
//! Under a model checker (`percpu_ref_model`) a column is a small boxed
//! array of model atomics from a per-execution free list, and the "current
//! CPU" rotates on every call, so models also cover migration between
//! slots.

use crate::sync::AtomicI64;
use std::ptr::NonNull;

#[cfg(not(percpu_ref_model))]
pub(crate) use crate::sys::rseq::ROW_STRIDE;

/// Columns per arena chunk (one `ROW_STRIDE` row holds this many slots).
#[cfg(not(percpu_ref_model))]
pub(crate) const COLUMNS_PER_CHUNK: usize = ROW_STRIDE / 8;

/// Which free list a column belongs to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Rseq,
    Portable,
}

/// One column: the address of its row-0 slot. `Copy`: ownership is
/// tracked by the ref's gate, not by this handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Column(NonNull<AtomicI64>);

// SAFETY: a column points into arena memory that is never freed (leaked
// chunks, or the model's per-execution list, which outlives every ref of
// the execution) and is only accessed through atomics.
unsafe impl Send for Column {}
// SAFETY: as for `Send`.
unsafe impl Sync for Column {}

impl Column {
    /// The column a gate's `column` pointer names.
    ///
    /// # Safety
    ///
    /// `p` came from [`Column::as_ptr`] of a column of this arena.
    #[inline(always)]
    pub(crate) unsafe fn from_ptr(p: *mut AtomicI64) -> Column {
        // SAFETY: arena columns are never null (caller).
        Column(unsafe { NonNull::new_unchecked(p) })
    }

    /// The row-0 slot's address, as stored in the gate.
    #[inline(always)]
    pub(crate) fn as_ptr(self) -> *mut AtomicI64 {
        self.0.as_ptr()
    }

    /// The slot of CPU row `row < rows()`.
    #[inline(always)]
    pub(crate) fn slot<'a>(self, row: usize) -> &'a AtomicI64 {
        debug_assert!(row < rows());
        #[cfg(not(percpu_ref_model))]
        // SAFETY: the chunk has `rows()` rows of `ROW_STRIDE` bytes and
        // this column's row-0 slot is in row 0, so `row * ROW_STRIDE` bytes
        // further is this column's slot of that row (8-aligned, inside the
        // chunk). Chunks are leaked: the reference cannot dangle.
        unsafe {
            &*self.0.as_ptr().byte_add(row * ROW_STRIDE)
        }
        #[cfg(percpu_ref_model)]
        // SAFETY: a model column is a leaked `[AtomicI64; MODEL_ROWS]`.
        unsafe {
            &*self.0.as_ptr().add(row)
        }
    }
}

/// Number of rows (slots per column): the possible CPUs.
#[inline]
pub(crate) fn rows() -> usize {
    #[cfg(not(percpu_ref_model))]
    {
        crate::sys::cpu::possible()
    }
    #[cfg(percpu_ref_model)]
    {
        MODEL_ROWS
    }
}

/// The row the calling thread should count on now (`< rows()`). Any row
/// is correct on the portable tier (compare-exchange); the rseq tier reads
/// its CPU inside the sequence instead.
#[inline]
pub(crate) fn current_row() -> usize {
    #[cfg(not(percpu_ref_model))]
    {
        crate::sys::cpu::current()
    }
    #[cfg(percpu_ref_model)]
    {
        crate::sync::model_cpu() % MODEL_ROWS
    }
}

/// Take a free column of `kind`, every slot zero. `None` if the arena
/// cannot grow (allocation failure).
pub(crate) fn take(kind: Kind) -> Option<Column> {
    // Before the arena's lock: a fork must not copy it held.
    crate::sys::fork::watch();
    arena::take(kind)
}

/// The keys' and the arena's locks, held across a `fork()`
/// (`percpu::hold_for_fork`).
#[cfg(percpu_ref_linux)]
pub(crate) type ForkHeld = (
    crate::sync::MutexGuard<'static, keys::Keys>,
    crate::sync::MutexGuard<'static, arena::Free>,
);

/// Take the keys' and the arena's locks for a `fork()`.
#[cfg(percpu_ref_linux)]
pub(crate) fn lock_for_fork() -> ForkHeld {
    (keys::lock_for_fork(), arena::lock_for_fork())
}

/// Give back a column whose every slot is zero and that no adder can
/// reach any more in a way its kind does not tolerate (module docs).
pub(crate) fn give_back(kind: Kind, c: Column) {
    for row in 0..rows() {
        debug_assert_eq!(
            c.slot(row).load(crate::sync::Ordering::Relaxed) & keyed::KEY_MASK,
            0,
            "column given back with a live slot"
        );
    }
    arena::give_back(kind, c);
}

/// Bytes of per-CPU counter memory one ref costs while it counts per CPU.
pub(crate) fn slot_bytes_per_ref() -> usize {
    8 * rows()
}

/// Columns handed out and chunk bytes reserved, for memory reports.
#[cfg(not(percpu_ref_model))]
pub(crate) fn arena_usage() -> (usize, usize) {
    arena::usage()
}

/// Portable-tier slot values: `key << COUNT_BITS | count`, the count
/// modulo 2^COUNT_BITS.
///
/// The count field is modular, so it never carries into the key: the slots
/// of one ref may drift without bound (gets on one CPU, puts on another),
/// and the fold's sum of fields, taken modulo 2^40 and sign-extended, is
/// the true net count as long as fewer than 2^39 references are counted on
/// the slots at once.
pub(crate) mod keyed {
    /// Bits of the count field.
    pub(crate) const COUNT_BITS: u32 = 40;
    /// Keys are 1..=MAX_KEY (24 bits); 0 marks a drained or free slot.
    pub(crate) const MAX_KEY: u32 = (1 << (64 - COUNT_BITS)) - 1;
    const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
    /// The key bits of a slot value.
    pub(crate) const KEY_MASK: i64 = !(COUNT_MASK as i64);

    /// The key a slot value carries.
    #[inline(always)]
    pub(crate) fn key(v: i64) -> u32 {
        ((v as u64) >> COUNT_BITS) as u32
    }

    /// A fresh slot of `key` with count 0.
    #[inline(always)]
    pub(crate) fn fresh(key: u32) -> i64 {
        ((key as u64) << COUNT_BITS) as i64
    }

    /// `v` with `d` added to its count field, modulo 2^COUNT_BITS.
    #[inline(always)]
    pub(crate) fn add(v: i64, d: i64) -> i64 {
        let v = v as u64;
        ((v & !COUNT_MASK) | (v.wrapping_add(d as u64) & COUNT_MASK)) as i64
    }

    /// The count field, sign-extended.
    #[inline(always)]
    pub(crate) fn count(v: i64) -> i64 {
        (v << (64 - COUNT_BITS)) >> (64 - COUNT_BITS)
    }

    /// Sum of count fields, reduced modulo 2^COUNT_BITS and sign-extended.
    #[inline]
    pub(crate) fn sum(total: i64) -> i64 {
        count(total)
    }
}

/// Portable-tier keys: unique among live refs that have taken a column.
pub(crate) mod keys {
    use crate::sync::{lock, Mutex};

    pub(crate) struct Keys {
        next: u32,
        free: Vec<u32>,
    }

    crate::sync::global! {
        static KEYS: Mutex<Keys> = Mutex::new(Keys { next: 1, free: Vec::new() });
    }

    /// A key no live ref holds; `None` once 2^24 - 1 are in use.
    pub(crate) fn take() -> Option<u32> {
        // Before the lock: a fork must not copy it held.
        crate::sys::fork::watch();
        KEYS.with(|keys| {
            let mut k = lock(keys);
            if let Some(key) = k.free.pop() {
                return Some(key);
            }
            if k.next > super::keyed::MAX_KEY {
                return None;
            }
            k.next += 1;
            Some(k.next - 1)
        })
    }

    /// Return the key of a ref being dropped.
    pub(crate) fn give_back(key: u32) {
        KEYS.with(|keys| lock(keys).free.push(key));
    }

    /// The lock, for a `fork()` (`super::lock_for_fork`).
    #[cfg(percpu_ref_linux)]
    pub(super) fn lock_for_fork() -> crate::sync::MutexGuard<'static, Keys> {
        lock(&KEYS.0)
    }
}

#[cfg(percpu_ref_model)]
const MODEL_ROWS: usize = 2;

#[cfg(percpu_ref_model)]
mod arena {
    use super::{Column, Kind, MODEL_ROWS};
    use crate::sync::{lock, AtomicI64, Mutex};
    use std::ptr::NonNull;

    struct Free {
        rseq: Vec<Column>,
        portable: Vec<Column>,
    }

    crate::sync::global! {
        static FREE: Mutex<Free> = Mutex::new(Free { rseq: Vec::new(), portable: Vec::new() });
    }

    pub(super) fn take(kind: Kind) -> Option<Column> {
        FREE.with(|free| {
            let mut f = lock(free);
            let list = match kind {
                Kind::Rseq => &mut f.rseq,
                Kind::Portable => &mut f.portable,
            };
            Some(list.pop().unwrap_or_else(|| {
                // Leaked: a stale adder may still read it after the ref
                // that held it is gone (see the module docs).
                let b: Box<[AtomicI64; MODEL_ROWS]> =
                    Box::new(std::array::from_fn(|_| AtomicI64::new(0)));
                Column(NonNull::from(Box::leak(b)).cast())
            }))
        })
    }

    pub(super) fn give_back(kind: Kind, c: Column) {
        FREE.with(|free| {
            let mut f = lock(free);
            match kind {
                Kind::Rseq => f.rseq.push(c),
                Kind::Portable => f.portable.push(c),
            }
        })
    }
}

#[cfg(not(percpu_ref_model))]
mod arena {
    use super::{rows, Column, Kind, COLUMNS_PER_CHUNK, ROW_STRIDE};
    use crate::sync::{lock, AtomicI64, Mutex};
    use std::alloc::{alloc_zeroed, Layout};
    use std::ptr::NonNull;

    pub(crate) struct Free {
        rseq: Vec<Column>,
        portable: Vec<Column>,
        chunks: usize,
        in_use: usize,
    }

    static FREE: Mutex<Free> = Mutex::new(Free {
        rseq: Vec::new(),
        portable: Vec::new(),
        chunks: 0,
        in_use: 0,
    });

    fn chunk_layout() -> Option<Layout> {
        Layout::from_size_align(rows().checked_mul(ROW_STRIDE)?, ROW_STRIDE).ok()
    }

    pub(super) fn take(kind: Kind) -> Option<Column> {
        let mut f = lock(&FREE);
        let list = match kind {
            Kind::Rseq => &mut f.rseq,
            Kind::Portable => &mut f.portable,
        };
        if list.is_empty() {
            let layout = chunk_layout()?;
            // SAFETY: the layout has non-zero size (rows >= 1).
            let chunk = NonNull::new(unsafe { alloc_zeroed(layout) })?.cast::<AtomicI64>();
            // The chunk is intentionally leaked: columns are recycled, never
            // freed, so no pointer into it can dangle (module docs).
            for i in (0..COLUMNS_PER_CHUNK).rev() {
                // SAFETY: `i < COLUMNS_PER_CHUNK`: inside row 0 of the chunk.
                list.push(Column(unsafe { chunk.add(i) }));
            }
            f.chunks += 1;
        }
        let list = match kind {
            Kind::Rseq => &mut f.rseq,
            Kind::Portable => &mut f.portable,
        };
        let c = list.pop();
        f.in_use += usize::from(c.is_some());
        c
    }

    pub(super) fn give_back(kind: Kind, c: Column) {
        let mut f = lock(&FREE);
        f.in_use -= 1;
        match kind {
            Kind::Rseq => f.rseq.push(c),
            Kind::Portable => f.portable.push(c),
        }
    }

    pub(super) fn usage() -> (usize, usize) {
        let f = lock(&FREE);
        (f.in_use, f.chunks * rows() * ROW_STRIDE)
    }

    /// The lock, for a `fork()` (`super::lock_for_fork`).
    #[cfg(percpu_ref_linux)]
    pub(super) fn lock_for_fork() -> crate::sync::MutexGuard<'static, Free> {
        lock(&FREE)
    }
}

#[cfg(all(test, not(percpu_ref_model)))]
mod tests {
    use super::*;
    use crate::sync::Ordering::Relaxed;

    #[test]
    fn columns_are_reused_zeroed_and_rows_do_not_share_lines() {
        let a = take(Kind::Rseq).unwrap();
        let b = take(Kind::Rseq).unwrap();
        assert_ne!(a, b);
        if rows() > 1 {
            let d = a.slot(1) as *const _ as usize - a.slot(0) as *const _ as usize;
            assert_eq!(d, ROW_STRIDE);
        }
        for row in 0..rows() {
            assert_eq!(a.slot(row).load(Relaxed), 0);
            assert_eq!(b.slot(row).load(Relaxed), 0);
        }
        give_back(Kind::Rseq, b);
        // The portable list is separate: it never hands out `b`.
        let p = take(Kind::Portable).unwrap();
        assert_ne!(p, b);
        give_back(Kind::Portable, p);
        give_back(Kind::Rseq, a);
        assert_eq!(slot_bytes_per_ref(), 8 * rows());
    }

    #[test]
    fn keyed_counts_are_modular_and_keep_the_key() {
        let k = keyed::MAX_KEY;
        let v = keyed::fresh(k);
        assert_eq!(keyed::key(v), k);
        let down = keyed::add(v, -5);
        assert_eq!((keyed::key(down), keyed::count(down)), (k, -5));
        // Drift far past the field's range and back: the key never changes.
        let mut x = keyed::fresh(3);
        let step = 1i64 << 38;
        for _ in 0..10 {
            x = keyed::add(x, step);
        }
        for _ in 0..10 {
            x = keyed::add(x, -step);
        }
        assert_eq!((keyed::key(x), keyed::count(x)), (3, 0));
        // Sums of fields across slots reduce to the true net count.
        let slots = [
            keyed::add(keyed::fresh(9), 7),
            keyed::add(keyed::fresh(9), -3),
        ];
        let total = slots.iter().map(|&s| keyed::count(s)).sum::<i64>();
        assert_eq!(keyed::sum(total), 4);
    }
}
