//! The NBD export server: a listener, fixed-newstyle negotiation, and the
//! table of exports (QEMU's `nbd/server.c` and `block/export/`, redone).
//!
//! [`NbdServer::start`] binds a unix or TCP socket and accepts connections
//! on the context it is given (the main context in `aiod`). Each
//! connection negotiates there; once the client picks an export
//! (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), its transmission phase moves to
//! the export's context ([`ExportOptions`] names it), where the node's
//! requests run ([`super::export`]). Every fd, listener and connections
//! alike, is registered as [`ClientType::EXTERNAL`], so disabling external
//! clients on a context (a drained section) keeps its exports quiet.
//!
//! Deleting an export ([`NbdServer::remove_export`]) with clients attached
//! is refused in [`DeleteMode::Safe`]; [`DeleteMode::Hard`] shuts their
//! sockets down, and the export is gone — its permission on the node
//! released, [`ServerOptions::on_export_deleted`] called — when the last
//! connection has finished.
//!
//! ```no_run
//! use std::sync::Arc;
//! use blockjob::block::{BlockGraph, OpenOptions};
//! use blockjob::nbd::server::{ExportOptions, NbdAddress, NbdServer, ServerOptions};
//!
//! let ctx = aio::AioContext::new()?;
//! let graph = BlockGraph::new();
//! let node = ctx.block_on(graph.open_image("disk.qcow2", &OpenOptions::new()))?;
//! let server = NbdServer::start(&ctx, &NbdAddress::Unix("/tmp/nbd.sock".into()),
//!     ServerOptions::new())?;
//! server.add_export(node, &ctx, &ExportOptions::new("disk").writable(true))?;
//! loop {
//!     ctx.poll(true); // serve `nbd+unix:///disk?socket=/tmp/nbd.sock`
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Poll, Waker};

use aio::net::AsyncFd;
use aio::{AioContext, ClientType, ClockType, JoinHandle};
use parking_lot::Mutex;

use super::export::{self, Export, Session};
use super::proto::*;
use crate::block::{BlockNode, BlockRoot, DirtyBitmap, Perm};
use crate::{Error, Result};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NbdAddress {
    /// A unix socket at this path (created; removed when the server stops).
    Unix(PathBuf),
    /// A TCP socket; port 0 lets the kernel choose (see
    /// [`NbdServer::local_addr`]).
    Inet {
        /// Host name or address to bind.
        host: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddress::Inet { host, port } if host.contains(':') => {
                write!(f, "inet:[{host}]:{port}")
            }
            NbdAddress::Inet { host, port } => write!(f, "inet:{host}:{port}"),
        }
    }
}

/// Called with an export's id when it is gone (QMP `BLOCK_EXPORT_DELETED`).
pub type ExportDeletedFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Options of [`NbdServer::start`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ServerOptions {
    /// The most connections served at once, server-wide; 0 = unlimited
    /// (QEMU's `max-connections`). Further clients wait in the listen
    /// backlog. Default 16.
    pub max_connections: Option<u32>,
    /// Called (on whatever thread finishes the deletion) when an export is
    /// gone.
    pub on_export_deleted: Option<ExportDeletedFn>,
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_connections", &self.max_connections)
            .field("on_export_deleted", &self.on_export_deleted.is_some())
            .finish()
    }
}

impl ServerOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`max_connections`](Self::max_connections).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Sets [`on_export_deleted`](Self::on_export_deleted).
    pub fn on_export_deleted(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_export_deleted = Some(Arc::new(f));
        self
    }
}

/// The default of [`ServerOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// Options of [`NbdServer::add_export`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ExportOptions {
    /// The export's id (QMP `id`), unique on the server.
    pub id: String,
    /// The name clients ask for; default: the node name.
    pub name: Option<String>,
    /// A description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Accept writes (takes the write permission on the node).
    pub writable: bool,
    /// Flush after every write, as if each carried `FUA`.
    pub writethrough: bool,
    /// Dirty bitmaps of the node offered as `qemu:dirty-bitmap:NAME`
    /// metadata contexts; they are busy while the export lives.
    pub bitmaps: Vec<String>,
}

