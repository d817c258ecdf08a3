//! `DevicePagePool`, `DevicePage`, shutdown.
//!
//! # Ownership (why unmapping under a live page is impossible)
//!
//! * `Shared` (page table, free lists, the pool's `PercpuRef` whose value
//!   is the mapped `Region`) lives in an `Arc`. Its strong count is held by
//!   the pool handle, every `ShutdownHandle`, the registry entry, and the
//!   per-CPU *shards*.
//! * A shard is a small `Arc` of its own holding an `Arc<Shared>`; there is
//!   one per CPU, owned by the pool until its release. Every allocated page
//!   holds **one strong count on a shard** — the shard of the CPU that
//!   allocated it — taken when `alloc` moves the page 0→1 and given back by
//!   whichever `DevicePage` drop moves it 1→0, *after* the page hook
//!   returned. So pages keep `Shared` alive, yet two CPUs allocating and
//!   freeing never write the same counter (a single `Arc<Shared>` count per
//!   allocation made the 2-thread alloc+free pair ~1.6× slower). Cloning a
//!   page touches only the page's counter.
//! * Each allocated page also holds one reference on the `PercpuRef` (its
//!   hook: `tryget_live` on 0→1, free-list push then `put` on 1→0). The
//!   `PercpuRef`'s release unregisters and unmaps the region. It can only
//!   run once the ref is killed (shutdown, or the pool handle dropped) and
//!   every page is free, so no `DevicePage` — and no slice borrowed from
//!   one — exists when the memory goes away.
//! * So the handle may be dropped first: the pages keep `Shared` alive,
//!   the last page's drop unmaps, and the last `Arc` frees the metadata.
//!
//! Every thread that runs code inside `Shared` holds one of those strong
//! counts, except a page `put` that did not reach zero (2→1), which may
//! still be returning from `PageRef::dec_and_test` when another thread
//! frees `Shared`. That is sound because the page entries (`PageRef` plus
//! [`PoolHook`]) consist only of atomics, with no padding: like `Arc`'s own
//! counter, a `&AtomicU32`-only reference may dangle after its last access
//! (both of Miri's aliasing models accept it; a struct with a plain field
//! or padding bytes would not be, under Tree Borrows).

use super::backend::{self, Plan};
use super::error::{PoolError, StillHeld};
use super::free::FreeLists;
use super::options::{Backend, PersistMethod, PoolOptions};
use super::region::Region;
use super::registry;
use crate::page::{FirstRefError, PageRef, PageRefHook};
use crate::percpu::policy::{Completion, CompletionFuture, ReleasePolicy};
use crate::percpu::{KillError, PercpuRef, Ref};
use crate::sync::{lock, AtomicPtr, AtomicU32, Mutex, Ordering::*};
use crate::sys::cpu;
use crossbeam_utils::CachePadded;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

// ---------------------------------------------------------------- internals

/// Everything a pool's pages and handles share.
pub(crate) struct Shared {
    /// The pool's "pgmap": one reference per allocated page plus the
    /// initial one (dropped at shutdown). Its value is the mapping.
    pgmap: PercpuRef<Region, PoolRelease>,
    pages: Box<[PageRef<PoolHook>]>,
    free: FreeLists,
    page_size: usize,
    page_shift: u32,
}

/// A per-CPU holder of one `Arc<Shared>`, so that allocations keep the pool
/// alive by counting on a CPU-local `Arc` (module docs).
struct Shard {
    _pool: Arc<Shared>,
}

type ShardArc = CachePadded<Shard>;

impl Shared {
    fn region(&self) -> &Region {
        self.pgmap.value()
    }

    fn path(&self) -> PathBuf {
        self.region().path().to_path_buf()
    }

