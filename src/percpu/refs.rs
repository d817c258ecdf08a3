//! Taking references: `tryget*`, raw `get_many`/`put_many`, and the
//! borrowed [`Ref`] handle.

use super::counter::{self, Area, PercpuRef};
use super::policy::{NoRelease, ReleasePolicy};
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
use super::track::{self, hook, HolderKind};
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::Deref;

impl<T, P: ReleasePolicy<T>> PercpuRef<T, P> {
    /// Take a reference if the count is not zero, **even if the ref is
    /// dying** (`percpu_ref_tryget`). Fails only once released.
    ///
    /// In percpu mode this is the same per-CPU add as cloning a [`Ref`].
    #[doc(alias = "percpu_ref_tryget")]
    #[inline]
    #[must_use = "dropping the Ref puts it at once"]
    pub fn tryget(&self) -> Option<Ref<'_, T, P>> {
        self.tryget_one(false)
            .map(|area| Ref::new(self, area, None))
    }

    /// Take a reference only if the ref was not killed
    /// (`percpu_ref_tryget_live`).
    ///
    /// Every call that starts after a
    /// [`kill_and_confirm`](Self::kill_and_confirm) callback has run
    /// (ordered after it, e.g. by a flag the callback sets) fails. A call
    /// racing the kill itself may still succeed; the count then waits for
    /// that reference too.
    #[doc(alias = "percpu_ref_tryget_live")]
    #[inline]
    #[must_use = "dropping the Ref puts it at once"]
    pub fn tryget_live(&self) -> Option<Ref<'_, T, P>> {
        self.tryget_one(true).map(|area| Ref::new(self, area, None))
    }

    /// [`tryget_live`](Self::tryget_live), recording `label` as the
    /// holder's label (feature `track`; see [`holders`](Self::holders)).
    /// Without the feature the label is ignored.
    ///
    /// ```
    /// use percpu_ref::{NoRelease, PercpuRef};
    /// let r = PercpuRef::new(0u8, NoRelease);
    /// let held = r.tryget_live_tagged("compaction").unwrap();
    /// if let Some(h) = r.holders().iter().next() {
    ///     assert_eq!(h.label(), Some("compaction")); // with `track`
    /// }
    /// # drop(held);
    /// ```
    #[inline]
    #[must_use = "dropping the Ref puts it at once"]
    pub fn tryget_live_tagged(&self, label: &'static str) -> Option<Ref<'_, T, P>> {
        self.tryget_one(true)
            .map(|area| Ref::new(self, area, Some(label)))
    }

    /// Who holds references right now (feature `track`): one [`Holder`]
    /// per [`Ref`] and [`OwnedRef`](crate::OwnedRef), and the raw
    /// references' ledger. Its `Display` is a leak report, for a shutdown
    /// that waits too long. Without the feature the report is empty and
    /// says that tracking is off.
    ///
    /// A snapshot: exact for references that are held the whole time it
    /// is taken (a shutdown waiting on leaked references); one taken or
    /// dropped meanwhile may or may not appear. The owner's initial
    /// reference is not a holder.
    ///
    /// # Cost of tracking
    ///
    /// Every reference taken and given back registers and removes a record
    /// in one of the ref's per-CPU shards (a short lock each, `O(1)`):
    /// about 400 more instructions per get+put (`scripts/zero-cost.sh`),
    /// and 40–55 ns more per pair measured on an Intel Xeon under KVM
    /// (`benches/track.rs`, one run: `tryget_live`+drop 1.8 → 43 ns, clone
    /// 1.6 → 54 ns, `OwnedRef` 1.9 → 44 ns, two threads on one ref 1.7 →
    /// 44 ns). **With `RUST_BACKTRACE` set every reference captures a
    /// backtrace** (about 3.5 µs per pair in the same run): set
    /// `RUST_LIB_BACKTRACE=0` to keep panic backtraces without that.
    /// A `fork()` child records holders without backtraces: its copy of
    /// std's backtrace lock stays held for good if a parent thread held it
    /// at the fork (printing a panic, say), and a capture would never
    /// return.
    /// Without the feature nothing is recorded and get/put run the same
    /// instructions as a build without the tracking code
    /// (`scripts/zero-cost.sh`).
    ///
    /// ```
    /// use percpu_ref::{Completion, PercpuRef};
    /// use std::time::Duration;
    ///
    /// let done = Completion::new();
    /// let r = PercpuRef::new(0u8, done.clone());
    /// let leaked = r.tryget_live_tagged("compaction").unwrap();
    /// r.kill().unwrap();
    /// if !done.wait_timeout(Duration::from_millis(1)) {
    ///     let report = r.holders();
    ///     eprintln!("shutdown stuck: {report}");
    ///     if report.is_tracked() {
    ///         assert!(report.to_string().contains("label compaction"));
    ///     }
    /// }
    /// # drop(leaked);
    /// ```
    ///
    /// [`Holder`]: crate::Holder
    pub fn holders(&self) -> track::Holders {
        #[cfg(not(percpu_ref_untracked))]
        return self.tracker.holders();
        #[cfg(percpu_ref_untracked)]
        track::Holders::default()
    }

    /// Add `n` raw references (`percpu_ref_get_many`), e.g. one per object a
    /// pool hands out. Balance them with [`put_many`](Self::put_many).
    ///
    /// # Safety
    ///
    /// The caller must hold at least one reference (a [`Ref`], a raw one, or
    /// be the owner before [`kill`](Self::kill)) for the duration of the
    /// call, so the count cannot be zero, and `n <= i64::MAX as usize`.
    #[doc(alias = "percpu_ref_get_many")]
    #[inline]
    pub unsafe fn get_many(&self, n: usize) {
        if n != 0 {
            self.add(n as i64);
            hook!(self.tracker.raw_get(n));
        }
    }

    /// Drop `n` raw references (`percpu_ref_put_many`).
    ///
    /// An unbalanced put is detected when the count is summed (see
    /// [`check`](Self::check)) and never runs the release twice.
    ///
    /// # Safety
    ///
    /// The caller must own `n` raw references, taken with
    /// [`get_many`](Self::get_many) or [`Ref::into_raw`]. Putting more would
    /// let the release run while [`Ref`]s still exist, breaking whatever the
    /// release policy protects (e.g. unmapping memory still in use).
    ///
    /// # Panics
    ///
    /// If this put runs the release and the release panics (the ref's
    /// bookkeeping is complete first).
    #[doc(alias = "percpu_ref_put_many")]
    #[inline]
    pub unsafe fn put_many(&self, n: usize) {
        if n != 0 {
            hook!(self.tracker.raw_put(n));
            let after = self.sub(n as i64);
            debug_assert!(!after.free, "raw puts need a live owner");
            after.rethrow();
        }
    }
}

