//! qcow2 repair: `aio-img check -r leaks|all` against `qemu-img check -r`
//! on the same damaged images, and dirty images repaired on a read-write
//! open. Damage is made by patching refcount entries and L2 entries at the
//! offsets the header gives, and by a crashed `qemu-io` writer with lazy
//! refcounts (`abort`).

mod common;

use common::*;

use std::path::{Path, PathBuf};

use blockjob::block::{BlockGraph, CheckOptions, OpenOptions};

const CS: usize = 65536;

/// Offsets read from an image: first refcount block, L1 table, first L2
/// table, and the file length.
struct Layout {
    refblock: usize,
    l2: usize,
    len: usize,
}

fn layout(img: &Path) -> Layout {
    let b = std::fs::read(img).unwrap();
    let rt = be64(&b, 48) as usize;
    let l1 = be64(&b, 40) as usize;
    Layout {
        refblock: be64(&b, rt) as usize,
        l2: (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize,
        len: b.len(),
    }
}

/// Sets cluster `c`'s 16-bit refcount.
fn set_rc(img: &Path, c: usize, v: u16) {
    let l = layout(img);
    patch(img, l.refblock + 2 * c, &v.to_be_bytes());
}

/// A 4 MiB image with data at 0..256k and 1M..1M+64k, written by qemu-io.
fn base(dir: &Path) -> PathBuf {
    let img = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    qemu_io(
        &img,
        &["write -P 0xaa 0 256k".into(), "write -P 0xbb 1M 64k".into()],
    );
    img
}

fn copy(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// The lines of a check's stdout that say what was repaired and what the
/// result is, and its exit code.
fn summary(code: i32, out: &str) -> (i32, Vec<String>) {
    let keep = [
        "leaked clusters",
        "corruptions",
        "errors were found",
        "No errors",
        "Double checking",
        "Image end offset",
    ];
    let lines = out
        .lines()
        .filter(|l| keep.iter().any(|k| l.contains(k)))
        .map(str::to_string)
        .collect();
    (code, lines)
}

/// Repairs copies of `damaged` with qemu-img and with aio-img in `mode`;
/// asserts the same exit code and summary lines, and, when both succeed,
/// that qemu-img finds our result clean with the guest contents of
/// `reference` unchanged. Returns our stderr.
fn repair_both(damaged: &Path, reference: &Path, mode: &str) -> String {
    let dir = damaged.parent().unwrap();
    let theirs = copy(damaged, dir, &format!("theirs-{mode}.qcow2"));
    let ours = copy(damaged, dir, &format!("ours-{mode}.qcow2"));
    let (qc, qout) = qemu_img_status(&["check", "-r", mode, p(&theirs)]);
    let (c, out, err) = aio_img(&["check", "-r", mode, p(&ours)]);
    assert!(!err.contains("panicked"), "{err}");
    let (qc, qs) = summary(qc, &qout);
    let (c, s) = summary(c, &out);
    assert_eq!(c, qc, "exit code: qemu {qout}\nours {out}{err}");
    // The image end differs where QEMU leaves the old refcount structure
    // in place after a rebuild; compare it only for in-place repairs.
    let strip = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .filter(|l| !l.starts_with("Image end offset"))
            .collect()
    };
    assert_eq!(strip(s), strip(qs), "qemu {qout}\nours {out}{err}");
    if c == 0 {
        let (k, text) = qemu_img_status(&["check", p(&ours)]);
        assert_eq!(k, 0, "qemu-img check after our repair: {text}");
        let (k, text) = qemu_img_status(&["compare", p(reference), p(&ours)]);
        assert_eq!(k, 0, "guest contents changed: {text}");
    }
    err
}

#[test]
fn repair_leaks_when_refcounts_too_high_then_counts_match_qemu() {
    let d = tmp();
    let img = base(d.path());
    let bad = copy(&img, d.path(), "bad.qcow2");
    // Data clusters 6 and 7 (second and third of the first write).
    set_rc(&bad, 6, 3);
    set_rc(&bad, 7, 2);
    let err = repair_both(&bad, &img, "leaks");
    assert!(
        err.contains("Repairing cluster 6 refcount=3 reference=1"),
        "{err}"
    );
    let err = repair_both(&bad, &img, "all");
    assert!(
        err.contains("Repairing cluster 7 refcount=2 reference=1"),
        "{err}"
    );
    // Without -r: exit 2 (COPIED flags wrong while refcounts are > 1).
    assert_eq!(qemu_img_status(&["check", p(&bad)]).0, 2);
    assert_eq!(aio_img(&["check", p(&bad)]).0, 2);
}

#[test]
fn repair_leaks_when_unused_cluster_counted_then_freed() {
    let d = tmp();
    let img = base(d.path());
    let bad = copy(&img, d.path(), "bad.qcow2");
    // A cluster appended to the file that nothing references.
    let end = layout(&bad).len / CS;
    patch(&bad, (end + 1) * CS - 1, &[0]);
    set_rc(&bad, end, 1);
    let err = repair_both(&bad, &img, "leaks");
    assert!(
        err.contains(&format!("Leaked cluster {end} refcount=1 reference=0")),
        "{err}"
    );
}

#[test]
fn repair_when_referenced_cluster_has_refcount_zero_then_rebuild_only_with_all() {
    let d = tmp();
    let img = base(d.path());
    let bad = copy(&img, d.path(), "bad.qcow2");
    let l2_cluster = layout(&bad).l2 / CS;
    set_rc(&bad, l2_cluster, 0);
    set_rc(&bad, 6, 3);
    // -r leaks cannot: both fail with exit 1.
    let (c, _, err) = aio_img(&["check", "-r", "leaks", p(&copy(&bad, d.path(), "x.qcow2"))]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("need to rebuild refcount structures"), "{err}");
    let err = repair_both(&bad, &img, "leaks");
    assert!(err.contains("need to rebuild"), "{err}");
    let err = repair_both(&bad, &img, "all");
    assert!(err.contains("Rebuilding refcount structure"), "{err}");
}

#[test]
fn repair_all_when_refcount_below_snapshot_references_then_raised_in_place() {
    let d = tmp();
    let img = base(d.path());
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    let bad = copy(&img, d.path(), "bad.qcow2");
    // Cluster 6 is shared by the snapshot (refcount 2); say 1.
    set_rc(&bad, 6, 1);
    let err = repair_both(&bad, &img, "all");
    assert!(
        err.contains("Repairing cluster 6 refcount=1 reference=2"),
        "{err}"
    );
    // -r leaks leaves the corruption: exit 2 from the double check.
    repair_both(&bad, &img, "leaks");
}

#[test]
fn repair_all_when_copied_flag_wrong_then_fixed() {
    let d = tmp();
    let img = base(d.path());
    let bad = copy(&img, d.path(), "bad.qcow2");
    // Clear COPIED (bit 63) on the first L2 entry.
    let l2 = layout(&bad).l2;
    let b = std::fs::read(&bad).unwrap();
    let e = be64(&b, l2) & !(1 << 63);
    patch(&bad, l2, &e.to_be_bytes());
    assert_eq!(aio_img(&["check", p(&bad)]).0, 2);
    let err = repair_both(&bad, &img, "all");
    assert!(err.contains("Repairing OFLAG_COPIED data cluster"), "{err}");
}

/// An image a lazy-refcounts writer crashed on (`qemu-io ... abort`):
/// dirty bit set, data clusters with refcount 0.
fn crashed(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("crashed.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p(&img),
        "4M",
    ]);
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x11 0 1M", "-c", "abort", p(&img)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io abort must crash");
    let b = std::fs::read(&img).unwrap();
    assert_eq!(b[79] & 1, 1, "dirty bit left by the crash");
    assert_eq!(qemu_img_status(&["check", p(&img)]).0, 2);
    // The reference contents: a clean image with the same data.
    let reference = dir.join("ref.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&reference), "4M"]);
    qemu_io(&reference, &["write -P 0x11 0 1M".into()]);
    (img, reference)
}

