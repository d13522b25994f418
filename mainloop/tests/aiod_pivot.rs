//! The pivot moves the users of the old node: after `blockdev-mirror` and
//! `block-job-complete`, or an active `block-commit` and complete, an NBD
//! export of the old node serves the new one — writes made through it
//! after the pivot land in the new image only — in `aiod` as in
//! qemu-storage-daemon. Plus `replaces` and QEMU's refusals of it.

mod util;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use util::aiod::{create_qcow2, start_daemon, wait_exit};
use util::QmpClient;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn qemu_io(args: &[&str]) -> String {
    let out = Command::new("qemu-io").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "qemu-io {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn blockdev(name: &str, img: &Path) -> String {
    json!({"driver": "qcow2", "node-name": name,
           "file": {"driver": "file", "filename": s(img)}})
    .to_string()
}

fn wait_event(c: &mut QmpClient, name: &str) -> Value {
    loop {
        let e = c.recv_event();
        if e["event"] == name {
            return e;
        }
    }
}

/// Starts the NBD server on `sock` and exports `node` writable as `node`.
fn export(c: &mut QmpClient, sock: &Path, node: &str) {
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s(sock)}}}),
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": node, "writable": true}),
    );
}

fn export_node(c: &mut QmpClient) -> Value {
    c.ok("query-block-exports", Value::Null)[0]["node-name"].clone()
}

fn nbd_write(sock: &Path, name: &str, op: &str) {
    let url = format!("nbd+unix:///{name}?socket={}", s(sock));
    qemu_io(&["-f", "raw", "-c", op, &url]);
}

/// Mirror `src` (with an export) into `tgt`, complete; returns what the
/// daemon answered along the way.
fn mirror(daemon: &str, d: &Path) -> Vec<Value> {
    let (src, tgt) = (
        d.join(format!("{daemon}-src.qcow2")),
        d.join(format!("{daemon}-tgt.qcow2")),
    );
    create_qcow2(&src, "4M", None);
    create_qcow2(&tgt, "4M", None);
    qemu_io(&["-c", "write -P 0x42 0 1M", &s(&src)]);
    let (qmp, nbd) = (
        d.join(format!("{daemon}.qmp")),
        d.join(format!("{daemon}.nbd")),
    );
    let (mut child, mut c) = start_daemon(
        daemon,
        &qmp,
        &[blockdev("src", &src), blockdev("tgt", &tgt)],
    );
    export(&mut c, &nbd, "src");
    let mut answers = Vec::new();
    let mirror = |replaces: &str| {
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
               "replaces": replaces})
    };
    for bad in ["nope", "tgt"] {
        let (class, desc) = c.err("blockdev-mirror", mirror(bad));
        answers.push(json!([class, desc]));
    }
    c.ok("blockdev-mirror", mirror("src"));
    wait_event(&mut c, "BLOCK_JOB_READY");
    // Before the pivot a write through the export goes to the source and
    // is mirrored.
    nbd_write(&nbd, "src", "write -P 0x55 1M 64k");
    c.ok("block-job-complete", json!({"device": "j"}));
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED");
    answers.push(done["data"]["error"].clone());
    answers.push(export_node(&mut c));
    // After it, the export writes to the target only.
    nbd_write(&nbd, "src", "write -P 0x66 2M 64k");
    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
    qemu_io(&[
        "-c",
        "read -P 0x42 0 1M",
        "-c",
        "read -P 0x55 1M 64k",
        "-c",
        "read -P 0x66 2M 64k",
        &s(&tgt),
    ]);
    qemu_io(&[
        "-c",
        "read -P 0x55 1M 64k",
        "-c",
        "read -P 0 2M 64k",
        &s(&src),
    ]);
    answers
}

#[test]
fn mirror_complete_moves_the_export_to_the_target_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let ours = mirror("aiod", dir.path());
    let qsd = mirror("qsd", dir.path());
    assert_eq!(ours, qsd);
    assert_eq!(
        ours,
        [
            json!(["GenericError", "Failed to find node with node-name='nope'"]),
            json!(["GenericError", "Cannot replace 'tgt' by a node mirrored from 'src', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data"]),
            Value::Null,
            json!("tgt"),
        ]
    );
}

