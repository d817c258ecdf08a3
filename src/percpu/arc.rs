//! [`PercpuArc`], the owning handle, and [`OwnedRef`], the `'static`
//! reference that scales.
//!
//! # Design: the kernel's object lifetime
//!
//! An owned reference must keep the value and the ref's memory alive on
//! its own, yet cloning and dropping one must write no cache line shared
//! between CPUs — so it cannot touch an `Arc`'s strong count. Instead the
//! allocation lives exactly as long as the kernel keeps an object embedding
//! a `percpu_ref`: until its owner has let go **and** the ref has drained.
//!
//! * A [`PercpuArc`] is an owner. Handles are counted (an ordinary atomic
//!   count: owners are few and long-lived); dropping the last one *orphans*
//!   the ref: it is killed if it is live, and marked `ORPHANED` so nobody
//!   can revive it any more.
//! * An [`OwnedRef`] is a counted reference on the `PercpuRef` itself,
//!   taken with [`tryget_owned`](PercpuArc::tryget_owned) or
//!   [`tryget_live_owned`](PercpuArc::tryget_live_owned): a per-CPU add,
//!   nothing else. It holds a raw pointer to the allocation.
//! * The allocation is freed once both have happened: by the thread whose
//!   `finish_release` finds `ORPHANED` set, or by the orphaning handle drop
//!   if the release had already finished. Both are read-modify-writes of
//!   the state word, so exactly one of them sees the other and frees.
//!
//! So the last `OwnedRef` to drop after the owners are gone runs the
//! release and frees the memory (like `percpu_ref_put` calling a release
//! that `kfree`s the object), and while any reference or handle exists the
//! value is alive. The free is done by the caller of the put through the
//! raw pointer, after every borrow of the ref has ended.

use super::counter::{self, AfterPut, Area, PercpuRef};
use super::policy::{NoRelease, ReleasePolicy};
use super::state::*;
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
use super::track::{self, hook, HolderKind};
use super::Builder;
use crate::sync::{fence, AtomicUsize, Ordering::*};
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::NonNull;

/// The allocation: the ref first, so a pointer to it is a pointer to the
/// whole (and keeps the whole allocation's provenance).
#[repr(C)]
struct ArcInner<T, P> {
    r: PercpuRef<T, P>,
    handles: AtomicUsize,
}

/// Free an orphaned, released allocation.
///
/// # Safety
///
/// `p` came from `PercpuArc::from_ref` (a `Box<ArcInner>`), its release has
/// finished with `ORPHANED` set, this caller learned so from its own RMW of
/// the state word (so it is the only one freeing), and no reference into it
/// is alive.
unsafe fn free<T, P>(p: NonNull<PercpuRef<T, P>>) {
    // SAFETY: the caller's contract; `PercpuRef` is the first field of the
    // `repr(C)` `ArcInner`, so the pointer is the allocation's.
    drop(unsafe { Box::from_raw(p.cast::<ArcInner<T, P>>().as_ptr()) });
}

/// Handle the result of a put on a ref inside an allocation.
///
/// # Safety
///
/// As for [`free`], if `after.free` is set; `p` is not used afterwards.
unsafe fn settle<T, P>(p: NonNull<PercpuRef<T, P>>, after: AfterPut) {
    if after.free {
        // SAFETY: forwarded.
        unsafe { free(p) };
    }
    after.rethrow();
}

/// An owning handle to a [`PercpuRef`] on the heap, whose owned references
/// ([`OwnedRef`]) cost a per-CPU add to take, clone and drop — unlike an
/// `Arc<PercpuRef>`, whose clones all write one shared count.
///
/// Derefs to the [`PercpuRef`]: every operation works through it. Cloning
/// a handle makes another owner (an ordinary atomic count; owners are few).
/// **Dropping the last handle kills the ref** if it is live; the memory is
/// freed once the last reference has dropped and the release has run, on
/// whichever thread did that — as the kernel frees an object from its
/// `percpu_ref` release. After that nobody can revive the ref
/// ([`ReviveError::Orphaned`](crate::ReviveError::Orphaned)).
///
/// ```
/// use percpu_ref::{Completion, PercpuArc};
///
/// let drained = Completion::new();
/// let device = PercpuArc::new(String::from("pmem0"), drained.clone());
///
/// // `'static` references for async or cross-thread work: per-CPU adds.
/// let io = device.tryget_live_owned().expect("live");
/// let worker = std::thread::spawn(move || {
///     let again = io.clone(); // get
///     assert_eq!(&*again, "pmem0");
/// }); // puts
///
/// drop(device); // the last owner: kills the ref; `io` keeps it alive
/// worker.join().unwrap();
/// drained.wait(); // the last put ran the release (and freed the memory)
/// ```
pub struct PercpuArc<T, P: ReleasePolicy<T> = NoRelease> {
    inner: NonNull<ArcInner<T, P>>,
}

