//! What every architecture's rseq tier shares: finding glibc's rseq area
//! (`__rseq_offset` / `__rseq_size`, looked up with `dlsym`), the run-time
//! tier choice, and the fence. Only the sequences themselves, and the one
//! instruction that reads the thread pointer, differ per architecture.

use crate::sync::{AtomicI64, Ordering::Relaxed};
use std::sync::OnceLock;

/// `struct rseq` is at least this big when registered (original ABI).
const RSEQ_ORIG_SIZE: u32 = 20;
/// [`OFFSET`] before the lookup ran.
const UNRESOLVED: i64 = i64::MIN;
/// [`OFFSET`] when glibc did not register an area.
const ABSENT: i64 = i64::MIN + 1;

/// `__rseq_offset`, or one of the two sentinels. Each sequence that is not
/// handed an [`super::Area`] reads it with one load. In code inlined into
/// another crate rustc addresses a static of this crate through the GOT, a
/// load of a constant that the compiler hoists out of loops (seen with
/// `objdump -d` of `benches/percpu.rs` on x86_64: one `mov` of the offset
/// per sequence, the GOT load before the loop). Naming the static in the
/// asm with a `sym` operand would drop the GOT load everywhere, but needs a
/// PC-relative relocation against an exported symbol, which a Rust `dylib`
/// link refuses.
static OFFSET: AtomicI64 = AtomicI64::new(UNRESOLVED);

/// Look up glibc's `__rseq_size` / `__rseq_offset` with `dlsym`.
#[cold]
#[inline(never)]
fn resolve() -> i64 {
    // SAFETY: `dlsym` with `RTLD_DEFAULT` and a NUL-terminated name is
    // always safe to call; it returns null if the symbol is absent.
    let size = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) };
    // SAFETY: as above.
    let offset = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) };
    let off = if size.is_null() || offset.is_null() {
        ABSENT
    } else {
        // SAFETY: glibc defines `const unsigned int __rseq_size` and
        // `const ptrdiff_t __rseq_offset` (aligned, initialised before
        // any user code runs and never written again).
        let (size, offset) = unsafe { (*size.cast::<u32>(), *offset.cast::<isize>() as i64) };
        if size >= RSEQ_ORIG_SIZE && offset > ABSENT {
            offset
        } else {
            ABSENT
        }
    };
    // Relaxed: the value is self-contained and every thread computes the
    // same one, so a racing lookup stores the same number.
    OFFSET.store(off, Relaxed);
    off
}

/// The rseq area's offset from the thread pointer, if glibc registered
/// one (it may be negative: -32 on aarch64, where the area lies below the
/// thread pointer; +2336 on x86_64).
#[inline]
pub(super) fn area_offset() -> Option<i64> {
    // Relaxed: see `resolve`; a stale UNRESOLVED only repeats the lookup.
    match OFFSET.load(Relaxed) {
        UNRESOLVED => match resolve() {
            ABSENT => None,
            off => Some(off),
        },
        ABSENT => None,
        off => Some(off),
    }
}

/// The area offset once [`available`] returned `true`: one load.
#[inline(always)]
pub(crate) fn resolved_offset() -> i64 {
    // Relaxed: written by `resolve` before the OnceLock in `available`
    // completed, and every caller observed that completion (the sequences'
    // precondition), so this load sees the final value.
    let off = OFFSET.load(Relaxed);
    debug_assert!(off > ABSENT, "an rseq sequence before rseq_available()");
    off
}

/// The tier choice, once per process; see [`super::rseq_available`].
#[inline]
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if super::portable_forced_by(std::env::var_os(super::PORTABLE_ENV).as_deref()) {
            return false;
        }
        area_offset().is_some() && crate::sys::membarrier::register_private_expedited_rseq()
    })
}

/// See [`super::fence_all_cpus`].
pub(crate) fn fence_all_cpus() {
    if available() {
        crate::sys::membarrier::private_expedited_rseq();
    } else {
        crate::sync::fence(crate::sync::Ordering::SeqCst);
    }
}
