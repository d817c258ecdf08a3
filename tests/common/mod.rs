//! Helpers shared by the integration tests: a time limit for anything that
//! could hang, the counting tiers to run on, a minimal executor.
// Each test crate uses some of them.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

/// Run `f` on its own thread; fail if it has not returned within `limit`
/// (a hang or a deadlock), and re-raise its panic.
pub(crate) fn within<R: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let h = thread::spawn(f);
    let start = Instant::now();
    while !h.is_finished() {
        assert!(
            start.elapsed() < limit,
            "{what}: still running after {limit:?} (hang)"
        );
        thread::sleep(Duration::from_millis(1));
    }
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// `true`: the portable tier; `false`: the default (rseq where available,
/// listed only then).
pub(crate) fn tiers() -> Vec<bool> {
    let mut v = vec![true];
    if percpu_ref::init() == percpu_ref::Tier::Rseq {
        v.push(false);
    }
    v
}

/// Poll `fut` on this thread until it is ready, parking between polls;
/// fail if it is not woken within `limit`.
pub(crate) fn block_on<F: Future>(fut: F, limit: Duration) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + limit;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let now = Instant::now();
        assert!(now < deadline, "the future was not woken within {limit:?}");
        thread::park_timeout(deadline - now);
    }
}

/// Run `child` in a `fork()`ed child process and return its exit code
/// (the code `child` returns; 99 if it panicked; 100 + signal if it was
/// killed). The child only runs `child` and `_exit`s: no unwinding into
/// the test harness. A child still running after `limit` (stuck on a lock
/// some other parent thread held at the fork) is killed and the test
/// fails, instead of hanging.
#[cfg(target_os = "linux")]
pub(crate) fn in_fork_child(limit: Duration, child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: fork; the child runs `child` and then `_exit`s. What `child`
    // may use in a child of a multi-threaded process is the caller's
    // business: malloc (glibc makes it usable in the child), and the
    // crate, whose process-wide locks are held across `fork()`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
        // SAFETY: ends the child without running the parent's atexit
        // handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + limit;
    let mut status = 0;
    loop {
        // SAFETY: polls our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "waitpid: {}", std::io::Error::last_os_error());
        if Instant::now() > deadline {
            // SAFETY: kills our own child (it has not been reaped), then
            // reaps it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the fork child did not finish within {limit:?} (hang)");
        }
        thread::sleep(Duration::from_millis(1));
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        100 + libc::WTERMSIG(status)
    }
}

/// Is `addr` inside one of this process's mappings right now
/// (`/proc/self/maps`)? `false` where that cannot be read (Miri, other
/// systems).
pub(crate) fn is_mapped(addr: usize) -> bool {
    is_mapped_in("self", addr)
}

/// As [`is_mapped`], in process `pid` (`"self"` or a number).
/// Containment, not a line starting at `addr`: the kernel merges a new
/// anonymous mapping with a neighbour of the same kind.
pub(crate) fn is_mapped_in(pid: &str, addr: usize) -> bool {
    if cfg!(miri) {
        return false; // no host files under isolation
    }
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .any(|(start, end)| start <= addr && addr < end)
}

/// Does `r`, a lookup or read of `addr` in a pool that is gone (released:
/// unregistered and unmapped), say that no pool maps it? `NotMapped` — or
/// any other answer while `addr` is mapped again: a pool of a test running
/// alongside may have been mapped over the freed range by now. A registry
/// that still listed the dead pool answers for a range nothing maps, and
/// fails this.
#[cfg(feature = "dax")]
pub(crate) fn no_pool_at<T>(addr: *const u8, r: Result<T, percpu_ref::PoolError>) -> bool {
    match r {
        Err(percpu_ref::PoolError::NotMapped { .. }) => true,
        _ => is_mapped(addr as usize),
    }
}
