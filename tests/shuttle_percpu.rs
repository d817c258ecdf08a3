//! Lifecycle scenarios under shuttle: more threads and operations than loom
//! can exhaust, explored with shuttle's PCT and random schedulers from a
//! fixed list of seeds, at the granularity of the crate's atomic steps.
//!
//! Run: `RUSTFLAGS="--cfg percpu_ref_shuttle" CARGO_TARGET_DIR=target/shuttle
//! cargo test --release --no-default-features --test shuttle_percpu`.
//!
//! The harness (ops, invariants, the linearizability check against the
//! sequential model) is the one of the `percpu_steps` fuzz target
//! (`fuzz/shuttle/src/steps.rs`); see its module docs for the oracles.
//!
//! `race_*` tests each aim at one lifecycle race or panic path; `lifecycle_*`
//! tests are bigger mixes. A failure prints the violated oracle (and, for
//! the model and final checks, the whole history); replay it by running the
//! one test (the seeds are fixed). On the lifecycle code before its fixes
//! every `race_*` test fails, and so does `lifecycle_kill_revive_cycles`
//! (two releases at once).
#![cfg(percpu_ref_shuttle)]

#[path = "../fuzz/src/held.rs"]
#[allow(dead_code, unreachable_pub)]
mod held;
#[path = "../fuzz/src/model.rs"]
#[allow(dead_code, unreachable_pub)]
mod model;
#[path = "../fuzz/shuttle/src/steps.rs"]
#[allow(dead_code, unreachable_pub)]
mod steps;

use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::Runner;
use std::sync::Arc;
use steps::{quiet_expected_panics, run_scenario, scenario, Op::*, Policy, Scenario, Setup, PLAIN};

/// Seeds of every exploration: a failure is reproduced by the same test.
const SEEDS: [u64; 4] = [1, 2, 3, 0x5eed];

/// Run `s` under PCT (depth 3) and the random scheduler, `iterations`
/// executions per seed and scheduler.
fn explore(s: Scenario, iterations: usize) {
    quiet_expected_panics();
    let s = Arc::new(s);
    for seed in SEEDS {
        let t = Arc::clone(&s);
        Runner::new(
            PctScheduler::new_from_seed(seed, 3, iterations),
            steps::config(),
        )
        .run(move || run_scenario(&t));
        let t = Arc::clone(&s);
        Runner::new(
            RandomScheduler::new_from_seed(seed, iterations),
            steps::config(),
        )
        .run(move || run_scenario(&t));
    }
}

fn with(f: impl FnOnce(&mut Setup)) -> Setup {
    let mut s = PLAIN;
    f(&mut s);
    s
}

// ------------------------------------------------ races and panic paths

/// `kill_and_confirm` releases the switch lock before its confirm; a
/// `resurrect` in that window makes the confirm run on a live ref
/// (`tryget_live` succeeds inside it).
#[test]
fn race_kill_and_confirm_vs_resurrect() {
    explore(
        scenario(
            PLAIN,
            &[
                &[Tryget, KillAndConfirm, Drop(0)],
                &[Resurrect, Resurrect, Resurrect, TrygetLive],
            ],
        ),
        300,
    );
}

/// Once an underflow is flagged, `reinit` no longer waits for the release
/// claim: a final put preempted between reaching zero and claiming the
/// release either skips that life's release or claims the new life's.
/// (The release runs as one step here, so the race of the next test cannot
/// hide this one.)
#[test]
fn race_reinit_vs_final_put_after_underflow() {
    let setup = with(|s| {
        s.atomic = true;
        s.allow_reinit = true;
        s.misuse = true;
        s.release_yields = false;
    });
    explore(
        scenario(
            setup,
            &[
                // Flag the underflow on a live ref and revive it; then kill
                // and revive again while the other thread puts.
                &[OverPut(0), Kill, Reinit, Kill, Reinit],
                &[Tryget, Tryget, Drop(0), Drop(0)],
            ],
        ),
        1000,
    );
}

/// `reinit` (and a `resurrect` of a drained ref) makes the count non-zero
/// before it clears DEAD: in between, `tryget` succeeds on the new life
/// while a later `tryget_live` of the same thread still fails, a history
/// no order of the operations explains. (The kernel clears DEAD first and
/// then takes the new reference.)
#[test]
fn race_reinit_publishes_count_before_reviving() {
    let setup = with(|s| s.allow_reinit = true);
    explore(
        scenario(setup, &[&[Kill, Reinit], &[Tryget, TrygetLive, Drop(0)]]),
        300,
    );
}

