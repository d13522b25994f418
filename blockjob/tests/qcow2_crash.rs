//! Crash-point tests for qcow2 metadata ordering: every write the qcow2
//! driver makes to its file child is recorded (through a [`WriteHook`] on
//! the file node) and each sampled prefix of that write stream is replayed
//! onto a copy of the starting file. `qemu-img check` must report no
//! corruption (leaks are allowed) for any prefix, i.e. a crash between any
//! two of our writes, with the writes landing in issue order.
//!
//! Limitation: this models an in-order crash (no reordering between flush
//! barriers) because flushes are not visible to write hooks.

mod common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use blockjob::block::{create_qcow2, BlockGraph, BlockNode, CreateOptions, OpenOptions, WriteHook};

/// Records, after each completed write/zero/discard on the file node, the
/// range and the bytes it now holds on disk.
struct Recorder {
    path: std::path::PathBuf,
    log: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl WriteHook for Recorder {
    fn after_write(&self, offset: u64, len: u64) {
        let f = std::fs::File::open(&self.path).expect("open recorded file");
        let flen = f.metadata().expect("metadata").len();
        let end = (offset + len).min(flen.max(offset));
        let mut buf = vec![0u8; (end - offset) as usize];
        f.read_exact_at(&mut buf, offset).expect("read back write");
        self.log.lock().expect("log").push((offset, buf));
    }
}

/// A workload: image geometry and a random op mix.
#[derive(Clone, Copy)]
struct Workload {
    cs: u64,
    size: u64,
    refcount_bits: u32,
    nops: usize,
    /// Largest request, in 512 B sectors.
    max_sectors: u64,
    /// One op in `grow_every` grows the image by 256 KiB (moves L1).
    grow_every: u64,
    seed: u64,
}

fn record(dir: &Path, w: Workload) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let Workload {
        cs,
        size,
        refcount_bits,
        nops,
        max_sectors,
        grow_every,
        seed,
    } = w;
    let img = dir.join("img.qcow2");
    let ctx = aio::AioContext::new().expect("ctx");
    ctx.block_on(create_qcow2(
        &img,
        &CreateOptions::new(size)
            .cluster_size(cs)
            .refcount_bits(refcount_bits),
    ))
    .expect("create");
    let initial = std::fs::read(&img).expect("read initial");
    let g = BlockGraph::new();
    let node: Arc<BlockNode> = ctx
        .block_on(g.open_image(&img, &OpenOptions::new()))
        .expect("open rw");
    let rec = Arc::new(Recorder {
        path: img.clone(),
        log: Mutex::new(Vec::new()),
    });
    let file = node.file_child().expect("file child");
    let guard = file.add_write_hook(rec.clone());
    let mut rng = Rng(seed);
    for _ in 0..nops {
        let cur = node.len();
        if rng.below(grow_every) == 0 {
            ctx.block_on(node.truncate(cur + (256 << 10)))
                .expect("grow");
            continue;
        }
        let off = rng.below(cur / 512) * 512;
        let len = ((rng.below(max_sectors) + 1) * 512).min(cur - off);
        let r = match rng.below(10) {
            0..=5 => ctx.block_on(node.write(off, vec![(rng.below(255) + 1) as u8; len as usize])),
            6..=7 => ctx.block_on(node.write_zeroes(off, len)),
            _ => ctx.block_on(node.discard(off, len)),
        };
        r.expect("workload op");
    }
    ctx.block_on(node.close()).expect("close");
    drop(guard);
    drop(node);
    drop(g);
    let log = std::mem::take(&mut *rec.log.lock().expect("log"));
    (initial, log)
}

/// Replays the first `k` writes onto `initial` and checks the result.
fn check_prefix(dir: &Path, initial: &[u8], log: &[(u64, Vec<u8>)], k: usize) {
    let img = dir.join("crash.qcow2");
    std::fs::write(&img, initial).expect("write copy");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open copy");
    for (off, data) in &log[..k] {
        f.write_all_at(data, *off).expect("replay");
    }
    drop(f);
    if let Err(e) = check_image(dir, &img) {
        panic!("crash after write {k}/{}: {e}", log.len());
    }
}

