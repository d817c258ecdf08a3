//! The per-page version protocol of optimistic reads: a sequence lock whose
//! data are machine words accessed only atomically.
//!
//! ```text
//!   version   meaning                            who changes it
//!   even      allocated, nobody writing          -
//!   odd       free, being allocated, or being    the page's one owner of
//!             written by its only holder         the moment (see below)
//! ```
//!
//! Writers (`write_begin` … `write_end`) are serialized by the pool, never
//! by this module: the version of a page is changed only by the thread
//! that owns it at that moment — the allocator (after taking the count
//! 0→1), the holder of the only reference (a `PageWriter`), or the thread
//! whose put freed it — and each hands the page to the next through the
//! page count or the free lists, which order their accesses. So a plain
//! load + store is enough, and no read-modify-write is needed.
//!
//! Readers never write anything: `read_begin` (Acquire load; odd means
//! "not readable now"), word loads, `read_validate` (Acquire fence, then
//! the version again). Orderings (Boehm, "Can seqlocks get along with
//! programming language memory models?", 2012):
//!
//! * a reader that read any word stored inside a write section synchronizes
//!   with that section's `write_begin` (its Release fence, before the word
//!   stores, pairs with the reader's Acquire fence, after the word loads),
//!   so its second version load sees the odd version or a later one, and
//!   validation fails;
//! * a reader whose `read_begin` saw the even version a `write_end` stored
//!   (Release) sees every word of that section.
//!
//! So when validation succeeds, every word the reader loaded holds the
//! value it had at the version the reader started from. Both sides access
//! the data only through `AtomicUsize` words of one size, so a racing
//! reader and writer never form a data race (nor a mixed-size race) in
//! Rust's memory model: there is nothing for Miri or loom to reject, and
//! `tests/loom_seqlock.rs` checks this very file.

use crate::sync::{fence, AtomicU64, AtomicUsize, Ordering::*};

/// Bytes per data word.
pub(crate) const WORD: usize = std::mem::size_of::<usize>();

/// Start an optimistic read: the current version if it is even (the page
/// is allocated and nobody writes it), else the odd version found.
#[inline]
pub(crate) fn read_begin(seq: &AtomicU64) -> Result<u64, u64> {
    // Acquire: pairs with the Release store of `write_end` (and of
    // `mark_allocated`), so the words that section stored are visible to
    // the loads that follow.
    let s = seq.load(Acquire);
    if s & 1 == 0 {
        Ok(s)
    } else {
        Err(s)
    }
}

/// End an optimistic read that began at version `begin`: `true` if no
/// write section overlapped it, so every word it loaded is consistent.
#[inline]
pub(crate) fn read_validate(seq: &AtomicU64, begin: u64) -> bool {
    // Acquire: pairs with the Release fence of `write_begin` through any
    // word this reader loaded from that write section (module docs).
    fence(Acquire);
    // Relaxed: ordered after the word loads by the fence above.
    seq.load(Relaxed) == begin
}

/// Begin a change of the page by its owner of the moment (even → odd).
#[inline]
pub(crate) fn write_begin(seq: &AtomicU64) {
    // Relaxed: only the owner changes the version (module docs), and the
    // hand-over to it ordered the previous owner's store before this load.
    let s = seq.load(Relaxed);
    debug_assert!(s & 1 == 0, "write_begin on odd version {s}");
    // Relaxed store, then a Release fence: the fence orders the version
    // change before the word stores that follow, for any reader that loads
    // one of them (it pairs with the Acquire fence in `read_validate`).
    seq.store(s.wrapping_add(1), Relaxed);
    fence(Release);
}

/// End a change begun with [`write_begin`] (odd → even).
#[inline]
pub(crate) fn write_end(seq: &AtomicU64) {
    // Relaxed: our own version (see `write_begin`).
    let s = seq.load(Relaxed);
    debug_assert!(s & 1 == 1, "write_end on even version {s}");
    // Release: pairs with the Acquire of `read_begin`, so a reader that
    // starts from this version sees every word stored before it.
    seq.store(s.wrapping_add(1), Release);
}

/// A freed page: even → odd, so readers that began before see the change
/// and new readers are refused until it is allocated again. (Already odd
/// if a writer's section was never ended — a leaked `PageWriter`: the
/// free ends it.)
#[inline]
pub(crate) fn mark_free(seq: &AtomicU64) {
    // Same ownership argument as `write_begin` for the load and the store.
    let s = seq.load(Relaxed);
    if s & 1 == 0 {
        // Relaxed: the page's words do not change here, and whoever writes
        // them next begins with its own `write_begin` (and its fence).
        seq.store(s.wrapping_add(1), Relaxed);
    }
}

