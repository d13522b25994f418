//! The NBD client: connecting to a server, fixed-newstyle negotiation, and
//! many requests in flight on one connection.
//!
//! A [`Client`] owns at most one live [`Conn`] at a time. Each connection
//! has two tasks on the client's context: a *writer* that sends queued
//! requests in order (so a request is never interleaved with another, and
//! a caller that gives up mid-request cannot leave half a request on the
//! wire), and a *reader* that reads reply headers and routes each chunk to
//! the request with its cookie, reading data straight into that request's
//! buffer. Callers only touch a mutex-protected table and wakers, so they
//! may run on any context or thread; only the two tasks (and negotiation)
//! touch the socket, always on the client's context.
//!
//! When a connection breaks (read or write error, end of stream, or a
//! protocol violation), every request on it completes with [`Lost`].
//! [`Client::connection`] then starts a *reconnect episode* in a task of
//! its own: connection attempts with backoff until `reconnect-delay`
//! (counted from the loss, on the client's clock) has passed, or a single
//! attempt when the delay is 0 or an earlier episode already failed.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use aio::net::AsyncFd;
use aio::{AioContext, ClientType, ClockType, PoolOptions, ThreadPool, WeakAioContext};
use parking_lot::Mutex;

use super::proto::{self, *};

/// The magic an oldstyle server sends after `NBDMAGIC`.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The longest option reply we read (`LIST` replies are the long ones).
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// The longest structured chunk payload other than data.
const MAX_CHUNK: u32 = 1 << 20;
/// First wait between reconnect attempts; doubles up to [`BACKOFF_MAX_NS`].
const BACKOFF_START_NS: i64 = 100_000_000;
/// The longest wait between reconnect attempts.
const BACKOFF_MAX_NS: i64 = 2_000_000_000;
/// How long one connection attempt (connect and negotiation) may take.
const ATTEMPT_TIMEOUT_NS: i64 = 10_000_000_000;
/// Requests sent in one `writev` at most.
const WRITE_BATCH: usize = 64;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host (name or address) and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl ServerAddr {
    /// QEMU's URI for the export, used as the node's file name and in errors.
    pub(crate) fn uri(&self, export: &str) -> String {
        match self {
            ServerAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            ServerAddr::Inet { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export}")
            }
            ServerAddr::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
        }
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Unix(p) => write!(f, "{}", p.display()),
            ServerAddr::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ServerAddr::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A connected socket of either kind.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn shutdown(&self) {
        let r = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::NotConnected {
                log::debug!("nbd: shutting down socket: {e}");
            }
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connecting (and resolving a host name) blocks, so it runs here.
fn connect_pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(PoolOptions::new().name("nbd-connect")))
}

/// Connects a socket to `addr` (on a worker thread) and makes it
/// non-blocking.
async fn connect(addr: &ServerAddr) -> Result<Stream, String> {
    let a = addr.clone();
    let r = connect_pool()
        .run(move || -> io::Result<Stream> {
            let s = match &a {
                ServerAddr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
                ServerAddr::Inet { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port))?;
                    s.set_nodelay(true)?;
                    Stream::Tcp(s)
                }
            };
            s.set_nonblocking()?;
            Ok(s)
        })
        .await;
    match r {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!(
            "Failed to connect to '{addr}': {}",
            crate::error::io_text(&e)
        )),
        Err(e) => Err(format!("Failed to connect to '{addr}': {e}")),
    }
}

/// What negotiation found out about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// Size in bytes.
    pub(crate) size: u64,
    /// `TFLAG_*`.
    pub(crate) flags: u16,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// The id of `base:allocation`, if the server agreed to it.
    pub(crate) meta: Option<u32>,
    /// Requests must be aligned to this (a power of two).
    pub(crate) min_block: u32,
    /// The largest payload to send or ask for in one request.
    pub(crate) max_payload: u32,
}

impl ExportInfo {
    /// Whether the transmission flags have `flag`.
    pub(crate) fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// What to connect to and how.
#[derive(Clone, Debug)]
pub(crate) struct ClientOptions {
    /// The server.
    pub(crate) addr: ServerAddr,
    /// The export name.
    pub(crate) export: String,
    /// How long requests wait for a reconnect after a connection loss.
    pub(crate) reconnect_delay_ns: i64,
    /// The clock of that delay and of the backoff.
    pub(crate) clock: ClockType,
}

fn eof_text(e: &io::Error, during: &str) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("the server closed the connection {during}"),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => format!(
            "the server closed the connection {during} ({})",
            crate::error::io_text(e)
        ),
        _ => format!("{during}: {}", crate::error::io_text(e)),
    }
}

/// The text of an option error reply.
fn rep_error_name(rep: u32) -> &'static str {
    match rep {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "forbidden by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "unsupported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "export unknown",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block sizes required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    }
}

/// One option reply: header and payload.
struct OptReply {
    reply: u32,
    payload: Vec<u8>,
}

