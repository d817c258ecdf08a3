//! What a pool's pages and handles share: the page table (one cache line
//! per page: count, hook, version) and its hook, the free lists, the
//! pool's `PercpuRef` and its release.
//!
//! # Ownership (why unmapping under a live page, or a read, is impossible)
//!
//! * `Shared` (page table, free lists, the pool's `PercpuRef` whose value
//!   is the mapped `Region`) lives in an `Arc`. Its strong count is held by
//!   the pool handle, every `ShutdownHandle`, the registry entry, each
//!   thread's last-pool entry (`registry`), and the per-CPU *shards*.
//! * A shard is a small `Arc` of its own holding an `Arc<Shared>`; there is
//!   one per CPU, owned by the pool until its release. Every allocated page
//!   holds **one strong count on a shard** — the shard of the CPU that
//!   allocated it — taken when `alloc` moves the page 0→1 and given back by
//!   whichever `DevicePage` drop moves it 1→0, *after* the page hook
//!   returned (or while a panic in the hook unwinds). So pages keep
//!   `Shared` alive, yet two CPUs allocating and freeing never write the
//!   same counter (a single `Arc<Shared>` count per allocation made the
//!   2-thread alloc+free pair ~1.6× slower). Cloning a page touches only
//!   the page's counter.
//! * Each allocated page also holds one reference on the `PercpuRef` (its
//!   hook: `tryget_live` on 0→1, free-list push then `put` on 1→0). The
//!   `PercpuRef`'s release unregisters and unmaps the region and gives up
//!   the pool's shards. It can only run once the ref is killed (shutdown,
//!   or the pool handle dropped) and its count is zero: every page is free,
//!   so no `DevicePage` — and no slice borrowed from one — exists when the
//!   memory goes away.
//! * A `lookup` or optimistic `read` *pins* the pool: it holds a reference
//!   on the `PercpuRef` (`tryget_live`) for its whole duration, so the
//!   release cannot run meanwhile — the memory stays mapped, and the shards
//!   (hence `Shared`) stay alive — even if the thread's last-pool entry or
//!   the registry entry it came through is dropped during the read. An
//!   optimistic read takes no page reference: the page may be freed and
//!   reallocated under it, which its version check reports (`seqlock`).
//! * So the handle may be dropped first: the pages keep `Shared` alive,
//!   the last page's drop unmaps, and the last `Arc` frees the metadata.
//!
//! Every thread that runs code inside `Shared` holds one of those strong
//! counts or a pin, except a page `put` that did not reach zero (2→1),
//! which may still be returning from `PageRef::dec_and_test` when another
//! thread frees `Shared`. That is sound because a `DevicePage` points at
//! the page's `PageRef` (count plus [`PoolHook`]), not at its whole
//! [`PageSlot`], and the `PageRef` consists only of atomics, with no
//! padding: like `Arc`'s own counter, a `&AtomicU32`-only reference may
//! dangle after its last access (both of Miri's aliasing models accept it;
//! a struct with a plain field or padding bytes would not be, under Tree
//! Borrows — the slot has padding, and no reference to it outlives a pin
//! or a page reference).

use super::error::PoolError;
use super::free::FreeLists;
use super::region::Region;
use super::registry;
use super::seqlock;
use super::shutdown::ShutdownReport;
use crate::page::{PageRef, PageRefHook};
use crate::percpu::policy::{Completion, ReleasePolicy};
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
use crate::percpu::Tracker;
use crate::percpu::{Holders, KillError, PercpuRef, Ref};
use crate::sync::{lock, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Mutex, Ordering::*};
use crate::sys::cpu;
use crossbeam_utils::CachePadded;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

/// Everything a pool's pages and handles share.
pub(crate) struct Shared {
    /// The pool's "pgmap": one reference per allocated page plus the
    /// initial one (dropped at shutdown). Its value is the mapping.
    pub(super) pgmap: PercpuRef<Region, PoolRelease>,
    /// One cache line per page (see [`PageSlot`]).
    pub(super) pages: Box<[PageSlot]>,
    pub(super) free: FreeLists,
    pub(super) page_size: usize,
    pub(super) page_shift: u32,
    /// Opened with `PoolOptions::optimistic_reads`: pages are written only
    /// atomically (`PageWriter`), never through a `&mut [u8]`.
    pub(super) optimistic: bool,
    /// Who holds each `DevicePage` (feature `track`; zero-sized without
    /// it). Every `DevicePage` registers here when it is made (alloc,
    /// lookup, clone) and removes itself in its drop *before* its put, while
    /// its reference still keeps `Shared` alive.
    #[cfg(not(percpu_ref_untracked))]
    pub(super) holders: Tracker,
}

