//! The `nbd` protocol driver: a node whose data lives in an export of an
//! NBD server (`qemu-nbd`, `qemu-storage-daemon`, `nbdkit`, ...).
//!
//! The connection, negotiation and reconnects are in [`crate::nbd::client`];
//! this file maps block-layer requests onto NBD commands: splitting at the
//! server's maximum payload, falling back where the server lacks a command,
//! retrying across reconnects, and turning replies into [`BlockStatus`].
//!
//! **Contexts.** The connection lives on the context the node was opened
//! on (the task running `blockdev-add`: the node's iothread or the main
//! context); its reader and writer tasks run there and only they touch the
//! socket. Requests may come from any context or thread: they queue their
//! command under a lock and are woken by the reader, so a request from
//! another context costs a cross-thread wake-up but is otherwise the same.
//! The node's context must keep running for requests to progress, and a
//! node cannot move to another context later.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{BlockDriver, BlockStatus, BoxFuture, Buffer, ImageInfo};
use crate::nbd::client::{cmd_name, Client, ClientOptions, Cmd, Payload, Reply, ServerAddr};
use crate::nbd::proto::*;
use crate::{Error, Result};

/// The default NBD port.
const DEFAULT_PORT: u16 = 10809;
/// Zero-write and discard requests are split at this (they carry no
/// payload; any `u32` length is valid, this keeps it aligned).
const MAX_NO_PAYLOAD: u64 = 1 << 30;
/// Zero buffers written when the server lacks `WRITE_ZEROES`.
const ZERO_CHUNK: usize = 1 << 20;
/// Requests never sent because the connection was found dead are retried
/// at most this many times.
const MAX_UNSENT_RETRIES: u32 = 3;

/// `blockdev-add` options of the `nbd` driver.
#[derive(Clone, Debug)]
pub(crate) struct NbdOptions {
    pub(crate) addr: ServerAddr,
    pub(crate) export: String,
    pub(crate) reconnect_delay_s: u64,
}

fn bad_type(k: &str, want: &str) -> Error {
    Error::InvalidArgument(format!(
        "Invalid parameter type for '{k}', expected: {want}"
    ))
}

fn get_str(obj: &Map<String, Value>, prefix: &str, k: &str) -> Result<Option<String>> {
    match obj.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad_type(&format!("{prefix}{k}"), "string")),
    }
}

fn missing(k: &str) -> Error {
    Error::InvalidArgument(format!("Parameter '{k}' is missing"))
}

impl NbdOptions {
    /// Parses the driver's keys (`server`, `export`, `reconnect-delay`) of
    /// `blockdev-add` arguments.
    pub(crate) fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        let server = match obj.get("server") {
            Some(Value::Object(s)) => s,
            Some(_) => return Err(bad_type("server", "object")),
            None => return Err(missing("server")),
        };
        let ty = get_str(server, "server.", "type")?.ok_or_else(|| missing("server.type"))?;
        let allowed: &[&str] = match ty.as_str() {
            "unix" => &["type", "path"],
            "inet" => &["type", "host", "port"],
            other => {
                return Err(Error::InvalidArgument(format!(
                    "Parameter 'server.type' does not accept value '{other}'"
                )))
            }
        };
        if let Some(k) = server.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::InvalidArgument(format!(
                "Parameter 'server.{k}' is unexpected"
            )));
        }
        let addr = if ty == "unix" {
            let path = get_str(server, "server.", "path")?.ok_or_else(|| missing("server.path"))?;
            ServerAddr::Unix(PathBuf::from(path))
        } else {
            let host = get_str(server, "server.", "host")?.ok_or_else(|| missing("server.host"))?;
            let port = match server.get("port") {
                None => DEFAULT_PORT,
                Some(Value::String(p)) => p.parse().map_err(|_| {
                    Error::InvalidArgument(format!("port '{p}' is not a valid port number"))
                })?,
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!("port '{n}' is not a valid port number"))
                    })?,
                Some(_) => return Err(bad_type("server.port", "string")),
            };
            ServerAddr::Inet { host, port }
        };
        let export = get_str(obj, "", "export")?.unwrap_or_default();
        if export.len() > MAX_STRING {
            return Err(Error::InvalidArgument(format!(
                "export name longer than {MAX_STRING} bytes"
            )));
        }
        let reconnect_delay_s = match obj.get("reconnect-delay") {
            None => 0,
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u64::from(u32::MAX))
                .ok_or_else(|| bad_type("reconnect-delay", "uint32"))?,
        };
        Ok(Self {
            addr,
            export,
            reconnect_delay_s,
        })
    }
}

