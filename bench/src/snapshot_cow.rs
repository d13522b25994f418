//! Write throughput of a qcow2 active layer around an internal snapshot
//! (`aio-bench snapcow`): a pass over an allocated image (writes in
//! place), a snapshot, the first pass after it (every L2 table and data
//! cluster is shared, so every write copies), and a second pass (in place
//! again). The same sequence through `qemu-img bench -w` and
//! `qemu-img snapshot -c`, alternating with ours, round by round.
//!
//! Two request shapes at queue depth 1: whole 64 KiB clusters (the copy
//! is a pure allocation), and 4 KiB at the start of every cluster (the
//! copy reads and rewrites the other 60 KiB).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aio::AioContext;
use blockjob::block::{
    create_qcow2, BlockGraph, BlockNode, CreateOptions, OpenOptions, SnapshotCreateOptions,
};

use crate::{median_in_place as median, run_tool};

/// The cluster size of the images (QEMU's default).
const CLUSTER: u64 = 64 << 10;

/// What to run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CowOptions {
    /// Image size in bytes (a multiple of 64 KiB).
    pub size: u64,
    /// Rounds per implementation, alternating.
    pub rounds: usize,
    /// Where the images go (tmpfs keeps the device out of it).
    pub dir: PathBuf,
    /// Also run `qemu-img bench`.
    pub qemu: bool,
}

impl Default for CowOptions {
    fn default() -> Self {
        CowOptions {
            size: 128 << 20,
            rounds: 3,
            dir: PathBuf::from("/dev/shm"),
            qemu: true,
        }
    }
}

/// Seconds of the three passes: before the snapshot, first after, second after.
pub type Passes = [f64; 3];

/// One request shape: bytes per request; one request per cluster.
pub const SHAPES: [u64; 2] = [64 << 10, 4 << 10];

/// Our passes on a fresh image at `path`.
///
/// # Errors
///
/// Any block-layer error, as text.
pub fn ours(path: &Path, size: u64, bs: u64) -> Result<Passes, String> {
    let ctx = AioContext::new().map_err(|e| e.to_string())?;
    let s = |e: blockjob::Error| e.to_string();
    ctx.block_on(create_qcow2(path, &CreateOptions::new(size)))
        .map_err(s)?;
    let g = BlockGraph::new();
    let n = ctx
        .block_on(g.open_image(path, &OpenOptions::new()))
        .map_err(s)?;
    let pass = |bs: u64| -> Result<f64, String> { write_pass(&ctx, &n, size, bs) };
    pass(CLUSTER)?; // allocate everything
    let before = pass(bs)?;
    ctx.block_on(n.snapshot_create(&SnapshotCreateOptions::new("s")))
        .map_err(s)?;
    let first = pass(bs)?;
    let second = pass(bs)?;
    ctx.block_on(g.close_all()).map_err(s)?;
    Ok([before, first, second])
}

fn write_pass(ctx: &AioContext, n: &Arc<BlockNode>, size: u64, bs: u64) -> Result<f64, String> {
    let buf = vec![0x5au8; bs as usize];
    let start = Instant::now();
    let mut off = 0;
    while off < size {
        ctx.block_on(n.write(off, buf.clone()))
            .map_err(|e| e.to_string())?;
        off += CLUSTER;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// `qemu-img bench -w` at depth 1, one request of `bs` per cluster;
/// the time it reports (the run, without opening the image).
fn qemu_pass(path: &str, size: u64, bs: u64) -> Result<f64, String> {
    let count = (size / CLUSTER).to_string();
    let (s, step) = (bs.to_string(), CLUSTER.to_string());
    let out = run_tool(
        "qemu-img",
        &[
            "bench",
            "-w",
            "-f",
            "qcow2",
            "-d",
            "1",
            "-c",
            &count,
            "-s",
            &s,
            "-S",
            &step,
            "--pattern=90",
            path,
        ],
    )?;
    out.split("completed in ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| format!("qemu-img bench: no time in {out:?}"))
}

/// QEMU's passes on a fresh image at `path`.
///
/// # Errors
///
/// A failing `qemu-img`, as text.
pub fn qemu(path: &Path, size: u64, bs: u64) -> Result<Passes, String> {
    let p = path.to_str().ok_or("path is not UTF-8")?;
    run_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, &size.to_string()],
    )?;
    qemu_pass(p, size, CLUSTER)?;
    let before = qemu_pass(p, size, bs)?;
    run_tool("qemu-img", &["snapshot", "-c", "s", p])?;
    let first = qemu_pass(p, size, bs)?;
    let second = qemu_pass(p, size, bs)?;
    Ok([before, first, second])
}

/// Runs every shape for both implementations, `rounds` times alternating,
/// and returns one line per (implementation, shape): medians in MiB/s of
/// payload, and the first-after / before ratio.
///
/// # Errors
///
/// A failing run, as text.
pub fn report(o: &CowOptions, json: bool) -> Result<String, String> {
    let mut out = String::new();
    if !json {
        out += &format!(
            "{:<8} {:>6} {:>12} {:>12} {:>12} {:>10}\n",
            "impl", "bs", "before", "1st after", "2nd after", "1st/before"
        );
    }
    for bs in SHAPES {
        let mut ours_r: Vec<Passes> = Vec::new();
        let mut qemu_r: Vec<Passes> = Vec::new();
        for round in 0..o.rounds {
            let img = o
                .dir
                .join(format!("aio-bench-snapcow-{}.qcow2", std::process::id()));
            eprintln!("snapcow: bs {bs} round {round}");
            let r = ours(&img, o.size, bs);
            let _ = std::fs::remove_file(&img);
            ours_r.push(r?);
            if o.qemu {
                let r = qemu(&img, o.size, bs);
                let _ = std::fs::remove_file(&img);
                qemu_r.push(r?);
            }
        }
        for (name, rs) in [("aio", &ours_r), ("qemu", &qemu_r)] {
            if rs.is_empty() {
                continue;
            }
            let mib = (o.size / CLUSTER * bs) as f64 / f64::from(1 << 20);
            let m: Vec<f64> = (0..3)
                .map(|i| mib / median(&mut rs.iter().map(|p| p[i]).collect::<Vec<_>>()))
                .collect();
            let ratio = m[1] / m[0];
            if json {
                out += &format!(
                    "{{\"bench\":\"snapcow\",\"impl\":\"{name}\",\"bs\":{bs},\"size\":{},\"rounds\":{},\"before_mib_s\":{:.1},\"first_after_mib_s\":{:.1},\"second_after_mib_s\":{:.1},\"first_vs_before\":{ratio:.3}}}\n",
                    o.size, o.rounds, m[0], m[1], m[2]
                );
            } else {
                out += &format!(
                    "{name:<8} {:>6} {:>12.1} {:>12.1} {:>12.1} {ratio:>10.3}\n",
                    format!("{}k", bs >> 10),
                    m[0],
                    m[1],
                    m[2]
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_when_small_image_then_three_positive_passes() {
        let dir = std::env::temp_dir().join(format!("snapcow-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("t.qcow2");
        let p = ours(&img, 1 << 20, 4096).unwrap();
        assert!(p.iter().all(|&s| s > 0.0), "{p:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 2.5);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
