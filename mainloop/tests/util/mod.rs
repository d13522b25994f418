//! Helpers shared by the QMP integration tests: a server running on its own
//! thread, and a small blocking QMP client.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use aio::AioContext;
use mainloop::qmp::{ListenAddress, QmpAddress, QmpServer, QmpServerOptions};
use serde_json::{json, Value};

pub mod aiod;

/// How long a client waits for a line before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A QMP server on its own thread (the context's home thread), listening
/// on a unix socket in a temporary directory unless told otherwise.
pub struct TestServer {
    pub addr: ListenAddress,
    pub server: Arc<QmpServer>,
    ctx: AioContext,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server on a fresh unix socket; `setup` runs on the server thread
    /// before the loop starts (register commands there).
    pub fn start(
        opts: QmpServerOptions,
        setup: impl FnOnce(&QmpServer) + Send + 'static,
    ) -> TestServer {
        Self::start_on(None, opts, setup)
    }

    /// Like [`start`](Self::start), on `addr` (`None`: a unix socket in a
    /// temporary directory).
    pub fn start_on(
        addr: Option<QmpAddress>,
        opts: QmpServerOptions,
        setup: impl FnOnce(&QmpServer) + Send + 'static,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = addr.unwrap_or_else(|| QmpAddress::Unix(dir.path().join("qmp.sock")));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qmp-server".into())
            .spawn(move || {
                let ctx = AioContext::new().expect("AioContext");
                let server = Arc::new(QmpServer::new(&ctx, opts));
                setup(&server);
                let bound = server.listen(&addr).expect("listen");
                tx.send((bound, server.clone(), ctx.clone())).unwrap();
                while !stop2.load(Ordering::Acquire) {
                    ctx.poll(true);
                }
                drop(server);
            })
            .expect("spawn server thread");
        let (addr, server, ctx) = rx.recv().expect("server started");
        TestServer {
            addr,
            server,
            ctx,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// The unix socket path, if it listens on one.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match &self.addr {
            ListenAddress::Unix(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// A connected client that has read the greeting.
    pub fn connect(&self) -> QmpClient {
        QmpClient::connect(&self.addr)
    }

    /// A connected client that has negotiated capabilities.
    pub fn client(&self) -> QmpClient {
        let mut c = self.connect();
        c.negotiate();
        c
    }

    /// Stops the loop and joins the server thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.ctx.notify();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            self.stop_inner();
        } else if self.thread.is_some() {
            self.stop.store(true, Ordering::Release);
            self.ctx.notify();
        }
    }
}

/// A blocking QMP client for tests.
pub struct QmpClient {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    raw: RawSocket,
    /// The greeting read on connect.
    pub greeting: Value,
    /// Events read while waiting for replies.
    pub events: VecDeque<Value>,
}

enum RawSocket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl RawSocket {
    fn set_read_timeout(&self, t: Option<Duration>) {
        match self {
            RawSocket::Unix(s) => s.set_read_timeout(t),
            RawSocket::Tcp(s) => s.set_read_timeout(t),
        }
        .expect("set_read_timeout")
    }

