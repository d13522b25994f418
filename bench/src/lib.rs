//! Shared fixtures of the `aio` benchmarks, used by the criterion bench
//! (`benches/fd_scaling.rs`) and the `aio-bench` binary.
//!
//! * **fd scaling.** A ping-pong with `N` idle eventfds registered (never
//!   signalled) and one active [`aio::EventNotifier`] registered last. One
//!   iteration sets the notifier and runs one blocking
//!   [`AioContext::poll`], which must dispatch its handler (one 8-byte
//!   read). [`RawEpollPingPong`] is the same ping-pong written directly
//!   against libc epoll: the floor no loop can beat.
//! * **timers.** The lateness of one-shot [`aio::Timer`]s on the
//!   `Realtime` clock, and of the same wait done with a plain `epoll_wait`
//!   whose timeout is rounded up to milliseconds ([`ms_epoll_lateness`]).
//! * **tasks** ([`tasks`]). Spawn+complete throughput, a same-thread
//!   ping-pong of two tasks through `CoQueue`s, and cross-thread wake
//!   latency (an `aio` task, `AioContext::notify`, and a raw
//!   eventfd + `epoll_wait` floor, [`CrossThreadEventfd`]).
//! * **file I/O** ([`io`]). 4 KiB random reads/writes at a fixed queue
//!   depth through `aio::file::File` on either engine, and the same job
//!   run by `fio`.
//! * **qcow2 snapshot copy-on-write** ([`snapshot_cow`]). Write
//!   throughput of the active layer before a snapshot, on the first pass
//!   after it (copy-on-write) and on the second, against `qemu-img bench`.
//! * **block jobs** ([`jobs`]). Stream, commit, mirror and backup
//!   throughput of `aiod` against qemu-storage-daemon.
//! * **NBD export** ([`nbd`]). `qemu-img bench` against `aiod`'s NBD
//!   export and `qemu-nbd`'s, in one run.
//!
//! All `unsafe` lives in the private `sys` module.

#![deny(unsafe_code)]

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aio::{AioContext, Backend, ClientType, ClockType, ContextOptions, EventNotifier, FdHandler};

pub mod imgbench;
pub mod io;
pub mod jobs;
pub mod nbd;
pub mod peers;
pub mod report;
pub mod snapshot_cow;
mod sys;
pub mod tasks;

pub use sys::{CrossThreadEventfd, MsEpollSleeper, RawEpollPingPong};

/// The idle-fd counts of the fd-scaling benchmark.
pub const IDLE_COUNTS: [usize; 5] = [1, 16, 256, 4096, 10_000];

/// Descriptors wanted on top of the idle ones: the active eventfd, the
/// context's notifier, epoll and timerfd, stdio, criterion's files.
const FD_SLACK: u64 = 1_024;

/// Errors of the fixtures (setup failures from `aio` or the kernel).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Raises `RLIMIT_NOFILE` so that a fixture with `max_idle` idle fds fits
/// (one fixture at a time), and returns the limit in force.
///
/// # Errors
///
/// When the limit cannot be raised, or the hard limit is too low.
pub fn raise_fd_limit_for(max_idle: usize) -> Result<u64> {
    let want = max_idle as u64 + FD_SLACK;
    let got = aio::raise_fd_limit(want)?;
    if got < max_idle as u64 + 64 {
        return Err(format!(
            "RLIMIT_NOFILE is {got}, {max_idle} idle fds need about {want}; raise the hard limit"
        )
        .into());
    }
    Ok(got)
}

/// What runs the ping-pong: one of the `aio` backends, or the raw floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// libc `epoll_wait` with no loop around it.
    RawEpoll,
    /// [`Backend::Epoll`] (`epoll_pwait2` for deadlines).
    Epoll,
    /// [`Backend::EpollTimerfd`].
    EpollTimerfd,
    /// [`Backend::Ppoll`].
    Ppoll,
    /// [`Backend::IoUring`].
    IoUring,
    /// A peer: mio's `Poll` (edge-triggered epoll) with a `SourceFd` per
    /// eventfd, the active one drained after each wake.
    Mio,
    /// A peer: calloop's `EventLoop` with a level-triggered `Generic`
    /// source per eventfd.
    Calloop,
    /// A peer: rust-vmm's event-manager (epoll) with one subscriber.
    EventManager,
    /// A peer: glib's `MainContext` with unix fd sources (cargo feature
    /// `glib`; skipped without it).
    Glib,
}

