//! `PercpuRef<T, P>`: the header, the counting fast paths, the zero
//! crossing and the release.
//!
//! # The count
//!
//! The true count is `central - BIAS + Σ column` while the ref counts per
//! CPU (it holds a slot column, the gate is open) and `central` otherwise.
//! Counting on the central count is correct in every mode; counting on a
//! slot is correct whenever the slot still belongs to the ref's open column
//! — which the restartable sequence (rseq tier: it reads the gate inside the
//! sequence) or the slot's key (portable tier: compare-exchange) checks in
//! the same step that adds. So a stale view of the mode can never lose a
//! count: an add the column refuses goes to the central count.
//!
//! # Zero, and exactly one release per life
//!
//! Zero can only be reached on the central count, and only once the bias
//! is gone (a fold), or by underflow. Within one life the central count
//! starts above zero and moves by read-modify-writes, so at most one RMW
//! takes it from `> 0` to `<= 0` (a get needs a held reference, a tryget
//! refuses at `<= 0`). The thread whose RMW did it — a put, or a fold under
//! the switch lock — then claims the release (`RELEASING`) with one RMW of
//! the state word if the ref is killed (one RMW: two claimants can never
//! both win). A kill whose own put leaves the count `<= 0` without crossing
//! (the count had already crossed while live: an underflow) claims it under
//! the lock. So every killed life whose count is `<= 0` has exactly one
//! claim, made either under the lock or by the crossing put.
//!
//! `reinit` (under the lock) waits until the claimed release has finished
//! (`RELEASED`); only then does it start a new life. Hence no claim of an
//! old life can land on the new one (a crossing put's claim is either
//! recorded before `RELEASED` appears, or never needed), no release is
//! skipped, two releases of one ref never overlap, and `reinit` never
//! returns while the previous release is still running — unless `reinit`
//! is called from inside that release, on its own thread; then it finishes
//! the release's bookkeeping itself and the release's remaining code runs
//! beside the new life, as the caller asked.
//!
//! A release claimed under the switch lock runs after the lock is
//! released, so a release may itself switch, revive or kill refs.

use super::lock::{self, Releasing};
use super::policy::ReleasePolicy;
use super::slots::{self, keyed, Column, Kind};
use super::state::*;
use crate::sync::{fence, AtomicI64, AtomicU32, Ordering::*};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

#[cfg(percpu_ref_rseq)]
use crate::sys::rseq as seq;
pub(crate) use crate::sys::rseq::Gate;

/// What a reference handle carries so that its get and put need no load
/// before the restartable sequence: the rseq area token (4 bytes; `None`
/// where the tier is not available at run time). Zero-sized on builds
/// without the rseq tier.
#[cfg(percpu_ref_rseq)]
pub(crate) type Area = Option<seq::Area>;
/// See the rseq build's `Area`.
#[cfg(not(percpu_ref_rseq))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Area;

/// The [`Area`] of this process (a token to keep next to a reference).
#[inline(always)]
pub(crate) fn area() -> Area {
    #[cfg(percpu_ref_rseq)]
    {
        seq::Area::get()
    }
    #[cfg(not(percpu_ref_rseq))]
    {
        Area
    }
}

/// Central updates of an adaptive ref that found the count changed under
/// them before it promotes itself to percpu mode (1 under a model checker,
/// which explores the first contention but not the 64th).
const PROMOTE_AFTER: u32 = if cfg!(percpu_ref_model) { 1 } else { 64 };

