//! The only place with syscalls, sysfs probing and (later) inline asm.
//!
//! Everything above this module is portable Rust. Each submodule has a
//! portable fallback that loom and Miri check; the Linux fast paths are thin
//! and documented.

// Under loom the slots pick their "CPU" themselves (see percpu/slots.rs).
#[cfg_attr(percpu_ref_loom, allow(dead_code))]
pub(crate) mod cpu;
// Mappings, memfd, write-back, sysfs probing, cache-line flush (the pool).
#[cfg(all(feature = "dax", not(percpu_ref_loom)))]
pub(crate) mod mem;
#[cfg(all(
    target_os = "linux",
    target_arch = "x86_64",
    target_env = "gnu",
    not(miri),
    not(percpu_ref_loom)
))]
pub(crate) mod membarrier;
pub(crate) mod rseq;
