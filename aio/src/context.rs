//! The `AioContext`: one event loop, run by one home thread.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use slab::Slab;

use crate::bh::{self, Bh, BhInner, BhQueue};
use crate::clock::{host_ns, monotonic_ns, ClockType, VirtualClock};
use crate::error::{Error, IoContext, Result};
use crate::fdmon::{
    EpollMonitor, FdMonitor, Interest, IoUringMonitor, PpollMonitor, Ready, Timeout,
};
use crate::handler::{Callback, ClientMask, ClientType, FdHandler, PollCallback};
use crate::notifier::EventNotifier;
use crate::notify::NotifyState;
use crate::sys::eventfd::EventFd;
use crate::timer::{Timer, TimerLists};

/// Token of the context's own notifier eventfd in the monitor.
const NOTIFIER_TOKEN: u64 = u64::MAX;
/// A blocking poll with only idle bottom halves waits at most this long.
const IDLE_BH_TIMEOUT_NS: i64 = 10_000_000;
/// First busy-poll window of a handler that starts polling (QEMU's value).
const POLL_START_NS: u64 = 4_000;

thread_local! {
    static THREAD_ID: Cell<u64> = const { Cell::new(0) };
}
static NEXT_THREAD_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A small per-thread id, cheaper to read than a `gettid` syscall.
pub(crate) fn thread_id() -> u64 {
    THREAD_ID.with(|c| {
        let id = c.get();
        if id != 0 {
            return id;
        }
        let id = NEXT_THREAD_ID.fetch_add(1, Ordering::Relaxed);
        c.set(id);
        id
    })
}

/// Which fd monitor a context uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// epoll; deadlines through `epoll_pwait2` where the kernel has it,
    /// else through a timerfd. The default.
    #[default]
    Epoll,
    /// epoll with deadlines always through a timerfd in the interest set.
    EpollTimerfd,
    /// ppoll over an array of every registered fd: O(fds) per wait. The
    /// baseline.
    Ppoll,
    /// io_uring: one-shot poll requests re-armed in the same
    /// `io_uring_enter` that waits, with a nanosecond timeout argument.
    /// Context creation fails with a clear error where io_uring is
    /// unavailable (old kernel, seccomp); it never falls back silently.
    IoUring,
}

impl Backend {
    /// Every backend, for tests and benchmarks that cover them all.
    pub const ALL: [Backend; 4] = [
        Backend::Epoll,
        Backend::EpollTimerfd,
        Backend::Ppoll,
        Backend::IoUring,
    ];
}

/// Adaptive busy-polling parameters (QEMU's `poll-max-ns`, `poll-grow`,
/// `poll-shrink`).
///
/// Before sleeping, a context whose enabled handlers all have a `poll`
/// callback spins on those callbacks for up to each handler's current
/// window. A handler's window starts at 0, grows (×`grow`, 2 if 0, starting
/// at 4 µs) while the loop keeps blocking for less than `max_ns`, and
/// shrinks (÷`shrink`, to 0 if 0) when it blocks for longer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PollParams {
    /// Upper bound of a busy-poll window in ns; 0 disables polling.
    pub max_ns: u64,
    /// Growth factor (0 means 2).
    pub grow: u64,
    /// Shrink divisor (0 means "drop to 0").
    pub shrink: u64,
}

impl PollParams {
    /// Polling for at most `max_ns` ns, default grow and shrink.
    pub fn new(max_ns: u64) -> Self {
        Self {
            max_ns,
            grow: 0,
            shrink: 0,
        }
    }

    /// Sets the growth factor.
    pub fn grow(mut self, grow: u64) -> Self {
        self.grow = grow;
        self
    }

    /// Sets the shrink divisor.
    pub fn shrink(mut self, shrink: u64) -> Self {
        self.shrink = shrink;
        self
    }
}

/// Options for [`AioContext::with_options`].
///
/// ```
/// use aio::{AioContext, Backend, ContextOptions};
/// let ctx = AioContext::with_options(ContextOptions::new().backend(Backend::Ppoll))?;
/// assert_eq!(ctx.backend_name(), "ppoll");
/// # Ok::<(), aio::Error>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ContextOptions {
    /// The fd monitor.
    pub backend: Backend,
    /// Busy polling.
    pub poll: PollParams,
    /// The virtual clock to share; a fresh one when `None`.
    pub virtual_clock: Option<VirtualClock>,
    /// Timer slack set on the creating thread, in ns (`None` leaves it). The
    /// default, 1 ns, is QEMU's: Linux's 50 µs default would swamp
    /// sub-100 µs deadlines.
    pub timer_slack_ns: Option<u64>,
    /// A name for logs.
    pub name: String,
    /// When set, the fds reported ready by one wait are dispatched in an
    /// order shuffled by a PRNG seeded with this value, instead of the
    /// kernel's order. For tests that explore orderings the loop does not
    /// specify (see [`crate::testing`]).
    pub dispatch_seed: Option<u64>,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            poll: PollParams::default(),
            virtual_clock: None,
            timer_slack_ns: Some(1),
            name: String::new(),
            dispatch_seed: None,
        }
    }
}

impl ContextOptions {
    /// The defaults: epoll, no busy polling, own virtual clock, 1 ns slack.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
    /// Sets the busy-polling parameters.
    pub fn poll_params(mut self, poll: PollParams) -> Self {
        self.poll = poll;
        self
    }
    /// Shares `clock` as this context's virtual clock.
    pub fn virtual_clock(mut self, clock: VirtualClock) -> Self {
        self.virtual_clock = Some(clock);
        self
    }
    /// Sets the timer slack applied to the creating thread.
    pub fn timer_slack_ns(mut self, slack: Option<u64>) -> Self {
        self.timer_slack_ns = slack;
        self
    }
    /// Names the context.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Shuffles the dispatch order of ready fds with a PRNG seeded by `seed`.
    pub fn dispatch_seed(mut self, seed: Option<u64>) -> Self {
        self.dispatch_seed = seed;
        self
    }
}

