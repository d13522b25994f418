//! The io_uring engine is watched through the ring's own fd, checked after
//! every wait, and drained in a few rounds per iteration: completions that
//! arrive while the loop goes to sleep (or that interrupt its wait) must
//! not be lost, a wake-up from another thread must not be lost next to
//! them, the rounds must not starve other work, and a reaped ring must
//! leave the loop idle.

mod util;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::file::{AlignedBuf, Engine, File, OpenOptions};
use aio::{AioContext, ClientType, FdHandler};
use util::deadline::within_a_minute;
use util::Remove;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 256; // 1 MiB

fn stamp(block: u64) -> u8 {
    (block as u8).wrapping_mul(13).wrapping_add(1)
}

/// A 1 MiB file of stamped blocks in `dir`.
fn stamped_file(dir: &Path, name: &str) -> Remove {
    let p = dir.join(format!("aio-uring-peek-{name}-{}", std::process::id()));
    let mut data = Vec::with_capacity(BLOCK * BLOCKS as usize);
    for b in 0..BLOCKS {
        data.extend(std::iter::repeat_n(stamp(b), BLOCK));
    }
    std::fs::write(&p, data).unwrap();
    Remove(p)
}

/// A file on the build's disk, opened with `O_DIRECT` where the filesystem
/// allows it: its completions come from the device's interrupt, as task
/// work that wakes (and interrupts) the sleeping loop.
fn disk_file(name: &str) -> Remove {
    stamped_file(Path::new(env!("CARGO_TARGET_TMPDIR")), name)
}

fn open(p: &Path, direct: bool) -> Arc<File> {
    let o = OpenOptions::new()
        .read(true)
        .write(true)
        .direct(direct)
        .engine(Engine::IoUring);
    match File::open(p, &o) {
        Ok(f) => Arc::new(f),
        // A filesystem without O_DIRECT: the buffered path still goes
        // through the ring.
        Err(_) if direct => open(p, false),
        Err(e) => panic!("opening {}: {e}", p.display()),
    }
}

/// Reads block `b` (aligned buffer) and checks every byte is `want`.
async fn expect_block(f: &File, b: u64, want: u8) {
    let buf = AlignedBuf::new(BLOCK, BLOCK).unwrap();
    let buf = f.read_exact_at(buf, b * BLOCK as u64).await.unwrap();
    assert!(buf.iter().all(|&x| x == want), "block {b}: want {want}");
}

async fn write_block(f: &File, b: u64, v: u8) {
    let mut buf = AlignedBuf::new(BLOCK, BLOCK).unwrap();
    buf.fill(v);
    f.write_at(buf, b * BLOCK as u64).await.unwrap();
}

#[test]
fn thirty_two_tasks_on_a_direct_disk_file_finish_and_leave_the_right_bytes() {
    const ROUNDS: u64 = 30;
    fn value(t: u64, round: u64) -> u8 {
        (t as u8) ^ (round as u8).wrapping_mul(3) ^ 0xa5
    }
    let file = disk_file("depth32");
    let p = file.0.clone();
    within_a_minute(move || {
        let ctx = AioContext::new().unwrap();
        let f = open(&p, true);
        let handles: Vec<_> = (0..32u64)
            .map(|t| {
                let g = f.clone();
                ctx.spawn(async move {
                    // Task t owns block t.
                    for round in 0..ROUNDS {
                        write_block(&g, t, value(t, round)).await;
                        expect_block(&g, t, value(t, round)).await;
                    }
                })
            })
            .collect();
        for h in handles {
            ctx.block_on(h).unwrap();
        }
    });
    let data = std::fs::read(&file.0).unwrap();
    for (b, blk) in data.chunks(BLOCK).enumerate() {
        let b = b as u64;
        let want = if b < 32 {
            value(b, ROUNDS - 1)
        } else {
            stamp(b)
        };
        assert!(blk.iter().all(|&x| x == want), "block {b} on disk");
    }
}

#[test]
fn a_wake_from_another_thread_among_disk_completions_is_not_lost() {
    // One task keeps a direct read in flight; another waits, over and
    // over, for a task on another thread's context. Each cross-thread wake
    // lands while the loop sleeps, reaps completions without a ring-fd
    // event, or resumes tasks: none may be lost.
    let file = disk_file("cross");
    let p = file.0.clone();
    within_a_minute(move || {
        let other = util::other_loop::OtherLoop::start();
        let ctx = AioContext::new().unwrap();
        let f = open(&p, true);
        let reader = ctx.spawn(async move {
            for i in 0..300u64 {
                let b = (i * 37) % BLOCKS;
                expect_block(&f, b, stamp(b)).await;
            }
        });
        let o = other.ctx();
        let waiter = ctx.spawn(async move {
            for i in 0..200i64 {
                let h = o.spawn(async move {
                    aio::sleep_ns(aio::ClockType::Realtime, 50_000 + i).await;
                    i
                });
                assert_eq!(h.await.unwrap(), i);
            }
        });
        ctx.block_on(reader).unwrap();
        ctx.block_on(waiter).unwrap();
        other.stop();
    });
}

