//! Free pages: per-CPU caches in front of one shared list.
//!
//! Each CPU has a small stack of free page indices (a "magazine", as in
//! the kernel's per-CPU page lists and slab magazines) behind a try-lock.
//! `pop`/`push` touch only the current CPU's magazine, so two threads on
//! two CPUs never share a cache line. Magazines refill from, and spill
//! to, the shared list in batches.
//!
//! Threads can migrate between reading their CPU number and locking the
//! magazine, so the magazine is still locked — but never waited for on the
//! hot path: if the try-lock fails (another thread is on "our" magazine),
//! the operation goes to the shared list instead. Only the slow paths
//! (stealing from other CPUs' magazines when everything else is empty, and
//! counting) wait for a magazine lock, whose critical sections are a few
//! instructions long.

use crate::sync::{lock, AtomicBool, Mutex, Ordering::*};
use crate::sys::cpu;
use crossbeam_utils::CachePadded;
use std::cell::UnsafeCell;
use std::fmt;

/// Capacity of one magazine.
const CAP: usize = 64;

pub(crate) struct FreeLists {
    cpus: Box<[CachePadded<Magazine>]>,
    shared: Mutex<Vec<u32>>,
    /// Moved between a magazine and the shared list at once.
    batch: usize,
}

struct Magazine {
    locked: AtomicBool,
    slots: UnsafeCell<Slots>,
}

struct Slots {
    len: usize,
    idx: [u32; CAP],
}

// SAFETY: `slots` is only accessed while `locked` is held (see `Guard`),
// which serializes all access; the indices are plain integers.
unsafe impl Sync for Magazine {}

/// Exclusive access to one magazine.
struct Guard<'a>(&'a Magazine);

impl Magazine {
    fn new() -> Self {
        Magazine {
            locked: AtomicBool::new(false),
            slots: UnsafeCell::new(Slots {
                len: 0,
                idx: [0; CAP],
            }),
        }
    }

    #[inline]
    fn try_lock(&self) -> Option<Guard<'_>> {
        // Acquire: pairs with the Release in `Guard::drop`, so this holder
        // sees the previous holder's changes to `slots`. Relaxed on
        // failure: we touch nothing.
        self.locked
            .compare_exchange(false, true, Acquire, Relaxed)
            .ok()
            .map(|_| Guard(self))
    }

    /// Slow paths only: wait for the lock (critical sections are short).
    fn lock(&self) -> Guard<'_> {
        let mut spins = 0u32;
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            spins += 1;
            if spins < 64 {
                crate::sync::spin_loop();
            } else {
                // The holder may be preempted: let it run.
                std::thread::yield_now();
            }
        }
    }
}

impl Guard<'_> {
    #[inline]
    fn slots(&mut self) -> &mut Slots {
        // SAFETY: the guard holds the magazine's lock, so this is the only
        // access to `slots` until it is dropped; `&mut self` keeps this
        // borrow unique within the guard.
        unsafe { &mut *self.0.slots.get() }
    }
}

impl Drop for Guard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: pairs with the Acquire of the next `try_lock`, publishing
        // our changes to `slots`.
        self.0.locked.store(false, Release);
    }
}

impl Slots {
    #[inline]
    fn pop(&mut self) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        Some(self.idx[self.len])
    }

    #[inline]
    fn push(&mut self, i: u32) -> bool {
        if self.len == CAP {
            return false;
        }
        self.idx[self.len] = i;
        self.len += 1;
        true
    }
}

impl FreeLists {
    /// `pages` free pages, all on the shared list (so the first allocations
    /// hand out low indices first).
    pub(crate) fn new(pages: usize) -> Self {
        let ncpu = cpu::possible();
        let mut shared: Vec<u32> = Vec::with_capacity(pages);
        shared.extend((0..pages as u32).rev());
        // Leave most pages on the shared list for small pools, so one CPU
        // does not hoard them all.
        let batch = (pages / (4 * ncpu)).clamp(1, CAP / 2);
        FreeLists {
            cpus: (0..ncpu)
                .map(|_| CachePadded::new(Magazine::new()))
                .collect(),
            shared: Mutex::new(shared),
            batch,
        }
    }

    #[inline]
    fn here(&self) -> &Magazine {
        let cpu = cpu::current();
        let n = self.cpus.len();
        // `current() < possible() == n`; the fold (never taken) avoids a
        // division on the hot path while keeping the index in range.
        &self.cpus[if cpu < n { cpu } else { cpu % n }]
    }

