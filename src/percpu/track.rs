//! Holder tracking (feature `track`, off by default): every reference
//! remembers who took it, as Linux's `ref_tracker` does for netdev
//! references, so a shutdown that hangs can say who still holds the ref.
//!
//! # What is recorded
//!
//! Each [`Ref`](crate::Ref) and [`OwnedRef`](crate::OwnedRef) registers a
//! *holder* when it is taken or cloned and removes it when dropped: the
//! taking thread's name and id, a label (the one given to
//! [`tryget_live_tagged`](crate::PercpuRef::tryget_live_tagged), else the
//! innermost [`holder_label`] scope of the thread, else the label of the
//! reference a clone was made from), and a backtrace when
//! `RUST_BACKTRACE`/`RUST_LIB_BACKTRACE` asks for one
//! ([`Backtrace::capture`]) and the process is not a `fork()` child (whose
//! copy of std's backtrace lock may be held for good; `sys::fork`).
//!
//! **Pages** (`dax`): each `DevicePage` of a pool — from `alloc`,
//! `lookup` or a clone — registers the same kind of record, with its page
//! index ([`HolderKind::Page`], [`Holder::page`]), in a tracker of the
//! pool's own (`DevicePagePool::holders`; `alloc_tagged` and
//! `lookup_tagged` give labels). The pool's `PercpuRef` records as any
//! other: a raw reference per allocated page, a `Ref` per lookup or read
//! in progress.
//!
//! **Raw references** (`get_many`/`put_many`, `into_raw`/`from_raw`) are
//! not paired: a `put_many(n)` does not say which `get_many` it balances,
//! and is often made by another thread (a pool frees on the thread that
//! last used a page). So raw references form a *ledger*: `get_many(n)`
//! records `n` references taken by this thread (with label and backtrace);
//! `put_many(n)` retires `n` of them, oldest first — of its own shard
//! first, then of the others. The number of raw references reported is
//! exact; *which* takers are named is the best guess that puts return the
//! oldest gets first.
//!
//! # Cost
//!
//! Registration and removal are `O(1)`: a holder lives in a slot of one of
//! up to 16 shards per ref, chosen by the current CPU, each behind its own
//! small lock, so threads on different CPUs do not serialise on tracking.
//! With the feature on, each get+put pays two shard lock round trips and a
//! reference count of the thread's record (numbers in the docs of
//! `PercpuRef::holders`, measured by `benches/track.rs`). The header grows
//! by the shard table (16 bytes), and `Ref`/`OwnedRef` by an 8-byte token
//! (24 bytes instead of 16).
//!
//! With the feature off, nothing is recorded, the types are the same size
//! as without this module (16-byte `Ref`/`OwnedRef`: a pointer and the
//! 4-byte rseq area token; 32-byte header) and the
//! fast paths run the same instructions: `scripts/zero-cost.sh` compares
//! callgrind instruction counts of a build with the feature off against a
//! build with every tracking hook compiled out (`--cfg
//! percpu_ref_untracked`), for refs and for a pool's pages.
//! [`PercpuRef::holders`](crate::PercpuRef::holders) then reports that
//! tracking is off.

use std::backtrace::Backtrace;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::thread::ThreadId;

/// What kind of reference a [`Holder`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HolderKind {
    /// A borrowed [`Ref`](crate::Ref).
    Ref,
    /// An [`OwnedRef`](crate::OwnedRef).
    OwnedRef,
    /// Raw references (`get_many`, `into_raw`), counted in a ledger.
    Raw,
    /// A `DevicePage` of a pool ([`Holder::page`] says which page).
    Page,
}

/// One holder of references to a [`PercpuRef`](crate::PercpuRef), as
/// recorded by the `track` feature.
#[derive(Debug, Clone)]
pub struct Holder {
    thread: Arc<ThreadInfo>,
    label: Option<&'static str>,
    kind: HolderKind,
    count: usize,
    /// The page index, for a [`HolderKind::Page`].
    page: Option<usize>,
    backtrace: Option<Arc<Backtrace>>,
}

#[derive(Debug)]
struct ThreadInfo {
    name: Option<String>,
    id: ThreadId,
}

impl Holder {
    /// Name of the thread that took the reference, if it has one.
    pub fn thread_name(&self) -> Option<&str> {
        self.thread.name.as_deref()
    }

    /// Id of the thread that took the reference.
    pub fn thread_id(&self) -> ThreadId {
        self.thread.id
    }

