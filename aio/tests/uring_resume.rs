//! The io_uring engine resumes a task woken by a completion in the same
//! loop iteration, and submits what the resumed tasks issue in one go:
//! counted with the context's loop counters (no timing), and checked for
//! correctness when resumed tasks nest `block_on` or run 32 at a time.

mod util;

use std::path::PathBuf;
use std::sync::Arc;

use aio::file::{Engine, File, OpenOptions};
use aio::AioContext;
use util::deadline::within_a_minute;
use util::Remove;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 256; // 1 MiB

/// A file in /dev/shm (reads complete inline, so counts are exact) filled
/// with `stamp(block)` in every byte of each block.
fn stamped_file(name: &str) -> Remove {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    stamped_file_in(&dir, name)
}

/// [`stamped_file`] in `dir`.
fn stamped_file_in(dir: &std::path::Path, name: &str) -> Remove {
    let p = dir.join(format!("aio-uring-resume-{name}-{}", std::process::id()));
    let mut data = Vec::with_capacity(BLOCK * BLOCKS as usize);
    for b in 0..BLOCKS {
        data.extend(std::iter::repeat_n(stamp(b), BLOCK));
    }
    std::fs::write(&p, data).unwrap();
    Remove(p)
}

fn stamp(block: u64) -> u8 {
    (block as u8).wrapping_mul(31).wrapping_add(7)
}

fn open(p: &PathBuf) -> Arc<File> {
    let o = OpenOptions::new()
        .read(true)
        .write(true)
        .engine(Engine::IoUring);
    Arc::new(File::open(p, &o).unwrap())
}

/// Reads block `b` and checks that every byte is `want`.
async fn expect_block(f: &File, b: u64, want: u8) {
    let buf = f
        .read_exact_at(vec![0u8; BLOCK], b * BLOCK as u64)
        .await
        .unwrap();
    assert!(buf.iter().all(|&x| x == want), "block {b}: want {want}");
}

/// Runs `body` on a fresh context and a stamped file opened with the
/// io_uring engine, on a thread of its own (see [`within_a_minute`]);
/// returns the file's bytes afterwards.
fn with_file(name: &str, body: impl FnOnce(&AioContext, Arc<File>) + Send + 'static) -> Vec<u8> {
    let p = stamped_file(name);
    let q = p.0.clone();
    within_a_minute(move || {
        let ctx = AioContext::new().unwrap();
        body(&ctx, open(&q));
    });
    std::fs::read(&p.0).unwrap()
}

#[test]
fn a_completion_resumes_its_task_in_the_same_iteration() {
    with_file("same-iter", |ctx, f| {
        const N: u64 = 2000;
        // Warm up: the ring exists and its handler is registered.
        ctx.block_on(f.read_exact_at(vec![0u8; BLOCK], 0)).unwrap();
        let before = ctx.stats();
        let g = f.clone();
        let h = ctx.spawn(async move {
            for i in 0..N {
                let b = (i * 7919) % BLOCKS;
                expect_block(&g, b, stamp(b)).await;
            }
        });
        ctx.block_on(h).unwrap();
        let after = ctx.stats();
        let iters = after.iterations - before.iterations;
        let bhs = after.bh_runs - before.bh_runs;
        // The task is resumed by the iteration whose wait returned its
        // completion, not by the runner bottom half one iteration later
        // (before: one runner run per request, and the submit bottom half
        // too at depth 32). A few spare.
        assert!(
            bhs <= N / 10,
            "{bhs} bottom-half runs for {N} requests: {before:?} -> {after:?}"
        );
        // And the loop does not spin: about one iteration per request, the
        // one whose wait returned its completion (the wake-up leaves no
        // notification behind that would make the next wait return at
        // once, an empty iteration per request before).
        assert!(
            iters <= N + N / 10,
            "{iters} iterations for {N} requests: {before:?} -> {after:?}"
        );
    });
}

#[test]
fn a_resumed_task_can_block_on_another_request() {
    with_file("nested", |ctx, f| {
        let (g, c) = (f.clone(), ctx.clone());
        let h = ctx.spawn(async move {
            for i in 0..200u64 {
                let b = i % BLOCKS;
                expect_block(&g, b, stamp(b)).await;
                // Resumed by the completion: a nested poll must still
                // submit and reap this one.
                let n = (b + 1) % BLOCKS;
                c.block_on(expect_block(&g, n, stamp(n)));
            }
        });
        ctx.block_on(h).unwrap();
    });
}

