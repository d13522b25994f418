//! The qtest protocol (QEMU's `system/qtest.c`, clock part): a test process
//! owns the virtual clock through a line protocol on a unix socket.
//!
//! ```text
//! clock_step        → OK <now_ns>   advance to the next virtual deadline
//! clock_step NS     → OK <now_ns>   advance by NS
//! clock_set NS      → OK <now_ns>   advance to NS (never backwards)
//! clock_get         → OK <now_ns>
//! anything else     → FAIL <reason>
//! ```
//!
//! Time moves deadline by deadline, each timer firing with the clock at its
//! own deadline ([`AioContext::virtual_step`]). Before answering, the
//! server runs the target context until it is idle *and* the embedder's
//! `busy` predicate is false, so after `OK` every consequence of the step
//! has been dispatched. One client at a time, as in QEMU.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aio::{AioContext, ClientType, FdHandler};

/// Says whether work started by a step is still in flight (e.g. a job that
/// is between two pause points doing I/O).
pub type BusyFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Options for [`QtestServer::listen`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct QtestOptions {
    /// Keep running the target context after a step while this is true.
    pub busy: Option<BusyFn>,
}

impl QtestOptions {
    /// No busy predicate.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the busy predicate.
    pub fn busy(mut self, f: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.busy = Some(Arc::new(f));
        self
    }
}

impl std::fmt::Debug for QtestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QtestOptions")
            .field("busy", &self.busy.is_some())
            .finish()
    }
}

struct Conn {
    stream: UnixStream,
    /// Bytes of an incomplete line.
    pending: Vec<u8>,
}

/// A listening qtest server; dropping it closes the socket and removes the
/// socket file.
pub struct QtestServer {
    io: AioContext,
    listener: Arc<UnixListener>,
    conn: Arc<Mutex<Option<Conn>>>,
    path: PathBuf,
}

impl std::fmt::Debug for QtestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QtestServer")
            .field("path", &self.path)
            .finish()
    }
}

impl QtestServer {
    /// Listens on the unix socket `path`, serving on `io` (the iohandler
    /// context) and stepping the virtual clock of `target`. Both contexts
    /// must live on the calling thread.
    pub fn listen(
        io: &AioContext,
        target: &AioContext,
        path: &Path,
        opts: QtestOptions,
    ) -> crate::Result<QtestServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| crate::Error::IOThread {
            id: "qtest".into(),
            reason: format!("binding {}: {e}", path.display()),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| crate::Error::IOThread {
                id: "qtest".into(),
                reason: format!("{e}"),
            })?;
        let listener = Arc::new(listener);
        let conn: Arc<Mutex<Option<Conn>>> = Arc::default();
        let (l, c, t, busy) = (
            listener.clone(),
            conn.clone(),
            target.downgrade(),
            opts.busy,
        );
        io.set_fd_handler(
            listener.as_raw_fd(),
            Some(
                FdHandler::new(ClientType::INTERNAL).on_read(move |io: &AioContext| {
                    let Ok((stream, _)) = l.accept() else { return };
                    // Blocking: a read happens only when the fd is readable, and
                    // replies are short lines.
                    if stream.set_nonblocking(false).is_err() {
                        return;
                    }
                    let fd = stream.as_raw_fd();
                    if let Some(old) = c.lock().map(|mut g| g.take()).ok().flatten() {
                        let _ = io.set_fd_handler(old.stream.as_raw_fd(), None);
                    }
                    if let Ok(mut g) = c.lock() {
                        *g = Some(Conn {
                            stream,
                            pending: Vec::new(),
                        });
                    }
                    let (c2, t2, busy2) = (c.clone(), t.clone(), busy.clone());
                    let handler =
                        FdHandler::new(ClientType::INTERNAL).on_read(move |io: &AioContext| {
                            serve(io, &c2, &t2, busy2.as_ref(), fd);
                        });
                    if let Err(e) = io.set_fd_handler(fd, Some(handler)) {
                        log::error!("qtest: {e}");
                    }
                }),
            ),
        )?;
        log::info!("qtest listening on unix:{}", path.display());
        Ok(QtestServer {
            io: io.clone(),
            listener,
            conn,
            path: path.to_path_buf(),
        })
    }
}

