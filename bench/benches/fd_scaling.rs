//! Criterion benchmark: one ping-pong iteration (set the active eventfd,
//! one blocking poll that dispatches it) against the number of idle fds
//! registered, for `aio`'s epoll and ppoll backends and the raw-epoll floor.
//!
//! `cargo bench -p bench --bench fd_scaling`

use std::time::Duration;

use bench::{Fixture, Flavor, IDLE_COUNTS};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};

fn fd_scaling(c: &mut Criterion) {
    let max_idle = IDLE_COUNTS[IDLE_COUNTS.len() - 1];
    bench::raise_fd_limit_for(max_idle).expect("raising RLIMIT_NOFILE");
    for flavor in [Flavor::Epoll, Flavor::Ppoll, Flavor::RawEpoll] {
        let mut group = c.benchmark_group(format!("fd_scaling/{}", flavor.label()));
        group
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sample_size(20);
        if flavor == Flavor::Ppoll {
            // ~1.4 ms per iteration at 10000 fds: linear sampling would
            // need 210 iterations per sample step; flat sampling keeps the
            // run inside the measurement time.
            group.sampling_mode(SamplingMode::Flat);
        }
        for &n in &IDLE_COUNTS {
            // One fixture at a time: 2 x 10000 eventfds would not fit the
            // usual hard fd limit.
            let mut fx = Fixture::new(flavor, n)
                .unwrap_or_else(|e| panic!("setting up {flavor} with {n} idle fds: {e}"));
            group.bench_with_input(BenchmarkId::new("idle_fds", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    fx.run_timed(iters)
                        .unwrap_or_else(|e| panic!("{flavor} with {n} idle fds: {e}"))
                });
            });
        }
        group.finish();
    }
}

criterion_group!(benches, fd_scaling);
criterion_main!(benches);
