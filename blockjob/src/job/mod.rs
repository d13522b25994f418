//! QEMU's job model: a registry of jobs, each an async state machine on an
//! `aio` context, with QEMU's states, transitions and verbs, nested pauses
//! with pause points, a rate limit on the context's clock, and events.
//!
//! A job type implements [`JobDriver`]: its `run` future does the work and
//! calls [`JobControl`] to report progress, honour pauses
//! ([`JobControl::pause_point`]), sleep or rate-limit
//! ([`JobControl::rate_limit`]) and notice cancellation. The registry
//! drives the lifecycle around it exactly as QEMU's `job.c` does:
//!
//! ```text
//! created → running ⇄ paused          (pause points)
//!           running → ready ⇄ standby  (mirror, active commit)
//!   … → waiting → pending → [BLOCK_JOB_COMPLETED] → concluded → null
//!   … → aborting → [BLOCK_JOB_CANCELLED | COMPLETED with error] → concluded → null
//! ```

pub mod ratelimit;
pub mod status;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use aio::{AioContext, ClockType, Sleep};
use parking_lot::Mutex;
use serde_json::{json, Value};

pub use ratelimit::RateLimit;
pub use status::{JobStatus, JobVerb};

use crate::error::{Error, Result};

/// A boxed `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The kind of job (QMP `JobType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobType {
    /// `block-commit`.
    Commit,
    /// `block-stream`.
    Stream,
    /// `blockdev-mirror`.
    Mirror,
    /// `blockdev-backup`.
    Backup,
    /// `blockdev-create`: not a block job (no `BLOCK_JOB_*` events, not in
    /// `query-block-jobs`).
    Create,
}

impl JobType {
    /// The QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
        }
    }

    /// Whether jobs of this type are block jobs (QEMU's `is_block_job`):
    /// they emit the `BLOCK_JOB_*` events and `query-block-jobs` lists them.
    pub fn is_block_job(self) -> bool {
        !matches!(self, JobType::Create)
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job type does. The registry runs the lifecycle around it.
pub trait JobDriver: Send + Sync + 'static {
    /// The job's type.
    fn job_type(&self) -> JobType;

    /// The work. Return `Ok` when done, an error to fail the job. Call
    /// [`JobControl::pause_point`] (or a sleep or rate limit, which include
    /// one) between requests, and stop early when
    /// [`JobControl::is_cancelled`].
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>>;

    /// A cancel was requested; returns whether it is a *force* cancel. The
    /// default makes every cancel a force cancel (QEMU's behaviour for jobs
    /// without a `cancel` callback); mirror makes a soft cancel of a READY
    /// job complete without pivoting.
    fn cancel(&self, force: bool, job: &JobControl) -> bool {
        let _ = (force, job);
        true
    }

    /// `complete` (only reached in READY/STANDBY, by the verb table).
    fn complete(&self, job: &JobControl) -> Result<()> {
        Err(Error::Job(format!(
            "The active block job '{}' cannot be completed",
            job.id()
        )))
    }

    /// First finalization step (graph changes of stream and commit); an
    /// error aborts the job. Async because it may write image metadata.
    fn prepare<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        let _ = job;
        Box::pin(async { Ok(()) })
    }
    /// Mirror jobs: QMP's `actively-synced` (see
    /// [`JobInfo::actively_synced`]); `None` for other jobs.
    fn actively_synced(&self) -> Option<bool> {
        None
    }
    /// The job succeeded: make its effect permanent.
    fn commit(&self) {}
    /// The job failed or was cancelled: undo.
    fn abort(&self) {}
    /// Release resources, after `commit` or `abort`.
    fn clean(&self) {}
}

/// I/O direction of a `BLOCK_JOB_ERROR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

/// What an error policy decided (`BLOCK_JOB_ERROR.action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorAction {
    /// Ignore and go on.
    Ignore,
    /// Fail the job.
    Report,
    /// Pause the job until resumed.
    Stop,
}

/// A job event, with QEMU's payload fields.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE`.
    StatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_COMPLETED` (success, failure with `error`, or a soft
    /// cancel that completed).
    Completed {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress reached.
        offset: u64,
        /// Speed limit in force.
        speed: u64,
        /// Why the job failed, if it did.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`.
    Cancelled {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress reached.
        offset: u64,
        /// Speed limit in force.
        speed: u64,
    },
    /// `BLOCK_JOB_READY`.
    Ready {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress reached.
        offset: u64,
        /// Speed limit in force.
        speed: u64,
    },
    /// `BLOCK_JOB_PENDING` (only with `auto-finalize: false`).
    Pending {
        /// Job type.
        job_type: JobType,
        /// Job id.
        id: String,
    },
    /// `BLOCK_JOB_ERROR`.
    Error {
        /// Job id.
        device: String,
        /// Read or write.
        operation: IoOperation,
        /// What the policy decided.
        action: ErrorAction,
    },
}

