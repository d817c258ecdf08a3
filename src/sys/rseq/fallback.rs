//! The tier everywhere the rseq sequences are not compiled in (other
//! architectures and libcs, Miri, the model checkers): no sequence ever
//! adds, the fence is a `SeqCst` fence. Always built, so its behaviour is
//! unit-tested on every platform.

use super::Gate;

pub(super) fn available() -> bool {
    false
}

/// Adds nothing: the caller counts on its central count instead.
///
/// # Safety
///
/// None needed (no memory is accessed); `unsafe` to match the real one.
#[inline(always)]
pub(super) unsafe fn add_imm<const D: i64>(_g: &Gate) -> bool {
    false
}

/// Adds nothing, as [`add_imm`].
///
/// # Safety
///
/// None needed.
#[inline(always)]
pub(super) unsafe fn add(_g: &Gate, _d: i64) -> bool {
    false
}

/// Adds nothing, as [`add_imm`].
///
/// # Safety
///
/// None needed.
#[inline(always)]
pub(super) unsafe fn add_imm_off<const D: i64>(_off: i64, _g: &Gate) -> bool {
    false
}

/// Adds nothing, as [`add_imm`].
///
/// # Safety
///
/// None needed.
#[inline(always)]
pub(super) unsafe fn add_off(_off: i64, _g: &Gate, _d: i64) -> bool {
    false
}

/// Never called: there is no area here ([`available`] is `false`).
#[allow(dead_code)] // only the rseq tier publishes an area offset
#[inline(always)]
pub(super) fn resolved_offset() -> i64 {
    0
}

pub(super) fn fence_all_cpus() {
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

#[inline]
pub(super) fn current_cpu() -> Option<usize> {
    None
}
