//! Interface of the restartable sequences the counter calls (being
//! rewritten in `sys::rseq`); until it lands, every sequence refuses and the
//! counter counts on its slow paths.
#![allow(dead_code)]

use crate::sync::{AtomicI64, AtomicPtr, AtomicU32};

/// Byte distance between two CPU rows of a slot column.
pub(crate) const ROW_STRIDE: usize = 128;

/// What a restartable sequence reads of one counter.
#[repr(C)]
pub(crate) struct Gate {
    /// Count only if the CPU id is below this (0: closed).
    pub(crate) limit: AtomicU32,
    /// The owner's word; never read by the sequences.
    pub(crate) word: AtomicU32,
    /// Row-0 slot of the column.
    pub(crate) column: AtomicPtr<AtomicI64>,
}

/// # Safety
/// See `sys::rseq`.
#[inline(always)]
pub(crate) unsafe fn add_imm<const D: i64>(_g: &Gate) -> bool {
    false
}

/// # Safety
/// See `sys::rseq`.
#[inline(always)]
pub(crate) unsafe fn add(_g: &Gate, _d: i64) -> bool {
    false
}