/// A reference count with the Linux kernel's `percpu_ref` semantics, owning
/// the counted value `T` and a [`ReleasePolicy`] `P`.
///
/// See the [crate docs](crate) for the lifecycle. In short: while live,
/// [`tryget`](Self::tryget) and [`tryget_live`](Self::tryget_live) hand out
/// [`Ref`](crate::Ref)s whose clone and drop cost one add on the current
/// CPU's slot; [`kill`](Self::kill) refuses new live references and drops
/// the owner's initial reference; when the count then drains to zero the
/// policy's `release` runs exactly once.
///
/// Dropping a `PercpuRef` that was never killed drops `T` and does **not**
/// run the release (like the kernel's `percpu_ref_exit`). To share a ref
/// with `'static` references that keep it alive, use
/// [`PercpuArc`](crate::PercpuArc).
///
/// # Memory
///
/// The header is 32 bytes besides `T` and `P`: the gate (4-byte CPU limit,
/// 4-byte state word with the switch lock, 8-byte column pointer), the
/// 8-byte central count, the 4-byte portable-tier key and a 4-byte
/// contention counter. A ref counting per CPU also holds a slot column of 8
/// bytes per possible CPU ([`slot_bytes_per_ref`](crate::slot_bytes_per_ref));
/// atomic and dead refs hold none.
///
/// # `fork()`
///
/// A child created by `fork()` may create, use, kill and drop refs, its
/// copies included: the crate's process-wide locks are held across every
/// fork (`pthread_atfork`), so the child never inherits one held. A ref
/// that another thread was switching or killing at the instant of the
/// fork stays locked in the child, as any mutex would; leave such refs
/// alone there.
///
/// ```
/// use percpu_ref::PercpuRef;
/// use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
///
/// let releases = AtomicUsize::new(0);
/// let dev = PercpuRef::new(String::from("nvme0"), |name: &String| {
///     assert_eq!(name, "nvme0");
///     releases.fetch_add(1, SeqCst);
/// });
/// let io = dev.tryget_live().expect("live");
/// assert_eq!(&*io, "nvme0");
///
/// dev.kill().unwrap();
/// assert!(dev.tryget_live().is_none()); // no new users...
/// let late = dev.tryget().expect("...but the count is not zero yet");
/// drop((io, late));
/// assert_eq!(releases.load(SeqCst), 1); // the last drop released it
/// ```
#[doc(alias = "percpu_ref")]
#[repr(C)]
pub struct PercpuRef<T, P = super::policy::NoRelease> {
    /// What the restartable sequences read; its `word` is the state word.
    pub(crate) gate: Gate,
    pub(crate) central: AtomicI64,
    /// Portable tier: the key this ref's slots carry (0: none taken yet).
    /// Set once, under the lock, before the first column is published;
    /// given back when the ref is dropped.
    pub(crate) key: AtomicU32,
    /// Adaptive refs: contended central updates seen (see `PROMOTE_AFTER`).
    pub(crate) heat: AtomicU32,
    /// Who holds references (feature `track`; zero-sized without it).
    #[cfg(not(percpu_ref_untracked))]
    pub(crate) tracker: super::track::Tracker,
    pub(crate) value: T,
    pub(crate) policy: P,
}

/// What a put that may have released the ref leaves its caller to do.
#[must_use]
pub(crate) struct AfterPut {
    /// The ref lives in a `PercpuArc` allocation whose last handle is gone
    /// and whose release has finished: the caller frees it.
    pub(crate) free: bool,
    /// The release panicked: re-raise it once the bookkeeping is done.
    pub(crate) panic: Option<Box<dyn Any + Send>>,
}

impl AfterPut {
    pub(crate) const NOTHING: AfterPut = AfterPut {
        free: false,
        panic: None,
    };

    /// Re-raise a panic of the release, if there was one. Inlined into
    /// every put: for a put that released nothing it compiles to nothing.
    #[inline(always)]
    pub(crate) fn rethrow(self) {
        if let Some(p) = self.panic {
            resume(p);
        }
    }
}

#[cold]
#[inline(never)]
fn resume(p: Box<dyn Any + Send>) -> ! {
    std::panic::resume_unwind(p)
}

/// A release claimed by this thread, to run once no lock is held.
#[must_use]
pub(crate) struct Claim;

impl<T, P> PercpuRef<T, P> {
    #[inline(always)]
    pub(crate) fn state(&self) -> &AtomicU32 {
        &self.gate.word
    }

    /// The counted value.
    #[inline]
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The release policy.
    #[inline]
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Where the ref counts now. Killed refs are always
    /// [`Mode::Atomic`](crate::Mode::Atomic).
    pub fn mode(&self) -> crate::Mode {
        // Relaxed: an observer; the answer may be stale the moment it returns.
        if self.state().load(Relaxed) & ATOMIC != 0 {
            crate::Mode::Atomic
        } else {
            crate::Mode::Percpu
        }
    }