#[test]
fn thirty_two_tasks_write_and_read_back_through_resumed_submissions() {
    let data = with_file("depth32", |ctx, f| {
        let mut handles = Vec::new();
        for t in 0..32u64 {
            let g = f.clone();
            handles.push(ctx.spawn(async move {
                // Each task owns the blocks congruent to t mod 32.
                for round in 0..40u64 {
                    let b = t + 32 * (round % (BLOCKS / 32));
                    let v = (t as u8) ^ (round as u8) ^ 0x5a;
                    g.write_at(vec![v; BLOCK], b * BLOCK as u64).await.unwrap();
                    expect_block(&g, b, v).await;
                }
            }));
        }
        for h in handles {
            ctx.block_on(h).unwrap();
        }
    });
    // The last value each block got, as read by std.
    for t in 0..32u64 {
        for slot in 0..BLOCKS / 32 {
            let b = t + 32 * slot;
            // The last round writing slot `slot` is the largest round < 40
            // with round % 8 == slot.
            let last = (0..40u64)
                .filter(|r| r % (BLOCKS / 32) == slot)
                .max()
                .unwrap();
            let v = (t as u8) ^ (last as u8) ^ 0x5a;
            let blk = &data[(b as usize) * BLOCK..(b as usize + 1) * BLOCK];
            assert!(blk.iter().all(|&x| x == v), "block {b} on disk");
        }
    }
}

#[test]
fn a_wake_from_another_thread_between_completions_is_not_lost() {
    // A task resumed by its completion then waits for a wake-up from
    // another thread (a task on another context finishing): that wake-up
    // must not be lost, though the resume left the runner queued.
    with_file("cross", |ctx, f| {
        let other = util::other_loop::OtherLoop::start();
        let o = other.ctx();
        let waiter = ctx.spawn(async move {
            for i in 0..200i64 {
                // Resumed by its completion, then it waits for a wake-up
                // from the other thread while the loop has nothing else
                // to do.
                let b = i as u64 % BLOCKS;
                expect_block(&f, b, stamp(b)).await;
                let h = o.spawn(async move {
                    aio::sleep_ns(aio::ClockType::Realtime, 200_000 + i).await;
                    i
                });
                assert_eq!(h.await.unwrap(), i);
            }
        });
        ctx.block_on(waiter).unwrap();
        other.stop();
    });
}

#[test]
fn a_burst_larger_than_both_rings_completes_and_reads_the_right_blocks() {
    // 3000 requests issued in one iteration: more than the submission ring
    // (256) and the completion ring (1024) hold, so pushes submit early and
    // completions can overflow the CQ before the eventfd handler reaps.
    // Every task must still be resumed (a lost waker hangs the test) and
    // read its own block.
    with_file("burst", |ctx, f| {
        let handles: Vec<_> = (0..3000u64)
            .map(|i| {
                let g = f.clone();
                ctx.spawn(async move {
                    let b = (i * 7) % BLOCKS;
                    expect_block(&g, b, stamp(b)).await;
                })
            })
            .collect();
        for h in handles {
            ctx.block_on(h).unwrap();
        }
    });
}

/// 16 tasks started in one iteration, each reading one block: returns how
/// many `io_uring_enter` calls handed their requests over, or `None` when
/// the file cannot be opened that way (no `O_DIRECT` on its filesystem).
fn submits_for_16_reads(path: PathBuf, direct: bool) -> Option<u64> {
    let o = OpenOptions::new()
        .read(true)
        .direct(direct)
        .engine(Engine::IoUring);
    let f = match File::open(&path, &o) {
        Ok(f) => Arc::new(f),
        Err(e) if direct => {
            eprintln!("skipping the O_DIRECT half: {e}");
            return None;
        }
        Err(e) => panic!("opening {}: {e}", path.display()),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    within_a_minute(move || {
        let ctx = AioContext::new().unwrap();
        let read = |f: Arc<File>, b: u64| async move {
            let buf = aio::file::AlignedBuf::new(BLOCK, BLOCK).unwrap();
            let buf = f.read_exact_at(buf, b * BLOCK as u64).await.unwrap();
            assert!(buf.iter().all(|&x| x == stamp(b)), "block {b}");
        };
        // Warm up: the ring exists and its handler is registered.
        ctx.block_on(read(f.clone(), 0));
        let before = ctx.stats().uring_submits;
        let handles: Vec<_> = (0..16u64).map(|b| ctx.spawn(read(f.clone(), b))).collect();
        for h in handles {
            ctx.block_on(h).unwrap();
        }
        tx.send(ctx.stats().uring_submits - before).unwrap();
    });
    Some(rx.recv().unwrap())
}

#[test]
fn o_direct_requests_go_to_the_kernel_one_by_one_and_buffered_ones_batch() {
    // Buffered: the first few are handed over at once, the rest of the
    // tasks' requests in one batch.
    let shm = stamped_file("batch");
    let n = submits_for_16_reads(shm.0.clone(), false).unwrap();
    assert!(n < 16, "{n} submissions for 16 buffered requests");

    // O_DIRECT (a disk, not tmpfs): every request at once, as issued.
    let disk = stamped_file_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "direct");
    if let Some(n) = submits_for_16_reads(disk.0.clone(), true) {
        assert!(n >= 16, "{n} submissions for 16 O_DIRECT requests");
    }
}