    /// The label it was taken with, if any.
    pub fn label(&self) -> Option<&'static str> {
        self.label
    }

    /// What kind of reference it is.
    pub fn kind(&self) -> HolderKind {
        self.kind
    }

    /// References it holds: 1 for a `Ref`/`OwnedRef`/`DevicePage`, the
    /// outstanding part of a `get_many` for raw references.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The index of the page it holds, for a [`HolderKind::Page`] (a
    /// `DevicePage` of a pool, see `DevicePagePool::holders`).
    pub fn page(&self) -> Option<usize> {
        self.page
    }

    /// Where it was taken, if a backtrace was asked for
    /// (`RUST_BACKTRACE`/`RUST_LIB_BACKTRACE`) when it was.
    pub fn backtrace(&self) -> Option<&Backtrace> {
        self.backtrace.as_deref()
    }

    fn same_group(&self, other: &Holder) -> bool {
        self.thread.id == other.thread.id
            && self.label == other.label
            && self.kind == other.kind
            && self.page == other.page
    }
}

/// The holders of a ref's references at one moment: what
/// [`PercpuRef::holders`](crate::PercpuRef::holders) returns (and, for the
/// pages of a pool, `DevicePagePool::holders`). Its `Display` is a leak
/// report:
///
/// ```text
/// 2 references still held:
///   1 by thread 'io-3' (ThreadId(4), label compaction)
///   1 raw by thread 'main' (ThreadId(1))
/// ```
///
/// (page holders read `page 17: 1 by thread ...`, by ascending page)
/// followed, for each group, by the backtrace of its first holder when
/// backtraces were captured.
#[derive(Debug, Clone, Default)]
pub struct Holders {
    holders: Vec<Holder>,
    tracked: bool,
}

impl Holders {
    /// Was holder tracking compiled in (feature `track`)? If not, the
    /// report is always empty.
    pub fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// References held, summed over all holders.
    pub fn count(&self) -> usize {
        self.holders.iter().map(|h| h.count).sum()
    }

    /// No reference held (or tracking is off)?
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }

    /// The holders, one per `Ref`/`OwnedRef` and one per outstanding
    /// `get_many`.
    pub fn iter(&self) -> std::slice::Iter<'_, Holder> {
        self.holders.iter()
    }
}

impl<'a> IntoIterator for &'a Holders {
    type Item = &'a Holder;
    type IntoIter = std::slice::Iter<'a, Holder>;
    fn into_iter(self) -> Self::IntoIter {
        self.holders.iter()
    }
}

impl fmt::Display for Holders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.tracked {
            return f.write_str(
                "holder tracking is off (build percpu-ref with the `track` feature to see who \
                 holds references)",
            );
        }
        let n = self.count();
        match n {
            0 => return f.write_str("no references held"),
            1 => f.write_str("1 reference still held:")?,
            n => write!(f, "{n} references still held:")?,
        }
        self.fmt_lines(f)
    }
}

impl Holders {
    /// The report's lines, one per group of holders (same thread, label,
    /// kind and page) in order of first appearance — page holders by
    /// ascending page — each on a new line, with the backtrace of its
    /// first holder when one was captured.
    pub(crate) fn fmt_lines(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut groups: Vec<(&Holder, usize)> = Vec::new();
        for h in &self.holders {
            match groups.iter_mut().find(|(g, _)| g.same_group(h)) {
                Some((_, c)) => *c += h.count,
                None => groups.push((h, h.count)),
            }
        }
        // Stable: groups of one page stay in order of first appearance.
        groups.sort_by_key(|(h, _)| h.page);
        for (h, count) in groups {
            f.write_str("\n  ")?;
            if let Some(page) = h.page {
                write!(f, "page {page}: ")?;
            }
            let raw = if h.kind == HolderKind::Raw {
                " raw"
            } else {
                ""
            };
            let name = h.thread_name().unwrap_or("<unnamed>");
            write!(f, "{count}{raw} by thread '{name}' ({:?}", h.thread.id)?;
            if let Some(l) = h.label {
                write!(f, ", label {l}")?;
            }
            f.write_str(")")?;
            if let Some(bt) = &h.backtrace {
                write!(f, " at:\n{bt}")?;
            }
        }
        Ok(())
    }
}

crate::sync::thread_local_cell! {
    static LABEL: std::cell::Cell<Option<&'static str>> = std::cell::Cell::new(None);
}

/// Label every reference this thread takes while the returned guard lives
/// (unless taken with an explicit label): `"compaction"`, `"io"`, ... Scopes
/// nest; dropping the guard restores the outer label. Without the `track`
/// feature this does nothing.
///
/// ```
/// use percpu_ref::{NoRelease, PercpuRef};
/// let r = PercpuRef::new(0u8, NoRelease);
/// let held = {
///     let _scope = percpu_ref::holder_label("compaction");
///     r.tryget_live().unwrap()
/// };
/// if r.holders().is_tracked() {
///     assert_eq!(r.holders().iter().next().unwrap().label(), Some("compaction"));
/// }
/// # drop(held);
/// ```
pub fn holder_label(label: &'static str) -> LabelScope {
    let outer = LABEL.with(|l| l.replace(Some(label)));
    LabelScope {
        outer,
        _not_send: PhantomData,
    }
}

