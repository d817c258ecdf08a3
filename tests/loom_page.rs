//! Exhaustive loom models of the page refcount layer: `get_unless_zero`
//! against the final put, against `freeze`, and all three at once; racing
//! allocations; and the `PercpuRef` hook against `kill`.
//!
//! Run: `RUSTFLAGS="--cfg percpu_ref_loom" LOOM_MAX_PREEMPTIONS=3 cargo test
//! --release --test loom_page`.
//!
//! Each page carries a loom `UnsafeCell` standing for the page's contents.
//! Holders read it, an allocator or a freezer writes it, and the hook's
//! `on_last_unref` scrubs it (as freeing a page would). loom reports any
//! access pair not ordered by happens-before, so these models check the
//! memory orderings of `PageRef` (Release/Acquire of the final put, Acquire
//! of `get_unless_zero` and `freeze`, Release of `unfreeze`, AcqRel of
//! `first_ref`), not just the counts.
//!
//! Bound: each model has at most three threads and each thread a handful of
//! atomic steps on one counter; every ordering violation above needs one
//! preemption between a thread's RMW and its access to the contents, so
//! `LOOM_MAX_PREEMPTIONS=3` explores all of them with room to spare.
#![cfg(percpu_ref_loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::thread;
use percpu_ref::{FirstRefError, PageRef, PageRefHook, PercpuRef, PercpuRefHook, ReleasePolicy};
use std::sync::Arc;

/// Counts hook calls; owns the page contents.
struct Page {
    firsts: AtomicUsize,
    undos: AtomicUsize,
    lasts: AtomicUsize,
    /// The page's contents: 0 = scrubbed (free), anything else = in use.
    data: UnsafeCell<u32>,
    /// Whether `on_last_unref` scrubs `data` (writes it).
    scrub: bool,
    /// Whether `on_first_ref` initialises `data` (writes 1).
    init: bool,
}

// SAFETY: every access to `data` goes through loom's `UnsafeCell`, which
// fails the model on any access pair not ordered by happens-before; that is
// exactly what these tests check.
unsafe impl Sync for Page {}

impl Page {
    fn new(scrub: bool) -> Self {
        Page {
            firsts: AtomicUsize::new(0),
            undos: AtomicUsize::new(0),
            lasts: AtomicUsize::new(0),
            data: UnsafeCell::new(0),
            scrub,
            init: false,
        }
    }
    /// Read the contents (a holder using the page).
    fn read(&self) -> u32 {
        // SAFETY: loom checks this read against every write for a race.
        self.data.with(|p| unsafe { *p })
    }
    /// Write the contents (an allocator or the exclusive owner).
    fn write(&self, v: u32) {
        // SAFETY: loom checks this write against every access for a race.
        self.data.with_mut(|p| unsafe { *p = v })
    }
    fn allocs(&self) -> usize {
        self.firsts.load(SeqCst) - self.undos.load(SeqCst)
    }
}

impl PageRefHook for Page {
    fn on_first_ref(&self) -> bool {
        if self.init {
            self.write(1);
        }
        self.firsts.fetch_add(1, SeqCst);
        true
    }
    fn on_last_unref(&self) {
        if self.scrub {
            self.write(0);
        }
        self.lasts.fetch_add(1, SeqCst);
    }
    fn undo_first_ref(&self) {
        self.undos.fetch_add(1, SeqCst);
    }
}

/// A page allocated by the model's main thread, with contents 1.
fn allocated(scrub: bool) -> Arc<PageRef<Page>> {
    let page = Arc::new(PageRef::new(Page::new(scrub)));
    page.first_ref().unwrap();
    page.hook().write(1);
    page
}

/// A speculative get racing the final put: it either gets in before (and
/// then its own put is the final one, after its read) or fails. It never
/// resurrects the page: its read never races with, or follows, the scrub.
#[test]
fn get_unless_zero_vs_final_put() {
    loom::model(|| {
        let page = allocated(true);
        let p1 = page.clone();
        let holder = thread::spawn(move || {
            assert_eq!(p1.hook().read(), 1);
            p1.dec_and_test()
        });
        let p2 = page.clone();
        let lookup = thread::spawn(move || {
            if p2.get_unless_zero() {
                assert_eq!(p2.hook().read(), 1, "got a scrubbed (freed) page");
                p2.dec_and_test()
            } else {
                false
            }
        });
        let finals = holder.join().unwrap() as usize + lookup.join().unwrap() as usize;
        assert_eq!(finals, 1, "exactly one final put");
        assert_eq!(page.hook().lasts.load(SeqCst), 1);
        assert_eq!(page.count(), 0);
        assert!(!page.get_unless_zero(), "a freed page stays free");
    });
}