impl OptReply {
    fn is_error(&self) -> bool {
        self.reply & REP_FLAG_ERROR != 0
    }
    /// The error's text: its name and the server's message, if any.
    fn error_text(&self) -> String {
        let msg = String::from_utf8_lossy(&self.payload);
        let msg = msg.trim();
        if msg.is_empty() {
            rep_error_name(self.reply).to_string()
        } else {
            format!("{} ({msg})", rep_error_name(self.reply))
        }
    }
}

/// Fixed-newstyle negotiation on one socket.
struct Negotiation<'a> {
    fd: &'a AsyncFd<Stream>,
    export: &'a str,
}

impl Negotiation<'_> {
    async fn read(&self, buf: &mut [u8], during: &str) -> Result<(), String> {
        self.fd
            .read_exact(buf)
            .await
            .map_err(|e| eof_text(&e, during))
    }

    async fn write(&self, bufs: &[&[u8]], during: &str) -> Result<(), String> {
        self.fd
            .write_all_vectored(bufs)
            .await
            .map_err(|e| eof_text(&e, during))
    }

    async fn send_option(&self, option: u32, payload: &[u8]) -> Result<(), String> {
        let len = u32::try_from(payload.len()).map_err(|_| "option too long".to_string())?;
        let h = OptionHeader { option, len }.encode();
        self.write(&[&h, payload], "while sending an option").await
    }

    async fn read_reply(&self, option: u32) -> Result<OptReply, String> {
        let mut h = [0u8; OptionReply::LEN];
        self.read(&mut h, "during negotiation").await?;
        let r = OptionReply::decode(&h).map_err(|e| format!("{e} during negotiation"))?;
        if r.option != option {
            return Err(format!(
                "unexpected reply to option {} (expected {option})",
                r.option
            ));
        }
        if r.len > MAX_OPTION_REPLY {
            return Err(format!("option reply of {} bytes is too long", r.len));
        }
        let mut payload = vec![0u8; r.len as usize];
        self.read(&mut payload, "during negotiation").await?;
        Ok(OptReply {
            reply: r.reply,
            payload,
        })
    }

    /// The whole handshake; `Err` is a reason for an open error.
    async fn run(&self) -> Result<ExportInfo, String> {
        let mut b = [0u8; 18];
        self.read(&mut b, "during the handshake").await?;
        let magic = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        if magic != INIT_MAGIC {
            return Err(format!("not an NBD server (bad magic {magic:#x})"));
        }
        let second = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
        if second == OLDSTYLE_MAGIC {
            return Err("the server uses oldstyle negotiation, which is not supported".into());
        }
        if second != OPTS_MAGIC {
            return Err(format!("bad handshake magic {second:#x}"));
        }
        let sflags = u16::from_be_bytes([b[16], b[17]]);
        let fixed = sflags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = sflags & FLAG_NO_ZEROES != 0;
        let mut cflags = 0;
        if fixed {
            cflags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.write(&[&cflags.to_be_bytes()], "while sending client flags")
            .await?;
        if !fixed {
            // Only EXPORT_NAME is safe with a server that is not fixed newstyle.
            return self.export_name(no_zeroes, false, None).await;
        }
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let r = self.read_reply(OPT_STRUCTURED_REPLY).await?;
        let structured = match r.reply {
            REP_ACK => true,
            REP_ERR_TLS_REQD => {
                return Err("the server requires TLS, which is not supported".into())
            }
            _ if r.is_error() => false,
            other => return Err(format!("unexpected reply {other} to STRUCTURED_REPLY")),
        };
        let meta = if structured {
            self.set_meta_context().await?
        } else {
            None
        };
        self.go(no_zeroes, structured, meta).await
    }

    /// `OPT_SET_META_CONTEXT base:allocation`: the context id, or `None`
    /// if the server does not offer it.
    async fn set_meta_context(&self) -> Result<Option<u32>, String> {
        let req = MetaContextRequest {
            export: self.export.to_string(),
            queries: vec![META_BASE_ALLOCATION.to_string()],
        };
        self.send_option(OPT_SET_META_CONTEXT, &req.encode())
            .await?;
        let mut id = None;
        loop {
            let r = self.read_reply(OPT_SET_META_CONTEXT).await?;
            match r.reply {
                REP_META_CONTEXT => {
                    let mut at = 0;
                    let cid = take_u32(&r.payload, &mut at).ok_or("short META_CONTEXT reply")?;
                    if r.payload.get(at..) == Some(META_BASE_ALLOCATION.as_bytes()) {
                        id = Some(cid);
                    }
                }
                REP_ACK => return Ok(id),
                _ if r.is_error() => {
                    log::debug!("nbd: SET_META_CONTEXT refused: {}", r.error_text());
                    return Ok(None);
                }
                other => return Err(format!("unexpected reply {other} to SET_META_CONTEXT")),
            }
        }
    }

    /// `OPT_GO` with `INFO_BLOCK_SIZE`; falls back to `EXPORT_NAME` if the
    /// server does not know `GO`.
    async fn go(
        &self,
        no_zeroes: bool,
        structured: bool,
        meta: Option<u32>,
    ) -> Result<ExportInfo, String> {
        let req = GoRequest {
            name: self.export.to_string(),
            info: vec![INFO_BLOCK_SIZE],
        };
        self.send_option(OPT_GO, &req.encode()).await?;
        let mut export: Option<(u64, u16)> = None;
        let mut sizes: Option<(u32, u32, u32)> = None;
        loop {
            let r = self.read_reply(OPT_GO).await?;
            match r.reply {
                REP_INFO => {
                    let p = &r.payload;
                    let mut at = 0;
                    match take_u16(p, &mut at) {
                        Some(INFO_EXPORT) => {
                            let size = take_u64(p, &mut at);
                            let flags = take_u16(p, &mut at);
                            match (size, flags) {
                                (Some(s), Some(f)) => export = Some((s, f)),
                                _ => return Err("short INFO_EXPORT reply".into()),
                            }
                        }
                        Some(INFO_BLOCK_SIZE) => {
                            let min = take_u32(p, &mut at);
                            let pref = take_u32(p, &mut at);
                            let max = take_u32(p, &mut at);
                            match (min, pref, max) {
                                (Some(a), Some(b), Some(c)) => sizes = Some((a, b, c)),
                                _ => return Err("short INFO_BLOCK_SIZE reply".into()),
                            }
                        }
                        Some(_) => {}
                        None => return Err("empty INFO reply".into()),
                    }
                }
                REP_ACK => {
                    let (size, flags) =
                        export.ok_or("the server did not send the export's size")?;
                    return finish(size, flags, structured, meta, sizes);
                }
                REP_ERR_UNSUP => {
                    return self.export_name(no_zeroes, structured, meta).await;
                }
                REP_ERR_UNKNOWN => {
                    return Err(format!(
                        "Requested export '{}' not available: {}",
                        self.export,
                        r.error_text()
                    ))
                }
                _ if r.is_error() => {
                    return Err(format!(
                        "the server refused export '{}': {}",
                        self.export,
                        r.error_text()
                    ))
                }
                other => return Err(format!("unexpected reply {other} to GO")),
            }
        }
    }

    /// `OPT_EXPORT_NAME`: old servers; an unknown export closes the
    /// connection.
    async fn export_name(
        &self,
        no_zeroes: bool,
        structured: bool,
        meta: Option<u32>,
    ) -> Result<ExportInfo, String> {
        self.send_option(OPT_EXPORT_NAME, self.export.as_bytes())
            .await?;
        let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
        self.fd.read_exact(&mut b).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                format!(
                    "the server closed the connection: export '{}' is probably unknown",
                    self.export
                )
            } else {
                eof_text(&e, "reading the export's size")
            }
        })?;
        let size = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        let flags = u16::from_be_bytes([b[8], b[9]]);
        finish(size, flags, structured, meta, None)
    }
}

