//! `percpu_steps`: lifecycle scenarios on one `PercpuRef` (2–3 threads'
//! op lists) with the schedule at every atomic step of the crate taken from
//! the input. See `fuzz/README.md` and `src/steps.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| percpu_ref_fuzz_steps::steps::run_bytes(data));
