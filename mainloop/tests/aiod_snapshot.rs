//! The backing-chain lifecycle over QMP, checked with QEMU's tools:
//! `blockdev-snapshot`, `blockdev-snapshot-sync`, `transaction`,
//! `blockdev-create`, `drive-mirror`, `drive-backup`, and `block-commit` /
//! `block-stream` naming chain members by file name.

mod util;

use std::path::Path;
use std::process::{Child, Command};

use serde_json::{json, Value};
use util::aiod::{create_qcow2, qemu_img, start_aiod, wait_exit};
use util::QmpClient;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn qemu_io(cmd: &str, img: &Path) {
    let out = Command::new("qemu-io")
        .args(["-c", cmd, p(img)])
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

/// `qemu-img compare`: whether the two images read the same.
fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", p(a), p(b)])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {a:?} {b:?}: {out:?}"),
    }
}

/// `qemu-img info --backing-chain`: the file names, top first.
fn chain_of(img: &Path) -> Vec<String> {
    let out = qemu_img(&["info", "--backing-chain", "--output=json", p(img)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect()
}

fn info(img: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", p(img)])).unwrap()
}

fn create(img: &Path, size: &str) {
    create_qcow2(img, size, None);
}

/// An `aiod` and a negotiated client.
struct Daemon {
    child: Child,
    c: QmpClient,
}

impl Daemon {
    fn start(d: &Path) -> Daemon {
        let sock = d.join("qmp.sock");
        let child = start_aiod(&sock, &[]);
        let mut c = QmpClient::connect_unix(&sock);
        c.negotiate();
        Daemon { child, c }
    }

    fn add(&mut self, name: &str, img: &Path, backing: Option<Value>) {
        let mut a = json!({"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": p(img)}});
        if let Some(b) = backing {
            a["backing"] = b;
        }
        self.c.ok("blockdev-add", a);
    }

    /// `(node-name, backing_file, backing_file_depth)` of the format nodes,
    /// sorted.
    fn nodes(&mut self) -> Vec<(String, Option<String>, u64)> {
        let r = self.c.ok("query-named-block-nodes", Value::Null);
        let mut v: Vec<_> = r
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["drv"] != "file")
            .map(|n| {
                (
                    n["node-name"].as_str().unwrap().to_string(),
                    n["backing_file"].as_str().map(str::to_string),
                    n["backing_file_depth"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Every node, as `query-named-block-nodes` returns them.
    fn all_nodes(&mut self) -> Value {
        self.c.ok("query-named-block-nodes", Value::Null)
    }

    /// The error desc of a command expected to fail.
    fn fails(&mut self, cmd: &str, args: Value) -> String {
        let (class, desc) = self.c.err(cmd, args);
        assert_eq!(class, "GenericError", "{cmd}: {desc}");
        desc
    }

    /// Events of job `id` until it reaches `last` (`null` or `concluded`):
    /// statuses as `status:X`, other events by name. READY jobs are
    /// completed.
    fn job_events(&mut self, id: &str, last: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let ev = self.c.recv_event();
            let name = ev["event"].as_str().unwrap().to_string();
            let data = &ev["data"];
            if data["id"] != id && data["device"] != id {
                continue;
            }
            if name == "JOB_STATUS_CHANGE" {
                let st = data["status"].as_str().unwrap().to_string();
                seen.push(format!("status:{st}"));
                if st == last {
                    return seen;
                }
            } else {
                if name == "BLOCK_JOB_READY" {
                    self.c.ok("block-job-complete", json!({"device": id}));
                }
                assert!(data.get("error").is_none(), "{ev}");
                seen.push(name);
            }
        }
    }

    fn quit(mut self) {
        self.c.ok("quit", Value::Null);
        assert_eq!(wait_exit(&mut self.child).code(), Some(0));
    }
}

impl Drop for Daemon {
    /// A failed test does not leave its daemon running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const JOB_OK: [&str; 7] = [
    "status:created",
    "status:running",
    "status:waiting",
    "status:pending",
    "BLOCK_JOB_COMPLETED",
    "status:concluded",
    "status:null",
];

#[test]
fn snapshots_make_chains_qemu_reads_and_commit_and_stream_by_file_name_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, s1, s2, s3) = (
        d.join("base.qcow2"),
        d.join("s1.qcow2"),
        d.join("s2.qcow2"),
        d.join("s3.qcow2"),
    );
    create(&base, "4M");
    qemu_io("write -P 0x42 0 1M", &base);
    // An overlay made by qemu-img without a backing file, for blockdev-snapshot.
    create(&s2, "4M");

    let mut a = Daemon::start(d);
    a.add("base", &base, None);
    a.c.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "base", "snapshot-file": p(&s1), "snapshot-node-name": "s1"}),
    );
    a.add("s2", &s2, Some(Value::Null));
    a.c.ok("blockdev-snapshot", json!({"node": "s1", "overlay": "s2"}));
    let nodes = a.nodes();
    assert!(
        nodes.contains(&("s2".into(), Some(p(&s1).into()), 2)),
        "{nodes:?}"
    );
    assert!(nodes.contains(&("s1".into(), Some(p(&base).into()), 1)));
    a.quit();

    // The headers record the chain: qemu-img follows it.
    assert_eq!(chain_of(&s2), [p(&s2), p(&s1), p(&base)]);
    assert_eq!(info(&s2)["backing-filename-format"], "qcow2");
    assert_eq!(info(&s1)["backing-filename-format"], "qcow2");
    for img in [&base, &s1, &s2] {
        qemu_img(&["check", "-q", p(img)]);
    }
    assert!(same_content(&s2, &base));

    // Guest writes land in the overlays (offline, with qemu-io).
    qemu_io("write -P 0x66 2M 512k", &s1);
    qemu_io("write -P 0x55 1M 1536k", &s2);
    let reference = d.join("ref.raw");
    qemu_img(&["convert", "-O", "raw", p(&s2), p(&reference)]);

    // Reopen the chain (nested, so that every layer is writable: a commit
    // cannot reopen a read-only base); commit s1 into base and stream into
    // a new snapshot, naming chain members by file name.
    let layer = |name: &str, img: &Path, backing: Value| {
        json!({"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": p(img)}, "backing": backing})
    };
    let mut b = Daemon::start(d);
    b.c.ok(
        "blockdev-add",
        layer(
            "s2",
            &s2,
            layer("s1", &s1, layer("base", &base, Value::Null)),
        ),
    );
    b.c.ok(
        "block-commit",
        json!({"job-id": "c", "device": "s2", "top": p(&s1), "base": p(&base)}),
    );
    assert_eq!(b.job_events("c", "null"), JOB_OK);
    b.c.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "s2", "snapshot-file": p(&s3), "snapshot-node-name": "s3"}),
    );
    b.c.ok(
        "block-stream",
        json!({"job-id": "s", "device": "s3", "base": p(&base)}),
    );
    assert_eq!(b.job_events("s", "null"), JOB_OK);
    b.quit();

    assert_eq!(chain_of(&s3), [p(&s3), p(&base)]);
    for img in [&base, &s3] {
        qemu_img(&["check", "-q", p(img)]);
    }
    assert!(same_content(&s3, &reference));
}

