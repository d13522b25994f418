//! Clusters allocated ahead for whole-cluster writes (the data reserve):
//! a crash before a flush leaves at worst leaked clusters, a flush or a
//! close gives the rest back (no leaks), holes are still reused, and the
//! data is what was written (QEMU reads it; before a flush, a write may
//! also be lost to a crash, as the L2 cache is write-back).

mod common;
use common::*;

use std::path::Path;
use std::sync::Arc;

use blockjob::block::{BlockGraph, BlockNode, SnapshotCreateOptions};

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

/// Whole-cluster writes of 256 KiB in a shuffled order over the first
/// `mib` MiB, several in flight at once (as a job's copies are), each
/// filled with a byte derived from its offset.
fn write_shuffled(ctx: &aio::AioContext, node: &Arc<BlockNode>, mib: u64) {
    let chunk = 4 * CS;
    let mut offs: Vec<u64> = (0..mib * MIB / chunk).map(|i| i * chunk).collect();
    let mut rng = Rng(0x5eed_1234);
    for i in (1..offs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        offs.swap(i, j);
    }
    for group in offs.chunks(8) {
        let handles: Vec<_> = group
            .iter()
            .map(|&o| {
                let n = node.clone();
                ctx.spawn(async move { n.write(o, vec![fill(o); chunk as usize]).await })
            })
            .collect();
        for h in handles {
            ctx.block_on(h).expect("join").expect("write");
        }
    }
}

fn fill(off: u64) -> u8 {
    (off / (4 * CS) % 250 + 1) as u8
}

/// What `write_shuffled` leaves in the first `mib` MiB of a `size` image.
fn expected(mib: u64, size: u64) -> Vec<u8> {
    let mut want = Vec::with_capacity(size as usize);
    for o in (0..mib * MIB).step_by((4 * CS) as usize) {
        want.extend(std::iter::repeat_n(fill(o), (4 * CS) as usize));
    }
    want.resize(size as usize, 0);
    want
}

/// Asserts that every 256 KiB chunk of `got` holds what
/// [`write_shuffled`] wrote there or zeroes (a write not flushed before a
/// crash may be lost, never turned into something else).
fn assert_written_or_lost(got: &[u8], mib: u64, size: u64) {
    let want = expected(mib, size);
    assert_eq!(got.len(), want.len());
    let chunk = (4 * CS) as usize;
    for (i, (g, w)) in got.chunks(chunk).zip(want.chunks(chunk)).enumerate() {
        assert!(
            g == w || g.iter().all(|&b| b == 0),
            "chunk {i} at {:#x} is neither what was written nor zeroes",
            i * chunk
        );
    }
}

/// `qemu-img check --output=json -U`: (exit code, leaks, corruptions).
fn check_counts(img: &Path) -> (i32, u64, u64) {
    let (code, out) = qemu_img_status(&["check", "-U", "--output=json", p(img)]);
    let start = out.find('{').unwrap_or_else(|| panic!("check json: {out}"));
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .expect("check json value")
        .expect("check json parse");
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    (code, n("leaks"), n("corruptions"))
}

/// A copy of the file as it is now (a crash), grown by 64 MiB of holes:
/// `qemu-img check` only counts refcounts of clusters inside the file,
/// so this makes clusters allocated past its end visible as leaks.
fn crash_copy(img: &Path, to: &Path) -> (i32, u64, u64) {
    std::fs::copy(img, to).expect("copy");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .expect("open copy");
    let len = f.metadata().expect("metadata").len();
    f.set_len(len + 64 * MIB).expect("grow copy");
    drop(f);
    check_counts(to)
}

/// A fresh 8 MiB image, open, with its first `mib` MiB written by
/// [`write_shuffled`].
struct Written {
    dir: tempfile::TempDir,
    img: std::path::PathBuf,
    ctx: aio::AioContext,
    g: BlockGraph,
    node: Arc<BlockNode>,
}

fn written(mib: u64) -> Written {
    let dir = tmp();
    let img = dir.path().join("t.qcow2");
    let ctx = aio::AioContext::new().expect("ctx");
    let g = BlockGraph::new();
    let node = fresh_qcow2(&ctx, &g, &img, 8 * MIB);
    write_shuffled(&ctx, &node, mib);
    Written {
        dir,
        img,
        ctx,
        g,
        node,
    }
}

