//! `block-stream` against QEMU: the result equals `qemu-img convert` of
//! the original chain, the image names the right backing file and passes
//! `qemu-img check`; events, rate limit, pause, cancel and QEMU's refusals.

mod common;

use aio::{AioContext, ClockType};
use blockjob::block::BlockGraph;
use blockjob::job::JobStatus;
use blockjob::jobs::{start_stream, StreamArgs};
use common::*;

const OK_SEQ: &str = "created running waiting pending BLOCK_JOB_COMPLETED concluded null";

#[test]
fn stream_whole_chain_into_top() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = dir.path().join("want.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&top), p(&want)]);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_stream(&ctx, &g, &reg, StreamArgs::new("stream0", "top")).unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    assert_eq!((info.current, info.total), (4 << 20, 4 << 20));
    assert!(topn.backing().is_none());
    assert!(g.find("mid").is_none() && g.find("base").is_none(), "{g:?}");
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&top), None);
    assert_same(&top, &want);
    assert_check(&top);
}

#[test]
fn stream_down_to_base_node_keeps_base() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = dir.path().join("want.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&top), p(&want)]);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let mut args = StreamArgs::new("stream1", "top");
    args.base_node = Some("base".into());
    let job = start_stream(&ctx, &g, &reg, args).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    assert_eq!(topn.backing().unwrap().name(), "base");
    assert!(g.find("mid").is_none());
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&top).as_deref(), Some(p(&base)));
    assert_same(&top, &want);
    assert_check(&top);
    assert_check(&base);
    // Only what lives above base was copied: base's data is not in top.
    let map = qemu_img(&["map", "--output=json", p(&top)]);
    assert!(map.contains("\"depth\": 1"), "{map}");
}

#[test]
fn args_deserialize_from_qmp_with_qemu_defaults() {
    let a: StreamArgs = serde_json::from_value(serde_json::json!({
        "job-id": "s", "device": "top", "base-node": "base", "speed": 1024, "on-error": "ignore"
    }))
    .unwrap();
    assert_eq!(a.base_node.as_deref(), Some("base"));
    assert!(a.auto_finalize && a.auto_dismiss);
    let e = serde_json::from_value::<StreamArgs>(serde_json::json!({"device": "top", "bogus": 1}))
        .unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
}

#[test]
fn rate_limited_stream_follows_the_virtual_clock() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, _log) = registry(ClockType::Virtual);
    const SPEED: u64 = 1 << 20;
    let mut args = StreamArgs::new("rl", "top");
    args.speed = SPEED as i64;
    let job = start_stream(&ctx, &g, &reg, args).unwrap();
    settle(&ctx, &job);
    // One chunk (512 KiB) may leave per burst on top of the slice quota;
    // skipped ranges (allocated in top) count as progress without cost.
    let burst = SPEED / 10 + (512 << 10) + (320 << 10);
    for second in 1..=3u64 {
        vstep(&ctx, &job, 1_000_000_000);
        let done = job.info().current;
        assert!(
            done.abs_diff(second * SPEED) <= burst,
            "after {second} s: {done} bytes, expected {} ± {burst}",
            second * SPEED
        );
    }
    vstep(&ctx, &job, 5_000_000_000);
    assert_eq!(job.status(), JobStatus::Null);
    ctx.block_on(g.close_all()).unwrap();
    assert_check(&top);
}

#[test]
fn pause_resume_and_cancel_mid_job() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = dir.path().join("want.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&top), p(&want)]);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Virtual);
    let mut args = StreamArgs::new("ctl", "top");
    args.speed = 1 << 20;
    let job = start_stream(&ctx, &g, &reg, args).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    job.pause().unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    assert_eq!(job.status(), JobStatus::Paused);
    let at = job.info().current;
    vstep(&ctx, &job, 3_000_000_000);
    assert_eq!(job.info().current, at, "no progress while paused");
    job.resume().unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    assert!(job.info().current > at);
    job.cancel(false).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running paused running aborting BLOCK_JOB_CANCELLED concluded null"
    );
    // Cancelled: the chain is unchanged and reads the same.
    assert_eq!(topn.backing().unwrap().name(), "mid");
    assert!(g.find("base").is_some());
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&top).as_deref(), Some(p(&mid)));
    assert_same(&top, &want);
    assert_check(&top);
}

#[test]
fn busy_nodes_and_bad_arguments_are_refused_with_qemu_s_texts() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let solo = dir.path().join("solo.qcow2");
    create(&solo, "1M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    add_image(&ctx, &g, "solo", &solo);
    let (reg, _log) = registry(ClockType::Virtual);
    let err = |a: StreamArgs| start_stream(&ctx, &g, &reg, a).unwrap_err().to_string();
    assert_eq!(
        err(StreamArgs::new("s", "nosuchnode")),
        "Cannot find device='nosuchnode' nor node-name='nosuchnode'"
    );
    let mut a = StreamArgs::new("s0", "top");
    a.base_node = Some("top".into());
    assert_eq!(err(a), "Node 'top' is not a backing image of 'top'");
    let mut a = StreamArgs::new("busy0", "top");
    a.speed = 1024;
    let job = start_stream(&ctx, &g, &reg, a).unwrap();
    assert_eq!(
        err(StreamArgs::new("s2", "top")),
        "Node 'top' is busy: block device is in use by block job: stream"
    );
    assert_eq!(
        err(StreamArgs::new("s3", "mid")),
        "Node 'mid' is busy: block device is in use by block job: stream"
    );
    assert_eq!(
        err(StreamArgs::new("busy0", "solo")),
        "Job ID 'busy0' already in use"
    );
    assert_eq!(
        ctx.block_on(g.blockdev_del("top")).unwrap_err().to_string(),
        "Node 'top' is busy: block device is in use by block job: stream"
    );
    let mut a = StreamArgs::new("neg", "solo");
    a.speed = -1;
    assert_eq!(err(a), "Parameter 'speed' expects a non-negative value");
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
    // Released: the node can be streamed and deleted again.
    let job = start_stream(&ctx, &g, &reg, StreamArgs::new("again", "top")).unwrap();
    ctx.block_on(job.wait_finished());
    ctx.block_on(g.blockdev_del("top")).unwrap();
    assert_check(&top);
}

