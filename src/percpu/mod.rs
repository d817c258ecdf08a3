//! `PercpuRef<T, P>`: the per-CPU reference count.
//!
//! The counting scheme (the portable tier; see `docs::internals` for the
//! proof sketch):
//!
//! * The true count is `central - BIAS + Σ slots` in percpu mode and
//!   `central` in atomic mode.
//! * `get`/`put` read the mode (Relaxed: a hint only) and, in percpu mode,
//!   `fetch_add` the current CPU's slot. Counting on the central count is
//!   correct in *every* mode, and counting on a slot is correct whenever the
//!   slot is not drained — which the value the `fetch_add` returns tells. So
//!   a stale mode can never lose a count: a late adder that finds its slot
//!   drained moves its delta to the central count.
//! * Switching to atomic sets `ATOMIC`, swaps every slot to the `DRAINED`
//!   marker, and folds the sum into the central count while removing the
//!   `BIAS`. No grace period is needed.
//! * Zero can only be reached on the central count, and only once the bias
//!   is gone, i.e. in atomic mode with every slot folded in.

mod error;
pub(crate) mod policy;
mod slots;
mod state;

pub use error::{KillError, ReviveError, Underflow};

use self::slots::Slots;
use self::state::*;
use crate::sync::{fence, lock, AtomicI64, AtomicUsize, Mutex, Ordering::*};
use policy::{NoRelease, ReleasePolicy};
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::Arc;

#[cfg(not(percpu_ref_model))]
pub(crate) use slots::slot_bytes_per_ref;

/// Where a [`PercpuRef`] counts right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Per-CPU slots: `get`/`put` touch only the current CPU's slot.
    Percpu,
    /// One shared atomic count (also every killed ref).
    Atomic,
}

/// How a [`PercpuRef`] counts in percpu mode (fixed when it is built).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// A plain add on the current CPU's slot inside a restartable sequence
    /// (rseq); mode switches use `membarrier`. Linux x86_64 with glibc's
    /// rseq registration.
    Rseq,
    /// A relaxed atomic `fetch_add` on the current CPU's slot; mode
    /// switches swap each slot to a drained marker. Everywhere.
    Portable,
}

/// A reference count with the Linux kernel's `percpu_ref` semantics, owning
/// the counted value `T` and a [`ReleasePolicy`] `P`.
///
/// See the [crate docs](crate) for the lifecycle. In short: while live,
/// [`tryget`](Self::tryget) and [`tryget_live`](Self::tryget_live) hand out
/// [`Ref`]s whose clone and drop cost one uncontended per-CPU add;
/// [`kill`](Self::kill) refuses new live references and drops the owner's
/// initial reference; when the count then drains to zero the policy's
/// `release` runs exactly once.
///
/// Dropping a `PercpuRef` that was never killed drops `T` and does **not**
/// run the release (like the kernel's `percpu_ref_exit`).
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
pub struct PercpuRef<T, P = NoRelease> {
    state: AtomicUsize,
    central: AtomicI64,
    slots: Slots,
    /// Serialises mode switches, kill and revive; never taken by get/put.
    switch: Mutex<()>,
    value: T,
    policy: P,
}

/// Builder for a [`PercpuRef`]; see [`PercpuRef::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until .build()"]
pub struct Builder<T, P = NoRelease> {
    value: T,
    policy: P,
    atomic: bool,
    dead: bool,
    allow_reinit: bool,
    portable: bool,
}

impl<T, P> Builder<T, P> {
    /// Set the release policy.
    pub fn release<Q: ReleasePolicy<T>>(self, policy: Q) -> Builder<T, Q> {
        Builder {
            value: self.value,
            policy,
            atomic: self.atomic,
            dead: self.dead,
            allow_reinit: self.allow_reinit,
            portable: self.portable,
        }
    }

    /// Start in atomic mode (the kernel's `PERCPU_REF_INIT_ATOMIC`); it
    /// stays atomic across `resurrect`/`reinit` until
    /// [`switch_to_percpu`](PercpuRef::switch_to_percpu).
    pub fn atomic(mut self) -> Self {
        self.atomic = true;
        self
    }

