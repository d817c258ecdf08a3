//! The x86_64 sequences (Linux, glibc): every restartable sequence of the
//! crate, and the CPU-id read. The argument for their exactness is in the
//! parent module's docs (the frame, the labels and the argument are shared
//! with `aarch64.rs`); the per-sequence comments name what each
//! instruction is for. The area lookup and the tier choice are `glibc.rs`.
//!
//! Every sequence is built by `rseq_asm!` around the frame the parent
//! module describes. Bodies use the local labels `20:` and up (labels made
//! of only `0`s and `1`s are ambiguous in LLVM's x86 asm).

pub(super) use super::glibc::{available, fence_all_cpus, resolved_offset};
use super::{glibc::area_offset, Gate, ROW_SHIFT};
use crate::sync::AtomicI64;
use std::arch::asm;

/// The frame shared by every sequence; see the module docs. `$r` names the
/// operand (an `out(reg)`) that holds the descriptor address while arming;
/// the body may reuse it from `start` on. The body jumps to `6f` to refuse;
/// `$refuse` runs there before control continues at `post`.
macro_rules! rseq_asm {
    (
        arm = $r:literal,
        body = [$($body:expr),* $(,)?],
        refuse = [$($refuse:expr),* $(,)?],
        $($operands:tt)*
    ) => {
        asm!(
            // Arm (again, after an abort: the kernel cleared rseq_cs).
            "2:",
            concat!("lea {", $r, "}, [rip + 3f]"),
            concat!("mov qword ptr fs:[{off} + 8], {", $r, "}"),
            // start_ip
            "4:",
            $($body,)*
            // post_commit_ip: the body's last instruction is the commit.
            "5:",
            // Out of line: the refusal exit and the abort handler.
            ".pushsection __rseq_failure, \"ax\"",
            "6:",
            $($refuse,)*
            "jmp 5b",
            // RSEQ_SIG 0x53053053 as `ud1 0x53053053(%rip), %edi`, so a
            // disassembler stays in sync; it must directly precede the
            // abort label.
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            // abort_ip
            "7:",
            "jmp 2b",
            ".popsection",
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
    // SAFETY: glibc registered a `struct rseq` at thread pointer + `off` for
    // every thread it created (the `fs` segment base is the thread pointer
    // on x86_64); `cpu_id` is the aligned u32 at offset 4, readable by its
    // own thread. The kernel updates it asynchronously, so this is not
    // `pure`.
    unsafe {
        asm!(
            "mov {cpu:e}, dword ptr fs:[{off} + 4]",
            off = in(reg) off,
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

/// # Safety
///
/// As for [`super::add_imm`], and `off` is the resolved area offset.
#[inline(always)]
pub(super) unsafe fn add_imm_off<const D: i64>(off: i64, g: &Gate) -> bool {
    const { assert!(D as i32 as i64 == D, "add_imm's delta must fit an i32") };
    let row: usize;
    // SAFETY: the rseq area is registered for this thread at fs:off (glibc
    // registers every thread it creates; precondition); writing `rseq_cs`
    // (offset 8) is how user space arms a sequence, and the descriptor lives
    // in static, 32-byte aligned memory with the signature before the abort
    // label, as the kernel requires. The slot address is formed only after
    // `cpu < limit` was read as true in this sequence, when the column is
    // valid for that row (precondition); the parent docs argue exactness.
    // `g` is a live reference. No stack use, no calls.
    unsafe {
        rseq_asm!(
            arm = "row",
            body = [
                "mov {row:e}, dword ptr fs:[{off} + 4]", // row = rseq->cpu_id
                "cmp {row:e}, dword ptr [{g}]",          // < gate->limit?
                "jae 6f",
                "shl {row}, {shift}",                    // * ROW_STRIDE
                "add {row}, qword ptr [{g} + 8]",        // + gate->column
                "add qword ptr [{row}], {d}",            // COMMIT
            ],
            refuse = ["xor {row:e}, {row:e}"],
            off = in(reg) off,
            g = in(reg) std::ptr::from_ref(g),
            row = out(reg) row,
            shift = const ROW_SHIFT,
            d = const D,
            options(nostack),
        );
    }
    row != 0
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
    let row: usize;
    // SAFETY: as in `add_imm`.
    unsafe {
        rseq_asm!(
            arm = "row",
            body = [
                "mov {row:e}, dword ptr fs:[{off} + 4]",
                "cmp {row:e}, dword ptr [{g}]",
                "jae 6f",
                "shl {row}, {shift}",
                "add {row}, qword ptr [{g} + 8]",
                "add qword ptr [{row}], {d}", // COMMIT
            ],
            refuse = ["xor {row:e}, {row:e}"],
            off = in(reg) off,
            g = in(reg) std::ptr::from_ref(g),
            d = in(reg) d,
            row = out(reg) row,
            shift = const ROW_SHIFT,
            options(nostack),
        );
    }
    row != 0
}

/// The `limit` contender of `benches/percpu.rs`: `iters` pairs of a bare
/// gated sequence (`+1` then `-1`) with every input in a register — the
/// descriptor addresses, the area offset, the gate pointer and the column —
/// so each op is: arm store, cpu-id load, `cmp` with the gate's limit in
/// memory, row address, commit. Returns the number of refused pairs
/// (stops at the first).
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
    // SAFETY: two sequences as in `add_imm`, each with its own descriptor
    // (34:, 35:), start (24:, 27:), post (25:, 28:) and abort (32:, 33:);
    // `column` is valid for every row below the limit read inside the
    // sequence (precondition). The loop counter is outside both ranges.
    unsafe {
        asm!(
            "lea {cs1}, [rip + 34f]",
            "lea {cs2}, [rip + 35f]",
            "22:",
            "23:",
            "mov qword ptr fs:[{off} + 8], {cs1}",
            "24:",
            "mov {row:e}, dword ptr fs:[{off} + 4]",
            "cmp {row:e}, dword ptr [{g}]",
            "jae 29f",
            "shl {row}, {shift}",
            "add {row}, {column}",
            "add qword ptr [{row}], 1",
            "25:",
            "26:",
            "mov qword ptr fs:[{off} + 8], {cs2}",
            "27:",
            "mov {row:e}, dword ptr fs:[{off} + 4]",
            "cmp {row:e}, dword ptr [{g}]",
            "jae 29f",
            "shl {row}, {shift}",
            "add {row}, {column}",
            "add qword ptr [{row}], -1",
            "28:",
            "sub {n}, 1",
            "jnz 22b",
            "29:",
            ".pushsection __rseq_failure, \"ax\"",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            "32:",
            "jmp 23b",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            "33:",
            "jmp 26b",
            ".popsection",
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
            cs1 = out(reg) _,
            cs2 = out(reg) _,
            row = out(reg) _,
            shift = const ROW_SHIFT,
            options(nostack),
        );
    }
    left
}

/// The per-CPU stack sequences of [`super::CpuStacks`]. Row layout (see
/// `stack.rs`): `len: u32` at 0, `gate: u32` at 4, `items: [u32; CAP]` at
/// 8, rows `1 << SHIFT` bytes apart. Each sequence checks `gate == 0`,
/// then loads `len` with a 4-byte load (the previous sequence's commit was
/// a 4-byte store of it: same size, so the load is store-forwarded; an
/// 8-byte load of `len` and `gate` together stalls ~15 cycles on every
/// operation) and checks it against `CAP` unsigned, which also refuses an
/// empty stack for pop (`len - 1` wraps). The commit is the store of the
/// new `len`: a single instruction, the last of the range; writes before
/// it go only to items above the committed `len` (push) or to the caller's
/// buffer (batch pop), which nobody else reads, so a restart only repeats
/// them.
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
        // SAFETY: the frame as in `add_imm`; the row address is formed only
        // for `cpu < n` (valid rows, precondition), and the item read is
        // `items[len - 1]` with `len - 1 < CAP` checked. The parent docs and
        // `stack.rs` argue exactness.
        unsafe {
            rseq_asm!(
                arm = "row",
                body = [
                    "mov {row:e}, dword ptr fs:[{off} + 4]", // cpu_id
                    "cmp {row:e}, {n:e}",
                    "jae 6f",
                    "shl {row}, {shift}",
                    "add {row}, {rows}",
                    "cmp dword ptr [{row} + 4], 0", // gate open?
                    "jne 6f",
                    "mov {t:e}, dword ptr [{row}]", // len
                    "sub {t}, 1",                   // len - 1 (wraps if 0)
                    "cmp {t}, {cap_1}",             // 0 < len <= CAP?
                    "ja 6f",
                    "mov {item:e}, dword ptr [{row} + 4*{t} + 8]",
                    "mov dword ptr [{row}], {t:e}", // COMMIT len - 1
                ],
                refuse = ["xor {row:e}, {row:e}"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                row = out(reg) row,
                t = out(reg) _,
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
                    "mov {row:e}, dword ptr fs:[{off} + 4]",
                    "cmp {row:e}, {n:e}",
                    "jae 6f",
                    "shl {row}, {shift}",
                    "add {row}, {rows}",
                    "cmp dword ptr [{row} + 4], 0", // gate open?
                    "jne 6f",
                    "mov {t:e}, dword ptr [{row}]", // len
                    "cmp {t}, {cap}",               // len < CAP?
                    "jae 6f",
                    "mov dword ptr [{row} + 4*{t} + 8], {item:e}",
                    "add {t:e}, 1",
                    "mov dword ptr [{row}], {t:e}", // COMMIT len + 1
                ],
                refuse = ["xor {row:e}, {row:e}"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                item = in(reg) item,
                row = out(reg) row,
                t = out(reg) _,
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
                    "mov {row:e}, dword ptr fs:[{off} + 4]",
                    "cmp {row:e}, {n:e}",
                    "jae 6f",
                    "shl {row}, {shift}",
                    "add {row}, {rows}",
                    "cmp dword ptr [{row} + 4], 0", // gate open?
                    "jne 6f",
                    "mov {t:e}, dword ptr [{row}]", // len
                    "lea {new}, [{t} + {k}]",       // new len
                    "cmp {new}, {cap}",             // fits?
                    "ja 6f",
                    "lea {t}, [{row} + 4*{t} + 8]", // &items[len]
                    "mov {j}, {k}",
                    "20:",
                    "test {j}, {j}",
                    "jz 21f",
                    "mov {x:e}, dword ptr [{src} + 4*{j} - 4]",
                    "mov dword ptr [{t} + 4*{j} - 4], {x:e}",
                    "sub {j}, 1",
                    "jmp 20b",
                    "21:",
                    "mov dword ptr [{row}], {new:e}", // COMMIT len + k
                ],
                refuse = ["xor {row:e}, {row:e}"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                src = in(reg) items.as_ptr(),
                k = in(reg) items.len(),
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
        // always holds) before `items[len - k..len]` is copied to `out`, a live buffer of `k`
        // items that only this thread uses.
        unsafe {
            rseq_asm!(
                arm = "row",
                body = [
                    "mov {row:e}, dword ptr fs:[{off} + 4]",
                    "cmp {row:e}, {n:e}",
                    "jae 6f",
                    "shl {row}, {shift}",
                    "add {row}, {rows}",
                    "cmp dword ptr [{row} + 4], 0",   // gate open?
                    "jne 6f",
                    "mov {t:e}, dword ptr [{row}]",   // len
                    "mov {new}, {t}",
                    "sub {new}, {k}",                 // new len
                    "jb 6f",                          // fewer than k
                    "lea {t}, [{row} + 4*{new} + 8]", // &items[len - k]
                    "mov {j}, {k}",
                    "20:",
                    "test {j}, {j}",
                    "jz 21f",
                    "mov {x:e}, dword ptr [{t} + 4*{j} - 4]",
                    "mov dword ptr [{dst} + 4*{j} - 4], {x:e}",
                    "sub {j}, 1",
                    "jmp 20b",
                    "21:",
                    "mov dword ptr [{row}], {new:e}", // COMMIT len - k
                ],
                refuse = ["xor {row:e}, {row:e}"],
                off = in(reg) off,
                n = in(reg) n,
                rows = in(reg) rows,
                dst = in(reg) out.as_mut_ptr(),
                k = in(reg) out.len(),
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
