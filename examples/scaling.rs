//! Scaling sweep: get+put throughput against the number of threads, all
//! hammering ONE shared counter, one thread pinned per core.
//!
//! ```text
//! cargo run --release --example scaling                 # 1, 2, 4, … all cores
//! cargo run --release --example scaling -- --threads 1,8,64 --duration-ms 500
//! ```
//!
//! Contenders: every `PercpuRef` tier, `Arc` clone+drop, a shared
//! `AtomicUsize` add+sub, a sharded counter (one cache-padded slot per
//! thread) and the thread-local floor (a plain add through a thread-local
//! pointer). Prints a table with ratio columns, and writes
//! `<out>/results.csv` and `<out>/scaling.svg` (default `<out>`:
//! `target/scaling`). Run it on the machine you care about: absolute
//! numbers do not transfer between CPUs, and only ratios from one run are
//! comparable.

// Shared with the criterion suite, whose extra contenders go unused here.
#[allow(dead_code)]
#[path = "../benches/contenders/mod.rs"]
mod contenders;

use contenders::{core_contenders, Counter, PERCPU_TIERS};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: cargo run --release --example scaling -- [OPTIONS]

Measures get+put pairs per second on one shared counter for PercpuRef, Arc,
a shared AtomicUsize, a sharded counter and the thread-local floor, with one
thread pinned per core.

options:
  --threads LIST      comma-separated thread counts, e.g. 1,2,4,8
                      (default: 1, 2, 4, … up to all cores, plus all cores)
  --duration-ms N     length of one measurement in ms (default: 200)
  --reps N            measurements per point; the median is kept (default: 3)
  --out DIR           folder for results.csv and scaling.svg
                      (default: target/scaling)
  -h, --help          print this help";

/// Pairs per worker between two looks at the stop flag.
const CHUNK: u64 = 4096;

/// A point whose workers got less of their cores than this is flagged.
const DISTURBED: f64 = 0.9;

struct Options {
    threads: Vec<usize>,
    duration: Duration,
    reps: usize,
    out: PathBuf,
}

enum Parsed {
    Run(Options),
    Help,
}

fn default_threads(cores: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |&n| n.checked_mul(2))
        .take_while(|&n| n <= cores)
        .collect();
    if v.last() != Some(&cores) {
        v.push(cores);
    }
    v
}

fn default_out() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("scaling"),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("scaling"),
    }
}

fn positive(opt: &str, v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{opt}: expected a positive integer, got {v:?}")),
    }
}

