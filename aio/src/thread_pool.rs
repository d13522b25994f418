//! A pool of worker threads for blocking work, after QEMU's
//! `util/thread-pool.c`.
//!
//! [`ThreadPool::run`] queues a closure and returns a [`RunFuture`] that
//! completes, on whichever thread finishes the job, by waking the `Waker` it
//! was last polled with. The pool knows nothing about executors or
//! `AioContext`s: the caller's executor decides how a wake-up reaches its
//! loop (see docs/architecture.md, "Thread pool and file I/O").

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};

/// QEMU's default upper bound on worker threads (`thread-pool-max`).
const DEFAULT_MAX_WORKERS: usize = 64;
/// How long a worker waits for work before exiting (QEMU's 10 s).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for [`ThreadPool::new`].
///
/// ```
/// use std::time::Duration;
/// use aio::{PoolOptions, ThreadPool};
///
/// let pool = ThreadPool::new(
///     PoolOptions::new().max_workers(4).idle_timeout(Duration::from_secs(1)).name("disk0"),
/// );
/// assert_eq!(pool.name(), "disk0");
/// assert_eq!(pool.stats().live_workers, 0, "workers start on demand");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PoolOptions {
    /// The most worker threads alive at once (QEMU's default, 64). 0 is
    /// treated as 1.
    pub max_workers: usize,
    /// A worker that has had no work for this long exits (QEMU's 10 s).
    /// The pool keeps no minimum: an idle pool has no threads.
    pub idle_timeout: Duration,
    /// Names the pool in logs, errors and worker thread names
    /// (`{name}-worker-{n}`).
    pub name: String,
    /// How long a worker that has just finished a short job busy-waits for
    /// the next one before it sleeps. Zero (the default) never spins.
    ///
    /// Only a job that ran for less than this counts as short: such jobs
    /// (a read from the page cache) cost less than the two thread wake-ups
    /// around them, and a caller waiting on each one goes at the pace of
    /// those wake-ups. A worker whose job blocked on a device does not
    /// spin: the spin would only take CPU time from the thread preparing
    /// the next job (on a host where the vCPUs are hyperthreads, from the
    /// same core). Nor does one whose job ran alongside others, or while
    /// other workers are busy: with several jobs in flight the next request
    /// comes when one of them finishes, and spinning for it only slowed
    /// depth-32 tmpfs reads. At most one worker spins at a time, and a job
    /// queued while it spins is left to it, so neither side makes a futex
    /// call.
    pub spin: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_workers: DEFAULT_MAX_WORKERS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            name: "aio-pool".to_string(),
            spin: Duration::ZERO,
        }
    }
}

impl PoolOptions {
    /// The defaults: 64 workers, 10 s idle timeout, named `aio-pool`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the most worker threads alive at once.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }
    /// Sets how long an idle worker waits for work before exiting.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }
    /// Names the pool.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Sets how long a worker busy-waits for the next job after finishing
    /// one (see [`PoolOptions::spin`]).
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }
}

/// A snapshot of a pool's counters, taken under one lock.
///
/// At any snapshot, `submitted = completed + cancelled + queued + running`,
/// where `running = live_workers - idle_workers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Jobs queued by [`ThreadPool::run`].
    pub submitted: u64,
    /// Jobs finished: run to the end, panicked, or failed because no worker
    /// thread could be started.
    pub completed: u64,
    /// Jobs whose future was dropped before a worker took them; they never
    /// ran.
    pub cancelled: u64,
    /// Jobs that panicked (also counted in `completed`).
    pub panicked: u64,
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// Worker threads alive.
    pub live_workers: usize,
    /// Worker threads alive and not running a job (waiting for work, or
    /// just started).
    pub idle_workers: usize,
    /// Jobs taken by a worker that was spinning for them
    /// ([`PoolOptions::spin`]).
    pub spin_hits: u64,
}

