//! The process-wide address → pool registry (the kernel's
//! `get_dev_pagemap`): an `arc-swap`ped sorted list of mapped ranges,
//! read without locks, replaced copy-on-write when a pool is registered or
//! released (rare); and, in front of it, each thread's last pool found.
//!
//! # The per-thread entry
//!
//! Reading the `arc-swap` registry costs two read-modify-writes on a
//! thread-local slot (its hazard "debt"), about as much as the rest of a
//! lookup. So each thread keeps the last pool it found — its range and an
//! `Arc` of its metadata — and tries it first: if the address is in that
//! range and the pool's `tryget_live` succeeds, that is the answer,
//! because a live pool's range is mapped and no other mapping can overlap
//! it. A dead pool (shut down, perhaps unmapped and its range reused)
//! fails `tryget_live`, and the registry decides. The entry keeps the last
//! pool's metadata (not its memory: that goes at its release) alive until
//! the thread finds another pool or exits.

use super::error::PoolError;
use super::shared::Shared;
use arc_swap::ArcSwapOption;
use std::cell::RefCell;
use std::sync::Arc;

/// One registered pool: its mapped range.
pub(crate) struct Entry {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) pool: Arc<Shared>,
}

impl Entry {
    fn copy(&self) -> Entry {
        Entry {
            start: self.start,
            end: self.end,
            pool: Arc::clone(&self.pool),
        }
    }
}

/// Sorted by `start`; ranges never overlap (they are live mappings).
type Table = Vec<Entry>;

static REGISTRY: ArcSwapOption<Table> = ArcSwapOption::const_empty();

thread_local! {
    /// This thread's last pool found (module docs).
    static LAST: RefCell<Option<Entry>> = const { RefCell::new(None) };
}

/// Add a pool's range.
pub(crate) fn register(start: usize, end: usize, pool: Arc<Shared>) {
    REGISTRY.rcu(|cur| {
        let mut t: Table = cur
            .as_deref()
            .map_or_else(Vec::new, |t| t.iter().map(Entry::copy).collect());
        let at = t.partition_point(|e| e.start < start);
        t.insert(
            at,
            Entry {
                start,
                end,
                pool: Arc::clone(&pool),
            },
        );
        Some(Arc::new(t))
    });
}

/// Remove the range starting at `start` (before it is unmapped, so no
/// later lookup can reach it and a new mapping at the same address can be
/// registered).
pub(crate) fn unregister(start: usize) {
    REGISTRY.rcu(|cur| {
        let t: Table = cur.as_deref().map_or_else(Vec::new, |t| {
            t.iter()
                .filter(|e| e.start != start)
                .map(Entry::copy)
                .collect()
        });
        if t.is_empty() {
            None
        } else {
            Some(Arc::new(t))
        }
    });
}

/// Run `f` on the live pool mapping `addr` (and the start of its range)
/// while holding a reference on that pool (`tryget_live`): its memory
/// stays mapped and its metadata alive until `f` returns.
///
/// # Errors
///
/// [`PoolError::NotMapped`] if no registered pool maps `addr`,
/// [`PoolError::ShuttingDown`] if the one that does is shutting down.
#[inline]
pub(crate) fn with_live_pool<R>(
    addr: usize,
    f: impl FnOnce(&Shared, usize) -> R,
) -> Result<R, PoolError> {
    let last = LAST
        .try_with(|l| {
            l.borrow()
                .as_ref()
                .filter(|e| e.start <= addr && addr < e.end)
                .map(|e| (Arc::as_ptr(&e.pool), e.start))
        })
        .ok()
        .flatten();
    if let Some((p, start)) = last {
        // SAFETY: the thread's entry holds an `Arc` of it, and only this
        // thread replaces the entry — not before the pin below is taken.
        let shared = unsafe { &*p };
        // Before the pin: a fork child must not touch the parent's count.
        shared.check_fork()?;
        if let Some(pin) = shared.pgmap.tryget_live() {
            // Live, so its range is mapped and it is the pool at `addr`.
            // The pin keeps `shared` alive even if `f` replaces the entry:
            // the pool's shards, which own it, are given up only by its
            // release, which waits for the pin.
            let r = f(shared, start);
            drop(pin);
            return Ok(r);
        }
    }
    from_registry(addr, f)
}

#[cold]
fn from_registry<R>(addr: usize, f: impl FnOnce(&Shared, usize) -> R) -> Result<R, PoolError> {
    let guard = REGISTRY.load();
    let found = guard.as_deref().and_then(|t| {
        let at = t.partition_point(|e| e.start <= addr);
        t.get(at.checked_sub(1)?).filter(|e| addr < e.end)
    });
    let Some(e) = found else {
        forget(addr);
        return Err(PoolError::NotMapped { addr });
    };
    // The registry snapshot keeps `e.pool` alive for this function. A
    // fork child must not touch the parent's count: check before the pin.
    e.pool.check_fork()?;
    let Some(pin) = e.pool.pgmap.tryget_live() else {
        forget(addr);
        return Err(e.pool.shutting_down());
    };
    let old = LAST.try_with(|l| l.borrow_mut().replace(e.copy())).ok();
    // The old entry's `Arc` is dropped here, outside the borrow (its
    // drop may free that pool's metadata).
    drop(old);
    let r = f(&e.pool, e.start);
    drop(pin);
    Ok(r)
}

/// Drop this thread's entry if it covers `addr`: that pool is dead.
fn forget(addr: usize) {
    let old = LAST
        .try_with(|l| {
            let mut l = l.borrow_mut();
            if l.as_ref().is_some_and(|e| e.start <= addr && addr < e.end) {
                l.take()
            } else {
                None
            }
        })
        .ok()
        .flatten();
    // Outside the borrow, as in `from_registry`.
    drop(old);
}

#[cfg(test)]
mod tests {
    use crate::dax::DevicePagePool;
    use std::sync::{mpsc, Arc};

    /// A thread's last-pool entry may hold the last `Arc` of a pool whose
    /// shutdown completed: the metadata is freed when the thread finds
    /// another pool or exits (in its thread-local destructors).
    #[test]
    fn a_thread_entry_frees_a_dead_pool_at_thread_exit() {
        let pool = DevicePagePool::anonymous(4 * 4096).unwrap();
        let meta = Arc::downgrade(&pool.shared);
        let page = pool.alloc().unwrap();
        let addr = page.as_ptr() as usize;
        let (found, exit) = (mpsc::channel::<()>(), mpsc::channel::<()>());
        let t = std::thread::spawn(move || {
            drop(DevicePagePool::lookup(addr as *const u8).unwrap());
            found.0.send(()).unwrap();
            exit.1.recv().unwrap();
        });
        found.1.recv().unwrap();
        let sd = pool.shutdown();
        drop((page, pool));
        assert!(sd.is_complete());
        drop(sd);
        assert!(meta.upgrade().is_some(), "the thread's entry holds it");
        exit.0.send(()).unwrap();
        t.join().unwrap();
        assert!(
            crate::dax::shared::freed_soon(&meta),
            "freed when the thread exited"
        );
    }
}
