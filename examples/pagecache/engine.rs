//! The page cache behind `examples/pagecache`: shared with
//! `tests/pagecache.rs`, which runs it small and asserts its invariants.
//!
//! Shape of a storage engine's buffer cache over persistent memory:
//!
//! * a **page table** `key → page address`, read lock-free by readers;
//!   a reader turns an address into a counted page with
//!   [`DevicePagePool::lookup`] (like the kernel's `get_dev_pagemap` +
//!   `get_page_unless_zero`), then re-checks that the page still holds the
//!   key (a speculative reference to a recycled page is dropped and
//!   retried) — or, for a short read, reads the page optimistically with
//!   [`DevicePagePool::read`], no reference taken;
//! * **I/O readers** hold pages across simulated I/O (a queue of in-flight
//!   reads that complete after `hold`), verifying each page's checksum at
//!   issue and at completion;
//! * **hot readers** read a small hot key set with no hold, as fast as they
//!   can: there the cost of a lookup is the whole cost;
//! * a **writer** allocates a page, fills it (key, version, check word,
//!   payload, checksum) while it is the only reference, persists it,
//!   publishes it in the table and drops the page it replaced;
//! * at the end a **hot shutdown**: new lookups and allocations fail with
//!   `PoolError::ShuttingDown`, the engine evicts its table, readers finish
//!   their in-flight I/O on pages that stay valid, and the pool unmaps only
//!   after the last page drops;
//! * with `Config::leak`, a "compaction" thread allocates a page right
//!   before the shutdown and forgets it: the shutdown's wait times out and
//!   reports who holds what (`StillHeld`: thread and label with the `track`
//!   feature), then the engine lets the page go and the shutdown completes.
//!
//! The same workloads run first with what a user would write for the same
//! safety without this crate: `Arc` pages (an `ArcSwapOption` per table
//! slot) plus a shutdown guard taken per I/O — a shared rundown counter
//! that the device's shutdown closes and waits to drain.

#![allow(dead_code, unreachable_pub)] // shared with the test, which uses a subset

use arc_swap::ArcSwapOption;
use percpu_ref::{DevicePage, DevicePagePool, PoolError, PoolOptions, ShutdownReport, StillHeld};
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the pool's memory comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Anonymous memory: works everywhere.
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
    /// I/O readers (each with `depth` reads in flight, held for `hold`).
    pub readers: usize,
    /// Length of each measured phase.
    pub phase: Duration,
    /// How long an I/O reader holds a page across its simulated I/O.
    pub hold: Duration,
    /// In-flight reads per I/O reader.
    pub depth: usize,
    /// Threads of the read-heavy phases.
    pub hot_readers: usize,
    /// Keys the read-heavy phases read (the first `hot_keys` keys).
    pub hot_keys: usize,
    /// Run the baseline (`Arc` pages + rundown guard) phases first.
    pub arc_baseline: bool,
    /// Leave one page held on purpose, and report the holders once the
    /// shutdown has waited this long for it.
    pub leak: Option<Duration>,
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
            phase: Duration::from_millis(500),
            hold: Duration::from_micros(5000),
            depth: 32,
            hot_readers: 4,
            hot_keys: 8,
            arc_baseline: true,
            leak: None,
            verbose: true,
        }
    }
}

/// One measured phase: its reads (the writer runs alongside, counted in
/// `writes`).
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    /// Reader threads.
    pub threads: usize,
    /// Reads done.
    pub ops: u64,
    /// Pages the writer wrote meanwhile.
    pub writes: u64,
    /// Wall-clock length.
    pub secs: f64,
    /// CPU time the reader threads used, where the OS tells.
    pub cpu: Option<Duration>,
}

impl Phase {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    pub fn writes_per_sec(&self) -> f64 {
        self.writes as f64 / self.secs
    }

