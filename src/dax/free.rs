//! Free pages: per-CPU caches in front of one shared list.
//!
//! `pop`/`push` touch only the current CPU's cache, so two threads on two
//! CPUs never share a cache line. Caches refill from, and spill to, the
//! shared list (a mutex-protected `Vec`) in batches. Two tiers, chosen once
//! per `FreeLists` (as the counters choose theirs):
//!
//! * **rseq** ([`CpuStacks`]): each CPU's cache is a stack that the
//!   current CPU pops and pushes inside a restartable sequence, committed
//!   by a single store of its length: no atomic read-modify-write, no lock.
//!   Refill and spill run with the shared list locked and move a whole
//!   batch in one sequence, so no page is ever outside every list while the
//!   shared lock is free. When the shared list is empty, [`FreeLists::pop`]
//!   closes every CPU's cache gate, fences (`membarrier`), and moves every
//!   cached page to the shared list before it gives up.
//! * **portable**: each CPU has a small stack (a "magazine", as in the
//!   kernel's per-CPU page lists and slab magazines) behind a try-lock.
//!   Threads can migrate between reading their CPU number and locking the
//!   magazine, so the magazine is still locked — but never waited for on
//!   the hot path: if the try-lock fails (another thread is on "our"
//!   magazine), the operation goes to the shared list instead. Only the
//!   slow paths (stealing from other CPUs' magazines when everything else
//!   is empty, and counting) wait for a magazine lock, whose critical
//!   sections are a few instructions long.
//!
//! **Exhaustion is exact on both tiers**: `pop` returns `None` only after a
//! consistent look at every cache and the shared list found them all empty
//! (apart from pages whose `push` has not happened yet): on the rseq tier
//! with the shared list locked and every cache gate closed and fenced
//! (refills and spills need the shared lock, and the fast sequences refuse
//! on a closed gate), on the portable tier with every lock held.
//!
//! **Ordering**: a page popped happens-after the push that freed it, on
//! both tiers (the portable tier's locks; the rseq tier's committing
//! stores are Release and its loads Acquire, see `sys::rseq::stack`), so a
//! page's metadata reset before its push is seen by its next allocator.

use crate::sync::{lock, AtomicBool, Mutex, Ordering::*};
use crate::sys::cpu;
#[cfg(percpu_ref_rseq)]
use crate::sys::rseq::CpuStacks;
use crate::Tier;
use crossbeam_utils::CachePadded;
use std::cell::UnsafeCell;
use std::fmt;

/// Capacity of one portable magazine.
const CAP: usize = 64;

/// The free pages of a pool: per-CPU caches in front of one shared list.
///
/// Not API: public (hidden) only so `benches/freelist.rs` can measure it.
pub struct FreeLists {
    caches: Caches,
    shared: Mutex<Vec<u32>>,
    /// Moved between a cache and the shared list at once.
    batch: usize,
}

enum Caches {
    #[cfg(percpu_ref_rseq)]
    Rseq(CpuStacks),
    Portable(Box<[CachePadded<Magazine>]>),
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
    /// hand out low indices first), with per-CPU caches on the rseq tier
    /// where it is available.
    pub fn new(pages: usize) -> Self {
        Self::with_tier(pages, Tier::Rseq)
    }

    /// As [`FreeLists::new`] with per-CPU caches of the given tier (the
    /// portable one where the rseq tier is not available).
    pub fn with_tier(pages: usize, tier: Tier) -> Self {
        let ncpu = cpu::possible();
        let mut shared: Vec<u32> = Vec::with_capacity(pages);
        shared.extend((0..pages as u32).rev());
        let (caches, cap) = match tier {
            #[cfg(percpu_ref_rseq)]
            Tier::Rseq => match CpuStacks::new() {
                Some(s) => (Caches::Rseq(s), CpuStacks::CAP),
                None => (Caches::portable(ncpu), CAP),
            },
            _ => (Caches::portable(ncpu), CAP),
        };
        // Leave most pages on the shared list for small pools, so one CPU
        // does not hoard them all.
        let batch = (pages / (4 * ncpu)).clamp(1, cap / 2);
        FreeLists {
            caches,
            shared: Mutex::new(shared),
            batch,
        }
    }

    /// Which tier the per-CPU caches use.
    pub fn tier(&self) -> Tier {
        match self.caches {
            #[cfg(percpu_ref_rseq)]
            Caches::Rseq(_) => Tier::Rseq,
            Caches::Portable(_) => Tier::Portable,
        }
    }

    /// Take a free page, or `None` if there is none anywhere.
    #[inline]
    pub fn pop(&self) -> Option<u32> {
        match &self.caches {
            #[cfg(percpu_ref_rseq)]
            Caches::Rseq(s) => match s.pop() {
                Some(i) => Some(i),
                None => self.rseq_pop_slow(s),
            },
            Caches::Portable(m) => self.portable_pop(m),
        }
    }