    /// Start dead with a count of zero (`PERCPU_REF_INIT_DEAD`): no
    /// reference can be taken until [`reinit`](PercpuRef::reinit). Implies
    /// [`allow_reinit`](Self::allow_reinit). The release does not run for
    /// this initial state.
    pub fn dead(mut self) -> Self {
        self.dead = true;
        self.allow_reinit = true;
        self
    }

    /// Permit [`reinit`](PercpuRef::reinit) (and `resurrect`) after the ref
    /// was released (`PERCPU_REF_ALLOW_REINIT`).
    pub fn allow_reinit(mut self) -> Self {
        self.allow_reinit = true;
        self
    }

    /// Use the portable tier even where the rseq tier is available (the
    /// environment variable `PERCPU_REF_PORTABLE=1` does this for every
    /// ref of the process).
    pub fn portable(mut self) -> Self {
        self.portable = true;
        self
    }

    /// Build the ref.
    pub fn build(self) -> PercpuRef<T, P> {
        let mut state = 0;
        if self.portable || !crate::sys::rseq::rseq_available() {
            state |= PORTABLE;
        }
        let central;
        let slot_init;
        if self.atomic || self.dead {
            state |= ATOMIC;
            slot_init = DRAINED;
            central = if self.dead { 0 } else { 1 };
        } else {
            slot_init = 0;
            central = BIAS + 1;
        }
        if self.atomic {
            state |= FORCE_ATOMIC;
        }
        if self.dead {
            state |= DEAD | RELEASED;
        }
        if self.allow_reinit {
            state |= ALLOW_REINIT;
        }
        PercpuRef {
            state: AtomicUsize::new(state),
            central: AtomicI64::new(central),
            slots: Slots::new(slot_init),
            switch: Mutex::new(()),
            value: self.value,
            policy: self.policy,
        }
    }
}

impl<T> PercpuRef<T, NoRelease> {
    /// Start building a ref around `value` (percpu mode, live, count 1,
    /// [`NoRelease`] until [`Builder::release`] sets a policy).
    ///
    /// ```
    /// use percpu_ref::{Completion, Mode, PercpuRef};
    /// let done = Completion::new();
    /// let r = PercpuRef::builder(0u64).release(done.clone()).atomic().build();
    /// assert_eq!(r.mode(), Mode::Atomic);
    /// r.kill().unwrap();
    /// assert!(done.is_complete());
    /// ```
    pub fn builder(value: T) -> Builder<T, NoRelease> {
        Builder {
            value,
            policy: NoRelease,
            atomic: false,
            dead: false,
            allow_reinit: false,
            portable: false,
        }
    }
}

impl<T, P: ReleasePolicy<T>> PercpuRef<T, P> {
    /// A live ref in percpu mode holding its initial reference.
    pub fn new(value: T, policy: P) -> Self {
        PercpuRef::builder(value).release(policy).build()
    }
}

impl<T, P> PercpuRef<T, P> {
    /// The counted value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The release policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Where the ref counts now. Killed refs are always [`Mode::Atomic`].
    pub fn mode(&self) -> Mode {
        // Relaxed: an observer; the answer may be stale the moment it returns.
        if self.state.load(Relaxed) & ATOMIC != 0 {
            Mode::Atomic
        } else {
            Mode::Percpu
        }
    }

    /// The counting tier of this ref.
    pub fn tier(&self) -> Tier {
        // Relaxed: PORTABLE never changes after construction.
        if self.state.load(Relaxed) & PORTABLE != 0 {
            Tier::Portable
        } else {
            Tier::Rseq
        }
    }

    /// Killed (dying or released)? Like `percpu_ref_is_dying`.
    pub fn is_dying(&self) -> bool {
        // Relaxed: an observer, as in the kernel.
        self.state.load(Relaxed) & DEAD != 0
    }

    /// Is the count zero? Only an atomic-mode ref can be zero (percpu counts
    /// are not summed here), as in `percpu_ref_is_zero`.
    pub fn is_zero(&self) -> bool {
        // Relaxed: a percpu-mode ref holds its initial reference.
        self.state.load(Relaxed) & ATOMIC != 0
            // Acquire: pairs with the AcqRel decrement that reached zero, so
            // a caller that sees zero also sees every holder's last use.
            && self.central.load(Acquire) == 0
    }