/// `qemu-img check` finds no corruption (leaks allowed) and QEMU reads
/// the whole image.
fn check_image(dir: &Path, img: &Path) -> Result<(), String> {
    let (code, out) = qemu_img_status(&["check", "--output=json", p(img)]);
    // 0: clean, 3: leaks only. 2 (corruption) or anything else fails.
    if code != 0 && code != 3 {
        return Err(format!("qemu-img check exit {code}: {out}"));
    }
    // The helper appends stderr after the JSON: take the first value.
    let start = out.find('{').expect("check json");
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .expect("check json value")
        .expect("check json parse");
    if v["corruptions"].as_u64().unwrap_or(0) != 0 {
        return Err(format!("corruptions: {out}"));
    }
    let raw = dir.join("crash.raw");
    let (code, out) = qemu_img_status(&["convert", "-O", "raw", p(img), p(&raw)]);
    let _ = std::fs::remove_file(&raw);
    if code != 0 {
        return Err(format!("qemu-img convert exit {code}: {out}"));
    }
    Ok(())
}

/// Big-endian u64 at `at` of a qcow2 header.
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// What a run covered.
struct Coverage {
    writes: usize,
    points: usize,
    l1_moved: bool,
    reftable_moved: bool,
}

/// Records `w` and checks every `step`-th crash point plus the first and
/// last ones.
fn crash_points(w: Workload, step: usize) -> Coverage {
    let dir = tmp();
    let (initial, log) = record(dir.path(), w);
    assert!(!log.is_empty(), "no writes recorded");
    let mut ks: Vec<usize> = (0..=log.len()).step_by(step.max(1)).collect();
    ks.extend([1, log.len()]);
    ks.sort_unstable();
    ks.dedup();
    for &k in &ks {
        check_prefix(dir.path(), &initial, &log, k);
    }
    let fin = std::fs::read(dir.path().join("img.qcow2")).expect("read final");
    let c = Coverage {
        writes: log.len(),
        points: ks.len(),
        l1_moved: be64(&initial, 40) != be64(&fin, 40),
        reftable_moved: be64(&initial, 48) != be64(&fin, 48),
    };
    eprintln!(
        "cluster {}: {} writes, {} crash points checked, L1 moved {}, refcount table moved {}",
        w.cs, c.writes, c.points, c.l1_moved, c.reftable_moved
    );
    c
}

#[test]
fn crash_prefixes_small_clusters_table_growth() {
    // 512 B clusters with 64-bit refcounts: L2 tables, refcount blocks, the
    // refcount table and (through growth) the L1 table all move quickly.
    let c = crash_points(
        Workload {
            cs: 512,
            size: 1 << 20,
            refcount_bits: 64,
            nops: 250,
            max_sectors: 24,
            grow_every: 25,
            seed: 0x1234_5678,
        },
        8,
    );
    assert!(c.l1_moved, "workload did not move the L1 table");
}

#[test]
fn crash_prefixes_4k_clusters() {
    let c = crash_points(
        Workload {
            cs: 4096,
            size: 4 << 20,
            refcount_bits: 16,
            nops: 150,
            max_sectors: 16,
            grow_every: 1000,
            seed: 0xdead_beef,
        },
        1,
    );
    assert!(c.points > 100);
}

/// The oracle can fail: zeroing the first refcount block of a finished
/// image is reported as corruption.
#[test]
fn crash_oracle_detects_corruption() {
    let dir = tmp();
    let w = Workload {
        cs: 512,
        size: 256 << 10,
        refcount_bits: 16,
        nops: 30,
        max_sectors: 8,
        grow_every: 1000,
        seed: 7,
    };
    let (_, _) = record(dir.path(), w);
    let img = dir.path().join("img.qcow2");
    let mut b = std::fs::read(&img).expect("read");
    let rt = be64(&b, 48) as usize;
    let rb = be64(&b, rt) as usize;
    b[rb..rb + 512].fill(0);
    std::fs::write(&img, &b).expect("write");
    assert!(
        check_image(dir.path(), &img).is_err(),
        "corruption not detected"
    );
}