    /// Give back a free page.
    #[inline]
    pub fn push(&self, i: u32) {
        match &self.caches {
            #[cfg(percpu_ref_rseq)]
            Caches::Rseq(s) => {
                if !s.push(i) {
                    self.rseq_push_slow(s, i);
                }
            }
            Caches::Portable(m) => self.portable_push(m, i),
        }
    }

    /// Number of free pages (a snapshot; exact when nothing runs).
    pub fn count(&self) -> usize {
        let cached: usize = match &self.caches {
            #[cfg(percpu_ref_rseq)]
            Caches::Rseq(s) => s.len(),
            Caches::Portable(m) => m.iter().map(|m| m.lock().slots().len).sum(),
        };
        cached + lock(&self.shared).len()
    }

    /// This CPU's cache was empty, closed, or raced: refill it from the
    /// shared list (taking every CPU's cached pages back first if the
    /// shared list is empty), under the shared lock.
    #[cfg(percpu_ref_rseq)]
    #[cold]
    #[inline(never)]
    fn rseq_pop_slow(&self, s: &CpuStacks) -> Option<u32> {
        let mut shared = lock(&self.shared);
        // A thread on this CPU may have pushed meanwhile, or a closed gate
        // (every closer holds the shared lock) is open again.
        if let Some(i) = s.pop() {
            return Some(i);
        }
        if shared.is_empty() {
            // Everything else is empty: with the shared list locked (no
            // refill or spill can run) and every gate closed and fenced (no
            // pop or push can run), the caches and the shared list are a
            // consistent picture of the free pages.
            s.with_all_closed(|c| c.drain_into(&mut shared));
        }
        let i = shared.pop()?;
        // Refill: a batch from the top of the shared list, in one sequence;
        // if it is refused (the thread moved to a CPU whose cache has no
        // room), the pages simply stay on the shared list.
        let from = shared.len() - self.batch.min(shared.len());
        if s.push_batch(&shared[from..]) {
            shared.truncate(from);
        }
        Some(i)
    }

    /// This CPU's cache was full, closed, or raced: spill a batch of it to
    /// the shared list and push again, under the shared lock.
    #[cfg(percpu_ref_rseq)]
    #[cold]
    #[inline(never)]
    fn rseq_push_slow(&self, s: &CpuStacks, i: u32) {
        let mut shared = lock(&self.shared);
        if s.push(i) {
            return;
        }
        let mut buf = [0u32; CpuStacks::CAP];
        let spill = &mut buf[..self.batch];
        if s.pop_batch(spill) {
            shared.extend_from_slice(spill);
            if s.push(i) {
                return;
            }
        }
        shared.push(i);
    }