    /// What one read costs the thread doing it: reader CPU time per read
    /// (not disturbed by other load on the machine), or reader wall time
    /// per read where CPU time is not available. In the I/O phases it
    /// includes the waiting for I/O completions.
    pub fn ns_per_op(&self) -> f64 {
        let t = self
            .cpu
            .map_or(self.threads as f64 * self.secs, |c| c.as_secs_f64());
        t * 1e9 / self.ops.max(1) as f64
    }
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

/// Run `f` and add the CPU time it took on this thread to `total` (in ns;
/// `u64::MAX` marks "not available").
fn timed<R>(total: &AtomicU64, f: impl FnOnce() -> R) -> R {
    let t0 = thread_cpu_time();
    let r = f();
    match (t0, thread_cpu_time()) {
        (Some(a), Some(b)) => {
            total.fetch_add((b - a).as_nanos() as u64, Relaxed);
        }
        _ => total.store(u64::MAX, Relaxed),
    }
    r
}

fn cpu(total: &AtomicU64) -> Option<Duration> {
    match total.load(Relaxed) {
        u64::MAX => None,
        ns => Some(Duration::from_nanos(ns)),
    }
}

/// What a run measured. `problems()` lists every broken invariant.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every measured phase, in order.
    pub phases: Vec<Phase>,
    /// The pool's I/O phase (before its hot shutdown).
    pub reader_ops: Vec<u64>,
    pub writer_ops: u64,
    pub ops_per_sec: f64,
    pub stale_retries: u64,
    pub checksum_failures: u64,
    /// Reads that were validated (or counted) yet saw a page whose header
    /// did not match itself: must be 0.
    pub torn_reads: u64,
    /// Reads in the read-heavy phases, validated or counted, that found
    /// their key.
    pub hot_reads: u64,
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
    /// The baseline's guard: I/Os still in flight after its shutdown
    /// waited for them (must be 0), and I/Os let in after it closed.
    pub baseline_leaks: u64,
    pub free_after: usize,
    pub allocated_after: usize,
    pub total_pages: usize,
    pub report: Option<ShutdownReport>,
    pub timeline: Vec<(Duration, String)>,
    /// A leak was asked for (`Config::leak`).
    pub leak_expected: bool,
    /// The report of the leaked page, taken at the shutdown's timeout.
    pub leak: Option<Leak>,
}

/// What the shutdown reported about the page leaked on purpose.
#[derive(Debug)]
pub struct Leak {
    /// The leaked page's index.
    pub page: usize,
    /// `StillHeld`'s leak report.
    pub report: String,
    /// Did the report name holders (the `track` feature)?
    pub tracked: bool,
    /// Pages the report named.
    pub indices: Vec<usize>,
}