    /// Take a free page, or `None` if there is none anywhere.
    #[inline]
    pub(crate) fn pop(&self) -> Option<u32> {
        if let Some(mut g) = self.here().try_lock() {
            if let Some(i) = g.slots().pop() {
                return Some(i);
            }
            return self.refill_and_pop(&mut g).or_else(|| {
                drop(g);
                self.steal()
            });
        }
        self.pop_shared().or_else(|| self.steal())
    }

    #[cold]
    fn refill_and_pop(&self, g: &mut Guard<'_>) -> Option<u32> {
        let mut shared = lock(&self.shared);
        let take = self.batch.min(shared.len());
        let from = shared.len() - take;
        let slots = g.slots();
        for &i in &shared[from..] {
            slots.push(i);
        }
        shared.truncate(from);
        drop(shared);
        slots.pop()
    }

    #[cold]
    fn pop_shared(&self) -> Option<u32> {
        lock(&self.shared).pop()
    }

    /// Last resort: take one from any magazine.
    #[cold]
    fn steal(&self) -> Option<u32> {
        // A quick pass that waits for nobody...
        for m in self.cpus.iter() {
            if let Some(mut g) = m.try_lock() {
                if let Some(i) = g.slots().pop() {
                    return Some(i);
                }
            }
        }
        // ...then a consistent look: with every magazine and the shared
        // list locked (always in this order: magazines ascending, then the
        // shared list; the hot paths never wait for a magazine), no free
        // page can move from a list not yet searched to one already
        // searched. So `None` means no page was free at that moment, apart
        // from pages still being freed (their `push` has not happened yet).
        let mut guards: Vec<Guard<'_>> = self.cpus.iter().map(|m| m.lock()).collect();
        let mut shared = lock(&self.shared);
        if let Some(i) = shared.pop() {
            return Some(i);
        }
        drop(shared);
        guards.iter_mut().find_map(|g| g.slots().pop())
    }

    /// Give back a free page.
    #[inline]
    pub(crate) fn push(&self, i: u32) {
        if let Some(mut g) = self.here().try_lock() {
            if g.slots().push(i) {
                return;
            }
            self.spill_and_push(&mut g, i);
            return;
        }
        self.push_shared(i);
    }

    #[cold]
    fn spill_and_push(&self, g: &mut Guard<'_>, i: u32) {
        let slots = g.slots();
        let keep = slots.len - self.batch;
        let mut shared = lock(&self.shared);
        shared.extend_from_slice(&slots.idx[keep..slots.len]);
        drop(shared);
        slots.len = keep;
        slots.push(i);
    }

    #[cold]
    fn push_shared(&self, i: u32) {
        lock(&self.shared).push(i);
    }

    /// Number of free pages (a snapshot; exact when nothing runs).
    pub(crate) fn count(&self) -> usize {
        let mut n = 0;
        for m in self.cpus.iter() {
            n += m.lock().slots().len;
        }
        n + lock(&self.shared).len()
    }
}

impl fmt::Debug for FreeLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FreeLists")
            .field("free", &self.count())
            .field("cpus", &self.cpus.len())
            .field("batch", &self.batch)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_page_comes_back_once() {
        let f = FreeLists::new(300);
        let mut seen = HashSet::new();
        while let Some(i) = f.pop() {
            assert!(seen.insert(i), "page {i} handed out twice");
        }
        assert_eq!(seen.len(), 300);
        assert_eq!(f.count(), 0);
        for &i in &seen {
            f.push(i);
        }
        assert_eq!(f.count(), 300);
    }

    #[test]
    fn small_pool_is_shared_between_threads() {
        // Two pages, two threads: a page in one CPU's magazine must still
        // be found by the other thread (stealing).
        let f = FreeLists::new(2);
        let iters = if cfg!(miri) { 50 } else { 20_000 };
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..iters {
                        let i = f.pop().expect("one page is always free for each thread");
                        assert!(i < 2);
                        f.push(i);
                    }
                });
            }
        });
        assert_eq!(f.count(), 2);
    }

    #[test]
    fn spill_and_refill_keep_the_count() {
        let f = FreeLists::new(1000);
        let taken: Vec<u32> = (0..1000).map(|_| f.pop().unwrap()).collect();
        assert_eq!(f.pop(), None);
        for i in taken {
            f.push(i); // overflows the magazine: spills to the shared list
        }
        assert_eq!(f.count(), 1000);
    }
}