impl JobEvent {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::StatusChange { .. } => "JOB_STATUS_CHANGE",
            JobEvent::Completed { .. } => "BLOCK_JOB_COMPLETED",
            JobEvent::Cancelled { .. } => "BLOCK_JOB_CANCELLED",
            JobEvent::Ready { .. } => "BLOCK_JOB_READY",
            JobEvent::Pending { .. } => "BLOCK_JOB_PENDING",
            JobEvent::Error { .. } => "BLOCK_JOB_ERROR",
        }
    }

    /// The QMP `data` object.
    pub fn data(&self) -> Value {
        match self {
            JobEvent::StatusChange { id, status } => json!({"id": id, "status": status.as_str()}),
            JobEvent::Completed {
                job_type,
                device,
                len,
                offset,
                speed,
                error,
            } => {
                let mut v = json!({"type": job_type.as_str(), "device": device, "len": len,
                    "offset": offset, "speed": speed});
                if let Some(e) = error {
                    v["error"] = json!(e);
                }
                v
            }
            JobEvent::Cancelled {
                job_type,
                device,
                len,
                offset,
                speed,
            }
            | JobEvent::Ready {
                job_type,
                device,
                len,
                offset,
                speed,
            } => json!({"type": job_type.as_str(), "device": device, "len": len,
                "offset": offset, "speed": speed}),
            JobEvent::Pending { job_type, id } => json!({"type": job_type.as_str(), "id": id}),
            JobEvent::Error {
                device,
                operation,
                action,
            } => json!({
                "device": device,
                "operation": match operation { IoOperation::Read => "read", IoOperation::Write => "write" },
                "action": match action {
                    ErrorAction::Ignore => "ignore",
                    ErrorAction::Report => "report",
                    ErrorAction::Stop => "stop",
                },
            }),
        }
    }
}

/// A snapshot of a job, with the fields of QMP's `BlockJobInfo` and
/// `JobInfo`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct JobInfo {
    /// Job id (`device` in `BlockJobInfo`).
    pub id: String,
    /// Job type.
    pub job_type: JobType,
    /// Status.
    pub status: JobStatus,
    /// Progress reached (`offset`, `current-progress`).
    pub current: u64,
    /// Progress total (`len`, `total-progress`).
    pub total: u64,
    /// Running, not parked at a pause point or asleep.
    pub busy: bool,
    /// A pause is requested (`pause_count > 0`), by the user or a drain.
    pub paused: bool,
    /// Speed limit, bytes/s (0 = unlimited).
    pub speed: u64,
    /// READY or STANDBY.
    pub ready: bool,
    /// `auto-finalize`.
    pub auto_finalize: bool,
    /// `auto-dismiss`.
    pub auto_dismiss: bool,
    /// Why the job failed, once it has.
    pub error: Option<String>,
    /// Mirror only: whether guest writes reach the target before they
    /// complete (`copy-mode: write-blocking` and in sync), QMP's
    /// `actively-synced`.
    pub actively_synced: Option<bool>,
}

impl JobInfo {
    /// QMP `BlockJobInfo`.
    pub fn block_job_info(&self) -> Value {
        let mut v = json!({
            "type": self.job_type.as_str(), "device": self.id, "len": self.total,
            "offset": self.current, "busy": self.busy, "paused": self.paused,
            "speed": self.speed, "io-status": "ok", "ready": self.ready,
            "status": self.status.as_str(), "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        });
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        if let Some(a) = self.actively_synced {
            v["actively-synced"] = json!(a);
        }
        v
    }

    /// QMP `JobInfo`.
    pub fn job_info(&self) -> Value {
        let mut v = json!({
            "id": self.id, "type": self.job_type.as_str(), "status": self.status.as_str(),
            "current-progress": self.current, "total-progress": self.total,
        });
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        v
    }
}

/// Options of a new job.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct JobOptions {
    /// The job id (QMP `job-id`).
    pub id: String,
    /// Finalize without waiting for `job-finalize` (default true).
    pub auto_finalize: bool,
    /// Dismiss without waiting for `job-dismiss` (default true).
    pub auto_dismiss: bool,
    /// Initial speed limit, bytes/s (0 = unlimited).
    pub speed: u64,
}

impl JobOptions {
    /// Options for job `id` with QEMU's defaults.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
        }
    }
    /// Sets `auto-finalize`.
    pub fn auto_finalize(mut self, on: bool) -> Self {
        self.auto_finalize = on;
        self
    }
    /// Sets `auto-dismiss`.
    pub fn auto_dismiss(mut self, on: bool) -> Self {
        self.auto_dismiss = on;
        self
    }
    /// Sets the initial speed.
    pub fn speed(mut self, bytes_per_sec: u64) -> Self {
        self.speed = bytes_per_sec;
        self
    }
}

