//! Dirty bitmaps over QMP: `block-dirty-bitmap-*` with qemu-storage-daemon's
//! error texts, counts in `query-named-block-nodes` after guest writes
//! through an NBD export, and clear/enable/disable/merge.

mod util;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use util::aiod::{start_aiod, wait_exit};
use util::{generic, QmpClient};

fn qemu_io(url: &str, ops: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for o in ops {
        args.extend(["-c", *o]);
    }
    args.push(url);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {args:?}: {text}"
    );
}

fn bitmaps(c: &mut QmpClient) -> Value {
    let nodes = c.ok("query-named-block-nodes", Value::Null);
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "disk"))
        .map(|n| n.get("dirty-bitmaps").cloned().unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

fn count(c: &mut QmpClient, name: &str) -> u64 {
    let b = bitmaps(c);
    b.as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .and_then(|x| x["count"].as_u64())
        .unwrap_or(u64::MAX)
}

fn start(d: &Path) -> (std::process::Child, QmpClient, String) {
    let img = d.join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap();
    let (qmp, nbd) = (d.join("qmp.sock"), d.join("nbd.sock"));
    let child = start_aiod(
        &qmp,
        &[
            "--blockdev",
            &format!("driver=file,node-name=disk,filename={}", img.display()),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export",
            "type=nbd,id=e0,node-name=disk,writable=on",
        ],
    );
    let mut c = QmpClient::connect_unix(&qmp);
    c.negotiate();
    let url = format!("nbd+unix:///disk?socket={}", nbd.display());
    (child, c, url)
}

#[test]
fn bitmaps_track_writes_and_answer_like_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut c, url) = start(dir.path());
    assert_eq!(bitmaps(&mut c), Value::Null);

    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "granularity": 512, "disabled": true}),
    );
    assert_eq!(
        bitmaps(&mut c),
        json!([
            {"name": "b1", "recording": false, "persistent": false, "busy": false,
             "granularity": 512, "count": 0},
            {"name": "b0", "recording": true, "persistent": false, "busy": false,
             "granularity": 65536, "count": 0},
        ])
    );

    // Errors, as qemu-storage-daemon words them.
    let cases = [
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b0"}),
            "Bitmap already exists: b0",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "x", "granularity": 1000}),
            "Granularity must be power of 2 and at least 512",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "x", "granularity": 256}),
            "Granularity must be power of 2 and at least 512",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": ""}),
            "Bitmap name cannot be empty",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "nx", "name": "x"}),
            "Cannot find device='nx' nor node-name='nx'",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "x", "persistent": true}),
            "Can't store persistent bitmaps to disk: Operation not supported",
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "disk", "name": "bx"}),
            "Dirty bitmap 'bx' not found",
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "nx", "name": "bx"}),
            "Node 'nx' not found",
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "bx"}),
            "Dirty bitmap 'bx' not found",
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "disk", "name": "bx"}),
            "Dirty bitmap 'bx' not found",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "b0", "bitmaps": ["bx"]}),
            "Dirty bitmap 'bx' not found",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "bx", "bitmaps": ["b1"]}),
            "Dirty bitmap 'bx' not found",
        ),
    ];
    for (cmd, args, text) in cases {
        assert_eq!(c.err(cmd, args.clone()), generic(text), "{cmd} {args}");
    }

    // Guest writes through the export: b0 records, disabled b1 does not.
    qemu_io(&url, &["write 0 1k", "write -z 1M 64k", "discard 2M 4k"]);
    assert_eq!(count(&mut c, "b0"), 3 * 65536);
    assert_eq!(count(&mut c, "b1"), 0);

    c.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "disk", "name": "b1"}),
    );
    qemu_io(&url, &["write 3M 1536"]);
    assert_eq!(count(&mut c, "b1"), 1536);
    assert_eq!(count(&mut c, "b0"), 4 * 65536);

    // Merge b1 (512 B granules) into b0 after clearing b0.
    c.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "disk", "name": "b0"}),
    );
    assert_eq!(count(&mut c, "b0"), 0);
    c.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "disk", "target": "b0", "bitmaps": ["b1"]}),
    );
    assert_eq!(count(&mut c, "b0"), 65536);

    c.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk", "name": "b0"}),
    );
    qemu_io(&url, &["write 0 4k"]);
    assert_eq!(count(&mut c, "b0"), 65536);
    assert_eq!(count(&mut c, "b1"), 1536 + 4096);

    for b in ["b1", "b0"] {
        let args = json!({"node": "disk", "name": b});
        c.ok("block-dirty-bitmap-remove", args);
    }
    assert_eq!(bitmaps(&mut c), Value::Null);

    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?}: {text}");
    text
}