#[test]
fn unflushed_reserve_is_only_a_leak_and_a_flush_gives_it_back() {
    let w = written(3);
    let (dir, img, ctx, node) = (&w.dir, &w.img, &w.ctx, w.node);
    // A crash now: the clusters taken ahead leak, nothing worse, and
    // QEMU reads what was written.
    let crashed = dir.path().join("crashed.qcow2");
    let (code, leaks, corruptions) = crash_copy(img, &crashed);
    assert_eq!(corruptions, 0, "crash image corrupt (exit {code})");
    assert_eq!(code, 3, "the unused reserve should show as leaks");
    assert!(leaks > 0);
    // A flush gives the rest of the reserve back: nothing leaks.
    ctx.block_on(node.flush()).expect("flush");
    let flushed = dir.path().join("flushed.qcow2");
    assert_eq!(crash_copy(img, &flushed), (0, 0, 0));
    ctx.block_on(node.close()).expect("close");
    drop(node);
    assert_check(img);
    assert_eq!(to_raw(img, dir.path()), expected(3, 8 * MIB));
    assert_written_or_lost(&to_raw(&crashed, dir.path()), 3, 8 * MIB);
}

#[test]
/// (The open repairs the dirty image; allocation would skip the
/// clusters past the end anyway.)
fn writes_after_a_crash_skip_clusters_allocated_past_the_end() {
    let w = written(2);
    let (dir, img, ctx, node) = (&w.dir, &w.img, &w.ctx, w.node);
    // The crash: the file as it is (refcounts of the reserve past its end).
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(img, &crashed).expect("copy");
    ctx.block_on(node.close()).expect("close");
    drop(node);
    let g2 = BlockGraph::new();
    let c = ctx
        .block_on(g2.open_image(&crashed, &blockjob::block::OpenOptions::new()))
        .expect("open crashed copy");
    ctx.block_on(c.write(6 * MIB, vec![0x77; MIB as usize]))
        .expect("write after crash");
    ctx.block_on(c.close()).expect("close");
    drop(c);
    let (code, _, corruptions) = check_counts(&crashed);
    assert_eq!(corruptions, 0, "exit {code}");
    let mut got = to_raw(&crashed, dir.path());
    assert!(
        got[(6 * MIB) as usize..(7 * MIB) as usize]
            .iter()
            .all(|&b| b == 0x77),
        "the write after the crash is not there"
    );
    got[(6 * MIB) as usize..(7 * MIB) as usize].fill(0);
    assert_written_or_lost(&got, 2, 8 * MIB);
}

#[test]
fn close_gives_the_reserve_back_and_holes_are_reused() {
    let w = written(4);
    let (dir, img, ctx, node) = (&w.dir, &w.img, &w.ctx, w.node);
    ctx.block_on(node.close()).expect("close");
    drop(node);
    assert_check(img);
    assert_eq!(crash_copy(img, &dir.path().join("closed.qcow2")), (0, 0, 0));
    assert_eq!(to_raw(img, dir.path()), expected(4, 8 * MIB));
    // 4 MiB of data and a few metadata clusters: nothing allocated ahead
    // left in the file.
    let len = std::fs::metadata(img).expect("metadata").len();
    assert!(len <= 4 * MIB + 8 * CS, "file is {len} bytes");
    // Discarded clusters are reused (not skipped for a run ahead): the
    // discarded 256 KiB runs take the new 256 KiB writes.
    let node = ctx
        .block_on(w.g.open_image(img, &blockjob::block::OpenOptions::new()))
        .expect("reopen");
    ctx.block_on(node.discard(0, MIB)).expect("discard");
    for k in 0..4 {
        let at = 5 * MIB + k * 4 * CS;
        ctx.block_on(node.write(at, vec![0x66; (4 * CS) as usize]))
            .expect("write");
    }
    ctx.block_on(node.close()).expect("close");
    drop(node);
    assert_check(img);
    let after = std::fs::metadata(img).expect("metadata").len();
    assert!(after <= len, "file grew from {len} to {after} bytes");
}

#[test]
fn snapshot_after_writes_sees_no_reserved_clusters() {
    let w = written(2);
    let (dir, img, ctx, node) = (&w.dir, &w.img, &w.ctx, w.node);
    ctx.block_on(node.snapshot_create(&SnapshotCreateOptions::new("s")))
        .expect("snapshot");
    write_shuffled(ctx, &node, 1);
    ctx.block_on(node.close()).expect("close");
    drop(node);
    assert_check(img);
    assert_eq!(crash_copy(img, &dir.path().join("closed.qcow2")), (0, 0, 0));
    assert_eq!(to_raw(img, dir.path()), expected(2, 8 * MIB));
}
