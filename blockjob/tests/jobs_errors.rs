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
