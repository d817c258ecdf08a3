//! Holders of a pool's pages (feature `track`): every `DevicePage` — from
//! `alloc`, `lookup` or a clone — is recorded with its page, thread and
//! label, and a shutdown that times out names them. Without the feature
//! the report says tracking is off and still names the pages.

#![cfg(all(feature = "dax", not(percpu_ref_loom)))]

use percpu_ref::{DevicePagePool, StillHeld};
use std::time::Duration;

const PAGE: usize = 4096;

fn timed_out(pool: &DevicePagePool) -> StillHeld {
    pool.shutdown()
        .wait_timeout(Duration::from_millis(5))
        .expect_err("pages are still held")
}

#[cfg(feature = "track")]
mod tracked {
    use super::*;
    use percpu_ref::{holder_label, DevicePage, Holder, HolderKind, Holders, PoolError};
    use std::collections::BTreeMap;
    use std::sync::{Arc, Barrier};
    use std::thread;

    /// Holders per (page, thread name, label), summed.
    fn by_page(h: &Holders) -> BTreeMap<(usize, String, Option<&'static str>), usize> {
        let mut m = BTreeMap::new();
        for x in h {
            assert_eq!(x.kind(), HolderKind::Page);
            let key = (
                x.page().expect("a page holder names its page"),
                x.thread_name().unwrap_or("<unnamed>").to_owned(),
                x.label(),
            );
            *m.entry(key).or_default() += x.count();
        }
        m
    }

    #[test]
    fn a_leaked_page_is_reported_with_its_label_and_thread() {
        let pool = DevicePagePool::anonymous(8 * PAGE).unwrap();
        let other = pool.alloc().unwrap();
        let leaked = thread::scope(|s| {
            thread::Builder::new()
                .name("io-3".into())
                .spawn_scoped(s, || {
                    let page = pool.alloc_tagged("compaction").unwrap();
                    let index = page.index();
                    std::mem::forget(page); // the leak: never dropped
                    index
                })
                .unwrap()
                .join()
                .unwrap()
        });
        drop(other);
        let held = timed_out(&pool);
        assert_eq!((held.count, held.indices.as_slice()), (1, &[leaked][..]));
        assert!(held.holders.is_tracked());
        let holders: Vec<&Holder> = held.holders.iter().collect();
        assert_eq!(holders.len(), 1, "{held}");
        let h = holders[0];
        assert_eq!(h.page(), Some(leaked));
        assert_eq!(h.thread_name(), Some("io-3"));
        assert_eq!(h.label(), Some("compaction"));
        assert_eq!((h.kind(), h.count()), (HolderKind::Page, 1));
        let report = held.to_string();
        let want = format!(
            "shutdown of pool anonymous timed out: 1 page still held (indices [{leaked}]):\n  \
             page {leaked}: 1 by thread 'io-3' ({:?}, label compaction)",
            h.thread_id()
        );
        assert!(report.starts_with(&want), "{report}\nwanted:\n{want}");
    }

    #[test]
    fn lookups_clones_and_scopes_record_their_own_holders() {
        let pool = DevicePagePool::anonymous(8 * PAGE).unwrap();
        let a = pool.alloc_tagged("writer").unwrap();
        let b = pool.alloc().unwrap();
        let (ia, ib) = (a.index(), b.index());
        let me = thread::current().name().unwrap().to_owned();
        // A clone inherits the label of the page it was cloned from...
        let a2 = a.clone();
        // ...unless a scope says otherwise; lookups take the scope's label
        // or their own.
        let (a3, b2, b3) = {
            let _scope = holder_label("readahead");
            let a3 = a.clone();
            let b2 = DevicePagePool::lookup(b.as_ptr()).unwrap();
            let b3 = DevicePagePool::lookup_tagged(b.as_ptr(), "scrub").unwrap();
            (a3, b2, b3)
        };
        // Another thread's clone is that thread's.
        let a4 = thread::scope(|s| {
            thread::Builder::new()
                .name("io-1".into())
                .spawn_scoped(s, || a.clone())
                .unwrap()
                .join()
                .unwrap()
        });
        let m = by_page(&pool.holders());
        let want = BTreeMap::from([
            ((ia, me.clone(), Some("writer")), 2),
            ((ia, me.clone(), Some("readahead")), 1),
            ((ia, "io-1".to_owned(), Some("writer")), 1),
            ((ib, me.clone(), None), 1),
            ((ib, me.clone(), Some("readahead")), 1),
            ((ib, me.clone(), Some("scrub")), 1),
        ]);
        assert_eq!(m, want);
        assert_eq!(pool.holders().count(), 7);
        // Dropping removes exactly its own record.
        drop((a3, b3));
        let m = by_page(&pool.holders());
        assert_eq!(m.get(&(ia, me.clone(), Some("readahead"))), None);
        assert_eq!(m.get(&(ib, me.clone(), Some("scrub"))), None);
        assert_eq!(pool.holders().count(), 5);
        drop((a, a2, a4, b, b2));
        assert!(pool.holders().is_empty());
        assert!(pool.shutdown().is_complete());
    }