/// `/dev/zero`, read through the ring: every read completes inside the
/// submitting syscall, so the ring is never empty after a submission.
fn dev_zero() -> Arc<File> {
    let o = OpenOptions::new().read(true).engine(Engine::IoUring);
    Arc::new(File::open("/dev/zero", &o).unwrap())
}

/// 32 tasks read `f` until `stop` is set.
fn spin_readers(
    ctx: &AioContext,
    f: &Arc<File>,
    stop: &Arc<AtomicBool>,
) -> Vec<aio::JoinHandle<()>> {
    (0..32u64)
        .map(|t| {
            let (g, s) = (f.clone(), stop.clone());
            ctx.spawn(async move {
                let mut buf = vec![1u8; BLOCK];
                while !s.load(Ordering::Relaxed) {
                    buf = g.read_exact_at(buf, t * BLOCK as u64).await.unwrap();
                    assert!(buf.iter().all(|&x| x == 0));
                    buf.fill(1);
                }
            })
        })
        .collect()
}

/// A hundred reads of `f`, one after the other: by their end the readers
/// are well into their rounds.
async fn hundred_reads(f: &File) {
    for _ in 0..100 {
        f.read_exact_at(vec![0u8; BLOCK], 0).await.unwrap();
    }
}

#[test]
fn inline_completions_do_not_starve_a_bottom_half() {
    within_a_minute(move || {
        let ctx = AioContext::new().unwrap();
        let f = dev_zero();
        let stop = Arc::new(AtomicBool::new(false));
        let readers = spin_readers(&ctx, &f, &stop);
        // Scheduled from a task that the resume rounds run: it runs only
        // when an iteration ends its rounds and reaches the bottom halves.
        let (s, c) = (stop.clone(), ctx.clone());
        let trigger = ctx.spawn(async move {
            hundred_reads(&f).await;
            c.bh_schedule_oneshot(move |_| s.store(true, Ordering::Relaxed));
        });
        ctx.block_on(trigger).unwrap();
        for h in readers {
            ctx.block_on(h).unwrap();
        }
    });
}

#[test]
fn inline_completions_do_not_starve_an_fd_handler() {
    within_a_minute(move || {
        let ctx = AioContext::new().unwrap();
        let f = dev_zero();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = util::socketpair();
        let (s, bb) = (stop.clone(), b.clone());
        ctx.set_fd_handler(
            util::raw(&*b),
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                util::drain(&bb);
                s.store(true, Ordering::Relaxed);
            })),
        )
        .unwrap();
        let readers = spin_readers(&ctx, &f, &stop);
        // Once the readers run, another thread makes the socket readable.
        let trigger = ctx.spawn(async move {
            hundred_reads(&f).await;
            std::thread::spawn(move || util::poke(&a))
        });
        let poker = ctx.block_on(trigger).unwrap();
        for h in readers {
            ctx.block_on(h).unwrap();
        }
        poker.join().unwrap();
        ctx.set_fd_handler(util::raw(&*b), None).unwrap();
    });
}

#[test]
fn a_reaped_ring_leaves_the_loop_idle() {
    // Completions reaped after a wait (not through the ring fd's event)
    // must leave nothing readable behind: a poll that follows finds no
    // work and dispatches nothing.
    let file = disk_file("idle");
    let p = file.0.clone();
    within_a_minute(move || {
        let ctx = AioContext::new().unwrap();
        let f = open(&p, true);
        for round in 0..20u64 {
            let reads: Vec<_> = (0..8u64)
                .map(|k| {
                    let g = f.clone();
                    let b = (round * 8 + k) % BLOCKS;
                    ctx.spawn(async move { expect_block(&g, b, stamp(b)).await })
                })
                .collect();
            for h in reads {
                ctx.block_on(h).unwrap();
            }
            // Let the loop settle (bottom halves, a pending notification).
            let mut settle = 0;
            while ctx.poll(false) {
                settle += 1;
                assert!(settle < 100, "the loop keeps making progress");
            }
            let before = ctx.stats();
            for _ in 0..5 {
                assert!(!ctx.poll(false), "an idle poll made progress");
            }
            let after = ctx.stats();
            assert_eq!(
                after.dispatches, before.dispatches,
                "an idle poll dispatched a handler: {before:?} -> {after:?}"
            );
        }
    });
}

#[test]
fn every_fd_monitor_is_woken_by_the_ring_fd() {
    // The ring's fd is the engine's only wake-up: epoll, ppoll and the
    // io_uring monitor must all see it become readable, with 8 direct
    // reads in flight from a loop that blocks between completions.
    let file = disk_file("backends");
    let p = file.0.clone();
    within_a_minute(move || {
        for backend in aio::Backend::ALL {
            let ctx = util::ctx(backend);
            let f = open(&p, true);
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    let g = f.clone();
                    ctx.spawn(async move {
                        for i in 0..25u64 {
                            let b = (t * 31 + i * 7) % BLOCKS;
                            expect_block(&g, b, stamp(b)).await;
                        }
                    })
                })
                .collect();
            for h in handles {
                ctx.block_on(h)
                    .unwrap_or_else(|e| panic!("{backend:?}: {e}"));
            }
        }
    });
}
