//! Mode switches, kill, resurrect and reinit: everything that runs under
//! the switch lock.
//!
//! Opening a column (switch to percpu): add the `BIAS` to the central count,
//! prepare the column's slots, publish the column (rseq: then reopen the
//! gate's limit, last), clear `ATOMIC`. Closing it (switch to atomic, kill):
//! set `ATOMIC`, close the gate (rseq: `limit = 0`, then one `membarrier`
//! for every ref closed together; portable: null the column pointer), then
//! the *fold*: swap every slot to zero, add their sum minus the `BIAS` to
//! the central count, give the column back. No grace period is needed on
//! either tier (see the `slots` module docs for why a column may be reused
//! at once).
//!
//! `kill_and_confirm` holds the lock from the kill to its initial put, so
//! `resurrect`/`reinit`/switches wait for a pending confirm callback, as the
//! kernel's do; a release claimed under the lock runs after it is released.

use super::counter::{AfterPut, Claim, PercpuRef};
use super::error::{KillError, ReviveError, SwitchError};
use super::lock::{self, Guard};
use super::policy::ReleasePolicy;
use super::slots::{self, keyed, Column, Kind};
use super::state::*;
use crate::sync::Ordering::*;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// A kill that passed its first phase (the ref was live): what the later
/// phases need.
pub(crate) struct Killing {
    /// The column to fold once every CPU has left its sequences.
    column: Option<Column>,
    /// A release claimed by the fold or the initial put.
    claim: Option<Claim>,
    /// The count after the fold, if there was one.
    folded: Option<i64>,
}

impl Killing {
    /// Does this kill need `fence_all_cpus()` before its fold?
    pub(crate) fn needs_barrier(&self, kind: Kind) -> bool {
        self.column.is_some() && kind == Kind::Rseq
    }

    /// Did this kill claim the ref's release (to run after unlocking)?
    pub(crate) fn has_claim(&self) -> bool {
        self.claim.is_some()
    }

    /// The claimed release was run already, by a revive of the ref on this
    /// thread (see `lock::take_pending`): drop the claim.
    pub(crate) fn release_ran_elsewhere(&mut self) {
        self.claim = None;
    }
}