impl Flavor {
    /// Every flavor, in table order.
    pub const ALL: [Flavor; 9] = [
        Flavor::RawEpoll,
        Flavor::Epoll,
        Flavor::EpollTimerfd,
        Flavor::IoUring,
        Flavor::Ppoll,
        Flavor::Mio,
        Flavor::Calloop,
        Flavor::EventManager,
        Flavor::Glib,
    ];

    /// Whether this build can run the flavor (glib needs its feature).
    pub fn available(self) -> bool {
        self != Flavor::Glib || peers::GlibPingPong::AVAILABLE
    }

    /// The name used in tables and JSON: `raw-epoll`, `epoll`,
    /// `epoll+timerfd`, `ppoll`.
    pub fn label(self) -> &'static str {
        match self {
            Flavor::RawEpoll => "raw-epoll",
            Flavor::Epoll => "epoll",
            Flavor::EpollTimerfd => "epoll+timerfd",
            Flavor::Ppoll => "ppoll",
            Flavor::IoUring => "io_uring",
            Flavor::Mio => "mio",
            Flavor::Calloop => "calloop",
            Flavor::EventManager => "event-manager",
            Flavor::Glib => "glib",
        }
    }

    /// The flavor whose [`label`](Flavor::label) is `s`.
    pub fn parse(s: &str) -> Option<Flavor> {
        Flavor::ALL.into_iter().find(|f| f.label() == s)
    }

    /// The `aio` backend, or `None` for the raw floor.
    pub fn backend(self) -> Option<Backend> {
        match self {
            Flavor::RawEpoll => None,
            Flavor::Epoll => Some(Backend::Epoll),
            Flavor::EpollTimerfd => Some(Backend::EpollTimerfd),
            Flavor::Ppoll => Some(Backend::Ppoll),
            Flavor::IoUring => Some(Backend::IoUring),
            Flavor::Mio | Flavor::Calloop | Flavor::EventManager | Flavor::Glib => None,
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The ping-pong on an [`AioContext`]: `idle` never-signalled eventfds
/// with (empty) read handlers, then one active [`EventNotifier`] whose read
/// handler clears it with `test_and_clear`.
pub struct AioPingPong {
    // Field order is drop order: the context (and the handlers in it) goes
    // before the fds it watches.
    ctx: AioContext,
    active: Arc<EventNotifier>,
    idle: Vec<OwnedFd>,
}

impl fmt::Debug for AioPingPong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioPingPong")
            .field("backend", &self.ctx.backend_name())
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl AioPingPong {
    /// Builds the fixture on a new context of `backend`, whose home thread
    /// is the calling thread.
    ///
    /// # Errors
    ///
    /// When a context, an eventfd or a registration fails (e.g. out of fds:
    /// see [`raise_fd_limit_for`]).
    pub fn new(backend: Backend, idle: usize) -> Result<Self> {
        let ctx = AioContext::with_options(ContextOptions::new().backend(backend))?;
        let mut idle_fds = Vec::with_capacity(idle);
        for _ in 0..idle {
            let fd = sys::eventfd()?;
            ctx.set_fd_handler(
                fd.as_raw_fd(),
                Some(FdHandler::new(ClientType::INTERNAL).on_read(|_| {})),
            )?;
            idle_fds.push(fd);
        }
        let active = Arc::new(EventNotifier::new()?);
        let n = Arc::clone(&active);
        ctx.set_event_notifier(
            &active,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                // One 8-byte read; an error here shows up as a missing
                // dispatch in the stats, never as a hang (level-triggered).
                let _ = n.test_and_clear();
            })),
        )?;
        Ok(Self {
            ctx,
            active,
            idle: idle_fds,
        })
    }

    /// One ping-pong: set the notifier, run one blocking poll. Returns
    /// whether the poll made progress (dispatched the handler).
    #[inline]
    pub fn iteration(&mut self) -> bool {
        if self.active.set().is_err() {
            return false;
        }
        self.ctx.poll(true)
    }

    /// The context, e.g. for [`AioContext::stats`].
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// The number of idle fds.
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
}

