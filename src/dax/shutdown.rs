//! Waiting for a started shutdown: `ShutdownHandle`, its future, and the
//! report.

use super::error::{PoolError, StillHeld};
use super::options::{Backend, PersistMethod};
use super::region::Region;
use super::shared::Shared;
use crate::percpu::policy::{Completion, CompletionFuture};
use crate::percpu::Holders;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// What a completed shutdown did, from [`ShutdownHandle::wait`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The pool's path (`anonymous` for anonymous pools).
    pub path: PathBuf,
    /// Where its memory came from.
    pub backend: Backend,
    /// Pages in the pool (all free now).
    pub pages: usize,
    /// Bytes persisted and unmapped.
    pub bytes: usize,
    /// How they were persisted.
    pub persist_method: PersistMethod,
    /// The final persist's error, if it failed (the memory was unmapped
    /// regardless).
    pub persist_error: Option<Arc<PoolError>>,
}

impl ShutdownReport {
    pub(super) fn new(region: &Region, pages: usize) -> Self {
        ShutdownReport {
            path: region.path().to_path_buf(),
            backend: region.backend(),
            pages,
            bytes: region.len(),
            persist_method: region.method(),
            persist_error: None,
        }
    }
}

/// A started shutdown, from [`DevicePagePool::shutdown`](crate::DevicePagePool::shutdown): wait for the last
/// held page to drop (then the pool is persisted and unmapped) blocking,
/// with a timeout, or as a future (`handle.await`, or
/// [`wait_async`](Self::wait_async) to keep the handle). Holds the pool's
/// metadata (not its mapping) alive.
///
/// The future needs no runtime: any executor, or this dozen-line one,
/// drives it (the last page's drop wakes it).
///
/// ```
/// use percpu_ref::DevicePagePool;
/// use std::future::Future;
/// use std::sync::Arc;
/// use std::task::{Context, Poll, Wake, Waker};
///
/// /// Poll `f` on this thread, sleeping until its waker is called.
/// fn block_on<F: Future>(f: F) -> F::Output {
///     struct Unpark(std::thread::Thread);
///     impl Wake for Unpark {
///         fn wake(self: Arc<Self>) {
///             self.0.unpark();
///         }
///     }
///     let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
///     let mut cx = Context::from_waker(&waker);
///     let mut f = std::pin::pin!(f);
///     loop {
///         if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
///             return out;
///         }
///         std::thread::park();
///     }
/// }
///
/// let pool = DevicePagePool::anonymous(4 * 4096)?;
/// let page = pool.alloc()?;
/// let shutdown = pool.shutdown();
/// let io = std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_millis(10));
///     drop(page); // the last page: persist, unmap, wake
/// });
/// let report = block_on(async move { shutdown.await });
/// assert_eq!(report.pages, 4);
/// io.join().unwrap();
/// # Ok::<(), percpu_ref::PoolError>(())
/// ```
pub struct ShutdownHandle {
    pub(super) shared: Arc<Shared>,
}

impl ShutdownHandle {
    fn done(&self) -> &Completion {
        &self.shared.pgmap.policy().done
    }

    /// Has the last page dropped, and the pool been persisted and unmapped?
    pub fn is_complete(&self) -> bool {
        self.done().is_complete()
    }

    /// Block until complete.
    pub fn wait(&self) -> ShutdownReport {
        self.done().wait();
        self.shared.report()
    }

    /// Block until complete or `timeout` passed; on timeout, which pages
    /// are still held, and by whom.
    ///
    /// # Errors
    ///
    /// [`StillHeld`] with the number and indices of the pages still
    /// referenced when the time ran out and, with the `track` feature,
    /// their holders: its `Display` is a leak report.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ShutdownReport, StillHeld> {
        if self.done().wait_timeout(timeout) {
            return Ok(self.shared.report());
        }
        let indices = self.shared.held_indices();
        if indices.is_empty() && self.done().wait_timeout(Duration::from_millis(10)) {
            // The last page dropped between the timeout and the scan.
            return Ok(self.shared.report());
        }
        Err(StillHeld {
            path: self.shared.path(),
            count: indices.len(),
            indices,
            holders: self.shared.page_holders(),
        })
    }

    /// Page indices still referenced (a snapshot).
    pub fn held(&self) -> Vec<usize> {
        self.shared.held_indices()
    }

    /// Who holds the pool's pages (feature `track`; see
    /// [`DevicePagePool::holders`](crate::DevicePagePool::holders)).
    pub fn holders(&self) -> Holders {
        self.shared.page_holders()
    }

    /// A future that resolves to the report when complete; works with any
    /// executor, needs no runtime.
    pub fn wait_async(&self) -> ShutdownFuture {
        ShutdownFuture {
            done: self.done().wait_async(),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// `handle.await`: the report, once the last page dropped and the pool
/// was persisted and unmapped.
impl IntoFuture for ShutdownHandle {
    type Output = ShutdownReport;
    type IntoFuture = ShutdownFuture;

    fn into_future(self) -> ShutdownFuture {
        ShutdownFuture {
            done: self.done().wait_async(),
            shared: self.shared,
        }
    }
}

/// `(&handle).await`: as for the handle itself, keeping it.
impl IntoFuture for &ShutdownHandle {
    type Output = ShutdownReport;
    type IntoFuture = ShutdownFuture;

    fn into_future(self) -> ShutdownFuture {
        self.wait_async()
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("path", &self.shared.region().path())
            .field("complete", &self.is_complete())
            .finish()
    }
}

/// Future returned by [`ShutdownHandle::wait_async`] and by awaiting a
/// [`ShutdownHandle`].
#[must_use = "futures do nothing unless polled"]
pub struct ShutdownFuture {
    done: CompletionFuture,
    shared: Arc<Shared>,
}

impl Future for ShutdownFuture {
    type Output = ShutdownReport;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ShutdownReport> {
        match Pin::new(&mut self.done).poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.shared.report()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for ShutdownFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownFuture").finish_non_exhaustive()
    }
}