fn parse_args(cores: usize) -> Result<Parsed, String> {
    use lexopt::prelude::*;
    let mut o = Options {
        threads: default_threads(cores),
        duration: Duration::from_millis(200),
        reps: 3,
        out: default_out(),
    };
    let mut p = lexopt::Parser::from_env();
    let value = |p: &mut lexopt::Parser, opt: &str| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{opt}: {v:?} is not valid UTF-8"))
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Long("threads") => {
                let mut t = value(&mut p, "--threads")?
                    .split(',')
                    .map(|n| positive("--threads", n))
                    .collect::<Result<Vec<_>, _>>()?;
                t.sort_unstable();
                t.dedup();
                if let Some(&max) = t.last().filter(|&&m| m > 4096) {
                    return Err(format!(
                        "--threads: {max} threads is more than this tool allows (4096)"
                    ));
                }
                o.threads = t;
            }
            Long("duration-ms") => {
                let ms = positive("--duration-ms", &value(&mut p, "--duration-ms")?)?;
                if ms > 600_000 {
                    return Err(format!(
                        "--duration-ms: {ms} ms is over 10 minutes per point"
                    ));
                }
                o.duration = Duration::from_millis(ms as u64);
            }
            Long("reps") => {
                let reps = positive("--reps", &value(&mut p, "--reps")?)?;
                if reps > 1000 {
                    return Err(format!("--reps: {reps} is more than 1000"));
                }
                o.reps = reps;
            }
            Long("out") => {
                let out = value(&mut p, "--out")?;
                if out.is_empty() {
                    return Err("--out: expected a folder, got an empty string".into());
                }
                o.out = PathBuf::from(out);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(Parsed::Run(o))
}

/// This thread's CPU time, where the OS tells.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn thread_cpu_time() -> Option<Duration> {
    use rustix::time::{clock_gettime, ClockId};
    let t = clock_gettime(ClockId::ThreadCPUTime);
    Some(Duration::new(
        u64::try_from(t.tv_sec).ok()?,
        u32::try_from(t.tv_nsec).ok()?,
    ))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

/// One measured point.
#[derive(Clone, Copy)]
struct Sample {
    /// Pairs per second over all workers.
    rate: f64,
    /// The smallest share of its core any worker got (CPU time ÷ wall
    /// time), or 1 where CPU time cannot be read. Below ~0.9 other load
    /// on the machine disturbed the point: multi-thread contention only
    /// happens while the workers really run at the same time.
    cpu_share: f64,
}

/// Pairs per second over all `threads` workers, each pinned to its core,
/// run for about `duration` after all of them started.
fn measure(
    counter: &dyn Counter,
    threads: usize,
    duration: Duration,
    cores: &[core_affinity::CoreId],
) -> Result<Sample, String> {
    let ready = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut workers = Vec::with_capacity(threads);
        let mut spawn_error = None;
        for w in 0..threads {
            let (ready, go, stop) = (&ready, &go, &stop);
            let spawned = std::thread::Builder::new()
                .name(format!("scaling-{w}"))
                .spawn_scoped(s, move || {
                    contenders::pin(cores, w);
                    // Relaxed: a counter the starter polls; `go` orders the start.
                    ready.fetch_add(1, Relaxed);
                    // Acquire: pairs with the Release store of `go`.
                    while !go.load(Acquire) {
                        std::hint::spin_loop();
                    }
                    let t0 = Instant::now();
                    let cpu0 = thread_cpu_time();
                    let mut pairs = 0u64;
                    // Relaxed: only a hint to stop; the count is ours.
                    while !stop.load(Relaxed) {
                        counter.run(w, CHUNK);
                        pairs += CHUNK;
                    }
                    let took = t0.elapsed();
                    let share = thread_cpu_time().zip(cpu0).map_or(1.0, |(c1, c0)| {
                        (c1.saturating_sub(c0)).as_secs_f64() / took.as_secs_f64().max(1e-9)
                    });
                    (pairs, t0 + took, share)
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    spawn_error = Some(format!("could not start worker thread {w}: {e}"));
                    break;
                }
            }
        }
        // Relaxed: see the workers' increment.
        while spawn_error.is_none() && ready.load(Relaxed) < threads {
            std::thread::yield_now();
        }
        let start = Instant::now();
        // Release: pairs with the workers' Acquire loads.
        go.store(true, Release);
        if spawn_error.is_none() {
            std::thread::sleep(duration);
        }
        // Relaxed: see the workers' loads.
        stop.store(true, Relaxed);
        // All pairs over the whole window, from `go` to the last worker's
        // stop (right even when threads share cores and start late).
        let (mut pairs, mut end, mut cpu_share) = (0u64, start, 1.0f64);
        for h in workers {
            let (p, e, share) = h
                .join()
                .map_err(|_| "a benchmark worker panicked".to_string())?;
            pairs += p;
            end = end.max(e);
            cpu_share = cpu_share.min(share);
        }
        match spawn_error {
            Some(e) => Err(e),
            None => Ok(Sample {
                rate: pairs as f64 / end.duration_since(start).as_secs_f64().max(1e-9),
                cpu_share,
            }),
        }
    })
}

/// The median rate, with the worst CPU share seen in any run.
fn median(mut v: Vec<Sample>) -> Sample {
    let cpu_share = v.iter().map(|s| s.cpu_share).fold(1.0, f64::min);
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    Sample {
        rate: v[v.len() / 2].rate,
        cpu_share,
    }
}

/// A progress line on stderr: a bar when stderr is a terminal, plain lines
/// otherwise (CI logs).
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn step(&mut self, what: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            const WIDTH: usize = 30;
            let filled = WIDTH * self.done / self.total.max(1);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {}/{} {what}",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled),
                self.done + 1,
                self.total
            );
        } else {
            let _ = writeln!(err, "[{}/{}] {what}", self.done + 1, self.total);
        }
        let _ = err.flush();
        self.done += 1;
    }

    fn finish(&self) {
        if self.tty {
            eprintln!(
                "\r\x1b[2K[{}] {} points measured",
                "#".repeat(30),
                self.total
            );
        }
    }
}

