//! A storage-engine page cache over a `DevicePagePool`, against the same
//! cache built from `Arc` pages and a shutdown guard per I/O, with a hot
//! device shutdown while readers still hold pages.
//!
//! `cargo run --release --example pagecache [-- --help]`; with `--leak`,
//! one page is left held on purpose and the shutdown reports who holds it
//! (thread and label with `--features track`, page indices without).
//!
//! Exits non-zero on any lost page, checksum failure, torn read,
//! unexpected error, or if the pool reported its memory unmapped while the
//! engine held a page.

mod engine;

use engine::{Config, Source};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
usage: cargo run --release --example pagecache -- [OPTIONS]

A storage-engine page cache on percpu-ref's DevicePagePool, against Arc pages
plus a shared rundown guard per I/O (the same safety without this crate), with
a hot shutdown while readers hold pages.

options:
  --dax PATH          use a device dax (/dev/daxX.Y) instead of anonymous memory
  --file PATH         use a regular file (created or extended to the pool size)
  --pages N           pages in the pool (default: 4096)
  --page-size BYTES   bytes per page, a power of two >= 4096 (default: 4096)
  --keys N            distinct cached keys, at most pages/2 (default: pages/4)
  --readers N         I/O reader threads (default: 2)
  --secs S            length of each measured phase (default: 0.5)
  --hold-us US        how long an I/O holds its page (default: 5000)
  --depth N           in-flight I/Os per reader (default: 32)
  --hot-readers N     threads of the read-heavy phases (default: 4)
  --hot-keys N        keys the read-heavy phases read (default: 8)
  --no-arc            skip the Arc baseline phases
  --leak              leave one page held on purpose (a 'compaction' thread
                      forgets it): the shutdown times out after 1 s and prints
                      who still holds what, then the page is let go. Holders
                      are named with the track feature (and where each page
                      was taken if RUST_BACKTRACE=1, which slows every page):
                      cargo run --release --features track --example pagecache -- --leak
  --quiet             print only the summary
  -h, --help          print this help";

/// How long the shutdown waits for a leaked page before it reports.
const LEAK_TIMEOUT: Duration = Duration::from_secs(1);

enum Parsed {
    Run(Config),
    Help,
}

fn parse() -> Result<Parsed, String> {
    use lexopt::prelude::*;
    let mut cfg = Config::default();
    let mut keys = None;
    let mut p = lexopt::Parser::from_env();
    let value = |p: &mut lexopt::Parser, opt: &str| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{opt}: {v:?} is not valid UTF-8"))
    };
    fn positive(opt: &str, v: &str) -> Result<usize, String> {
        match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{opt}: expected a positive integer, got {v:?}")),
        }
    }
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Long("dax") => cfg.source = Source::Dax(value(&mut p, "--dax")?.into()),
            Long("file") => cfg.source = Source::File(value(&mut p, "--file")?.into()),
            Long("pages") => cfg.pages = positive("--pages", &value(&mut p, "--pages")?)?,
            Long("page-size") => {
                let v = value(&mut p, "--page-size")?;
                cfg.page_size = positive("--page-size", &v)?;
                if !cfg.page_size.is_power_of_two() || cfg.page_size < 4096 {
                    return Err(format!(
                        "--page-size: expected a power of two >= 4096, got {v:?}"
                    ));
                }
            }
            Long("keys") => keys = Some(positive("--keys", &value(&mut p, "--keys")?)?),
            Long("readers") => cfg.readers = positive("--readers", &value(&mut p, "--readers")?)?,
            Long("secs") => {
                let v = value(&mut p, "--secs")?;
                cfg.phase = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && *s <= 3600.0)
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| {
                        format!("--secs: expected seconds between 0 and 3600, got {v:?}")
                    })?;
            }
            Long("hold-us") => {
                let v = value(&mut p, "--hold-us")?;
                let us: u64 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("--hold-us: expected microseconds, got {v:?}"))?;
                cfg.hold = Duration::from_micros(us);
            }
            Long("depth") => cfg.depth = positive("--depth", &value(&mut p, "--depth")?)?,
            Long("hot-readers") => {
                cfg.hot_readers = positive("--hot-readers", &value(&mut p, "--hot-readers")?)?
            }
            Long("hot-keys") => {
                cfg.hot_keys = positive("--hot-keys", &value(&mut p, "--hot-keys")?)?
            }
            Long("no-arc") => cfg.arc_baseline = false,
            Long("leak") => cfg.leak = Some(LEAK_TIMEOUT),
            Long("quiet") => cfg.verbose = false,
            other => return Err(other.unexpected().to_string()),
        }
    }
    cfg.keys = keys.unwrap_or(cfg.pages / 4).max(1);
    if cfg.keys * 2 > cfg.pages {
        return Err(format!(
            "--keys: {} keys need at least {} pages, the pool has {}",
            cfg.keys,
            cfg.keys * 2,
            cfg.pages
        ));
    }
    Ok(Parsed::Run(cfg))
}

