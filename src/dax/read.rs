//! Optimistic reads of hot pages, and the writer they tolerate.
//!
//! A counted [`lookup`](DevicePagePool::lookup) writes the page's count
//! twice (get and put), so many threads looking up one hot page all write
//! one cache line. The scoped read writes nothing shared: it pins the pool
//! with its per-CPU reference (`tryget_live`, which keeps the mapping
//! alive), checks the page's version (`super::seqlock`), lets the caller
//! read the page through a [`PageView`] whose every load is atomic, and
//! checks the version again. If a writer, a free or a reallocation came in
//! between, the caller's result is dropped and the read fails with
//! [`PoolError::PageChanged`]: retry.
//!
//! Sound in Rust's memory model because no byte a writer may change is
//! ever behind a `&[u8]`: pools that allow these reads
//! ([`PoolOptions::optimistic_reads`](crate::PoolOptions::optimistic_reads))
//! write their pages only through a [`PageWriter`], whose stores are atomic
//! too, and never hand out a `&mut [u8]`
//! ([`DevicePage::as_mut_slice`] returns `None` there).

use super::error::PoolError;
use super::page::DevicePage;
use super::pool::DevicePagePool;
use super::registry;
use super::seqlock::{self, WORD};
use super::shared::Shared;
use crate::sync::{AtomicUsize, Ordering::Relaxed};
use std::fmt;

/// The bytes of one page during an optimistic read, from
/// [`DevicePagePool::read`] and [`DevicePagePool::read_page`].
///
/// Every load is an atomic load of machine words, so a writer may change
/// the page meanwhile without a data race — but then the bytes may be
/// *torn*: a mix of old and new values, or of two different owners of the
/// page. The read's result says whether they were consistent; until then
/// treat them as untrusted input. In particular, bound every loop and
/// check every offset computed from them: accessors return
/// [`PoolError::OutOfRange`] instead of panicking, so a torn length field
/// cannot crash the reader.
pub struct PageView<'a> {
    words: &'a [AtomicUsize],
    index: usize,
}

impl PageView<'_> {
    /// Bytes in the page.
    pub fn len(&self) -> usize {
        self.words.len() * WORD
    }

    /// Always `false`: a page has at least 4096 bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The page's index in its pool.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Copy `dst.len()` bytes starting at byte `offset` of the page into
    /// `dst`.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if the range is not inside the page
    /// (nothing is copied).
    #[inline]
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) -> Result<(), PoolError> {
        self.check(offset, dst.len())?;
        seqlock::copy_out(self.words, offset, dst);
        Ok(())
    }

    /// The 8 bytes at `offset` (any alignment) as a native-endian `u64`.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if they are not inside the page.
    #[inline]
    pub fn read_u64(&self, offset: usize) -> Result<u64, PoolError> {
        let mut b = [0; 8];
        self.read_into(offset, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// The byte at `offset`.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if `offset` is not inside the page.
    #[inline]
    pub fn read_u8(&self, offset: usize) -> Result<u8, PoolError> {
        let mut b = [0; 1];
        self.read_into(offset, &mut b)?;
        Ok(b[0])
    }

    /// The whole page, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len()];
        seqlock::copy_out(self.words, 0, &mut v);
        v
    }

    #[inline]
    fn check(&self, offset: usize, len: usize) -> Result<(), PoolError> {
        check(offset, len, self.len())
    }
}

impl fmt::Debug for PageView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageView")
            .field("index", &self.index)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

#[inline]
fn check(offset: usize, len: usize, size: usize) -> Result<(), PoolError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        end => Err(PoolError::OutOfRange {
            start: offset,
            end: end.unwrap_or(usize::MAX),
            len: size,
        }),
    }
}