/// Results, indexed `[thread count][contender]`.
struct Sweep {
    threads: Vec<usize>,
    names: Vec<&'static str>,
    points: Vec<Vec<Sample>>,
}

impl Sweep {
    /// Throughput in pairs/s.
    fn get(&self, ti: usize, name: &str) -> Option<f64> {
        let ci = self.names.iter().position(|&n| n == name)?;
        Some(self.points[ti][ci].rate)
    }

    /// The worst CPU share of any point with `threads[ti]` threads.
    fn cpu_share(&self, ti: usize) -> f64 {
        self.points[ti]
            .iter()
            .map(|p| p.cpu_share)
            .fold(1.0, f64::min)
    }

    /// n-thread throughput ÷ (n × 1-thread throughput), if 1 was measured.
    fn efficiency(&self, ti: usize, name: &str) -> Option<f64> {
        let one = self.threads.iter().position(|&t| t == 1)?;
        Some(self.get(ti, name)? / (self.threads[ti] as f64 * self.get(one, name)?))
    }
}

fn fmt_opt(v: Option<f64>, suffix: &str) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}{suffix}"))
}

fn table(sweep: &Sweep, host: &str, o: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "get+put pairs per second over all threads, in millions (median of {} × {} ms)",
        o.reps,
        o.duration.as_millis()
    );
    let _ = writeln!(s, "host: {host}");
    let mut header = format!("{:>7}", "threads");
    for name in &sweep.names {
        let _ = write!(header, " {name:>13}");
    }
    for tier in PERCPU_TIERS.iter().map(|t| t.name) {
        let _ = write!(
            header,
            " {:>16} {:>17} {:>16}",
            format!("{tier}÷arc"),
            format!("floor÷{tier}"),
            format!("{tier} eff."),
        );
    }
    let _ = write!(header, " {:>9}", "cpu share");
    let _ = writeln!(s, "{header}");
    for (ti, &t) in sweep.threads.iter().enumerate() {
        let _ = write!(s, "{t:>7}");
        for p in &sweep.points[ti] {
            let _ = write!(s, " {:>13.1}", p.rate / 1e6);
        }
        for tier in PERCPU_TIERS.iter().map(|t| t.name) {
            let p = sweep.get(ti, tier);
            let vs_arc = p.zip(sweep.get(ti, "arc")).map(|(p, a)| p / a);
            let floor = p.zip(sweep.get(ti, "tls_floor")).map(|(p, f)| f / p);
            let _ = write!(
                s,
                " {:>16} {:>17} {:>16}",
                fmt_opt(vs_arc, "×"),
                fmt_opt(floor, "×"),
                fmt_opt(sweep.efficiency(ti, tier), ""),
            );
        }
        let share = sweep.cpu_share(ti);
        let flag = if share < DISTURBED { " !" } else { "" };
        let _ = writeln!(s, " {:>8.0}%{flag}", share * 100.0);
    }
    let _ = writeln!(
        s,
        "X÷arc: throughput ratio (= Arc time ÷ X time per pair); floor÷X: how many \
         times slower than a plain thread-local add; eff.: n-thread throughput ÷ \
         (n × 1-thread); cpu share: the least CPU time ÷ wall time of any worker"
    );
    if (0..sweep.threads.len()).any(|ti| sweep.cpu_share(ti) < DISTURBED) {
        let _ = writeln!(
            s,
            "! workers did not get their cores to themselves (other load on the \
             machine): those rows are unreliable, rerun on a quiet host"
        );
    }
    s
}

fn csv(sweep: &Sweep) -> String {
    let mut s = String::from(
        "threads,contender,pairs_per_sec,ns_per_pair_per_thread,efficiency,cpu_share\n",
    );
    for (ti, &t) in sweep.threads.iter().enumerate() {
        for (ci, name) in sweep.names.iter().enumerate() {
            let p = sweep.points[ti][ci];
            let eff = sweep
                .efficiency(ti, name)
                .map_or_else(String::new, |e| format!("{e:.4}"));
            let _ = writeln!(
                s,
                "{t},{name},{:.0},{:.3},{eff},{:.3}",
                p.rate,
                t as f64 * 1e9 / p.rate,
                p.cpu_share
            );
        }
    }
    s
}

