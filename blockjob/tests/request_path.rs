//! The per-request path: a `raw` node's requests reach its `file` child
//! (and the `file` driver) without boxed futures, but with everything the
//! child's own methods do: in-flight counting for drains, range and
//! read-only checks, write hooks (dirty bitmaps), `O_DIRECT` alignment.
//! `qemu-io` reads back what was written.

mod common;
use common::*;

use std::sync::Arc;

use blockjob::block::{BitmapAddOptions, BlockGraph, BlockNode, Buffer, DrainOptions};
use serde_json::json;

/// A fresh raw image of `size` in a temporary directory, and `raw` over
/// `file` on it.
struct Setup {
    _dir: tempfile::TempDir,
    img: std::path::PathBuf,
    ctx: aio::AioContext,
    g: BlockGraph,
    raw: Arc<BlockNode>,
    file: Arc<BlockNode>,
}

fn setup(size: &str, engine: &str, direct: bool) -> Setup {
    let d = tmp();
    let img = path(&d, "a.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&img), size]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let raw = ctx
        .block_on(g.blockdev_add(&json!({"driver": "raw", "node-name": "r",
            "file": {"driver": "file", "node-name": "f", "filename": p(&img),
                     "aio": engine, "cache": {"direct": direct}}})))
        .unwrap();
    let file = raw.file_child().unwrap();
    Setup {
        _dir: d,
        img,
        ctx,
        g,
        raw,
        file,
    }
}

#[test]
fn raw_writes_mark_the_bitmaps_of_the_raw_node_and_of_its_file_child() {
    for engine in ["threads", "io_uring"] {
        let s = setup("4M", engine, false);
        let (img, ctx, g, raw, file) = (&s.img, &s.ctx, &s.g, &s.raw, &s.file);
        let mut o = BitmapAddOptions::default();
        o.granularity = Some(65536);
        let on_raw = raw.add_bitmap("top", &o).unwrap();
        let on_file = file.add_bitmap("bottom", &o).unwrap();
        ctx.block_on(async {
            raw.write(65536, vec![0x11u8; 4096]).await.unwrap();
            let back = raw.write_keep(3 << 20, vec![0x22u8; 8192]).await.unwrap();
            assert_eq!(back.len(), 8192, "{engine}: the buffer comes back");
            assert!(back.iter().all(|&b| b == 0x22));
            let r = raw.read(65536, vec![0u8; 4096]).await.unwrap();
            assert!(r.iter().all(|&b| b == 0x11), "{engine}");
        });
        for b in [&on_raw, &on_file] {
            assert_eq!(b.count(), 2 * 65536, "{engine}: {}", b.name());
        }
        ctx.block_on(g.close_all()).unwrap();
        qemu_io(
            img,
            &[
                "read -P 0x11 65536 4096".into(),
                format!("read -P 0x22 {} 8192", 3 << 20),
                "read -P 0 0 65536".into(),
            ],
        );
    }
}

#[test]
fn draining_the_file_child_waits_for_requests_issued_through_raw() {
    for engine in ["threads", "io_uring"] {
        let s = setup("32M", engine, true);
        let (img, ctx, g, raw, file) = (&s.img, &s.ctx, &s.g, &s.raw, &s.file);
        ctx.block_on(async {
            let here = aio::AioContext::current().unwrap();
            // `O_DIRECT`, so io_uring cannot complete them inline from the
            // page cache; still, a batch may finish between two looks:
            // then it is checked and another one issued.
            let mut seen = false;
            for _batch in 0..50 {
                let reqs: Vec<_> = (0..16u64)
                    .map(|i| {
                        let raw = raw.clone();
                        here.spawn(async move {
                            raw.write(i << 20, vec![i as u8 + 1; 1 << 20]).await?;
                            raw.read(i << 20, vec![0u8; 1 << 20]).await
                        })
                    })
                    .collect();
                for _ in 0..1000 {
                    if file.in_flight() > 0 {
                        seen = true;
                        break;
                    }
                    aio::yield_now().await;
                }
                if seen {
                    assert!(raw.in_flight() > 0, "{engine}: and are counted on raw too");
                    let drained = g.drained_begin(file, &DrainOptions::new()).await.unwrap();
                    assert_eq!((raw.in_flight(), file.in_flight()), (0, 0), "{engine}");
                    drop(drained);
                }
                for (i, r) in reqs.into_iter().enumerate() {
                    let back = r.await.unwrap().unwrap();
                    assert!(back.iter().all(|&b| b == i as u8 + 1), "{engine}: {i}");
                }
                if seen {
                    break;
                }
            }
            assert!(seen, "{engine}: requests reached the file node");
        });
        ctx.block_on(g.close_all()).unwrap();
        qemu_io(img, &["read -P 16 15M 1M".into(), "read -P 1 0 1M".into()]);
    }
}

#[test]
fn raw_requests_past_the_end_are_refused_and_change_nothing() {
    let s = setup("1M", "threads", false);
    let (img, ctx, g, raw) = (&s.img, &s.ctx, &s.g, &s.raw);
    ctx.block_on(async {
        raw.write(0, vec![0x33u8; 1 << 20]).await.unwrap();
        let e = raw
            .read((1 << 20) - 512, vec![0u8; 4096])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        let e = raw
            .write((1 << 20) - 512, vec![0u8; 4096])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        let e = raw.write(u64::MAX - 10, vec![0u8; 4096]).await.unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    });
    ctx.block_on(g.close_all()).unwrap();
    qemu_io(img, &["read -P 0x33 0 1M".into()]);
    assert_eq!(std::fs::metadata(img).unwrap().len(), 1 << 20);
}

#[test]
fn raw_on_o_direct_handles_aligned_and_unaligned_requests() {
    // Not /dev/shm: tmpfs refuses O_DIRECT.
    for engine in ["threads", "io_uring"] {
        let s = setup("1M", engine, true);
        let (img, ctx, g, raw) = (&s.img, &s.ctx, &s.g, &s.raw);
        ctx.block_on(async {
            let mut data = Buffer::aligned(8192).unwrap();
            data.fill(0x44);
            let data = raw.write_keep(16384, data).await.unwrap();
            assert!(data.iter().all(|&b| b == 0x44));
            // Unaligned offset and length: read-modify-write underneath.
            raw.write(16385, vec![1u8, 2, 3]).await.unwrap();
            let back = raw.read(16384, vec![0u8; 5]).await.unwrap();
            assert_eq!(back, [0x44, 1, 2, 3, 0x44], "{engine}");
        });
        ctx.block_on(g.close_all()).unwrap();
        qemu_io(
            img,
            &[
                "read -P 0x44 16384 1".into(),
                "read -P 1 16385 1".into(),
                "read -P 3 16387 1".into(),
                "read -P 0x44 16388 8188".into(),
                "read -P 0 0 16384".into(),
            ],
        );
    }
}
