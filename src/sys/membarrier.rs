//! `membarrier(2)` for the rseq tier: register once, then use
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ` as the "every CPU has left its
//! restartable sequence" barrier.
//!
//! Registration is per process (per `mm`) and covers threads created later.
//! Register early: before other threads exist it costs microseconds, with
//! many running threads the kernel's synchronisation makes it ~20 ms.
//!
//! Only compiled into the rseq tier's Linux build; the portable fallback of
//! [`super::rseq::fence_all_cpus`] is a `SeqCst` fence and needs none of this.

use rustix::io::Errno;
use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};

/// Register the process for `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ`; `false`
/// if the kernel lacks the command (before Linux 5.10, or membarrier
/// disabled) or refuses the registration. Idempotent.
pub(crate) fn register_private_expedited_rseq() -> bool {
    let supported = membarrier_query();
    supported.contains_command(MembarrierCommand::PrivateExpeditedRseq)
        && supported.contains_command(MembarrierCommand::RegisterPrivateExpeditedRseq)
        && membarrier(MembarrierCommand::RegisterPrivateExpeditedRseq).is_ok()
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0)`: when it
/// returns, every CPU that was running a thread of this process has executed
/// a full memory barrier and had its restartable sequence (if any) aborted;
/// threads that were not running were preempted, which aborts theirs too.
///
/// Requires a successful [`register_private_expedited_rseq`]. After that the
/// only documented failure is a transient `ENOMEM` (cpumask allocation),
/// which is retried. Any other error would mean the kernel broke its
/// contract, and continuing would silently lose counts (the caller is about
/// to read slots it believes quiescent), so the process aborts instead.
pub(crate) fn private_expedited_rseq() {
    loop {
        match membarrier(MembarrierCommand::PrivateExpeditedRseq) {
            Ok(()) => return,
            Err(Errno::NOMEM | Errno::AGAIN | Errno::INTR) => std::thread::yield_now(),
            Err(e) => {
                eprintln!(
                    "percpu-ref: membarrier(PRIVATE_EXPEDITED_RSEQ) failed after a successful \
                     registration: {e}; aborting rather than losing counts"
                );
                std::process::abort();
            }
        }
    }
}
