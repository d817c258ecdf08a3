//! The page cache behind `examples/pagecache`: shared with
//! `tests/pagecache.rs`, which runs it small and asserts its invariants.
//!
//! Shape of a storage engine's buffer cache over persistent memory:
//!
//! * a **page table** `key → page address`, read lock-free by readers;
//!   a reader turns an address into a counted page with
//!   [`DevicePagePool::lookup`] (like the kernel's `get_dev_pagemap` +
//!   `get_page_unless_zero`), then re-checks that the table still maps the
//!   key to that address (a speculative reference to a recycled page is
//!   dropped and retried);
//! * **readers** hold pages across simulated I/O (a queue of in-flight
//!   reads that complete after `hold`), verifying each page's checksum at
//!   issue and at completion;
//! * a **writer** allocates a page, fills it (key, version, payload,
//!   checksum) while it is the only reference, persists it, publishes it in
//!   the table and drops the page it replaced;
//! * mid-run a **hot shutdown**: new lookups and allocations fail with
//!   `PoolError::ShuttingDown`, the engine evicts its table, readers finish
//!   their in-flight I/O on pages that stay valid, and the pool unmaps only
//!   after the last page drops.
//!
//! The same workload runs first with page lifetimes tracked by `Arc`
//! (an `ArcSwapOption` per table slot), for a throughput ratio.

#![allow(dead_code, unreachable_pub)] // shared with the test, which uses a subset

use arc_swap::ArcSwapOption;
use percpu_ref::{DevicePage, DevicePagePool, PoolError, PoolOptions, ShutdownReport};
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the pool's memory comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// memfd: works everywhere.
    Anonymous,
    /// A `/dev/daxX.Y` device.
    Dax(PathBuf),
    /// A regular file (created or extended to the pool size).
    File(PathBuf),
}

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub pages: usize,
    pub page_size: usize,
    pub keys: usize,
    pub readers: usize,
    /// Length of each measured phase (Arc baseline, then pool until the
    /// shutdown).
    pub phase: Duration,
    /// How long a reader holds a page across its simulated I/O.
    pub hold: Duration,
    /// In-flight reads per reader.
    pub depth: usize,
    /// Run the `Arc` baseline first.
    pub arc_baseline: bool,
    /// Print progress and the timeline.
    pub verbose: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: Source::Anonymous,
            pages: 4096,
            page_size: 4096,
            keys: 1024,
            readers: 2,
            phase: Duration::from_secs(3),
            hold: Duration::from_micros(5000),
            depth: 32,
            arc_baseline: true,
            verbose: true,
        }
    }
}

/// What a run measured. `problems()` lists every broken invariant.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reader_ops: Vec<u64>,
    pub writer_ops: u64,
    pub ops_per_sec: f64,
    pub arc_ops_per_sec: Option<f64>,
    pub stale_retries: u64,
    pub checksum_failures: u64,
    /// Lookups/allocations refused with `ShuttingDown` after the shutdown.
    pub refused_after_shutdown: u64,
    /// Any other error than the expected ones.
    pub unexpected_errors: Vec<String>,
    /// Pages the writer allocated.
    pub pages_allocated: u64,
    /// Pages the engine still held when shutdown started (table + in-flight).
    pub held_at_shutdown: usize,
    pub confirm_time: Duration,
    pub drain_time: Duration,
    /// Pages referenced by the engine when the pool reported completion
    /// (must be 0: the pool must not unmap memory still in use).
    pub held_when_unmapped: u64,
    pub free_after: usize,
    pub allocated_after: usize,
    pub total_pages: usize,
    pub report: Option<ShutdownReport>,
    pub timeline: Vec<(Duration, String)>,
}

impl Outcome {
    /// Every invariant violation, in words. Empty on a good run.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.checksum_failures != 0 {
            p.push(format!("{} checksum failures", self.checksum_failures));
        }
        if self.held_when_unmapped != 0 {
            p.push(format!(
                "pool reported unmapped while the engine held {} pages",
                self.held_when_unmapped
            ));
        }
        if self.free_after != self.total_pages || self.allocated_after != 0 {
            p.push(format!(
                "pages lost: {} free + {} allocated after shutdown, of {}",
                self.free_after, self.allocated_after, self.total_pages
            ));
        }
        if self.report.is_none() {
            p.push("shutdown did not complete".into());
        }
        p.extend(self.unexpected_errors.iter().cloned());
        p
    }

    fn mark(&mut self, t0: Instant, what: impl Into<String>, verbose: bool) {
        let at = t0.elapsed();
        let what = what.into();
        if verbose {
            println!("  {:>9.3} ms  {what}", at.as_secs_f64() * 1e3);
        }
        self.timeline.push((at, what));
    }
}