/// The ping-pong on mio, a peer loop: N idle eventfds and one active one
/// registered with a `mio::Poll` (edge-triggered), one `poll` per iteration
/// with no timeout, and the active eventfd read once (which drains it).
pub struct MioPingPong {
    poll: mio::Poll,
    events: mio::Events,
    active: std::fs::File,
    idle: Vec<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for MioPingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MioPingPong")
            .field("idle", &self.idle.len())
            .finish()
    }
}

const MIO_ACTIVE: mio::Token = mio::Token(usize::MAX - 1);

impl MioPingPong {
    /// Builds the fixture with `idle` never-signalled eventfds.
    ///
    /// # Errors
    ///
    /// When an eventfd or the registration fails (e.g. the fd limit).
    pub fn new(idle: usize) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let poll = mio::Poll::new()?;
        let mut idle_fds = Vec::with_capacity(idle);
        for i in 0..idle {
            let fd = sys::eventfd()?;
            poll.registry().register(
                &mut mio::unix::SourceFd(&fd.as_raw_fd()),
                mio::Token(i),
                mio::Interest::READABLE,
            )?;
            idle_fds.push(fd);
        }
        let active = std::fs::File::from(sys::eventfd()?);
        poll.registry().register(
            &mut mio::unix::SourceFd(&active.as_raw_fd()),
            MIO_ACTIVE,
            mio::Interest::READABLE,
        )?;
        Ok(Self {
            poll,
            events: mio::Events::with_capacity(256),
            active,
            idle: idle_fds,
        })
    }

    /// One ping-pong: write, poll, read; whether the active fd was reported.
    #[inline]
    pub fn iteration(&mut self) -> bool {
        use std::io::{Read, Write};
        if (&self.active).write_all(&1u64.to_ne_bytes()).is_err() {
            return false;
        }
        if self.poll.poll(&mut self.events, None).is_err() {
            return false;
        }
        let hit = self.events.iter().any(|e| e.token() == MIO_ACTIVE);
        let mut buf = [0u8; 8];
        hit && (&self.active).read_exact(&mut buf).is_ok()
    }

    /// The number of idle eventfds.
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
}

/// A ping-pong fixture of any [`Flavor`].
#[derive(Debug)]
pub enum Fixture {
    /// The raw-epoll floor.
    Raw(RawEpollPingPong),
    /// An `aio` context.
    Aio(AioPingPong),
    /// The mio peer.
    Mio(MioPingPong),
    /// The calloop peer.
    Calloop(peers::CalloopPingPong),
    /// The event-manager peer.
    EventManager(peers::EventManagerPingPong),
    /// The glib peer.
    Glib(peers::GlibPingPong),
}

impl Fixture {
    /// Builds the fixture of `flavor` with `idle` idle fds.
    ///
    /// # Errors
    ///
    /// When setup fails (see [`AioPingPong::new`]).
    pub fn new(flavor: Flavor, idle: usize) -> Result<Self> {
        Ok(match (flavor, flavor.backend()) {
            (Flavor::Mio, _) => Fixture::Mio(MioPingPong::new(idle)?),
            (Flavor::Calloop, _) => Fixture::Calloop(peers::CalloopPingPong::new(idle)?),
            (Flavor::EventManager, _) => {
                Fixture::EventManager(peers::EventManagerPingPong::new(idle)?)
            }
            (Flavor::Glib, _) => Fixture::Glib(peers::GlibPingPong::new(idle)?),
            (_, None) => Fixture::Raw(RawEpollPingPong::new(idle)?),
            (_, Some(b)) => Fixture::Aio(AioPingPong::new(b, idle)?),
        })
    }

