//! The aarch64 sequences (Linux, glibc): every restartable sequence of the
//! crate, and the CPU-id read. Same frame, labels and interface as
//! `x86_64.rs`; the parent module's docs give the argument, including what
//! the arm64 memory model adds (the `ldar` of every gate). The area lookup
//! and the tier choice are `glibc.rs`.
//!
//! What differs from x86_64:
//!
//! * The rseq area is at `TPIDR_EL0 + __rseq_offset` (glibc 2.36: -32, the
//!   area lies just below the thread pointer). Each sequence computes its
//!   address once, before the frame (`mrs` + `add`): the thread pointer is
//!   fixed for the thread's life, and an abort keeps every register, so the
//!   abort handler jumps back to the arming with the address still there.
//! * Arming takes the descriptor's address PC-relative (`adrp` + `add
//!   :lo12:`, any distance), then one `str` to `rseq->rseq_cs`.
//! * There is no memory-destination add: a counter commit is
//!   `ldr`/`add`/`str`, and the `str` alone is the commit (the single last
//!   instruction of the range). The `ldr` and `add` before it are inside
//!   the range, so an interruption there restarts the whole sequence.
//! * Every gate is read with `ldar` (Acquire), so no later load of the
//!   sequence (the column, the slot, a stack's `len` and items) can be
//!   satisfied before it: arm64 may reorder independent loads, which x86
//!   never does.
//! * The signature before each abort label is `RSEQ_SIG` `0xd428bc00`
//!   (`brk #0x45e0`), emitted with `.inst` so it is in code byte order,
//!   which is what glibc registers on little- and big-endian alike.

pub(super) use super::glibc::{available, fence_all_cpus, resolved_offset};
use super::{glibc::area_offset, Gate, ROW_SHIFT};
use crate::sync::AtomicI64;
use std::arch::asm;

/// The frame shared by every sequence (see the parent module's docs).
/// `{area}` gets the rseq area's address from `{off}` before the frame;
/// `$r` names the operand (an `out(reg)`) that holds the descriptor
/// address while arming; the body may reuse it from `start` on. The body
/// jumps to `6f` to refuse; `$refuse` runs there before control continues
/// at `post`. The caller declares `off = in(reg)` and `area = out(reg)`.
macro_rules! rseq_asm {
    (
        arm = $r:literal,
        body = [$($body:expr),* $(,)?],
        refuse = [$($refuse:expr),* $(,)?],
        $($operands:tt)*
    ) => {
        asm!(
            // area = &struct rseq of this thread.
            "mrs {area}, tpidr_el0",
            "add {area}, {area}, {off}",
            // Arm (again, after an abort: the kernel cleared rseq_cs).
            "2:",
            concat!("adrp {", $r, "}, 3f"),
            concat!("add {", $r, "}, {", $r, "}, :lo12:3f"),
            concat!("str {", $r, "}, [{area}, #8]"),
            // start_ip
            "4:",
            $($body,)*
            // post_commit_ip: the body's last instruction is the commit.
            "5:",
            // Out of line: the refusal exit and the abort handler, at the
            // end of the function's own section (subsection 1), where the
            // compiler puts cold blocks: a conditional branch reaches only
            // +-1 MiB, too short for a separate section in a big binary.
            ".subsection 1",
            ".balign 4",
            "6:",
            $($refuse,)*
            "b 5b",
            // RSEQ_SIG, `brk #0x45e0`; it must directly precede the abort
            // label (the kernel compares the 4 bytes before abort_ip).
            ".inst 0xd428bc00",
            // abort_ip
            "7:",
            "b 2b",
            ".subsection 0",
            // struct rseq_cs { u32 version, flags; u64 start_ip,
            // post_commit_offset, abort_ip }, 32-byte aligned. The section
            // must be writable: the absolute addresses need dynamic
            // relocations in a PIE.
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4b, 5b - 4b, 7b",
            ".popsection",
            $($operands)*
        )
    };
}