// SAFETY: handles share the `PercpuRef` (like `Arc<PercpuRef<T, P>>`): the
// value and policy are used from any thread (`Sync`), and the release and
// the final drop may run on any thread (`Send`).
unsafe impl<T: Send + Sync, P: ReleasePolicy<T> + Send + Sync> Send for PercpuArc<T, P> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send + Sync, P: ReleasePolicy<T> + Send + Sync> Sync for PercpuArc<T, P> {}

impl<T, P: ReleasePolicy<T>> PercpuArc<T, P> {
    /// A live ref in percpu mode holding its initial reference, owned by
    /// the returned handle. See [`Builder::build_arc`] for the other modes.
    #[doc(alias = "percpu_ref_init")]
    pub fn new(value: T, policy: P) -> Self {
        PercpuRef::builder(value).release(policy).build_arc()
    }

    pub(super) fn from_builder(b: Builder<T, P>) -> Self {
        let inner = Box::new(ArcInner {
            r: b.build(),
            handles: AtomicUsize::new(1),
        });
        // Relaxed: the ref is not shared yet; the handle's publication
        // carries the happens-before.
        inner.r.state().fetch_or(IN_ARC, Relaxed);
        PercpuArc {
            inner: NonNull::from(Box::leak(inner)),
        }
    }

    fn ptr(&self) -> NonNull<PercpuRef<T, P>> {
        self.inner.cast()
    }

    /// [`tryget`](PercpuRef::tryget) as an owned, `'static` reference.
    #[doc(alias = "percpu_ref_tryget")]
    #[inline]
    #[must_use = "dropping the OwnedRef puts it at once"]
    pub fn tryget_owned(&self) -> Option<OwnedRef<T, P>> {
        self.tryget_one(false)
            .map(|area| OwnedRef::new(self.ptr(), area))
    }

    /// [`tryget_live`](PercpuRef::tryget_live) as an owned, `'static`
    /// reference: fine to hold across `.await` or send to another thread.
    #[doc(alias = "percpu_ref_tryget_live")]
    #[inline]
    #[must_use = "dropping the OwnedRef puts it at once"]
    pub fn tryget_live_owned(&self) -> Option<OwnedRef<T, P>> {
        self.tryget_one(true)
            .map(|area| OwnedRef::new(self.ptr(), area))
    }

    /// The ref's address, for [`OwnedRef::from_raw`] of a raw reference
    /// taken with [`get_many`](PercpuRef::get_many) (like `Arc::as_ptr`).
    pub fn as_ptr(this: &Self) -> *const PercpuRef<T, P> {
        this.ptr().as_ptr()
    }

    /// Number of handles (owners) right now; a snapshot.
    pub fn handle_count(this: &Self) -> usize {
        // Relaxed: a snapshot for diagnostics.
        // SAFETY: our handle keeps the allocation alive.
        unsafe { this.inner.as_ref() }.handles.load(Relaxed)
    }