impl ExportOptions {
    /// An export with id `id`, read-only, named after its node.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ..Self::default()
        }
    }

    /// Sets [`name`](Self::name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets [`description`](Self::description).
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Sets [`writable`](Self::writable).
    pub fn writable(mut self, on: bool) -> Self {
        self.writable = on;
        self
    }

    /// Sets [`writethrough`](Self::writethrough).
    pub fn writethrough(mut self, on: bool) -> Self {
        self.writethrough = on;
        self
    }

    /// Sets [`bitmaps`](Self::bitmaps).
    pub fn bitmaps(mut self, names: Vec<String>) -> Self {
        self.bitmaps = names;
        self
    }
}

/// How [`NbdServer::remove_export`] treats connected clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeleteMode {
    /// Refuse while a client is connected (QEMU's `safe`).
    #[default]
    Safe,
    /// Disconnect the clients (QEMU's `hard`).
    Hard,
}

/// One export, as `query-block-exports` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportInfo {
    /// The export id.
    pub id: String,
    /// The NBD export name.
    pub name: String,
    /// The exported node.
    pub node_name: String,
    /// Deleted, waiting for its clients to go.
    pub shutting_down: bool,
    /// Accepts writes.
    pub writable: bool,
    /// Clients in the transmission phase.
    pub connections: usize,
}

/// A connected socket, shared between the tasks serving it and the
/// server's table (which shuts it down to disconnect the client).
#[derive(Clone, Debug)]
pub(crate) enum Conn {
    Unix(Arc<UnixStream>),
    Tcp(Arc<TcpStream>),
}

impl Conn {
    /// Ends both directions: the tasks serving it see end of stream and
    /// write errors, and finish.
    pub(crate) fn shutdown(&self) {
        let r = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
        if let Err(e) = r {
            log::debug!("nbd: shutting down fd {}: {e}", self.as_raw_fd());
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Conn::Unix(s) => (&**s).read(buf),
            Conn::Tcp(s) => (&**s).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Conn::Unix(s) => (&**s).write(buf),
            Conn::Tcp(s) => (&**s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Conn::Unix(s) => (&**s).write_vectored(bufs),
            Conn::Tcp(s) => (&**s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(AsyncFd<UnixListener>),
    Tcp(AsyncFd<TcpListener>),
}

impl Listener {
    async fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l) => Conn::Unix(Arc::new(l.accept().await?)),
            Listener::Tcp(l) => Conn::Tcp(Arc::new(l.accept().await?)),
        })
    }

    async fn quiesced(&self, ctx: &AioContext) -> io::Result<()> {
        match self {
            Listener::Unix(l) => quiesced(l, ctx).await,
            Listener::Tcp(l) => quiesced(l, ctx).await,
        }
    }
}

/// Waits while external clients are disabled on `ctx`. A task that is
/// already running (woken by something else) would otherwise read a ready
/// socket directly, without the loop's dispatch that the client mask
/// controls.
pub(crate) async fn quiesced<T: AsRawFd>(fd: &AsyncFd<T>, ctx: &AioContext) -> io::Result<()> {
    while ctx.is_client_disabled(ClientType::EXTERNAL) {
        fd.readable().await?;
    }
    Ok(())
}

/// An export in the server's table.
struct Entry {
    export: Arc<Export>,
    /// Connections in the transmission phase on it.
    conns: Vec<u64>,
    shutting_down: bool,
}

struct State {
    /// In creation order.
    exports: Vec<Entry>,
    /// Every live connection, negotiating or not.
    conns: Vec<(u64, Conn)>,
    next_conn: u64,
    accept_waker: Option<Waker>,
    running: bool,
}

