//! The QMP server: listeners, clients, dispatch and events, all driven by fd
//! handlers on one [`AioContext`].
//!
//! # Threads
//!
//! Everything runs on the context's home thread: accepting, reading,
//! parsing, running commands, writing. The server's state sits behind
//! mutexes only so that the handle is `Send + Sync`; no lock is held while a
//! command handler, a subscriber or the quit callback runs, so they may call
//! back into the server (emit an event, register a command) freely. Events
//! may be emitted from any thread: they are queued and delivered by a bottom
//! half on the home thread.
//!
//! # One client
//!
//! A client's input goes through a [`JsonSplitter`]; complete values wait in
//! a short queue and run one at a time, in order. A synchronous command runs
//! inline; an asynchronous one runs as a task on the context, and the
//! client's next request waits for its reply. While the queue is full the
//! client's fd is not read (QEMU suspends a monitor the same way), so a
//! client cannot make the server buffer unbounded input. Output goes
//! straight to the socket; what the socket does not take waits in a buffer,
//! and only then is a write handler registered. A client whose buffer
//! passes the cap is disconnected.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use aio::{AioContext, Bh, ClientType, ClockType, FdHandler, Timer, WeakAioContext};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::address::{self, ListenAddress, ListenSocket, QmpAddress, SocketFile};
use super::error::{QmpError, ServerError};
use super::framing::{self, Frame, JsonSplitter, DEFAULT_MAX_VALUE_BYTES, MAX_NESTING};
use super::protocol::{self, Greeting, QmpEvent, QmpVersion};
use super::registry::{self, Builtin, CatchPanic, Handler, Registry};
use super::schema::{QmpArgs, Schema};

/// Bytes read from one client per dispatch before yielding to others.
const READ_BUDGET: usize = 256 * 1024;
/// Requests run for one client per dispatch before yielding to others.
const RUN_BUDGET: usize = 32;
/// Connections accepted per dispatch of a listener.
const ACCEPT_BUDGET: usize = 64;
/// How long a listener rests after `accept` failed (e.g. out of fds).
const ACCEPT_RETRY_NS: i64 = 100_000_000;

/// Called on the home thread after `quit` has been answered.
pub type QuitCallback = Arc<dyn Fn(&AioContext) + Send + Sync>;

/// Options for [`QmpServer::new`].
///
/// ```
/// use mainloop::qmp::{QmpServerOptions, QmpVersion};
/// let opts = QmpServerOptions::new()
///     .version(QmpVersion::new(10, 0, 2, "my-vmm 1.2"))
///     .on_quit(|_ctx| println!("bye"));
/// assert_eq!(opts.max_value_bytes, 1 << 20);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct QmpServerOptions {
    /// Reported by the greeting and `query-version`.
    pub version: QmpVersion,
    /// The client type of the server's fds (listeners and connections), for
    /// [`AioContext::disable_clients`]. Default `ClientType::INTERNAL`.
    pub client_type: ClientType,
    /// Largest JSON value accepted from a client, in bytes (default 1 MiB).
    /// A larger one gets an error and is skipped without being buffered.
    pub max_value_bytes: usize,
    /// Deepest nesting accepted (default and maximum 100).
    pub max_nesting: usize,
    /// Output buffered for one client before it is disconnected as too slow
    /// (default 16 MiB).
    pub max_output_bytes: usize,
    /// Parsed requests queued per client before the server stops reading
    /// from it (default 8, as QEMU).
    pub max_queued_requests: usize,
    /// Run after `quit` has been answered and the server has shut down.
    pub on_quit: Option<QuitCallback>,
}

impl Default for QmpServerOptions {
    fn default() -> Self {
        Self {
            version: QmpVersion::default(),
            client_type: ClientType::INTERNAL,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_nesting: MAX_NESTING,
            max_output_bytes: 16 << 20,
            max_queued_requests: 8,
            on_quit: None,
        }
    }
}

impl fmt::Debug for QmpServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpServerOptions")
            .field("version", &self.version)
            .field("client_type", &self.client_type)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("max_nesting", &self.max_nesting)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("max_queued_requests", &self.max_queued_requests)
            .field("on_quit", &self.on_quit.is_some())
            .finish()
    }
}

