//! The process-wide address → pool registry (the kernel's
//! `get_dev_pagemap`): an `arc-swap`ped sorted list of mapped ranges,
//! read without locks, replaced copy-on-write when a pool is registered or
//! released (rare).

use super::shared::Shared;
use arc_swap::ArcSwapOption;
use std::sync::Arc;

/// One registered pool: its mapped range.
pub(crate) struct Entry {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) pool: Arc<Shared>,
}

/// Sorted by `start`; ranges never overlap (they are live mappings).
type Table = Vec<Entry>;

static REGISTRY: ArcSwapOption<Table> = ArcSwapOption::const_empty();

/// Add a pool's range.
pub(crate) fn register(start: usize, end: usize, pool: Arc<Shared>) {
    REGISTRY.rcu(|cur| {
        let mut t: Table = cur.as_deref().map_or_else(Vec::new, |t| {
            t.iter()
                .map(|e| Entry {
                    start: e.start,
                    end: e.end,
                    pool: Arc::clone(&e.pool),
                })
                .collect()
        });
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
                .map(|e| Entry {
                    start: e.start,
                    end: e.end,
                    pool: Arc::clone(&e.pool),
                })
                .collect()
        });
        if t.is_empty() {
            None
        } else {
            Some(Arc::new(t))
        }
    });
}

/// Run `f` on the pool mapping `addr` (and the range start), if any,
/// while the registry snapshot keeps that pool alive.
#[inline]
pub(crate) fn with_pool<R>(addr: usize, f: impl FnOnce(&Arc<Shared>, usize) -> R) -> Option<R> {
    let guard = REGISTRY.load();
    let t = guard.as_deref()?;
    let at = t.partition_point(|e| e.start <= addr);
    let e = t.get(at.checked_sub(1)?)?;
    (addr < e.end).then(|| f(&e.pool, e.start))
}