/// Checks the block sizes and builds the info.
fn finish(
    size: u64,
    flags: u16,
    structured: bool,
    meta: Option<u32>,
    sizes: Option<(u32, u32, u32)>,
) -> Result<ExportInfo, String> {
    let (min_block, max_payload) = match sizes {
        None => (1, MAX_PAYLOAD),
        Some((min, pref, max)) => {
            if !min.is_power_of_two()
                || min > 64 << 10
                || !pref.is_power_of_two()
                || pref < min
                || max < min
                || (max % min != 0 && max != u32::MAX)
            {
                return Err(format!(
                    "the server sent invalid block sizes (minimum {min}, preferred {pref}, maximum {max})"
                ));
            }
            (min, (max.min(MAX_PAYLOAD) / min) * min)
        }
    };
    Ok(ExportInfo {
        size,
        flags,
        structured,
        meta: if structured { meta } else { None },
        min_block,
        max_payload,
    })
}

/// An error the server replied with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerError {
    /// The wire error number.
    pub(crate) errno: u32,
    /// The server's message (structured replies only), maybe empty.
    pub(crate) message: String,
}

impl ServerError {
    /// As an `io::Error` carrying the errno (and the message, if any).
    pub(crate) fn to_io(&self) -> io::Error {
        let os = io::Error::from_raw_os_error(i32::try_from(self.errno).unwrap_or(EIO as i32));
        if self.message.is_empty() {
            os
        } else {
            io::Error::new(
                os.kind(),
                format!("{} ({})", crate::error::io_text(&os), self.message),
            )
        }
    }
}

/// A completed request: the read buffer handed back, the extents of
/// `base:allocation`, or the server's error.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The read buffer (reads only).
    pub(crate) buf: Option<Vec<u8>>,
    /// `(length, flags)` of `base:allocation` (block status only).
    pub(crate) extents: Vec<(u32, u32)>,
    /// The first error the server reported.
    pub(crate) error: Option<ServerError>,
}