#[test]
fn nbd_offers_the_bitmap_as_a_metadata_context() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut child, mut c, url) = start(d);
    let nbd = d.join("nbd.sock");
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1"}),
    );
    for (b, text) in [
        ("bx", "Bitmap 'bx' is not found"),
        (
            "b0",
            "Enabled bitmap 'b0' incompatible with readonly export",
        ),
    ] {
        let args = json!({"type": "nbd", "id": "e1", "node-name": "disk", "name": "x",
                          "bitmaps": [b]});
        assert_eq!(c.err("block-export-add", args), generic(text));
    }
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk", "name": "bm",
               "writable": true, "bitmaps": ["b0"]}),
    );
    assert_eq!(bitmaps(&mut c)[1]["busy"], json!(true));
    let busy = "Bitmap 'b0' is currently in use by another operation and cannot be used";
    for cmd in ["block-dirty-bitmap-remove", "block-dirty-bitmap-clear"] {
        assert_eq!(
            c.err(cmd, json!({"node": "disk", "name": "b0"})),
            generic(busy)
        );
    }

    qemu_io(&url, &["write 0 1k", "write 1M 64k"]);
    let list = tool("qemu-nbd", &["-L", "-k", nbd.to_str().unwrap()]);
    assert!(list.contains("qemu:dirty-bitmap:b0"), "{list}");
    assert!(!list.contains("qemu:dirty-bitmap:b1"), "{list}");

    // What qemu-img prints against qemu-nbd -B b0: dirty as absent, clean
    // as data.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=bm,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        nbd.display()
    );
    let map = tool("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let map: Value = serde_json::from_str(&map).unwrap();
    let runs: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (0, 65536, false),
            (65536, 983040, true),
            (1 << 20, 65536, false),
            (1114112, 3080192, true),
        ]
    );

    // qemu-img has exited, but the server may not have seen its
    // connection close yet (a safe delete is refused until then, in QEMU
    // too).
    util::wait_until("export deleted", || {
        c.execute("block-export-del", json!({"id": "e1"}))
            .get("return")
            .is_some()
    });
    util::wait_until("bitmap released", || {
        bitmaps(&mut c)[1]["busy"] == json!(false)
    });
    c.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "disk", "name": "b0"}),
    );

    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
}

#[test]
fn transaction_actions_undo_on_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut c, url) = start(dir.path());
    c.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    qemu_io(&url, &["write 0 4k"]);
    let act = |t: &str, name: &str| json!({"type": t, "data": {"node": "disk", "name": name}});
    let merge = json!({"type": "block-dirty-bitmap-merge",
                       "data": {"node": "disk", "target": "b1", "bitmaps": ["b0"]}});
    let failing = json!({"actions": [
        act("block-dirty-bitmap-add", "b1"),
        merge,
        act("block-dirty-bitmap-clear", "b0"),
        act("block-dirty-bitmap-disable", "b0"),
        act("block-dirty-bitmap-remove", "b0"),
        act("block-dirty-bitmap-clear", "bx"),
    ]});
    assert_eq!(
        c.err("transaction", failing),
        generic("Dirty bitmap 'bx' not found")
    );
    assert_eq!(
        bitmaps(&mut c),
        json!([{"name": "b0", "recording": true, "persistent": false, "busy": false,
                "granularity": 65536, "count": 65536}])
    );
    c.ok(
        "transaction",
        json!({"actions": [
            act("block-dirty-bitmap-add", "b1"),
            act("block-dirty-bitmap-clear", "b0"),
            act("block-dirty-bitmap-disable", "b0"),
        ]}),
    );
    qemu_io(&url, &["write 1M 4k"]);
    assert_eq!(count(&mut c, "b0"), 0);
    assert_eq!(count(&mut c, "b1"), 65536);
    let keep = json!({"type": "block-dirty-bitmap-merge",
                      "data": {"node": "disk", "target": "b0", "bitmaps": ["b1"]}});
    c.ok(
        "transaction",
        json!({"actions": [keep, act("block-dirty-bitmap-remove", "b1")]}),
    );
    assert_eq!(count(&mut c, "b0"), 65536);
    assert_eq!(bitmaps(&mut c).as_array().map(Vec::len), Some(1));
    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
}

#[test]
fn export_bitmaps_option_on_the_command_line_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    for spelling in ["bitmaps=b0", "bitmaps.0=b0"] {
        let out = Command::new(util::aiod::AIOD)
            .args([
                "--qmp",
                &format!("unix:{}", d.join("qmp.sock").display()),
                "--blockdev",
                &format!("driver=file,node-name=disk,filename={}", img.display()),
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", d.join("nbd.sock").display()),
                "--export",
                &format!("type=nbd,id=e0,node-name=disk,writable=on,{spelling}"),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spelling}: {err}");
        assert!(
            err.contains("Bitmap 'b0' is not found"),
            "{spelling}: {err}"
        );
    }
}

#[test]
fn job_writes_mark_the_target_bitmap_and_reads_mark_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut child, mut c, url) = start(d);
    qemu_io(&url, &["write -P 0x11 0 64k", "write -P 0x22 2M 4k"]);
    let tgt = d.join("tgt.raw");
    std::fs::File::create(&tgt)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap();
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tgt", "filename": tgt}),
    );
    for (node, b) in [("tgt", "t"), ("disk", "s")] {
        let args = json!({"node": node, "name": b});
        c.ok("block-dirty-bitmap-add", args);
    }
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "disk", "target": "tgt", "sync": "full"}),
    );
    loop {
        let ev = c.recv_event();
        if ev["event"] == "BLOCK_JOB_READY" {
            break;
        }
        assert_ne!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    }
    let nodes = c.ok("query-named-block-nodes", Value::Null);
    let of = |node: &str| {
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .map(|n| n["dirty-bitmaps"][0]["count"].clone())
            .unwrap_or(Value::Null)
    };
    let t = of("tgt").as_u64().unwrap_or(0);
    assert!((2 * 65536..=4 << 20).contains(&t), "target count {t}");
    assert_eq!(of("disk"), json!(0));
    c.ok("block-job-cancel", json!({"device": "m"}));
    c.ok("quit", Value::Null);
    assert!(wait_exit(&mut child).success());
}
