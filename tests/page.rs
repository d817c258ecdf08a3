//! Tests of the page refcount layer: `PageRef`, its hooks, and misuse
//! detection. (The loom models are in `loom_page.rs`.)
#![cfg(not(percpu_ref_model))]

use percpu_ref::{
    ArcPercpuRefHook, Completion, FirstRefError, MixedHook, NoHook, NoRelease, PageRef,
    PageRefHook, PercpuRef, PercpuRefHook,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::thread;

const ITERS: usize = if cfg!(miri) { 200 } else { 50_000 };

/// Counts every hook call; refuses while `refuse` is set.
#[derive(Debug, Default)]
struct Counting {
    firsts: AtomicUsize,
    undos: AtomicUsize,
    lasts: AtomicUsize,
    refuse: AtomicBool,
    /// Set by `on_last_unref`, cleared by `on_first_ref`: whether the page
    /// is free as far as the hook knows.
    freed: AtomicBool,
}

impl PageRefHook for Counting {
    fn on_first_ref(&self) -> bool {
        if self.refuse.load(SeqCst) {
            return false;
        }
        self.firsts.fetch_add(1, SeqCst);
        true
    }
    fn on_last_unref(&self) {
        self.lasts.fetch_add(1, SeqCst);
        self.freed.store(true, SeqCst);
    }
    fn undo_first_ref(&self) {
        self.undos.fetch_add(1, SeqCst);
    }
}

impl Counting {
    fn firsts(&self) -> usize {
        self.firsts.load(SeqCst)
    }
    fn undos(&self) -> usize {
        self.undos.load(SeqCst)
    }
    fn lasts(&self) -> usize {
        self.lasts.load(SeqCst)
    }
}

fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    if let Some(s) = err.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = err.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        String::from("<non-string panic>")
    }
}

// ------------------------------------------------------------ basic semantics

#[test]
fn hook_only_on_terminal_transitions() {
    let page = PageRef::new(Counting::default());
    assert_eq!(page.count(), 0);
    page.first_ref().unwrap();
    assert_eq!((page.hook().firsts(), page.hook().lasts()), (1, 0));
    for _ in 0..10 {
        page.inc();
        assert!(page.get_unless_zero());
    }
    assert_eq!(page.count(), 21);
    for _ in 0..20 {
        assert!(!page.dec_and_test());
    }
    assert_eq!((page.hook().firsts(), page.hook().lasts()), (1, 0));
    assert!(page.dec_and_test());
    assert_eq!((page.hook().firsts(), page.hook().lasts()), (1, 1));
    assert_eq!(page.count(), 0);
    assert_eq!(page.hook().undos(), 0);
}

#[test]
fn refusal_leaves_count_zero() {
    let page = PageRef::new(Counting::default());
    page.hook().refuse.store(true, SeqCst);
    assert_eq!(page.first_ref(), Err(FirstRefError::Refused));
    assert_eq!(page.count(), 0);
    assert!(
        !page.get_unless_zero(),
        "a refused page must not be gettable"
    );
    assert_eq!(page.count(), 0);
    assert_eq!(
        (
            page.hook().firsts(),
            page.hook().undos(),
            page.hook().lasts()
        ),
        (0, 0, 0)
    );
    page.hook().refuse.store(false, SeqCst);
    assert_eq!(page.first_ref(), Ok(()));
    assert_eq!(page.count(), 1);
}

#[test]
fn first_ref_on_a_page_in_use_undoes_the_hook() {
    let page = PageRef::new(Counting::default());
    page.first_ref().unwrap();
    page.inc();
    assert_eq!(page.first_ref(), Err(FirstRefError::InUse { count: 2 }));
    assert_eq!(page.count(), 2);
    assert_eq!(
        (
            page.hook().firsts(),
            page.hook().undos(),
            page.hook().lasts()
        ),
        (2, 1, 0)
    );
    let msg = FirstRefError::InUse { count: 2 }.to_string();
    assert!(msg.contains("2 references"), "{msg}");
}