/// Sizes and contents of every file in `d` (except the socket).
fn files(d: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e != "sock"))
        .map(|f| {
            (
                f.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&f).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_transaction_changes_all_disks_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a_img, b_img, c_img, ovb) = (
        d.join("a.qcow2"),
        d.join("b.qcow2"),
        d.join("c.qcow2"),
        d.join("ovb.qcow2"),
    );
    create(&a_img, "4M");
    create(&b_img, "4M");
    create(&c_img, "4M");
    create_qcow2(&ovb, "", Some(&c_img));
    let mut x = Daemon::start(d);
    x.add("a", &a_img, None);
    x.add("b", &b_img, None);
    x.add("ovb", &ovb, None);
    let sync = |node: &str, file: &Path, name: &str| {
        json!({"type": "blockdev-snapshot-sync", "data": {"node-name": node,
            "snapshot-file": p(file), "snapshot-node-name": name}})
    };
    let (a1, b1) = (d.join("a1.qcow2"), d.join("b1.qcow2"));
    let nodes_before = x.all_nodes();
    let files_before = files(d);

    // The second action fails while creating its image...
    let desc = x.fails(
        "transaction",
        json!({"actions": [sync("a", &a1, "a1"), sync("b", &d.join("no/b1.qcow2"), "b1")]}),
    );
    assert_eq!(
        desc,
        format!(
            "Could not create '{}': No such file or directory",
            p(&d.join("no/b1.qcow2"))
        )
    );
    // ... in its overlay checks ...
    let desc = x.fails(
        "transaction",
        json!({"actions": [sync("a", &a1, "a1"),
            {"type": "blockdev-snapshot", "data": {"node": "b", "overlay": "ovb"}}]}),
    );
    assert_eq!(desc, "The overlay already has a backing image");
    // ... or on the same node as the first, which is no longer a root.
    let desc = x.fails(
        "transaction",
        json!({"actions": [sync("a", &a1, "a1"), sync("a", &b1, "b1")]}),
    );
    assert_eq!(desc, "Node 'a' is busy: node is used as backing hd of 'a1'");
    // Bad arguments are found before anything runs.
    let desc = x.fails(
        "transaction",
        json!({"actions": [sync("a", &a1, "a1"), {"type": "blockdev-snapshot", "data": {"overlay": "x"}}]}),
    );
    assert_eq!(desc, "Parameter 'actions[1].data.node' is missing");
    let desc = x.fails(
        "transaction",
        json!({"actions": [{"type": "bogus", "data": {}}]}),
    );
    assert_eq!(desc, "Parameter 'type' does not accept value 'bogus'");
    let desc = x.fails(
        "transaction",
        json!({"actions": [sync("a", &a1, "a1")], "properties": {"completion-mode": "grouped"}}),
    );
    assert_eq!(
        desc,
        "Action 'blockdev-snapshot-sync' does not support transaction property completion-mode = grouped"
    );
    // Nothing changed: no node, no file, no byte.
    assert_eq!(x.all_nodes(), nodes_before);
    assert_eq!(files(d), files_before);

    // Both succeed together.
    x.c.ok(
        "transaction",
        json!({"actions": [sync("a", &a1, "a1"), sync("b", &b1, "b1")]}),
    );
    let nodes = x.nodes();
    assert!(
        nodes.contains(&("a1".into(), Some(p(&a_img).into()), 1)),
        "{nodes:?}"
    );
    assert!(
        nodes.contains(&("b1".into(), Some(p(&b_img).into()), 1)),
        "{nodes:?}"
    );
    x.c.ok("transaction", json!({"actions": []}));
    x.quit();
    assert_eq!(chain_of(&a1), [p(&a1), p(&a_img)]);
    assert_eq!(chain_of(&b1), [p(&b1), p(&b_img)]);
    qemu_img(&["check", "-q", p(&a1)]);
}

