//! The get+put contenders shared by `benches/percpu.rs` and
//! `examples/scaling.rs`: one small trait, many counters, the same workload.
//!
//! Every contender implements [`Counter::run`]: `iters` get+put pairs on the
//! calling thread, as worker number `worker` of a run with a known thread
//! count. The per-thread setup a real user would do once (take a `Ref`,
//! find a thread-local slot) happens before the loop, outside the pairs.

use crossbeam_utils::CachePadded;
use percpu_ref::__bench::GateBench;
use percpu_ref::{NoRelease, PercpuArc, PercpuRef};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::Arc;

mod run;
pub(crate) use run::*;

/// A named way to build a [`Counter`] for a given number of threads.
pub(crate) struct Contender {
    /// Short name, used as the criterion function id and the CSV key.
    pub(crate) name: &'static str,
    /// Build a fresh counter for `threads` workers.
    pub(crate) make: Box<dyn Fn(usize) -> Box<dyn Counter>>,
}

/// How to build the `PercpuRef` under test, one entry per counter tier.
/// Every entry becomes a `get+put` contender named after it (and, in the
/// criterion suite, a `<name>_tryget_live` one). A tier that needs a builder
/// option (e.g. forcing the portable tier) is one more line here.
pub(crate) const PERCPU_TIERS: &[Tier] = &[
    // The default: the rseq tier where available (else portable).
    Tier {
        name: "percpu_ref",
        new: || PercpuRef::new(0, NoRelease),
        new_arc: || PercpuArc::new(0, NoRelease),
    },
    Tier {
        name: "percpu_ref_portable",
        new: || PercpuRef::builder(0).portable().build(),
        new_arc: || PercpuRef::builder(0).portable().build_arc(),
    },
];

/// One way to build the `PercpuRef` under test.
pub(crate) struct Tier {
    /// The contender's name.
    pub(crate) name: &'static str,
    /// Build a live ref in percpu mode.
    pub(crate) new: fn() -> PercpuRef<u64>,
    /// The same as an owning handle, for owned references.
    pub(crate) new_arc: fn() -> PercpuArc<u64>,
}

/// `Ref::clone` + drop on a `Ref` taken once per thread.
struct PercpuGetPut(PercpuRef<u64>);

impl Counter for PercpuGetPut {
    fn run(&self, _worker: usize, iters: u64) {
        let r = black_box(&self.0)
            .tryget()
            .expect("the ref under test is live");
        for _ in 0..iters {
            drop(r.clone()); // asm or atomics: never optimised away
        }
    }
}

/// `tryget_live` + drop.
struct PercpuTrygetLive(PercpuRef<u64>);

impl Counter for PercpuTrygetLive {
    fn run(&self, _worker: usize, iters: u64) {
        let r = black_box(&self.0);
        for _ in 0..iters {
            drop(r.tryget_live());
        }
    }
}

/// `tryget` + drop.
struct PercpuTryget(PercpuRef<u64>);

impl Counter for PercpuTryget {
    fn run(&self, _worker: usize, iters: u64) {
        let r = black_box(&self.0);
        for _ in 0..iters {
            drop(r.tryget());
        }
    }
}

/// `tryget_live_owned` + drop on a shared `PercpuArc`: the `'static`
/// reference async code holds.
struct PercpuOwned(PercpuArc<u64>);

impl Counter for PercpuOwned {
    fn run(&self, _worker: usize, iters: u64) {
        let r = black_box(&self.0);
        for _ in 0..iters {
            drop(r.tryget_live_owned());
        }
    }
}

/// `OwnedRef::clone` + drop on an owned reference taken once per thread.
struct PercpuOwnedClone(PercpuArc<u64>);

impl Counter for PercpuOwnedClone {
    fn run(&self, _worker: usize, iters: u64) {
        let o = black_box(&self.0)
            .tryget_live_owned()
            .expect("the ref under test is live");
        for _ in 0..iters {
            drop(o.clone());
        }
    }
}

/// `Arc::clone` + drop on one shared `Arc`.
struct ArcCounter(Arc<u64>);

impl Counter for ArcCounter {
    fn run(&self, _worker: usize, iters: u64) {
        let a = black_box(&self.0);
        for _ in 0..iters {
            drop(Arc::clone(a)); // atomics: never optimised away
        }
    }
}

/// One shared `AtomicUsize`, add then sub (the orderings `Arc` uses).
struct SharedAtomic(AtomicUsize);

impl Counter for SharedAtomic {
    fn run(&self, _worker: usize, iters: u64) {
        for _ in 0..iters {
            let c = black_box(&self.0);
            // Relaxed: as Arc::clone; the benchmark only needs the RMW.
            c.fetch_add(1, Relaxed);
            // Release: as Arc's drop, so the cost matches a real refcount.
            c.fetch_sub(1, Release);
        }
    }
}

/// A sharded counter: one cache-padded atomic slot per worker thread.
struct Sharded(Box<[CachePadded<AtomicUsize>]>);

impl Counter for Sharded {
    fn run(&self, worker: usize, iters: u64) {
        let slot: &AtomicUsize = &self.0[worker % self.0.len()];
        for _ in 0..iters {
            let c = black_box(slot);
            // Relaxed: as in SharedAtomic.
            c.fetch_add(1, Relaxed);
            // Release: as in SharedAtomic.
            c.fetch_sub(1, Release);
        }
    }
}

thread_local! {
    static FLOOR: Cell<u64> = const { Cell::new(0) };
}

