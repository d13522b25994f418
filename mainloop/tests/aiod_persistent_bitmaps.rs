//! Persistent dirty bitmaps through `aiod`: `block-dirty-bitmap-add` with
//! `persistent: true` (and QEMU's refusals), guest writes through an NBD
//! export, a clean shutdown (SIGTERM) storing them — `qemu-img info` and
//! `check` agree, qemu-storage-daemon lists them the same way and hashes
//! the same bits (`x-debug-block-dirty-bitmap-sha256`) — and a SIGKILL
//! leaving them `in_use`, reported `inconsistent` afterwards by us as by
//! QSD.

mod util;

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use util::aiod::{qemu_img, wait_exit};
use util::{generic, wait_until, QmpClient};

const MIB: u64 = 1 << 20;

fn blockdev(name: &str, file: &Path, read_only: bool) -> String {
    json!({"driver": "qcow2", "node-name": name, "read-only": read_only,
        "file": {"driver": "file", "filename": file, "read-only": read_only}})
    .to_string()
}

/// A daemon killed if a failing test leaves it running.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `aiod` or `qemu-storage-daemon` serving QMP on `d/NAME.sock` with
/// `blockdevs`; aiod also exports `disk` writable over NBD on `d/nbd.sock`.
fn start(d: &Path, qsd: bool, blockdevs: &[String]) -> (Daemon, QmpClient) {
    let sock = d.join(if qsd { "qsd.sock" } else { "qmp.sock" });
    let _ = std::fs::remove_file(&sock);
    let mut cmd = if qsd {
        let mut c = Command::new("qemu-storage-daemon");
        c.args([
            "--chardev",
            &format!("socket,path={},server=on,wait=off,id=m0", sock.display()),
            "--monitor",
            "chardev=m0",
        ]);
        c
    } else {
        let nbd = d.join("nbd.sock");
        let _ = std::fs::remove_file(&nbd);
        let mut c = Command::new(env!("CARGO_BIN_EXE_aiod"));
        c.arg("--qmp").arg(format!("unix:{}", sock.display()));
        c.args([
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nbd.display()),
        ]);
        c
    };
    for b in blockdevs {
        cmd.args(["--blockdev", b]);
    }
    if !qsd {
        cmd.args(["--export", "type=nbd,id=e0,node-name=disk,writable=on"]);
    }
    let child = Daemon(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("QMP socket", || sock.exists());
    let mut c = QmpClient::connect_unix(&sock);
    c.negotiate();
    (child, c)
}

fn qemu_io(d: &Path, ops: &[&str]) {
    let url = format!("nbd+unix:///disk?socket={}", d.join("nbd.sock").display());
    let mut args = vec!["-f", "raw"];
    for o in ops {
        args.extend(["-c", *o]);
    }
    args.push(&url);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && !text.contains("failed"), "{text}");
}

fn bitmaps(c: &mut QmpClient, node: &str) -> Value {
    let nodes = c.ok("query-named-block-nodes", json!({}));
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .and_then(|n| n.get("dirty-bitmaps").cloned())
        .unwrap_or(Value::Null)
}

/// `qemu-img info`'s bitmaps: `[{name, granularity, flags}]` as JSON.
fn info_bitmaps(img: &Path) -> Value {
    let i: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        img.to_str().unwrap(),
    ]))
    .unwrap();
    i["format-specific"]["data"]["bitmaps"].clone()
}

