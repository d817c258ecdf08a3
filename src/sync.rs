//! The one switch between `std` and `loom`.
//!
//! Every atomic, lock and cell in the crate comes from here, so building with
//! `RUSTFLAGS="--cfg percpu_ref_loom"` puts the whole crate under loom's model
//! checker. The cfg is namespaced so a downstream `--cfg loom` does not flip us.

#[cfg(not(percpu_ref_loom))]
#[allow(unused_imports)] // the full set, for every layer
pub(crate) use std::sync::{
    atomic::{
        fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    },
    Arc, Condvar, Mutex, MutexGuard,
};

#[cfg(percpu_ref_loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::{
    atomic::{
        fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    },
    Arc, Condvar, Mutex, MutexGuard,
};

/// Spin-loop hint (a loom yield under the model checker, so spin loops
/// terminate there).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(percpu_ref_loom))]
    std::hint::spin_loop();
    #[cfg(percpu_ref_loom)]
    loom::thread::yield_now();
}

/// Lock a mutex, ignoring poisoning: every critical section in this crate
/// leaves its data consistent before anything that can panic runs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(percpu_ref_loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    #[cfg(percpu_ref_loom)]
    {
        m.lock().unwrap()
    }
}
