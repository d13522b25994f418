//! Futures on a context: QEMU's coroutines as compiler-built state machines.
//!
//! A task is a boxed future owned by the context it runs on. It is polled
//! only by that context's home thread, from a bottom half (the *runner*),
//! never from the thread that wakes it. A wake from any thread moves the task
//! onto its context's run queue and schedules the runner, which notifies the
//! home thread (free when it is not blocked). Tasks run in wake order.
//!
//! Task states, one atomic byte:
//!
//! ```text
//!   IDLE --wake--> SCHEDULED --runner--> RUNNING --Pending--> IDLE
//!                      ^                    |  \--Ready/abort--> DONE
//!                      |                  wake
//!                      |                    v
//!                      +---Pending------ NOTIFIED
//! ```
//!
//! A task woken while it runs (e.g. by `yield_now`) is queued again when its
//! poll returns, so it runs on the next iteration and a nested poll never
//! re-enters it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use slab::Slab;

use crate::bh::{Bh, BhInner};
use crate::clock::ClockType;
use crate::context::Inner;
use crate::error::{Error, Result};
use crate::timer::Timer;
use crate::AioContext;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

const IDLE: u8 = 0;
const SCHEDULED: u8 = 1;
const RUNNING: u8 = 2;
const NOTIFIED: u8 = 3;
const DONE: u8 = 4;

/// Per-context executor state.
pub(crate) struct Executor {
    queue: Mutex<VecDeque<Arc<Task>>>,
    /// An empty queue with capacity, swapped with `queue` by each run of
    /// the runner, so that queueing a task does not allocate.
    spare: Mutex<VecDeque<Arc<Task>>>,
    runner: Bh,
    /// Set by the home thread while it wakes tasks that it runs itself
    /// before it next polls (the io_uring engine's completions, see
    /// [`crate::uring_file`]): their wake-ups schedule the runner without
    /// notifying, so no notification is left over to make that next poll's
    /// wait return at once. Wake-ups from other threads still notify.
    quiet_wakes: AtomicBool,
    /// Every live task, so that dropping the context drops their futures.
    live: Mutex<Slab<Arc<Task>>>,
}

impl Executor {
    pub(crate) fn new(ctx: Weak<Inner>) -> Self {
        let runner = Bh::from_inner(BhInner::new(
            ctx,
            Box::new(|ctx: &AioContext| ctx.run_tasks()),
            false,
        ));
        Self {
            queue: Mutex::new(VecDeque::new()),
            spare: Mutex::new(VecDeque::new()),
            runner,
            quiet_wakes: AtomicBool::new(false),
            live: Mutex::new(Slab::new()),
        }
    }

    /// Queues `task` of the context whose home thread is `home`.
    fn push(&self, task: Arc<Task>, home: u64) {
        self.queue.lock().push_back(task);
        if self.quiet_wakes.load(Ordering::Relaxed) && home == crate::context::thread_id() {
            self.runner.schedule_quiet();
        } else {
            self.runner.schedule();
        }
    }

    /// Runs `f` (home thread only), in which waking this context's tasks
    /// does not notify the context (see `quiet_wakes`). The caller runs
    /// the woken tasks, or polls, before the home thread next blocks.
    pub(crate) fn waking_quietly<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Clears the flag however `f` ends.
        struct Reset<'a>(&'a AtomicBool);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.quiet_wakes.store(true, Ordering::Relaxed);
        let _reset = Reset(&self.quiet_wakes);
        f()
    }

    /// Drops every task's future (the context is going away, or the
    /// embedder asked). Futures are dropped outside every lock.
    pub(crate) fn drop_all(&self) {
        let tasks: Vec<Arc<Task>> = self.live.lock().drain().collect();
        self.queue.lock().clear();
        for t in tasks {
            t.state.store(DONE, Ordering::Release);
            let fut = t.future.lock().take();
            drop(fut);
        }
    }

    pub(crate) fn live_count(&self) -> usize {
        self.live.lock().len()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.drop_all();
    }
}

pub(crate) struct Task {
    state: AtomicU8,
    aborted: AtomicBool,
    future: Mutex<Option<BoxFuture>>,
    /// The context the task runs on; `switch_to` changes it.
    ctx: Mutex<Weak<Inner>>,
    /// Key in the context's `live` slab.
    key: AtomicUsize,
}