type Subscriber = Arc<dyn Fn(&JobEvent) + Send + Sync>;

struct RegistryInner {
    jobs: Mutex<BTreeMap<String, Arc<Shared>>>,
    /// Shared with every job, so a job's events still reach the
    /// subscribers after the registry handle is dropped.
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    clock: ClockType,
}

/// All jobs of a process (or an embedder's scope), their ids unique.
#[derive(Clone)]
pub struct JobRegistry {
    inner: Arc<RegistryInner>,
}

impl fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobRegistry")
            .field("jobs", &self.inner.jobs.lock().len())
            .finish()
    }
}

impl JobRegistry {
    /// A registry whose jobs sleep and rate-limit on `clock` of their
    /// context (`Realtime` normally; `Virtual` under qtest).
    pub fn new(clock: ClockType) -> Self {
        Self {
            inner: Arc::new(RegistryInner {
                jobs: Mutex::new(BTreeMap::new()),
                subscribers: Arc::new(Mutex::new(Vec::new())),
                clock,
            }),
        }
    }

    /// Calls `f` for every event, on the thread that produced it, in order
    /// per job. `f` must not block.
    pub fn subscribe(&self, f: impl Fn(&JobEvent) + Send + Sync + 'static) {
        self.inner.subscribers.lock().push(Arc::new(f));
    }

    /// Creates a job (status `created`, not started) that will run on `ctx`.
    ///
    /// # Errors
    ///
    /// QEMU's messages for a malformed or duplicate id.
    pub fn create(
        &self,
        ctx: &AioContext,
        opts: JobOptions,
        driver: Arc<dyn JobDriver>,
    ) -> Result<Job> {
        let id = opts.id.clone();
        if !id_well_formed(&id) {
            return Err(Error::Job(format!("Invalid job ID '{id}'")));
        }
        let mut limit = RateLimit::new();
        limit.set_speed(opts.speed);
        let shared = Arc::new(Shared {
            id: id.clone(),
            job_type: driver.job_type(),
            driver,
            ctx: ctx.clone(),
            registry: Arc::downgrade(&self.inner),
            subscribers: self.inner.subscribers.clone(),
            txn: Mutex::new(None),
            clock: self.inner.clock,
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 1,
                user_paused: false,
                busy: false,
                cancelled: false,
                force: false,
                speed: opts.speed,
                limit,
                current: 0,
                total: 0,
                error: None,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
                finalize_requested: false,
                should_complete: false,
                started: false,
                never_ran: false,
                kick: None,
                kicked: false,
                finished: Vec::new(),
            }),
        });
        {
            let mut jobs = self.inner.jobs.lock();
            if jobs.contains_key(&id) {
                return Err(Error::Job(format!("Job ID '{id}' already in use")));
            }
            jobs.insert(id, shared.clone());
        }
        let job = Job { shared };
        job.shared.transition(JobStatus::Created);
        Ok(job)
    }

    /// The job with this id.
    pub fn get(&self, id: &str) -> Option<Job> {
        self.inner
            .jobs
            .lock()
            .get(id)
            .map(|s| Job { shared: s.clone() })
    }

    /// Snapshots of every job, ordered by id.
    pub fn list(&self) -> Vec<JobInfo> {
        let jobs: Vec<Arc<Shared>> = self.inner.jobs.lock().values().cloned().collect();
        jobs.iter().map(|s| s.info()).collect()
    }
}

/// QEMU's `id_wellformed`: a letter first, then letters, digits, `-`, `.`
/// and `_`.
fn id_well_formed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