/// The floor: a plain (non-atomic) add and sub through a pointer to a
/// thread-local, i.e. `inc [reg]; dec [reg]`. The pointer is laundered
/// through `black_box` once, so the compiler cannot turn the accesses into
/// the slow `inc fs:[..]` chain a `thread_local!` `Cell` in the loop becomes
/// (~3 ns per pair on AMD against ~0.5); volatile accesses keep the +1/-1
/// from being folded away.
struct TlsFloor;

impl Counter for TlsFloor {
    fn run(&self, _worker: usize, iters: u64) {
        FLOOR.with(|cell| {
            let p: *mut u64 = black_box(cell.as_ptr());
            for _ in 0..iters {
                // SAFETY: `p` points to this thread's `FLOOR`, alive for the
                // whole closure; `Cell` allows writes through its pointer,
                // and no reference to the value exists meanwhile.
                unsafe {
                    p.write_volatile(p.read_volatile().wrapping_add(1));
                    p.write_volatile(p.read_volatile().wrapping_sub(1));
                }
            }
        });
    }
}

/// The crate's sequences alone: `add_imm::<1>` + `add_imm::<-1>` on an
/// open gate, no `PercpuRef` logic around them.
struct GateAddImm(GateBench);

impl Counter for GateAddImm {
    fn run(&self, _worker: usize, iters: u64) {
        let g = black_box(&self.0);
        for _ in 0..iters {
            g.get_put();
        }
    }
}

/// As [`GateAddImm`] with the rseq area offset kept in a register, as a
/// reference handle carrying the crate's `Area` token would keep it:
/// `add_imm_in`.
struct GateAddImmArea(GateBench);

impl Counter for GateAddImmArea {
    fn run(&self, _worker: usize, iters: u64) {
        let g = black_box(&self.0);
        let area = g.area().expect("the rseq tier is available");
        for _ in 0..iters {
            g.get_put_in(area);
        }
    }
}

/// The physical limit for these semantics: a bare gated sequence pair with
/// every input in a register (arm store, cpu-id load, compare with the
/// gate's limit in memory, row address, immediate commit).
struct Limit(GateBench);

impl Counter for Limit {
    fn run(&self, _worker: usize, iters: u64) {
        assert_eq!(self.0.limit_pairs(iters), 0, "an open gate refused");
    }
}

/// `crossbeam_epoch::pin()` + drop of the guard.
#[cfg(feature = "epoch")]
struct EpochPin;

#[cfg(feature = "epoch")]
impl Counter for EpochPin {
    fn run(&self, _worker: usize, iters: u64) {
        for _ in 0..iters {
            drop(black_box(crossbeam_epoch::pin()));
        }
    }
}

/// The contenders the scaling sweep plots: every `PercpuRef` tier, `Arc`,
/// a shared `AtomicUsize`, a sharded counter, and the thread-local floor.
pub(crate) fn core_contenders() -> Vec<Contender> {
    let mut v: Vec<Contender> = PERCPU_TIERS
        .iter()
        .map(|&Tier { name, new, .. }| Contender {
            name,
            make: Box::new(move |_| Box::new(PercpuGetPut(new()))),
        })
        .collect();
    v.push(Contender {
        name: "arc",
        make: Box::new(|_| Box::new(ArcCounter(Arc::new(0)))),
    });
    v.push(Contender {
        name: "atomic_usize",
        make: Box::new(|_| Box::new(SharedAtomic(AtomicUsize::new(0)))),
    });
    v.push(Contender {
        name: "sharded",
        make: Box::new(|threads| {
            let slots = (0..threads.max(1))
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect();
            Box::new(Sharded(slots))
        }),
    });
    v.push(Contender {
        name: "tls_floor",
        make: Box::new(|_| Box::new(TlsFloor)),
    });
    v
}

/// [`core_contenders`] plus `tryget_live`+drop for every tier, the
/// sequences alone (`gate_add_imm`, `gate_add_imm_area`) and the `limit`
/// contender where the
/// rseq tier is available, and `crossbeam_epoch::pin` (feature `epoch`):
/// the criterion suite.
pub(crate) fn all_contenders() -> Vec<Contender> {
    let mut v = core_contenders();
    let tiers = PERCPU_TIERS.len();
    let mut at = tiers;
    for &Tier { name, new, new_arc } in PERCPU_TIERS {
        let named = |suffix: &str| -> &'static str {
            Box::leak(format!("{name}_{suffix}").into_boxed_str())
        };
        let more = [
            Contender {
                name: named("tryget"),
                make: Box::new(move |_| Box::new(PercpuTryget(new()))),
            },
            Contender {
                name: named("tryget_live"),
                make: Box::new(move |_| Box::new(PercpuTrygetLive(new()))),
            },
            Contender {
                name: named("owned"),
                make: Box::new(move |_| Box::new(PercpuOwned(new_arc()))),
            },
            Contender {
                name: named("owned_clone"),
                make: Box::new(move |_| Box::new(PercpuOwnedClone(new_arc()))),
            },
        ];
        for c in more {
            v.insert(at, c);
            at += 1;
        }
    }
    if GateBench::new().is_some() {
        let gate = |_| GateBench::new().expect("the rseq tier stays available");
        v.push(Contender {
            name: "gate_add_imm",
            make: Box::new(move |t| Box::new(GateAddImm(gate(t)))),
        });
        v.push(Contender {
            name: "gate_add_imm_area",
            make: Box::new(move |t| Box::new(GateAddImmArea(gate(t)))),
        });
        v.push(Contender {
            name: "limit",
            make: Box::new(move |t| Box::new(Limit(gate(t)))),
        });
    }
    #[cfg(feature = "epoch")]
    v.push(Contender {
        name: "epoch_pin",
        make: Box::new(|_| Box::new(EpochPin)),
    });
    v
}