// ------------------------------------------------------------ page format

const HEADER: usize = 16; // key, version
const TRAILER: usize = 8; // checksum

fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// FNV-style hash over the page body, 8 bytes at a time.
fn checksum(body: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for c in body.chunks_exact(8) {
        h = (h ^ word(c, 0)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fill a page: key, version, payload from an xorshift stream, checksum.
fn fill(page: &mut [u8], key: u64, version: u64) {
    let n = page.len();
    page[..8].copy_from_slice(&key.to_le_bytes());
    page[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version | 1;
    for c in page[HEADER..n - TRAILER].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let sum = checksum(&page[..n - TRAILER]);
    page[n - TRAILER..].copy_from_slice(&sum.to_le_bytes());
}

/// Does the page hold `key` with a valid checksum?
fn verify(page: &[u8], key: u64) -> Result<(), ()> {
    let n = page.len();
    if word(page, 0) != key || checksum(&page[..n - TRAILER]) != word(page, n - TRAILER) {
        return Err(());
    }
    Ok(())
}

// ------------------------------------------------------------ the two caches

/// A page table + page source, so one workload drives both lifetimes.
trait Cache: Sync {
    type Page: AsRef<[u8]> + Send;
    /// Look up `key`: `Ok(None)` if absent or raced (retry), `Err` to stop.
    fn get(&self, key: usize) -> Result<Option<Self::Page>, PoolError>;
    /// Write a new version of `key`.
    fn put(&self, key: usize, version: u64) -> Result<(), PoolError>;
    /// Has the device's shutdown started (so errors are expected)?
    fn closing(&self) -> bool {
        false
    }
}

/// Page lifetimes by `Arc`: the baseline a user would write otherwise.
struct ArcCache {
    table: Vec<ArcSwapOption<Vec<u8>>>,
    page_size: usize,
}

/// A page held through its `Arc`.
struct ArcPage(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcPage {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Cache for ArcCache {
    type Page = ArcPage;

    fn get(&self, key: usize) -> Result<Option<ArcPage>, PoolError> {
        Ok(self.table[key].load_full().map(ArcPage))
    }

    fn put(&self, key: usize, version: u64) -> Result<(), PoolError> {
        let mut page = vec![0u8; self.page_size];
        fill(&mut page, key as u64, version);
        self.table[key].store(Some(Arc::new(page)));
        Ok(())
    }
}

/// Page lifetimes by the pool: `PageRef` counts + the pool's `PercpuRef`.
struct PoolCache {
    pool: DevicePagePool,
    /// Lock-free read side: the page address per key (0 = none).
    addrs: Vec<AtomicUsize>,
    /// The table's own reference per key (the writer's side).
    owners: Vec<Mutex<Option<DevicePage>>>,
    /// Pages referenced by the engine (table + readers), decremented
    /// *before* each drop, so the pool cannot complete while it is > 0.
    held: Arc<AtomicU64>,
    allocated: AtomicU64,
}

/// A page held by a reader, counted in `PoolCache::held`.
struct Held {
    page: DevicePage,
    held: Arc<AtomicU64>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        self.page.as_slice()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Before the page's own drop (which may be the pool's last put).
        self.held.fetch_sub(1, SeqCst);
    }
}

impl Cache for PoolCache {
    type Page = Held;

    fn get(&self, key: usize) -> Result<Option<Held>, PoolError> {
        let addr = self.addrs[key].load(Acquire);
        if addr == 0 {
            return Ok(None);
        }
        match DevicePagePool::lookup(addr as *const u8) {
            Ok(page) => {
                self.held.fetch_add(1, SeqCst);
                let held = Held {
                    page,
                    held: Arc::clone(&self.held),
                };
                // The speculative reference may be to a page recycled for
                // another key: keep it only if the table still maps it.
                if self.addrs[key].load(Acquire) != addr {
                    return Ok(None);
                }
                Ok(Some(held))
            }
            Err(PoolError::PageNotAllocated { .. } | PoolError::PageBusy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn closing(&self) -> bool {
        self.pool.is_shutting_down()
    }

    fn put(&self, key: usize, version: u64) -> Result<(), PoolError> {
        let page = loop {
            let mut page = self.pool.alloc()?;
            self.allocated.fetch_add(1, Relaxed);
            self.held.fetch_add(1, SeqCst);
            // Unique unless a reader's speculative lookup of the page's old
            // address got a reference in between: then let it go (the
            // reader drops it after its re-check) and take another page.
            if let Some(bytes) = page.as_mut_slice() {
                fill(bytes, key as u64, version);
                break page;
            }
            self.held.fetch_sub(1, SeqCst);
            drop(page);
        };
        page.persist()?;
        let addr = page.as_ptr() as usize;
        let old = {
            let mut owner = self.owners[key].lock().unwrap();
            let old = owner.replace(page);
            self.addrs[key].store(addr, Release);
            old
        };
        if let Some(old) = old {
            self.held.fetch_sub(1, SeqCst);
            drop(old);
        }
        Ok(())
    }
}

impl PoolCache {
    /// Drop every table reference (device removal: the cache lets go). The
    /// addresses stay: later lookups of them are refused by the pool.
    fn evict_all(&self) {
        for owner in &self.owners {
            let old = owner.lock().unwrap().take();
            if let Some(old) = old {
                self.held.fetch_sub(1, SeqCst);
                drop(old);
            }
        }
    }
}

// ------------------------------------------------------------ the workload

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    stale: AtomicU64,
    bad: AtomicU64,
    refused: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// One reader: keep up to `depth` reads in flight, each held for `hold`.
fn reader<C: Cache>(cache: &C, cfg: &Config, id: usize, stop: &AtomicBool, c: &Counters) -> u64 {
    let mut inflight: VecDeque<(Instant, usize, C::Page)> = VecDeque::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9);
    let mut ops = 0u64;
    let mut refused = false;
    loop {
        let now = Instant::now();
        while inflight.front().is_some_and(|(due, ..)| *due <= now) {
            let (_, key, page) = inflight.pop_front().expect("front exists");
            // Completion: the page must still be intact.
            if verify(page.as_ref(), key as u64).is_err() {
                c.bad.fetch_add(1, Relaxed);
            }
            ops += 1;
        }
        if refused || stop.load(Relaxed) {
            if inflight.is_empty() {
                break;
            }
            std::hint::spin_loop();
            continue;
        }
        if inflight.len() >= cfg.depth {
            std::hint::spin_loop();
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = (rng % cfg.keys as u64) as usize;
        match cache.get(key) {
            Ok(Some(page)) => {
                if verify(page.as_ref(), key as u64).is_err() {
                    c.bad.fetch_add(1, Relaxed);
                }
                inflight.push_back((now + cfg.hold, key, page));
            }
            Ok(None) => {
                c.stale.fetch_add(1, Relaxed);
            }
            // Refused: the pool is shutting down, or (if this reader was
            // descheduled through the whole shutdown) already unmapped.
            Err(PoolError::ShuttingDown { .. }) => {
                c.refused.fetch_add(1, Relaxed);
                refused = true;
            }
            Err(PoolError::NotMapped { .. }) if cache.closing() => {
                c.refused.fetch_add(1, Relaxed);
                refused = true;
            }
            Err(e) => {
                c.errors.lock().unwrap().push(format!("reader {id}: {e}"));
                refused = true;
            }
        }
    }
    c.reads.fetch_add(ops, Relaxed);
    ops
}

/// The writer: rewrite keys round-robin until stopped or refused.
fn writer<C: Cache>(cache: &C, cfg: &Config, stop: &AtomicBool, c: &Counters) -> u64 {
    let mut ops = 0u64;
    let mut version = 0u64;
    while !stop.load(Relaxed) {
        version += 1;
        let key = (version as usize) % cfg.keys;
        match cache.put(key, version) {
            Ok(()) => ops += 1,
            Err(PoolError::ShuttingDown { .. }) => {
                c.refused.fetch_add(1, Relaxed);
                break;
            }
            Err(e) => {
                c.errors.lock().unwrap().push(format!("writer: {e}"));
                break;
            }
        }
    }
    c.writes.fetch_add(ops, Relaxed);
    ops
}

/// Fill every key once (so readers find pages from the start).
fn warm<C: Cache>(cache: &C, cfg: &Config) -> Result<(), PoolError> {
    (0..cfg.keys).try_for_each(|k| cache.put(k, 0))
}

/// Run readers + writer for `cfg.phase`; returns ops/s.
fn measure<C: Cache>(cache: &C, cfg: &Config) -> f64 {
    let stop = AtomicBool::new(false);
    let c = Counters::default();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for id in 0..cfg.readers {
            let (stop, c) = (&stop, &c);
            s.spawn(move || reader(cache, cfg, id, stop, c));
        }
        s.spawn(|| writer(cache, cfg, &stop, &c));
        std::thread::sleep(cfg.phase);
        stop.store(true, Relaxed);
    });
    (c.reads.load(Relaxed) + c.writes.load(Relaxed)) as f64 / t0.elapsed().as_secs_f64()
}

fn open_pool(cfg: &Config) -> Result<DevicePagePool, String> {
    let size = cfg.pages * cfg.page_size;
    let opts = PoolOptions::new().page_size(cfg.page_size);
    let r = match &cfg.source {
        Source::Anonymous => DevicePagePool::anonymous_with(size, &opts),
        Source::Dax(path) => DevicePagePool::open(path, &opts.size(size as u64)),
        Source::File(path) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let len = f.metadata().map_err(|e| e.to_string())?.len();
            if len < size as u64 {
                f.set_len(size as u64)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            DevicePagePool::open(path, &opts.size(size as u64).allow_file_fallback(true))
        }
    };
    r.map_err(|e| e.to_string())
}

/// The whole demo: Arc baseline, pool run, hot shutdown, drain, checks.
pub fn run(cfg: &Config) -> Result<Outcome, String> {
    if cfg.keys == 0 || cfg.keys * 2 > cfg.pages || cfg.readers == 0 || cfg.depth == 0 {
        return Err(format!(
            "need keys >= 1, pages >= 2 * keys, readers >= 1, depth >= 1 (got keys {}, pages {}, readers {}, depth {})",
            cfg.keys, cfg.pages, cfg.readers, cfg.depth
        ));
    }
    let mut out = Outcome::default();
    let say = |s: &str| {
        if cfg.verbose {
            println!("{s}");
            std::io::stdout().flush().ok();
        }
    };

    if cfg.arc_baseline {
        say(&format!(
            "phase 1: Arc-tracked pages, {} readers + 1 writer, {:?}",
            cfg.readers, cfg.phase
        ));
        let arc = ArcCache {
            table: (0..cfg.keys).map(|_| ArcSwapOption::empty()).collect(),
            page_size: cfg.page_size,
        };
        warm(&arc, cfg).map_err(|e| e.to_string())?;
        let ops = measure(&arc, cfg);
        say(&format!("  {:.0} ops/s", ops));
        out.arc_ops_per_sec = Some(ops);
    }

    let pool = open_pool(cfg)?;
    out.total_pages = pool.page_count();
    say(&format!(
        "phase 2: DevicePagePool ({:?}, {} pages of {} B), then a hot shutdown",
        pool.backend(),
        pool.page_count(),
        pool.page_size()
    ));
    let cache = PoolCache {
        addrs: (0..cfg.keys).map(|_| AtomicUsize::new(0)).collect(),
        owners: (0..cfg.keys).map(|_| Mutex::new(None)).collect(),
        held: Arc::new(AtomicU64::new(0)),
        allocated: AtomicU64::new(0),
        pool,
    };
    warm(&cache, cfg).map_err(|e| e.to_string())?;

    let stop = AtomicBool::new(false);
    let c = Counters::default();
    let cfg_ref = cfg;
    let (reader_ops, writer_ops, t_run) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..cfg.readers)
            .map(|id| {
                let (cache, stop, c) = (&cache, &stop, &c);
                s.spawn(move || reader(cache, cfg_ref, id, stop, c))
            })
            .collect();
        let w = s.spawn(|| writer(&cache, cfg_ref, &stop, &c));

        // Progress, a line per second of the measured phase.
        let t_start = Instant::now();
        let mut last = (0u64, 0u64);
        while t_start.elapsed() < cfg.phase {
            let left = cfg.phase.saturating_sub(t_start.elapsed());
            std::thread::sleep(left.min(Duration::from_secs(1)));
            if cfg.verbose && left >= Duration::from_millis(500) {
                let now = (c.reads.load(Relaxed), c.writes.load(Relaxed));
                let st = cache.pool.stats();
                println!(
                    "  t={:>4.1}s  pages allocated {:>5}/{}  engine holds {:>5}",
                    t_start.elapsed().as_secs_f64(),
                    st.allocated,
                    st.pages,
                    cache.held.load(SeqCst)
                );
                last = now;
            }
        }
        let _ = last;
        let t_run = t_start.elapsed();

        // ---- hot shutdown, readers still holding pages
        let t0 = Instant::now();
        out.held_at_shutdown = cache.held.load(SeqCst) as usize;
        out.mark(
            t0,
            format!(
                "shutdown started ({} pages held by the engine)",
                out.held_at_shutdown
            ),
            cfg.verbose,
        );
        let handle = cache.pool.shutdown();
        out.confirm_time = t0.elapsed();
        out.mark(
            t0,
            "confirmed: every CPU now fails tryget_live; alloc and lookup refused",
            cfg.verbose,
        );
        match cache.pool.alloc() {
            Err(PoolError::ShuttingDown { .. }) => {
                c.refused.fetch_add(1, Relaxed);
            }
            Ok(_) => c
                .errors
                .lock()
                .unwrap()
                .push("alloc succeeded after shutdown".into()),
            Err(e) => c.errors.lock().unwrap().push(format!("alloc: {e}")),
        }
        // The cache lets go of its table; the writer stops at its next
        // refused allocation, and a page it published meanwhile is evicted
        // once it has stopped.
        cache.evict_all();
        out.mark(t0, "page table evicted", cfg.verbose);
        let writer_ops = w.join().unwrap();
        cache.evict_all();

        let mut last_held = usize::MAX;
        let report = loop {
            match handle.wait_timeout(Duration::from_micros(100)) {
                Ok(report) => break Some(report),
                Err(still) => {
                    if still.count != last_held {
                        last_held = still.count;
                        out.mark(t0, format!("{} pages still held", still.count), cfg.verbose);
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        c.errors
                            .lock()
                            .unwrap()
                            .push(format!("drain timed out: {still}"));
                        break None;
                    }
                }
            }
        };
        out.held_when_unmapped = cache.held.load(SeqCst);
        out.drain_time = t0.elapsed();
        if let Some(r) = &report {
            out.mark(
                t0,
                format!(
                    "drained, persisted ({:?}) and unmapped {} bytes",
                    r.persist_method, r.bytes
                ),
                cfg.verbose,
            );
        }
        out.report = report;
        // Readers stop on their own once a lookup is refused; `stop` is
        // only a safety net (10 s) so a bug cannot hang the demo.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !readers.iter().all(|h| h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !readers.iter().all(|h| h.is_finished()) {
            c.errors
                .lock()
                .unwrap()
                .push("a reader was never refused after the shutdown".into());
        }
        stop.store(true, Relaxed);
        let reader_ops: Vec<u64> = readers.into_iter().map(|h| h.join().unwrap()).collect();
        (reader_ops, writer_ops, t_run)
    });

    let st = cache.pool.stats();
    out.free_after = st.free;
    out.allocated_after = st.allocated;
    out.reader_ops = reader_ops;
    out.writer_ops = writer_ops;
    out.ops_per_sec =
        (out.reader_ops.iter().sum::<u64>() + writer_ops) as f64 / t_run.as_secs_f64();
    out.stale_retries = c.stale.load(Relaxed);
    out.checksum_failures = c.bad.load(Relaxed);
    out.refused_after_shutdown = c.refused.load(Relaxed);
    out.unexpected_errors = c.errors.into_inner().unwrap();
    out.pages_allocated = cache.allocated.load(Relaxed);
    Ok(out)
}
