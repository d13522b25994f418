//! Error policies: a source whose L1 entry points at an unaligned L2
//! table fails every read; `report` fails the job with
//! `BLOCK_JOB_COMPLETED` carrying the error, `stop` pauses it after
//! `BLOCK_JOB_ERROR` until it is resumed or cancelled.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use aio::{AioContext, ClockType};
use blockjob::block::BlockGraph;
use blockjob::job::JobStatus;
use blockjob::jobs::{start_mirror, start_stream, MirrorArgs, OnError, StreamArgs, SyncMode};
use common::*;

/// A 4 MiB qcow2 image with data whose only L1 entry is then pointed at
/// an unaligned offset.
fn corrupt_image(img: &std::path::Path) {
    create(img, "4M", None);
    qemu_io(img, &["write -P 0x42 0 1M".into()]);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut h = [0u8; 48];
    f.read_exact(&mut h).unwrap();
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    f.seek(SeekFrom::Start(l1)).unwrap();
    f.write_all(&(0x8000_0000_0001_0200u64).to_be_bytes())
        .unwrap();
}

#[test]
fn report_fails_the_job_with_the_error() {
    let dir = tmp();
    let bad = dir.path().join("bad.qcow2");
    corrupt_image(&bad);
    let t = dir.path().join("t.qcow2");
    create(&t, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_image(&ctx, &g, "bad", &bad);
    add_image(&ctx, &g, "t", &t);
    let (reg, log) = registry(ClockType::Realtime);
    let mut a = MirrorArgs::new("m", "bad", "t", SyncMode::Full);
    a.auto_dismiss = false;
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running BLOCK_JOB_ERROR aborting BLOCK_JOB_COMPLETED concluded"
    );
    let err = info.error.unwrap();
    assert!(err.contains("unaligned"), "{err}");
    job.dismiss().unwrap();
    // The job released the nodes.
    ctx.block_on(g.blockdev_del("t")).unwrap();
}

#[test]
fn stop_pauses_until_cancel() {
    let dir = tmp();
    let bad = dir.path().join("bad.qcow2");
    corrupt_image(&bad);
    let top = dir.path().join("top.qcow2");
    create(&top, "4M", Some(&bad));
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let args = serde_json::json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": p(&top)},
        "backing": {"driver": "qcow2", "node-name": "bad",
            "file": {"driver": "file", "filename": p(&bad)}}});
    ctx.block_on(g.blockdev_add(&args)).unwrap();
    let (reg, log) = registry(ClockType::Realtime);
    let mut a = StreamArgs::new("s", "top");
    a.on_error = OnError::Stop;
    let job = start_stream(&ctx, &g, &reg, a).unwrap();
    wait_status(&ctx, &job, JobStatus::Paused);
    assert!(job.info().paused);
    assert_eq!(events(&log), "created running BLOCK_JOB_ERROR paused");
    // Resuming retries and stops again.
    job.resume().unwrap();
    while log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| *e == "BLOCK_JOB_ERROR")
        .count()
        < 2
    {
        ctx.poll(true);
    }
    wait_status(&ctx, &job, JobStatus::Paused);
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running BLOCK_JOB_ERROR paused running BLOCK_JOB_ERROR paused running aborting BLOCK_JOB_CANCELLED concluded null"
    );
}