/// Reads what is available and answers each complete line.
fn serve(
    io: &AioContext,
    conn: &Mutex<Option<Conn>>,
    target: &aio::WeakAioContext,
    busy: Option<&BusyFn>,
    fd: i32,
) {
    let (lines, mut writer) = {
        let Ok(mut guard) = conn.lock() else { return };
        let Some(c) = guard.as_mut() else { return };
        let mut chunk = [0u8; 4096];
        let n = match c.stream.read(&mut chunk) {
            Ok(0) | Err(_) => {
                *guard = None;
                drop(guard);
                let _ = io.set_fd_handler(fd, None);
                return;
            }
            Ok(n) => n,
        };
        c.pending.extend_from_slice(&chunk[..n]);
        let mut lines = Vec::new();
        while let Some(pos) = c.pending.iter().position(|&x| x == b'\n') {
            let line: Vec<u8> = c.pending.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line).trim().to_string());
        }
        let Ok(writer) = c.stream.try_clone() else {
            return;
        };
        (lines, writer)
    };
    // No lock is held while stepping: the step runs the target loop.
    for line in lines.into_iter().filter(|l| !l.is_empty()) {
        let reply = match target.upgrade() {
            Some(t) => handle(&t, busy, &line),
            None => "FAIL the target context is gone".to_string(),
        };
        log::debug!("qtest: {line} -> {reply}");
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

fn settle(target: &AioContext, busy: Option<&BusyFn>) {
    target.run_until_idle();
    if let Some(b) = busy {
        // Real I/O completes in real time: wait in the loop (it sleeps in
        // the kernel) until the work the step started has parked again.
        let fallback = target.timer_new(aio::ClockType::Realtime, |_| {});
        while b() {
            fallback.mod_in_ns(1_000_000);
            target.poll(true);
            target.run_until_idle();
        }
    }
}

/// Moves the virtual clock to `until` deadline by deadline, settling after
/// each one: work a timer starts (a job's next chunk of real I/O) finishes
/// before time moves on, as it would on a real clock that is never faster
/// than the work.
fn advance_to(target: &AioContext, busy: Option<&BusyFn>, until: i64) -> i64 {
    loop {
        settle(target, busy);
        let now = target.clock_now(aio::ClockType::Virtual);
        match target.timer_deadline_ns(aio::ClockType::Virtual) {
            Some(rel) if now + rel <= until && rel > 0 => {
                target.virtual_set(now + rel);
            }
            _ => break,
        }
    }
    target.virtual_set(until);
    settle(target, busy);
    target.clock_now(aio::ClockType::Virtual)
}

fn handle(target: &AioContext, busy: Option<&BusyFn>, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |w: &str| -> Result<i64, String> {
        w.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| format!("invalid number '{w}'"))
    };
    let now = |t: &AioContext| t.clock_now(aio::ClockType::Virtual);
    let result: Result<i64, String> = match words.as_slice() {
        ["clock_get"] => Ok(now(target)),
        ["clock_step"] => {
            settle(target, busy);
            match target.timer_deadline_ns(aio::ClockType::Virtual) {
                Some(rel) => Ok(advance_to(target, busy, now(target) + rel)),
                None => Err("no virtual-clock timer is pending".to_string()),
            }
        }
        ["clock_step", ns] => {
            num(ns).map(|ns| advance_to(target, busy, now(target).saturating_add(ns)))
        }
        ["clock_set", ns] => num(ns).map(|ns| advance_to(target, busy, ns)),
        [cmd, ..] => Err(format!("unknown or malformed command '{cmd}'")),
        [] => Err("empty command".to_string()),
    };
    match result {
        Ok(_) => {
            settle(target, busy);
            format!("OK {}", now(target))
        }
        Err(e) => format!("FAIL {e}"),
    }
}

impl Drop for QtestServer {
    fn drop(&mut self) {
        let _ = self.io.set_fd_handler(self.listener.as_raw_fd(), None);
        if let Ok(mut g) = self.conn.lock() {
            if let Some(c) = g.take() {
                let _ = self.io.set_fd_handler(c.stream.as_raw_fd(), None);
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
