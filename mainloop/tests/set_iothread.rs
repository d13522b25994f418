//! `x-blockdev-set-iothread` in process: the node and everything linked to
//! it move to the iothread's context (and back with `null`), jobs then run
//! there, and qemu-storage-daemon's errors for unknown names; a node in use
//! by a job is refused rather than moved under it.

mod util;

use std::process::Command;
use std::sync::{mpsc, Arc};

use blockjob::block::BlockGraph;
use blockjob::job::JobRegistry;
use mainloop::block_qmp::{register_block_commands, BlockState};
use mainloop::job_qmp::register_job_commands;
use mainloop::qmp::QmpServerOptions;
use mainloop::{IOThread, IOThreadOptions};
use serde_json::{json, Value};
use util::TestServer;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn nodes_move_with_their_chain_and_jobs_follow() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = (dir.path().join("b.qcow2"), dir.path().join("t.qcow2"));
    let (bs, ts) = (b.to_str().unwrap(), t.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", bs, "4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", bs, "-F", "qcow2", ts]);
    let io0 = Arc::new(IOThread::spawn("io0", IOThreadOptions::new()).unwrap());
    let (tx, rx) = mpsc::channel();
    let io = io0.clone();
    let srv = TestServer::start(QmpServerOptions::new(), move |server| {
        let mut state = BlockState::new(
            server.context().clone(),
            Arc::new(BlockGraph::new()),
            JobRegistry::new(aio::ClockType::Realtime),
        );
        state.iothreads = Arc::new(
            [("io0".to_string(), io.context().clone())]
                .into_iter()
                .collect(),
        );
        register_block_commands(server, state.clone()).unwrap();
        register_job_commands(server, state.clone()).unwrap();
        tx.send(state).unwrap();
    });
    let state = rx.recv().unwrap();
    let mut c = srv.client();
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base",
            "file": {"driver": "file", "filename": bs, "node-name": "base-file"}}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "base",
            "file": {"driver": "file", "filename": ts}}),
    );
    let on_io0 = |n: &str| state.context_of(n).ptr_eq(io0.context());
    assert!(!on_io0("top") && !on_io0("base"));

    let set = "x-blockdev-set-iothread";
    for (args, want) in [
        (
            json!({"node-name": "nope", "iothread": "io0"}),
            "Failed to find node with node-name='nope'",
        ),
        (
            json!({"node-name": "top", "iothread": "nope"}),
            "Cannot find iothread nope",
        ),
    ] {
        assert_eq!(c.err(set, args).1, want);
    }
    assert_eq!(
        c.err(set, json!({"node-name": "top"})).1,
        "Parameter 'iothread' is missing"
    );

    // Naming the base moves the whole chain, its file nodes included.
    c.ok(set, json!({"node-name": "base", "iothread": "io0"}));
    for n in ["top", "base", "base-file"] {
        assert!(on_io0(n), "{n} did not move");
    }
    // A job on the moved chain runs (on the iothread) to completion.
    c.ok("block-stream", json!({"job-id": "s", "device": "top"}));
    loop {
        let e = c.recv_event();
        if e["event"] == "BLOCK_JOB_COMPLETED" {
            break;
        }
    }
    // Back to the main loop. The stream cut top loose from base, so base
    // is no longer part of top's graph and stays where it is.
    c.ok(set, json!({"node-name": "top", "iothread": Value::Null}));
    assert!(!on_io0("top") && on_io0("base"));

    // A node a job holds is not moved under it. The job must still run
    // when the move is tried: a stream of top would end at once (top has
    // no backing file any more), a mirror at 1 byte/s does not.
    c.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink", "size": 4 << 20}),
    );
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "s2", "device": "top", "target": "sink", "sync": "full",
            "speed": 1}),
    );
    let (_, desc) = c.err(set, json!({"node-name": "top", "iothread": "io0"}));
    assert!(
        desc.contains("cannot change its AioContext") || desc.contains("busy"),
        "{desc}"
    );
    assert!(!on_io0("top"));
    c.ok("block-job-cancel", json!({"device": "s2", "force": true}));
    srv.stop();
}
