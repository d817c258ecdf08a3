//! Hooks that tie pages to a [`PercpuRef`] (the kernel's `dev_pagemap`
//! reference), and the hook of a mixed population of pages.

use super::counter::PageRefHook;
use crate::percpu::policy::ReleasePolicy;
use crate::percpu::{PercpuRef, Ref};
use std::fmt;
use std::sync::Arc;

/// Ties a page to a [`PercpuRef`], the lifetime reference of the device or
/// pool the page belongs to (like the kernel's `dev_pagemap`): the page's
/// 0→1 transition takes one reference with
/// [`tryget_live`](PercpuRef::tryget_live) (refusing the allocation once
/// the ref is killed) and keeps it raw; the 1→0 transition puts it back.
/// So an allocated page holds exactly one reference, a free page none, and
/// the get/put of an already-referenced page never touches the `PercpuRef`.
///
/// Shutdown is then the kernel's: [`kill`](PercpuRef::kill) (no new
/// allocations), wait for the release (the last allocated page was freed),
/// then unmap.
///
/// ```
/// use percpu_ref::{Completion, FirstRefError, PageRef, PercpuRef, PercpuRefHook};
///
/// let drained = Completion::new();
/// let device = PercpuRef::new("pmem0", drained.clone());
/// // SAFETY: only the PageRefs call the hooks, and their references are
/// // counted correctly (every inc and first_ref is matched by one put).
/// let pages: Vec<_> = (0..4)
///     .map(|_| PageRef::new(unsafe { PercpuRefHook::new(&device) }))
///     .collect();
///
/// pages[0].first_ref().unwrap(); // allocate: takes a device reference
/// pages[0].inc(); // a second user: no device work at all
/// device.kill().unwrap(); // shutdown starts while page 0 is in use
/// assert_eq!(pages[1].first_ref(), Err(FirstRefError::Refused));
/// assert!(!drained.is_complete());
/// pages[0].dec_and_test();
/// pages[0].dec_and_test(); // the last page put drains the device
/// assert!(drained.is_complete()); // now it is safe to unmap
/// ```
pub struct PercpuRefHook<'a, T, P = crate::NoRelease> {
    r: &'a PercpuRef<T, P>,
}

impl<'a, T, P: ReleasePolicy<T>> PercpuRefHook<'a, T, P> {
    /// A hook taking its page's lifetime reference on `r`.
    ///
    /// # Safety
    ///
    /// The hook's [`on_last_unref`](PageRefHook::on_last_unref) and
    /// [`undo_first_ref`](PageRefHook::undo_first_ref) put a raw reference
    /// on `r` (as [`PercpuRef::put_many`] does), so each call must give back
    /// the reference of one earlier successful
    /// [`on_first_ref`](PageRefHook::on_first_ref) of this hook. A
    /// [`PageRef`](crate::PageRef) guarantees that when the hook is inside
    /// it and:
    ///
    /// * nothing else calls the hook's methods (don't call them through
    ///   [`PageRef::hook`](crate::PageRef::hook)), and
    /// * the page's references are counted correctly: `inc` only by a
    ///   holder of a reference, and every reference (from `first_ref`,
    ///   `get_unless_zero` or `inc`) dropped exactly once with
    ///   `dec_and_test` (or handed over through `freeze`/`unfreeze`).
    ///
    /// A pool wrapping pages in RAII handles meets both. Breaking them can
    /// let `r`'s release run while pages are in use, and a release that
    /// unmaps memory would then leave those pages dangling.
    #[inline]
    pub const unsafe fn new(r: &'a PercpuRef<T, P>) -> Self {
        PercpuRefHook { r }
    }

    /// The `PercpuRef` this hook takes references on.
    #[inline]
    pub fn percpu_ref(&self) -> &'a PercpuRef<T, P> {
        self.r
    }
}

/// `tryget_live`, keeping the reference raw (`Ref::into_raw`): the page's
/// lifetime reference, given back by `put_many(1)` on its last unref.
#[inline]
fn tryget_live_raw<T, P: ReleasePolicy<T>>(r: &PercpuRef<T, P>) -> bool {
    r.tryget_live().map(Ref::into_raw).is_some()
}

impl<T, P: ReleasePolicy<T>> PageRefHook for PercpuRefHook<'_, T, P> {
    /// `tryget_live`, keeping the reference raw; `false` once killed.
    #[inline]
    fn on_first_ref(&self) -> bool {
        tryget_live_raw(self.r)
    }

    /// `put_many(1)`: gives back the reference of `on_first_ref`. Out of
    /// line, so that `dec_and_test` stays small enough to inline.
    #[inline(never)]
    fn on_last_unref(&self) {
        // SAFETY: by the contract of `PercpuRefHook::new`, this call gives
        // back the raw reference an earlier successful `on_first_ref` took
        // with `tryget_live_raw`.
        unsafe { self.r.put_many(1) }
    }
}

impl<T, P> Clone for PercpuRefHook<'_, T, P> {
    /// A copy for another page: each page's hook holds its own reference.
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, P> Copy for PercpuRefHook<'_, T, P> {}

impl<T: fmt::Debug, P> fmt::Debug for PercpuRefHook<'_, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PercpuRefHook")
            .field(self.r.value())
            .finish()
    }
}

