//! `PageRef`: the per-page reference count, and the hook trait.
//!
//! The count word:
//!
//! ```text
//!  bit 31        bits 0..=30
//!  FROZEN        count            meaning
//!    0           0                free page (first_ref may allocate it)
//!    0           1..=MAX_COUNT    allocated, `count` references
//!    0           > MAX_COUNT      only transiently, while an overflowing
//!                                 inc undoes itself before panicking
//!    1           n                frozen with n references, one owner;
//!                                 get_unless_zero and first_ref fail
//! ```
//!
//! Every write to the word is a read-modify-write (`fetch_add`, `fetch_sub`,
//! `compare_exchange`), never a plain store. So the release sequence headed
//! by any Release write is never broken, and whichever thread later Acquires
//! the word synchronizes with every earlier Release on it. (It also keeps
//! loom 0.7 exact: loom does not model a plain store racing an RMW
//! faithfully.)

use crate::sync::{fence, AtomicU32, Ordering::*};
use std::fmt;
use thiserror::Error;

/// Set while a page is frozen (see [`PageRef::freeze`]).
const FROZEN: u32 = 1 << 31;

/// Callbacks a [`PageRef`] makes on its **terminal transitions only**: when
/// the count goes 0→1 (the page is allocated) and 1→0 (its last reference
/// is dropped). The hot middle — every get and put of a page that stays
/// referenced — never calls the hook, so a hook may be as expensive as it
/// likes without slowing down page gets and puts.
///
/// A `PageRef` calls the hook in a strictly balanced way: every
/// `on_last_unref` (and every [`undo_first_ref`](Self::undo_first_ref))
/// follows exactly one earlier `on_first_ref` that returned `true`, on the
/// same page, and happens after it. A hook that keeps a reference per
/// allocated page (like [`PercpuRefHook`](crate::PercpuRefHook)) therefore
/// holds exactly one reference per page whose count is not zero — as long
/// as the page's references are counted correctly and nothing else calls
/// the hook's methods.
///
/// ```
/// use percpu_ref::{PageRef, PageRefHook};
/// use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
///
/// /// Hands out pages while the pool is open; counts pages in use.
/// struct Pool {
///     open: AtomicBool,
///     in_use: AtomicUsize,
/// }
///
/// impl PageRefHook for &Pool {
///     fn on_first_ref(&self) -> bool {
///         self.in_use.fetch_add(1, SeqCst);
///         if self.open.load(SeqCst) {
///             true
///         } else {
///             self.in_use.fetch_sub(1, SeqCst); // refuse; undo our work
///             false
///         }
///     }
///     fn on_last_unref(&self) {
///         self.in_use.fetch_sub(1, SeqCst);
///     }
/// }
///
/// let pool = Pool { open: AtomicBool::new(true), in_use: AtomicUsize::new(0) };
/// let page = PageRef::new(&pool);
/// page.first_ref().unwrap(); // 0→1: hook called
/// page.inc(); // 1→2: hook not called
/// assert!(!page.dec_and_test()); // 2→1: hook not called
/// assert_eq!(pool.in_use.load(SeqCst), 1);
/// assert!(page.dec_and_test()); // 1→0: hook called
/// assert_eq!(pool.in_use.load(SeqCst), 0);
///
/// pool.open.store(false, SeqCst);
/// assert!(page.first_ref().is_err()); // refused: the page stays free
/// assert_eq!(page.count(), 0);
/// ```
pub trait PageRefHook {
    /// 0→1: called before the count becomes 1 (e.g. page allocation).
    /// Return `false` to refuse: the count stays 0 and the page is not
    /// handed out (and neither `on_last_unref` nor `undo_first_ref` is
    /// called for this attempt).
    ///
    /// Called by [`PageRef::first_ref`] only, on the calling thread.
    fn on_first_ref(&self) -> bool;