/// Freeze racing a speculative get: while the freezer owns the page no get
/// succeeds, so its write never races with the lookup's read, and a get
/// after `unfreeze` sees the write.
#[test]
fn freeze_vs_get_unless_zero() {
    loom::model(|| {
        let page = allocated(true); // the freezer's reference
        let p1 = page.clone();
        let freezer = thread::spawn(move || {
            if p1.freeze(1) {
                assert_eq!(p1.count(), 1);
                p1.hook().write(2); // exclusive: e.g. migrate the contents
                p1.unfreeze(1);
                true
            } else {
                false
            }
        });
        let p2 = page.clone();
        let lookup = thread::spawn(move || {
            if p2.get_unless_zero() {
                let v = p2.hook().read();
                assert!(v == 1 || v == 2);
                assert!(!p2.dec_and_test(), "the freezer still holds one");
            }
        });
        let froze = freezer.join().unwrap();
        lookup.join().unwrap();
        assert!(!page.is_frozen());
        assert_eq!(page.count(), 1);
        if froze {
            assert_eq!(page.hook().read(), 2);
        }
        assert!(page.dec_and_test());
        assert_eq!(page.hook().lasts.load(SeqCst), 1);
    });
}

/// All three: the only holder either freezes the page and frees it with
/// `unfreeze(0)`, or (when a lookup got in first) puts it; the lookup
/// races both. Exactly one final put, hook called once, and no access to
/// the contents races with the freezer's write or the scrub.
#[test]
fn get_unless_zero_vs_freeze_vs_final_put() {
    loom::model(|| {
        let page = allocated(true);
        let p1 = page.clone();
        let owner = thread::spawn(move || {
            if p1.freeze(1) {
                p1.hook().write(2);
                p1.unfreeze(0); // the freezer drops the last reference
                true
            } else {
                p1.dec_and_test()
            }
        });
        let p2 = page.clone();
        let lookup = thread::spawn(move || {
            if p2.get_unless_zero() {
                assert_eq!(p2.hook().read(), 1, "got a frozen or freed page");
                p2.dec_and_test()
            } else {
                false
            }
        });
        let finals = owner.join().unwrap() as usize + lookup.join().unwrap() as usize;
        assert_eq!(finals, 1);
        assert_eq!(page.hook().lasts.load(SeqCst), 1);
        assert_eq!(page.hook().allocs(), 1);
        assert_eq!(page.count(), 0);
        assert!(!page.is_frozen());
        assert!(!page.get_unless_zero());
    });
}

/// What `on_first_ref` does before the count becomes 1 (e.g. a pool
/// recording the page's owner) is visible to a lookup that then gets the
/// page with `get_unless_zero`: `first_ref`'s CAS is Release.
#[test]
fn first_ref_hook_work_visible_to_lookup() {
    loom::model(|| {
        let mut hook = Page::new(false);
        hook.init = true;
        let page = Arc::new(PageRef::new(hook));
        let p1 = page.clone();
        let alloc = thread::spawn(move || {
            p1.first_ref().unwrap();
        });
        let p2 = page.clone();
        let lookup = thread::spawn(move || {
            if p2.get_unless_zero() {
                assert_eq!(p2.hook().read(), 1, "saw the page before the hook's work");
                assert!(!p2.dec_and_test());
            }
        });
        alloc.join().unwrap();
        lookup.join().unwrap();
        assert_eq!(page.count(), 1);
    });
}

