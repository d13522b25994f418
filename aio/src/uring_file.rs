//! The io_uring file engine: requests are submitted from the home thread of
//! the context the calling task runs on, and completions are reaped by an
//! fd handler on that context's eventfd — no thread of its own.
//!
//! Submission adapts to the queue: while the device has few requests
//! ([`SUBMIT_NOW_BELOW`]), a new request is handed to the kernel at once, so
//! a device never idles waiting for the loop's next iteration; with more in
//! flight, a request only queues an SQE and schedules a bottom half that
//! hands every queued SQE over in one `io_uring_enter`, so a burst of
//! requests issued by tasks in one iteration costs one syscall.
//!
//! Completions resume their tasks in the same loop iteration: the eventfd
//! handler reaps the ring and wakes the tasks, and the outermost poll runs
//! this context's queued tasks right after its fd handlers (not one
//! iteration later from the runner bottom half); the requests they issue
//! are queued and handed to the kernel in one `io_uring_enter` when they
//! are done. A device that completes part of a batch so gets the follow-up
//! requests without waiting for two more loop iterations (runner, submit
//! bottom half), and a completion costs one wait, one eventfd read and one
//! submission.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use parking_lot::Mutex;

use crate::bh::Bh;
use crate::error::{Error, IoContext, Result};
use crate::handler::{ClientType, FdHandler};
use crate::sys::uring_io::{Completion, IoOp, IoRing};
use crate::AioContext;

const RING_ENTRIES: u32 = 256;
/// Submit at once while fewer requests than this are with the kernel.
pub(crate) const SUBMIT_NOW_BELOW: usize = 8;

/// One context's file-I/O ring.
pub(crate) struct UringEngine {
    ring: Mutex<IoRing>,
    submit_bh: Bh,
    /// Set while [`resume_tasks`] runs tasks: their requests are only
    /// queued, and it submits them all when the tasks are done.
    /// Home thread only (relaxed).
    deferring: AtomicBool,
}

impl UringEngine {
    /// The engine of `ctx`, created (and its eventfd handler registered) on
    /// first use. Home thread only.
    pub(crate) fn of(ctx: &AioContext) -> Result<Arc<UringEngine>> {
        let slot = ctx.inner().uring_io.lock();
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let ring = IoRing::new(RING_ENTRIES).context(|| {
            format!(
                "creating the io_uring file engine of context {}",
                ctx.name()
            )
        })?;
        let fd = ring.eventfd();
        let engine = Arc::new_cyclic(|weak: &Weak<UringEngine>| {
            let w = weak.clone();
            UringEngine {
                ring: Mutex::new(ring),
                deferring: AtomicBool::new(false),
                submit_bh: ctx.bh_new(move |_| {
                    if let Some(e) = w.upgrade() {
                        e.submit();
                    }
                }),
            }
        });
        let weak = Arc::downgrade(&engine);
        drop(slot);
        ctx.set_fd_handler(
            fd,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |ctx| {
                if let Some(e) = weak.upgrade() {
                    e.complete(ctx);
                }
            })),
        )?;
        *ctx.inner().uring_io.lock() = Some(engine.clone());
        Ok(engine)
    }

    fn submit(&self) {
        let mut ring = self.ring.lock();
        if ring.has_queued() {
            if let Err(e) = ring.submit() {
                log::error!("io_uring submit: {e}");
            }
        }
    }

    /// The eventfd handler: reaps completions and wakes their tasks; the
    /// outermost poll then resumes them in this iteration
    /// ([`resume_tasks`]), once no handler is on the stack, so a resumed
    /// task may still `block_on` a request of its own.
    fn complete(&self, ctx: &AioContext) {
        let wakers = {
            let mut ring = self.ring.lock();
            if let Err(e) = ring.clear_eventfd() {
                log::error!("io_uring eventfd: {e}");
            }
            ring.reap()
        };
        if wakers.is_empty() {
            return;
        }
        for w in wakers {
            w.wake();
        }
        if ctx.poll_depth() == 1 {
            ctx.inner()
                .resume_after_dispatch
                .store(true, Ordering::Relaxed);
        }
    }
}

/// Runs the tasks the completion handler woke (and whatever else is queued
/// on `ctx`) now, then hands every request they issued to the kernel in one
/// `io_uring_enter`. Called by the outermost poll after its fd handlers.
pub(crate) fn resume_tasks(ctx: &AioContext) {
    let engine = ctx.inner().uring_io.lock().clone();
    let Some(engine) = engine else {
        ctx.run_tasks_now();
        return;
    };
    engine.deferring.store(true, Ordering::Relaxed);
    ctx.run_tasks_now();
    engine.deferring.store(false, Ordering::Relaxed);
    // The submit bottom half (scheduled by each deferred request, so a
    // nested poll in a resumed task submits before it waits) has nothing
    // left to do after this.
    engine.submit_bh.cancel();
    engine.submit();
}

enum State {
    Start(IoOp),
    Waiting {
        engine: Arc<UringEngine>,
        key: usize,
    },
    Done,
}

/// One request as a future: submitted on first poll, on the current
/// context's ring.
pub(crate) struct UringOp {
    state: State,
}

impl UringOp {
    pub(crate) fn new(op: IoOp) -> Self {
        Self {
            state: State::Start(op),
        }
    }
}

impl Future for UringOp {
    type Output = Result<Completion>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Completion>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start(op) => {
                let Some(ctx) = AioContext::current() else {
                    return Poll::Ready(Err(Error::NotInTask));
                };
                let engine = match UringEngine::of(&ctx) {
                    Ok(e) => e,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                // In the completion handler the request waits for the
                // handler's one submission; the bottom half is still
                // scheduled, so a nested poll (`block_on` in a resumed task)
                // submits it before it waits.
                let deferred = engine.deferring.load(Ordering::Relaxed);
                let pushed = {
                    let mut ring = engine.ring.lock();
                    ring.push(op, cx.waker().clone()).map(|key| {
                        let now = !deferred && ring.submitted_in_flight() < SUBMIT_NOW_BELOW;
                        if now {
                            if let Err(e) = ring.submit() {
                                log::error!("io_uring submit: {e}");
                            }
                        }
                        (key, now)
                    })
                };
                match pushed {
                    Ok((key, submitted)) => {
                        if !submitted {
                            engine.submit_bh.schedule();
                        }
                        self.state = State::Waiting { engine, key };
                        Poll::Pending
                    }
                    Err(e) => Poll::Ready(Err(e).context(|| "queueing an io_uring request".into())),
                }
            }
            State::Waiting { engine, key } => {
                let done = engine.ring.lock().take(key, cx.waker());
                match done {
                    Some(c) => Poll::Ready(Ok(c)),
                    None => {
                        self.state = State::Waiting { engine, key };
                        Poll::Pending
                    }
                }
            }
            State::Done => Poll::Ready(Err(Error::TaskCancelled)),
        }
    }
}

impl Drop for UringOp {
    fn drop(&mut self) {
        if let State::Waiting { engine, key } = &self.state {
            engine.ring.lock().abandon(*key);
        }
    }
}
