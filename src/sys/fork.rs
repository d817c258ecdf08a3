//! `fork()` in a multi-threaded process (`pthread_atfork`).
//!
//! A child of `fork()` has one thread and a copy of every lock as it was:
//! a lock some other thread held at that instant stays held in the child,
//! forever. The crate's process-wide locks (see
//! [`percpu::hold_for_fork`](crate::percpu::hold_for_fork)) guard short
//! critical sections, so, as glibc does for `malloc`, the thread that forks
//! takes them all just before the fork and releases them in the parent and
//! in the child just after: the child finds them free, and can create,
//! kill and drop refs of its own.
//!
//! The child handler also counts forks, so that a pool can tell that it
//! is a child's copy ([`forks`]).
//!
//! Forks that skip the handlers (a raw `clone` system call, `vfork`) are
//! not seen; nothing may use the crate in their children.

#[cfg(percpu_ref_linux)]
mod imp {
    use crate::sync::{AtomicU32, Ordering::*};

    /// Forks seen by the child handler (see [`forks`]).
    static FORKS: AtomicU32 = AtomicU32::new(0);

    /// `UNREGISTERED`; the id of the process one of whose threads is
    /// registering the handlers; or `REGISTERED`.
    static STATE: AtomicU32 = AtomicU32::new(UNREGISTERED);
    const UNREGISTERED: u32 = 0;
    const REGISTERED: u32 = u32::MAX;

    extern "C" fn prepare() {
        crate::percpu::hold_for_fork();
    }

    extern "C" fn parent() {
        crate::percpu::release_after_fork();
    }

    extern "C" fn child() {
        crate::percpu::release_after_fork();
        // Relaxed: the child is single-threaded when the handler runs, and
        // reads these on this same thread (or on threads it creates later,
        // which the thread creation orders).
        FORKS.fetch_add(1, Relaxed);
        // The handlers ran, so they are registered in this process too,
        // even if the fork raced the end of `watch` in the parent.
        STATE.store(REGISTERED, Relaxed);
    }

    pub(crate) fn watch() -> u32 {
        // Acquire: pairs with the Release store below, so a thread that
        // sees the handlers registered does not take a lock before them.
        let s = STATE.load(Acquire);
        if s != REGISTERED {
            register(s);
        }
        forks()
    }

    #[cold]
    fn register(mut s: u32) {
        let me = std::process::id();
        loop {
            if s == REGISTERED {
                return;
            }
            // Another thread of this process is registering: wait, briefly
            // (one `pthread_atfork` call). A different process id is the
            // parent's: this is a child of a fork that raced the
            // registration, and its child handler did not run (it would
            // have set `REGISTERED`), so the handlers are not registered
            // here. The child registers them itself.
            if s == me {
                std::thread::yield_now();
                s = STATE.load(Acquire);
                continue;
            }
            // Relaxed on success: the winner publishes with the Release
            // store below; on failure, Acquire as in `watch`.
            match STATE.compare_exchange(s, me, Relaxed, Acquire) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        // SAFETY: registers three `extern "C"` handlers that live as long as
        // the program. They run on the forking thread, which does not hold
        // any of the locks they take (the crate never forks). A failure
        // (ENOMEM) leaves forks unseen, as for a raw `clone`.
        let _ = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        // Release: pairs with the Acquire loads in `watch` and `register`.
        STATE.store(REGISTERED, Release);
    }

    #[inline]
    pub(crate) fn forks() -> u32 {
        // Relaxed: see the child handler.
        FORKS.load(Relaxed)
    }
}

#[cfg(not(percpu_ref_linux))]
mod imp {
    pub(crate) fn watch() -> u32 {
        0
    }

    #[inline]
    pub(crate) fn forks() -> u32 {
        0
    }
}

/// Register the crate's fork handlers, once per process; returns
/// [`forks`]. Call it before taking a process-wide lock, and when an
/// object is created that must recognise a child's copy of itself.
///
/// Never blocks for long, also in the child of a fork that raced the
/// registration.
#[inline]
pub(crate) fn watch() -> u32 {
    imp::watch()
}

/// How many `fork()`s led to this process since [`watch`] was first
/// called: an object that recorded a different number was created by an
/// ancestor, before a `fork()`. Always 0 off Linux.
#[inline]
#[cfg_attr(not(feature = "dax"), allow(dead_code))]
pub(crate) fn forks() -> u32 {
    imp::forks()
}
