//! `PercpuRef<T, P>`: the per-CPU reference count.
//!
//! | module | what |
//! |---|---|
//! | `state` | the state word's bits and the life-state table |
//! | `counter` | the header, get/put/tryget fast paths, zero crossing, release |
//! | `lifecycle` | under the switch lock: columns, switches, kill, revive |
//! | `lock` | the switch lock (a state bit) and sleeping on the state word |
//! | `slots` | per-CPU slot columns and their arena (both tiers) |
//! | `refs` | `tryget*`, raw `get_many`/`put_many`, the borrowed `Ref` |
//! | `arc` | `PercpuArc` (owning handle) and `OwnedRef` |
//! | `batch` | `KillBatch`: many refs killed or switched with one barrier |
//! | `track` | holder tracking (feature `track`) |
//! | `builder` | `Builder` |
//! | `policy`, `completion` | release policies |

mod arc;
mod batch;
mod builder;
mod completion;
mod counter;
mod error;
mod lifecycle;
mod lock;
pub(crate) mod policy;
mod refs;
mod slots;
mod state;
mod track;

pub use arc::{OwnedRef, PercpuArc};
pub use batch::{kill_all, KillBatch, Killable};
pub use builder::Builder;
pub use counter::PercpuRef;
pub use error::{KillError, ReviveError, SwitchError, Underflow};
pub use refs::Ref;
pub use track::{holder_label, Holder, HolderKind, Holders, LabelScope};

#[cfg(not(percpu_ref_model))]
pub(crate) use slots::{arena_usage, slot_bytes_per_ref};
/// Holder tracking for the pool's pages (`dax`).
#[cfg(all(feature = "dax", not(percpu_ref_model)))]
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
pub(crate) use track::{hook, Token, Tracker};

/// Take this module's process-wide locks (the column arena, the portable
/// tier's keys, the wait buckets) just before a `fork()`, so that the child
/// gets them free (`sys::fork`'s prepare handler). No code path holds two
/// of them.
#[cfg(percpu_ref_linux)]
pub(crate) fn hold_for_fork() {
    let held = (slots::lock_for_fork(), lock::lock_for_fork());
    // A thread whose thread-locals are gone (a fork from a thread-local
    // destructor) drops the guards: the fork goes ahead unprotected.
    let _ = FORK_HELD.try_with(|h| *h.borrow_mut() = Some(held));
}

/// Release what [`hold_for_fork`] took, in the parent and in the child.
#[cfg(percpu_ref_linux)]
pub(crate) fn release_after_fork() {
    let held = FORK_HELD.try_with(|h| h.borrow_mut().take()).ok().flatten();
    drop(held);
}

#[cfg(percpu_ref_linux)]
std::thread_local! {
    /// What [`hold_for_fork`] took, on the thread that forks, until the
    /// fork returns.
    static FORK_HELD: std::cell::RefCell<Option<(slots::ForkHeld, lock::ForkHeld)>> =
        const { std::cell::RefCell::new(None) };
}

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
    /// (rseq); mode switches use `membarrier`. Linux x86_64 and aarch64
    /// with glibc's rseq registration (glibc ≥ 2.35, Linux ≥ 5.10); chosen
    /// at run time, see [`init`](crate::init).
    Rseq,
    /// An atomic compare-exchange on the current CPU's slot; mode switches
    /// swap each slot to a drained value. Everywhere.
    Portable,
}

#[cfg(all(test, not(percpu_ref_model)))]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "track"))]
    fn header_is_32_bytes() {
        // gate (limit 4 + state 4 + column 8) + central 8 + key 4 + heat 4.
        assert_eq!(std::mem::size_of::<PercpuRef<(), ()>>(), 32);
        // A pointer, plus the 4-byte rseq area token where that tier exists.
        let handle = if cfg!(percpu_ref_rseq) { 16 } else { 8 };
        assert_eq!(
            std::mem::size_of::<Ref<'_, (), policy::NoRelease>>(),
            handle
        );
        assert_eq!(
            std::mem::size_of::<OwnedRef<(), policy::NoRelease>>(),
            handle
        );
        assert_eq!(
            std::mem::size_of::<Option<Ref<'_, (), policy::NoRelease>>>(),
            handle
        );
    }

    #[test]
    #[cfg(feature = "track")]
    fn tracking_grows_the_header_by_its_shard_table_and_refs_by_a_token() {
        let table = std::mem::size_of::<Box<[u8]>>();
        assert_eq!(std::mem::size_of::<PercpuRef<(), ()>>(), 32 + table);
        // Pointer (+ rseq area token) + an 8-byte holder token.
        let handle = if cfg!(percpu_ref_rseq) { 24 } else { 16 };
        assert_eq!(
            std::mem::size_of::<Ref<'_, (), policy::NoRelease>>(),
            handle
        );
        assert_eq!(
            std::mem::size_of::<OwnedRef<(), policy::NoRelease>>(),
            handle
        );
    }
}

