//! In-place writes and reads (data I/O done with the metadata lock
//! released) racing a discard, a zero write or an allocating write of the
//! same cluster: the freed cluster is never reused while a request is
//! still on it, so no data lands in (or comes from) a cluster that now
//! belongs to someone else, and `qemu-img check` finds nothing wrong.
//!
//! The race is made deterministic with a write hook on the image's `file`
//! node that holds the in-place write to the cluster under test until the
//! discarding task has finished or has been waiting for a while.

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blockjob::block::{BlockGraph, BlockNode, BoxFuture, SnapshotCreateOptions, WriteHook};

const CS: u64 = 64 << 10;

/// Holds the first 4 KiB write at `target` on the file node until opened.
struct Gate {
    target: u64,
    open: AtomicBool,
    held: AtomicBool,
}

impl WriteHook for Gate {
    fn before_write<'a>(
        &'a self,
        _node: &'a BlockNode,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, blockjob::Result<()>> {
        Box::pin(async move {
            if offset != self.target || len != 4096 || self.held.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            while !self.open.load(Ordering::Acquire) {
                aio::sleep_ns(aio::ClockType::Realtime, 1_000_000).await;
            }
            Ok(())
        })
    }
}

/// The host offset of guest cluster `c`.
fn host_of(ctx: &aio::AioContext, n: &Arc<BlockNode>, c: u64) -> u64 {
    let (st, _) = ctx.block_on(n.block_status(c * CS, CS)).expect("status");
    st.offset.expect("cluster is allocated")
}

/// Opens the gate once `done` is set or after ~200 ms, whichever first.
async fn open_later(gate: Arc<Gate>, done: Arc<AtomicBool>) {
    for _ in 0..200 {
        if done.load(Ordering::Acquire) {
            break;
        }
        aio::sleep_ns(aio::ClockType::Realtime, 1_000_000).await;
    }
    gate.open.store(true, Ordering::Release);
}

/// A 4 MiB image at `img` with clusters 0..4 written (cluster `c` holds
/// bytes `c + 1`), open read-write.
fn four_clusters(img: &std::path::Path) -> (aio::AioContext, BlockGraph, Arc<BlockNode>) {
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = fresh_qcow2(&ctx, &g, img, 4 << 20);
    for c in 0..4u64 {
        ctx.block_on(n.write(c * CS, vec![c as u8 + 1; CS as usize]))
            .unwrap();
    }
    (ctx, g, n)
}

/// Writes clusters 0..4, then races an in-place write to cluster 1
/// against `free` (which frees cluster 1's host cluster) followed by a
/// whole-cluster allocating write of cluster 10 (the allocator's lowest
/// free cluster is the one just freed).
fn race(free: fn(Arc<BlockNode>) -> BoxFuture<'static, blockjob::Result<()>>, name: &str) {
    let dir = tmp();
    let img = dir.path().join(format!("{name}.qcow2"));
    let (ctx, _g, n) = four_clusters(&img);
    let h1 = host_of(&ctx, &n, 1);
    let gate = Arc::new(Gate {
        target: h1 + 8192,
        open: AtomicBool::new(false),
        held: AtomicBool::new(false),
    });
    let file = n.file_child().expect("file child");
    let _hook = file.add_write_hook(gate.clone());

    let w = n.clone();
    let in_place = ctx.spawn(async move { w.write(CS + 8192, vec![0xAA; 4096]).await });
    // Let the in-place write look up its cluster and reach the gate.
    while !gate.held.load(Ordering::Acquire) {
        ctx.poll(true);
    }
    let done = Arc::new(AtomicBool::new(false));
    let (f, d) = (n.clone(), done.clone());
    let other = ctx.spawn(async move {
        free(f.clone()).await?;
        f.write(10 * CS, vec![0xBB; CS as usize]).await?;
        d.store(true, Ordering::Release);
        Ok::<(), blockjob::Error>(())
    });
    let opener = ctx.spawn(open_later(gate.clone(), done.clone()));
    ctx.block_on(in_place).unwrap().unwrap();
    ctx.block_on(other).unwrap().unwrap();
    ctx.block_on(opener).unwrap();

    let data = read_all(&ctx, &n, 1 << 20);
    let c10 = &data[(10 * CS) as usize..(11 * CS) as usize];
    assert!(
        c10.iter().all(|&b| b == 0xBB),
        "{name}: cluster 10 holds bytes of the in-place write to cluster 1"
    );
    for c in [0u64, 2, 3] {
        let cl = &data[(c * CS) as usize..((c + 1) * CS) as usize];
        assert!(cl.iter().all(|&b| b == c as u8 + 1), "{name}: cluster {c}");
    }
    ctx.block_on(n.close()).unwrap();
    let (code, out) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(code, 0, "{name}: {out}");
    // QEMU reads cluster 10 as we do.
    let raw = to_raw(&img, dir.path());
    assert!(raw[(10 * CS) as usize..(11 * CS) as usize]
        .iter()
        .all(|&b| b == 0xBB));
}

#[test]
fn in_place_write_racing_discard_never_lands_in_a_reused_cluster() {
    race(
        |n| Box::pin(async move { n.discard(CS, CS).await }),
        "discard",
    );
}

#[test]
fn in_place_write_racing_zero_write_never_lands_in_a_reused_cluster() {
    race(
        |n| Box::pin(async move { n.write_zeroes(CS, CS).await }),
        "zero",
    );
}

#[test]
fn in_place_writes_racing_a_copy_on_write_of_the_same_cluster_all_land() {
    // After a snapshot every cluster is shared: the first write to
    // cluster 1 allocates (copy-on-write), the ones after it go in place
    // to the copy, all at once; cluster 2 was rewritten whole before, so
    // writes to it go in place from the start.
    let dir = tmp();
    let img = dir.path().join("cow.qcow2");
    let (ctx, _g, n) = four_clusters(&img);
    ctx.block_on(n.snapshot_create(&SnapshotCreateOptions::new("s")))
        .unwrap();
    ctx.block_on(n.write(2 * CS, vec![3; CS as usize])).unwrap();
    let hs: Vec<_> = (0..16u64)
        .flat_map(|i| {
            let (a, b) = (n.clone(), n.clone());
            [
                ctx.spawn(async move { b.write(CS + i * 4096, vec![0x10 + i as u8; 4096]).await }),
                ctx.spawn(
                    async move { a.write(2 * CS + i * 4096, vec![0xC0 + i as u8; 4096]).await },
                ),
            ]
        })
        .collect();
    for h in hs {
        ctx.block_on(h).unwrap().unwrap();
    }
    let data = read_all(&ctx, &n, 1 << 20);
    for i in 0..16u64 {
        let a = (2 * CS + i * 4096) as usize;
        assert!(data[a..a + 4096].iter().all(|&b| b == 0xC0 + i as u8));
        let b = (CS + i * 4096) as usize;
        assert!(data[b..b + 4096].iter().all(|&x| x == 0x10 + i as u8));
    }
    ctx.block_on(n.close()).unwrap();
    let (code, out) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(code, 0, "{out}");
    // The snapshot still reads as before the writes.
    let snap = dir.path().join("s.raw");
    qemu_img(&["convert", "-l", "s", "-O", "raw", p(&img), p(&snap)]);
    let raw = std::fs::read(&snap).unwrap();
    for c in 0..4u64 {
        let cl = &raw[(c * CS) as usize..((c + 1) * CS) as usize];
        assert!(cl.iter().all(|&b| b == c as u8 + 1), "snapshot cluster {c}");
    }
}
