//! Readiness futures for sockets and pipes on a context: what a task needs
//! to speak a stream protocol (NBD, QMP, vhost-user) without a thread.
//!
//! [`AsyncFd`] owns a non-blocking fd and registers it with its context only
//! while a task waits on it, in the [`ClientType`] the caller chose: an
//! export's connection is [`ClientType::EXTERNAL`], so a drained section or a
//! nested poll that disables external clients keeps it quiet, while a block
//! driver's connection to a remote server is [`ClientType::INTERNAL`] and
//! keeps completing requests inside a drain.
//!
//! Interest is dropped lazily: after a wake-up the fd stays registered, and
//! it leaves the kernel's set only when it is reported ready with nobody
//! waiting. A task that reads until `WouldBlock` and waits again therefore
//! costs no `epoll_ctl` per message in the steady state.
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use aio::{net::AsyncFd, AioContext, ClientType};
//!
//! let ctx = AioContext::new()?;
//! let (a, b) = UnixStream::pair()?;
//! let a = AsyncFd::new(&ctx, a, ClientType::INTERNAL)?;
//! let b = AsyncFd::new(&ctx, b, ClientType::INTERNAL)?;
//! let reader = ctx.spawn(async move {
//!     let mut buf = [0u8; 5];
//!     b.read_exact(&mut buf).await.map(|()| buf)
//! });
//! ctx.block_on(a.write_all(b"hello"))?;
//! let got = ctx.block_on(reader)??;
//! assert_eq!(&got, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::{AioContext, ClientType, FdHandler, WeakAioContext};

/// A type whose fd can be switched to non-blocking mode; implemented for
/// the std socket types. [`AsyncFd::new`] switches it.
pub trait NonBlocking: AsRawFd {
    /// Puts the fd in non-blocking mode.
    fn set_nonblocking(&self) -> io::Result<()>;
}

macro_rules! nonblocking {
    ($($t:ty),*) => {$(
        impl NonBlocking for $t {
            fn set_nonblocking(&self) -> io::Result<()> {
                <$t>::set_nonblocking(self, true)
            }
        }
    )*};
}
nonblocking!(UnixStream, UnixListener, TcpStream, TcpListener);

/// The waiting side of one direction.
#[derive(Default)]
struct Direction {
    /// Bumped by every readiness report from the loop.
    events: u64,
    /// Tasks waiting for the next report (usually one).
    wakers: Vec<Waker>,
}

impl Direction {
    fn wake(&mut self) -> bool {
        self.events = self.events.wrapping_add(1);
        let had = !self.wakers.is_empty();
        for w in self.wakers.drain(..) {
            w.wake();
        }
        had
    }
}

#[derive(Default)]
struct Shared {
    read: Direction,
    write: Direction,
    /// The interest currently registered with the context.
    registered: (bool, bool),
    closed: bool,
}

/// A non-blocking fd whose readiness is awaited on an [`AioContext`].
///
/// All waiting goes through the context the fd was created on: poll its
/// futures from tasks on that context (or from [`AioContext::block_on`] on
/// it). Several tasks may wait at once, e.g. one reading requests while
/// others write replies. Dropping the `AsyncFd` unregisters the fd and wakes
/// nobody (a task still waiting holds a borrow, so there is none).
pub struct AsyncFd<T: AsRawFd> {
    io: T,
    fd: RawFd,
    ctx: WeakAioContext,
    client: ClientType,
    shared: Arc<Mutex<Shared>>,
}

impl<T: AsRawFd> fmt::Debug for AsyncFd<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncFd")
            .field("fd", &self.fd)
            .field("client", &self.client)
            .finish()
    }
}

impl<T: NonBlocking> AsyncFd<T> {
    /// Wraps `io`, switching it to non-blocking mode. Nothing is registered
    /// until a task waits.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the fd cannot be made non-blocking.
    pub fn new(ctx: &AioContext, io: T, client: ClientType) -> Result<Self> {
        io.set_nonblocking().map_err(|e| Error::Io {
            context: format!("making fd {} non-blocking", io.as_raw_fd()),
            source: e,
        })?;
        Ok(Self::from_nonblocking(ctx, io, client))
    }
}

