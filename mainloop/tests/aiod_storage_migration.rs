//! Storage migration between two `aiod`s, the way QEMU moves a disk to
//! another host: the destination exports an empty image over NBD, the
//! source mirrors into an `nbd` node connected to that export, READY,
//! complete, and the two images read the same (`qemu-img compare`). Then
//! the same with the connection dropped mid-mirror (the destination deletes
//! its export hard): an `on-target-error: stop` job pauses, and once the
//! export is back `resume` reconnects and completes it.

mod util;

use std::path::Path;
use std::process::{Child, Command};

use serde_json::{json, Value};
use util::aiod::{qemu_img, start_aiod, wait_exit};
use util::QmpClient;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A source image with data, zeroes and holes, and an empty target.
fn images(d: &Path, size: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (src, tgt) = (d.join("src.qcow2"), d.join("tgt.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&src), size]);
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&tgt), size]);
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 0x42 0 2M", "-c", "write -z 2M 64k"])
        .args(["-c", "write -P 0x17 5M 1M", &s(&src)])
        .output()
        .unwrap();
    assert!(io.status.success(), "{io:?}");
    (src, tgt)
}

/// The destination: `tgt` exported writable as `disk` on `nbd_sock`.
fn destination(d: &Path, tgt: &Path, nbd_sock: &Path) -> (Child, QmpClient) {
    let qmp = d.join("dst-qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let child = start_aiod(
        &qmp,
        &[
            "--blockdev",
            &json!({"driver": "qcow2", "node-name": "tgt",
                "file": {"driver": "file", "filename": s(tgt)}})
            .to_string(),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", s(nbd_sock)),
            "--export",
            "type=nbd,id=e0,node-name=tgt,name=disk,writable=on",
        ],
    );
    let mut c = QmpClient::connect_unix(&qmp);
    c.negotiate();
    (child, c)
}

/// The source: `src` and an `nbd` node `remote` on the destination's export.
fn source(d: &Path, src: &Path, nbd_sock: &Path) -> (Child, QmpClient) {
    let qmp = d.join("src-qmp.sock");
    let child = start_aiod(&qmp, &[]);
    let mut c = QmpClient::connect_unix(&qmp);
    c.negotiate();
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "src",
            "file": {"driver": "file", "filename": s(src)}}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "disk",
            "server": {"type": "unix", "path": s(nbd_sock)}}),
    );
    (child, c)
}

fn wait_event(c: &mut QmpClient, name: &str) -> Value {
    loop {
        let e = c.recv_event();
        if e["event"] == name {
            return e;
        }
    }
}

fn quit(mut child: Child, mut c: QmpClient) {
    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
}

fn compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", &s(a), &s(b)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn mirror_to_another_aiods_nbd_export_then_complete() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, tgt) = images(d, "8M");
    let nbd_sock = d.join("nbd.sock");
    let (dst, dst_qmp) = destination(d, &tgt, &nbd_sock);
    let (srcd, mut c) = source(d, &src, &nbd_sock);
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "remote", "sync": "full"}),
    );
    let ready = wait_event(&mut c, "BLOCK_JOB_READY");
    assert_eq!(ready["data"]["device"], "m0");
    c.ok("block-job-complete", json!({"device": "m0"}));
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED");
    assert_eq!(done["data"]["offset"], 8 << 20);
    assert!(done["data"].get("error").is_none(), "{done}");
    c.ok("blockdev-del", json!({"node-name": "remote"}));
    quit(srcd, c);
    quit(dst, dst_qmp);
    compare(&src, &tgt);
    let check = qemu_img(&["check", &s(&tgt)]);
    assert!(check.contains("No errors"), "{check}");
}

#[test]
fn a_dropped_connection_pauses_a_stop_job_until_the_export_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, tgt) = images(d, "8M");
    let nbd_sock = d.join("nbd.sock");
    let (dst, mut dst_qmp) = destination(d, &tgt, &nbd_sock);
    let (srcd, mut c) = source(d, &src, &nbd_sock);
    // Slow enough that the connection drops with most of the copy left.
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "m1", "device": "src", "target": "remote", "sync": "full",
            "speed": 1 << 20, "on-target-error": "stop"}),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The destination drops its clients (as a network failure would).
    dst_qmp.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    wait_event(&mut dst_qmp, "BLOCK_EXPORT_DELETED");
    let err = wait_event(&mut c, "BLOCK_JOB_ERROR");
    assert_eq!(err["data"]["device"], "m1");
    assert_eq!(err["data"]["operation"], "write");
    assert_eq!(err["data"]["action"], "stop");
    let jobs = c.ok("query-block-jobs", Value::Null);
    assert_eq!(jobs[0]["paused"], true, "{jobs}");
    assert!(jobs[0]["offset"].as_u64().unwrap() < 8 << 20, "{jobs}");
    // The export comes back; resume retries and the mirror finishes.
    dst_qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "tgt", "name": "disk",
            "writable": true}),
    );
    c.ok("block-job-set-speed", json!({"device": "m1", "speed": 0}));
    c.ok("block-job-resume", json!({"device": "m1"}));
    wait_event(&mut c, "BLOCK_JOB_READY");
    c.ok("block-job-complete", json!({"device": "m1"}));
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.ok("blockdev-del", json!({"node-name": "remote"}));
    quit(srcd, c);
    quit(dst, dst_qmp);
    compare(&src, &tgt);
}