impl<T, P: ReleasePolicy<T>> PercpuRef<T, P> {
    pub(crate) fn guard(&self) -> Guard<'_> {
        Guard::new(self.state())
    }

    /// Under the lock (or before the ref is shared), on a live ref that
    /// holds no column: take one and count per CPU. On error the ref stays
    /// atomic.
    pub(crate) fn open_column(&self) -> Result<(), SwitchError> {
        let kind = self.kind();
        debug_assert!(self.column().is_none());
        // Relaxed (key, both loads and the store): written only under the
        // lock; adders read it only after the Release of the column store.
        let mut key = self.key.load(Relaxed);
        if kind == Kind::Portable && key == 0 {
            key = slots::keys::take().ok_or(SwitchError::NoKey)?;
            self.key.store(key, Relaxed);
        }
        let c = slots::take(kind).ok_or(SwitchError::NoSlots {
            bytes: slots::slot_bytes_per_ref(),
        })?;
        // BIAS first: from now on puts that land on the central count can
        // never take it to zero while slots hold uncounted gets. Relaxed:
        // every slot add is ordered after it by the Release publication of
        // the column below (and a stale portable adder of this ref that
        // finds a reset slot counts a reference it holds, which keeps the
        // count above zero by itself).
        self.central.fetch_add(BIAS, Relaxed);
        match kind {
            Kind::Portable => {
                let fresh = keyed::fresh(key);
                for row in 0..slots::rows() {
                    // A swap, not a store: stale adders may race on the
                    // slot, and loom 0.7 only models RMWs racing RMWs faithfully, not a
                    // store racing one (tokio-rs/loom#254). Relaxed:
                    // published by the Release store of the column.
                    c.slot(row).swap(fresh, Relaxed);
                }
                // Release: pairs with the Acquire load in `portable_add`.
                self.gate.column.store(c.as_ptr(), Release);
            }
            Kind::Rseq => {
                // Relaxed: published by the Release store of the limit.
                self.gate.column.store(c.as_ptr(), Relaxed);
                // Release: the sequences read the limit, then the column,
                // inside one sequence; the zeroed slots and the column
                // pointer happen before any add they commit.
                let rows = u32::try_from(slots::rows()).unwrap_or(u32::MAX);
                self.gate.limit.store(rows, Release);
            }
        }
        // Release: an observer that sees the percpu mode sees the column.
        self.state().fetch_and(!ATOMIC, Release);
        Ok(())
    }

    /// Under the lock: stop counting per CPU. Returns the column to fold,
    /// which on the rseq tier may be read only after `fence_all_cpus()`.
    fn close_gate(&self) -> Option<Column> {
        let c = self.column()?;
        // SeqCst: ordered before the gate closes and the barrier, so every
        // thread that is refused sees ATOMIC (and a kill's DEAD) afterwards.
        self.state().fetch_or(ATOMIC, SeqCst);
        match self.kind() {
            // SeqCst: before the membarrier; a sequence that reads the
            // limit after it refuses (sys::rseq's argument).
            Kind::Rseq => self.gate.limit.store(0, SeqCst),
            // Release: pairs with the Acquire load in `portable_add`; a
            // thread that sees null also sees ATOMIC/DEAD.
            Kind::Portable => self.gate.column.store(std::ptr::null_mut(), Release),
        }
        Some(c)
    }

    /// Under the lock, after `close_gate` (and on the rseq tier after a
    /// barrier): move the slots' counts to the central count, give the
    /// column back. Returns the count after the fold and a claim if the
    /// fold took a killed ref's count to zero.
    fn fold(&self, c: Column) -> (i64, Option<Claim>) {
        let kind = self.kind();
        let mut sum: i64 = 0;
        for row in 0..slots::rows() {
            // AcqRel: Acquire pairs with the Release puts on this slot;
            // Release hands ATOMIC/DEAD (set before) on to portable adders
            // that find the drained slot and fence(Acquire).
            let v = c.slot(row).swap(0, AcqRel);
            sum = sum.wrapping_add(match kind {
                Kind::Rseq => v,
                Kind::Portable => {
                    // Relaxed: our own key, set under the lock.
                    debug_assert_eq!(keyed::key(v), self.key.load(Relaxed));
                    keyed::count(v)
                }
            });
        }
        if kind == Kind::Portable {
            sum = keyed::sum(sum);
        }
        // Relaxed: the gate is closed; nothing reads the pointer until a
        // new column is published with Release.
        self.gate.column.store(std::ptr::null_mut(), Relaxed);
        slots::give_back(kind, c);
        // AcqRel: Release hands the acquired slot history on to the put
        // that takes the count to zero (its Acquire reads this RMW's chain).
        let delta = sum.wrapping_sub(BIAS);
        let prev = self.central.fetch_add(delta, AcqRel);
        let now = prev.wrapping_add(delta);
        (now, self.after_central_change(prev, now))
    }

    /// Under the lock: switch to atomic mode if counting per CPU.
    fn to_atomic_locked(&self) -> Option<(i64, Option<Claim>)> {
        let c = self.close_gate()?;
        if self.kind() == Kind::Rseq {
            crate::sys::rseq::fence_all_cpus();
        }
        Some(self.fold(c))
    }

    /// Switch to atomic mode (`percpu_ref_switch_to_atomic`) and stay there
    /// across revives until [`switch_to_percpu`](Self::switch_to_percpu).
    /// The ref gives its slot column back.
    ///
    /// The switch is complete when this returns: the slots are drained and
    /// folded with no grace period, so there is nothing left to wait for.
    #[doc(alias = "percpu_ref_switch_to_atomic")]
    pub fn switch_to_atomic(&self) {
        let g = self.guard();
        // Relaxed: a flag read under the lock.
        self.state().fetch_or(FORCE_ATOMIC, Relaxed);
        let claim = self.to_atomic_locked().and_then(|(_, c)| c);
        drop(g);
        // A live ref's fold never claims (zero while live is an underflow).
        let after = self.after_unlock(claim);
        debug_assert!(!after.free);
        after.rethrow();
    }

    /// Same as [`switch_to_atomic`](Self::switch_to_atomic), named after
    /// `percpu_ref_switch_to_atomic_sync`: both return only once the switch
    /// is complete (including one racing from another thread, since they
    /// serialise on the switch lock).
    #[doc(alias = "percpu_ref_switch_to_atomic_sync")]
    pub fn switch_to_atomic_sync(&self) {
        self.switch_to_atomic();
    }

    /// Switch back to percpu mode (`percpu_ref_switch_to_percpu`): take a
    /// slot column from the arena and count per CPU. On a killed ref this
    /// takes effect when it is revived.
    ///
    /// # Errors
    ///
    /// [`SwitchError`] if no column could be had (the arena cannot grow, or
    /// on the portable tier every key is in use): the ref stays atomic and
    /// keeps counting correctly; try again later.
    #[doc(alias = "percpu_ref_switch_to_percpu")]
    pub fn switch_to_percpu(&self) -> Result<(), SwitchError> {
        let _g = self.guard();
        // Relaxed: flags read and written under the lock.
        let old = self.state().fetch_and(!FORCE_ATOMIC, Relaxed);
        if old & DEAD == 0 && self.column().is_none() {
            self.open_column()
        } else {
            Ok(())
        }
    }

    /// An adaptive ref saw contention on its central count: count per CPU
    /// from now on, unless someone holds the lock or asked for atomic mode.
    #[cold]
    #[inline(never)]
    pub(crate) fn promote(&self) {
        if !lock::try_lock(self.state()) {
            return;
        }
        // Relaxed: flags read under the lock.
        let s = self.state().load(Relaxed);
        if s & (DEAD | FORCE_ATOMIC) == 0 && self.column().is_none() {
            // On failure the ref stays atomic and tries again later.
            let _ = self.open_column();
        }
        // Relaxed: a statistic.
        self.heat.store(0, Relaxed);
        lock::unlock(self.state());
    }

    // ---------------------------------------------------------------- kill

    /// Kill, phase 1, under the lock: mark dead and close the gate.
    pub(crate) fn kill_begin(&self) -> Result<Killing, KillError> {
        // SeqCst: the point after which `tryget_live` may fail; ordered
        // before the gate closes (see `close_gate`).
        let old = self.state().fetch_or(DEAD, SeqCst);
        if old & DEAD != 0 {
            return Err(KillError::AlreadyDead);
        }
        Ok(Killing {
            column: self.close_gate(),
            claim: None,
            folded: None,
        })
    }

    /// Batched switch to atomic, phase 1, under the lock: ask for atomic
    /// mode and close the gate. The later phases are the kill's: the
    /// barrier if `needs_barrier`, `kill_fold`, unlock, `kill_finish`.
    pub(crate) fn switch_begin(&self) -> Killing {
        // Relaxed: a flag read under the lock.
        self.state().fetch_or(FORCE_ATOMIC, Relaxed);
        Killing {
            column: self.close_gate(),
            claim: None,
            folded: None,
        }
    }

    /// Kill, phase 2, under the lock, after the barrier if one was needed:
    /// fold the slots.
    pub(crate) fn kill_fold(&self, k: &mut Killing) {
        if let Some(c) = k.column.take() {
            let (now, claim) = self.fold(c);
            k.folded = Some(now);
            k.claim = claim;
        }
    }

    /// Kill, phase 3, under the lock, after the confirm callback: drop the
    /// initial reference.
    pub(crate) fn kill_put(&self, k: &mut Killing) -> Result<(), KillError> {
        // AcqRel: as any put on the central count (see `central_sub`).
        let prev = self.central.fetch_sub(1, AcqRel);
        let now = prev.wrapping_sub(1);
        if let Some(c) = self.after_central_change(prev, now) {
            k.claim = Some(c);
        } else if now <= 0 && k.claim.is_none() {
            // The count crossed zero while the ref was live (an underflow):
            // it is drained now, so release it.
            k.claim = self.claim_locked();
        }
        // Relaxed: a sticky diagnostic flag.
        let underflow = self.state().load(Relaxed) & UNDERFLOW != 0;
        if now < 0 || k.folded.is_some_and(|c| c < 0) || underflow {
            return Err(KillError::Underflow { count: now });
        }
        Ok(())
    }

    /// Kill, after unlocking: run a release claimed under the lock.
    pub(crate) fn kill_finish(&self, k: Killing) -> AfterPut {
        self.after_unlock(k.claim)
    }

    /// Kill the ref: `tryget_live` starts failing, and the owner's initial
    /// reference is dropped (`percpu_ref_kill`). When the count drains to
    /// zero the release runs, exactly once; if nothing else holds a
    /// reference that happens inside this call. The ref gives its slot
    /// column back.
    ///
    /// # Errors
    ///
    /// [`KillError::AlreadyDead`] on a second kill (nothing changes);
    /// [`KillError::Underflow`] if summing the count found more puts than
    /// gets (the ref is killed regardless).
    #[doc(alias = "percpu_ref_kill")]
    pub fn kill(&self) -> Result<(), KillError> {
        self.kill_and_confirm(|| {})
    }

    /// Kill, and run `confirm` once every later `tryget_live` on any thread
    /// is guaranteed to fail (`percpu_ref_kill_and_confirm`). `confirm` runs
    /// on this thread, before this call drops the initial reference, so it
    /// also runs before the release; `resurrect` and `reinit` wait until it
    /// has returned.
    ///
    /// Unlike the kernel there is no RCU grace period to wait for: the
    /// drain itself is the confirmation point (on the rseq tier, one
    /// `membarrier`).
    ///
    /// `confirm` runs under the ref's switch lock: it must not switch,
    /// kill, resurrect or reinit this ref (that panics). If it panics, the
    /// kill still completes — the initial reference is dropped and a
    /// release that became due runs — and then the panic propagates.
    ///
    /// # Errors
    ///
    /// As [`kill`](Self::kill); `confirm` does not run on
    /// [`KillError::AlreadyDead`].
    #[doc(alias = "percpu_ref_kill_and_confirm")]
    pub fn kill_and_confirm(&self, confirm: impl FnOnce()) -> Result<(), KillError> {
        let g = self.guard();
        let mut k = self.kill_begin()?;
        if k.needs_barrier(self.kind()) {
            crate::sys::rseq::fence_all_cpus();
        }
        self.kill_fold(&mut k);
        let confirmed = catch_unwind(AssertUnwindSafe(confirm));
        let result = self.kill_put(&mut k);
        drop(g);
        let after = self.kill_finish(k);
        // A caller borrows the ref, so it cannot be an orphaned allocation.
        debug_assert!(!after.free);
        if let Err(p) = confirmed {
            resume_unwind(p);
        }
        after.rethrow();
        result
    }

    // ---------------------------------------------------------------- revive

    /// Make a dying ref live again (`percpu_ref_resurrect`): it takes a new
    /// initial reference and returns to percpu mode unless forced atomic
    /// (or no slot column can be had: then it stays atomic, see
    /// [`switch_to_percpu`](Self::switch_to_percpu)).
    ///
    /// Waits for a pending `kill_and_confirm` callback. On a ref that
    /// already drained to zero this is a [`reinit`](Self::reinit), allowed
    /// only with `.allow_reinit()`.
    ///
    /// # Errors
    ///
    /// [`ReviveError::Live`] if the ref is live,
    /// [`ReviveError::ReinitNotAllowed`] if it drained and reinit is not
    /// allowed, [`ReviveError::Orphaned`] if every [`PercpuArc`](crate::PercpuArc)
    /// handle to it is gone.
    #[doc(alias = "percpu_ref_resurrect")]
    pub fn resurrect(&self) -> Result<(), ReviveError> {
        self.revive(false)
    }

    /// Make a released ref live again with a count of one
    /// (`percpu_ref_reinit`); needs `.allow_reinit()` (or `.dead()`).
    ///
    /// If the previous life's release is still running on another thread,
    /// this waits until it has returned, so a new life never overlaps the
    /// old release. Called from inside that release (on its thread), it
    /// does not wait: the new life starts while the release finishes.
    /// The policy's [`on_reinit`](ReleasePolicy::on_reinit) runs first (a
    /// [`Completion`](crate::Completion) starts waiting for the new life).
    ///
    /// # Errors
    ///
    /// [`ReviveError::Live`], [`ReviveError::ReinitNotAllowed`],
    /// [`ReviveError::NotDrained`] (dying with references outstanding: use
    /// `resurrect`), [`ReviveError::Orphaned`].
    #[doc(alias = "percpu_ref_reinit")]
    pub fn reinit(&self) -> Result<(), ReviveError> {
        self.revive(true)
    }

    fn revive(&self, reinit: bool) -> Result<(), ReviveError> {
        loop {
            let g = self.guard();
            // Relaxed: under the lock; every writer of these bits either
            // holds it or is waited for below with Acquire.
            let s = self.state().load(Relaxed);
            if s & DEAD == 0 {
                return Err(ReviveError::Live);
            }
            if s & ORPHANED != 0 {
                return Err(ReviveError::Orphaned);
            }
            // A release of this life is running: wait (unlocked) until it
            // has finished, so a new life never overlaps it.
            if s & RELEASING != 0 {
                if lock::finish_own_release(self.state()) {
                    // Inside our own release: it is finished as far as the
                    // ref is concerned.
                    let free = self.finish_release();
                    debug_assert!(!free, "an orphaned ref cannot be revived");
                } else if lock::take_pending(self.state()) {
                    // A batch on this thread claimed the release and will
                    // run it only after the release we are inside of: run
                    // it now instead of waiting for ourselves.
                    drop(g);
                    let after = self.run_release(Claim);
                    debug_assert!(!after.free, "a caller borrows the ref");
                    after.rethrow();
                    continue;
                } else {
                    drop(g);
                    lock::wait_until(self.state(), |s| s & RELEASING == 0);
                    continue;
                }
            }
            if !reinit {
                // inc_not_zero: a put may take the count to zero at any
                // moment; if it did, only a reinit may follow.
                if self.central_tryget(false) {
                    // Relaxed: under the lock. A release of this life can
                    // only have run if misused puts took the count to zero
                    // and gets brought it back: the new life gets its own.
                    self.state().fetch_and(!RELEASED, Relaxed);
                    self.revive_locked(s);
                    return Ok(());
                }
            }
            if s & ALLOW_REINIT == 0 {
                return Err(ReviveError::ReinitNotAllowed);
            }
            // Acquire: pairs with the AcqRel RMW that took it to zero.
            if reinit && self.central.load(Acquire) > 0 {
                return Err(ReviveError::NotDrained);
            }
            // The count is <= 0, so this life's release is claimed, or will
            // be by the put whose RMW took it there and has not recorded
            // that yet (see `counter.rs`): wait (unlocked) for it.
            // Acquire (in `wait_until`): the release's effects happen
            // before the new life.
            if self.state().load(Acquire) & RELEASED == 0 {
                drop(g);
                lock::wait_until(self.state(), |s| {
                    s & (RELEASED | RELEASING) != 0 || s & DEAD == 0
                });
                continue;
            }
            self.policy.on_reinit();
            // The kernel's order: the ref is live (not DEAD) while its count
            // is still zero, and only then gets its count. So no thread sees
            // a count it could take (`tryget` succeeds) on a ref whose
            // `tryget_live` would still fail. SeqCst: from here
            // `tryget_live` may succeed once the count is published.
            self.state().fetch_and(!(RELEASED | DEAD), SeqCst);
            // AcqRel: Release publishes the new life to `central_tryget`'s
            // Acquire; a swap, not a store, since misused puts may race.
            self.central.swap(1, AcqRel);
            self.reopen_locked(s);
            return Ok(());
        }
    }

    /// Under the lock, holding the new initial reference: clear DEAD and
    /// return to the wanted mode.
    fn revive_locked(&self, s: u32) {
        // SeqCst: from here `tryget_live` may succeed again.
        self.state().fetch_and(!DEAD, SeqCst);
        self.reopen_locked(s);
    }

    /// Under the lock, on a live ref holding no column: back to the mode
    /// the ref should count in.
    fn reopen_locked(&self, s: u32) {
        // Adaptive refs start every life atomic, and promote themselves.
        if s & (FORCE_ATOMIC | ADAPTIVE) == 0 {
            // No column to be had: the ref stays atomic (still correct).
            let _ = self.open_column();
        }
    }
}