impl DevicePagePool {
    /// An optimistic read of the page containing `addr`, in whichever live
    /// pool of this process maps it: `f` reads the page through a
    /// [`PageView`], and its result is returned only if no writer, free or
    /// reallocation of the page overlapped the read. Takes no page
    /// reference and writes no shared memory (the pool is pinned with a
    /// per-CPU count), so any number of threads can read one hot page
    /// without slowing each other down. The pool must have been opened
    /// with [`PoolOptions::optimistic_reads`](crate::PoolOptions::optimistic_reads).
    ///
    /// What a reader may rely on:
    ///
    /// * the page's memory stays mapped for the whole read, even if the
    ///   pool is shut down meanwhile;
    /// * while `f` runs, the bytes may be torn (see [`PageView`]); `f` must
    ///   treat them as untrusted and must not act on them — its result is
    ///   thrown away if they were;
    /// * `Ok(r)`: the page was allocated when the read began, and every
    ///   byte `f` read held, at the moment the read began, the value it
    ///   read — the page was neither written, freed nor reallocated until
    ///   `f` returned;
    /// * [`PoolError::PageChanged`], [`PoolError::PageBusy`]: a writer (or
    ///   a free and reallocation) got in the way; retry (perhaps after
    ///   re-reading which page holds what you want);
    /// * [`PoolError::PageNotAllocated`]: the page was free when the read
    ///   began;
    /// * only [`PageWriter`]s (and frees and reallocations) change the
    ///   version: writes through [`DevicePage::as_mut_ptr`] bypass it, and
    ///   its rules say when those are allowed at all.
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolError, PoolOptions};
    ///
    /// let opts = PoolOptions::new().optimistic_reads();
    /// let pool = DevicePagePool::anonymous_with(8 * 4096, &opts)?;
    /// let mut page = pool.alloc()?;
    /// page.writer().expect("a new page is unique").write(0, b"record 1")?;
    /// let at = page.as_ptr();
    ///
    /// // Any thread, no page reference taken:
    /// let mut buf = [0u8; 8];
    /// let found = DevicePagePool::read(at, |view| view.read_into(0, &mut buf))?;
    /// found?; // the closure's own result: the range was inside the page
    /// assert_eq!(&buf, b"record 1");
    ///
    /// drop(page); // freed: readers are told so
    /// let e = DevicePagePool::read(at, |view| view.read_u64(0)).unwrap_err();
    /// assert!(matches!(e, PoolError::PageNotAllocated { .. }));
    /// # Ok::<(), PoolError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`lookup`](Self::lookup) (`NotMapped`, `ShuttingDown`,
    /// `PageNotAllocated`, `PageBusy` while a [`PageWriter`] is open, and
    /// `Forked` in a child process), plus [`PoolError::PageChanged`] and
    /// [`PoolError::OptimisticReadsDisabled`].
    #[inline]
    pub fn read<R>(addr: *const u8, f: impl FnOnce(&PageView<'_>) -> R) -> Result<R, PoolError> {
        let a = addr as usize;
        // The pool is pinned (a pool reference) while this closure runs,
        // and `with_live_pool` refuses a fork child.
        registry::with_live_pool(a, |shared, start| {
            // SAFETY: pinned and not forked, see above.
            unsafe { read_pinned(shared, (a - start) >> shared.page_shift, a, f) }
        })?
    }

    /// [`read`](Self::read) of page `index` of this pool: no registry
    /// look-up.
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolOptions};
    /// let pool = DevicePagePool::anonymous_with(4096, &PoolOptions::new().optimistic_reads())?;
    /// let mut page = pool.alloc()?;
    /// page.writer().unwrap().write_u64(8, 42)?;
    /// assert_eq!(pool.read_page(page.index(), |v| v.read_u64(8))??, 42);
    /// # Ok::<(), percpu_ref::PoolError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read); [`PoolError::OutOfRange`] if `index` is not
    /// a page of this pool.
    #[inline]
    pub fn read_page<R>(
        &self,
        index: usize,
        f: impl FnOnce(&PageView<'_>) -> R,
    ) -> Result<R, PoolError> {
        let s = &*self.shared;
        if index >= s.pages.len() {
            return Err(PoolError::OutOfRange {
                start: index,
                end: index + 1,
                len: s.pages.len(),
            });
        }
        let addr = s.region().base().as_ptr() as usize + (index << s.page_shift);
        read_slot(s, index, addr, f)
    }
}