impl QmpServerOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the version reported.
    pub fn version(mut self, version: QmpVersion) -> Self {
        self.version = version;
        self
    }
    /// Sets the client type of the server's fds.
    pub fn client_type(mut self, client_type: ClientType) -> Self {
        self.client_type = client_type;
        self
    }
    /// Sets the largest JSON value accepted.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }
    /// Sets the nesting limit (capped at 100).
    pub fn max_nesting(mut self, depth: usize) -> Self {
        self.max_nesting = depth;
        self
    }
    /// Sets the per-client output cap.
    pub fn max_output_bytes(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes;
        self
    }
    /// Sets the per-client request queue length.
    pub fn max_queued_requests(mut self, n: usize) -> Self {
        self.max_queued_requests = n;
        self
    }
    /// Sets the callback run after `quit`.
    pub fn on_quit(mut self, f: impl Fn(&AioContext) + Send + Sync + 'static) -> Self {
        self.on_quit = Some(Arc::new(f));
        self
    }
}

/// Identifies a subscription made with [`QmpServer::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

type Subscriber = Arc<dyn Fn(&QmpEvent) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connection.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }

    /// Writes as much of `buf` as the socket takes now.
    fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.write(&buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A client's unsent output.
#[derive(Default)]
struct OutBuf {
    data: Vec<u8>,
    pos: usize,
}

impl OutBuf {
    fn len(&self) -> usize {
        self.data.len() - self.pos
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn push(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }
    fn pending(&self) -> &[u8] {
        &self.data[self.pos..]
    }
    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.data.len() {
            self.data = Vec::new();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.data.len() {
            self.data.drain(..self.pos);
            self.pos = 0;
        }
    }
}

struct Client {
    stream: Stream,
    peer: String,
    splitter: JsonSplitter,
    pending: VecDeque<Frame>,
    /// A request of this client is running.
    busy: bool,
    negotiated: bool,
    /// The peer closed its side; nothing more to read.
    eof: bool,
    out: OutBuf,
    /// (read, write) interest registered with the context.
    interest: (bool, bool),
}

struct Listener {
    id: u64,
    socket: ListenSocket,
    addr: ListenAddress,
    /// Removes the unix socket file on drop.
    file: Option<SocketFile>,
    registered: bool,
    /// Re-registers the listener after an `accept` failure.
    retry: Option<Timer>,
}

impl Listener {
    fn fd(&self) -> RawFd {
        match &self.socket {
            ListenSocket::Unix(l) => l.as_raw_fd(),
            ListenSocket::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.socket {
            ListenSocket::Unix(l) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), "unix".to_string()))
            }
            ListenSocket::Tcp(l) => {
                let (s, peer) = l.accept()?;
                if let Err(e) = s.set_nodelay(true) {
                    log::debug!("QMP: TCP_NODELAY on {peer}: {e}");
                }
                Ok((Stream::Tcp(s), peer.to_string()))
            }
        }
    }
}

#[derive(Default)]
struct State {
    listeners: Vec<Listener>,
    clients: HashMap<u64, Client>,
    next_id: u64,
    shut_down: bool,
}

struct PendingEvent {
    event: QmpEvent,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct EventQueue {
    queue: VecDeque<Arc<PendingEvent>>,
    delivering: bool,
}

/// What handling one request produced.
enum Outcome {
    /// Send this reply, then go on with the client's next request.
    Reply(Vec<u8>),
    /// An async command is running; its completion goes on.
    Running,
    /// `quit` was accepted: send this reply, then shut down.
    Quit(Vec<u8>),
}

struct Shared {
    me: Weak<Shared>,
    /// Weak: the context's queues hold closures that own the server (a
    /// deferred shutdown), so a strong handle here would be a cycle.
    ctx: WeakAioContext,
    opts: QmpServerOptions,
    greeting: Vec<u8>,
    registry: Mutex<Registry>,
    state: Mutex<State>,
    events: Mutex<EventQueue>,
    event_bh: Bh,
    subscribers: Mutex<Vec<(u64, Subscriber)>>,
    next_subscriber: AtomicU64,
}

/// A QMP server running on an [`AioContext`].
///
/// Create it with [`new`](QmpServer::new), add listeners with
/// [`listen`](QmpServer::listen), add commands with
/// [`register`](QmpServer::register) /
/// [`register_async`](QmpServer::register_async), and drive the context's
/// loop. Built-in commands: `qmp_capabilities`, `query-version`,
/// `query-commands`, `quit`.
///
/// Dropping the server (or [`shutdown`](QmpServer::shutdown)) closes every
/// connection and listener and removes the unix socket files; commands
/// still running finish, and their replies are dropped.
///
/// # Examples
///
/// ```
/// use aio::AioContext;
/// use mainloop::qmp::{NoArgs, QmpAddress, QmpServer, QmpServerOptions};
///
/// let ctx = AioContext::new()?;
/// let server = QmpServer::new(&ctx, QmpServerOptions::new());
/// server.register("ping", |_: NoArgs| Ok(serde_json::json!({"pong": true})))?;
/// let addr = server.listen(&"tcp:127.0.0.1:0".parse::<QmpAddress>()?)?;
/// println!("listening on {addr}");
/// server.emitter().emit("STARTED", serde_json::Value::Null);
/// // ... while running { ctx.poll(true); }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct QmpServer {
    shared: Arc<Shared>,
    ctx: AioContext,
}