impl Outcome {
    /// Every invariant violation, in words. Empty on a good run.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.checksum_failures != 0 {
            p.push(format!("{} checksum failures", self.checksum_failures));
        }
        if self.torn_reads != 0 {
            p.push(format!("{} reads saw a torn page", self.torn_reads));
        }
        if self.held_when_unmapped != 0 {
            p.push(format!(
                "pool reported unmapped while the engine held {} pages",
                self.held_when_unmapped
            ));
        }
        if self.baseline_leaks != 0 {
            p.push(format!(
                "the baseline's shutdown guard let {} I/Os through",
                self.baseline_leaks
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
        match (&self.leak, self.leak_expected) {
            (None, true) => p.push("the leaked page was never reported".into()),
            (Some(l), _) if !l.indices.contains(&l.page) => p.push(format!(
                "the leak report names pages {:?}, not the leaked page {}",
                l.indices, l.page
            )),
            (Some(l), _) if l.tracked && !l.report.contains("thread 'compaction'") => {
                p.push(format!(
                    "the leak report does not name the leaking thread: {}",
                    l.report
                ))
            }
            _ => {}
        }
        p.extend(self.unexpected_errors.iter().cloned());
        p
    }

    /// The phase named `name`, if it ran.
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
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

/// Phase names (also the keys of `Outcome::phase`).
pub const IO_ARC: &str = "I/O, Arc + rundown guard";
pub const IO_POOL: &str = "I/O, pool lookup";
pub const HOT_ARC: &str = "hot reads, Arc + rundown guard";
pub const HOT_SCOPED: &str = "hot reads, pool scoped read";
pub const HOT_COUNTED: &str = "hot reads, pool lookup";

// ------------------------------------------------------------ page format

const KEY: usize = 0;
const VERSION: usize = 8;
const CHECK: usize = 16;
const HEADER: usize = 24; // key, version, check
const TRAILER: usize = 8; // checksum

fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The header's check word: ties the key to the version.
fn check_word(key: u64, version: u64) -> u64 {
    (key ^ version.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// FNV-style hash over the page body, 8 bytes at a time.
fn checksum(body: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for c in body.chunks_exact(8) {
        h = (h ^ word(c, 0)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fill a page: key, version, check word, payload from an xorshift
/// stream, checksum.
fn fill(page: &mut [u8], key: u64, version: u64) {
    let n = page.len();
    page[KEY..KEY + 8].copy_from_slice(&key.to_le_bytes());
    page[VERSION..VERSION + 8].copy_from_slice(&version.to_le_bytes());
    page[CHECK..CHECK + 8].copy_from_slice(&check_word(key, version).to_le_bytes());
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

/// Does the page hold `key` with a valid header and checksum?
fn verify(page: &[u8], key: u64) -> Result<(), ()> {
    let n = page.len();
    let (k, v, c) = (word(page, KEY), word(page, VERSION), word(page, CHECK));
    if k != key
        || c != check_word(k, v)
        || checksum(&page[..n - TRAILER]) != word(page, n - TRAILER)
    {
        return Err(());
    }
    Ok(())
}

/// A page header read by a hot reader.
#[derive(Debug, Clone, Copy)]
enum Peek {
    /// key, version, check word, as read.
    Header(u64, u64, u64),
    /// Changed meanwhile (recycled, rewritten, being written): retry.
    Stale,
}

// ------------------------------------------------------------ the two caches

/// A page table + page source, so one workload drives both lifetimes.
trait Cache: Sync {
    /// A page held across an I/O.
    type Page<'a>: AsRef<[u8]>
    where
        Self: 'a;
    /// Look up `key` for an I/O as reader `who`: `Ok(None)` if absent or
    /// raced (retry), `Err` to stop.
    fn get(&self, key: usize, who: usize) -> Result<Option<Self::Page<'_>>, PoolError>;
    /// Read `key`'s page header, no hold.
    fn peek(&self, key: usize) -> Result<Peek, PoolError>;
    /// Write a new version of `key`.
    fn put(&self, key: usize, version: u64) -> Result<(), PoolError>;
    /// Has the device's shutdown started (so errors are expected)?
    fn closing(&self) -> bool {
        false
    }
}

/// The shutdown guard a user writes without this crate: one shared count
/// of I/Os in flight, and a flag the device's shutdown sets before it
/// waits for the count to drain.
#[derive(Default)]
struct Rundown {
    inflight: AtomicU64,
    closed: AtomicBool,
}

/// One I/O's pass through the guard.
struct Ticket<'a>(&'a Rundown);

impl Rundown {
    fn enter(&self) -> Option<Ticket<'_>> {
        // SeqCst with `close`: either this sees `closed`, or `close` sees
        // this count.
        self.inflight.fetch_add(1, SeqCst);
        if self.closed.load(SeqCst) {
            self.inflight.fetch_sub(1, SeqCst);
            return None;
        }
        Some(Ticket(self))
    }

    /// Close and wait for the in-flight I/Os (at most `limit`): how many
    /// are still in flight at the end.
    fn close(&self, limit: Duration) -> u64 {
        self.closed.store(true, SeqCst);
        let t0 = Instant::now();
        loop {
            let n = self.inflight.load(SeqCst);
            if n == 0 || t0.elapsed() > limit {
                return n;
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, SeqCst);
    }
}

/// Page lifetimes by `Arc`, device lifetime by the rundown guard.
struct ArcCache {
    table: Vec<ArcSwapOption<Vec<u8>>>,
    rundown: Rundown,
    page_size: usize,
}

/// A page held through its `Arc`, and the I/O's guard ticket.
struct ArcPage<'a> {
    page: Arc<Vec<u8>>,
    _io: Ticket<'a>,
}

impl AsRef<[u8]> for ArcPage<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.page
    }
}

impl Cache for ArcCache {
    type Page<'a> = ArcPage<'a>;

    fn get(&self, key: usize, _who: usize) -> Result<Option<ArcPage<'_>>, PoolError> {
        let Some(io) = self.rundown.enter() else {
            return Ok(None);
        };
        Ok(self.table[key]
            .load_full()
            .map(|page| ArcPage { page, _io: io }))
    }

    fn peek(&self, key: usize) -> Result<Peek, PoolError> {
        let Some(_io) = self.rundown.enter() else {
            return Ok(Peek::Stale);
        };
        let g = self.table[key].load();
        Ok(match g.as_deref() {
            Some(p) => Peek::Header(word(p, KEY), word(p, VERSION), word(p, CHECK)),
            None => Peek::Stale,
        })
    }

    fn put(&self, key: usize, version: u64) -> Result<(), PoolError> {
        let mut page = vec![0u8; self.page_size];
        fill(&mut page, key as u64, version);
        self.table[key].store(Some(Arc::new(page)));
        Ok(())
    }
}

/// How the pool's hot readers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// `DevicePagePool::read`: no page reference.
    Scoped,
    /// `DevicePagePool::lookup` + drop.
    Counted,
}

/// Page lifetimes by the pool: `PageRef` counts + the pool's `PercpuRef`.
struct PoolCache {
    pool: DevicePagePool,
    /// Lock-free read side: the page address per key (0 = none).
    addrs: Vec<AtomicUsize>,
    /// The table's own reference per key (the writer's side).
    owners: Vec<Mutex<Option<DevicePage>>>,
    /// Pages referenced by the engine, one counter per I/O reader and a
    /// last one for the table, each decremented *before* the page's drop,
    /// so the pool cannot complete while their sum is > 0. (Per thread, so
    /// that this bookkeeping adds no shared counter to the measurement.)
    held: Vec<Padded>,
    allocated: AtomicU64,
    /// How `peek` reads (set between phases).
    read: Read,
}

/// A counter alone on its cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// A page held by a reader, counted in `PoolCache::held`.
struct Held<'a> {
    page: DevicePage,
    held: &'a AtomicU64,
}

impl AsRef<[u8]> for Held<'_> {
    fn as_ref(&self) -> &[u8] {
        self.page.as_slice()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Before the page's own drop (which may be the pool's last put).
        self.held.fetch_sub(1, SeqCst);
    }
}