/// A pool of worker threads that run blocking closures.
///
/// Workers are started on demand, when a job is queued and no idle worker
/// is left to take it, up to [`PoolOptions::max_workers`]; beyond that, jobs
/// wait in FIFO order. A worker idle for [`PoolOptions::idle_timeout`]
/// exits.
///
/// `ThreadPool` is a cheap handle (`Clone`, `Send`, `Sync`). When the last
/// handle is dropped, the workers finish every queued job (so futures
/// already returned still complete) and then exit; nothing blocks waiting
/// for them.
///
/// A job that panics does not take down its worker: the panic is caught and
/// its future completes with [`Error::JobPanicked`].
#[derive(Clone)]
pub struct ThreadPool {
    handle: Arc<Handle>,
}

/// The part of the pool only handles hold; dropping the last one closes the
/// pool.
struct Handle {
    shared: Arc<Shared>,
}

/// What workers and futures share.
struct Shared {
    name: String,
    max_workers: usize,
    idle_timeout: Duration,
    spin: Duration,
    state: Mutex<State>,
    /// `state.queue.len()`, stored under the lock, read by a spinning
    /// worker without it.
    queued: AtomicUsize,
    /// Signalled when a job is queued or the pool closes.
    work: Condvar,
}

struct State {
    /// Jobs not yet taken by a worker, by submission id (so FIFO, and a
    /// cancelled job is removed in O(log n)).
    queue: BTreeMap<u64, Arc<dyn Job>>,
    next_job: u64,
    next_worker: u64,
    live: usize,
    /// Live workers not running a job. A worker counts as idle from the
    /// moment it is spawned, so a burst of submissions starts one worker
    /// per job rather than one per burst.
    idle: usize,
    submitted: u64,
    completed: u64,
    cancelled: u64,
    panicked: u64,
    /// The last `ThreadPool` handle is gone.
    closed: bool,
    /// A worker is busy-waiting for work (it is also counted in `idle`).
    spinning: bool,
    /// Workers woken for queued jobs that have not yet come out of their
    /// wait (it may undercount, never overcount: an undercount only costs
    /// a spare wake-up).
    waking: usize,
    spin_hits: u64,
}

impl State {
    /// No worker is running a job.
    fn none_busy(&self) -> bool {
        self.live == self.idle
    }
}

impl Shared {
    /// Stores the queue's length for a spinning worker to read; called
    /// under the lock after every change to the queue.
    fn publish_queued(&self, st: &State) {
        self.queued.store(st.queue.len(), Ordering::Release);
    }

    /// Wakes one sleeping worker for the queue, unless a woken one is
    /// still on its way (it passes the wake-up on, see `worker`). Called
    /// under the lock, where parking_lot moves the waiter onto the mutex
    /// instead of waking it to block on it.
    fn wake_one(&self, st: &mut State) {
        if st.waking == 0 && self.work.notify_one() {
            st.waking += 1;
        }
    }
}

/// A queued closure with its result slot, type-erased.
///
/// A worker calls `call` and then `finish`, and bumps the pool's counters
/// in between, so a future that has completed is always in
/// [`PoolStats::completed`].
trait Job: Send + Sync {
    /// Runs the closure and keeps its result. Returns whether it panicked.
    fn call(&self, pool: &str) -> bool;
    /// Completes the future with the kept result (waking it).
    fn finish(&self);
    /// Completes the future with `err` without running the closure.
    fn abort(&self, err: Error);
    /// Drops the closure without running it (its future was dropped).
    fn discard(&self);
}

/// The result slot of a job, as its [`RunFuture`] sees it.
trait HasSlot<R>: Send + Sync {
    fn slot(&self) -> &Slot<R>;
}

/// A job: the closure, its result and the slot its future reads, in one
/// allocation shared by the queue (then the worker) and the future.
struct JobImpl<F, R> {
    f: Mutex<Option<F>>,
    out: Mutex<Option<Result<R>>>,
    slot: Slot<R>,
}

impl<F, R> HasSlot<R> for JobImpl<F, R>
where
    F: Send,
    R: Send,
{
    fn slot(&self) -> &Slot<R> {
        &self.slot
    }
}