#[test]
fn bad_snapshot_requests_are_refused_with_qemus_texts_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, ov, ovb, other, plain) = (
        d.join("base.qcow2"),
        d.join("ov.qcow2"),
        d.join("ovb.qcow2"),
        d.join("other.qcow2"),
        d.join("plain.img"),
    );
    create(&base, "4M");
    qemu_io("write -P 0x42 0 1M", &base);
    create(&ov, "4M");
    create(&other, "4M");
    create(&ovb, "4M");
    qemu_img(&["create", "-q", "-f", "raw", p(&plain), "4M"]);
    let mut x = Daemon::start(d);
    x.add("base", &base, None);
    x.add("ov", &ov, Some(Value::Null));
    x.add("other", &other, None);
    x.add("ovb", &ovb, Some(json!("other")));
    let nodes_before = x.all_nodes();
    let files_before = files(d);
    let snap = |node: &str, overlay: &str| json!({"node": node, "overlay": overlay});
    let cases = [
        (
            "blockdev-snapshot",
            snap("nosuch", "ov"),
            "Cannot find device='nosuch' nor node-name='nosuch'".to_string(),
        ),
        (
            "blockdev-snapshot",
            snap("base", "nosuch"),
            "Cannot find device='nosuch' nor node-name='nosuch'".into(),
        ),
        (
            "blockdev-snapshot",
            snap("base", "ovb"),
            "The overlay already has a backing image".into(),
        ),
        (
            "blockdev-snapshot",
            snap("base", "base"),
            "Making 'base' a backing child of 'base' would create a cycle".into(),
        ),
        // A backing node is not a root: its overlay would hide it from ovb.
        (
            "blockdev-snapshot",
            snap("other", "ov"),
            "Node 'other' is busy: node is used as backing hd of 'ovb'".into(),
        ),
        (
            "blockdev-snapshot",
            json!({"node": "base"}),
            "Parameter 'overlay' is missing".into(),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "nosuch", "snapshot-file": p(&d.join("n.qcow2"))}),
            "Cannot find device='' nor node-name='nosuch'".into(),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&d.join("n.qcow2"))}),
            "New overlay node-name missing".into(),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&d.join("n.qcow2")), "snapshot-node-name": "ov"}),
            "New overlay node-name already in use".into(),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&d.join("missing.qcow2")),
            "snapshot-node-name": "n", "mode": "existing"}),
            format!(
                "Could not open '{}': No such file or directory",
                p(&d.join("missing.qcow2"))
            ),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&d.join("n.raw")),
            "snapshot-node-name": "n", "format": "raw"}),
            "Backing file not supported for file format 'raw'".into(),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&d.join("n.qcow2")),
            "snapshot-node-name": "n", "format": "vmdk"}),
            "Unknown file format 'vmdk'".into(),
        ),
        // The node's own file, or another open image: never overwritten.
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&base), "snapshot-node-name": "n"}),
            "Error: Trying to create an image with the same filename as the backing file".into(),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&ov), "snapshot-node-name": "n"}),
            format!(
                "Could not create '{}': the file is in use by node 'ov'",
                p(&ov)
            ),
        ),
        // An existing image opened with mode=existing that has no backing
        // support (raw): the overlay is closed again.
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "base", "snapshot-file": p(&plain), "snapshot-node-name": "n",
            "mode": "existing", "format": "raw"}),
            "The overlay does not support backing images".into(),
        ),
    ];
    for (cmd, args, want) in cases {
        let desc = x.fails(cmd, args.clone());
        assert_eq!(desc, want, "{cmd} {args}");
    }
    assert_eq!(x.all_nodes(), nodes_before);
    assert_eq!(files(d), files_before);
    x.quit();
    qemu_img(&["check", "-q", p(&base)]);
}

