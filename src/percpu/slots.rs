//! Per-CPU counter slots.
//!
//! A ref owns one 8-byte slot per possible CPU. Outside loom the slots of
//! many refs are packed per CPU in a process-wide arena, like the kernel's
//! percpu allocator: a chunk holds [`SLOTS_PER_ROW`] refs, laid out as one
//! row per CPU, each row a multiple of 128 bytes, so two CPUs never write the
//! same cache line (nor an adjacent-line prefetch pair). Chunks are never
//! returned to the allocator; a dropped ref's slot goes on a free list and is
//! reused, so memory is bounded by the peak number of live refs.
//!
//! Under loom the slots are a small boxed array per ref (loom atomics must be
//! created inside the model), and `current()` rotates through them so the
//! model also covers "migration" between slots.

use crate::sync::AtomicI64;

/// Refs per arena chunk; one row of a chunk is `SLOTS_PER_ROW * 8` bytes.
#[cfg(not(percpu_ref_model))]
pub(crate) const SLOTS_PER_ROW: usize = 16;

/// The per-CPU slots of one ref.
pub(crate) struct Slots {
    #[cfg(not(percpu_ref_model))]
    first: std::ptr::NonNull<AtomicI64>,
    /// `possible()` at creation, cached: the hot path must not call out.
    #[cfg(not(percpu_ref_model))]
    n: usize,
    #[cfg(percpu_ref_model)]
    slots: Box<[AtomicI64]>,
}

// SAFETY: `first` points into the leaked, never-freed arena of atomics
// (`'static`, accessed only through atomic operations), and each slot index
// is owned by exactly one `Slots` value at a time (the free list hands it
// out once). Sharing or sending that pointer is like sharing `&'static
// AtomicI64`.
#[cfg(not(percpu_ref_model))]
unsafe impl Send for Slots {}
// SAFETY: as for `Send`: all access is through `&AtomicI64`.
#[cfg(not(percpu_ref_model))]
unsafe impl Sync for Slots {}

impl Slots {
    /// Take a free slot and set every CPU's value to `init`.
    pub(crate) fn new(init: i64) -> Self {
        #[cfg(not(percpu_ref_model))]
        let s = Slots {
            first: arena::take(),
            n: crate::sys::cpu::possible(),
        };
        #[cfg(percpu_ref_model)]
        let s = Slots {
            slots: (0..LOOM_SLOTS).map(|_| AtomicI64::new(0)).collect(),
        };
        for cpu in 0..s.len() {
            // Relaxed: the ref is not shared yet; publishing it to other
            // threads (Arc, scoped spawn, ...) carries the happens-before.
            s.get(cpu).store(init, crate::sync::Ordering::Relaxed);
        }
        s
    }

    /// Number of slots (possible CPUs).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        #[cfg(not(percpu_ref_model))]
        {
            self.n
        }
        #[cfg(percpu_ref_model)]
        {
            self.slots.len()
        }
    }

    /// The slot of `cpu`; `cpu < self.len()`.
    #[inline]
    pub(crate) fn get(&self, cpu: usize) -> &AtomicI64 {
        #[cfg(not(percpu_ref_model))]
        {
            // Never taken: `sys::cpu::current()` is below `possible()`. The
            // fold keeps an out-of-range id from ever reaching the pointer.
            let cpu = if cpu < self.n { cpu } else { cpu % self.n };
            // SAFETY: the arena chunk has `possible()` rows of
            // `SLOTS_PER_ROW` atomics each; `first` is this ref's column in
            // row 0 and `cpu < n == possible()`, so the address is inside the
            // chunk. The chunk is leaked, so the reference lives as long as
            // `self` (and longer).
            unsafe { &*self.first.as_ptr().add(cpu * SLOTS_PER_ROW) }
        }
        #[cfg(percpu_ref_model)]
        {
            &self.slots[cpu]
        }
    }

    /// The rseq tier's add: `d` on the current CPU's slot with a plain add
    /// inside a restartable sequence, unless `gate & mask` is set (read
    /// inside the sequence). `false`: nothing was added.
    ///
    /// # Safety
    ///
    /// `sys::rseq::rseq_available()` returned `true` before this ref was
    /// built (so it happens-before this call), and the caller only writes
    /// these slots otherwise after setting the gate bit and calling
    /// `sys::rseq::fence_all_cpus()`, until it clears the bit again.
    #[inline(always)]
    pub(crate) unsafe fn rseq_add(
        &self,
        gate: &crate::sync::AtomicUsize,
        mask: usize,
        d: i64,
    ) -> bool {
        #[cfg(not(percpu_ref_model))]
        {
            // SAFETY: the caller's contract covers availability and the
            // write discipline; `first` is this ref's row-0 slot and each
            // CPU's slot is `SLOTS_PER_ROW * 8` bytes further (inside the
            // leaked chunk, 8-aligned, one per CPU); `gate` is a live atomic
            // for the whole call.
            unsafe {
                crate::sys::rseq::percpu_add(
                    self.first.as_ptr().cast::<i64>(),
                    SLOTS_PER_ROW * 8,
                    gate.as_ptr().cast_const(),
                    mask,
                    d,
                )
            }
        }
        #[cfg(percpu_ref_model)]
        {
            let _ = (gate, mask, d);
            false
        }
    }

    /// The slot the calling thread should use now.
    #[inline]
    pub(crate) fn current(&self) -> &AtomicI64 {
        #[cfg(not(percpu_ref_model))]
        {
            self.get(crate::sys::cpu::current())
        }
        #[cfg(percpu_ref_model)]
        {
            self.get(crate::sync::model_cpu() % self.slots.len())
        }
    }
}

