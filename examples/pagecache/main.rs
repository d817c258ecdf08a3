//! A storage-engine page cache over a `DevicePagePool`, against the same
//! cache built from `Arc` pages and a shutdown guard per I/O, with a hot
//! device shutdown while readers still hold pages.
//!
//! `cargo run --release --example pagecache [-- --help]`
//!
//! Exits non-zero on any lost page, checksum failure, torn read,
//! unexpected error, or if the pool reported its memory unmapped while the
//! engine held a page.

mod engine;

use engine::{Config, Source};
use std::process::ExitCode;
use std::time::Duration;

const HELP: &str = "\
pagecache: a storage-engine page cache on percpu-ref's DevicePagePool,
against Arc pages + a shared rundown guard per I/O (the same safety
without this crate), with a hot shutdown while readers hold pages.

USAGE: cargo run --release --example pagecache -- [OPTIONS]

OPTIONS:
  --dax PATH         use a device dax (/dev/daxX.Y) instead of anonymous memory
  --file PATH        use a regular file (created or extended to the pool size)
  --pages N          pages in the pool                 [default: 4096]
  --page-size BYTES  bytes per page (power of two)     [default: 4096]
  --keys N           distinct cached keys (<= pages/2) [default: pages/4]
  --readers N        I/O reader threads                [default: 2]
  --secs S           length of each measured phase     [default: 0.5]
  --hold-us US       how long an I/O holds its page    [default: 5000]
  --depth N          in-flight I/Os per reader         [default: 32]
  --hot-readers N    threads of the read-heavy phases  [default: 4]
  --hot-keys N       keys the read-heavy phases read   [default: 8]
  --no-arc           skip the Arc baseline phases
  --quiet            print only the summary
  -h, --help         this text
";

fn parse() -> Result<Option<Config>, String> {
    let mut cfg = Config::default();
    let mut keys = None;
    let mut args = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse()
            .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--dax" => cfg.source = Source::Dax(args.next().ok_or("--dax needs a path")?.into()),
            "--file" => cfg.source = Source::File(args.next().ok_or("--file needs a path")?.into()),
            "--pages" => cfg.pages = num(&a, args.next())?,
            "--page-size" => cfg.page_size = num(&a, args.next())?,
            "--keys" => keys = Some(num(&a, args.next())?),
            "--readers" => cfg.readers = num(&a, args.next())?,
            "--secs" => {
                let s: f64 = num(&a, args.next())?;
                cfg.phase = Duration::try_from_secs_f64(s)
                    .map_err(|_| format!("--secs: {s} is not a duration"))?;
            }
            "--hold-us" => cfg.hold = Duration::from_micros(num(&a, args.next())?),
            "--depth" => cfg.depth = num(&a, args.next())?,
            "--hot-readers" => cfg.hot_readers = num(&a, args.next())?,
            "--hot-keys" => cfg.hot_keys = num(&a, args.next())?,
            "--no-arc" => cfg.arc_baseline = false,
            "--quiet" => cfg.verbose = false,
            other => return Err(format!("unknown option {other:?} (try --help)")),
        }
    }
    cfg.keys = keys.unwrap_or(cfg.pages / 4).max(1);
    if cfg.page_size < 64 {
        return Err(format!(
            "--page-size {} is too small (min 64)",
            cfg.page_size
        ));
    }
    Ok(Some(cfg))
}

fn main() -> ExitCode {
    let cfg = match parse() {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("pagecache: {e}");
            return ExitCode::from(2);
        }
    };
    let out = match engine::run(&cfg) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("pagecache: {e}");
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