    /// 1→0: called after the count dropped to 0 (final put): take the page
    /// back, drop the lifetime reference.
    ///
    /// Called on the thread whose [`PageRef::dec_and_test`] took the count
    /// to zero (or whose [`PageRef::unfreeze`]`(0)` released the frozen
    /// references), after it synchronized with every earlier put of the
    /// page, so it sees everything the page's users did.
    ///
    /// The count is already 0 when this runs, so it can overlap a
    /// `first_ref` of the same page by a thread that found the page some
    /// other way. A pool that allocates only from a free list this method
    /// pushes the page onto is ordered by that list.
    ///
    /// Performance: this call is compiled into every `dec_and_test` of the
    /// page. If it is more than a few instructions, mark it
    /// `#[inline(never)]` (as [`PercpuRefHook`](crate::PercpuRefHook) does)
    /// so `dec_and_test` stays small enough to inline and the hot put of a
    /// hooked page stays the same code as an ordinary page's
    /// (`scripts/zero-cost.sh` checks this for `PercpuRefHook`).
    fn on_last_unref(&self);

    /// Undo an `on_first_ref` that returned `true` when the page then
    /// turned out not to be free ([`FirstRefError::InUse`]): the count
    /// never became 1 for this attempt.
    ///
    /// The default calls [`on_last_unref`](Self::on_last_unref), which is
    /// right when that only drops a lifetime reference. Override it when
    /// `on_last_unref` does more, e.g. returns the page to a free list.
    #[inline]
    fn undo_first_ref(&self) {
        self.on_last_unref();
    }
}

/// The hook of ordinary pages: zero-sized, allows every allocation, does
/// nothing. A `PageRef<NoHook>` compiles to exactly the instructions of a
/// hand-written `AtomicU32` counter doing the same operations
/// (`scripts/zero-cost.sh` checks this with callgrind).
///
/// ```
/// use percpu_ref::{NoHook, PageRef};
/// assert_eq!(std::mem::size_of::<PageRef<NoHook>>(), 4);
/// let page: PageRef = PageRef::new(NoHook);
/// assert!(page.first_ref().is_ok());
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NoHook;

impl PageRefHook for NoHook {
    #[inline(always)]
    fn on_first_ref(&self) -> bool {
        true
    }
    #[inline(always)]
    fn on_last_unref(&self) {}
}

/// A hook behind a shared reference is a hook: many pages can share one.
impl<H: PageRefHook + ?Sized> PageRefHook for &H {
    #[inline]
    fn on_first_ref(&self) -> bool {
        (**self).on_first_ref()
    }
    #[inline]
    fn on_last_unref(&self) {
        (**self).on_last_unref()
    }
    #[inline]
    fn undo_first_ref(&self) {
        (**self).undo_first_ref()
    }
}

/// Why [`PageRef::first_ref`] did not allocate the page. The count is as it
/// was, and the hook holds nothing for this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FirstRefError {
    /// The hook's [`on_first_ref`](PageRefHook::on_first_ref) refused
    /// (e.g. its pool is shutting down); the count stays 0.
    #[error(
        "page allocation refused by its hook (e.g. the pool is shutting down); the count stays 0"
    )]
    Refused,
    /// The page is not free: its count is `count` (or it is frozen with
    /// `count` references). The hook's reference was undone.
    #[error("page is not free: it has {count} references (or is frozen); the first reference needs count 0")]
    InUse {
        /// The count found (without the frozen flag).
        count: u32,
    },
}