#[inline]
pub(super) fn current_cpu() -> Option<usize> {
    let off = area_offset()?;
    let cpu: u32;
    // SAFETY: glibc registered a `struct rseq` at thread pointer + `off`
    // for every thread it created (`TPIDR_EL0` is the thread pointer on
    // aarch64); `cpu_id` is the aligned u32 at offset 4, readable by its own
    // thread. The kernel updates it asynchronously, so this is not `pure`.
    unsafe {
        asm!(
            "mrs {tp}, tpidr_el0",
            "ldr {cpu:w}, [{tp}, {o}]",
            o = in(reg) off + 4,
            tp = out(reg) _,
            cpu = out(reg) cpu,
            options(nostack, readonly, preserves_flags),
        );
    }
    // RSEQ_CPU_ID_UNINITIALIZED (-1) / _REGISTRATION_FAILED (-2).
    i32::try_from(cpu).ok().map(|c| c as usize)
}

/// # Safety
///
/// As for [`super::add_imm`].
#[inline(always)]
pub(super) unsafe fn add_imm<const D: i64>(g: &Gate) -> bool {
    // SAFETY: forwarded; the offset is the resolved one.
    unsafe { add_imm_off::<D>(resolved_offset(), g) }
}

/// The counter sequence with `$delta` as the instruction that adds to the
/// slot's value in `{t}`; see [`add_imm_off`] for the listing. Evaluates
/// to `true` if it committed.
macro_rules! counter_seq {
    ($off:expr, $g:expr, $delta:literal, $($d:tt)*) => {{
        let row: usize;
        rseq_asm!(
            arm = "row",
            body = [
                "ldr {row:w}, [{area}, #4]",           // row = rseq->cpu_id
                "ldar {t:w}, [{g}]",                   // t = gate->limit, Acquire
                "cmp {row:w}, {t:w}",                  // cpu < limit (unsigned)?
                "b.hs 6f",
                "ldr {t}, [{g}, #8]",                  // t = gate->column
                "add {row}, {t}, {row}, lsl #{shift}", // row address
                "ldr {t}, [{row}]",                    // t = slot
                $delta,                                // t += D
                "str {t}, [{row}]",                    // COMMIT
            ],
            refuse = ["mov {row}, xzr"],
            off = in(reg) $off,
            g = in(reg) std::ptr::from_ref($g),
            area = out(reg) _,
            row = out(reg) row,
            t = out(reg) _,
            shift = const ROW_SHIFT,
            $($d)*
            options(nostack),
        );
        row != 0
    }};
}

/// # Safety
///
/// As for [`super::add_imm`], and `off` is the resolved area offset.
///
/// ```text
///       mrs   a, tpidr_el0
///       add   a, a, off                 ; a = &struct rseq
///   2:  adrp  r, DESC
///       add   r, r, :lo12:DESC
///       str   r, [a, #8]                ; rseq->rseq_cs = &DESC
///   4:  ldr   w_r, [a, #4]              ; start: r = rseq->cpu_id
///       ldar  w_t, [g]                  ; gate->limit, Acquire
///       cmp   w_r, w_t
///       b.hs  6f                        ; closed (0), id too big, or -1/-2
///       ldr   t, [g, #8]                ; gate->column
///       add   r, t, r, lsl #7           ; row address (never 0)
///       ldr   t, [r]
///       add   t, t, #D                  ; (the assembler makes D < 0 a sub)
///       str   t, [r]                    ; COMMIT
///   5:
/// ```
#[inline(always)]
pub(super) unsafe fn add_imm_off<const D: i64>(off: i64, g: &Gate) -> bool {
    const { assert!(D as i32 as i64 == D, "add_imm's delta must fit an i32") };
    // SAFETY: the rseq area is registered for this thread at TPIDR_EL0 +
    // off (glibc registers every thread it creates; precondition); writing
    // `rseq_cs` (offset 8) is how user space arms a sequence, and the
    // descriptor lives in static, 32-byte aligned memory with the signature
    // before the abort label, as the kernel requires. The slot address is
    // formed only after `cpu < limit` was read as true in this sequence,
    // when the column is valid for that row (precondition); the parent docs
    // argue exactness. `g` is a live reference. No stack use, no calls.
    unsafe {
        // An `add`/`sub` immediate is 12 bits; `if const` leaves the other
        // branch out of the code (also in debug builds).
        if const { D.unsigned_abs() < 4096 } {
            counter_seq!(off, g, "add {t}, {t}, #{d}", d = const D,)
        } else {
            add_off(off, g, D)
        }
    }
}

