//! Deterministic job suites on `aiod --qtest`: the virtual clock moves only
//! when the test steps it, so a rate-limited job copies exactly what the
//! arithmetic says, pauses and cancels land at known steps, and two runs
//! produce identical event logs.

use std::path::Path;

use qtest::images::Chain;
use qtest::Daemon;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SECOND: i64 = 1_000_000_000;
/// QEMU's stream chunk.
const CHUNK: u64 = 512 << 10;

/// base (32 MiB of data) <- top (empty): streaming copies all 32 MiB.
fn chain(dir: &Path) -> Vec<String> {
    Chain::new(dir, "32M")
        .layer("base", &["write -P 0x5a 0 32M"])
        .layer("top", &[])
        .build()
        .unwrap()
        .blockdev_args()
}

fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let args = chain(dir.path());
    Daemon::spawn_in(dir, &args).unwrap()
}

fn offset(d: &mut Daemon, job: &str) -> Option<u64> {
    let jobs = d.qmp.execute("query-block-jobs", Value::Null).unwrap();
    jobs.as_array()?
        .iter()
        .find(|j| j["device"] == job)
        .and_then(|j| j["offset"].as_u64())
}

/// The burst QEMU's rate limit allows at a slice start: one slice quota
/// (speed / 10) plus one chunk.
fn burst(speed: u64) -> u64 {
    speed / 10 + CHUNK
}

fn rate_limited_stream_copies_speed_bytes_per_virtual_second_run() -> Vec<(i64, String, Value)> {
    let (mut log, mut seen) = (Vec::new(), 0);
    let mut d = daemon();
    let speed = 4 * MIB;
    d.qmp
        .execute(
            "block-stream",
            json!({"job-id": "s0", "device": "top", "speed": speed}),
        )
        .unwrap();
    let start = offset(&mut d, "s0").unwrap();
    assert!(start <= burst(speed), "before any virtual time: {start}");
    for second in 1..=5u64 {
        let now = step(&mut d, Some(SECOND), &mut seen, &mut log);
        assert_eq!(now, second as i64 * SECOND);
        let off = offset(&mut d, "s0").unwrap();
        assert!(
            off.abs_diff(second * speed) <= burst(speed),
            "after {second} s: offset {off}, expected {} ± {}",
            second * speed,
            burst(speed)
        );
    }
    // Unthrottle and finish.
    d.qmp
        .execute("block-job-set-speed", json!({"device": "s0", "speed": 0}))
        .unwrap();
    step(&mut d, Some(1), &mut seen, &mut log);
    let ev = d
        .qmp
        .wait_event("BLOCK_JOB_COMPLETED", |data| data["device"] == "s0")
        .unwrap();
    assert_eq!(ev["data"]["offset"], 32 * MIB);
    collect_events(&mut d, &mut seen, &mut log);
    log
}

#[test]
fn rate_limited_stream_copies_speed_bytes_per_virtual_second() {
    let a = rate_limited_stream_copies_speed_bytes_per_virtual_second_run();
    assert_eq!(
        a,
        rate_limited_stream_copies_speed_bytes_per_virtual_second_run(),
        "the event logs differ between runs"
    );
}

fn pause_holds_progress_across_steps_and_cancel_lands_at_the_next_pause_point_run(
) -> Vec<(i64, String, Value)> {
    let (mut log, mut seen) = (Vec::new(), 0);
    let mut d = daemon();
    let speed = 2 * MIB;
    d.qmp
        .execute(
            "block-stream",
            json!({"job-id": "s1", "device": "top", "speed": speed}),
        )
        .unwrap();
    step(&mut d, Some(SECOND), &mut seen, &mut log);
    d.qmp
        .execute("block-job-pause", json!({"device": "s1"}))
        .unwrap();
    step(&mut d, Some(SECOND / 2), &mut seen, &mut log);
    d.qmp
        .wait_event("JOB_STATUS_CHANGE", |data| data["status"] == "paused")
        .unwrap();
    let held = offset(&mut d, "s1").unwrap();
    for _ in 0..3 {
        step(&mut d, Some(SECOND), &mut seen, &mut log);
        assert_eq!(
            offset(&mut d, "s1").unwrap(),
            held,
            "no progress while paused"
        );
    }
    d.qmp
        .execute("block-job-resume", json!({"device": "s1"}))
        .unwrap();
    step(&mut d, Some(SECOND), &mut seen, &mut log);
    let resumed = offset(&mut d, "s1").unwrap();
    assert!(resumed > held, "progress after resume");
    d.qmp
        .execute("block-job-cancel", json!({"device": "s1"}))
        .unwrap();
    step(&mut d, Some(1), &mut seen, &mut log);
    let ev = d
        .qmp
        .wait_event("BLOCK_JOB_CANCELLED", |data| data["device"] == "s1")
        .unwrap();
    // The cancel landed at the next pause point: at most one more chunk.
    let at_cancel = ev["data"]["offset"].as_u64().unwrap();
    assert!(at_cancel - resumed <= CHUNK, "{at_cancel} vs {resumed}");
    collect_events(&mut d, &mut seen, &mut log);
    log
}