/// One page's reference count, with a [`PageRefHook`] called only on the
/// terminal transitions 0→1 and 1→0.
///
/// | operation | transition | hook | ordering |
/// |---|---|---|---|
/// | [`first_ref`](Self::first_ref) | 0→1 (allocate) | `on_first_ref` first; may refuse | AcqRel CAS |
/// | [`inc`](Self::inc) | n→n+1, n ≥ 1 | never | Relaxed |
/// | [`get_unless_zero`](Self::get_unless_zero) | n→n+1 unless 0 or frozen | never | CAS loop, Acquire on success |
/// | [`dec_and_test`](Self::dec_and_test) | n→n−1 | `on_last_unref` after 1→0 | Release; Acquire fence on 1→0 |
/// | [`freeze`](Self::freeze) | `expected`→frozen | never | Acquire CAS |
/// | [`unfreeze`](Self::unfreeze) | frozen→`count` | `on_last_unref` if it drops the frozen references to 0 | Release CAS |
///
/// Misuse never wraps the count silently: an underflow (a put on a free
/// page — a use-after-free), an `inc` on a free or frozen page, and an
/// overflow past [`MAX_COUNT`](Self::MAX_COUNT) panic with a message that
/// says which, after restoring the count.
///
/// ```
/// use percpu_ref::{NoHook, PageRef};
///
/// let page = PageRef::new(NoHook);
/// page.first_ref().unwrap(); // allocate: 0→1
/// assert!(page.get_unless_zero()); // a lockless lookup finds it: 2
/// assert!(!page.dec_and_test()); // lookup done: 1
/// assert!(page.dec_and_test()); // last put: 0, free again
/// assert!(!page.get_unless_zero()); // a freed page is never resurrected
/// ```
pub struct PageRef<H: PageRefHook = NoHook> {
    count: AtomicU32,
    hook: H,
}

impl<H: PageRefHook> PageRef<H> {
    /// The largest count a page can reach. [`inc`](Self::inc) past it
    /// panics; [`get_unless_zero`](Self::get_unless_zero) refuses.
    pub const MAX_COUNT: u32 = 1 << 30;

    /// A free page (count 0) with its hook.
    #[cfg(not(percpu_ref_model))]
    #[inline]
    pub const fn new(hook: H) -> Self {
        PageRef {
            count: AtomicU32::new(0),
            hook,
        }
    }

    /// A free page (count 0) with its hook. (Not `const` under loom.)
    #[cfg(percpu_ref_model)]
    pub fn new(hook: H) -> Self {
        PageRef {
            count: AtomicU32::new(0),
            hook,
        }
    }

    /// The page's hook.
    #[inline]
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// The number of references (of a frozen page: the references the
    /// freezer took over). A snapshot: other threads may change it at once.
    #[doc(alias = "page_ref_count")]
    #[inline]
    pub fn count(&self) -> u32 {
        // Relaxed: a snapshot for diagnostics and asserts; nothing is read
        // through it, so it needs no ordering.
        self.count.load(Relaxed) & !FROZEN
    }

    /// Whether the page is frozen (see [`freeze`](Self::freeze)).
    #[inline]
    pub fn is_frozen(&self) -> bool {
        // Relaxed: a snapshot, as in `count`.
        self.count.load(Relaxed) & FROZEN != 0
    }

    /// Take the first reference of a free page (0→1), e.g. on allocation.
    ///
    /// Calls the hook's [`on_first_ref`](PageRefHook::on_first_ref)
    /// *before* the count becomes 1; if it refuses, the count stays 0 and
    /// this returns [`FirstRefError::Refused`]. If the page is not free
    /// (count ≠ 0, or frozen), the hook's work is undone with
    /// [`undo_first_ref`](PageRefHook::undo_first_ref) and this returns
    /// [`FirstRefError::InUse`].
    ///
    /// Ordering: AcqRel on success. Acquire pairs with the Release of the
    /// previous final [`dec_and_test`](Self::dec_and_test) (or
    /// [`unfreeze`](Self::unfreeze)), so the new owner sees everything the
    /// page's previous users did. Release publishes what `on_first_ref`
    /// did (e.g. a pool recording the page's owner, the lifetime reference)
    /// to every thread that later Acquires the count: a lookup whose
    /// [`get_unless_zero`](Self::get_unless_zero) finds the page, and the
    /// final put that runs `on_last_unref`.
    #[doc(alias("set_page_refcounted", "init_page_count"))]
    #[inline]
    pub fn first_ref(&self) -> Result<(), FirstRefError> {
        if !self.hook.on_first_ref() {
            return Err(FirstRefError::Refused);
        }
        // AcqRel: Acquire pairs with the Release of the previous final
        // `dec_and_test`/`unfreeze`; Release publishes the hook's work to
        // the Acquire of `get_unless_zero` and of the final put (see the
        // doc comment).
        // Relaxed on failure: we only report the value and touch nothing.
        match self.count.compare_exchange(0, 1, AcqRel, Relaxed) {
            Ok(_) => Ok(()),
            Err(found) => {
                self.hook.undo_first_ref();
                Err(FirstRefError::InUse {
                    count: found & !FROZEN,
                })
            }
        }
    }