pub(crate) struct ServerInner {
    state: Mutex<State>,
    max_connections: u32,
    on_deleted: Option<ExportDeletedFn>,
}

/// A connection's place in the server's table; dropping it (when the
/// connection's last task ends) removes the connection and, for the last
/// client of a deleted export, finishes the deletion.
pub(crate) struct ConnGuard {
    server: Arc<ServerInner>,
    id: u64,
    export: Option<Arc<Export>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut st = self.server.state.lock();
        st.conns.retain(|(i, _)| *i != self.id);
        let waker = st.accept_waker.take();
        let mut finished = None;
        if let Some(exp) = self.export.take() {
            if let Some(i) = st.exports.iter().position(|e| Arc::ptr_eq(&e.export, &exp)) {
                let e = &mut st.exports[i];
                e.conns.retain(|c| *c != self.id);
                if e.shutting_down && e.conns.is_empty() {
                    finished = Some(st.exports.remove(i));
                }
            }
        }
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(e) = finished {
            self.server.finish_delete(e);
        }
    }
}

impl ServerInner {
    /// Drops the export's permission and reports it gone.
    fn finish_delete(&self, e: Entry) {
        log::info!("nbd: export '{}' deleted", e.export.id);
        e.export.release();
        if let Some(f) = &self.on_deleted {
            f(&e.export.id);
        }
    }

    /// The export clients know as `name`, unless it is being deleted.
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let st = self.state.lock();
        st.exports
            .iter()
            .find(|e| !e.shutting_down && e.export.name == name)
            .map(|e| e.export.clone())
    }

    /// Exports visible to `NBD_OPT_LIST`.
    fn visible(&self) -> Vec<Arc<Export>> {
        let st = self.state.lock();
        st.exports
            .iter()
            .filter(|e| !e.shutting_down)
            .map(|e| e.export.clone())
            .collect()
    }

    /// Attaches connection `guard` to the export named `name`, unless the
    /// export is gone or being deleted.
    fn attach(&self, guard: &mut ConnGuard, name: &str) -> Option<Arc<Export>> {
        let mut st = self.state.lock();
        let e = st
            .exports
            .iter_mut()
            .find(|e| !e.shutting_down && e.export.name == name)?;
        e.conns.push(guard.id);
        guard.export = Some(e.export.clone());
        Some(e.export.clone())
    }
}

/// A running NBD server. Dropping it stops it ([`stop`](Self::stop)).
pub struct NbdServer {
    inner: Arc<ServerInner>,
    addr: NbdAddress,
    /// The socket file we created: path, device, inode.
    socket_file: Option<(PathBuf, u64, u64)>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn bind_error(what: &str, e: &io::Error) -> Error {
    Error::Failed(format!("Failed to bind socket to {what}: {}", strerror(e)))
}

/// `strerror`-style text, without Rust's " (os error N)".
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl NbdServer {
    /// Binds `addr` and serves it from `ctx` (connections negotiate there,
    /// then move to their export's context). Callable from any thread.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] with QEMU's `Failed to bind socket to ...` text
    /// when the address cannot be bound.
    pub fn start(ctx: &AioContext, addr: &NbdAddress, opts: ServerOptions) -> Result<NbdServer> {
        let (listener, bound, socket_file) = match addr {
            NbdAddress::Unix(path) => {
                let what = path.display().to_string();
                let l = UnixListener::bind(path).map_err(|e| bind_error(&what, &e))?;
                let md = std::fs::symlink_metadata(path).map_err(|e| bind_error(&what, &e))?;
                let fd = AsyncFd::new(ctx, l, ClientType::EXTERNAL)
                    .map_err(|e| Error::Failed(format!("{what}: {e}")))?;
                (
                    Listener::Unix(fd),
                    addr.clone(),
                    Some((path.clone(), md.dev(), md.ino())),
                )
            }
            NbdAddress::Inet { host, port } => {
                let what = format!("{host}:{port}");
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| {
                        Error::Failed(format!("address resolution failed for {what}: {e}"))
                    })?
                    .collect();
                let l = TcpListener::bind(&addrs[..]).map_err(|e| bind_error(&what, &e))?;
                let port = l.local_addr().map_err(|e| bind_error(&what, &e))?.port();
                let fd = AsyncFd::new(ctx, l, ClientType::EXTERNAL)
                    .map_err(|e| Error::Failed(format!("{what}: {e}")))?;
                (
                    Listener::Tcp(fd),
                    NbdAddress::Inet {
                        host: host.clone(),
                        port,
                    },
                    None,
                )
            }
        };
        let inner = Arc::new(ServerInner {
            state: Mutex::new(State {
                exports: Vec::new(),
                conns: Vec::new(),
                next_conn: 1,
                accept_waker: None,
                running: true,
            }),
            max_connections: opts.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            on_deleted: opts.on_export_deleted,
        });
        log::info!("nbd: server listening on {bound}");
        let accept = ctx.spawn(accept_loop(inner.clone(), listener));
        Ok(NbdServer {
            inner,
            addr: bound,
            socket_file,
            accept: Some(accept),
        })
    }

