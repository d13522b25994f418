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

/// Events of job `id` (status changes and `BLOCK_JOB_*`, by name), read
/// until both jobs in `ids` reached `null`.
fn per_job(c: &mut QmpClient, ids: &[&str]) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); ids.len()];
    let mut gone = 0;
    while gone < ids.len() {
        let e = c.recv_event();
        let who = e["data"]["id"]
            .as_str()
            .or(e["data"]["device"].as_str())
            .unwrap_or_default()
            .to_string();
        let Some(i) = ids.iter().position(|x| *x == who) else {
            continue;
        };
        out[i].push(short(&e));
        if e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "null" {
            gone += 1;
        }
    }
    out.into_iter().map(without_drain_blip).collect()
}

/// `completion-mode: grouped` on aiod. (Not compared with
/// qemu-storage-daemon: QEMU's `blkdebug` fires `write_aio` only for a
/// format driver above it, so it cannot fail a backup's target this way.)
#[test]
fn grouped_backups_complete_together_and_fail_together() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = |n: &str| d.join(format!("{n}.qcow2"));
    for n in ["s1", "s2", "t1", "t2", "t3"] {
        create_qcow2(&img(n), "4M", None);
    }
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x7e 0 1M"])
        .arg(img("s2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let dev = |n: &str| {
        json!({"driver": "qcow2", "node-name": n, "file": {"driver": "file", "filename": img(n)}})
            .to_string()
    };
    let bad = json!({"driver": "blkdebug", "node-name": "bad",
        "inject-error": [{"event": "write_aio", "errno": 5}],
        "image": {"driver": "qcow2", "node-name": "t2",
            "file": {"driver": "file", "filename": img("t2")}}})
    .to_string();
    let sock = d.join("g.sock");
    let devs = [dev("s1"), dev("s2"), dev("t1"), dev("t3"), bad];
    let (mut child, mut c) = start_daemon("aiod", &sock, &devs);
    let backup = |id: &str, dev: &str, tgt: &str, speed: u64| {
        json!({"type": "blockdev-backup", "data": {"job-id": id, "device": dev,
            "target": tgt, "sync": "full", "speed": speed}})
    };
    let grouped = json!({"completion-mode": "grouped"});
    // Both succeed.
    c.ok(
        "transaction",
        json!({"actions": [backup("a1", "s1", "t1", 0), backup("a2", "s2", "t3", 0)],
            "properties": grouped}),
    );
    let ok = "JOB_STATUS_CHANGE:created JOB_STATUS_CHANGE:running JOB_STATUS_CHANGE:waiting \
        JOB_STATUS_CHANGE:pending BLOCK_JOB_COMPLETED[\"device\", \"len\", \"offset\", \"speed\", \"type\"] \
        JOB_STATUS_CHANGE:concluded JOB_STATUS_CHANGE:null";
    for events in per_job(&mut c, &["a1", "a2"]) {
        assert_eq!(
            events.join(" "),
            ok.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    // One fails: the other, slow and still running, is cancelled with it.
    c.ok(
        "transaction",
        json!({"actions": [backup("j1", "s1", "t1", 65536), backup("j2", "s2", "bad", 0)],
            "properties": grouped}),
    );
    let ev = per_job(&mut c, &["j1", "j2"]);
    let j1 = ev[0].join(" ");
    assert!(j1.starts_with("JOB_STATUS_CHANGE:created JOB_STATUS_CHANGE:running JOB_STATUS_CHANGE:aborting BLOCK_JOB_CANCELLED"), "{j1}");
    let j2 = ev[1].join(" ");
    assert!(j2.contains("BLOCK_JOB_ERROR"), "{j2}");
    assert!(
        j2.contains("JOB_STATUS_CHANGE:aborting BLOCK_JOB_COMPLETED[\"device\", \"error\""),
        "{j2}"
    );
    // A bitmap action cannot be grouped (QEMU's text).
    let (_, desc) = c.err(
        "transaction",
        json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "s1", "name": "b"}}],
            "properties": grouped}),
    );
    assert_eq!(
        desc,
        "Action 'block-dirty-bitmap-add' does not support transaction property completion-mode = grouped"
    );
    c.execute("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
}