    /// Add a reference; the caller already holds one (`page_ref_inc`).
    /// Never calls the hook.
    ///
    /// Ordering: Relaxed, like `Arc::clone`: the caller's own reference
    /// keeps the page allocated, and the new reference reaches another
    /// thread only through some other synchronization.
    ///
    /// # Panics
    ///
    /// If the count was 0 (the caller held no reference: a use-after-free
    /// or a missing [`first_ref`](Self::first_ref)), the page is frozen, or
    /// the count would exceed [`MAX_COUNT`](Self::MAX_COUNT). The count is
    /// restored first.
    #[doc(alias("page_ref_inc", "get_page"))]
    #[inline]
    pub fn inc(&self) {
        // Relaxed: the caller holds a reference, so the page cannot be
        // freed meanwhile; no data is published by taking another one.
        let old = self.count.fetch_add(1, Relaxed);
        // One compare: true exactly for 1..MAX_COUNT (0 wraps to u32::MAX).
        if old.wrapping_sub(1) >= Self::MAX_COUNT - 1 {
            self.inc_failed(old);
        }
    }

    /// Drop a reference; returns `true` if it was the last one (1→0), after
    /// calling the hook's [`on_last_unref`](PageRefHook::on_last_unref).
    ///
    /// Ordering: Release, then an Acquire fence on 1→0 — exactly
    /// `Arc::drop`. Every put publishes the putter's use of the page; the
    /// final put synchronizes with all of them (its `fetch_sub` reads the
    /// end of their release sequence), so the hook and whoever reuses the
    /// page see every earlier use and no use can still be in flight.
    ///
    /// # Panics
    ///
    /// On underflow — a put on a page whose count is 0, i.e. a
    /// use-after-free — and on a put on a frozen page. The count is
    /// restored first. (In debug builds and release builds alike.)
    #[doc(alias("page_ref_dec_and_test", "put_page_testzero", "put_page"))]
    #[inline]
    pub fn dec_and_test(&self) -> bool {
        // Release: pairs with the Acquire fence below in the thread that
        // makes the final put (and with the Acquire of `freeze`), so this
        // holder's use of the page happens-before the page is freed.
        let old = self.count.fetch_sub(1, Release);
        // One compare: true exactly for 2..=MAX_COUNT, the hot middle.
        if old.wrapping_sub(2) < Self::MAX_COUNT - 1 {
            return false;
        }
        if old == 1 {
            // Acquire: pairs with the Release of every earlier put (and of
            // `first_ref`), whose release sequences this fetch_sub read the
            // end of: the hook runs after every use of the page.
            fence(Acquire);
            self.hook.on_last_unref();
            return true;
        }
        self.dec_unusual(old)
    }