    /// `Err(Underflow)` once more puts than gets were seen (sticky). Puts
    /// in percpu mode are only checked when the slots are summed, i.e. at
    /// the next switch to atomic mode or kill.
    pub fn check(&self) -> Result<(), Underflow> {
        // Relaxed: a sticky diagnostic flag.
        if self.state.load(Relaxed) & UNDERFLOW != 0 {
            Err(Underflow)
        } else {
            Ok(())
        }
    }
}

impl<T, P: ReleasePolicy<T>> PercpuRef<T, P> {
    // ---------------------------------------------------------------- fast path

    /// Add `d > 0` references; the caller holds one, so the count is > 0.
    #[inline(always)]
    fn add(&self, d: i64) {
        // Relaxed: the mode only says where to *try* counting. A slot's
        // fetch_add result (portable) or the gate read inside the
        // restartable sequence (rseq) tells whether the slot still counts;
        // counting on the central count is correct in every mode.
        let s = self.state.load(Relaxed);
        if s & ATOMIC == 0 {
            if s & PORTABLE == 0 {
                // SAFETY: PORTABLE is clear only if rseq was available when
                // this ref was built; the slots are written otherwise only
                // between ATOMIC + fence_all_cpus and clearing ATOMIC.
                if unsafe { self.slots.rseq_add(&self.state, ATOMIC, d) } {
                    return;
                }
            } else {
                // Relaxed: making a reference from an existing one needs no
                // ordering (as `Arc::clone`); the fold's swap reads this
                // value by coherence of the slot's modification order.
                let prev = self.slots.current().fetch_add(d, Relaxed);
                if !is_drained(prev) {
                    return;
                }
            }
        }
        self.central_add(d);
    }

    #[cold]
    #[inline(never)]
    fn central_add(&self, d: i64) {
        // Relaxed: as in `add`; the caller's reference keeps the count > 0.
        self.central.fetch_add(d, Relaxed);
    }

    /// Drop `d > 0` references.
    #[inline(always)]
    fn sub(&self, d: i64) {
        // Relaxed: see `add`.
        let s = self.state.load(Relaxed);
        if s & ATOMIC == 0 {
            if s & PORTABLE == 0 {
                // SAFETY: as in `add`. Ordering: the drain runs after
                // membarrier, which orders every committed add before it.
                if unsafe { self.slots.rseq_add(&self.state, ATOMIC, -d) } {
                    return;
                }
            } else {
                // Release: pairs with the AcqRel swap that drains this
                // slot, so this holder's uses of `T` happen before the fold
                // and hence before the release (which acquires the fold).
                let prev = self.slots.current().fetch_sub(d, Release);
                if !is_drained(prev) {
                    return;
                }
            }
        }
        self.central_sub(d);
    }

    #[cold]
    #[inline(never)]
    fn central_sub(&self, d: i64) -> i64 {
        // AcqRel: Release publishes this holder's uses of `T`; Acquire makes
        // the put that reaches zero see every other holder's (all of them
        // released on the central count, or on a slot the fold acquired and
        // then released into the central count).
        let prev = self.central.fetch_sub(d, AcqRel);
        let now = prev - d;
        self.after_central_change(prev, now);
        now
    }

    /// React to the central count moving from `prev` to `now`.
    fn after_central_change(&self, prev: i64, now: i64) {
        if now > 0 {
            return;
        }
        if now < 0 {
            // Relaxed: a sticky diagnostic flag.
            self.state.fetch_or(UNDERFLOW, Relaxed);
        }
        if prev > 0 {
            self.reached_zero();
        }
    }

    /// The count crossed zero on the central count: release, exactly once,
    /// if the ref was killed.
    #[cold]
    fn reached_zero(&self) {
        // The central count can only reach zero once the bias is gone, i.e.
        // after the fold of a kill (or by underflow). DEAD cannot be cleared
        // under us: revive waits for the RELEASED claim below once the count
        // is zero.
        let s = self.state.load(SeqCst);
        if s & DEAD == 0 {
            // A live ref holds its initial reference: zero is an underflow.
            self.state.fetch_or(UNDERFLOW, SeqCst);
            return;
        }
        // One RMW claims the release, so at most one put runs it even if an
        // underflowing user takes the count through zero twice.
        if self.state.fetch_or(RELEASED, SeqCst) & RELEASED == 0 {
            self.policy.release(&self.value);
        }
    }

