//! The filter node each block job inserts above its node (QEMU's
//! `copy-on-read`, `commit_top`, `mirror_top`, `copy-before-write`), as a
//! management layer sees it: the same jobs, with and without
//! `filter-node-name`, started at 1 byte/s on aiod and on
//! qemu-storage-daemon over the same kind of chain, must show the same
//! `query-named-block-nodes` (flat: every key of every node; nested: the
//! chains and depths), the same `query-block-jobs` shape and `query-block`,
//! refuse the same names and `blockdev-del`s with the same texts, emit
//! the same events on cancel and leave the same graph.

mod util;

use std::path::Path;

use serde_json::{json, Value};
use util::aiod::{create_qcow2, qemu_img, qemu_io, start_daemon, wait_exit};
use util::QmpClient;

/// `{"return"}` or the error's description.
fn outcome(c: &mut QmpClient, cmd: &str, args: Value) -> Result<Value, String> {
    let r = c.execute(cmd, args);
    match r.get("error") {
        Some(e) => Err(e["desc"].as_str().unwrap_or_default().to_string()),
        None => Ok(r["return"].clone()),
    }
}

/// Replaces the test directory by `D` and an implicit `#blockN` name by
/// `#blockN` itself, recursively, and drops what depends on allocation
/// (`actual-size`) or on job internals (`dirty-bitmaps`).
fn normalize(v: &Value, dir: &str) -> Value {
    match v {
        Value::String(s) => {
            let s = s.replace(dir, "D");
            let s = match s.strip_prefix("#block") {
                Some(n) if n.parse::<u64>().is_ok() => "#blockN".to_string(),
                _ => s,
            };
            Value::String(s)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| normalize(x, dir)).collect()),
        // A protocol node's size is its file's, which depends on what the
        // job allocated before the cancel.
        Value::Object(o)
            if o.get("format").and_then(Value::as_str) == Some("file")
                && o.contains_key("virtual-size") =>
        {
            let mut o = o.clone();
            o.remove("virtual-size");
            normalize(&Value::Object(o), dir)
        }
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "actual-size" | "dirty-bitmaps"))
                .map(|(k, x)| (k.clone(), normalize(x, dir)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The chain of image formats along the nested `backing-image`s.
fn formats(image: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = Some(image);
    while let Some(i) = cur {
        out.push(i["format"].as_str().unwrap_or("?").to_string());
        cur = i.get("backing-image");
    }
    out
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(|x| x["node-name"].as_str().unwrap_or_default().to_string());
    v
}

/// What a management layer sees of the graph.
fn graph_view(c: &mut QmpClient, dir: &str) -> Value {
    let flat = c.ok("query-named-block-nodes", json!({"flat": true}));
    let flat: Vec<Value> = flat
        .as_array()
        .unwrap()
        .iter()
        .map(|n| normalize(n, dir))
        .collect();
    let nested = c.ok("query-named-block-nodes", json!({}));
    let chains: Vec<Value> = nested
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            normalize(
                &json!({"node-name": n["node-name"], "depth": n["backing_file_depth"],
                    "formats": formats(&n["image"])}),
                dir,
            )
        })
        .collect();
    json!({"flat": sorted(flat), "nested": sorted(chains)})
}

/// A `query-block-jobs` entry: its keys and the values that do not
/// depend on progress.
fn jobs_view(c: &mut QmpClient) -> Value {
    let jobs = c.ok("query-block-jobs", json!({}));
    Value::Array(
        jobs.as_array()
            .unwrap()
            .iter()
            .map(|j| {
                let mut keys: Vec<&String> = j.as_object().unwrap().keys().collect();
                keys.sort();
                json!({"keys": keys, "device": j["device"], "type": j["type"],
                    "speed": j["speed"], "io-status": j["io-status"],
                    "actively-synced": j.get("actively-synced")})
            })
            .collect(),
    )
}

/// `NAME` or `JOB_STATUS_CHANGE:status` with the `BLOCK_JOB_*` payload
/// keys, until job `j` is `null`; the pauses of drained sections (QEMU
/// drains for a `blockdev-del`, which aiod need not) are left out.
fn events_until_null(c: &mut QmpClient) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e = c.recv_event();
        let name = e["event"].as_str().unwrap_or_default().to_string();
        if name == "JOB_STATUS_CHANGE" {
            let st = e["data"]["status"].as_str().unwrap_or_default();
            if !matches!(st, "paused" | "running") {
                out.push(format!("{name}:{st}"));
            }
            if st == "null" {
                return out;
            }
        } else {
            let mut keys: Vec<String> = e["data"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            out.push(format!("{name}{keys:?}"));
        }
    }
}