    fn shutdown(&self) {
        let _ = match self {
            RawSocket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            RawSocket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl QmpClient {
    /// Connects to `addr` and reads the greeting.
    pub fn connect(addr: &ListenAddress) -> QmpClient {
        let mut c = Self::connect_raw(addr);
        c.greeting = c.recv_line_json();
        c
    }

    /// Connects without reading anything.
    pub fn connect_raw(addr: &ListenAddress) -> QmpClient {
        let (reader, writer, raw): (Box<dyn Read + Send>, Box<dyn Write + Send>, RawSocket) =
            match addr {
                ListenAddress::Unix(p) => {
                    // A daemon that has bound its socket (the file exists)
                    // may not listen yet: retry a refused connect.
                    let deadline = std::time::Instant::now() + TIMEOUT;
                    let s = loop {
                        match UnixStream::connect(p) {
                            Err(e)
                                if e.kind() == ErrorKind::ConnectionRefused
                                    && std::time::Instant::now() < deadline =>
                            {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            r => break r.expect("connect unix"),
                        }
                    };
                    (
                        Box::new(s.try_clone().unwrap()),
                        Box::new(s.try_clone().unwrap()),
                        RawSocket::Unix(s),
                    )
                }
                ListenAddress::Tcp(a) => {
                    let s = TcpStream::connect(a).expect("connect tcp");
                    s.set_nodelay(true).unwrap();
                    (
                        Box::new(s.try_clone().unwrap()),
                        Box::new(s.try_clone().unwrap()),
                        RawSocket::Tcp(s),
                    )
                }
                other => panic!("unsupported address {other:?}"),
            };
        raw.set_read_timeout(Some(TIMEOUT));
        QmpClient {
            reader: BufReader::new(reader),
            writer,
            raw,
            greeting: Value::Null,
            events: VecDeque::new(),
        }
    }

    /// Connects to a unix socket path and reads the greeting.
    pub fn connect_unix(path: &Path) -> QmpClient {
        Self::connect(&ListenAddress::Unix(path.to_path_buf()))
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
        self.writer.flush().unwrap();
    }

    /// Sends a JSON value followed by a newline.
    pub fn send(&mut self, v: &Value) {
        let mut bytes = serde_json::to_vec(v).unwrap();
        bytes.push(b'\n');
        self.send_raw(&bytes);
    }

    /// Reads one line, which must end in CRLF.
    pub fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read line");
        assert!(n > 0, "connection closed while waiting for a line");
        assert!(line.ends_with("\r\n"), "line not CRLF-terminated: {line:?}");
        assert!(line.is_ascii(), "output must be ASCII: {line:?}");
        line
    }

    /// Reads one message.
    pub fn recv_line_json(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Reads messages until a reply (`return` or `error`), keeping events.
    pub fn recv(&mut self) -> Value {
        loop {
            let v = self.recv_line_json();
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else {
                return v;
            }
        }
    }

    /// The next event (from those already read, or the socket).
    pub fn recv_event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let v = self.recv_line_json();
        assert!(v.get("event").is_some(), "expected an event, got {v}");
        v
    }

    /// Waits up to `t` for a message; `None` if nothing came.
    pub fn try_recv_within(&mut self, t: Duration) -> Option<Value> {
        self.raw.set_read_timeout(Some(t));
        let mut line = String::new();
        let r = self.reader.read_line(&mut line);
        self.raw.set_read_timeout(Some(TIMEOUT));
        match r {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("JSON")),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(line.is_empty(), "partial line {line:?}");
                None
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Reads and discards input until the server closes the connection
    /// (EOF or a reset: true) or the read timeout passes (false).
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Sends `{"execute": name, "arguments": args}` and returns the reply.
    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        let mut req = json!({ "execute": name });
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.send(&req);
        self.recv()
    }

    /// Executes and returns `return`, panicking on an error reply.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.execute(name, args);
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{name} failed: {r}"),
        }
    }

    /// Executes and returns (class, desc) of the error, panicking on success.
    pub fn err(&mut self, name: &str, args: Value) -> (String, String) {
        let r = self.execute(name, args);
        error_of(&r).unwrap_or_else(|| panic!("{name} succeeded: {r}"))
    }

    /// `qmp_capabilities`.
    pub fn negotiate(&mut self) {
        assert_eq!(self.ok("qmp_capabilities", Value::Null), json!({}));
    }

    /// Closes both directions at once.
    pub fn shutdown(&self) {
        self.raw.shutdown();
    }

    /// Closes the writing side only (the server sees EOF).
    pub fn shutdown_write(&self) {
        let r = match &self.raw {
            RawSocket::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            RawSocket::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
        r.expect("shutdown(SHUT_WR)");
    }

    /// Another handle for writing, e.g. from a second thread.
    pub fn try_clone_writer(&self) -> Box<dyn Write + Send> {
        match &self.raw {
            RawSocket::Unix(s) => Box::new(s.try_clone().unwrap()),
            RawSocket::Tcp(s) => Box::new(s.try_clone().unwrap()),
        }
    }
}

/// Polls `cond` every 2 ms for up to 20 s; panics naming `what` if it never
/// holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// (class, desc) of an error reply.
pub fn error_of(reply: &Value) -> Option<(String, String)> {
    let e = reply.get("error")?;
    Some((
        e["class"].as_str().unwrap().to_string(),
        e["desc"].as_str().unwrap().to_string(),
    ))
}

/// An error reply as `(class, desc)` for assertions.
pub fn generic(desc: &str) -> (String, String) {
    ("GenericError".to_string(), desc.to_string())
}

/// A `CommandNotFound` `(class, desc)`.
pub fn not_found(desc: &str) -> (String, String) {
    ("CommandNotFound".to_string(), desc.to_string())
}
