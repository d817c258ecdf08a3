//! Tests of the rseq module: the fallback everywhere, and on the rseq tier
//! chaos tests of every sequence — threads adding, pushing and popping
//! while a chaos thread migrates them between the cores asynchronously
//! (`sched_setaffinity` on their thread ids, so a migration lands anywhere
//! inside a sequence), oversubscribes the cores (preemption) and sends them
//! signals whose handler runs sequences itself, while an owner closes
//! gates, fences, harvests and reassigns columns. Every count is checked
//! exactly, and every test runs under a watchdog, so a hang (a sequence
//! that never completes, a gate never opened) fails instead of stalling.
//!
//! The owner in the gate tests also drops the arena's page-table entries
//! (`MADV_DONTNEED` on shared memory: the values stay) right before it
//! closes the gate, so adders take a minor page fault on their commit:
//! they sit inside their sequence, past the limit check, for microseconds
//! without being preempted. Only `membarrier` turns that into an abort; a
//! plain fence would let the commit land after the owner read the slots.
//!
//! # Mutants
//!
//! Each mutant below was applied to a scratch copy of `x86_64.rs` and the
//! chaos tests (`cargo test --lib -- chaos dax::free`, debug) run 4 times
//! on a 2-vCPU Intel Xeon (KVM); not part of CI. Rerun them after
//! any change to a sequence or to these tests.
//!
//! | mutant (how it was made) | failing tests, runs out of 4 |
//! |---|---|
//! | no `rseq_cs` store (the arming `mov fs:[off + 8]` deleted from the frame) | `adds_are_exact…` 4, `stacks_are_exact…` 4, `column_reassignment…` 3, `gate_and_fence…` 1 |
//! | limit read before `start` (`g.limit` loaded in Rust, the `cmp` against that register) | `gate_and_fence…` 4, `column_reassignment…` 1 |
//! | `fence_all_cpus` a `SeqCst` fence instead of `membarrier` | `gate_and_fence…` 4, `column_reassignment…` 4 |
//! | commit not the last instruction (a `nop` between the commit and `post`) | `adds_are_exact…` 4, `gate_and_fence…` 4, `column_reassignment…` 4 |
//! | column read outside the sequence (`g.column` loaded in Rust, added from a register) | `column_reassignment…` 4 |
//! | stack pop's `len`/`gate` word read before arming | `stacks_are_exact…` 4 |
//!
//! Without the page-fault stall the fence mutant passed every run, and
//! without the minimum number of chaos rounds in the gate tests the
//! missing `rseq_cs` store went unnoticed in 1 run of 3.
//!
//! The same mutants of `aarch64.rs` (the fence one of `glibc.rs`), built
//! for aarch64 (debug) and run with `-- chaos dax::free` in the emulated
//! guest (`scripts/arm64-vm.sh`: 4 vCPUs, QEMU TCG on the same 2-vCPU Intel
//! Xeon KVM host), twice in the default mode and once or twice with
//! `--one-insn-per-tb`; not part of CI. Tests are named as above; `free`
//! is a `dax::free` test on the stacks.
//!
//! | mutant | default TCG, of 2 | `--one-insn-per-tb` |
//! |---|---|---|
//! | no `rseq_cs` store | `gate_and_fence…` 2, `column_reassignment…` 2, `adds_are_exact…` 1 | of 2: `adds_are_exact…` 2, `gate_and_fence…` 2, `column_reassignment…` 2, `stacks_are_exact…` 1, `free` 1 |
//! | limit read before `start` | `gate_and_fence…` 2, `column_reassignment…` 2 | of 1: `gate_and_fence…`, `column_reassignment…` |
//! | `fence_all_cpus` a `SeqCst` fence | `gate_and_fence…` 2, `column_reassignment…` 2, `stacks_are_exact…` 1 | of 1: `gate_and_fence…`, `column_reassignment…`, `stacks_are_exact…` |
//! | commit not the last instruction (a `nop` after the `str`) | **none** | of 2: `adds_are_exact…` 2, `gate_and_fence…` 2, `column_reassignment…` 2, `stacks_are_exact…` 2 |
//! | column read outside the sequence | `column_reassignment…` 2 | of 1: `column_reassignment…` |
//! | stack pop's `len`/`gate` read before arming | `stacks_are_exact…` 2 | of 1: `stacks_are_exact…`, `free` |
//! | every gate read with `ldr` instead of `ldar` | **none** | of 1: **none** |
//!
//! TCG takes interrupts only between translation blocks, which end at
//! branches, so by default nothing interrupts a thread between its commit
//! and the `nop` behind it; with one instruction per block every boundary
//! is an interrupt point, and CI runs the chaos tests that way too. The
//! `ldar` mutant cannot fail in this guest in either mode: TCG runs the
//! guest's loads as x86 loads, which the host keeps in order (TSO). The
//! written argument in the module docs is what covers that barrier; it
//! needs arm64 hardware to be tested.

use super::*;
use std::ffi::OsStr;