/// One page's metadata, alone on its cache line: pages in use on different
/// CPUs never share a line, so a lookup or put of one page never slows down
/// another's (the kernel pads `struct page` to 64 bytes for the same
/// reason). 64 bytes per page: 16 MiB per GiB of 4 KiB pages (1.56%),
/// 32 KiB per GiB of 2 MiB pages.
///
/// A `DevicePage` points at `page`, never at the whole slot: `page` is the
/// part that may be referenced while another thread frees `Shared` (module
/// docs), and it consists of atomics only.
#[repr(C, align(64))]
pub(crate) struct PageSlot {
    /// The page's reference count and hook.
    pub(super) page: PageRef<PoolHook>,
    /// The page's version for optimistic reads (`super::seqlock`): even
    /// while the page is allocated and nobody writes it, odd while it is
    /// free or being written. Changed only by the page's owner of the
    /// moment: the allocator, the writer holding the only reference, or
    /// the thread whose put freed it. (In a pool without optimistic reads
    /// allocation and free leave it alone: nobody reads it there.)
    pub(super) seq: AtomicU64,
}

/// A per-CPU holder of one `Arc<Shared>`, so that allocations keep the pool
/// alive by counting on a CPU-local `Arc` (module docs).
pub(super) struct Shard {
    pub(super) _pool: Arc<Shared>,
}

pub(super) type ShardArc = CachePadded<Shard>;

impl Shared {
    pub(super) fn region(&self) -> &Region {
        self.pgmap.value()
    }

    pub(super) fn path(&self) -> PathBuf {
        self.region().path().to_path_buf()
    }

    pub(super) fn shutting_down(&self) -> PoolError {
        PoolError::ShuttingDown { path: self.path() }
    }

    /// Kill the pgmap once: later `tryget_live` (alloc, lookup) fails
    /// everywhere once this returns, the initial reference is dropped, and
    /// the release runs when the last page is freed (or right here).
    ///
    /// A second call gets `AlreadyDead`, which `kill_and_confirm` returns
    /// only after the first kill's switch to atomic mode, so it too returns
    /// only once `tryget_live` fails everywhere. No lock of ours is held
    /// while the release (which may run here) wakes the waiters.
    pub(super) fn start_shutdown(&self) {
        match self.pgmap.kill_and_confirm(|| {}) {
            Ok(()) | Err(KillError::AlreadyDead) => {}
            Err(e) => debug_assert!(false, "pool pgmap kill: {e}"),
        }
    }

    /// Page `index`'s bytes as atomic words (page size ÷ word size).
    ///
    /// # Safety
    ///
    /// `index` is a page of this pool (`< pages.len()`), and the region
    /// stays mapped while the result is used: the caller holds a page
    /// reference or a pool reference (`tryget_live`).
    #[inline]
    pub(super) unsafe fn words(&self, index: usize) -> &[AtomicUsize] {
        debug_assert!(index < self.pages.len());
        let p = self
            .region()
            .base()
            .as_ptr()
            .wrapping_add(index << self.page_shift);
        // SAFETY: `index < pages` (caller), so the page lies inside the
        // mapping, which is mapped while the caller uses it (caller) and aligned to
        // the page size, a multiple of the word size; `AtomicUsize` has
        // the layout of `usize`, and every access through it is atomic.
        unsafe {
            std::slice::from_raw_parts(p.cast::<AtomicUsize>(), self.page_size / seqlock::WORD)
        }
    }

    /// `Err(Forked)` in a child process created by `fork()` after the pool
    /// was opened.
    #[inline]
    pub(super) fn check_fork(&self) -> Result<(), PoolError> {
        self.region().check_fork()
    }

    /// Page `i`'s count and hook.
    #[inline]
    pub(super) fn page(&self, i: usize) -> &PageRef<PoolHook> {
        &self.pages[i].page
    }

    /// Who holds pages now (a snapshot; empty and "not tracked" without
    /// the `track` feature).
    pub(super) fn page_holders(&self) -> Holders {
        #[cfg(not(percpu_ref_untracked))]
        return self.holders.holders();
        #[cfg(percpu_ref_untracked)]
        Holders::default()
    }

