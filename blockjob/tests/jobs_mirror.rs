//! `blockdev-mirror`: the target ends up equal to the source including
//! guest writes made while the job runs and while it is READY; complete,
//! soft and force cancel (QSD's event sequences); sync top and none;
//! refusals.

mod common;

use aio::{AioContext, ClockType};
use blockjob::block::BlockGraph;
use blockjob::job::JobStatus;
use blockjob::jobs::{start_mirror, MirrorArgs, SyncMode};
use common::*;

const READY_SEQ: &str =
    "created running ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null";

fn add_target(ctx: &AioContext, g: &BlockGraph, name: &str, img: &std::path::Path) {
    let args = serde_json::json!({"driver": "qcow2", "node-name": name, "backing": null,
        "file": {"driver": "file", "filename": p(img)}});
    ctx.block_on(g.blockdev_add(&args))
        .expect("blockdev-add target");
}

/// A mirror's setting: the chain base <- mid <- top opened as `src`, an
/// empty 4 MiB `tgt` added as node `tgt`, and `want`: a copy of top with
/// the guest writes `ops` applied by qemu-io — what the target must hold
/// once the test made the same writes through `src` during the job.
struct Fixture {
    /// Holds the images (kept alive by the test binding it).
    dir: tempfile::TempDir,
    top: std::path::PathBuf,
    tgt: std::path::PathBuf,
    want: std::path::PathBuf,
    ctx: AioContext,
    g: BlockGraph,
    src: std::sync::Arc<blockjob::block::BlockNode>,
}

fn fixture(ops: &[&str]) -> Fixture {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    let ops: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
    qemu_io(&want, &ops);
    let tgt = dir.path().join("tgt.qcow2");
    create(&tgt, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let src = add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "tgt", &tgt);
    Fixture {
        dir,
        top,
        tgt,
        want,
        ctx,
        g,
        src,
    }
}

#[test]
fn guest_writes_during_mirror_land_in_the_target_after_complete() {
    let Fixture {
        dir: _dir,
        top,
        tgt,
        want,
        ctx,
        g,
        src,
        ..
    } = fixture(&[
        "write -P 0xa1 0 8k",
        "write -P 0xa2 3M 100k",
        "write -z 1M 64k",
    ]);
    let (reg, log) = registry(ClockType::Virtual);
    let mut a = MirrorArgs::new("mirror0", "top", "tgt", SyncMode::Full);
    a.speed = 1 << 20;
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    assert_eq!(job.status(), JobStatus::Running);
    // Behind the copy front: must be copied again.
    ctx.block_on(src.write(0, vec![0xa1; 8192])).unwrap();
    job.set_speed(0).unwrap();
    settle(&ctx, &job);
    assert_eq!(job.status(), JobStatus::Ready);
    // While READY.
    ctx.block_on(src.write(3 << 20, vec![0xa2; 100 << 10]))
        .unwrap();
    ctx.block_on(src.write_zeroes(1 << 20, 64 << 10)).unwrap();
    job.complete().unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), READY_SEQ);
    // len and offset grew by the dirtied bytes, as in QSD.
    assert_eq!(info.current, info.total);
    assert!(info.total > 4 << 20, "{}", info.total);
    // Both nodes stay (the pivot moves users, not nodes).
    assert!(g.find("top").is_some() && g.find("tgt").is_some());
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&tgt, &want);
    assert_same(&top, &want);
    assert_check(&tgt);
}

#[test]
fn soft_cancel_after_ready_completes_force_cancel_cancels() {
    for (force, expect) in [
        (false, READY_SEQ),
        (
            true,
            "created running ready BLOCK_JOB_READY aborting BLOCK_JOB_CANCELLED concluded null",
        ),
    ] {
        let dir = tmp();
        let (base, mid, top) = make_chain(dir.path());
        let tgt = dir.path().join("tgt.qcow2");
        create(&tgt, "4M", None);
        let ctx = AioContext::new().unwrap();
        let g = BlockGraph::new();
        let src = add_chain(&ctx, &g, &base, &mid, &top);
        add_target(&ctx, &g, "tgt", &tgt);
        let (reg, log) = registry(ClockType::Realtime);
        let job = start_mirror(
            &ctx,
            &g,
            &reg,
            MirrorArgs::new("ctl1", "top", "tgt", SyncMode::Full),
        )
        .unwrap();
        wait_status(&ctx, &job, JobStatus::Ready);
        ctx.block_on(src.write(2 << 20, vec![0xbe; 4096])).unwrap();
        job.cancel(force).unwrap();
        ctx.block_on(job.wait_finished());
        assert_eq!(events(&log), expect, "force={force}");
        ctx.block_on(g.close_all()).unwrap();
        if !force {
            // Soft cancel: a final sync, so the target is a point-in-time copy.
            assert_same(&tgt, &top);
        }
        assert_check(&tgt);
    }
}

