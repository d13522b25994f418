//! The transmission phase of an NBD connection, on its export's context.
//!
//! One reader task per connection reads requests (header, then a write's
//! payload) and spawns each as a task of its own, up to
//! [`MAX_IN_FLIGHT`]; the requests run concurrently on the node, and their
//! replies go out whole, one at a time, under the connection's
//! [`CoMutex`]. Before reading the next request the reader waits while
//! external clients are disabled on the context, so a drained section sees
//! no new requests (those already running finish).
//!
//! Errors a client can cause — a request past the end, too big, with
//! flags the command does not take, a write to a read-only export — get
//! an error reply and the connection goes on. A request that breaks the
//! framing (bad magic) drops the connection.

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{Poll, Waker};

use aio::net::AsyncFd;
use aio::{AioContext, ClientType, CoMutex, WeakAioContext};
use parking_lot::Mutex;

use super::proto::*;
use super::server::{quiesced, Conn, ConnGuard, ExportOptions};
use crate::block::{BlockNode, BlockRoot, Buffer, DirtyBitmap};
use crate::Error;

/// Requests served at once per connection (QEMU's `MAX_NBD_REQUESTS`).
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// Extents in one `BLOCK_STATUS` reply at most.
const MAX_EXTENTS: usize = 2048;

/// An export: a node under a name, and the permission held on it (a
/// [`BlockRoot`], so that the export follows its node when a mirror or an
/// active commit pivots to another node).
pub(crate) struct Export {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    root: Arc<BlockRoot>,
    pub(crate) writable: bool,
    writethrough: bool,
    ctx: WeakAioContext,
    /// The dirty bitmaps offered as `qemu:dirty-bitmap:NAME` (busy while
    /// the export lives).
    pub(crate) bitmaps: Vec<Arc<DirtyBitmap>>,
}

impl Export {
    pub(crate) fn new(
        opts: &ExportOptions,
        name: String,
        root: Arc<BlockRoot>,
        ctx: &AioContext,
        bitmaps: Vec<Arc<DirtyBitmap>>,
    ) -> Self {
        Self {
            id: opts.id.clone(),
            name,
            description: opts.description.clone(),
            root,
            writable: opts.writable,
            writethrough: opts.writethrough,
            ctx: ctx.downgrade(),
            bitmaps,
        }
    }

    /// The node the export serves now.
    pub(crate) fn node(&self) -> Arc<BlockNode> {
        self.root.node()
    }

    /// The context the export's requests run on.
    pub(crate) fn context(&self) -> Option<AioContext> {
        self.ctx.upgrade()
    }

    /// Drops the permission on the node (the export is gone).
    pub(crate) fn release(&self) {
        self.root.release();
        for b in &self.bitmaps {
            b.set_busy(false);
        }
    }
}