#[test]
fn pause_holds_progress_across_steps_and_cancel_lands_at_the_next_pause_point() {
    let a = pause_holds_progress_across_steps_and_cancel_lands_at_the_next_pause_point_run();
    assert_eq!(
        a,
        pause_holds_progress_across_steps_and_cancel_lands_at_the_next_pause_point_run(),
        "the event logs differ between runs"
    );
}

/// Steps the virtual clock by `ns` (to the next deadline if `None`) and
/// logs the events that arrived; returns the new virtual time.
fn step(
    d: &mut Daemon,
    ns: Option<i64>,
    seen: &mut usize,
    log: &mut Vec<(i64, String, Value)>,
) -> i64 {
    let now = d.qtest.clock_step(ns).unwrap();
    collect_events(d, seen, log);
    now
}

/// Appends the events received since `seen` to `log`, stamped with the
/// current virtual time.
fn collect_events(d: &mut Daemon, seen: &mut usize, log: &mut Vec<(i64, String, Value)>) {
    let now = d.qtest.clock_get().unwrap();
    // Events reach the client asynchronously; query to flush them.
    d.qmp.execute("query-jobs", Value::Null).unwrap();
    for e in &d.qmp.events()[*seen..] {
        log.push((
            now,
            e["event"].as_str().unwrap().to_string(),
            e["data"].clone(),
        ));
    }
    *seen = d.qmp.events().len();
}

/// One scripted run; returns (virtual time, event, data) for every event.
fn scripted_run() -> Vec<(i64, String, Value)> {
    let mut d = daemon();
    d.qmp
        .execute(
            "block-stream",
            json!({"job-id": "s2", "device": "top", "speed": 8 * MIB}),
        )
        .unwrap();
    let mut log = Vec::new();
    let mut seen = 0;
    let mut collect = |d: &mut Daemon, log: &mut Vec<(i64, String, Value)>| {
        collect_events(d, &mut seen, log);
    };
    collect(&mut d, &mut log);
    for step in 1..=8 {
        d.qtest.clock_step(Some(SECOND)).unwrap();
        if step == 2 {
            d.qmp
                .execute("block-job-pause", json!({"device": "s2"}))
                .unwrap();
        }
        if step == 4 {
            d.qmp
                .execute("block-job-resume", json!({"device": "s2"}))
                .unwrap();
        }
        collect(&mut d, &mut log);
    }
    log
}

#[test]
fn two_runs_give_identical_event_logs() {
    let a = scripted_run();
    let b = scripted_run();
    assert!(
        a.iter().any(|(_, e, _)| e == "BLOCK_JOB_COMPLETED"),
        "{a:?}"
    );
    assert_eq!(a, b, "the event logs differ between runs");
}

fn mirror_is_ready_after_the_virtual_time_the_arithmetic_predicts_run() -> Vec<(i64, String, Value)>
{
    let (mut log, mut seen) = (Vec::new(), 0);
    let dir = tempfile::tempdir().unwrap();
    // Two one-layer chains: the source full of data, an empty target.
    let mut args = Chain::new(dir.path(), "8M")
        .layer("src", &["write -P 0x6b 0 8M"])
        .build()
        .unwrap()
        .blockdev_args();
    args.extend(
        Chain::new(dir.path(), "8M")
            .layer("tgt", &[])
            .build()
            .unwrap()
            .blockdev_args(),
    );
    let mut d = Daemon::spawn_in(dir, &args).unwrap();
    let speed = 2 * MIB;
    d.qmp
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full", "speed": speed}),
        )
        .unwrap();
    let len = d.qmp.execute("query-block-jobs", Value::Null).unwrap()[0]["len"]
        .as_u64()
        .unwrap();
    assert_eq!(len, 8 * MIB);
    // len / speed seconds of copying, give or take the burst at each end.
    let predicted = len / speed;
    let mut ready_at = None;
    for second in 1..=predicted + 2 {
        step(&mut d, Some(SECOND), &mut seen, &mut log);
        d.qmp.execute("query-jobs", Value::Null).unwrap();
        if d.qmp
            .events()
            .iter()
            .any(|e| e["event"] == "BLOCK_JOB_READY")
        {
            ready_at = Some(second);
            break;
        }
    }
    let at = ready_at.expect("mirror never became READY");
    assert!(
        at.abs_diff(predicted) <= 1,
        "READY after {at} virtual seconds, predicted {predicted}"
    );
    d.qmp
        .execute("block-job-complete", json!({"device": "m0"}))
        .unwrap();
    step(&mut d, Some(1), &mut seen, &mut log);
    d.qmp
        .wait_event("BLOCK_JOB_COMPLETED", |data| data["device"] == "m0")
        .unwrap();
    collect_events(&mut d, &mut seen, &mut log);
    log
}

