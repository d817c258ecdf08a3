//! The binary `scripts/zero-cost.sh` measures under callgrind: the same
//! page refcount workload on `PageRef<NoHook>` and on a hand-written
//! `AtomicU32` counter with the same operations, orderings and misuse
//! checks. Equal instruction counts prove that the hook layer (the wrapper,
//! the generic hook, `NoHook`) compiles away.
//!
//! Usage: `zero_cost_page <variant> [iterations]`. Each variant runs in
//! its own `#[no_mangle]` function (`zc_<variant>`) so callgrind can count
//! just that function with `--toggle-collect`:
//!
//! * `page`, `bare`: the compared pair (all operations and transitions).
//! * `minimal`: the counter without any misuse checks, for reference: the
//!   checks cost about a compare per operation, in both compared variants
//!   alike.
//! * `hot_ordinary`, `hot_device`: the hot path (no transitions) of an
//!   ordinary page and of a device page hooked to a `PercpuRef`.

use percpu_ref::{NoHook, PageRef, PageRefHook, PercpuRef, PercpuRefHook};
use std::hint::black_box;
use std::sync::atomic::{fence, AtomicU32, Ordering::*};

/// Defines one `#[no_mangle]` workload function `$name(page: &$ty, n)`:
/// per iteration a lookup, a get, three puts (the last one final) and a
/// re-allocation — every `PageRef` operation on the hot path, and both
/// terminal transitions. The count is 1 before and after. Returns the
/// number of successful lookups, final puts and allocations.
///
/// `first_ref` turns the counter's `first_ref` result into a `bool`
/// (`PageRef::first_ref` returns a `Result`, the hand-written counters a
/// `bool`). Every compared variant comes from this one body, so the
/// workloads are identical by construction.
macro_rules! workload {
    ($(#[$attr:meta])* $name:ident($ty:ty), first_ref: |$p:ident| $first_ref:expr) => {
        $(#[$attr])*
        #[no_mangle]
        #[inline(never)]
        pub fn $name(page: &$ty, n: u64) -> u64 {
            // black_box once: the loop cannot know what the counter holds,
            // and the results are summed into the return value, so nothing
            // is optimised away; per-iteration black_boxes would add their
            // own instructions (address materialisation) that differ with
            // register pressure.
            let $p = black_box(page);
            let mut done = 0;
            for _ in 0..n {
                done += $p.get_unless_zero() as u64; // 1→2
                $p.inc(); // 2→3
                done += $p.dec_and_test() as u64; // 3→2
                done += $p.dec_and_test() as u64; // 2→1
                done += $p.dec_and_test() as u64; // 1→0
                done += $first_ref as u64; // 0→1
            }
            done
        }
    };
}

workload! {
    /// The workload on `PageRef<NoHook>`.
    zc_page(PageRef<NoHook>), first_ref: |p| p.first_ref().is_ok()
}

workload! {
    /// The same workload on [`bare::Counter`].
    zc_bare(bare::Counter), first_ref: |p| p.first_ref()
}

workload! {
    /// The same workload on [`minimal::Counter`] (no misuse checks).
    zc_minimal(minimal::Counter), first_ref: |p| p.first_ref()
}

/// The hot path only (count stays ≥ 1: one lookup, one get, two puts) on
/// an ordinary page ...
#[no_mangle]
#[inline(never)]
pub fn zc_hot_ordinary(page: &PageRef<NoHook>, n: u64) -> u64 {
    hot(page, n)
}

/// ... and on a device page hooked to a `PercpuRef`: the hook is never
/// called here, so the instruction counts must be equal too.
#[no_mangle]
#[inline(never)]
pub fn zc_hot_device(page: &PageRef<PercpuRefHook<'_, ()>>, n: u64) -> u64 {
    hot(page, n)
}

#[inline(always)]
fn hot<H: PageRefHook>(page: &PageRef<H>, n: u64) -> u64 {
    let p = black_box(page); // as in workload!
    let mut done = 0;
    for _ in 0..n {
        done += p.get_unless_zero() as u64; // 1→2
        p.inc(); // 2→3
        done += p.dec_and_test() as u64; // 3→2
        done += p.dec_and_test() as u64; // 2→1
    }
    done
}

/// A page counter written by hand on a bare `AtomicU32`: what `PageRef`
/// does, without the hook — the same orderings and the same misuse checks
/// (underflow, inc from 0, overflow, the frozen flag).
pub mod bare {
    use super::*;

    const FROZEN: u32 = 1 << 31;
    const MAX: u32 = 1 << 30;

    /// The counter.
    #[derive(Debug)]
    pub struct Counter(pub AtomicU32);

    impl Counter {
        /// 0→1.
        #[inline]
        pub fn first_ref(&self) -> bool {
            // AcqRel/Relaxed: as PageRef::first_ref.
            self.0.compare_exchange(0, 1, AcqRel, Relaxed).is_ok()
        }

        /// n→n+1, n ≥ 1.
        #[inline]
        pub fn inc(&self) {
            // Relaxed: as PageRef::inc.
            let old = self.0.fetch_add(1, Relaxed);
            if old.wrapping_sub(1) >= MAX - 1 {
                self.inc_failed(old);
            }
        }

        /// n→n−1; true on 1→0.
        #[inline]
        pub fn dec_and_test(&self) -> bool {
            // Release + Acquire fence on zero: as PageRef::dec_and_test.
            let old = self.0.fetch_sub(1, Release);
            if old.wrapping_sub(2) < MAX - 1 {
                return false;
            }
            if old == 1 {
                fence(Acquire);
                return true;
            }
            self.dec_unusual(old)
        }

        /// n→n+1 unless 0 or frozen.
        #[inline]
        pub fn get_unless_zero(&self) -> bool {
            // Relaxed load, Acquire CAS: as PageRef::get_unless_zero.
            let mut cur = self.0.load(Relaxed);
            loop {
                if cur.wrapping_sub(1) >= MAX - 1 {
                    if cur != 0 && cur & FROZEN == 0 {
                        get_overflow(cur);
                    }
                    return false;
                }
                match self.0.compare_exchange_weak(cur, cur + 1, Acquire, Relaxed) {
                    Ok(_) => return true,
                    Err(found) => cur = found,
                }
            }
        }

        #[cold]
        #[inline(never)]
        fn inc_failed(&self, old: u32) -> ! {
            self.0.fetch_sub(1, Relaxed);
            if old == 0 {
                panic!("inc on a free page");
            } else if old & FROZEN != 0 {
                panic!("inc on a frozen page ({})", old & !FROZEN);
            } else {
                panic!("overflow ({old}, max {MAX})");
            }
        }

        #[cold]
        #[inline(never)]
        fn dec_unusual(&self, old: u32) -> bool {
            if old & FROZEN == 0 && old > MAX {
                return false;
            }
            self.0.fetch_add(1, Relaxed);
            if old == 0 {
                panic!("underflow");
            }
            panic!("dec on a frozen page ({})", old & !FROZEN);
        }
    }

    #[cold]
    #[inline(never)]
    fn get_overflow(cur: u32) {
        debug_assert!(false, "at the limit ({cur}, max {MAX})");
    }
}

/// The textbook counter with no misuse checks at all (for reference).
pub mod minimal {
    use super::*;

    /// The counter.
    #[derive(Debug)]
    pub struct Counter(pub AtomicU32);

    impl Counter {
        /// 0→1.
        #[inline]
        pub fn first_ref(&self) -> bool {
            self.0.compare_exchange(0, 1, AcqRel, Relaxed).is_ok()
        }
        /// n→n+1.
        #[inline]
        pub fn inc(&self) {
            self.0.fetch_add(1, Relaxed);
        }
        /// n→n−1; true on 1→0.
        #[inline]
        pub fn dec_and_test(&self) -> bool {
            if self.0.fetch_sub(1, Release) == 1 {
                fence(Acquire);
                true
            } else {
                false
            }
        }
        /// n→n+1 unless 0.
        #[inline]
        pub fn get_unless_zero(&self) -> bool {
            let mut cur = self.0.load(Relaxed);
            while cur != 0 {
                match self.0.compare_exchange_weak(cur, cur + 1, Acquire, Relaxed) {
                    Ok(_) => return true,
                    Err(found) => cur = found,
                }
            }
            false
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| String::from("page"));
    let n: u64 = match args.next().map(|s| s.parse()) {
        None => 100_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("zero_cost_page: bad iteration count: {e}");
            std::process::exit(2);
        }
    };
    let n = black_box(n);
    // Each iteration returns 3: a successful lookup, one final put and one
    // successful allocation (the hot variants: 1, topped up to 3).
    let done = match variant.as_str() {
        "page" => {
            let page = PageRef::new(NoHook);
            page.first_ref().unwrap();
            zc_page(&page, n)
        }
        "bare" => {
            let c = bare::Counter(AtomicU32::new(1));
            zc_bare(&c, n)
        }
        "minimal" => {
            let c = minimal::Counter(AtomicU32::new(1));
            zc_minimal(&c, n)
        }
        "hot_ordinary" => {
            let page = PageRef::new(NoHook);
            page.first_ref().unwrap();
            zc_hot_ordinary(&page, n) + 2 * n
        }
        "hot_device" => {
            // Atomic mode: the setup's `first_ref` then reads no CPU id,
            // which valgrind cannot run through rustix's vDSO call
            // (rustix issue 1559). The measured loop never touches the
            // PercpuRef either way.
            let device = PercpuRef::builder(()).atomic().build();
            // SAFETY: only the PageRef calls the hook; the workload is
            // balanced.
            let page = PageRef::new(unsafe { PercpuRefHook::new(&device) });
            page.first_ref().unwrap();
            zc_hot_device(&page, n) + 2 * n
        }
        other => {
            eprintln!(
                "zero_cost_page: unknown variant {other:?} \
                 (page, bare, minimal, hot_ordinary or hot_device)"
            );
            std::process::exit(2);
        }
    };
    assert_eq!(
        done,
        3 * n,
        "every lookup and allocation succeeds, one final put each"
    );
    println!("{variant}: {n} iterations");
}