    /// The counting tier of this ref.
    pub fn tier(&self) -> crate::Tier {
        // Relaxed: PORTABLE never changes after construction.
        if self.state().load(Relaxed) & PORTABLE != 0 {
            crate::Tier::Portable
        } else {
            crate::Tier::Rseq
        }
    }

    /// Killed (dying or released)? Like `percpu_ref_is_dying`.
    #[doc(alias = "percpu_ref_is_dying")]
    pub fn is_dying(&self) -> bool {
        // Relaxed: an observer, as in the kernel.
        self.state().load(Relaxed) & DEAD != 0
    }

    /// Is the count zero? Only an atomic-mode ref can be zero (per-CPU
    /// counts are not summed here), as in `percpu_ref_is_zero`.
    #[doc(alias = "percpu_ref_is_zero")]
    pub fn is_zero(&self) -> bool {
        // Relaxed: a percpu-mode ref holds its initial reference.
        self.state().load(Relaxed) & ATOMIC != 0
            // Acquire: pairs with the AcqRel decrement that reached zero, so
            // a caller that sees zero also sees every holder's last use.
            && self.central.load(Acquire) == 0
    }

    /// `Err(Underflow)` once more puts than gets were seen (sticky). Puts
    /// in percpu mode are only checked when the slots are summed, i.e. at
    /// the next switch to atomic mode or kill.
    pub fn check(&self) -> Result<(), super::Underflow> {
        // Relaxed: a sticky diagnostic flag.
        if self.state().load(Relaxed) & UNDERFLOW != 0 {
            Err(super::Underflow)
        } else {
            Ok(())
        }
    }

    /// The free list this ref's columns come from.
    pub(crate) fn kind(&self) -> Kind {
        // Relaxed: PORTABLE never changes after construction.
        if self.state().load(Relaxed) & PORTABLE != 0 {
            Kind::Portable
        } else {
            Kind::Rseq
        }
    }

    /// The column the ref holds, if any.
    pub(crate) fn column(&self) -> Option<Column> {
        // Relaxed: read by the lock holder, who is the only writer.
        let p = self.gate.column.load(Relaxed);
        // SAFETY: only arena columns are stored in the gate.
        (!p.is_null()).then(|| unsafe { Column::from_ptr(p) })
    }
}

impl<T, P: ReleasePolicy<T>> PercpuRef<T, P> {
    // ------------------------------------------------------------ fast path

