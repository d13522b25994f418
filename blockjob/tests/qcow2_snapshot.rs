//! qcow2 internal snapshots against QEMU: ours are listed, checked and
//! applied by `qemu-img`; QEMU's are listed, applied and deleted by us;
//! writes after a snapshot leave it intact; delete frees; errors change
//! nothing on disk.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockjob::block::{
    BlockGraph, BlockNode, OpenOptions, SnapshotCreateOptions, SnapshotInfo, SnapshotRef,
};
use blockjob::Error;
use common::{aio_img, create, p, qemu_img, qemu_img_status, qemu_io, read_all, tmp, to_raw, Rng};

const MIB: u64 = 1 << 20;

/// One open image on its own graph.
struct Img {
    ctx: aio::AioContext,
    g: BlockGraph,
    n: Arc<BlockNode>,
}

impl Img {
    fn open(path: &Path, read_only: bool) -> Img {
        let ctx = aio::AioContext::new().unwrap();
        let g = BlockGraph::new();
        let n = ctx
            .block_on(g.open_image(path, &OpenOptions::new().read_only(read_only)))
            .unwrap();
        Img { ctx, g, n }
    }
    fn snap(&self, name: &str) -> blockjob::Result<SnapshotInfo> {
        self.ctx
            .block_on(self.n.snapshot_create(&SnapshotCreateOptions::new(name)))
    }
    fn goto(&self, name: &str) -> blockjob::Result<SnapshotInfo> {
        self.ctx
            .block_on(self.n.snapshot_goto(&SnapshotRef::IdOrName(name.into())))
    }
    fn delete(&self, which: SnapshotRef) -> blockjob::Result<SnapshotInfo> {
        self.ctx.block_on(self.n.snapshot_delete(&which))
    }
    fn list(&self) -> Vec<SnapshotInfo> {
        self.ctx.block_on(self.n.snapshot_list()).unwrap()
    }
    fn write(&self, off: u64, data: Vec<u8>) {
        self.ctx.block_on(self.n.write(off, data)).unwrap();
    }
    fn read_all(&self) -> Vec<u8> {
        read_all(&self.ctx, &self.n, MIB)
    }
    fn close(self) {
        self.ctx.block_on(self.g.close_all()).unwrap();
    }
}

/// `qemu-img check` must say clean (exit 0).
fn assert_clean(img: &Path) {
    let (code, out) = qemu_img_status(&["check", p(img)]);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
}

/// What QEMU reads after `qemu-img snapshot -a NAME` on a copy of `img`.
fn qemu_view_of_snapshot(img: &Path, name: &str) -> Vec<u8> {
    let copy = img.with_extension(format!("{name}.copy"));
    std::fs::copy(img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", name, p(&copy)]);
    assert_clean(&copy);
    let dir = copy.parent().unwrap().to_path_buf();
    to_raw(&copy, &dir)
}

/// `qemu-img create -f qcow2 [-o OPTS] IMG SIZE`.
fn create_with(img: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(img), size]);
    qemu_img(&args);
}

/// A 4 MiB image with data, a partial cluster, zeroes and a hole.
fn populated(dir: &Path, name: &str, extra_opts: &str) -> PathBuf {
    let img = dir.join(name);
    create_with(&img, extra_opts, "4M");
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x12 1540k 4k".into(),
            "write -z 2M 128k".into(),
            "write -P 0x13 3M 64k".into(),
        ],
    );
    img
}

/// Writes after a snapshot: in place over shared clusters (partial and
/// whole), into a shared L2 table's hole, zeroes, discard.
fn overwrite(img: &Img) {
    img.write(4096, vec![0x55; 8192]);
    img.write(MIB / 2, vec![0x56; 128 << 10]);
    img.write(1536 << 10, vec![0x57; 4096]);
    img.write(3 * MIB + 4096, vec![0x58; 512]);
    img.ctx.block_on(img.n.write_zeroes(3 * MIB, 4096)).unwrap();
    img.ctx
        .block_on(img.n.discard(768 << 10, 128 << 10))
        .unwrap();
    img.ctx
        .block_on(img.n.write_zeroes(2 * MIB, 64 << 10))
        .unwrap();
}

#[test]
fn our_snapshot_is_listed_checked_and_applied_by_qemu() {
    let dir = tmp();
    let img = populated(dir.path(), "a.qcow2", "");
    let before = to_raw(&img, dir.path());
    let o = Img::open(&img, false);
    let info = o.snap("s1").unwrap();
    assert_eq!((info.id.as_str(), info.name.as_str()), ("1", "s1"));
    overwrite(&o);
    let after = o.read_all();
    assert_ne!(after, before);
    o.close();
    assert_clean(&img);
    let list = qemu_img(&["snapshot", "-l", p(&img)]);
    assert!(list.lines().any(|l| l.starts_with("1       s1 ")), "{list}");
    assert_eq!(
        to_raw(&img, dir.path()),
        after,
        "active layer as QEMU reads it"
    );
    assert_eq!(qemu_view_of_snapshot(&img, "s1"), before);
    let cmp = dir.path().join("cmp.raw");
    std::fs::write(&cmp, &before).unwrap();
    let copy = img.with_extension("s1.copy");
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(&copy), p(&cmp)]);
}