/// The connection broke before the request completed; the read buffer
/// comes back for a retry.
#[derive(Debug)]
pub(crate) struct Lost {
    /// Why the connection broke.
    pub(crate) reason: String,
    /// The read buffer, if the request had one.
    pub(crate) buf: Option<Vec<u8>>,
    /// Whether the request reached the queue of a live connection (and so
    /// may have been executed by the server).
    pub(crate) sent: bool,
}

#[derive(Default)]
struct Slot {
    result: Option<Result<Reply, Lost>>,
    waker: Option<Waker>,
}

/// A request waiting for its reply.
struct Pending {
    kind: u16,
    offset: u64,
    len: u32,
    buf: Option<Vec<u8>>,
    /// Bytes of a read the server has sent (data or holes).
    covered: u64,
    extents: Vec<(u32, u32)>,
    error: Option<ServerError>,
    slot: Arc<Mutex<Slot>>,
}

/// A request on its way to the socket.
struct Outgoing {
    header: [u8; REQUEST_LEN],
    payload: Option<Payload>,
}

/// A write payload shared with the caller, who keeps it for a resend.
#[derive(Clone, Debug)]
pub(crate) struct Payload {
    data: Arc<Vec<u8>>,
    start: usize,
    len: usize,
}

impl Payload {
    /// `len` bytes of `data` from `start`.
    pub(crate) fn new(data: Arc<Vec<u8>>, start: usize, len: usize) -> Self {
        Self { data, start, len }
    }
    fn bytes(&self) -> &[u8] {
        self.data
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }
}

#[derive(Default)]
struct ConnState {
    dead: Option<String>,
    died_at: i64,
    next_cookie: u64,
    inflight: HashMap<u64, Pending>,
    queue: VecDeque<Outgoing>,
    writer: Option<Waker>,
    /// Waiting for the queue to empty (disconnect).
    flushed: Vec<Waker>,
}

/// One negotiated connection and its reader and writer tasks.
pub(crate) struct Conn {
    fd: AsyncFd<Stream>,
    info: ExportInfo,
    ctx: WeakAioContext,
    clock: ClockType,
    st: Mutex<ConnState>,
}

/// A request to send.
#[derive(Clone, Debug)]
pub(crate) struct Cmd {
    /// `CMD_*`.
    pub(crate) kind: u16,
    /// `CMD_FLAG_*`.
    pub(crate) flags: u16,
    /// Offset in the export.
    pub(crate) offset: u64,
    /// Length.
    pub(crate) len: u32,
    /// The data of a write.
    pub(crate) payload: Option<Payload>,
}

