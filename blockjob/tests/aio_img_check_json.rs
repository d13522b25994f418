//! `aio-img check --output=json` against `qemu-img check --output=json`
//! on the same images: clean, leaky, corrupt, fragmented, compressed
//! (`qemu-img convert -c`) and after `-r leaks` / `-r all`. Stdout must
//! be byte-identical (QEMU's key order and optional keys) and the exit
//! codes equal; the human summary too.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `qemu-img ARGS`: (exit code, stdout).
fn qemu_img_out(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `qemu-img create -f qcow2 -o OPTS IMG 1M`.
fn create_with(img: &Path, opts: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(img), "1M"]);
}

/// A 1 MiB qcow2 image, 4 KiB clusters, 16-bit refcounts, whose guest
/// clusters are written out of order (fragmented).
fn fragmented(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    create_with(&img, "cluster_size=4096");
    qemu_io(
        &img,
        &[
            "write -P 1 8k 4k".into(),
            "write -P 2 0 4k".into(),
            "write -P 3 64k 8k".into(),
            "write -P 4 32k 4k".into(),
        ],
    );
    img
}

fn cluster_size(img: &Path) -> usize {
    let b = std::fs::read(img).expect("read");
    1 << u32::from_be_bytes([b[20], b[21], b[22], b[23]])
}

/// The byte offset of cluster `c`'s 16-bit refcount.
fn refcount_at(img: &Path, c: usize) -> usize {
    let b = std::fs::read(img).expect("read");
    let rt = be64(&b, 48) as usize;
    let rb = be64(&b, rt) as usize;
    assert!(c * 2 < cluster_size(img), "cluster outside the first block");
    rb + c * 2
}

/// Appends two clusters with refcount 1 that nothing references.
fn leak(img: &Path) {
    let cs = cluster_size(img);
    let len = std::fs::metadata(img).expect("metadata").len() as usize;
    let n = len.div_ceil(cs);
    patch(img, (n + 2) * cs - 1, &[0]);
    for c in [n, n + 1] {
        patch(img, refcount_at(img, c), &1u16.to_be_bytes());
    }
}

/// Zeroes the refcount of the data cluster guest offset 0 maps to.
fn corrupt(img: &Path) {
    let map = qemu_map(img);
    let off = map[0]["offset"].as_u64().expect("guest 0 allocated") as usize;
    patch(img, refcount_at(img, off / cluster_size(img)), &[0, 0]);
}

/// `TOOL check ARGS` on a fresh copy of `img`: (exit code, stdout).
fn check_copy(img: &Path, tool: &str, args: &[&str]) -> (i32, String) {
    let copy = img.parent().expect("dir").join("copy.qcow2");
    std::fs::copy(img, &copy).expect("copy");
    let mut a: Vec<&str> = vec!["check"];
    a.extend_from_slice(args);
    a.push(p(&copy));
    let r = if tool == "qemu-img" {
        qemu_img_out(&a)
    } else {
        let (c, out, _) = aio_img(&a);
        (c, out)
    };
    std::fs::remove_file(&copy).expect("remove copy");
    r
}

/// Runs both tools with `args` on a fresh copy of `img` each and
/// compares stdout and exit codes.
fn same(img: &Path, args: &[&str]) -> i32 {
    let (qc, qout) = check_copy(img, "qemu-img", args);
    let (ac, aout) = check_copy(img, "aio-img", args);
    assert_eq!(
        (ac, aout.as_str()),
        (qc, qout.as_str()),
        "check {args:?} of {}: ours vs QEMU's",
        img.display()
    );
    qc
}

fn both_outputs(img: &Path) -> i32 {
    let c = same(img, &["--output=json"]);
    same(img, &[]);
    c
}