    /// Take a reference unless the count is 0 (a free page) or the page is
    /// frozen: the speculative get of lockless lookups
    /// (`page_ref_add_unless` / `folio_try_get`). Never calls the hook and
    /// never resurrects a freed page: it is a CAS loop that never
    /// increments from 0.
    ///
    /// A lookup that found the page through a racy path should, after this
    /// succeeds, check that it is still the page it wanted (and put it back
    /// if not), as the kernel's page cache lookup does.
    ///
    /// Ordering: Acquire on success, pairing with the Release of
    /// [`first_ref`](Self::first_ref) (so the hook's `on_first_ref` work is
    /// visible), of [`unfreeze`](Self::unfreeze) and of earlier puts, so
    /// the caller's re-checks of the page see what was published before. Relaxed on
    /// failure: nothing is read through a failed get.
    ///
    /// At [`MAX_COUNT`](Self::MAX_COUNT) it refuses (a `debug_assert!`
    /// fails in debug builds) instead of overflowing, like the kernel's
    /// `try_get_page`.
    #[doc(alias("get_page_unless_zero", "page_ref_add_unless", "folio_try_get"))]
    #[inline]
    pub fn get_unless_zero(&self) -> bool {
        // Relaxed: only a first guess for the CAS, which re-checks it.
        let mut cur = self.count.load(Relaxed);
        loop {
            // One compare: true exactly for 1..MAX_COUNT; excludes 0, the
            // frozen flag and the overflow limit.
            if cur.wrapping_sub(1) >= Self::MAX_COUNT - 1 {
                return Self::get_refused(cur);
            }
            // Acquire on success: pairs with the Release of `first_ref`,
            // `unfreeze` and earlier puts (see the doc comment). Relaxed on failure: we
            // retry with the value found and read nothing else.
            match self
                .count
                .compare_exchange_weak(cur, cur + 1, Acquire, Relaxed)
            {
                Ok(_) => return true,
                Err(found) => cur = found,
            }
        }
    }

    /// Take exclusive ownership if the count is exactly `expected`
    /// (`page_ref_freeze`, as page migration does): the caller holds
    /// those references (or controls their holders). While frozen,
    /// [`get_unless_zero`](Self::get_unless_zero) and
    /// [`first_ref`](Self::first_ref) fail — the count reads as zero to
    /// them — and nobody else may [`inc`](Self::inc) or
    /// [`dec_and_test`](Self::dec_and_test) it. Returns `false` (and
    /// changes nothing) if the count differs, e.g. because someone else
    /// holds a reference, or the page is already frozen.
    ///
    /// `freeze(0)` freezes a free page, so it cannot be allocated until
    /// `unfreeze(0)`.
    ///
    /// Ordering: Acquire on success, pairing with the Release of every
    /// earlier put, so the new exclusive owner sees everything the page's
    /// other users did. Relaxed on failure.
    ///
    /// # Panics
    ///
    /// If `expected > MAX_COUNT` (no page can have that count).
    #[doc(alias = "page_ref_freeze")]
    #[inline]
    pub fn freeze(&self, expected: u32) -> bool {
        assert!(
            expected <= Self::MAX_COUNT,
            "PageRef::freeze({expected}): no page count exceeds MAX_COUNT ({})",
            Self::MAX_COUNT
        );
        // Acquire: pairs with the Release of earlier puts (see the doc
        // comment). Relaxed on failure: nothing changed, nothing is read.
        self.count
            .compare_exchange(expected, FROZEN | expected, Acquire, Relaxed)
            .is_ok()
    }

