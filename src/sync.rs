//! The one switch between `std` and a model checker.
//!
//! Every atomic, lock, condition variable, process-wide static and
//! thread-local that concurrency code of the crate uses comes from here, so
//! building with `RUSTFLAGS="--cfg percpu_ref_loom"` puts the whole crate
//! under loom's model checker. The cfg is namespaced so a downstream
//! `--cfg loom` does not flip us.

#[cfg(not(percpu_ref_loom))]
#[allow(unused_imports)] // the full set, for every layer
pub(crate) use std::sync::{
    atomic::{fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};

#[cfg(percpu_ref_loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::{
    atomic::{fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicUsize, Ordering},
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

/// Wait on a condition variable, ignoring poisoning (see [`lock`]).
pub(crate) fn wait<'a, T>(c: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    #[cfg(not(percpu_ref_loom))]
    {
        c.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    #[cfg(percpu_ref_loom)]
    {
        c.wait(g).unwrap()
    }
}

/// A process-wide value, reached with `NAME.with(|v| ...)`: a `static` with
/// a `const` initializer on std, a per-execution lazy static under loom
/// (whose primitives must be created inside the model).
#[cfg(not(percpu_ref_loom))]
macro_rules! global {
    ($(static $name:ident: $t:ty = $init:expr;)*) => {$(
        static $name: $crate::sync::Global<$t> = $crate::sync::Global($init);
    )*};
}
#[cfg(percpu_ref_loom)]
macro_rules! global {
    ($(static $name:ident: $t:ty = $init:expr;)*) => {$(
        loom::lazy_static! {
            static ref $name: $crate::sync::Global<$t> = $crate::sync::Global($init);
        }
    )*};
}
pub(crate) use global;

/// See [`global!`].
pub(crate) struct Global<T>(pub(crate) T);

impl<T> Global<T> {
    /// Run `f` on the value.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0)
    }
}

/// A per-thread "CPU" for model checking: each call moves the thread to the
/// next one, so models see gets and puts of one thread land on different
/// slots (migration).
#[cfg(percpu_ref_loom)]
pub(crate) fn model_cpu() -> usize {
    use std::cell::Cell;
    loom::thread_local! {
        static NEXT: Cell<usize> = Cell::new(0);
    }
    NEXT.with(|n| {
        let v = n.get();
        n.set(v.wrapping_add(1));
        v
    })
}

/// A thread-local value (`std::thread_local!` or loom's).
#[cfg(not(percpu_ref_loom))]
macro_rules! thread_local_cell {
    ($(static $name:ident: $t:ty = $init:expr;)*) => {
        std::thread_local! { $(static $name: $t = const { $init };)* }
    };
}
#[cfg(percpu_ref_loom)]
macro_rules! thread_local_cell {
    ($(static $name:ident: $t:ty = $init:expr;)*) => {
        loom::thread_local! { $(static $name: $t = $init;)* }
    };
}
pub(crate) use thread_local_cell;