/// A snapshot of a context's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// `poll` calls.
    pub iterations: u64,
    /// Waits in the kernel that were allowed to block.
    pub blocking_waits: u64,
    /// `notify` calls that had to write the eventfd.
    pub notify_writes: u64,
    /// `notify` calls.
    pub notify_calls: u64,
    /// fd-handler callbacks run (read, write, poll-ready).
    pub dispatches: u64,
    /// Bottom-half callbacks run.
    pub bh_runs: u64,
    /// Timer callbacks run.
    pub timer_runs: u64,
    /// Busy-poll windows that found work without sleeping.
    pub poll_hits: u64,
    /// Handler callbacks run because busy polling found work.
    pub polled_events: u64,
    /// Handler callbacks run because the kernel reported the fd ready.
    pub waited_events: u64,
    /// `io_uring_enter` calls that handed file requests of the io_uring
    /// engine to the kernel (each hands over one request or a batch).
    pub uring_submits: u64,
}

#[derive(Default)]
struct Counters {
    iterations: AtomicU64,
    blocking_waits: AtomicU64,
    notify_writes: AtomicU64,
    notify_calls: AtomicU64,
    dispatches: AtomicU64,
    bh_runs: AtomicU64,
    timer_runs: AtomicU64,
    poll_hits: AtomicU64,
    polled_events: AtomicU64,
    waited_events: AtomicU64,
}

/// Counts an event that can happen on any thread.
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts an event that only the home thread produces: a plain load and
/// store, no locked instruction (readers may see a slightly stale value).
fn bump_local(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One registered fd handler.
struct Handler {
    fd: RawFd,
    token: u64,
    client: ClientType,
    interest: Interest,
    has_poll: bool,
    read: Option<Callback>,
    write: Option<Callback>,
    poll: Option<PollCallback>,
    poll_ready: Option<Callback>,
    /// In the monitor's interest set right now.
    in_kernel: bool,
    /// Callbacks of this handler currently running (taken out of the slots).
    running: u32,
    /// Taken out of the kernel set because it was ready while its own
    /// callback ran (a nested poll); restored when `running` drops to 0.
    suppressed: bool,
    /// The wait sequence number of its last dispatch.
    last_dispatch: u64,
    /// Current busy-poll window.
    poll_ns: u64,
}

impl Handler {
    fn wants_kernel(&self, disabled: ClientMask) -> bool {
        !self.interest.is_empty() && !self.suppressed && !disabled.contains(self.client)
    }
}

#[derive(Default)]
struct Local {
    handlers: Slab<Handler>,
    by_fd: HashMap<RawFd, usize>,
    generation: u32,
    /// Per client type, how many guards disable it.
    disable_counts: [u32; ClientType::COUNT],
    disabled: ClientMask,
    /// Bottom halves taken from the queue and not yet run; shared by nested
    /// polls so an inner poll finishes the outer one's batch first.
    bh_batch: VecDeque<Arc<BhInner>>,
}

thread_local! {
    /// Spare event buffers, one per nesting level in use on this thread.
    static SPARE_EVENTS: std::cell::RefCell<Vec<Vec<Ready>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_event_buffer() -> Vec<Ready> {
    SPARE_EVENTS
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(64))
}

fn return_event_buffer(mut buf: Vec<Ready>) {
    buf.clear();
    SPARE_EVENTS.with(|s| s.borrow_mut().push(buf));
}

fn token_key(token: u64) -> usize {
    (token & 0xffff_ffff) as usize
}

pub(crate) struct Inner {
    id: u64,
    name: String,
    pub(crate) home: u64,
    monitor: Box<dyn FdMonitor>,
    notifier: EventFd,
    notify: NotifyState,
    pub(crate) bhs: BhQueue,
    pub(crate) timers: TimerLists,
    vclock: VirtualClock,
    poll_params: Mutex<PollParams>,
    /// `poll_params.max_ns`, readable without the lock.
    poll_max_ns: AtomicU64,
    /// Length of `Local::bh_batch` (maintained by the home thread).
    batch_len: AtomicU64,
    local: Mutex<Local>,
    stats: Counters,
    pub(crate) executor: crate::executor::Executor,
    /// Nesting depth of `poll` on the home thread.
    depth: AtomicU32,
    /// Incremented after every wait (home thread only).
    wait_seq: AtomicU64,
    /// Client types dispatched only by the outermost `poll` (bits).
    outermost: AtomicU32,
    /// Contexts whose events this context's outermost poll also runs.
    children: Mutex<Vec<Weak<Inner>>>,
    has_children: AtomicBool,
    /// PRNG state for shuffled dispatch (0: kernel order).
    shuffle: AtomicU64,
    /// The io_uring file engine, created on first use.
    pub(crate) uring_io: Mutex<Option<Arc<crate::uring_file::UringEngine>>>,
    /// Set by the io_uring engine's completion handler: the outermost poll
    /// resumes the woken tasks right after dispatching, in this iteration.
    pub(crate) resume_after_dispatch: AtomicBool,
    /// Set once the io_uring file engine exists: every poll then checks
    /// its ring after the wait ([`crate::uring_file::reap_ready`]).
    pub(crate) uring_peek: AtomicBool,
}

impl Inner {
    pub(crate) fn clock_now(&self, clock: ClockType) -> i64 {
        match clock {
            ClockType::Realtime => monotonic_ns(),
            ClockType::Host => host_ns(),
            ClockType::Virtual => self.vclock.now(),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        log::trace!("AioContext {} ({}) dropped", self.id, self.name);
    }
}

/// Wakes the context's home thread if it is (about to be) blocked.
pub(crate) fn notify_inner(inner: &Inner) {
    bump(&inner.stats.notify_calls);
    if inner.notify.notify() {
        bump(&inner.stats.notify_writes);
        if let Err(e) = inner.notifier.write() {
            log::error!("AioContext {}: notify eventfd write failed: {e}", inner.id);
        }
    }
}

/// An event loop in the style of QEMU's `AioContext`.
///
/// A context multiplexes fd handlers, [`EventNotifier`]s, bottom halves
/// ([`Bh`]) and [`Timer`]s on three clocks. It is run by one thread, its
/// *home thread* (the thread that created it), which calls
/// [`poll`](AioContext::poll) in a loop.
///
/// # Guarantees
///
/// * **Thread safety.** `AioContext` is a cheap, `Send + Sync` handle.
///   Only [`notify`](AioContext::notify), scheduling a [`Bh`] and arming a
///   [`Timer`] may happen on other threads; changing fd handlers is refused
///   there with [`Error::NotHomeThread`] (schedule a bottom half instead).
///   No lock of the context is held while a callback runs.
/// * **Handlers** are level-triggered. Removing or replacing any handler,
///   itself included, from inside any callback is safe, and a removed
///   callback never runs afterwards.
/// * **Nesting.** A callback may call `poll` again (a *nested* poll). A
///   callback that is running is not re-entered by a nested poll: its fd
///   is taken out of the kernel's set until it returns, so the nested loop
///   does not spin on it either. A nested poll first finishes the bottom
///   halves of the outer poll's batch.
/// * **Order.** Bottom halves run in the order they were scheduled; timers
///   with equal deadlines fire in creation order.
/// * **Deadlines** reach the kernel in nanoseconds (`epoll_pwait2`, a
///   timerfd, or `ppoll`'s timespec), never rounded to milliseconds.
/// * **Wake-ups.** `notify` writes the eventfd only when the home thread is
///   in, or about to enter, a blocking wait; see [`stats`](AioContext::stats).
///
/// # Examples
///
/// ```
/// use aio::{AioContext, ClientType, EventNotifier, FdHandler};
/// use std::sync::Arc;
///
/// let ctx = AioContext::new()?;
/// let n = Arc::new(EventNotifier::new()?);
/// let n2 = n.clone();
/// ctx.set_event_notifier(&n, Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
///     n2.test_and_clear().ok();
/// })))?;
/// std::thread::spawn(move || n.set()).join().unwrap()?;
/// assert!(ctx.poll(true)); // dispatches the notifier's handler
/// # Ok::<(), aio::Error>(())
/// ```
#[derive(Clone)]
pub struct AioContext {
    inner: Arc<Inner>,
}

/// A weak handle to an [`AioContext`], for callbacks that must not keep
/// their own context alive.
#[derive(Clone, Debug)]
pub struct WeakAioContext(Weak<Inner>);

impl WeakAioContext {
    /// The context, if it still exists.
    pub fn upgrade(&self) -> Option<AioContext> {
        self.0.upgrade().map(|inner| AioContext { inner })
    }
}

impl fmt::Debug for AioContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioContext")
            .field("id", &self.inner.id)
            .field("name", &self.inner.name)
            .field("backend", &self.inner.monitor.name())
            .finish()
    }
}

