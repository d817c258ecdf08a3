//! Page reference counts with a lifetime hook on the terminal transitions.
//!
//! A [`PageRef<H>`](PageRef) is one atomic counter per page — `first_ref`
//! (allocate, 0→1), `inc`, `get_unless_zero` (the speculative get of
//! lockless lookups), `dec_and_test`, and `freeze`/`unfreeze` (exclusive
//! ownership, as for migration) — plus a [`PageRefHook`] that runs **only
//! when the count leaves or returns to zero**. [`NoHook`] is zero-sized and
//! compiles away: an ordinary page is exactly a bare `AtomicU32` counter
//! (`scripts/zero-cost.sh` proves it with callgrind instruction counts).
//! [`PercpuRefHook`] and [`ArcPercpuRefHook`] tie each *allocated* page to
//! its device's [`PercpuRef`](crate::PercpuRef), and [`MixedHook`] mixes
//! device and ordinary pages in one array with a per-page flag looked at
//! only on those transitions.
//!
//! # Why hook 0↔1, and not every get
//!
//! A page holds one device reference exactly while its count is not zero,
//! so every path — `inc`, the speculative `get_unless_zero`, the final put —
//! is covered by construction, and the hot get/put of a referenced page is
//! one atomic add, the same for device and ordinary pages. How Linux came to
//! this design (2016–2022, and the 2017 linux-mm thread this crate grew
//! from): [`crate::docs::background`].
//!
//! | operation | ordinary page (`NoHook`) | device page (`PercpuRefHook`) |
//! |---|---|---|
//! | `inc`, `get_unless_zero`, non-final `dec_and_test` | one atomic RMW | the same instructions |
//! | `first_ref` (0→1) | one CAS | `tryget_live` (a per-CPU add) + one CAS |
//! | final `dec_and_test` (1→0) | one RMW + acquire fence | + `put_many(1)` (a per-CPU add) |
//!
//! # Example
//!
//! ```
//! use percpu_ref::{Completion, FirstRefError, MixedHook, PageRef, PercpuRef, PercpuRefHook};
//!
//! let drained = Completion::new();
//! let device = PercpuRef::new("pmem0", drained.clone());
//! // Page 0 is a device page, page 1 an ordinary one, in one array.
//! // SAFETY: only the PageRefs call the hook, and every reference below is
//! // dropped exactly once.
//! let dev = unsafe { PercpuRefHook::new(&device) };
//! let pages = [PageRef::new(MixedHook::device(dev)), PageRef::new(MixedHook::ordinary())];
//!
//! pages[0].first_ref().unwrap(); // allocation: one tryget_live on the device
//! assert!(pages[0].get_unless_zero()); // a lockless lookup: no device work
//! pages[0].inc(); // so is every other get...
//! assert!(!pages[0].dec_and_test()); // ...and put
//! assert!(!pages[0].dec_and_test());
//!
//! device.kill().unwrap(); // shutdown while page 0 is still in use: legal
//! assert_eq!(pages[0].count(), 1);
//! assert!(!drained.is_complete());
//! assert_eq!(pages[1].first_ref(), Ok(())); // ordinary pages don't care
//! assert!(pages[1].dec_and_test());
//!
//! assert!(pages[0].dec_and_test()); // the last put of the last device page...
//! assert!(drained.is_complete()); // ...drains the device: now unmap
//! assert!(!pages[0].get_unless_zero()); // a freed page is never resurrected
//! assert_eq!(pages[0].first_ref(), Err(FirstRefError::Refused)); // nor reallocated
//! ```

mod counter;
mod hooks;

pub use counter::{FirstRefError, NoHook, PageRef, PageRefHook};
pub use hooks::{ArcPercpuRefHook, MixedHook, PercpuRefHook};