    /// Runs `iters` iterations; returns how many dispatched the active fd.
    pub fn run(&mut self, iters: u64) -> u64 {
        let mut ok = 0;
        match self {
            Fixture::Raw(f) => {
                for _ in 0..iters {
                    ok += u64::from(f.iteration());
                }
            }
            Fixture::Aio(f) => {
                for _ in 0..iters {
                    ok += u64::from(f.iteration());
                }
            }
            Fixture::Mio(f) => {
                for _ in 0..iters {
                    ok += u64::from(f.iteration());
                }
            }
            Fixture::Calloop(f) => {
                for _ in 0..iters {
                    ok += u64::from(f.iteration());
                }
            }
            Fixture::EventManager(f) => {
                for _ in 0..iters {
                    ok += u64::from(f.iteration());
                }
            }
            Fixture::Glib(f) => {
                for _ in 0..iters {
                    ok += u64::from(f.iteration());
                }
            }
        }
        ok
    }

    /// Runs and times `iters` iterations.
    ///
    /// # Errors
    ///
    /// When an iteration did not dispatch the active fd: the fixture is
    /// broken and the time means nothing.
    pub fn run_timed(&mut self, iters: u64) -> Result<Duration> {
        let start = Instant::now();
        let ok = self.run(iters);
        let elapsed = start.elapsed();
        if ok != iters {
            return Err(format!("only {ok} of {iters} ping-pong iterations dispatched").into());
        }
        Ok(elapsed)
    }

    /// The `aio` backend's own name (`epoll` falls back to `epoll+timerfd`
    /// on kernels without `epoll_pwait2`), or `raw-epoll`.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Fixture::Raw(_) => Flavor::RawEpoll.label(),
            Fixture::Mio(_) => Flavor::Mio.label(),
            Fixture::Calloop(_) => Flavor::Calloop.label(),
            Fixture::EventManager(_) => Flavor::EventManager.label(),
            Fixture::Glib(_) => Flavor::Glib.label(),
            Fixture::Aio(f) => f.ctx.backend_name(),
        }
    }

    /// The context's counters, for `aio` fixtures.
    pub fn aio_stats(&self) -> Option<aio::Stats> {
        match self {
            Fixture::Aio(f) => Some(f.ctx.stats()),
            _ => None,
        }
    }

    /// The number of idle fds.
    pub fn idle_count(&self) -> usize {
        match self {
            Fixture::Raw(f) => f.idle_count(),
            Fixture::Aio(f) => f.idle_count(),
            Fixture::Mio(f) => f.idle_count(),
            Fixture::Calloop(f) => f.idle_count(),
            Fixture::EventManager(f) => f.idle_count(),
            Fixture::Glib(f) => f.idle_count(),
        }
    }
}

// ----- timers ----------------------------------------------------------

/// What a timer-lateness run waits with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerSource {
    /// A one-shot `aio` timer on a context of this backend.
    Aio(Backend),
    /// Plain `epoll_wait` with the timeout rounded up to whole milliseconds.
    MsEpoll,
    /// A peer: tokio's `sleep_until` on a current-thread runtime.
    Tokio,
    /// A peer: calloop's `Timer` source.
    Calloop,
}

impl TimerSource {
    /// Every source, in table order.
    pub const ALL: [TimerSource; 7] = [
        TimerSource::Aio(Backend::Epoll),
        TimerSource::Aio(Backend::EpollTimerfd),
        TimerSource::Aio(Backend::IoUring),
        TimerSource::Aio(Backend::Ppoll),
        TimerSource::MsEpoll,
        TimerSource::Tokio,
        TimerSource::Calloop,
    ];

    /// Whether this source is one of ours (an `aio` context).
    pub fn is_aio(self) -> bool {
        matches!(self, TimerSource::Aio(_))
    }