impl<T: AsRawFd> AsyncFd<T> {
    /// Wraps an fd the caller has already made non-blocking.
    pub fn from_nonblocking(ctx: &AioContext, io: T, client: ClientType) -> Self {
        Self {
            fd: io.as_raw_fd(),
            io,
            ctx: ctx.downgrade(),
            client,
            shared: Arc::new(Mutex::new(Shared::default())),
        }
    }

    /// The wrapped object.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Waits until the loop reports the fd readable (or hung up).
    pub fn readable(&self) -> Ready<'_, T> {
        Ready {
            fd: self,
            write: false,
            seen: None,
        }
    }

    /// Waits until the loop reports the fd writable.
    pub fn writable(&self) -> Ready<'_, T> {
        Ready {
            fd: self,
            write: true,
            seen: None,
        }
    }

    /// Runs `op` until it does not fail with `WouldBlock`, waiting for read
    /// readiness in between. `EINTR` is retried.
    ///
    /// # Errors
    ///
    /// Whatever `op` returns other than `WouldBlock`/`Interrupted`, or an
    /// error registering the fd (context gone, not its home thread).
    pub async fn read_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        loop {
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Like [`read_with`](Self::read_with), waiting for write readiness.
    ///
    /// # Errors
    ///
    /// As [`read_with`](Self::read_with).
    pub async fn write_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        loop {
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn register(&self, ctx: &AioContext, want: (bool, bool)) -> Result<()> {
        register(ctx, self.fd, self.client, &self.shared, want)
    }
}

/// Registers the interest `want` (read, write) of `fd` with the context, or
/// unregisters the fd when neither is wanted. Home thread only.
fn register(
    ctx: &AioContext,
    fd: RawFd,
    client: ClientType,
    shared: &Arc<Mutex<Shared>>,
    want: (bool, bool),
) -> Result<()> {
    let handler = if want == (false, false) {
        None
    } else {
        let mut h = FdHandler::new(client);
        if want.0 {
            let shared = shared.clone();
            h = h.on_read(move |ctx| on_ready(ctx, fd, client, &shared, false));
        }
        if want.1 {
            let shared = shared.clone();
            h = h.on_write(move |ctx| on_ready(ctx, fd, client, &shared, true));
        }
        Some(h)
    };
    ctx.set_fd_handler(fd, handler)
}

/// A readiness report from the loop: wake the waiters; with nobody waiting,
/// drop that interest so a level-triggered fd does not spin the loop.
fn on_ready(
    ctx: &AioContext,
    fd: RawFd,
    client: ClientType,
    shared: &Arc<Mutex<Shared>>,
    write: bool,
) {
    let mut s = shared.lock();
    if s.closed {
        return;
    }
    let had = if write { s.write.wake() } else { s.read.wake() };
    if had {
        return;
    }
    let mut want = s.registered;
    if write {
        want.1 = false;
    } else {
        want.0 = false;
    }
    s.registered = want;
    drop(s);
    if let Err(e) = register(ctx, fd, client, shared, want) {
        log::warn!("dropping interest of fd {fd}: {e}");
    }
}

impl<T: AsRawFd> Drop for AsyncFd<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.closed = true;
        let registered = s.registered != (false, false);
        s.registered = (false, false);
        drop(s);
        if registered {
            if let Some(ctx) = self.ctx.upgrade() {
                if let Err(e) = ctx.set_fd_handler(self.fd, None) {
                    log::warn!("unregistering fd {}: {e}", self.fd);
                }
            }
        }
    }
}

/// The future of [`AsyncFd::readable`] / [`AsyncFd::writable`].
#[must_use = "futures do nothing unless awaited"]
pub struct Ready<'a, T: AsRawFd> {
    fd: &'a AsyncFd<T>,
    write: bool,
    /// The event count when the wait began.
    seen: Option<u64>,
}

