//! Listeners and lifecycle: unix socket files (mode, stale and live
//! sockets, removal), TCP, client types, `quit` and shutdown.

mod util;

use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aio::{AioContext, ClientType};
use mainloop::qmp::{ListenAddress, QmpAddress, QmpServer, QmpServerOptions, ServerError};
use serde_json::{json, Value};
use util::{QmpClient, TestServer};

#[test]
fn unix_socket_has_mode_0600_and_is_removed_on_drop() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let path = s.socket_path().unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1,
        "no temporary files left next to the socket"
    );
    let mut c = s.client();
    assert!(c.ok("query-version", Value::Null).is_object());
    let server = s.server.clone();
    assert_eq!(
        server.listen_addresses(),
        [ListenAddress::Unix(path.clone())]
    );
    drop(server);
    s.stop();
    assert!(
        !path.exists(),
        "socket file removed when the server is dropped"
    );
    assert!(c.is_closed());
}

#[test]
fn tcp_listener_on_port_0_reports_the_bound_port() {
    let s = TestServer::start_on(
        Some("tcp:127.0.0.1:0".parse().unwrap()),
        QmpServerOptions::new(),
        |_| {},
    );
    let ListenAddress::Tcp(addr) = s.addr.clone() else {
        panic!("{:?}", s.addr)
    };
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    let mut c = s.connect();
    assert_eq!(c.greeting["QMP"]["capabilities"], json!([]));
    c.negotiate();
    assert_eq!(c.ok("query-version", Value::Null)["qemu"]["major"], 10);
    let mut d = s.client();
    s.server.emit_event("TCP_EVENT", json!({"x": 1}));
    assert_eq!(c.recv_event()["event"], "TCP_EVENT");
    assert_eq!(d.recv_event()["event"], "TCP_EVENT");
}

#[test]
fn live_socket_is_refused_and_left_alone() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let path = s.socket_path().unwrap();
    let ctx = AioContext::new().unwrap();
    let other = QmpServer::new(&ctx, QmpServerOptions::new());
    let err = other.listen(&QmpAddress::Unix(path.clone())).unwrap_err();
    assert!(matches!(err, ServerError::SocketInUse { .. }), "{err}");
    assert!(
        err.to_string().contains("another server is listening"),
        "{err}"
    );
    drop(other);
    // The first server still owns its socket.
    assert!(path.exists());
    let mut c = s.client();
    assert!(c.ok("query-version", Value::Null).is_object());
}

#[test]
fn stale_socket_is_replaced_and_regular_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap()); // leaves the file behind
    assert!(stale.exists());
    let ctx = AioContext::new().unwrap();
    let server = QmpServer::new(&ctx, QmpServerOptions::new());
    server.listen(&QmpAddress::Unix(stale.clone())).unwrap();
    assert_eq!(
        std::fs::symlink_metadata(&stale)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let err = server.listen(&QmpAddress::Unix(file.clone())).unwrap_err();
    assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let missing_dir = dir.path().join("no/such/dir/q.sock");
    let err = server.listen(&QmpAddress::Unix(missing_dir)).unwrap_err();
    assert!(matches!(err, ServerError::Io { .. }), "{err}");
    drop(server);
    assert!(!stale.exists());
}

#[test]
fn home_thread_operations_are_refused_elsewhere() {
    let s = TestServer::start(QmpServerOptions::new(), |_| {});
    let dir = tempfile::tempdir().unwrap();
    let err = s
        .server
        .listen(&QmpAddress::Unix(dir.path().join("x.sock")))
        .unwrap_err();
    assert!(
        matches!(err, ServerError::Aio(aio::Error::NotHomeThread { .. })),
        "{err}"
    );
    assert!(!dir.path().join("x.sock").exists());
    assert!(matches!(s.server.shutdown(), Err(ServerError::Aio(_))));
    assert!(!s.server.is_shut_down());
}

#[test]
fn quit_replies_then_shuts_everything_down_and_calls_back() {
    let quits = Arc::new(AtomicUsize::new(0));
    let q = quits.clone();
    let s = TestServer::start(
        QmpServerOptions::new().on_quit(move |_ctx| {
            q.fetch_add(1, Ordering::SeqCst);
        }),
        |_| {},
    );
    let path = s.socket_path().unwrap();
    let mut bystander = s.client();
    let mut c = s.client();
    c.send_raw(
        b"{\"execute\": \"quit\", \"id\": \"q\"}{\"execute\": \"query-version\", \"id\": \"late\"}",
    );
    assert_eq!(c.recv_line_json(), json!({"return": {}, "id": "q"}));
    assert!(c.is_closed(), "nothing after the quit reply");
    assert!(bystander.is_closed());
    util::wait_until("the quit callback ran", || {
        quits.load(Ordering::SeqCst) == 1
    });
    assert!(s.server.is_shut_down());
    assert!(!path.exists(), "socket removed at quit");
    assert!(UnixStream::connect(&path).is_err());
    // Events after shutdown go nowhere, and do not fail.
    s.server.emit_event("LATE", Value::Null);
    assert!(matches!(
        s.server.listen(&QmpAddress::Unix(path)),
        Err(ServerError::Aio(_))
    ));
}

