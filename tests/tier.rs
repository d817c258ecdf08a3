//! Which counting tier is active, checked against what the environment
//! says it must be: `PERCPU_REF_EXPECT_TIER=rseq` or `portable`. CI sets it
//! where it knows the answer (the arm64 guest on both tiers), so a build or
//! a machine that silently falls back to the portable tier fails here
//! instead of passing every other test on the slower tier. Unset, only the
//! consistency checks run.
#![cfg(not(percpu_ref_model))]

use percpu_ref::{NoRelease, PercpuRef, Tier};

/// The variable naming the tier this process must get.
const EXPECT: &str = "PERCPU_REF_EXPECT_TIER";

/// The tier `PERCPU_REF_EXPECT_TIER` demands, if set; panics on a value
/// that names no tier, so a typo in CI cannot pass.
fn expected() -> Option<Tier> {
    let v = std::env::var(EXPECT).ok()?;
    match v.trim().to_ascii_lowercase().as_str() {
        "" => None,
        "rseq" => Some(Tier::Rseq),
        "portable" => Some(Tier::Portable),
        other => panic!("{EXPECT}={other:?} names no tier (expected `rseq` or `portable`)"),
    }
}

#[test]
fn init_gives_the_expected_tier() {
    let tier = percpu_ref::init();
    match expected() {
        Some(want) => assert_eq!(
            tier,
            want,
            "{EXPECT} demands {want:?}, init() chose {tier:?} (arch {}, PERCPU_REF_PORTABLE={:?})",
            std::env::consts::ARCH,
            std::env::var("PERCPU_REF_PORTABLE").ok(),
        ),
        None => eprintln!("{EXPECT} unset: tier {tier:?} not checked against an expectation"),
    }
}

#[test]
fn new_refs_use_the_tier_init_chose() {
    let tier = percpu_ref::init();
    let r = PercpuRef::new(0u32, NoRelease);
    assert_eq!(r.tier(), tier);
    // Counting through the chosen tier keeps the count exact.
    let refs: Vec<_> = (0..100).map(|_| r.tryget_live().unwrap()).collect();
    assert!(!r.is_zero());
    drop(refs);
    r.kill().unwrap();
    assert!(r.is_zero(), "the initial reference was the last one");
    // A ref built with `.portable()` is portable on every machine.
    let p = PercpuRef::builder(0u32).portable().build();
    assert_eq!(p.tier(), Tier::Portable);
}

#[test]
fn portable_env_wins() {
    let forced = std::env::var("PERCPU_REF_PORTABLE").is_ok_and(|v| {
        ["1", "true", "yes", "on"].contains(&v.trim().to_ascii_lowercase().as_str())
    });
    if forced {
        assert_eq!(percpu_ref::init(), Tier::Portable);
    } else if cfg!(not(any(target_arch = "x86_64", target_arch = "aarch64"))) {
        assert_eq!(
            percpu_ref::init(),
            Tier::Portable,
            "the rseq tier exists only on x86_64 and aarch64"
        );
    }
}
