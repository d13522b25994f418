//! The filter node each job puts above its node for its lifetime
//! (QEMU's `copy-on-read`, `commit_top`, `mirror_top`,
//! `copy-before-write`): present and named while the job runs, gone after
//! a cancel, refused names, and copy-on-read populating the top.

mod common;
use common::*;

use std::sync::Arc;

use aio::ClockType;
use blockjob::block::{BlockGraph, BlockNode};
use blockjob::job::{Job, JobRegistry, JobStatus};
use blockjob::jobs::{
    start_backup, start_commit, start_mirror, start_stream, BackupArgs, CommitArgs, MirrorArgs,
    StreamArgs, SyncMode,
};

/// The graph's job filter nodes: (name, driver, filtered node's name).
fn filters(g: &BlockGraph) -> Vec<(String, String, String)> {
    g.nodes()
        .iter()
        .filter_map(|n| {
            blockjob::block::filtered_child(n).map(|c| {
                (
                    n.name().to_string(),
                    n.driver_name().to_string(),
                    c.name().to_string(),
                )
            })
        })
        .collect()
}

fn cancel_and_wait(ctx: &aio::AioContext, job: &Job) {
    job.cancel(true).unwrap();
    for _ in 0..1000 {
        vstep(ctx, job, 1_000_000);
        if job.info().status == JobStatus::Null {
            return;
        }
    }
    panic!("job did not end: {:?}", job.info().status);
}

type Start =
    fn(&aio::AioContext, &BlockGraph, &JobRegistry, Option<String>) -> blockjob::Result<Job>;

/// A job starter at 1 byte/s (so it stays running) with the given
/// `filter-node-name`.
macro_rules! starter {
    ($name:ident, $start:ident, $args:expr) => {
        fn $name(
            c: &aio::AioContext,
            g: &BlockGraph,
            r: &JobRegistry,
            f: Option<String>,
        ) -> blockjob::Result<Job> {
            let mut a = $args;
            a.speed = 1;
            a.filter_node_name = f;
            $start(c, g, r, a)
        }
    };
}

starter!(stream, start_stream, StreamArgs::new("j", "top"));
starter!(commit, start_commit, {
    let mut a = CommitArgs::new("j", "top");
    a.top_node = Some("mid".into());
    a.base_node = Some("base".into());
    a
});
starter!(active_commit, start_commit, CommitArgs::new("j", "top"));
starter!(
    mirror,
    start_mirror,
    MirrorArgs::new("j", "top", "tgt", SyncMode::Full)
);
starter!(
    backup,
    start_backup,
    BackupArgs::new("j", "top", "tgt", SyncMode::Full)
);

const JOBS: [(&str, Start, &str, &str, bool); 5] = [
    ("stream", stream, "copy-on-read", "top", true),
    ("commit", commit, "commit_top", "mid", false),
    ("active commit", active_commit, "mirror_top", "top", false),
    ("mirror", mirror, "mirror_top", "top", false),
    ("backup", backup, "copy-before-write", "top", true),
];