/// A `BLOCK_STATUS` chunk payload: the context id, then (length, flags)
/// pairs.
fn status_payload(id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + 8 * extents.len());
    p.extend_from_slice(&id.to_be_bytes());
    for (n, f) in extents {
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

/// A negotiated connection, handed to [`serve`].
pub(crate) struct Session {
    pub(crate) conn: Conn,
    pub(crate) guard: ConnGuard,
    pub(crate) export: Arc<Export>,
    pub(crate) structured: bool,
    pub(crate) base_allocation: bool,
    /// Selected bitmap contexts: indexes into the export's bitmaps.
    pub(crate) bitmaps: Vec<usize>,
}

struct Slots {
    in_flight: usize,
    reader: Option<Waker>,
}

struct Connection {
    fd: AsyncFd<Conn>,
    conn: Conn,
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
    bitmaps: Vec<usize>,
    /// Serializes replies: each goes out whole.
    send: CoMutex<()>,
    slots: Mutex<Slots>,
    _guard: ConnGuard,
}

/// Why a request failed: the wire errno and a message for the client.
struct Failure {
    errno: u32,
    msg: String,
}

/// An aligned buffer for `len` bytes of a request: an export of an
/// `O_DIRECT` image then needs no bounce copy below.
fn request_buffer(len: usize) -> Result<Buffer, Failure> {
    Buffer::aligned(len).map_err(|e| fail(ENOMEM, e.to_string()))
}

fn fail(errno: u32, msg: impl Into<String>) -> Failure {
    Failure {
        errno,
        msg: msg.into(),
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let errno = match &e {
            Error::Io {
                source: aio::Error::Io { source, .. },
                ..
            } => errno_of(source.raw_os_error()),
            Error::Permission { .. } => EPERM,
            Error::InvalidArgument(_) => EINVAL,
            Error::Unsupported { .. } => ENOTSUP,
            _ => EIO,
        };
        fail(errno, e.to_string())
    }
}

/// One piece of a structured `READ` reply.
enum Piece {
    Data(u64, Buffer),
    Hole(u64, u32),
}

/// Serves a connection until the client disconnects, breaks the protocol
/// or is shut down. Runs on the export's context.
pub(crate) async fn serve(s: Session) {
    let Some(ctx) = AioContext::current() else {
        return;
    };
    let c = Arc::new(Connection {
        fd: AsyncFd::from_nonblocking(&ctx, s.conn.clone(), ClientType::EXTERNAL),
        conn: s.conn,
        export: s.export,
        structured: s.structured,
        base_allocation: s.base_allocation,
        bitmaps: s.bitmaps,
        send: CoMutex::new(()),
        slots: Mutex::new(Slots {
            in_flight: 0,
            reader: None,
        }),
        _guard: s.guard,
    });
    match read_requests(&c, &ctx).await {
        Ok(()) => log::debug!("nbd: export '{}': client gone", c.export.id),
        Err(e) => {
            log::info!("nbd: export '{}': dropping client: {e}", c.export.id);
            c.conn.shutdown();
        }
    }
}

async fn read_requests(c: &Arc<Connection>, ctx: &AioContext) -> io::Result<()> {
    loop {
        quiesced(&c.fd, ctx).await?;
        poll_fn(|cx| {
            let mut s = c.slots.lock();
            if s.in_flight < MAX_IN_FLIGHT {
                Poll::Ready(())
            } else {
                s.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let mut h = [0u8; REQUEST_LEN];
        match c.fd.read_exact(&mut h).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = Request::decode(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if req.kind == CMD_DISC {
            // Requests in flight finish; the socket closes with the last.
            return Ok(());
        }
        let payload = if req.kind == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                discard(&c.fd, u64::from(req.len)).await?;
                Err(fail(
                    EINVAL,
                    format!(
                        "write of {} bytes is over the limit of {MAX_PAYLOAD}",
                        req.len
                    ),
                ))
            } else {
                match request_buffer(req.len as usize) {
                    Ok(mut data) => {
                        c.fd.read_exact(&mut data).await?;
                        Ok(data)
                    }
                    Err(f) => {
                        discard(&c.fd, u64::from(req.len)).await?;
                        Err(f)
                    }
                }
            }
        } else {
            Ok(Buffer::default())
        };
        c.slots.lock().in_flight += 1;
        ctx.spawn(handle(c.clone(), req, payload)).detach();
    }
}

/// Reads and throws away `len` bytes (the payload of a refused write).
async fn discard(fd: &AsyncFd<Conn>, mut len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        fd.read_exact(&mut buf[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

async fn handle(c: Arc<Connection>, req: Request, payload: Result<Buffer, Failure>) {
    let r = match payload.and_then(|p| c.check(&req).map(|()| p)) {
        Ok(p) => c.run(&req, p).await,
        Err(f) => c.send_error(&req, f).await,
    };
    if let Err(e) = r {
        log::debug!(
            "nbd: export '{}': reply to {}: {e}",
            c.export.id,
            command_name(req.kind)
        );
        c.conn.shutdown();
    }
    let waker = {
        let mut s = c.slots.lock();
        s.in_flight -= 1;
        s.reader.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

impl Connection {
    /// The checks every request passes before it reaches the node.
    fn check(&self, req: &Request) -> Result<(), Failure> {
        let allowed = CMD_FLAG_FUA
            | match req.kind {
                CMD_READ if self.structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => 0,
                k => return Err(fail(EINVAL, format!("unsupported command {k}"))),
            };
        if req.flags & !allowed != 0 {
            return Err(fail(
                EINVAL,
                format!(
                    "unsupported flags {:#x} for {}",
                    req.flags & !allowed,
                    command_name(req.kind)
                ),
            ));
        }
        if req.kind == CMD_FLUSH {
            return Ok(());
        }
        if req.len == 0 {
            return Err(fail(EINVAL, "request of length 0"));
        }
        if req.kind == CMD_READ && req.len > MAX_PAYLOAD {
            let errno = if req.flags & CMD_FLAG_DF != 0 {
                EOVERFLOW
            } else {
                EINVAL
            };
            return Err(fail(
                errno,
                format!(
                    "read of {} bytes is over the limit of {MAX_PAYLOAD}",
                    req.len
                ),
            ));
        }
        let size = self.export.node().len();
        let writes = matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES);
        if req
            .offset
            .checked_add(u64::from(req.len))
            .is_none_or(|end| end > size)
        {
            return Err(fail(
                if writes { ENOSPC } else { EINVAL },
                format!(
                    "{} of {} bytes at offset {} is past the end of the export ({size} bytes)",
                    command_name(req.kind),
                    req.len,
                    req.offset
                ),
            ));
        }
        if (writes || req.kind == CMD_TRIM) && !self.export.writable {
            return Err(fail(EPERM, "export is read-only"));
        }
        if req.kind == CMD_BLOCK_STATUS && !self.base_allocation && self.bitmaps.is_empty() {
            return Err(fail(EINVAL, "no metadata context was selected"));
        }
        Ok(())
    }

    async fn run(&self, req: &Request, payload: Buffer) -> io::Result<()> {
        let node = &self.export.node();
        let fua = req.flags & CMD_FLAG_FUA != 0 || self.export.writethrough;
        let len = u64::from(req.len);
        let r: Result<(), Failure> = match req.kind {
            CMD_READ => return self.read(req).await,
            CMD_BLOCK_STATUS => return self.block_status(req).await,
            CMD_WRITE => node.write(req.offset, payload).await.map_err(Failure::from),
            CMD_FLUSH => node.flush().await.map_err(Failure::from),
            CMD_TRIM => node.discard(req.offset, len).await.map_err(Failure::from),
            CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 => {
                // The block layer cannot promise a zero write without a
                // slow fallback, so the client is told to use its own.
                Err(fail(ENOTSUP, "fast zeroing is not supported"))
            }
            CMD_WRITE_ZEROES => node
                .write_zeroes(req.offset, len)
                .await
                .map_err(Failure::from),
            _ => Err(fail(EINVAL, "unsupported command")),
        };
        let r = match r {
            Ok(()) if fua && req.kind != CMD_FLUSH => node.flush().await.map_err(Failure::from),
            r => r,
        };
        match r {
            Ok(()) => self.send_simple(req.cookie, 0, &[]).await,
            Err(f) => self.send_error(req, f).await,
        }
    }

    async fn read(&self, req: &Request) -> io::Result<()> {
        let node = &self.export.node();
        let len = req.len as usize;
        if !self.structured {
            let data = match request_buffer(len) {
                Ok(b) => node.guest_read(req.offset, b).await.map_err(Failure::from),
                Err(f) => Err(f),
            };
            return match data {
                Ok(data) => self.send_simple(req.cookie, 0, &data).await,
                Err(f) => self.send_error(req, f).await,
            };
        }
        let pieces = if req.flags & CMD_FLAG_DF != 0 {
            match request_buffer(len) {
                Ok(b) => node
                    .guest_read(req.offset, b)
                    .await
                    .map(|d| vec![Piece::Data(req.offset, d)])
                    .map_err(Failure::from),
                Err(f) => Err(f),
            }
        } else {
            self.sparse_read(req.offset, req.len).await
        };
        let pieces = match pieces {
            Ok(p) => p,
            Err(f) => return self.send_error(req, f).await,
        };
        let mut heads: Vec<Vec<u8>> = Vec::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            let flags = if i + 1 == pieces.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let (kind, off, plen) = match p {
                Piece::Data(off, d) => (REPLY_TYPE_OFFSET_DATA, *off, 8 + d.len() as u32),
                Piece::Hole(off, _) => (REPLY_TYPE_OFFSET_HOLE, *off, 12),
            };
            let mut h = StructuredReply {
                flags,
                kind,
                cookie: req.cookie,
                len: plen,
            }
            .encode()
            .to_vec();
            h.extend_from_slice(&off.to_be_bytes());
            if let Piece::Hole(_, n) = p {
                h.extend_from_slice(&n.to_be_bytes());
            }
            heads.push(h);
        }
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(2 * pieces.len());
        for (h, p) in heads.iter().zip(&pieces) {
            bufs.push(h);
            if let Piece::Data(_, d) = p {
                bufs.push(d);
            }
        }
        self.send_all(&bufs).await
    }

    /// The range as data and holes: what reads as zeroes becomes
    /// `OFFSET_HOLE` chunks, the rest is read.
    async fn sparse_read(&self, offset: u64, len: u32) -> Result<Vec<Piece>, Failure> {
        let node = &self.export.node();
        let end = offset + u64::from(len);
        // Runs of (start, len, reads as zero).
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let cs = node.chain_status(pos, end - pos).await?;
            let n = cs.len.min(end - pos);
            if n == 0 {
                return Err(fail(EIO, "block status made no progress"));
            }
            match runs.last_mut() {
                Some(last) if last.2 == cs.status.zero => last.1 += n,
                _ => runs.push((pos, n, cs.status.zero)),
            }
            pos += n;
        }
        let mut pieces = Vec::with_capacity(runs.len());
        for (start, n, zero) in runs {
            pieces.push(if zero {
                Piece::Hole(start, n as u32)
            } else {
                Piece::Data(
                    start,
                    node.guest_read(start, request_buffer(n as usize)?).await?,
                )
            });
        }
        Ok(pieces)
    }

    async fn block_status(&self, req: &Request) -> io::Result<()> {
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        if self.base_allocation {
            match self.allocation_extents(req, one).await {
                Ok(e) => chunks.push(status_payload(0, &e)),
                Err(f) => return self.send_error(req, f).await,
            }
        }
        for &i in &self.bitmaps {
            let Some(b) = self.export.bitmaps.get(i) else {
                continue;
            };
            let mut e: Vec<(u32, u32)> = b
                .extents(req.offset, u64::from(req.len))
                .iter()
                .take(MAX_EXTENTS)
                .map(|x| (x.len as u32, u32::from(x.dirty)))
                .collect();
            if one {
                e.truncate(1);
            }
            if e.is_empty() {
                return self
                    .send_error(req, fail(EIO, "no block status for the range"))
                    .await;
            }
            chunks.push(status_payload(i as u32 + 1, &e));
        }
        if chunks.is_empty() {
            return self
                .send_error(req, fail(EINVAL, "no metadata context was selected"))
                .await;
        }
        // One chunk per context, the last flagged DONE, written together
        // so that the reply goes out whole.
        let n = chunks.len();
        let heads: Vec<[u8; 20]> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                StructuredReply {
                    flags: if i + 1 == n { REPLY_FLAG_DONE } else { 0 },
                    kind: REPLY_TYPE_BLOCK_STATUS,
                    cookie: req.cookie,
                    len: c.len() as u32,
                }
                .encode()
            })
            .collect();
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(2 * n);
        for (h, c) in heads.iter().zip(&chunks) {
            bufs.push(h);
            bufs.push(c);
        }
        self.send_all(&bufs).await
    }

    /// `base:allocation` extents of the request's range.
    async fn allocation_extents(
        &self,
        req: &Request,
        one: bool,
    ) -> Result<Vec<(u32, u32)>, Failure> {
        let node = &self.export.node();
        let end = req.offset + u64::from(req.len);
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut pos = req.offset;
        while pos < end && extents.len() < MAX_EXTENTS {
            let cs = node.chain_status(pos, end - pos).await?;
            let n = cs.len.min(end - pos);
            if n == 0 {
                break;
            }
            // HOLE where nothing is stored (as QEMU: no data), ZERO where it
            // reads as zeroes.
            let flags = if cs.status.data { 0 } else { STATE_HOLE }
                | if cs.status.zero { STATE_ZERO } else { 0 };
            match extents.last_mut() {
                Some(last) if last.1 == flags => last.0 += n as u32,
                Some(_) if one => break,
                _ => extents.push((n as u32, flags)),
            }
            pos += n;
        }
        if extents.is_empty() {
            return Err(fail(EIO, "no block status for the range"));
        }
        Ok(extents)
    }

    /// A structured chunk of `kind` that ends the reply.
    async fn send_last_chunk(&self, cookie: u64, kind: u16, payload: &[u8]) -> io::Result<()> {
        let h = StructuredReply {
            flags: REPLY_FLAG_DONE,
            kind,
            cookie,
            len: payload.len() as u32,
        }
        .encode();
        self.send_all(&[&h, payload]).await
    }

    async fn send_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let _g = self.send.lock().await;
        self.fd.write_all_vectored(bufs).await
    }

    async fn send_simple(&self, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
        let h = SimpleReply { error, cookie }.encode();
        self.send_all(&[&h, data]).await
    }

    /// An error reply: a structured `ERROR` chunk with the message where
    /// structured replies were negotiated, else a simple reply.
    async fn send_error(&self, req: &Request, f: Failure) -> io::Result<()> {
        log::debug!(
            "nbd: export '{}': {} at {}+{}: {}",
            self.export.id,
            command_name(req.kind),
            req.offset,
            req.len,
            f.msg
        );
        if !self.structured {
            return self.send_simple(req.cookie, f.errno, &[]).await;
        }
        let mut msg = f.msg.as_str();
        while msg.len() > MAX_STRING {
            let mut cut = MAX_STRING;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg = &msg[..cut];
        }
        let mut payload = Vec::with_capacity(6 + msg.len());
        payload.extend_from_slice(&f.errno.to_be_bytes());
        payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        payload.extend_from_slice(msg.as_bytes());
        self.send_last_chunk(req.cookie, REPLY_TYPE_ERROR, &payload)
            .await
    }
}
