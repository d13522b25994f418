//! `aiod` with the block layer: nodes from the command line and from
//! `blockdev-add`, `blockdev-del`, `query-named-block-nodes`, job verbs on
//! missing jobs with QEMU's classes, and a clean shutdown on SIGTERM
//! (images closed clean, socket and pid file removed).

mod util;

use std::process::Command;

use serde_json::{json, Value};
use util::aiod::{base_and_top, create_qcow2, qemu_img, start_aiod, wait_exit};
use util::QmpClient;

#[test]
fn block_nodes_over_qmp_and_clean_shutdown_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top, extra) = (
        d.join("base.qcow2"),
        d.join("top.qcow2"),
        d.join("extra.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    create_qcow2(&top, "", Some(&base));
    qemu_img(&["create", "-q", "-f", "qcow2", extra.to_str().unwrap(), "1M"]);
    let sock = d.join("qmp.sock");
    let pid = d.join("aiod.pid");
    let blockdev = json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": top}})
    .to_string();
    let mut child = start_aiod(
        &sock,
        &[
            "--blockdev",
            &blockdev,
            "--pidfile",
            pid.to_str().unwrap(),
            "--object",
            "iothread,id=io0",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&pid).unwrap().trim(),
        child.id().to_string()
    );
    let mut c = QmpClient::connect_unix(&sock);
    c.negotiate();

    let nodes = c.ok("query-named-block-nodes", Value::Null);
    let top_info = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap_or_else(|| panic!("no top in {nodes}"))
        .clone();
    assert_eq!(top_info["drv"], "qcow2");
    assert_eq!(top_info["backing_file_depth"], 1);
    assert_eq!(top_info["image"]["virtual-size"], 4 << 20);
    assert_eq!(top_info["ro"], false);

    // blockdev-add / blockdev-del round trip, in dotted-key-free JSON.
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "extra",
            "file": {"driver": "file", "filename": extra}}),
    );
    assert!(c
        .ok("query-named-block-nodes", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node-name"] == "extra"));
    let (class, desc) = c.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "extra",
            "file": {"driver": "file", "filename": extra}}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("extra"), "{desc}");
    c.ok("blockdev-del", json!({"node-name": "extra"}));

    // QEMU's errors.
    let missing = d.join("does-not-exist.qcow2");
    assert_eq!(
        c.err(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "ghost",
                "file": {"driver": "file", "filename": missing}})
        ),
        util::generic(&format!(
            "Could not open '{}': No such file or directory",
            missing.display()
        ))
    );
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": "nosuchnode"})),
        util::generic("Failed to find node with node-name='nosuchnode'")
    );
    assert_eq!(
        c.err("block-job-pause", json!({"device": "nosuchjob"})),
        (
            "DeviceNotActive".to_string(),
            "Block job 'nosuchjob' not found".to_string()
        )
    );
    assert_eq!(
        c.err("job-cancel", json!({"id": "nosuchjob"})),
        util::generic("Job not found")
    );
    assert_eq!(
        c.err("block-job-set-speed", json!({"device": "x", "speed": -1})),
        util::generic("Parameter 'speed' expects a non-negative value")
    );
    assert_eq!(c.ok("query-block-jobs", Value::Null), json!([]));
    assert_eq!(c.ok("query-jobs", Value::Null), json!([]));

    // The image is open for writing: qcow2's dirty bit is set while we run.
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        top.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["dirty-flag"], true, "dirty while open for writing");

    // SIGTERM: clean shutdown.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(!sock.exists(), "socket removed");
    assert!(!pid.exists(), "pid file removed");
    assert!(c.is_closed());
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", top.to_str().unwrap()])).unwrap();
    assert_eq!(info["dirty-flag"], false, "closed clean");
}

#[test]
fn a_node_on_an_iothread_runs_its_job_there_and_events_reach_the_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top) = base_and_top(d, "4M", "3M");
    let want = d.join("want.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        want.to_str().unwrap(),
    ]);
    let sock = d.join("qmp.sock");
    let mut child = start_aiod(&sock, &["--object", "iothread,id=io0"]);
    let mut c = QmpClient::connect_unix(&sock);
    c.negotiate();
    let chain = json!({"driver": "qcow2", "node-name": "top", "iothread": "io0",
        "file": {"driver": "file", "filename": top},
        "backing": {"driver": "qcow2", "node-name": "base",
            "file": {"driver": "file", "filename": base}}});
    let mut bad = chain.clone();
    bad["iothread"] = json!("io9");
    assert_eq!(
        c.err("blockdev-add", bad),
        util::generic("Cannot find iothread io9")
    );
    c.ok("blockdev-add", chain);
    c.ok("block-stream", json!({"job-id": "s0", "device": "top"}));
    loop {
        let ev = c.recv_event();
        if ev["event"] == "BLOCK_JOB_COMPLETED" {
            assert_eq!(ev["data"]["device"], "s0");
            assert!(ev["data"].get("error").is_none(), "{ev}");
            break;
        }
    }
    c.ok("quit", Value::Null);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    qemu_img(&[
        "compare",
        "-q",
        want.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", top.to_str().unwrap()])).unwrap();
    assert!(info.get("backing-filename").is_none(), "streamed: {info}");
}

#[test]
fn conflicting_jobs_are_refused_and_a_job_outlives_its_client() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top) = base_and_top(d, "8M", "8M");
    let sock = d.join("qmp.sock");
    let mut child = start_aiod(&sock, &[]);
    let mut c = QmpClient::connect_unix(&sock);
    c.negotiate();
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top},
            "backing": {"driver": "qcow2", "node-name": "base",
                "file": {"driver": "file", "filename": base}}}),
    );
    // 64 KiB/s: the 8 MiB stream takes minutes unless sped up.
    c.ok(
        "block-stream",
        json!({"job-id": "s0", "device": "top", "speed": 65536}),
    );
    let (class, desc) = c.err("block-stream", json!({"job-id": "s1", "device": "top"}));
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("Node 'top' is busy"), "{desc}");
    assert_eq!(
        c.err("block-stream", json!({"job-id": "s0", "device": "base"}))
            .0,
        "GenericError"
    );
    let (_, desc) = c.err("blockdev-del", json!({"node-name": "top"}));
    assert!(desc.starts_with("Node 'top' is busy"), "{desc}");
    assert_eq!(
        c.err("block-job-complete", json!({"device": "s0"})),
        util::generic("Job 's0' in state 'running' cannot accept command verb 'complete'")
    );

    // The client goes away mid-job; the job goes on.
    drop(c);
    let mut c2 = QmpClient::connect_unix(&sock);
    c2.negotiate();
    let jobs = c2.ok("query-block-jobs", Value::Null);
    assert_eq!(jobs[0]["device"], "s0", "{jobs}");
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    c2.ok("block-job-set-speed", json!({"device": "s0", "speed": 0}));
    loop {
        let ev = c2.recv_event();
        if ev["event"] == "BLOCK_JOB_COMPLETED" {
            assert_eq!(ev["data"]["offset"], 8 << 20, "{ev}");
            break;
        }
    }
    c2.ok("quit", Value::Null);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
}
