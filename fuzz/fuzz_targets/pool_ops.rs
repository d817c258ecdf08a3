//! `pool_ops`: operations on an anonymous `DevicePagePool` (alloc, clone,
//! drop, write, read, persist, lookup, optimistic reads — also with an
//! operation run inside the read — shutdown, wait_timeout, dropping the
//! pool handle) applied to the pool and to a sequential model of its pages
//! and bytes. Checked after every step: nothing is lost (allocated + free
//! = total), every result and error equals the model's, held pages keep
//! their contents (also after shutdown started: the memory must still be
//! mapped — an early unmap faults under ASan), an optimistic read returns
//! the model's bytes or exactly the model's error (`PageChanged` when the
//! operation inside it freed or wrote its page), and the shutdown
//! completes exactly when the last page is dropped. See `fuzz/README.md`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use percpu_ref::{DevicePage, DevicePagePool, PoolError, PoolOptions, ShutdownHandle};
use std::time::Duration;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PoolOp {
    Alloc,
    Clone(u8),
    Drop(u8),
    /// `as_mut_slice()` (only the page's sole reference gets one), write
    /// one byte.
    Write {
        h: u8,
        off: u16,
        byte: u8,
    },
    /// `as_slice()`, compare a byte and the reference count.
    Read {
        h: u8,
        off: u16,
    },
    PersistPage {
        h: u8,
        start: u16,
        end: u16,
    },
    PersistPool {
        start: u32,
        end: u32,
    },
    /// `lookup(base + page * page_size + off)`; `page` may be past the end.
    Lookup {
        page: u8,
        off: u16,
    },
    Shutdown,
    WaitTimeout(u8),
    DropPool,
    /// `DevicePagePool::read` of `len` bytes at `off` of page `page`
    /// (which may be past the end; the range may leave the page).
    OptimisticRead {
        page: u8,
        off: u16,
        len: u8,
    },
    /// `DevicePagePool::read` of page `page`, running `inner` inside the
    /// read (after loading the page's first byte).
    ReadWhile {
        page: u8,
        inner: Inner,
    },
}

/// What can run inside an optimistic read.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Inner {
    Alloc,
    Clone(u8),
    Drop(u8),
    Write { h: u8, off: u16, byte: u8 },
    Lookup { page: u8, off: u16 },
}

