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
