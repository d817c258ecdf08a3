//! The one switch between `std` and the model checkers.
//!
//! Every atomic, lock, condition variable, process-wide static and
//! thread-local in the crate comes from here, so one cfg puts
//! the whole crate under a model checker:
//!
//! | cfg | backend | used for |
//! |---|---|---|
//! | none | `std` | everything real |
//! | `--cfg percpu_ref_loom` | `loom` | exhaustive models of small scenarios (`tests/loom_*.rs`) |
//! | `--cfg percpu_ref_shuttle` | `shuttle` | randomized/PCT runs of bigger scenarios (`tests/shuttle_percpu.rs`) and the fuzz-driven scheduler of `fuzz/shuttle` |
//!
//! Under either model `build.rs` also sets `percpu_ref_model` (no syscalls,
//! no asm, no arena). The cfgs are namespaced so a downstream `--cfg loom`
//! does not flip us. Every model-specific helper lives in this file, so the
//! rest of the crate needs no per-model code.
//!
//! Shuttle runs every thread of a test on one OS thread and switches only at
//! its own primitives: each atomic operation, lock, condvar wait and
//! [`spin_loop`] is a point where the scheduler may run another thread. It
//! treats every ordering as `SeqCst` (loom checks the weak orderings).

#[cfg(all(percpu_ref_loom, percpu_ref_shuttle))]
compile_error!("--cfg percpu_ref_loom and --cfg percpu_ref_shuttle are exclusive: pick one model");

#[cfg(not(percpu_ref_model))]
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

// `shuttle::sync::Arc` is std's (shuttle does not model reference counts of
// `Arc`s; nothing in the crate synchronises through one).
#[cfg(percpu_ref_shuttle)]
#[allow(unused_imports)]
pub(crate) use shuttle::sync::{
    atomic::{fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};

/// Spin-loop hint. Under a model it is a scheduling point that yields to
/// another thread, so spin loops terminate there (shuttle additionally
/// tells its scheduler the thread is waiting, so a fair scheduler runs
/// someone else).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(percpu_ref_model))]
    std::hint::spin_loop();
    #[cfg(percpu_ref_loom)]
    loom::thread::yield_now();
    #[cfg(percpu_ref_shuttle)]
    shuttle::hint::spin_loop();
}

/// Lock a mutex, ignoring poisoning: every critical section in this crate
/// leaves its data consistent before anything that can panic runs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(percpu_ref_loom))]
    {
        // std and shuttle both poison; shuttle's `PoisonError` is std's.
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
/// a `const` initializer on std, a per-execution lazy static under a model
/// (whose primitives must be created inside the execution).
#[cfg(not(percpu_ref_model))]
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
#[cfg(percpu_ref_shuttle)]
macro_rules! global {
    ($(static $name:ident: $t:ty = $init:expr;)*) => {$(
        shuttle::lazy_static! {
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

/// A thread-local value (`std::thread_local!`, or the model's).
#[cfg(not(percpu_ref_model))]
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
#[cfg(percpu_ref_shuttle)]
macro_rules! thread_local_cell {
    ($(static $name:ident: $t:ty = $init:expr;)*) => {
        shuttle::thread_local! { $(static $name: $t = $init;)* }
    };
}
pub(crate) use thread_local_cell;

/// Yield to another thread under a model (a timed wait there: models have
/// no clock, so it returns early and the caller checks again).
#[cfg(percpu_ref_model)]
pub(crate) fn model_yield() {
    #[cfg(percpu_ref_loom)]
    loom::thread::yield_now();
    #[cfg(percpu_ref_shuttle)]
    shuttle::thread::yield_now();
}

/// The "CPU" (slot index, reduced by the caller) the calling thread uses
/// now, under a model, where there are no CPU ids.
///
/// * loom: each call moves the thread to the next slot (a per-thread
///   rotation), so models see gets and puts of one thread land on
///   different slots (migration) without adding branches to explore.
/// * shuttle: the scheduler's data source picks it (`next_u64`), so a
///   fuzz-driven scheduler decides the "migrations" from its input like it
///   decides the thread switches, and a random or PCT scheduler varies them
///   per execution.
#[cfg(percpu_ref_model)]
pub(crate) fn model_cpu() -> usize {
    #[cfg(percpu_ref_loom)]
    {
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
    #[cfg(percpu_ref_shuttle)]
    {
        use shuttle::rand::RngCore;
        // Truncation is intended: only the value modulo the slot count
        // matters.
        shuttle::rand::thread_rng().next_u64() as usize
    }
}