/// A mirror from a 4 MiB source with data into a target behind a
/// `blkdebug` node that fails its first write with `errno`.
fn mirror_into_failing_target(
    errno: i32,
    policy: OnError,
) -> (
    tempfile::TempDir,
    AioContext,
    BlockGraph,
    common::JobLog,
    blockjob::job::Job,
    blockjob::job::JobRegistry,
) {
    let dir = tmp();
    let (src, tgt) = (dir.path().join("s.qcow2"), dir.path().join("t.qcow2"));
    create(&src, "4M", None);
    qemu_io(&src, &["write -P 0x61 0 3M".into()]);
    create(&tgt, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_image(&ctx, &g, "src", &src);
    let dbg = serde_json::json!({"driver": "blkdebug", "node-name": "tgt",
        "inject-error": [{"event": "write_aio", "errno": errno, "once": true}],
        "image": {"driver": "qcow2", "node-name": "tq",
            "file": {"driver": "file", "filename": p(&tgt)}}});
    ctx.block_on(g.blockdev_add(&dbg)).unwrap();
    let (reg, log) = registry(ClockType::Realtime);
    let mut a = MirrorArgs::new("m", "src", "tgt", SyncMode::Full);
    a.on_target_error = policy;
    let job = start_mirror(&ctx, &g, &reg, a).unwrap();
    // The registry is returned too: its events stop when it is dropped.
    (dir, ctx, g, log, job, reg)
}

#[test]
fn enospc_stops_on_a_full_disk_and_resume_finishes_the_copy() {
    let (dir, ctx, g, log, job, _reg) = mirror_into_failing_target(libc::ENOSPC, OnError::Enospc);
    wait_status(&ctx, &job, JobStatus::Paused);
    assert_eq!(events(&log), "created running BLOCK_JOB_ERROR paused");
    // "The disk has room again": the rule was `once`, so the retry works.
    job.resume().unwrap();
    wait_status(&ctx, &job, JobStatus::Ready);
    job.complete().unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert!(info.error.is_none(), "{info:?}");
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&dir.path().join("s.qcow2"), &dir.path().join("t.qcow2"));
}

#[test]
fn enospc_reports_other_errors_and_auto_too() {
    for policy in [OnError::Enospc, OnError::Auto] {
        let (_dir, ctx, g, log, job, _reg) = mirror_into_failing_target(libc::EIO, policy);
        let info = ctx.block_on(job.wait_finished());
        let err = info.error.unwrap();
        assert!(err.contains("Input/output error"), "{err}");
        assert!(err.contains("blkdebug: injected error"), "{err}");
        assert!(
            events(&log).starts_with("created running BLOCK_JOB_ERROR aborting"),
            "{}",
            events(&log)
        );
        ctx.block_on(g.close_all()).unwrap();
    }
    // `auto` stops on ENOSPC as `enospc` does.
    let (_dir, ctx, _g, log, job, _reg) = mirror_into_failing_target(libc::ENOSPC, OnError::Auto);
    wait_status(&ctx, &job, JobStatus::Paused);
    assert_eq!(events(&log), "created running BLOCK_JOB_ERROR paused");
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
}

#[test]
fn blkdebug_options_are_checked() {
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    ctx.block_on(g.blockdev_add(&serde_json::json!({"driver": "null-co", "node-name": "n"})))
        .unwrap();
    for (rules, want) in [
        (
            serde_json::json!([{"event": "bogus"}]),
            "Parameter 'inject-error[0].event' does not accept value 'bogus'",
        ),
        (
            serde_json::json!([{"errno": 5}]),
            "Parameter 'inject-error[0].event' is missing",
        ),
        (
            serde_json::json!([{"event": "read_aio", "state": 1}]),
            "Parameter 'inject-error[0].state' is not supported by this blkdebug",
        ),
        (
            serde_json::json!({}),
            "Invalid parameter type for 'inject-error', expected: array",
        ),
    ] {
        let e = ctx
            .block_on(
                g.blockdev_add(&serde_json::json!({"driver": "blkdebug", "node-name": "d",
                "image": "n", "inject-error": rules})),
            )
            .unwrap_err();
        assert_eq!(e.to_string(), want);
    }
    // A read rule on one sector fails only reads that cover it.
    let d = ctx
        .block_on(
            g.blockdev_add(&serde_json::json!({"driver": "blkdebug", "node-name": "d",
            "image": "n", "inject-error": [{"event": "read_aio", "sector": 8}]})),
        )
        .unwrap();
    assert!(ctx.block_on(d.read(0, vec![0; 4096])).is_ok());
    let e = ctx.block_on(d.read(4096, vec![0; 512])).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        ctx.block_on(d.read(4096, vec![0; 512])).is_err(),
        "not once: fails again"
    );
}