#[test]
fn get_unless_zero_never_resurrects_a_freed_page() {
    let page = PageRef::new(Counting::default());
    assert!(!page.get_unless_zero(), "a never-allocated page");
    page.first_ref().unwrap();
    assert!(page.dec_and_test());
    for _ in 0..3 {
        assert!(!page.get_unless_zero());
    }
    assert_eq!(page.count(), 0);
    assert_eq!(page.hook().lasts(), 1);
}

#[test]
fn freeze_fails_while_someone_else_holds_a_ref() {
    let page = PageRef::new(NoHook);
    page.first_ref().unwrap(); // ours
    let got = Barrier::new(2);
    let release = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            assert!(page.get_unless_zero()); // theirs
            got.wait();
            release.wait();
            assert!(!page.dec_and_test());
        });
        got.wait();
        assert!(!page.freeze(1), "another holder: must not freeze");
        assert!(!page.is_frozen());
        assert_eq!(page.count(), 2);
        release.wait();
    });
    assert!(page.freeze(1), "only our reference is left");
    assert!(page.is_frozen());
    assert_eq!(page.count(), 1);
    page.unfreeze(1);
    assert!(!page.is_frozen());
    assert!(page.dec_and_test());
}

#[test]
fn frozen_page_blocks_get_unless_zero_and_first_ref() {
    let page = PageRef::new(Counting::default());
    page.first_ref().unwrap();
    page.inc();
    assert!(!page.freeze(1));
    assert!(page.freeze(2));
    assert!(!page.freeze(2), "already frozen");
    thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..100 {
                assert!(!page.get_unless_zero(), "frozen: no speculative get");
            }
            assert_eq!(page.first_ref(), Err(FirstRefError::InUse { count: 2 }));
        });
    });
    assert_eq!(page.count(), 2);
    page.unfreeze(3);
    assert!(page.get_unless_zero());
    assert_eq!(page.count(), 4);
    for _ in 0..3 {
        assert!(!page.dec_and_test());
    }
    assert!(page.dec_and_test());
    let h = page.hook();
    assert_eq!((h.firsts(), h.undos(), h.lasts()), (2, 1, 1));
}

#[test]
fn unfreeze_to_zero_is_the_final_put() {
    let page = PageRef::new(Counting::default());
    page.first_ref().unwrap();
    assert!(page.freeze(1));
    page.unfreeze(0);
    assert_eq!(page.count(), 0);
    assert_eq!(
        page.hook().lasts(),
        1,
        "the freezer dropped the last reference"
    );
    assert!(!page.get_unless_zero());
    // A free page can be frozen to keep it from being allocated.
    assert!(page.freeze(0));
    assert_eq!(page.first_ref(), Err(FirstRefError::InUse { count: 0 }));
    let msg = panic_message(|| page.unfreeze(1));
    assert!(msg.contains("frozen while free"), "{msg}");
    assert!(page.is_frozen(), "a refused unfreeze changes nothing");
    page.unfreeze(0);
    assert_eq!(page.hook().lasts(), 1, "no reference was dropped");
    page.first_ref().unwrap();
    let h = page.hook();
    assert_eq!((h.firsts() - h.undos(), h.lasts()), (2, 1));
}

#[test]
fn unfreeze_of_an_unfrozen_page_panics_and_changes_nothing() {
    let page = PageRef::new(NoHook);
    page.first_ref().unwrap();
    let msg = panic_message(|| page.unfreeze(5));
    assert!(msg.contains("not frozen"), "{msg}");
    assert_eq!(page.count(), 1);
}

// ---------------------------------------------------------- misuse detection

#[test]
fn underflow_panics_and_restores_the_count() {
    let page = PageRef::new(Counting::default());
    page.first_ref().unwrap();
    assert!(page.dec_and_test());
    let msg = panic_message(|| {
        page.dec_and_test();
    });
    assert!(msg.contains("underflow"), "{msg}");
    assert!(msg.contains("use-after-free"), "{msg}");
    assert_eq!(page.count(), 0, "the count must not stay wrapped");
    assert!(!page.is_frozen());
    assert!(!page.get_unless_zero());
    assert_eq!(page.hook().lasts(), 1, "no second on_last_unref");
}