/// Compile-time pins of the public types' auto traits and `#[must_use]`
/// lints, as doctests (they run from here: rustdoc does not doctest
/// integration-test files). Each `compile_fail` has a twin that compiles,
/// so a pin fails for the reason it states and not a typo.
///
/// A `PercpuRef` of a `!Sync` value is not `Sync`...
/// ```compile_fail
/// fn sync<X: Sync>() {}
/// sync::<percpu_ref::PercpuRef<std::cell::Cell<u8>>>();
/// ```
/// ...while one of a `Sync` value is `Send + Sync`:
/// ```
/// fn send_sync<X: Send + Sync>() {}
/// send_sync::<percpu_ref::PercpuRef<u8>>();
/// send_sync::<percpu_ref::Ref<'static, u8>>();
/// ```
/// An `OwnedRef` to a `!Send` value is not `Send`...
/// ```compile_fail
/// fn send<X: Send>() {}
/// send::<percpu_ref::OwnedRef<std::rc::Rc<u8>>>();
/// ```
/// ...nor is a `PercpuArc` of a `!Sync` value (its release and drop may run
/// on another thread)...
/// ```compile_fail
/// fn send<X: Send>() {}
/// send::<percpu_ref::PercpuArc<std::cell::Cell<u8>>>();
/// ```
/// ...while both are `Send + Sync` for `Send + Sync` values:
/// ```
/// fn send_sync<X: Send + Sync>() {}
/// send_sync::<percpu_ref::OwnedRef<String, percpu_ref::Completion>>();
/// send_sync::<percpu_ref::PercpuArc<String, percpu_ref::Completion>>();
/// ```
/// A borrowed `Ref` to a `!Sync` value cannot cross threads:
/// ```compile_fail
/// fn send<X: Send>() {}
/// send::<percpu_ref::Ref<'static, std::cell::Cell<u8>>>();
/// ```
///
/// Dropping what must not be dropped is a lint error under
/// `deny(unused_must_use)`: a raw reference...
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let r = percpu_ref::PercpuRef::new(0, percpu_ref::NoRelease);
/// percpu_ref::Ref::into_raw(r.tryget().unwrap());
/// ```
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let r = percpu_ref::PercpuArc::new(0, percpu_ref::NoRelease);
/// percpu_ref::OwnedRef::into_raw(r.tryget_owned().unwrap());
/// ```
/// ...a reference taken and dropped at once, a timed-out wait:
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let r = percpu_ref::PercpuRef::new(0, percpu_ref::NoRelease);
/// r.tryget_live();
/// ```
/// ```compile_fail
/// #![deny(unused_must_use)]
/// percpu_ref::Completion::new().wait_timeout(std::time::Duration::ZERO);
/// ```
/// The twin, using every result, compiles under the same lint:
/// ```
/// #![deny(unused_must_use)]
/// let r = percpu_ref::PercpuArc::new(0, percpu_ref::NoRelease);
/// let raw = percpu_ref::Ref::into_raw(r.tryget().unwrap());
/// // SAFETY: the raw reference from `into_raw`, put once.
/// unsafe { raw.put_many(1) };
/// let owned = percpu_ref::OwnedRef::into_raw(r.tryget_owned().unwrap());
/// // SAFETY: from `into_raw`, re-wrapped once.
/// drop(unsafe { percpu_ref::OwnedRef::from_raw(owned) });
/// let _held = r.tryget_live();
/// let _done = percpu_ref::Completion::new().wait_timeout(std::time::Duration::ZERO);
/// ```
#[allow(dead_code)]
fn auto_trait_and_must_use_pins() {}