#[test]
fn cancel_before_ready_is_a_force_cancel_and_complete_is_refused() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let tgt = dir.path().join("tgt.qcow2");
    create(&tgt, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "tgt", &tgt);
    let (reg, log) = registry(ClockType::Virtual);
    let mut a = MirrorArgs::new("m1", "top", "tgt", SyncMode::Full);
    a.speed = 1 << 20;
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    vstep(&ctx, &job, 500_000_000);
    assert_eq!(
        job.complete().unwrap_err().to_string(),
        "Job 'm1' in state 'running' cannot accept command verb 'complete'"
    );
    job.pause().unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    assert_eq!(job.status(), JobStatus::Paused);
    let at = job.info().current;
    vstep(&ctx, &job, 1_000_000_000);
    assert_eq!(job.info().current, at);
    job.resume().unwrap();
    vstep(&ctx, &job, 500_000_000);
    job.cancel(false).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running paused running aborting BLOCK_JOB_CANCELLED concluded null"
    );
    ctx.block_on(g.close_all()).unwrap();
    assert_check(&tgt);
}

#[test]
fn sync_top_and_sync_none() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    qemu_io(&want, &["write -P 0x5a 2M 64k".into()]);
    let t_top = dir.path().join("t-top.qcow2");
    create(&t_top, "4M", Some(&mid));
    let t_none = dir.path().join("t-none.qcow2");
    create(&t_none, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let src = add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "t-top", &t_top);
    add_target(&ctx, &g, "t-none", &t_none);
    let (reg, _log) = registry(ClockType::Realtime);
    let j1 = start_mirror(
        &ctx,
        &g,
        &reg,
        MirrorArgs::new("m-top", "top", "t-top", SyncMode::Top),
    )
    .unwrap();
    wait_status(&ctx, &j1, JobStatus::Ready);
    let err = start_mirror(
        &ctx,
        &g,
        &reg,
        MirrorArgs::new("m-none", "top", "t-none", SyncMode::None),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'top' is busy: block device is in use by block job: mirror"
    );
    ctx.block_on(src.write(2 << 20, vec![0x5a; 64 << 10]))
        .unwrap();
    j1.complete().unwrap();
    ctx.block_on(j1.wait_finished());
    let j2 = start_mirror(
        &ctx,
        &g,
        &reg,
        MirrorArgs::new("m-none", "top", "t-none", SyncMode::None),
    )
    .unwrap();
    wait_status(&ctx, &j2, JobStatus::Ready);
    assert_eq!(j2.info().total, 0, "nothing to copy up front");
    ctx.block_on(src.write(64 << 10, vec![0x6b; 4096])).unwrap();
    j2.complete().unwrap();
    ctx.block_on(j2.wait_finished());
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&t_top, &want);
    assert_check(&t_top);
    // sync none: only the write made during the job; the rest of its
    // cluster came along (granularity 64 KiB) and nothing else.
    qemu_io(
        &t_none,
        &[
            "read -P 0x6b 64k 4k".into(),
            "read -P 0 0 64k".into(),
            "read -P 0 128k 3968k".into(),
        ],
    );
}