/// A final put racing a reallocation of the page and a speculative get:
/// the new owner's `first_ref` (Acquire) orders its writes after the old
/// holder's use, and the hook is balanced: one 0→1 per 1→0.
#[test]
fn final_put_vs_first_ref_vs_get_unless_zero() {
    loom::model(|| {
        let page = allocated(false); // the hook does not scrub: see below
        let p1 = page.clone();
        let old = thread::spawn(move || {
            assert_eq!(p1.hook().read(), 1);
            p1.dec_and_test();
        });
        let p2 = page.clone();
        let new = thread::spawn(move || match p2.first_ref() {
            Ok(()) => {
                p2.hook().write(2); // initialise the reallocated page
                p2.dec_and_test();
            }
            Err(FirstRefError::InUse { .. }) => {}
            Err(e) => panic!("{e}"),
        });
        let p3 = page.clone();
        let lookup = thread::spawn(move || {
            // No read of the contents: a lookup that finds a page being
            // reallocated must re-check what it found (as the kernel's
            // page cache lookup does) before reading; this model checks the
            // counts and the old→new ordering.
            if p3.get_unless_zero() {
                p3.dec_and_test();
            }
        });
        old.join().unwrap();
        new.join().unwrap();
        lookup.join().unwrap();
        let h = page.hook();
        assert_eq!(page.count(), 0);
        assert_eq!(h.allocs(), h.lasts.load(SeqCst), "hook balanced");
        assert!(h.allocs() == 1 || h.allocs() == 2);
    });
}
// (A scrubbing `on_last_unref` runs *after* the count reached zero, so it
// may overlap a `first_ref` of the same page by a thread that found the
// page some other way; pools allocate only from the free list that
// `on_last_unref` pushes to, which orders the two. Hence `scrub: false`.)

/// Two threads allocate the same free page: one wins (or both, one after
/// the other's free), a loser's hook call is undone, and a second winner's
/// write is ordered after the first's (`first_ref` Acquire, final put
/// Release).
#[test]
fn racing_first_refs() {
    loom::model(|| {
        let page = Arc::new(PageRef::new(Page::new(false)));
        let spawn = |page: Arc<PageRef<Page>>| {
            thread::spawn(move || match page.first_ref() {
                Ok(()) => {
                    page.hook().write(7);
                    assert!(page.dec_and_test());
                    true
                }
                Err(FirstRefError::InUse { count }) => {
                    assert!(count <= 1);
                    false
                }
                Err(e) => panic!("{e}"),
            })
        };
        let a = spawn(page.clone());
        let b = spawn(page.clone());
        let wins = a.join().unwrap() as usize + b.join().unwrap() as usize;
        let h = page.hook();
        assert!(wins >= 1, "someone allocated the page");
        assert_eq!(h.allocs(), wins);
        assert_eq!(h.lasts.load(SeqCst), wins);
        assert_eq!(page.count(), 0);
    });
}

/// Counts the device's allocated pages around a `PercpuRefHook`.
struct Tracked<P: 'static> {
    inner: PercpuRefHook<'static, (), P>,
    live: &'static AtomicUsize,
}

impl<P: ReleasePolicy<()>> PageRefHook for Tracked<P> {
    fn on_first_ref(&self) -> bool {
        let ok = self.inner.on_first_ref();
        if ok {
            self.live.fetch_add(1, SeqCst);
        }
        ok
    }
    fn on_last_unref(&self) {
        self.live.fetch_sub(1, SeqCst);
        self.inner.on_last_unref();
    }
}

/// Pages tied to a `PercpuRef`: a page's final put (on another thread than
/// its allocation) races `kill` and a refused or successful allocation of a
/// second page. The device is released exactly once, and only when no page
/// is allocated.
#[test]
fn percpu_hook_final_put_vs_kill() {
    loom::model(|| {
        let live: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let released = Arc::new(AtomicUsize::new(0));
        let rel = released.clone();
        let device = Box::leak(Box::new(PercpuRef::new((), move |_: &()| {
            assert_eq!(live.load(SeqCst), 0, "released while a page is allocated");
            rel.fetch_add(1, SeqCst);
        })));
        let device = &*device;
        let mk = || {
            // SAFETY: only the PageRefs call the hooks, and every reference
            // taken below is put exactly once.
            let inner = unsafe { PercpuRefHook::new(device) };
            Arc::new(PageRef::new(Tracked { inner, live }))
        };
        let (a, b) = (mk(), mk());
        a.first_ref().unwrap();
        a.inc(); // a second user, handed to the other thread
        let a2 = a.clone();
        let user = thread::spawn(move || {
            a2.dec_and_test();
        });
        let alloc = thread::spawn(move || {
            if b.first_ref().is_ok() {
                assert!(b.dec_and_test());
            }
        });
        a.dec_and_test();
        device.kill().unwrap();
        user.join().unwrap();
        alloc.join().unwrap();
        assert_eq!(a.count(), 0);
        assert_eq!(live.load(SeqCst), 0);
        assert_eq!(released.load(SeqCst), 1);
        assert!(device.is_zero());
    });
}