#[test]
fn repair_all_when_writer_crashed_with_lazy_refcounts_then_matches_qemu() {
    let d = tmp();
    let (img, reference) = crashed(d.path());
    repair_both(&img, &reference, "all");
}

#[test]
fn open_read_write_when_dirty_then_repaired_and_clean_after_close() {
    let d = tmp();
    let (img, reference) = crashed(d.path());
    // Read-only: opened as is, nothing written.
    let before = std::fs::read(&img).unwrap();
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = open_ro(&ctx, &g, &img);
    assert_eq!(
        ctx.block_on(n.read(0, vec![0; 4096])).unwrap(),
        vec![0x11; 4096]
    );
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), before, "read-only open wrote");
    // Read-write: repaired on open; a write allocates without clobbering.
    let g = BlockGraph::new();
    let n = ctx
        .block_on(g.open_image(&img, &OpenOptions::new()))
        .unwrap();
    let r = ctx.block_on(n.check()).unwrap().unwrap();
    assert!(r.corruptions.is_empty() && r.leaks.is_empty(), "{r:?}");
    ctx.block_on(n.write(2 << 20, vec![0x22; 65536])).unwrap();
    ctx.block_on(g.close_all()).unwrap();
    let (c, text) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(c, 0, "{text}");
    qemu_io(&reference, &["write -P 0x22 2M 64k".into()]);
    let (c, text) = qemu_img_status(&["compare", p(&reference), p(&img)]);
    assert_eq!(c, 0, "{text}");
    let b = std::fs::read(&img).unwrap();
    assert_eq!(b[79] & 1, 0, "dirty bit cleared on close");
}