#[test]
fn env_parsing() {
    let forced = |v: &str| portable_forced_by(Some(OsStr::new(v)));
    assert!(!portable_forced_by(None));
    for yes in ["1", "true", "TRUE", " yes\n", "On"] {
        assert!(forced(yes), "{yes:?}");
    }
    for no in ["", "0", "false", "no", "off", "2", "portable"] {
        assert!(!forced(no), "{no:?}");
    }
}

// Loom's atomics exist only inside a model, and have no `as_ptr`.
#[cfg(not(percpu_ref_model))]
#[test]
fn fallback_adds_nothing() {
    use crate::sync::Ordering::SeqCst;
    let slot = AtomicI64::new(5);
    let gate = Gate::new(0);
    gate.column.store(slot.as_ptr().cast(), SeqCst);
    gate.limit.store(u32::MAX, SeqCst);
    assert!(!fallback::available());
    assert_eq!(fallback::current_cpu(), None);
    // SAFETY: the fallback touches no memory.
    unsafe {
        assert!(!fallback::add_imm::<1>(&gate));
        assert!(!fallback::add(&gate, 3));
    }
    assert_eq!(slot.load(SeqCst), 5);
    fallback::fence_all_cpus();
}

#[test]
fn init_is_idempotent() {
    assert_eq!(init(), rseq_available());
    assert_eq!(init(), rseq_available());
    fence_all_cpus();
    if let Some(cpu) = current_cpu() {
        assert!(cpu < crate::sys::cpu::possible());
    }
}

#[cfg(not(percpu_ref_model))]
#[test]
fn gate_debug_names_fields() {
    let s = format!("{:?}", Gate::new(7));
    assert!(s.contains("limit: 0") && s.contains("word: 7"), "{s}");
}

#[cfg(percpu_ref_rseq)]
mod chaos {
    use super::super::*;
    use crate::sync::{AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicUsize, Ordering::*};
    use std::sync::Mutex;
    use std::time::Duration;

    const COLS: usize = ROW_STRIDE / 8;

    /// One CPU's row of a test slot arena, like `percpu::slots`.
    #[repr(align(128))]
    struct Row([AtomicI64; COLS]);

    /// A slot arena with one row per possible CPU and [`COLS`] columns, in
    /// shared anonymous memory, so [`Arena::evict`] can make the next
    /// access of every slot fault without losing the values.
    struct Arena {
        base: std::ptr::NonNull<Row>,
        rows: usize,
        bytes: usize,
    }

    // SAFETY: the mapping is owned by the arena and only accessed through
    // `&[Row]` (atomics) while it lives; unmapped in `drop`.
    unsafe impl Send for Arena {}
    // SAFETY: as for `Send`: every access is atomic.
    unsafe impl Sync for Arena {}

