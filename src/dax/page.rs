//! `DevicePage`: a counted reference to one allocated page.

use super::error::PoolError;
use super::pool::check_range;
use super::seqlock;
use super::shared::{PoolHook, ShardArc, Shared};
use crate::page::PageRef;
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
use crate::percpu::{hook, HolderKind, Token};
use crate::sync::{AtomicU64, Ordering::*};
use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;

/// A counted reference to one allocated page of a [`DevicePagePool`](crate::DevicePagePool).
///
/// `Clone` takes another reference (one atomic add on the page's count,
/// nothing on the pool); `Drop` puts it, and the last put returns the page
/// to the pool (and gives back the pool reference the allocation took).
/// While any `DevicePage` of a pool exists its memory stays mapped, even
/// after [`shutdown`](crate::DevicePagePool::shutdown) or the pool handle's drop.
///
/// Reading: [`as_slice`](Self::as_slice). Writing: through
/// [`as_mut_slice`](Self::as_mut_slice) or a [`writer`](Self::writer) when
/// this is the page's only reference (in a pool with
/// [`optimistic_reads`](crate::PoolOptions::optimistic_reads), only
/// through a writer), or through the raw pointer of
/// [`as_mut_ptr`](Self::as_mut_ptr) under the rules written there.
///
/// Memory shared with other processes (a file or device mapped
/// `MAP_SHARED`) can be changed behind Rust's back; the slices here assume
/// this process's pool is the only writer.
#[doc(alias = "ZONE_DEVICE")]
pub struct DevicePage {
    /// The pool, kept alive by `shard`.
    shared: NonNull<Shared>,
    /// The shard the page's allocation holds one strong count on.
    shard: NonNull<ShardArc>,
    page: NonNull<PageRef<PoolHook>>,
    data: NonNull<u8>,
    index: u32,
    /// The holder's record in the pool's page tracker (feature `track`;
    /// zero-sized without it).
    #[cfg(not(percpu_ref_untracked))]
    holder: Token,
    /// The build without the tracking code (`scripts/zero-cost.sh`'s
    /// baseline) keeps a zero-sized field in its place: the mere presence
    /// of one changes LLVM's code around the handle by a few instructions
    /// (in either direction), which is not what the comparison is about.
    #[cfg(percpu_ref_untracked)]
    #[allow(dead_code)]
    holder: (),
}

// SAFETY: a DevicePage is a counted reference (atomics only) plus shared
// access to the page's bytes: `&[u8]` reads from any thread are fine, and
// mutation needs `&mut self` on the only reference (`as_mut_slice`) or the
// caller's own synchronization (`unsafe` raw API). `Shared` is Send + Sync.
unsafe impl Send for DevicePage {}
// SAFETY: see Send; every `&self` method is thread-safe.
unsafe impl Sync for DevicePage {}

