//! Kill a reference count while other threads still hold references, then
//! wait for the drain: the smallest version of a hot device shutdown.
//!
//! `cargo run --release --example drain`

use percpu_ref::{Completion, PercpuRef};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn main() {
    let drained = Completion::new();
    let device = Arc::new(PercpuRef::new("pmem0", drained.clone()));
    let ops = Arc::new(AtomicU64::new(0));

    let workers: Vec<_> = (0..2)
        .map(|i| {
            let device = Arc::clone(&device);
            let ops = Arc::clone(&ops);
            thread::spawn(move || {
                let mut done = 0u64;
                // New I/O only while the device is live.
                while let Some(io) = device.tryget_live() {
                    // Hold the reference across a short "I/O".
                    let page = io.clone();
                    std::hint::black_box(&*page);
                    done += 1;
                }
                // In-flight I/O finishing after the kill: hold a reference
                // a little longer.
                let tail = device.tryget().expect("count not drained yet");
                thread::sleep(Duration::from_millis(20 * (i + 1)));
                drop(tail);
                ops.fetch_add(done, Relaxed);
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let mut confirmed_at = None;
    device
        .kill_and_confirm(|| confirmed_at = Some(t0.elapsed()))
        .expect("first kill");
    let confirmed_at = confirmed_at.expect("confirm runs inside kill_and_confirm");
    println!("killed: tryget_live fails on every CPU after {confirmed_at:?}");
    drained.wait();
    println!("drained: last reference dropped after {:?}", t0.elapsed());
    for w in workers {
        w.join().expect("worker");
    }
    println!(
        "{} get/put pairs before the kill; release ran exactly once: {}",
        ops.load(Relaxed),
        drained.is_complete()
    );
}