/// Guard of a [`holder_label`] scope; restores the outer label when dropped.
#[must_use = "the label applies only while the guard lives"]
#[derive(Debug)]
pub struct LabelScope {
    outer: Option<&'static str>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for LabelScope {
    fn drop(&mut self) {
        LABEL.with(|l| l.set(self.outer));
    }
}

#[cfg(all(feature = "track", not(percpu_ref_model)))]
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
pub(crate) use on::{Token, Tracker};

#[cfg(not(all(feature = "track", not(percpu_ref_model))))]
#[cfg_attr(percpu_ref_untracked, allow(unused_imports))]
pub(crate) use off::{Token, Tracker};

/// Without the feature: zero-sized, and every hook an empty inline body.
#[cfg(not(all(feature = "track", not(percpu_ref_model))))]
#[cfg_attr(percpu_ref_untracked, allow(dead_code))]
mod off {
    use super::{HolderKind, Holders};

    #[derive(Debug, Default)]
    pub(crate) struct Tracker;

    pub(crate) struct Token;

    impl Tracker {
        #[inline(always)]
        pub(crate) fn new() -> Self {
            Tracker
        }
        #[inline(always)]
        pub(crate) fn take(&self, _kind: HolderKind, _label: Option<&'static str>) -> Token {
            Token
        }
        #[inline(always)]
        #[cfg_attr(not(feature = "dax"), allow(dead_code))]
        pub(crate) fn take_page(&self, _page: usize, _label: Option<&'static str>) -> Token {
            Token
        }
        #[inline(always)]
        pub(crate) fn clone_of(&self, _from: &Token, _kind: HolderKind) -> Token {
            Token
        }
        #[inline(always)]
        pub(crate) fn give_back(&self, _t: &Token) {}
        #[inline(always)]
        pub(crate) fn to_raw(&self, _t: &Token) {}
        #[inline(always)]
        pub(crate) fn raw_get(&self, _n: usize) {}
        #[inline(always)]
        pub(crate) fn raw_put(&self, _n: usize) {}
        pub(crate) fn holders(&self) -> Holders {
            Holders::default()
        }
    }
}

#[cfg(all(feature = "track", not(percpu_ref_model)))]
#[cfg_attr(percpu_ref_untracked, allow(dead_code))]
mod on {
    use super::{Holder, HolderKind, Holders, ThreadInfo, LABEL};
    use crate::sync::{lock, Mutex};
    use crossbeam_utils::CachePadded;
    use std::backtrace::{Backtrace, BacktraceStatus};
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// At most this many shards per ref (fewer on smaller machines).
    const MAX_SHARDS: usize = 16;

    // std's thread-local directly: this module is never compiled under a
    // model checker (see the cfg above), and the record has no ordering.
    std::thread_local! {
        static ME: Arc<ThreadInfo> = {
            let t = std::thread::current();
            Arc::new(ThreadInfo { name: t.name().map(str::to_owned), id: t.id() })
        };
    }

    #[derive(Default)]
    struct Shard {
        /// Holders of `Ref`s and `OwnedRef`s; `None`: a free slot.
        slots: Vec<Option<Holder>>,
        /// Free indices of `slots`.
        free: Vec<u32>,
        /// Raw references taken on this shard's CPU, oldest first.
        raw: VecDeque<Holder>,
    }

    /// The holders of one ref, sharded by CPU.
    pub(crate) struct Tracker {
        shards: Box<[CachePadded<Mutex<Shard>>]>,
    }

    /// A registered holder: the shard and slot of its record.
    pub(crate) struct Token {
        shard: u32,
        slot: u32,
    }

    fn record(
        kind: HolderKind,
        label: Option<&'static str>,
        count: usize,
        page: Option<usize>,
    ) -> Holder {
        Holder {
            thread: ME.with(Arc::clone),
            label: label.or_else(|| LABEL.with(std::cell::Cell::get)),
            kind,
            count,
            page,
            backtrace: capture(),
        }
    }

    /// A backtrace, if `RUST_BACKTRACE`/`RUST_LIB_BACKTRACE` asks for one
    /// and this is not a `fork()` child. A capture takes std's
    /// process-wide backtrace lock, which a child inherits held if another
    /// thread of the parent held it at the fork (a panic printing its
    /// backtrace, a capture of this module): the child's capture would
    /// never return.
    fn capture() -> Option<Arc<Backtrace>> {
        if crate::sys::fork::forks() != 0 {
            return None;
        }
        let bt = Backtrace::capture();
        (bt.status() == BacktraceStatus::Captured).then(|| Arc::new(bt))
    }