/// [`PercpuRefHook`] holding an `Arc`, for pages that must not borrow their
/// device (e.g. stored in a `'static` registry). Costs one `Arc` clone per
/// page at construction, nothing per get/put.
///
/// ```
/// use percpu_ref::{ArcPercpuRefHook, NoRelease, PageRef, PercpuRef};
/// use std::sync::Arc;
///
/// let device = Arc::new(PercpuRef::new((), NoRelease));
/// // SAFETY: only the PageRef calls the hook, and its references are
/// // counted correctly.
/// let page = PageRef::new(unsafe { ArcPercpuRefHook::new(Arc::clone(&device)) });
/// std::thread::spawn(move || {
///     page.first_ref().unwrap();
///     assert!(page.dec_and_test());
/// })
/// .join()
/// .unwrap();
/// ```
pub struct ArcPercpuRefHook<T, P = crate::NoRelease> {
    r: Arc<PercpuRef<T, P>>,
}

impl<T, P: ReleasePolicy<T>> ArcPercpuRefHook<T, P> {
    /// A hook taking its page's lifetime reference on `r`.
    ///
    /// # Safety
    ///
    /// As [`PercpuRefHook::new`]: every `on_last_unref`/`undo_first_ref`
    /// must give back the reference of one earlier successful
    /// `on_first_ref`, which a [`PageRef`](crate::PageRef) guarantees when
    /// nothing else calls the hook and the page's references are counted
    /// correctly.
    #[inline]
    pub unsafe fn new(r: Arc<PercpuRef<T, P>>) -> Self {
        ArcPercpuRefHook { r }
    }

    /// The `PercpuRef` this hook takes references on.
    #[inline]
    pub fn percpu_ref(&self) -> &Arc<PercpuRef<T, P>> {
        &self.r
    }
}

impl<T, P: ReleasePolicy<T>> PageRefHook for ArcPercpuRefHook<T, P> {
    /// `tryget_live`, keeping the reference raw; `false` once killed.
    #[inline]
    fn on_first_ref(&self) -> bool {
        tryget_live_raw(&self.r)
    }

    /// `put_many(1)`: gives back the reference of `on_first_ref`. Out of
    /// line, so that `dec_and_test` stays small enough to inline.
    #[inline(never)]
    fn on_last_unref(&self) {
        // SAFETY: by the contract of `ArcPercpuRefHook::new`, this call
        // gives back the raw reference an earlier successful `on_first_ref`
        // took with `tryget_live_raw`.
        unsafe { self.r.put_many(1) }
    }
}

impl<T, P> Clone for ArcPercpuRefHook<T, P> {
    /// A clone for another page: each page's hook holds its own reference.
    fn clone(&self) -> Self {
        ArcPercpuRefHook {
            r: Arc::clone(&self.r),
        }
    }
}

impl<T: fmt::Debug, P> fmt::Debug for ArcPercpuRefHook<T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ArcPercpuRefHook")
            .field(self.r.value())
            .finish()
    }
}

/// The hook of a mixed population — device pages and ordinary pages in one
/// array — with a per-page flag (the `Option` discriminant; free for
/// reference hooks thanks to the null niche) that is checked only on the
/// terminal transitions. An ordinary page's 0→1 always succeeds and its
/// 1→0 does nothing; a device page calls `H`. The middle gets and puts of
/// both kinds are the same code.
///
/// ```
/// use percpu_ref::{FirstRefError, MixedHook, NoRelease, PageRef, PercpuRef, PercpuRefHook};
///
/// let device = PercpuRef::new("pmem0", NoRelease);
/// // SAFETY: only the PageRefs call the hooks, and their references are
/// // counted correctly.
/// let dev = unsafe { PercpuRefHook::new(&device) };
/// let pages = [
///     PageRef::new(MixedHook::device(dev)),
///     PageRef::new(MixedHook::ordinary()),
/// ];
/// assert_eq!(std::mem::size_of_val(&pages[0]), 16); // 4-byte count + 8-byte flag/pointer
///
/// device.kill().unwrap();
/// assert_eq!(pages[0].first_ref(), Err(FirstRefError::Refused)); // device is going away
/// assert_eq!(pages[1].first_ref(), Ok(())); // ordinary pages are unaffected
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MixedHook<H> {
    device: Option<H>,
}

impl<H: PageRefHook> MixedHook<H> {
    /// A device page: terminal transitions call `hook`.
    #[inline]
    pub const fn device(hook: H) -> Self {
        MixedHook { device: Some(hook) }
    }

    /// An ordinary page: terminal transitions do nothing.
    #[inline]
    pub const fn ordinary() -> Self {
        MixedHook { device: None }
    }

    /// Whether this is a device page.
    #[inline]
    pub fn is_device(&self) -> bool {
        self.device.is_some()
    }

    /// The device hook, if this is a device page.
    #[inline]
    pub fn device_hook(&self) -> Option<&H> {
        self.device.as_ref()
    }
}

impl<H: PageRefHook> Default for MixedHook<H> {
    /// An ordinary page.
    fn default() -> Self {
        MixedHook::ordinary()
    }
}

impl<H: PageRefHook> PageRefHook for MixedHook<H> {
    #[inline]
    fn on_first_ref(&self) -> bool {
        match &self.device {
            Some(h) => h.on_first_ref(),
            None => true,
        }
    }

    #[inline]
    fn on_last_unref(&self) {
        if let Some(h) = &self.device {
            h.on_last_unref();
        }
    }

    #[inline]
    fn undo_first_ref(&self) {
        if let Some(h) = &self.device {
            h.undo_first_ref();
        }
    }
}

impl<H: fmt::Debug> fmt::Debug for MixedHook<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.device {
            Some(h) => f.debug_tuple("MixedHook::device").field(h).finish(),
            None => f.write_str("MixedHook::ordinary"),
        }
    }
}