impl PoolCache {
    fn table_held(&self) -> &AtomicU64 {
        &self.held.last().expect("the table's counter").0
    }

    fn held_total(&self) -> u64 {
        self.held.iter().map(|h| h.0.load(SeqCst)).sum()
    }

    /// Drop every table reference (device removal: the cache lets go). The
    /// addresses stay: later lookups of them are refused by the pool.
    fn evict_all(&self) {
        for owner in &self.owners {
            let old = owner.lock().unwrap().take();
            if let Some(old) = old {
                self.table_held().fetch_sub(1, SeqCst);
                drop(old);
            }
        }
    }
}

impl Cache for PoolCache {
    type Page<'a> = Held<'a>;

    fn get(&self, key: usize, who: usize) -> Result<Option<Held<'_>>, PoolError> {
        let addr = self.addrs[key].load(Acquire);
        if addr == 0 {
            return Ok(None);
        }
        match DevicePagePool::lookup(addr as *const u8) {
            Ok(page) => {
                let held = &self.held[who].0;
                held.fetch_add(1, SeqCst);
                let held = Held { page, held };
                // The speculative reference may be to a page recycled for
                // another key: keep it only if it holds this key.
                if word(held.page.as_slice(), KEY) != key as u64 {
                    return Ok(None);
                }
                Ok(Some(held))
            }
            Err(PoolError::PageNotAllocated { .. } | PoolError::PageBusy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn peek(&self, key: usize) -> Result<Peek, PoolError> {
        let addr = self.addrs[key].load(Acquire) as *const u8;
        if addr.is_null() {
            return Ok(Peek::Stale);
        }
        let header = |b: &[u8]| Peek::Header(word(b, KEY), word(b, VERSION), word(b, CHECK));
        let got = match self.read {
            Read::Scoped => DevicePagePool::read(addr, |v| {
                let mut b = [0u8; HEADER];
                v.read_into(0, &mut b).map(|()| header(&b))
            })
            .and_then(|r| r),
            Read::Counted => DevicePagePool::lookup(addr).map(|p| header(p.as_slice())),
        };
        match got {
            Ok(peek) => Ok(peek),
            Err(
                PoolError::PageChanged { .. }
                | PoolError::PageBusy { .. }
                | PoolError::PageNotAllocated { .. },
            ) => Ok(Peek::Stale),
            Err(e) => Err(e),
        }
    }

    fn closing(&self) -> bool {
        self.pool.is_shutting_down()
    }

    fn put(&self, key: usize, version: u64) -> Result<(), PoolError> {
        let mut bytes = vec![0u8; self.pool.page_size()];
        fill(&mut bytes, key as u64, version);
        let page = loop {
            let mut page = self.pool.alloc()?;
            self.allocated.fetch_add(1, Relaxed);
            self.table_held().fetch_add(1, SeqCst);
            // Unique unless a reader's speculative lookup of the page's old
            // address got a reference in between: then let it go (the
            // reader drops it after its re-check) and take another page.
            // Readers that read the page optimistically meanwhile see its
            // version change and retry.
            let written = match page.writer() {
                Some(mut w) => w.write(0, &bytes).map(|()| true)?,
                None => false,
            };
            if written {
                break page;
            }
            self.table_held().fetch_sub(1, SeqCst);
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
            self.table_held().fetch_sub(1, SeqCst);
            drop(old);
        }
        Ok(())
    }
}

// ------------------------------------------------------------ the workloads

#[derive(Default)]
struct Counters {
    /// Reader CPU time, ns.
    cpu: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    stale: AtomicU64,
    bad: AtomicU64,
    torn: AtomicU64,
    refused: AtomicU64,
    errors: Mutex<Vec<String>>,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One I/O reader: keep up to `depth` reads in flight, each held for
/// `hold`.
fn io_reader<C: Cache>(cache: &C, cfg: &Config, id: usize, stop: &AtomicBool, c: &Counters) -> u64 {
    let mut inflight: VecDeque<(Instant, usize, C::Page<'_>)> = VecDeque::new();
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
        let key = (xorshift(&mut rng) % cfg.keys as u64) as usize;
        match cache.get(key, id) {
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

/// One hot reader: read the headers of the hot keys until stopped.
fn hot_reader<C: Cache>(cache: &C, cfg: &Config, id: usize, stop: &AtomicBool, c: &Counters) {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1).wrapping_mul(0x2545_f491);
    let (mut ops, mut stale, mut torn) = (0u64, 0u64, 0u64);
    let hot = cfg.hot_keys.clamp(1, cfg.keys) as u64;
    while !stop.load(Relaxed) {
        for _ in 0..64 {
            let key = xorshift(&mut rng) % hot;
            match cache.peek(key as usize) {
                Ok(Peek::Header(k, v, chk)) if k == key => {
                    if chk != check_word(k, v) {
                        torn += 1;
                    }
                    ops += 1;
                }
                // A recycled page now holding another key, or a change.
                Ok(_) => stale += 1,
                Err(e) => {
                    c.errors
                        .lock()
                        .unwrap()
                        .push(format!("hot reader {id}: {e}"));
                    return;
                }
            }
        }
    }
    c.reads.fetch_add(ops, Relaxed);
    c.stale.fetch_add(stale, Relaxed);
    c.torn.fetch_add(torn, Relaxed);
}

/// The writer: rewrite keys round-robin until stopped or refused.
fn writer<C: Cache>(cache: &C, cfg: &Config, stop: &AtomicBool, c: &Counters) -> u64 {
    let mut ops = 0u64;
    let mut version = c.writes.load(Relaxed) + cfg.keys as u64;
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

/// I/O readers + writer for `cfg.phase`.
fn measure_io<C: Cache>(cache: &C, cfg: &Config, name: &str, out: &mut Outcome) -> Phase {
    let stop = AtomicBool::new(false);
    let c = Counters::default();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for id in 0..cfg.readers {
            let (stop, c) = (&stop, &c);
            s.spawn(move || timed(&c.cpu, || io_reader(cache, cfg, id, stop, c)));
        }
        s.spawn(|| writer(cache, cfg, &stop, &c));
        std::thread::sleep(cfg.phase);
        stop.store(true, Relaxed);
    });
    let secs = t0.elapsed().as_secs_f64();
    out.checksum_failures += c.bad.load(Relaxed);
    let phase = Phase {
        name: name.into(),
        threads: cfg.readers,
        ops: c.reads.load(Relaxed),
        writes: c.writes.load(Relaxed),
        secs,
        cpu: cpu(&c.cpu),
    };
    out.unexpected_errors.extend(c.errors.into_inner().unwrap());
    phase
}

/// Hot readers + writer for `cfg.phase`; counts reads only.
fn measure_hot<C: Cache>(cache: &C, cfg: &Config, name: &str, out: &mut Outcome) -> Phase {
    let stop = AtomicBool::new(false);
    let c = Counters::default();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for id in 0..cfg.hot_readers {
            let (stop, c) = (&stop, &c);
            s.spawn(move || timed(&c.cpu, || hot_reader(cache, cfg, id, stop, c)));
        }
        s.spawn(|| writer(cache, cfg, &stop, &c));
        std::thread::sleep(cfg.phase);
        stop.store(true, Relaxed);
    });
    let secs = t0.elapsed().as_secs_f64();
    out.torn_reads += c.torn.load(Relaxed);
    out.hot_reads += c.reads.load(Relaxed);
    let phase = Phase {
        name: name.into(),
        threads: cfg.hot_readers,
        ops: c.reads.load(Relaxed),
        writes: c.writes.load(Relaxed),
        secs,
        cpu: cpu(&c.cpu),
    };
    out.unexpected_errors.extend(c.errors.into_inner().unwrap());
    phase
}

fn open_pool(cfg: &Config) -> Result<DevicePagePool, String> {
    let size = cfg.pages * cfg.page_size;
    // Optimistic reads for the hot readers: pages are written through
    // `DevicePage::writer`.
    let opts = PoolOptions::new()
        .page_size(cfg.page_size)
        .optimistic_reads();
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
            DevicePagePool::open(path, &opts.size(size as u64).allow_file_fallback())
        }
    };
    r.map_err(|e| e.to_string())
}

