//! Crash tests for qcow2 metadata ordering.
//!
//! Every write the qcow2 driver makes to its file child is recorded
//! through a [`WriteHook`] on the file node, and so is every flush of it
//! ([`WriteHook::before_flush`], [`WriteHook::after_flush`]). A completed
//! flush makes durable the writes that completed before it started. A
//! disk with a volatile cache may, at a crash, have persisted any subset
//! of the other writes, in any order. The crash points sampled are the
//! moments just before each flush completes (and the end): the image is
//! the durable state then plus a random subset of the writes not yet
//! durable, applied in a random order (so for overlapping writes either
//! may win), and `qemu-img check` must report no corruption (leaks are
//! allowed) and QEMU must read the whole image. Applying all of them in
//! order is always one of the samples. Overlapping flushes are modelled
//! exactly (a write completing during a flush is not covered by it), so
//! a driver that joins a flush already in flight is caught.
//!
//! Workloads: random write/zero/discard/grow with small clusters and
//! 64-bit refcounts (the refcount table and the L1 table move), 4 KiB
//! clusters, internal snapshot create/apply/delete, persistent bitmaps
//! stored at close, copy-on-write over a backing file, metadata
//! preallocation of an existing image, and a large resize that grows L1.
//!
//! Sampling is deterministic (seeded), so a failure replays; with
//! `QCOW2_CRASH_KEEP=PATH` the failing image is copied to PATH.

mod common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blockjob::block::{
    create_qcow2, BitmapAddOptions, BlockGraph, BlockNode, CreateOptions, OpenOptions,
    Preallocation, SnapshotCreateOptions, SnapshotRef, WriteHook,
};

/// One recorded event on the file node.
#[derive(Clone)]
enum Ev {
    /// A completed write, zero write or discard: the range and the bytes
    /// it holds on disk afterwards.
    Write(u64, Vec<u8>),
    /// A completed flush: the log length when it started (the writes it
    /// covers) and the file's length when it ended (length changes are
    /// durable at a flush).
    Flush { covers: usize, len: u64 },
}

/// Records writes and flushes of the file node, in completion order.
/// A write's bytes are read back when it completes, so two overlapping
/// writes in flight at once may both record the later one's bytes; only
/// guest data overlaps like that (metadata updates are serialised), and
/// `qemu-img check` does not look at guest data.
struct Recorder {
    path: PathBuf,
    log: Mutex<Vec<Ev>>,
    /// Flushes in flight: id → log length at their start.
    flushing: Mutex<std::collections::HashMap<u64, usize>>,
}

impl Recorder {
    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).expect("metadata").len()
    }
}

impl WriteHook for Recorder {
    fn after_write(&self, offset: u64, len: u64) {
        let f = std::fs::File::open(&self.path).expect("open recorded file");
        let flen = f.metadata().expect("metadata").len();
        let end = (offset + len).min(flen.max(offset));
        let mut buf = vec![0u8; (end - offset) as usize];
        f.read_exact_at(&mut buf, offset).expect("read back write");
        self.log.lock().expect("log").push(Ev::Write(offset, buf));
    }
    fn before_flush(&self, flush: u64) {
        let at = self.log.lock().expect("log").len();
        self.flushing.lock().expect("flushing").insert(flush, at);
    }
    fn after_flush(&self, flush: u64) {
        let len = self.file_len();
        let covers = self
            .flushing
            .lock()
            .expect("flushing")
            .remove(&flush)
            .expect("flush started");
        self.log
            .lock()
            .expect("log")
            .push(Ev::Flush { covers, len });
    }
}

/// What the workload body gets.
struct Run<'a> {
    ctx: &'a aio::AioContext,
    node: &'a Arc<BlockNode>,
    rng: Rng,
}

