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
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Other contexts on the same virtual clock (iothreads), stepped with
    /// the target.
    pub peers: Vec<AioContext>,
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
    /// Adds a context stepped with the target (an iothread's): its virtual
    /// timers count when looking for the next deadline, and at every step
    /// its virtual clock is moved to the target's and it is run until idle
    /// on its own thread, after the target, in the order peers were added.
    ///
    /// Give each peer its *own* [`VirtualClock`](aio::VirtualClock): then a
    /// peer sees time move only when the stepper moves it, and timers due
    /// at the same instant on different threads run in that fixed order.
    /// With a shared clock a peer's loop can see the new time as soon as
    /// the target sets it, and that order depends on thread scheduling.
    pub fn peer(mut self, ctx: AioContext) -> Self {
        self.peers.push(ctx);
        self
    }
}

impl std::fmt::Debug for QtestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QtestOptions")
            .field("busy", &self.busy.is_some())
            .field("peers", &self.peers.len())
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
        let (l, c) = (listener.clone(), conn.clone());
        let stepper = Arc::new(Stepper {
            target: target.downgrade(),
            peers: opts.peers.iter().map(AioContext::downgrade).collect(),
            busy: opts.busy,
        });
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
                    let (c2, st2) = (c.clone(), stepper.clone());
                    let handler =
                        FdHandler::new(ClientType::INTERNAL).on_read(move |io: &AioContext| {
                            serve(io, &c2, &st2, fd);
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
fn serve(io: &AioContext, conn: &Mutex<Option<Conn>>, stepper: &Stepper, fd: i32) {
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
        let reply = match stepper.target.upgrade() {
            Some(t) => stepper.handle(&t, &line),
            None => "FAIL the target context is gone".to_string(),
        };
        log::debug!("qtest: {line} -> {reply}");
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// The contexts one virtual clock drives: the target (the main loop's
/// context, whose thread serves the protocol) and its peers (iothreads).
struct Stepper {
    target: aio::WeakAioContext,
    peers: Vec<aio::WeakAioContext>,
    busy: Option<BusyFn>,
}

impl Stepper {
    fn peers(&self) -> impl Iterator<Item = AioContext> + '_ {
        self.peers.iter().filter_map(aio::WeakAioContext::upgrade)
    }

    /// Runs every context until idle (the target, each peer in order, the
    /// target again for what the peers handed it), then waits in the
    /// target's loop while the busy predicate holds.
    fn settle(&self, target: &AioContext) {
        target.run_until_idle();
        let any_peer = self.settle_peers(target, None);
        if let Some(b) = &self.busy {
            // Real I/O completes in real time: wait in the loop (it sleeps
            // in the kernel) until the work the step started has parked.
            let fallback = target.timer_new(aio::ClockType::Realtime, |_| {});
            while b() {
                fallback.mod_in_ns(1_000_000);
                target.poll(true);
                target.run_until_idle();
            }
            if any_peer {
                self.settle_peers(target, None);
            }
        }
    }

    /// Runs each peer until idle on its own thread, in order (first moving
    /// its clock to `until`, if given), then the target again for what the
    /// peers handed it. Returns whether there was any peer.
    fn settle_peers(&self, target: &AioContext, until: Option<i64>) -> bool {
        let mut any = false;
        for p in self.peers() {
            settle_remote(target, &p, until);
            any = true;
        }
        if any {
            target.run_until_idle();
        }
        any
    }

    /// Moves every context's virtual clock to `t`, one context at a time
    /// (target, then peers in order), each running what became due.
    fn set_all(&self, target: &AioContext, t: i64) {
        target.virtual_set(t);
        self.settle_peers(target, Some(t));
    }

    /// The earliest virtual deadline over every context, absolute.
    fn next_deadline(&self, target: &AioContext) -> Option<i64> {
        let now = target.clock_now(aio::ClockType::Virtual);
        std::iter::once(target.clone())
            .chain(self.peers())
            .filter_map(|c| c.timer_deadline_ns(aio::ClockType::Virtual))
            .map(|rel| now.saturating_add(rel))
            .min()
    }

    /// Moves the virtual clock to `until` deadline by deadline (over every
    /// context), settling after each: work a timer starts (a job's next
    /// chunk of real I/O) finishes before time moves on, as it would on a
    /// real clock that is never faster than the work. Timers due at the
    /// same instant on different contexts run target first, then peers in
    /// order.
    fn advance_to(&self, target: &AioContext, until: i64) -> i64 {
        loop {
            self.settle(target);
            let now = target.clock_now(aio::ClockType::Virtual);
            match self.next_deadline(target) {
                Some(d) if d <= until && d > now => self.set_all(target, d),
                _ => break,
            }
        }
        self.set_all(target, until);
        self.settle(target);
        target.clock_now(aio::ClockType::Virtual)
    }

    fn handle(&self, target: &AioContext, line: &str) -> String {
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
                self.settle(target);
                match self.next_deadline(target) {
                    Some(d) => Ok(self.advance_to(target, d.max(now(target)))),
                    None => Err("no virtual-clock timer is pending".to_string()),
                }
            }
            ["clock_step", ns] => {
                num(ns).map(|ns| self.advance_to(target, now(target).saturating_add(ns)))
            }
            ["clock_set", ns] => num(ns).map(|ns| self.advance_to(target, ns)),
            [cmd, ..] => Err(format!("unknown or malformed command '{cmd}'")),
            [] => Err("empty command".to_string()),
        };
        match result {
            Ok(_) => {
                self.settle(target);
                format!("OK {}", now(target))
            }
            Err(e) => format!("FAIL {e}"),
        }
    }
}

/// On `peer`'s own thread, moves its virtual clock to `until` (if given)
/// and runs it until idle, while `home` waits in its loop (so whatever the
/// peer hands to `home` meanwhile still runs).
fn settle_remote(home: &AioContext, peer: &AioContext, until: Option<i64>) {
    let done = Arc::new(AtomicBool::new(false));
    let (d, wake) = (done.clone(), home.downgrade());
    peer.bh_schedule_oneshot(move |p| {
        if let Some(t) = until {
            p.virtual_set(t);
        }
        p.run_until_idle();
        d.store(true, Ordering::SeqCst);
        if let Some(h) = wake.upgrade() {
            h.notify();
        }
    });
    home.poll_while(|| !done.load(Ordering::SeqCst));
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
