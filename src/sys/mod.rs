//! The only place with syscalls, sysfs probing and (later) inline asm.
//!
//! Everything above this module is portable Rust. Each submodule has a
//! portable fallback that loom and Miri check; the Linux fast paths are thin
//! and documented.

pub(crate) mod cpu;
