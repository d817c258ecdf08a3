//! Long-form documentation: pages with no code, which explain why the code
//! is right.
//!
//! | page | what |
//! |---|---|
//! | [`internals`] | the `PercpuRef` header, the count, one release per life, column reuse, the switch lock, `PercpuArc` |
//! | [`rseq`] | the restartable sequences of the rseq tier and why an add is neither lost nor doubled (x86_64 and aarch64, memory models included) |
//! | [`limitations`] | what the crate does not do, and the edges of what it does |
//! | [`background`] | the Linux kernel history this design comes from |

/// # Internals of `PercpuRef`
///
/// ## The header (32 bytes)
///
/// | bytes | field | what |
/// |---|---|---|
/// | 4 | `limit` | the rseq tier's gate: CPU rows while counting per CPU, 0 otherwise (read inside every restartable sequence) |
/// | 4 | `state` | flags (mode, dead, releasing, released, ...), the switch lock bit and the parked bit |
/// | 8 | `column` | the slot column while counting per CPU, null otherwise |
/// | 8 | `central` | the shared count (with a bias of 2⁶⁰ while a column counts) |
/// | 4 | `key` | portable tier: the key this ref's slots carry |
/// | 4 | `heat` | adaptive refs: contended updates of the shared count seen |
///
/// The value `T` and the policy `P` follow. A ref counting per CPU also
/// holds a *column*: one 8-byte slot per possible CPU in a process-wide
/// arena (one 128-byte row of slots per CPU, so no two CPUs write the same
/// cache line). Atomic and dead refs hold no column.
///
/// ## The count
///
/// ```text
/// count = central + Σ(slots of the open column) − (BIAS while a column counts)
/// ```
///
/// | step | effect on the sum |
/// |---|---|
/// | get/put that a slot accepts (rseq: the sequence found the gate open; portable: the slot carries the ref's key) | ±1, as wanted |
/// | get/put refused by the slot | 0 there — the adder repeats the ±1 on the central count |
/// | get/put on the central count | ±1, in any mode |
/// | switch to atomic: close the gate (rseq: `limit = 0` then `membarrier`; portable: null the column), then swap every slot to 0 | −v per slot, held in the switcher's local sum |
/// | fold: `central += sum − BIAS`, column given back | +sum, and the bias is gone |
/// | switch to percpu: `central += BIAS`, take a column, reset its slots, publish it, reopen the gate | 0 |
///
/// So **no stale view of the mode can lose or double a count**: where an
/// adder counts is decided by the same step that adds — the restartable
/// sequence reads the gate inside itself and `membarrier` restarts every
/// sequence in flight; a portable compare-exchange succeeds only on a slot
/// that carries the adder's own key.
///
/// ## Reusing columns at once
///
/// A column is given back as soon as it is folded, and another ref may take
/// it at once. On the rseq tier no sequence can be inside it any more (gate
/// closed, then `membarrier`). On the portable tier a thread may have read
/// the column pointer and be preempted before its compare-exchange for any
/// length of time; it finds either a drained slot (key 0), another ref's key
/// (refused: it counts on its own central count), or its own ref's key
/// again if that ref took the same column back — then it counts there,
/// which is where its ref counts now. Keys are unique among live refs and
/// kept until a ref is dropped, so no key can come back while such a thread
/// exists. The count field of a portable slot is modular (40 bits), so the
/// slots of a ref may drift apart without bound; their sum is exact while
/// fewer than 2³⁹ references are counted on them.
///
/// ## Zero and release: one per life
///
/// Zero is only reachable on the central count, after a fold or by
/// underflow. Within a life the central count starts above zero and moves
/// by read-modify-writes, so at most one RMW takes it from `> 0` to `<= 0`.
/// The thread that made it claims the release (`RELEASING`) with one RMW
/// of the state word if the ref is killed. A kill whose own put finds the
/// count already `<= 0` (it crossed while live — an underflow) claims under
/// the lock. So every killed life whose count is `<= 0` gets exactly one
/// claim. `reinit` waits until the release has *finished* (`RELEASED`), so
/// no claim of an old life lands on a new one and two releases never
/// overlap. A release claimed under the switch lock (by the kill's fold or
/// initial put) runs after the lock is released, so a release may switch,
/// kill or revive refs — its own included.
///
/// Orderings: puts that a slot accepts are `Release`; the fold's swaps are
/// `AcqRel`; the fold's central add and central puts are `AcqRel`. So every
/// holder's last use of the value happens-before the release, through either
/// the central count's release sequence or a slot → fold → central chain
/// (the same argument as `Arc`'s drop). loom checks this with the value
/// modelled as `UnsafeCell`s (`tests/loom_percpu.rs`).
///
/// ## `tryget_live` after a kill
///
/// `kill` sets `DEAD`, closes the gate (rseq: and runs `membarrier`), folds,
/// then runs the confirm callback, all under the switch lock. A
/// `tryget_live` that starts after the callback is refused by the slot (the
/// gate is closed, the key gone), synchronises with the closing (`Acquire`
/// fence pairing with the closing store or the drain's swap), reads `DEAD`
/// and fails. One racing the kill may succeed; its reference is counted and
/// the release waits for it. `resurrect`, `reinit` and mode switches wait
/// for the lock, so the callback always runs on a dead ref.
///
/// ## The switch lock
///
/// A state bit, not a mutex (the header stays at 32 bytes); waiters sleep
/// on one of 64 process-wide condition variables chosen by the ref's
/// address (`parking_lot`'s scheme), woken by any state change they may be
/// waiting for. It is held across `membarrier` and the confirm callback,
/// never across a release.
///
/// ## `fork()`
///
/// The process-wide locks (the slot-column arena, the portable tier's key
/// allocator, the 64 wait buckets) guard short critical sections that
/// never nest. `src/sys/fork.rs` registers `pthread_atfork` handlers the
/// first time one of them is about to be taken: the forking thread takes
/// them all before the fork and releases them in the parent and in the
/// child, as glibc does for `malloc`, so a child never inherits one held.
/// A ref's own switch lock is the ref's state, and is inherited as it was,
/// like any mutex. With `track`, a child records holders without
/// backtraces (std's backtrace lock cannot be held across a fork from
/// outside std).
///
/// ## `PercpuArc` and `OwnedRef`
///
/// An `OwnedRef` is a raw pointer plus one count: taking, cloning and
/// dropping it is the same per-CPU add as a borrowed `Ref`. The allocation
/// is freed when the last `PercpuArc` handle is gone (which kills the ref)
/// **and** the release has finished — by whichever of the two happens last,
/// decided by read-modify-writes of the state word.
pub mod internals {}

