//! A plain sequential reference model of `PercpuRef`, written from the
//! documented semantics (src/percpu/mod.rs, DESIGN.md §3) and the state
//! table in src/percpu/state.rs.
//!
//! The model tracks the *true* count (what the central count would hold
//! once every per-CPU slot is folded in) and the state bits. Zero-crossing
//! effects (release, underflow flag) happen exactly where the real code can
//! see them: on puts in atomic mode, and at the fold of a switch to atomic
//! mode or a kill. A put in percpu mode only touches a slot, so an
//! unbalanced put there is noticed at the next fold, as documented for
//! `check()`.

use percpu_ref::{KillError, Mode, ReviveError};

/// Observable and internal state of one ref, as the docs define it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Model {
    /// True count: owner's initial reference + Refs + raw references.
    pub count: i64,
    /// Killed (`is_dying`).
    pub dead: bool,
    /// The release of the current kill was claimed (state bit RELEASED).
    pub released: bool,
    /// Counting on the central count (`mode() == Atomic`).
    pub atomic: bool,
    /// The user asked for atomic mode; revives stay atomic.
    pub force_atomic: bool,
    /// `reinit` (and `resurrect` of a drained ref) permitted.
    pub allow_reinit: bool,
    /// Sticky underflow diagnostic (`check()`).
    pub underflow: bool,
    /// How often the release policy ran.
    pub releases: u64,
    /// How often a `kill_and_confirm` callback ran.
    pub confirms: u64,
    /// Between `kill_begin` and `kill_end`: the real kill holds the switch
    /// lock, so no switch or revive can happen in between.
    pub killing: bool,
    /// A release claimed under the kill's lock (by its fold or its own
    /// put); it runs when the kill has released the lock, after the confirm
    /// callback. Another thread's put that crosses zero meanwhile releases
    /// at once, as always.
    pub release_due: bool,
    /// Inside the kill's own fold or put (claims are deferred).
    under_lock: bool,
    /// Between the two halves of a revive (the step checker of
    /// `percpu_steps` splits them): the reviver holds the switch lock.
    pub reviving: bool,
}

impl Model {
    /// The state `PercpuRef::builder(v)` with the given flags builds.
    pub fn new(atomic: bool, dead: bool, allow_reinit: bool) -> Self {
        Model {
            count: if dead { 0 } else { 1 },
            dead,
            // `.dead()` starts released, without running the release.
            released: dead,
            atomic: atomic || dead,
            force_atomic: atomic,
            // `.dead()` implies `.allow_reinit()`.
            allow_reinit: allow_reinit || dead,
            underflow: false,
            releases: 0,
            confirms: 0,
            killing: false,
            release_due: false,
            under_lock: false,
            reviving: false,
        }
    }

    /// `mode()`.
    pub fn mode(&self) -> Mode {
        if self.atomic {
            Mode::Atomic
        } else {
            Mode::Percpu
        }
    }

    /// `is_zero()`: only an atomic-mode ref can report zero.
    pub fn is_zero(&self) -> bool {
        self.atomic && self.count == 0
    }

    /// The central count moved from a value that was positive or not
    /// (`prev_positive`) to `now`: underflow and release effects.
    fn central_moved(&mut self, prev_positive: bool, now: i64) {
        if now > 0 {
            return;
        }
        if now < 0 {
            self.underflow = true;
        }
        if prev_positive {
            if !self.dead {
                // A live ref holds its initial reference: zero is underflow.
                self.underflow = true;
            } else if !self.released {
                // Exactly once per kill; a claim made under the kill's lock
                // runs when the kill ends.
                self.released = true;
                if self.under_lock {
                    self.release_due = true;
                } else {
                    self.releases += 1;
                }
            }
        }
    }

    /// `tryget()` (`live == false`) or `tryget_live()`.
    pub fn tryget(&mut self, live: bool) -> bool {
        if !self.atomic {
            // Percpu mode: a slot add always succeeds, except a
            // `tryget_live` that sees a kill's DEAD before its fold (a
            // percpu-mode ref is otherwise live and holds its initial
            // reference).
            if live && self.dead {
                return false;
            }
            self.count += 1;
            return true;
        }
        if (live && self.dead) || self.count <= 0 {
            return false;
        }
        self.count += 1;
        true
    }

    /// A get (clone, `get_many`): never has a zero-crossing effect.
    pub fn get(&mut self, n: u64) {
        self.count += n as i64;
    }

    /// A put (drop, `put_many`).
    pub fn put(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        let prev = self.count;
        self.count -= n as i64;
        if self.atomic {
            self.central_moved(prev > 0, self.count);
        }
    }