    impl Arena {
        fn new() -> Self {
            let rows = crate::sys::cpu::possible();
            let bytes = (rows * ROW_STRIDE).next_multiple_of(4096);
            // SAFETY: a fresh shared anonymous mapping; no address hint.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap of the test arena");
            Arena {
                base: std::ptr::NonNull::new(p.cast()).unwrap(),
                rows,
                bytes,
            }
        }
        fn rows(&self) -> &[Row] {
            // SAFETY: the mapping holds `rows` zero-initialised, page-aligned
            // (so 128-aligned) rows of atomics, alive as long as `self`.
            unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.rows) }
        }
        /// Drop the arena's page-table entries: the values stay (shared
        /// memory), but the next access of any slot takes a minor page
        /// fault. A sequence that faults on its commit sits inside its
        /// range, past the limit check, for microseconds without being
        /// preempted: exactly the adder a fence must catch.
        fn evict(&self) {
            // SAFETY: our own mapping; MADV_DONTNEED on shared memory keeps
            // the contents.
            let r = unsafe {
                libc::madvise(self.base.as_ptr().cast(), self.bytes, libc::MADV_DONTNEED)
            };
            assert_eq!(r, 0, "madvise(MADV_DONTNEED)");
        }
        fn col_ptr(&self, col: usize) -> *mut AtomicI64 {
            self.rows()[0].0[col].as_ptr().cast()
        }
        /// Every row's slot `col`.
        fn column(&self, col: usize) -> Vec<i64> {
            self.rows().iter().map(|r| r.0[col].load(SeqCst)).collect()
        }
        fn sum(&self, col: usize) -> i64 {
            self.column(col).iter().sum()
        }
        fn zero(&self, col: usize) {
            for r in self.rows() {
                r.0[col].store(0, SeqCst);
            }
        }
        /// A gate open on column `col`.
        fn gate(&self, col: usize) -> Gate {
            let g = Gate::new(0);
            self.open(&g, col);
            g
        }
        /// The open protocol: column, then the limit with Release.
        fn open(&self, g: &Gate, col: usize) {
            g.column.store(self.col_ptr(col), Relaxed);
            g.limit.store(self.rows as u32, Release);
        }
    }

    impl Drop for Arena {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no reference into it outlives `self`.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
        }
    }

    /// The close protocol: limit 0, then the fence.
    fn close(g: &Gate) {
        g.limit.store(0, SeqCst);
        fence_all_cpus();
    }

    /// `+D` through the sequence on `g`, whose arena outlives every caller
    /// and whose slots are written only by the sequences or while closed.
    fn add_imm_on<const D: i64>(g: &Gate) -> bool {
        // SAFETY: the tests checked rseq_available(); every gate is opened
        // on an `Arena` column (a row per possible CPU, 8-aligned slots,
        // written only by the sequences or after `close`), and the owner
        // follows the open/close protocol.
        unsafe { add_imm::<D>(g) }
    }

    fn add_on(g: &Gate, d: i64) -> bool {
        // SAFETY: as in `add_imm_on`.
        unsafe { add(g, d) }
    }

    fn add_imm_in_on<const D: i64>(g: &Gate) -> bool {
        let area = Area::get().expect("the tests checked rseq_available()");
        // SAFETY: as in `add_imm_on`.
        unsafe { add_imm_in::<D>(area, g) }
    }

    fn add_in_on(g: &Gate, d: i64) -> bool {
        let area = Area::get().expect("the tests checked rseq_available()");
        // SAFETY: as in `add_imm_on`.
        unsafe { add_in(area, g, d) }
    }

    /// `true` where the rseq tier is available; otherwise the test is
    /// skipped, unless `PERCPU_REF_EXPECT_TIER=rseq` says it must be
    /// available (CI sets it where it is, e.g. in the arm64 guest), and
    /// then the test fails instead of passing without running.
    fn rseq_or_skip() -> bool {
        let ok = rseq_available();
        if !ok {
            let expect = std::env::var("PERCPU_REF_EXPECT_TIER").unwrap_or_default();
            assert!(
                !expect.trim().eq_ignore_ascii_case("rseq"),
                "PERCPU_REF_EXPECT_TIER=rseq but the rseq tier is unavailable"
            );
            eprintln!("rseq tier unavailable here (old glibc/kernel or forced portable): skipped");
        }
        ok
    }

    fn core_ids() -> Vec<core_affinity::CoreId> {
        core_affinity::get_core_ids().unwrap_or_default()
    }

    // ---- the signal handler and what it does -------------------------

    static SIGNALS: AtomicUsize = AtomicUsize::new(0);
    /// What the handler runs besides counting (a `fn()`, or null).
    static HOOK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
    /// The gate [`hook_add`] adds to.
    static HOOK_GATE: AtomicPtr<Gate> = AtomicPtr::new(std::ptr::null_mut());
    static HOOK_ADDS: AtomicI64 = AtomicI64::new(0);
    static HOOK_REFUSED: AtomicI64 = AtomicI64::new(0);
    /// The stacks [`hook_stack`] pops from and pushes to.
    static HOOK_STACKS: AtomicPtr<CpuStacks> = AtomicPtr::new(std::ptr::null_mut());
    /// Items the handler popped and could not push back (`u32::MAX`: empty).
    static PARKED: [AtomicU32; 1024] = [const { AtomicU32::new(u32::MAX) }; 1024];

    /// SIGURG (ignored by default elsewhere) with a handler that counts and
    /// runs [`HOOK`]: a signal storm interrupts sequences, and the handler
    /// runs sequences of its own inside the interrupted ones.
    fn install_sigurg_handler() {
        extern "C" fn on_sigurg(_: libc::c_int) {
            SIGNALS.fetch_add(1, SeqCst);
            let h = HOOK.load(SeqCst);
            if !h.is_null() {
                // SAFETY: only `fn()` values are stored in HOOK.
                let f = unsafe { std::mem::transmute::<*mut (), fn()>(h) };
                f();
            }
        }
        // SAFETY: a zeroed sigaction is valid; the handler does atomic
        // operations and rseq sequences only (async-signal-safe: no locks,
        // no allocation) and never unwinds.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigurg as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()), 0);
        }
    }

    /// In the handler: `+1` on [`HOOK_GATE`], counted.
    fn hook_add() {
        let g = HOOK_GATE.load(SeqCst);
        // SAFETY: `under_chaos` keeps the gate alive while it is installed.
        if !g.is_null() && add_imm_on::<1>(unsafe { &*g }) {
            HOOK_ADDS.fetch_add(1, SeqCst);
        } else {
            HOOK_REFUSED.fetch_add(1, SeqCst);
        }
    }

    /// In the handler: pop an item of [`HOOK_STACKS`] and push it back, or
    /// park it if the push is refused.
    fn hook_stack() {
        let s = HOOK_STACKS.load(SeqCst);
        if s.is_null() {
            return;
        }
        // SAFETY: `under_chaos` keeps the stacks alive while installed.
        let s = unsafe { &*s };
        if let Some(i) = s.pop() {
            if !s.push(i) {
                let parked = PARKED
                    .iter()
                    .any(|p| p.compare_exchange(u32::MAX, i, SeqCst, SeqCst).is_ok());
                if !parked {
                    // Cannot happen with the test sizes; never lose an item
                    // silently.
                    std::process::abort();
                }
            }
        }
    }

    fn take_parked() -> Vec<u32> {
        PARKED
            .iter()
            .map(|p| p.swap(u32::MAX, SeqCst))
            .filter(|&i| i != u32::MAX)
            .collect()
    }

    /// What the signal handler does during one `under_chaos` run.
    enum Hook<'a> {
        /// `+1` on this gate (counted in [`Chaos::hook_adds`]).
        AddTo(&'a Gate),
        /// `+1` on a private gate, checked by `under_chaos` itself.
        AddPrivate,
        /// Pop and push back on these stacks.
        Stack(&'a CpuStacks),
    }

    #[derive(Debug)]
    struct Chaos {
        migrations: usize,
        signals: usize,
        hook_adds: i64,
        hook_refused: i64,
    }

    /// Chaos runs one at a time: they share the handler statics, and two at
    /// once on two cores would mostly disturb each other's scheduling.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// A run that takes longer than this is a hang.
    const WATCHDOG: Duration = Duration::from_secs(240);

    /// Run `body(t, rounds)` for `t in 0..threads`, each on its own thread,
    /// under chaos (module docs) until every body returned; `rounds` counts
    /// the chaos rounds so far, so bodies can run until enough happened.
    /// The signal handler does `hook`. Aborts the process if the run takes
    /// longer than [`WATCHDOG`].
    fn under_chaos(
        threads: usize,
        hook: Hook<'_>,
        body: impl Fn(usize, &AtomicUsize) + Sync,
    ) -> Chaos {
        let _one = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        install_sigurg_handler();
        let private = Arena::new();
        let private_gate = private.gate(0);
        let hook_fn: fn() = match hook {
            Hook::AddTo(g) => {
                HOOK_GATE.store(std::ptr::from_ref(g).cast_mut(), SeqCst);
                hook_add
            }
            Hook::AddPrivate => {
                HOOK_GATE.store(std::ptr::from_ref(&private_gate).cast_mut(), SeqCst);
                hook_add
            }
            Hook::Stack(s) => {
                HOOK_STACKS.store(std::ptr::from_ref(s).cast_mut(), SeqCst);
                hook_stack
            }
        };
        HOOK_ADDS.store(0, SeqCst);
        HOOK_REFUSED.store(0, SeqCst);
        HOOK.store(hook_fn as *mut (), SeqCst);
        let signals_before = SIGNALS.load(SeqCst);

        let (alive, watchdog) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(WATCHDOG)
            {
                eprintln!("chaos run still going after {WATCHDOG:?}: a hang; aborting");
                std::process::abort();
            }
        });

        let cores = core_ids();
        let targets = Mutex::new(Vec::new());
        let finished = AtomicUsize::new(0);
        let chaos_over = AtomicBool::new(false);
        let rounds = AtomicUsize::new(0);
        let mut migrations = 0;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (body, targets, rounds) = (&body, &targets, &rounds);
                let (finished, chaos_over) = (&finished, &chaos_over);
                s.spawn(move || {
                    // Counted as finished even if `body` panics, so the chaos
                    // thread (and the scope) still ends.
                    struct Done<'a>(&'a AtomicUsize, &'a AtomicBool);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_add(1, SeqCst);
                            // Stay alive (a valid kill/affinity target, tid not
                            // reused) until the chaos thread is done with us.
                            while !self.1.load(SeqCst) {
                                std::thread::yield_now();
                            }
                        }
                    }
                    // SAFETY: pthread_self has no preconditions.
                    let me = (unsafe { libc::pthread_self() }, rustix::thread::gettid());
                    targets.lock().unwrap().push(me);
                    let _done = Done(finished, chaos_over);
                    body(t, rounds);
                });
            }
            s.spawn(|| {
                for round in 0usize.. {
                    let done = finished.load(SeqCst) == threads;
                    for (k, &(pthread, tid)) in targets.lock().unwrap().iter().enumerate() {
                        if cores.len() > 1 {
                            let mut set = rustix::thread::CpuSet::new();
                            set.set(cores[(k + round) % cores.len()].id);
                            migrations += usize::from(
                                rustix::thread::sched_setaffinity(Some(tid), &set).is_ok(),
                            );
                        }
                        if round % 4 == 0 {
                            // SAFETY: every registered thread stays alive
                            // until `chaos_over` is set below.
                            unsafe { libc::pthread_kill(pthread, libc::SIGURG) };
                        }
                    }
                    if done {
                        break;
                    }
                    rounds.fetch_add(1, SeqCst);
                    std::thread::sleep(Duration::from_micros(20));
                }
                chaos_over.store(true, SeqCst);
            });
        });
        // Every signalled thread has exited: no handler runs any more.
        HOOK.store(std::ptr::null_mut(), SeqCst);
        HOOK_GATE.store(std::ptr::null_mut(), SeqCst);
        HOOK_STACKS.store(std::ptr::null_mut(), SeqCst);
        drop(alive);
        let chaos = Chaos {
            migrations,
            signals: SIGNALS.load(SeqCst) - signals_before,
            hook_adds: HOOK_ADDS.load(SeqCst),
            hook_refused: HOOK_REFUSED.load(SeqCst),
        };
        if let Hook::AddPrivate = hook {
            assert_eq!(
                private.sum(0),
                chaos.hook_adds,
                "the signal handler's own adds are not exact"
            );
            assert_eq!(chaos.hook_refused, 0, "an open gate refused the handler");
        }
        chaos
    }

    #[test]
    fn current_cpu_matches_sched_getcpu_when_pinned() {
        if current_cpu().is_none() {
            eprintln!("no rseq area registered: skipped");
            return;
        }
        for core in core_ids() {
            std::thread::spawn(move || {
                if !core_affinity::set_for_current(core) {
                    eprintln!("cannot pin to {core:?}: skipped");
                    return;
                }
                for _ in 0..100 {
                    let c = current_cpu();
                    assert_eq!(c, Some(rustix::thread::sched_getcpu()));
                    assert_eq!(c, Some(core.id));
                    assert_eq!(crate::sys::cpu::current(), core.id);
                    std::thread::yield_now();
                }
            })
            .join()
            .unwrap();
        }
    }

    /// Run `f` on a thread pinned to `core`; `false` if pinning failed.
    fn on_core(core: core_affinity::CoreId, f: impl FnOnce() + Send) -> bool {
        std::thread::scope(|s| {
            s.spawn(|| {
                if !core_affinity::set_for_current(core) {
                    eprintln!("cannot pin to {core:?}: skipped");
                    return false;
                }
                f();
                true
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn sequences_add_to_this_cpus_row_and_refuse_when_closed() {
        if !rseq_or_skip() {
            return;
        }
        let arena = Arena::new();
        let g = arena.gate(3);
        let mut pinned = 0;
        for core in core_ids() {
            pinned += i64::from(on_core(core, || {
                let before = arena.column(3)[core.id];
                assert!(add_imm_on::<1>(&g));
                assert!(add_imm_on::<5>(&g));
                assert!(add_imm_on::<-2>(&g));
                assert!(add_on(&g, 1 << 40));
                assert!(add_on(&g, -(1 << 40)));
                assert!(add_imm_in_on::<3>(&g));
                assert!(add_in_on(&g, -3));
                assert_eq!(arena.column(3)[core.id], before + 4, "not this CPU's row");
            }));
        }
        assert_eq!(arena.sum(3), 4 * pinned);
        assert_eq!(
            arena.sum(2) + arena.sum(4),
            0,
            "a neighbouring column moved"
        );
        close(&g);
        assert!(!add_imm_on::<1>(&g));
        assert!(!add_on(&g, 1));
        assert!(!add_imm_in_on::<1>(&g));
        assert!(!add_in_on(&g, 1));
        // A limit of 1 admits CPU 0 only.
        g.limit.store(1, Release);
        for core in core_ids() {
            on_core(core, || assert_eq!(add_imm_on::<1>(&g), core.id == 0));
        }
    }

    /// Threads add through the sequences (`add_imm` of both signs,
    /// `add_imm_in`, `add`)
    /// while migrated, preempted and signalled, and the signal handler adds
    /// to the same column as the interrupted threads.
    #[test]
    fn adds_are_exact_under_migration_and_signals() {
        if !rseq_or_skip() {
            return;
        }
        const THREADS: usize = 4;
        // Each thread does at least MIN_OPS iterations and keeps going until
        // the chaos thread has done MIN_ROUNDS rounds of migrations.
        const MIN_OPS: usize = 100_000;
        const MIN_ROUNDS: usize = if cfg!(debug_assertions) { 100 } else { 500 };
        let arena = Arena::new();
        let (net, count) = (arena.gate(0), arena.gate(1));
        let (ops, expected_net) = (AtomicI64::new(0), AtomicI64::new(0));
        let chaos = under_chaos(THREADS, Hook::AddTo(&count), |_, rounds| {
            let area = Area::get().unwrap();
            let (mut i, mut sum) = (0usize, 0i64);
            while i < MIN_OPS || rounds.load(SeqCst) < MIN_ROUNDS {
                for _ in 0..1000 {
                    // +1 +1 -1 +2 -1 ... on `net`; `count` gets +1 per op,
                    // so a lost or doubled add of either sign shows.
                    let d = match i % 5 {
                        0 => {
                            assert!(add_imm_on::<1>(&net));
                            1
                        }
                        1 => {
                            // SAFETY: as in `add_imm_on`; `area` stays in a
                            // register across the loop, as in a handle.
                            let added = unsafe { add_imm_in::<1>(area, &net) };
                            assert!(added);
                            1
                        }
                        3 => {
                            assert!(add_on(&net, 2));
                            2
                        }
                        _ => {
                            assert!(add_imm_on::<-1>(&net));
                            -1
                        }
                    };
                    assert!(add_imm_on::<1>(&count));
                    (i, sum) = (i + 1, sum + d);
                }
            }
            ops.fetch_add(i as i64, SeqCst);
            expected_net.fetch_add(sum, SeqCst);
        });
        eprintln!(
            "exactness: {} adds, {chaos:?}, per-CPU counts {:?}",
            2 * ops.load(SeqCst) + chaos.hook_adds,
            arena.column(1)
        );
        assert_eq!(chaos.hook_refused, 0);
        assert!(
            chaos.signals > 0 && chaos.hook_adds > 0,
            "no signal handler ran an add"
        );
        assert!(
            chaos.migrations > 0 || core_ids().len() < 2,
            "no thread was migrated"
        );
        assert_eq!(arena.sum(1), ops.load(SeqCst) + chaos.hook_adds);
        assert_eq!(arena.sum(0), expected_net.load(SeqCst));
    }

    /// While the gate is closed and `fence_all_cpus()` has returned, no slot
    /// changes; every refused add is counted elsewhere, so the total stays
    /// exact.
    #[test]
    fn gate_and_fence_stop_every_add() {
        if !rseq_or_skip() {
            return;
        }
        const ADDERS: usize = 3;
        const MIN_OPS: usize = 20_000;
        const ROUNDS: usize = if cfg!(debug_assertions) { 200 } else { 300 };
        // Preemptions and migrations inside sequences while the gate closes
        // are what a missing `rseq_cs` store gets wrong: run long enough.
        const MIN_CHAOS_ROUNDS: usize = 400;
        let arena = Arena::new();
        let gate = arena.gate(2);
        let refused = AtomicI64::new(0);
        let attempted = AtomicI64::new(0);
        let moved_while_closed = AtomicUsize::new(0);
        let switcher_done = AtomicBool::new(false);
        let chaos = under_chaos(ADDERS + 1, Hook::AddPrivate, |t, chaos_rounds| {
            if t == ADDERS {
                // The switcher. Adders run until it is done, even if it panics.
                struct Done<'a>(&'a AtomicBool);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.store(true, SeqCst);
                    }
                }
                let _done = Done(&switcher_done);
                for round in 0.. {
                    if round >= ROUNDS && chaos_rounds.load(SeqCst) >= MIN_CHAOS_ROUNDS {
                        break;
                    }
                    if round % 2 == 0 {
                        // Adders now fault on their next commit, inside
                        // their sequences, as the gate closes.
                        arena.evict();
                    }
                    close(&gate);
                    let snapshot = arena.column(2);
                    let refused_at_close = refused.load(SeqCst);
                    // Hold the gate until an adder has been refused, checking
                    // that no slot moves.
                    for tries in 0..100_000 {
                        if arena.column(2) != snapshot {
                            moved_while_closed.fetch_add(1, SeqCst);
                            break;
                        }
                        if refused.load(SeqCst) > refused_at_close {
                            break;
                        }
                        if tries % 1024 == 1023 {
                            std::thread::yield_now();
                        }
                    }
                    if arena.column(2) != snapshot {
                        moved_while_closed.fetch_add(1, SeqCst);
                    }
                    arena.open(&gate, 2);
                    // Let the adders add for a while.
                    for _ in 0..20_000 {
                        std::hint::spin_loop();
                    }
                }
                return;
            }
            let mut i = 0i64;
            while i < MIN_OPS as i64 || !switcher_done.load(SeqCst) {
                if !add_imm_on::<1>(&gate) {
                    refused.fetch_add(1, SeqCst);
                }
                i += 1;
            }
            attempted.fetch_add(i, SeqCst);
        });
        let refused = refused.load(SeqCst);
        eprintln!(
            "gate: {} attempted, {refused} refused while closed, {chaos:?}",
            attempted.load(SeqCst),
        );
        assert_eq!(
            moved_while_closed.load(SeqCst),
            0,
            "a slot changed while the gate was closed"
        );
        assert!(refused > 0, "the gate never refused an add");
        assert_eq!(arena.sum(2) + refused, attempted.load(SeqCst));
    }

    /// The owner closes the gate, harvests and zeroes the column, and
    /// reopens the gate on *another* column, over and over, while adders
    /// add: no add may land on a column after its gate closed (it would be
    /// lost, or corrupt the column's next user), and harvested + refused
    /// must equal attempted.
    #[test]
    fn column_reassignment_loses_nothing() {
        if !rseq_or_skip() {
            return;
        }
        const ADDERS: usize = 3;
        const MIN_OPS: usize = 20_000;
        const ROUNDS: usize = if cfg!(debug_assertions) { 300 } else { 600 };
        const MIN_CHAOS_ROUNDS: usize = 400;
        let arena = Arena::new();
        let gate = arena.gate(0);
        let current = AtomicUsize::new(0);
        let (refused, attempted, harvested) =
            (AtomicI64::new(0), AtomicI64::new(0), AtomicI64::new(0));
        let dirty = AtomicUsize::new(0);
        let switcher_done = AtomicBool::new(false);
        let chaos = under_chaos(ADDERS + 1, Hook::AddPrivate, |t, chaos_rounds| {
            if t == ADDERS {
                struct Done<'a>(&'a AtomicBool);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.store(true, SeqCst);
                    }
                }
                let _done = Done(&switcher_done);
                for round in 0.. {
                    if round >= ROUNDS && chaos_rounds.load(SeqCst) >= MIN_CHAOS_ROUNDS {
                        break;
                    }
                    if round % 2 == 0 {
                        arena.evict();
                    }
                    close(&gate);
                    let col = current.load(SeqCst);
                    harvested.fetch_add(arena.sum(col), SeqCst);
                    arena.zero(col);
                    let next = (col + 1 + round % 3) % COLS;
                    // A retired column must still be all zero.
                    if arena.column(next).iter().any(|&v| v != 0) {
                        dirty.fetch_add(1, SeqCst);
                        harvested.fetch_add(arena.sum(next), SeqCst);
                        arena.zero(next);
                    }
                    current.store(next, SeqCst);
                    arena.open(&gate, next);
                    for _ in 0..10_000 {
                        std::hint::spin_loop();
                    }
                }
                return;
            }
            let mut i = 0i64;
            while i < MIN_OPS as i64 || !switcher_done.load(SeqCst) {
                if !add_imm_on::<1>(&gate) {
                    refused.fetch_add(1, SeqCst);
                }
                i += 1;
            }
            attempted.fetch_add(i, SeqCst);
        });
        close(&gate);
        let last = current.load(SeqCst);
        harvested.fetch_add(arena.sum(last), SeqCst);
        arena.zero(last);
        let stray: i64 = (0..COLS).map(|c| arena.sum(c)).sum();
        eprintln!(
            "columns: {} attempted, {} refused, {} harvested, {chaos:?}",
            attempted.load(SeqCst),
            refused.load(SeqCst),
            harvested.load(SeqCst)
        );
        assert_eq!(
            dirty.load(SeqCst),
            0,
            "a column was written after its gate closed"
        );
        assert_eq!(
            stray, 0,
            "a retired column was written after its gate closed"
        );
        assert_eq!(
            harvested.load(SeqCst) + refused.load(SeqCst),
            attempted.load(SeqCst)
        );
    }

    #[test]
    fn stacks_push_pop_and_batches_on_one_cpu() {
        if !rseq_or_skip() {
            return;
        }
        let s = CpuStacks::new().unwrap();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                if let Some(&c) = core_ids().first() {
                    core_affinity::set_for_current(c);
                }
                assert_eq!(s.pop(), None);
                for i in 0..CpuStacks::CAP as u32 {
                    assert!(s.push(i));
                }
                assert!(!s.push(99), "a full stack took an item");
                assert!(!s.push_batch(&[1]));
                let mut top = [0; 3];
                assert!(s.pop_batch(&mut top));
                let cap = CpuStacks::CAP as u32;
                assert_eq!(top, [cap - 3, cap - 2, cap - 1]);
                assert!(s.push_batch(&[100, 101, 102]));
                assert!(!s.push_batch(&[1]));
                assert_eq!(s.pop(), Some(102));
                assert_eq!(s.pop(), Some(101));
                assert_eq!(s.pop(), Some(100));
                for i in (0..cap - 3).rev() {
                    assert_eq!(s.pop(), Some(i));
                }
                assert_eq!(s.pop(), None);
                let mut two = [0; 2];
                assert!(!s.pop_batch(&mut two));
                assert!(s.push_batch(&[7, 8]));
                assert!(s.pop_batch(&mut two));
                assert_eq!(two, [7, 8]);
                assert!(s.push(5));
                // Closed gates refuse everything.
                s.with_all_closed(|c| {
                    assert_eq!(s.pop(), None);
                    assert!(!s.push(6));
                    assert!(!s.push_batch(&[6]));
                    let mut got = Vec::new();
                    c.drain_into(&mut got);
                    assert_eq!(got, [5]);
                    assert_eq!(c.push_row(0, &[1, 2]), 0);
                });
                assert_eq!(s.len(), 2);
            });
        });
    }

    /// Items move between threads, CPUs, the stacks, a shared list and the
    /// signal handler, while a drainer closes every gate, takes all items
    /// and puts some back on random rows: none is ever held twice, and all
    /// are there at the end.
    #[test]
    fn stacks_are_exact_under_migration_signals_and_remote_drains() {
        if !rseq_or_skip() {
            return;
        }
        const THREADS: usize = 4;
        const ITEMS: u32 = 300;
        const MIN_OPS: usize = 50_000;
        const MIN_ROUNDS: usize = if cfg!(debug_assertions) { 100 } else { 300 };
        let stacks = CpuStacks::new().unwrap();
        let shared = Mutex::new((0..ITEMS).collect::<Vec<u32>>());
        // 0: free; t + 1: held by thread t.
        let owner: Vec<AtomicU32> = (0..ITEMS).map(|_| AtomicU32::new(0)).collect();
        let drains = AtomicUsize::new(0);
        let double = AtomicUsize::new(0);
        let claim = |t: usize, i: u32| {
            if owner[i as usize].swap(t as u32 + 1, SeqCst) != 0 {
                double.fetch_add(1, SeqCst);
            }
        };
        let release = |t: usize, i: u32| {
            if owner[i as usize].swap(0, SeqCst) != t as u32 + 1 {
                double.fetch_add(1, SeqCst);
            }
        };
        let workers_done = AtomicUsize::new(0);
        let chaos = under_chaos(THREADS + 1, Hook::Stack(&stacks), |t, rounds| {
            if t == THREADS {
                // The drainer: every gate closed, all items out, some back.
                let mut k = 0usize;
                while workers_done.load(SeqCst) < THREADS {
                    let mut shared = shared.lock().unwrap();
                    stacks.with_all_closed(|c| {
                        let mut all = Vec::new();
                        c.drain_into(&mut all);
                        for (n, chunk) in all.chunks(5).enumerate() {
                            if (n + k) % 2 == 0 {
                                let left = c.push_row((n + k) % stacks.rows(), chunk);
                                shared.extend_from_slice(&chunk[chunk.len() - left..]);
                            } else {
                                shared.extend_from_slice(chunk);
                            }
                        }
                    });
                    drop(shared);
                    drains.fetch_add(1, SeqCst);
                    k += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                return;
            }
            let mut held: Vec<u32> = Vec::new();
            let mut i = 0usize;
            while i < MIN_OPS || rounds.load(SeqCst) < MIN_ROUNDS {
                match i % 7 {
                    0..=2 => {
                        let got = stacks.pop().or_else(|| {
                            let mut sh = shared.lock().unwrap();
                            if sh.is_empty() {
                                stacks.with_all_closed(|c| c.drain_into(&mut sh));
                            }
                            sh.pop()
                        });
                        if let Some(p) = got {
                            claim(t, p);
                            held.push(p);
                        }
                    }
                    3 => {
                        let mut buf = [0u32; 4];
                        if stacks.pop_batch(&mut buf) {
                            for &p in &buf {
                                claim(t, p);
                                held.push(p);
                            }
                        }
                    }
                    4 if held.len() >= 3 => {
                        let batch: Vec<u32> = held.drain(held.len() - 3..).collect();
                        for &p in &batch {
                            release(t, p);
                        }
                        if !stacks.push_batch(&batch) {
                            shared.lock().unwrap().extend_from_slice(&batch);
                        }
                    }
                    _ => {
                        if let Some(p) = held.pop() {
                            release(t, p);
                            if !stacks.push(p) {
                                shared.lock().unwrap().push(p);
                            }
                        }
                    }
                }
                i += 1;
            }
            for p in held {
                release(t, p);
                shared.lock().unwrap().push(p);
            }
            workers_done.fetch_add(1, SeqCst);
        });
        let mut all = shared.into_inner().unwrap();
        stacks.with_all_closed(|c| c.drain_into(&mut all));
        all.extend(take_parked());
        all.sort_unstable();
        eprintln!("stacks: {} drains, {chaos:?}", drains.load(SeqCst));
        assert_eq!(double.load(SeqCst), 0, "an item was held twice");
        let missing: Vec<u32> = (0..ITEMS)
            .filter(|i| all.binary_search(i).is_err())
            .collect();
        let mut dup = all.clone();
        dup.dedup();
        assert!(missing.is_empty(), "items lost: {missing:?}");
        assert_eq!(dup.len(), all.len(), "items duplicated");
        assert_eq!(all.len(), ITEMS as usize);
    }

    /// Re-run `child_probe` in a child process with the rseq tier disabled.
    fn run_child(env: (&str, &str)) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["sys::rseq::tests::child_probe", "--exact", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("PERCPU_REF_RSEQ_CHILD", env.0)
            // The child runs without the tier by design.
            .env_remove("PERCPU_REF_EXPECT_TIER")
            .env(
                "PERCPU_REF_RSEQ_AREA",
                if current_cpu().is_some() { "1" } else { "0" },
            )
            .env(env.0, env.1)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("1 passed"),
            "child test did not run: {stdout}"
        );
    }

    #[test]
    fn portable_env_forces_fallback() {
        run_child((PORTABLE_ENV, "1"));
    }

    #[test]
    fn no_glibc_registration_falls_back() {
        run_child(("GLIBC_TUNABLES", "glibc.pthread.rseq=0"));
    }

    /// Chaos tests whose body hangs fail through the watchdog; this checks
    /// the watchdog's plumbing returns promptly when nothing hangs.
    #[test]
    fn chaos_without_work_ends() {
        if !rseq_or_skip() {
            return;
        }
        let t0 = std::time::Instant::now();
        let chaos = under_chaos(2, Hook::AddPrivate, |_, _| {});
        assert!(t0.elapsed() < Duration::from_secs(30), "{chaos:?}");
    }
}

/// Only meaningful in the child spawned by the tests above.
#[test]
fn child_probe() {
    let Ok(which) = std::env::var("PERCPU_REF_RSEQ_CHILD") else {
        return;
    };
    assert!(!rseq_available());
    assert!(!init());
    fence_all_cpus();
    assert!(crate::sys::cpu::current() < crate::sys::cpu::possible());
    if which == "GLIBC_TUNABLES" {
        assert_eq!(current_cpu(), None);
    } else {
        // Forcing the portable tier still lets the CPU id be read.
        let parent_had_area = std::env::var("PERCPU_REF_RSEQ_AREA").as_deref() == Ok("1");
        assert_eq!(current_cpu().is_some(), parent_had_area);
    }
}
