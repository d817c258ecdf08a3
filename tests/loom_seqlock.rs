//! Exhaustive loom models of the page version protocol behind optimistic
//! reads (`src/dax/seqlock.rs`, compiled here unchanged against loom's
//! atomics): a reader whose validation succeeds saw every word at one
//! version, whatever a writer, a free and a reallocation did meanwhile.
//!
//! Run: `RUSTFLAGS="--cfg percpu_ref_loom" LOOM_MAX_PREEMPTIONS=3 cargo test
//! --release --test loom_seqlock`.
//!
//! Each model's data are two words written in one section, so a torn read
//! is a pair of words from two versions. loom explores every value each
//! relaxed load may return under the C11 model, so these models check the
//! orderings, not just the counts: every single weakening of an ordering
//! in `seqlock.rs` makes at least one model fail (the table at the end of
//! this file).
//!
//! Bound: at most three spawned threads with a handful of atomic steps
//! each; a torn or stale validated read needs at most two preemptions (the
//! reader's loads between a writer's steps), so `LOOM_MAX_PREEMPTIONS=3`
//! covers them.
#![cfg(percpu_ref_loom)]

/// What `seqlock.rs` imports as `crate::sync`.
mod sync {
    pub(crate) use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
}

#[allow(dead_code)] // the pool uses all of it; these models use most of it
#[path = "../src/dax/seqlock.rs"]
mod seqlock;

use loom::sync::atomic::{AtomicU64, AtomicUsize};
use loom::sync::Arc;
use loom::thread;
use seqlock::WORD;

/// A page of two words and its version, allocated (version 0, words
/// holding version 0's data).
struct Page {
    seq: AtomicU64,
    words: [AtomicUsize; 2],
}

impl Page {
    fn new() -> Arc<Page> {
        Arc::new(Page {
            seq: AtomicU64::new(0),
            words: [AtomicUsize::new(0), AtomicUsize::new(0)],
        })
    }
}

/// Write version `v`: both words hold `v`.
fn write(p: &Page, v: usize) {
    seqlock::write_begin(&p.seq);
    let mut bytes = [0u8; 2 * WORD];
    bytes[..WORD].copy_from_slice(&v.to_ne_bytes());
    bytes[WORD..].copy_from_slice(&v.to_ne_bytes());
    seqlock::copy_in(&p.words, 0, &bytes);
    seqlock::write_end(&p.seq);
}

/// An optimistic read: `Some((version, w0, w1))` if it validated.
fn read(p: &Page) -> Option<(u64, usize, usize)> {
    let begin = seqlock::read_begin(&p.seq).ok()?;
    let mut bytes = [0u8; 2 * WORD];
    seqlock::copy_out(&p.words, 0, &mut bytes);
    let w0 = usize::from_ne_bytes(bytes[..WORD].try_into().unwrap());
    let w1 = usize::from_ne_bytes(bytes[WORD..].try_into().unwrap());
    seqlock::read_validate(&p.seq, begin).then_some((begin, w0, w1))
}

/// A validated read must be whole and hold the data of the version it
/// began at: `data(version)`.
fn check(got: Option<(u64, usize, usize)>, data: impl Fn(u64) -> usize) {
    if let Some((v, a, b)) = got {
        assert_eq!((a, b), (data(v), data(v)), "validated read at version {v}");
    }
}

/// Run `f` on a spawned thread. Every model runs its reader there too, not
/// on the model's main thread: loom 0.7 explores far fewer interleavings
/// between the main thread and a spawned thread whose first access is a
/// load (a writer's `write_begin` starts with one) — a two-thread model
/// written that way explored a single execution.
fn spawn(p: &Arc<Page>, f: impl FnOnce(&Page) + Send + 'static) -> thread::JoinHandle<()> {
    let p = Arc::clone(p);
    thread::spawn(move || f(&p))
}