fn signal(child: &Daemon, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// What `x-debug-block-dirty-bitmap-sha256` hashes: the bits as 64-bit
/// little-endian words (bit `i` = bit `i % 64` of word `i / 64`).
fn sha256_of(size: u64, gran: u64, dirty: &[(u64, u64)]) -> String {
    let nbits = size.div_ceil(gran);
    let mut words = vec![0u64; nbits.div_ceil(64) as usize];
    for &(off, len) in dirty {
        for bit in off / gran..(off + len).div_ceil(gran) {
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut p = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = p.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sha(c: &mut QmpClient, name: &str) -> String {
    let r = c.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk", "name": name}),
    );
    r["sha256"].as_str().unwrap().to_string()
}

#[test]
fn persistent_bitmaps_survive_a_clean_shutdown_and_qsd_reads_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, v2, ro, raw) = (
        d.join("q.qcow2"),
        d.join("v2.qcow2"),
        d.join("ro.qcow2"),
        d.join("r.raw"),
    );
    for (f, fmt, opts) in [
        (&img, "qcow2", ""),
        (&v2, "qcow2", "compat=0.10"),
        (&ro, "qcow2", ""),
        (&raw, "raw", ""),
    ] {
        let mut a = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([f.to_str().unwrap(), "4M"]);
        qemu_img(&a);
    }
    let raw_dev = json!({"driver": "raw", "node-name": "r",
        "file": {"driver": "file", "filename": raw}})
    .to_string();
    let devs = [
        blockdev("disk", &img, false),
        blockdev("v2", &v2, false),
        blockdev("ro", &ro, true),
        raw_dev,
    ];
    let (mut child, mut c) = start(d, false, &devs);

    let long = "x".repeat(1024);
    let add = |node: &str, name: &str| json!({"node": node, "name": name, "persistent": true});
    let cases = [
        (
            add("r", "b"),
            "Can't store persistent bitmaps to r: Operation not supported".to_string(),
        ),
        (
            add("v2", "b"),
            "Can't make bitmap 'b' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"
                .to_string(),
        ),
        (
            add("ro", "b"),
            "Can't make bitmap 'b' persistent in 'ro': No write access".to_string(),
        ),
        (
            add("disk", &long),
            format!(
                "Can't make bitmap '{long}' persistent in 'disk': Name length exceeds maximum (1023 characters)"
            ),
        ),
    ];
    for (args, text) in cases {
        assert_eq!(
            c.err("block-dirty-bitmap-add", args.clone()),
            generic(&text),
            "{args}"
        );
    }

    c.ok("block-dirty-bitmap-add", add("disk", "b0"));
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true, "granularity": 4096,
               "disabled": true}),
    );
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "mem"}),
    );
    qemu_io(d, &["write 0 1k", "write 1M 64k", "write -z 3M 4k"]);
    c.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "disk", "name": "b1"}),
    );
    qemu_io(d, &["write 2M 512"]);
    let listed = json!([
        {"name": "mem", "recording": true, "persistent": false, "busy": false,
         "granularity": 65536, "count": 4 * 65536},
        {"name": "b1", "recording": true, "persistent": true, "busy": false,
         "granularity": 4096, "count": 4096},
        {"name": "b0", "recording": true, "persistent": true, "busy": false,
         "granularity": 65536, "count": 4 * 65536},
    ]);
    assert_eq!(bitmaps(&mut c, "disk"), listed);

    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child.0).code(), Some(0));
    assert_eq!(
        info_bitmaps(&img),
        json!([
            {"flags": ["auto"], "name": "b1", "granularity": 4096},
            {"flags": ["auto"], "name": "b0", "granularity": 65536},
        ])
    );
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");

    // qemu-storage-daemon loads the same bitmaps, newest first, with the
    // same bits.
    let (mut qsd, mut q) = start(d, true, &[blockdev("disk", &img, false)]);
    let loaded = json!([
        {"name": "b0", "recording": true, "persistent": true, "busy": false,
         "granularity": 65536, "count": 4 * 65536},
        {"name": "b1", "recording": true, "persistent": true, "busy": false,
         "granularity": 4096, "count": 4096},
    ]);
    assert_eq!(bitmaps(&mut q, "disk"), loaded);
    let b0 = [(0, 1024), (MIB, 65536), (2 * MIB, 512), (3 * MIB, 4096)];
    assert_eq!(sha(&mut q, "b0"), sha256_of(4 * MIB, 65536, &b0));
    assert_eq!(
        sha(&mut q, "b1"),
        sha256_of(4 * MIB, 4096, &[(2 * MIB, 512)])
    );
    q.ok("quit", json!({}));
    assert!(wait_exit(&mut qsd.0).success());

    // And so do we, after QSD stored them again.
    let (mut child, mut c) = start(d, false, &[blockdev("disk", &img, false)]);
    assert_eq!(bitmaps(&mut c, "disk"), loaded);
    c.ok("quit", json!({}));
    assert!(wait_exit(&mut child.0).success());
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn a_killed_aiod_leaves_bitmaps_in_use_and_they_come_back_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    let devs = [blockdev("disk", &img, false)];

    let (mut child, mut c) = start(d, false, &devs);
    // Open read-write: in use on disk already.
    assert_eq!(
        info_bitmaps(&img),
        json!([{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}])
    );
    qemu_io(d, &["write 0 4k"]);
    assert_eq!(bitmaps(&mut c, "disk")[0]["count"], json!(65536));
    signal(&child, "-KILL");
    let _ = wait_exit(&mut child.0);
    assert_eq!(
        info_bitmaps(&img),
        json!([{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}])
    );
    // QEMU repairs the refcounts of a dirty image on open; we ask first.
    qemu_img(&["check", "-q", "-r", "all", img.to_str().unwrap()]);
    let copy = d.join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();

    let inconsistent = json!([{"name": "b0", "recording": false, "persistent": true,
        "busy": false, "granularity": 65536, "count": 0, "inconsistent": true}]);
    let (mut qsd, mut q) = start(d, true, &[blockdev("disk", &copy, false)]);
    assert_eq!(bitmaps(&mut q, "disk"), inconsistent);
    q.ok("quit", json!({}));
    assert!(wait_exit(&mut qsd.0).success());

    let (mut child, mut c) = start(d, false, &devs);
    assert_eq!(bitmaps(&mut c, "disk"), inconsistent);
    let unusable = generic("Bitmap 'b0' is inconsistent and cannot be used");
    for cmd in [
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(
            c.err(cmd, json!({"node": "disk", "name": "b0"})),
            unusable,
            "{cmd}"
        );
    }
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "t"}),
    );
    assert_eq!(
        c.err(
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "t", "bitmaps": ["b0"]})
        ),
        unusable
    );
    c.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "b0"}),
    );
    // Gone from the image at once.
    assert_eq!(info_bitmaps(&img), Value::Null);
    c.ok("quit", json!({}));
    assert!(wait_exit(&mut child.0).success());
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn blockdev_del_stores_the_bitmaps_of_a_node_added_over_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, disk) = (d.join("q.qcow2"), d.join("disk.qcow2"));
    for f in [&img, &disk] {
        qemu_img(&["create", "-q", "-f", "qcow2", f.to_str().unwrap(), "1M"]);
    }
    let (mut child, mut c) = start(d, false, &[blockdev("disk", &disk, false)]);
    let dev: Value = serde_json::from_str(&blockdev("q", &img, false)).unwrap();
    c.ok("blockdev-add", dev);
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "kept", "persistent": true, "granularity": 512}),
    );
    assert_eq!(
        info_bitmaps(&img),
        Value::Null,
        "stored at close, not before"
    );
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "gone", "persistent": true, "disabled": true}),
    );
    c.ok("blockdev-del", json!({"node-name": "q"}));
    let both = json!([
        {"flags": [], "name": "gone", "granularity": 65536},
        {"flags": ["auto"], "name": "kept", "granularity": 512},
    ]);
    assert_eq!(info_bitmaps(&img), both);

    // transaction: a remove takes the bitmap out of the image at once; an
    // abort puts it back on the node and the close stores it again.
    let dev: Value = serde_json::from_str(&blockdev("q", &img, false)).unwrap();
    c.ok("blockdev-add", dev);
    let remove = |name: &str| {
        json!({"type": "block-dirty-bitmap-remove",
                                     "data": {"node": "q", "name": name}})
    };
    let failing = json!({"actions": [
        remove("gone"),
        {"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "nx"}},
    ]});
    assert_eq!(
        c.err("transaction", failing),
        generic("Dirty bitmap 'nx' not found")
    );
    assert_eq!(bitmaps(&mut c, "q").as_array().map(Vec::len), Some(2));
    c.ok("blockdev-del", json!({"node-name": "q"}));
    // Stored again, after the one that stayed in the image (QEMU's order).
    let mut after = both.as_array().unwrap().clone();
    after.reverse();
    assert_eq!(info_bitmaps(&img), Value::Array(after));
    let dev: Value = serde_json::from_str(&blockdev("q", &img, false)).unwrap();
    c.ok("blockdev-add", dev);
    c.ok("transaction", json!({"actions": [remove("gone")]}));
    assert_eq!(
        info_bitmaps(&img),
        json!([{"flags": ["in-use", "auto"], "name": "kept", "granularity": 512}])
    );
    c.ok("blockdev-del", json!({"node-name": "q"}));
    assert_eq!(
        info_bitmaps(&img),
        json!([{"flags": ["auto"], "name": "kept", "granularity": 512}])
    );
    c.ok("quit", json!({}));
    assert!(wait_exit(&mut child.0).success());
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}