fn main() -> ExitCode {
    let cfg = match parse() {
        Ok(Parsed::Run(cfg)) => cfg,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let out = match engine::run(&cfg) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };

    println!("\nsummary (ns/read: reader CPU time per read)");
    println!(
        "  {:<34} {:>7} {:>12} {:>10} {:>10}",
        "phase", "readers", "reads/s", "ns/read", "writes/s"
    );
    for p in &out.phases {
        println!(
            "  {:<34} {:>7} {:>12.0} {:>10.1} {:>10.0}",
            p.name,
            p.threads,
            p.ops_per_sec(),
            p.ns_per_op(),
            p.writes_per_sec()
        );
    }
    let phases = |ours: &str, theirs: &str| out.phase(ours).zip(out.phase(theirs));
    let cost = |ours: &str, theirs: &str| {
        phases(ours, theirs).map_or_else(
            || "-".into(),
            |(a, b)| format!("{:.2}x", b.ns_per_op() / a.ns_per_op()),
        )
    };
    let rate = |ours: &str, theirs: &str| {
        phases(ours, theirs).map_or_else(
            || "-".into(),
            |(a, b)| format!("{:.2}x", a.ops_per_sec() / b.ops_per_sec()),
        )
    };
    println!(
        "  hot reads, cost per read, Arc + rundown ÷ pool: {} (scoped read), {} (lookup)",
        cost(engine::HOT_SCOPED, engine::HOT_ARC),
        cost(engine::HOT_COUNTED, engine::HOT_ARC),
    );
    println!(
        "  I/O (holds dominate), reads/s, pool ÷ Arc + rundown: {}",
        rate(engine::IO_POOL, engine::IO_ARC),
    );
    for (i, ops) in out.reader_ops.iter().enumerate() {
        println!("  I/O reader {i} reads        {ops:>12}");
    }
    println!("  writer page writes        {:>12}", out.writer_ops);
    println!("  pages allocated           {:>12}", out.pages_allocated);
    println!(
        "  pages free after shutdown {:>12} of {} ({} allocated)",
        out.free_after, out.total_pages, out.allocated_after
    );
    println!("  stale lookups retried     {:>12}", out.stale_retries);
    println!(
        "  hot reads (torn)          {:>12} ({})",
        out.hot_reads, out.torn_reads
    );
    println!(
        "  refused after shutdown    {:>12}",
        out.refused_after_shutdown
    );
    println!("  checksum failures         {:>12}", out.checksum_failures);
    println!("  pages held at shutdown    {:>12}", out.held_at_shutdown);
    println!(
        "  confirm after             {:>12.3} ms",
        out.confirm_time.as_secs_f64() * 1e3
    );
    println!(
        "  drained + unmapped after  {:>12.3} ms",
        out.drain_time.as_secs_f64() * 1e3
    );
    if let Some(leak) = &out.leak {
        println!(
            "\nleak report (--leak), at the shutdown timeout of {:?}:\n{}",
            cfg.leak.unwrap_or_default(),
            leak.report
        );
        if !leak.tracked {
            println!(
                "(to see who holds it: cargo run --release --features track \
                 --example pagecache -- --leak)"
            );
        }
    }
    let problems = out.problems();
    if problems.is_empty() {
        println!("\nOK: no page lost, every checksum verified, no torn read, unmapped only after the last page dropped");
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("FAILED: {p}");
        }
        ExitCode::FAILURE
    }
}