impl Conn {
    /// Connects, negotiates and starts the reader and writer tasks on
    /// `ctx`, which must be the context of the calling task.
    ///
    /// Connecting and negotiating together may take [`ATTEMPT_TIMEOUT_NS`]
    /// on the client's clock: a server that accepts and then says nothing
    /// fails the attempt instead of stalling it (and a reconnect episode)
    /// for ever.
    async fn open(ctx: &AioContext, opts: &ClientOptions) -> Result<Arc<Conn>, String> {
        let mut attempt = std::pin::pin!(Self::negotiate(ctx, opts));
        let mut limit = std::pin::pin!(ctx.sleep_ns(opts.clock, ATTEMPT_TIMEOUT_NS));
        let (fd, info) = poll_fn(|cx| {
            if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            match limit.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(format!(
                    "the server did not complete negotiation within {} s",
                    ATTEMPT_TIMEOUT_NS / 1_000_000_000
                ))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        log::debug!(
            "nbd: connected to {} export '{}': {info:?}",
            opts.addr,
            opts.export
        );
        let conn = Arc::new(Conn {
            fd,
            info,
            ctx: ctx.downgrade(),
            clock: opts.clock,
            st: Mutex::new(ConnState::default()),
        });
        ctx.spawn(writer(conn.clone())).detach();
        ctx.spawn(reader(conn.clone())).detach();
        Ok(conn)
    }

    async fn negotiate(
        ctx: &AioContext,
        opts: &ClientOptions,
    ) -> Result<(AsyncFd<Stream>, ExportInfo), String> {
        let stream = connect(&opts.addr).await?;
        let fd = AsyncFd::from_nonblocking(ctx, stream, ClientType::INTERNAL);
        let info = Negotiation {
            fd: &fd,
            export: &opts.export,
        }
        .run()
        .await;
        match info {
            Ok(i) => Ok((fd, i)),
            Err(e) => {
                fd.get_ref().shutdown();
                Err(e)
            }
        }
    }

    /// The negotiated facts.
    pub(crate) fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Why the connection is dead, if it is.
    fn dead(&self) -> Option<(String, i64)> {
        let st = self.st.lock();
        st.dead.clone().map(|r| (r, st.died_at))
    }

    /// Queues a request. The future completes with the reply, or with
    /// [`Lost`] if the connection breaks first.
    pub(crate) fn submit(&self, cmd: Cmd, buf: Option<Vec<u8>>) -> ReplyFuture {
        let slot = Arc::new(Mutex::new(Slot::default()));
        let mut st = self.st.lock();
        if let Some(reason) = &st.dead {
            slot.lock().result = Some(Err(Lost {
                reason: reason.clone(),
                buf,
                sent: false,
            }));
            return ReplyFuture { slot };
        }
        st.next_cookie = st.next_cookie.wrapping_add(1);
        let cookie = st.next_cookie;
        let header = Request {
            flags: cmd.flags,
            kind: cmd.kind,
            cookie,
            offset: cmd.offset,
            len: cmd.len,
        }
        .encode();
        if cmd.kind != CMD_DISC {
            st.inflight.insert(
                cookie,
                Pending {
                    kind: cmd.kind,
                    offset: cmd.offset,
                    len: cmd.len,
                    buf,
                    covered: 0,
                    extents: Vec::new(),
                    error: None,
                    slot: slot.clone(),
                },
            );
        }
        st.queue.push_back(Outgoing {
            header,
            payload: cmd.payload,
        });
        let w = st.writer.take();
        drop(st);
        if let Some(w) = w {
            w.wake();
        }
        ReplyFuture { slot }
    }

    /// Marks the connection dead: every request on it completes with
    /// [`Lost`], both tasks end, the socket is shut down.
    fn kill(&self, reason: String) {
        let died_at = self.ctx.upgrade().map_or(0, |c| c.clock_now(self.clock));
        let (pending, wakers) = {
            let mut st = self.st.lock();
            if st.dead.is_some() {
                return;
            }
            log::warn!("nbd: connection lost: {reason}");
            st.dead = Some(reason.clone());
            st.died_at = died_at;
            st.queue.clear();
            let mut wakers: Vec<Waker> = st.flushed.drain(..).collect();
            wakers.extend(st.writer.take());
            let pending: Vec<Pending> = st.inflight.drain().map(|(_, p)| p).collect();
            (pending, wakers)
        };
        for p in pending {
            complete(
                &p.slot,
                Err(Lost {
                    reason: reason.clone(),
                    buf: p.buf,
                    sent: true,
                }),
            );
        }
        for w in wakers {
            w.wake();
        }
        self.fd.get_ref().shutdown();
    }

    /// Sends `NBD_CMD_DISC`, waits until it is written (or the connection
    /// dies), and shuts the socket down.
    async fn disconnect(&self) {
        // DISC has no reply: nothing to wait for but the write.
        drop(self.submit(
            Cmd {
                kind: CMD_DISC,
                flags: 0,
                offset: 0,
                len: 0,
                payload: None,
            },
            None,
        ));
        poll_fn(|cx| {
            let mut st = self.st.lock();
            if st.dead.is_some() || st.queue.is_empty() && st.writer.is_some() {
                return Poll::Ready(());
            }
            st.flushed.push(cx.waker().clone());
            Poll::Pending
        })
        .await;
        self.kill("disconnected".into());
    }

    /// The next batch of requests to write; `None` once dead.
    fn next_batch(&self, cx: &mut Context<'_>) -> Poll<Option<Vec<Outgoing>>> {
        let mut st = self.st.lock();
        if st.dead.is_some() {
            return Poll::Ready(None);
        }
        if st.queue.is_empty() {
            st.writer = Some(cx.waker().clone());
            let flushed: Vec<Waker> = st.flushed.drain(..).collect();
            drop(st);
            for w in flushed {
                w.wake();
            }
            return Poll::Pending;
        }
        let n = st.queue.len().min(WRITE_BATCH);
        Poll::Ready(Some(st.queue.drain(..n).collect()))
    }

    /// Reads replies until the connection breaks; returns why.
    async fn read_replies(&self) -> String {
        loop {
            if let Err(e) = self.read_one().await {
                return e;
            }
        }
    }

    async fn read_exact(&self, buf: &mut [u8]) -> Result<(), String> {
        self.fd.read_exact(buf).await.map_err(|e| {
            if let Some(r) = self.dead() {
                return r.0;
            }
            eof_text(&e, "while reading a reply")
        })
    }

    /// Looks up a request by cookie: (kind, offset, len).
    fn lookup(&self, cookie: u64) -> Result<(u16, u64, u32), String> {
        let st = self.st.lock();
        match st.inflight.get(&cookie) {
            Some(p) => Ok((p.kind, p.offset, p.len)),
            None if st.dead.is_some() => Err(st.dead.clone().unwrap_or_default()),
            None => Err(format!("reply with unknown cookie {cookie:#x}")),
        }
    }

    fn with_pending<R>(&self, cookie: u64, f: impl FnOnce(&mut Pending) -> R) -> Result<R, String> {
        let mut st = self.st.lock();
        match st.inflight.get_mut(&cookie) {
            Some(p) => Ok(f(p)),
            None => Err(st.dead.clone().unwrap_or_else(|| "request vanished".into())),
        }
    }

    /// Reads `len` bytes into the read buffer of request `cookie` at `at`.
    async fn read_into(&self, cookie: u64, at: usize, len: usize) -> Result<(), String> {
        let mut buf = self
            .with_pending(cookie, |p| p.buf.take())?
            .ok_or("data for a request without a buffer")?;
        let r = match buf.get_mut(at..at + len) {
            Some(s) => self.read_exact(s).await,
            None => Err("data outside the read buffer".to_string()),
        };
        self.with_pending(cookie, |p| {
            p.buf = Some(buf);
            p.covered += len as u64;
        })?;
        r
    }

    /// Reads and routes one simple reply or structured chunk.
    async fn read_one(&self) -> Result<(), String> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h).await?;
        match ReplyHeader::decode(&h).map_err(|e| e.to_string())? {
            ReplyHeader::Simple(s) => {
                let (kind, _, len) = self.lookup(s.cookie)?;
                if s.error != 0 {
                    self.with_pending(s.cookie, |p| {
                        p.error = Some(ServerError {
                            errno: s.error,
                            message: String::new(),
                        })
                    })?;
                } else if kind == CMD_READ {
                    self.read_into(s.cookie, 0, len as usize).await?;
                }
                self.finish_request(s.cookie);
                Ok(())
            }
            ReplyHeader::Structured {
                flags,
                kind,
                cookie,
            } => {
                let mut l = [0u8; 4];
                self.read_exact(&mut l).await?;
                let len = u32::from_be_bytes(l);
                if !self.info.structured {
                    return Err("structured reply without negotiating it".into());
                }
                let (cmd, offset, rlen) = self.lookup(cookie)?;
                self.read_chunk(cookie, kind, len, (cmd, offset, rlen))
                    .await?;
                if flags & REPLY_FLAG_DONE != 0 {
                    self.finish_request(cookie);
                }
                Ok(())
            }
        }
    }

