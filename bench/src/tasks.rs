//! Executor benchmarks: task spawn+complete throughput, a same-thread
//! ping-pong of two tasks through [`CoQueue`]s, and the latency of a
//! cross-thread wake of a blocked home thread (an `aio` task, the context's
//! bare `notify`, and a raw eventfd + `epoll_wait` floor).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use aio::{AioContext, CoQueue, JoinHandle};

use crate::sys::CrossThreadEventfd;
use crate::Result;

/// Spawns `n` trivial tasks (`async {}`) on `ctx`, then awaits every
/// handle in one `block_on`. Returns the wall time from the first spawn to
/// the last join. Must run on `ctx`'s home thread.
///
/// # Errors
///
/// When a task did not complete (cancelled or panicked): the time means
/// nothing then.
pub fn spawn_batch(ctx: &AioContext, n: usize) -> Result<Duration> {
    let start = Instant::now();
    let handles: Vec<JoinHandle<()>> = (0..n).map(|_| ctx.spawn(async {})).collect();
    ctx.block_on(async move {
        for h in handles {
            h.await?;
        }
        Ok::<(), aio::Error>(())
    })?;
    Ok(start.elapsed())
}

/// What a [`pingpong`] run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingPongRun {
    /// Wall time of the whole run (spawn to join).
    pub elapsed: Duration,
    /// Task wakes done: two per round trip.
    pub wakes: u64,
    /// Times a task found its peer not yet waiting and had to yield (the
    /// protocol is built so that this stays 0; the tests check it).
    pub fallback_yields: u64,
}

/// Two tasks on `ctx` waking each other `rounds` times through two
/// [`CoQueue`]s: A notifies B's queue and waits on its own, B does the
/// reverse. Every round trip is two task wakes, each resumed on a later
/// iteration of the loop. Must run on `ctx`'s home thread.
///
/// A `CoQueue` stores no notifications, so each side registers on its own
/// queue (at the `wait()` call) *before* notifying the peer; if the peer
/// is somehow not registered yet, the notifier yields and retries (counted
/// in [`PingPongRun::fallback_yields`]).
///
/// # Errors
///
/// When a task failed.
pub fn pingpong(ctx: &AioContext, rounds: u64) -> Result<PingPongRun> {
    let qa = Arc::new(CoQueue::new());
    let qb = Arc::new(CoQueue::new());
    let yields = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    // B is spawned first, so it is polled first and waits on `qb` before A
    // first notifies it.
    let b = {
        let (qa, qb, yields) = (qa.clone(), qb.clone(), yields.clone());
        ctx.spawn(async move {
            for _ in 0..rounds {
                qb.wait().await;
                while !qa.notify_one() {
                    yields.fetch_add(1, Ordering::Relaxed);
                    aio::yield_now().await;
                }
            }
        })
    };
    let a = {
        let yields = yields.clone();
        ctx.spawn(async move {
            for _ in 0..rounds {
                let mine = qa.wait();
                while !qb.notify_one() {
                    yields.fetch_add(1, Ordering::Relaxed);
                    aio::yield_now().await;
                }
                mine.await;
            }
        })
    };
    ctx.block_on(async move {
        a.await?;
        b.await
    })?;
    Ok(PingPongRun {
        elapsed: start.elapsed(),
        wakes: 2 * rounds,
        fallback_yields: yields.load(Ordering::Relaxed),
    })
}

// ----- cross-thread wake latency ---------------------------------------

/// What the blocked home thread waits in, and what the other thread
/// wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WakeLoop {
    /// A task on the home context waits on a [`CoQueue`]; the other thread
    /// calls `notify_one` (task wake → run queue → runner bottom half →
    /// notify). The sample ends when the task resumes.
    AioTask,
    /// The home thread sits in `poll(true)`; the other thread calls
    /// [`AioContext::notify`]. The sample ends when `poll` returns.
    AioNotify,
    /// libc only: the home thread sits in `epoll_wait` on an eventfd that
    /// the other thread `write`s. The sample ends when `epoll_wait`
    /// returns (before the eventfd is read).
    RawEventfd,
    /// A peer: the home thread sits in `mio::Poll::poll`; the other thread
    /// calls `mio::Waker::wake` (an eventfd underneath).
    Mio,
    /// A peer: a task on a tokio current-thread runtime awaits
    /// `Notify::notified`; the other thread calls `notify_one`.
    TokioNotify,
}

impl WakeLoop {
    /// Every loop, in table order.
    pub const ALL: [WakeLoop; 5] = [
        WakeLoop::RawEventfd,
        WakeLoop::AioNotify,
        WakeLoop::AioTask,
        WakeLoop::Mio,
        WakeLoop::TokioNotify,
    ];

    /// The name used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            WakeLoop::AioTask => "aio-task",
            WakeLoop::AioNotify => "aio-notify",
            WakeLoop::RawEventfd => "raw-eventfd",
            WakeLoop::Mio => "mio-waker",
            WakeLoop::TokioNotify => "tokio-notify",
        }
    }
}