/// A fresh chain base <- mid <- top and a 4M target, in the graph.
fn setup(d: &tempfile::TempDir) -> (aio::AioContext, BlockGraph) {
    let (base, mid, top) = make_chain(d.path());
    let tgt = path(d, "tgt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&tgt), "4M"]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    add_image(&ctx, &g, "tgt", &tgt);
    (ctx, g)
}

#[test]
fn each_job_has_its_filter_while_it_runs_and_not_after_a_cancel() {
    for (what, start, driver, below, prefixed) in JOBS {
        for name in [Some("flt".to_string()), None] {
            let d = tmp();
            let (ctx, g) = setup(&d);
            let (reg, _log) = registry(ClockType::Virtual);
            let before: Vec<String> = g.nodes().iter().map(|n| n.name().to_string()).collect();
            let job = start(&ctx, &g, &reg, name.clone()).unwrap();
            vstep(&ctx, &job, 1_000);
            let f = filters(&g);
            assert_eq!(f.len(), 1, "{what}: {f:?}");
            let (fname, fdrv, fchild) = &f[0];
            assert_eq!((fdrv.as_str(), fchild.as_str()), (driver, below), "{what}");
            match &name {
                Some(n) => assert_eq!(fname, n, "{what}"),
                None => {
                    let num = fname
                        .strip_prefix("#block")
                        .unwrap_or_else(|| panic!("{fname}"));
                    assert!(num.parse::<u64>().is_ok(), "{what}: implicit name {fname}");
                }
            }
            let node = g.find(fname).unwrap();
            assert_eq!(node.len(), g.find(below).unwrap().len());
            assert_eq!(node.read_only(), driver == "commit_top", "{what}");
            // The job holds it: blockdev-del refuses, in QEMU's words.
            let e = ctx.block_on(g.blockdev_del(fname)).unwrap_err();
            let want = match what {
                "stream" => format!("Node {fname} is in use"),
                "commit" => format!("Node '{fname}' is busy: node is used as backing hd of 'top'"),
                _ => {
                    let t = match what {
                        "active commit" => "commit",
                        other => other,
                    };
                    format!("Node '{fname}' is busy: block device is in use by block job: {t}")
                }
            };
            assert_eq!(e.to_string(), want, "{what}");
            // A name in use is refused, as QEMU words it per job.
            cancel_and_wait(&ctx, &job);
            assert!(filters(&g).is_empty(), "{what}: filter left after cancel");
            let after: Vec<String> = g.nodes().iter().map(|n| n.name().to_string()).collect();
            assert_eq!(before, after, "{what}: graph as before");
            let e = start(&ctx, &g, &reg, Some("base".into())).unwrap_err();
            let prefix = if prefixed {
                "Could not create node: "
            } else {
                ""
            };
            assert_eq!(
                e.to_string(),
                format!("{prefix}Duplicate nodes with node-name='base'"),
                "{what}"
            );
            let e = start(&ctx, &g, &reg, Some("#x".into())).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{prefix}Invalid node-name: '#x'"),
                "{what}"
            );
            assert!(reg.list().is_empty() && filters(&g).is_empty(), "{what}");
            ctx.block_on(g.close_all()).unwrap();
        }
    }
}

fn allocated_in_top(ctx: &aio::AioContext, top: &Arc<BlockNode>, off: u64) -> bool {
    ctx.block_on(top.block_status(off, 64 << 10))
        .unwrap()
        .0
        .allocated
}

#[test]
fn a_guest_read_during_a_stream_copies_the_data_into_the_top() {
    let d = tmp();
    let (ctx, g) = setup(&d);
    let (reg, _log) = registry(ClockType::Virtual);
    let job = stream(&ctx, &g, &reg, Some("cor".into())).unwrap();
    vstep(&ctx, &job, 1_000);
    let top = g.find("top").unwrap();
    // mid holds 0x23 at 2560k; the stream (1 byte/s) has not got there.
    assert!(!allocated_in_top(&ctx, &top, 2560 << 10));
    let data = ctx
        .block_on(top.guest_read(2560 << 10, vec![0; 64 << 10]))
        .unwrap();
    assert!(data.iter().all(|&b| b == 0x23));
    assert!(allocated_in_top(&ctx, &top, 2560 << 10), "copied on read");
    // Reading through the filter node itself does the same (base's data).
    let cor = g.find("cor").unwrap();
    assert!(!allocated_in_top(&ctx, &top, 3 << 19));
    let data = ctx.block_on(cor.read(3 << 19, vec![0; 64 << 10])).unwrap();
    assert!(data.iter().all(|&b| b == 0x11));
    assert!(allocated_in_top(&ctx, &top, 3 << 19));
    cancel_and_wait(&ctx, &job);
    // No filter: a guest read copies nothing.
    assert!(!allocated_in_top(&ctx, &top, 2 << 20));
    ctx.block_on(top.guest_read(2 << 20, vec![0; 64 << 10]))
        .unwrap();
    assert!(!allocated_in_top(&ctx, &top, 2 << 20));
    ctx.block_on(g.close_all()).unwrap();
    let top_img = path(&d, "top.qcow2");
    assert_check(&top_img);
    // QEMU reads the copied cluster from the top alone.
    let map = qemu_img(&["map", "--output=json", p(&top_img)]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["start"].as_u64().unwrap() <= off
                    && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .unwrap()["depth"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(at(2560 << 10), 0, "{map}");
    assert_eq!(at(3 << 19), 0, "{map}");
    assert_eq!(at(2 << 20), 2, "{map}");
}
