//! Per-CPU reference counts with the Linux kernel's `percpu_ref` semantics,
//! a page refcount layer with a lifetime hook, and a persistent-memory page
//! pool that can be shut down while its pages are still in use.
//!
//! A [`PercpuRef`] counts references to a value with near-free get and put
//! (each CPU adds to its own slot) and can be *killed*: new live references
//! are refused, the owner's reference is dropped, and a pluggable
//! [`ReleasePolicy`] runs exactly once when the last reference drains. That
//! is what lets a device be shut down while its pages are still in use:
//! kill, wait for the drain, then unmap.
//!
//! # What is inside
//!
//! | layer | types | what |
//! |---|---|---|
//! | per-CPU count | [`PercpuRef`], [`Ref`], [`PercpuArc`], [`OwnedRef`], [`Builder`] | the kernel's `percpu_ref`: `tryget`, `tryget_live`, `kill`, `kill_and_confirm`, mode switches, `resurrect`, `reinit`; adaptive refs that go per-CPU when contended |
//! | release policies | [`ReleasePolicy`], [`Completion`], [`NoRelease`], `Deferred`, `OnRayon`, any `Fn(&T)` | what runs, exactly once, when a killed ref drains |
//! | shutdown at scale | [`KillBatch`], [`kill_all`], [`PercpuRef::holders`] | many refs killed with one barrier; who still holds a reference |
//! | pages | [`PageRef`], [`PageRefHook`], [`NoHook`], [`PercpuRefHook`], [`ArcPercpuRefHook`], [`MixedHook`] | a page count whose hook runs only on 0→1 and 1→0; [`NoHook`] compiles to a bare `AtomicU32` |
//! | device pool (`dax`) | `DevicePagePool`, `DevicePage`, `PoolOptions`, `ShutdownHandle` | pages from `/dev/dax`, a DAX file, a file or anonymous memory; lock-free address lookup; optimistic reads; hot shutdown that unmaps only after the last page |
//!
//! Long-form pages: [`docs::internals`] (how the count works),
//! [`docs::rseq`] (why the fast path is exact), [`docs::limitations`],
//! [`docs::background`] (the kernel history).
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `dax` | yes | `DevicePagePool` and its backends (pulls `arc-swap`, `crossbeam-utils`, more of `rustix`) |
//! | `epoch` | no | the `Deferred` release policy (crossbeam-epoch) |
//! | `rayon` | no | the `OnRayon` release policy |
//! | `track` | no | holder tracking: every reference records who took it ([`PercpuRef::holders`]); costs time on every get and put, nothing when off |
//!
//! With `default-features = false` the crate depends on `thiserror`,
//! `rustix` (for `membarrier`) and `libc` only.
//!
//! # Two tiers
//!
//! * **rseq** (Linux x86_64 and aarch64 with glibc ≥ 2.35): a get or put is
//!   a plain add to the current CPU's slot inside a restartable sequence;
//!   switching to atomic mode (and killing) closes the ref's gate and calls
//!   `membarrier` once. See [`docs::rseq`].
//! * **portable** (everywhere else, and under Miri or a model checker): a
//!   compare-exchange on the current CPU's slot; a switch drains the slots.
//!
//! The tier is chosen at run time ([`init`], [`Tier`]);
//! `PERCPU_REF_PORTABLE=1` or [`Builder::portable`] forces the portable one.
//! Neither needs an RCU grace period.
//!
//! # Lifecycle
//!
//! ```text
//!   new() ──▶ percpu-live ◀──switch_to_percpu── atomic-live ◀── new().atomic()
//!                 │        ──switch_to_atomic──▶     │
//!                 └──────────── kill() ──────────────┤
//!                                                    ▼
//!              resurrect() ◀──────────────────── dying (count > 0; tryget ok,
//!                                                    │     tryget_live fails)
//!                                                    │ last put
//!                                                    ▼
//!              reinit() ◀── .allow_reinit() ──── released (release ran once)
//! ```
//!
//! # Example
//!
//! ```
//! use percpu_ref::{Completion, PercpuArc};
//!
//! let drained = Completion::new();
//! let device = PercpuArc::new("pmem0", drained.clone());
//!
//! // I/O paths take references; they are cheap per-CPU adds.
//! let io = device.tryget_live_owned().expect("device is live");
//! let worker = std::thread::spawn(move || {
//!     assert_eq!(*io, "pmem0"); // ... use the device, then drop `io`
//! });
//!
//! // Shutdown: refuse new I/O, then wait for the in-flight I/O to finish.
//! device.kill().unwrap();
//! assert!(device.tryget_live().is_none());
//! worker.join().unwrap();
//! drained.wait();
//! ```
//!
//! # When does release run, and on which thread?
//!
//! Exactly once per killed life, when its count reaches zero: on the thread
//! whose put (drop of a [`Ref`] or [`OwnedRef`]) took it there, or inside
//! [`kill`](PercpuRef::kill) if no reference was outstanding (after the
//! kill has released the ref's lock, so a release may switch, kill or revive
//! refs). Policies move the work elsewhere: [`Completion`] wakes a waiter,
//! `Deferred` (feature `epoch`) waits for an epoch, `OnRayon` (feature
//! `rayon`) runs on a pool. A panicking release still counts as done, and
//! the panic propagates from the put that ran it.
//!
//! # Shutdown at scale
//!
//! [`KillBatch`] (or [`kill_all`]) kills many refs — of any value type and
//! policy — paying one barrier instead of one per ref, with each ref's
//! result reported separately. With the `track` feature,
//! [`PercpuRef::holders`] names who still holds references (thread, label,
//! backtrace) when a shutdown waits too long:
//!
//! ```
//! use percpu_ref::{Completion, PercpuRef};
//! use std::time::Duration;
//!
//! let drained = [Completion::new(), Completion::new()];
//! let disks = [
//!     PercpuRef::new("nvme0", drained[0].clone()),
//!     PercpuRef::new("nvme1", drained[1].clone()),
//! ];
//! let io = disks[1].tryget_live_tagged("compaction").unwrap();
//! assert!(percpu_ref::kill_all(&[&disks[0], &disks[1]]).iter().all(Result::is_ok));
//! for (disk, done) in disks.iter().zip(&drained) {
//!     if !done.wait_timeout(Duration::from_millis(1)) {
//!         // e.g. "1 reference still held:\n  1 by thread 'main' (ThreadId(1), label compaction)"
//!         eprintln!("{} stuck: {}", disk.value(), disk.holders());
//!     }
//! }
//! # drop(io);
//! ```
//!
//! # Costs
//!
//! | operation | rseq tier | portable tier |
//! |---|---|---|
//! | get/put/`tryget`/`tryget_live` (borrowed or owned) in percpu mode | a plain add in a restartable sequence (~1 ns per get+put pair) | one uncontended compare-exchange on this CPU's slot |
//! | the same in atomic mode or while dying | one atomic RMW on the shared count | the same |
//! | `switch_to_atomic`, `kill` | one `membarrier`, then a swap per possible CPU | a swap per possible CPU |
//! | `switch_to_percpu` | one column from the slot arena, a swap per possible CPU | the same |
//! | [`KillBatch`] / [`kill_all`] of many refs | one `membarrier` for all of them | no barrier at all |
//! | memory per ref | a 32-byte header; 8 bytes per possible CPU while counting per CPU ([`slot_bytes_per_ref`]) | the same |

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]
// Under a model checker the shim's types are the model's, so a std atomic or
// lock used directly (bypassing `sync`) is told apart and refused: CI runs
// clippy with `--cfg percpu_ref_loom` (clippy.toml lists the types).
#![cfg_attr(percpu_ref_model, warn(clippy::disallowed_types))]

