//! `DevicePagePool`: opening, allocation, lookup, shutdown, persistence.

use super::backend::{self, Plan};
use super::error::PoolError;
use super::free::FreeLists;
use super::options::{Backend, PersistMethod, PoolOptions};
use super::page::DevicePage;
use super::region::Region;
use super::registry;
use super::seqlock;
use super::shared::{PageSlot, PoolHook, PoolRelease, Shard, Shared};
use super::shutdown::ShutdownHandle;
use crate::page::{FirstRefError, PageRef};
use crate::percpu::policy::Completion;
use crate::percpu::{Holders, KillBatch, KillError, Killable, PercpuRef};
use crate::sync::{AtomicPtr, AtomicU64, Mutex, Ordering::*};
use crate::sys::cpu;
use crossbeam_utils::CachePadded;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

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
/// * [`read`](Self::read) reads a page without taking a reference, for hot
///   pages many threads read at once (pools opened with
///   [`PoolOptions::optimistic_reads`]).
///
/// Backends ([`Backend`]): [`open`](Self::open) detects device dax (a
/// character device whose sysfs subsystem is `dax`) or a regular file
/// (fsdax with `MAP_SYNC`; the `msync` file backend only if
/// [`PoolOptions::allow_file_fallback`] says so), and locks it for the
/// pool's life (unless [`PoolOptions::unlocked`]); [`anonymous`](Self::anonymous)
/// works everywhere.
///
/// Memory cost, besides the mapping: 68 bytes per page — a 64-byte
/// metadata slot (each page's on its own cache line, so that pages in use
/// on different CPUs never slow each other down) and 4 bytes on the free
/// lists: 17 MiB per GiB of device with 4 KiB pages (1.66%; the slots
/// alone 16 MiB, 1.56%), 34 KiB per GiB with 2 MiB pages.
///
/// # `fork()`
///
/// A child created by `fork()` gets a copy of the pool's handles and
/// metadata but never the parent's pages, so the two processes cannot
/// hand out the same page twice:
///
/// | backend | the child's copy of the memory |
/// |---|---|
/// | anonymous | zero-filled and private to the child (`MADV_WIPEONFORK`; on kernels before 4.14, not mapped, as below) |
/// | device dax, fsdax, file, private file | not mapped in the child (`MADV_DONTFORK`) |
///
/// In the child, `alloc`, `lookup`, `read` and `persist` fail with
/// [`PoolError::Forked`]; the file lock stays the parent's. Pages the child
/// inherited must not be used: they read as zeros (anonymous) or fault with
/// `SIGSEGV` (file and device backends, not mapped there). Dropping them
/// and the pool in the child is fine: its shutdown neither persists nor
/// unmaps memory it does not have. A child that `exec`s is unaffected.
/// Forks are seen through a `pthread_atfork` handler; a raw `clone`
/// system call that skips the handlers is not.
///
/// # Limitations
///
/// * Truncating the file under a live pool (by this or another process)
///   makes every access to a page past the new end raise `SIGBUS`, as for
///   any shared file mapping: the pool checks sizes when it maps, but
///   cannot stop a later `truncate`. The lock (see [`PoolOptions::unlocked`]) is
///   advisory and does not prevent it.
/// * Memory shared with other processes (a file or device mapped
///   `MAP_SHARED` elsewhere) can change behind this process's back; the
///   slices handed out assume the pool is the only writer.
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
#[doc(alias = "dev_pagemap")]
pub struct DevicePagePool {
    pub(super) shared: Arc<Shared>,
}