impl Task {
    fn wake_task(self: &Arc<Self>) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let next = match s {
                IDLE => SCHEDULED,
                RUNNING => NOTIFIED,
                _ => return, // already queued, already noted, or done
            };
            match self
                .state
                .compare_exchange_weak(s, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if next == SCHEDULED {
                        self.enqueue();
                    }
                    return;
                }
                Err(actual) => s = actual,
            }
        }
    }

    /// Puts a SCHEDULED task on its context's run queue; if the context is
    /// gone, the task is finished off instead (never polled again).
    fn enqueue(self: &Arc<Self>) {
        let ctx = self.ctx.lock().upgrade();
        match ctx {
            Some(inner) => inner.executor.push(self.clone(), inner.home),
            None => {
                self.state.store(DONE, Ordering::Release);
                let fut = self.future.lock().take();
                drop(fut);
            }
        }
    }

    /// Polls the task once on `ctx` (the runner, on the home thread).
    fn run(self: Arc<Self>, ctx: &AioContext) {
        if self
            .state
            .compare_exchange(SCHEDULED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let Some(mut fut) = self.future.lock().take() else {
            self.state.store(DONE, Ordering::Release);
            return;
        };
        if self.aborted.load(Ordering::Acquire) {
            self.finish(ctx, fut);
            return;
        }
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        let res = with_current(ctx, Some(self.clone()), || fut.as_mut().poll(&mut cx));
        match res {
            Poll::Ready(()) => self.finish(ctx, fut),
            Poll::Pending => {
                *self.future.lock() = Some(fut);
                if self
                    .state
                    .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // Woken while running: run again on the next iteration.
                    self.state.store(SCHEDULED, Ordering::Release);
                    self.enqueue();
                }
            }
        }
    }

    fn finish(&self, ctx: &AioContext, fut: BoxFuture) {
        self.state.store(DONE, Ordering::Release);
        let key = self.key.load(Ordering::Acquire);
        let removed = {
            let mut live = ctx.inner().executor.live.lock();
            match live.get(key) {
                Some(t) if std::ptr::eq(Arc::as_ptr(t), self) => Some(live.remove(key)),
                _ => None,
            }
        };
        drop(fut);
        drop(removed);
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_task();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_task();
    }
}

struct Current {
    ctx: AioContext,
    task: Option<Arc<Task>>,
}

thread_local! {
    static CURRENT: RefCell<Vec<Current>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `ctx` (and `task`) as the thread's current context.
fn with_current<R>(ctx: &AioContext, task: Option<Arc<Task>>, f: impl FnOnce() -> R) -> R {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            CURRENT.with(|c| c.borrow_mut().pop());
        }
    }
    CURRENT.with(|c| {
        c.borrow_mut().push(Current {
            ctx: ctx.clone(),
            task,
        })
    });
    let _pop = Pop;
    f()
}

fn current_task() -> Option<Arc<Task>> {
    CURRENT.with(|c| c.borrow().last().and_then(|c| c.task.clone()))
}

/// Shared between a task's wrapper future and its [`JoinHandle`].
struct JoinState<T> {
    inner: Mutex<JoinInner<T>>,
}

struct JoinInner<T> {
    result: Option<Result<T>>,
    finished: bool,
    waker: Option<Waker>,
}

impl<T> JoinState<T> {
    fn complete(&self, r: Result<T>) {
        let waker = {
            let mut g = self.inner.lock();
            if g.finished {
                return;
            }
            g.finished = true;
            g.result = Some(r);
            g.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Completes the join state with "cancelled" if the task's future is dropped
/// before it finished (aborted, or its context went away).
struct CompletionGuard<T>(Arc<JoinState<T>>);

impl<T> Drop for CompletionGuard<T> {
    fn drop(&mut self) {
        self.0.complete(Err(Error::TaskCancelled));
    }
}

/// Polls an inner future, turning a panic into an error result.
struct CatchUnwind<F: Future> {
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::result::Result<F::Output, String>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.fut.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".to_string());
                Poll::Ready(Err(msg))
            }
        }
    }
}

/// A handle to a spawned task: await it for the task's output.
///
/// Dropping the handle detaches the task (it keeps running). The output is
/// an error if the task panicked ([`Error::TaskPanicked`]) or was dropped
/// before finishing ([`Error::TaskCancelled`]: aborted, or its context was
/// dropped).
pub struct JoinHandle<T> {
    state: Arc<JoinState<T>>,
    task: Weak<Task>,
}

impl<T> JoinHandle<T> {
    /// Lets the task run on without anyone awaiting its output (the same as
    /// dropping the handle, said explicitly).
    pub fn detach(self) {}

    /// Whether the task has finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.state.inner.lock().finished
    }

    /// Asks the task to stop: its future is dropped on its context before
    /// its next poll (never while it runs). Awaiting the handle then gives
    /// [`Error::TaskCancelled`], unless the task had already finished.
    pub fn abort(&self) {
        if let Some(task) = self.task.upgrade() {
            task.aborted.store(true, Ordering::Release);
            task.wake_task();
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut g = self.state.inner.lock();
        if let Some(r) = g.result.take() {
            return Poll::Ready(r);
        }
        if g.finished {
            // The result was already taken by an earlier poll.
            return Poll::Ready(Err(Error::TaskCancelled));
        }
        g.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// Wakes a `block_on` loop: sets a flag and notifies the context.
struct BlockOnWaker {
    woken: AtomicBool,
    ctx: Weak<Inner>,
}

impl Wake for BlockOnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(inner) = self.ctx.upgrade() {
            crate::context::notify_inner(&inner);
        }
    }
}