    async fn read_payload(&self, len: u32) -> Result<Vec<u8>, String> {
        if len > MAX_CHUNK {
            return Err(format!("reply chunk of {len} bytes is too long"));
        }
        let mut p = vec![0u8; len as usize];
        self.read_exact(&mut p).await?;
        Ok(p)
    }

    async fn read_chunk(
        &self,
        cookie: u64,
        kind: u16,
        len: u32,
        (cmd, offset, rlen): (u16, u64, u32),
    ) -> Result<(), String> {
        let name = command_name(cmd);
        // The part of the request a chunk at `off` of `n` bytes covers.
        let within = |off: u64, n: u64| -> Result<usize, String> {
            match off.checked_sub(offset) {
                Some(d) if d.checked_add(n).is_some_and(|e| e <= u64::from(rlen)) => Ok(d as usize),
                _ => Err(format!(
                    "chunk of {n} bytes at {off} is outside the {name} request ({rlen} bytes at {offset})"
                )),
            }
        };
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                if cmd != CMD_READ || len < 8 {
                    return Err(format!("bad OFFSET_DATA chunk for {name}"));
                }
                let mut o = [0u8; 8];
                self.read_exact(&mut o).await?;
                let off = u64::from_be_bytes(o);
                let n = len - 8;
                let at = within(off, n.into())?;
                self.read_into(cookie, at, n as usize).await
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if cmd != CMD_READ || len != 12 {
                    return Err(format!("bad OFFSET_HOLE chunk for {name}"));
                }
                let p = self.read_payload(len).await?;
                let mut i = 0;
                let off = take_u64(&p, &mut i).unwrap_or_default();
                let n = take_u32(&p, &mut i).unwrap_or_default();
                let at = within(off, n.into())?;
                self.with_pending(cookie, |p| {
                    if let Some(b) = p.buf.as_mut().and_then(|b| b.get_mut(at..at + n as usize)) {
                        b.fill(0);
                    }
                    p.covered += u64::from(n);
                })
            }
            REPLY_TYPE_BLOCK_STATUS => {
                if cmd != CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8 != 0 {
                    return Err(format!("bad BLOCK_STATUS chunk for {name}"));
                }
                let p = self.read_payload(len).await?;
                let mut i = 0;
                let id = take_u32(&p, &mut i).unwrap_or_default();
                if Some(id) != self.info.meta {
                    return Err(format!("BLOCK_STATUS for unknown context {id}"));
                }
                let mut ext = Vec::new();
                while let (Some(l), Some(f)) = (take_u32(&p, &mut i), take_u32(&p, &mut i)) {
                    ext.push((l, f));
                }
                self.with_pending(cookie, |p| {
                    if p.extents.is_empty() {
                        p.extents = ext;
                    }
                })
            }
            REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err("NONE chunk with a payload".into());
                }
                Ok(())
            }
            k if k & (1 << 15) != 0 => {
                let p = self.read_payload(len).await?;
                let mut i = 0;
                let errno = take_u32(&p, &mut i).ok_or("short error chunk")?;
                let mlen = take_u16(&p, &mut i).ok_or("short error chunk")? as usize;
                let message = p
                    .get(i..i + mlen)
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .ok_or("error chunk message past its end")?;
                if errno == 0 {
                    return Err("error chunk with error 0".into());
                }
                self.with_pending(cookie, |p| {
                    p.error.get_or_insert(ServerError { errno, message });
                })
            }
            other => Err(format!("unknown reply chunk type {other}")),
        }
    }

    /// The request's last chunk arrived: hand the reply over.
    fn finish_request(&self, cookie: u64) {
        let Some(p) = self.st.lock().inflight.remove(&cookie) else {
            return;
        };
        let mut error = p.error;
        if error.is_none() && p.kind == CMD_READ && p.covered != u64::from(p.len) {
            error = Some(ServerError {
                errno: EIO,
                message: format!("the server sent {} of {} bytes of a read", p.covered, p.len),
            });
        }
        if error.is_none() && p.kind == CMD_BLOCK_STATUS && p.extents.is_empty() {
            error = Some(ServerError {
                errno: EIO,
                message: "the server sent no extents for base:allocation".into(),
            });
        }
        complete(
            &p.slot,
            Ok(Reply {
                buf: p.buf,
                extents: p.extents,
                error,
            }),
        );
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.fd.get_ref().shutdown();
    }
}