    /// The name used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            TimerSource::Aio(Backend::Epoll) => "epoll",
            TimerSource::Aio(Backend::EpollTimerfd) => "epoll+timerfd",
            TimerSource::Aio(Backend::Ppoll) => "ppoll",
            TimerSource::Aio(Backend::IoUring) => "io_uring",
            TimerSource::Aio(_) => "aio",
            TimerSource::MsEpoll => "ms-epoll",
            TimerSource::Tokio => "tokio",
            TimerSource::Calloop => "calloop",
        }
    }

    /// Measures `samples` lateness values (after `warmup` discarded ones)
    /// of a wait for an absolute deadline `period_ns` ahead.
    ///
    /// # Errors
    ///
    /// When the context or epoll instance cannot be created.
    pub fn lateness(self, period_ns: i64, warmup: usize, samples: usize) -> Result<Vec<i64>> {
        match self {
            TimerSource::Aio(b) => aio_lateness(b, period_ns, warmup, samples),
            TimerSource::MsEpoll => ms_epoll_lateness(period_ns, warmup, samples),
            TimerSource::Tokio => peers::tokio_lateness(period_ns, warmup, samples),
            TimerSource::Calloop => peers::calloop_lateness(period_ns, warmup, samples),
        }
    }
}

const NOT_FIRED: i64 = i64::MIN;

/// Lateness of one-shot `Realtime` timers on a fresh context of `backend`.
///
/// Each sample arms the timer at the absolute deadline
/// `T = monotonic_ns() + period_ns`, then runs `poll(true)` until the
/// callback has run. The callback reads [`aio::monotonic_ns`] before
/// anything else; the sample is that time minus `T` (negative = early).
///
/// # Errors
///
/// When the context cannot be created.
pub fn aio_lateness(
    backend: Backend,
    period_ns: i64,
    warmup: usize,
    samples: usize,
) -> Result<Vec<i64>> {
    let ctx = AioContext::with_options(ContextOptions::new().backend(backend))?;
    let fired = Arc::new(AtomicI64::new(NOT_FIRED));
    let f = Arc::clone(&fired);
    let timer = ctx.timer_new(ClockType::Realtime, move |_| {
        let now = aio::monotonic_ns();
        f.store(now, Ordering::Relaxed);
    });
    let mut out = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        fired.store(NOT_FIRED, Ordering::Relaxed);
        let deadline = aio::monotonic_ns() + period_ns;
        timer.mod_ns(deadline);
        let t_cb = loop {
            ctx.poll(true);
            let t = fired.load(Ordering::Relaxed);
            if t != NOT_FIRED {
                break t;
            }
        };
        if i >= warmup {
            out.push(t_cb - deadline);
        }
    }
    Ok(out)
}

/// The same waits as [`aio_lateness`], done the way a millisecond-granular
/// loop does them: `epoll_wait` with the remaining time rounded *up* to
/// whole milliseconds, repeated until the deadline has passed; the sample
/// is the time after the wait minus the deadline.
///
/// # Errors
///
/// When the epoll instance cannot be created or a wait fails.
pub fn ms_epoll_lateness(period_ns: i64, warmup: usize, samples: usize) -> Result<Vec<i64>> {
    let mut sleeper = MsEpollSleeper::new()?;
    let mut out = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let deadline = aio::monotonic_ns() + period_ns;
        let woke = loop {
            let now = aio::monotonic_ns();
            if now >= deadline {
                break now;
            }
            let ms = (deadline - now + 999_999) / 1_000_000;
            sleeper.wait_ms(i32::try_from(ms).unwrap_or(i32::MAX))?;
        };
        if i >= warmup {
            out.push(woke - deadline);
        }
    }
    Ok(out)
}

/// Order statistics of lateness samples, in ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatenessSummary {
    /// Number of samples.
    pub samples: usize,
    /// Median (nearest rank).
    pub median: i64,
    /// 99th percentile (nearest rank).
    pub p99: i64,
    /// Largest sample.
    pub max: i64,
    /// Samples below zero: fired before the deadline.
    pub early: usize,
}