#[test]
fn open_read_write_when_unknown_or_corrupt_bit_then_refused() {
    let d = tmp();
    let img = base(d.path());
    let ctx = aio::AioContext::new().unwrap();
    let unknown = copy(&img, d.path(), "unknown.qcow2");
    patch(&unknown, 72, &(1u64 << 40 | 1).to_be_bytes());
    let g = BlockGraph::new();
    let e = ctx
        .block_on(g.open_image(&unknown, &OpenOptions::new()))
        .unwrap_err();
    assert!(e.to_string().contains("Unsupported qcow2 feature"), "{e}");
    let corrupt = copy(&img, d.path(), "corrupt.qcow2");
    patch(&corrupt, 72, &3u64.to_be_bytes());
    let before = std::fs::read(&corrupt).unwrap();
    let e = ctx
        .block_on(g.open_image(&corrupt, &OpenOptions::new()))
        .unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    assert!(ctx
        .block_on(g.open_image(&corrupt, &OpenOptions::new().read_only(true)))
        .is_ok());
    assert_eq!(std::fs::read(&corrupt).unwrap(), before, "image untouched");
}

#[test]
fn check_repair_on_read_only_node_is_refused() {
    let d = tmp();
    let img = base(d.path());
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = open_ro(&ctx, &g, &img);
    let e = ctx
        .block_on(n.check_repair(&CheckOptions::all()))
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}

/// Random damage to the refcount block and table: `check -r all` either
/// repairs (qemu-img then finds the image clean, contents unchanged) or
/// fails with a one-line error; never a panic.
#[test]
fn random_refcount_damage_is_repaired_or_refused_never_panics() {
    let d = tmp();
    let img = base(d.path());
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    qemu_io(&img, &["write -P 0xcc 64k 64k".into()]);
    let l = layout(&img);
    let rt = be64(&std::fs::read(&img).unwrap(), 48) as usize;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut repaired, mut refused) = (0, 0);
    for case in 0..24 {
        let bad = copy(&img, d.path(), &format!("fuzz{case}.qcow2"));
        let hits = 1 + rng.below(4);
        for _ in 0..hits {
            match rng.below(8) {
                // A refcount entry among the used clusters.
                0..=4 => {
                    let c = rng.below((l.len / CS) as u64 + 2) as usize;
                    let v = [0u16, 1, 2, 3, 0xffff][rng.below(5) as usize];
                    // At the original block: the table entry may be hit too.
                    patch(&bad, l.refblock + 2 * c, &v.to_be_bytes());
                }
                // A random byte in the refcount block.
                5 | 6 => {
                    let off = l.refblock + rng.below(256) as usize;
                    patch(&bad, off, &[rng.next() as u8]);
                }
                // The refcount table entry: unaligned or past the end.
                _ => {
                    let v = if rng.below(2) == 0 {
                        l.refblock as u64 + 512
                    } else {
                        1 << 40
                    };
                    patch(&bad, rt, &v.to_be_bytes());
                }
            }
        }
        let (c, out, err) = aio_img(&["check", "-r", "all", p(&bad)]);
        assert!(
            !err.contains("panicked") && c != 101,
            "case {case}: {out}{err}"
        );
        match c {
            0 => {
                repaired += 1;
                let (k, text) = qemu_img_status(&["check", p(&bad)]);
                assert_eq!(
                    k, 0,
                    "case {case}: qemu-img after repair: {text}\nours: {err}"
                );
                let (k, text) = qemu_img_status(&["compare", p(&img), p(&bad)]);
                assert_eq!(k, 0, "case {case}: contents changed: {text}");
            }
            1..=3 => refused += 1,
            _ => panic!("case {case}: exit {c}: {out}{err}"),
        }
    }
    eprintln!("{repaired} repaired, {refused} refused");
    assert!(repaired > 0, "no case was repaired ({refused} refused)");
}
