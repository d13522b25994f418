//! Many clients, and clients that misbehave: they must not disturb each
//! other.

mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aio::ClockType;
use mainloop::qmp::{NoArgs, QmpServerOptions};
use serde_json::{json, Value};
use util::{wait_until, QmpClient, TestServer};

#[test]
fn hundred_clients_at_once_all_get_greetings_and_answers() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    // Connect them all before the server has accepted any.
    let clients: Vec<QmpClient> = (0..100).map(|_| QmpClient::connect_raw(&s.addr)).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                let g = c.recv_line_json();
                assert_eq!(g["QMP"]["capabilities"], json!([]));
                c.negotiate();
                for j in 0..5 {
                    let id = json!({"client": i, "n": j});
                    c.send(&json!({"execute": "query-version", "id": id}));
                    let r = c.recv();
                    assert_eq!(r["id"], id);
                    assert_eq!(r["return"]["qemu"]["major"], 10);
                }
                c
            })
        })
        .collect();
    let clients: Vec<QmpClient> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(s.server.client_count(), 100);
    drop(clients);
    let server = s.server.clone();
    wait_until("every client is gone", || server.client_count() == 0);
}

#[test]
fn client_disconnecting_mid_async_command_does_not_disturb_others() {
    let gate = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicUsize::new(0));
    let (g, f) = (gate.clone(), finished.clone());
    let s = TestServer::start(QmpServerOptions::new(), move |srv| {
        srv.register_async("wait-gate", move |_: NoArgs| {
            let (g, f) = (g.clone(), f.clone());
            async move {
                while !g.load(Ordering::SeqCst) {
                    aio::sleep_ns(ClockType::Realtime, 1_000_000).await;
                }
                f.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"big": "x".repeat(100_000)}))
            }
        })
        .unwrap();
    });
    let mut leaver = s.client();
    let mut stayer = s.client();
    leaver.send(&json!({"execute": "wait-gate", "id": 1}));
    // A queued request behind it, never to be run.
    leaver.send(&json!({"execute": "query-version", "id": 2}));
    std::thread::sleep(Duration::from_millis(20));
    leaver.shutdown();
    drop(leaver);
    // The command keeps running; the other client is served meanwhile.
    for _ in 0..10 {
        assert_eq!(stayer.ok("query-version", Value::Null)["qemu"]["major"], 10);
    }
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    gate.store(true, Ordering::SeqCst);
    // The connection is released once the reply has nowhere to go (EOF was
    // seen, but a peer may only have shut down its writing side, so
    // requests already read still run until a write fails).
    let server = s.server.clone();
    wait_until("the command finished and the leaver is gone", || {
        finished.load(Ordering::SeqCst) == 1 && server.client_count() == 1
    });
    // Its reply went nowhere; the other client still works, and can run
    // the same command.
    assert_eq!(
        stayer.ok("wait-gate", Value::Null)["big"]
            .as_str()
            .unwrap()
            .len(),
        100_000
    );
    assert!(stayer.try_recv_within(Duration::from_millis(20)).is_none());
    assert_eq!(finished.load(Ordering::SeqCst), 2);
}

#[test]
fn slow_reader_is_disconnected_at_the_output_cap_without_blocking_others() {
    let s = TestServer::start(QmpServerOptions::new().max_output_bytes(256 * 1024), |_| {});
    let mut slow = s.client();
    let mut fast = s.client();
    let emitter = s.server.emitter();
    let payload = "p".repeat(1000);
    // ~3 MB in all: far beyond socket buffers plus the cap. Emitted in
    // batches the fast client keeps up with, so only the slow one can hit
    // the cap however loaded the machine is.
    for batch in 0..30 {
        for i in 0..100 {
            emitter.emit("FLOOD", json!({"seq": batch * 100 + i, "pad": payload}));
        }
        for i in 0..100 {
            assert_eq!(fast.recv_event()["data"]["seq"], batch * 100 + i);
        }
    }
    let server = s.server.clone();
    wait_until("the slow client is dropped", || server.client_count() == 1);
    // The slow client reads what was sent before the cap, then EOF.
    assert!(slow.is_closed());
    assert!(fast.ok("query-version", Value::Null).is_object());
}

#[test]
fn client_vanishing_before_its_reply_only_loses_itself() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        srv.register("big", |_: NoArgs| Ok("z".repeat(1 << 20)))
            .unwrap();
    });
    let mut other = s.client();
    for _ in 0..10 {
        let mut c = s.client();
        // Ask for a reply larger than the socket buffers, then vanish: the
        // server's write fails with EPIPE or ECONNRESET.
        c.send(&json!({"execute": "big"}));
        c.shutdown();
        drop(c);
        assert_eq!(other.ok("query-version", Value::Null)["qemu"]["major"], 10);
    }
    let server = s.server.clone();
    wait_until("the vanished clients are gone", || {
        server.client_count() == 1
    });
}

#[test]
fn half_closed_client_still_gets_its_replies() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let mut c = QmpClient::connect_raw(&s.addr);
    c.send_raw(
        b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-version\", \"id\": 9}\n",
    );
    // Like `echo ... | socat`: the write side closes, replies still come.
    c.shutdown_write();
    assert!(c.recv_line_json().get("QMP").is_some());
    assert_eq!(c.recv_line_json(), json!({"return": {}}));
    assert_eq!(c.recv_line_json()["id"], 9);
    assert!(c.is_closed());
}

#[test]
fn pipelined_flood_is_answered_in_order_with_bounded_queueing() {
    let s = TestServer::start(QmpServerOptions::new().max_queued_requests(2), |_| {});
    let mut c = s.client();
    let mut batch = Vec::new();
    for id in 0..2000 {
        batch.extend_from_slice(
            format!("{{\"execute\":\"query-version\",\"id\":{id}}}\n").as_bytes(),
        );
    }
    let mut writer = c.try_clone_writer();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        writer.write_all(&batch).unwrap();
    });
    for id in 0..2000 {
        assert_eq!(c.recv()["id"], id);
    }
    t.join().unwrap();
}
