//! The `aio-img` tool against `qemu-img`: map output identical, check
//! exit codes, and bad input as one-line errors with exit code 1.

mod common;
use common::*;

use std::path::Path;

use blockjob::block::{BlockGraph, OpenOptions};

/// A chain of `depth` images with cluster size `cs`, written by qemu-io.
fn chain(dir: &Path, depth: usize, cs: u64) -> std::path::PathBuf {
    let mut prev: Option<String> = None;
    let mut top = dir.to_path_buf();
    for i in 0..depth {
        let name = format!("c{i}.qcow2");
        let img = dir.join(&name);
        let o = format!("cluster_size={cs}");
        let size = format!("{}", (3 + i as u64) << 20);
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
        if let Some(b) = &prev {
            args.extend(["-b", b.as_str(), "-F", "qcow2"]);
        }
        args.extend([p(&img), size.as_str()]);
        qemu_img(&args);
        let k = i as u64;
        qemu_io(
            &img,
            &[
                format!("write -P {} {} 100000", k + 1, k * 400_000),
                format!("write -z {} 70000", 1_500_000 + k * 100_000),
                format!("write -P 9 {} 512", 2_500_000 + k * 4096),
                format!("discard {} 200000", k * 400_000 + 50_000),
            ],
        );
        prev = Some(name);
        top = img;
    }
    top
}

fn assert_same_map(img: &Path) {
    let theirs = qemu_img(&["map", "--output=json", p(img)]);
    let (code, ours, err) = aio_img(&["map", "--output=json", p(img)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ours, theirs, "map of {}", img.display());
}

#[test]
fn map_json_equals_qemu_cs512_depth1() {
    let d = tmp();
    assert_same_map(&chain(d.path(), 1, 512));
}

#[test]
fn map_json_equals_qemu_cs64k_depth2() {
    let d = tmp();
    assert_same_map(&chain(d.path(), 2, 65536));
}

#[test]
fn map_json_equals_qemu_cs2m_depth3() {
    let d = tmp();
    assert_same_map(&chain(d.path(), 3, 2 << 20));
}

#[test]
fn map_json_equals_qemu_cs64k_depth4() {
    let d = tmp();
    assert_same_map(&chain(d.path(), 4, 65536));
}

#[test]
fn map_json_equals_qemu_compressed() {
    let d = tmp();
    let src = chain(d.path(), 1, 65536);
    let comp = d.path().join("comp.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&src), p(&comp)]);
    assert_same_map(&comp);
}

#[test]
fn created_by_aio_img_and_written_matches_qemu_map_and_check() {
    let d = tmp();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    let (c, _, e) = aio_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&base),
        "2M",
    ]);
    assert_eq!(c, 0, "{e}");
    qemu_io(&base, &["write -P 1 0 1M".into()]);
    let (c, _, e) = aio_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    assert_eq!(c, 0, "{e}");
    let info = qemu_img(&["info", "--output=json", p(&top)]);
    assert!(info.contains("\"virtual-size\": 2097152"), "{info}");
    assert!(
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
    qemu_io(&top, &["write -P 2 100000 300000".into()]);
    assert_same_map(&top);
    let (c, out, _) = aio_img(&["check", p(&top)]);
    assert_eq!(c, 0, "{out}");
    let (c, out, _) = aio_img(&["compare", p(&top), p(&top)]);
    assert_eq!((c, out.trim()), (0, "Images are identical."));
    let (c, out, _) = aio_img(&["compare", p(&top), p(&base)]);
    assert_eq!(c, 1, "{out}");
    assert!(
        out.starts_with("Content mismatch at offset 100000!"),
        "{out}"
    );
    let (c, out, _) = aio_img(&["info", "--backing-chain", "--output=json", p(&top)]);
    assert_eq!(c, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(|a| a.len()), Some(2));
}