#[test]
fn check_json_clean_fragmented() {
    let dir = tmp();
    let img = fragmented(dir.path(), "clean.qcow2");
    assert_eq!(both_outputs(&img), 0);
    let (_, out) = qemu_img_out(&["check", "--output=json", p(&img)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(v["fragmented-clusters"].as_u64().unwrap_or(0) > 0, "{out}");
    assert!(v.get("leaks").is_none() && v.get("corruptions").is_none());
}

#[test]
fn check_json_leaky() {
    let dir = tmp();
    let img = fragmented(dir.path(), "leaky.qcow2");
    leak(&img);
    assert_eq!(both_outputs(&img), 3);
    // Repaired: the second check's counts with the first one's leaks-fixed.
    assert_eq!(same(&img, &["-r", "leaks", "--output=json"]), 0);
    assert_eq!(same(&img, &["-r", "all", "--output=json"]), 0);
}

#[test]
fn check_json_corrupt() {
    let dir = tmp();
    let img = fragmented(dir.path(), "corrupt.qcow2");
    corrupt(&img);
    assert_eq!(both_outputs(&img), 2);
    // -r leaks cannot repair a refcount below the references (QEMU:
    // "need to rebuild refcount structures", check failed, no JSON);
    // -r all does.
    assert_eq!(same(&img, &["-r", "leaks", "--output=json"]), 1);
    assert_eq!(same(&img, &["-r", "all", "--output=json"]), 0);
    leak(&img);
    assert_eq!(both_outputs(&img), 2);
    // Rebuilding the refcount structure: ours goes after everything in
    // use (so a crash during the rebuild leaves the old one intact);
    // QEMU's reuses the leaked clusters. Only the end offset differs.
    let (qc, qout) = check_copy(&img, "qemu-img", &["-r", "all", "--output=json"]);
    let (ac, aout) = check_copy(&img, "aio-img", &["-r", "all", "--output=json"]);
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).expect("json");
        let end = v["image-end-offset"].as_u64().expect("end offset");
        v.as_object_mut()
            .expect("object")
            .remove("image-end-offset");
        (v, end)
    };
    let ((qv, qend), (av, aend)) = (strip(&qout), strip(&aout));
    assert_eq!((ac, av), (qc, qv));
    assert!(aend >= qend);
}

#[test]
fn check_json_compressed() {
    let dir = tmp();
    let src = fragmented(dir.path(), "src.qcow2");
    let img = dir.path().join("compressed.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&src), p(&img)]);
    assert_eq!(both_outputs(&img), 0);
    let (_, out) = qemu_img_out(&["check", "--output=json", p(&img)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(v["compressed-clusters"].as_u64().unwrap_or(0) > 0, "{out}");
    // Compressed with 512 B clusters: many clusters per host cluster.
    let small = dir.path().join("compressed-512.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&src),
        p(&small),
    ]);
    assert_eq!(both_outputs(&small), 0);
}

#[test]
fn check_json_bad_output_format_is_an_error() {
    let dir = tmp();
    let img = fragmented(dir.path(), "img.qcow2");
    let (code, out, err) = aio_img(&["check", "--output=xml", p(&img)]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--output"), "{err}");
}

/// Snapshots, a persistent bitmap, zero and discarded clusters, and
/// extended L2 entries: still QEMU's counts.
#[test]
fn check_json_snapshots_bitmaps_extended_l2() {
    let dir = tmp();
    let img = fragmented(dir.path(), "snap.qcow2");
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    qemu_io(
        &img,
        &[
            "write -P 9 8k 16k".into(),
            "write -z 32k 8k".into(),
            "discard 64k 4k".into(),
        ],
    );
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    assert_eq!(both_outputs(&img), 0);
    let ext = dir.path().join("ext.qcow2");
    create_with(&ext, "cluster_size=16384,extended_l2=on");
    qemu_io(
        &ext,
        &[
            "write -P 1 1k 2k".into(),
            "write -P 2 64k 17k".into(),
            "write -P 3 512k 64k".into(),
            "write -P 4 200k 32k".into(),
        ],
    );
    assert_eq!(both_outputs(&ext), 0);
}