const CREATE_OK: [&str; 5] = [
    "status:created",
    "status:running",
    "status:waiting",
    "status:pending",
    "status:concluded",
];

#[test]
fn blockdev_create_jobs_give_qemus_events_and_images_qemu_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, img) = (d.join("new.raw"), d.join("new.qcow2"));
    let mut x = Daemon::start(d);
    x.c.ok(
        "blockdev-create",
        json!({"job-id": "c1", "options": {"driver": "file", "filename": p(&raw),
            "size": 4 << 20, "preallocation": "full"}}),
    );
    assert_eq!(x.job_events("c1", "concluded"), CREATE_OK);
    let jobs = x.c.ok("query-jobs", Value::Null);
    assert_eq!(
        jobs,
        json!([{"id": "c1", "type": "create", "status": "concluded",
            "current-progress": 1, "total-progress": 1}])
    );
    assert_eq!(x.c.ok("query-block-jobs", Value::Null), json!([]));
    assert_eq!(
        x.c.err("block-job-dismiss", json!({"id": "c1"})),
        ("DeviceNotActive".into(), "Block job 'c1' not found".into())
    );
    x.c.ok("job-dismiss", json!({"id": "c1"}));
    assert_eq!(x.job_events("c1", "null"), ["status:null"]);
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0u8; 4 << 20]);

    // qcow2 into an opened file node, with a backing file.
    x.c.ok(
        "blockdev-create",
        json!({"job-id": "c2", "options": {"driver": "file", "filename": p(&img), "size": 0}}),
    );
    assert_eq!(x.job_events("c2", "concluded"), CREATE_OK);
    x.c.ok("job-dismiss", json!({"id": "c2"}));
    x.c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": p(&img)}),
    );
    x.c.ok(
        "blockdev-create",
        json!({"job-id": "c3", "options": {"driver": "qcow2", "file": "f", "size": 4 << 20,
            "cluster-size": 4096, "backing-file": p(&raw), "backing-fmt": "raw"}}),
    );
    assert_eq!(x.job_events("c3", "concluded"), CREATE_OK);
    x.c.ok("job-dismiss", json!({"id": "c3"}));
    // The new image opens on the same file node.
    x.c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "f", "backing": null}),
    );
    let nodes = x.all_nodes();
    let q = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap();
    assert_eq!(q["image"]["cluster-size"], 4096);

    // Failures inside the job: aborting, the error in query-jobs.
    let missing = d.join("no/x.raw");
    x.c.ok(
        "blockdev-create",
        json!({"job-id": "c4", "options": {"driver": "file", "filename": p(&missing), "size": 1024}}),
    );
    assert_eq!(
        x.job_events("c4", "concluded"),
        [
            "status:created",
            "status:running",
            "status:aborting",
            "status:concluded"
        ]
    );
    let jobs = x.c.ok("query-jobs", Value::Null);
    assert_eq!(
        jobs[0]["error"],
        format!(
            "Could not create '{}': No such file or directory",
            p(&missing)
        )
    );
    x.c.ok("job-dismiss", json!({"id": "c4"}));
    // The file node is in use by q: the job cannot write it.
    x.c.ok(
        "blockdev-create",
        json!({"job-id": "c5", "options": {"driver": "qcow2", "file": "f", "size": 1 << 20}}),
    );
    assert_eq!(x.job_events("c5", "concluded")[2], "status:aborting");
    x.c.ok("job-dismiss", json!({"id": "c5"}));
    // What our creator cannot do is refused before any job exists.
    for (opt, val, what) in [
        ("compression-type", json!("zstd"), "compression-type=zstd"),
        ("encrypt", json!({"format": "luks"}), "encryption"),
    ] {
        let mut o = json!({"driver": "qcow2", "file": "f", "size": 1 << 20});
        o[opt] = val;
        let desc = x.fails("blockdev-create", json!({"job-id": "c6", "options": o}));
        assert_eq!(desc, format!("qcow2 creation: {what} is not supported"));
    }
    let desc = x.fails(
        "blockdev-create",
        json!({"job-id": "c6", "options": {"driver": "vdi", "file": "f", "size": 1}}),
    );
    assert_eq!(desc, "Parameter 'driver' does not accept value 'vdi'");
    assert_eq!(x.c.ok("query-jobs", Value::Null), json!([]));
    x.c.ok("blockdev-del", json!({"node-name": "q"}));
    x.quit();

    let i = info(&img);
    assert_eq!(i["cluster-size"], 4096);
    assert_eq!(i["virtual-size"], 4 << 20);
    assert_eq!(i["backing-filename"], p(&raw));
    assert_eq!(i["backing-filename-format"], "raw");
    qemu_img(&["check", "-q", p(&img)]);
}

