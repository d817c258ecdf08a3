//! CPU identity: how many slots a per-CPU counter needs, and which one the
//! calling thread should use right now.
//!
//! Correctness never depends on `current()` being exact: the portable tier
//! updates slots with atomic read-modify-writes, so a stale or shared index
//! only costs cache-line traffic, never a lost update.

use std::sync::OnceLock;

/// Number of per-CPU slots: the *possible* CPUs of the machine, so CPU
/// hotplug never yields an index out of range.
#[inline]
pub(crate) fn possible() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        let fallback = std::thread::available_parallelism().map_or(1, usize::from);
        if cfg!(miri) {
            return fallback.clamp(1, 4);
        }
        std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| parse_cpu_list_max(&s))
            .map_or(fallback, |max| max + 1)
            .max(1)
    })
}

/// Highest CPU number in a sysfs CPU list such as `0-3,8-11` or `0`.
pub(crate) fn parse_cpu_list_max(s: &str) -> Option<usize> {
    s.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| r.rsplit('-').next().unwrap_or(r).trim().parse::<usize>())
        .try_fold(None::<usize>, |acc, n| Some(acc.max(Some(n.ok()?))))
        .flatten()
}

/// The slot index the calling thread should use now, `< possible()`.
#[inline]
pub(crate) fn current() -> usize {
    #[cfg(percpu_ref_linux)]
    {
        let n = possible();
        // The rseq area's `cpu_id` (one load, ~0.25 ns) when glibc
        // registered one; the kernel's ids are always below the possible
        // CPUs, the check only guards a sysfs/kernel disagreement.
        if let Some(cpu) = super::rseq::current_cpu() {
            if cpu < n {
                return cpu;
            }
        }
        // glibc's `sched_getcpu` goes through the vDSO: no syscall. (Not
        // rustix's: its vDSO call crashes under valgrind, rustix#1559.)
        // SAFETY: no preconditions; returns -1 on error.
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).unwrap_or(0) % n
    }
    #[cfg(not(any(percpu_ref_linux, percpu_ref_model)))]
    {
        thread_index() % possible()
    }
    // Under a model the slots pick their "CPU" with `sync::model_cpu`.
    #[cfg(percpu_ref_model)]
    {
        crate::sync::model_cpu() % possible()
    }
}

/// A small per-thread number, handed out round-robin: the fallback where the
/// CPU id cannot be read (a real std atomic: never under a model).
#[cfg(not(any(percpu_ref_linux, percpu_ref_model)))]
fn thread_index() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Relaxed: only uniqueness of the handed-out numbers matters, which
        // the read-modify-write gives without any ordering.
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list_max("0\n"), Some(0));
        assert_eq!(parse_cpu_list_max("0-1\n"), Some(1));
        assert_eq!(parse_cpu_list_max("0-3,8-11"), Some(11));
        assert_eq!(parse_cpu_list_max("garbage"), None);
        assert_eq!(parse_cpu_list_max(""), None);
    }

    #[test]
    fn current_is_in_range() {
        assert!(current() < possible());
    }
}
