//! Internal snapshots over QMP in `aiod`: `blockdev-snapshot-internal-sync`
//! and `blockdev-snapshot-delete-internal-sync` with qemu-storage-daemon's
//! answers to the same requests and mistakes; the image QEMU sees after.

mod util;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use util::{generic, wait_until, QmpClient};

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), text)
}

fn blockdev(name: &str, driver: &str, file: &Path, read_only: bool) -> String {
    json!({"driver": driver, "node-name": name, "read-only": read_only,
        "file": {"driver": "file", "filename": file}})
    .to_string()
}

/// aiod with `blockdevs`, QMP on `d/qmp.sock`, negotiated.
fn start(d: &Path, blockdevs: &[String]) -> (std::process::Child, QmpClient) {
    let sock = d.join("qmp.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aiod"));
    cmd.arg("--qmp").arg(format!("unix:{}", sock.display()));
    for b in blockdevs {
        cmd.args(["--blockdev", b]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("aiod listens", || sock.exists());
    let mut c = QmpClient::connect_unix(&sock);
    c.negotiate();
    (child, c)
}

#[test]
fn internal_snapshots_over_qmp_answer_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, ro, raw) = (d.join("q.qcow2"), d.join("ro.qcow2"), d.join("r.raw"));
    for (img, fmt) in [(&q, "qcow2"), (&ro, "qcow2"), (&raw, "raw")] {
        assert!(qemu_img(&["create", "-q", "-f", fmt, img.to_str().unwrap(), "1M"]).0);
    }
    assert!(qemu_img(&["snapshot", "-c", "old", ro.to_str().unwrap()]).0);
    let ro_before = std::fs::read(&ro).unwrap();
    let (mut child, mut c) = start(
        d,
        &[
            blockdev("q", "qcow2", &q, false),
            blockdev("qro", "qcow2", &ro, true),
            blockdev("r", "raw", &raw, false),
        ],
    );
    let create = "blockdev-snapshot-internal-sync";
    let delete = "blockdev-snapshot-delete-internal-sync";

    assert_eq!(
        c.ok(create, json!({"device": "q", "name": "s1"})),
        json!({})
    );
    assert_eq!(
        c.ok(create, json!({"device": "q", "name": "s2"})),
        json!({})
    );
    let create_errors = [
        (
            json!({"device": "q", "name": "s1"}),
            "Snapshot with name 's1' already exists on device 'q'",
        ),
        (json!({"device": "q", "name": ""}), "Name is empty"),
        (
            json!({"device": "nope", "name": "x"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            json!({"device": "r", "name": "x"}),
            "Block format 'raw' used by device 'r' does not support internal snapshots",
        ),
        (
            json!({"device": "qro", "name": "x"}),
            "Device 'qro' is read only",
        ),
        (json!({"device": "q"}), "Parameter 'name' is missing"),
    ];
    for (args, want) in create_errors {
        assert_eq!(c.err(create, args.clone()), generic(want), "{args}");
    }
    let delete_errors = [
        (json!({"device": "q"}), "Name or id must be provided"),
        (
            json!({"device": "q", "name": "nope"}),
            "Snapshot with id 'null' and name 'nope' does not exist on device 'q'",
        ),
        (
            json!({"device": "q", "id": "9"}),
            "Snapshot with id '9' and name 'null' does not exist on device 'q'",
        ),
        (
            json!({"device": "q", "id": "1", "name": "s2"}),
            "Snapshot with id '1' and name 's2' does not exist on device 'q'",
        ),
        (
            json!({"device": "nope", "name": "s1"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            json!({"device": "r", "name": "s1"}),
            "Failed to get a snapshot list: Operation not supported",
        ),
        (
            json!({"device": "qro", "name": "old"}),
            "Failed to remove snapshot from snapshot list: Operation not permitted",
        ),
    ];
    for (args, want) in delete_errors {
        assert_eq!(c.err(delete, args.clone()), generic(want), "{args}");
    }

    let info = c.ok(delete, json!({"device": "q", "id": "1"}));
    assert_eq!(info["id"], "1");
    assert_eq!(info["name"], "s1");
    assert_eq!(info["vm-state-size"], 0);
    let keys: Vec<&str> = info
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in ["date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"] {
        assert!(keys.contains(&k), "{info}");
    }
    assert!(info["date-sec"].as_u64().unwrap() > 1_600_000_000, "{info}");
    assert_eq!(c.execute("quit", Value::Null)["return"], json!({}));
    assert!(child.wait().unwrap().success());

    let (ok, list) = qemu_img(&["snapshot", "-l", q.to_str().unwrap()]);
    assert!(
        ok && list.contains(" s2 ") && !list.contains(" s1 "),
        "{list}"
    );
    let (clean, out) = qemu_img(&["check", q.to_str().unwrap()]);
    assert!(clean, "{out}");
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_before,
        "read-only image untouched"
    );
}

/// `qemu-img snapshot -l`'s tags, after aiod has quit.
fn tags(img: &Path) -> Vec<String> {
    let (ok, out) = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    assert!(ok, "{out}");
    out.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

#[test]
fn internal_snapshots_in_a_transaction_are_all_taken_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.qcow2"), d.join("b.qcow2"));
    for img in [&a, &b] {
        assert!(qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]).0);
    }
    let (mut child, mut c) = start(
        d,
        &[
            blockdev("a", "qcow2", &a, false),
            blockdev("b", "qcow2", &b, false),
        ],
    );
    let snap = |dev: &str, name: &str| {
        json!({"type": "blockdev-snapshot-internal-sync",
            "data": {"device": dev, "name": name}})
    };
    // Both disks at one instant.
    c.ok(
        "transaction",
        json!({"actions": [snap("a", "t1"), snap("b", "t1")]}),
    );
    // The second action fails (the name exists on b): a's snapshot is undone.
    let (class, desc) = c.err(
        "transaction",
        json!({"actions": [snap("a", "t2"), snap("b", "t1")]}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "Snapshot with name 't1' already exists on device 'b'");
    c.ok("quit", Value::Null);
    assert!(child.wait().unwrap().success());
    assert_eq!(tags(&a), ["t1"]);
    assert_eq!(tags(&b), ["t1"]);
    for img in [&a, &b] {
        let (ok, out) = qemu_img(&["check", img.to_str().unwrap()]);
        assert!(ok && out.contains("No errors"), "{out}");
    }
}

/// `query-named-block-nodes` of a node, by name.
fn node_info(c: &mut QmpClient, name: &str, flat: bool) -> Value {
    let all = c.ok("query-named-block-nodes", json!({ "flat": flat }));
    all.as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no node {name} in {all}"))
}

/// The object's keys, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn query_named_block_nodes_shows_snapshots_and_chain_like_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]).0);
    let b = base.to_str().unwrap();
    let t = top.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]).0);
    for name in ["first", "second"] {
        assert!(qemu_img(&["snapshot", "-c", name, t]).0);
    }
    // Both daemons open the same images read-only, so their answers
    // describe identical files.
    // O_DIRECT too (the temporary directory is on a disk filesystem):
    // `cache` is reported for the node and its inline `file` child.
    let blockdevs = [
        json!({"driver": "qcow2", "node-name": "top", "read-only": true,
        "cache": {"direct": true, "no-flush": false},
        "file": {"driver": "file", "filename": top}})
        .to_string(),
    ];
    let (mut child, mut ours) = start(d, &blockdevs);

    let qsd_sock = d.join("qsd.sock");
    let mut qsd = util::aiod::start_qsd(&qsd_sock, &["--blockdev", &blockdevs[0]]);
    let mut theirs = QmpClient::connect_unix(&qsd_sock);
    theirs.negotiate();

    for flat in [true, false] {
        let (a, q) = (
            node_info(&mut ours, "top", flat),
            node_info(&mut theirs, "top", flat),
        );
        assert_eq!(
            a["image"]["snapshots"], q["image"]["snapshots"],
            "flat={flat}"
        );
        assert_eq!(a["image"]["snapshots"].as_array().unwrap().len(), 2);
        assert_eq!(a["ro"], q["ro"]);
        assert_eq!(a["cache"], q["cache"]);
        // Every key QEMU gives the node, we give (and the same throttling
        // zeros).
        let node_missing: Vec<String> = keys(&q)
            .into_iter()
            .filter(|k| a.get(k).is_none())
            .collect();
        assert_eq!(node_missing, Vec::<String>::new(), "flat={flat}");
        assert_eq!(a["backing_file_depth"], q["backing_file_depth"]);
        for k in [
            "filename",
            "format",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
            "dirty-flag",
            "format-specific",
        ] {
            assert_eq!(a["image"][k], q["image"][k], "{k} (flat={flat})");
        }
        // Every key QEMU gives the image (and its backing image), we give.
        let missing = |x: &Value, y: &Value| -> Vec<String> {
            keys(y).into_iter().filter(|k| x.get(k).is_none()).collect()
        };
        assert_eq!(
            missing(&a["image"], &q["image"]),
            Vec::<String>::new(),
            "flat={flat}"
        );
        if flat {
            assert!(a["image"].get("backing-image").is_none());
        } else {
            let (ab, qb) = (&a["image"]["backing-image"], &q["image"]["backing-image"]);
            assert_eq!(ab["filename"], qb["filename"]);
            assert_eq!(missing(ab, qb), Vec::<String>::new());
        }
    }
    assert_eq!(ours.execute("quit", Value::Null)["return"], json!({}));
    assert!(child.wait().unwrap().success());
    theirs.execute("quit", Value::Null);
    let _ = qsd.wait();
}