const MIRROR_OK: [&str; 9] = [
    "status:created",
    "status:running",
    "status:ready",
    "BLOCK_JOB_READY",
    "status:waiting",
    "status:pending",
    "BLOCK_JOB_COMPLETED",
    "status:concluded",
    "status:null",
];

#[test]
fn drive_mirror_and_drive_backup_create_targets_that_read_as_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, src) = (d.join("base.qcow2"), d.join("src.qcow2"));
    create(&base, "4M");
    qemu_io("write -P 0x42 0 2M", &base);
    create_qcow2(&src, "", Some(&base));
    qemu_io("write -P 0x55 1M 2M", &src);
    let (full, bk, top) = (d.join("m.qcow2"), d.join("b.qcow2"), d.join("t.qcow2"));
    let mut x = Daemon::start(d);
    x.add("src", &src, None);
    let files_before = files(d);
    // Bad input first: nothing is created or opened.
    let nodes_before = x.all_nodes();
    let desc = x.fails(
        "drive-mirror",
        json!({"device": "src", "target": p(&d.join("gone.qcow2")), "sync": "full",
            "mode": "existing"}),
    );
    assert_eq!(
        desc,
        format!(
            "Could not open '{}': No such file or directory",
            p(&d.join("gone.qcow2"))
        )
    );
    let desc = x.fails(
        "drive-backup",
        json!({"device": "src", "target": p(&src), "sync": "full"}),
    );
    assert_eq!(
        desc,
        format!(
            "Could not create '{}': the file is in use by node 'src'",
            p(&src)
        )
    );
    let desc = x.fails(
        "drive-backup",
        json!({"device": "src", "target": p(&bk), "sync": "incremental"}),
    );
    assert_eq!(
        desc,
        "must provide a valid bitmap name for 'incremental' sync mode"
    );
    let desc = x.fails(
        "drive-mirror",
        json!({"device": "nosuch", "target": p(&full), "sync": "full"}),
    );
    assert_eq!(desc, "Cannot find device='nosuch' nor node-name='nosuch'");
    assert_eq!(x.all_nodes(), nodes_before);
    assert_eq!(files(d), files_before);

    x.c.ok(
        "drive-mirror",
        json!({"job-id": "m", "device": "src", "target": p(&full), "sync": "full",
            "node-name": "m"}),
    );
    assert_eq!(x.job_events("m", "null"), MIRROR_OK);
    x.c.ok(
        "drive-backup",
        json!({"job-id": "b", "device": "src", "target": p(&bk), "sync": "full"}),
    );
    assert_eq!(x.job_events("b", "null"), JOB_OK);
    x.c.ok(
        "drive-backup",
        json!({"job-id": "t", "device": "src", "target": p(&top), "sync": "top"}),
    );
    assert_eq!(x.job_events("t", "null"), JOB_OK);
    // drive-backup targets are closed when their job ends.
    util::wait_until("backup targets closed", || {
        let n = x.all_nodes();
        !n.as_array()
            .unwrap()
            .iter()
            .any(|n| n["file"] == p(&bk) || n["file"] == p(&top))
    });
    x.c.ok("blockdev-del", json!({"node-name": "m"}));
    x.quit();

    for img in [&full, &bk, &top] {
        qemu_img(&["check", "-q", p(img)]);
        assert!(same_content(img, &src), "{img:?}");
    }
    assert_eq!(chain_of(&full), [p(&full)]);
    assert_eq!(chain_of(&top), [p(&top), p(&base)]);
}