    /// Central `inc_not_zero`, optionally refusing killed refs.
    #[cold]
    #[inline(never)]
    fn central_tryget(&self, live: bool) -> bool {
        // Relaxed: only a starting guess for the CAS below.
        let mut c = self.central.load(Relaxed);
        loop {
            // Acquire: pairs with the SeqCst store of DEAD in kill, so a
            // caller ordered after the kill's confirm sees it.
            if live && self.state.load(Acquire) & DEAD != 0 {
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
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
    }

    #[inline]
    fn tryget_inner(&self, live: bool) -> bool {
        // Relaxed: a hint, see `add`.
        let s = self.state.load(Relaxed);
        if s & ATOMIC == 0 {
            if s & PORTABLE == 0 {
                // SAFETY: as in `add`. A committed add means the gate was
                // clear inside the sequence, so the kill's membarrier (after
                // it set DEAD|ATOMIC) had not yet passed: the fold counts
                // this reference. An aborted/gated one falls through to the
                // central count, which re-reads DEAD.
                if unsafe { self.slots.rseq_add(&self.state, ATOMIC, 1) } {
                    return true;
                }
            } else {
                // Relaxed: see `add`. A non-drained slot means the fold,
                // which comes later in this slot's modification order, will
                // count it; a percpu-mode ref holds its initial reference
                // until after that fold, so the count is > 0.
                let prev = self.slots.current().fetch_add(1, Relaxed);
                if !is_drained(prev) {
                    return true;
                }
                // Drained: our +1 went to a dead slot and is discarded.
                // Acquire: pairs with the AcqRel swap that wrote the marker
                // we read; the drainer set DEAD/ATOMIC before that swap, so
                // `central_tryget` re-reads the state and refuses if this
                // drain was a kill.
                fence(Acquire);
            }
        }
        self.central_tryget(live)
    }

    // ---------------------------------------------------------------- references

    /// Take a reference if the count is not zero, **even if the ref is
    /// dying** (`percpu_ref_tryget`). Fails only once released.
    #[inline]
    pub fn tryget(&self) -> Option<Ref<'_, T, P>> {
        self.tryget_inner(false).then(|| Ref::new(self))
    }

    /// Take a reference only if the ref was not killed
    /// (`percpu_ref_tryget_live`).
    ///
    /// Every call that starts after a
    /// [`kill_and_confirm`](Self::kill_and_confirm) callback has run
    /// (ordered after it, e.g. by
    /// a flag the callback sets) fails. A call racing the kill itself may
    /// still succeed; the count then waits for that reference too.
    #[inline]
    pub fn tryget_live(&self) -> Option<Ref<'_, T, P>> {
        self.tryget_inner(true).then(|| Ref::new(self))
    }

    /// [`tryget`](Self::tryget) for an `Arc`-shared ref: the reference is
    /// `'static` and `Send`, fine to hold across `.await`.
    #[inline]
    pub fn tryget_owned(self: &Arc<Self>) -> Option<OwnedRef<T, P>> {
        self.tryget_inner(false)
            .then(|| OwnedRef::new(Arc::clone(self)))
    }

    /// [`tryget_live`](Self::tryget_live) for an `Arc`-shared ref.
    #[inline]
    pub fn tryget_live_owned(self: &Arc<Self>) -> Option<OwnedRef<T, P>> {
        self.tryget_inner(true)
            .then(|| OwnedRef::new(Arc::clone(self)))
    }