#[test]
fn mirror_refusals() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let small = dir.path().join("small.qcow2");
    create(&small, "1M", None);
    let t = dir.path().join("t.qcow2");
    create(&t, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "small", &small);
    add_target(&ctx, &g, "t", &t);
    let (reg, _log) = registry(ClockType::Realtime);
    let err = |a: MirrorArgs| start_mirror(&ctx, &g, &reg, a).unwrap_err().to_string();
    assert_eq!(
        err(MirrorArgs::new("m", "top", "small", SyncMode::Full)),
        "Source and target image have different sizes"
    );
    assert_eq!(
        err(MirrorArgs::new("m", "top", "t", SyncMode::Incremental)),
        "Sync mode 'incremental' not supported"
    );
    let mut a = MirrorArgs::new("m", "top", "t", SyncMode::Full);
    a.granularity = Some(3000);
    assert_eq!(err(a), "Parameter 'granularity' expects a power of 2");
    let mut a = MirrorArgs::new("m", "top", "t", SyncMode::Full);
    a.granularity = Some(256);
    assert_eq!(
        err(a),
        "Parameter 'granularity' expects a value in range [512B, 64MB]"
    );
    let a: MirrorArgs = serde_json::from_value(serde_json::json!(
        {"job-id": "mirror0", "device": "top", "target": "t", "sync": "full"}))
    .unwrap();
    assert_eq!(a.buf_size, None);
    ctx.block_on(g.close_all()).unwrap();
}

#[test]
fn write_blocking_puts_guest_writes_on_the_target_before_they_complete() {
    let Fixture {
        dir: _dir,
        tgt,
        want,
        ctx,
        g,
        src,
        ..
    } = fixture(&["write -P 0xb1 3M 64k", "write -P 0xb2 5k 3k"]);
    let tgtn = g.find("tgt").unwrap();
    let (reg, log) = registry(ClockType::Virtual);
    let mut a = MirrorArgs::new("m", "top", "tgt", SyncMode::Full);
    a.speed = 1 << 20;
    a.copy_mode = blockjob::jobs::CopyMode::WriteBlocking;
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    let copied = job.info().current;
    assert!(copied < 3 << 20, "the copy front is before 3M: {copied}");
    // Far ahead of the copy front: on the target as soon as it returns.
    ctx.block_on(src.write(3 << 20, vec![0xb1; 64 << 10]))
        .unwrap();
    let on_target = ctx.block_on(tgtn.read(3 << 20, vec![0; 64 << 10])).unwrap();
    assert!(on_target.iter().all(|&b| b == 0xb1), "write-blocking");
    // A partial granule, behind the front: on the target too.
    ctx.block_on(src.write(5 << 10, vec![0xb2; 3 << 10]))
        .unwrap();
    let on_target = ctx.block_on(tgtn.read(5 << 10, vec![0; 3 << 10])).unwrap();
    assert!(on_target.iter().all(|&b| b == 0xb2));
    job.set_speed(0).unwrap();
    settle(&ctx, &job);
    assert_eq!(job.status(), JobStatus::Ready);
    job.complete().unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert!(info.error.is_none());
    assert_eq!(events(&log), READY_SEQ);
    // The 64 KiB written ahead were written to the target once, by the
    // guest's write, not copied again by the background loop.
    assert_eq!(info.total, 4 << 20, "{info:?}");
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&tgt, &want);
    assert_check(&tgt);
}

/// With `auto-finalize: false` the job waits in PENDING between the end of
/// its copy loop and the pivot; writes to the source meanwhile (a write
/// and a zero write) are copied before the switch, not lost.
#[test]
fn writes_while_pending_reach_the_target_before_the_pivot() {
    let Fixture {
        dir: _dir,
        tgt,
        want,
        ctx,
        g,
        src,
        ..
    } = fixture(&["write -P 0xb1 2M 12k", "write -z 3M 64k"]);
    let (reg, _log) = registry(ClockType::Virtual);
    let mut a = MirrorArgs::new("mirror0", "top", "tgt", SyncMode::Full);
    a.auto_finalize = false;
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    settle(&ctx, &job);
    assert_eq!(job.status(), JobStatus::Ready);
    job.complete().unwrap();
    settle(&ctx, &job);
    assert_eq!(job.status(), JobStatus::Pending);
    ctx.block_on(src.write(2 << 20, vec![0xb1; 12 << 10]))
        .unwrap();
    ctx.block_on(src.write_zeroes(3 << 20, 64 << 10)).unwrap();
    job.finalize().unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert!(info.error.is_none(), "{:?}", info.error);
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&tgt, &want);
    assert_check(&tgt);
}
