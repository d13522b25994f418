//! Jobs between `cache.direct=on` images (aligned buffers, no bounce on
//! the copy path): the result reads as the source for `qemu-img compare`.

mod common;

use aio::{AioContext, ClockType};
use blockjob::block::BlockGraph;
use blockjob::job::JobStatus;
use blockjob::jobs::{start_mirror, MirrorArgs, SyncMode};
use common::*;
use serde_json::json;

#[test]
fn mirror_between_o_direct_images_matches_for_qemu_img_compare() {
    // Not /dev/shm: tmpfs refuses O_DIRECT.
    let dir = tmp();
    let src = path(&dir, "src.qcow2");
    let tgt = path(&dir, "tgt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&src), "6M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", p(&tgt), "6M"]);
    qemu_io(
        &src,
        &[
            "write -P 0xa1 0 8k".into(),
            "write -P 0xa2 1000 3000".into(),
            "write -P 0xa3 2M 1536k".into(),
            "write -z 5M 64k".into(),
            "write -P 0xa4 5637k 1k".into(),
        ],
    );
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    for (name, img) in [("src", &src), ("tgt", &tgt)] {
        ctx.block_on(g.blockdev_add(&json!({
            "driver": "qcow2", "node-name": name, "cache": {"direct": true},
            "file": {"driver": "file", "filename": p(img)}
        })))
        .unwrap();
    }
    let (reg, _log) = registry(ClockType::Realtime);
    let mut a = MirrorArgs::new("m0", "src", "tgt", SyncMode::Full);
    // Several pool buffers, reused across the copy.
    a.buf_size = Some(1 << 20);
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    settle(&ctx, &job);
    assert_eq!(job.status(), JobStatus::Ready);
    job.complete().unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(info.current, info.total);
    assert!(info.error.is_none(), "{:?}", info.error);
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&tgt, &src);
    assert_check(&tgt);
}