    /// Add `n` raw references (`percpu_ref_get_many`), e.g. one per object a
    /// pool hands out. Balance them with [`put_many`](Self::put_many).
    ///
    /// # Safety
    ///
    /// The caller must hold at least one reference (a [`Ref`], a raw one, or
    /// be the owner before [`kill`](Self::kill)) for the duration of the
    /// call, so the count cannot be zero, and `n <= i64::MAX as usize`.
    #[inline]
    pub unsafe fn get_many(&self, n: usize) {
        if n != 0 {
            self.add(n as i64);
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
    #[inline]
    pub unsafe fn put_many(&self, n: usize) {
        if n != 0 {
            self.sub(n as i64);
        }
    }

    // ---------------------------------------------------------------- slow path

    /// Under the switch lock: make the ref count atomically. Returns the
    /// folded count if this call did the switch.
    fn to_atomic_locked(&self) -> Option<i64> {
        let old = self.state.fetch_or(ATOMIC, SeqCst);
        if old & ATOMIC != 0 {
            return None;
        }
        if old & PORTABLE == 0 {
            // rseq tier: every sequence in flight on any CPU either
            // committed its add or aborted and will see ATOMIC; after this
            // nobody writes the slots until ATOMIC is cleared.
            crate::sys::rseq::fence_all_cpus();
        }
        let mut sum: i64 = 0;
        for cpu in 0..self.slots.len() {
            // AcqRel: Acquire pairs with the Release puts on this slot; the
            // Release publishes ATOMIC/DEAD (set above) to late adders that
            // read the marker and fence(Acquire) before re-reading state.
            let v = self.slots.get(cpu).swap(DRAINED, AcqRel);
            debug_assert!(!is_drained(v), "slot drained twice");
            sum = sum.wrapping_add(v);
        }
        // AcqRel: Release hands the acquired slot history on to the put that
        // takes the count to zero (its Acquire reads this RMW's chain).
        let delta = sum.wrapping_sub(BIAS);
        let prev = self.central.fetch_add(delta, AcqRel);
        let now = prev.wrapping_add(delta);
        self.after_central_change(prev, now);
        Some(now)
    }

    /// Under the switch lock, with the ref live and atomic: back to percpu.
    fn to_percpu_locked(&self) {
        // BIAS first: from now on puts that land on the central count can
        // never take it to zero while slots hold uncounted gets.
        self.central.fetch_add(BIAS, SeqCst);
        for cpu in 0..self.slots.len() {
            // A swap, not a store: late adders may still be racing on the
            // drained slot (and loom needs RMWs here, see DESIGN §8). Their
            // deltas were moved to the central count, so discarding is right.
            self.slots.get(cpu).swap(0, SeqCst);
        }
        // Last: until now every get/put went to the central count.
        self.state.fetch_and(!ATOMIC, SeqCst);
    }

    /// Switch to atomic mode (`percpu_ref_switch_to_atomic`) and stay there
    /// across revives until [`switch_to_percpu`](Self::switch_to_percpu).
    ///
    /// The switch is complete when this returns: the slots are drained and
    /// folded with no grace period, so there is nothing left to wait for.
    pub fn switch_to_atomic(&self) {
        let _g = lock(&self.switch);
        self.state.fetch_or(FORCE_ATOMIC, SeqCst);
        self.to_atomic_locked();
    }

    /// Same as [`switch_to_atomic`](Self::switch_to_atomic), named after
    /// `percpu_ref_switch_to_atomic_sync`: both return only once the switch
    /// is complete (including one racing from another thread, since they
    /// serialise on the switch lock).
    pub fn switch_to_atomic_sync(&self) {
        self.switch_to_atomic();
    }

    /// Switch back to percpu mode (`percpu_ref_switch_to_percpu`). On a
    /// killed ref this takes effect when it is revived.
    pub fn switch_to_percpu(&self) {
        let _g = lock(&self.switch);
        let old = self.state.fetch_and(!FORCE_ATOMIC, SeqCst);
        if old & DEAD == 0 && old & ATOMIC != 0 {
            self.to_percpu_locked();
        }
    }

    /// Kill the ref: `tryget_live` starts failing, and the owner's initial
    /// reference is dropped (`percpu_ref_kill`). When the count drains to
    /// zero the release runs, exactly once; if nothing else holds a
    /// reference that happens inside this call.
    ///
    /// A second kill returns [`KillError::AlreadyDead`] and changes nothing.
    pub fn kill(&self) -> Result<(), KillError> {
        self.kill_and_confirm(|| {})
    }

    /// Kill, and run `confirm` once every later `tryget_live` on any thread
    /// is guaranteed to fail (`percpu_ref_kill_and_confirm`). `confirm` runs
    /// on this thread, before this call drops the initial reference, so it
    /// also runs before the release.
    ///
    /// Unlike the kernel there is no RCU grace period to wait for: the
    /// drain itself is the confirmation point.
    pub fn kill_and_confirm(&self, confirm: impl FnOnce()) -> Result<(), KillError> {
        let folded = {
            let _g = lock(&self.switch);
            let old = self.state.fetch_or(DEAD, SeqCst);
            if old & DEAD != 0 {
                return Err(KillError::AlreadyDead);
            }
            self.to_atomic_locked()
        };
        confirm();
        let now = self.central_sub(1);
        // Relaxed: a sticky diagnostic flag.
        if now < 0 || folded.is_some_and(|c| c < 0) || self.state.load(Relaxed) & UNDERFLOW != 0 {
            return Err(KillError::Underflow { count: now });
        }
        Ok(())
    }

    /// Make a dying ref live again (`percpu_ref_resurrect`): it takes a new
    /// initial reference and returns to percpu mode unless forced atomic.
    ///
    /// On a ref that already drained to zero this is a
    /// [`reinit`](Self::reinit), allowed only with `.allow_reinit()`.
    pub fn resurrect(&self) -> Result<(), ReviveError> {
        let _g = lock(&self.switch);
        let s = self.state.load(SeqCst);
        if s & DEAD == 0 {
            return Err(ReviveError::Live);
        }
        // inc_not_zero: a put may take the count to zero at any moment; if
        // it did, the release is (being) claimed and only reinit may follow.
        if self.central_tryget(false) {
            self.revive_locked(s);
            return Ok(());
        }
        if s & ALLOW_REINIT == 0 {
            return Err(ReviveError::ReinitNotAllowed);
        }
        self.reinit_locked(s);
        Ok(())
    }

    /// Make a released ref live again with a count of one
    /// (`percpu_ref_reinit`); needs `.allow_reinit()` (or `.dead()`).
    pub fn reinit(&self) -> Result<(), ReviveError> {
        let _g = lock(&self.switch);
        let s = self.state.load(SeqCst);
        if s & DEAD == 0 {
            return Err(ReviveError::Live);
        }
        if s & ALLOW_REINIT == 0 {
            return Err(ReviveError::ReinitNotAllowed);
        }
        if self.central.load(SeqCst) > 0 {
            return Err(ReviveError::NotDrained);
        }
        self.reinit_locked(s);
        Ok(())
    }

    /// Under the lock, dead, count zero (or below, after an underflow).
    fn reinit_locked(&self, s: usize) {
        // The put that reached zero claims RELEASED right after its
        // decrement; wait for that claim so it cannot see the revived state
        // and skip the release. (Not after an underflow: then it may never
        // come, and the count is reset regardless.)
        while self.state.load(SeqCst) & (RELEASED | UNDERFLOW) == 0 {
            crate::sync::spin_loop();
        }
        self.central.swap(1, SeqCst);
        self.state.fetch_and(!RELEASED, SeqCst);
        self.revive_locked(s);
    }

    /// Under the lock, holding the new initial reference: clear DEAD and
    /// return to the wanted mode.
    fn revive_locked(&self, s: usize) {
        self.state.fetch_and(!DEAD, SeqCst);
        if s & FORCE_ATOMIC == 0 {
            self.to_percpu_locked();
        }
    }
}

impl<T: fmt::Debug, P> fmt::Debug for PercpuRef<T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Relaxed: a snapshot for humans.
        let s = self.state.load(Relaxed);
        f.debug_struct("PercpuRef")
            .field("value", &self.value)
            .field("mode", &self.mode())
            .field("dead", &(s & DEAD != 0))
            .field("released", &(s & RELEASED != 0))
            .field("underflow", &(s & UNDERFLOW != 0))
            .finish_non_exhaustive()
    }
}