struct State {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    busy: bool,
    cancelled: bool,
    force: bool,
    speed: u64,
    limit: RateLimit,
    current: u64,
    total: u64,
    error: Option<String>,
    auto_finalize: bool,
    auto_dismiss: bool,
    finalize_requested: bool,
    should_complete: bool,
    started: bool,
    /// Dropped by [`Job::cancel_unstarted`]: concludes without a
    /// `BLOCK_JOB_CANCELLED` (QEMU emits none for a job that never ran).
    never_ran: bool,
    /// The job task's waker while it waits at a pause point, asleep, or in
    /// `pending` (QEMU's `job_enter`).
    kick: Option<Waker>,
    kicked: bool,
    /// `wait_finished` callers.
    finished: Vec<Waker>,
}

struct Shared {
    id: String,
    job_type: JobType,
    driver: Arc<dyn JobDriver>,
    ctx: AioContext,
    registry: Weak<RegistryInner>,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    clock: ClockType,
    state: Mutex<State>,
    /// The transaction group the job completes with, if any.
    txn: Mutex<Option<JobTxn>>,
}

/// Jobs that complete together (QMP `transaction` with `completion-mode:
/// grouped`, QEMU's `JobTxn`): a job that finishes its work waits in
/// `waiting` until every job of the group has; if one fails or is
/// cancelled, the others are cancelled, so all succeed or none does.
#[derive(Clone, Default)]
pub struct JobTxn(Arc<TxnInner>);

#[derive(Default)]
struct TxnInner {
    st: Mutex<TxnState>,
    changed: aio::CoQueue,
}

#[derive(Default)]
struct TxnState {
    /// Jobs in the group, and whether each has finished its work.
    jobs: Vec<(Weak<Shared>, bool)>,
    aborting: bool,
}

impl fmt::Debug for JobTxn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.0.st.lock();
        f.debug_struct("JobTxn")
            .field("jobs", &st.jobs.len())
            .field("aborting", &st.aborting)
            .finish()
    }
}

impl JobTxn {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `job` (before it starts) to the group.
    pub fn add(&self, job: &Job) {
        self.0
            .st
            .lock()
            .jobs
            .push((Arc::downgrade(&job.shared), false));
        *job.shared.txn.lock() = Some(self.clone());
    }

    /// `me` finished its work: waits until every job has (`Ok`) or the
    /// group aborts (`Err`).
    async fn wait_all(&self, me: &Arc<Shared>) -> Result<()> {
        {
            let mut st = self.0.st.lock();
            for (w, done) in st.jobs.iter_mut() {
                if w.upgrade().is_some_and(|s| Arc::ptr_eq(&s, me)) {
                    *done = true;
                }
            }
        }
        self.0.changed.notify_all();
        loop {
            let w = self.0.changed.wait();
            {
                let st = self.0.st.lock();
                if st.aborting {
                    return Err(Error::Cancelled);
                }
                if st.jobs.iter().all(|(_, done)| *done) {
                    return Ok(());
                }
            }
            w.await;
        }
    }

    /// `me` failed or was cancelled: the others are cancelled.
    fn abort(&self, me: &Arc<Shared>) {
        let others: Vec<Arc<Shared>> = {
            let mut st = self.0.st.lock();
            if st.aborting {
                Vec::new()
            } else {
                st.aborting = true;
                st.jobs
                    .iter()
                    .filter_map(|(w, _)| w.upgrade())
                    .filter(|s| !Arc::ptr_eq(s, me))
                    .collect()
            }
        };
        for o in others {
            let job = Job { shared: o };
            if job.info().status == JobStatus::Created {
                job.cancel_unstarted();
            } else if !matches!(
                job.info().status,
                JobStatus::Concluded | JobStatus::Null | JobStatus::Aborting
            ) {
                let _ = job.cancel(true);
            }
        }
        self.0.changed.notify_all();
    }
}

impl Shared {
    fn emit(&self, ev: JobEvent) {
        if !self.job_type.is_block_job() && !matches!(ev, JobEvent::StatusChange { .. }) {
            return;
        }
        let subs: Vec<Subscriber> = self.subscribers.lock().clone();
        for s in subs {
            s(&ev);
        }
    }