#[test]
fn inc_on_a_free_page_panics() {
    let page = PageRef::new(Counting::default());
    let msg = panic_message(|| page.inc());
    assert!(msg.contains("free page"), "{msg}");
    assert_eq!(page.count(), 0);
    assert_eq!(page.hook().firsts(), 0);
}

#[test]
fn inc_and_dec_on_a_frozen_page_panic() {
    let page = PageRef::new(NoHook);
    page.first_ref().unwrap();
    assert!(page.freeze(1));
    let msg = panic_message(|| page.inc());
    assert!(msg.contains("frozen"), "{msg}");
    let msg = panic_message(|| {
        page.dec_and_test();
    });
    assert!(msg.contains("frozen"), "{msg}");
    assert!(page.is_frozen());
    assert_eq!(page.count(), 1);
    page.unfreeze(1);
    assert!(page.dec_and_test());
}

#[test]
fn overflow_is_detected_not_wrapped() {
    let max = PageRef::<NoHook>::MAX_COUNT;
    let page = PageRef::new(NoHook);
    page.first_ref().unwrap();
    assert!(page.freeze(1));
    page.unfreeze(max); // pretend `max` references exist
    assert_eq!(page.count(), max);

    let msg = panic_message(|| page.inc());
    assert!(msg.contains("overflow"), "{msg}");
    assert_eq!(page.count(), max);

    if cfg!(debug_assertions) {
        let msg = panic_message(|| {
            page.get_unless_zero();
        });
        assert!(msg.contains("limit"), "{msg}");
    } else {
        assert!(!page.get_unless_zero(), "refuses at the limit");
    }
    assert_eq!(page.count(), max);

    // One below the limit both work.
    assert!(!page.dec_and_test());
    assert!(page.get_unless_zero());
    assert!(!page.dec_and_test());
    page.inc();
    assert_eq!(page.count(), max);

    let msg = panic_message(|| page.unfreeze(max + 1));
    assert!(msg.contains("MAX_COUNT"), "{msg}");
    let msg = panic_message(|| {
        page.freeze(max + 1);
    });
    assert!(msg.contains("MAX_COUNT"), "{msg}");
}

// ------------------------------------------------------------ concurrency

/// Two threads allocate, look up, get and put one page over and over; the
/// hook must be called exactly on the 0→1 and 1→0 transitions.
#[test]
fn hook_counted_exactly_under_concurrent_get_put() {
    let page = PageRef::new(Counting::default());
    let allocs = AtomicUsize::new(0);
    let frees = AtomicUsize::new(0);
    let in_use = AtomicUsize::new(0);
    let lookups = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let (mut a, mut f, mut u, mut l) = (0, 0, 0, 0);
                for i in 0..ITERS {
                    // Take a reference: a lookup, or allocate a free page.
                    loop {
                        if page.get_unless_zero() {
                            l += 1;
                            break;
                        }
                        match page.first_ref() {
                            Ok(()) => {
                                a += 1;
                                break;
                            }
                            Err(FirstRefError::InUse { .. }) => u += 1,
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                    if i % 2 == 0 {
                        page.inc();
                        assert!(!page.dec_and_test(), "we still hold one");
                    }
                    if page.dec_and_test() {
                        f += 1;
                    }
                }
                allocs.fetch_add(a, SeqCst);
                frees.fetch_add(f, SeqCst);
                in_use.fetch_add(u, SeqCst);
                lookups.fetch_add(l, SeqCst);
            });
        }
    });
    let h = page.hook();
    let (allocs, frees) = (allocs.load(SeqCst), frees.load(SeqCst));
    assert_eq!(page.count(), 0);
    assert!(allocs > 0);
    assert_eq!(allocs + lookups.load(SeqCst), 2 * ITERS);
    assert_eq!(allocs, frees, "every allocation freed exactly once");
    assert_eq!(h.undos(), in_use.load(SeqCst), "undone exactly on InUse");
    assert_eq!(h.firsts() - h.undos(), allocs, "on_first_ref once per 0→1");
    assert_eq!(h.lasts(), frees, "on_last_unref once per 1→0");
}