/// The whole demo: baseline phases, pool phases, hot shutdown, drain,
/// checks.
pub fn run(cfg: &Config) -> Result<Outcome, String> {
    if cfg.keys == 0
        || cfg.keys * 2 > cfg.pages
        || cfg.readers == 0
        || cfg.depth == 0
        || cfg.hot_readers == 0
        || cfg.page_size < 64
    {
        return Err(format!(
            "need keys >= 1, pages >= 2 * keys, readers >= 1, depth >= 1, hot readers >= 1, \
             page size >= 64 (got keys {}, pages {}, readers {}, depth {}, hot readers {}, \
             page size {})",
            cfg.keys, cfg.pages, cfg.readers, cfg.depth, cfg.hot_readers, cfg.page_size
        ));
    }
    let mut out = Outcome::default();
    let say = |s: &str| {
        if cfg.verbose {
            println!("{s}");
            std::io::stdout().flush().ok();
        }
    };
    let report = |p: &Phase| {
        if cfg.verbose {
            println!(
                "  {:<34} {:>12.0} reads/s {:>10.1} ns/read",
                p.name,
                p.ops_per_sec(),
                p.ns_per_op(),
            );
        }
    };

    if cfg.arc_baseline {
        say(&format!(
            "baseline: Arc pages + a shared rundown guard per I/O, {} I/O readers + 1 writer, then {} hot readers + 1 writer, {:?} each",
            cfg.readers, cfg.hot_readers, cfg.phase
        ));
        let arc = ArcCache {
            table: (0..cfg.keys).map(|_| ArcSwapOption::empty()).collect(),
            rundown: Rundown::default(),
            page_size: cfg.page_size,
        };
        warm(&arc, cfg).map_err(|e| e.to_string())?;
        let p = measure_io(&arc, cfg, IO_ARC, &mut out);
        report(&p);
        out.phases.push(p);
        let p = measure_hot(&arc, cfg, HOT_ARC, &mut out);
        report(&p);
        out.phases.push(p);
        // The baseline's device shutdown: nothing is in flight any more,
        // so the guard drains at once, and refuses new I/O.
        out.baseline_leaks += arc.rundown.close(Duration::from_secs(10));
        out.baseline_leaks += u64::from(arc.rundown.enter().is_some());
    }

    let pool = open_pool(cfg)?;
    out.total_pages = pool.page_count();
    say(&format!(
        "DevicePagePool ({:?}, {} pages of {} B): {} hot readers (scoped reads, then counted lookups), then {} I/O readers and a hot shutdown",
        pool.backend(),
        pool.page_count(),
        pool.page_size(),
        cfg.hot_readers,
        cfg.readers,
    ));
    let mut cache = PoolCache {
        addrs: (0..cfg.keys).map(|_| AtomicUsize::new(0)).collect(),
        owners: (0..cfg.keys).map(|_| Mutex::new(None)).collect(),
        held: (0..=cfg.readers).map(|_| Padded::default()).collect(),
        allocated: AtomicU64::new(0),
        read: Read::Scoped,
        pool,
    };
    warm(&cache, cfg).map_err(|e| e.to_string())?;
    for (mode, name) in [(Read::Scoped, HOT_SCOPED), (Read::Counted, HOT_COUNTED)] {
        cache.read = mode;
        let p = measure_hot(&cache, cfg, name, &mut out);
        report(&p);
        out.phases.push(p);
    }

    let stop = AtomicBool::new(false);
    let c = Counters::default();
    let cfg_ref = cfg;
    let (reader_ops, writer_ops, t_run) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..cfg.readers)
            .map(|id| {
                let (cache, stop, c) = (&cache, &stop, &c);
                s.spawn(move || timed(&c.cpu, || io_reader(cache, cfg_ref, id, stop, c)))
            })
            .collect();
        let w = s.spawn(|| writer(&cache, cfg_ref, &stop, &c));

        // Progress, a line per second of the measured phase.
        let t_start = Instant::now();
        while t_start.elapsed() < cfg.phase {
            let left = cfg.phase.saturating_sub(t_start.elapsed());
            std::thread::sleep(left.min(Duration::from_secs(1)));
            if cfg.verbose && left >= Duration::from_millis(500) {
                let st = cache.pool.stats();
                println!(
                    "  t={:>4.1}s  pages allocated {:>5}/{}  engine holds {:>5}",
                    t_start.elapsed().as_secs_f64(),
                    st.allocated,
                    st.pages,
                    cache.held_total()
                );
            }
        }
        let t_run = t_start.elapsed();

        // A page a background thread forgets (`--leak`): it is still held
        // when the shutdown's wait runs out.
        let mut leaked = cfg.leak.and_then(|_| leak_a_page(&cache.pool, &c));

        // ---- hot shutdown, readers still holding pages
        let t0 = Instant::now();
        out.held_at_shutdown = cache.held_total() as usize;
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
                        let pages = if still.count == 1 { "page" } else { "pages" };
                        out.mark(
                            t0,
                            format!("{} {pages} still held", still.count),
                            cfg.verbose,
                        );
                    }
                    let timed_out = cfg.leak.is_some_and(|limit| t0.elapsed() >= limit);
                    if let (Some(page), true) = (leaked.as_ref(), timed_out) {
                        out.leak = Some(report_leak(page.index(), &still));
                        out.mark(
                            t0,
                            format!(
                                "the wait timed out with page {} still held (leak report below)",
                                page.index()
                            ),
                            cfg.verbose,
                        );
                        // Let go of it: the shutdown can complete now.
                        drop(leaked.take());
                        out.mark(t0, "the leaked page was let go", cfg.verbose);
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
        out.held_when_unmapped = cache.held_total();
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
    // The readers' CPU time includes their last in-flight reads after the
    // shutdown, and so do their counts.
    let io = Phase {
        name: IO_POOL.into(),
        threads: cfg.readers,
        ops: out.reader_ops.iter().sum::<u64>(),
        writes: writer_ops,
        secs: t_run.as_secs_f64(),
        cpu: cpu(&c.cpu),
    };
    out.ops_per_sec = io.ops_per_sec();
    // In run order: the pool's I/O phase came last.
    out.phases.push(io);
    out.stale_retries = c.stale.load(Relaxed);
    out.checksum_failures += c.bad.load(Relaxed);
    out.refused_after_shutdown = c.refused.load(Relaxed);
    out.unexpected_errors.extend(c.errors.into_inner().unwrap());
    out.pages_allocated = cache.allocated.load(Relaxed);
    out.leak_expected = cfg.leak.is_some();
    Ok(out)
}

/// Allocate a page on a thread named `compaction`, labelled `compaction`,
/// and hand it back: the engine then holds it without counting it, as a
/// forgotten reference would be.
fn leak_a_page(pool: &DevicePagePool, c: &Counters) -> Option<DevicePage> {
    let r = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("compaction".into())
            .spawn_scoped(s, || pool.alloc_tagged("compaction"))
            .map_err(|e| e.to_string())?
            .join()
            .map_err(|_| "the compaction thread panicked".to_string())?
            .map_err(|e| e.to_string())
    });
    match r {
        Ok(page) => Some(page),
        Err(e) => {
            c.errors.lock().unwrap().push(format!("leak: {e}"));
            None
        }
    }
}

fn report_leak(page: usize, still: &StillHeld) -> Leak {
    Leak {
        page,
        report: still.to_string(),
        tracked: still.holders.is_tracked(),
        indices: still.indices.clone(),
    }
}
