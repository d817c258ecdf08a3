//! `DevicePagePool`: a pmem-backed page pool with legal hot shutdown.
//!
//! The pool is the crate's two lower layers put to work, the way Linux ties
//! `ZONE_DEVICE` pages to their `dev_pagemap`:
//!
//! * each page is a [`PageRef`](crate::PageRef) whose hook takes one
//!   reference on the pool's [`PercpuRef`](crate::PercpuRef) when the page
//!   is allocated (0→1, `tryget_live`) and drops it when the page is freed
//!   (1→0), after returning the page to the free lists;
//! * shutdown kills the `PercpuRef`: allocation and lookup fail from then
//!   on, pages in use stay valid, and the release — which runs when the
//!   last page is freed — persists and unmaps the memory and wakes the
//!   waiters;
//! * a hot page is read without a page reference: the reader pins the pool
//!   with its per-CPU `tryget_live` and checks the page's version before
//!   and after (`seqlock`), so many readers of one page write nothing
//!   shared.
//!
//! | module | what |
//! |---|---|
//! | `backend` | path → device dax / fsdax / file; anonymous; bound checks before `mmap` |
//! | `region` | the mapping, `persist`, unmap-once |
//! | `free` | per-CPU free-page caches in front of a shared list |
//! | `registry` | address → pool, lock-free reads (`arc-swap`), each thread's last pool |
//! | `shared` | what pages and handles share: page table (a cache line per page), hook, the pool's `PercpuRef` and its release (the ownership argument) |
//! | `pool` | `DevicePagePool`: open, alloc, lookup, shutdown, persist |
//! | `page` | `DevicePage`, the counted page handle |
//! | `read` | optimistic reads (`PageView`) and their writer (`PageWriter`) |
//! | `seqlock` | the per-page version protocol under them (checked by loom) |
//! | `shutdown` | `ShutdownHandle`, its future and report |
//!
//! Syscalls, sysfs and the flush instructions are in `sys::mem`.
//!
//! Not built under loom (`--cfg percpu_ref_loom`, see `lib.rs`): a pool of
//! mapped memory is not something the model checker can run; the layers it
//! is made of have their own loom models, and `tests/loom_seqlock.rs`
//! compiles `seqlock.rs` itself against loom.

mod backend;
mod error;
pub(crate) mod free;
mod options;
mod page;
mod pool;
mod read;
mod region;
mod registry;
mod seqlock;
mod shared;
mod shutdown;

pub use error::{PoolError, StillHeld};
pub use options::{Backend, PersistMethod, PoolOptions, MIN_PAGE_SIZE};
pub use page::DevicePage;
pub use pool::{DevicePagePool, PoolStats};
pub use read::{PageView, PageWriter};
pub use shutdown::{ShutdownFuture, ShutdownHandle, ShutdownReport};