    /// A put that lands while a kill holds the lock but before its fold
    /// (on the central count, whose bias is still there): no crossing is
    /// seen then; the fold that follows takes the count to zero and the
    /// kill's claim runs when it ends. Only an over-put (misuse) can do
    /// this: otherwise the kill's initial reference keeps the count up.
    pub fn put_before_kill_fold(&mut self, n: u64) {
        self.under_lock = true;
        self.put(n);
        self.under_lock = false;
    }

    /// Percpu → atomic: the slots are folded into the central count, which
    /// carried the (positive) bias until now.
    fn fold(&mut self) {
        debug_assert!(!self.atomic);
        self.atomic = true;
        self.central_moved(true, self.count);
    }

    /// `switch_to_atomic()` / `switch_to_atomic_sync()`.
    pub fn switch_to_atomic(&mut self) {
        self.force_atomic = true;
        if !self.atomic {
            self.fold();
        }
    }

    /// `switch_to_percpu()`: on a killed ref it only takes effect at revive.
    pub fn switch_to_percpu(&mut self) {
        self.force_atomic = false;
        if !self.dead && self.atomic {
            self.atomic = false;
        }
    }

    /// First half of `kill`/`kill_and_confirm`, up to the point where the
    /// confirm callback runs.
    pub fn kill_begin(&mut self) -> Result<(), KillError> {
        self.kill_mark()?;
        self.kill_fold();
        Ok(())
    }

    /// The start of [`kill_begin`](Self::kill_begin): the ref is marked
    /// dead (gets on the per-CPU slots still count there until the fold).
    pub fn kill_mark(&mut self) -> Result<(), KillError> {
        if self.dead {
            return Err(KillError::AlreadyDead);
        }
        self.dead = true;
        self.killing = true;
        Ok(())
    }

    /// The rest of [`kill_begin`](Self::kill_begin): a percpu-mode ref's
    /// slots are folded into the central count, under the kill's lock.
    pub fn kill_fold(&mut self) {
        debug_assert!(self.killing, "kill_fold without kill_mark: {self:?}");
        if !self.atomic {
            self.under_lock = true;
            self.fold();
            self.under_lock = false;
        }
    }

    /// Second half of a kill that passed [`kill_begin`](Self::kill_begin):
    /// the confirm callback ran (if any), then the initial reference is put.
    pub fn kill_end(&mut self, confirmed: bool) -> Result<(), KillError> {
        if confirmed {
            self.confirms += 1;
        }
        self.under_lock = true;
        self.put(1);
        self.under_lock = false;
        if self.count <= 0 && !self.released {
            // The count crossed zero while the ref was live (an underflow):
            // it is drained now, so the kill releases it.
            self.released = true;
            self.release_due = true;
        }
        self.killing = false;
        if self.count < 0 || self.underflow {
            Err(KillError::Underflow { count: self.count })
        } else {
            Ok(())
        }
    }

    /// The end of a kill, after its lock is released: a release it claimed
    /// runs now (other threads' steps may come between the kill's put and
    /// this, but no revive: a revive waits for the release to finish).
    pub fn kill_release(&mut self) {
        if self.release_due {
            self.release_due = false;
            self.releases += 1;
        }
    }

    fn revive(&mut self) {
        self.dead = false;
        self.reopen();
    }

    /// The last step of a revive: back to percpu mode unless forced atomic
    /// (a reinit publishes the new life in atomic mode first, then opens
    /// the per-CPU slots, under the lock).
    pub fn reopen(&mut self) {
        if !self.dead && !self.force_atomic {
            self.atomic = false;
        }
    }

    /// `reinit` up to the new life (count 1, live, still atomic), without
    /// [`reopen`](Self::reopen): for a checker that linearizes the two
    /// steps separately. Same errors as [`reinit`](Self::reinit).
    pub fn reinit_begin(&mut self) -> Result<(), ReviveError> {
        if !self.dead {
            return Err(ReviveError::Live);
        }
        if !self.allow_reinit {
            return Err(ReviveError::ReinitNotAllowed);
        }
        if self.count > 0 {
            return Err(ReviveError::NotDrained);
        }
        assert!(
            self.released,
            "model: reinit of a drained ref that was never released: {self:?}"
        );
        self.count = 1;
        self.released = false;
        self.dead = false;
        self.atomic = true;
        Ok(())
    }

    /// `resurrect()`.
    pub fn resurrect(&mut self) -> Result<(), ReviveError> {
        if !self.dead {
            return Err(ReviveError::Live);
        }
        if self.count > 0 {
            // inc_not_zero succeeded: a new initial reference. A new life
            // gets its own release, even if misused puts already released
            // the old one (the count came back through gets).
            self.count += 1;
            self.released = false;
            self.revive();
            return Ok(());
        }
        // A drained ref: a reinit.
        self.reinit()
    }

    /// `reinit()`.
    pub fn reinit(&mut self) -> Result<(), ReviveError> {
        self.reinit_begin()?;
        self.reopen();
        Ok(())
    }
}