impl AioContext {
    /// Spawns `fut` as a task on this context. Callable from any thread; the
    /// task is first polled on the home thread's next iteration.
    ///
    /// ```
    /// let ctx = aio::AioContext::new()?;
    /// let h = ctx.spawn(async { 6 * 7 });
    /// assert_eq!(ctx.block_on(h)?, 42);
    /// # Ok::<(), aio::Error>(())
    /// ```
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let state = Arc::new(JoinState {
            inner: Mutex::new(JoinInner {
                result: None,
                finished: false,
                waker: None,
            }),
        });
        let guard = CompletionGuard(state.clone());
        let wrapped = async move {
            let out = CatchUnwind { fut: Box::pin(fut) }.await;
            guard
                .0
                .complete(out.map_err(|message| Error::TaskPanicked { message }));
        };
        let task = Arc::new(Task {
            state: AtomicU8::new(SCHEDULED),
            aborted: AtomicBool::new(false),
            future: Mutex::new(Some(Box::pin(wrapped))),
            ctx: Mutex::new(Arc::downgrade(self.inner())),
            key: AtomicUsize::new(usize::MAX),
        });
        let exec = &self.inner().executor;
        {
            let mut live = exec.live.lock();
            let key = live.insert(task.clone());
            task.key.store(key, Ordering::Release);
        }
        let weak = Arc::downgrade(&task);
        exec.push(task, self.inner().home);
        JoinHandle { state, task: weak }
    }

    /// Runs `fut` to completion on the calling thread, which must be the
    /// home thread, running the loop (`poll(true)`) while the future waits.
    ///
    /// Like QEMU's synchronous wrappers around coroutines, it may be called
    /// from inside a callback or a task (a nested poll). The future need not
    /// be `Send` or `'static`. It never spins: between polls of the future
    /// the thread sleeps in the loop until something wakes it.
    ///
    /// # Panics
    ///
    /// Off the home thread, like [`poll`](AioContext::poll).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let flag = Arc::new(BlockOnWaker {
            woken: AtomicBool::new(true),
            ctx: Arc::downgrade(self.inner()),
        });
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            if flag.woken.swap(false, Ordering::AcqRel) {
                let task = current_task();
                if let Poll::Ready(v) = with_current(self, task, || fut.as_mut().poll(&mut cx)) {
                    return v;
                }
                // Woken during its own poll (`yield_now`): let the loop
                // run once, without sleeping, before polling it again, so
                // the tasks and bottom halves queued meanwhile get to run.
                if flag.woken.load(Ordering::Acquire) {
                    self.poll(false);
                }
                continue;
            }
            self.poll(true);
        }
    }

    /// The context of the task or `block_on` running on this thread, if any.
    pub fn current() -> Option<AioContext> {
        CURRENT.with(|c| c.borrow().last().map(|c| c.ctx.clone()))
    }

    /// The number of tasks spawned on this context that have not finished.
    pub fn task_count(&self) -> usize {
        self.inner().executor.live_count()
    }

    /// Drops the futures of every task on this context without polling them
    /// again; their handles report [`Error::TaskCancelled`]. For tearing a
    /// context down when tasks may hold handles to it.
    pub fn cancel_tasks(&self) {
        self.inner().executor.drop_all();
    }

    /// A future that completes after `ns` nanoseconds on `clock` of this
    /// context. On the virtual clock it completes only when the clock is
    /// stepped past the deadline.
    pub fn sleep_ns(&self, clock: ClockType, ns: i64) -> Sleep {
        Sleep::new(Some(self.clone()), clock, Deadline::In(ns))
    }

    /// Runs the queued tasks now, from the outermost poll right after its
    /// fd handlers ran (for the io_uring engine's completions), instead of
    /// one loop iteration later from the runner bottom half. The runner's
    /// scheduled run is cancelled first, before the queue is taken, so a
    /// task queued by another thread meanwhile either runs here or
    /// reschedules the runner.
    pub(crate) fn run_tasks_now(&self) {
        self.inner().executor.runner.cancel();
        self.run_tasks();
    }

    /// Runs the queued tasks (the runner bottom half). Tasks woken while
    /// these run are queued for the next iteration.
    pub(crate) fn run_tasks(&self) {
        let exec = &self.inner().executor;
        // A nested run (a task polling the context) finds no spare and
        // starts from an empty queue; the outer run puts its own back.
        let mut batch = std::mem::take(&mut *exec.spare.lock());
        std::mem::swap(&mut batch, &mut *exec.queue.lock());
        while let Some(task) = batch.pop_front() {
            task.run(self);
        }
        *exec.spare.lock() = batch;
    }
}

