//! Shutting down many pools at once (`DevicePagePool::shutdown_all`, pools
//! in a `KillBatch`), and awaiting a `ShutdownHandle`. Each pool keeps the
//! exact semantics of its own `shutdown()`: refused once the batch
//! returns, held pages valid, persisted and unmapped when its own last
//! page drops. Every wait runs under a time limit.

#![cfg(all(feature = "dax", not(percpu_ref_loom)))]

use percpu_ref::{
    DevicePage, DevicePagePool, KillBatch, KillError, NoRelease, PercpuRef, PoolError, PoolOptions,
    ShutdownHandle,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

const PAGE: usize = 4096;
const LIMIT: Duration = Duration::from_secs(30);

fn pools(n: usize, pages: usize) -> Vec<DevicePagePool> {
    (0..n)
        .map(|i| {
            // Every other pool allows optimistic reads, so `read` is
            // checked to be refused too.
            let opts = if i % 2 == 0 {
                PoolOptions::new()
            } else {
                PoolOptions::new().optimistic_reads()
            };
            DevicePagePool::anonymous_with(pages * PAGE, &opts).unwrap()
        })
        .collect()
}

fn is_shutting_down<T: std::fmt::Debug>(r: Result<T, PoolError>) -> bool {
    matches!(r, Err(PoolError::ShuttingDown { .. }))
}

/// Every way in is refused: alloc, lookup and read of `page`'s address
/// (which find no pool at all once its shutdown completed).
fn assert_refused(pool: &DevicePagePool, page: *const u8, complete: bool) {
    // Once complete, the pool is unregistered and unmapped.
    let refused = |r: Result<(), PoolError>| match r {
        Err(PoolError::ShuttingDown { .. }) => true,
        r => complete && common::no_pool_at(page, r),
    };
    assert!(is_shutting_down(pool.alloc()), "alloc");
    assert!(refused(DevicePagePool::lookup(page).map(drop)), "lookup");
    assert!(
        refused(DevicePagePool::read(page, |v| v.len()).map(drop)),
        "read"
    );
    assert!(pool.is_shutting_down());
}

#[test]
fn shutdown_all_refuses_every_pool_and_each_drains_on_its_own() {
    let pools = pools(4, 8);
    // Pages held in pools 1 and 3 (two in 3), none in 0 and 2.
    let mut one = pools[1].alloc().unwrap();
    one.writer().unwrap().write(0, b"pool 1").unwrap();
    let three = [pools[3].alloc().unwrap(), pools[3].alloc().unwrap()];
    let addrs: Vec<*const u8> = pools.iter().map(DevicePagePool::as_ptr).collect();

    let handles = DevicePagePool::shutdown_all(&pools);
    assert_eq!(handles.len(), 4);
    for (i, (pool, &addr)) in pools.iter().zip(&addrs).enumerate() {
        assert_refused(pool, addr, handles[i].is_complete());
    }
    // Held pages stay valid.
    assert_eq!(&one.as_slice()[..6], b"pool 1");
    // Pools with nothing held were released inside the call.
    for i in [0, 2] {
        assert!(handles[i].is_complete());
        assert_eq!(handles[i].wait_timeout(Duration::ZERO).unwrap().pages, 8);
        assert!(common::no_pool_at(
            addrs[i],
            DevicePagePool::lookup(addrs[i])
        ));
    }
    // The others wait for their own pages, and report them.
    let held = handles[3]
        .wait_timeout(Duration::from_millis(1))
        .unwrap_err();
    let mut want: Vec<usize> = three.iter().map(DevicePage::index).collect();
    want.sort_unstable();
    assert_eq!((held.count, &held.indices), (2, &want));
    assert_eq!(held.path, pools[3].path());
    drop(one);
    let r1 = handles[1].wait_timeout(LIMIT).expect("pool 1 drained");
    assert_eq!((r1.pages, r1.bytes), (8, 8 * PAGE));
    assert!(!handles[3].is_complete(), "pool 3 still has two pages");
    drop(three);
    assert!(handles[3].wait_timeout(LIMIT).is_ok());
    for (pool, addr) in pools.iter().zip(addrs) {
        let st = pool.stats();
        assert_eq!((st.allocated, st.free), (0, 8), "no page lost");
        assert!(common::no_pool_at(addr, DevicePagePool::lookup(addr)));
    }
}

#[test]
fn shutdown_all_of_started_and_repeated_pools_gives_the_same_shutdowns() {
    let pools = pools(2, 4);
    let held = pools[0].alloc().unwrap();
    let first = pools[0].shutdown();
    let handles = DevicePagePool::shutdown_all([&pools[0], &pools[1], &pools[1]]);
    assert_eq!(handles.len(), 3);
    assert!(!handles[0].is_complete() && !first.is_complete());
    assert!(handles[1].is_complete() && handles[2].is_complete());
    drop(held);
    assert!(first.is_complete() && handles[0].is_complete());
    // Nothing to shut down: nothing happens.
    assert!(DevicePagePool::shutdown_all([]).is_empty());
}

/// Pools and refs in one `KillBatch`: one confirm point for all, before
/// which nothing of the batch is released; errors per member.
#[test]
fn a_batch_mixes_pools_and_refs_with_errors_per_member() {
    let pools = pools(3, 4);
    let early = pools[0].shutdown(); // already shutting down
    let held = pools[1].alloc().unwrap();
    let addr = held.as_ptr();
    let released = Arc::new(AtomicBool::new(false));
    let r = {
        let released = Arc::clone(&released);
        PercpuRef::new(0u8, move |_: &u8| released.store(true, SeqCst))
    };
    let mut batch = KillBatch::new();
    batch
        .push(&pools[0])
        .push(&pools[1])
        .push(&r)
        .push(&pools[2])
        .push(&pools[1]);
    let mut confirmed = false;
    let results = batch.kill_and_confirm(|| {
        // Every member is dead everywhere, and none was released yet.
        for p in &pools {
            assert!(is_shutting_down(p.alloc()));
        }
        assert!(is_shutting_down(DevicePagePool::lookup(addr)));
        assert!(r.tryget_live().is_none());
        assert!(
            !released.load(SeqCst),
            "the ref was released before confirm"
        );
        // Still mapped: `persist` takes a (non-live) reference, which
        // succeeds until the release.
        assert!(
            pools[2].persist().is_ok(),
            "pool 2 was released before confirm"
        );
        confirmed = true;
    });
    assert!(confirmed);
    assert_eq!(
        results,
        [
            Err(KillError::AlreadyDead),
            Ok(()),
            Ok(()),
            Ok(()),
            Err(KillError::AlreadyDead)
        ]
    );
    assert!(released.load(SeqCst), "the ref's release ran after confirm");
    assert!(early.is_complete());
    // The handles of the batch's shutdowns: `shutdown()` waits for nothing.
    let handles: Vec<ShutdownHandle> = pools.iter().map(DevicePagePool::shutdown).collect();
    assert!(handles[2].is_complete());
    assert!(!handles[1].is_complete());
    assert_eq!(handles[1].held(), [held.index()]);
    drop(held);
    assert!(handles[1].wait_timeout(LIMIT).is_ok());
}

/// Threads allocate, clone, look up and drop pages in every pool while
/// the main thread shuts them all down: an operation that starts after
/// `shutdown_all` returned is refused, no page is lost, and every pool
/// drains once the threads let go.
#[test]
fn shutdown_all_under_concurrent_alloc_and_lookup() {
    let rounds = if cfg!(miri) { 2 } else { 20 };
    for round in 0..rounds {
        let pools = Arc::new(pools(6, 16));
        let returned = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (pools, returned, started) = (
                    Arc::clone(&pools),
                    Arc::clone(&returned),
                    Arc::clone(&started),
                );
                thread::spawn(move || {
                    let mut held: Vec<DevicePage> = Vec::new();
                    let mut i = w;
                    let mut refused = 0;
                    started.fetch_add(1, SeqCst);
                    while refused < pools.len() {
                        i = (i + 1) % pools.len();
                        let after = returned.load(SeqCst);
                        match pools[i].alloc() {
                            Ok(p) => {
                                assert!(!after, "alloc after shutdown_all returned");
                                let q = DevicePagePool::lookup(p.as_ptr());
                                if let Ok(q) = q {
                                    assert!(!after);
                                    held.push(q);
                                }
                                held.push(p.clone());
                                held.push(p);
                            }
                            Err(PoolError::ShuttingDown { .. }) => refused += 1,
                            Err(PoolError::Exhausted { .. }) => {}
                            Err(e) => panic!("alloc: {e}"),
                        }
                        if held.len() > 12 {
                            held.drain(..6);
                        }
                    }
                    // Refused everywhere: drop the rest (this may unmap).
                    drop(held);
                })
            })
            .collect();
        while started.load(SeqCst) < 2 {
            thread::yield_now();
        }
        if round % 2 == 1 {
            thread::sleep(Duration::from_micros(200));
        }
        let handles = DevicePagePool::shutdown_all(pools.iter());
        returned.store(true, SeqCst);
        for p in pools.iter() {
            assert!(is_shutting_down(p.alloc()));
        }
        let deadline = Instant::now() + LIMIT;
        for w in workers {
            while !w.is_finished() {
                assert!(Instant::now() < deadline, "a worker was never refused");
                thread::sleep(Duration::from_millis(1));
            }
            w.join().unwrap();
        }
        for (h, p) in handles.iter().zip(pools.iter()) {
            let report = h.wait_timeout(LIMIT).expect("drained");
            assert_eq!(report.pages, 16);
            let st = p.stats();
            assert_eq!((st.allocated, st.free), (0, 16), "no page lost");
        }
    }
}