#[test]
fn mirror_is_ready_after_the_virtual_time_the_arithmetic_predicts() {
    let a = mirror_is_ready_after_the_virtual_time_the_arithmetic_predicts_run();
    assert_eq!(
        a,
        mirror_is_ready_after_the_virtual_time_the_arithmetic_predicts_run(),
        "the event logs differ between runs"
    );
}

/// base <- top chains named `p`-base / `p`-top, added over QMP, the top
/// optionally on an iothread.
fn add_chain(d: &mut Daemon, p: &str, mib: u64, iothread: Option<&str>) {
    let c = Chain::new(d.dir(), &format!("{mib}M"))
        .layer(&format!("{p}-base"), &[&format!("write -P 0x3c 0 {mib}M")])
        .layer(&format!("{p}-top"), &[])
        .build()
        .unwrap();
    let (base, top) = (
        c.path(&format!("{p}-base")).unwrap(),
        c.path(&format!("{p}-top")).unwrap(),
    );
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    d.qmp
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": format!("{p}-base"),
                "file": {"driver": "file", "filename": b}}),
        )
        .unwrap();
    let mut top = json!({"driver": "qcow2", "node-name": format!("{p}-top"),
        "backing": format!("{p}-base"), "file": {"driver": "file", "filename": t}});
    if let Some(io) = iothread {
        top["iothread"] = json!(io);
    }
    d.qmp.execute("blockdev-add", top).unwrap();
}

/// One scripted run with a stream on an iothread and one on the main loop
/// at different speeds: (virtual time, event, data) for every event, and
/// the iothread job's offset after each virtual second.
fn iothread_run() -> (Vec<(i64, String, Value)>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::spawn_in(dir, &["--object".into(), "iothread,id=io0".into()]).unwrap();
    add_chain(&mut d, "io", 8, Some("io0"));
    add_chain(&mut d, "main", 8, None);
    let speed = 2 * MIB;
    for (job, dev, speed) in [("s-io", "io-top", speed), ("s-main", "main-top", 2 * speed)] {
        d.qmp
            .execute(
                "block-stream",
                json!({"job-id": job, "device": dev, "speed": speed}),
            )
            .unwrap();
    }
    let (mut log, mut offsets, mut seen) = (Vec::new(), Vec::new(), 0);
    for _ in 0..6 {
        d.qtest.clock_step(Some(SECOND)).unwrap();
        offsets.push(offset(&mut d, "s-io").unwrap_or(8 * MIB));
        collect_events(&mut d, &mut seen, &mut log);
    }
    (log, offsets)
}

#[test]
fn jobs_on_an_iothread_follow_the_virtual_clock_and_replay_identically() {
    let (log, offsets) = iothread_run();
    let speed = 2 * MIB;
    // The iothread job copies `speed` per virtual second, like a main-loop job.
    for (i, off) in offsets.iter().take(3).enumerate() {
        let want = (i as u64 + 1) * speed;
        assert!(
            off.abs_diff(want) <= burst(speed),
            "after {} s: offset {off}, expected {want} ± {}",
            i + 1,
            burst(speed)
        );
    }
    let done_at = |dev: &str| {
        log.iter()
            .find(|(_, e, d)| e == "BLOCK_JOB_COMPLETED" && d["device"] == dev)
            .map(|(t, _, _)| *t)
    };
    // 8 MiB at 4 MiB/s finishes in about 2 s; at 2 MiB/s in about 4 s.
    let (m, io) = (done_at("s-main").unwrap(), done_at("s-io").unwrap());
    assert!(m < io, "main job done at {m}, iothread job at {io}");
    assert_eq!(
        (log, offsets),
        iothread_run(),
        "the runs differ between attempts"
    );
}