impl Inner {
    fn op(self) -> PoolOp {
        match self {
            Inner::Alloc => PoolOp::Alloc,
            Inner::Clone(h) => PoolOp::Clone(h),
            Inner::Drop(h) => PoolOp::Drop(h),
            Inner::Write { h, off, byte } => PoolOp::Write { h, off, byte },
            Inner::Lookup { page, off } => PoolOp::Lookup { page, off },
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 1..=16 pages.
    pages: u8,
    /// 4 KiB or 8 KiB pages.
    big_pages: bool,
    /// First try to build a pool of this many bytes: a bad size must be a
    /// typed error, never a panic.
    odd_size: Option<u16>,
    /// `PoolOptions::optimistic_reads`: pages are then written through
    /// `DevicePage::writer`, and `as_mut_slice` is always `None`.
    optimistic: bool,
    ops: Vec<PoolOp>,
}

#[derive(Debug, Clone, Copy, Default)]
struct PageModel {
    count: u32,
    /// Set by a successful `as_mut_slice`, cleared by any `&self` use of
    /// the page's (only) handle or when the page is freed.
    exclusive: bool,
    /// Bumped whenever an optimistic reader must see a change: the page
    /// was freed, allocated or written through a writer.
    version: u64,
}

#[derive(Debug)]
struct Model {
    page_size: usize,
    pages: Vec<PageModel>,
    mem: Vec<u8>,
    shutdown: bool,
    complete: bool,
    optimistic: bool,
}

impl Model {
    fn allocated(&self) -> usize {
        self.pages.iter().filter(|p| p.count > 0).count()
    }

    fn held(&self) -> Vec<usize> {
        (0..self.pages.len())
            .filter(|&i| self.pages[i].count > 0)
            .collect()
    }

    fn len(&self) -> usize {
        self.mem.len()
    }

    fn maybe_complete(&mut self) {
        if self.shutdown && self.allocated() == 0 {
            self.complete = true;
        }
    }
}

struct Run {
    pool: Option<DevicePagePool>,
    base: usize,
    m: Model,
    held: Vec<DevicePage>,
    handles: Vec<ShutdownHandle>,
}

impl Run {
    fn pick(&self, h: u8) -> Option<usize> {
        (!self.held.is_empty()).then(|| h as usize % self.held.len())
    }

    fn step(&mut self, op: PoolOp) {
        let ps = self.m.page_size;
        match op {
            PoolOp::Alloc => {
                let Some(pool) = &self.pool else { return };
                if self.held.len() >= 64 {
                    return;
                }
                let got = pool.alloc();
                if self.m.shutdown {
                    assert!(
                        matches!(got, Err(PoolError::ShuttingDown { .. })),
                        "alloc: {got:?}"
                    );
                } else if self.m.allocated() == self.m.pages.len() {
                    let n = self.m.pages.len();
                    assert!(
                        matches!(got, Err(PoolError::Exhausted { pages, .. }) if pages == n),
                        "alloc of a full pool: {got:?}"
                    );
                } else {
                    let page = got.expect("alloc with free pages");
                    let i = page.index();
                    assert_eq!(self.m.pages[i].count, 0, "alloc handed out held page {i}");
                    assert_eq!(page.size(), ps);
                    assert_eq!(page.as_ptr() as usize, self.base + i * ps, "page address");
                    assert!(
                        page.as_slice() == &self.m.mem[i * ps..(i + 1) * ps],
                        "page {i} contents changed while free"
                    );
                    self.m.pages[i] = PageModel {
                        count: 1,
                        exclusive: false,
                        version: self.m.pages[i].version + 1,
                    };
                    self.held.push(page);
                }
            }
            PoolOp::Clone(h) => {
                let Some(k) = self.pick(h) else { return };
                if self.held.len() >= 64 {
                    return;
                }
                let c = self.held[k].clone();
                let p = &mut self.m.pages[c.index()];
                p.count += 1;
                p.exclusive = false;
                self.held.push(c);
            }
            PoolOp::Drop(h) => {
                let Some(k) = self.pick(h) else { return };
                let page = self.held.swap_remove(k);
                let i = page.index();
                drop(page);
                let p = &mut self.m.pages[i];
                p.count -= 1;
                if p.count == 0 {
                    p.exclusive = false;
                    p.version += 1;
                    self.m.maybe_complete();
                }
            }
            PoolOp::Write { h, off, byte } => {
                let Some(k) = self.pick(h) else { return };
                let page = &mut self.held[k];
                let i = page.index();
                let off = off as usize % ps;
                let unique = self.m.pages[i].count == 1;
                if self.m.optimistic {
                    assert!(
                        page.as_mut_slice().is_none(),
                        "&mut [u8] in an optimistic pool"
                    );
                    match page.writer() {
                        Some(mut w) => {
                            assert!(unique, "writer on a shared page {i}");
                            w.write(off, &[byte]).expect("in range");
                            assert!(
                                matches!(w.write(ps, &[byte]), Err(PoolError::OutOfRange { .. })),
                                "writer past the end"
                            );
                            self.m.mem[i * ps + off] = byte;
                            self.m.pages[i].version += 1;
                        }
                        None => assert!(!unique, "writer refused the only reference of {i}"),
                    }
                    return self.check();
                }
                match page.as_mut_slice() {
                    Some(s) => {
                        assert!(unique, "as_mut_slice on a shared page {i}");
                        s[off] = byte;
                        self.m.mem[i * ps + off] = byte;
                        self.m.pages[i].exclusive = true;
                    }
                    None => assert!(!unique, "as_mut_slice refused the only reference of {i}"),
                }
            }
            PoolOp::Read { h, off } => {
                let Some(k) = self.pick(h) else { return };
                let page = &self.held[k];
                let i = page.index();
                let off = off as usize % ps;
                assert_eq!(
                    page.as_slice()[off],
                    self.m.mem[i * ps + off],
                    "page {i} byte {off}"
                );
                assert_eq!(page.ref_count(), self.m.pages[i].count, "page {i} count");
                assert_eq!(page.is_unique(), self.m.pages[i].count == 1);
                self.m.pages[i].exclusive = false;
            }
            PoolOp::PersistPage { h, start, end } => {
                let Some(k) = self.pick(h) else { return };
                let page = &self.held[k];
                let (start, end) = (start as usize % (ps + 2), end as usize % (ps + 2));
                let got = page.persist_range(start..end);
                self.m.pages[page.index()].exclusive = false;
                if start > end || end > ps {
                    assert!(
                        matches!(got, Err(PoolError::OutOfRange { len, .. }) if len == ps),
                        "page persist {start}..{end}: {got:?}"
                    );
                } else {
                    assert!(got.is_ok(), "page persist {start}..{end}: {got:?}");
                }
            }
            PoolOp::PersistPool { start, end } => {
                let Some(pool) = &self.pool else { return };
                let len = self.m.len();
                let (start, end) = (start as usize % (len + 2), end as usize % (len + 2));
                let got = pool.persist_range(start..end);
                if start > end || end > len {
                    assert!(
                        matches!(got, Err(PoolError::OutOfRange { .. })),
                        "pool persist {start}..{end}: {got:?}"
                    );
                } else if self.m.complete {
                    assert!(
                        matches!(got, Err(PoolError::ShuttingDown { .. })),
                        "persist of an unmapped pool: {got:?}"
                    );
                } else {
                    assert!(got.is_ok(), "pool persist {start}..{end}: {got:?}");
                }
            }
            PoolOp::Lookup { page, off } => {
                if self.held.len() >= 64 {
                    return;
                }
                let addr = self.base + page as usize * ps + off as usize % ps;
                let got = DevicePagePool::lookup(addr as *const u8);
                let i = page as usize;
                if self.m.complete || i >= self.m.pages.len() {
                    assert!(
                        matches!(got, Err(PoolError::NotMapped { addr: a }) if a == addr),
                        "lookup of an unmapped address: {got:?}"
                    );
                } else if self.m.shutdown {
                    assert!(
                        matches!(got, Err(PoolError::ShuttingDown { .. })),
                        "lookup while shutting down: {got:?}"
                    );
                } else if self.m.pages[i].count == 0 {
                    assert!(
                        matches!(got, Err(PoolError::PageNotAllocated { index, .. }) if index == i),
                        "lookup of free page {i}: {got:?}"
                    );
                } else if self.m.pages[i].exclusive {
                    assert!(
                        matches!(got, Err(PoolError::PageBusy { index }) if index == i),
                        "lookup of a page held for writing: {got:?}"
                    );
                } else {
                    let p = got.expect("lookup of an allocated page");
                    assert_eq!(p.index(), i);
                    self.m.pages[i].count += 1;
                    assert_eq!(p.ref_count(), self.m.pages[i].count);
                    self.held.push(p);
                }
            }
            PoolOp::Shutdown => {
                let Some(pool) = &self.pool else { return };
                if self.handles.len() >= 4 {
                    return;
                }
                self.handles.push(pool.shutdown());
                self.m.shutdown = true;
                self.m.maybe_complete();
            }
            PoolOp::WaitTimeout(h) => {
                if self.handles.is_empty() {
                    return;
                }
                let handle = &self.handles[h as usize % self.handles.len()];
                match handle.wait_timeout(Duration::ZERO) {
                    Ok(report) => {
                        assert!(self.m.complete, "wait_timeout: complete too early");
                        assert_eq!(report.pages, self.m.pages.len());
                        assert_eq!(report.bytes, self.m.len());
                        assert!(report.persist_error.is_none(), "{report:?}");
                    }
                    Err(still) => {
                        assert!(!self.m.complete, "wait_timeout: not complete: {still}");
                        assert_eq!(still.count, self.m.allocated());
                        assert_eq!(still.indices, self.m.held());
                    }
                }
                assert_eq!(handle.held(), self.m.held());
            }
            PoolOp::OptimisticRead { page, off, len } => {
                let i = page as usize;
                let addr = self.base + i * ps;
                let (off, len) = (off as usize % (ps + 2), len as usize);
                let got = DevicePagePool::read(addr as *const u8, |v| {
                    assert_eq!((v.index(), v.len()), (i, ps));
                    let mut buf = vec![0u8; len];
                    v.read_into(off, &mut buf).map(|()| buf)
                });
                match self.read_error(i, addr) {
                    Some(want) => assert_eq!(
                        std::mem::discriminant(&got.unwrap_err()),
                        std::mem::discriminant(&want),
                        "optimistic read of page {i}"
                    ),
                    None => {
                        let got = got.expect("optimistic read of an allocated page");
                        if off + len > ps {
                            assert!(
                                matches!(got, Err(PoolError::OutOfRange { len: l, .. }) if l == ps),
                                "read past the page: {got:?}"
                            );
                        } else {
                            let at = i * ps + off;
                            assert!(
                                got.expect("in range") == self.m.mem[at..at + len],
                                "optimistic read of page {i} at {off}"
                            );
                        }
                    }
                }
            }
            PoolOp::ReadWhile { page, inner } => {
                let i = page as usize;
                let addr = self.base + i * ps;
                let want_err = self.read_error(i, addr);
                let before = (i < self.m.pages.len()).then(|| self.m.pages[i].version);
                let mut ran = false;
                let got = DevicePagePool::read(addr as *const u8, |v| {
                    ran = true;
                    let first = v.read_u8(0).expect("in range");
                    self.step(inner.op());
                    first
                });
                assert_eq!(ran, want_err.is_none(), "closure ran: {got:?}");
                match want_err {
                    Some(want) => assert_eq!(
                        std::mem::discriminant(&got.unwrap_err()),
                        std::mem::discriminant(&want),
                        "read of page {i}"
                    ),
                    None => {
                        let changed = before != Some(self.m.pages[i].version);
                        match got {
                            Ok(first) => {
                                assert!(!changed, "a read across a change of page {i} succeeded");
                                assert_eq!(first, self.m.mem[i * ps], "page {i} byte 0");
                            }
                            Err(PoolError::PageChanged { index }) => {
                                assert_eq!(index, i);
                                assert!(changed, "page {i} reported changed, but was not");
                            }
                            Err(e) => panic!("read of page {i} around {inner:?}: {e:?}"),
                        }
                    }
                }
            }
            PoolOp::DropPool => {
                if self.pool.take().is_some() {
                    self.m.shutdown = true;
                    self.m.maybe_complete();
                }
            }
        }
        self.check();
    }

    /// The error an optimistic read of page `i` at `addr` must get now, or
    /// `None` if it reads.
    fn read_error(&self, i: usize, addr: usize) -> Option<PoolError> {
        let path = std::path::PathBuf::from("anonymous");
        if self.m.complete || i >= self.m.pages.len() {
            Some(PoolError::NotMapped { addr })
        } else if self.m.shutdown {
            Some(PoolError::ShuttingDown { path })
        } else if !self.m.optimistic {
            Some(PoolError::OptimisticReadsDisabled { path })
        } else if self.m.pages[i].count == 0 {
            Some(PoolError::PageNotAllocated { addr, index: i })
        } else {
            None
        }
    }

    fn check(&self) {
        let m = &self.m;
        if let Some(pool) = &self.pool {
            let st = pool.stats();
            assert_eq!(st.pages, m.pages.len());
            assert_eq!(st.allocated, m.allocated(), "allocated pages");
            assert_eq!(st.free + st.allocated, st.pages, "pages lost: {st:?}");
            assert_eq!(pool.is_shutting_down(), m.shutdown);
        }
        for h in &self.handles {
            assert_eq!(h.is_complete(), m.complete, "shutdown completion");
        }
        assert!(!m.complete || self.held.is_empty());
    }
}

fuzz_target!(|input: Input| {
    if let Some(sz) = input.odd_size {
        match DevicePagePool::anonymous(sz as usize) {
            Ok(pool) => {
                assert!(
                    sz != 0 && (sz as usize).is_multiple_of(4096),
                    "accepted size {sz}"
                );
                assert_eq!(pool.len(), sz as usize);
            }
            Err(e) => {
                assert!(
                    sz == 0 || !(sz as usize).is_multiple_of(4096),
                    "refused size {sz}: {e}"
                );
                let _ = e.to_string();
            }
        }
    }
    let page_size = if input.big_pages { 8192 } else { 4096 };
    let n = 1 + input.pages as usize % 16;
    let mut opts = PoolOptions::new().page_size(page_size);
    if input.optimistic {
        opts = opts.optimistic_reads();
    }
    let pool = DevicePagePool::anonymous_with(n * page_size, &opts).expect("anonymous pool");
    let base = pool.as_ptr() as usize;
    assert_eq!((pool.page_count(), pool.page_size()), (n, page_size));
    let mut run = Run {
        pool: Some(pool),
        base,
        m: Model {
            page_size,
            pages: vec![PageModel::default(); n],
            mem: vec![0; n * page_size],
            shutdown: false,
            complete: false,
            optimistic: input.optimistic,
        },
        held: Vec::new(),
        handles: Vec::new(),
    };
    run.check();
    for &op in input.ops.iter().take(512) {
        run.step(op);
    }
    // Tear down: keep a handle, drop the pool, then every page; the last
    // page drop must complete the shutdown.
    if let Some(pool) = &run.pool {
        run.handles.push(pool.shutdown());
        run.m.shutdown = true;
        run.m.maybe_complete();
    }
    run.step(PoolOp::DropPool);
    while !run.held.is_empty() {
        assert!(!run.m.complete);
        run.step(PoolOp::Drop(0));
    }
    assert!(run.m.complete);
    for h in &run.handles {
        let report = h.wait_timeout(Duration::ZERO).expect("complete");
        assert_eq!(report.pages, n);
    }
    run.step(PoolOp::Lookup { page: 0, off: 0 });
});