#[cfg(all(feature = "dax", not(percpu_ref_model)))]
mod dax;
pub mod docs;
mod page;
mod percpu;
mod sync;
mod sys;

#[cfg(all(feature = "dax", not(percpu_ref_model)))]
pub use dax::{
    Backend, DevicePage, DevicePagePool, PageView, PageWriter, PersistMethod, PoolError,
    PoolOptions, PoolStats, ShutdownFuture, ShutdownHandle, ShutdownReport, StillHeld,
    MIN_PAGE_SIZE,
};
pub use page::{
    ArcPercpuRefHook, FirstRefError, MixedHook, NoHook, PageRef, PageRefHook, PercpuRefHook,
};

#[cfg(feature = "epoch")]
pub use percpu::policy::Deferred;
#[cfg(feature = "rayon")]
pub use percpu::policy::OnRayon;
pub use percpu::policy::{Completion, CompletionFuture, NoRelease, ReleasePolicy};
pub use percpu::{
    holder_label, kill_all, Builder, Holder, HolderKind, Holders, KillBatch, KillError, Killable,
    LabelScope, Mode, OwnedRef, PercpuArc, PercpuRef, Ref, ReviveError, SwitchError, Tier,
    Underflow,
};

/// Set up the fast tier early: on Linux x86_64 and aarch64 this registers
/// the process for `membarrier(PRIVATE_EXPEDITED_RSEQ)`, which takes
/// microseconds before threads exist and ~20 ms after. Optional (the first
/// `PercpuRef` does it otherwise); returns which tier new refs will use.
///
/// ```
/// let tier = percpu_ref::init();
/// let r = percpu_ref::PercpuRef::new(0, percpu_ref::NoRelease);
/// assert_eq!(r.tier(), tier);
/// ```
pub fn init() -> Tier {
    if sys::rseq::init() {
        Tier::Rseq
    } else {
        Tier::Portable
    }
}

/// Not API: hooks for this crate's own benchmarks (`benches/`), which may
/// only use public items. Hidden; may change in any release.
#[doc(hidden)]
#[cfg(not(percpu_ref_model))]
pub mod __bench {
    #[cfg(feature = "dax")]
    pub use crate::dax::free::FreeLists;
    pub use crate::sys::rseq::bench::*;
}

/// Bytes of per-CPU counter memory a [`PercpuRef`] holds on this machine
/// while it counts per CPU (8 bytes per possible CPU), besides its 32-byte
/// header. Atomic and dead refs hold none.
#[cfg(not(percpu_ref_model))]
pub fn slot_bytes_per_ref() -> usize {
    percpu::slot_bytes_per_ref()
}

/// Per-CPU slot memory of the whole process: how many refs hold a slot
/// column right now, and how many bytes the slot arena has reserved (it
/// grows in chunks of 16 columns and never shrinks; free columns are
/// reused).
///
/// ```
/// let r = percpu_ref::PercpuRef::new(0, percpu_ref::NoRelease);
/// let usage = percpu_ref::slot_usage();
/// assert!(usage.columns_in_use >= 1);
/// assert!(usage.bytes_reserved >= percpu_ref::slot_bytes_per_ref());
/// r.switch_to_atomic(); // gives its column back
/// # drop(r);
/// ```
#[cfg(not(percpu_ref_model))]
pub fn slot_usage() -> SlotUsage {
    let (columns_in_use, bytes_reserved) = percpu::arena_usage();
    SlotUsage {
        columns_in_use,
        bytes_reserved,
    }
}

/// See [`slot_usage`].
#[cfg(not(percpu_ref_model))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotUsage {
    /// Refs (of any tier) holding a slot column now.
    pub columns_in_use: usize,
    /// Bytes of slot arena allocated so far.
    pub bytes_reserved: usize,
}

// Keep the README's example compiling and passing.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
