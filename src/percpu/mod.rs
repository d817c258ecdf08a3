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
//! | `builder` | `Builder` |
//! | `policy`, `completion` | release policies |

mod arc;
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

pub use arc::{OwnedRef, PercpuArc};
pub use builder::Builder;
pub use counter::PercpuRef;
pub use error::{KillError, ReviveError, SwitchError, Underflow};
pub use refs::Ref;

#[cfg(not(percpu_ref_model))]
pub(crate) use slots::{arena_usage, slot_bytes_per_ref};

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
    /// An atomic compare-exchange on the current CPU's slot; mode switches
    /// swap each slot to a drained value. Everywhere.
    Portable,
}

#[cfg(all(test, not(percpu_ref_model)))]
mod tests {
    use super::*;

    #[test]
    fn header_is_32_bytes() {
        // gate (limit 4 + state 4 + column 8) + central 8 + key 4 + heat 4.
        assert_eq!(std::mem::size_of::<PercpuRef<(), ()>>(), 32);
        assert_eq!(std::mem::size_of::<Ref<'_, (), policy::NoRelease>>(), 8);
        assert_eq!(std::mem::size_of::<OwnedRef<(), policy::NoRelease>>(), 8);
    }
}