impl fmt::Display for WakeLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Where the two threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// No affinity: the scheduler decides (on this VM it tends to run the
    /// woken thread on the waker's CPU).
    Unpinned,
    /// The waker pinned to CPU 0, the home thread to CPU 1: every wake
    /// crosses to the other, idle, vCPU.
    CrossCpu,
}

impl Placement {
    /// Both placements, in table order.
    pub const ALL: [Placement; 2] = [Placement::Unpinned, Placement::CrossCpu];

    /// The name used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::CrossCpu => "cross-cpu",
        }
    }

    /// Whether this machine can run the placement (cross-CPU needs CPUs 0
    /// and 1 in the process's affinity mask).
    pub fn available(self) -> bool {
        match self {
            Placement::Unpinned => true,
            Placement::CrossCpu => crate::sys::cpus_allowed(&[0, 1]).unwrap_or(false),
        }
    }

    fn cpus(self) -> Option<(usize, usize)> {
        match self {
            Placement::Unpinned => None,
            // (waker, home)
            Placement::CrossCpu => Some((0, 1)),
        }
    }
}

/// How a wake-latency run samples.
#[derive(Clone, Copy, Debug)]
pub struct WakeCfg {
    /// Samples discarded first.
    pub warmup: usize,
    /// Samples kept.
    pub samples: usize,
    /// How long the waker sleeps after the home thread is ready before it
    /// wakes it, so that the home thread is really blocked (and its vCPU
    /// may have halted).
    pub gap: Duration,
}

/// The handshake between the home thread and the waker.
#[derive(Default)]
struct Handshake {
    /// Sample `i` may be woken: the home thread is (about to be) waiting.
    ready: AtomicU64,
    /// Set by the waker just before it wakes sample `i`.
    fired: AtomicU64,
    /// `monotonic_ns()` just before the wake.
    t0: AtomicI64,
    /// Either side gave up.
    abort: AtomicBool,
}

/// What the waker thread wakes.
enum Target {
    Queue(Arc<CoQueue>),
    Ctx(AioContext),
    Raw(Arc<CrossThreadEventfd>),
    Mio(Arc<mio::Waker>),
    Tokio(Arc<tokio::sync::Notify>),
}

/// A waker that waits this long for the home thread gives up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn waker_thread(hs: &Handshake, total: u64, gap: Duration, target: Target) -> Result<()> {
    let res = wake_samples(hs, total, gap, target);
    if res.is_err() {
        // The home thread may be blocked waiting for a wake that will not
        // come; it checks this between waits.
        hs.abort.store(true, Ordering::Release);
    }
    res
}

fn wake_samples(hs: &Handshake, total: u64, gap: Duration, target: Target) -> Result<()> {
    for i in 1..=total {
        let give_up = Instant::now() + HANDSHAKE_TIMEOUT;
        while hs.ready.load(Ordering::Acquire) < i {
            if hs.abort.load(Ordering::Acquire) {
                return Ok(());
            }
            if Instant::now() > give_up {
                hs.abort.store(true, Ordering::Release);
                return Err(format!("wake sample {i}: the home thread never got ready").into());
            }
            thread::sleep(Duration::from_micros(10));
        }
        thread::sleep(gap);
        hs.fired.store(i, Ordering::Release);
        hs.t0.store(aio::monotonic_ns(), Ordering::SeqCst);
        match &target {
            Target::Queue(q) => {
                if !q.notify_one() {
                    hs.abort.store(true, Ordering::Release);
                    return Err(format!("wake sample {i}: the task was not waiting").into());
                }
            }
            Target::Ctx(ctx) => ctx.notify(),
            Target::Raw(raw) => raw.signal()?,
            Target::Mio(w) => w.wake()?,
            Target::Tokio(n) => n.notify_one(),
        }
    }
    Ok(())
}

/// The samples of a home thread that blocks in `wait` (one loop
/// iteration) until the waker has fired each sample.
fn blocking_samples(
    hs: &Handshake,
    total: u64,
    mut wait: impl FnMut() -> Result<()>,
) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(total as usize);
    for i in 1..=total {
        hs.ready.store(i, Ordering::Release);
        loop {
            wait()?;
            if hs.fired.load(Ordering::Acquire) >= i {
                break;
            }
            if hs.abort.load(Ordering::Acquire) {
                return Err("the waker gave up".into());
            }
        }
        let t1 = aio::monotonic_ns();
        out.push(t1 - hs.t0.load(Ordering::SeqCst));
    }
    Ok(out)
}