    /// The address served (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> &NbdAddress {
        &self.addr
    }

    /// Exports `node` to clients; its requests run on `ctx` (the node's
    /// context). A writable export takes the write permission on the node.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] with QEMU's texts: `Block export id 'x'
    /// is already in use`, `Cannot export read-only node as writable`,
    /// `NBD server already has export named 'x'`, a name or description
    /// over 4096 bytes; [`Error::Permission`] if another user of the node
    /// does not share writing.
    pub fn add_export(
        &self,
        node: Arc<BlockNode>,
        ctx: &AioContext,
        opts: &ExportOptions,
    ) -> Result<()> {
        let name = opts.name.clone().unwrap_or_else(|| node.name().to_string());
        let mut st = self.inner.state.lock();
        if st.exports.iter().any(|e| e.export.id == opts.id) {
            return Err(Error::InvalidArgument(format!(
                "Block export id '{}' is already in use",
                opts.id
            )));
        }
        if opts.writable && node.read_only() {
            return Err(Error::InvalidArgument(
                "Cannot export read-only node as writable".into(),
            ));
        }
        if st.exports.iter().any(|e| e.export.name == name) {
            return Err(Error::InvalidArgument(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if name.len() > MAX_STRING {
            return Err(Error::InvalidArgument(format!(
                "export name '{name}' too long"
            )));
        }
        if let Some(d) = opts.description.as_deref().filter(|d| d.len() > MAX_STRING) {
            return Err(Error::InvalidArgument(format!(
                "description '{d}' too long"
            )));
        }
        let perm = if opts.writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        let bitmaps = export_bitmaps(&node, opts)?;
        let root = BlockRoot::attach(&node, &format!("export '{}'", opts.id), perm, Perm::ALL)?;
        for b in &bitmaps {
            b.set_busy(true);
        }
        let export = Export::new(opts, name, root, ctx, bitmaps);
        log::info!(
            "nbd: export '{}' (name '{}', node '{}'{})",
            export.id,
            export.name,
            export.node().name(),
            if opts.writable { ", writable" } else { "" }
        );
        st.exports.push(Entry {
            export: Arc::new(export),
            conns: Vec::new(),
            shutting_down: false,
        });
        Ok(())
    }

    /// Deletes export `id`. Without clients it is gone when this returns
    /// (and [`ServerOptions::on_export_deleted`] has been called); with
    /// clients, [`DeleteMode::Safe`] refuses and [`DeleteMode::Hard`]
    /// disconnects them and the export goes with the last one.
    ///
    /// # Errors
    ///
    /// `Export 'x' is not found`, `export 'x' still in use`.
    pub fn remove_export(&self, id: &str, mode: DeleteMode) -> Result<()> {
        let mut st = self.inner.state.lock();
        let i = st
            .exports
            .iter()
            .position(|e| e.export.id == id)
            .ok_or_else(|| Error::InvalidArgument(format!("Export '{id}' is not found")))?;
        let e = &mut st.exports[i];
        if !e.conns.is_empty() && mode == DeleteMode::Safe {
            return Err(Error::InvalidArgument(format!(
                "export '{id}' still in use"
            )));
        }
        e.shutting_down = true;
        if e.conns.is_empty() {
            let e = st.exports.remove(i);
            drop(st);
            self.inner.finish_delete(e);
            return Ok(());
        }
        let ids = e.conns.clone();
        let conns: Vec<Conn> = st
            .conns
            .iter()
            .filter(|(c, _)| ids.contains(c))
            .map(|(_, c)| c.clone())
            .collect();
        drop(st);
        log::info!(
            "nbd: export '{id}': disconnecting {} client(s)",
            conns.len()
        );
        for c in conns {
            c.shutdown();
        }
        Ok(())
    }

    /// Every export, newest first (QEMU's order).
    pub fn exports(&self) -> Vec<ExportInfo> {
        let st = self.inner.state.lock();
        st.exports
            .iter()
            .rev()
            .map(|e| ExportInfo {
                id: e.export.id.clone(),
                name: e.export.name.clone(),
                node_name: e.export.node().name().to_string(),
                shutting_down: e.shutting_down,
                writable: e.export.writable,
                connections: e.conns.len(),
            })
            .collect()
    }

    /// Live connections, negotiating or attached.
    pub fn connection_count(&self) -> usize {
        self.inner.state.lock().conns.len()
    }

    /// Stops accepting, deletes every export (newest first, as
    /// [`DeleteMode::Hard`]), disconnects every client and removes the
    /// socket file. Exports without clients are gone when this returns.
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        accept.abort();
        let mut st = self.inner.state.lock();
        st.running = false;
        let mut gone = Vec::new();
        let mut i = st.exports.len();
        while i > 0 {
            i -= 1;
            st.exports[i].shutting_down = true;
            if st.exports[i].conns.is_empty() {
                gone.push(st.exports.remove(i));
            }
        }
        let conns: Vec<Conn> = st.conns.iter().map(|(_, c)| c.clone()).collect();
        drop(st);
        for e in gone {
            self.inner.finish_delete(e);
        }
        for c in conns {
            c.shutdown();
        }
        if let Some((path, dev, ino)) = self.socket_file.take() {
            match std::fs::symlink_metadata(&path) {
                Ok(md) if md.dev() == dev && md.ino() == ino => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        log::warn!("nbd: removing {}: {e}", path.display());
                    }
                }
                _ => {}
            }
        }
        log::info!("nbd: server on {} stopped", self.addr);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(server: Arc<ServerInner>, listener: Listener) {
    let Some(ctx) = AioContext::current() else {
        return;
    };
    loop {
        if let Err(e) = listener.quiesced(&ctx).await {
            log::error!("nbd: listener: {e}");
            return;
        }
        let max = server.max_connections as usize;
        poll_fn(|cx| {
            let mut st = server.state.lock();
            if max == 0 || st.conns.len() < max {
                Poll::Ready(())
            } else {
                st.accept_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let conn = match listener.accept().await {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // EMFILE and friends: rest instead of spinning.
                log::warn!("nbd: accept: {e}");
                aio::sleep_ns(ClockType::Realtime, 100_000_000).await;
                continue;
            }
        };
        let guard = {
            let mut st = server.state.lock();
            if !st.running {
                return;
            }
            let id = st.next_conn;
            st.next_conn += 1;
            st.conns.push((id, conn.clone()));
            ConnGuard {
                server: server.clone(),
                id,
                export: None,
            }
        };
        log::debug!("nbd: client {} connected", guard.id);
        let fd = AsyncFd::from_nonblocking(&ctx, conn.clone(), ClientType::EXTERNAL);
        ctx.spawn(async move {
            let id = guard.id;
            match negotiate(fd, conn, guard).await {
                Ok(()) => {}
                Err(e) => log::info!("nbd: client {id}: negotiation failed: {e}"),
            }
        })
        .detach();
    }
}

/// The bitmaps an export offers, checked as QEMU's `nbd_export_create`
/// checks them.
fn export_bitmaps(node: &BlockNode, opts: &ExportOptions) -> Result<Vec<Arc<DirtyBitmap>>> {
    let mut out = Vec::with_capacity(opts.bitmaps.len());
    for name in &opts.bitmaps {
        let b = node
            .bitmap(name)
            .map_err(|_| Error::InvalidArgument(format!("Bitmap '{name}' is not found")))?;
        b.check(crate::block::bitmap::Check::Read)?;
        if !opts.writable && !node.read_only() && b.enabled() {
            return Err(Error::InvalidArgument(format!(
                "Enabled bitmap '{name}' incompatible with readonly export"
            )));
        }
        if out.iter().any(|x: &Arc<DirtyBitmap>| Arc::ptr_eq(x, &b)) {
            continue;
        }
        out.push(b);
    }
    Ok(out)
}

/// The metadata contexts a client selected with `SET_META_CONTEXT`.
#[derive(Default)]
struct MetaSelection {
    /// For this export name.
    export: String,
    /// `base:allocation` (context id 0).
    base: bool,
    /// Indexes into the export's bitmaps (context id = index + 1).
    bitmaps: Vec<usize>,
}

/// What the client has chosen so far.
#[derive(Default)]
struct Haggle {
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
}

/// The transmission flags of `export` for a client that did (not)
/// negotiate structured replies.
fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if export.writable {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    } else {
        f |= TFLAG_READ_ONLY;
    }
    f
}

async fn send_reply(fd: &AsyncFd<Conn>, option: u32, reply: u32, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let h = OptionReply { option, reply, len }.encode();
    fd.write_all_vectored(&[&h, payload]).await
}

/// An option that failed: the error reply and its message.
struct OptError(u32, String);

fn invalid(msg: impl Into<String>) -> OptError {
    OptError(REP_ERR_INVALID, msg.into())
}

/// The handshake: options until the client picks an export (then its
/// transmission phase is spawned on the export's context), aborts, or
/// breaks the protocol (the connection is dropped).
async fn negotiate(fd: AsyncFd<Conn>, conn: Conn, mut guard: ConnGuard) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    hello.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    fd.write_all(&hello).await?;
    let mut b = [0u8; 4];
    fd.read_exact(&mut b).await?;
    let cflags = u32::from_be_bytes(b);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown client flags {cflags:#x}"),
        ));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let mut h = Haggle {
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        ..Haggle::default()
    };
    let server = guard.server.clone();
    loop {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        fd.read_exact(&mut hb).await?;
        let oh =
            OptionHeader::decode(&hb).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if oh.len > MAX_OPTION {
            if oh.option != OPT_EXPORT_NAME {
                let msg = format!("option of {} bytes is too big", oh.len);
                let _ = send_reply(&fd, oh.option, REP_ERR_TOO_BIG, msg.as_bytes()).await;
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option {} of {} bytes", oh.option, oh.len),
            ));
        }
        let mut payload = vec![0u8; oh.len as usize];
        fd.read_exact(&mut payload).await?;
        if !fixed && oh.option != OPT_EXPORT_NAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option {} without fixed newstyle", oh.option),
            ));
        }
        let r = match oh.option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&payload).unwrap_or("\u{fffd}");
                let Some(export) = server.attach(&mut guard, name) else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("export '{name}' not present"),
                    ));
                };
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&export.node().len().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&export, h.structured).to_be_bytes());
                if !h.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                fd.write_all(&out).await?;
                return start_transmission(fd, conn, guard, export, &h);
            }
            OPT_ABORT => {
                let _ = send_reply(&fd, oh.option, REP_ACK, &[]).await;
                return Ok(());
            }
            OPT_LIST => list(&fd, &server, &payload).await?,
            OPT_STARTTLS => Err(OptError(REP_ERR_POLICY, "TLS not configured".into())),
            OPT_INFO | OPT_GO => match info(&fd, &mut guard, oh.option, &payload, &mut h).await? {
                Ok(Some(export)) => return start_transmission(fd, conn, guard, export, &h),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    Err(invalid("NBD_OPT_STRUCTURED_REPLY takes no data"))
                } else if h.structured {
                    Err(invalid("structured reply already negotiated"))
                } else {
                    h.structured = true;
                    send_reply(&fd, oh.option, REP_ACK, &[]).await?;
                    Ok(())
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&fd, &server, oh.option, &payload, &mut h).await?
            }
            o => Err(OptError(REP_ERR_UNSUP, format!("option {o} not supported"))),
        };
        if let Err(OptError(rep, msg)) = r {
            log::debug!("nbd: client {}: option {}: {msg}", guard.id, oh.option);
            send_reply(&fd, oh.option, rep, msg.as_bytes()).await?;
        }
    }
}