/// The read by index: pin, then the read.
#[inline]
fn read_slot<R>(
    shared: &Shared,
    index: usize,
    addr: usize,
    f: impl FnOnce(&PageView<'_>) -> R,
) -> Result<R, PoolError> {
    // Before the pin: a fork child must not touch the parent's count.
    shared.check_fork()?;
    // The pin: while it is held the pool's release, which unmaps, cannot
    // run. Dropped (also when `f` panics) after the last load.
    let Some(_pin) = shared.pgmap.tryget_live() else {
        return Err(shared.shutting_down());
    };
    // SAFETY: not forked, and pinned just above until the end of this
    // function.
    unsafe { read_pinned(shared, index, addr, f) }
}

/// The read itself: version, `f`, version.
///
/// # Safety
///
/// The caller holds a reference on the pool (`tryget_live`) for the whole
/// call, so its memory stays mapped, and checked that this process is not
/// a `fork()` child (`Shared::check_fork`), where it is not the pool's.
#[inline]
unsafe fn read_pinned<R>(
    shared: &Shared,
    index: usize,
    addr: usize,
    f: impl FnOnce(&PageView<'_>) -> R,
) -> Result<R, PoolError> {
    if !shared.optimistic {
        return Err(PoolError::OptimisticReadsDisabled {
            path: shared.path(),
        });
    }
    let slot = &shared.pages[index];
    let begin = match seqlock::read_begin(&slot.seq) {
        Ok(v) => v,
        Err(_) if slot.page.count() == 0 => {
            return Err(PoolError::PageNotAllocated { addr, index })
        }
        Err(_) => return Err(PoolError::PageBusy { index }),
    };
    // SAFETY: `index` is a page (`slot` above was found by it), and the
    // caller's pin keeps the region mapped until the end of this call,
    // after the view's last use (the view cannot escape `f`).
    let words = unsafe { shared.words(index) };
    let r = f(&PageView { words, index });
    if seqlock::read_validate(&slot.seq, begin) {
        Ok(r)
    } else {
        Err(PoolError::PageChanged { index })
    }
}

/// Writes to a page that optimistic readers may be reading, from
/// [`DevicePage::writer`]: every store is atomic, and the page's version
/// is odd from the writer's creation to its drop, so overlapping
/// [`DevicePagePool::read`]s fail with [`PoolError::PageChanged`] (or
/// [`PoolError::PageBusy`] if they begin meanwhile) instead of returning
/// torn data. Lookups of the page fail with [`PoolError::PageBusy`] until
/// the writer is dropped. Accessors taking a range return
/// [`PoolError::OutOfRange`] if it is not inside the page.
pub struct PageWriter<'a> {
    page: &'a mut DevicePage,
}

impl PageWriter<'_> {
    fn words(&self) -> &[AtomicUsize] {
        // SAFETY: our page is a page of its pool, and our page reference
        // keeps the region mapped while `self` (which borrows it) lives.
        unsafe { self.page.shared().words(self.page.index()) }
    }

    /// Bytes in the page.
    pub fn len(&self) -> usize {
        self.page.size()
    }

    /// Always `false`: a page has at least 4096 bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Store `src` at byte `offset`.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if the range is not inside the page
    /// (nothing is written).
    pub fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), PoolError> {
        check(offset, src.len(), self.len())?;
        seqlock::copy_in(self.words(), offset, src);
        Ok(())
    }

    /// Store `v` (native-endian) at byte `offset`, any alignment.
    ///
    /// # Errors
    ///
    /// [`PoolError::OutOfRange`] if the 8 bytes are not inside the page.
    pub fn write_u64(&mut self, offset: usize, v: u64) -> Result<(), PoolError> {
        self.write(offset, &v.to_ne_bytes())
    }

    /// Set every byte of the page to `byte`.
    pub fn fill(&mut self, byte: u8) {
        let len = self.len();
        seqlock::fill(self.words(), 0, len, byte);
    }

    /// The page's bytes. Nobody else writes them while the writer lives
    /// (optimistic readers only load), so a shared slice is sound here.
    pub fn as_slice(&self) -> &[u8] {
        let (p, len) = (self.page.as_ptr(), self.len());
        // SAFETY: mapped while our page reference lives; the only writes
        // to the page are this writer's, which need `&mut self` and so
        // cannot overlap the returned borrow of `self`.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
}

impl Drop for PageWriter<'_> {
    fn drop(&mut self) {
        self.page.end_write();
    }
}

impl fmt::Debug for PageWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageWriter")
            .field("index", &self.page.index())
            .finish_non_exhaustive()
    }
}

impl DevicePage {
    /// A writer for this page if this is its only reference (`None`
    /// otherwise): the way to write pages of a pool with
    /// [`optimistic_reads`](crate::PoolOptions::optimistic_reads), and
    /// usable in any pool. See [`PageWriter`].
    ///
    /// ```
    /// use percpu_ref::{DevicePagePool, PoolOptions};
    /// let pool = DevicePagePool::anonymous_with(4096, &PoolOptions::new().optimistic_reads()).unwrap();
    /// let mut page = pool.alloc().unwrap();
    /// assert!(page.as_mut_slice().is_none()); // never a `&mut [u8]` here
    /// let mut w = page.writer().unwrap();
    /// w.write(0, b"hello").unwrap();
    /// assert_eq!(&w.as_slice()[..5], b"hello");
    /// drop(w);
    /// assert_eq!(&page.as_slice()[..5], b"hello");
    /// ```
    pub fn writer(&mut self) -> Option<PageWriter<'_>> {
        if !self.make_exclusive() {
            return None;
        }
        // Relaxed: the holder of the only reference owns the version
        // (seqlock docs). Odd already: a leaked writer's section goes on.
        if self.seq().load(Relaxed) & 1 == 0 {
            seqlock::write_begin(self.seq());
        }
        Some(PageWriter { page: self })
    }
}