/// A speculative get racing the final put: either it wins (and its own put
/// becomes the final one) or it fails — it never sees a freed page.
#[test]
fn get_unless_zero_vs_final_put_never_resurrects() {
    for _ in 0..ITERS / 50 {
        let page = PageRef::new(Counting::default());
        page.first_ref().unwrap();
        let start = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                start.wait();
                page.dec_and_test();
            });
            s.spawn(|| {
                start.wait();
                if page.get_unless_zero() {
                    assert!(!page.hook().freed.load(SeqCst), "resurrected a freed page");
                    page.dec_and_test();
                }
            });
        });
        assert_eq!(page.count(), 0);
        assert_eq!(page.hook().lasts(), 1);
        assert!(!page.get_unless_zero());
    }
}

/// Freeze races speculative gets: while frozen no get succeeds, and a
/// successful freeze means nobody else held a reference.
#[test]
fn freeze_vs_get_unless_zero() {
    let page = PageRef::new(NoHook);
    page.first_ref().unwrap(); // the freezer's reference
    let stop = AtomicBool::new(false);
    let exclusive = AtomicBool::new(false);
    let freezes = AtomicUsize::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(SeqCst) {
                if page.get_unless_zero() {
                    assert!(!exclusive.load(SeqCst), "got a frozen page");
                    assert!(!page.dec_and_test());
                }
            }
        });
        // ITERS attempts, and on until at least one freeze won (bounded:
        // on a loaded machine the getter may hold the page for a while).
        let mut attempts = 0;
        while attempts < ITERS || (freezes.load(SeqCst) == 0 && attempts < 1000 * ITERS) {
            attempts += 1;
            if attempts % 64 == 0 {
                thread::yield_now();
            }
            if page.freeze(1) {
                exclusive.store(true, SeqCst);
                freezes.fetch_add(1, SeqCst);
                assert_eq!(page.count(), 1);
                exclusive.store(false, SeqCst);
                page.unfreeze(1);
            }
        }
        stop.store(true, SeqCst);
    });
    assert!(freezes.load(SeqCst) > 0);
    assert_eq!(page.count(), 1);
    assert!(page.dec_and_test());
}

// ------------------------------------------------------ PercpuRef hooks

#[test]
fn percpu_hook_holds_one_device_ref_per_allocated_page() {
    let drained = Completion::new();
    let device = PercpuRef::new(7u32, drained.clone());
    // SAFETY: only these PageRefs call the hooks, references balanced below.
    let pages: Vec<_> = (0..8)
        .map(|_| PageRef::new(unsafe { PercpuRefHook::new(&device) }))
        .collect();
    for p in &pages[..4] {
        p.first_ref().unwrap();
        p.inc();
        assert!(p.get_unless_zero());
    }
    assert_eq!(*pages[0].hook().percpu_ref().value(), 7);
    device.kill().unwrap();
    // Killed: no new allocations, but pages in use keep the device alive.
    for p in &pages[4..] {
        assert_eq!(p.first_ref(), Err(FirstRefError::Refused));
        assert_eq!(p.count(), 0);
    }
    assert!(!device.is_zero());
    // Middle puts do not touch the device.
    for p in &pages[..4] {
        assert!(!p.dec_and_test());
        assert!(!p.dec_and_test());
    }
    assert!(!drained.is_complete());
    for (i, p) in pages[..4].iter().enumerate() {
        assert!(!drained.is_complete(), "released with {} pages left", 4 - i);
        assert!(p.dec_and_test());
    }
    assert!(drained.is_complete(), "the last page put drains the device");
    assert!(device.is_zero());
    device.check().unwrap();
}