    /// The last handle is gone: kill the ref (if live) and mark it
    /// orphaned, under its lock so no revive can slip in between; free the
    /// allocation if the release has already finished.
    ///
    /// # Safety
    ///
    /// `inner` is a live allocation whose handle count just dropped to zero
    /// on this thread (with an Acquire fence after it).
    #[cold]
    unsafe fn orphan(inner: NonNull<ArcInner<T, P>>) {
        let p: NonNull<PercpuRef<T, P>> = inner.cast();
        let (after, free_now) = {
            // SAFETY: live (caller); this borrow ends before any free.
            let r = unsafe { p.as_ref() };
            let g = r.guard();
            // Relaxed: under the lock; the unlock below is the RMW that
            // decides the free.
            let prev = r.state().fetch_or(ORPHANED, Relaxed);
            let mut killing = None;
            if prev & DEAD == 0 {
                if let Ok(mut k) = r.kill_begin() {
                    if k.needs_barrier(r.kind()) {
                        crate::sys::rseq::fence_all_cpus();
                    }
                    r.kill_fold(&mut k);
                    // An underflow is the users' misuse; the ref is killed
                    // regardless, and `check()` reports it.
                    let _ = r.kill_put(&mut k);
                    killing = Some(k);
                }
            }
            // A release that finished while we held the lock did not free
            // (it saw LOCKED): the unlock's RMW tells us, and we free.
            // Otherwise the finish of the running (or our own) release
            // sees ORPHANED without LOCKED and frees.
            let before = g.unlock();
            let after = match killing {
                Some(k) => r.kill_finish(k),
                None => AfterPut::NOTHING,
            };
            (after, before & (RELEASED | RELEASING) == RELEASED)
        };
        if free_now {
            debug_assert!(!after.free);
            // SAFETY: released and orphaned, learned by our unlock's RMW;
            // no reference into the allocation is alive.
            unsafe { free(p) };
            after.rethrow();
            return;
        }
        // SAFETY: `after.free` is set only by a finish (here, of our own
        // kill's release) that saw ORPHANED without LOCKED: this thread
        // frees; the borrow above has ended.
        unsafe { settle(p, after) };
    }
}

impl<T, P: ReleasePolicy<T>> Deref for PercpuArc<T, P> {
    type Target = PercpuRef<T, P>;
    #[inline]
    fn deref(&self) -> &PercpuRef<T, P> {
        // SAFETY: a handle keeps the allocation alive.
        unsafe { &self.inner.as_ref().r }
    }
}

impl<T, P: ReleasePolicy<T>> Clone for PercpuArc<T, P> {
    fn clone(&self) -> Self {
        // Relaxed: as `Arc::clone`, a new handle from an existing one.
        // SAFETY: our handle keeps the allocation alive.
        let old = unsafe { self.inner.as_ref() }.handles.fetch_add(1, Relaxed);
        if old > isize::MAX as usize {
            // As `Arc`: a count this high means handles are being leaked.
            std::process::abort();
        }
        PercpuArc { inner: self.inner }
    }
}

impl<T, P: ReleasePolicy<T>> Drop for PercpuArc<T, P> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire fence of the last handle's drop,
        // as in `Arc::drop`.
        // SAFETY: our handle keeps the allocation alive until this RMW.
        if unsafe { self.inner.as_ref() }.handles.fetch_sub(1, Release) != 1 {
            return;
        }
        fence(Acquire);
        // SAFETY: the handle count reached zero on this thread.
        unsafe { Self::orphan(self.inner) };
    }
}

impl<T: fmt::Debug, P: ReleasePolicy<T>> fmt::Debug for PercpuArc<T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PercpuArc").field(&**self).finish()
    }
}

/// A `'static` counted reference to a [`PercpuArc`]'s ref: `Send`, fine to
/// hold across `.await`, and as cheap as a borrowed [`Ref`](crate::Ref):
/// taking, cloning and dropping one is an add on the current CPU's slot. It
/// keeps the value alive even after every [`PercpuArc`] handle is gone.
///
/// ```
/// use percpu_ref::{NoRelease, PercpuArc};
/// let r = PercpuArc::new(String::from("log"), NoRelease);
/// let owned = r.tryget_live_owned().unwrap();
/// drop(r); // the owner goes first
/// std::thread::spawn(move || assert_eq!(&*owned, "log")).join().unwrap();
/// ```
#[must_use = "dropping an OwnedRef puts it at once"]
pub struct OwnedRef<T, P: ReleasePolicy<T> = NoRelease> {
    /// Into a `PercpuArc` allocation (with its provenance); we hold one
    /// count on the ref.
    ptr: NonNull<PercpuRef<T, P>>,
    /// As in `Ref`: no load before the restartable sequence.
    area: Area,
    /// The holder's record (feature `track`; zero-sized without it).
    #[cfg(not(percpu_ref_untracked))]
    holder: track::Token,
}

// SAFETY: as for `PercpuArc`: a shared reference to the ref whose final
// put may run the release and free the allocation on any thread.
unsafe impl<T: Send + Sync, P: ReleasePolicy<T> + Send + Sync> Send for OwnedRef<T, P> {}
// SAFETY: as for `Send`; `&OwnedRef` only gives `&T`.
unsafe impl<T: Send + Sync, P: ReleasePolicy<T> + Send + Sync> Sync for OwnedRef<T, P> {}