impl LatenessSummary {
    /// Summarises `samples` (`None` if there are none).
    pub fn of(samples: &[i64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_unstable();
        Some(Self {
            samples: s.len(),
            median: nearest_rank(&s, 0.5),
            p99: nearest_rank(&s, 0.99),
            max: s[s.len() - 1],
            early: s.iter().filter(|&&x| x < 0).count(),
        })
    }
}

/// The median of `v` (sorted in place; NaN if empty), for the
/// subcommands that report a median of a few rounds. An even count takes
/// the mean of the two middle values, so neither side of a ratio is
/// favoured.
pub(crate) fn median_in_place(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs a tool (`qemu-img`, `qemu-io`) to completion; its stdout, or the
/// command and its stderr as the error.
pub(crate) fn run_tool(cmd: &str, args: &[&str]) -> std::result::Result<String, String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nearest-rank `q` quantile of sorted, non-empty `sorted`.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> T {
    let n = sorted.len();
    let rank = (q * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ITERS: u64 = 64;

    #[test]
    fn every_flavor_dispatches_every_iteration() {
        raise_fd_limit_for(300).unwrap();
        for flavor in Flavor::ALL.into_iter().filter(|f| f.available()) {
            for idle in [0, 1, 16, 256] {
                let mut fx = Fixture::new(flavor, idle).unwrap();
                assert_eq!(fx.idle_count(), idle);
                for i in 0..ITERS {
                    assert_eq!(
                        fx.run(1),
                        1,
                        "{flavor} idle={idle}: iteration {i} did not dispatch"
                    );
                }
                match &mut fx {
                    Fixture::Aio(f) => {
                        let s = f.context().stats();
                        // Exactly one handler per poll: the active one, never an idle one.
                        assert_eq!(s.iterations, ITERS, "{flavor} idle={idle}");
                        assert_eq!(s.dispatches, ITERS, "{flavor} idle={idle}");
                        assert_eq!(s.timer_runs + s.bh_runs, 0);
                        // The handler drained the notifier: nothing is left.
                        assert!(
                            !f.context().poll(false),
                            "{flavor} idle={idle}: left pending"
                        );
                        assert_eq!(f.context().stats().dispatches, ITERS);
                    }
                    Fixture::Raw(f) => {
                        assert!(
                            !f.anything_pending().unwrap(),
                            "raw idle={idle}: left pending"
                        );
                    }
                    Fixture::Mio(f) => {
                        // Drained: a zero-timeout poll reports nothing.
                        f.poll.poll(&mut f.events, Some(Duration::ZERO)).unwrap();
                        assert!(f.events.is_empty(), "mio idle={idle}: left pending");
                    }
                    // The peers' iteration checks its own dispatch count.
                    Fixture::Calloop(_) | Fixture::EventManager(_) | Fixture::Glib(_) => {}
                }
            }
        }
    }

    #[test]
    fn run_timed_checks_every_iteration() {
        let mut fx = Fixture::new(Flavor::Epoll, 4).unwrap();
        assert!(fx.backend_name().starts_with("epoll"));
        fx.run_timed(1_000).unwrap();
        assert_eq!(fx.aio_stats().unwrap().dispatches, 1_000);
    }

    #[test]
    fn timers_never_fire_early() {
        for src in TimerSource::ALL {
            let s = src.lateness(100_000, 2, 20).unwrap();
            let sum = LatenessSummary::of(&s).unwrap();
            assert_eq!(sum.samples, 20);
            assert_eq!(sum.early, 0, "{}: {s:?}", src.label());
            assert!(sum.median <= sum.p99 && sum.p99 <= sum.max);
        }
    }

    // ----- tasks -----------------------------------------------------------

    #[test]
    fn spawn_batch_completes_every_task() {
        let ctx = AioContext::new().unwrap();
        for n in [0, 1, 100] {
            spawn_batch_ok(&ctx, n);
        }
    }

    fn spawn_batch_ok(ctx: &AioContext, n: usize) {
        tasks::spawn_batch(ctx, n).unwrap();
        assert_eq!(ctx.task_count(), 0, "n={n}: tasks left");
    }

    #[test]
    fn pingpong_wakes_without_fallback() {
        let ctx = AioContext::new().unwrap();
        let r = tasks::pingpong(&ctx, 200).unwrap();
        assert_eq!(r.wakes, 400);
        assert_eq!(r.fallback_yields, 0, "a notify found its peer not waiting");
        assert_eq!(ctx.task_count(), 0);
    }

    #[test]
    fn wake_latency_every_loop() {
        let cfg = tasks::WakeCfg {
            warmup: 2,
            samples: 10,
            gap: Duration::from_micros(50),
        };
        for lp in tasks::WakeLoop::ALL {
            for pl in tasks::Placement::ALL {
                if !pl.available() {
                    continue;
                }
                let v = tasks::wake_latency(lp, pl, cfg).unwrap();
                assert_eq!(v.len(), 10, "{lp} {}", pl.label());
                // Measured after the wake call started; bounded by a
                // (generous) second.
                assert!(
                    v.iter().all(|&ns| (0..1_000_000_000).contains(&ns)),
                    "{lp} {}: {v:?}",
                    pl.label()
                );
            }
        }
    }

    #[test]
    fn raw_eventfd_signal_wait_clear() {
        let raw = std::sync::Arc::new(CrossThreadEventfd::new().unwrap());
        assert!(!raw.clear().unwrap(), "starts clear");
        let r = raw.clone();
        std::thread::spawn(move || r.signal().unwrap())
            .join()
            .unwrap();
        raw.wait().unwrap();
        assert!(raw.clear().unwrap());
        assert!(!raw.clear().unwrap());
    }

    // ----- file I/O ----------------------------------------------------------

    const TINY: u64 = 64 * 1024;

    /// A prepared file in `dir`, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(dir: &std::path::Path, tag: &str, direct: bool) -> Self {
            let p = dir.join(format!("bench-test-{}-{tag}.dat", std::process::id()));
            io::prepare_file(&p, TINY, direct).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().len(), TINY);
            TempFile(p)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn job(path: &std::path::Path, depth: usize, rw: io::Rw, direct: bool) -> io::IoJob {
        io::IoJob {
            path: path.to_path_buf(),
            size: TINY,
            depth,
            rw,
            direct,
            verify: true,
        }
    }

    fn engines() -> [aio::file::Engine; 2] {
        [aio::file::Engine::Threads, aio::file::Engine::IoUring]
    }

    #[test]
    fn io_runs_exact_op_counts_and_verifies() {
        let f = TempFile::new(std::path::Path::new("/dev/shm"), "ops", false);
        for engine in engines() {
            for depth in [1, 4] {
                for rw in [io::Rw::RandWrite, io::Rw::RandRead] {
                    let r = io::IoRunner::new(&job(&f.0, depth, rw, false), engine).unwrap();
                    let run = r.run(io::Stop::Ops(50), 7).unwrap();
                    let what = format!("{} depth {depth} {rw}", io::engine_label(engine));
                    assert_eq!(run.ops, 50, "{what}");
                    assert!(run.iops() > 0.0, "{what}");
                    assert_eq!(r.context().task_count(), 0, "{what}");
                }
            }
        }
    }

    #[test]
    fn io_time_based_run_stops() {
        let f = TempFile::new(std::path::Path::new("/dev/shm"), "time", false);
        for engine in engines() {
            let r = io::IoRunner::new(&job(&f.0, 2, io::Rw::RandRead, false), engine).unwrap();
            let run = r
                .run(io::Stop::After(Duration::from_millis(20)), 1)
                .unwrap();
            assert!(run.ops > 0);
            assert!(run.elapsed >= Duration::from_millis(20));
            assert!(run.elapsed < Duration::from_secs(5));
        }
    }

    #[test]
    fn io_direct_on_disk() {
        // A directory on the real disk (the crate's target dir is not
        // tmpfs); skipped where it is.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        if io::is_tmpfs(dir).unwrap() {
            return;
        }
        let f = TempFile::new(dir, "direct", true);
        for engine in engines() {
            for rw in [io::Rw::RandWrite, io::Rw::RandRead] {
                let r = io::IoRunner::new(&job(&f.0, 3, rw, true), engine).unwrap();
                assert_eq!(r.run(io::Stop::Ops(20), 3).unwrap().ops, 20);
            }
        }
    }

    #[test]
    fn io_verify_catches_a_foreign_write() {
        let f = TempFile::new(std::path::Path::new("/dev/shm"), "verify", false);
        // Overwrite every stamp, as fio's randwrite would.
        std::fs::write(&f.0, vec![0u8; TINY as usize]).unwrap();
        let r = io::IoRunner::new(
            &job(&f.0, 1, io::Rw::RandRead, false),
            aio::file::Engine::Threads,
        )
        .unwrap();
        let e = r.run(io::Stop::Ops(5), 1).unwrap_err().to_string();
        assert!(e.contains("read back"), "{e}");
    }

    #[test]
    fn prepare_refuses_bad_sizes() {
        let p = std::path::Path::new("/dev/shm/bench-test-never-created");
        assert!(io::prepare_file(p, 0, false).is_err());
        assert!(io::prepare_file(p, 4097, false).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn rng_spreads_over_blocks() {
        let mut r = io::Rng::new(0);
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            seen[r.below(16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn fio_args_match_the_job() {
        let j = job(
            std::path::Path::new("/dev/shm/x"),
            32,
            io::Rw::RandRead,
            true,
        );
        let a = io::fio_args(&j, "io_uring", Duration::from_millis(1500)).join(" ");
        for want in [
            "--filename=/dev/shm/x",
            "--size=65536",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--runtime=1500ms",
            "--norandommap",
            "--output-format=json",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
    }

    /// Trimmed from real fio 3.33 output (note `"rw" : "randread"` in the
    /// job options, which must not be mistaken for the `read` object).
    const FIO_JSON: &str = r#"note: a line before the JSON
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "x",
      "job options" : {
        "rw" : "randread",
        "ioengine" : "io_uring"
      },
      "read" : {
        "io_bytes" : 642547712,
        "bw" : 1255495,
        "iops" : 313868.263473,
        "iops_min" : 1,
        "runtime" : 500
      },
      "write" : {
        "io_bytes" : 0,
        "iops" : 0.000000,
        "runtime" : 0
      }
    }
  ]
}"#;

    #[test]
    fn parses_fio_json() {
        assert_eq!(
            io::parse_fio_iops(FIO_JSON, io::Rw::RandRead),
            Some(313_868.263473)
        );
        assert_eq!(io::parse_fio_iops(FIO_JSON, io::Rw::RandWrite), Some(0.0));
        assert_eq!(io::parse_fio_iops("{}", io::Rw::RandRead), None);
        assert_eq!(
            io::parse_fio_iops(r#"{"jobs":[{"read":{"iops":12.5e3}}]}"#, io::Rw::RandRead),
            Some(12_500.0)
        );
    }

    #[test]
    fn fio_agrees_on_a_tiny_file() {
        let Some(fio) = io::fio_path() else {
            return; // not installed: nothing to check
        };
        let f = TempFile::new(std::path::Path::new("/dev/shm"), "fio", false);
        let mut j = job(&f.0, 4, io::Rw::RandRead, false);
        j.verify = false;
        let iops = io::run_fio(&fio, &j, "io_uring", Duration::from_millis(100)).unwrap();
        assert!(iops > 0.0);
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.5), 50);
        assert_eq!(nearest_rank(&v, 0.99), 99);
        assert_eq!(nearest_rank(&v, 1.0), 100);
        assert_eq!(nearest_rank(&[7], 0.5), 7);
    }
}
