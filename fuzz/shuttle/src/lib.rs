//! The `percpu_steps` fuzz target's harness: `percpu-ref` built with
//! `--cfg percpu_ref_shuttle`, scheduled step by step from the fuzz input.
//! See `../README.md`.

#[cfg(not(percpu_ref_shuttle))]
compile_error!(
    "build with RUSTFLAGS=\"--cfg percpu_ref_shuttle\" (scripts/fuzz-smoke.sh does): without it \
     the crate's atomics are not scheduling points"
);

/// A held reference, shared with the other fuzz targets.
#[path = "../../src/held.rs"]
pub mod held;
/// The sequential model shared with the other fuzz targets.
#[path = "../../src/model.rs"]
pub mod model;
pub mod steps;