impl Run<'_> {
    fn write(&mut self, off: u64, len: u64) {
        let b = (self.rng.below(255) + 1) as u8;
        self.ctx
            .block_on(self.node.write(off, vec![b; len as usize]))
            .expect("write");
    }
    /// `n` random writes, zero writes, discards of up to `max` sectors and
    /// guest flushes (one in 12), and growth (one in `grow_every`).
    fn random_ops(&mut self, n: usize, max_sectors: u64, grow_every: u64) {
        for _ in 0..n {
            let cur = self.node.len();
            if self.rng.below(grow_every) == 0 {
                self.ctx
                    .block_on(self.node.truncate(cur + (256 << 10)))
                    .expect("grow");
                continue;
            }
            let off = self.rng.below(cur / 512) * 512;
            let len = ((self.rng.below(max_sectors) + 1) * 512).min(cur - off);
            match self.rng.below(12) {
                0..=5 | 11 => self.write(off, len),
                6..=7 => self
                    .ctx
                    .block_on(self.node.write_zeroes(off, len))
                    .expect("zero"),
                8..=9 => self
                    .ctx
                    .block_on(self.node.discard(off, len))
                    .expect("discard"),
                // A guest flush: the write-back L2 cache is written.
                _ => self.ctx.block_on(self.node.flush()).expect("flush"),
            }
        }
    }
}

impl Run<'_> {
    /// `tasks` tasks at once, each doing `n` random writes, zero writes,
    /// discards and (one in 8) guest flushes, so allocations, metadata
    /// updates and flushes of different requests interleave.
    fn concurrent_ops(&mut self, tasks: usize, n: usize, max_sectors: u64) {
        let hs: Vec<_> = (0..tasks)
            .map(|_| {
                let node = self.node.clone();
                let mut rng = Rng(self.rng.next() | 1);
                self.ctx.spawn(async move {
                    for _ in 0..n {
                        let cur = node.len();
                        let off = rng.below(cur / 512) * 512;
                        let len = ((rng.below(max_sectors) + 1) * 512).min(cur - off);
                        match rng.below(16) {
                            0..=8 => {
                                let b = (rng.below(255) + 1) as u8;
                                node.write(off, vec![b; len as usize]).await?
                            }
                            9..=11 => node.write_zeroes(off, len).await?,
                            12..=13 => node.discard(off, len).await?,
                            _ => node.flush().await?,
                        }
                    }
                    Ok::<(), blockjob::Error>(())
                })
            })
            .collect();
        for h in hs {
            self.ctx.block_on(h).expect("task").expect("concurrent op");
        }
    }
}

/// The recorded run: the file when recording began, and the events.
struct Recording {
    initial: Vec<u8>,
    log: Vec<Ev>,
}

