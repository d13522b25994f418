//! The two file engines side by side: the same workload gives identical
//! files; io_uring really bypasses the thread pool and submits from the
//! context; requests outlive dropped futures and contexts safely.

mod util;

use std::path::PathBuf;

use aio::file::{Engine, File, OpenOptions};
use aio::{AioContext, Error, PoolOptions, ThreadPool};

fn path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("aio-engines");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn opts(engine: Engine, pool: &ThreadPool) -> OpenOptions {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .engine(engine)
        .pool(pool.clone())
}

/// The byte at file offset `o`: a function of the offset only, so writes
/// that overlap while in flight together leave the same result whichever
/// lands last.
fn byte_at(o: u64) -> u8 {
    (o ^ (o >> 8) ^ (o >> 16) ^ (o >> 24)) as u8
}

/// 10 000 writes of 4 KiB–16 KiB at pseudo-random offsets over 64 MiB, 32
/// in flight, then every byte read back; returns the file's bytes.
fn workload(ctx: &AioContext, f: &File) -> Vec<u8> {
    const SIZE: u64 = 64 << 20;
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut handles = std::collections::VecDeque::new();
    for _ in 0..10_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 4096 * (1 + (x % 4)) as usize;
        let off = (x >> 20) % (SIZE - len as u64);
        let data: Vec<u8> = (off..off + len as u64).map(byte_at).collect();
        let fut = f.write_at(data, off);
        handles.push_back(ctx.spawn(fut));
        if handles.len() == 32 {
            let h = handles.pop_front().unwrap();
            ctx.block_on(h).unwrap().unwrap();
        }
    }
    while let Some(h) = handles.pop_front() {
        ctx.block_on(h).unwrap().unwrap();
    }
    ctx.block_on(f.flush()).unwrap();
    let len = ctx.block_on(f.len()).unwrap() as usize;
    // Read back in 1 MiB pieces, 8 in flight.
    let reads: Vec<_> = (0..len.div_ceil(1 << 20))
        .map(|i| ctx.spawn(f.read_at(vec![0u8; 1 << 20], (i as u64) << 20)))
        .collect();
    let mut out = Vec::with_capacity(len);
    for h in reads {
        let (n, buf) = ctx.block_on(h).unwrap().unwrap();
        out.extend_from_slice(&buf[..n]);
    }
    // Every written byte reads back as the pattern; the rest as zero.
    let written = out
        .iter()
        .enumerate()
        .filter(|(o, &b)| b == byte_at(*o as u64))
        .count();
    assert!(written > out.len() / 2, "most of the file was written");
    out
}

#[test]
fn both_engines_write_identical_files_and_read_every_byte_back() {
    let ctx = AioContext::new().unwrap();
    let pool = ThreadPool::new(PoolOptions::new().name("engines"));
    let (pt, pu) = (path("threads"), path("uring"));
    let ft = File::open(&pt, &opts(Engine::Threads, &pool)).unwrap();
    let threads_bytes = workload(&ctx, &ft);
    let submitted_by_threads = pool.stats().submitted;
    assert!(submitted_by_threads > 10_000);
    let fu = File::open(&pu, &opts(Engine::IoUring, &pool)).unwrap();
    let uring_bytes = workload(&ctx, &fu);
    // io_uring used the pool only for len(): one job.
    assert_eq!(pool.stats().submitted - submitted_by_threads, 1);
    assert_eq!(threads_bytes.len(), uring_bytes.len());
    assert!(threads_bytes == uring_bytes, "the engines disagree");
    assert_eq!(std::fs::read(&pt).unwrap(), threads_bytes);
    assert_eq!(std::fs::read(&pu).unwrap(), uring_bytes);
    let _ = std::fs::remove_file(pt);
    let _ = std::fs::remove_file(pu);
}

#[test]
fn io_uring_request_outside_a_context_is_a_clear_error() {
    let p = path("outside");
    let pool = ThreadPool::new(PoolOptions::new());
    let f = File::open(&p, &opts(Engine::IoUring, &pool)).unwrap();
    let err = util::park::park_block_on(f.write_at(vec![1u8; 10], 0)).unwrap_err();
    assert!(matches!(err, Error::NotInTask), "{err}");
    let _ = std::fs::remove_file(p);
}

#[test]
fn dropped_requests_and_a_dropped_context_are_safe() {
    // Futures dropped while their requests are in flight, then the context
    // (and its ring) dropped: the ring waits for the kernel before freeing
    // the buffers. Run under the test binary, a use-after-free here shows
    // up as corrupted data in the next test run or a crash.
    let p = path("dropped");
    let pool = ThreadPool::new(PoolOptions::new());
    let f = File::open(&p, &opts(Engine::IoUring, &pool)).unwrap();
    {
        let ctx = AioContext::new().unwrap();
        ctx.block_on(f.write_at(vec![7u8; 1 << 20], 0)).unwrap();
        for i in 0..64u64 {
            let h = ctx.spawn(f.read_at(vec![0u8; 1 << 16], i << 14));
            if i % 2 == 0 {
                h.abort();
            }
        }
        // Submit some, then drop everything.
        ctx.poll(false);
        ctx.poll(false);
    }
    let ctx = AioContext::new().unwrap();
    let (n, buf) = ctx.block_on(f.read_at(vec![0u8; 1 << 20], 0)).unwrap();
    assert_eq!(n, 1 << 20);
    assert!(buf.iter().all(|&b| b == 7));
    let _ = std::fs::remove_file(p);
}