impl fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.shared.state);
        f.debug_struct("QmpServer")
            .field("context", &self.ctx.name())
            .field(
                "listeners",
                &st.listeners
                    .iter()
                    .map(|l| l.addr.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("clients", &st.clients.len())
            .field("shut_down", &st.shut_down)
            .finish()
    }
}

/// A cloneable, thread-safe handle for emitting events; does not keep the
/// server alive (emitting after it is gone does nothing).
#[derive(Clone)]
pub struct EventEmitter {
    shared: Weak<Shared>,
}

impl fmt::Debug for EventEmitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventEmitter")
            .field("server_alive", &(self.shared.strong_count() > 0))
            .finish()
    }
}

impl EventEmitter {
    /// Emits event `name` with `data` (a JSON object, or `Value::Null` for
    /// none); see [`QmpServer::emit_event`].
    pub fn emit(&self, name: &str, data: Value) {
        if let Some(s) = self.shared.upgrade() {
            s.emit(name, data);
        }
    }
}

impl QmpServer {
    /// A server on `ctx` (normally the main loop's iohandler context) with
    /// the built-in commands and no listener yet. May be called on any
    /// thread; [`listen`](QmpServer::listen) must be called on the
    /// context's home thread.
    pub fn new(ctx: &AioContext, opts: QmpServerOptions) -> Self {
        let greeting = protocol::encode(&Greeting::new(&opts.version));
        let shared = Arc::new_cyclic(|me: &Weak<Shared>| {
            let weak = me.clone();
            let event_bh = ctx.bh_new(move |_ctx| {
                if let Some(s) = weak.upgrade() {
                    s.deliver_events();
                }
            });
            Shared {
                me: me.clone(),
                ctx: ctx.downgrade(),
                opts,
                greeting,
                registry: Mutex::new(Registry::with_builtins()),
                state: Mutex::new(State::default()),
                events: Mutex::new(EventQueue::default()),
                event_bh,
                subscribers: Mutex::new(Vec::new()),
                next_subscriber: AtomicU64::new(1),
            }
        });
        Self {
            shared,
            ctx: ctx.clone(),
        }
    }

    /// The context the server runs on.
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// Starts listening on `addr`; returns the address bound (for
    /// `tcp:HOST:0`, with the port chosen). May be called several times.
    ///
    /// # Errors
    ///
    /// [`ServerError::SocketInUse`] if a live server has the unix socket,
    /// [`ServerError::NotASocket`] if the path is some other file,
    /// [`ServerError::Io`] if binding fails, [`ServerError::Aio`] off the
    /// home thread, [`ServerError::ShutDown`] after shutdown.
    pub fn listen(&self, addr: &QmpAddress) -> Result<ListenAddress, ServerError> {
        let s = &self.shared;
        if !self.ctx.in_home_thread() {
            return Err(aio::Error::NotHomeThread {
                op: "QmpServer::listen",
            }
            .into());
        }
        if lock(&s.state).shut_down {
            return Err(ServerError::ShutDown);
        }
        let (socket, bound, file) = address::bind(addr)?;
        let mut st = lock(&s.state);
        let id = st.next_id;
        st.next_id += 1;
        let mut l = Listener {
            id,
            socket,
            addr: bound.clone(),
            file,
            registered: false,
            retry: None,
        };
        self.ctx
            .set_fd_handler(l.fd(), Some(s.listener_handler(id)))?;
        l.registered = true;
        log::info!("QMP listening on {bound}");
        st.listeners.push(l);
        Ok(bound)
    }