impl DevicePagePool {
    /// Open `path` as a pool: device dax (`/dev/daxX.Y`), or a regular file
    /// (fsdax via `MAP_SYNC`; the `msync` file backend if that is refused
    /// and [`PoolOptions::allow_file_fallback`] is set, or with
    /// [`PoolOptions::map_private`]).
    ///
    /// Every bad input is a typed [`PoolError`] naming the path and what
    /// is wrong, checked before anything is mapped: a missing or unusable
    /// path (empty, a NUL byte, a symbolic link loop, a non-directory on
    /// the way), permission denied, a directory, block device or non-dax
    /// character device, sizes or offsets not aligned for the device, a
    /// pool larger than the device or file, an offset past its end, a file
    /// smaller than one page, a zero size, a bad page size, `MAP_PRIVATE`
    /// on device dax, fsdax refused, and a file or device another pool
    /// has open ([`PoolError::AlreadyOpen`], see [`PoolOptions::unlocked`]).
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
    #[doc(alias("memremap_pages", "devm_memremap_pages"))]
    pub fn open(path: impl AsRef<Path>, options: &PoolOptions) -> Result<Self, PoolError> {
        let (region, plan) = backend::open(path.as_ref(), options)?;
        Ok(Self::from_region(region, plan, options))
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
    #[doc(alias("memremap_pages", "devm_memremap_pages"))]
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
    #[doc(alias("memremap_pages", "devm_memremap_pages"))]
    pub fn anonymous_with(size: usize, options: &PoolOptions) -> Result<Self, PoolError> {
        let (region, plan) = backend::anonymous(size, options)?;
        Ok(Self::from_region(region, plan, options))
    }

    fn from_region(region: Region, plan: Plan, options: &PoolOptions) -> Self {
        let (page_size, optimistic) = (options.page_size, options.optimistic_reads);
        let start = region.base().as_ptr() as usize;
        let end = start + region.len();
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            // The hooks find their `Shared` through this address.
            let addr = weak.as_ptr().expose_provenance();
            let pages = (0..plan.pages)
                .map(|i| PageSlot {
                    page: PageRef::new(PoolHook::new(addr, i as u32)),
                    // Odd: free. (Only pools with optimistic reads keep the
                    // version of free pages odd; in the others only
                    // writers change it, starting from even.)
                    seq: AtomicU64::new(u64::from(optimistic)),
                })
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
                optimistic,
                #[cfg(not(percpu_ref_untracked))]
                holders: crate::percpu::Tracker::new(),
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
    /// called, [`PoolError::Exhausted`] if every page is allocated,
    /// [`PoolError::Forked`] in a `fork()` child.
    #[doc(alias = "zone_device_page_init")]
    #[inline]
    pub fn alloc(&self) -> Result<DevicePage, PoolError> {
        self.alloc_labelled(None)
    }

    /// [`alloc`](Self::alloc), recording `label` as the page holder's label
    /// (feature `track`; see [`holders`](Self::holders)): a shutdown that
    /// waits for this page names it. Without the feature the label is
    /// ignored.
    ///
    /// ```
    /// use percpu_ref::DevicePagePool;
    /// let pool = DevicePagePool::anonymous(4 * 4096)?;
    /// let page = pool.alloc_tagged("compaction")?;
    /// if let Some(h) = pool.holders().iter().next() {
    ///     // with `track`
    ///     assert_eq!((h.page(), h.label()), (Some(page.index()), Some("compaction")));
    /// }
    /// # Ok::<(), percpu_ref::PoolError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`alloc`](Self::alloc).
    pub fn alloc_tagged(&self, label: &'static str) -> Result<DevicePage, PoolError> {
        self.alloc_labelled(Some(label))
    }

    #[inline]
    fn alloc_labelled(&self, label: Option<&'static str>) -> Result<DevicePage, PoolError> {
        let s = &*self.shared;
        if s.pgmap.is_dying() {
            return Err(s.shutting_down());
        }
        s.check_fork()?;
        let Some(i) = s.free.pop() else {
            return Err(PoolError::Exhausted {
                path: s.path(),
                pages: s.pages.len(),
            });
        };
        let page = s.page(i as usize);
        let k = s.shard_index();
        // Relaxed: the page is free and ours (popped); the Release of
        // `first_ref`'s CAS publishes it to lookups, whose
        // `get_unless_zero` Acquires the count.
        page.hook().shard.store(k, Relaxed);
        match page.first_ref() {
            Ok(()) => {
                if s.optimistic {
                    seqlock::mark_allocated(&s.pages[i as usize].seq);
                }
                // SAFETY: the page's new pool reference keeps the shards.
                let shard = unsafe { s.shard_get(k) };
                // SAFETY: page `i` is allocated, its count is ours and the
                // shard count just taken is its allocation's.
                Ok(unsafe { DevicePage::new(Arc::as_ptr(&self.shared), shard, i, label) })
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
    /// Each thread remembers the last pool it found this way, and tries it
    /// first (it is checked to be live, so a pool shut down and its
    /// addresses reused never gives a wrong answer); that keeps the pool's
    /// metadata — not its memory, which goes at its release — alive until
    /// the thread finds another pool or exits.
    ///
    /// # Errors
    ///
    /// [`PoolError::NotMapped`] if no live pool maps `addr` (including a
    /// pool whose shutdown completed), [`PoolError::ShuttingDown`] while
    /// its pool is shutting down, [`PoolError::PageNotAllocated`] if the
    /// page is free, [`PoolError::PageBusy`] while its only holder has it
    /// open for writing ([`DevicePage::as_mut_slice`], a
    /// [`PageWriter`](crate::PageWriter)), [`PoolError::Forked`] in a
    /// `fork()` child.
    #[doc(alias = "get_dev_pagemap")]
    #[inline]
    pub fn lookup(addr: *const u8) -> Result<DevicePage, PoolError> {
        Self::lookup_labelled(addr, None)
    }

    /// [`lookup`](Self::lookup), recording `label` as the page holder's
    /// label (feature `track`; see [`holders`](Self::holders)). Without the
    /// feature the label is ignored.
    ///
    /// # Errors
    ///
    /// As [`lookup`](Self::lookup).
    pub fn lookup_tagged(addr: *const u8, label: &'static str) -> Result<DevicePage, PoolError> {
        Self::lookup_labelled(addr, Some(label))
    }

    #[inline]
    fn lookup_labelled(
        addr: *const u8,
        label: Option<&'static str>,
    ) -> Result<DevicePage, PoolError> {
        let a = addr as usize;
        // The pool is pinned (a pool reference) while this closure runs.
        // `with_live_pool` refuses a fork child (`Forked`).
        registry::with_live_pool(a, |shared, start| {
            let index = (a - start) >> shared.page_shift;
            let page_ref = shared.page(index);
            let mut tries = 0;
            while !page_ref.get_unless_zero() {
                // Free, or frozen by its only holder for a moment
                // (`as_mut_slice`, `writer`): then the count reads as zero
                // to `get_unless_zero`, but the page is allocated.
                if page_ref.is_frozen() {
                    return Err(PoolError::PageBusy { index });
                }
                if page_ref.count() == 0 {
                    return Err(PoolError::PageNotAllocated { addr: a, index });
                }
                // Neither: it changed in between (unfrozen, or allocated
                // just now); try again, a few times (at `MAX_COUNT` it
                // never succeeds).
                tries += 1;
                if tries == 4 {
                    return Err(PoolError::PageBusy { index });
                }
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
            let page = unsafe { DevicePage::new(shared, shard, index as u32, label) };
            // Acquire: pairs with the Release of `unfreeze` in
            // `make_exclusive` (read through `get_unless_zero`'s Acquire, so
            // we see the flag it published) and of `share`/`end_write` (so
            // a cleared flag means the writer's stores are visible to us).
            if page_ref.hook().exclusive.load(Acquire) != 0 {
                return Err(PoolError::PageBusy { index });
            }
            Ok(page)
        })?
    }

    /// Start the shutdown (kill and confirm the pool's `PercpuRef`, drop
    /// its own reference) and return a handle to wait for the rest: the
    /// last held page to drop, then persist and unmap.
    ///
    /// When this returns, every `alloc` and `lookup` fails with
    /// [`PoolError::ShuttingDown`]. Pages already held stay valid. Calling
    /// it again (or from several threads) returns handles to the same
    /// shutdown. Shutting down many pools: [`shutdown_all`](Self::shutdown_all)
    /// pays one barrier for all of them.
    #[doc(alias("memunmap_pages", "devm_memunmap_pages"))]
    pub fn shutdown(&self) -> ShutdownHandle {
        self.shared.start_shutdown();
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Start the shutdown of every pool in `pools` with **one** barrier
    /// (`membarrier`) for all of them, instead of one per pool: an engine
    /// unmounting many devices pays ~10 µs, not ~10 µs per device.
    ///
    /// Each pool's shutdown is exactly [`shutdown`](Self::shutdown)'s:
    /// when this returns, every `alloc`, `lookup` and `read` of every one
    /// of them fails with [`PoolError::ShuttingDown`]; pages already held
    /// stay valid; each pool is persisted and unmapped when its own last
    /// page drops (inside this call for a pool with no page held). Returns
    /// one handle per pool, in the order given; a pool whose shutdown had
    /// started already (or that is listed twice) gets a handle to that same
    /// shutdown.
    ///
    /// To mix pools with [`PercpuRef`]s in one barrier, or to learn which
    /// pools were already shutting down, push them into a
    /// [`KillBatch`](crate::KillBatch) instead (a pool is
    /// [`Killable`](crate::Killable)), then take the handles with
    /// `shutdown()`, which no longer waits for anything.
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolError};
    /// use std::time::Duration;
    ///
    /// let devices: Vec<DevicePagePool> = (0..3)
    ///     .map(|_| DevicePagePool::anonymous(8 * 4096))
    ///     .collect::<Result<_, _>>()?;
    /// let held = devices[1].alloc()?; // an I/O still in flight
    ///
    /// let handles = DevicePagePool::shutdown_all(&devices);
    /// for pool in &devices {
    ///     assert!(matches!(pool.alloc(), Err(PoolError::ShuttingDown { .. })));
    /// }
    /// assert!(handles[0].is_complete() && handles[2].is_complete());
    /// let stuck = handles[1].wait_timeout(Duration::from_millis(1)).unwrap_err();
    /// assert_eq!(stuck.indices, [held.index()]);
    /// drop(held);
    /// assert!(handles[1].is_complete());
    /// # Ok::<(), PoolError>(())
    /// ```
    ///
    /// # Panics
    ///
    /// If a pool's release, run here, panics: every pool's shutdown is
    /// started first, then the first panic propagates.
    pub fn shutdown_all<'a>(
        pools: impl IntoIterator<Item = &'a DevicePagePool>,
    ) -> Vec<ShutdownHandle> {
        let pools: Vec<&DevicePagePool> = pools.into_iter().collect();
        let batch: KillBatch<'_> = pools.iter().map(|&p| p as &dyn Killable).collect();
        for r in batch.kill() {
            // `AlreadyDead`: started before (or listed twice), as a second
            // `shutdown()`. A pool's pgmap cannot underflow: its pages put
            // exactly the references their allocation took.
            debug_assert!(
                matches!(r, Ok(()) | Err(KillError::AlreadyDead)),
                "pool pgmap kill: {r:?}"
            );
        }
        pools
            .iter()
            .map(|p| ShutdownHandle {
                shared: Arc::clone(&p.shared),
            })
            .collect()
    }

    /// The pool's `PercpuRef`, for a `KillBatch` (`percpu::batch`).
    pub(crate) fn pgmap(&self) -> &dyn Killable {
        &self.shared.pgmap
    }

    /// Who holds this pool's pages right now (feature `track`): one
    /// [`Holder`](crate::Holder) per [`DevicePage`] — from
    /// [`alloc`](Self::alloc), [`lookup`](Self::lookup) or a clone — with
    /// its page index ([`Holder::page`](crate::Holder::page)), the thread
    /// that made it, its label ([`alloc_tagged`](Self::alloc_tagged),
    /// [`lookup_tagged`](Self::lookup_tagged), a
    /// [`holder_label`](crate::holder_label) scope, or the label of the
    /// page it was cloned from) and, when `RUST_BACKTRACE` or
    /// `RUST_LIB_BACKTRACE` asks for one, where it was made. The same
    /// report comes with [`StillHeld`](crate::StillHeld) when a shutdown
    /// waits too long. Without the feature the report is empty and says
    /// that tracking is off: [`ShutdownHandle::held`] still names the
    /// pages.
    ///
    /// A snapshot, exact for pages held the whole time it is taken.
    ///
    /// # Cost of tracking
    ///
    /// With the feature, every `DevicePage` made and dropped registers and
    /// removes a record in one of the pool's per-CPU shards (a short lock
    /// each, `O(1)`), and an allocation or lookup also records its pool
    /// reference (see [`PercpuRef::holders`]). Under callgrind
    /// (`scripts/zero-cost.sh`, `RUST_LIB_BACKTRACE=0`) a clone and a
    /// lookup of a held page, both dropped, go from 399 to 1,549
    /// instructions, an `alloc` and drop from 554 to 1,520. **With
    /// `RUST_BACKTRACE` set, every page handle captures a backtrace**
    /// (`RUST_LIB_BACKTRACE=0` keeps panic backtraces without that).
    /// Without the feature nothing is recorded, and pages run the same
    /// instructions as a build without the tracking code.
    ///
    /// ```
    /// use percpu_ref::DevicePagePool;
    /// use std::time::Duration;
    ///
    /// let pool = DevicePagePool::anonymous(4 * 4096)?;
    /// let leaked = pool.alloc_tagged("compaction")?;
    /// let shutdown = pool.shutdown();
    /// let stuck = shutdown.wait_timeout(Duration::from_millis(1)).unwrap_err();
    /// eprintln!("{stuck}"); // names page, thread and label with `track`
    /// if pool.holders().is_tracked() {
    ///     assert!(stuck.to_string().contains("label compaction"));
    /// }
    /// # drop(leaked);
    /// # Ok::<(), percpu_ref::PoolError>(())
    /// ```
    pub fn holders(&self) -> Holders {
        self.shared.page_holders()
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
            allocated: s.pages.iter().filter(|p| p.page.count() > 0).count(),
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

pub(super) fn check_range(range: &Range<usize>, len: usize) -> Result<(), PoolError> {
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