    /// Moves to `to` (a QEMU-legal transition) and emits
    /// `JOB_STATUS_CHANGE`; wakes `wait_finished` callers on conclusion.
    fn transition(&self, to: JobStatus) {
        let (from, finished) = {
            let mut st = self.state.lock();
            let from = st.status;
            if from == to {
                return;
            }
            if !from.can_transition_to(to) {
                log::error!("job {}: illegal transition {from} -> {to}", self.id);
                debug_assert!(false, "job {}: illegal transition {from} -> {to}", self.id);
            }
            st.status = to;
            let finished = if matches!(to, JobStatus::Concluded | JobStatus::Null) {
                std::mem::take(&mut st.finished)
            } else {
                Vec::new()
            };
            (from, finished)
        };
        log::debug!("job {}: {from} -> {to}", self.id);
        self.emit(JobEvent::StatusChange {
            id: self.id.clone(),
            status: to,
        });
        for w in finished {
            w.wake();
        }
        if to == JobStatus::Null {
            if let Some(reg) = self.registry.upgrade() {
                reg.jobs.lock().remove(&self.id);
            }
        }
    }

    /// Wakes the job task if it waits (QEMU's `job_enter`).
    fn kick(&self) {
        let w = {
            let mut st = self.state.lock();
            st.kicked = true;
            st.kick.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    fn info(&self) -> JobInfo {
        let st = self.state.lock();
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: st.status,
            current: st.current,
            total: st.total,
            busy: st.busy,
            paused: st.pause_count > 0,
            speed: st.speed,
            ready: matches!(st.status, JobStatus::Ready | JobStatus::Standby),
            auto_finalize: st.auto_finalize,
            auto_dismiss: st.auto_dismiss,
            error: st.error.clone(),
            actively_synced: self.driver.actively_synced(),
        }
    }

    fn check_verb(&self, verb: JobVerb) -> Result<()> {
        let status = self.state.lock().status;
        if verb.allowed_in(status) {
            Ok(())
        } else {
            Err(Error::Job(verb.refusal(&self.id, status)))
        }
    }

    fn progress(&self) -> (u64, u64, u64) {
        let st = self.state.lock();
        (st.total, st.current, st.speed)
    }
}

/// Waits until `cond` holds, parking the job's waker for [`Shared::kick`].
struct WaitKick<'a, F: Fn(&State) -> bool> {
    shared: &'a Shared,
    cond: F,
}

impl<F: Fn(&State) -> bool> Future for WaitKick<'_, F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.shared.state.lock();
        if (self.cond)(&st) {
            st.busy = true;
            return Poll::Ready(());
        }
        st.busy = false;
        st.kick = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Sleeps until a timer or a kick, whichever comes first.
struct SleepOrKick<'a> {
    shared: &'a Shared,
    sleep: Sleep,
}

impl Future for SleepOrKick<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Pin::new(&mut self.sleep).poll(cx).is_ready() {
            self.shared.state.lock().busy = true;
            return Poll::Ready(());
        }
        let mut st = self.shared.state.lock();
        if std::mem::take(&mut st.kicked) {
            st.busy = true;
            return Poll::Ready(());
        }
        st.busy = false;
        st.kick = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// What a [`JobDriver`] uses to cooperate with the job machinery.
pub struct JobControl {
    shared: Arc<Shared>,
}