    #[inline]
    fn here<'a>(&self, m: &'a [CachePadded<Magazine>]) -> &'a Magazine {
        let cpu = cpu::current();
        let n = m.len();
        // `current() < possible() == n`; the fold (never taken) avoids a
        // division on the hot path while keeping the index in range.
        &m[if cpu < n { cpu } else { cpu % n }]
    }

    #[inline]
    fn portable_pop(&self, m: &[CachePadded<Magazine>]) -> Option<u32> {
        if let Some(mut g) = self.here(m).try_lock() {
            if let Some(i) = g.slots().pop() {
                return Some(i);
            }
            return self.refill_and_pop(&mut g).or_else(|| {
                drop(g);
                self.steal(m)
            });
        }
        self.pop_shared().or_else(|| self.steal(m))
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
    fn steal(&self, m: &[CachePadded<Magazine>]) -> Option<u32> {
        // A quick pass that waits for nobody...
        for m in m.iter() {
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
        let mut guards: Vec<Guard<'_>> = m.iter().map(|m| m.lock()).collect();
        let mut shared = lock(&self.shared);
        if let Some(i) = shared.pop() {
            return Some(i);
        }
        drop(shared);
        guards.iter_mut().find_map(|g| g.slots().pop())
    }

    #[inline]
    fn portable_push(&self, m: &[CachePadded<Magazine>], i: u32) {
        if let Some(mut g) = self.here(m).try_lock() {
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
}

impl Caches {
    fn portable(ncpu: usize) -> Self {
        Caches::Portable(
            (0..ncpu)
                .map(|_| CachePadded::new(Magazine::new()))
                .collect(),
        )
    }
}

impl fmt::Debug for FreeLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpus = match &self.caches {
            #[cfg(percpu_ref_rseq)]
            Caches::Rseq(s) => s.rows(),
            Caches::Portable(m) => m.len(),
        };
        f.debug_struct("FreeLists")
            .field("free", &self.count())
            .field("tier", &self.tier())
            .field("cpus", &cpus)
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

    /// Both tiers (the rseq one only where available).
    fn tiers() -> Vec<Tier> {
        let mut v = vec![Tier::Portable];
        if FreeLists::with_tier(1, Tier::Rseq).tier() == Tier::Rseq {
            v.push(Tier::Rseq);
        }
        v
    }

    /// Run `f`, aborting the process if it takes longer than `secs`: a
    /// deadlock in a slow path fails the test run instead of stalling it.
    fn with_time_limit<R>(secs: u64, f: impl FnOnce() -> R) -> R {
        let (alive, watchdog) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let limit = std::time::Duration::from_secs(secs);
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(limit) {
                eprintln!("free-list test still running after {secs} s: a hang; aborting");
                std::process::abort();
            }
        });
        let r = f();
        drop(alive);
        r
    }

    #[test]
    fn new_prefers_the_rseq_tier() {
        let expected = if crate::sys::rseq::rseq_available() {
            Tier::Rseq
        } else {
            Tier::Portable
        };
        assert_eq!(FreeLists::new(4).tier(), expected);
        assert_eq!(
            FreeLists::with_tier(4, Tier::Portable).tier(),
            Tier::Portable
        );
    }

    #[test]
    fn both_tiers_hand_out_every_page_once_and_take_them_back() {
        for tier in tiers() {
            for pages in [0, 1, 2, 63, 300, 1000] {
                let f = FreeLists::with_tier(pages, tier);
                let mut seen = HashSet::new();
                while let Some(i) = f.pop() {
                    assert!((i as usize) < pages, "{tier:?}: page {i} of {pages}");
                    assert!(seen.insert(i), "{tier:?}: page {i} handed out twice");
                }
                assert_eq!(seen.len(), pages, "{tier:?}");
                assert_eq!(f.count(), 0, "{tier:?}");
                for &i in &seen {
                    f.push(i);
                }
                assert_eq!(f.count(), pages, "{tier:?}");
                // Again, now that the caches hold pages.
                let again: HashSet<u32> = std::iter::from_fn(|| f.pop()).collect();
                assert_eq!(again, seen, "{tier:?}");
                assert!(format!("{f:?}").contains(&format!("{tier:?}")));
            }
        }
    }

    /// Pages cached by one CPU are found by a thread on another CPU when
    /// the shared list is empty: exhaustion means every page is held.
    #[test]
    fn pages_cached_on_another_cpu_are_found() {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let [c0, c1, ..] = cores[..] else {
            eprintln!("needs two cores: skipped");
            return;
        };
        for tier in tiers() {
            let f = FreeLists::with_tier(40, tier);
            std::thread::scope(|s| {
                s.spawn(|| {
                    core_affinity::set_for_current(c0);
                    // Take every page, then free them all on CPU c0: they
                    // end up in its cache (and the shared list).
                    let all: Vec<u32> = std::iter::from_fn(|| f.pop()).collect();
                    assert_eq!(all.len(), 40);
                    all.into_iter().for_each(|i| f.push(i));
                })
                .join()
                .unwrap();
                s.spawn(|| {
                    core_affinity::set_for_current(c1);
                    let all: HashSet<u32> = std::iter::from_fn(|| f.pop()).collect();
                    assert_eq!(all.len(), 40, "{tier:?}: pages stuck in another cache");
                    all.into_iter().for_each(|i| f.push(i));
                })
                .join()
                .unwrap();
            });
            assert_eq!(f.count(), 40);
        }
    }

    /// `THREADS` threads on 2 cores (preempted and migrated by the
    /// scheduler) each hold up to `HOLD` pages of a pool of exactly
    /// `THREADS * HOLD`: whenever a thread pops, a page is free, so `pop`
    /// must never fail, and no page may be held twice.
    #[test]
    fn exhaustion_is_exact_under_contention() {
        const THREADS: usize = 4;
        const HOLD: usize = 3;
        let iters = if cfg!(debug_assertions) {
            5_000
        } else {
            50_000
        };
        for tier in tiers() {
            let f = FreeLists::with_tier(THREADS * HOLD, tier);
            let held: Vec<crate::sync::AtomicBool> = (0..THREADS * HOLD)
                .map(|_| crate::sync::AtomicBool::new(false))
                .collect();
            with_time_limit(120, || {
                std::thread::scope(|s| {
                    for t in 0..THREADS {
                        let (f, held) = (&f, &held);
                        s.spawn(move || {
                            let mut mine = Vec::new();
                            for n in 0..iters {
                                if mine.len() < HOLD && (n + t) % 3 != 0 {
                                    let i = f.pop().unwrap_or_else(|| {
                                        panic!("{tier:?}: pool empty with a page free")
                                    });
                                    assert!(
                                        !held[i as usize].swap(true, SeqCst),
                                        "{tier:?}: page {i} held twice"
                                    );
                                    mine.push(i);
                                } else if let Some(i) = mine.pop() {
                                    held[i as usize].store(false, SeqCst);
                                    f.push(i);
                                }
                            }
                            for i in mine {
                                held[i as usize].store(false, SeqCst);
                                f.push(i);
                            }
                        });
                    }
                });
            });
            assert_eq!(f.count(), THREADS * HOLD, "{tier:?}");
            let all: HashSet<u32> = std::iter::from_fn(|| f.pop()).collect();
            assert_eq!(all.len(), THREADS * HOLD, "{tier:?}");
        }
    }
}
