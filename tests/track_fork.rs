//! Holder tracking in a `fork()` child (feature `track`). The only test in
//! its binary: it turns backtraces on for the whole process.
#![cfg(all(feature = "track", target_os = "linux", not(percpu_ref_model)))]

use percpu_ref::{NoRelease, PercpuRef};
use std::backtrace::Backtrace;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

mod common;

/// A child records its holders without backtraces, and so never waits on
/// std's backtrace lock, which a parent thread held at the fork.
#[test]
#[cfg_attr(miri, ignore = "fork")]
fn a_fork_child_records_holders_without_backtraces() {
    // Before std first reads it (it caches the answer), while this is the
    // only thread of the test binary.
    std::env::set_var("RUST_LIB_BACKTRACE", "1");
    let r = Arc::new(PercpuRef::new(0u32, NoRelease));
    let parents = r.tryget_live_tagged("parent").unwrap();
    let with_backtrace = |label| {
        r.holders()
            .iter()
            .filter(|h| h.label() == Some(label))
            .map(|h| h.backtrace().is_some())
            .collect::<Vec<_>>()
    };
    assert_eq!(with_backtrace("parent"), [true], "backtraces are on");
    // Holds std's backtrace lock most of the time.
    let stop = Arc::new(AtomicBool::new(false));
    let capturer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            while !stop.load(SeqCst) {
                drop(Backtrace::force_capture());
            }
        })
    };
    for round in 0..20 {
        let code = common::in_fork_child(Duration::from_secs(20), || {
            let mine = r.tryget_live_tagged("child").unwrap();
            let clone = mine.clone();
            if with_backtrace("child") != [false, false] {
                return 1;
            }
            // The parent's record, as it was at the fork.
            if with_backtrace("parent") != [true] {
                return 2;
            }
            drop((mine, clone));
            0
        });
        assert_eq!(code, 0, "round {round}: the child's check {code} failed");
    }
    stop.store(true, SeqCst);
    capturer.join().unwrap();
    drop(parents);
    assert!(r.holders().is_empty());
}