    fn shutting_down(&self) -> PoolError {
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
    fn start_shutdown(&self) {
        match self.pgmap.kill_and_confirm(|| {}) {
            Ok(()) | Err(KillError::AlreadyDead) => {}
            Err(e) => debug_assert!(false, "pool pgmap kill: {e}"),
        }
    }

    fn held_indices(&self) -> Vec<usize> {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.count() > 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// The shard allocations on this CPU count on.
    #[inline]
    fn shard_index(&self) -> u32 {
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
    unsafe fn shard_get(&self, k: u32) -> NonNull<ShardArc> {
        // Acquire: pairs with the Release store in `from_region`.
        let p = self.pgmap.policy().shards[k as usize].load(Acquire);
        // SAFETY: the pool still owns this shard (caller), so `p` came from
        // `Arc::into_raw` and its count is at least one.
        unsafe { Arc::increment_strong_count(p) };
        // SAFETY: from `Arc::into_raw`, never null.
        unsafe { NonNull::new_unchecked(p) }
    }

    fn report(&self) -> ShutdownReport {
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
    index: AtomicU32,
    /// 1 while the page's only holder may have a `&mut [u8]` to it (see
    /// `DevicePage::as_mut_slice`): lookups back off.
    exclusive: AtomicU32,
    /// While allocated: the shard its allocation counts on (written before
    /// the 0→1 transition, read by lookups after `get_unless_zero`).
    shard: AtomicU32,
}

impl PoolHook {
    fn new(shared_addr: usize, index: u32) -> Self {
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
    fn shared(&self) -> &Shared {
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
        let shared = self.shared();
        // Relaxed: reset for the next allocation; the free-list lock that
        // hands the page out again publishes it.
        self.exclusive.store(0, Relaxed);
        // Relaxed: set once at construction (see `shared`).
        shared.free.push(self.index.load(Relaxed));
        // SAFETY: gives back the raw reference the matching `on_first_ref`
        // took (a PageRef calls the two strictly balanced, and only the
        // pool's pages, inside `Shared`, use this hook).
        unsafe { shared.pgmap.put_many(1) }
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
struct PoolRelease {
    done: Completion,
    report: Mutex<Option<ShutdownReport>>,
    pages: usize,
    /// One per CPU, from `Arc::into_raw`, owned by the pool until the
    /// release (null afterwards).
    shards: Box<[AtomicPtr<ShardArc>]>,
}

impl ReleasePolicy<Region> for PoolRelease {
    fn release(&self, region: &Region) {
        // 1. No lookup can find the pool any more, and its address range
        //    may be reused by the next mmap.
        registry::unregister(region.base().as_ptr() as usize);
        let mut report = ShutdownReport::new(region, self.pages);
        // 2. Persist.
        // SAFETY: the pgmap drained to zero, so no page is allocated (each
        // holds a reference) and no `DevicePage`, slice or persist call can
        // use the region; new ones are impossible (killed: `tryget_live`
        // fails; released: `tryget` fails). So it is still mapped, and
        // unmapping it below is sound.
        let persisted = unsafe { region.persist(0, region.len()) };
        if let Err(e) = persisted {
            report.persist_error = Some(Arc::new(e));
        }
        // 3. Unmap.
        // SAFETY: as above: nothing can use the region any more.
        unsafe { region.unmap() };
        *lock(&self.report) = Some(report);
        // 4. Wake the shutdown waiters.
        self.done.complete();
        // 5. Give up the pool's shards. Not the last `Arc<Shared>`: this
        //    thread holds one (module docs), so nothing is freed under us.
        for slot in self.shards.iter() {
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

// ---------------------------------------------------------------- the pool

/// A pool of fixed-size pages carved out of persistent memory (`/dev/dax`),
/// a file on a DAX filesystem, a regular file, or anonymous memory, with the
/// kernel's `dev_pagemap` lifetime rules: pages may outlive the start of a
/// shutdown, and the memory is unmapped only after the last page is gone.
///
/// * [`alloc`](Self::alloc) hands out a [`DevicePage`]: `Clone` is a page
///   get, `Drop` a put, the last put returns the page. Allocation takes one
///   reference on the pool's [`PercpuRef`] (with `tryget_live`, on the
///   page's 0→1 transition); the last put gives it back. Get/put of an
///   allocated page never touches the pool.
/// * [`shutdown`](Self::shutdown) kills that ref: every later `alloc` and
///   [`lookup`](Self::lookup) fails with [`PoolError::ShuttingDown`]; held
///   pages stay valid and readable; when the last one is dropped the pool
///   is persisted and unmapped, and the [`ShutdownHandle`] wakes up.
///   Dropping the pool handle starts the same shutdown without waiting.
/// * [`lookup`](Self::lookup) finds the page at an address in any live
///   pool of the process (like the kernel's `get_dev_pagemap` +
///   `get_page_unless_zero`).
///
/// Backends ([`Backend`]): [`open`](Self::open) detects device dax (a
/// character device whose sysfs subsystem is `dax`) or a regular file
/// (fsdax with `MAP_SYNC`; the `msync` file backend only if
/// [`PoolOptions::allow_file_fallback`] says so);
/// [`anonymous`](Self::anonymous) works everywhere.
///
/// # Example: a storage engine across a hot shutdown
///
/// ```
/// use percpu_ref::{DevicePagePool, PoolError};
/// use std::sync::mpsc;
///
/// let pool = DevicePagePool::anonymous(16 * 4096)?;
///
/// // The engine writes a record into a fresh page and hands a reference
/// // to a reader thread (e.g. an in-flight read request).
/// let mut page = pool.alloc()?;
/// page.as_mut_slice().expect("a new page is unique")[..5].copy_from_slice(b"hello");
/// page.persist()?;
/// let (tx, rx) = mpsc::channel::<()>();
/// let reader = {
///     let page = page.clone();
///     std::thread::spawn(move || {
///         rx.recv().unwrap(); // the request is still being served...
///         assert_eq!(&page.as_slice()[..5], b"hello"); // ...and its page still valid
///     }) // the reader's reference is dropped here
/// };
///
/// // Hot shutdown while the reader still holds the page: legal.
/// let shutdown = pool.shutdown();
/// assert!(matches!(pool.alloc(), Err(PoolError::ShuttingDown { .. })));
/// drop(pool); // even the pool handle may go first
/// drop(page); // the engine is done with it; the reader is not
/// assert!(!shutdown.is_complete());
///
/// tx.send(()).unwrap();
/// reader.join().unwrap(); // the last reference drops: persist, unmap
/// let report = shutdown.wait();
/// assert_eq!(report.pages, 16);
/// assert!(report.persist_error.is_none());
/// # Ok::<(), PoolError>(())
/// ```
pub struct DevicePagePool {
    shared: Arc<Shared>,
}

impl DevicePagePool {
    /// Open `path` as a pool: device dax (`/dev/daxX.Y`), or a regular file
    /// (fsdax via `MAP_SYNC`; the `msync` file backend if that is refused
    /// and [`PoolOptions::allow_file_fallback`] is set, or with
    /// [`PoolOptions::map_private`]).
    ///
    /// Every bad input is a typed [`PoolError`] naming the path and the
    /// numbers, checked before anything is mapped: a missing path,
    /// permission denied, a directory, block device or non-dax character
    /// device, sizes or offsets not aligned for the device, a pool larger
    /// than the device or file, a zero size, a bad page size, `MAP_PRIVATE`
    /// on device dax, fsdax refused.
    ///
    /// ```
    /// # #[cfg(target_os = "linux")] {
    /// use percpu_ref::{DevicePagePool, PoolError, PoolOptions};
    ///
    /// let e = DevicePagePool::open("/dev/null", &PoolOptions::new()).unwrap_err();
    /// assert!(matches!(e, PoolError::NotDax { .. }), "{e}");
    /// let e = DevicePagePool::open("/", &PoolOptions::new()).unwrap_err();
    /// assert!(matches!(e, PoolError::UnsupportedFileType { file_type: "directory", .. }));
    /// # }
    /// ```
    pub fn open(path: impl AsRef<Path>, options: &PoolOptions) -> Result<Self, PoolError> {
        let (region, plan) = backend::open(path.as_ref(), options)?;
        Ok(Self::from_region(region, plan, options.page_size))
    }

    /// An anonymous pool of `size` bytes (a `memfd`; zeroed heap memory on
    /// platforms without one) with 4 KiB pages: works on every machine,
    /// nothing to persist. `size` must be a non-zero multiple of 4096.
    ///
    /// ```
    /// use percpu_ref::{Backend, DevicePagePool};
    /// let pool = DevicePagePool::anonymous(1 << 20).unwrap();
    /// assert_eq!((pool.page_count(), pool.backend()), (256, Backend::Anonymous));
    /// ```
    pub fn anonymous(size: usize) -> Result<Self, PoolError> {
        Self::anonymous_with(size, &PoolOptions::new())
    }

    /// [`anonymous`](Self::anonymous) with options (only the page size
    /// matters: `size` replaces [`PoolOptions::size`], the offset is 0).
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolOptions};
    /// let pool = DevicePagePool::anonymous_with(4 << 20, &PoolOptions::new().page_size(2 << 20)).unwrap();
    /// assert_eq!(pool.page_count(), 2);
    /// ```
    pub fn anonymous_with(size: usize, options: &PoolOptions) -> Result<Self, PoolError> {
        let (region, plan) = backend::anonymous(size, options)?;
        Ok(Self::from_region(region, plan, options.page_size))
    }

    fn from_region(region: Region, plan: Plan, page_size: usize) -> Self {
        let start = region.base().as_ptr() as usize;
        let end = start + region.len();
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            // The hooks find their `Shared` through this address.
            let addr = weak.as_ptr().expose_provenance();
            let pages = (0..plan.pages)
                .map(|i| PageRef::new(PoolHook::new(addr, i as u32)))
                .collect();
            Shared {
                pgmap: PercpuRef::new(
                    region,
                    PoolRelease {
                        done: Completion::new(),
                        report: Mutex::new(None),
                        pages: plan.pages,
                        shards: (0..cpu::possible())
                            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                            .collect(),
                    },
                ),
                pages,
                free: FreeLists::new(plan.pages),
                page_size,
                page_shift: page_size.trailing_zeros(),
            }
        });
        for slot in shared.pgmap.policy().shards.iter() {
            let shard = Arc::new(CachePadded::new(Shard {
                _pool: Arc::clone(&shared),
            }));
            // Release: pairs with the Acquire loads in `shard_get` (the
            // handle's hand-off to other threads orders it anyway).
            slot.store(Arc::into_raw(shard).cast_mut(), Release);
        }
        registry::register(start, end, Arc::clone(&shared));
        DevicePagePool { shared }
    }

    /// Allocate a free page: its count goes 0→1 and it takes one reference
    /// on the pool (refused once shutdown started). The contents are
    /// whatever the memory holds (zero for a fresh anonymous pool; the
    /// previous data of a device or file).
    ///
    /// Fast path: a per-CPU free-page cache, one CAS on the page, one
    /// per-CPU add on the pool's `PercpuRef`.
    ///
    /// # Errors
    ///
    /// [`PoolError::ShuttingDown`] once [`shutdown`](Self::shutdown) was
    /// called, [`PoolError::Exhausted`] if every page is allocated.
    pub fn alloc(&self) -> Result<DevicePage, PoolError> {
        let s = &*self.shared;
        if s.pgmap.is_dying() {
            return Err(s.shutting_down());
        }
        let Some(i) = s.free.pop() else {
            return Err(PoolError::Exhausted {
                path: s.path(),
                pages: s.pages.len(),
            });
        };
        let page = &s.pages[i as usize];
        let k = s.shard_index();
        // Relaxed: the page is free and ours (popped); the Release of
        // `first_ref`'s CAS publishes it to lookups, whose
        // `get_unless_zero` Acquires the count.
        page.hook().shard.store(k, Relaxed);
        match page.first_ref() {
            Ok(()) => {
                // SAFETY: the page's new pool reference keeps the shards.
                let shard = unsafe { s.shard_get(k) };
                // SAFETY: page `i` is allocated, its count is ours and the
                // shard count just taken is its allocation's.
                Ok(unsafe { DevicePage::new(Arc::as_ptr(&self.shared), shard, i) })
            }
            Err(FirstRefError::Refused) => {
                s.free.push(i);
                Err(s.shutting_down())
            }
            Err(e) => {
                // A page on the free list with a count: an internal bug.
                // Keep the page out of circulation rather than share it.
                debug_assert!(false, "free page {i}: {e}");
                Err(PoolError::Exhausted {
                    path: s.path(),
                    pages: s.pages.len(),
                })
            }
        }
    }

    /// The page containing `addr`, in whichever live pool of this process
    /// maps it — a new reference to an allocated page, like the kernel's
    /// `get_dev_pagemap` (a lock-free registry read + `tryget_live`) and
    /// `get_page_unless_zero`.
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolError};
    /// let pool = DevicePagePool::anonymous(8 * 4096).unwrap();
    /// let page = pool.alloc().unwrap();
    /// let found = DevicePagePool::lookup(page.as_ptr().wrapping_add(100)).unwrap();
    /// assert_eq!(found.index(), page.index());
    /// assert_eq!(found.ref_count(), 2);
    /// drop((page, found));
    /// let freed = pool.alloc().unwrap().as_ptr(); // (dropped at once)
    /// assert!(matches!(DevicePagePool::lookup(freed), Err(PoolError::PageNotAllocated { .. })));
    /// ```
    ///
    /// # Errors
    ///
    /// [`PoolError::NotMapped`] if no live pool maps `addr` (including a
    /// pool whose shutdown completed), [`PoolError::ShuttingDown`] while
    /// its pool is shutting down, [`PoolError::PageNotAllocated`] if the
    /// page is free, [`PoolError::PageBusy`] while its only holder has it
    /// open for writing ([`DevicePage::as_mut_slice`]).
    pub fn lookup(addr: *const u8) -> Result<DevicePage, PoolError> {
        let a = addr as usize;
        registry::with_pool(a, |shared, start| {
            // The registry snapshot keeps `shared` alive for this closure.
            let Some(live) = shared.pgmap.tryget_live() else {
                return Err(shared.shutting_down());
            };
            let index = (a - start) >> shared.page_shift;
            let page_ref = &shared.pages[index];
            if !page_ref.get_unless_zero() {
                return Err(PoolError::PageNotAllocated { addr: a, index });
            }
            // Relaxed: published by `first_ref`, which our Acquire in
            // `get_unless_zero` synchronized with.
            let k = page_ref.hook().shard.load(Relaxed);
            // Acquire: pairs with the Release store in `from_region`; the
            // page's pool reference keeps the shard (no release yet).
            let shard = shared.pgmap.policy().shards[k as usize].load(Acquire);
            let Some(shard) = NonNull::new(shard) else {
                debug_assert!(false, "an allocated page outlived its shards");
                return Err(shared.shutting_down());
            };
            // SAFETY: page `index` is allocated and the reference just
            // taken is ours; its allocation holds the count on `shard`.
            let page = unsafe { DevicePage::new(Arc::as_ptr(shared), shard, index as u32) };
            drop(live);
            // Acquire: pairs with the Release of `unfreeze` in
            // `as_mut_slice` (read through `get_unless_zero`'s Acquire, so
            // we see the flag it published) and of `share` (so a cleared
            // flag means the writer's stores are visible to us).
            if shared.pages[index].hook().exclusive.load(Acquire) != 0 {
                return Err(PoolError::PageBusy { index });
            }
            Ok(page)
        })
        .unwrap_or(Err(PoolError::NotMapped { addr: a }))
    }

    /// Start the shutdown (kill and confirm the pool's `PercpuRef`, drop
    /// its own reference) and return a handle to wait for the rest: the
    /// last held page to drop, then persist and unmap.
    ///
    /// When this returns, every `alloc` and `lookup` fails with
    /// [`PoolError::ShuttingDown`]. Pages already held stay valid. Calling
    /// it again (or from several threads) returns handles to the same
    /// shutdown.
    pub fn shutdown(&self) -> ShutdownHandle {
        self.shared.start_shutdown();
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Has [`shutdown`](Self::shutdown) been called?
    pub fn is_shutting_down(&self) -> bool {
        self.shared.pgmap.is_dying()
    }

    /// Persist the whole pool ([`persist_method`](Self::persist_method)).
    ///
    /// # Errors
    ///
    /// [`PoolError::Persist`] if writing back failed,
    /// [`PoolError::ShuttingDown`] if the pool was already unmapped.
    pub fn persist(&self) -> Result<(), PoolError> {
        self.persist_range(0..self.len())
    }

    /// Persist `range` (byte offsets into the pool).
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if `range` is not inside the pool, else as
    /// [`persist`](Self::persist).
    pub fn persist_range(&self, range: Range<usize>) -> Result<(), PoolError> {
        let s = &*self.shared;
        check_range(&range, s.region().len())?;
        // `tryget`, not `_live`: a pool that is shutting down is still
        // mapped until its release.
        let Some(_mapped) = s.pgmap.tryget() else {
            return Err(s.shutting_down());
        };
        // SAFETY: the reference keeps the release (and unmap) away; the
        // range was checked.
        unsafe { s.region().persist(range.start, range.end - range.start) }
    }

    /// A snapshot of the page counts.
    pub fn stats(&self) -> PoolStats {
        let s = &*self.shared;
        PoolStats {
            pages: s.pages.len(),
            free: s.free.count(),
            allocated: s.pages.iter().filter(|p| p.count() > 0).count(),
            page_size: s.page_size,
        }
    }

    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.shared.page_size
    }

    /// Number of pages.
    pub fn page_count(&self) -> usize {
        self.shared.pages.len()
    }

    /// Bytes in the pool (`page_size * page_count`).
    pub fn len(&self) -> usize {
        self.shared.region().len()
    }

    /// Always `false`: a pool has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the mapping (page 0). Only an address: dereference pages
    /// through [`DevicePage`]s.
    pub fn as_ptr(&self) -> *const u8 {
        self.shared.region().base().as_ptr()
    }

    /// Where the memory comes from.
    pub fn backend(&self) -> Backend {
        self.shared.region().backend()
    }

    /// How `persist` writes back.
    pub fn persist_method(&self) -> PersistMethod {
        self.shared.region().method()
    }

    /// The path opened (`anonymous` for anonymous pools).
    pub fn path(&self) -> &Path {
        self.shared.region().path()
    }
}

impl Drop for DevicePagePool {
    /// Starts the shutdown (see [`shutdown`](Self::shutdown)) without
    /// waiting: held pages keep the memory mapped until the last one drops.
    fn drop(&mut self) {
        self.shared.start_shutdown();
    }
}

impl fmt::Debug for DevicePagePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePagePool")
            .field("path", &self.path())
            .field("backend", &self.backend())
            .field("page_size", &self.page_size())
            .field("pages", &self.page_count())
            .field("shutting_down", &self.is_shutting_down())
            .finish()
    }
}

fn check_range(range: &Range<usize>, len: usize) -> Result<(), PoolError> {
    if range.start > range.end || range.end > len {
        return Err(PoolError::OutOfRange {
            start: range.start,
            end: range.end,
            len,
        });
    }
    Ok(())
}

/// Page counts of a pool, from [`DevicePagePool::stats`]. A snapshot:
/// while other threads allocate and free, `free + allocated` may differ
/// from `pages` by the pages in flight; when nothing runs it is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Pages in the pool.
    pub pages: usize,
    /// Pages on the free lists (per-CPU caches and the shared list).
    pub free: usize,
    /// Pages with a non-zero reference count.
    pub allocated: usize,
    /// Bytes per page.
    pub page_size: usize,
}

// ---------------------------------------------------------------- pages

/// A counted reference to one allocated page of a [`DevicePagePool`].
///
/// `Clone` takes another reference (one atomic add on the page's count,
/// nothing on the pool); `Drop` puts it, and the last put returns the page
/// to the pool (and gives back the pool reference the allocation took).
/// While any `DevicePage` of a pool exists its memory stays mapped, even
/// after [`shutdown`](DevicePagePool::shutdown) or the pool handle's drop.
///
/// Reading: [`as_slice`](Self::as_slice). Writing: through
/// [`as_mut_slice`](Self::as_mut_slice) when this is the page's only
/// reference, or through the raw pointer of
/// [`as_mut_ptr`](Self::as_mut_ptr) under the rules written there.
///
/// Memory shared with other processes (a file or device mapped
/// `MAP_SHARED`) can be changed behind Rust's back; the slices here assume
/// this process's pool is the only writer.
pub struct DevicePage {
    /// The pool, kept alive by `shard`.
    shared: NonNull<Shared>,
    /// The shard the page's allocation holds one strong count on.
    shard: NonNull<ShardArc>,
    page: NonNull<PageRef<PoolHook>>,
    data: NonNull<u8>,
    index: u32,
}

// SAFETY: a DevicePage is a counted reference (atomics only) plus shared
// access to the page's bytes: `&[u8]` reads from any thread are fine, and
// mutation needs `&mut self` on the only reference (`as_mut_slice`) or the
// caller's own synchronization (`unsafe` raw API). `Shared` is Send + Sync.
unsafe impl Send for DevicePage {}
// SAFETY: see Send; every `&self` method is thread-safe.
unsafe impl Sync for DevicePage {}

impl DevicePage {
    /// # Safety
    ///
    /// `shared` points to a live `Shared` whose page `index` is allocated,
    /// the caller owns one reference on it (moved into the result), and
    /// the page's allocation holds one strong count on `shard` (a shard of
    /// that pool).
    unsafe fn new(shared: *const Shared, shard: NonNull<ShardArc>, index: u32) -> Self {
        // SAFETY: live (caller).
        let s = unsafe { &*shared };
        let page = NonNull::from(&s.pages[index as usize]);
        let offset = (index as usize) << s.page_shift;
        // SAFETY: `offset + page_size <= region.len()` (index < pages), so
        // the result is inside the mapping.
        let data = unsafe { s.region().base().add(offset) };
        DevicePage {
            shared: NonNull::from(s),
            shard,
            page,
            data,
            index,
        }
    }

    #[inline]
    fn page_ref(&self) -> &PageRef<PoolHook> {
        // SAFETY: we hold a reference on the page, so it is allocated and
        // its allocation keeps `Shared` (which holds the page) alive.
        unsafe { self.page.as_ref() }
    }

    #[inline]
    fn shared(&self) -> &Shared {
        // SAFETY: as in `page_ref`.
        unsafe { self.shared.as_ref() }
    }

    /// End a previous [`as_mut_slice`](Self::as_mut_slice)'s exclusivity:
    /// called by every `&self` access to the bytes.
    #[inline]
    fn share(&self) {
        let flag = &self.page_ref().hook().exclusive;
        // Relaxed: only this handle sets the flag (through `&mut self`),
        // so a value it cannot see yet cannot be one it must clear.
        if flag.load(Relaxed) != 0 {
            // Release: pairs with the Acquire in `lookup`, so a lookup that
            // sees the flag cleared also sees our writes.
            flag.store(0, Release);
        }
    }

    /// Page index in its pool.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Bytes in the page (the pool's page size).
    pub fn size(&self) -> usize {
        self.shared().page_size
    }

    /// References to this page right now (a snapshot).
    pub fn ref_count(&self) -> u32 {
        self.page_ref().count()
    }

    /// Is this the page's only reference (a snapshot, see
    /// [`as_mut_slice`](Self::as_mut_slice) for an exclusive one)?
    pub fn is_unique(&self) -> bool {
        self.ref_count() == 1
    }

    /// The page's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        self.share();
        // SAFETY: the page is allocated and mapped while `self` lives (the
        // pool cannot unmap before the page is freed); nobody mutates it
        // without `&mut self` on the only reference, which `&self` excludes,
        // or the caller's own synchronization (`as_mut_ptr` rules).
        unsafe { std::slice::from_raw_parts(self.data.as_ptr(), self.size()) }
    }

    /// The page's bytes for writing, if this is its only reference (`None`
    /// otherwise). While the returned slice lives nothing else can reach
    /// the page: there is no other `DevicePage` of it, and
    /// [`DevicePagePool::lookup`] backs off with
    /// [`PoolError::PageBusy`] until this handle is next used through
    /// `&self` (read, cloned, persisted) or dropped.
    ///
    /// ```
    /// use percpu_ref::DevicePagePool;
    /// let pool = DevicePagePool::anonymous(4 * 4096).unwrap();
    /// let mut page = pool.alloc().unwrap();
    /// page.as_mut_slice().unwrap()[0] = 42;
    /// let other = page.clone();
    /// assert!(page.as_mut_slice().is_none()); // shared now
    /// drop(other);
    /// assert_eq!(page.as_mut_slice().unwrap()[0], 42);
    /// ```
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        let page = self.page_ref();
        let flag = &page.hook().exclusive;
        // Relaxed: our own flag (see `share`).
        if flag.load(Relaxed) == 0 {
            // freeze(1) succeeds only if ours is the only reference, and
            // while frozen `get_unless_zero` (lookup) fails...
            if !page.freeze(1) {
                return None;
            }
            // ...so every lookup that gets in after the unfreeze sees the
            // flag. Relaxed: the unfreeze's Release publishes it.
            flag.store(1, Relaxed);
            page.unfreeze(1);
        }
        // SAFETY: as in `as_slice`, and exclusive: no other DevicePage of
        // this page exists (count 1 at the freeze; clones need `&self`,
        // excluded by `&mut self`), and lookups back off while the flag is
        // set (it is cleared only through `&self`).
        Some(unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), self.size()) })
    }

    /// Address of the page's first byte (valid while `self` lives).
    pub fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    /// Address of the page's first byte, for writing through shared
    /// references (e.g. several threads filling disjoint parts of a page,
    /// or a lock kept next to the page).
    ///
    /// Getting the pointer is safe; writing through it is `unsafe`, and
    /// sound only if, for every byte written:
    ///
    /// * no other access (read or write) to that byte happens concurrently
    ///   through any other pointer, slice or [`DevicePage`] of the page —
    ///   including ones obtained later by [`DevicePagePool::lookup`] —
    ///   unless it is ordered with the write by your own synchronization;
    /// * no `&[u8]` from [`as_slice`](Self::as_slice) (or `&mut` from
    ///   [`as_mut_slice`](Self::as_mut_slice)) covering that byte is alive;
    /// * some `DevicePage` of this page is alive for the whole access (the
    ///   memory may be unmapped after the last one drops).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.share();
        self.data.as_ptr()
    }

    /// The page's bytes as a mutable slice through a shared reference.
    ///
    /// # Safety
    ///
    /// The rules of [`as_mut_ptr`](Self::as_mut_ptr) hold for the whole
    /// page for as long as the slice lives: nothing else reads or writes
    /// the page meanwhile (no other slice of it from any handle, no lookup
    /// that reads it).
    #[allow(clippy::mut_from_ref)] // that is the point; see # Safety
    pub unsafe fn as_mut_slice_unchecked(&self) -> &mut [u8] {
        let p = self.as_mut_ptr();
        // SAFETY: mapped while `self` lives; exclusive by the caller's
        // contract.
        unsafe { std::slice::from_raw_parts_mut(p, self.size()) }
    }

    /// Make the whole page durable (see [`DevicePagePool::persist_method`]).
    ///
    /// # Errors
    ///
    /// [`PoolError::Persist`] if writing back failed.
    pub fn persist(&self) -> Result<(), PoolError> {
        self.persist_range(0..self.size())
    }

    /// Make `range` (byte offsets into the page) durable.
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolError};
    /// let pool = DevicePagePool::anonymous(4096).unwrap();
    /// let page = pool.alloc().unwrap();
    /// page.persist_range(0..64).unwrap();
    /// assert!(matches!(page.persist_range(0..4097), Err(PoolError::OutOfRange { .. })));
    /// ```
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if `range` is not inside the page,
    /// [`PoolError::Persist`] if writing back failed.
    pub fn persist_range(&self, range: Range<usize>) -> Result<(), PoolError> {
        self.share();
        check_range(&range, self.size())?;
        let offset = ((self.index as usize) << self.shared().page_shift) + range.start;
        // SAFETY: our page reference keeps the region mapped; the range is
        // inside the page, hence inside the region.
        unsafe {
            self.shared()
                .region()
                .persist(offset, range.end - range.start)
        }
    }
}

