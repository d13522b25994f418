//! `blockdev-backup`: the target is the source as of job start (checked
//! with `qemu-img compare` against a copy made before), even when the
//! guest writes during the job, also racing many copies in flight; sync
//! `top` and `none`; refusals, `x-perf` ones included.

mod common;

use aio::{AioContext, ClockType};
use blockjob::block::BlockGraph;
use blockjob::job::JobStatus;
use blockjob::jobs::SyncMode;
use blockjob::jobs::{start_backup, BackupArgs};
use common::*;

const OK_SEQ: &str = "created running waiting pending BLOCK_JOB_COMPLETED concluded null";

fn add_target(ctx: &AioContext, g: &BlockGraph, name: &str, img: &std::path::Path) {
    let args = serde_json::json!({"driver": "qcow2", "node-name": name, "backing": null,
        "file": {"driver": "file", "filename": p(img)}});
    ctx.block_on(g.blockdev_add(&args))
        .expect("blockdev-add target");
}

#[test]
fn full_backup_copies_the_whole_view() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    let tgt = dir.path().join("full.qcow2");
    create(&tgt, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "full", &tgt);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_backup(
        &ctx,
        &g,
        &reg,
        BackupArgs::new("backup0", "top", "full", SyncMode::Full),
    )
    .unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    assert_eq!((info.current, info.total), (4 << 20, 4 << 20));
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&tgt, &want);
    assert_check(&tgt);
}

/// A point-in-time setup: the chain's top as a node, an empty target
/// node `name`, and a copy of the top's view made before anything runs.
struct Pit {
    ctx: AioContext,
    g: BlockGraph,
    src: std::sync::Arc<blockjob::block::BlockNode>,
    top: std::path::PathBuf,
    tgt: std::path::PathBuf,
    want: std::path::PathBuf,
}

impl Pit {
    fn new(dir: &tempfile::TempDir, name: &str) -> Pit {
        let (base, mid, top) = make_chain(dir.path());
        let want = snapshot(&top, dir.path(), "want.qcow2");
        let tgt = dir.path().join(format!("{name}.qcow2"));
        create(&tgt, "4M", None);
        let ctx = AioContext::new().unwrap();
        let g = BlockGraph::new();
        let src = add_chain(&ctx, &g, &base, &mid, &top);
        add_target(&ctx, &g, name, &tgt);
        Pit {
            ctx,
            g,
            src,
            top,
            tgt,
            want,
        }
    }

    #[allow(clippy::type_complexity)]
    fn parts(
        self,
    ) -> (
        AioContext,
        BlockGraph,
        std::sync::Arc<blockjob::block::BlockNode>,
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        (self.ctx, self.g, self.src, self.top, self.tgt, self.want)
    }
}

/// Closes everything, then checks the target is `want` and both images
/// pass `qemu-img check`.
fn close_and_compare(
    ctx: &AioContext,
    g: &BlockGraph,
    tgt: &std::path::Path,
    want: &std::path::Path,
    top: &std::path::Path,
) {
    ctx.block_on(g.close_all()).unwrap();
    assert_same(tgt, want);
    assert_check(tgt);
    assert_check(top);
}

#[test]
fn guest_writes_during_backup_do_not_reach_the_target() {
    let dir = tmp();
    let (ctx, g, src, top, tgt, want) = Pit::new(&dir, "pit").parts();
    let (reg, log) = registry(ClockType::Virtual);
    let mut a = BackupArgs::new("backup1", "top", "pit", SyncMode::Full);
    a.speed = 1 << 20;
    let job = start_backup(&ctx, &g, &reg, a).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    let at = job.info().current;
    assert!(at > 0 && at < 2 << 20, "{at}");
    // One write behind the copy front, two ahead of it (one unaligned,
    // across a cluster boundary), one over the whole end.
    ctx.block_on(src.write(0, vec![0xe1; 4096])).unwrap();
    ctx.block_on(src.write((3 << 20) - 512, vec![0xe2; 8192]))
        .unwrap();
    ctx.block_on(src.write_zeroes(2 << 20, 128 << 10)).unwrap();
    ctx.block_on(src.write((4 << 20) - (64 << 10), vec![0xe3; 64 << 10]))
        .unwrap();
    job.set_speed(0).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    let now = ctx
        .block_on(src.read((3 << 20) - 512, vec![0; 8192]))
        .unwrap();
    assert!(
        now.iter().all(|&b| b == 0xe2),
        "the guest write landed in the source"
    );
    close_and_compare(&ctx, &g, &tgt, &want, &top);
}

#[test]
fn sync_top_copies_only_the_top_layer() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = snapshot(&top, dir.path(), "want.qcow2");
    let tgt = dir.path().join("inc.qcow2");
    create(&tgt, "4M", Some(&mid));
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let src = add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "inc", &tgt);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_backup(
        &ctx,
        &g,
        &reg,
        BackupArgs::new("b2", "top", "inc", SyncMode::Top),
    )
    .unwrap();
    ctx.block_on(src.write(1 << 20, vec![0x99; 4096])).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(events(&log), OK_SEQ);
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&tgt, &want);
    assert_check(&tgt);
    // Only top's clusters were copied.
    let map = qemu_img(&["map", "--output=json", p(&tgt)]);
    assert!(map.contains("\"depth\": 1"), "{map}");
}