fn complete(slot: &Mutex<Slot>, r: Result<Reply, Lost>) {
    let w = {
        let mut s = slot.lock();
        s.result = Some(r);
        s.waker.take()
    };
    if let Some(w) = w {
        w.wake();
    }
}

/// The future of [`Conn::submit`].
#[must_use = "futures do nothing unless awaited"]
pub(crate) struct ReplyFuture {
    slot: Arc<Mutex<Slot>>,
}

impl Future for ReplyFuture {
    type Output = Result<Reply, Lost>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.lock();
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

async fn writer(conn: Arc<Conn>) {
    while let Some(batch) = poll_fn(|cx| conn.next_batch(cx)).await {
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
        for o in &batch {
            bufs.push(&o.header);
            if let Some(p) = &o.payload {
                bufs.push(p.bytes());
            }
        }
        if let Err(e) = conn.fd.write_all_vectored(&bufs).await {
            let reason = conn
                .dead()
                .map_or_else(|| eof_text(&e, "while sending a request"), |d| d.0);
            conn.kill(reason);
            return;
        }
    }
}

async fn reader(conn: Arc<Conn>) {
    let reason = conn.read_replies().await;
    conn.kill(reason);
}

/// Where the client is.
enum Phase {
    /// A connection (maybe found dead at the next look).
    Up(Arc<Conn>),
    /// A reconnect episode is running.
    Reconnecting { episode: u64 },
    /// The last episode failed with this text.
    Failed { episode: u64, reason: String },
    /// Closed for good.
    Closed,
}

struct ClientState {
    phase: Phase,
    episode: u64,
    waiters: Vec<Waker>,
}

/// An NBD client: the current connection and the reconnect logic.
pub(crate) struct Client {
    opts: ClientOptions,
    ctx: WeakAioContext,
    /// The export as first opened; reconnects must find the same.
    first: ExportInfo,
    st: Mutex<ClientState>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.opts.addr)
            .field("export", &self.opts.export)
            .finish()
    }
}

impl Client {
    /// Connects and negotiates. Must run in a task (or `block_on`) of the
    /// context the connection will live on.
    pub(crate) async fn connect(opts: ClientOptions) -> Result<Arc<Client>, String> {
        let ctx = AioContext::current()
            .ok_or("the NBD client must be opened from a task on an AioContext")?;
        let conn = Conn::open(&ctx, &opts).await?;
        let first = conn.info;
        Ok(Arc::new(Client {
            opts,
            ctx: ctx.downgrade(),
            first,
            st: Mutex::new(ClientState {
                phase: Phase::Up(conn),
                episode: 0,
                waiters: Vec::new(),
            }),
        }))
    }

    /// What the first connection negotiated.
    pub(crate) fn info(&self) -> &ExportInfo {
        &self.first
    }

    /// The options.
    pub(crate) fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// A live connection: the current one, or one from a reconnect episode
    /// this call starts or joins. `Err` with the reason when the episode
    /// failed or the client is closed.
    pub(crate) async fn connection(self: &Arc<Self>) -> Result<Arc<Conn>, String> {
        let mut joined: Option<u64> = None;
        poll_fn(|cx| {
            let mut st = self.st.lock();
            loop {
                match &st.phase {
                    Phase::Closed => return Poll::Ready(Err("the NBD node is closed".to_string())),
                    Phase::Up(c) => match c.dead() {
                        None => return Poll::Ready(Ok(c.clone())),
                        Some((reason, died_at)) => {
                            let deadline = (self.opts.reconnect_delay_ns > 0)
                                .then(|| died_at.saturating_add(self.opts.reconnect_delay_ns));
                            self.start_episode(&mut st, deadline, reason);
                        }
                    },
                    Phase::Reconnecting { episode } => {
                        joined = Some(*episode);
                        st.waiters.push(cx.waker().clone());
                        return Poll::Pending;
                    }
                    Phase::Failed { episode, reason } => {
                        if joined == Some(*episode) {
                            return Poll::Ready(Err(reason.clone()));
                        }
                        let reason = reason.clone();
                        self.start_episode(&mut st, None, reason);
                    }
                }
            }
        })
        .await
    }

