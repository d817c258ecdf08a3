//! The binary `scripts/zero-cost.sh` measures under callgrind to prove that
//! holder tracking costs nothing when the `track` feature is off: it is
//! built twice — as is, and with every tracking hook compiled out
//! (`RUSTFLAGS="--cfg percpu_ref_untracked"`) — and the instructions
//! executed inside `zc_<variant>` must be equal. (Built a third time with
//! `--features track`, it shows what tracking costs.)
//!
//! Usage: `zero_cost_percpu <variant> [iterations]`, variants:
//!
//! * `percpu`: a ref counting per CPU;
//! * `atomic`: a ref forced to atomic mode (the shared-count paths).
//!
//! Each iteration takes every kind of reference once and gives it back:
//! `tryget_live`, a clone, `tryget_live_owned`, raw `get_many`/`put_many`.

use percpu_ref::{Mode, NoRelease, PercpuArc, PercpuRef};
use std::hint::black_box;

/// One iteration: a `Ref` taken and cloned, an `OwnedRef`, two raw
/// references; all dropped again. Returns the successful trygets.
#[no_mangle]
#[inline(never)]
pub fn zc_percpu(r: &PercpuArc<u64>, n: u64) -> u64 {
    run(black_box(r), n)
}

/// The same workload on a ref in atomic mode. (The mode check, outside
/// the loop, also keeps the linker from folding this into `zc_percpu`.)
#[no_mangle]
#[inline(never)]
pub fn zc_atomic(r: &PercpuArc<u64>, n: u64) -> u64 {
    let r = black_box(r);
    assert_eq!(r.mode(), Mode::Atomic);
    run(r, n)
}

#[inline(always)]
fn run(r: &PercpuArc<u64>, n: u64) -> u64 {
    let mut done = 0;
    for _ in 0..n {
        if let Some(a) = r.tryget_live() {
            let b = a.clone();
            // SAFETY: `a` keeps the count above zero; both raw references
            // are put right away.
            unsafe {
                r.get_many(2);
                r.put_many(2);
            }
            drop((a, b));
            done += 1;
        }
        if let Some(o) = r.tryget_live_owned() {
            drop(o);
            done += 1;
        }
    }
    done
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| String::from("percpu"));
    let n: u64 = match args.next().map(|s| s.parse()) {
        None => 100_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("zero_cost_percpu: bad iteration count: {e}");
            std::process::exit(2);
        }
    };
    let n = black_box(n);
    let done = match variant.as_str() {
        "percpu" => zc_percpu(&PercpuArc::new(0, NoRelease), n),
        "atomic" => zc_atomic(&PercpuRef::builder(0).atomic().build_arc(), n),
        other => {
            eprintln!("zero_cost_percpu: unknown variant {other:?}");
            std::process::exit(2);
        }
    };
    // Every tryget succeeds on a live ref: a wrong count fails loudly.
    assert_eq!(
        done,
        2 * n,
        "{variant}: {done} successful trygets of {}",
        2 * n
    );
}