    pub(super) fn held_indices(&self) -> Vec<usize> {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.page.count() > 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// The shard allocations on this CPU count on.
    #[inline]
    pub(super) fn shard_index(&self) -> u32 {
        let n = self.pgmap.policy().shards.len();
        let cpu = cpu::current();
        // `current() < possible() == n`: the fold is never taken.
        (if cpu < n { cpu } else { cpu % n }) as u32
    }

    /// Take one strong count on shard `k` for a new allocation.
    ///
    /// # Safety
    ///
    /// The caller holds a pgmap reference (so the release, which drops the
    /// pool's shards, has not run).
    #[inline]
    pub(super) unsafe fn shard_get(&self, k: u32) -> NonNull<ShardArc> {
        // Acquire: pairs with the Release store in `from_region`.
        let p = self.pgmap.policy().shards[k as usize].load(Acquire);
        // SAFETY: the pool still owns this shard (caller), so `p` came from
        // `Arc::into_raw` and its count is at least one.
        unsafe { Arc::increment_strong_count(p) };
        // SAFETY: from `Arc::into_raw`, never null.
        unsafe { NonNull::new_unchecked(p) }
    }

    pub(super) fn report(&self) -> ShutdownReport {
        lock(&self.pgmap.policy().report)
            .clone()
            .unwrap_or_else(|| ShutdownReport::new(self.region(), self.pages.len()))
    }
}

/// A page's hook: 0→1 takes a pool reference, 1→0 returns the page to the
/// free lists and then puts the pool reference (in that order: the put may
/// be the one that unmaps).
///
/// Only atomics (see the module docs): the owning `Shared`'s address split
/// in two `u32` halves (exposed provenance), the page index, and the
/// exclusive-writer flag.
pub(crate) struct PoolHook {
    shared_lo: AtomicU32,
    shared_hi: AtomicU32,
    pub(super) index: AtomicU32,
    /// 1 while the page's only holder may have a `&mut [u8]` to it (see
    /// `DevicePage::as_mut_slice`): lookups back off.
    pub(super) exclusive: AtomicU32,
    /// While allocated: the shard its allocation counts on (written before
    /// the 0→1 transition, read by lookups after `get_unless_zero`).
    pub(super) shard: AtomicU32,
}

impl PoolHook {
    pub(super) fn new(shared_addr: usize, index: u32) -> Self {
        let a = shared_addr as u64;
        PoolHook {
            shared_lo: AtomicU32::new(a as u32),
            shared_hi: AtomicU32::new((a >> 32) as u32),
            index: AtomicU32::new(index),
            exclusive: AtomicU32::new(0),
            shard: AtomicU32::new(0),
        }
    }

    #[inline]
    pub(super) fn shared(&self) -> &Shared {
        // Relaxed: written once before the `Arc<Shared>` was shared; that
        // publication orders them before any hook call.
        let addr = (u64::from(self.shared_hi.load(Relaxed)) << 32)
            | u64::from(self.shared_lo.load(Relaxed));
        let p: *const Shared = std::ptr::with_exposed_provenance(addr as usize);
        // SAFETY: `addr` is the exposed address of the `Shared` that holds
        // this hook in its page table (`DevicePagePool::from_region`). Hooks
        // are called only by `PageRef` methods on those pages, by callers
        // that keep the `Shared` alive for the call (module docs), so it is
        // live for as long as `&self` is.
        unsafe { &*p }
    }
}

impl PageRefHook for PoolHook {
    #[inline]
    fn on_first_ref(&self) -> bool {
        match self.shared().pgmap.tryget_live() {
            Some(r) => {
                let _ = Ref::into_raw(r);
                true
            }
            None => false,
        }
    }

    #[inline]
    fn on_last_unref(&self) {
        /// Puts the page's pool reference when dropped: after the page is
        /// back on the free lists, or while a panic in between unwinds, so
        /// that the shutdown can still complete.
        struct PutPool<'a>(&'a Shared);

        impl Drop for PutPool<'_> {
            #[inline]
            fn drop(&mut self) {
                // SAFETY: gives back the raw reference the matching
                // `on_first_ref` took (a PageRef calls the two strictly
                // balanced, and only the pool's pages, inside `Shared`, use
                // this hook); dropped once.
                unsafe { self.0.pgmap.put_many(1) }
            }
        }