impl fmt::Debug for JobControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobControl")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl JobControl {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The context the job runs on.
    pub fn context(&self) -> &AioContext {
        &self.shared.ctx
    }

    /// Whether a cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.shared.state.lock().cancelled
    }

    /// Whether a (soft or force) cancel was requested and is a force one.
    pub fn is_force_cancelled(&self) -> bool {
        let st = self.shared.state.lock();
        st.cancelled && st.force
    }

    /// Whether `complete` was requested (READY jobs).
    pub fn should_complete(&self) -> bool {
        self.shared.state.lock().should_complete
    }

    /// Sets the progress total (`len`).
    pub fn set_total(&self, total: u64) {
        self.shared.state.lock().total = total;
    }

    /// Adds to the progress total (a mirror that found more dirty data).
    pub fn add_total(&self, n: u64) {
        self.shared.state.lock().total += n;
    }

    /// Adds `n` to the progress reached (`offset`).
    pub fn add_progress(&self, n: u64) {
        self.shared.state.lock().current += n;
    }

    /// The progress reached and total.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.shared.state.lock();
        (st.current, st.total)
    }

    /// Moves RUNNING → READY and emits `BLOCK_JOB_READY` (after the status
    /// change, as QEMU does).
    pub fn set_ready(&self) {
        self.shared.transition(JobStatus::Ready);
        let (len, offset, speed) = self.shared.progress();
        self.shared.emit(JobEvent::Ready {
            job_type: self.shared.job_type,
            device: self.shared.id.clone(),
            len,
            offset,
            speed,
        });
    }

    /// Reports an I/O error's handling (`BLOCK_JOB_ERROR`); with
    /// [`ErrorAction::Stop`] the job is paused as if by the user and the
    /// next pause point waits for `resume`.
    pub fn report_error(&self, operation: IoOperation, action: ErrorAction) {
        self.shared.emit(JobEvent::Error {
            device: self.shared.id.clone(),
            operation,
            action,
        });
        if action == ErrorAction::Stop {
            let mut st = self.shared.state.lock();
            if !st.user_paused {
                st.user_paused = true;
                st.pause_count += 1;
            }
        }
    }

    /// A pause point: if a pause is requested (and no cancel), parks the job
    /// in PAUSED (or STANDBY if READY) until every pause is lifted.
    pub async fn pause_point(&self) {
        let sh = &*self.shared;
        let resume_to = {
            let st = sh.state.lock();
            if st.pause_count == 0 || st.cancelled {
                return;
            }
            st.status
        };
        let parked = match resume_to {
            JobStatus::Ready => JobStatus::Standby,
            JobStatus::Running => JobStatus::Paused,
            _ => return,
        };
        sh.transition(parked);
        WaitKick {
            shared: sh,
            cond: |st: &State| st.pause_count == 0 || st.cancelled,
        }
        .await;
        sh.transition(resume_to);
    }

    /// Sleeps `ns` on the job's clock (returning early on cancel, a speed
    /// change or a resume), then runs a pause point. QEMU's `job_sleep_ns`.
    pub async fn sleep_ns(&self, ns: i64) {
        if !self.is_cancelled() {
            self.shared.state.lock().kicked = false;
            let sleep = self.shared.ctx.sleep_ns(self.shared.clock, ns);
            SleepOrKick {
                shared: &self.shared,
                sleep,
            }
            .await;
        }
        self.pause_point().await;
    }

    /// Whether a pause is requested (and no cancel): a job with I/O in
    /// flight settles it before its pause point, so a paused job has none.
    pub fn pause_requested(&self) -> bool {
        let st = self.shared.state.lock();
        st.pause_count > 0 && !st.cancelled
    }

    /// Accounts `bytes` about to be copied against the speed limit without
    /// sleeping; true when the job must sleep (with
    /// [`rate_limit(0)`](Self::rate_limit)) before it copies more. Jobs
    /// with several requests in flight account each at issue, and settle
    /// them before sleeping.
    pub fn over_limit(&self, bytes: u64) -> bool {
        let now = self.shared.ctx.clock_now(self.shared.clock);
        let mut st = self.shared.state.lock();
        st.limit.calculate_delay(now, bytes) > 0
    }

    /// Accounts `bytes` done against the speed limit and sleeps as long as
    /// the limit demands, re-checking after early wake-ups until the delay
    /// is zero (QEMU's 2022 fix) or the job is cancelled. Always ends with a
    /// pause point, so even an unthrottled job yields once per call.
    pub async fn rate_limit(&self, bytes: u64) {
        let clock = self.shared.clock;
        let mut n = bytes;
        loop {
            let delay = {
                let now = self.shared.ctx.clock_now(clock);
                let mut st = self.shared.state.lock();
                st.limit.calculate_delay(now, std::mem::take(&mut n))
            };
            if delay == 0 || self.is_cancelled() {
                break;
            }
            self.sleep_ns(delay).await;
        }
        aio::yield_now().await;
        self.pause_point().await;
    }
}

/// A handle to a job.
#[derive(Clone)]
pub struct Job {
    shared: Arc<Shared>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.shared.id)
            .field("status", &self.status())
            .finish()
    }
}