/// # Limitations
///
/// * The count is an `i64` with a bias of 2⁶⁰; more than 2⁵⁹ references at
///   once are not supported. On the portable tier at most 2³⁹ references
///   may be counted on one ref's slots at once, and at most 2²⁴ − 1 live
///   refs that have counted per CPU at some point (each keeps a slot key
///   until it is dropped); beyond that, `switch_to_percpu` returns
///   `SwitchError::NoKey` and the ref stays atomic.
/// * Slot memory is never returned to the allocator: free columns are
///   reused, so slot memory is bounded by the peak number of refs counting
///   per CPU at once (8 bytes per possible CPU each).
/// * `is_zero` only answers `true` in atomic mode (per-CPU counts are not
///   summed on the fly), as in the kernel.
/// * Underflow in percpu mode is only detected when the slots are summed
///   (the next switch to atomic mode or kill).
/// * The confirm callback of `kill_and_confirm` runs on the killing thread,
///   under the ref's switch lock, before the initial reference is dropped.
/// * **`membarrier` failing after a successful registration aborts the
///   process.** The rseq tier registers `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ`
///   once; if a later call fails (e.g. a seccomp filter installed after the
///   registration forbids it), slots could no longer be folded safely, and
///   counting on would silently lose references, so the process aborts with
///   a message. Install seccomp filters before the first `PercpuRef` is
///   built, or set `PERCPU_REF_PORTABLE=1`.
/// * **The crate cannot be unloaded** (`dlclose` of a shared object that
///   contains it) while any thread may still be inside one of its
///   restartable sequences: the kernel keeps the thread's pointer to the
///   sequence's descriptor, which lives in the crate's static data. Rust
///   programs do not unload code in practice; plugins that do must stop
///   every thread using the crate first.
/// * **A file truncated under a live pool** (by another process, or by this
///   one) makes touching the pages past the new end raise `SIGBUS`, as for
///   any `mmap` of a file. The pool holds an advisory lock on the file, which
///   cooperating programs respect; nothing stops an uncooperative one. See
///   the pool's limitations (and its section on `fork()`).
pub mod limitations {}

