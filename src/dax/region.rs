//! `Region`: one mapped range, how to persist it, and unmap-once.

use super::error::PoolError;
use super::options::{Backend, PersistMethod};
use crate::sync::{lock, AtomicBool, Mutex, Ordering::*};
use crate::sys::mem::{self, FlushInsn, OnFork, RawMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// The pool's memory. It is the value of the pool's `PercpuRef`, whose
/// release unmaps it; `Drop` unmaps it too if that never happened (a pool
/// that failed half-way through construction). The file or device it maps,
/// if any, stays open (holding its `flock`) until the unmap.
#[derive(Debug)]
pub(crate) struct Region {
    map: RawMap,
    backend: Backend,
    method: PersistMethod,
    flush: Option<(FlushInsn, usize)>,
    path: PathBuf,
    mapped: AtomicBool,
    /// The open file whose advisory lock marks the file as in use by this
    /// pool (unless `PoolOptions::unlocked`); closed right after the unmap.
    file: Mutex<Option<File>>,
    /// `sys::fork::forks()` and the process id when it was mapped: a different
    /// count later means this is a `fork()` child's copy.
    forks: u32,
    pid: u32,
}

impl Region {
    pub(crate) fn new(map: RawMap, backend: Backend, path: PathBuf) -> Self {
        let flush = mem::flush_insn();
        let method = match backend {
            Backend::DevDax | Backend::FsDax => match flush {
                Some((FlushInsn::Clwb, _)) => PersistMethod::Clwb,
                Some((FlushInsn::Clflushopt, _)) => PersistMethod::Clflushopt,
                Some((FlushInsn::Clflush, _)) => PersistMethod::Clflush,
                Some((FlushInsn::DcCvap, _)) => PersistMethod::DcCvap,
                Some((FlushInsn::DcCvac, _)) => PersistMethod::DcCvac,
                None => PersistMethod::Unavailable,
            },
            Backend::File => PersistMethod::Msync,
            Backend::FilePrivate | Backend::Anonymous => PersistMethod::Nothing,
        };
        Region {
            map,
            backend,
            method,
            flush,
            path,
            mapped: AtomicBool::new(true),
            file: Mutex::new(None),
            forks: crate::sys::fork::watch(),
            pid: std::process::id(),
        }
    }

    /// Is this a copy in a child created by `fork()` after the mapping?
    /// Then the memory is not the pool's: absent (file and device
    /// backends) or zero-filled (anonymous) in this process.
    #[inline]
    pub(crate) fn forked(&self) -> bool {
        crate::sys::fork::forks() != self.forks
    }

    /// `Err(Forked)` in a `fork()` child (see [`forked`](Self::forked)).
    #[inline]
    pub(crate) fn check_fork(&self) -> Result<(), PoolError> {
        if self.forked() {
            return Err(self.forked_error());
        }
        Ok(())
    }

    #[cold]
    fn forked_error(&self) -> PoolError {
        PoolError::Forked {
            path: self.path.clone(),
            parent: self.pid,
            child: std::process::id(),
        }
    }

    /// Keep `file` open until the unmap (it holds the pool's lock).
    pub(crate) fn hold(self, file: File) -> Self {
        *lock(&self.file) = Some(file);
        self
    }

    pub(crate) fn base(&self) -> NonNull<u8> {
        self.map.ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn method(&self) -> PersistMethod {
        self.method
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Make `offset..offset+len` durable.
    ///
    /// # Safety
    ///
    /// The region is still mapped for the duration of the call (the
    /// caller holds a reference on the pool's `PercpuRef`, or is its
    /// release, before unmapping), and `offset + len <= self.len()`.
    pub(crate) unsafe fn persist(&self, offset: usize, len: usize) -> Result<(), PoolError> {
        debug_assert!(offset.checked_add(len).is_some_and(|e| e <= self.len()));
        // In a fork child the memory may be absent: never touch it.
        self.check_fork()?;
        if len == 0 {
            return Ok(());
        }
        let ptr = self.base().as_ptr().wrapping_add(offset).cast_const();
        let result = match self.method {
            PersistMethod::Nothing => Ok(()),
            PersistMethod::Msync => {
                // SAFETY: the range is inside the live mapping (caller).
                unsafe { mem::msync(ptr, len) }
            }
            PersistMethod::Unavailable => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no cache-line write-back instruction on this CPU, and msync is invalid on DAX",
            )),
            PersistMethod::Clwb
            | PersistMethod::Clflushopt
            | PersistMethod::Clflush
            | PersistMethod::DcCvap
            | PersistMethod::DcCvac => {
                match self.flush {
                    Some((insn, line)) => {
                        // SAFETY: the range is inside the live mapping
                        // (caller); `insn`/`line` come from `flush_insn`.
                        unsafe { mem::flush_range(ptr, len, insn, line) };
                        Ok(())
                    }
                    None => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
                }
            }
        };
        result.map_err(|source| PoolError::Persist {
            path: self.path.clone(),
            offset,
            len,
            source,
        })
    }

    /// Unmap, once; later calls do nothing. Returns whether this call
    /// unmapped.
    ///
    /// # Safety
    ///
    /// No reference into the region is used after the call: every page of
    /// the pool is free and no `PercpuRef` reference is left (this runs in
    /// its release).
    pub(crate) unsafe fn unmap(&self) -> bool {
        // AcqRel would do (one RMW claims the unmap); SeqCst for clarity,
        // this runs once per pool.
        if !self.mapped.swap(false, SeqCst) {
            return false;
        }
        // In a fork child whose copy of the mapping is absent, the range is
        // not ours to unmap: the child may have mapped something else there.
        if !(self.forked() && self.map.on_fork() == OnFork::Absent) {
            // SAFETY: claimed above, so this is the only unmap; no
            // reference is used afterwards (caller).
            // An munmap error (EINVAL on a bad range) cannot happen for a
            // range mmap returned; nothing to do with it but ignore it.
            let _ = unsafe { self.map.unmap() };
        }
        // Drop the pool's lock: another pool may map the file now. An
        // explicit unlock, because a `fork()` child may hold a copy of the
        // descriptor (closing ours would then not release the lock) —
        // except in such a child, whose unlock would release its parent's.
        let file = lock(&self.file).take();
        #[cfg(percpu_ref_linux)]
        if let Some(f) = &file {
            if !self.forked() {
                // An error (EINTR, ENOLCK) leaves the lock to the close.
                let _ = mem::unlock(std::os::fd::AsFd::as_fd(f));
            }
        }
        drop(file);
        true
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: nobody else can point into the region.
        unsafe { self.unmap() };
    }
}
