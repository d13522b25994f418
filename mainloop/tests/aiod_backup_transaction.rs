//! `blockdev-backup` as a `transaction` action, next to
//! `block-dirty-bitmap-add`: the full backup and the new bitmap start at
//! one instant; a failing action drops the backup job before it copies
//! anything. The same transactions go to qemu-storage-daemon, and the two
//! must answer and emit alike.

mod util;

use std::path::Path;

use serde_json::{json, Value};
use util::aiod::{create_qcow2, qemu_img, start_daemon, wait_exit};
use util::QmpClient;

/// An event as `NAME` or `JOB_STATUS_CHANGE:status`, with the payload
/// keys of the `BLOCK_JOB_*` events.
fn short(e: &Value) -> String {
    let name = e["event"].as_str().unwrap_or_default();
    match name {
        "JOB_STATUS_CHANGE" => format!("{name}:{}", e["data"]["status"].as_str().unwrap_or("?")),
        _ => {
            let mut keys: Vec<&str> = e["data"]
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            keys.sort();
            format!("{name}{keys:?}")
        }
    }
}

/// Events until job `id` reaches `null`.
fn until_null(c: &mut QmpClient, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e = c.recv_event();
        out.push(short(&e));
        if e["event"] == "JOB_STATUS_CHANGE"
            && e["data"]["id"] == id
            && e["data"]["status"] == "null"
        {
            return out;
        }
    }
}

fn run(daemon: &str, d: &Path) -> Vec<String> {
    let (src, tgt) = (
        d.join(format!("{daemon}-src.qcow2")),
        d.join(format!("{daemon}-tgt.qcow2")),
    );
    create_qcow2(&src, "2M", None);
    create_qcow2(&tgt, "2M", None);
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        tgt.to_str().unwrap(),
    ]);
    let status = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 1M", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success());
    let dev = |n: &str, f: &Path| {
        json!({"driver": "qcow2", "node-name": n, "file": {"driver": "file", "filename": f}})
            .to_string()
    };
    let sock = d.join(format!("{daemon}.sock"));
    let (mut child, mut c) = start_daemon(daemon, &sock, &[dev("src", &src), dev("tgt", &tgt)]);
    let mut log = Vec::new();
    let backup = |id: &str| {
        json!({"type": "blockdev-backup", "data": {"job-id": id, "device": "src",
            "target": "tgt", "sync": "full"}})
    };
    let bitmap = json!({"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}});
    // Together: the bitmap and the backup start at one instant.
    let r = c.execute(
        "transaction",
        json!({"actions": [bitmap.clone(), backup("j1")]}),
    );
    log.push(format!("ok: {}", r.get("return").is_some()));
    log.extend(until_null(&mut c, "j1"));
    // The bitmap exists now, so adding it again fails: the backup
    // prepared before it is dropped without running.
    let r = c.execute("transaction", json!({"actions": [backup("j2"), bitmap]}));
    log.push(format!(
        "error: {}",
        r["error"]["desc"].as_str().unwrap_or("none")
    ));
    log.extend(until_null(&mut c, "j2"));
    // A bad backup in a transaction fails at prepare, before any job.
    let r = c.execute(
        "transaction",
        json!({"actions": [{"type": "blockdev-backup", "data": {"job-id": "j3", "device": "nope",
            "target": "tgt", "sync": "full"}}]}),
    );
    log.push(format!(
        "error: {}",
        r["error"]["desc"].as_str().unwrap_or("none")
    ));
    log.push(format!("jobs: {}", c.ok("query-jobs", Value::Null)));
    c.execute("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
    // The first backup copied the source as it was at the transaction.
    qemu_img(&["compare", src.to_str().unwrap(), tgt.to_str().unwrap()]);
    log
}

/// QEMU runs `transaction` inside a drained section, so a job it starts
/// there shows `paused` then `running` at once; aiod's jobs start outside
/// one. Those two lines are dropped before comparing.
fn without_drain_blip(log: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in log {
        if e == "JOB_STATUS_CHANGE:running"
            && out.last().is_some_and(|l| l == "JOB_STATUS_CHANGE:paused")
        {
            out.pop();
            continue;
        }
        out.push(e);
    }
    out
}

#[test]
fn backup_and_bitmap_in_one_transaction_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let ours = without_drain_blip(run("aiod", dir.path()));
    let theirs = without_drain_blip(run("qsd", dir.path()));
    assert_eq!(ours, theirs);
    let aborted = ours
        .iter()
        .position(|e| e.starts_with("error: Bitmap"))
        .unwrap();
    assert_eq!(
        ours[aborted + 1..aborted + 5],
        [
            "JOB_STATUS_CHANGE:created",
            "JOB_STATUS_CHANGE:aborting",
            "JOB_STATUS_CHANGE:concluded",
            "JOB_STATUS_CHANGE:null"
        ]
    );
}