/// Opens `img` read-write, records `body` and the close.
fn record(img: &Path, seed: u64, body: impl FnOnce(&mut Run<'_>)) -> Recording {
    record_with(img, &OpenOptions::new(), seed, body)
}

/// [`record`] with the image opened with `opts`.
fn record_with(
    img: &Path,
    opts: &OpenOptions,
    seed: u64,
    body: impl FnOnce(&mut Run<'_>),
) -> Recording {
    let ctx = aio::AioContext::new().expect("ctx");
    let g = BlockGraph::new();
    let node: Arc<BlockNode> = ctx.block_on(g.open_image(img, opts)).expect("open rw");
    let rec = Arc::new(Recorder {
        path: node
            .file_child()
            .map(|f| PathBuf::from(f.filename()))
            .expect("file child"),
        log: Mutex::new(Vec::new()),
        flushing: Mutex::new(Default::default()),
    });
    let file = node.file_child().expect("file child");
    let guard = file.add_write_hook(rec.clone());
    // What open wrote is in the page cache: the starting state.
    let initial = std::fs::read(img).expect("read initial");
    body(&mut Run {
        ctx: &ctx,
        node: &node,
        rng: Rng(seed),
    });
    ctx.block_on(node.close()).expect("close");
    drop(guard);
    drop(file);
    drop(node);
    drop(g);
    let log = std::mem::take(&mut *rec.log.lock().expect("log"));
    Recording { initial, log }
}

fn apply(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[off as usize..end].copy_from_slice(data);
}

/// A crash point just before a flush completes (or at the end): the
/// durable image then and the completed writes not yet durable.
struct Epoch {
    base: Vec<u8>,
    writes: Vec<(u64, Vec<u8>)>,
}

fn epochs(r: &Recording) -> Vec<Epoch> {
    let mut durable = r.initial.clone();
    // The log entries before `upto` are durable.
    let mut upto = 0;
    let mut out = Vec::new();
    let pending = |from: usize, to: usize| -> Vec<(u64, Vec<u8>)> {
        r.log[from..to]
            .iter()
            .filter_map(|e| match e {
                Ev::Write(off, data) => Some((*off, data.clone())),
                Ev::Flush { .. } => None,
            })
            .collect()
    };
    for (at, ev) in r.log.iter().enumerate() {
        let Ev::Flush { covers, len } = ev else {
            continue;
        };
        let writes = pending(upto, at);
        if !writes.is_empty() {
            out.push(Epoch {
                base: durable.clone(),
                writes,
            });
        }
        if *covers > upto {
            for (off, data) in pending(upto, *covers) {
                apply(&mut durable, off, &data);
            }
            upto = *covers;
        }
        durable.resize(*len as usize, 0);
    }
    let writes = pending(upto, r.log.len());
    if !writes.is_empty() {
        out.push(Epoch {
            base: durable,
            writes,
        });
    }
    out
}

/// What the oracle accepts besides leaks.
#[derive(Clone, Copy, Default)]
struct Oracle {
    /// A COPIED flag that disagrees with its refcount: unavoidable in a
    /// crash during an internal snapshot operation (the flag and the
    /// refcount live in different clusters; QEMU's own snapshot code has
    /// the same window). Accepted only when every corruption is one and
    /// `qemu-img check -r all` then leaves a clean image.
    copied_flag: bool,
}

/// `qemu-img check` finds no corruption (leaks allowed, COPIED flags if
/// `o` says so) and QEMU reads the whole image.
fn check_image(dir: &Path, img: &Path, o: Oracle) -> Result<(), String> {
    let (code, out) = qemu_img_status(&["check", "--output=json", p(img)]);
    let start = out.find('{').ok_or_else(|| format!("no JSON: {out}"))?;
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .ok_or_else(|| format!("no JSON: {out}"))?
        .map_err(|e| format!("{e}: {out}"))?;
    let corruptions = v["corruptions"].as_u64().unwrap_or(0);
    // 0: clean, 3: leaks only. 2 (corruption) or anything else fails.
    let copied_only = o.copied_flag
        && code == 2
        && v["check-errors"].as_u64() == Some(0)
        && out.lines().filter(|l| l.starts_with("ERROR")).count() as u64 == corruptions
        && out
            .lines()
            .filter(|l| l.starts_with("ERROR"))
            .all(|l| l.contains("OFLAG_COPIED"));
    if copied_only {
        copied_flags_safe(img, &out)?;
        let fixed = dir.join("crash-fixed.qcow2");
        std::fs::copy(img, &fixed).map_err(|e| e.to_string())?;
        let (_, rep) = qemu_img_status(&["check", "-r", "all", p(&fixed)]);
        let (code, after) = qemu_img_status(&["check", p(&fixed)]);
        let _ = std::fs::remove_file(&fixed);
        if code != 0 {
            return Err(format!(
                "COPIED flags not repairable: {out}\n{rep}\nafter: {after}"
            ));
        }
    } else if code != 0 && code != 3 {
        return Err(format!("qemu-img check exit {code}: {out}"));
    } else if corruptions != 0 {
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

/// A COPIED flag on a cluster QEMU counts more than one reference to
/// would let a write in place change a snapshot: every flagged entry
/// whose refcount is above 1 must be a leak with one reference.
fn copied_flags_safe(img: &Path, check_out: &str) -> Result<(), String> {
    let head = std::fs::read(img).map_err(|e| e.to_string())?;
    let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    let field = |l: &str, key: &str| -> Option<u64> {
        let v = l.split(key).nth(1)?.split_whitespace().next()?;
        if key.ends_with("entry=") {
            u64::from_str_radix(v, 16).ok()
        } else {
            v.parse().ok()
        }
    };
    let leaked_once: std::collections::HashSet<u64> = check_out
        .lines()
        .filter(|l| l.starts_with("Leaked cluster") && l.ends_with("reference=1"))
        .filter_map(|l| field(l, "cluster "))
        .collect();
    for l in check_out.lines().filter(|l| l.contains("OFLAG_COPIED")) {
        let entry = field(l, "l2_entry=").or_else(|| field(l, "l1_entry="));
        let (Some(entry), Some(rc)) = (entry, field(l, "refcount=")) else {
            return Err(format!("unparsed check line: {l}"));
        };
        let cluster = (entry & 0x00ff_ffff_ffff_fe00) >> cluster_bits;
        if entry >> 63 == 1 && rc > 1 && !leaked_once.contains(&cluster) {
            return Err(format!(
                "COPIED set on shared cluster {cluster}: {l}\n{check_out}"
            ));
        }
    }
    Ok(())
}

/// What a run covered.
struct Coverage {
    writes: usize,
    epochs: usize,
    images: usize,
    l1_moved: bool,
    reftable_moved: bool,
}

/// Which crash images to check.
#[derive(Clone, Copy)]
struct Sampling {
    /// Epochs to check besides those that write the header.
    epochs: usize,
    /// Random subsets per epoch, besides the in-order whole epoch.
    samples: usize,
    oracle: Oracle,
}

impl Sampling {
    /// `epochs` and `samples`, both multiplied by `QCOW2_CRASH_SCALE`
    /// when set (a longer soak run: `QCOW2_CRASH_SCALE=20 cargo nextest
    /// run -p blockjob --test qcow2_crash`).
    fn new(epochs: usize, samples: usize) -> Self {
        let k = std::env::var("QCOW2_CRASH_SCALE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        Sampling {
            epochs: epochs * k,
            samples: samples * k,
            oracle: Oracle::default(),
        }
    }
}

/// Checks crash images of the epochs of `r` that write the header (L1
/// and refcount table moves, snapshot table updates) and of up to
/// `sm.epochs` others (the ones with the most writes first, then a seeded
/// sample of the rest): `sm.samples` random subsets each plus the
/// in-order whole epoch.
fn check_crashes(dir: &Path, r: &Recording, sm: Sampling) -> Coverage {
    let all = epochs(r);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ r.log.len() as u64);
    let (mut pick, others): (Vec<usize>, Vec<usize>) =
        (0..all.len()).partition(|&i| all[i].writes.iter().any(|(off, _)| *off < 104));
    let mut order = others;
    // The largest epochs reorder the most; then a random sample.
    order.sort_by_key(|&i| std::cmp::Reverse(all[i].writes.len()));
    let (big, rest) = order.split_at(order.len().min(sm.epochs / 2));
    let mut rest = rest.to_vec();
    shuffle(&mut rest, &mut rng);
    pick.extend_from_slice(big);
    pick.extend(rest.into_iter().take(sm.epochs - big.len()));
    pick.sort_unstable();
    let samples = sm.samples;
    let img = dir.join("crash.qcow2");
    let mut images = 0;
    for &ei in &pick {
        let e = &all[ei];
        for s in 0..=samples {
            let mut buf = e.base.clone();
            let mut w: Vec<&(u64, Vec<u8>)> = e.writes.iter().collect();
            if s > 0 {
                if e.writes.len() < 2 {
                    break;
                }
                w.retain(|_| rng.below(2) == 0);
                shuffle(&mut w, &mut rng);
            }
            for (off, data) in &w {
                apply(&mut buf, *off, data);
            }
            std::fs::write(&img, &buf).expect("write crash image");
            images += 1;
            if let Err(e) = check_image(dir, &img, sm.oracle) {
                let kept = std::env::var_os("QCOW2_CRASH_KEEP").map(|to| {
                    let _ = std::fs::copy(&img, &to);
                    PathBuf::from(to).display().to_string()
                });
                panic!(
                    "epoch {ei}/{} (sample {s}, {} of {} writes): {e}\nimage kept at: {}",
                    all.len(),
                    w.len(),
                    all[ei].writes.len(),
                    kept.as_deref()
                        .unwrap_or("(set QCOW2_CRASH_KEEP=PATH to keep it)")
                );
            }
        }
    }
    let _ = std::fs::remove_file(&img);
    let fin = r.log.iter().fold(r.initial.clone(), |mut b, ev| {
        if let Ev::Write(off, data) = ev {
            apply(&mut b, *off, data);
        }
        b
    });
    let c = Coverage {
        writes: r.log.iter().filter(|e| matches!(e, Ev::Write(..))).count(),
        epochs: all.len(),
        images,
        l1_moved: be64(&r.initial, 40) != be64(&fin, 40),
        reftable_moved: be64(&r.initial, 48) != be64(&fin, 48),
    };
    eprintln!(
        "{} writes in {} epochs, {} crash images checked, L1 moved {}, refcount table moved {}",
        c.writes, c.epochs, c.images, c.l1_moved, c.reftable_moved
    );
    c
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

fn new_image(dir: &Path, o: &CreateOptions) -> PathBuf {
    let img = dir.join("img.qcow2");
    let ctx = aio::AioContext::new().expect("ctx");
    ctx.block_on(create_qcow2(&img, o)).expect("create");
    img
}

#[test]
fn crash_reorder_small_clusters_table_growth() {
    // 512 B clusters with 64-bit refcounts: L2 tables, refcount blocks, the
    // refcount table and (through growth) the L1 table all move quickly.
    let dir = tmp();
    let img = new_image(
        dir.path(),
        &CreateOptions::new(1 << 20)
            .cluster_size(512)
            .refcount_bits(64),
    );
    let r = record(&img, 0x1234_5678, |run| run.random_ops(250, 24, 25));
    let c = check_crashes(dir.path(), &r, Sampling::new(40, 3));
    assert!(c.l1_moved, "workload did not move the L1 table");
}

#[test]
fn crash_reorder_refcount_table_growth() {
    // 512 B clusters, 64-bit refcounts: a refcount block covers 64
    // clusters and a one-cluster refcount table 4096, so filling 3 MiB
    // moves the table.
    let dir = tmp();
    let img = new_image(
        dir.path(),
        &CreateOptions::new(4 << 20)
            .cluster_size(512)
            .refcount_bits(64),
    );
    let r = record(&img, 0x7ab1e, |run| {
        for i in 0..96 {
            run.write(i << 15, 32 << 10);
        }
        run.random_ops(20, 24, 1000);
    });
    let c = check_crashes(dir.path(), &r, Sampling::new(30, 2));
    assert!(c.reftable_moved, "workload did not move the refcount table");
}

#[test]
fn crash_reorder_4k_clusters() {
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(4 << 20).cluster_size(4096));
    let r = record(&img, 0xdead_beef, |run| run.random_ops(150, 16, 1000));
    let c = check_crashes(dir.path(), &r, Sampling::new(30, 3));
    assert!(c.images > 60);
}

#[test]
fn crash_reorder_l2_cache_eviction() {
    // An L2 cache of two tables over 128 of them (512 B clusters, 4 MiB):
    // nearly every request evicts a table, so changed entries reach the
    // disk through eviction as well as through guest flushes.
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(4 << 20).cluster_size(512));
    let opts = OpenOptions::new().l2_cache_size(1024);
    let r = record_with(&img, &opts, 0xe71c7, |run| {
        // Every table allocated, so later writes change existing tables.
        for i in 0..128 {
            run.write(i << 15, 512);
        }
        run.random_ops(200, 8, 1000);
    });
    let c = check_crashes(dir.path(), &r, Sampling::new(30, 3));
    assert!(c.epochs > 20, "only {} epochs", c.epochs);
}

#[test]
fn crash_reorder_internal_snapshots() {
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(1 << 20).cluster_size(4096));
    let r = record(&img, 0x5eed, |run| {
        let snap = |run: &mut Run<'_>, name: &str| {
            run.ctx
                .block_on(run.node.snapshot_create(&SnapshotCreateOptions::new(name)))
                .expect("snapshot create");
        };
        run.random_ops(20, 16, 1000);
        snap(run, "s1");
        // Writes over clusters the snapshot shares: copy-on-write.
        run.random_ops(20, 16, 1000);
        snap(run, "s2");
        run.random_ops(10, 16, 1000);
        run.ctx
            .block_on(run.node.snapshot_delete(&SnapshotRef::Name("s1".into())))
            .expect("snapshot delete");
        run.random_ops(10, 16, 1000);
        run.ctx
            .block_on(run.node.snapshot_goto(&SnapshotRef::Name("s2".into())))
            .expect("snapshot apply");
        run.random_ops(10, 16, 1000);
        run.ctx
            .block_on(run.node.snapshot_delete(&SnapshotRef::Name("s2".into())))
            .expect("snapshot delete");
    });
    let mut sm = Sampling::new(40, 3);
    sm.oracle.copied_flag = true;
    check_crashes(dir.path(), &r, sm);
}