#[cfg(not(percpu_ref_model))]
impl Drop for Slots {
    fn drop(&mut self) {
        arena::give_back(self.first);
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots").field("len", &self.len()).finish()
    }
}

#[cfg(percpu_ref_model)]
const LOOM_SLOTS: usize = 2;

#[cfg(not(percpu_ref_model))]
mod arena {
    use super::SLOTS_PER_ROW;
    use crate::sync::AtomicI64;
    use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};
    use std::ptr::NonNull;
    use std::sync::Mutex;

    /// A free slot: the address of its row-0 atomic.
    struct Free(NonNull<AtomicI64>);
    // SAFETY: the pointer is into the leaked arena; see `Slots`.
    unsafe impl Send for Free {}

    static FREE: Mutex<Vec<Free>> = Mutex::new(Vec::new());

    /// Bytes of arena memory per CPU row (for reporting).
    pub(crate) const ROW_BYTES: usize = SLOTS_PER_ROW * 8;

    pub(super) fn take() -> NonNull<AtomicI64> {
        let mut free = FREE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if free.is_empty() {
            let rows = crate::sys::cpu::possible();
            // 128-byte rows aligned to 128: no two CPUs share a line or an
            // adjacent-line prefetch pair.
            let layout = Layout::from_size_align(rows * ROW_BYTES, 128)
                .expect("arena chunk layout: possible CPUs overflow usize");
            // SAFETY: the layout has non-zero size (rows >= 1).
            let chunk = unsafe { alloc_zeroed(layout) }.cast::<AtomicI64>();
            let Some(chunk) = NonNull::new(chunk) else {
                handle_alloc_error(layout)
            };
            // The chunk is intentionally leaked: slots are recycled, never
            // freed, so `&AtomicI64` into it can never dangle.
            for i in (0..SLOTS_PER_ROW).rev() {
                // SAFETY: `i < SLOTS_PER_ROW`, inside row 0 of the chunk.
                free.push(Free(unsafe { chunk.add(i) }));
            }
        }
        free.pop().expect("refilled above").0
    }

    pub(super) fn give_back(p: NonNull<AtomicI64>) {
        FREE.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Free(p));
    }
}

/// Bytes of per-CPU counter memory one ref costs on this machine.
#[cfg(not(percpu_ref_model))]
pub(crate) fn slot_bytes_per_ref() -> usize {
    8 * crate::sys::cpu::possible()
}

#[cfg(all(test, not(percpu_ref_model)))]
mod tests {
    use super::*;
    use crate::sync::Ordering::Relaxed;

    #[test]
    fn slots_are_reused_and_rows_do_not_share_lines() {
        let a = Slots::new(0);
        let b = Slots::new(7);
        for cpu in 0..a.len() {
            assert_eq!(a.get(cpu).load(Relaxed), 0);
            assert_eq!(b.get(cpu).load(Relaxed), 7);
        }
        if a.len() > 1 {
            let d = a.get(1) as *const _ as usize - a.get(0) as *const _ as usize;
            assert!(d >= 128 && d % 128 == 0, "row stride {d}");
        }
        b.get(0).store(99, Relaxed);
        drop(b);
        // Whichever slot comes back (maybe the one just freed), it is
        // re-initialised.
        let c = Slots::new(3);
        for cpu in 0..c.len() {
            assert_eq!(c.get(cpu).load(Relaxed), 3);
        }
        assert_eq!(slot_bytes_per_ref(), 8 * c.len());
    }
}
