//! Memory that scales with hot refs, not with all refs: builds many
//! `PercpuRef`s of which a few count per CPU, and reports what they cost —
//! measured here (resident memory and the slot arena) and computed for a
//! 192-CPU host.
//!
//! ```sh
//! cargo run --release --example memory                      # 1,000,000 refs, 1% hot
//! cargo run --release --example memory -- --refs 200000 --hot-percent 5
//! ```

use percpu_ref::{Mode, NoRelease, PercpuRef};
use std::process::ExitCode;

struct Args {
    refs: usize,
    hot_percent: f64,
}

fn parse() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut a = Args {
        refs: 1_000_000,
        hot_percent: 1.0,
    };
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Long("refs") => a.refs = p.value()?.parse()?,
            Long("hot-percent") => a.hot_percent = p.value()?.parse()?,
            Long("help") | Short('h') => {
                println!("usage: memory [--refs N] [--hot-percent P]");
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    if !(0.0..=100.0).contains(&a.hot_percent) {
        return Err("--hot-percent must be between 0 and 100".into());
    }
    Ok(a)
}

/// Resident set size of this process in bytes (Linux), if known.
fn rss() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("memory: {e} (try --help)");
            return ExitCode::FAILURE;
        }
    };
    let tier = percpu_ref::init();
    let header = std::mem::size_of::<PercpuRef<(), NoRelease>>();
    let per_ref = std::mem::size_of::<PercpuRef<u64, NoRelease>>();
    let column = percpu_ref::slot_bytes_per_ref();
    let cpus = column / 8;
    let hot = ((args.refs as f64) * args.hot_percent / 100.0).round() as usize;

    let before = rss();
    let arena_before = percpu_ref::slot_usage();
    // Cold refs start atomic (as `.adaptive()` ones do): no slots.
    let refs: Vec<PercpuRef<u64, NoRelease>> = (0..args.refs as u64)
        .map(|i| PercpuRef::builder(i).atomic().build())
        .collect();
    let cold_rss = rss();
    let step = args.refs.checked_div(hot).unwrap_or(usize::MAX);
    let mut switched = 0;
    for r in refs.iter().step_by(step.max(1)).take(hot) {
        if r.switch_to_percpu().is_ok() {
            switched += 1;
        }
    }
    let after = rss();
    let arena = percpu_ref::slot_usage();
    let in_percpu = refs.iter().filter(|r| r.mode() == Mode::Percpu).count();
    if in_percpu != switched {
        eprintln!("memory: {in_percpu} refs count per CPU, expected {switched}");
        return ExitCode::FAILURE;
    }

    println!("tier {tier:?}, {cpus} possible CPUs here");
    println!("header                 {header} B (value and policy aside)");
    println!("one ref with a u64     {per_ref} B");
    println!("slot column (hot ref)  {column} B (8 B x {cpus} CPUs)");
    println!();
    println!(
        "{} refs, {switched} counting per CPU ({}%)",
        args.refs, args.hot_percent
    );
    let columns = arena.columns_in_use - arena_before.columns_in_use;
    println!(
        "slot arena             {columns} columns in use, {} B reserved in all",
        arena.bytes_reserved
    );
    if let (Some(b), Some(c), Some(a)) = (before, cold_rss, after) {
        let cold = c.saturating_sub(b) as f64 / args.refs as f64;
        println!(
            "resident, cold refs    {:.1} MB ({cold:.1} B per ref)",
            c.saturating_sub(b) as f64 / 1e6
        );
        println!(
            "resident, all refs     {:.1} MB after switching the hot ones ({:.1} B per ref)",
            a.saturating_sub(b) as f64 / 1e6,
            a.saturating_sub(b) as f64 / args.refs as f64
        );
    }
    let model = |ncpu: usize| (args.refs * per_ref + hot * 8 * ncpu) as f64 / 1e6;
    let old = |ncpu: usize| (args.refs * (48 + 8 + 8 * ncpu)) as f64 / 1e6;
    println!();
    println!("computed                  here ({cpus} CPUs)   192 CPUs");
    println!(
        "this design               {:>10.1} MB {:>10.1} MB",
        model(cpus),
        model(192)
    );
    println!(
        "a column for every ref    {:>10.1} MB {:>10.1} MB",
        old(cpus),
        old(192)
    );
    drop(refs);
    ExitCode::SUCCESS
}