/// A counted reference to a [`PercpuRef`]: clone is a `get`, drop is a
/// `put`, deref gives the value.
///
/// ```
/// use percpu_ref::{NoRelease, PercpuRef};
/// let r = PercpuRef::new(7, NoRelease);
/// let a = r.tryget().unwrap();
/// let b = a.clone();
/// assert_eq!(*a + *b, 14);
/// ```
#[must_use = "dropping a Ref puts it at once"]
pub struct Ref<'a, T, P: ReleasePolicy<T> = NoRelease> {
    r: &'a PercpuRef<T, P>,
}

impl<'a, T, P: ReleasePolicy<T>> Ref<'a, T, P> {
    fn new(r: &'a PercpuRef<T, P>) -> Self {
        Ref { r }
    }

    /// The ref this reference counts on.
    pub fn percpu_ref(this: &Self) -> &'a PercpuRef<T, P> {
        this.r
    }

    /// Turn into a raw reference: the count stays, nothing will put it.
    /// Give it back with [`from_raw`](Self::from_raw) or
    /// [`PercpuRef::put_many`].
    pub fn into_raw(this: Self) -> &'a PercpuRef<T, P> {
        let this = ManuallyDrop::new(this);
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
        Ref::new(r)
    }
}

impl<T, P: ReleasePolicy<T>> Clone for Ref<'_, T, P> {
    #[inline(always)]
    fn clone(&self) -> Self {
        self.r.add(1);
        Ref::new(self.r)
    }
}