/// Moves the connection to its export's context.
fn start_transmission(
    fd: AsyncFd<Conn>,
    conn: Conn,
    guard: ConnGuard,
    export: Arc<Export>,
    h: &Haggle,
) -> io::Result<()> {
    // Unregister from this context before the export's context registers
    // the same fd.
    drop(fd);
    let Some(ctx) = export.context() else {
        return Err(io::Error::other("the export's context is gone"));
    };
    log::debug!(
        "nbd: client {} uses export '{}'{}",
        guard.id,
        export.name,
        if h.structured {
            " with structured replies"
        } else {
            ""
        }
    );
    let meta = h.meta.as_ref().filter(|m| m.export == export.name);
    let session = Session {
        base_allocation: meta.as_ref().is_some_and(|m| m.base),
        bitmaps: meta.map(|m| m.bitmaps.clone()).unwrap_or_default(),
        structured: h.structured,
        conn,
        guard,
        export,
    };
    ctx.spawn(export::serve(session)).detach();
    Ok(())
}

async fn list(
    fd: &AsyncFd<Conn>,
    server: &ServerInner,
    payload: &[u8],
) -> io::Result<std::result::Result<(), OptError>> {
    if !payload.is_empty() {
        return Ok(Err(invalid("NBD_OPT_LIST takes no data")));
    }
    for e in server.visible() {
        let mut p = Vec::new();
        put_string(&mut p, &e.name);
        if let Some(d) = &e.description {
            p.extend_from_slice(d.as_bytes());
        }
        send_reply(fd, OPT_LIST, REP_SERVER, &p).await?;
    }
    send_reply(fd, OPT_LIST, REP_ACK, &[]).await?;
    Ok(Ok(()))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export, attached to the connection
/// before the client hears of success, when a GO succeeded.
async fn info(
    fd: &AsyncFd<Conn>,
    guard: &mut ConnGuard,
    option: u32,
    payload: &[u8],
    h: &mut Haggle,
) -> io::Result<std::result::Result<Option<Arc<Export>>, OptError>> {
    let Some(req) = GoRequest::parse(payload) else {
        return Ok(Err(invalid("malformed NBD_OPT_INFO/GO request")));
    };
    let server = guard.server.clone();
    let export = if option == OPT_GO {
        server.attach(guard, &req.name)
    } else {
        server.lookup(&req.name)
    };
    let Some(export) = export else {
        return Ok(Err(OptError(
            REP_ERR_UNKNOWN,
            format!("export '{}' not present", req.name),
        )));
    };
    let mut item = Vec::with_capacity(12);
    item.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    item.extend_from_slice(&export.node().len().to_be_bytes());
    item.extend_from_slice(&transmission_flags(&export, h.structured).to_be_bytes());
    send_reply(fd, option, REP_INFO, &item).await?;
    if req.info.contains(&INFO_NAME) {
        let mut item = INFO_NAME.to_be_bytes().to_vec();
        item.extend_from_slice(export.name.as_bytes());
        send_reply(fd, option, REP_INFO, &item).await?;
    }
    if let Some(d) = export.description.as_deref() {
        if req.info.contains(&INFO_DESCRIPTION) {
            let mut item = INFO_DESCRIPTION.to_be_bytes().to_vec();
            item.extend_from_slice(d.as_bytes());
            send_reply(fd, option, REP_INFO, &item).await?;
        }
    }
    // Block sizes are sent whether asked for or not, as QEMU does: any
    // byte offset works, 4 KiB is efficient, MAX_PAYLOAD is the limit.
    let mut item = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    item.extend_from_slice(&1u32.to_be_bytes());
    item.extend_from_slice(&4096u32.to_be_bytes());
    item.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    send_reply(fd, option, REP_INFO, &item).await?;
    send_reply(fd, option, REP_ACK, &[]).await?;
    if option == OPT_GO {
        if h.meta.as_ref().is_some_and(|m| m.export != req.name) {
            h.meta = None;
        }
        return Ok(Ok(Some(export)));
    }
    Ok(Ok(None))
}

/// Whether `query` selects `base:allocation` (for LIST, the namespace
/// `base:` does too).
fn matches_base_allocation(query: &str, list: bool) -> bool {
    query == META_BASE_ALLOCATION || (list && query == "base:")
}

async fn meta_context(
    fd: &AsyncFd<Conn>,
    server: &ServerInner,
    option: u32,
    payload: &[u8],
    h: &mut Haggle,
) -> io::Result<std::result::Result<(), OptError>> {
    let set = option == OPT_SET_META_CONTEXT;
    if set && !h.structured {
        return Ok(Err(invalid(
            "NBD_OPT_SET_META_CONTEXT without structured replies",
        )));
    }
    let Some(req) = MetaContextRequest::parse(payload) else {
        return Ok(Err(invalid("malformed meta context request")));
    };
    let Some(export) = server.lookup(&req.export) else {
        return Ok(Err(OptError(
            REP_ERR_UNKNOWN,
            format!("export '{}' not present", req.export),
        )));
    };
    if set {
        h.meta = None;
    }
    let all = req.queries.is_empty() && !set;
    let base = all || req.queries.iter().any(|q| matches_base_allocation(q, !set));
    let mut sel = MetaSelection {
        export: req.export.clone(),
        base,
        bitmaps: Vec::new(),
    };
    if base {
        let mut p = 0u32.to_be_bytes().to_vec();
        p.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        send_reply(fd, option, REP_META_CONTEXT, &p).await?;
    }
    for (i, b) in export.bitmaps.iter().enumerate() {
        let ctx_name = format!("{META_QEMU_DIRTY_BITMAP}{}", b.name());
        let hit = all
            || req
                .queries
                .iter()
                .any(|q| *q == ctx_name || (!set && (q == "qemu:" || q == META_QEMU_DIRTY_BITMAP)));
        if hit {
            let mut p = (i as u32 + 1).to_be_bytes().to_vec();
            p.extend_from_slice(ctx_name.as_bytes());
            send_reply(fd, option, REP_META_CONTEXT, &p).await?;
            sel.bitmaps.push(i);
        }
    }
    if set && (sel.base || !sel.bitmaps.is_empty()) {
        h.meta = Some(sel);
    }
    send_reply(fd, option, REP_ACK, &[]).await?;
    Ok(Ok(()))
}