        let shared = self.shared();
        let put = PutPool(shared);
        // Relaxed: set once at construction (see `shared`).
        let index = self.index.load(Relaxed);
        // Relaxed: reset for the next allocation; the free-list lock that
        // hands the page out again publishes it.
        self.exclusive.store(0, Relaxed);
        // Optimistic readers that began before see the page change; new
        // ones are refused until it is allocated again. (A pool without
        // optimistic reads has no such readers: it skips the version.)
        if shared.optimistic {
            seqlock::mark_free(&shared.pages[index as usize].seq);
        }
        #[cfg(test)]
        fault::hit(fault::Point::PageFree);
        shared.free.push(index);
        // The put last: it may be the one that unmaps.
        drop(put);
    }

    #[inline]
    fn undo_first_ref(&self) {
        // The page was not free after all (never happens: free-list pages
        // have count 0); give the reference back, leave the page alone.
        // SAFETY: as in `on_last_unref`.
        unsafe { self.shared().pgmap.put_many(1) }
    }
}

/// The pgmap's release: runs once, when the pool was shut down and its
/// last page was freed (or inside the shutdown if none was held).
pub(super) struct PoolRelease {
    pub(super) done: Completion,
    pub(super) report: Mutex<Option<ShutdownReport>>,
    pub(super) pages: usize,
    /// One per CPU, from `Arc::into_raw`, owned by the pool until the
    /// release (null afterwards).
    pub(super) shards: Box<[AtomicPtr<ShardArc>]>,
}

impl ReleasePolicy<Region> for PoolRelease {
    fn release(&self, region: &Region) {
        let mut finish = FinishRelease {
            policy: self,
            region,
            report: Some(ShutdownReport::new(region, self.pages)),
            unregistered: false,
        };
        // 1. No lookup can find the pool any more, and its address range
        //    may be reused by the next mmap.
        registry::unregister(region.base().as_ptr() as usize);
        finish.unregistered = true;
        // 2. Persist.
        // SAFETY: the pgmap drained to zero, so no page is allocated (each
        // holds a reference) and no `DevicePage`, slice, read or persist
        // call can use the region; new ones are impossible (killed:
        // `tryget_live` fails; released: `tryget` fails). So it is still
        // mapped, and unmapping it below is sound.
        let persisted = unsafe { region.persist(0, region.len()) };
        if let (Err(e), Some(report)) = (persisted, finish.report.as_mut()) {
            report.persist_error = Some(Arc::new(e));
        }
        // 3. Unmap.
        // SAFETY: as above: nothing can use the region any more.
        unsafe { region.unmap() };
        #[cfg(test)]
        fault::hit(fault::Point::Unmapped);
        // 4. and 5. in `finish`'s drop.
    }
}

/// The end of the pool's release, run when it is dropped: normally at the
/// end of `release`, or while a panic in it unwinds (the panic goes on to
/// the thread whose put ran the release). Either way the region is
/// unregistered and unmapped (both happen once), the report is stored, the
/// shutdown waiters are woken and the pool's shards are given up — a
/// panicking release never leaves `ShutdownHandle::wait` hanging nor
/// `Shared` leaking.
struct FinishRelease<'a> {
    policy: &'a PoolRelease,
    region: &'a Region,
    report: Option<ShutdownReport>,
    unregistered: bool,
}

impl Drop for FinishRelease<'_> {
    fn drop(&mut self) {
        if !self.unregistered {
            registry::unregister(self.region.base().as_ptr() as usize);
        }
        // SAFETY: as in `release`: nothing can use the region any more.
        // Unmaps only if a panic came before step 3 (unmap-once).
        unsafe { self.region.unmap() };
        *lock(&self.policy.report) = self.report.take();
        // 4. Wake the shutdown waiters.
        self.policy.done.complete();
        // 5. Give up the pool's shards. Not the last `Arc<Shared>`: this
        //    thread holds one (module docs), so nothing is freed under us.
        for slot in self.policy.shards.iter() {
            // AcqRel: Acquire pairs with the Release store that published
            // the shard; one swap hands ownership over exactly once.
            let p = slot.swap(std::ptr::null_mut(), AcqRel);
            if !p.is_null() {
                // SAFETY: the pool's own count on the shard, from
                // `Arc::into_raw`, given back once (swapped out above).
                unsafe { drop(Arc::from_raw(p.cast_const())) };
            }
        }
    }
}

/// Injected panics for the tests of the panic paths.
#[cfg(test)]
pub(super) mod fault {
    use std::cell::Cell;

    /// Where a panic can be injected.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Point {
        /// In a page's final put, after it was marked free and before it
        /// is back on the free lists.
        PageFree,
        /// In the pool's release, after the unmap and before the waiters
        /// are woken.
        Unmapped,
    }

    thread_local! {
        static ARMED: Cell<Option<Point>> = const { Cell::new(None) };
    }

    /// Panic the next time this thread reaches `p`.
    pub(crate) fn arm(p: Point) {
        ARMED.set(Some(p));
    }

    pub(crate) fn hit(p: Point) {
        if ARMED.get() == Some(p) {
            ARMED.set(None);
            panic!("injected panic at {p:?}");
        }
    }
}