    /// Starts a reconnect task: attempts until `deadline` on the client's
    /// clock, or one attempt.
    fn start_episode(self: &Arc<Self>, st: &mut ClientState, deadline: Option<i64>, lost: String) {
        st.episode += 1;
        let episode = st.episode;
        let Some(ctx) = self.ctx.upgrade() else {
            st.phase = Phase::Failed {
                episode,
                reason: format!("{lost}; cannot reconnect: the AioContext is gone"),
            };
            return;
        };
        st.phase = Phase::Reconnecting { episode };
        let me = self.clone();
        ctx.spawn(async move { me.reconnect(episode, deadline, lost).await })
            .detach();
    }

    async fn reconnect(self: Arc<Self>, episode: u64, deadline: Option<i64>, lost: String) {
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let clock = self.opts.clock;
        let mut backoff = BACKOFF_START_NS;
        let mut attempts = 0u32;
        let result = loop {
            attempts += 1;
            let r = match Conn::open(&ctx, &self.opts).await {
                Ok(c) => match self.compatible(c.info()) {
                    Ok(()) => Ok(c),
                    Err(e) => {
                        c.disconnect().await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match r {
                Ok(c) => break Ok(c),
                Err(e) => {
                    let now = ctx.clock_now(clock);
                    match deadline {
                        Some(d) if now < d && !self.is_closed() => {
                            log::debug!("nbd: reconnect attempt {attempts} failed: {e}");
                            aio::sleep_ns(clock, backoff.min(d - now)).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX_NS);
                        }
                        _ => break Err(e),
                    }
                }
            }
        };
        let (old, waiters) = {
            let mut st = self.st.lock();
            if matches!(st.phase, Phase::Closed) {
                // Closed while reconnecting: hang up the new connection.
                (result.ok().map(Phase::Up), Vec::new())
            } else {
                let new = match result {
                    Ok(c) => {
                        log::info!(
                            "nbd: reconnected to {} export '{}' after {attempts} attempt(s)",
                            self.opts.addr,
                            self.opts.export
                        );
                        Phase::Up(c)
                    }
                    Err(e) => {
                        let reason = format!("{lost}; reconnecting failed: {e}");
                        log::warn!("nbd: {reason}");
                        Phase::Failed { episode, reason }
                    }
                };
                let old = std::mem::replace(&mut st.phase, new);
                (Some(old), std::mem::take(&mut st.waiters))
            }
        };
        for w in waiters {
            w.wake();
        }
        if let Some(Phase::Up(c)) = old {
            if c.dead().is_none() {
                c.disconnect().await;
            }
        }
    }

    fn is_closed(&self) -> bool {
        matches!(self.st.lock().phase, Phase::Closed)
    }

    /// A new connection must show the export as it was.
    fn compatible(&self, new: &ExportInfo) -> Result<(), String> {
        if new.size != self.first.size {
            return Err(format!(
                "the export's size changed from {} to {} bytes",
                self.first.size, new.size
            ));
        }
        if new.has(TFLAG_READ_ONLY) && !self.first.has(TFLAG_READ_ONLY) {
            return Err("the export became read-only".into());
        }
        Ok(())
    }

    /// Closes for good: requests waiting for a reconnect fail, the
    /// connection (if any) sends `NBD_CMD_DISC` and is shut down.
    /// Idempotent.
    pub(crate) async fn close(&self) {
        let (old, waiters) = {
            let mut st = self.st.lock();
            let old = std::mem::replace(&mut st.phase, Phase::Closed);
            (old, std::mem::take(&mut st.waiters))
        };
        for w in waiters {
            w.wake();
        }
        if let Phase::Up(c) = old {
            if c.dead().is_none() {
                c.disconnect().await;
            }
            dispose(&self.ctx, c);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let old = std::mem::replace(&mut self.st.get_mut().phase, Phase::Closed);
        if let Phase::Up(c) = old {
            c.kill("the NBD node was dropped".into());
            dispose(&self.ctx, c);
        }
    }
}

/// Drops a connection on its own context, where its fd is registered.
fn dispose(ctx: &WeakAioContext, c: Arc<Conn>) {
    match ctx.upgrade() {
        Some(ctx) => ctx.spawn(async move { drop(c) }).detach(),
        None => drop(c),
    }
}

/// The wire text of a command, for errors.
pub(crate) fn cmd_name(kind: u16) -> &'static str {
    proto::command_name(kind)
}