#[test]
fn quit_can_be_replaced_by_the_embedder() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        assert!(srv.unregister("quit"));
        srv.register("quit", |_: mainloop::qmp::NoArgs| Ok("not today"))
            .unwrap();
        assert!(!srv.unregister("qmp_capabilities"));
    });
    let mut c = s.client();
    assert_eq!(c.ok("quit", Value::Null), "not today");
    assert!(c.ok("query-version", Value::Null).is_object());
}

/// The server's fds carry the configured client type, so a nested poll
/// that disables that type does not serve QMP (QEMU's iohandler rule).
#[test]
fn fds_use_the_configured_client_type() {
    let ctx = AioContext::new().unwrap();
    let qmp_type = ClientType::custom(7).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sock");
    let server = QmpServer::new(&ctx, QmpServerOptions::new().client_type(qmp_type));
    server.listen(&QmpAddress::Unix(path.clone())).unwrap();
    let mut raw = UnixStream::connect(&path).unwrap();
    raw.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    {
        let _guard = ctx.disable_clients(qmp_type.mask()).unwrap();
        for _ in 0..5 {
            ctx.poll(false);
        }
        assert_eq!(
            raw.read(&mut buf).unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "not accepted while the type is disabled"
        );
        assert_eq!(server.client_count(), 0);
    }
    ctx.poll_while(|| server.client_count() == 0);
    raw.set_nonblocking(false).unwrap();
    let n = raw.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"{\"QMP\": "));
    drop(server);
    assert!(!path.exists());
}

#[test]
fn several_listeners_serve_the_same_commands() {
    let ctx_ready = std::sync::mpsc::channel();
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("a.sock");
    let unix2 = unix.clone();
    let (tx, rx) = ctx_ready;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        let server = QmpServer::new(&ctx, QmpServerOptions::new());
        server.listen(&QmpAddress::Unix(unix2)).unwrap();
        let tcp = server.listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        tx.send((tcp, ctx.clone())).unwrap();
        while !stop2.load(Ordering::Acquire) {
            ctx.poll(true);
        }
    });
    let (tcp, ctx) = rx.recv().unwrap();
    let mut a = QmpClient::connect_unix(&unix);
    let mut b = QmpClient::connect(&tcp);
    a.negotiate();
    b.negotiate();
    assert_eq!(
        a.ok("query-version", Value::Null),
        b.ok("query-version", Value::Null)
    );
    stop.store(true, Ordering::Release);
    ctx.notify();
    t.join().unwrap();
    assert!(!unix.exists());
}

/// Nothing is dispatched while nothing happens: no write handler without
/// pending output, no read handler on a client that has hung up.
#[test]
fn idle_server_does_not_spin() {
    use std::io::Write;
    let ctx = AioContext::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sock");
    let server = QmpServer::new(&ctx, QmpServerOptions::new());
    server.listen(&QmpAddress::Unix(path.clone())).unwrap();
    let mut a = UnixStream::connect(&path).unwrap();
    let mut b = UnixStream::connect(&path).unwrap();
    ctx.poll_while(|| server.client_count() < 2);
    a.write_all(b"{\"execute\": \"qmp_capabilities\"}").unwrap();
    // `b` says something and hangs up its writing side.
    b.write_all(b"{\"execute\": \"qmp_capabilities\"}").unwrap();
    b.shutdown(std::net::Shutdown::Write).unwrap();
    ctx.run_until_idle();
    let mut buf = vec![0u8; 4096];
    let n = a.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("{\"return\": {}}\r\n"));
    // `b` got its replies and was closed; `a` idles.
    let mut all = Vec::new();
    b.read_to_end(&mut all).unwrap();
    assert!(String::from_utf8_lossy(&all).ends_with("{\"return\": {}}\r\n"));
    assert_eq!(server.client_count(), 1);
    let before = ctx.stats();
    for _ in 0..100 {
        assert!(!ctx.poll(false), "an idle server made progress");
    }
    assert_eq!(ctx.stats().dispatches, before.dispatches);
}