impl DevicePage {
    /// A new holder of page `index`, taken by this thread with `label`.
    ///
    /// # Safety
    ///
    /// `shared` points to a live `Shared` whose page `index` is allocated,
    /// the caller owns one reference on it (moved into the result), and
    /// the page's allocation holds one strong count on `shard` (a shard of
    /// that pool).
    #[inline]
    #[allow(unused_variables)] // `label` without the tracking code
    pub(super) unsafe fn new(
        shared: *const Shared,
        shard: NonNull<ShardArc>,
        index: u32,
        label: Option<&'static str>,
    ) -> Self {
        // SAFETY: live (caller).
        let s = unsafe { &*shared };
        let page = NonNull::from(s.page(index as usize));
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
            #[cfg(not(percpu_ref_untracked))]
            holder: s.holders.take_page(index as usize, label),
            #[cfg(percpu_ref_untracked)]
            holder: (),
        }
    }

    #[inline]
    fn page_ref(&self) -> &PageRef<PoolHook> {
        // SAFETY: we hold a reference on the page, so it is allocated and
        // its allocation keeps `Shared` (which holds the page) alive.
        unsafe { self.page.as_ref() }
    }

    #[inline]
    pub(super) fn shared(&self) -> &Shared {
        // SAFETY: as in `page_ref`.
        unsafe { self.shared.as_ref() }
    }

    /// The page's version for optimistic reads.
    #[inline]
    pub(super) fn seq(&self) -> &AtomicU64 {
        &self.shared().pages[self.index as usize].seq
    }

    /// End a previous [`as_mut_slice`](Self::as_mut_slice)'s exclusivity:
    /// called by every `&self` access to the bytes. (Also ends the write
    /// section of a [`PageWriter`](super::PageWriter) that was leaked
    /// instead of dropped.)
    #[inline]
    fn share(&self) {
        let flag = &self.page_ref().hook().exclusive;
        // Relaxed: only this handle sets the flag (through `&mut self`),
        // so a value it cannot see yet cannot be one it must clear.
        if flag.load(Relaxed) != 0 {
            self.end_exclusive();
        }
    }

    #[cold]
    fn end_exclusive(&self) {
        // A leaked writer left the version odd: end its section. (Relaxed:
        // the holder of the only reference owns the version, seqlock docs.)
        if self.seq().load(Relaxed) & 1 == 1 {
            seqlock::write_end(self.seq());
        }
        // Release: pairs with the Acquire in `lookup`, so a lookup that
        // sees the flag cleared also sees our writes.
        self.page_ref().hook().exclusive.store(0, Release);
    }

    /// End a [`PageWriter`](super::PageWriter)'s section.
    pub(super) fn end_write(&mut self) {
        seqlock::write_end(self.seq());
        // Release: as in `end_exclusive`.
        self.page_ref().hook().exclusive.store(0, Release);
    }

    /// Make this handle the page's exclusive one, if it is the only
    /// reference: afterwards no other `DevicePage` of the page exists and
    /// lookups back off until the flag is cleared (through `&self`, or the
    /// end of a writer).
    pub(super) fn make_exclusive(&mut self) -> bool {
        let page = self.page_ref();
        let flag = &page.hook().exclusive;
        // Relaxed: our own flag (see `share`).
        if flag.load(Relaxed) == 0 {
            // freeze(1) succeeds only if ours is the only reference, and
            // while frozen `get_unless_zero` (lookup) fails...
            if !page.freeze(1) {
                return false;
            }
            // ...so every lookup that gets in after the unfreeze sees the
            // flag. Relaxed: the unfreeze's Release publishes it.
            flag.store(1, Relaxed);
            page.unfreeze(1);
        }
        true
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
    #[doc(alias = "page_ref_count")]
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
    /// otherwise, and always `None` in a pool with
    /// [`optimistic_reads`](crate::PoolOptions::optimistic_reads), whose
    /// readers may load any page at any time: write those through a
    /// [`writer`](Self::writer)). While the returned slice lives nothing else can reach
    /// the page: there is no other `DevicePage` of it, and
    /// [`DevicePagePool::lookup`](crate::DevicePagePool::lookup) backs off with
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
        if self.shared().optimistic || !self.make_exclusive() {
            return None;
        }
        // SAFETY: as in `as_slice`, and exclusive: no other DevicePage of
        // this page exists (count 1 at the freeze; clones need `&self`,
        // excluded by `&mut self`), lookups back off while the flag is set
        // (it is cleared only through `&self`), and the pool allows no
        // optimistic reads (checked above).
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
    ///   including ones obtained later by [`DevicePagePool::lookup`](crate::DevicePagePool::lookup) —
    ///   unless it is ordered with the write by your own synchronization;
    /// * no `&[u8]` from [`as_slice`](Self::as_slice) (or `&mut` from
    ///   [`as_mut_slice`](Self::as_mut_slice)) covering that byte is alive;
    /// * some `DevicePage` of this page is alive for the whole access (the
    ///   memory may be unmapped after the last one drops);
    /// * in a pool with
    ///   [`optimistic_reads`](crate::PoolOptions::optimistic_reads), any
    ///   thread may read any page at any time
    ///   ([`DevicePagePool::read`](crate::DevicePagePool::read), with
    ///   atomic loads of whole machine words): a plain write races with
    ///   those reads, so write there only through a
    ///   [`writer`](Self::writer), or with aligned atomic stores of whole
    ///   `usize` words (as `AtomicUsize`) whose readers tolerate torn data.
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

    /// Make the whole page durable (see [`DevicePagePool::persist_method`](crate::DevicePagePool::persist_method)).
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
            #[cfg(not(percpu_ref_untracked))]
            holder: self
                .shared()
                .holders
                .clone_of(&self.holder, HolderKind::Page),
            #[cfg(percpu_ref_untracked)]
            holder: (),
        }
    }
}

impl Drop for DevicePage {
    #[inline]
    fn drop(&mut self) {
        /// The allocation's count on its shard, given back when this is
        /// dropped: after the final put returned, or while it unwinds.
        struct ShardCount(NonNull<ShardArc>);

        impl Drop for ShardCount {
            #[inline]
            fn drop(&mut self) {
                // SAFETY: armed only for the put that takes the page 1→0
                // (see below), so the allocation's count on the shard is
                // ours to give back (an `Arc::into_raw` pointer, see
                // `shard_get`); nothing of `Shared` is used after this.
                unsafe { drop(Arc::from_raw(self.0.as_ptr().cast_const())) }
            }
        }

        // Before the put: once it is done, `Shared` may be gone (a put
        // that is not the last one holds no count on it afterwards).
        hook!(self.shared().holders.give_back(&self.holder));
        let shard = ShardCount(self.shard);
        // The page hook runs inside on 1→0 (free list, then pool put; that
        // put may persist and unmap the pool), and may panic. Nothing else
        // in `dec_and_test` panics for a `DevicePage`: it holds a counted
        // reference (no underflow) and a page is frozen only inside a call
        // on the handle that is then its only reference (`make_exclusive`),
        // so no put can meet it frozen. So an unwind out of this call
        // comes from the hook of the final put, and `shard` is given back
        // on the way out.
        // SAFETY: as in `page_ref`; the reference ends with the call.
        let last = unsafe { self.page.as_ref() }.dec_and_test();
        if !last {
            std::mem::forget(shard);
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