#[test]
fn crash_reorder_persistent_bitmaps_at_close() {
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(1 << 20).cluster_size(4096));
    // One bitmap already in the image (QEMU's), loaded on open and
    // rewritten at close, and two of ours.
    qemu_img(&["bitmap", "--add", p(&img), "q0"]);
    let r = record(&img, 0xb17, |run| {
        for (name, gran) in [("b1", 4096), ("b2", 65536)] {
            let mut o = BitmapAddOptions::default();
            o.persistent = true;
            o.granularity = Some(gran);
            run.node.add_bitmap(name, &o).expect("add bitmap");
        }
        run.random_ops(30, 64, 1000);
    });
    let c = check_crashes(dir.path(), &r, Sampling::new(40, 3));
    assert!(c.images > 0);
    let info = qemu_img(&["info", p(&img)]);
    assert!(info.contains("b1") && info.contains("b2"), "{info}");
}

#[test]
fn crash_reorder_cow_over_backing() {
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    create(&base, "1M", None);
    qemu_io(&base, &["write -P 0x5a 0 1M".into()]);
    let img = new_image(
        dir.path(),
        &CreateOptions::new(1 << 20)
            .cluster_size(4096)
            .backing("base.qcow2", Some("qcow2")),
    );
    // Sub-cluster writes: every allocation copies the rest of the
    // cluster from the backing file.
    let r = record(&img, 0xc0ffee, |run| run.random_ops(60, 3, 1000));
    check_crashes(dir.path(), &r, Sampling::new(30, 3));
}