/// # The rseq tier: restartable sequences, and why they are exact
///
/// On Linux x86_64 and aarch64 with glibc ≥ 2.35 a get or put of a ref
/// counting per CPU is a plain add to the current CPU's slot inside a
/// *restartable sequence* (rseq): the kernel restarts the sequence if the
/// thread is preempted, migrated or signalled before its single committing
/// instruction. A mode switch closes the ref's gate and calls
/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)` once, which aborts
/// every sequence in flight; no RCU grace period is needed. The code is in
/// `src/sys/rseq/`; the same machinery serves the page pool's per-CPU free
/// lists.
///
/// # The frame
///
/// Every sequence of both architectures is one `asm!` block built by the
/// architecture's `rseq_asm!` macro around the same frame and local labels:
///
/// | label | what |
/// |---|---|
/// | `2:` | arm: store the address of this copy's descriptor to `rseq->rseq_cs` (the abort handler comes back here: the kernel cleared it) |
/// | `4:` | `start_ip`: the body reads the CPU id, its gate, and so on |
/// | `5:` | `post_commit_ip`, right after the body's last instruction, the single commit |
/// | `6:` | out of line: the refusal exit; sets the result register to 0, back to `5:` |
/// | `7:` | out of line, after the 4-byte `RSEQ_SIG`: `abort_ip`, back to `2:` |
/// | `3:` | the descriptor `{ 0, 0, 4b, 5b - 4b, 7b }` in `__rseq_cs` (writable: the absolute addresses need dynamic relocations in a PIE) |
///
/// Bodies use the labels `20:` and up. Each inlined copy of a sequence
/// assembles its own labels and descriptor. The result comes back in a
/// register that is never 0 after a commit (the row address), so no flag
/// is set and tested around the sequence.
///
/// # The counter sequence
///
/// x86_64:
///
/// ```text
///   2:  lea   r, [rip + DESC]           ; (re)arm: the abort handler jumps here
///       mov   fs:[off + 8], r           ; rseq->rseq_cs = &DESC
///   4:  mov   r32, fs:[off + 4]         ; start: r = rseq->cpu_id
///       cmp   r32, dword [gate]         ; gate->limit: gate, bound and tier at once
///       jae   6f                        ; closed (0), id too big, or unregistered (-1/-2)
///       shl   r, 7                      ; r = cpu * ROW_STRIDE
///       add   r, qword [gate + 8]       ; r += gate->column (row address, base only)
///       add   qword [r], D              ; COMMIT: the single last instruction
///   5:                                  ; post-commit; r != 0 says "added"
///   (__rseq_failure section)
///   6:  xor   r32, r32 ; jmp 5b         ; refused: r = 0
///       .long RSEQ_SIG                  ; (inside a `ud1` encoding)
///   7:  jmp   2b                        ; abort: re-arm, restart from the top
///   (__rseq_cs) DESC = { 0, 0, 4b, 5b - 4b, 7b }
/// ```
///
/// The commit has a base-only address and an immediate operand: on the
/// Intel cores measured this is the only form of a memory add that does not
/// wait for the previous store to the same slot (a get and its put hit the
/// same slot), measured in `benches/rseq.rs` (`add [b], imm` 0.96 ns per pair against 7.3 ns for `add [b], reg` and 5.35 ns for `add [b+i], imm`, Intel Xeon). `off` is `__rseq_offset`, one load of a
/// static, or a register with `add_imm_in` (`src/sys/rseq/glibc.rs` says how the
/// static is addressed). `asm goto` (Rust 1.87, above this crate's MSRV
/// 1.86) would save only the `test`/`jz` the caller does on `r`.
///
/// aarch64 (a get as compiled, `sxtw` of the area token and the caller's
/// `cbz` included; `x19` holds the gate, `w20` the token):
///
/// ```text
///       sxtw  x8, w20                   ; off
///       mrs   x9, tpidr_el0             ; the thread pointer: fixed for the thread
///       add   x9, x9, x8                ; x9 = &struct rseq
///   2:  adrp  x10, DESC                 ; (re)arm
///       add   x10, x10, :lo12:DESC
///       str   x10, [x9, #8]             ; rseq->rseq_cs = &DESC
///   4:  ldr   w10, [x9, #4]             ; start: cpu_id
///       ldar  w11, [x19]                ; gate->limit, Acquire
///       cmp   w10, w11
///       b.hs  6f                        ; closed (0), id too big, or -1/-2
///       ldr   x11, [x19, #8]            ; gate->column (after the ldar)
///       add   x10, x11, x10, lsl #7     ; row address
///       ldr   x11, [x10]                ; the slot
///       add   x11, x11, #1              ; (a put: sub #1)
///       str   x11, [x10]                ; COMMIT: the single last instruction
///   5:  cbz   x10, slow                 ; the caller: refused?
///   (subsection 1: the end of the function's own section)
///   6:  mov   x10, xzr ; b 5b           ; refused
///       brk   #0x45e0                   ; RSEQ_SIG 0xd428bc00
///   7:  b     2b                        ; abort
/// ```
///
/// The out-of-line code goes to the end of the function's own section,
/// not to a section of its own as on x86_64: an aarch64 conditional branch
/// reaches only ±1 MiB, less than the distance between sections in a test
/// binary.
///
/// # Why an add is neither lost nor doubled
///
/// The kernel guarantees: whenever a thread is preempted, migrated, or
/// handed a signal, then before it next runs user code, if its instruction
/// pointer is in `[start, post)` of the descriptor in `rseq->rseq_cs`, the
/// pointer is moved to `abort` (which must follow the registered 4-byte
/// signature), and `rseq_cs` is cleared. Hence:
///
/// 1. *The CPU id is right at the commit.* `cpu_id` is read inside the
///    range. If the thread moves to another CPU at any point after that read
///    and before the commit, it was preempted inside the range and is sent to
///    `abort`, which re-arms the descriptor and reads `cpu_id` again. So
///    when the commit executes, it executes on CPU `cpu`.
/// 2. *Nobody else writes the slot during the add.* Row `cpu` of a column is
///    written only by commits executing on CPU `cpu` (1), one thread at a
///    time, and by the owner only while the gate is closed and fenced
///    (below). Another thread can run on that CPU only after ours was
///    preempted; if that happened before our commit, we were inside the
///    range and abort. So the non-atomic read-modify-write (`add [r], D` on
///    x86_64; `ldr`/`add`/`str` on aarch64, all three inside the range) is
///    never interleaved with another write of the slot: interrupts and
///    preemption happen at instruction boundaries (both architectures take
///    exceptions precisely). A restart re-reads the slot; a value loaded
///    before an abort is never stored.
/// 3. *Exactly once.* The commit is the single last instruction of the range
///    and `post` is the address right after it. An interruption either
///    arrives before the commit retires (IP in range: abort, restart, the add
///    has not happened and happens once on the retry) or after it (IP =
///    `post`, outside the range: no abort, the add happened once and is
///    never repeated). There is no state in between. A fault *on* the
///    commit (a page fault of the slot) reports the commit's own address
///    with nothing written: the commit runs again, or, if the fault slept
///    (a preemption), the sequence aborts and restarts; once either way.
/// 4. *Signals, including handlers that take references.* Signal delivery
///    is one of the events above: the interrupted sequence is moved to
///    `abort` (and `rseq_cs` cleared) *before* the handler runs. A handler
///    that adds arms the descriptor itself, and its own sequence is exact by
///    1–3 (a nested signal aborts it the same way). When the handler
///    returns, `sigreturn` resumes the interrupted code at `abort`, which
///    re-arms and restarts: the interrupted add had not happened, and
///    happens once.
/// 5. *A stale descriptor is harmless.* `rseq_cs` is re-armed at the start
///    of every attempt, and a descriptor left behind after `post` or the
///    early exit only matches IPs inside its own sequence, which the thread
///    is no longer in. Every inlined copy of a sequence has its own
///    descriptor.
/// 6. *Never torn.* The commit writes the whole aligned 8-byte slot in one
///    instruction, single-copy atomic on both architectures, so a
///    concurrent atomic load of the slot (an owner's snapshot, a sum) sees
///    the value before or after the add, never a mix.
///
/// # The gate and the column: why nothing is in flight after the fence
///
/// `Gate::limit` is the number of CPU rows while the column is open and 0
/// while it is closed; `Gate::column` is only meaningful while it is open.
/// The owner follows this protocol:
///
/// * **close**: store `limit = 0` (`SeqCst` or `Release`), then call
///   `fence_all_cpus`, i.e. `membarrier(PRIVATE_EXPEDITED_RSEQ)`. Only then
///   read, swap or zero the slots, or take the column away.
/// * **open**: make the column's slots hold their starting values and store
///   the column pointer, *then* store `limit = rows` with `Release`.
///
/// Consider any sequence of this process when the fence runs. If its thread
/// is running on some CPU, the kernel interrupts that CPU (IPI), runs a full
/// memory barrier there (`smp_mb()`, a `dmb ish` on arm64) and marks the
/// thread for an rseq check, so before it returns to user space its IP is
/// checked: inside the range it aborts and restarts; past `post` the commit
/// already retired, and the barrier orders it, with everything the thread
/// did before it, before the owner's accesses after the fence. The syscall
/// returns after every IPI was handled, and has full barriers at its own
/// entry and exit. If its thread is not running and was inside a sequence,
/// it was preempted there (a sequence makes no syscalls), so it aborts
/// before it runs user code again; the context switches give the full
/// barriers. This is the guarantee `membarrier(2)` documents for every
/// architecture; nothing in it is x86-specific.
///
/// A restarted (or new) sequence reads `limit` *inside* the range after the
/// fence; the owner's store precedes the fence (the syscall's entry barrier
/// orders it before the IPIs), so that read sees 0 and the sequence
/// refuses. Hence once `fence_all_cpus()` returns no slot of the column
/// changes until the gate opens again: the owner may read, swap, zero or
/// reassign them. This is why `limit` *and* `column` must be read inside
/// the sequence: with either read before `start`, a thread preempted
/// between that read and `start` is not aborted, and later commits to a
/// column the owner has closed, harvested or handed to another ref.
///
/// Opening has no fence, so the loads of a sequence must be ordered by
/// themselves. The sequence reads `limit`, then `column`, then the slot, and
/// must see, once it reads the new non-zero `limit`, the column pointer and
/// the slot values the owner stored before its `Release` store of the
/// limit:
///
/// * x86_64 keeps loads ordered with loads and stores after loads (TSO):
///   the plain `cmp` with `limit` is enough.
/// * arm64 does not: it may satisfy the `column` load before the `limit`
///   load (they are independent; the `b.hs` between them is a control
///   dependency, which does not order loads), so a sequence could pair the
///   new limit with the previous column, one the owner has harvested or
///   handed to another ref. The limit is therefore read with `ldar`
///   (Acquire, pairing with the owner's `Release` store): no later load or
///   store of the sequence is performed before it. The slot load depends on
///   the column through its address, which arm64 orders as well, and the
///   commit `str` comes after the `ldar` in program order, so it is ordered
///   after the owner's reset of the slot. (`ldar` waits only for earlier
///   `stlr`s, and a sequence has none; an `ldr` plus an artificial address
///   dependency would do as well, at two more instructions.)
///
/// A sequence that read the *old* non-zero limit before a close is still
/// inside its range when the close's fence runs, so it aborts and re-reads
/// everything.
///
/// The arming store of `rseq_cs` needs no barrier: only the kernel reads
/// it, on the thread's own CPU while handling an exception of that thread,
/// and a CPU sees its own earlier stores.
///
/// The same reasoning covers `CpuStacks`, whose per-CPU gate is read
/// inside each of its sequences before anything else of the row (with
/// `ldar` on aarch64); see `src/sys/rseq/stack.rs`.
///
/// # What the emulated arm64 guest can and cannot show
///
/// The aarch64 sequences run the chaos tests (`src/sys/rseq/tests.rs`) in a QEMU guest
/// (`scripts/arm64-vm.sh`, TCG on an x86_64 host). TCG performs the guest's
/// loads and stores as host loads and stores, which the x86 host keeps in
/// TSO order, so no reordering that arm64 hardware allows happens there: a
/// missing `ldar` passes every test in the guest (`tests.rs` records that
/// mutant too). The barrier argument above is what covers it. The guest
/// does show what is not about the memory model: the arming, the
/// descriptor, the signature, the commit being last, what is read inside
/// the range, and `membarrier`.
///
/// # Other architectures
///
/// A port adds `<arch>.rs` next to `x86_64.rs` and `aarch64.rs` with the
/// same functions (see the `imp` list in `src/sys/rseq/mod.rs`), extends `percpu_ref_rseq` in
/// `build.rs`, and checks the argument above against its memory model:
/// every gate read must be ordered before the row's other loads, the
/// commit must be one store instruction, last in the range, and the
/// signature is that architecture's `RSEQ_SIG` as glibc registers it.
pub mod rseq {}