impl Job {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.shared.state.lock().status
    }

    /// A snapshot for `query-block-jobs` / `query-jobs`.
    pub fn info(&self) -> JobInfo {
        self.shared.info()
    }

    /// Starts the job on its context (CREATED → RUNNING). A job paused
    /// before it started waits at its first pause point.
    pub fn start(&self) {
        {
            let mut st = self.shared.state.lock();
            if st.started {
                return;
            }
            st.started = true;
            st.busy = true;
            st.pause_count = st.pause_count.saturating_sub(1);
        }
        self.shared.transition(JobStatus::Running);
        let shared = self.shared.clone();
        // Detached: the lifecycle reports through status and events.
        self.shared
            .ctx
            .spawn(async move {
                let ctl = JobControl { shared };
                ctl.pause_point().await;
                let ret = if ctl.is_cancelled() {
                    Err(Error::Cancelled)
                } else {
                    let driver = ctl.shared.driver.clone();
                    driver.run(&ctl).await
                };
                finish(&ctl, ret).await;
            })
            .detach();
    }

    /// Drops a job that was created but never started (a `transaction`
    /// failing after it was prepared): CREATED → ABORTING → CONCLUDED (→
    /// NULL with auto-dismiss) and no `BLOCK_JOB_CANCELLED`, as QEMU's
    /// cancel of a job that has not started. A started job is
    /// force-cancelled instead.
    pub fn cancel_unstarted(&self) {
        {
            let mut st = self.shared.state.lock();
            if !st.started {
                st.started = true;
                st.cancelled = true;
                st.force = true;
                st.never_ran = true;
            } else {
                drop(st);
                if let Err(e) = self.cancel(true) {
                    log::warn!("job '{}': {e}", self.shared.id);
                }
                return;
            }
        }
        let shared = self.shared.clone();
        self.shared
            .ctx
            .spawn(async move {
                let ctl = JobControl { shared };
                finish(&ctl, Err(Error::Cancelled)).await;
            })
            .detach();
    }

    /// `cancel` verb. `force` abandons at once; a soft cancel lets the
    /// driver decide (mirror in READY completes without pivoting).
    pub fn cancel(&self, force: bool) -> Result<()> {
        self.shared.check_verb(JobVerb::Cancel)?;
        let ctl = JobControl {
            shared: self.shared.clone(),
        };
        let effective = self.shared.driver.cancel(force, &ctl);
        {
            let mut st = self.shared.state.lock();
            st.cancelled = true;
            st.force |= effective;
            if st.user_paused {
                st.user_paused = false;
                st.pause_count = st.pause_count.saturating_sub(1);
            }
        }
        self.shared.kick();
        Ok(())
    }

    /// `pause` verb (one level of the pause nest).
    pub fn pause(&self) -> Result<()> {
        self.shared.check_verb(JobVerb::Pause)?;
        {
            let mut st = self.shared.state.lock();
            if st.user_paused {
                return Err(Error::Job("The block job is already paused".into()));
            }
            st.user_paused = true;
            st.pause_count += 1;
        }
        self.shared.kick();
        Ok(())
    }

    /// `resume` verb.
    pub fn resume(&self) -> Result<()> {
        {
            let st = self.shared.state.lock();
            if !st.user_paused || st.pause_count == 0 {
                return Err(Error::Job("Can't resume a job that was not paused".into()));
            }
        }
        self.shared.check_verb(JobVerb::Resume)?;
        {
            let mut st = self.shared.state.lock();
            st.user_paused = false;
            st.pause_count -= 1;
        }
        self.shared.kick();
        Ok(())
    }

    /// An internal pause (a drained section): nests with user pauses and is
    /// reported as `paused: true`, but emits no verb errors.
    pub fn pause_internal(&self) {
        self.shared.state.lock().pause_count += 1;
        self.shared.kick();
    }

    /// Ends an internal pause.
    pub fn resume_internal(&self) {
        {
            let mut st = self.shared.state.lock();
            st.pause_count = st.pause_count.saturating_sub(1);
        }
        self.shared.kick();
    }

    /// `set-speed` verb, bytes/s (0 = unlimited).
    pub fn set_speed(&self, bytes_per_sec: u64) -> Result<()> {
        self.shared.check_verb(JobVerb::SetSpeed)?;
        let faster = {
            let mut st = self.shared.state.lock();
            let faster = bytes_per_sec == 0 || bytes_per_sec > st.speed;
            st.speed = bytes_per_sec;
            st.limit.set_speed(bytes_per_sec);
            faster
        };
        if faster {
            self.shared.kick();
        }
        Ok(())
    }

    /// `complete` verb (READY mirror / active commit).
    pub fn complete(&self) -> Result<()> {
        self.shared.check_verb(JobVerb::Complete)?;
        let ctl = JobControl {
            shared: self.shared.clone(),
        };
        self.shared.driver.complete(&ctl)?;
        self.shared.state.lock().should_complete = true;
        self.shared.kick();
        Ok(())
    }

    /// `finalize` verb (PENDING jobs with `auto-finalize: false`).
    pub fn finalize(&self) -> Result<()> {
        self.shared.check_verb(JobVerb::Finalize)?;
        self.shared.state.lock().finalize_requested = true;
        self.shared.kick();
        Ok(())
    }

    /// `dismiss` verb (CONCLUDED jobs with `auto-dismiss: false`).
    pub fn dismiss(&self) -> Result<()> {
        self.shared.check_verb(JobVerb::Dismiss)?;
        self.shared.transition(JobStatus::Null);
        Ok(())
    }

    /// Waits until the job is concluded (or gone).
    pub fn wait_finished(&self) -> impl Future<Output = JobInfo> + Send + 'static {
        let shared = self.shared.clone();
        std::future::poll_fn(move |cx| {
            let mut st = shared.state.lock();
            if matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
                drop(st);
                return Poll::Ready(shared.info());
            }
            st.finished.push(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// The end of a job's life, after `run` returned (QEMU's `job_exit` /
/// `job_completed` / `job_finalize_single`).
async fn finish(ctl: &JobControl, ret: Result<()>) {
    let sh = &*ctl.shared;
    let ret = {
        let st = sh.state.lock();
        match ret {
            Ok(()) if st.cancelled && st.force => Err(Error::Cancelled),
            r => r,
        }
    };
    let txn = sh.txn.lock().clone();
    let ret = match (ret, &txn) {
        (Ok(()), Some(t)) => {
            sh.transition(JobStatus::Waiting);
            t.wait_all(&ctl.shared).await
        }
        (r, _) => r,
    };
    if let (Err(_), Some(t)) = (&ret, &txn) {
        t.abort(&ctl.shared);
    }
    let ret = match ret {
        Ok(()) => {
            sh.transition(JobStatus::Waiting);
            sh.transition(JobStatus::Pending);
            let manual = !sh.state.lock().auto_finalize;
            if manual {
                sh.emit(JobEvent::Pending {
                    job_type: sh.job_type,
                    id: sh.id.clone(),
                });
                WaitKick {
                    shared: sh,
                    cond: |st: &State| st.finalize_requested || st.cancelled,
                }
                .await;
            }
            if sh.state.lock().cancelled && manual {
                Err(Error::Cancelled)
            } else {
                sh.driver.prepare(ctl).await
            }
        }
        Err(e) => Err(e),
    };
    let (len, offset, speed) = sh.progress();
    match ret {
        Ok(()) => {
            sh.driver.commit();
            sh.driver.clean();
            sh.emit(JobEvent::Completed {
                job_type: sh.job_type,
                device: sh.id.clone(),
                len,
                offset,
                speed,
                error: None,
            });
        }
        Err(e) => {
            sh.transition(JobStatus::Aborting);
            sh.driver.abort();
            sh.driver.clean();
            let cancelled = matches!(e, Error::Cancelled);
            let never_ran = sh.state.lock().never_ran;
            if never_ran {
                // Nothing to report: the job never ran.
            } else if cancelled {
                sh.emit(JobEvent::Cancelled {
                    job_type: sh.job_type,
                    device: sh.id.clone(),
                    len,
                    offset,
                    speed,
                });
            } else {
                let msg = e.to_string();
                sh.state.lock().error = Some(msg.clone());
                sh.emit(JobEvent::Completed {
                    job_type: sh.job_type,
                    device: sh.id.clone(),
                    len,
                    offset,
                    speed,
                    error: Some(msg),
                });
            }
            if cancelled {
                sh.state.lock().error = Some("operation cancelled".into());
            }
        }
    }
    sh.transition(JobStatus::Concluded);
    {
        let mut st = sh.state.lock();
        st.busy = false;
        if !st.auto_dismiss {
            return;
        }
    }
    sh.transition(JobStatus::Null);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_follow_qemu_rules() {
        assert!(id_well_formed("job0"));
        assert!(id_well_formed("a-b.c_d"));
        assert!(!id_well_formed(""));
        assert!(!id_well_formed("0job"));
        assert!(!id_well_formed("job 0"));
    }

    #[test]
    fn event_payloads_have_qemu_fields() {
        let ev = JobEvent::Completed {
            job_type: JobType::Stream,
            device: "s0".into(),
            len: 10,
            offset: 10,
            speed: 0,
            error: None,
        };
        assert_eq!(ev.name(), "BLOCK_JOB_COMPLETED");
        assert_eq!(
            ev.data(),
            json!({"type": "stream", "device": "s0", "len": 10, "offset": 10, "speed": 0})
        );
        let st = JobEvent::StatusChange {
            id: "s0".into(),
            status: JobStatus::Pending,
        };
        assert_eq!(st.data(), json!({"id": "s0", "status": "pending"}));
    }
}