#[test]
fn check_exit_codes_match_qemu_for_leaks_and_corruption() {
    let d = tmp();
    let img = d.path().join("x.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    qemu_io(&img, &["write -P 1 0 64k".into()]);
    let (c, _, _) = aio_img(&["check", p(&img)]);
    assert_eq!(c, 0);
    // Leak: refcount 1 for a cluster appended to the file that nothing uses.
    let b = std::fs::read(&img).unwrap();
    let rb = be64(&b, be64(&b, 48) as usize) as usize;
    let leak = d.path().join("leak.qcow2");
    std::fs::copy(&img, &leak).unwrap();
    let end = b.len() / 65536;
    patch(&leak, (end + 1) * 65536 - 1, &[0]);
    patch(&leak, rb + end * 2, &1u16.to_be_bytes());
    assert_eq!(qemu_img_status(&["check", p(&leak)]).0, 3);
    let (c, out, err) = aio_img(&["check", p(&leak)]);
    assert_eq!(c, 3, "{out}");
    // The findings go to stderr, as qemu-img prints them.
    assert!(
        err.contains(&format!("Leaked cluster {end} refcount=1 reference=0")),
        "{err}"
    );
    // Corruption: the data cluster's refcount dropped to 0.
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(&b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let bad = d.path().join("bad.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    patch(&bad, rb + data / 65536 * 2, &0u16.to_be_bytes());
    assert_eq!(qemu_img_status(&["check", p(&bad)]).0, 2);
    let (c, out, err) = aio_img(&["check", p(&bad)]);
    assert_eq!(c, 2, "{out}");
    assert!(
        err.contains(&format!(
            "ERROR cluster {} refcount=0 reference=1",
            data / 65536
        )),
        "{err}"
    );
}

/// Asserts a one-line error naming `file` and containing `want`, exit 1.
fn assert_bad(args: &[&str], file: &Path, want: &str) {
    let (c, _, err) = aio_img(args);
    assert_eq!(c, 1, "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(p(file)) || err.contains(file.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    assert!(err.contains(want), "want {want:?}, got {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_headers_give_qemus_error_texts() {
    let d = tmp();
    let good = d.path().join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&good), "1M"]);
    let cases: &[(&str, usize, Vec<u8>, &str)] = &[
        (
            "version",
            4,
            99u32.to_be_bytes().to_vec(),
            "Unsupported qcow2 version 99",
        ),
        (
            "cluster_bits",
            20,
            40u32.to_be_bytes().to_vec(),
            "Unsupported cluster size: 2^40",
        ),
        (
            "l1_offset",
            40,
            0x30001u64.to_be_bytes().to_vec(),
            "Active L1 table offset invalid",
        ),
        (
            "l1_size",
            36,
            0x1000_0000u32.to_be_bytes().to_vec(),
            "Active L1 table too large",
        ),
        (
            "refcount_offset",
            48,
            0x10001u64.to_be_bytes().to_vec(),
            "Reference count table offset invalid",
        ),
        (
            "incompat",
            72,
            (1u64 << 40).to_be_bytes().to_vec(),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000",
        ),
    ];
    for (name, off, bytes, want) in cases {
        let f = d.path().join(format!("bad-{name}.qcow2"));
        std::fs::copy(&good, &f).unwrap();
        patch(&f, *off, bytes);
        let (qc, qerr) = qemu_img_status(&["info", p(&f)]);
        assert_eq!(qc, 1);
        assert!(qerr.contains(want), "qemu says {qerr}");
        assert_bad(&["info", p(&f)], &f, want);
        assert_bad(&["map", "--output=json", p(&f)], &f, want);
    }
    // Truncated.
    let f = d.path().join("trunc.qcow2");
    std::fs::write(&f, &std::fs::read(&good).unwrap()[..50]).unwrap();
    assert_bad(&["info", p(&f)], &f, "qcow2 header too short");
    // Missing.
    let f = d.path().join("missing.qcow2");
    assert_bad(&["info", p(&f)], &f, "No such file or directory");
    // Bad magic with an explicit format, and the corrupt bit on a read-write open.
    let ctx = aio::AioContext::new().unwrap();
    let f = d.path().join("magic.qcow2");
    std::fs::copy(&good, &f).unwrap();
    patch(&f, 0, b"XXXX");
    let g = BlockGraph::new();
    let e = ctx
        .block_on(g.open_image(&f, &OpenOptions::new().read_only(true).format("qcow2")))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Could not open '{}': Image is not in qcow2 format", p(&f))
    );
    let f = d.path().join("corrupt.qcow2");
    std::fs::copy(&good, &f).unwrap();
    patch(&f, 79, &[2]);
    let e = ctx
        .block_on(g.open_image(&f, &OpenOptions::new()))
        .unwrap_err();
    assert!(
        e.to_string()
            .ends_with("qcow2: Image is corrupt; cannot be opened read/write"),
        "{e}"
    );
    ctx.block_on(g.open_image(&f, &OpenOptions::new().read_only(true)))
        .unwrap();
}

#[test]
fn backing_loop_is_an_error() {
    let d = tmp();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&b), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        p(&a),
    ]);
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b)]);
    assert_bad(&["info", "--backing-chain", p(&a)], &a, "Backing file loop");
}

