//! Shared pieces of the `percpu-ref` fuzz targets: the sequential reference
//! model and the step executor. See `README.md`.

pub mod harness;
pub mod held;
pub mod model;