impl<F, R> Job for JobImpl<F, R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    fn call(&self, pool: &str) -> bool {
        let Some(f) = self.f.lock().take() else {
            return false;
        };
        match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => {
                *self.out.lock() = Some(Ok(r));
                false
            }
            Err(payload) => {
                let message = panic_message(&*payload);
                // Dropping a payload can itself panic; that must not kill
                // the worker either.
                let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
                log::warn!("job on thread pool {pool:?} panicked: {message}");
                *self.out.lock() = Some(Err(Error::JobPanicked {
                    pool: pool.to_string(),
                    message,
                }));
                true
            }
        }
    }

    fn finish(&self) {
        let f = self.f.lock().take();
        drop(f);
        let out = self.out.lock().take();
        if let Some(out) = out {
            self.slot.complete(out);
        }
    }

    fn abort(&self, err: Error) {
        self.discard();
        self.slot.complete(Err(err));
    }

    fn discard(&self) {
        let f = self.f.lock().take();
        let out = self.out.lock().take();
        drop((f, out));
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Where a job's result meets its future.
struct Slot<R> {
    state: Mutex<SlotState<R>>,
}

enum SlotState<R> {
    /// Not finished; the waker of the last poll, if any.
    Waiting(Option<Waker>),
    /// Finished; the future has not taken the result yet.
    Done(Result<R>),
    /// The future returned the result.
    Consumed,
    /// The future was dropped; a result arriving now is discarded.
    Abandoned,
}

impl<R> Slot<R> {
    fn new() -> Self {
        Self {
            state: Mutex::new(SlotState::Waiting(None)),
        }
    }

    /// Stores the result and wakes the future. Nothing user-supplied (the
    /// waker, a discarded result) runs under the slot lock.
    fn complete(&self, res: Result<R>) {
        let mut st = self.state.lock();
        match &mut *st {
            SlotState::Waiting(waker) => {
                let waker = waker.take();
                *st = SlotState::Done(res);
                drop(st);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            SlotState::Abandoned | SlotState::Done(_) | SlotState::Consumed => {
                drop(st);
                drop(res);
            }
        }
    }
}

impl ThreadPool {
    /// Creates a pool. No thread starts until the first job is queued.
    pub fn new(opts: PoolOptions) -> Self {
        let shared = Arc::new(Shared {
            max_workers: opts.max_workers.max(1),
            idle_timeout: opts.idle_timeout,
            spin: opts.spin,
            name: opts.name,
            state: Mutex::new(State {
                queue: BTreeMap::new(),
                next_job: 0,
                next_worker: 0,
                live: 0,
                idle: 0,
                submitted: 0,
                completed: 0,
                cancelled: 0,
                panicked: 0,
                closed: false,
                spinning: false,
                spin_hits: 0,
                waking: 0,
            }),
            queued: AtomicUsize::new(0),
            work: Condvar::new(),
        });
        Self {
            handle: Arc::new(Handle { shared }),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.handle.shared.name
    }

    /// Queues `f` to run on a worker thread and returns a future of its
    /// result.
    ///
    /// The job is queued now, not at the first poll. The future completes
    /// by waking the waker it was last polled with, from the worker thread;
    /// it works with any executor. It resolves to
    /// [`Error::JobPanicked`] if `f` panics, or to [`Error::Io`] if no worker
    /// thread exists and none can be spawned.
    ///
    /// Dropping the future before a worker has taken the job cancels it: `f`
    /// never runs (it is dropped on the dropping thread) and
    /// [`PoolStats::cancelled`] counts it. Dropping it later lets `f` finish
    /// and discards the result.
    pub fn run<F, R>(&self, f: F) -> RunFuture<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let shared = &self.handle.shared;
        let job = Arc::new(JobImpl {
            f: Mutex::new(Some(f)),
            out: Mutex::new(None),
            slot: Slot::new(),
        });
        let slot: Arc<dyn HasSlot<R>> = job.clone();
        let (id, spawn) = {
            let mut st = shared.state.lock();
            let id = st.next_job;
            st.next_job += 1;
            st.queue.insert(id, job);
            shared.publish_queued(&st);
            st.submitted += 1;
            // A spinning worker takes the only queued job itself. Otherwise
            // one wake-up per burst: the submitter, often the busier
            // thread, makes one futex call per burst, not one per job.
            if !(st.spinning && st.queue.len() == 1) {
                shared.wake_one(&mut st);
            }
            // Every idle worker will take one queued job; start another only
            // if the queue outnumbers them.
            let spawn = if st.queue.len() > st.idle && st.live < shared.max_workers {
                st.live += 1;
                st.idle += 1;
                st.next_worker += 1;
                Some(st.next_worker)
            } else {
                None
            };
            (id, spawn)
        };
        if let Some(n) = spawn {
            spawn_worker(shared, n);
        }
        RunFuture {
            slot,
            shared: shared.clone(),
            id,
            finished: false,
        }
    }

    /// A snapshot of the counters, taken under one lock.
    pub fn stats(&self) -> PoolStats {
        let st = self.handle.shared.state.lock();
        PoolStats {
            submitted: st.submitted,
            completed: st.completed,
            cancelled: st.cancelled,
            panicked: st.panicked,
            queued: st.queue.len(),
            live_workers: st.live,
            idle_workers: st.idle,
            spin_hits: st.spin_hits,
        }
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.handle.shared;
        f.debug_struct("ThreadPool")
            .field("name", &shared.name)
            .field("max_workers", &shared.max_workers)
            .field("idle_timeout", &shared.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.work.notify_all();
    }
}

/// Starts worker `n`, already counted in `live` and `idle`.
fn spawn_worker(shared: &Arc<Shared>, n: u64) {
    let name = format!("{}-worker-{n}", shared.name);
    let worker_shared = shared.clone();
    let Err(e) = thread::Builder::new()
        .name(name.clone())
        .spawn(move || worker(&worker_shared))
    else {
        log::debug!("thread pool {:?}: started {name}", shared.name);
        return;
    };
    log::warn!("thread pool {:?}: cannot start {name}: {e}", shared.name);
    let orphans = {
        let mut st = shared.state.lock();
        st.live -= 1;
        st.idle -= 1;
        if st.live == 0 {
            // Nobody will ever run what is queued: fail it rather than let
            // the futures hang.
            let orphans = mem::take(&mut st.queue);
            shared.publish_queued(&st);
            st.completed += orphans.len() as u64;
            orphans
        } else {
            BTreeMap::new()
        }
    };
    for job in orphans.into_values() {
        job.abort(Error::Io {
            context: format!("starting a worker thread for pool {:?}", shared.name),
            source: io::Error::new(e.kind(), e.to_string()),
        });
    }
}

/// A worker's life: take jobs in FIFO order, wait up to the idle timeout
/// for more, exit on timeout or when the pool is closed and drained.
fn worker(shared: &Shared) {
    let mut st = shared.state.lock();
    // Whether the last pass round the loop ran a short job alone: only
    // then may the worker spin, so an idle pool sleeps.
    let mut short_job = false;
    // Invariant: at the top of the loop this worker is counted in `idle`.
    loop {
        if let Some((_, job)) = st.queue.pop_first() {
            shared.publish_queued(&st);
            // Alone: no other job waiting, no other worker running one.
            let alone = st.queue.is_empty() && st.none_busy();
            // More queued: pass the wake-up on, before this one's job, so
            // jobs in a burst start together.
            if !st.queue.is_empty() {
                shared.wake_one(&mut st);
            }
            st.idle -= 1;
            let start = (alone && !shared.spin.is_zero()).then(Instant::now);
            let panicked = MutexGuard::unlocked(&mut st, || job.call(&shared.name));
            short_job = start.is_some_and(|t| t.elapsed() < shared.spin);
            st.completed += 1;
            st.panicked += u64::from(panicked);
            // Idle again before waking the future, so that a caller who
            // submits the next job as soon as it is woken finds this worker
            // instead of starting another; the job waits the few
            // microseconds until the loop comes round.
            st.idle += 1;
            MutexGuard::unlocked(&mut st, || finish_job(job, &shared.name));
            continue;
        }
        if st.closed {
            log::debug!("thread pool {:?}: closed, worker exits", shared.name);
            break;
        }
        // Spin only when no other worker is busy, now or when the job was
        // taken: with several jobs in flight, one of them finishing brings
        // the next request, the sleepers are there to take it, and the
        // submitter, with a batch of completions to handle, needs the CPU
        // more.
        if mem::take(&mut short_job) && !st.spinning && st.none_busy() {
            st.spinning = true;
            let found = MutexGuard::unlocked(&mut st, || spin_for_work(shared));
            // Cleared under the lock: a job queued from here on wakes a
            // sleeper, and one queued before is seen at the top.
            st.spinning = false;
            st.spin_hits += u64::from(found && !st.queue.is_empty());
            continue;
        }
        let timed_out = shared
            .work
            .wait_for(&mut st, shared.idle_timeout)
            .timed_out();
        st.waking = st.waking.saturating_sub(1);
        if timed_out && st.queue.is_empty() && !st.closed {
            log::debug!("thread pool {:?}: idle worker exits", shared.name);
            break;
        }
    }
    st.idle -= 1;
    st.live -= 1;
}

/// Busy-waits up to `shared.spin` for a job to be queued; returns whether
/// one was.
fn spin_for_work(shared: &Shared) -> bool {
    let start = Instant::now();
    loop {
        if shared.queued.load(Ordering::Acquire) > 0 {
            return true;
        }
        if start.elapsed() >= shared.spin {
            return false;
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
    }
}

/// Completes a job's future with the pool lock released. This wakes the
/// future, which runs the executor's waker code: a panic there is the
/// executor's bug, but it must not kill the worker and leave the pool's
/// counts wrong.
fn finish_job(job: Arc<dyn Job>, pool: &str) {
    if panic::catch_unwind(AssertUnwindSafe(move || job.finish())).is_err() {
        log::error!("thread pool {pool:?}: completing a job's future panicked");
    }
}

/// The result of a job queued with [`ThreadPool::run`].
///
/// Executor-agnostic: completes by waking the waker of its last poll, from
/// the worker thread. Dropping it cancels the job if no worker has taken it
/// yet; see [`ThreadPool::run`]. Polling it again after it returned `Ready`
/// panics.
#[must_use = "dropping a RunFuture cancels its job if it has not started"]
pub struct RunFuture<R> {
    slot: Arc<dyn HasSlot<R>>,
    shared: Arc<Shared>,
    id: u64,
    finished: bool,
}

impl<R> Future for RunFuture<R> {
    type Output = Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let this = self.get_mut();
        let mut st = this.slot.slot().state.lock();
        match mem::replace(&mut *st, SlotState::Consumed) {
            SlotState::Done(res) => {
                drop(st);
                this.finished = true;
                Poll::Ready(res)
            }
            SlotState::Waiting(mut waker) => {
                match &mut waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => waker = Some(cx.waker().clone()),
                }
                *st = SlotState::Waiting(waker);
                Poll::Pending
            }
            SlotState::Consumed | SlotState::Abandoned => {
                drop(st);
                panic!("RunFuture polled after completion")
            }
        }
    }
}

impl<R> Drop for RunFuture<R> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let job = {
            let mut st = self.shared.state.lock();
            let job = st.queue.remove(&self.id);
            self.shared.publish_queued(&st);
            if job.is_some() {
                st.cancelled += 1;
            }
            job
        };
        // Drop the closure (user code) with no lock held.
        if let Some(job) = job {
            log::trace!(
                "thread pool {:?}: job {} cancelled",
                self.shared.name,
                self.id
            );
            job.discard();
            return;
        }
        // Running or finished: whatever result there is gets discarded.
        let old = mem::replace(&mut *self.slot.slot().state.lock(), SlotState::Abandoned);
        drop(old);
    }
}

impl<R> fmt::Debug for RunFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunFuture")
            .field("pool", &self.shared.name)
            .field("job", &self.id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<ThreadPool>();
        assert_send::<RunFuture<Vec<u8>>>();
    }

    #[test]
    fn panic_message_handles_str_string_and_other() {
        assert_eq!(panic_message(&"a"), "a");
        assert_eq!(panic_message(&"b".to_string()), "b");
        assert_eq!(panic_message(&3u32), "(non-string panic payload)");
    }
}