#[test]
fn guest_writes_during_stream_survive_it() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    qemu_io(
        &want,
        &[
            "write -P 0xd1 512k 4k".into(),
            "write -P 0xd2 2600k 8k".into(),
            "write -z 3M 64k".into(),
        ],
    );
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Virtual);
    let mut args = StreamArgs::new("s", "top");
    args.speed = 1 << 20;
    let job = start_stream(&ctx, &g, &reg, args).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    // Behind and ahead of the stream's position, in ranges it copies.
    ctx.block_on(topn.write(512 << 10, vec![0xd1; 4096]))
        .unwrap();
    ctx.block_on(topn.write(2600 << 10, vec![0xd2; 8192]))
        .unwrap();
    ctx.block_on(topn.write_zeroes(3 << 20, 64 << 10)).unwrap();
    job.set_speed(0).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&top), None);
    assert_same(&top, &want);
    assert_check(&top);
}

#[test]
fn manual_finalize_changes_the_chain_only_at_finalize() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let mut args: StreamArgs = serde_json::from_value(serde_json::json!({
        "job-id": "ctl4", "device": "top", "base-node": "base", "auto-finalize": false,
        "auto-dismiss": false, "speed": 536870912, "backing-file": "base.qcow2"}))
    .unwrap();
    args.speed = 0;
    let job = start_stream(&ctx, &g, &reg, args).unwrap();
    wait_status(&ctx, &job, JobStatus::Pending);
    assert_eq!(topn.backing().unwrap().name(), "mid", "not before finalize");
    job.finalize().unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(job.status(), JobStatus::Concluded);
    job.dismiss().unwrap();
    assert_eq!(
        events(&log),
        "created running waiting pending BLOCK_JOB_PENDING BLOCK_JOB_COMPLETED concluded null"
    );
    assert_eq!(topn.backing().unwrap().name(), "base");
    ctx.block_on(g.close_all()).unwrap();
    // The recorded name is the one given (relative to top's directory).
    assert_eq!(backing_of(&top).as_deref(), Some("base.qcow2"));
    assert_same(&top, &want);
    assert_check(&top);
}

#[test]
fn stream_into_an_intermediate_node() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want_top = snapshot(&top, dir.path(), "want-top.qcow2");
    let want_mid = snapshot(&mid, dir.path(), "want-mid.qcow2");
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let topn = add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_stream(&ctx, &g, &reg, StreamArgs::new("s-mid", "mid")).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    let midn = topn.backing().unwrap();
    assert_eq!(midn.name(), "mid");
    assert!(midn.backing().is_none());
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(backing_of(&mid), None);
    assert_same(&mid, &want_mid);
    assert_same(&top, &want_top);
    assert_check(&mid);
}

#[test]
fn base_by_file_name_and_bottom_select_the_same_base() {
    for how in ["base", "bottom"] {
        let dir = tmp();
        let (base, mid, top) = make_chain(dir.path());
        let want = snapshot(&top, dir.path(), "want.qcow2");
        let ctx = AioContext::new().unwrap();
        let g = BlockGraph::new();
        let topn = add_chain(&ctx, &g, &base, &mid, &top);
        let (reg, _log) = registry(ClockType::Realtime);
        let mut a = StreamArgs::new("s", "top");
        match how {
            "base" => a.base = Some(p(&base).to_string()),
            _ => a.bottom = Some("mid".into()),
        }
        let job = start_stream(&ctx, &g, &reg, a).unwrap();
        ctx.block_on(job.wait_finished());
        assert_eq!(topn.backing().unwrap().name(), "base", "{how}");
        ctx.block_on(g.close_all()).unwrap();
        assert_same(&top, &want);
        assert_check(&top);
    }
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, _log) = registry(ClockType::Realtime);
    let mut a = StreamArgs::new("s", "top");
    a.base = Some("nosuch.qcow2".into());
    assert_eq!(
        start_stream(&ctx, &g, &reg, a).unwrap_err().to_string(),
        "Can't find 'nosuch.qcow2' in the backing chain"
    );
    let mut a = StreamArgs::new("s", "top");
    a.base = Some(p(&base).to_string());
    a.base_node = Some("base".into());
    assert_eq!(
        start_stream(&ctx, &g, &reg, a).unwrap_err().to_string(),
        "'base' and 'base-node' cannot be specified at the same time"
    );
    ctx.block_on(g.close_all()).unwrap();
}