    /// Threads allocate, look up, clone and drop pages at the same time;
    /// at each pause every thread's holders are exactly the pages it
    /// holds, and at the end none are left.
    #[test]
    fn reports_are_exact_under_concurrent_use() {
        const THREADS: usize = 4;
        let rounds = if cfg!(miri) { 2 } else { 30 };
        let pool = Arc::new(DevicePagePool::anonymous(256 * PAGE).unwrap());
        let pause = Arc::new(Barrier::new(THREADS + 1));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (pool, pause) = (Arc::clone(&pool), Arc::clone(&pause));
                thread::Builder::new()
                    .name(format!("worker-{t}"))
                    .spawn(move || {
                        let mut held: Vec<DevicePage> = Vec::new();
                        let mut x = t as u64 + 1;
                        for _ in 0..rounds {
                            for _ in 0..200 {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                match x % 5 {
                                    0 | 1 if held.len() < 40 => match pool.alloc() {
                                        Ok(p) => held.push(p),
                                        Err(PoolError::Exhausted { .. }) => {}
                                        Err(e) => panic!("{e}"),
                                    },
                                    2 if !held.is_empty() => {
                                        let p = &held[x as usize % held.len()];
                                        let q = DevicePagePool::lookup(p.as_ptr());
                                        held.push(q.unwrap());
                                    }
                                    3 if !held.is_empty() => {
                                        held.push(held[x as usize % held.len()].clone());
                                    }
                                    _ if !held.is_empty() => {
                                        let i = x as usize % held.len();
                                        held.swap_remove(i);
                                    }
                                    _ => {}
                                }
                            }
                            // What this thread holds, per page.
                            let mut mine = BTreeMap::<usize, usize>::new();
                            for p in &held {
                                *mine.entry(p.index()).or_default() += 1;
                            }
                            pause.wait(); // everybody stopped
                            let got: BTreeMap<usize, usize> = by_page(&pool.holders())
                                .into_iter()
                                .filter(|((_, name, _), _)| *name == format!("worker-{t}"))
                                .map(|((page, _, _), n)| (page, n))
                                .fold(BTreeMap::new(), |mut m, (page, n)| {
                                    *m.entry(page).or_default() += n;
                                    m
                                });
                            assert_eq!(got, mine, "worker-{t}'s holders");
                            pause.wait(); // everybody checked
                        }
                    })
                    .unwrap()
            })
            .collect();
        for _ in 0..rounds {
            pause.wait();
            pause.wait();
        }
        for w in workers {
            w.join().unwrap();
        }
        assert!(pool.holders().is_empty(), "{}", pool.holders());
        assert!(pool.shutdown().is_complete());
    }
}

#[cfg(not(feature = "track"))]
#[test]
fn without_tracking_the_report_names_the_pages_and_says_how_to_get_holders() {
    let pool = DevicePagePool::anonymous(8 * PAGE).unwrap();
    let a = pool.alloc_tagged("compaction").unwrap();
    let b = pool.alloc().unwrap();
    assert!(!pool.holders().is_tracked() && pool.holders().is_empty());
    let held = timed_out(&pool);
    assert!(!held.holders.is_tracked());
    assert_eq!(
        held.to_string(),
        format!(
            "shutdown of pool anonymous timed out: 2 pages still held (indices [{}, {}]); \
             build percpu-ref with the `track` feature to see who holds them",
            a.index(),
            b.index()
        )
    );
    drop((a, b));
}