impl Clone for DevicePage {
    /// Another reference to the same page (one atomic add).
    #[inline]
    fn clone(&self) -> Self {
        self.share();
        self.page_ref().inc();
        DevicePage {
            shared: self.shared,
            shard: self.shard,
            page: self.page,
            data: self.data,
            index: self.index,
        }
    }
}

impl Drop for DevicePage {
    #[inline]
    fn drop(&mut self) {
        // The page hook runs inside on 1→0 (free list, then pool put; that
        // put may persist and unmap the pool).
        // SAFETY: as in `page_ref`; the reference ends with the call.
        let last = unsafe { self.page.as_ref() }.dec_and_test();
        if last {
            // SAFETY: we took the page 1→0, so its allocation's count on the
            // shard is ours to give back (an `Arc::into_raw` pointer, see
            // `shard_get`); nothing of `Shared` is used after this.
            unsafe { drop(Arc::from_raw(self.shard.as_ptr().cast_const())) }
        }
    }
}

impl AsRef<[u8]> for DevicePage {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for DevicePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePage")
            .field("index", &self.index)
            .field("addr", &self.data)
            .field("refs", &self.ref_count())
            .finish()
    }
}

// ---------------------------------------------------------------- shutdown

/// What a completed shutdown did, from [`ShutdownHandle::wait`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The pool's path (`anonymous` for anonymous pools).
    pub path: PathBuf,
    /// Where its memory came from.
    pub backend: Backend,
    /// Pages in the pool (all free now).
    pub pages: usize,
    /// Bytes persisted and unmapped.
    pub bytes: usize,
    /// How they were persisted.
    pub persist_method: PersistMethod,
    /// The final persist's error, if it failed (the memory was unmapped
    /// regardless).
    pub persist_error: Option<Arc<PoolError>>,
}