/// # Safety
///
/// As for [`super::add_imm`].
#[allow(dead_code)] // as `super::add`
#[inline(always)]
pub(super) unsafe fn add(g: &Gate, d: i64) -> bool {
    // SAFETY: forwarded; the offset is the resolved one.
    unsafe { add_off(resolved_offset(), g, d) }
}

/// # Safety
///
/// As for [`super::add_imm`], and `off` is the resolved area offset.
#[inline(always)]
pub(super) unsafe fn add_off(off: i64, g: &Gate, d: i64) -> bool {
    // SAFETY: as in `add_imm_off`.
    unsafe { counter_seq!(off, g, "add {t}, {t}, {d}", d = in(reg) d,) }
}

/// The `limit` contender of `benches/percpu.rs`: `iters` pairs of a bare
/// gated sequence (`+1` then `-1`) with every input in a register — the
/// descriptor addresses, the area address, the gate pointer and the column
/// — so each op is: arm store, cpu-id load, `ldar` of the gate's limit,
/// compare, row address, load, add, commit. Returns the number of refused
/// pairs (stops at the first).
///
/// # Safety
///
/// As for [`super::add_imm`], with `column` standing for `g.column`.
pub(super) unsafe fn limit_pairs(g: &Gate, column: *mut AtomicI64, iters: u64) -> u64 {
    if iters == 0 {
        return 0;
    }
    let off = resolved_offset();
    let left: u64;
    // SAFETY: two sequences as in `add_imm_off`, each with its own
    // descriptor (34:, 35:), start (24:, 27:), post (25:, 28:) and abort
    // (32:, 33:); `column` is valid for every row below the limit read
    // inside the sequence (precondition). The loop counter is outside both
    // ranges.
    unsafe {
        asm!(
            "mrs {area}, tpidr_el0",
            "add {area}, {area}, {off}",
            "adrp {cs1}, 34f",
            "add {cs1}, {cs1}, :lo12:34f",
            "adrp {cs2}, 35f",
            "add {cs2}, {cs2}, :lo12:35f",
            "22:",
            "23:",
            "str {cs1}, [{area}, #8]",
            "24:",
            "ldr {row:w}, [{area}, #4]",
            "ldar {t:w}, [{g}]",
            "cmp {row:w}, {t:w}",
            "b.hs 29f",
            "add {row}, {column}, {row}, lsl #{shift}",
            "ldr {t}, [{row}]",
            "add {t}, {t}, #1",
            "str {t}, [{row}]",
            "25:",
            "26:",
            "str {cs2}, [{area}, #8]",
            "27:",
            "ldr {row:w}, [{area}, #4]",
            "ldar {t:w}, [{g}]",
            "cmp {row:w}, {t:w}",
            "b.hs 29f",
            "add {row}, {column}, {row}, lsl #{shift}",
            "ldr {t}, [{row}]",
            "sub {t}, {t}, #1",
            "str {t}, [{row}]",
            "28:",
            "subs {n}, {n}, #1",
            "b.ne 22b",
            "29:",
            ".subsection 1",
            ".balign 4",
            ".inst 0xd428bc00",
            "32:",
            "b 23b",
            ".inst 0xd428bc00",
            "33:",
            "b 26b",
            ".subsection 0",
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "34:",
            ".long 0, 0",
            ".quad 24b, 25b - 24b, 32b",
            ".balign 32",
            "35:",
            ".long 0, 0",
            ".quad 27b, 28b - 27b, 33b",
            ".popsection",
            off = in(reg) off,
            g = in(reg) std::ptr::from_ref(g),
            column = in(reg) column,
            n = inout(reg) iters => left,
            area = out(reg) _,
            cs1 = out(reg) _,
            cs2 = out(reg) _,
            row = out(reg) _,
            t = out(reg) _,
            shift = const ROW_SHIFT,
            options(nostack),
        );
    }
    left
}

/// The per-CPU stack sequences of [`super::CpuStacks`]. Row layout (see
/// `stack.rs`): `len: u32` at 0, `gate: u32` at 4, `items: [u32; CAP]` at
/// 8, rows `1 << SHIFT` bytes apart. Each sequence reads the CPU id, bounds
/// it by `n`, reads its row's `gate` with `ldar` (so the `len` and item
/// loads after it see what a remote drainer wrote before reopening the
/// gate with `Release`) and refuses unless it is 0, then loads `len`
/// (zero-extended to 64 bits) and checks it against `CAP` unsigned, which
/// also refuses an empty stack for pop (`len - 1` wraps). The commit is the
/// 4-byte `str` of the new `len`: a single instruction, the last of the
/// range; writes before it go only to items above the committed `len`
/// (push) or to the caller's buffer (batch pop), which nobody else reads,
/// so a restart only repeats them.
#[cfg_attr(not(feature = "dax"), allow(dead_code))]
pub(super) mod stack {
    use super::super::stack::{CAP, SHIFT};
    use super::{asm, resolved_offset};