/// `reinit` returns once the release is claimed, not finished: the new
/// life hands out references while the old release still runs.
#[test]
fn race_reinit_returns_while_release_runs() {
    let setup = with(|s| s.allow_reinit = true);
    explore(
        scenario(setup, &[&[Kill], &[Reinit, TrygetLive, Reinit, TrygetLive]]),
        300,
    );
}

/// A release run under the switch lock (the kill's fold reaching zero
/// after an over-put) deadlocks if it calls back into the ref.
#[test]
fn race_release_under_switch_lock_reenters() {
    let setup = with(|s| {
        s.misuse = true;
        s.policy = Policy::Reenter;
    });
    explore(scenario(setup, &[&[OverPut(0), Kill], &[Tryget]]), 50);
}

/// A panicking confirm must still drop the initial reference, or the ref
/// never releases.
#[test]
fn race_panicking_confirm_drops_initial_ref() {
    explore(
        scenario(PLAIN, &[&[Tryget, KillAndConfirmPanic], &[Tryget, Drop(0)]]),
        50,
    );
}

/// A panicking release run from an `OwnedRef`'s drop must still drop the
/// `Arc`.
#[test]
fn race_panicking_release_from_owned_ref() {
    let setup = with(|s| s.policy = Policy::Panic);
    explore(
        scenario(setup, &[&[TrygetOwned(false), Kill, Drop(0)], &[Tryget]]),
        50,
    );
}

// ------------------------------------------------ bigger mixes

/// Gets, puts, clones, raw references and mode switches on three threads
/// racing a `kill_and_confirm`: no revive.
#[test]
fn lifecycle_gets_puts_switches_vs_kill() {
    explore(
        scenario(
            PLAIN,
            &[
                &[
                    Tryget,
                    Clone(0),
                    GetMany(1),
                    SwitchToAtomic,
                    Drop(1),
                    PutMany(2),
                    TrygetLive,
                ],
                &[
                    TrygetLive,
                    SwitchToPercpu,
                    Tryget,
                    Drop(0),
                    Tryget,
                    SwitchToAtomic,
                ],
                &[Tryget, KillAndConfirm, TrygetLive, Drop(0), Tryget],
            ],
        ),
        300,
    );
}

/// Owned and borrowed references, started atomic, racing a plain kill and
/// a second (refused) kill.
#[test]
fn lifecycle_owned_refs_vs_two_kills() {
    let setup = with(|s| s.atomic = true);
    explore(
        scenario(
            setup,
            &[
                &[
                    TrygetOwned(true),
                    Clone(0),
                    Drop(1),
                    TrygetOwned(false),
                    Drop(0),
                ],
                &[Tryget, Kill, GetMany(0), PutMany(0)],
                &[SwitchToPercpu, Kill, TrygetLive, Tryget],
            ],
        ),
        300,
    );
}

/// A panicking release on the last put, with a `.dead()` ref revived
/// first: the ref survives it and the final kill releases again.
#[test]
fn lifecycle_dead_start_reinit_and_panicking_release() {
    let setup = with(|s| {
        s.dead = true;
        s.policy = Policy::Panic;
    });
    explore(
        scenario(
            setup,
            &[
                &[Reinit, Tryget, Kill, Drop(0)],
                &[Tryget, Clone(0), Drop(0), Drop(0)],
            ],
        ),
        300,
    );
}

/// Kill/revive cycles with `allow_reinit` and gets on two other threads.
#[test]
fn lifecycle_kill_revive_cycles() {
    let setup = with(|s| s.allow_reinit = true);
    explore(
        scenario(
            setup,
            &[
                &[
                    KillAndConfirm,
                    Resurrect,
                    Kill,
                    Reinit,
                    SwitchToAtomic,
                    Kill,
                    Resurrect,
                ],
                &[Tryget, Drop(0), TrygetLive, Clone(0), Drop(0), Drop(0)],
                &[TrygetLive, GetMany(2), PutMany(2), Drop(0), Tryget, Drop(0)],
            ],
        ),
        300,
    );
}