#[test]
fn awaiting_a_handle_resolves_when_the_last_page_drops() {
    let pool = DevicePagePool::anonymous(4 * PAGE).unwrap();
    let page = pool.alloc().unwrap();
    let handle = pool.shutdown();
    let dropped = Arc::new(AtomicBool::new(false));
    let t = {
        let dropped = Arc::clone(&dropped);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            dropped.store(true, SeqCst);
            drop(page);
        })
    };
    // By reference first: the handle stays usable.
    let report = common::block_on(async { (&handle).await }, LIMIT);
    assert!(
        dropped.load(SeqCst),
        "resolved before the last page dropped"
    );
    assert_eq!(report.pages, 4);
    assert!(handle.is_complete());
    // By value: a completed shutdown resolves at once, with its report.
    let again = common::block_on(async move { handle.await }, LIMIT);
    assert_eq!((again.pages, again.bytes), (4, 4 * PAGE));
    t.join().unwrap();
}

#[test]
fn a_batch_switch_leaves_the_pool_working() {
    let pools = pools(2, 4);
    let r = PercpuRef::new((), NoRelease);
    let mut batch = KillBatch::new();
    batch.push(&pools[0]).push(&r).push(&pools[1]);
    batch.switch_to_atomic();
    for p in &pools {
        let page = p.alloc().unwrap();
        let found = DevicePagePool::lookup(page.as_ptr()).unwrap();
        assert_eq!(found.index(), page.index());
        assert!(!p.is_shutting_down());
    }
    let handles = DevicePagePool::shutdown_all(&pools);
    assert!(handles.iter().all(ShutdownHandle::is_complete));
}