#[test]
fn sync_none_copies_only_what_the_guest_overwrites_until_cancelled() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let tgt = dir.path().join("fleece.qcow2");
    create(&tgt, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let src = add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "fleece", &tgt);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_backup(
        &ctx,
        &g,
        &reg,
        BackupArgs::new("b3", "top", "fleece", SyncMode::None),
    )
    .unwrap();
    ctx.block_on(src.write(1 << 20, vec![0x55; 4096])).unwrap();
    settle(&ctx, &job);
    assert_eq!(job.status(), JobStatus::Running);
    job.cancel(false).unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running aborting BLOCK_JOB_CANCELLED concluded null"
    );
    ctx.block_on(g.close_all()).unwrap();
    // The old data of the overwritten cluster (top's 0x33), nothing else.
    qemu_io(
        &tgt,
        &[
            "read -P 0x33 1M 64k".into(),
            "read -P 0 0 1M".into(),
            "read -P 0 1088k 2M".into(),
        ],
    );
    assert_check(&tgt);
}

#[test]
fn backup_refusals() {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let small = dir.path().join("small.qcow2");
    create(&small, "1M", None);
    let t1 = dir.path().join("t1.qcow2");
    create(&t1, "4M", None);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    add_target(&ctx, &g, "small", &small);
    add_target(&ctx, &g, "t1", &t1);
    let (reg, _log) = registry(ClockType::Virtual);
    let err = |a: BackupArgs| start_backup(&ctx, &g, &reg, a).unwrap_err().to_string();
    assert_eq!(
        err(BackupArgs::new("b", "top", "small", SyncMode::Full)),
        "Source and target image have different sizes"
    );
    assert_eq!(
        err(BackupArgs::new("b", "top", "nosuch", SyncMode::Full)),
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
    let mut a = BackupArgs::new("b", "top", "t1", SyncMode::Incremental);
    a.bitmap = Some("bm0".into());
    assert_eq!(err(a), "Bitmap 'bm0' could not be found");
    let perf = |v| err(args("b", "t1", v));
    assert_eq!(
        perf(serde_json::json!({"max-workers": 0})),
        "max-workers must be between 1 and 2147483647"
    );
    assert_eq!(
        perf(serde_json::json!({"max-chunk": -1})),
        "max-chunk must be zero (which means no limit) or positive"
    );
    assert_eq!(
        perf(serde_json::json!({"max-chunk": 4096})),
        "Required max-chunk (4096) is less than backup cluster size (65536)"
    );
    let a: BackupArgs = serde_json::from_value(serde_json::json!(
        {"job-id": "ctl0", "device": "top", "target": "t1", "sync": "full", "speed": 4194304}))
    .unwrap();
    let job = start_backup(&ctx, &g, &reg, a).unwrap();
    assert_eq!(
        err(BackupArgs::new("b", "top", "small", SyncMode::Full)),
        "Node 'top' is busy: block device is in use by block job: backup"
    );
    let bad = serde_json::from_value::<BackupArgs>(serde_json::json!(
        {"job-id": "j", "device": "top", "target": "t", "sync": "sideways"}))
    .unwrap_err();
    assert!(bad.to_string().contains("sideways"), "{bad}");
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
    ctx.block_on(g.close_all()).unwrap();
}

fn args(job: &str, target: &str, perf: serde_json::Value) -> BackupArgs {
    serde_json::from_value(serde_json::json!(
        {"job-id": job, "device": "top", "target": target, "sync": "full", "x-perf": perf}))
    .unwrap()
}

/// Starts a backup with `perf` and, in the same breath, a guest write to
/// every 64 KiB cluster (in reverse order, one task each); the target
/// must be the view before the writes.
fn racing_guest_writes(perf: serde_json::Value) {
    let dir = tmp();
    let (ctx, g, src, top, tgt, want) = Pit::new(&dir, "t").parts();
    let (reg, _log) = registry(ClockType::Realtime);
    let job = start_backup(&ctx, &g, &reg, args("b", "t", perf)).unwrap();
    let writes: Vec<_> = (0..64u64)
        .rev()
        .map(|c| {
            let src = src.clone();
            // Unaligned, across the cluster's end into the next one.
            let at = c * (64 << 10) + 1000;
            let len = ((64 << 10) as u64).min((4 << 20) - at) as usize;
            ctx.spawn(async move { src.write(at, vec![0xd0 + (c % 16) as u8; len]).await })
        })
        .collect();
    for w in writes {
        ctx.block_on(w).unwrap().unwrap();
    }
    let info = ctx.block_on(job.wait_finished());
    assert!(info.error.is_none(), "{:?}", info.error);
    assert_eq!((info.current, info.total), (4 << 20, 4 << 20));
    close_and_compare(&ctx, &g, &tgt, &want, &top);
}

#[test]
fn guest_writes_racing_64_workers_do_not_reach_the_target() {
    racing_guest_writes(serde_json::json!({}));
}

#[test]
fn guest_writes_racing_one_small_worker_do_not_reach_the_target() {
    racing_guest_writes(serde_json::json!({"max-workers": 1, "max-chunk": 65536}));
}