impl<T, P: ReleasePolicy<T>> Drop for Ref<'_, T, P> {
    #[inline(always)]
    fn drop(&mut self) {
        self.r.sub(1);
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

/// A `'static` counted reference to an `Arc<PercpuRef>`; `Send` and fine to
/// hold across `.await`. See [`PercpuRef::tryget_owned`].
///
/// ```
/// use percpu_ref::{NoRelease, PercpuRef};
/// use std::sync::Arc;
/// let r = Arc::new(PercpuRef::new(String::from("log"), NoRelease));
/// let owned = r.tryget_live_owned().unwrap();
/// std::thread::spawn(move || assert_eq!(&*owned, "log")).join().unwrap();
/// ```
#[must_use = "dropping an OwnedRef puts it at once"]
pub struct OwnedRef<T, P: ReleasePolicy<T> = NoRelease> {
    r: ManuallyDrop<Arc<PercpuRef<T, P>>>,
}

impl<T, P: ReleasePolicy<T>> OwnedRef<T, P> {
    fn new(r: Arc<PercpuRef<T, P>>) -> Self {
        OwnedRef {
            r: ManuallyDrop::new(r),
        }
    }

    /// The ref this reference counts on.
    pub fn percpu_ref(this: &Self) -> &Arc<PercpuRef<T, P>> {
        &this.r
    }

    /// Turn into a raw reference plus the `Arc`; see [`Ref::into_raw`].
    pub fn into_raw(this: Self) -> Arc<PercpuRef<T, P>> {
        let mut this = ManuallyDrop::new(this);
        // SAFETY: `this` is never used or dropped again, so the Arc is moved
        // out exactly once.
        unsafe { ManuallyDrop::take(&mut this.r) }
    }

    /// Re-wrap a raw reference.
    ///
    /// # Safety
    ///
    /// As [`Ref::from_raw`]: the caller owns one raw reference on `r`.
    pub unsafe fn from_raw(r: Arc<PercpuRef<T, P>>) -> Self {
        OwnedRef::new(r)
    }
}

impl<T, P: ReleasePolicy<T>> Clone for OwnedRef<T, P> {
    #[inline]
    fn clone(&self) -> Self {
        self.r.add(1);
        OwnedRef::new(Arc::clone(&self.r))
    }
}

impl<T, P: ReleasePolicy<T>> Drop for OwnedRef<T, P> {
    #[inline]
    fn drop(&mut self) {
        self.r.sub(1);
        // SAFETY: `self.r` is not used after this; drop runs once.
        unsafe { ManuallyDrop::drop(&mut self.r) }
    }
}

impl<T, P: ReleasePolicy<T>> Deref for OwnedRef<T, P> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.r.value
    }
}

impl<T: fmt::Debug, P: ReleasePolicy<T>> fmt::Debug for OwnedRef<T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OwnedRef").field(&self.r.value).finish()
    }
}