impl AioContext {
    /// Creates a context with the default options (epoll) whose home thread
    /// is the calling thread.
    pub fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default())
    }

    /// Creates a context whose home thread is the calling thread.
    pub fn with_options(opts: ContextOptions) -> Result<Self> {
        if let Some(slack) = opts.timer_slack_ns {
            crate::sys::set_timer_slack(slack)
                .context(|| format!("setting timer slack to {slack} ns"))?;
        }
        let monitor: Box<dyn FdMonitor> = match opts.backend {
            Backend::Epoll => Box::new(
                EpollMonitor::new(false).context(|| "creating an epoll instance".to_string())?,
            ),
            Backend::EpollTimerfd => Box::new(
                EpollMonitor::new(true).context(|| "creating an epoll instance".to_string())?,
            ),
            Backend::Ppoll => Box::new(PpollMonitor::new()),
            Backend::IoUring => Box::new(
                IoUringMonitor::new().context(|| "creating an io_uring instance".to_string())?,
            ),
        };
        let notifier = EventFd::new().context(|| "creating the notify eventfd".to_string())?;
        monitor
            .add(
                notifier.as_raw_fd(),
                NOTIFIER_TOKEN,
                Interest {
                    read: true,
                    write: false,
                },
            )
            .context(|| "registering the notify eventfd".to_string())?;
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        let vclock = opts.virtual_clock.unwrap_or_default();
        let inner = Arc::new_cyclic(|weak| Inner {
            id,
            name: if opts.name.is_empty() {
                format!("ctx{id}")
            } else {
                opts.name
            },
            home: thread_id(),
            monitor,
            notifier,
            notify: NotifyState::new(),
            bhs: BhQueue::default(),
            timers: TimerLists::default(),
            vclock: vclock.clone(),
            poll_params: Mutex::new(opts.poll),
            poll_max_ns: AtomicU64::new(opts.poll.max_ns),
            batch_len: AtomicU64::new(0),
            local: Mutex::new(Local::default()),
            stats: Counters::default(),
            executor: crate::executor::Executor::new(weak.clone()),
            depth: AtomicU32::new(0),
            wait_seq: AtomicU64::new(0),
            outermost: AtomicU32::new(ClientType::CHILD.mask().bits()),
            children: Mutex::new(Vec::new()),
            has_children: AtomicBool::new(false),
            uring_io: Mutex::new(None),
            resume_after_dispatch: AtomicBool::new(false),
            uring_peek: AtomicBool::new(false),
            shuffle: AtomicU64::new(opts.dispatch_seed.map_or(0, |s| s | 1)),
        });
        vclock.attach(Arc::downgrade(&inner));
        log::debug!(
            "AioContext {} created ({})",
            inner.name,
            inner.monitor.name()
        );
        Ok(Self { inner })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// A weak handle.
    pub fn downgrade(&self) -> WeakAioContext {
        WeakAioContext(Arc::downgrade(&self.inner))
    }

    /// The name of the fd monitor in use ("epoll", "epoll+timerfd", "ppoll").
    pub fn backend_name(&self) -> &'static str {
        self.inner.monitor.name()
    }

    /// The context's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether the calling thread is this context's home thread.
    pub fn in_home_thread(&self) -> bool {
        thread_id() == self.inner.home
    }

    /// Whether two handles refer to the same context.
    pub fn ptr_eq(&self, other: &AioContext) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn check_home(&self, op: &'static str) -> Result<()> {
        if self.in_home_thread() {
            Ok(())
        } else {
            Err(Error::NotHomeThread { op })
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            iterations: l(&c.iterations),
            blocking_waits: l(&c.blocking_waits),
            notify_writes: l(&c.notify_writes),
            notify_calls: l(&c.notify_calls),
            dispatches: l(&c.dispatches),
            bh_runs: l(&c.bh_runs),
            timer_runs: l(&c.timer_runs),
            poll_hits: l(&c.poll_hits),
            polled_events: l(&c.polled_events),
            waited_events: l(&c.waited_events),
            uring_submits: self
                .inner
                .uring_io
                .lock()
                .as_ref()
                .map_or(0, |e| e.submits()),
        }
    }

    /// Forces a blocked (or about to block) `poll` on the home thread to
    /// return. Callable from any thread; costs no syscall when the home
    /// thread is not waiting.
    pub fn notify(&self) {
        notify_inner(&self.inner);
    }

    // ----- fd handlers -------------------------------------------------

    /// Registers, replaces (`Some`) or removes (`None`) the handler of `fd`.
    ///
    /// The fd stays owned by the caller, who must keep it open until the
    /// handler is removed. Safe to call from inside any callback, including
    /// the handler's own; a replaced or removed callback that is running
    /// finishes, is then dropped, and never runs again.
    ///
    /// # Errors
    ///
    /// [`Error::NotHomeThread`] off the home thread; [`Error::Io`] if the
    /// kernel refuses the fd (e.g. a regular file with epoll).
    pub fn set_fd_handler(&self, fd: RawFd, handler: Option<FdHandler>) -> Result<()> {
        self.check_home("set_fd_handler")?;
        let mut local = self.inner.local.lock();
        let disabled = local.disabled;
        let old = local
            .by_fd
            .remove(&fd)
            .map(|key| local.handlers.remove(key));
        let old_in_kernel = old.as_ref().is_some_and(|h| h.in_kernel);
        let Some(h) = handler else {
            if old_in_kernel {
                if let Err(e) = self.inner.monitor.remove(fd) {
                    // The fd may already be closed (epoll dropped it then).
                    log::debug!("removing fd {fd} from the monitor: {e}");
                }
            }
            drop(local);
            drop(old);
            return Ok(());
        };
        let entry = local.handlers.vacant_entry();
        let key = entry.key();
        let interest = Interest {
            read: h.read.is_some(),
            write: h.write.is_some(),
        };
        let mut new = Handler {
            fd,
            token: 0,
            client: h.client,
            interest,
            has_poll: h.poll.is_some(),
            read: h.read,
            write: h.write,
            poll: h.poll,
            poll_ready: h.poll_ready,
            in_kernel: false,
            running: 0,
            suppressed: false,
            last_dispatch: 0,
            poll_ns: 0,
        };
        local.generation = local.generation.wrapping_add(1);
        new.token = (u64::from(local.generation) << 32) | key as u64;
        let want = new.wants_kernel(disabled);
        let res = match (old_in_kernel, want) {
            (true, true) => self.inner.monitor.modify(fd, new.token, interest),
            (true, false) => self.inner.monitor.remove(fd),
            (false, true) => self.inner.monitor.add(fd, new.token, interest),
            (false, false) => Ok(()),
        };
        if let Err(e) = res {
            // The old handler is gone either way; do not leave a stale entry.
            if old_in_kernel {
                let _ = self.inner.monitor.remove(fd);
            }
            drop(local);
            drop(old);
            return Err(e).context(|| format!("registering fd {fd} with {}", self.backend_name()));
        }
        new.in_kernel = want;
        let key = local.handlers.insert(new);
        local.by_fd.insert(fd, key);
        drop(local);
        drop(old);
        Ok(())
    }

    /// Registers (or with `None` removes) the handler of an [`EventNotifier`].
    /// Same rules as [`set_fd_handler`](AioContext::set_fd_handler).
    pub fn set_event_notifier(&self, n: &EventNotifier, handler: Option<FdHandler>) -> Result<()> {
        self.set_fd_handler(n.as_raw_fd(), handler)
    }

    /// The number of registered fd handlers.
    pub fn handler_count(&self) -> usize {
        self.inner.local.lock().handlers.len()
    }

    // ----- client masks ------------------------------------------------

    /// Stops dispatching the handlers of every client type in `mask` until
    /// the returned guard (and every other guard covering that type) is
    /// dropped. Their fds leave the kernel's interest set, so a ready fd of
    /// a disabled client neither runs nor makes the loop spin. Guards nest.
    ///
    /// # Errors
    ///
    /// [`Error::NotHomeThread`] off the home thread; [`Error::Io`] if the
    /// monitor refuses a change.
    pub fn disable_clients(&self, mask: ClientMask) -> Result<ClientGuard> {
        self.check_home("disable_clients")?;
        let res = self.change_clients(mask, true);
        // The guard exists even on error so the counts are undone on drop.
        let guard = ClientGuard {
            ctx: self.clone(),
            mask,
        };
        res.map(|()| guard)
    }

    /// Whether `client` is currently disabled.
    pub fn is_client_disabled(&self, client: ClientType) -> bool {
        self.inner.local.lock().disabled.contains(client)
    }

    fn change_clients(&self, mask: ClientMask, disable: bool) -> Result<()> {
        let mut local = self.inner.local.lock();
        let mut flipped = ClientMask::NONE;
        for c in mask.types() {
            let count = &mut local.disable_counts[c.index()];
            if disable {
                *count += 1;
                if *count == 1 {
                    flipped = flipped | c.mask();
                }
            } else {
                *count = count.saturating_sub(1);
                if *count == 0 && local.disabled.contains(c) {
                    flipped = flipped | c.mask();
                }
            }
        }
        if flipped == ClientMask::NONE {
            return Ok(());
        }
        let disabled = ClientMask::from_counts(&local.disable_counts);
        local.disabled = disabled;
        let mut first_err = None;
        for (_, h) in local.handlers.iter_mut() {
            if !flipped.contains(h.client) {
                continue;
            }
            let want = h.wants_kernel(disabled);
            if want == h.in_kernel {
                continue;
            }
            let res = if want {
                self.inner.monitor.add(h.fd, h.token, h.interest)
            } else {
                self.inner.monitor.remove(h.fd)
            };
            match res {
                Ok(()) => h.in_kernel = want,
                Err(e) => {
                    log::warn!("client mask change for fd {}: {e}", h.fd);
                    first_err.get_or_insert((h.fd, e));
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some((fd, e)) => Err(e).context(|| format!("changing client mask for fd {fd}")),
        }
    }

    // ----- bottom halves -------------------------------------------------

    /// Creates a bottom half; it runs when scheduled (see [`Bh`]).
    pub fn bh_new(&self, cb: impl FnMut(&AioContext) + Send + 'static) -> Bh {
        Bh::from_inner(BhInner::new(
            Arc::downgrade(&self.inner),
            Box::new(cb),
            false,
        ))
    }

    /// Schedules `cb` to run once on the next iteration. Callable from any
    /// thread.
    pub fn bh_schedule_oneshot(&self, cb: impl FnOnce(&AioContext) + Send + 'static) {
        let mut cb = Some(cb);
        let bh = BhInner::new(
            Arc::downgrade(&self.inner),
            Box::new(move |ctx: &AioContext| {
                if let Some(cb) = cb.take() {
                    cb(ctx);
                }
            }),
            true,
        );
        bh.schedule(0);
    }

    // ----- timers ------------------------------------------------------

    /// Creates a timer on `clock` (not armed). Callable from any thread.
    pub fn timer_new(
        &self,
        clock: ClockType,
        cb: impl FnMut(&AioContext) + Send + 'static,
    ) -> Timer {
        let (key, id) = self.inner.timers.insert(clock, Box::new(cb));
        Timer::new(Arc::downgrade(&self.inner), key, id, clock)
    }

    /// Now on `clock`, in ns.
    pub fn clock_now(&self, clock: ClockType) -> i64 {
        self.inner.clock_now(clock)
    }

    /// The context's virtual clock.
    pub fn virtual_clock(&self) -> &VirtualClock {
        &self.inner.vclock
    }

    /// Nanoseconds until the earliest timer on `clock` is due (0 if one is
    /// already due), or `None` if none is armed (QEMU's -1).
    pub fn timer_deadline_ns(&self, clock: ClockType) -> Option<i64> {
        let d = self.inner.timers.earliest(clock)?;
        Some((d - self.clock_now(clock)).max(0))
    }

    /// Advances the virtual clock by `ns`, firing every timer it passes in
    /// deadline order (each at its own deadline), without sleeping. Runs the
    /// loop until idle after each step. Returns the new virtual time.
    ///
    /// # Panics
    ///
    /// Off the home thread, like [`poll`](AioContext::poll).
    pub fn virtual_step(&self, ns: i64) -> i64 {
        let target = self.inner.vclock.now().saturating_add(ns.max(0));
        self.virtual_advance(target)
    }

    /// Sets the virtual clock to `ns` (never backwards) like
    /// [`virtual_step`](AioContext::virtual_step). Returns the new time.
    pub fn virtual_set(&self, ns: i64) -> i64 {
        self.virtual_advance(ns)
    }

    /// Advances the virtual clock to its earliest armed deadline and fires
    /// what is due. Returns the new time, or `None` if no virtual timer is
    /// armed (the clock does not move).
    pub fn virtual_step_next(&self) -> Option<i64> {
        let d = self.inner.timers.earliest(ClockType::Virtual)?;
        Some(self.virtual_advance(d))
    }

    fn virtual_advance(&self, target: i64) -> i64 {
        self.assert_home("virtual_step");
        loop {
            self.run_until_idle();
            match self.inner.timers.earliest(ClockType::Virtual) {
                Some(d) if d <= target && d > self.inner.vclock.now() => {
                    self.inner.vclock.advance_to(d);
                }
                _ => break,
            }
        }
        let now = self.inner.vclock.advance_to(target);
        self.run_until_idle();
        now
    }

    /// Runs non-blocking iterations until one makes no progress.
    pub fn run_until_idle(&self) {
        while self.poll(false) {}
    }

    // ----- the loop ----------------------------------------------------

    fn assert_home(&self, op: &str) {
        assert!(
            self.in_home_thread(),
            "AioContext::{op} called off the home thread of context {}",
            self.inner.name
        );
    }

    /// Runs `poll(true)` until `cond` returns false (QEMU's
    /// `AIO_WAIT_WHILE` for the home thread). Whoever makes `cond` false
    /// from another thread must wake the loop (schedule a BH or `notify`).
    pub fn poll_while(&self, mut cond: impl FnMut() -> bool) {
        while cond() {
            self.poll(true);
        }
    }

    /// Runs one iteration of the loop: waits for events (if `blocking` and
    /// nothing is due), then runs due bottom halves, ready fd handlers and
    /// expired timers, in that order.
    ///
    /// Returns whether progress was made: a bottom half that is not idle
    /// ran, a handler (other than the context's own notifier) dispatched, or
    /// a timer fired. A blocking poll woken only by
    /// [`notify`](AioContext::notify) returns `false`.
    ///
    /// May be called from inside a callback (a nested poll).
    ///
    /// # Panics
    ///
    /// When called off the home thread: two threads running one loop is a
    /// bug in the caller, not a condition to handle.
    pub fn poll(&self, blocking: bool) -> bool {
        self.assert_home("poll");
        let inner = &*self.inner;
        let _depth = DepthGuard::enter(self);
        let outermost = _depth.depth == 1;
        let stats = &inner.stats;
        bump_local(&stats.iterations, 1);
        let mut progress = false;

        let mut timeout = if blocking {
            self.compute_timeout()
        } else {
            Timeout::Zero
        };
        let children = if outermost && inner.has_children.load(Ordering::Relaxed) {
            self.children()
        } else {
            Vec::new()
        };
        for child in &children {
            timeout = earlier(timeout, child.compute_timeout());
        }
        let params = if inner.poll_max_ns.load(Ordering::Relaxed) > 0 {
            *inner.poll_params.lock()
        } else {
            PollParams::default()
        };
        if timeout != Timeout::Zero && params.max_ns > 0 && self.busy_poll(&mut timeout) {
            progress = true;
        }

        let mut events = take_event_buffer();
        let may_block = timeout != Timeout::Zero;
        if may_block && !inner.notify.begin_wait() {
            timeout = Timeout::Zero;
        }
        // A child's notify must wake us while we sleep: count ourselves as
        // its waiter too (QEMU's GSource `prepare` sets `notify_me` alike).
        for child in &children {
            if may_block && !child.inner.notify.begin_wait() {
                timeout = Timeout::Zero;
            }
            if let Err(e) = child.inner.monitor.flush() {
                log::error!(
                    "AioContext {}: flushing child {}: {e}",
                    inner.name,
                    child.name()
                );
            }
        }
        let block_start = if may_block && params.max_ns > 0 {
            monotonic_ns()
        } else {
            0
        };
        if timeout != Timeout::Zero {
            bump_local(&stats.blocking_waits, 1);
        }
        if let Err(e) = inner.monitor.wait(&mut events, timeout) {
            log::error!("AioContext {}: wait failed: {e}", inner.name);
        }
        if may_block {
            inner.notify.end_wait();
            for child in &children {
                child.inner.notify.end_wait();
            }
        }
        inner.notify.accept();
        let block_ns = if block_start > 0 {
            (monotonic_ns() - block_start).max(0) as u64
        } else {
            0
        };

        // The sequence number of this wait (home thread only: no RMW).
        let seq = inner.wait_seq.load(Ordering::Relaxed) + 1;
        inner.wait_seq.store(seq, Ordering::Relaxed);
        // The bottom halves scheduled up to now join the batch; the lock is
        // taken only when there are some.
        if inner.bhs.maybe_pending() || inner.batch_len.load(Ordering::Relaxed) > 0 {
            let have_bhs = {
                let mut local = inner.local.lock();
                inner.bhs.take_into(&mut local.bh_batch);
                inner
                    .batch_len
                    .store(local.bh_batch.len() as u64, Ordering::Relaxed);
                !local.bh_batch.is_empty()
            };
            if have_bhs {
                progress |= self.run_bhs();
            }
        }

        let state = inner.shuffle.load(Ordering::Relaxed);
        if state != 0 && events.len() > 1 {
            inner
                .shuffle
                .store(shuffle(&mut events, state), Ordering::Relaxed);
        }
        for ev in events.iter().copied() {
            if ev.token == NOTIFIER_TOKEN {
                if let Err(e) = inner.notifier.read() {
                    log::error!("AioContext {}: notify eventfd read failed: {e}", inner.name);
                }
                continue;
            }
            progress |= self.dispatch(ev, seq, block_ns, params);
        }
        return_event_buffer(events);
        if inner.uring_peek.load(Ordering::Relaxed) {
            progress |= crate::uring_file::reap_ready(self);
        }
        if outermost && inner.resume_after_dispatch.swap(false, Ordering::Relaxed) {
            // Those tasks were woken without a notification, so the next
            // wait may block at once. The runner, cancelled here, stays
            // queued until the next poll takes it; another thread that
            // schedules it again meanwhile notifies (a cancelled bottom
            // half scheduled again always does).
            crate::uring_file::resume_tasks(self);
        }

        progress |= self.run_timers();

        // Children with work that their fd did not announce (BHs, timers,
        // accepted notifications) run here, in the outermost poll only.
        for child in &children {
            if child.inner.notify.is_notified() || child.compute_timeout() == Timeout::Zero {
                progress |= child.poll(false);
            }
        }
        progress
    }

    fn children(&self) -> Vec<AioContext> {
        let mut list = self.inner.children.lock();
        list.retain(|w| w.strong_count() > 0);
        list.iter()
            .filter_map(Weak::upgrade)
            .map(|inner| AioContext { inner })
            .collect()
    }

    /// Attaches `child` to this context: this context's *outermost* poll
    /// also waits for and runs `child`'s fd handlers, bottom halves, tasks
    /// and timers; nested polls of this context never do. This is how a main
    /// loop keeps an "iohandler" context (QMP monitor, signals) out of
    /// nested block-layer polls, as QEMU does with `iohandler_ctx`.
    ///
    /// Both contexts must have the calling thread as home thread, and the
    /// child must use a backend with a pollable fd (epoll or io_uring).
    ///
    /// # Errors
    ///
    /// [`Error::NotHomeThread`] if either context lives on another thread;
    /// [`Error::Io`] (kind `Unsupported`) for a ppoll child.
    pub fn attach_child(&self, child: &AioContext) -> Result<()> {
        self.check_home("attach_child")?;
        child.check_home("attach_child")?;
        let fd = child.inner.monitor.poll_fd().ok_or_else(|| Error::Io {
            context: format!("attaching context {} to {}", child.name(), self.name()),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the child context's backend has no pollable fd (use epoll or io_uring)",
            ),
        })?;
        let weak = child.downgrade();
        self.set_fd_handler(
            fd,
            Some(FdHandler::new(ClientType::CHILD).on_read(move |_| {
                if let Some(child) = weak.upgrade() {
                    child.poll(false);
                }
            })),
        )?;
        self.inner
            .children
            .lock()
            .push(Arc::downgrade(&child.inner));
        self.inner.has_children.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Marks client types as *outermost-only*: their handlers run only in
    /// the outermost `poll` and are out of the kernel's interest set while a
    /// nested poll runs. (Attached children are always outermost-only.)
    ///
    /// # Errors
    ///
    /// [`Error::NotHomeThread`] off the home thread.
    pub fn set_outermost_only(&self, mask: ClientMask) -> Result<()> {
        self.check_home("set_outermost_only")?;
        let bits = mask.bits() | ClientType::CHILD.mask().bits();
        self.inner.outermost.store(bits, Ordering::Relaxed);
        Ok(())
    }

    /// How deeply `poll` is nested on the home thread right now (0 when
    /// not polling, 1 in the outermost poll).
    pub fn poll_depth(&self) -> u32 {
        self.inner.depth.load(Ordering::Relaxed)
    }

    /// The wait timeout: zero if work is due, else the earliest deadline.
    fn compute_timeout(&self) -> Timeout {
        let inner = &*self.inner;
        let (mut busy, mut idle) = inner.bhs.pending_kinds();
        if !busy && inner.batch_len.load(Ordering::Relaxed) > 0 {
            let local = inner.local.lock();
            let (b, i) = bh::kinds(local.bh_batch.iter());
            busy |= b;
            idle |= i;
        }
        if busy {
            return Timeout::Zero;
        }
        if !idle && !inner.timers.any_armed() {
            return Timeout::Infinite;
        }
        let now = monotonic_ns();
        let mut until: Option<i64> = idle.then_some(now + IDLE_BH_TIMEOUT_NS);
        let mut earliest = |t: i64| until = Some(until.map_or(t, |u| u.min(t)));
        if let Some(d) = inner.timers.earliest(ClockType::Realtime) {
            earliest(d);
        }
        if let Some(d) = inner.timers.earliest(ClockType::Host) {
            earliest(now.saturating_add(d - host_ns()));
        }
        if let Some(d) = inner.timers.earliest(ClockType::Virtual) {
            // Virtual time does not pass while we sleep: only a timer that
            // is already due matters.
            if d <= inner.vclock.now() {
                return Timeout::Zero;
            }
        }
        match until {
            Some(t) if t <= now => Timeout::Zero,
            Some(t) => Timeout::Until(t),
            None => Timeout::Infinite,
        }
    }

    /// Runs the current batch of bottom halves (including what an outer
    /// poll left of its batch).
    fn run_bhs(&self) -> bool {
        let inner = &*self.inner;
        let mut progress = false;
        let mut ran = 0;
        loop {
            let bh = {
                let mut local = inner.local.lock();
                let bh = local.bh_batch.pop_front();
                inner
                    .batch_len
                    .store(local.bh_batch.len() as u64, Ordering::Relaxed);
                bh
            };
            let Some(bh) = bh else { break };
            if bh.run(self) {
                ran += 1;
                progress = true;
            }
        }
        bump_local(&inner.stats.bh_runs, ran);
        progress
    }

    fn run_timers(&self) -> bool {
        let inner = &*self.inner;
        if !inner.timers.any_armed() {
            return false;
        }
        let mut ran = 0;
        for clock in ClockType::ALL {
            ran += inner
                .timers
                .run_expired(clock, inner.clock_now(clock), self);
        }
        bump_local(&inner.stats.timer_runs, ran as u64);
        ran > 0
    }

    /// Dispatches one ready event; returns whether a callback ran.
    fn dispatch(&self, ev: Ready, seq: u64, block_ns: u64, params: PollParams) -> bool {
        let mut ran = false;
        if ev.readable {
            ran |= self.run_handler(ev.token, Slot::Read, Some(seq));
        }
        if ev.writable {
            ran |= self.run_handler(ev.token, Slot::Write, Some(seq));
        }
        if ran && params.max_ns > 0 {
            self.adjust_poll_time(ev.token, block_ns, params);
        }
        ran
    }

    /// Runs one callback of the handler `token`, with no lock held, unless
    /// the handler is gone, disabled, already handled by a nested poll since
    /// wait `seq`, or running (then its fd is suppressed until it returns).
    /// `seq` is `None` for busy-poll hits, which come from no wait.
    fn run_handler(&self, token: u64, slot: Slot, seq: Option<u64>) -> bool {
        let inner = &*self.inner;
        let key = token_key(token);
        let cb = {
            let mut local = inner.local.lock();
            let disabled = local.disabled;
            let Some(h) = local.handlers.get_mut(key).filter(|h| h.token == token) else {
                return false;
            };
            if disabled.contains(h.client) || seq.is_some_and(|s| h.last_dispatch > s) {
                return false;
            }
            let (slot, cb) = match slot {
                Slot::Read => (Slot::Read, h.read.take()),
                Slot::Write => (Slot::Write, h.write.take()),
                Slot::PollReady if h.poll_ready.is_some() => (Slot::PollReady, h.poll_ready.take()),
                Slot::PollReady => (Slot::Read, h.read.take()),
            };
            let Some(cb) = cb else {
                // Re-entry from a nested poll while this callback runs.
                if h.running > 0 && h.in_kernel {
                    h.suppressed = true;
                    if let Err(e) = inner.monitor.remove(h.fd) {
                        log::warn!("suppressing fd {}: {e}", h.fd);
                    } else {
                        h.in_kernel = false;
                    }
                }
                return false;
            };
            h.running += 1;
            if let Some(seq) = seq {
                h.last_dispatch = seq;
            }
            (slot, cb)
        };
        let (slot, mut cb) = cb;
        cb(self);
        bump_local(&inner.stats.dispatches, 1);
        if seq.is_some() {
            bump_local(&inner.stats.waited_events, 1);
        } else {
            bump_local(&inner.stats.polled_events, 1);
        }
        self.return_callback(key, token, slot, cb);
        true
    }

    /// Puts a callback back after it ran, or drops it if its handler was
    /// removed or replaced meanwhile; restores a suppressed fd.
    fn return_callback(&self, key: usize, token: u64, slot: Slot, cb: Callback) {
        let inner = &*self.inner;
        let mut local = inner.local.lock();
        let disabled = local.disabled;
        let Some(h) = local.handlers.get_mut(key).filter(|h| h.token == token) else {
            drop(local);
            drop(cb);
            return;
        };
        match slot {
            Slot::Read => h.read = Some(cb),
            Slot::Write => h.write = Some(cb),
            Slot::PollReady => h.poll_ready = Some(cb),
        }
        h.running -= 1;
        if h.running == 0 && h.suppressed {
            h.suppressed = false;
            if h.wants_kernel(disabled) && !h.in_kernel {
                match inner.monitor.add(h.fd, h.token, h.interest) {
                    Ok(()) => h.in_kernel = true,
                    Err(e) => log::warn!("restoring fd {}: {e}", h.fd),
                }
            }
        }
    }

    fn adjust_poll_time(&self, token: u64, block_ns: u64, p: PollParams) {
        let mut local = self.inner.local.lock();
        let Some(h) = local
            .handlers
            .get_mut(token_key(token))
            .filter(|h| h.token == token)
        else {
            return;
        };
        if !h.has_poll || block_ns <= h.poll_ns {
            return;
        }
        if block_ns > p.max_ns {
            h.poll_ns = h.poll_ns.checked_div(p.shrink).unwrap_or(0);
        } else if h.poll_ns < p.max_ns && block_ns < p.max_ns {
            let grow = if p.grow == 0 { 2 } else { p.grow };
            h.poll_ns = if h.poll_ns == 0 {
                POLL_START_NS
            } else {
                h.poll_ns.saturating_mul(grow)
            }
            .min(p.max_ns);
        }
    }

    /// Busy-polls the `poll` callbacks for up to the largest handler window.
    /// Returns whether a poll-ready callback ran; sets `timeout` to zero if
    /// anything became due.
    fn busy_poll(&self, timeout: &mut Timeout) -> bool {
        let inner = &*self.inner;
        let (tokens, window) = {
            let local = inner.local.lock();
            let mut window = 0u64;
            let mut tokens = Vec::new();
            for (_, h) in local.handlers.iter() {
                if local.disabled.contains(h.client) || (h.interest.is_empty() && !h.has_poll) {
                    continue;
                }
                if !h.has_poll {
                    // epoll/ppoll cannot see this fd's readiness from
                    // userspace: polling would starve it.
                    return false;
                }
                window = window.max(h.poll_ns);
                tokens.push(h.token);
            }
            (tokens, window)
        };
        if tokens.is_empty() || window == 0 {
            return false;
        }
        let start = monotonic_ns();
        let mut window = window as i64;
        if let Timeout::Until(t) = *timeout {
            window = window.min(t - start);
        }
        let mut progress = false;
        loop {
            for &token in &tokens {
                if self.run_poll_check(token) && self.run_handler(token, Slot::PollReady, None) {
                    progress = true;
                }
            }
            if progress
                || inner.notify.is_notified()
                || inner.bhs.pending_kinds().0
                || monotonic_ns() - start >= window
            {
                break;
            }
            std::hint::spin_loop();
        }
        if progress {
            bump_local(&inner.stats.poll_hits, 1);
            *timeout = Timeout::Zero;
        }
        progress
    }

    /// Runs a handler's busy-poll check with no lock held.
    fn run_poll_check(&self, token: u64) -> bool {
        let inner = &*self.inner;
        let key = token_key(token);
        let mut cb = {
            let mut local = inner.local.lock();
            let Some(h) = local.handlers.get_mut(key).filter(|h| h.token == token) else {
                return false;
            };
            match h.poll.take() {
                Some(cb) => cb,
                None => return false, // running further up the stack
            }
        };
        let ready = cb(self);
        let mut local = inner.local.lock();
        match local.handlers.get_mut(key).filter(|h| h.token == token) {
            Some(h) => h.poll = Some(cb),
            None => {
                drop(local);
                drop(cb);
            }
        }
        ready
    }
}

/// Fisher–Yates with xorshift64*; returns the next PRNG state (never 0).
fn shuffle(events: &mut [Ready], mut x: u64) -> u64 {
    for i in (1..events.len()).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        events.swap(i, (r % (i as u64 + 1)) as usize);
    }
    x
}

