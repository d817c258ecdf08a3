//! The only place with syscalls, sysfs probing and inline asm.
//!
//! Everything above this module is portable Rust. Each submodule has a
//! portable fallback that loom and Miri check; the Linux fast paths are thin
//! and documented.

// Under loom the slots pick their "CPU" themselves (see percpu/slots.rs).
#[cfg_attr(percpu_ref_model, allow(dead_code))]
pub(crate) mod cpu;
// `fork()` handlers: the crate's process-wide locks, the fork count.
pub(crate) mod fork;
// Mappings, memfd, write-back, sysfs probing, cache-line flush (the pool).
#[cfg(all(feature = "dax", not(percpu_ref_model)))]
pub(crate) mod mem;
#[cfg(percpu_ref_rseq)]
pub(crate) mod membarrier;
#[cfg_attr(percpu_ref_model, allow(dead_code))]
pub(crate) mod rseq;