#[test]
fn crash_reorder_preallocate_metadata() {
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(2 << 20).cluster_size(512));
    let r = record(&img, 0x9a11, |run| {
        // Some clusters already allocated, so preallocation fills gaps
        // and reuses L2 tables.
        run.random_ops(10, 8, 1000);
        run.ctx
            .block_on(run.node.preallocate(Preallocation::Metadata))
            .expect("preallocate");
        run.random_ops(20, 8, 1000);
    });
    check_crashes(dir.path(), &r, Sampling::new(30, 3));
}

#[test]
fn crash_reorder_create_with_preallocation_metadata() {
    // What `create -o preallocation=metadata` does after writing the
    // skeleton: grow the empty image to its size, preallocate, close.
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(0).cluster_size(512));
    let r = record(&img, 0x9a12, |run| {
        run.ctx.block_on(run.node.truncate(3 << 20)).expect("grow");
        run.ctx
            .block_on(run.node.preallocate(Preallocation::Metadata))
            .expect("preallocate");
    });
    let c = check_crashes(dir.path(), &r, Sampling::new(30, 3));
    assert!(c.l1_moved, "growth did not move the L1 table");
    // Every cluster allocated; all read as zeroes (where `map` says
    // `zero: false` the file's 4 KiB block holds metadata too).
    let unallocated = qemu_map(&img)
        .into_iter()
        .filter(|e| e["data"] != true)
        .count();
    assert_eq!(unallocated, 0, "not preallocated");
    assert!(to_raw(&img, dir.path()).iter().all(|&b| b == 0));
}