impl ShutdownReport {
    fn new(region: &Region, pages: usize) -> Self {
        ShutdownReport {
            path: region.path().to_path_buf(),
            backend: region.backend(),
            pages,
            bytes: region.len(),
            persist_method: region.method(),
            persist_error: None,
        }
    }
}

/// A started shutdown, from [`DevicePagePool::shutdown`]: wait for the last
/// held page to drop (then the pool is persisted and unmapped) blocking,
/// with a timeout, or as a future. Holds the pool's metadata (not its
/// mapping) alive.
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    fn done(&self) -> &Completion {
        &self.shared.pgmap.policy().done
    }

    /// Has the last page dropped, and the pool been persisted and unmapped?
    pub fn is_complete(&self) -> bool {
        self.done().is_complete()
    }

    /// Block until complete.
    pub fn wait(&self) -> ShutdownReport {
        self.done().wait();
        self.shared.report()
    }

    /// Block until complete or `timeout` passed; on timeout, which pages
    /// are still held.
    ///
    /// # Errors
    ///
    /// [`StillHeld`] with the number and indices of the pages still
    /// referenced when the time ran out.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ShutdownReport, StillHeld> {
        if self.done().wait_timeout(timeout) {
            return Ok(self.shared.report());
        }
        let indices = self.shared.held_indices();
        if indices.is_empty() && self.done().wait_timeout(Duration::from_millis(10)) {
            // The last page dropped between the timeout and the scan.
            return Ok(self.shared.report());
        }
        Err(StillHeld {
            path: self.shared.path(),
            count: indices.len(),
            indices,
        })
    }

    /// Page indices still referenced (a snapshot).
    pub fn held(&self) -> Vec<usize> {
        self.shared.held_indices()
    }

    /// A future that resolves to the report when complete; works with any
    /// executor, needs no runtime.
    pub fn wait_async(&self) -> ShutdownFuture {
        ShutdownFuture {
            done: self.done().wait_async(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("path", &self.shared.region().path())
            .field("complete", &self.is_complete())
            .finish()
    }
}

/// Future returned by [`ShutdownHandle::wait_async`].
#[must_use = "futures do nothing unless polled"]
pub struct ShutdownFuture {
    done: CompletionFuture,
    shared: Arc<Shared>,
}

impl Future for ShutdownFuture {
    type Output = ShutdownReport;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ShutdownReport> {
        match Pin::new(&mut self.done).poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.shared.report()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for ShutdownFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_entries_are_atomics_without_padding() {
        // Six `AtomicU32`s: the count and the hook's five words. No plain
        // field and no padding byte, which the module docs rely on.
        assert_eq!(std::mem::size_of::<PageRef<PoolHook>>(), 6 * 4);
        assert_eq!(std::mem::align_of::<PageRef<PoolHook>>(), 4);
    }

    #[test]
    fn the_hook_finds_its_pool() {
        let pool = DevicePagePool::anonymous(4 * 4096).unwrap();
        for (i, p) in pool.shared.pages.iter().enumerate() {
            assert!(std::ptr::eq(p.hook().shared(), &*pool.shared));
            assert_eq!(p.hook().index.load(Relaxed) as usize, i);
        }
    }
}