#[test]
fn qemu_snapshots_are_listed_applied_and_deleted_by_us() {
    let dir = tmp();
    let img = populated(dir.path(), "q.qcow2", "");
    let v1 = to_raw(&img, dir.path());
    qemu_img(&["snapshot", "-c", "q1", p(&img)]);
    qemu_io(
        &img,
        &["write -P 0x21 64k 1M".into(), "write -P 0x22 3M 4k".into()],
    );
    let v2 = to_raw(&img, dir.path());
    qemu_img(&["snapshot", "-c", "q2", p(&img)]);
    qemu_io(&img, &["write -P 0x31 0 2M".into()]);
    let v3 = to_raw(&img, dir.path());

    let qemu_json: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", p(&img)])).unwrap();
    let o = Img::open(&img, true);
    let list = o.list();
    o.close();
    let qsn = qemu_json["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    for (ours, q) in list.iter().zip(qsn) {
        assert_eq!(ours.id, q["id"].as_str().unwrap());
        assert_eq!(ours.name, q["name"].as_str().unwrap());
        assert_eq!(u64::from(ours.date_sec), q["date-sec"].as_u64().unwrap());
        assert_eq!(u64::from(ours.date_nsec), q["date-nsec"].as_u64().unwrap());
        assert_eq!(ours.disk_size, Some(4 * MIB));
    }

    // Apply q1 on a copy: what QEMU and we read is v1.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let o = Img::open(&copy, false);
    assert_eq!(o.goto("q1").unwrap().name, "q1");
    assert_eq!(o.read_all(), v1);
    o.close();
    assert_clean(&copy);
    assert_eq!(to_raw(&copy, dir.path()), v1);
    assert_eq!(qemu_view_of_snapshot(&copy, "q2"), v2);

    // Delete q2 (by id) from the original: no leaks, contents unchanged.
    let o = Img::open(&img, false);
    assert_eq!(o.delete(SnapshotRef::Id("2".into())).unwrap().name, "q2");
    o.close();
    assert_clean(&img);
    assert_eq!(to_raw(&img, dir.path()), v3);
    let l = qemu_img(&["snapshot", "-l", p(&img)]);
    assert!(l.contains(" q1 ") && !l.contains(" q2 "), "{l}");
    assert_eq!(qemu_view_of_snapshot(&img, "q1"), v1);
    // Then the last one: the image has no snapshots and no leaks.
    let o = Img::open(&img, false);
    o.delete(SnapshotRef::Name("q1".into())).unwrap();
    assert!(o.list().is_empty());
    o.close();
    assert_clean(&img);
    assert_eq!(qemu_img(&["snapshot", "-l", p(&img)]), "");
}