#[test]
fn crash_reorder_large_resize_grows_l1() {
    let dir = tmp();
    let img = new_image(
        dir.path(),
        &CreateOptions::new(256 << 10)
            .cluster_size(512)
            .refcount_bits(64),
    );
    let r = record(&img, 0x11, |run| {
        run.random_ops(20, 8, 1000);
        let cur = run.node.len();
        run.ctx
            .block_on(run.node.truncate(cur * 64))
            .expect("resize");
        run.random_ops(20, 8, 1000);
    });
    let c = check_crashes(dir.path(), &r, Sampling::new(30, 3));
    assert!(c.l1_moved, "resize did not move the L1 table");
}

#[test]
fn crash_reorder_concurrent_requests() {
    // Four requests in flight: their allocations, L2 updates and the
    // driver's and the guest's flushes overlap.
    let dir = tmp();
    let img = new_image(
        dir.path(),
        &CreateOptions::new(2 << 20)
            .cluster_size(512)
            .refcount_bits(16),
    );
    let r = record(&img, 0xc0c0, |run| run.concurrent_ops(4, 60, 16));
    let overlapped = r
        .log
        .iter()
        .enumerate()
        .any(|(at, e)| matches!(e, Ev::Flush { covers, .. } if *covers < at));
    check_crashes(dir.path(), &r, Sampling::new(40, 3));
    assert!(overlapped, "no write completed during a flush");
}