/// The chain base <- mid <- top (data in each) and a target, in `d`.
fn images(d: &Path) {
    create_qcow2(&d.join("base.qcow2"), "4M", None);
    for (img, back) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        create_qcow2(&d.join(img), "4M", Some(&d.join(back)));
    }
    create_qcow2(&d.join("tgt.qcow2"), "4M", None);
    // Each layer holds less than the one below, so that stream and
    // commit have something to copy.
    for (img, pat, len) in [
        ("base.qcow2", "0x11", "4M"),
        ("mid.qcow2", "0x22", "3M"),
        ("top.qcow2", "0x33", "1M"),
    ] {
        qemu_io(&d.join(img), &format!("write -P {pat} 0 {len}"));
    }
}

fn blockdevs(d: &Path) -> Vec<String> {
    let node = |name: &str, backing: Option<&str>| {
        let mut v = json!({"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "node-name": format!("{name}-f"),
                "filename": d.join(format!("{name}.qcow2"))}});
        if let Some(b) = backing {
            v["backing"] = json!(b);
        } else {
            v["backing"] = Value::Null;
        }
        v.to_string()
    };
    vec![
        node("base", None),
        node("mid", Some("base")),
        node("top", Some("mid")),
        node("tgt", None),
    ]
}

/// The job command and its arguments (at 1 byte/s).
fn job(which: &str, filter: Option<&str>) -> (&'static str, Value) {
    let (cmd, mut args) = match which {
        "stream" => ("block-stream", json!({"device": "top"})),
        "commit" => (
            "block-commit",
            json!({"device": "top", "top-node": "mid", "base-node": "base"}),
        ),
        "active-commit" => ("block-commit", json!({"device": "top"})),
        "mirror" => (
            "blockdev-mirror",
            json!({"device": "top", "target": "tgt", "sync": "full"}),
        ),
        "backup" => (
            "blockdev-backup",
            json!({"device": "top", "target": "tgt", "sync": "full"}),
        ),
        other => panic!("unknown job {other}"),
    };
    args["job-id"] = json!("j");
    args["speed"] = json!(1);
    if let Some(f) = filter {
        args["filter-node-name"] = json!(f);
    }
    (cmd, args)
}

/// One daemon's answers for one job, with or without a filter name.
fn run(daemon: &str, root: &Path, which: &str, filter: Option<&str>) -> Value {
    let d = root.join(format!("{daemon}-{which}-{}", filter.is_some()));
    std::fs::create_dir(&d).unwrap();
    images(&d);
    let dir = d.to_str().unwrap().to_string();
    let sock = d.join("qmp.sock");
    let (mut child, mut c) = start_daemon(daemon, &sock, &blockdevs(&d));
    let (cmd, args) = job(which, filter);
    let mut refused = Vec::new();
    for bad in ["mid", "#x"] {
        let (cmd, args) = job(which, Some(bad));
        refused.push(outcome(&mut c, cmd, args));
    }
    // QEMU creates a commit job before its filter, so a refused
    // block-commit emits `created` and `null` (aiod emits nothing); the
    // replies are compared above, these events are not.
    c.ok("query-block-jobs", json!({}));
    c.events.clear();
    let started = outcome(&mut c, cmd, args);
    let during = graph_view(&mut c, &dir);
    let jobs = jobs_view(&mut c);
    let block = c.ok("query-block", json!({}));
    let filter_name = filter.map(str::to_string).unwrap_or_else(|| {
        c.ok("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .find(|n| n.starts_with('#'))
            .unwrap_or_default()
    });
    let del_filter = outcome(
        &mut c,
        "blockdev-del",
        json!({"node-name": filter_name.clone()}),
    );
    let del_top = outcome(&mut c, "blockdev-del", json!({"node-name": "top"}));
    let cancel = outcome(
        &mut c,
        "block-job-cancel",
        json!({"device": "j", "force": true}),
    );
    let events = events_until_null(&mut c);
    let after = graph_view(&mut c, &dir);
    c.execute("quit", Value::Null);
    assert!(wait_exit(&mut child).success(), "{daemon} exit");
    for img in ["base", "mid", "top", "tgt"] {
        qemu_img(&["check", d.join(format!("{img}.qcow2")).to_str().unwrap()]);
    }
    let del_filter = del_filter.map_err(|e| e.replace(&filter_name, "FILTER"));
    // A known difference: QEMU's backup does not op-block its source, so
    // `blockdev-del` of it meets the filter's reference (`Block device X
    // is in use`); aiod's backup blocks the source like the other jobs.
    let del_top = match (which, daemon, &del_top) {
        ("backup", "aiod", Err(e)) if e.contains("in use by block job: backup") => {
            Err("Block device top is in use".to_string())
        }
        _ => del_top,
    };
    json!({"refused": format!("{refused:?}"), "started": format!("{started:?}"),
        "during": during, "jobs": jobs, "query-block": block,
        "del-filter": format!("{del_filter:?}"), "del-top": format!("{del_top:?}"),
        "cancel": format!("{cancel:?}"), "events": events, "after": after})
}

/// The first place two JSON values differ, for a readable failure.
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &format!("{at}.{k}")),
                (p, q) => Some(format!("{at}.{k}: {p:?} vs {q:?}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{at}[{i}]"))),
        (Value::Array(x), Value::Array(y)) => {
            let names = |v: &Vec<Value>| -> Vec<String> {
                v.iter().map(|n| n["node-name"].to_string()).collect()
            };
            Some(format!("{at}: {:?} vs {:?}", names(x), names(y)))
        }
        _ => (a != b).then(|| format!("{at}: {a} vs {b}")),
    }
}

