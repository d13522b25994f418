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

use std::future::Future;
use std::pin::Pin;
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
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                if let Some(e) = weak.upgrade() {
                    e.complete();
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

    fn complete(&self) {
        let wakers = {
            let mut ring = self.ring.lock();
            if let Err(e) = ring.clear_eventfd() {
                log::error!("io_uring eventfd: {e}");
            }
            ring.reap()
        };
        for w in wakers {
            w.wake();
        }
    }
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
                let pushed = {
                    let mut ring = engine.ring.lock();
                    ring.push(op, cx.waker().clone()).map(|key| {
                        let now = ring.submitted_in_flight() < SUBMIT_NOW_BELOW;
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