    /// Pop one item of this CPU's row: `Some(item)`, or `None` if refused
    /// (empty, gate closed, CPU id `>= n`).
    ///
    /// # Safety
    ///
    /// [`super::available`] returned `true`; `rows` points to `n` rows of
    /// the layout above, each with `len <= CAP`, written only by these
    /// sequences except between closing its gate + `fence_all_cpus()` and
    /// reopening it.
    #[inline(always)]
    pub(crate) unsafe fn pop(rows: *mut u8, n: u32) -> Option<u32> {
        let off = resolved_offset();
        let (row, item): (usize, u32);
        // SAFETY: the frame as in `add_imm_off`; the row address is formed
        // only for `cpu < n` (valid rows, precondition), and the item read
        // is `items[len - 1]` with `len - 1 < CAP` checked. The parent docs
        // and `stack.rs` argue exactness.
        unsafe {
            rseq_asm!(
                arm = "row",
                body = [
                    "ldr {row:w}, [{area}, #4]", // cpu_id
                    "cmp {row:w}, {n:w}",
                    "b.hs 6f",
                    "add {row}, {rows}, {row}, lsl #{shift}",
                    "add {t}, {row}, #4",
                    "ldar {t:w}, [{t}]", // gate, Acquire
                    "cbnz {t:w}, 6f",    // closed?
                    "ldr {t:w}, [{row}]", // len
                    "sub {t}, {t}, #1",   // len - 1 (wraps if 0)
                    "cmp {t}, #{cap_1}",  // 0 < len <= CAP?
                    "b.hi 6f",
                    "add {p}, {row}, {t}, lsl #2",
                    "ldr {item:w}, [{p}, #8]", // items[len - 1]
                    "str {t:w}, [{row}]",         // COMMIT len - 1
                ],
                refuse = ["mov {row}, xzr"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                area = out(reg) _,
                row = out(reg) row,
                t = out(reg) _,
                p = out(reg) _,
                item = out(reg) item,
                shift = const SHIFT,
                cap_1 = const CAP - 1,
                options(nostack),
            );
        }
        (row != 0).then_some(item)
    }

    /// Push `item` on this CPU's row; `false` if refused (full, gate
    /// closed, CPU id `>= n`).
    ///
    /// # Safety
    ///
    /// As for [`pop`].
    #[inline(always)]
    pub(crate) unsafe fn push(rows: *mut u8, n: u32, item: u32) -> bool {
        let off = resolved_offset();
        let row: usize;
        // SAFETY: as in `pop`; the item is written to `items[len]` with
        // `len < CAP` checked, above the committed length.
        unsafe {
            rseq_asm!(
                arm = "row",
                body = [
                    "ldr {row:w}, [{area}, #4]",
                    "cmp {row:w}, {n:w}",
                    "b.hs 6f",
                    "add {row}, {rows}, {row}, lsl #{shift}",
                    "add {t}, {row}, #4",
                    "ldar {t:w}, [{t}]", // gate, Acquire
                    "cbnz {t:w}, 6f",
                    "ldr {t:w}, [{row}]", // len
                    "cmp {t}, #{cap}",    // len < CAP?
                    "b.hs 6f",
                    "add {p}, {row}, {t}, lsl #2",
                    "str {item:w}, [{p}, #8]", // items[len] = item
                    "add {t:w}, {t:w}, #1",
                    "str {t:w}, [{row}]", // COMMIT len + 1
                ],
                refuse = ["mov {row}, xzr"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                item = in(reg) item,
                area = out(reg) _,
                row = out(reg) row,
                t = out(reg) _,
                p = out(reg) _,
                shift = const SHIFT,
                cap = const CAP,
                options(nostack),
            );
        }
        row != 0
    }

    /// Push all of `items` (in order, the last on top) on this CPU's row in
    /// one sequence; `false` if refused (not enough room, gate closed, CPU
    /// id `>= n`), and then nothing was pushed.
    ///
    /// # Safety
    ///
    /// As for [`pop`].
    #[inline]
    pub(crate) unsafe fn push_batch(rows: *mut u8, n: u32, items: &[u32]) -> bool {
        let off = resolved_offset();
        let row: usize;
        // SAFETY: as in `push`; `len + k <= CAP` is checked before the copy
        // to `items[len..len + k]` (above the committed length); the source
        // is a live slice of `k` items.
        unsafe {
            rseq_asm!(
                arm = "row",
                body = [
                    "ldr {row:w}, [{area}, #4]",
                    "cmp {row:w}, {n:w}",
                    "b.hs 6f",
                    "add {row}, {rows}, {row}, lsl #{shift}",
                    "add {t}, {row}, #4",
                    "ldar {t:w}, [{t}]", // gate, Acquire
                    "cbnz {t:w}, 6f",
                    "ldr {t:w}, [{row}]",  // len
                    "add {new}, {t}, {k}", // new len
                    "cmp {new}, #{cap}",   // fits?
                    "b.hi 6f",
                    "add {t}, {row}, {t}, lsl #2",
                    "add {t}, {t}, #8", // &items[len]
                    "mov {j}, {k}",
                    "20:",
                    "cbz {j}, 21f",
                    "sub {j}, {j}, #1",
                    "ldr {x:w}, [{src}, {j}, lsl #2]",
                    "str {x:w}, [{t}, {j}, lsl #2]",
                    "b 20b",
                    "21:",
                    "str {new:w}, [{row}]", // COMMIT len + k
                ],
                refuse = ["mov {row}, xzr"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                src = in(reg) items.as_ptr(),
                k = in(reg) items.len(),
                area = out(reg) _,
                row = out(reg) row,
                t = out(reg) _,
                new = out(reg) _,
                j = out(reg) _,
                x = out(reg) _,
                shift = const SHIFT,
                cap = const CAP,
                options(nostack),
            );
        }
        row != 0
    }

    /// Pop exactly `out.len()` items of this CPU's row into `out` (the top
    /// of the stack last) in one sequence; `false` if refused (fewer items,
    /// gate closed, CPU id `>= n`), and then nothing was popped (`out` may
    /// have been written).
    ///
    /// # Safety
    ///
    /// As for [`pop`].
    #[inline]
    pub(crate) unsafe fn pop_batch(rows: *mut u8, n: u32, out: &mut [u32]) -> bool {
        let off = resolved_offset();
        let row: usize;
        // SAFETY: as in `pop`; `k <= len` is checked (and `len <= CAP`
        // always holds) before `items[len - k..len]` is copied to `out`, a
        // live buffer of `k` items that only this thread uses.
        unsafe {
            rseq_asm!(
                arm = "row",
                body = [
                    "ldr {row:w}, [{area}, #4]",
                    "cmp {row:w}, {n:w}",
                    "b.hs 6f",
                    "add {row}, {rows}, {row}, lsl #{shift}",
                    "add {t}, {row}, #4",
                    "ldar {t:w}, [{t}]", // gate, Acquire
                    "cbnz {t:w}, 6f",
                    "ldr {t:w}, [{row}]",   // len
                    "subs {new}, {t}, {k}", // new len
                    "b.lo 6f",              // fewer than k
                    "add {t}, {row}, {new}, lsl #2",
                    "add {t}, {t}, #8", // &items[len - k]
                    "mov {j}, {k}",
                    "20:",
                    "cbz {j}, 21f",
                    "sub {j}, {j}, #1",
                    "ldr {x:w}, [{t}, {j}, lsl #2]",
                    "str {x:w}, [{dst}, {j}, lsl #2]",
                    "b 20b",
                    "21:",
                    "str {new:w}, [{row}]", // COMMIT len - k
                ],
                refuse = ["mov {row}, xzr"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                dst = in(reg) out.as_mut_ptr(),
                k = in(reg) out.len(),
                area = out(reg) _,
                row = out(reg) row,
                t = out(reg) _,
                new = out(reg) _,
                j = out(reg) _,
                x = out(reg) _,
                shift = const SHIFT,
                options(nostack),
            );
        }
        row != 0
    }
}