/// `qemu-img info`'s facts that creation options decide.
fn created_facts(img: &Path) -> Value {
    let i = info(img);
    let mut f = i["format-specific"]["data"].clone();
    f["cluster-size"] = i["cluster-size"].clone();
    f["virtual-size"] = i["virtual-size"].clone();
    f
}

#[test]
fn blockdev_create_qcow2_options_make_the_images_qemu_img_makes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut x = Daemon::start(d);
    let cases = [
        (
            json!({"refcount-bits": 8, "lazy-refcounts": true}),
            "refcount_bits=8,lazy_refcounts=on",
        ),
        (
            json!({"refcount-bits": 1, "cluster-size": 4096}),
            "refcount_bits=1,cluster_size=4096",
        ),
        (json!({"refcount-bits": 64}), "refcount_bits=64"),
        (
            json!({"preallocation": "metadata"}),
            "preallocation=metadata",
        ),
        (
            json!({"preallocation": "falloc", "cluster-size": 65536}),
            "preallocation=falloc",
        ),
        (
            json!({"extended-l2": true, "cluster-size": 131072}),
            "extended_l2=on,cluster_size=128k",
        ),
        (
            json!({"preallocation": "full", "refcount-bits": 32}),
            "preallocation=full,refcount_bits=32",
        ),
    ];
    for (i, (opts, qemu_opts)) in cases.iter().enumerate() {
        let (ours, theirs) = (d.join(format!("o{i}.qcow2")), d.join(format!("q{i}.qcow2")));
        let size = 3 << 20;
        x.c.ok(
            "blockdev-create",
            json!({"job-id": "f", "options": {"driver": "file", "filename": p(&ours), "size": 0}}),
        );
        assert_eq!(x.job_events("f", "concluded"), CREATE_OK);
        x.c.ok("job-dismiss", json!({"id": "f"}));
        let node = format!("f{i}");
        x.c.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": node, "filename": p(&ours)}),
        );
        let mut o = json!({"driver": "qcow2", "file": node, "size": size});
        for (k, v) in opts.as_object().unwrap() {
            o[k] = v.clone();
        }
        x.c.ok("blockdev-create", json!({"job-id": "q", "options": o}));
        assert_eq!(x.job_events("q", "concluded"), CREATE_OK, "{opts}");
        x.c.ok("job-dismiss", json!({"id": "q"}));
        x.c.ok("blockdev-del", json!({"node-name": node}));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            qemu_opts,
            p(&theirs),
            &size.to_string(),
        ]);
        assert_eq!(created_facts(&ours), created_facts(&theirs), "{opts}");
        qemu_img(&["check", "-q", p(&ours)]);
        // The same allocation, as `qemu-img map` shows it.
        let map = |img: &Path| -> Vec<(bool, bool, bool)> {
            let m: Value =
                serde_json::from_str(&qemu_img(&["map", "--output=json", p(img)])).unwrap();
            m.as_array()
                .unwrap()
                .iter()
                .map(|e| (e["present"] == true, e["zero"] == true, e["data"] == true))
                .collect()
        };
        assert_eq!(map(&ours), map(&theirs), "{opts}");
        // Preallocated images take writes in place, and QEMU reads them.
        qemu_io("write -P 0x33 4k 64k", &ours);
        qemu_io("write -P 0x33 4k 64k", &theirs);
        qemu_img(&["compare", "-q", p(&ours), p(&theirs)]);
    }
    for (n, (opts, want)) in [
        (json!({"refcount-bits": 3}), "Refcount width must be a power of two and may not exceed 64 bits"),
        (json!({"refcount-bits": 8, "version": "v2"}),
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"),
        (json!({"extended-l2": true, "cluster-size": 4096}),
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
        (json!({"lazy-refcounts": true, "version": "v2"}),
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
    ]
    .into_iter()
    .enumerate()
    {
        let job = format!("b{n}");
        let img = d.join("bad.qcow2");
        std::fs::write(&img, b"").unwrap();
        x.c.ok("blockdev-add", json!({"driver": "file", "node-name": "bad", "filename": p(&img)}));
        let mut o = json!({"driver": "qcow2", "file": "bad", "size": 1 << 20});
        for (k, v) in opts.as_object().unwrap() {
            o[k] = v.clone();
        }
        x.c.ok("blockdev-create", json!({"job-id": job, "options": o}));
        assert_eq!(x.job_events(&job, "concluded")[2], "status:aborting");
        let jobs = x.c.ok("query-jobs", Value::Null);
        assert_eq!(jobs[0]["error"], want, "{opts}");
        x.c.ok("job-dismiss", json!({"id": job}));
        x.c.ok("blockdev-del", json!({"node-name": "bad"}));
    }
    x.quit();
}
