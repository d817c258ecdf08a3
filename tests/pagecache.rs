//! The pagecache demo's core, run small: its invariants, not its timings.
#![cfg(feature = "dax")]

#[path = "../examples/pagecache/engine.rs"]
mod engine;

use engine::{Config, Source};
use std::time::Duration;

fn small() -> Config {
    Config {
        source: Source::Anonymous,
        pages: 256,
        page_size: 4096,
        keys: 64,
        readers: 2,
        phase: Duration::from_millis(if cfg!(miri) { 20 } else { 300 }),
        hold: Duration::from_micros(300),
        depth: 4,
        hot_readers: 2,
        hot_keys: 4,
        arc_baseline: true,
        leak: None,
        verbose: false,
    }
}

fn check(cfg: &Config) -> engine::Outcome {
    let out = engine::run(cfg).expect("run");
    assert_eq!(out.problems(), Vec::<String>::new());
    assert_eq!(out.checksum_failures, 0);
    // Hot reads ran (scoped and counted), and none saw a torn page.
    assert_eq!(out.torn_reads, 0);
    assert!(out.hot_reads > 0);
    for name in [engine::HOT_SCOPED, engine::HOT_COUNTED, engine::IO_POOL] {
        let p = out
            .phase(name)
            .unwrap_or_else(|| panic!("phase {name} ran"));
        assert!(p.ops > 0 && p.ns_per_op() > 0.0, "{p:?}");
    }
    // Nothing lost: every page is back on the free lists.
    assert_eq!(out.free_after, out.total_pages);
    assert_eq!(out.allocated_after, 0);
    // Unmapped only after the engine let go of its last page.
    assert_eq!(out.held_when_unmapped, 0);
    assert!(out.report.is_some());
    // The shutdown was hot: the engine held pages when it started...
    assert!(out.held_at_shutdown >= cfg.keys, "table pages held");
    // ...and new use was refused: each reader's lookup, the writer's
    // allocation and the demo's own probe allocation.
    assert!(out.refused_after_shutdown >= cfg.readers as u64 + 2);
    assert!(out.unexpected_errors.is_empty());
    assert!(out.pages_allocated >= cfg.keys as u64);
    let order: Vec<&str> = out.timeline.iter().map(|(_, s)| s.as_str()).collect();
    assert!(order.first().unwrap().starts_with("shutdown started"));
    assert!(order.last().unwrap().starts_with("drained"));
    out
}

#[test]
fn hot_shutdown_on_anonymous_pool_keeps_every_invariant() {
    let out = check(&small());
    // The baseline ran, and its shutdown guard held.
    assert!(out.phase(engine::IO_ARC).is_some_and(|p| p.ops > 0));
    assert!(out.phase(engine::HOT_ARC).is_some_and(|p| p.ops > 0));
    assert_eq!(out.baseline_leaks, 0);
}

#[test]
fn hot_shutdown_on_file_pool_keeps_every_invariant() {
    let dir = std::env::temp_dir().join(format!("percpu-ref-pagecache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pool");
    let cfg = Config {
        source: Source::File(path.clone()),
        arc_baseline: false,
        ..small()
    };
    check(&cfg);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configuration_is_an_error_not_a_panic() {
    let cfg = Config {
        keys: 200,
        ..small()
    };
    let e = engine::run(&cfg).unwrap_err();
    assert!(e.contains("pages >= 2 * keys"), "{e}");
}

/// `--leak`: one page left held on purpose is reported at the shutdown's
/// timeout (with its thread and label under `track`), then let go, and
/// every other invariant still holds.
#[test]
fn a_leaked_page_is_reported_then_the_shutdown_completes() {
    let cfg = Config {
        arc_baseline: false,
        leak: Some(Duration::from_millis(200)),
        ..small()
    };
    let out = check(&cfg);
    let leak = out.leak.as_ref().expect("the leak was reported");
    assert!(leak.indices.contains(&leak.page), "{}", leak.report);
    assert_eq!(leak.tracked, cfg!(feature = "track"));
    if leak.tracked {
        assert!(
            leak.report
                .contains(&format!("page {}: 1 by thread 'compaction' (", leak.page))
                && leak.report.contains("label compaction)"),
            "{}",
            leak.report
        );
    } else {
        assert!(
            leak.report
                .contains("build percpu-ref with the `track` feature"),
            "{}",
            leak.report
        );
    }
    assert!(out.drain_time >= Duration::from_millis(200));
}