/// Is the pool metadata behind `meta` freed within a few seconds? Not at
/// once: another thread's registry read (a lookup of *any* pool) holds the
/// registry snapshot it loaded, and with it every pool listed there, until
/// the read returns. A real leak never frees it.
#[cfg(test)]
pub(super) fn freed_soon(meta: &std::sync::Weak<Shared>) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while meta.strong_count() > 0 {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dax::DevicePagePool;
    use std::time::Duration;

    #[test]
    fn page_entries_are_atomics_without_padding() {
        // Six `AtomicU32`s: the count and the hook's five words. No plain
        // field and no padding byte, which the module docs rely on.
        assert_eq!(std::mem::size_of::<PageRef<PoolHook>>(), 6 * 4);
        assert_eq!(std::mem::align_of::<PageRef<PoolHook>>(), 4);
        // One slot per cache line.
        assert_eq!(std::mem::size_of::<PageSlot>(), 64);
        assert_eq!(std::mem::align_of::<PageSlot>(), 64);
    }

    /// A panic in a page's final put (its hook) is propagated out of the
    /// drop, and the bookkeeping still finishes: the pool reference is put
    /// (the shutdown completes) and the allocation's count on its shard is
    /// given back (the metadata is freed once everything is dropped).
    #[test]
    fn a_panicking_page_hook_leaks_nothing() {
        let pool = DevicePagePool::anonymous(4 * 4096).unwrap();
        let meta = Arc::downgrade(&pool.shared);
        let page = pool.alloc().unwrap();
        let keep = pool.alloc().unwrap();
        fault::arm(fault::Point::PageFree);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(page)));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("PageFree"), "{msg}");
        // The page itself is lost (it never reached the free lists), but
        // nothing else: the other page still works, and shutdown completes.
        assert_eq!(pool.stats().allocated, 1);
        let sd = pool.shutdown();
        assert!(!sd.is_complete());
        drop(keep);
        assert!(
            sd.wait_timeout(Duration::from_secs(10)).is_ok(),
            "the pool reference of the panicking put was given back"
        );
        drop((pool, sd));
        assert!(
            freed_soon(&meta),
            "the shard count of the panicking put was given back"
        );
    }

    /// A panic in the pool's release, between the unmap and the wake-up,
    /// is propagated out of the last page's drop, and the shutdown still
    /// completes with a report; nothing leaks.
    #[test]
    fn a_panicking_release_still_completes_the_shutdown() {
        let pool = DevicePagePool::anonymous(4 * 4096).unwrap();
        let meta = Arc::downgrade(&pool.shared);
        let page = pool.alloc().unwrap();
        let sd = pool.shutdown();
        fault::arm(fault::Point::Unmapped);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(page)));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("Unmapped"), "{msg}");
        let report = sd
            .wait_timeout(Duration::from_secs(10))
            .expect("the waiters were woken");
        assert_eq!((report.pages, report.bytes), (4, 4 * 4096));
        // Not a lookup of `addr`: a pool of a test running alongside may
        // be mapped there by now. The registry entry holds an `Arc` of the
        // metadata, so its being freed shows the range unregistered too.
        drop((pool, sd));
        assert!(
            freed_soon(&meta),
            "the pool's shards and registry entry were given up"
        );
    }

    #[test]
    fn a_page_handle_grows_only_by_its_holder_token_with_tracking() {
        // Four pointers and the index; with the `track` feature also the
        // holder's token (shard and slot). Without it the token is
        // zero-sized: the handle is what it is without the tracking code.
        let token = if cfg!(all(feature = "track", not(percpu_ref_untracked))) {
            8
        } else {
            0
        };
        assert_eq!(std::mem::size_of::<crate::DevicePage>(), 40 + token);
        assert_eq!(std::mem::size_of::<Option<crate::DevicePage>>(), 40 + token);
    }

    #[test]
    fn the_hook_finds_its_pool() {
        let pool = DevicePagePool::anonymous(4 * 4096).unwrap();
        for (i, p) in pool.shared.pages.iter().enumerate() {
            assert!(std::ptr::eq(p.page.hook().shared(), &*pool.shared));
            assert_eq!(p.page.hook().index.load(Relaxed) as usize, i);
        }
    }
}
