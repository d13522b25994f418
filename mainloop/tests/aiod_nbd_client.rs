//! `aiod` with an `nbd` node: `blockdev-add` of a qemu-nbd export on an
//! iothread, a mirror from a node on the main context into it (requests
//! cross contexts), `query-named-block-nodes`, `blockdev-del`, and the
//! open error of a missing server over QMP.

mod util;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::aiod::wait_for;
use util::QmpClient;

const AIOD: &str = env!("CARGO_BIN_EXE_aiod");

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str, args: &[&str], sock: &Path) -> Proc {
    let mut c = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect(cmd);
    wait_for(&mut c, sock);
    Proc(c)
}

#[test]
fn mirror_into_an_nbd_node_on_an_iothread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (src, tgt) = (d.join("src.qcow2"), d.join("tgt.qcow2"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &s(&src), "4M"]);
    run("qemu-img", &["create", "-q", "-f", "qcow2", &s(&tgt), "4M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x42 0 3M",
            "-c",
            "write -z 3M 64k",
            &s(&src),
        ],
    );
    let nbd_sock = d.join("nbd.sock");
    let mut nbd = spawn(
        "qemu-nbd",
        &[
            "-k",
            &s(&nbd_sock),
            "-f",
            "qcow2",
            "-x",
            "tgt",
            "--persistent",
            &s(&tgt),
        ],
        &nbd_sock,
    );
    let qmp = d.join("qmp.sock");
    let mut aiod = spawn(
        AIOD,
        &[
            "--qmp",
            &format!("unix:{}", s(&qmp)),
            "--object",
            "iothread,id=io0",
        ],
        &qmp,
    );
    let mut c = QmpClient::connect_unix(&qmp);
    c.negotiate();
    let (class, desc) = c.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "x",
            "server": {"type": "unix", "path": s(&d.join("none.sock"))}}),
    );
    assert_eq!(class, "GenericError");
    assert!(
        desc.starts_with("Could not open 'nbd+unix:///?socket=")
            && desc.ends_with("none.sock': No such file or directory"),
        "{desc}"
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "src",
            "file": {"driver": "file", "filename": s(&src)}}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "iothread": "io0",
            "server": {"type": "unix", "path": s(&nbd_sock)}, "export": "tgt",
            "reconnect-delay": 5}),
    );
    let nodes = c.ok("query-named-block-nodes", Value::Null);
    let t = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "tgt")
        .unwrap()
        .clone();
    assert_eq!(t["drv"], "nbd");
    assert_eq!(t["ro"], false);
    assert_eq!(t["image"]["virtual-size"], 4 << 20);
    assert_eq!(
        t["file"],
        format!("nbd+unix:///tgt?socket={}", s(&nbd_sock))
    );
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}),
    );
    loop {
        let ev = c.recv_event();
        if ev["event"] == "BLOCK_JOB_READY" {
            break;
        }
        assert_ne!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    }
    c.ok("block-job-complete", json!({"device": "m"}));
    loop {
        let ev = c.recv_event();
        if ev["event"] == "BLOCK_JOB_COMPLETED" {
            assert!(ev["data"].get("error").is_none(), "{ev}");
            break;
        }
    }
    // Wait for the job to be dismissed, then drop the target.
    while c.ok("query-jobs", Value::Null) != json!([]) {
        std::thread::sleep(Duration::from_millis(5));
    }
    c.ok("blockdev-del", json!({"node-name": "tgt"}));
    c.ok("quit", Value::Null);
    let deadline = Instant::now() + util::TIMEOUT;
    while aiod.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "aiod did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    run("kill", &["-TERM", &nbd.0.id().to_string()]);
    let _ = nbd.0.wait();
    run("qemu-img", &["compare", "-q", &s(&src), &s(&tgt)]);
    run("qemu-img", &["check", "-q", &s(&tgt)]);
}