/// An NBD export as a node.
pub(crate) struct NbdDriver {
    client: Arc<Client>,
    uri: String,
    read_only: bool,
}

impl NbdDriver {
    /// Connects and negotiates; the node lives on the calling task's
    /// context. `read_only` is what the user asked for; the server's
    /// read-only flag makes the node read-only too ([`Self::read_only`]).
    pub(crate) async fn open(
        opts: NbdOptions,
        read_only: bool,
        clock: aio::ClockType,
    ) -> Result<NbdDriver> {
        let uri = opts.addr.uri(&opts.export);
        let copts = ClientOptions {
            addr: opts.addr,
            export: opts.export,
            reconnect_delay_ns: i64::try_from(opts.reconnect_delay_s)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000_000),
            clock,
        };
        let client = Client::connect(copts)
            .await
            .map_err(|reason| Error::open(&uri, reason))?;
        let info = *client.info();
        let read_only = read_only || info.has(TFLAG_READ_ONLY);
        log::info!(
            "nbd: opened {uri}: {} bytes{}{}{}",
            info.size,
            if read_only { ", read-only" } else { "" },
            if info.structured {
                ", structured replies"
            } else {
                ""
            },
            if info.meta.is_some() {
                ", base:allocation"
            } else {
                ""
            },
        );
        Ok(NbdDriver {
            client,
            uri,
            read_only,
        })
    }

    /// Whether the node must be read-only (asked for, or the export is).
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    fn io_err(&self, kind: u16, offset: u64, len: u64, source: io::Error) -> Error {
        Error::io(
            &self.uri,
            aio::Error::Io {
                context: format!("NBD {} of {len} bytes at offset {offset}", cmd_name(kind)),
                source,
            },
        )
    }

    fn lost_err(&self, kind: u16, offset: u64, len: u64, reason: String) -> Error {
        self.io_err(
            kind,
            offset,
            len,
            io::Error::new(io::ErrorKind::BrokenPipe, reason),
        )
    }

    /// Sends one command and waits for its reply, across reconnects: a
    /// request lost with its connection is sent again on the next one if
    /// `reconnect-delay` is set; otherwise it fails at once.
    async fn request(&self, cmd: Cmd, mut buf: Option<Vec<u8>>) -> Result<Reply> {
        let (kind, offset, len) = (cmd.kind, cmd.offset, u64::from(cmd.len));
        let retry_in_flight = self.client.options().reconnect_delay_ns > 0;
        let mut unsent = 0;
        loop {
            let conn = self
                .client
                .connection()
                .await
                .map_err(|r| self.lost_err(kind, offset, len, r))?;
            match conn.submit(cmd.clone(), buf.take()).await {
                Ok(reply) => match &reply.error {
                    Some(e) => return Err(self.io_err(kind, offset, len, e.to_io())),
                    None => return Ok(reply),
                },
                Err(lost) => {
                    buf = lost.buf;
                    let retry = if lost.sent {
                        retry_in_flight
                    } else {
                        unsent += 1;
                        unsent <= MAX_UNSENT_RETRIES
                    };
                    if !retry {
                        return Err(self.lost_err(
                            kind,
                            offset,
                            len,
                            format!("connection to the server lost: {}", lost.reason),
                        ));
                    }
                }
            }
        }
    }

    fn check_aligned(&self, kind: u16, offset: u64, len: u64) -> Result<()> {
        let min = u64::from(self.client.info().min_block);
        if offset % min != 0 || len % min != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: NBD {} of {len} bytes at offset {offset} is not aligned to the export's minimum block size {min}",
                self.uri,
                cmd_name(kind)
            )));
        }
        Ok(())
    }

    fn check_writable(&self, kind: u16) -> Result<()> {
        if self.read_only {
            return Err(Error::Permission {
                node: self.uri.clone(),
                reason: format!(
                    "{}: NBD {} refused: the export is read-only",
                    self.uri,
                    cmd_name(kind)
                ),
            });
        }
        Ok(())
    }

    /// The chunk size for payload-carrying requests.
    fn max_payload(&self) -> u64 {
        u64::from(self.client.info().max_payload)
    }

    fn cmd(kind: u16, offset: u64, len: u64, payload: Option<Payload>) -> Cmd {
        Cmd {
            kind,
            flags: 0,
            offset,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            payload,
        }
    }

    /// A read into the caller's buffer: a vector is filled as it is, an
    /// aligned buffer gets a copy of what came off the socket.
    async fn read_impl(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        match buf.try_into_vec() {
            Ok(v) => self.read_vec(offset, v).await.map(Buffer::from),
            Err(mut buf) => {
                let v = self.read_vec(offset, vec![0; buf.len()]).await?;
                buf.copy_from_slice(&v);
                Ok(buf)
            }
        }
    }

    async fn read_vec(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len() as u64;
        self.check_aligned(CMD_READ, offset, len)?;
        let max = self.max_payload();
        if len <= max {
            let r = self
                .request(Self::cmd(CMD_READ, offset, len, None), Some(buf))
                .await?;
            return r
                .buf
                .ok_or_else(|| self.lost_err(CMD_READ, offset, len, "no buffer".into()));
        }
        let mut buf = buf;
        let mut pos = 0;
        while pos < len {
            let n = max.min(len - pos);
            let r = self
                .request(
                    Self::cmd(CMD_READ, offset + pos, n, None),
                    Some(vec![0; n as usize]),
                )
                .await?;
            if let Some(b) = r.buf {
                buf[pos as usize..(pos + n) as usize].copy_from_slice(&b);
            }
            pos += n;
        }
        Ok(buf)
    }

    /// Writes `len` bytes of `data` from `start` at `offset`, in chunks.
    async fn write_shared(
        &self,
        offset: u64,
        data: Arc<Vec<u8>>,
        start: usize,
        len: u64,
    ) -> Result<()> {
        let max = self.max_payload();
        let mut pos = 0;
        while pos < len {
            let n = max.min(len - pos);
            let p = Payload::new(data.clone(), start + pos as usize, n as usize);
            self.request(Self::cmd(CMD_WRITE, offset + pos, n, Some(p)), None)
                .await?;
            pos += n;
        }
        Ok(())
    }

    async fn write_impl(&self, offset: u64, buf: Buffer) -> Result<()> {
        self.check_writable(CMD_WRITE)?;
        let len = buf.len() as u64;
        self.check_aligned(CMD_WRITE, offset, len)?;
        self.write_shared(offset, Arc::new(buf.into_vec()), 0, len)
            .await
    }

    /// A command without payload over a range, split at [`MAX_NO_PAYLOAD`].
    async fn ranged(&self, kind: u16, offset: u64, len: u64) -> Result<()> {
        let min = u64::from(self.client.info().min_block);
        let chunk = (MAX_NO_PAYLOAD / min) * min;
        let mut pos = 0;
        while pos < len {
            let n = chunk.min(len - pos);
            self.request(Self::cmd(kind, offset + pos, n, None), None)
                .await?;
            pos += n;
        }
        Ok(())
    }

    async fn write_zeroes_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(CMD_WRITE_ZEROES)?;
        self.check_aligned(CMD_WRITE_ZEROES, offset, len)?;
        if self.client.info().has(TFLAG_SEND_WRITE_ZEROES) {
            return self.ranged(CMD_WRITE_ZEROES, offset, len).await;
        }
        let zeroes = Arc::new(vec![0u8; ZERO_CHUNK.min(len as usize)]);
        let mut pos = 0;
        while pos < len {
            let n = (zeroes.len() as u64).min(len - pos);
            self.write_shared(offset + pos, zeroes.clone(), 0, n)
                .await?;
            pos += n;
        }
        Ok(())
    }

    async fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(CMD_TRIM)?;
        if !self.client.info().has(TFLAG_SEND_TRIM) {
            // Discard is advisory.
            return Ok(());
        }
        // Trim only the aligned part.
        let min = u64::from(self.client.info().min_block);
        let start = offset.div_ceil(min) * min;
        let end = ((offset + len) / min) * min;
        if end <= start {
            return Ok(());
        }
        self.ranged(CMD_TRIM, start, end - start).await
    }

    async fn flush_impl(&self) -> Result<()> {
        if self.read_only || !self.client.info().has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(Self::cmd(CMD_FLUSH, 0, 0, None), None).await?;
        Ok(())
    }

    async fn block_status_impl(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let info = *self.client.info();
        let data = BlockStatus {
            allocated: true,
            data: true,
            offset: Some(offset),
            ..Default::default()
        };
        if info.meta.is_none() {
            return Ok((data, len));
        }
        // Ask for an aligned range that covers `offset` (the server answers
        // in whole blocks).
        let min = u64::from(info.min_block);
        let start = offset - offset % min;
        let want = (len + (offset - start)).min(u64::from(u32::MAX) / min * min);
        let want = want.div_ceil(min) * min;
        let want = want.min(info.size - start);
        let mut cmd = Self::cmd(CMD_BLOCK_STATUS, start, want, None);
        cmd.flags = CMD_FLAG_REQ_ONE;
        let r = self.request(cmd, None).await?;
        let (elen, flags) = r.extents.first().copied().unwrap_or((0, 0));
        let end = start + u64::from(elen);
        if end <= offset {
            return Err(self.io_err(
                CMD_BLOCK_STATUS,
                start,
                want,
                io::Error::other(format!(
                    "the server sent an extent of {elen} bytes that does not cover offset {offset}"
                )),
            ));
        }
        let n = (end - offset).min(len);
        let st = if flags & STATE_HOLE != 0 {
            BlockStatus {
                zero: flags & STATE_ZERO != 0,
                ..Default::default()
            }
        } else {
            BlockStatus {
                zero: flags & STATE_ZERO != 0,
                ..data
            }
        };
        Ok((st, n))
    }
}

impl BlockDriver for NbdDriver {
    fn reopen(&self, read_only: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !read_only && self.read_only {
                return Err(Error::Permission {
                    node: self.uri.clone(),
                    reason: format!(
                        "{}: cannot reopen read-write: opened read-only (or the export is read-only)",
                        self.uri
                    ),
                });
            }
            Ok(())
        })
    }
    fn driver_name(&self) -> &'static str {
        "nbd"
    }
    fn filename(&self) -> &str {
        &self.uri
    }
    fn len(&self) -> u64 {
        self.client.info().size
    }
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.read_impl(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.write_impl(offset, buf))
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.write_zeroes_impl(offset, len))
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.discard_impl(offset, len))
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush_impl())
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        let size = self.len();
        let uri = self.uri.clone();
        Box::pin(async move {
            if len == size {
                return Ok(());
            }
            Err(Error::unsupported(
                &uri,
                "Cannot resize an NBD export (the server does not support RESIZE)",
            ))
        })
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>> {
        Box::pin(self.block_status_impl(offset, len))
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.client.close().await;
            Ok(())
        })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "nbd".into(),
            filename: self.uri.clone(),
            virtual_size: self.len(),
            ..Default::default()
        }
    }
}