/// Active commit of `top` (exported) into `base`, complete.
fn active_commit(daemon: &str, d: &Path) -> Vec<Value> {
    let (base, top) = (
        d.join(format!("{daemon}-base.qcow2")),
        d.join(format!("{daemon}-top.qcow2")),
    );
    create_qcow2(&base, "4M", None);
    qemu_io(&["-c", "write -P 0x42 0 1M", &s(&base)]);
    create_qcow2(&top, "", Some(&base));
    qemu_io(&["-c", "write -P 0x43 512k 1M", &s(&top)]);
    let (qmp, nbd) = (
        d.join(format!("{daemon}.qmp")),
        d.join(format!("{daemon}.nbd")),
    );
    let top_dev = json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": s(&top)}, "backing": "base"})
    .to_string();
    let (mut child, mut c) = start_daemon(daemon, &qmp, &[blockdev("base", &base), top_dev]);
    export(&mut c, &nbd, "top");
    c.ok("block-commit", json!({"job-id": "c", "device": "top"}));
    wait_event(&mut c, "BLOCK_JOB_READY");
    nbd_write(&nbd, "top", "write -P 0x55 2M 64k");
    c.ok("block-job-complete", json!({"device": "c"}));
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED");
    let answers = vec![done["data"]["error"].clone(), export_node(&mut c)];
    nbd_write(&nbd, "top", "write -P 0x66 3M 64k");
    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
    qemu_io(&[
        "-c",
        "read -P 0x42 0 512k",
        "-c",
        "read -P 0x43 512k 1M",
        "-c",
        "read -P 0x55 2M 64k",
        "-c",
        "read -P 0x66 3M 64k",
        &s(&base),
    ]);
    // The old active layer did not get the write made after the pivot.
    let alloc = qemu_io(&["-r", "-c", "alloc 3M 64k", &s(&top)]);
    assert!(alloc.contains("0/65536 bytes allocated"), "{alloc}");
    answers
}

#[test]
fn active_commit_complete_moves_the_export_to_the_base_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let ours = active_commit("aiod", dir.path());
    let qsd = active_commit("qsd", dir.path());
    assert_eq!(ours, qsd);
    assert_eq!(ours, [Value::Null, json!("base")]);
}

/// `actively-synced` in `query-block-jobs`: false while a write-blocking
/// mirror copies, true once it is READY; always false in background mode.
fn actively_synced(daemon: &str, d: &Path) -> Vec<Value> {
    let (src, tgt) = (
        d.join(format!("{daemon}-as-src.qcow2")),
        d.join(format!("{daemon}-as-tgt.qcow2")),
    );
    create_qcow2(&src, "4M", None);
    create_qcow2(&tgt, "4M", None);
    qemu_io(&["-c", "write -P 0x42 0 1M", &s(&src)]);
    let qmp = d.join(format!("{daemon}-as.qmp"));
    let (mut child, mut c) = start_daemon(
        daemon,
        &qmp,
        &[blockdev("src", &src), blockdev("tgt", &tgt)],
    );
    let mut seen = Vec::new();
    for mode in ["background", "write-blocking"] {
        c.ok(
            "blockdev-mirror",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "copy-mode": mode}),
        );
        wait_event(&mut c, "BLOCK_JOB_READY");
        let jobs = c.ok("query-block-jobs", Value::Null);
        seen.push(json!([mode, jobs[0]["actively-synced"]]));
        c.ok("block-job-cancel", json!({"device": "j"}));
        wait_event(&mut c, "BLOCK_JOB_COMPLETED");
    }
    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
    seen
}

#[test]
fn actively_synced_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let ours = actively_synced("aiod", dir.path());
    let qsd = actively_synced("qsd", dir.path());
    assert_eq!(ours, qsd);
    assert_eq!(
        ours,
        [
            json!(["background", false]),
            json!(["write-blocking", true])
        ]
    );
}