fn plot(sweep: &Sweep, host: &str, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: DrawingAreaErrorKind<_>| format!("drawing {}: {e}", path.display());

    // x is log2(threads) on a linear axis, so ticks land on 1, 2, 4, …
    let xs: Vec<f64> = sweep.threads.iter().map(|&t| (t as f64).log2()).collect();
    let (xmin, xmax) = (xs[0], xs[xs.len() - 1]);
    let ticks = (xmax.floor() - xmin.ceil()) as usize + 1;
    let rates = sweep.points.iter().flatten().map(|p| p.rate / 1e6);
    let ymin = rates.clone().fold(f64::INFINITY, f64::min).max(1e-3);
    let ymax = rates.fold(0.0, f64::max).max(ymin * 10.0);

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("get+put on one shared counter — {host}"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(
            xmin - 0.3..xmax + 0.3,
            // Room at the bottom for the legend.
            (ymin / 10.0..ymax * 2.0).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("threads (one pinned per core, log scale)")
        .y_desc("million get+put pairs / s over all threads (log scale)")
        .x_labels(ticks + 1)
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .y_label_formatter(&|y| format!("{y}"))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(err)?;
    for (ci, name) in sweep.names.iter().enumerate() {
        let color = Palette99::pick(ci).to_rgba();
        let points: Vec<(f64, f64)> = xs
            .iter()
            .zip(&sweep.points)
            .map(|(&x, row)| (x, row[ci].rate / 1e6))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(4))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn host_description(cores: usize, pinned: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let pin = if pinned { "pinned" } else { "NOT pinned" };
    format!("{cpu}, {cores} cores, {pin}")
}

fn run(o: &Options, cores: &[core_affinity::CoreId], ncores: usize) -> Result<(), String> {
    let max = *o.threads.last().ok_or("--threads: empty list")?;
    if max > ncores {
        eprintln!(
            "warning: {max} threads on {ncores} cores: threads share cores, \
             so those points measure the scheduler too"
        );
    }
    let contenders = core_contenders();
    let names: Vec<&'static str> = contenders.iter().map(|c| c.name).collect();
    let host = host_description(ncores, !cores.is_empty());
    let mut progress = Progress {
        total: o.threads.len() * contenders.len(),
        done: 0,
        tty: std::io::stderr().is_terminal(),
    };
    let mut points = Vec::with_capacity(o.threads.len());
    for &threads in &o.threads {
        let mut row = Vec::with_capacity(contenders.len());
        for c in &contenders {
            progress.step(&format!("{} @ {threads} thread(s)", c.name));
            let counter = (c.make)(threads);
            // Warm-up: caches, page faults, CPU frequency.
            measure(&*counter, threads, o.duration / 4, cores)?;
            let runs = (0..o.reps)
                .map(|_| measure(&*counter, threads, o.duration, cores))
                .collect::<Result<Vec<_>, _>>()?;
            row.push(median(runs));
        }
        points.push(row);
    }
    progress.finish();
    let sweep = Sweep {
        threads: o.threads.clone(),
        names,
        points,
    };

    print!("{}", table(&sweep, &host, o));
    std::fs::create_dir_all(&o.out)
        .map_err(|e| format!("cannot create output folder {}: {e}", o.out.display()))?;
    let csv_path = o.out.join("results.csv");
    std::fs::write(&csv_path, csv(&sweep))
        .map_err(|e| format!("cannot write {}: {e}", csv_path.display()))?;
    let svg_path = o.out.join("scaling.svg");
    plot(&sweep, &host, &svg_path)?;
    println!("wrote {} and {}", csv_path.display(), svg_path.display());
    Ok(())
}

fn main() -> ExitCode {
    let cores = contenders::cores();
    let ncores = if cores.is_empty() {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        cores.len()
    };
    let o = match parse_args(ncores) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if cores.is_empty() {
        eprintln!("warning: cannot read the core list; threads run unpinned");
    }
    match run(&o, &cores, ncores) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