#[test]
fn percpu_hook_undoes_on_in_use() {
    let device = PercpuRef::new((), NoRelease);
    // SAFETY: only the PageRef calls the hook.
    let page = PageRef::new(unsafe { PercpuRefHook::new(&device) });
    page.first_ref().unwrap();
    assert_eq!(page.first_ref(), Err(FirstRefError::InUse { count: 1 }));
    assert!(page.dec_and_test());
    device.check().unwrap();
    // Exactly the owner's reference is left: kill drains to zero at once.
    device.kill().unwrap();
    assert!(device.is_zero());
}

#[test]
fn percpu_hook_concurrent_pages_drain_once() {
    let released = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&released);
    let device = Arc::new(PercpuRef::new((), move |_: &()| {
        r2.fetch_add(1, SeqCst);
    }));
    // SAFETY: only the PageRefs call the hooks; each thread balances its refs.
    let pages: Arc<Vec<_>> = Arc::new(
        (0..4)
            .map(|_| PageRef::new(unsafe { ArcPercpuRefHook::new(Arc::clone(&device)) }))
            .collect(),
    );
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let pages = Arc::clone(&pages);
            thread::spawn(move || {
                for i in 0..ITERS / 10 {
                    let p = &pages[(i + t) % pages.len()];
                    let ok = p.get_unless_zero() || p.first_ref().is_ok();
                    if ok {
                        p.inc();
                        p.dec_and_test();
                        p.dec_and_test();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(pages.iter().all(|p| p.count() == 0));
    assert_eq!(released.load(SeqCst), 0);
    device.kill().unwrap();
    assert_eq!(released.load(SeqCst), 1, "nothing was leaked or double-put");
    device.check().unwrap();
}

#[test]
fn mixed_population() {
    let device = PercpuRef::new("pmem0", NoRelease);
    // SAFETY: only the PageRefs call the hooks.
    let dev = unsafe { PercpuRefHook::new(&device) };
    let pages: Vec<PageRef<MixedHook<_>>> = (0..6)
        .map(|i| {
            PageRef::new(if i % 2 == 0 {
                MixedHook::device(dev)
            } else {
                MixedHook::ordinary()
            })
        })
        .collect();
    assert_eq!(
        std::mem::size_of::<MixedHook<PercpuRefHook<'_, &str>>>(),
        std::mem::size_of::<usize>(),
        "the flag lives in the pointer's niche"
    );
    assert!(pages[0].hook().is_device() && !pages[1].hook().is_device());
    for p in &pages {
        p.first_ref().unwrap();
    }
    // A device page in use on the second page after the kill.
    device.kill().unwrap();
    for p in &pages {
        assert!(p.dec_and_test());
    }
    assert!(device.is_zero(), "all device pages freed: drained");
    for (i, p) in pages.iter().enumerate() {
        let r = p.first_ref();
        if i % 2 == 0 {
            assert_eq!(r, Err(FirstRefError::Refused));
        } else {
            assert_eq!(r, Ok(()));
        }
    }
}

#[test]
fn mixed_ordinary_never_calls_the_inner_hook() {
    let counting = Counting::default();
    let dev = PageRef::new(MixedHook::device(&counting));
    let ord = PageRef::new(MixedHook::<&Counting>::ordinary());
    for p in [&dev, &ord] {
        p.first_ref().unwrap();
        p.inc();
        assert!(!p.dec_and_test());
        assert!(p.dec_and_test());
    }
    assert_eq!((counting.firsts(), counting.lasts()), (1, 1));
}

#[test]
fn no_hook_is_free() {
    assert_eq!(std::mem::size_of::<NoHook>(), 0);
    assert_eq!(std::mem::size_of::<PageRef<NoHook>>(), 4);
    assert_eq!(std::mem::size_of::<PageRef>(), 4);
    let p: PageRef = PageRef::default();
    assert_eq!(
        format!("{p:?}"),
        "PageRef { count: 0, frozen: false, hook: NoHook }"
    );
    static STATIC_PAGE: PageRef = PageRef::new(NoHook); // `new` is const
    STATIC_PAGE.first_ref().unwrap();
    assert!(STATIC_PAGE.dec_and_test());
}
