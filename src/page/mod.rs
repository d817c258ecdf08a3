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
//! # Why hook 0↔1, and not every get: the kernel's history
//!
//! Linux 4.5 (2016, `5c2c2587b132`, "introduce {get|put}_dev_pagemap() for
//! dax-gup") tied pages of a `ZONE_DEVICE` mapping (persistent memory
//! behind `/dev/dax`) to the mapping's `dev_pagemap` `percpu_ref`: every
//! `get_page()` of such a page also did a `percpu_ref_get`, every
//! `put_page()` a put, so the driver could kill the ref and wait for all
//! page users before removing the mapping. That put a zone test in the
//! kernel's hottest inline functions for *every* page and a second counter
//! update on every get and put of a device page — and still missed paths:
//! in the April 2017 linux-mm thread "get_zone_device_page() in get_page()
//! and page_cache_get_speculative()", Kirill Shutemov found that the
//! speculative get of lockless lookups (and the generic GUP code) took
//! device pages without the pgmap reference, and argued for hooking at the
//! `page_ref_*` level, the one choke point all paths go through. He then
//! proposed taking the percpu ref out of the hot path entirely by checking
//! at teardown that every page count was back to its idle value; Dan
//! Williams rejected that: starting driver shutdown while page references
//! are outstanding is legal, the `percpu_ref` is what lets teardown *wait*
//! for them, and a count check at release time just races and crashes.
//!
//! What Linux settled on takes the lifetime reference per page instead of
//! per get. First, in 4.12 (`71389703839e`, "Replace
//! {get,put}_zone_device_page() with a single reference to fix pmem
//! crash"), one reference per page for the life of the mapping; then, in
//! 6.1 (`0dc45ca1ce18`, "take a pgmap reference on page allocation", after
//! `27674ef6c73f` let free device pages sit at count 0), one reference per
//! *allocated* page, taken with `percpu_ref_tryget_live` on the page's 0→1
//! transition (so allocation fails once the device is killed) and dropped
//! when the count returns to 0. That is this module. The invariant "a page
//! holds one device reference exactly while its count is not zero" covers
//! every path by construction — `inc` needs a reference, `get_unless_zero`
//! never moves a count off zero — so the speculative get needs no hook; the
//! hot get/put of a referenced page is one atomic add, the same for device
//! and ordinary pages; and the `PercpuRef` is touched once per allocation,
//! not once per get. Teardown is kill → wait for the drain → unmap (Linux's
//! 2019 fix "devm_memremap_pages: fix final page put race" is the reminder
//! that the wait is not optional).
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