impl<T, P: ReleasePolicy<T>> OwnedRef<T, P> {
    /// Wrap a reference this thread just took on the ref at `ptr`.
    #[inline(always)]
    fn new(ptr: NonNull<PercpuRef<T, P>>, area: Area) -> Self {
        OwnedRef {
            ptr,
            area,
            // SAFETY: the caller just took a count, which keeps the
            // allocation alive.
            #[cfg(not(percpu_ref_untracked))]
            holder: unsafe { ptr.as_ref() }
                .tracker
                .take(HolderKind::OwnedRef, None),
        }
    }

    #[inline]
    fn r(&self) -> &PercpuRef<T, P> {
        // SAFETY: our count keeps the ref from being released, hence the
        // allocation from being freed.
        unsafe { self.ptr.as_ref() }
    }

    /// The ref this reference counts on.
    pub fn percpu_ref(this: &Self) -> &PercpuRef<T, P> {
        this.r()
    }

    /// Turn into a raw pointer: the count stays, nothing will put it. Give
    /// it back with [`from_raw`](Self::from_raw); a lost raw reference keeps
    /// the ref (and its memory) from ever being released.
    #[must_use = "a lost raw reference keeps the ref from ever draining"]
    pub fn into_raw(this: Self) -> *const PercpuRef<T, P> {
        let this = ManuallyDrop::new(this);
        hook!(this.r().tracker.to_raw(&this.holder));
        this.ptr.as_ptr()
    }

    /// Re-wrap a raw reference as an owned one.
    ///
    /// ```
    /// use percpu_ref::{NoRelease, OwnedRef, PercpuArc};
    /// let r = PercpuArc::new(5, NoRelease);
    /// let raw = OwnedRef::into_raw(r.tryget_owned().unwrap());
    /// // SAFETY: `raw` holds the count `into_raw` kept.
    /// let back = unsafe { OwnedRef::from_raw(raw) };
    /// assert_eq!(*back, 5);
    /// // SAFETY: we hold a reference (`back`) while taking a raw one, and
    /// // hand that raw one to `from_raw` with the ref's address.
    /// let more = unsafe {
    ///     r.get_many(1);
    ///     OwnedRef::from_raw(PercpuArc::as_ptr(&r))
    /// };
    /// drop((back, more));
    /// ```
    ///
    /// # Safety
    ///
    /// `p` came from `OwnedRef::into_raw` or [`PercpuArc::as_ptr`] (of the
    /// same `T`, `P`), and the caller owns one raw reference on that ref
    /// (kept by `into_raw`, [`Ref::into_raw`](crate::Ref::into_raw) or taken
    /// with [`get_many`](PercpuRef::get_many)); it is consumed.
    pub unsafe fn from_raw(p: *const PercpuRef<T, P>) -> Self {
        // SAFETY: from `into_raw`, never null.
        let ptr = unsafe { NonNull::new_unchecked(p.cast_mut()) };
        // SAFETY: the raw count we own keeps the allocation alive.
        hook!(unsafe { ptr.as_ref() }.tracker.raw_put(1));
        OwnedRef::new(ptr, counter::area())
    }
}

impl<T, P: ReleasePolicy<T>> Clone for OwnedRef<T, P> {
    #[inline(always)]
    fn clone(&self) -> Self {
        self.r().get_one(self.area);
        OwnedRef {
            ptr: self.ptr,
            area: self.area,
            #[cfg(not(percpu_ref_untracked))]
            holder: self
                .r()
                .tracker
                .clone_of(&self.holder, HolderKind::OwnedRef),
        }
    }
}

impl<T, P: ReleasePolicy<T>> Drop for OwnedRef<T, P> {
    #[inline(always)]
    fn drop(&mut self) {
        // Before the put, which may free the allocation.
        hook!(self.r().tracker.give_back(&self.holder));
        let after = self.r().put_one(self.area);
        // SAFETY: `free` is set only for the put that finished the release
        // of an orphaned ref, i.e. this one; the borrow above has ended and
        // `self.ptr` is not used again.
        unsafe { settle(self.ptr, after) };
    }
}

impl<T, P: ReleasePolicy<T>> Deref for OwnedRef<T, P> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.r().value
    }
}

impl<T: fmt::Debug, P: ReleasePolicy<T>> fmt::Debug for OwnedRef<T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OwnedRef").field(&self.r().value).finish()
    }
}