impl<T: AsRawFd> fmt::Debug for Ready<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ready")
            .field("fd", &self.fd.fd)
            .field("write", &self.write)
            .finish()
    }
}

impl<T: AsRawFd> Future for Ready<'_, T> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let fd = self.fd;
        let write = self.write;
        let mut s = fd.shared.lock();
        let dir = if write { &mut s.write } else { &mut s.read };
        match self.seen {
            Some(seen) if seen != dir.events => return Poll::Ready(Ok(())),
            Some(_) => {}
            None => self.seen = Some(dir.events),
        }
        if !dir.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            dir.wakers.push(cx.waker().clone());
        }
        let mut want = s.registered;
        if write {
            want.1 = true;
        } else {
            want.0 = true;
        }
        if want == s.registered {
            return Poll::Pending;
        }
        s.registered = want;
        drop(s);
        let Some(ctx) = fd.ctx.upgrade() else {
            return Poll::Ready(Err(io::Error::other(Error::ContextGone)));
        };
        if let Err(e) = fd.register(&ctx, want) {
            let mut s = fd.shared.lock();
            if write {
                s.registered.1 = false;
            } else {
                s.registered.0 = false;
            }
            return Poll::Ready(Err(io::Error::other(e)));
        }
        Poll::Pending
    }
}

impl<T: AsRawFd> AsyncFd<T>
where
    for<'a> &'a T: Read + Write,
{
    /// Reads some bytes; `Ok(0)` at end of stream.
    ///
    /// # Errors
    ///
    /// The OS error of the read.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(|mut io| io.read(buf)).await
    }

    /// Fills `buf`.
    ///
    /// # Errors
    ///
    /// `UnexpectedEof` if the stream ends first, or the OS error.
    pub async fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read(buf).await? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    ))
                }
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Writes some bytes.
    ///
    /// # Errors
    ///
    /// The OS error of the write.
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_with(|mut io| io.write(buf)).await
    }

    /// Writes all of `buf`.
    ///
    /// # Errors
    ///
    /// `WriteZero` if the fd accepts nothing, or the OS error (`EPIPE`
    /// when the peer is gone; the process should ignore `SIGPIPE`).
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Writes all of every buffer in `bufs`, in order, with as few system
    /// calls as the kernel allows (`writev`).
    ///
    /// # Errors
    ///
    /// As [`write_all`](Self::write_all).
    pub async fn write_all_vectored(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut idx = 0;
        let mut off = 0;
        while idx < bufs.len() {
            if off == bufs[idx].len() {
                idx += 1;
                off = 0;
                continue;
            }
            let n = self
                .write_with(|mut io| {
                    let mut slices = Vec::with_capacity(bufs.len() - idx);
                    slices.push(io::IoSlice::new(&bufs[idx][off..]));
                    slices.extend(bufs[idx + 1..].iter().map(|b| io::IoSlice::new(b)));
                    io.write_vectored(&slices)
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut n = n;
            while n > 0 && idx < bufs.len() {
                let left = bufs[idx].len() - off;
                if n < left {
                    off += n;
                    n = 0;
                } else {
                    n -= left;
                    idx += 1;
                    off = 0;
                }
            }
        }
        Ok(())
    }
}

impl AsyncFd<UnixListener> {
    /// Accepts a connection, already non-blocking.
    ///
    /// # Errors
    ///
    /// The OS error of `accept`.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        let (s, _) = self.read_with(|l| l.accept()).await?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

impl AsyncFd<TcpListener> {
    /// Accepts a connection, already non-blocking, with `TCP_NODELAY` set.
    ///
    /// # Errors
    ///
    /// The OS error of `accept`.
    pub async fn accept(&self) -> io::Result<TcpStream> {
        let (s, _) = self.read_with(|l| l.accept()).await?;
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}