/// Yields to the loop once: the task is queued again behind every task and
/// bottom half already scheduled, and continues on the next iteration.
pub fn yield_now() -> YieldNow {
    YieldNow { yielded: false }
}

/// The future returned by [`yield_now`].
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Sleeps `ns` nanoseconds on `clock` of the current context (the one
/// running the task).
///
/// # Panics
///
/// When first polled outside a task or `block_on` of some context; use
/// [`AioContext::sleep_ns`] there.
pub fn sleep_ns(clock: ClockType, ns: i64) -> Sleep {
    Sleep::new(None, clock, Deadline::In(ns))
}

/// Sleeps until the absolute time `deadline_ns` on `clock` of the current
/// context. Same rules as [`sleep_ns`].
pub fn sleep_until(clock: ClockType, deadline_ns: i64) -> Sleep {
    Sleep::new(None, clock, Deadline::At(deadline_ns))
}

#[derive(Clone, Copy, Debug)]
enum Deadline {
    In(i64),
    At(i64),
}

#[derive(Default)]
struct SleepShared {
    fired: bool,
    waker: Option<Waker>,
}

/// A timer as a future; see [`sleep_ns`]. Dropping it deletes the timer.
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    ctx: Option<AioContext>,
    clock: ClockType,
    deadline: Deadline,
    timer: Option<Timer>,
    shared: Arc<Mutex<SleepShared>>,
}

impl Sleep {
    fn new(ctx: Option<AioContext>, clock: ClockType, deadline: Deadline) -> Self {
        Self {
            ctx,
            clock,
            deadline,
            timer: None,
            shared: Arc::default(),
        }
    }

    /// The absolute deadline, once the sleep has started (first poll).
    pub fn deadline_ns(&self) -> Option<i64> {
        self.timer.as_ref().and_then(Timer::expire_time_ns)
    }
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sleep")
            .field("clock", &self.clock)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut sh = self.shared.lock();
            if sh.fired {
                return Poll::Ready(());
            }
            sh.waker = Some(cx.waker().clone());
        }
        if self.timer.is_none() {
            let ctx = match self.ctx.clone().or_else(AioContext::current) {
                Some(c) => c,
                None => panic!("aio::sleep_ns polled outside any AioContext task or block_on"),
            };
            let shared = self.shared.clone();
            let timer = ctx.timer_new(self.clock, move |_| {
                let waker = {
                    let mut sh = shared.lock();
                    sh.fired = true;
                    sh.waker.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
            });
            let deadline = match self.deadline {
                Deadline::In(ns) => ctx.clock_now(self.clock).saturating_add(ns.max(0)),
                Deadline::At(t) => t,
            };
            timer.mod_ns(deadline);
            self.timer = Some(timer);
        }
        Poll::Pending
    }
}

/// Moves the running task to `target`: the task continues on `target`'s home
/// thread from its next poll (QEMU's `aio_co_schedule` /
/// `aio_co_reschedule_self`).
///
/// # Errors
///
/// [`Error::NotInTask`] when awaited outside a task spawned with
/// [`AioContext::spawn`] (e.g. directly in `block_on`).
pub fn switch_to(target: &AioContext) -> SwitchTo {
    SwitchTo {
        target: Some(target.clone()),
    }
}

/// The future returned by [`switch_to`].
#[must_use = "futures do nothing unless awaited"]
pub struct SwitchTo {
    target: Option<AioContext>,
}

impl fmt::Debug for SwitchTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchTo").finish()
    }
}

impl Future for SwitchTo {
    type Output = Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(target) = self.target.take() else {
            return Poll::Ready(Ok(()));
        };
        let Some(task) = current_task() else {
            return Poll::Ready(Err(Error::NotInTask));
        };
        if AioContext::current().is_some_and(|c| c.ptr_eq(&target)) {
            return Poll::Ready(Ok(()));
        }
        *task.ctx.lock() = Arc::downgrade(target.inner());
        // Re-registers the task in the target's live set, so that dropping
        // the target drops it.
        move_registration(&task, &target);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn move_registration(task: &Arc<Task>, target: &AioContext) {
    if let Some(cur) = AioContext::current() {
        let key = task.key.load(Ordering::Acquire);
        let mut live = cur.inner().executor.live.lock();
        if live.get(key).is_some_and(|t| Arc::ptr_eq(t, task)) {
            live.remove(key);
        }
    }
    let key = target.inner().executor.live.lock().insert(task.clone());
    task.key.store(key, Ordering::Release);
}