/// An allocated page: odd → even, readable again.
#[inline]
pub(crate) fn mark_allocated(seq: &AtomicU64) {
    // Relaxed: our own version (see `write_begin`).
    let s = seq.load(Relaxed);
    debug_assert!(s & 1 == 1, "mark_allocated on even version {s}");
    // Release: as in `write_end` (the previous owner's word stores happened
    // before the hand-over to us, hence before this store).
    seq.store(s.wrapping_add(1), Release);
}

/// Copy `dst.len()` bytes starting at byte `offset` of `words` into `dst`,
/// one atomic word load per word touched.
///
/// # Panics
///
/// If the range is not inside `words`.
#[inline]
pub(crate) fn copy_out(words: &[AtomicUsize], offset: usize, dst: &mut [u8]) {
    check(words, offset, dst.len());
    // Relaxed loads throughout: ordered by `read_begin`/`read_validate`
    // (module docs).
    let load = |w: usize| words[w].load(Relaxed).to_ne_bytes();
    let (mut at, mut out) = (offset, 0);
    // Head: the rest of a word that `offset` starts inside.
    let skip = at % WORD;
    if skip != 0 && !dst.is_empty() {
        let n = (WORD - skip).min(dst.len());
        dst[..n].copy_from_slice(&load(at / WORD)[skip..skip + n]);
        (at, out) = (at + n, n);
    }
    // Body: whole words.
    let body = (dst.len() - out) / WORD * WORD;
    let first = at / WORD;
    for (i, chunk) in dst[out..out + body].chunks_exact_mut(WORD).enumerate() {
        chunk.copy_from_slice(&load(first + i));
    }
    (at, out) = (at + body, out + body);
    // Tail: the start of one more word.
    if out < dst.len() {
        let n = dst.len() - out;
        dst[out..].copy_from_slice(&load(at / WORD)[..n]);
    }
}

/// Store `src` at byte `offset` of `words`, one atomic word store per word
/// touched (a load and a store for a word only partly covered: the caller
/// is the only writer, see the module docs).
///
/// # Panics
///
/// If the range is not inside `words`.
#[inline]
pub(crate) fn copy_in(words: &[AtomicUsize], offset: usize, src: &[u8]) {
    check(words, offset, src.len());
    // Relaxed stores throughout: ordered by `write_begin`/`write_end`
    // (module docs). Relaxed loads of partly covered words: we are their
    // only writer, and see our own stores.
    let part = |w: usize, skip: usize, bytes: &[u8]| {
        let mut b = words[w].load(Relaxed).to_ne_bytes();
        b[skip..skip + bytes.len()].copy_from_slice(bytes);
        words[w].store(usize::from_ne_bytes(b), Relaxed);
    };
    let (mut at, mut done) = (offset, 0);
    let skip = at % WORD;
    if skip != 0 && !src.is_empty() {
        let n = (WORD - skip).min(src.len());
        part(at / WORD, skip, &src[..n]);
        (at, done) = (at + n, n);
    }
    let body = (src.len() - done) / WORD * WORD;
    let first = at / WORD;
    for (i, chunk) in src[done..done + body].chunks_exact(WORD).enumerate() {
        let mut b = [0; WORD];
        b.copy_from_slice(chunk);
        words[first + i].store(usize::from_ne_bytes(b), Relaxed);
    }
    (at, done) = (at + body, done + body);
    if done < src.len() {
        part(at / WORD, 0, &src[done..]);
    }
}

/// Store `byte` into `len` bytes starting at `offset`.
///
/// # Panics
///
/// If the range is not inside `words`.
#[inline]
pub(crate) fn fill(words: &[AtomicUsize], offset: usize, len: usize, byte: u8) {
    check(words, offset, len);
    let chunk = [byte; 64];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(chunk.len());
        copy_in(words, at, &chunk[..n]);
        at += n;
    }
}

#[inline]
fn check(words: &[AtomicUsize], offset: usize, len: usize) {
    let size = words.len() * WORD;
    assert!(
        offset.checked_add(len).is_some_and(|end| end <= size),
        "byte range {offset}..{} is outside the page (0..{size})",
        offset.wrapping_add(len)
    );
}