fn compare(which: &str) {
    let root = tempfile::tempdir().unwrap();
    for filter in [Some("flt"), None] {
        let ours = run("aiod", root.path(), which, filter);
        let qemu = run("qsd", root.path(), which, filter);
        if let Some(d) = first_difference(&ours, &qemu, which) {
            panic!("{which} (filter {filter:?}): aiod vs qemu-storage-daemon differ at {d}\naiod: {ours:#}\nqsd: {qemu:#}");
        }
        // The filter was there, and is gone.
        let during = ours["during"]["flat"].to_string();
        let after = ours["after"]["flat"].to_string();
        let name = filter.unwrap_or("#blockN");
        assert!(
            during.contains(&format!("\"node-name\":\"{name}\"")),
            "{during}"
        );
        assert!(
            !after.contains(&format!("\"node-name\":\"{name}\"")),
            "{after}"
        );
    }
}

#[test]
fn stream_copy_on_read_filter_like_qemu_storage_daemon() {
    compare("stream");
}

#[test]
fn commit_top_filter_like_qemu_storage_daemon() {
    compare("commit");
}

#[test]
fn active_commit_mirror_top_filter_like_qemu_storage_daemon() {
    compare("active-commit");
}

#[test]
fn mirror_top_filter_like_qemu_storage_daemon() {
    compare("mirror");
}

#[test]
fn backup_copy_before_write_filter_like_qemu_storage_daemon() {
    compare("backup");
}

/// The depth (0: top) `qemu-img map` gives the byte at `off` of `img`.
fn depth_at(img: &Path, off: u64) -> u64 {
    let map = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&map).unwrap();
    let e = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s <= off && off < s + l
        })
        .unwrap_or_else(|| panic!("{off} not in {map}"));
    e["depth"].as_u64().unwrap()
}

/// A guest reading the device through an NBD export during a stream:
/// the copy-on-read filter puts what it read into the top (in both
/// daemons); what it did not read stays below.
#[test]
fn a_guest_read_through_an_export_during_a_stream_populates_the_top() {
    let root = tempfile::tempdir().unwrap();
    let mut depths = Vec::new();
    for daemon in ["aiod", "qsd"] {
        let d = root.path().join(daemon);
        std::fs::create_dir(&d).unwrap();
        images(&d);
        let (mut child, mut c) = start_daemon(daemon, &d.join("qmp.sock"), &blockdevs(&d));
        let nbd = d.join("nbd.sock");
        c.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
        );
        c.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "top"}),
        );
        let (cmd, args) = job("stream", Some("cor"));
        c.ok(cmd, args);
        // base's 0x11 at 3.5M, far from where the stream (1 byte/s) is.
        let url = format!("nbd+unix:///top?socket={}", nbd.display());
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0x11 3584k 64k", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("fail"),
            "{daemon}: {text} {err}"
        );
        c.ok("block-job-cancel", json!({"device": "j", "force": true}));
        events_until_null(&mut c);
        // qemu-io has exited; its connection may not be gone yet.
        util::wait_until("export deleted", || {
            c.execute("block-export-del", json!({"id": "e"}))
                .get("return")
                .is_some()
        });
        c.execute("quit", Value::Null);
        assert!(wait_exit(&mut child).success(), "{daemon} exit");
        let top = d.join("top.qcow2");
        qemu_img(&["check", top.to_str().unwrap()]);
        depths.push([depth_at(&top, 3584 << 10), depth_at(&top, 3 << 20)]);
    }
    assert_eq!(depths[0], [0, 2], "aiod: read range copied, the rest not");
    assert_eq!(depths[0], depths[1], "aiod vs qemu-storage-daemon");
}