#[test]
fn l2_entry_past_end_of_file_is_an_error_without_writes() {
    let d = tmp();
    let img = d.path().join("l2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    qemu_io(&img, &["write -P 1 0 64k".into()]);
    let b = std::fs::read(&img).unwrap();
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    patch(&img, l2, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let before = std::fs::read(&img).unwrap();
    assert_bad(
        &["map", "--output=json", p(&img)],
        &img,
        "past the end of the file",
    );
    let (c, _, err) = aio_img(&["compare", p(&img), p(&img)]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("past the end of the file"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "nothing written");
}

#[test]
fn fuzzed_headers_and_tables_error_never_panic_never_write() {
    let d = tmp();
    let img = d.path().join("f.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&img),
        "256k",
    ]);
    // Persistent bitmaps: QEMU stores their directory, tables and data at
    // the end of the file when qemu-io closes the image.
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", p(&img), "b1"]);
    qemu_io(
        &img,
        &[
            "write -P 1 0 20k".into(),
            "write -z 64k 4k".into(),
            "write -P 3 100k 1k".into(),
        ],
    );
    let good = std::fs::read(&img).unwrap();
    let ctx = aio::AioContext::new().unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let meta_len = good.len().min(8 * 512);
    let f = d.path().join("m.qcow2");
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..(next() % 6 + 1) {
            let i = (next() % meta_len as u64) as usize;
            // The header and first tables, or the last 8 clusters.
            let i = if next() % 2 == 0 {
                i
            } else {
                good.len() - 1 - i
            };
            b[i] = next() as u8;
        }
        std::fs::write(&f, &b).unwrap();
        let g = BlockGraph::new();
        if let Ok(n) = ctx.block_on(g.open_image(&f, &OpenOptions::new().read_only(true))) {
            let len = n.len().min(1 << 20);
            let _ = ctx.block_on(n.read(0, vec![0; len as usize]));
            if n.len() <= 1 << 30 {
                let _ = ctx.block_on(n.map());
            }
            let _ = ctx.block_on(n.check());
            let _ = ctx.block_on(g.close_all());
        }
        assert!(std::fs::read(&f).unwrap() == b, "the image was written");
    }
}

/// A reader that goes away (`aio-img ... | head -1`) ends aio-img quietly:
/// no panic message, exit status 0 (all written) or 141 (as if killed by
/// SIGPIPE).
#[test]
fn a_closed_stdout_ends_aio_img_without_a_panic() {
    for _ in 0..5 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aio-img"))
            .arg("--help")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before it writes
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            matches!(out.status.code(), Some(0 | 141)),
            "{:?}: {err}",
            out.status
        );
    }
}

#[test]
fn create_options_match_qemu_img_create() {
    let d = tmp();
    for opts in [
        "preallocation=metadata,refcount_bits=4",
        "preallocation=falloc,lazy_refcounts=on",
        "preallocation=full,cluster_size=4096",
        "extended_l2=on,cluster_size=64k",
    ] {
        let (ours, theirs) = (path(&d, "o.qcow2"), path(&d, "q.qcow2"));
        let (code, _, err) = aio_img(&["create", "-f", "qcow2", "-o", opts, p(&ours), "1M"]);
        assert_eq!(code, 0, "{opts}: {err}");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&theirs), "1M"]);
        let facts = |img: &Path| {
            let v: serde_json::Value =
                serde_json::from_str(&qemu_img(&["info", "--output=json", p(img)])).unwrap();
            (v["format-specific"].clone(), v["cluster-size"].clone())
        };
        assert_eq!(facts(&ours), facts(&theirs), "{opts}");
        let map = |img: &Path| {
            qemu_map(img)
                .iter()
                .map(|e| (e["zero"].clone(), e["data"].clone(), e["length"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(map(&ours), map(&theirs), "{opts}");
        assert_check(&ours);
        // QEMU writes the image; we read it back as QEMU does.
        qemu_io(&ours, &["write -P 0x5c 70k 200k".into()]);
        let ctx = aio::AioContext::new().unwrap();
        let g = blockjob::block::BlockGraph::new();
        let n = open_ro(&ctx, &g, &ours);
        assert_eq!(read_all(&ctx, &n, 65536), to_raw(&ours, d.path()), "{opts}");
        ctx.block_on(g.close_all()).unwrap();
    }
    let (code, _, err) = aio_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=lots",
        p(&path(&d, "x.qcow2")),
        "1M",
    ]);
    assert_eq!(
        (code, err.trim()),
        (1, "aio-img: Invalid preallocation mode: 'lots'")
    );
}

#[test]
fn map_json_equals_qemu_for_sparse_raw_and_a_qcow2_over_it() {
    let d = tmp();
    let raw = path(&d, "s.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&raw), "4M"]);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 1M 64k",
            "-c",
            "write -P 2 3M 4k",
            p(&raw),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_same_map(&raw);
    let top = path(&d, "t.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&raw),
        "-F",
        "raw",
        p(&top),
    ]);
    qemu_io(&top, &["write -P 3 2M 64k".into()]);
    assert_same_map(&top);
}
