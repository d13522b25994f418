//! Bottom halves: callbacks scheduled from any thread, run by the context's
//! home thread on its next iteration, in the order they were scheduled.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::context::{notify_inner, Inner};
use crate::handler::Callback;
use crate::AioContext;

/// In the context's queue (set by whoever pushes it, cleared on dequeue).
const PENDING: u32 = 1 << 0;
/// Run the callback when dequeued (`cancel` clears it).
const SCHEDULED: u32 = 1 << 1;
/// The handle is gone: free without running.
const DELETED: u32 = 1 << 2;
/// Scheduled as idle work: does not count as progress, does not force a
/// zero timeout.
const IDLE: u32 = 1 << 3;
/// Dequeued by a nested poll while its own callback was running: schedule
/// again once the callback returns.
const DEFERRED: u32 = 1 << 4;

pub(crate) struct BhInner {
    flags: AtomicU32,
    oneshot: bool,
    cb: Mutex<Option<Callback>>,
    ctx: Weak<Inner>,
}

/// The queue of scheduled bottom halves (FIFO).
#[derive(Default)]
pub(crate) struct BhQueue {
    queue: Mutex<VecDeque<Arc<BhInner>>>,
    /// Length of `queue`, readable without the lock (a hint: exact under the
    /// lock, and published before the notify that announces a push).
    len: AtomicUsize,
}

impl BhQueue {
    fn push(&self, bh: Arc<BhInner>) {
        let mut q = self.queue.lock();
        q.push_back(bh);
        self.len.store(q.len(), Ordering::Release);
    }

    /// Whether anything may be queued (a hint, exact once the notification
    /// that announced a push has been accepted).
    pub(crate) fn maybe_pending(&self) -> bool {
        self.len.load(Ordering::Acquire) > 0
    }

    /// Moves everything queued to the back of `batch`.
    pub(crate) fn take_into(&self, batch: &mut VecDeque<Arc<BhInner>>) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut q = self.queue.lock();
        batch.append(&mut q);
        self.len.store(0, Ordering::Release);
    }

    /// Whether a bottom half that counts as work (not idle) is queued, and
    /// whether an idle one is.
    pub(crate) fn pending_kinds(&self) -> (bool, bool) {
        if self.len.load(Ordering::Acquire) == 0 {
            return (false, false);
        }
        kinds(self.queue.lock().iter())
    }
}

/// (any busy BH, any idle BH) among scheduled entries of `iter`.
pub(crate) fn kinds<'a>(iter: impl Iterator<Item = &'a Arc<BhInner>>) -> (bool, bool) {
    let (mut busy, mut idle) = (false, false);
    for bh in iter {
        let f = bh.flags.load(Ordering::Acquire);
        if f & SCHEDULED != 0 && f & DELETED == 0 {
            if f & IDLE != 0 {
                idle = true;
            } else {
                busy = true;
            }
        }
    }
    (busy, idle)
}

impl BhInner {
    pub(crate) fn new(ctx: Weak<Inner>, cb: Callback, oneshot: bool) -> Arc<Self> {
        Arc::new(Self {
            flags: AtomicU32::new(0),
            oneshot,
            cb: Mutex::new(Some(cb)),
            ctx,
        })
    }

    /// Sets `flags | PENDING | SCHEDULED`; queues and notifies if it was not
    /// already queued. Wait-free apart from the queue push.
    pub(crate) fn schedule(self: &Arc<Self>, extra: u32) {
        self.schedule_with(extra, true);
    }

    /// [`schedule`](BhInner::schedule), notifying the context only if
    /// `notify`. Without it, only the home thread may call this, and it
    /// must poll before it blocks (a scheduled bottom half makes that
    /// poll's timeout zero).
    pub(crate) fn schedule_with(self: &Arc<Self>, extra: u32, notify: bool) {
        let old = self
            .flags
            .fetch_or(PENDING | SCHEDULED | extra, Ordering::AcqRel);
        if old & DELETED != 0 {
            return;
        }
        if old & PENDING != 0 {
            // Still queued. If it had been cancelled, a poller may have
            // looked at it then and decided to block: tell it otherwise.
            if old & SCHEDULED == 0 && notify {
                if let Some(ctx) = self.ctx.upgrade() {
                    notify_inner(&ctx);
                }
            }
            return;
        }
        if let Some(ctx) = self.ctx.upgrade() {
            ctx.bhs.push(self.clone());
            if notify {
                notify_inner(&ctx);
            }
        }
    }