fn home_thread(
    lp: WakeLoop,
    hs: Arc<Handshake>,
    total: u64,
    tx: mpsc::Sender<Target>,
) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(total as usize);
    match lp {
        WakeLoop::AioTask => {
            let ctx = AioContext::new()?;
            let q = Arc::new(CoQueue::new());
            tx.send(Target::Queue(q.clone()))
                .map_err(|_| "waker thread gone")?;
            let h = ctx.spawn(async move {
                let mut out = Vec::with_capacity(total as usize);
                for i in 1..=total {
                    let w = q.wait();
                    hs.ready.store(i, Ordering::Release);
                    w.await;
                    let t1 = aio::monotonic_ns();
                    out.push(t1 - hs.t0.load(Ordering::SeqCst));
                }
                out
            });
            out = ctx.block_on(h)?;
        }
        WakeLoop::AioNotify => {
            let ctx = AioContext::new()?;
            tx.send(Target::Ctx(ctx.clone()))
                .map_err(|_| "waker thread gone")?;
            out = blocking_samples(&hs, total, || {
                ctx.poll(true);
                Ok(())
            })?;
        }
        WakeLoop::Mio => {
            const WAKER: mio::Token = mio::Token(0);
            let mut poll = mio::Poll::new()?;
            let mut events = mio::Events::with_capacity(8);
            // The home thread keeps a handle too: the waker thread drops
            // its own right after the last wake, and closing the eventfd
            // before epoll_wait collects the event would lose that wake.
            let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
            tx.send(Target::Mio(waker.clone()))
                .map_err(|_| "waker thread gone")?;
            // Bounded waits, so that a waker that gave up (abort) is noticed.
            out = blocking_samples(&hs, total, || {
                Ok(poll.poll(&mut events, Some(Duration::from_secs(1)))?)
            })?;
        }
        WakeLoop::TokioNotify => {
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            let n = Arc::new(tokio::sync::Notify::new());
            tx.send(Target::Tokio(n.clone()))
                .map_err(|_| "waker thread gone")?;
            out = rt.block_on(async move {
                let mut out = Vec::with_capacity(total as usize);
                for i in 1..=total {
                    let notified = n.notified();
                    hs.ready.store(i, Ordering::Release);
                    notified.await;
                    let t1 = aio::monotonic_ns();
                    out.push(t1 - hs.t0.load(Ordering::SeqCst));
                }
                out
            });
        }
        WakeLoop::RawEventfd => {
            let raw = Arc::new(CrossThreadEventfd::new()?);
            tx.send(Target::Raw(raw.clone()))
                .map_err(|_| "waker thread gone")?;
            for i in 1..=total {
                hs.ready.store(i, Ordering::Release);
                loop {
                    raw.wait()?;
                    if hs.fired.load(Ordering::Acquire) >= i {
                        break;
                    }
                    raw.clear()?; // spurious: never expected, but never spin
                }
                let t1 = aio::monotonic_ns();
                raw.clear()?;
                out.push(t1 - hs.t0.load(Ordering::SeqCst));
            }
        }
    }
    Ok(out)
}

/// Measures `cfg.samples` cross-thread wake latencies (ns from just
/// before the wake call on the waker thread to the moment the home thread
/// resumes), after `cfg.warmup` discarded ones.
///
/// Both threads are started for the run (so pinning never leaks into the
/// caller); the home thread creates its own context. Before each sample
/// the home thread announces it is about to wait, and the waker sleeps
/// `cfg.gap` before taking its timestamp and waking it.
///
/// # Errors
///
/// When setup fails, a wake finds nobody waiting, or a thread panics.
pub fn wake_latency(lp: WakeLoop, placement: Placement, cfg: WakeCfg) -> Result<Vec<i64>> {
    let total = (cfg.warmup + cfg.samples) as u64;
    let hs = Arc::new(Handshake::default());
    let (tx, rx) = mpsc::channel::<Target>();
    let cpus = placement.cpus();
    let home = {
        let hs = hs.clone();
        thread::Builder::new()
            .name("wake-home".into())
            .spawn(move || -> Result<Vec<i64>> {
                if let Some((_, cpu)) = cpus {
                    crate::sys::pin_current_thread(cpu)?;
                }
                let res = home_thread(lp, hs.clone(), total, tx);
                if res.is_err() {
                    hs.abort.store(true, Ordering::Release);
                }
                res
            })?
    };
    let waker = {
        let hs = hs.clone();
        thread::Builder::new()
            .name("wake-waker".into())
            .spawn(move || -> Result<()> {
                if let Some((cpu, _)) = cpus {
                    crate::sys::pin_current_thread(cpu)?;
                }
                let Ok(target) = rx.recv() else {
                    return Ok(()); // the home thread failed; it reports why
                };
                waker_thread(&hs, total, cfg.gap, target)
            })?
    };
    let home_res = home.join().map_err(|_| "the home thread panicked")?;
    let waker_res = waker.join().map_err(|_| "the waker thread panicked")?;
    waker_res?;
    let mut v = home_res?;
    v.drain(..cfg.warmup.min(v.len()));
    Ok(v)
}
