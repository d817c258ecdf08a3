//! The binary `scripts/zero-cost.sh` measures under callgrind to prove that
//! page holder tracking costs nothing when the `track` feature is off: it
//! is built twice — as is, and with every tracking hook compiled out
//! (`RUSTFLAGS="--cfg percpu_ref_untracked"`) — and the instructions
//! executed inside `zc_<variant>` must be equal. (Built a third time with
//! `--features track`, it shows what tracking costs.)
//!
//! Usage: `zero_cost_pool <variant> [iterations]`, variants:
//!
//! * `page`: the hot path of an allocated page: a clone and a
//!   `DevicePagePool::lookup` of it, both dropped (no 0→1 or 1→0
//!   transition, the pool's own ref untouched by the clone);
//! * `alloc`: `alloc` and drop of a page (both transitions: the page takes
//!   and gives back its reference on the pool).
//!
//! Needs the `dax` feature (on by default).

#[cfg(feature = "dax")]
use percpu_ref::{DevicePage, DevicePagePool};
#[cfg(feature = "dax")]
use std::hint::black_box;

/// One iteration: clone the page, look its address up, drop both.
/// Returns the successful lookups.
#[cfg(feature = "dax")]
#[no_mangle]
#[inline(never)]
pub fn zc_page(page: &DevicePage, n: u64) -> u64 {
    let page = black_box(page);
    let mut found = 0;
    for _ in 0..n {
        let c = page.clone();
        if let Ok(l) = DevicePagePool::lookup(black_box(c.as_ptr())) {
            found += 1;
            drop(black_box(l));
        }
        drop(black_box(c));
    }
    found
}

/// One iteration: allocate a page and drop it. Returns the successful
/// allocations.
#[cfg(feature = "dax")]
#[no_mangle]
#[inline(never)]
pub fn zc_alloc(pool: &DevicePagePool, n: u64) -> u64 {
    let pool = black_box(pool);
    let mut done = 0;
    for _ in 0..n {
        if let Ok(p) = pool.alloc() {
            done += 1;
            drop(black_box(p));
        }
    }
    done
}

#[cfg(feature = "dax")]
fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| String::from("page"));
    let n: u64 = match args.next().map(|s| s.parse()) {
        None => 100_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("zero_cost_pool: bad iteration count: {e}");
            std::process::exit(2);
        }
    };
    let n = black_box(n);
    let pool = DevicePagePool::anonymous(16 * 4096).expect("an anonymous pool");
    let done = match variant.as_str() {
        "page" => {
            let page = pool.alloc().expect("a free page");
            // Warm this thread's last-pool entry, as in steady state.
            drop(DevicePagePool::lookup(page.as_ptr()).expect("allocated"));
            zc_page(&page, n)
        }
        "alloc" => zc_alloc(&pool, n),
        other => {
            eprintln!("zero_cost_pool: unknown variant {other:?}");
            std::process::exit(2);
        }
    };
    // Every operation succeeds on a live pool: a wrong count fails loudly.
    assert_eq!(done, n, "{variant}: {done} successes of {n}");
    assert!(pool.shutdown().is_complete(), "every page was dropped");
}

#[cfg(not(feature = "dax"))]
fn main() {
    eprintln!("zero_cost_pool: needs the `dax` feature");
    std::process::exit(2);
}