/// A counted reference to a [`PercpuRef`]: clone is a `get`, drop is a
/// `put`, deref gives the value.
///
/// In percpu mode both are one add on the current CPU's slot; dropping the
/// last reference of a killed ref runs its release on the dropping thread
/// (and re-raises a panic of the release, after the ref's bookkeeping is
/// done).
///
/// ```
/// use percpu_ref::{NoRelease, PercpuRef};
/// let r = PercpuRef::new(7, NoRelease);
/// let a = r.tryget().unwrap();
/// let b = a.clone();
/// assert_eq!(*a + *b, 14);
/// ```
#[doc(alias("percpu_ref_get", "percpu_ref_put"))]
#[must_use = "dropping a Ref puts it at once"]
pub struct Ref<'a, T, P: ReleasePolicy<T> = NoRelease> {
    r: &'a PercpuRef<T, P>,
    /// Kept next to the pointer so clone and drop need no load before
    /// their restartable sequence.
    area: Area,
    /// The holder's record (feature `track`; zero-sized without it).
    #[cfg(not(percpu_ref_untracked))]
    holder: track::Token,
}

impl<'a, T, P: ReleasePolicy<T>> Ref<'a, T, P> {
    /// Wrap a reference this thread just took.
    #[inline(always)]
    #[allow(unused_variables)] // `label` without the tracking code
    fn new(r: &'a PercpuRef<T, P>, area: Area, label: Option<&'static str>) -> Self {
        Ref {
            r,
            area,
            #[cfg(not(percpu_ref_untracked))]
            holder: r.tracker.take(HolderKind::Ref, label),
        }
    }

    /// The ref this reference counts on.
    pub fn percpu_ref(this: &Self) -> &'a PercpuRef<T, P> {
        this.r
    }

    /// Turn into a raw reference: the count stays, nothing will put it.
    /// Give it back with [`from_raw`](Self::from_raw) or
    /// [`PercpuRef::put_many`]; a lost raw reference keeps the ref from
    /// ever being released.
    #[must_use = "a lost raw reference keeps the ref from ever draining"]
    pub fn into_raw(this: Self) -> &'a PercpuRef<T, P> {
        let this = ManuallyDrop::new(this);
        hook!(this.r.tracker.to_raw(&this.holder));
        this.r
    }

    /// Re-wrap a raw reference.
    ///
    /// # Safety
    ///
    /// The caller must own one raw reference on `r` (from
    /// [`into_raw`](Self::into_raw) or [`PercpuRef::get_many`]); it is
    /// consumed.
    pub unsafe fn from_raw(r: &'a PercpuRef<T, P>) -> Self {
        hook!(r.tracker.raw_put(1));
        Ref::new(r, counter::area(), None)
    }
}

impl<T, P: ReleasePolicy<T>> Clone for Ref<'_, T, P> {
    #[inline(always)]
    fn clone(&self) -> Self {
        self.r.get_one(self.area);
        Ref {
            r: self.r,
            area: self.area,
            #[cfg(not(percpu_ref_untracked))]
            holder: self.r.tracker.clone_of(&self.holder, HolderKind::Ref),
        }
    }
}

impl<T, P: ReleasePolicy<T>> Drop for Ref<'_, T, P> {
    #[inline(always)]
    fn drop(&mut self) {
        hook!(self.r.tracker.give_back(&self.holder));
        let after = self.r.put_one(self.area);
        // The borrow keeps an owner alive, so nothing is ours to free.
        debug_assert!(!after.free);
        after.rethrow();
    }
}

impl<T, P: ReleasePolicy<T>> Deref for Ref<'_, T, P> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.r.value
    }
}

impl<T: fmt::Debug, P: ReleasePolicy<T>> fmt::Debug for Ref<'_, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Ref").field(&self.r.value).finish()
    }
}
