//! Asynchronous events: emitted from any thread, delivered in order with
//! timestamps to every negotiated client, never to a client still
//! negotiating.

mod util;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mainloop::qmp::{NoArgs, QmpServerOptions};
use serde_json::{json, Value};
use util::TestServer;

fn timestamp_micros(ev: &Value) -> i64 {
    let ts = &ev["timestamp"];
    let secs = ts["seconds"].as_i64().expect("seconds");
    let us = ts["microseconds"].as_i64().expect("microseconds");
    assert!(secs > 1_577_836_800, "a wall-clock time: {ev}");
    assert!((0..1_000_000).contains(&us), "{ev}");
    secs * 1_000_000 + us
}

#[test]
fn events_from_another_thread_reach_every_negotiated_client_in_order() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let mut clients: Vec<_> = (0..3).map(|_| s.client()).collect();
    let mut pending = s.connect(); // never negotiates
    let emitter = s.server.emitter();
    const N: usize = 300;
    let t = std::thread::spawn(move || {
        for i in 0..N {
            emitter.emit("TEST_EVENT", json!({"seq": i}));
        }
    });
    t.join().unwrap();
    for c in &mut clients {
        let mut last_ts = 0;
        for i in 0..N {
            let ev = c.recv_event();
            assert_eq!(ev["event"], "TEST_EVENT");
            assert_eq!(ev["data"], json!({"seq": i}));
            let ts = timestamp_micros(&ev);
            assert!(ts >= last_ts, "timestamps follow emission order");
            last_ts = ts;
        }
    }
    // Events were written to every client in the same pass, so anything
    // sent to the negotiating client would precede this reply.
    pending.send(&json!({"execute": "query-version", "id": 1}));
    let r = pending.recv_line_json();
    assert_eq!(r["error"]["class"], "CommandNotFound", "got {r}");
    assert!(pending.events.is_empty());
    // After negotiating it gets new events only.
    pending.negotiate();
    s.server.emit_event("AFTER", Value::Null);
    let ev = pending.recv_event();
    assert_eq!(ev["event"], "AFTER");
    assert!(
        ev.get("data").is_none(),
        "no data member when there is none"
    );
}

#[test]
fn events_from_many_threads_keep_each_threads_order() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let mut c = s.client();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let e = s.server.emitter();
            std::thread::spawn(move || {
                for i in 0..100 {
                    e.emit("E", json!({"thread": t, "seq": i}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut next = [0i64; 4];
    let mut last_ts = 0;
    for _ in 0..400 {
        let ev = c.recv_event();
        let t = ev["data"]["thread"].as_u64().unwrap() as usize;
        assert_eq!(ev["data"]["seq"], next[t]);
        next[t] += 1;
        let ts = timestamp_micros(&ev);
        assert!(ts >= last_ts);
        last_ts = ts;
    }
}

#[test]
fn event_emitted_by_a_command_precedes_its_reply() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        let e = srv.emitter();
        srv.register("job-dismiss", move |_: NoArgs| {
            e.emit("JOB_STATUS_CHANGE", json!({"status": "null", "id": "j"}));
            Ok(())
        })
        .unwrap();
    });
    let mut c = s.client();
    let mut other = s.client();
    c.send(&json!({"execute": "job-dismiss", "id": 1}));
    let first = c.recv_line_json();
    assert_eq!(first["event"], "JOB_STATUS_CHANGE", "{first}");
    assert_eq!(c.recv_line_json(), json!({"return": {}, "id": 1}));
    assert_eq!(other.recv_event()["data"]["status"], "null");
}

#[test]
fn subscribers_see_every_event_and_can_unsubscribe() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let id = s.server.subscribe(move |ev| {
        seen2
            .lock()
            .unwrap()
            .push((ev.name.clone(), ev.data.clone(), ev.timestamp));
    });
    let mut c = s.client();
    s.server.emit_event("ONE", json!({"a": 1}));
    s.server.emit_event("TWO", Value::Null);
    assert_eq!(c.recv_event()["event"], "ONE");
    let two = c.recv_event();
    assert_eq!(two["event"], "TWO");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "ONE");
        assert_eq!(seen[0].1, Some(json!({"a": 1})));
        assert_eq!(seen[1].1, None);
        // Clients and subscribers see the same timestamp.
        assert_eq!(
            seen[1].2.seconds,
            two["timestamp"]["seconds"].as_i64().unwrap()
        );
        assert_eq!(
            seen[1].2.microseconds,
            two["timestamp"]["microseconds"].as_i64().unwrap()
        );
    }
    assert!(s.server.unsubscribe(id));
    assert!(!s.server.unsubscribe(id));
    s.server.emit_event("THREE", Value::Null);
    assert_eq!(c.recv_event()["event"], "THREE");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[test]
fn emitter_outliving_the_server_is_harmless() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let e = s.server.emitter();
    let mut c = s.client();
    e.emit("BEFORE", Value::Null);
    assert_eq!(c.recv_event()["event"], "BEFORE");
    drop(c);
    s.stop();
    e.emit("AFTER", Value::Null);
    std::thread::sleep(Duration::from_millis(10));
}
