//! Criterion benchmarks of the loop's hot paths, so that a regression in
//! one of them shows in `cargo bench` even when the end-to-end numbers
//! hide it:
//!
//! * `bh_schedule_run`: schedule a bottom half and run one non-blocking
//!   `poll` that runs it (the cost of deferring work to the loop);
//! * `timer_arm_cancel`: arm a realtime timer a second ahead and cancel it
//!   (what a request timeout pays when the request completes in time);
//! * `notify_awake`: `AioContext::notify` while the loop is not asleep
//!   (the elided path: no eventfd write);
//! * `dispatch_idle_poll`: a non-blocking `poll` with nothing to do (the
//!   floor of every loop iteration).
//!
//! `cargo bench -p bench --bench hot_paths`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aio::{AioContext, ClockType};
use criterion::{criterion_group, criterion_main, Criterion};

fn hot_paths(c: &mut Criterion) {
    let ctx = AioContext::new().expect("creating a context");
    let mut group = c.benchmark_group("hot_paths");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let bh = ctx.bh_new(move |_| {
        r.fetch_add(1, Ordering::Relaxed);
    });
    group.bench_function("bh_schedule_run", |b| {
        b.iter(|| {
            bh.schedule();
            ctx.poll(false)
        })
    });
    assert!(
        runs.load(Ordering::Relaxed) > 0,
        "the bottom half never ran"
    );

    let timer = ctx.timer_new(ClockType::Realtime, |_| {});
    group.bench_function("timer_arm_cancel", |b| {
        b.iter(|| {
            timer.mod_in_ns(1_000_000_000);
            timer.del();
        })
    });

    // The loop is not polling, so notify takes the path that writes no
    // eventfd (the first call may write once; a poll clears it).
    group.bench_function("notify_awake", |b| b.iter(|| ctx.notify()));
    ctx.poll(false);

    group.bench_function("dispatch_idle_poll", |b| b.iter(|| ctx.poll(false)));
    group.finish();
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
