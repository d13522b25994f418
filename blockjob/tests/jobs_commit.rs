//! `block-commit`, intermediate and active, against QEMU's tools: base
//! afterwards reads as the committed top did, the overlay names base, the
//! images pass `qemu-img check`; READY, complete, soft and force cancel,
//! and QEMU's refusals.

mod common;

use aio::{AioContext, ClockType};
use blockjob::block::BlockGraph;
use blockjob::job::JobStatus;
use blockjob::jobs::{start_commit, start_stream, CommitArgs, StreamArgs};
use common::*;

const OK_SEQ: &str = "created running waiting pending BLOCK_JOB_COMPLETED concluded null";
const READY_SEQ: &str =
    "created running ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null";

#[test]
fn intermediate_commit_of_mid_into_base() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want_top = snapshot(&top, dir.path(), "want-top.qcow2");
    let want_mid = snapshot(&mid, dir.path(), "want-mid.qcow2");
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let mut a = CommitArgs::new("commit0", "top");
    a.top_node = Some("mid".into());
    a.base_node = Some("base".into());
    let job = start_commit(&ctx, &g, &reg, a).unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    assert_eq!(info.current, info.total);
    assert_eq!(topn.backing().unwrap().name(), "base");
    assert!(g.find("mid").is_none());
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&top).as_deref(), Some(p(&base)));
    assert_same(&base, &want_mid);
    assert_same(&top, &want_top);
    assert_check(&base);
    assert_check(&top);
}

#[test]
fn active_commit_goes_ready_takes_guest_writes_and_pivots_on_complete() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    qemu_io(
        &want,
        &[
            "write -P 0x77 64k 128k".into(),
            "write -P 0x78 3M 64k".into(),
        ],
    );
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let mut a = CommitArgs::new("commit1", "top");
    a.base_node = Some("base".into());
    let job = start_commit(&ctx, &g, &reg, a).unwrap();
    wait_status(&ctx, &job, JobStatus::Ready);
    assert!(job.info().ready);
    // Guest writes through the active layer while READY.
    ctx.block_on(topn.write(64 << 10, vec![0x77; 128 << 10]))
        .unwrap();
    ctx.block_on(topn.write(3 << 20, vec![0x78; 64 << 10]))
        .unwrap();
    job.complete().unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), READY_SEQ);
    assert_eq!(info.current, info.total);
    // As in QEMU, the old active layer stays a node (the monitor owns it)
    // until blockdev-del; base now holds everything.
    assert!(g.find("top").is_some() && g.find("base").is_some(), "{g:?}");
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&base, &want);
    assert_check(&base);
    assert_check(&top);
}

#[test]
fn active_commit_soft_cancel_after_ready_leaves_the_chain() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_commit(&ctx, &g, &reg, CommitArgs::new("commit2", "top")).unwrap();
    wait_status(&ctx, &job, JobStatus::Ready);
    job.cancel(false).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), READY_SEQ);
    assert_eq!(topn.backing().unwrap().name(), "mid");
    assert!(g.find("mid").is_some() && g.find("base").is_some());
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&top).as_deref(), Some(p(&mid)));
    assert_same(&top, &want);
    // base holds a copy of the whole chain's view.
    assert_same(&base, &want);
    assert_check(&base);
}

#[test]
fn active_commit_cancel_before_ready_is_a_force_cancel() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Virtual);
    let mut a = CommitArgs::new("commit3", "top");
    a.speed = 1 << 20;
    let job = start_commit(&ctx, &g, &reg, a).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    assert_eq!(job.status(), JobStatus::Running);
    job.cancel(false).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running aborting BLOCK_JOB_CANCELLED concluded null"
    );
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&top, &want);
    assert_check(&base);
}

#[test]
fn commit_refusals_use_qemu_s_texts() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, _log) = registry(ClockType::Virtual);
    let err = |a: CommitArgs| start_commit(&ctx, &g, &reg, a).unwrap_err().to_string();
    let mut a = CommitArgs::new("c0", "top");
    a.top_node = Some("base".into());
    a.base_node = Some("mid".into());
    assert_eq!(err(a), "'mid' is not in this backing file chain");
    let mut a = CommitArgs::new("c0", "top");
    a.top_node = Some("mid".into());
    a.base_node = Some("mid".into());
    assert_eq!(err(a), "cannot commit an image into itself");
    assert_eq!(
        err(CommitArgs::new("c0", "nosuch")),
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
    let mut a = StreamArgs::new("busy0", "top");
    a.speed = 1024;
    let job = start_stream(&ctx, &g, &reg, a).unwrap();
    assert_eq!(
        err(CommitArgs::new("c1", "top")),
        "Node 'top' is busy: block device is in use by block job: stream"
    );
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
    let mut a = CommitArgs::new("c2", "top");
    a.top_node = Some("mid".into());
    a.speed = 1024;
    let job = start_commit(&ctx, &g, &reg, a).unwrap();
    assert_eq!(
        start_stream(&ctx, &g, &reg, StreamArgs::new("s", "top"))
            .unwrap_err()
            .to_string(),
        "Node 'top' is busy: block device is in use by block job: commit"
    );
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
    ctx.block_on(g.close_all()).unwrap();
}
