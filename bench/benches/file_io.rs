//! Criterion benchmark of `aio::file::File`: 4 KiB random reads at queue
//! depth 1 and 32, threads and io_uring engines, on a 64 MiB file in
//! `/dev/shm` (buffered) and one in the target directory (`O_DIRECT`,
//! skipped if that is tmpfs). One criterion iteration is one request, so
//! the reported throughput is IOPS.
//!
//! `cargo bench -p bench --bench file_io`
//!
//! The 1 GiB runs against fio are `aio-bench io`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aio::file::Engine;
use bench::io::{self, IoJob, IoRunner, Rw, Stop};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZE: u64 = 64 << 20;

/// A prepared file, removed on drop.
struct Prepared(PathBuf);

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file_io(c: &mut Criterion) {
    let disk_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut targets = vec![("shm", PathBuf::from("/dev/shm"), false)];
    if !io::is_tmpfs(disk_dir).unwrap_or(true) {
        targets.push(("disk", disk_dir.to_path_buf(), true));
    }
    for (target, dir, direct) in targets {
        let file = Prepared(dir.join(format!("bench-file-io.{}.dat", std::process::id())));
        io::prepare_file(&file.0, SIZE, direct).expect("preparing the file");
        let mut group = c.benchmark_group(format!("file_io/{target}_randread"));
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(10)
            .throughput(Throughput::Elements(1));
        for engine in [Engine::Threads, Engine::IoUring] {
            for depth in [1, 32] {
                let job = IoJob {
                    path: file.0.clone(),
                    size: SIZE,
                    depth,
                    rw: Rw::RandRead,
                    direct,
                    verify: true,
                };
                let runner = IoRunner::new(&job, engine).expect("opening the file");
                let id = BenchmarkId::new(io::engine_label(engine), format!("depth{depth}"));
                let mut seed = 0;
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        seed += 1;
                        runner.run(Stop::Ops(iters), seed).expect("I/O run").elapsed
                    });
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, file_io);
criterion_main!(benches);