/// # Background: why the hook is on the page's 0↔1 transitions
///
/// Linux 4.5 (2016, `5c2c2587b132`, "introduce {get|put}_dev_pagemap() for
/// dax-gup") tied pages of a `ZONE_DEVICE` mapping (persistent memory
/// behind `/dev/dax`) to the mapping's `dev_pagemap` `percpu_ref`: every
/// `get_page()` of such a page also did a `percpu_ref_get`, every
/// `put_page()` a put, so the driver could kill the ref and wait for all
/// page users before removing the mapping. That put a zone test in the
/// kernel's hottest inline functions for *every* page and a second counter
/// update on every get and put of a device page — and still missed paths:
/// in the April 2017 linux-mm thread "get_zone_device_page() in get_page()
/// and page_cache_get_speculative()", Kirill Shutemov found that the
/// speculative get of lockless lookups (and the generic GUP code) took
/// device pages without the pgmap reference, and argued for hooking at the
/// `page_ref_*` level, the one choke point all paths go through. He then
/// proposed taking the percpu ref out of the hot path entirely by checking
/// at teardown that every page count was back to its idle value; Dan
/// Williams rejected that: starting driver shutdown while page references
/// are outstanding is legal, the `percpu_ref` is what lets teardown *wait*
/// for them, and a count check at release time just races and crashes.
///
/// What Linux settled on takes the lifetime reference per page instead of
/// per get. First, in 4.12 (`71389703839e`, "Replace
/// {get,put}_zone_device_page() with a single reference to fix pmem
/// crash"), one reference per page for the life of the mapping; then, in
/// 6.1 (`0dc45ca1ce18`, "take a pgmap reference on page allocation", after
/// `27674ef6c73f` let free device pages sit at count 0), one reference per
/// *allocated* page, taken with `percpu_ref_tryget_live` on the page's 0→1
/// transition (so allocation fails once the device is killed) and dropped
/// when the count returns to 0. That is this crate's page layer
/// ([`PageRef`](crate::PageRef) with [`PercpuRefHook`](crate::PercpuRefHook)). The invariant "a page
/// holds one device reference exactly while its count is not zero" covers
/// every path by construction — `inc` needs a reference, `get_unless_zero`
/// never moves a count off zero — so the speculative get needs no hook; the
/// hot get/put of a referenced page is one atomic add, the same for device
/// and ordinary pages; and the `PercpuRef` is touched once per allocation,
/// not once per get. Teardown is kill → wait for the drain → unmap (Linux's
/// 2019 fix "devm_memremap_pages: fix final page put race" is the reminder
/// that the wait is not optional).
pub mod background {}