    /// Portable tier: add `d` on the current CPU's slot if it belongs to
    /// this ref's open column; `false`: nothing was added.
    ///
    /// `success` orders the add: Relaxed for a get, Release for a put
    /// (pairs with the AcqRel swap of the fold, so the putter's uses of
    /// `T` happen before the fold and hence before the release).
    #[inline(always)]
    fn portable_add(&self, d: i64, success: crate::sync::Ordering) -> bool {
        // Relaxed: PORTABLE never changes. An rseq-tier ref's column holds
        // plain counts that only its sequences may write.
        #[cfg(percpu_ref_rseq)]
        if self.state().load(Relaxed) & PORTABLE == 0 {
            return false;
        }
        // Acquire: pairs with the Release store in `open_column`, so the key
        // and the reset slots are visible. A stale non-null column is fine:
        // the key check below refuses it unless it is ours.
        let p = self.gate.column.load(Acquire);
        if p.is_null() {
            return false;
        }
        // Relaxed: set before the first column was published (above).
        let key = self.key.load(Relaxed);
        // SAFETY: only arena columns are stored in the gate.
        let slot = unsafe { Column::from_ptr(p) }.slot(slots::current_row());
        // Relaxed: a first guess; the compare-exchange checks it.
        let mut v = slot.load(Relaxed);
        loop {
            if keyed::key(v) != key {
                return false;
            }
            // Relaxed on failure: we retry with the value found.
            match slot.compare_exchange_weak(v, keyed::add(v, d), success, Relaxed) {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
    }

    /// Add `d > 0` references; the caller holds one, so the count is > 0.
    #[inline(always)]
    pub(crate) fn add(&self, d: i64) {
        #[cfg(percpu_ref_rseq)]
        // SAFETY: the tier is available (checked first); the gate's column
        // is open only while the ref's slots are counted by sequences
        // (lifecycle.rs keeps the protocol of `sys::rseq`: close, barrier,
        // fold; publish column, then limit); a portable ref's limit is
        // always 0.
        if seq::rseq_available() && unsafe { seq::add(&self.gate, d) } {
            return;
        }
        self.add_slow(d);
    }

    /// A get through a reference handle that carries `area`.
    #[inline(always)]
    pub(crate) fn get_one(&self, area: Area) {
        #[cfg(percpu_ref_rseq)]
        if let Some(a) = area {
            // SAFETY: `a` proves the tier; the gate protocol as in `add`.
            if unsafe { seq::add_imm_in::<1>(a, &self.gate) } {
                return;
            }
        }
        let _ = area;
        self.add_slow(1);
    }

    /// Not counted by a sequence: the portable tier or the central count.
    #[cfg_attr(percpu_ref_rseq, cold, inline(never))]
    #[cfg_attr(not(percpu_ref_rseq), inline(always))]
    fn add_slow(&self, d: i64) {
        // Relaxed: making a reference from an existing one needs no
        // ordering (as `Arc::clone`).
        if self.portable_add(d, Relaxed) {
            return;
        }
        self.central_add(d);
    }

    #[cold]
    #[inline(never)]
    fn central_add(&self, d: i64) {
        // Relaxed: as in `add_slow`; the caller's reference keeps the count
        // above zero, so this cannot cross.
        self.central_update(d, Relaxed);
    }

    /// Drop `d > 0` references.
    #[inline(always)]
    pub(crate) fn sub(&self, d: i64) -> AfterPut {
        #[cfg(percpu_ref_rseq)]
        // SAFETY: as in `add`. Ordering: the fold runs after membarrier,
        // which orders every committed add before it.
        if seq::rseq_available() && unsafe { seq::add(&self.gate, -d) } {
            return AfterPut::NOTHING;
        }
        self.sub_slow(d)
    }

    /// A put through a reference handle that carries `area`.
    #[inline(always)]
    pub(crate) fn put_one(&self, area: Area) -> AfterPut {
        #[cfg(percpu_ref_rseq)]
        if let Some(a) = area {
            // SAFETY: as in `get_one`; ordering as in `sub`.
            if unsafe { seq::add_imm_in::<-1>(a, &self.gate) } {
                return AfterPut::NOTHING;
            }
        }
        let _ = area;
        self.sub_slow(1)
    }

    #[cfg_attr(percpu_ref_rseq, cold, inline(never))]
    #[cfg_attr(not(percpu_ref_rseq), inline(always))]
    fn sub_slow(&self, d: i64) -> AfterPut {
        if self.portable_add(-d, Release) {
            return AfterPut::NOTHING;
        }
        self.central_sub(d)
    }

    /// Take a reference if the count is not zero (`live`: and the ref not
    /// killed); `Some` carries the area token for the new handle.
    #[inline(always)]
    pub(crate) fn tryget_one(&self, live: bool) -> Option<Area> {
        let area = area();
        #[cfg(percpu_ref_rseq)]
        if let Some(a) = area {
            // SAFETY: as in `get_one`. A committed add means the gate was
            // open inside the sequence, so the kill's membarrier (after it
            // closed the gate) had not yet passed: the fold counts this
            // reference.
            if unsafe { seq::add_imm_in::<1>(a, &self.gate) } {
                return Some(area);
            }
        }
        self.tryget_slow(live).then_some(area)
    }

    #[cfg_attr(percpu_ref_rseq, cold, inline(never))]
    #[cfg_attr(not(percpu_ref_rseq), inline(always))]
    fn tryget_slow(&self, live: bool) -> bool {
        // Relaxed: a slot that still carries our key is counted by the fold
        // that will drain it, and an open column means the ref is live and
        // holds its initial reference, so the count is > 0.
        self.portable_add(1, Relaxed) || self.central_tryget(live)
    }

    // ------------------------------------------------------------ central count

    /// `central += d`, returning the previous value. Adaptive refs use a
    /// compare-exchange to notice contention (a changed count), and promote
    /// themselves after `PROMOTE_AFTER` such updates.
    #[inline]
    fn central_update(&self, d: i64, order: crate::sync::Ordering) -> i64 {
        // Relaxed: ADAPTIVE never changes.
        if self.state().load(Relaxed) & ADAPTIVE == 0 {
            return self.central.fetch_add(d, order);
        }
        // Relaxed: a first guess for the compare-exchange.
        let mut c = self.central.load(Relaxed);
        loop {
            // Strong: a spurious failure is not contention. Relaxed on
            // failure: we retry with the value found.
            match self
                .central
                .compare_exchange(c, c.wrapping_add(d), order, Relaxed)
            {
                Ok(prev) => return prev,
                Err(now) => {
                    c = now;
                    // Still holding the reference this update gives or
                    // takes from: the ref cannot be released meanwhile.
                    self.contended();
                }
            }
        }
    }

    /// Note one contended central update; promote at the threshold. The
    /// caller holds a reference.
    #[cold]
    fn contended(&self) {
        // Relaxed: a statistic; promotion takes the lock and re-checks.
        if self.heat.fetch_add(1, Relaxed) + 1 == PROMOTE_AFTER {
            self.promote();
        }
    }

    /// Drop `d` references on the central count; may release.
    #[cold]
    #[inline(never)]
    fn central_sub(&self, d: i64) -> AfterPut {
        // AcqRel: Release publishes this holder's uses of `T`; Acquire makes
        // the put that reaches zero see every other holder's (all of them
        // released on the central count, or on a slot the fold acquired and
        // then released into the central count).
        let prev = self.central_update(-d, AcqRel);
        match self.after_central_change(prev, prev.wrapping_sub(d)) {
            Some(claim) => self.run_release(claim),
            None => AfterPut::NOTHING,
        }
    }

    /// React to this thread's RMW moving the central count from `prev` to
    /// `now`: record a crossing to zero (and claim the release if killed),
    /// or flag an underflow.
    pub(crate) fn after_central_change(&self, prev: i64, now: i64) -> Option<Claim> {
        if now > 0 {
            return None;
        }
        if prev > 0 {
            return self.crossed_zero(now);
        }
        // Relaxed: a sticky diagnostic flag.
        self.state().fetch_or(UNDERFLOW, Relaxed);
        None
    }

    /// This thread's RMW took the central count from `> 0` to `now <= 0`:
    /// the one crossing of this life.
    #[cold]
    fn crossed_zero(&self, now: i64) -> Option<Claim> {
        let mut claimed = false;
        // AcqRel: Acquire sees DEAD if the kill's fold or put preceded our
        // RMW on the central count (they are ordered before it by that
        // count's AcqRel chain); Release publishes the claim to `reinit`.
        let prev = self
            .state()
            .fetch_update(AcqRel, Acquire, |s| {
                let mut n = s;
                claimed = s & DEAD != 0 && s & (RELEASING | RELEASED) == 0;
                if claimed {
                    n |= RELEASING;
                }
                if s & DEAD == 0 || now < 0 {
                    // Zero while live (the owner's reference was put by
                    // someone else), or below zero: more puts than gets.
                    n |= UNDERFLOW;
                }
                Some(n)
            })
            .unwrap_or_else(|s| s);
        lock::wake_if_parked(self.state(), prev);
        claimed.then_some(Claim)
    }

    /// Under the lock, on a killed ref whose count is `<= 0` and crossed
    /// before the kill: claim its release unless someone did.
    pub(crate) fn claim_locked(&self) -> Option<Claim> {
        let mut claimed = false;
        // AcqRel: as in `crossed_zero`.
        let _ = self.state().fetch_update(AcqRel, Acquire, |s| {
            claimed = s & (RELEASING | RELEASED) == 0;
            claimed.then_some(s | RELEASING)
        });
        claimed.then_some(Claim)
    }

    /// Central `inc_not_zero`, optionally refusing killed refs.
    #[cold]
    #[inline(never)]
    pub(crate) fn central_tryget(&self, live: bool) -> bool {
        // Acquire: a sequence or slot refused this get because a switch
        // closed the column; pairs with the Release of that closing (and of
        // the drain's swaps) so the DEAD a kill set before it is visible.
        fence(Acquire);
        // Relaxed: only a starting guess for the CAS below.
        let mut c = self.central.load(Relaxed);
        let mut contended = false;
        loop {
            // Acquire: pairs with the SeqCst RMW that set DEAD in kill, so a
            // caller ordered after the kill's confirm sees it.
            if live && self.state().load(Acquire) & DEAD != 0 {
                return false;
            }
            if c <= 0 {
                return false;
            }
            // Acquire: pairs with the Release half of the last change of
            // the count (a revive), so a new reference sees the value as it
            // was published. Relaxed on failure: we retry with the new value.
            match self
                .central
                .compare_exchange_weak(c, c + 1, Acquire, Relaxed)
            {
                Ok(_) => {
                    // Relaxed: ADAPTIVE never changes. We hold the new
                    // reference while promoting.
                    if contended && self.state().load(Relaxed) & ADAPTIVE != 0 {
                        self.contended();
                    }
                    return true;
                }
                Err(now) => {
                    contended |= now != c;
                    c = now;
                }
            }
        }
    }

    // ------------------------------------------------------------ release

    /// Run the claimed release now (no lock held), then finish it.
    #[cold]
    #[inline(never)]
    pub(crate) fn run_release(&self, _claim: Claim) -> AfterPut {
        let marker = Releasing::enter(self.state());
        // The release runs user code: if it panics, the bookkeeping below
        // still runs (waiters must not hang, the allocation must be freed),
        // and the caller re-raises the panic.
        let result = catch_unwind(AssertUnwindSafe(|| self.policy.release(&self.value)));
        let free = !marker.finished_inside() && self.finish_release();
        AfterPut {
            free,
            panic: result.err(),
        }
    }

    /// The claimed release returned: mark it finished. `true` if the ref
    /// lives in an orphaned `PercpuArc` allocation the caller must now free:
    /// orphaned, and not locked — a lock holder of an orphaned ref whose
    /// release could finish is the orphaning handle drop itself, which
    /// checks again when it unlocks (see `arc.rs`).
    pub(crate) fn finish_release(&self) -> bool {
        // AcqRel: Release publishes the release's effects to `reinit` and
        // to the orphaning handle drop (which Acquire this word); Acquire
        // pairs with that drop's RMW if it came first.
        let prev = self.state().fetch_xor(RELEASING | RELEASED, AcqRel);
        debug_assert!(prev & RELEASING != 0 && prev & RELEASED == 0);
        lock::wake_if_parked(self.state(), prev);
        prev & (IN_ARC | ORPHANED | LOCKED) == IN_ARC | ORPHANED
    }

    /// The result of a put that ran under the switch lock: run the claim
    /// (if any) now that the lock is released.
    pub(crate) fn after_unlock(&self, claim: Option<Claim>) -> AfterPut {
        match claim {
            Some(c) => self.run_release(c),
            None => AfterPut::NOTHING,
        }
    }
}

impl<T, P> PercpuRef<T, P> {
    /// Give the column (if any) back without a fold: `&mut self`, nobody
    /// else can touch the ref.
    fn drop_column(&mut self) {
        if let Some(c) = self.column() {
            for row in 0..slots::rows() {
                // Relaxed: exclusive access.
                c.slot(row).store(0, Relaxed);
            }
            slots::give_back(self.kind(), c);
        }
    }
}

impl<T, P> Drop for PercpuRef<T, P> {
    fn drop(&mut self) {
        self.drop_column();
        // Relaxed: exclusive access.
        let key = self.key.load(Relaxed);
        if key != 0 {
            slots::keys::give_back(key);
        }
    }
}

impl<T: std::fmt::Debug, P> std::fmt::Debug for PercpuRef<T, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Relaxed: a snapshot for humans.
        let s = self.state().load(Relaxed);
        f.debug_struct("PercpuRef")
            .field("value", &self.value)
            .field("mode", &self.mode())
            .field("dead", &(s & DEAD != 0))
            .field("released", &(s & RELEASED != 0))
            .field("underflow", &(s & UNDERFLOW != 0))
            .finish_non_exhaustive()
    }
}