    impl std::fmt::Debug for Tracker {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Tracker")
                .field("shards", &self.shards.len())
                .finish()
        }
    }

    impl Tracker {
        pub(crate) fn new() -> Self {
            // Count forks from now on: a child of a later fork captures no
            // backtraces (`capture`).
            crate::sys::fork::watch();
            let n = crate::sys::cpu::possible().clamp(1, MAX_SHARDS);
            Tracker {
                shards: (0..n).map(|_| CachePadded::new(Mutex::default())).collect(),
            }
        }

        fn here(&self) -> usize {
            crate::sys::cpu::current() % self.shards.len()
        }

        fn insert(&self, h: Holder) -> Token {
            let shard = self.here();
            let mut s = lock(&self.shards[shard]);
            let slot = match s.free.pop() {
                Some(i) => {
                    s.slots[i as usize] = Some(h);
                    i
                }
                None => {
                    s.slots.push(Some(h));
                    u32::try_from(s.slots.len() - 1).expect("fewer than 2^32 holders per shard")
                }
            };
            Token {
                shard: shard as u32,
                slot,
            }
        }

        /// Register a new holder on this thread.
        pub(crate) fn take(&self, kind: HolderKind, label: Option<&'static str>) -> Token {
            self.insert(record(kind, label, 1, None))
        }

        /// Register a new holder of page `page` (a `DevicePage`) on this
        /// thread.
        #[cfg_attr(not(feature = "dax"), allow(dead_code))]
        pub(crate) fn take_page(&self, page: usize, label: Option<&'static str>) -> Token {
            self.insert(record(HolderKind::Page, label, 1, Some(page)))
        }

        /// Register the holder of a clone of `from`: this thread, the
        /// scoped label, else `from`'s label; `from`'s page.
        pub(crate) fn clone_of(&self, from: &Token, kind: HolderKind) -> Token {
            let (label, page) = lock(&self.shards[from.shard as usize]).slots[from.slot as usize]
                .as_ref()
                .map_or((None, None), |h| (h.label, h.page));
            self.insert(record(kind, label.filter(|_| !scoped()), 1, page))
        }

        fn remove(&self, t: &Token) -> Option<Holder> {
            let mut s = lock(&self.shards[t.shard as usize]);
            let h = s.slots[t.slot as usize].take();
            debug_assert!(h.is_some(), "a holder token was given back twice");
            s.free.push(t.slot);
            h
        }

        /// The holder's reference is put.
        pub(crate) fn give_back(&self, t: &Token) {
            self.remove(t);
        }

        /// The holder's reference becomes a raw one (`into_raw`): it moves
        /// to the ledger, keeping its thread, label and backtrace.
        pub(crate) fn to_raw(&self, t: &Token) {
            if let Some(mut h) = self.remove(t) {
                h.kind = HolderKind::Raw;
                lock(&self.shards[t.shard as usize]).raw.push_back(h);
            }
        }

        /// `n` raw references taken on this thread.
        pub(crate) fn raw_get(&self, n: usize) {
            let h = record(HolderKind::Raw, None, n, None);
            lock(&self.shards[self.here()]).raw.push_back(h);
        }

        /// `n` raw references put: retire the oldest, this shard first.
        pub(crate) fn raw_put(&self, mut n: usize) {
            let first = self.here();
            let len = self.shards.len();
            for k in 0..len {
                if n == 0 {
                    return;
                }
                let mut s = lock(&self.shards[(first + k) % len]);
                while n > 0 {
                    let Some(front) = s.raw.front_mut() else {
                        break;
                    };
                    let take = front.count.min(n);
                    front.count -= take;
                    n -= take;
                    if front.count == 0 {
                        s.raw.pop_front();
                    }
                }
            }
            // More raw puts than gets: the count's own underflow check
            // reports that misuse; the ledger is simply empty.
        }

        /// A snapshot, one shard at a time.
        pub(crate) fn holders(&self) -> Holders {
            let mut holders = Vec::new();
            for shard in self.shards.iter() {
                let s = lock(shard);
                holders.extend(s.slots.iter().flatten().cloned());
                holders.extend(s.raw.iter().cloned());
            }
            Holders {
                holders,
                tracked: true,
            }
        }
    }

    fn scoped() -> bool {
        LABEL.with(|l| l.get().is_some())
    }
}

/// Expands to its statements, or to nothing in the build without the
/// tracking code (`--cfg percpu_ref_untracked`) that `scripts/zero-cost.sh`
/// compares the default build against.
#[cfg_attr(percpu_ref_untracked, allow(unused_macros))]
macro_rules! hook {
    ($($t:tt)*) => {
        #[cfg(not(percpu_ref_untracked))]
        {
            $($t)*
        }
    };
}
pub(crate) use hook;