    /// Give up the exclusive ownership taken by [`freeze`](Self::freeze),
    /// leaving `count` references (`page_ref_unfreeze`). Never calls
    /// `on_first_ref`; calls [`on_last_unref`](PageRefHook::on_last_unref)
    /// if the page was frozen with references and `count` is 0 — then the
    /// freezer has just dropped the page's last references, which is its
    /// final put.
    ///
    /// Ordering: Release, pairing with the Acquire of the next
    /// [`get_unless_zero`](Self::get_unless_zero),
    /// [`first_ref`](Self::first_ref), [`freeze`](Self::freeze) or final
    /// put, so what the freezer did while it owned the page is visible to
    /// whoever takes it next.
    ///
    /// # Panics
    ///
    /// If the page is not frozen, if `count > MAX_COUNT`, or if a page
    /// frozen while free (`freeze(0)`) is unfrozen with references — that
    /// would allocate it without asking the hook; use
    /// [`first_ref`](Self::first_ref) after `unfreeze(0)`. The page is left
    /// unchanged.
    #[doc(alias = "page_ref_unfreeze")]
    pub fn unfreeze(&self, count: u32) {
        assert!(
            count <= Self::MAX_COUNT,
            "PageRef::unfreeze({count}): the count exceeds MAX_COUNT ({})",
            Self::MAX_COUNT
        );
        // Relaxed: a first guess for the CAS, which re-checks it.
        let mut cur = self.count.load(Relaxed);
        loop {
            if cur & FROZEN == 0 {
                panic!("PageRef::unfreeze({count}) on a page that is not frozen (count {cur})");
            }
            let frozen = cur & !FROZEN;
            if frozen == 0 && count != 0 {
                panic!(
                    "PageRef::unfreeze({count}) on a page frozen while free: \
                     unfreeze(0), then allocate it with first_ref"
                );
            }
            // Release: pairs with the Acquire of whoever takes the page next
            // (see the doc comment). A CAS, not a store, so a misused
            // concurrent inc/dec that is restoring the word is not lost.
            // Relaxed on failure: we retry with the value found.
            match self.count.compare_exchange(cur, count, Release, Relaxed) {
                Ok(_) => {
                    if frozen != 0 && count == 0 {
                        // The freezer's Acquire at `freeze` already ordered
                        // every earlier put before this point.
                        self.hook.on_last_unref();
                    }
                    return;
                }
                Err(found) => cur = found,
            }
        }
    }

    // ------------------------------------------------------------ cold paths

    /// `inc` found `old` outside 1..MAX_COUNT: restore and panic.
    #[cold]
    #[inline(never)]
    fn inc_failed(&self, old: u32) -> ! {
        // Relaxed: undoing our own add; we panic right after.
        self.count.fetch_sub(1, Relaxed);
        if old == 0 {
            panic!(
                "PageRef::inc on a free page (count 0): the caller holds no reference \
                 (use-after-free?); take the first one with first_ref or get_unless_zero"
            );
        } else if old & FROZEN != 0 {
            panic!(
                "PageRef::inc on a frozen page ({} references, one exclusive owner)",
                old & !FROZEN
            );
        } else {
            panic!(
                "PageRef::inc: page count overflow ({old} references, MAX_COUNT is {}); \
                 references are leaking",
                Self::MAX_COUNT
            );
        }
    }

    /// `dec_and_test` found `old` outside 1..=MAX_COUNT.
    #[cold]
    #[inline(never)]
    fn dec_unusual(&self, old: u32) -> bool {
        if old & FROZEN == 0 && old > Self::MAX_COUNT {
            // Another thread's overflowing `inc` is undoing itself; this
            // put is fine and not the last.
            return false;
        }
        // Relaxed: undoing our own subtraction; we panic right after.
        self.count.fetch_add(1, Relaxed);
        if old == 0 {
            panic!(
                "PageRef::dec_and_test: page count underflow (a put on a free page, count 0): \
                 use-after-free"
            );
        }
        panic!(
            "PageRef::dec_and_test on a frozen page ({} references, one exclusive owner): \
             unfreeze it first",
            old & !FROZEN
        );
    }

    /// `get_unless_zero` found `cur` outside 1..MAX_COUNT.
    #[inline]
    fn get_refused(cur: u32) -> bool {
        if cur != 0 && cur & FROZEN == 0 {
            Self::get_overflow(cur);
        }
        false
    }

    #[cold]
    #[inline(never)]
    fn get_overflow(cur: u32) {
        debug_assert!(
            false,
            "PageRef::get_unless_zero: page count at its limit ({cur} references, MAX_COUNT \
             is {}); references are leaking",
            Self::MAX_COUNT
        );
    }
}

impl<H: PageRefHook + Default> Default for PageRef<H> {
    /// A free page with the default hook.
    fn default() -> Self {
        PageRef::new(H::default())
    }
}

impl<H: PageRefHook + fmt::Debug> fmt::Debug for PageRef<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRef")
            .field("count", &self.count())
            .field("frozen", &self.is_frozen())
            .field("hook", &self.hook)
            .finish()
    }
}