/// Random writes, zeroes and discards interleaved with snapshots (and,
/// on a copy, reverts): every snapshot reads as it was taken, in QEMU
/// and here, and every image passes check.
fn random_snapshot_history(cluster_size: &str, seed: u64) {
    let dir = tmp();
    let img = dir.path().join("r.qcow2");
    let size = 2 * MIB;
    create_with(&img, &format!("cluster_size={cluster_size}"), "2M");
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let o = Img::open(&img, false);
    for step in 0..60u64 {
        let off = rng.below(size / 512) * 512;
        let len = (rng.below(96 << 10) / 512 + 1) * 512;
        let len = len.min(size - off);
        match rng.below(10) {
            0 if snaps.len() < 4 => {
                let name = format!("s{step}");
                o.snap(&name).unwrap();
                snaps.push((name, model.clone()));
            }
            1 => {
                o.ctx.block_on(o.n.write_zeroes(off, len)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            2 if !snaps.is_empty() && rng.below(3) == 0 => {
                let i = rng.below(snaps.len() as u64) as usize;
                let (name, _) = snaps.remove(i);
                o.delete(SnapshotRef::Name(name)).unwrap();
            }
            _ => {
                let v = (step as u8).wrapping_mul(7) | 1;
                o.write(off, vec![v; len as usize]);
                model[off as usize..(off + len) as usize].fill(v);
            }
        }
    }
    assert_eq!(o.read_all(), model);
    let ours = o.check_report();
    o.close();
    assert!(
        ours.corruptions.is_empty() && ours.leaks.is_empty(),
        "{ours:?}"
    );
    assert_clean(&img);
    assert_eq!(to_raw(&img, dir.path()), model);
    for (name, view) in &snaps {
        assert_eq!(&qemu_view_of_snapshot(&img, name), view, "snapshot {name}");
    }
    // Revert with our code to each snapshot in turn, writing in between.
    let o = Img::open(&img, false);
    for (name, view) in &snaps {
        o.goto(name).unwrap();
        assert_eq!(&o.read_all(), view, "after goto {name}");
        o.write(4096, vec![0xee; 70 << 10]);
    }
    o.close();
    assert_clean(&img);
    for (name, view) in &snaps {
        assert_eq!(&qemu_view_of_snapshot(&img, name), view, "snapshot {name}");
    }
}

impl Img {
    fn check_report(&self) -> blockjob::block::CheckReport {
        self.ctx.block_on(self.n.check()).unwrap().unwrap()
    }
}

#[test]
fn random_history_cs64k_snapshots_stay_intact() {
    random_snapshot_history("64k", 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn random_history_cs4k_snapshots_stay_intact() {
    random_snapshot_history("4k", 0x2545_f491_4f6c_dd1d);
}

#[test]
fn delete_after_cow_frees_clusters_for_reuse() {
    let dir = tmp();
    let img = dir.path().join("f.qcow2");
    create(&img, "4M", None);
    qemu_io(&img, &["write -P 0x41 0 2M".into()]);
    let o = Img::open(&img, false);
    o.snap("s").unwrap();
    o.write(0, vec![0x42; 2 * MIB as usize]);
    let grown = std::fs::metadata(&img).unwrap().len();
    o.delete(SnapshotRef::Name("s".into())).unwrap();
    let r = o.check_report();
    assert!(r.leaks.is_empty() && r.corruptions.is_empty(), "{r:?}");
    // The 2 MiB the snapshot alone held are free: new data reuses them.
    o.write(2 * MIB, vec![0x43; 2 * MIB as usize - 65536]);
    o.close();
    assert_clean(&img);
    assert!(std::fs::metadata(&img).unwrap().len() <= grown);
    let mut want = vec![0x42u8; 2 * MIB as usize];
    want.extend(vec![0x43u8; 2 * MIB as usize - 65536]);
    want.extend(vec![0u8; 65536]);
    assert_eq!(to_raw(&img, dir.path()), want);
}

#[test]
fn compressed_clusters_are_shared_and_copied() {
    let dir = tmp();
    let src = populated(dir.path(), "src.qcow2", "");
    let img = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&src), p(&img)]);
    let before = to_raw(&img, dir.path());
    let o = Img::open(&img, false);
    o.snap("c").unwrap();
    overwrite(&o);
    let after = o.read_all();
    o.close();
    assert_clean(&img);
    assert_eq!(to_raw(&img, dir.path()), after);
    assert_eq!(qemu_view_of_snapshot(&img, "c"), before);
    let o = Img::open(&img, false);
    o.delete(SnapshotRef::IdOrName("1".into())).unwrap();
    o.close();
    assert_clean(&img);
}

#[test]
fn refcount_widths_hold_snapshots_until_full() {
    let dir = tmp();
    for bits in [2u32, 8, 64] {
        let img = populated(
            dir.path(),
            &format!("w{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
        );
        let v0 = to_raw(&img, dir.path());
        let o = Img::open(&img, false);
        o.snap("a").unwrap();
        o.write(0, vec![0x61; 4096]);
        o.snap("b").unwrap();
        if bits == 2 {
            // Refcount 3 is the most 2 bits hold: a third snapshot of
            // clusters already shared three ways is refused.
            let e = o.snap("c").unwrap_err();
            assert!(e.to_string().contains("would exceed 3"), "{e}");
            // Reverting needs one more reference first (as in QEMU): also
            // refused until a snapshot is deleted.
            assert!(o.goto("a").is_err());
            o.delete(SnapshotRef::Name("b".into())).unwrap();
        }
        o.close();
        assert_clean(&img);
        assert_eq!(qemu_view_of_snapshot(&img, "a"), v0, "refcount_bits={bits}");
    }
    // 1-bit refcounts cannot share at all: refused, nothing changed.
    let img = populated(dir.path(), "w1.qcow2", "refcount_bits=1");
    let bytes = std::fs::read(&img).unwrap();
    let o = Img::open(&img, false);
    assert!(matches!(o.snap("x"), Err(Error::Unsupported { .. })));
    o.close();
    assert_eq!(std::fs::read(&img).unwrap(), bytes);
}

#[test]
fn errors_change_nothing_on_disk() {
    let dir = tmp();
    let img = populated(dir.path(), "e.qcow2", "");
    qemu_img(&["snapshot", "-c", "taken", p(&img)]);
    let bytes = std::fs::read(&img).unwrap();
    let o = Img::open(&img, false);
    let e = o.snap("taken").unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(o.snap("").is_err());
    assert!(o.goto("nope").is_err());
    let e = o.delete(SnapshotRef::Name("nope".into())).unwrap_err();
    assert!(
        e.to_string().contains("no snapshot with name 'nope'"),
        "{e}"
    );
    let e = o
        .delete(SnapshotRef::IdAndName {
            id: "1".into(),
            name: "other".into(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("id '1' and name 'other'"), "{e}");
    o.close();
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "read-write open");
    let o = Img::open(&img, true);
    assert!(matches!(o.snap("new"), Err(Error::Permission { .. })));
    assert!(matches!(
        o.delete(SnapshotRef::Name("taken".into())),
        Err(Error::Permission { .. })
    ));
    assert!(o.goto("taken").is_err());
    assert_eq!(o.list().len(), 1);
    o.close();
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "read-only open");
    // A raw image has no snapshots.
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let o = Img::open(&raw, false);
    let e = o.snap("x").unwrap_err();
    assert!(
        e.to_string()
            .contains("does not support internal snapshots"),
        "{e}"
    );
    o.close();
}

#[test]
fn corrupt_snapshot_table_is_an_error_not_a_panic() {
    let dir = tmp();
    let img = populated(dir.path(), "t.qcow2", "");
    qemu_img(&["snapshot", "-c", "one", p(&img)]);
    let mut b = std::fs::read(&img).unwrap();
    let off = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    // extra_data_size far beyond QEMU's limit.
    b[off + 36..off + 40].copy_from_slice(&100_000u32.to_be_bytes());
    let bad = dir.path().join("bad.qcow2");
    std::fs::write(&bad, &b).unwrap();
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let e = ctx
        .block_on(g.open_image(&bad, &OpenOptions::new().read_only(true)))
        .unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("Too much extra metadata"), "{e}");
    // A count past the end of the file.
    let mut b = std::fs::read(&img).unwrap();
    b[60..64].copy_from_slice(&5000u32.to_be_bytes());
    std::fs::write(&bad, &b).unwrap();
    let e = ctx
        .block_on(g.open_image(&bad, &OpenOptions::new().read_only(true)))
        .unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
}

#[test]
fn aio_img_snapshot_matches_qemu_img() {
    let dir = tmp();
    let img = populated(dir.path(), "cli.qcow2", "");
    let v0 = to_raw(&img, dir.path());
    assert_eq!(
        aio_img(&["snapshot", "-l", p(&img)]),
        (0, String::new(), String::new())
    );
    assert_eq!(aio_img(&["snapshot", "-c", "first", p(&img)]).0, 0);
    qemu_img(&["snapshot", "-c", "second one, longer than sixteen", p(&img)]);
    qemu_io(&img, &["write -P 0x77 0 64k".into()]);
    let (code, out, _) = aio_img(&["snapshot", "-l", p(&img)]);
    assert_eq!(code, 0);
    assert_eq!(out, qemu_img(&["snapshot", "-l", p(&img)]));
    // `info` lists them too: the same table, and the same JSON array.
    let (code, info, _) = aio_img(&["info", p(&img)]);
    assert_eq!(code, 0);
    assert!(info.contains(&out), "{info}");
    let (code, ours, _) = aio_img(&["info", "--output=json", p(&img)]);
    assert_eq!(code, 0);
    let ours: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", p(&img)])).unwrap();
    assert_eq!(ours["snapshots"].as_array().map(Vec::len), Some(2));
    assert_eq!(ours["snapshots"], theirs["snapshots"]);
    assert_eq!(ours["dirty-flag"], theirs["dirty-flag"]);
    let (code, _, err) = aio_img(&["snapshot", "-c", "first", p(&img)]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("aio-img: Could not create snapshot 'first': "),
        "{err}"
    );
    let (code, _, err) = aio_img(&["snapshot", "-a", "missing", p(&img)]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("aio-img: Could not apply snapshot 'missing': "),
        "{err}"
    );
    assert_eq!(aio_img(&["snapshot", "-a", "1", p(&img)]).0, 0);
    assert_eq!(to_raw(&img, dir.path()), v0);
    assert_eq!(aio_img(&["snapshot", "-d", "first", p(&img)]).0, 0);
    assert_clean(&img);
    let l = qemu_img(&["snapshot", "-l", p(&img)]);
    assert!(!l.contains(" first ") && l.contains("second one"), "{l}");
    assert_eq!(aio_img(&["snapshot", "-l", "-c", "x", p(&img)]).0, 1);
}