    /// The addresses listened on.
    pub fn listen_addresses(&self) -> Vec<ListenAddress> {
        lock(&self.shared.state)
            .listeners
            .iter()
            .map(|l| l.addr.clone())
            .collect()
    }

    /// The number of connected clients.
    pub fn client_count(&self) -> usize {
        lock(&self.shared.state).clients.len()
    }

    /// Registers a synchronous command. `handler` runs on the home thread
    /// with the validated, deserialised arguments; its `Ok` value is the
    /// reply's `return` (`()` gives `{}`).
    ///
    /// # Errors
    ///
    /// [`ServerError::DuplicateCommand`] if the name is taken.
    pub fn register<A, R, F>(&self, name: &str, handler: F) -> Result<(), ServerError>
    where
        A: QmpArgs,
        R: Serialize + 'static,
        F: Fn(A) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        self.insert(name, A::schema(), registry::sync_handler(handler))
    }

    /// Registers an asynchronous command: `handler` returns a future that
    /// runs as a task on the server's context; the reply is sent when it
    /// completes. The client's next request waits for it; other clients do
    /// not. If the client disconnects meanwhile, the command still runs to
    /// completion and its reply is dropped.
    ///
    /// # Errors
    ///
    /// [`ServerError::DuplicateCommand`] if the name is taken.
    pub fn register_async<A, R, F, Fut>(&self, name: &str, handler: F) -> Result<(), ServerError>
    where
        A: QmpArgs,
        R: Serialize + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, QmpError>> + Send + 'static,
    {
        self.insert(name, A::schema(), registry::async_handler(handler))
    }

    /// Registers a synchronous command that takes its arguments as a JSON
    /// object checked against `schema` (for argument shapes no Rust type
    /// describes well, e.g. `blockdev-add`'s union).
    ///
    /// # Errors
    ///
    /// [`ServerError::DuplicateCommand`] if the name is taken.
    pub fn register_with_schema<R, F>(
        &self,
        name: &str,
        schema: Schema,
        handler: F,
    ) -> Result<(), ServerError>
    where
        R: Serialize + 'static,
        F: Fn(Map<String, Value>) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        self.insert(name, schema, registry::sync_handler(handler))
    }

    /// [`register_with_schema`](Self::register_with_schema) for an
    /// asynchronous handler (see [`register_async`](Self::register_async)).
    ///
    /// # Errors
    ///
    /// [`ServerError::DuplicateCommand`] if the name is taken.
    pub fn register_async_with_schema<R, F, Fut>(
        &self,
        name: &str,
        schema: Schema,
        handler: F,
    ) -> Result<(), ServerError>
    where
        R: Serialize + 'static,
        F: Fn(Map<String, Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, QmpError>> + Send + 'static,
    {
        self.insert(name, schema, registry::async_handler(handler))
    }

    fn insert(&self, name: &str, schema: Schema, handler: Handler) -> Result<(), ServerError> {
        if lock(&self.shared.registry).insert(name, schema, handler) {
            Ok(())
        } else {
            Err(ServerError::DuplicateCommand(name.to_string()))
        }
    }

    /// Removes a command (built-ins too, except `qmp_capabilities`);
    /// returns whether it existed.
    pub fn unregister(&self, name: &str) -> bool {
        lock(&self.shared.registry).remove(name)
    }

    /// The names of every command, sorted (what `query-commands` lists).
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.registry).names()
    }

    /// A handle for emitting events from anywhere.
    pub fn emitter(&self) -> EventEmitter {
        EventEmitter {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Emits event `name` with `data` (a JSON object, or `Value::Null` for
    /// none). Callable from any thread.
    ///
    /// The event is timestamped now and delivered to every client that has
    /// completed capabilities negotiation, and to every subscriber, in the
    /// order of emission. Emitted on the home thread, it is delivered before
    /// this returns (so an event emitted by a command precedes the command's
    /// reply, as in QEMU); from another thread, on the home thread's next
    /// loop iteration.
    pub fn emit_event(&self, name: &str, data: Value) {
        self.shared.emit(name, data);
    }

    /// Calls `f` on the home thread for every event, before it is sent to
    /// clients.
    pub fn subscribe(&self, f: impl Fn(&QmpEvent) + Send + Sync + 'static) -> SubscriptionId {
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.subscribers).push((id, Arc::new(f)));
        SubscriptionId(id)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        let mut subs = lock(&self.shared.subscribers);
        let before = subs.len();
        subs.retain(|(i, _)| *i != id.0);
        subs.len() != before
    }

    /// Whether the server has shut down (`quit`, or
    /// [`shutdown`](QmpServer::shutdown)).
    pub fn is_shut_down(&self) -> bool {
        lock(&self.shared.state).shut_down
    }

    /// Closes every listener and connection (trying once to flush what is
    /// buffered) and removes the unix socket files. Idempotent. Commands
    /// still running finish; their replies, and later events, are dropped.
    ///
    /// # Errors
    ///
    /// [`ServerError::Aio`] off the home thread.
    pub fn shutdown(&self) -> Result<(), ServerError> {
        if !self.ctx.in_home_thread() {
            return Err(aio::Error::NotHomeThread {
                op: "QmpServer::shutdown",
            }
            .into());
        }
        self.shared.shutdown();
        Ok(())
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let s = &self.shared;
        if self.ctx.in_home_thread() {
            s.shutdown();
            return;
        }
        // Off the home thread: the socket files go now; the fds are closed
        // on the home thread (handlers can only be removed there), or with
        // the state if the context is gone.
        for l in lock(&s.state).listeners.iter_mut() {
            if let Some(mut f) = l.file.take() {
                f.remove();
            }
        }
        let shared = s.clone();
        self.ctx.bh_schedule_oneshot(move |_| shared.shutdown());
    }
}

impl Shared {
    fn weak(&self) -> Weak<Shared> {
        self.me.clone()
    }

    /// `set_fd_handler` on the server's context (home thread only).
    fn set_handler(&self, fd: RawFd, handler: Option<FdHandler>) -> aio::Result<()> {
        match self.ctx.upgrade() {
            Some(ctx) => ctx.set_fd_handler(fd, handler),
            None => Err(aio::Error::ContextGone),
        }
    }

    // ----- handlers ------------------------------------------------------

    fn listener_handler(&self, id: u64) -> FdHandler {
        let weak = self.weak();
        FdHandler::new(self.opts.client_type).on_read(move |_ctx| {
            if let Some(s) = weak.upgrade() {
                s.accept_ready(id);
            }
        })
    }

    fn client_handler(&self, id: u64, read: bool, write: bool) -> Option<FdHandler> {
        if !read && !write {
            return None;
        }
        let mut h = FdHandler::new(self.opts.client_type);
        if read {
            let weak = self.weak();
            h = h.on_read(move |_ctx| {
                if let Some(s) = weak.upgrade() {
                    s.client_readable(id);
                }
            });
        }
        if write {
            let weak = self.weak();
            h = h.on_write(move |_ctx| {
                if let Some(s) = weak.upgrade() {
                    s.client_writable(id);
                }
            });
        }
        Some(h)
    }

    /// Registers the handler a client needs now: read while it may queue
    /// more requests, write while it has buffered output.
    fn update_interest(&self, st: &mut State, id: u64) {
        let max_queue = self.opts.max_queued_requests.max(1);
        let Some(c) = st.clients.get_mut(&id) else {
            return;
        };
        let want = (!c.eof && c.pending.len() < max_queue, !c.out.is_empty());
        if want == c.interest {
            return;
        }
        match self.set_handler(c.stream.fd(), self.client_handler(id, want.0, want.1)) {
            Ok(()) => c.interest = want,
            Err(e) => {
                log::warn!("QMP client {id} ({}): cannot watch its socket: {e}", c.peer);
                self.close_client(st, id, "its socket cannot be watched");
            }
        }
    }

    // ----- connections ---------------------------------------------------

    fn accept_ready(&self, listener: u64) {
        let mut st = lock(&self.state);
        if st.shut_down {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(l) = st.listeners.iter().find(|l| l.id == listener) else {
                return;
            };
            match l.accept() {
                Ok((stream, peer)) => self.add_client(&mut st, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: the listener stays readable, so
                    // rest instead of spinning.
                    log::warn!("QMP: accept on {} failed: {e}; retrying in 100 ms", l.addr);
                    self.pause_listener(&mut st, listener);
                    break;
                }
            }
        }
    }

    fn pause_listener(&self, st: &mut State, id: u64) {
        let Some(l) = st.listeners.iter_mut().find(|l| l.id == id) else {
            return;
        };
        if l.registered {
            if let Err(e) = self.set_handler(l.fd(), None) {
                log::warn!("QMP: pausing listener {}: {e}", l.addr);
            }
            l.registered = false;
        }
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let weak = self.weak();
        let timer = ctx.timer_new(ClockType::Realtime, move |_ctx| {
            if let Some(s) = weak.upgrade() {
                s.resume_listener(id);
            }
        });
        timer.mod_in_ns(ACCEPT_RETRY_NS);
        l.retry = Some(timer);
    }

    fn resume_listener(&self, id: u64) {
        let mut st = lock(&self.state);
        if st.shut_down {
            return;
        }
        let Some(l) = st.listeners.iter_mut().find(|l| l.id == id) else {
            return;
        };
        if !l.registered {
            match self.set_handler(l.fd(), Some(self.listener_handler(id))) {
                Ok(()) => l.registered = true,
                Err(e) => log::warn!("QMP: resuming listener {}: {e}", l.addr),
            }
        }
    }

    fn add_client(&self, st: &mut State, stream: Stream, peer: String) {
        let nonblocking = match &stream {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        };
        if let Err(e) = nonblocking {
            log::warn!("QMP: dropping connection from {peer}: {e}");
            return;
        }
        let id = st.next_id;
        st.next_id += 1;
        log::debug!("QMP client {id} connected ({peer})");
        st.clients.insert(
            id,
            Client {
                stream,
                peer,
                splitter: JsonSplitter::new(self.opts.max_value_bytes, self.opts.max_nesting),
                pending: VecDeque::new(),
                busy: false,
                negotiated: false,
                eof: false,
                out: OutBuf::default(),
                interest: (false, false),
            },
        );
        self.send(st, id, &self.greeting);
        self.update_interest(st, id);
    }

    fn close_client(&self, st: &mut State, id: u64, why: &str) {
        let Some(c) = st.clients.remove(&id) else {
            return;
        };
        if c.interest != (false, false) {
            if let Err(e) = self.set_handler(c.stream.fd(), None) {
                log::debug!("QMP client {id}: removing its handler: {e}");
            }
        }
        log::debug!("QMP client {id} ({}) closed: {why}", c.peer);
        // Dropping `c` closes the socket.
    }

    /// Queues `bytes` for client `id`: written at once as far as the socket
    /// takes it, the rest buffered (and a write handler registered).
    fn send(&self, st: &mut State, id: u64, bytes: &[u8]) {
        let max_out = self.opts.max_output_bytes;
        let Some(c) = st.clients.get_mut(&id) else {
            return;
        };
        let mut rest = bytes;
        if c.out.is_empty() {
            match c.stream.write_some(bytes) {
                Ok(n) => rest = &bytes[n..],
                Err(e) => {
                    let why = format!("write failed: {e}");
                    self.close_client(st, id, &why);
                    return;
                }
            }
        }
        if !rest.is_empty() {
            c.out.push(rest);
            if c.out.len() > max_out {
                log::warn!(
                    "QMP client {id} ({}): more than {max_out} bytes of output unread; disconnecting it",
                    c.peer
                );
                self.close_client(st, id, "output buffer full");
                return;
            }
        }
        self.update_interest(st, id);
    }

    fn client_writable(&self, id: u64) {
        let mut st = lock(&self.state);
        let Some(c) = st.clients.get_mut(&id) else {
            return;
        };
        match c.stream.write_some(c.out.pending()) {
            Ok(n) => c.out.consume(n),
            Err(e) => {
                let why = format!("write failed: {e}");
                self.close_client(&mut st, id, &why);
                return;
            }
        }
        if c.out.is_empty() && c.eof && !c.busy && c.pending.is_empty() {
            self.close_client(&mut st, id, "peer closed its side");
        } else {
            self.update_interest(&mut st, id);
        }
    }

    fn client_readable(&self, id: u64) {
        {
            let mut st = lock(&self.state);
            let max_queue = self.opts.max_queued_requests.max(1);
            let Some(c) = st.clients.get_mut(&id) else {
                return;
            };
            let mut buf = [0u8; 16 * 1024];
            let mut frames = Vec::new();
            let mut budget = READ_BUDGET;
            let mut failed = None;
            while budget > 0 && c.pending.len() < max_queue && !c.eof {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.eof = true;
                        if c.splitter.in_value() {
                            log::debug!("QMP client {id}: closed in the middle of a value");
                        }
                    }
                    Ok(n) => {
                        c.splitter.feed(&buf[..n], &mut frames);
                        c.pending.extend(frames.drain(..));
                        budget = budget.saturating_sub(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                let why = format!("read failed: {e}");
                self.close_client(&mut st, id, &why);
                return;
            }
            self.update_interest(&mut st, id);
        }
        self.process_client(id);
    }

    // ----- requests ------------------------------------------------------

    /// Runs the client's queued requests, one at a time, until one is
    /// asynchronous, the queue is empty, or the budget is spent (then the
    /// rest continues from a bottom half, so one client cannot starve the
    /// others).
    fn process_client(&self, id: u64) {
        for _ in 0..RUN_BUDGET {
            let frame = {
                let mut st = lock(&self.state);
                if st.shut_down {
                    return;
                }
                let Some(c) = st.clients.get_mut(&id) else {
                    return;
                };
                if c.busy {
                    return;
                }
                match c.pending.pop_front() {
                    Some(f) => {
                        c.busy = true;
                        f
                    }
                    None => {
                        if c.eof && c.out.is_empty() {
                            self.close_client(&mut st, id, "peer closed its side");
                        } else {
                            self.update_interest(&mut st, id);
                        }
                        return;
                    }
                }
            };
            match self.handle_frame(id, frame) {
                Outcome::Running => return,
                Outcome::Reply(bytes) => {
                    let mut st = lock(&self.state);
                    if let Some(c) = st.clients.get_mut(&id) {
                        c.busy = false;
                    }
                    self.send(&mut st, id, &bytes);
                }
                Outcome::Quit(bytes) => {
                    {
                        let mut st = lock(&self.state);
                        self.send(&mut st, id, &bytes);
                    }
                    self.quit();
                    return;
                }
            }
        }
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let weak = self.weak();
        ctx.bh_schedule_oneshot(move |_ctx| {
            if let Some(s) = weak.upgrade() {
                s.process_client(id);
            }
        });
    }

    fn handle_frame(&self, client: u64, frame: Frame) -> Outcome {
        let reply = |r: Result<Value, QmpError>, id: Option<&Value>| {
            Outcome::Reply(protocol::encode_reply(&r, id))
        };
        let text = match frame {
            Frame::Error(e) => return reply(Err(e.to_qmp()), None),
            Frame::Value(text) => text,
        };
        let value: Value = match serde_json::from_slice(&text) {
            Ok(v) => v,
            Err(e) => return reply(Err(framing::parse_error(&e, &text)), None),
        };
        let req = match protocol::check_request(value) {
            Ok(r) => r,
            Err((e, id)) => return reply(Err(e), id.as_ref()),
        };
        let id = req.id.as_ref();
        let negotiated = lock(&self.state)
            .clients
            .get(&client)
            .is_some_and(|c| c.negotiated);
        let cmd = lock(&self.registry)
            .get(&req.name)
            .filter(|_| negotiated || req.name == "qmp_capabilities");
        let Some(cmd) = cmd else {
            let desc = if negotiated {
                format!("The command {} has not been found", req.name)
            } else {
                "Expecting capabilities negotiation with 'qmp_capabilities'".to_string()
            };
            return reply(Err(QmpError::command_not_found(desc)), id);
        };
        let mut args = req.args;
        if let Err(e) = cmd.schema.validate(&mut args) {
            return reply(Err(e), id);
        }
        match &cmd.handler {
            Handler::Sync(f) => reply(registry::call_sync(&req.name, &**f, args), id),
            Handler::Async(f) => match registry::call_async(&req.name, &**f, args) {
                Err(e) => reply(Err(e), id),
                Ok(fut) => {
                    self.spawn_command(client, req.name, fut, req.id);
                    Outcome::Running
                }
            },
            Handler::Builtin(Builtin::Capabilities) => {
                reply(self.qmp_capabilities(client, negotiated, &args), id)
            }
            Handler::Builtin(Builtin::QueryVersion) => reply(Ok(json!(self.opts.version)), id),
            Handler::Builtin(Builtin::QueryCommands) => {
                let names = lock(&self.registry).names();
                let list = names.into_iter().map(|n| json!({ "name": n })).collect();
                reply(Ok(Value::Array(list)), id)
            }
            Handler::Builtin(Builtin::Quit) => {
                Outcome::Quit(protocol::encode_reply(&Ok(Value::Null), id))
            }
        }
    }

    fn qmp_capabilities(
        &self,
        client: u64,
        negotiated: bool,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        if negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        // Nothing is offered, so every capability asked for is unavailable
        // (QEMU's qmp_caps_accept wording).
        let asked: Vec<&str> = args
            .get("enable")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !asked.is_empty() {
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                asked.join(", ")
            )));
        }
        if let Some(c) = lock(&self.state).clients.get_mut(&client) {
            c.negotiated = true;
        }
        Ok(Value::Null)
    }

    fn spawn_command(
        &self,
        client: u64,
        name: String,
        fut: registry::BoxFuture,
        id: Option<Value>,
    ) {
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let weak = self.weak();
        // Detached: the task outlives its client if need be.
        let _detached = ctx.spawn(async move {
            let result = CatchPanic { name, fut }.await;
            if let Some(s) = weak.upgrade() {
                s.command_done(client, &result, id.as_ref());
            }
        });
    }

    fn command_done(&self, client: u64, result: &Result<Value, QmpError>, id: Option<&Value>) {
        {
            let mut st = lock(&self.state);
            if st.shut_down {
                return;
            }
            let Some(c) = st.clients.get_mut(&client) else {
                log::debug!("QMP client {client} left before its command finished; reply dropped");
                return;
            };
            c.busy = false;
            self.send(&mut st, client, &protocol::encode_reply(result, id));
        }
        self.process_client(client);
    }

    // ----- shutdown ------------------------------------------------------

    fn quit(&self) {
        log::info!("QMP: quit");
        self.shutdown();
        if let (Some(cb), Some(ctx)) = (&self.opts.on_quit, self.ctx.upgrade()) {
            cb(&ctx);
        }
    }

    fn shutdown(&self) {
        let (listeners, clients) = {
            let mut st = lock(&self.state);
            if st.shut_down {
                return;
            }
            st.shut_down = true;
            (
                std::mem::take(&mut st.listeners),
                std::mem::take(&mut st.clients),
            )
        };
        for l in listeners {
            if l.registered {
                if let Err(e) = self.set_handler(l.fd(), None) {
                    log::debug!("QMP: removing listener {}: {e}", l.addr);
                }
            }
            log::debug!("QMP: closed listener {}", l.addr);
        }
        for (id, c) in clients {
            if !c.out.is_empty() {
                let _ = c.stream.write_some(c.out.pending());
            }
            if c.interest != (false, false) {
                if let Err(e) = self.set_handler(c.stream.fd(), None) {
                    log::debug!("QMP client {id}: removing its handler: {e}");
                }
            }
        }
        lock(&self.events).queue.clear();
    }

    // ----- events --------------------------------------------------------

    fn emit(&self, name: &str, data: Value) {
        {
            let mut q = lock(&self.events);
            // Stamped under the lock: queue order is timestamp order.
            let event = QmpEvent::new(name, data);
            let bytes = protocol::encode(&event);
            q.queue.push_back(Arc::new(PendingEvent { event, bytes }));
        }
        if self.ctx.upgrade().is_some_and(|c| c.in_home_thread()) {
            self.deliver_events();
        } else {
            self.event_bh.schedule();
        }
    }

    /// Delivers queued events in order (home thread). Not re-entered: an
    /// event emitted during delivery is delivered by the running loop.
    fn deliver_events(&self) {
        {
            let mut q = lock(&self.events);
            if q.delivering {
                return;
            }
            q.delivering = true;
        }
        loop {
            let batch: Vec<_> = {
                let mut q = lock(&self.events);
                if q.queue.is_empty() {
                    q.delivering = false;
                    return;
                }
                q.queue.drain(..).collect()
            };
            for ev in batch {
                self.deliver(&ev);
            }
        }
    }

    fn deliver(&self, ev: &PendingEvent) {
        let subs: Vec<Subscriber> = lock(&self.subscribers)
            .iter()
            .map(|(_, s)| s.clone())
            .collect();
        for s in subs {
            if catch_unwind(AssertUnwindSafe(|| s(&ev.event))).is_err() {
                log::error!("QMP event subscriber panicked on {}", ev.event.name);
            }
        }
        let mut st = lock(&self.state);
        if st.shut_down {
            return;
        }
        let mut ids: Vec<u64> = st
            .clients
            .iter()
            .filter(|(_, c)| c.negotiated)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            self.send(&mut st, id, &ev.bytes);
        }
    }
}
