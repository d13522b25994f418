//! Criterion benchmark of the `aio` executor: spawn+join of trivial tasks
//! (time per task) and a same-thread ping-pong of two tasks through
//! `CoQueue`s (time per round trip = two wakes).
//!
//! `cargo bench -p bench --bench tasks`
//!
//! The cross-thread wake latency needs a pause before every sample (so the
//! home thread is really blocked), which criterion's loop cannot give; it
//! is only in `aio-bench tasks`.

use std::time::Duration;

use aio::AioContext;
use bench::tasks;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Spawned and joined in one `block_on` at most; more iterations are run
/// as several batches so memory stays flat.
const MAX_BATCH: u64 = 10_000;

fn executor(c: &mut Criterion) {
    let ctx = AioContext::new().expect("creating a context");
    let mut group = c.benchmark_group("tasks");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    group.bench_function("spawn_join", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(MAX_BATCH);
                total += tasks::spawn_batch(&ctx, n as usize).expect("spawn batch");
                left -= n;
            }
            total
        });
    });
    group.bench_function("coqueue_pingpong_round_trip", |b| {
        b.iter_custom(|iters| {
            let r = tasks::pingpong(&ctx, iters).expect("ping-pong");
            assert_eq!(r.fallback_yields, 0);
            r.elapsed
        });
    });
    group.finish();
}

criterion_group!(benches, executor);
criterion_main!(benches);