/// The oracle can fail: zeroing the first refcount block of a finished
/// image is reported as corruption.
#[test]
fn crash_oracle_detects_corruption() {
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(256 << 10).cluster_size(512));
    record(&img, 7, |run| run.random_ops(30, 8, 1000));
    let mut b = std::fs::read(&img).expect("read");
    let rt = be64(&b, 48) as usize;
    let rb = be64(&b, rt) as usize;
    b[rb..rb + 512].fill(0);
    std::fs::write(&img, &b).expect("write");
    assert!(
        check_image(dir.path(), &img, Oracle::default()).is_err(),
        "corruption not detected"
    );
}

/// The reordering model can fail where in-order prefixes cannot: an L2
/// entry written in the same epoch as the refcount update for its cluster
/// (no flush between) is corruption when only the L2 write lands.
#[test]
fn crash_model_catches_missing_flush() {
    let dir = tmp();
    let img = new_image(dir.path(), &CreateOptions::new(256 << 10).cluster_size(512));
    let mut r = record(&img, 3, |run| run.random_ops(10, 8, 1000));
    // Drop every flush: one epoch, refcounts and L2 writes unordered.
    r.log.retain(|e| matches!(e, Ev::Write(..)));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_crashes(dir.path(), &r, Sampling::new(1, 8))
    }));
    assert!(res.is_err(), "unordered metadata not caught");
}
