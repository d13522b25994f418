//! `blockdev-reopen` over QMP: the same requests to aiod and to
//! qemu-storage-daemon get the same answers, and the image is clean on
//! disk after going back to read-only.

mod util;

use serde_json::{json, Value};
use util::aiod::{create_qcow2, qemu_img, start_daemon, wait_exit};
use util::QmpClient;

/// `{"return"}` or the error's description, for comparing two daemons.
fn outcome(c: &mut QmpClient, cmd: &str, args: Value) -> Result<Value, String> {
    let r = c.execute(cmd, args);
    match r.get("error") {
        Some(e) => Err(e["desc"].as_str().unwrap_or_default().to_string()),
        None => Ok(r["return"].clone()),
    }
}

fn dirty(img: &std::path::Path) -> bool {
    let v: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        img.to_str().unwrap(),
    ]))
    .unwrap();
    v["dirty-flag"].as_bool().unwrap()
}

#[test]
fn blockdev_reopen_answers_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut answers = Vec::new();
    for daemon in ["aiod", "qsd"] {
        let (base, top) = (
            d.join(format!("{daemon}-b.qcow2")),
            d.join(format!("{daemon}-t.qcow2")),
        );
        create_qcow2(&base, "1M", None);
        create_qcow2(&top, "1M", None);
        let b = json!({"driver": "qcow2", "node-name": "b", "read-only": true,
            "file": {"driver": "file", "node-name": "bf", "filename": base}})
        .to_string();
        let t = json!({"driver": "qcow2", "node-name": "t", "backing": "b",
            "file": {"driver": "file", "node-name": "tf", "filename": top}})
        .to_string();
        let sock = d.join(format!("{daemon}.sock"));
        let (mut child, mut c) = start_daemon(daemon, &sock, &[b, t]);
        let reopen = |ro: bool| json!({"options": [{"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": ro}]});
        let mut got = vec![outcome(&mut c, "blockdev-reopen", reopen(false))];
        // aiod marks a qcow2 image dirty while it is open read-write
        // (QEMU only does with lazy refcounts).
        assert_eq!(dirty(&base), daemon == "aiod", "{daemon}: read-write");
        for args in [
            json!({"options": [{"driver": "raw", "node-name": "b", "file": "bf"}]}),
            json!({"options": [{"driver": "qcow2", "node-name": "ghost", "file": "bf"}]}),
            json!({"options": [{"driver": "qcow2", "node-name": "b"}]}),
            json!({"options": [{"driver": "qcow2", "node-name": "t", "file": "tf"}]}),
        ] {
            got.push(outcome(&mut c, "blockdev-reopen", args));
        }
        got.push(outcome(&mut c, "blockdev-reopen", reopen(true)));
        assert!(!dirty(&base), "{daemon}: read-only again, so clean");
        answers.push(got);
        c.execute("quit", Value::Null);
        assert!(wait_exit(&mut child).success());
        qemu_img(&["check", base.to_str().unwrap()]);
    }
    assert_eq!(answers[0], answers[1], "aiod vs qemu-storage-daemon");
    assert_eq!(answers[0][0], Ok(json!({})));
    assert!(
        answers[0][1..5].iter().all(Result::is_err),
        "{:?}",
        answers[0]
    );
}

/// `(node-name, ro)` of the format nodes, sorted.
fn ro_flags(c: &mut QmpClient) -> Vec<(String, bool)> {
    let all = c.ok("query-named-block-nodes", json!({"flat": true}));
    let mut v: Vec<(String, bool)> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] == "qcow2" && !n["node-name"].as_str().unwrap().starts_with('#'))
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_string(),
                n["ro"].as_bool().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Events until one named `name` (for job `id`), by name.
fn events_until(c: &mut QmpClient, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e = c.recv_event();
        let n = e["event"].as_str().unwrap().to_string();
        let s = match e["data"]["status"].as_str() {
            Some(st) => format!("{n}:{st}"),
            None => n.clone(),
        };
        out.push(s);
        if n == name {
            return out;
        }
    }
}

#[test]
fn snapshot_then_commit_reopens_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut answers = Vec::new();
    for daemon in ["aiod", "qsd"] {
        let a = d.join(format!("{daemon}-a.qcow2"));
        create_qcow2(&a, "1M", None);
        let (o1, o2) = (
            d.join(format!("{daemon}-o1.qcow2")),
            d.join(format!("{daemon}-o2.qcow2")),
        );
        let blockdev = json!({"driver": "qcow2", "node-name": "a",
            "file": {"driver": "file", "filename": a}})
        .to_string();
        let sock = d.join(format!("{daemon}.sock"));
        let (mut child, mut c) = start_daemon(daemon, &sock, &[blockdev]);
        let mut got: Vec<String> = Vec::new();
        // Overlays added over QMP (qemu-storage-daemon drops an overlay
        // that `blockdev-snapshot-sync` made when nothing else holds it).
        for (node, file, name) in [("a", &o1, "o1"), ("o1", &o2, "o2")] {
            create_qcow2(file, "1M", None);
            c.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": name, "backing": null,
                    "file": {"driver": "file", "filename": file}}),
            );
            c.ok("blockdev-snapshot", json!({"node": node, "overlay": name}));
        }
        got.push(format!("{:?}", ro_flags(&mut c)));
        // Intermediate commit of o1 into the read-only a.
        c.ok(
            "block-commit",
            json!({"job-id": "i", "device": "o2", "top-node": "o1", "base-node": "a"}),
        );
        got.extend(events_until(&mut c, "BLOCK_JOB_COMPLETED"));
        got.extend(events_until(&mut c, "JOB_STATUS_CHANGE"));
        got.extend(events_until(&mut c, "JOB_STATUS_CHANGE"));
        got.push(format!("{:?}", ro_flags(&mut c)));
        // Active commit of o2 into a: a becomes the active layer.
        c.ok(
            "block-commit",
            json!({"job-id": "c", "device": "o2", "base-node": "a"}),
        );
        got.extend(events_until(&mut c, "BLOCK_JOB_READY"));
        c.ok("block-job-complete", json!({"device": "c"}));
        got.extend(events_until(&mut c, "BLOCK_JOB_COMPLETED"));
        got.extend(events_until(&mut c, "JOB_STATUS_CHANGE"));
        got.extend(events_until(&mut c, "JOB_STATUS_CHANGE"));
        let flags = ro_flags(&mut c);
        got.push(format!("{:?}", flags.iter().find(|(n, _)| n == "a")));
        answers.push(got);
        c.execute("quit", Value::Null);
        assert!(wait_exit(&mut child).success());
        qemu_img(&["check", a.to_str().unwrap()]);
    }
    assert_eq!(answers[0], answers[1], "aiod vs qemu-storage-daemon");
    assert_eq!(
        answers[0].last().unwrap(),
        &format!("{:?}", Some(("a".to_string(), false)))
    );
}