    /// Runs a dequeued bottom half. Returns whether it counted as progress.
    pub(crate) fn run(self: &Arc<Self>, ctx: &AioContext) -> bool {
        let old = self
            .flags
            .fetch_and(!(PENDING | SCHEDULED | IDLE), Ordering::AcqRel);
        if old & SCHEDULED == 0 || old & DELETED != 0 {
            return false;
        }
        let Some(mut cb) = self.cb.lock().take() else {
            // Its callback is running further up the stack (we are in a
            // nested poll): run it again when that returns, not now.
            self.flags.fetch_or(DEFERRED, Ordering::AcqRel);
            return false;
        };
        cb(ctx);
        let keep = {
            let mut slot = self.cb.lock();
            if self.oneshot || self.flags.load(Ordering::Acquire) & DELETED != 0 {
                false
            } else {
                *slot = Some(cb);
                true
            }
        };
        if keep && self.flags.fetch_and(!DEFERRED, Ordering::AcqRel) & DEFERRED != 0 {
            self.schedule(0);
        }
        // A callback that is not kept is dropped here, outside every lock.
        old & IDLE == 0
    }
}

/// A bottom half: a callback that any thread can schedule to run on the
/// context's home thread.
///
/// * Scheduling twice before it runs runs it once.
/// * Bottom halves run in the order they were scheduled.
/// * A bottom half that schedules itself from its callback runs again on the
///   *next* iteration, so it cannot starve the loop.
/// * Dropping the handle deletes it; a scheduled run is dropped.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
///
/// let ctx = aio::AioContext::new()?;
/// let runs = Arc::new(AtomicUsize::new(0));
/// let r = runs.clone();
/// let bh = ctx.bh_new(move |_ctx| { r.fetch_add(1, Ordering::Relaxed); });
/// bh.schedule();
/// bh.schedule();
/// assert!(ctx.poll(false));
/// assert_eq!(runs.load(Ordering::Relaxed), 1);
/// assert!(!ctx.poll(false));
/// # Ok::<(), aio::Error>(())
/// ```
pub struct Bh {
    inner: Arc<BhInner>,
}

impl Bh {
    pub(crate) fn from_inner(inner: Arc<BhInner>) -> Self {
        Self { inner }
    }

    /// Schedules the bottom half. Callable from any thread.
    pub fn schedule(&self) {
        self.inner.schedule(0);
    }

    /// Schedules without notifying the context: for its home thread only,
    /// which is running and sees the bottom half when it next polls.
    pub(crate) fn schedule_quiet(&self) {
        self.inner.schedule_with(0, false);
    }

    /// Schedules the bottom half as idle work: it runs on the next iteration
    /// but does not count as progress, and a blocking poll with only idle
    /// work waits up to 10 ms for something else first.
    pub fn schedule_idle(&self) {
        self.inner.schedule(IDLE);
    }

    /// Cancels a scheduled run. Racy against a run that already started, as
    /// in QEMU; a callback that has begun finishes.
    pub fn cancel(&self) {
        self.inner.flags.fetch_and(!SCHEDULED, Ordering::AcqRel);
    }

    /// Whether a run is scheduled and has not started.
    pub fn is_scheduled(&self) -> bool {
        self.inner.flags.load(Ordering::Acquire) & SCHEDULED != 0
    }
}

impl Drop for Bh {
    fn drop(&mut self) {
        self.inner.flags.fetch_or(DELETED, Ordering::AcqRel);
        // Take the callback out under the lock, drop it outside.
        let cb = self.inner.cb.lock().take();
        drop(cb);
    }
}

impl fmt::Debug for Bh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bh")
            .field("flags", &self.inner.flags.load(Ordering::Relaxed))
            .finish()
    }
}