/// The earlier of two timeouts.
fn earlier(a: Timeout, b: Timeout) -> Timeout {
    match (a, b) {
        (Timeout::Zero, _) | (_, Timeout::Zero) => Timeout::Zero,
        (Timeout::Infinite, t) | (t, Timeout::Infinite) => t,
        (Timeout::Until(x), Timeout::Until(y)) => Timeout::Until(x.min(y)),
    }
}

/// Tracks `poll` nesting; entering depth 2 takes the outermost-only client
/// types out of the kernel set, leaving it puts them back.
struct DepthGuard<'a> {
    ctx: &'a AioContext,
    depth: u32,
    masked: Option<ClientMask>,
}

impl<'a> DepthGuard<'a> {
    fn enter(ctx: &'a AioContext) -> Self {
        let inner = &ctx.inner;
        let depth = inner.depth.load(Ordering::Relaxed) + 1;
        inner.depth.store(depth, Ordering::Relaxed);
        let mut masked = None;
        if depth == 2 {
            let mask = ClientMask::from_bits(inner.outermost.load(Ordering::Relaxed));
            if inner.has_children.load(Ordering::Relaxed) || mask != ClientType::CHILD.mask() {
                if let Err(e) = ctx.change_clients(mask, true) {
                    log::warn!("masking outermost-only clients: {e}");
                }
                masked = Some(mask);
            }
        }
        Self { ctx, depth, masked }
    }
}

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        if let Some(mask) = self.masked {
            if let Err(e) = self.ctx.change_clients(mask, false) {
                log::warn!("unmasking outermost-only clients: {e}");
            }
        }
        self.ctx
            .inner
            .depth
            .store(self.depth - 1, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Read,
    Write,
    PollReady,
}

/// Keeps a set of client types disabled; see
/// [`AioContext::disable_clients`]. Dropping it re-enables them (once no
/// other guard covers them). Dropped off the home thread, the re-enable is
/// scheduled there as a bottom half.
#[must_use = "the clients are re-enabled when the guard is dropped"]
pub struct ClientGuard {
    ctx: AioContext,
    mask: ClientMask,
}

impl fmt::Debug for ClientGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientGuard")
            .field("mask", &self.mask)
            .finish()
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mask = self.mask;
        let reenable = move |ctx: &AioContext| {
            if let Err(e) = ctx.change_clients(mask, false) {
                log::error!("re-enabling clients {mask:?}: {e}");
            }
        };
        if self.ctx.in_home_thread() {
            reenable(&self.ctx);
        } else {
            self.ctx.bh_schedule_oneshot(reenable);
        }
    }
}
