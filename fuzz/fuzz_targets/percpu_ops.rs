//! `percpu_ops`: a sequence of operations on one `PercpuRef`, applied to the
//! real ref and to a sequential reference model; every observable must agree
//! after every step. See `fuzz/README.md`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use percpu_ref_fuzz::harness::{Harness, Inline, Op, Setup};

/// Builder flags, then the operations.
#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let (shared, arc) = input.setup.build();
    let mut h = Harness::new(&input.setup, shared, &arc, Inline);
    for &op in input.ops.iter().take(1024) {
        h.step(0, op);
    }
    h.finish();
});
