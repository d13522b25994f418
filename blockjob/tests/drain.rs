//! Drained sections: waiting out requests on a node and its parents,
//! listeners told once per outermost section, external clients off.

mod common;
use common::*;

use std::sync::{Arc, Mutex};

use aio::ClientType;
use blockjob::block::{BlockGraph, DrainListener, DrainOptions};
use serde_json::json;

#[derive(Default)]
struct Log(Mutex<Vec<&'static str>>);

impl DrainListener for Log {
    fn drained_begin(&self) {
        self.0.lock().unwrap().push("begin");
    }
    fn drained_end(&self) {
        self.0.lock().unwrap().push("end");
    }
}

#[test]
fn draining_a_file_node_waits_for_the_requests_of_its_qcow2_parent() {
    let d = tmp();
    let img = path(&d, "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let q = ctx
        .block_on(g.blockdev_add(&json!({"driver": "qcow2", "node-name": "q",
            "file": {"driver": "file", "node-name": "f", "filename": p(&img)}})))
        .unwrap();
    let f = q.file_child().unwrap();
    let log = Arc::new(Log::default());
    let _listening = q.add_drain_listener(log.clone());
    ctx.block_on(async {
        let writes: Vec<_> = (0..8u64)
            .map(|i| {
                let q = q.clone();
                aio::AioContext::current()
                    .unwrap()
                    .spawn(async move { q.write(i << 22, vec![i as u8 + 1; 4 << 20]).await })
            })
            .collect();
        for _ in 0..100 {
            if q.in_flight() > 0 {
                break;
            }
            aio::yield_now().await;
        }
        assert!(q.in_flight() > 0, "the writes have started");
        let drained = g.drained_begin(&f, &DrainOptions::new()).await.unwrap();
        assert_eq!((q.in_flight(), f.in_flight()), (0, 0));
        assert!(q.is_drained() && f.is_drained());
        let names: Vec<&str> = drained.nodes().iter().map(|n| n.name()).collect();
        assert_eq!(names, ["f", "q"]);
        assert!(aio::AioContext::current()
            .unwrap()
            .is_client_disabled(ClientType::EXTERNAL));
        // Nested: the listener hears only the outermost section.
        let inner = g.drained_begin(&q, &DrainOptions::new()).await.unwrap();
        drop(drained);
        assert!(q.is_drained() && !f.is_drained());
        drop(inner);
        assert!(!q.is_drained());
        assert!(!aio::AioContext::current()
            .unwrap()
            .is_client_disabled(ClientType::EXTERNAL));
        for w in writes {
            w.await.unwrap().unwrap();
        }
    });
    assert_eq!(*log.0.lock().unwrap(), ["begin", "end"]);
    // Every write landed.
    ctx.block_on(g.close_all()).unwrap();
    let raw = to_raw(&img, d.path());
    for i in 0..8usize {
        assert!(raw[i << 22..(i + 1) << 22]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn keep_external_clients_and_late_listeners() {
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    ctx.block_on(async {
        let n = g
            .blockdev_add(&json!({"driver": "null-co", "node-name": "n"}))
            .await
            .unwrap();
        let opts = DrainOptions::new().keep_external_clients(true);
        let drained = g.drained_begin(&n, &opts).await.unwrap();
        assert!(!aio::AioContext::current()
            .unwrap()
            .is_client_disabled(ClientType::EXTERNAL));
        // A listener added inside the section is told it is drained.
        let log = Arc::new(Log::default());
        let guard = n.add_drain_listener(log.clone());
        assert_eq!(*log.0.lock().unwrap(), ["begin"]);
        drop(drained);
        assert_eq!(*log.0.lock().unwrap(), ["begin", "end"]);
        drop(guard);
    });
}

#[test]
fn a_job_pauses_while_its_node_is_drained_and_goes_on_after() {
    use aio::ClockType;
    use blockjob::jobs::{start_stream, StreamArgs};
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let want = dir.path().join("want.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&top), p(&want)]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    add_chain(&ctx, &g, &base, &mid, &top);
    let (reg, log) = registry(ClockType::Virtual);
    let mut args = StreamArgs::new("s", "top");
    args.speed = 1 << 20;
    let job = start_stream(&ctx, &g, &reg, args).unwrap();
    vstep(&ctx, &job, 1_000_000_000);
    let before = job.info().current;
    assert!(before > 0 && before < 4 << 20, "{before}");
    // Drain the bottom of the chain: the whole chain above it is drained,
    // and the job, which uses it, parks.
    let basen = g.find("base").unwrap();
    let drained = ctx
        .block_on(g.drained_begin(&basen, &DrainOptions::new()))
        .unwrap();
    vstep(&ctx, &job, 10_000_000_000);
    assert!(job.info().paused);
    assert_eq!(job.info().current, before, "no progress while drained");
    assert!(
        events(&log).ends_with("created running paused"),
        "{}",
        events(&log)
    );
    drop(drained);
    let info = loop {
        vstep(&ctx, &job, 1_000_000_000);
        let i = job.info();
        if i.status == blockjob::job::JobStatus::Null {
            break i;
        }
    };
    assert_eq!(info.current, 4 << 20);
    assert_eq!(
        events(&log),
        "created running paused running waiting pending BLOCK_JOB_COMPLETED concluded null"
    );
    ctx.block_on(g.close_all()).unwrap();
    assert_same(&top, &want);
    assert_check(&top);
}

/// `close_all` waits for requests in flight: a write that takes 1 ms of
/// virtual time on a slow `null-co` (`latency-ns`) is still running when
/// the close starts, and the close ends only after the write does.
#[test]
fn close_all_waits_for_requests_in_flight() {
    let ctx = aio::AioContext::new().unwrap();
    let g = Arc::new(BlockGraph::new());
    g.set_clock(aio::ClockType::Virtual);
    let n = ctx
        .block_on(
            g.blockdev_add(&json!({"driver": "null-co", "node-name": "slow",
            "size": 1 << 20, "latency-ns": 1_000_000})),
        )
        .unwrap();
    let write = {
        let n = n.clone();
        ctx.spawn(async move { n.write(0, vec![7; 4096]).await })
    };
    let closing = {
        let g = g.clone();
        ctx.spawn(async move { g.close_all().await })
    };
    ctx.virtual_step(999_999);
    assert_eq!(n.in_flight(), 1, "the write sleeps out its latency");
    assert!(!write.is_finished() && !closing.is_finished());
    ctx.virtual_step(1);
    assert!(write.is_finished() && closing.is_finished());
    ctx.block_on(write).unwrap().unwrap();
    ctx.block_on(closing).unwrap().unwrap();
}

#[test]
fn null_co_latency_must_be_an_integer() {
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let e = ctx
        .block_on(
            g.blockdev_add(&json!({"driver": "null-co", "node-name": "n",
            "latency-ns": "1ms"})),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("'latency-ns', expected: integer"),
        "{e}"
    );
}