/// One writer section against one reader: a validated read is version 0
/// or version 1, whole.
#[test]
fn reader_vs_writer() {
    loom::model(|| {
        let p = Page::new();
        let w = spawn(&p, |p| write(p, 1));
        // Version 0 holds 0s, version 2 (the section's end) 1s.
        let r = spawn(&p, |p| check(read(p), |v| v as usize / 2));
        w.join().unwrap();
        r.join().unwrap();
        // After the writer, a read validates and sees its data.
        assert_eq!(read(&p), Some((2, 1, 1)));
    });
}

/// Two sections back to back (so the version moves 0 → 2 → 4): a reader
/// that began at one version and finished at another never validates.
#[test]
fn reader_vs_two_writer_sections() {
    loom::model(|| {
        let p = Page::new();
        let w = spawn(&p, |p| {
            write(p, 1);
            write(p, 2);
        });
        let r = spawn(&p, |p| check(read(p), |v| v as usize / 2));
        w.join().unwrap();
        r.join().unwrap();
    });
}

/// The first owner writes its data and frees the page; another owner
/// takes it from the free list (a lock, as in the pool), and writes its
/// own: a validated read holds the data of the version it began at — the
/// first owner's data also when it began on the reallocated page before
/// the new owner wrote (so the allocation's Release matters), and never
/// the new owner's data under an older version.
#[test]
fn reader_vs_write_free_reallocate_write() {
    loom::model(|| {
        let p = Page::new();
        let free_list = Arc::new(loom::sync::Mutex::new(false));
        let first = {
            let free_list = Arc::clone(&free_list);
            spawn(&p, move |p| {
                write(p, 5); // versions 1, 2
                seqlock::mark_free(&p.seq); // 3
                *free_list.lock().unwrap() = true;
            })
        };
        let second = {
            let free_list = Arc::clone(&free_list);
            spawn(&p, move |p| {
                if !*free_list.lock().unwrap() {
                    return; // not freed yet: nothing to allocate
                }
                seqlock::mark_allocated(&p.seq); // 4
                write(p, 7); // 5, 6
            })
        };
        let r = spawn(&p, |p| {
            check(read(p), |v| match v {
                0 => 0,
                2 | 4 => 5,
                _ => 7,
            })
        });
        first.join().unwrap();
        second.join().unwrap();
        r.join().unwrap();
    });
}

/// Bytes across a word boundary go through the same words: an unaligned
/// range, read while a writer stores it, is whole or refused.
#[test]
fn unaligned_range_reader_vs_writer() {
    loom::model(|| {
        let p = Page::new();
        let w = spawn(&p, |p| {
            seqlock::write_begin(&p.seq);
            seqlock::copy_in(&p.words, WORD - 2, &[9, 9, 9, 9]);
            seqlock::write_end(&p.seq);
        });
        let r = spawn(&p, |p| {
            if let Ok(begin) = seqlock::read_begin(&p.seq) {
                let mut got = [0u8; 4];
                seqlock::copy_out(&p.words, WORD - 2, &mut got);
                if seqlock::read_validate(&p.seq, begin) {
                    let want = if begin == 0 { [0; 4] } else { [9; 4] };
                    assert_eq!(got, want, "validated read at version {begin}");
                }
            }
        });
        w.join().unwrap();
        r.join().unwrap();
    });
}

/// # Which weakening each model catches
///
/// Measured by editing `src/dax/seqlock.rs` one ordering at a time and
/// running this file with `LOOM_MAX_PREEMPTIONS=3`:
///
/// | weakening | models that fail |
/// |---|---|
/// | `read_begin`: Acquire → Relaxed | all four |
/// | `read_validate`: no Acquire fence | all four |
/// | `write_begin`: no Release fence | all four |
/// | `write_end`: Release → Relaxed | all four |
/// | `mark_allocated`: Release → Relaxed | `reader_vs_write_free_reallocate_write` |
///
/// (`mark_free` is already Relaxed; its argument is in its comment.)
#[allow(dead_code)]
fn docs() {}
