//! The io_uring file engine: requests are submitted from the home thread of
//! the context the calling task runs on, and completions are reaped by an
//! fd handler on the ring's own fd — no thread of its own.
//!
//! Submission depends on where a request goes. A request for a device
//! (`O_DIRECT`, [`Submit::Now`]) is handed to the kernel the moment it is
//! issued: one that waited to join a batch is one the device was not
//! working on, and an idle device is what limits throughput there
//! (measured on a virtio disk, 4 KiB random I/O at depth 32: one by one
//! ran 15–40% faster than the 32 resumed requests in one batch). A
//! buffered request ([`Submit::Batch`]) is served from memory, by this
//! thread or the kernel's workers, so the submitting thread's CPU is what
//! limits it and batching saves syscalls (measured on tmpfs: batches ran
//! ~4% faster than one by one): while the kernel has few requests
//! ([`SUBMIT_NOW_BELOW`]) a new one is still handed over at once; with more
//! in flight it only queues an SQE and schedules a bottom half that hands
//! every queued SQE over in one `io_uring_enter`, so a burst of requests
//! issued by tasks in one iteration costs one syscall.
//!
//! Completions resume their tasks in the same loop iteration: the ring fd's
//! handler (or the check every poll makes after its wait, [`reap_ready`])
//! reaps the ring and wakes the tasks, and the outermost poll runs this
//! context's queued tasks right after its fd handlers (not one iteration
//! later from the runner bottom half); the requests they issue are queued
//! and handed to the kernel in one `io_uring_enter` when they are done,
//! and what completed meanwhile is reaped right after it
//! ([`resume_tasks`]). A device that completes part of a batch so gets the
//! follow-up requests without waiting for more loop iterations, and a
//! wake-up costs one wait and one submission (no eventfd read: the ring fd
//! is polled, and it stops being readable once the ring is reaped).

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
/// Most rounds of resume, submit, reap that one loop iteration runs.
const RESUME_ROUNDS: usize = 4;

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
    /// The engine of `ctx`, created (and its ring fd handler registered) on
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
        let fd = ring.poll_fd();
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
        ctx.inner().uring_peek.store(true, Ordering::Relaxed);
        Ok(engine)
    }

    /// `io_uring_enter` calls that handed requests over so far.
    pub(crate) fn submits(&self) -> u64 {
        self.ring.lock().submits()
    }

    /// Hands what is queued to the kernel, then wakes the tasks of
    /// completions that a full completion queue made it reap.
    fn submit(&self) {
        let unwoken = {
            let mut ring = self.ring.lock();
            if ring.has_queued() {
                if let Err(e) = ring.submit() {
                    log::error!("io_uring submit: {e}");
                }
            }
            ring.take_unwoken()
        };
        wake_all(unwoken);
    }

    /// Reaps whatever completed and wakes those tasks; returns whether it
    /// woke any. Checks the ring's shared memory first, so with nothing to
    /// reap it costs no syscall.
    ///
    /// The tasks are woken without notifying `ctx` (home thread only): they
    /// run before the home thread next blocks, from [`resume_tasks`] or
    /// from the runner bottom half that the next poll sees scheduled, so a
    /// notification would only make that poll's wait return at once.
    fn reap_and_wake(&self, ctx: &AioContext) -> bool {
        let wakers = {
            let mut ring = self.ring.lock();
            if !ring.has_completions() {
                return false;
            }
            ring.reap()
        };
        let woke = !wakers.is_empty();
        ctx.inner().executor.waking_quietly(|| wake_all(wakers));
        woke
    }

    /// The ring fd's handler, and the check after every wait
    /// ([`reap_ready`]): reaps completions and wakes their tasks; the
    /// outermost poll then resumes them in this iteration
    /// ([`resume_tasks`]), once no handler is on the stack, so a resumed
    /// task may still `block_on` a request of its own.
    fn complete(&self, ctx: &AioContext) -> bool {
        if !self.reap_and_wake(ctx) {
            return false;
        }
        if ctx.poll_depth() == 1 {
            ctx.inner()
                .resume_after_dispatch
                .store(true, Ordering::Relaxed);
        }
        true
    }
}

fn wake_all(wakers: Vec<std::task::Waker>) {
    for w in wakers {
        w.wake();
    }
}

/// Called by every poll of a context that has a ring, after its fd
/// handlers: reaps completions that are in the ring but that the wait did
/// not report. The common case is a wait cut short by `EINTR`: completions
/// of `O_DIRECT` requests are posted by task work, which interrupts the
/// sleeping thread and runs on its way back to user space, so when the
/// wait returns (with no events) they are already in the ring. Reaping
/// them here saves the second wait that would report the ring fd.
/// Nothing is lost by reaping without being told: the ring fd is
/// level-triggered on the ring's contents, so a wait reports it exactly
/// while something is left to reap. Returns whether tasks were woken.
pub(crate) fn reap_ready(ctx: &AioContext) -> bool {
    let engine = ctx.inner().uring_io.lock().clone();
    engine.is_some_and(|e| e.complete(ctx))
}

/// Runs the tasks the completion handler woke (and whatever else is queued
/// on `ctx`) now, then hands every request they issued to the kernel in one
/// `io_uring_enter`. Called by the outermost poll after its fd handlers.
///
/// Completions that arrived meanwhile are usually in the ring when that
/// `io_uring_enter` returns (their task work runs on its way back), so they
/// are reaped and their tasks resumed at once, up to [`RESUME_ROUNDS`]
/// rounds: a device that completes requests one by one is fed one by one,
/// without a wait per round. The bound keeps other fds, bottom halves and
/// timers from starving behind a ring that never runs dry (tmpfs reads
/// complete inside the submission).
pub(crate) fn resume_tasks(ctx: &AioContext) {
    let engine = ctx.inner().uring_io.lock().clone();
    let Some(engine) = engine else {
        ctx.run_tasks_now();
        return;
    };
    for round in 1..=RESUME_ROUNDS {
        engine.deferring.store(true, Ordering::Relaxed);
        ctx.run_tasks_now();
        engine.deferring.store(false, Ordering::Relaxed);
        // The submit bottom half (scheduled by each deferred request, so a
        // nested poll in a resumed task submits before it waits) has
        // nothing left to do after this.
        engine.submit_bh.cancel();
        engine.submit();
        if round == RESUME_ROUNDS || !engine.reap_and_wake(ctx) {
            break;
        }
    }
}

enum State {
    Start(IoOp, Submit),
    Waiting {
        engine: Arc<UringEngine>,
        key: usize,
    },
    Done,
}

/// When a request is handed to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Submit {
    /// At once: the request goes to a device (`O_DIRECT`).
    Now,
    /// With the other requests of this loop iteration, once the kernel
    /// has [`SUBMIT_NOW_BELOW`] or more: the request is served from memory.
    Batch,
}

/// One request as a future: submitted on first poll, on the current
/// context's ring.
pub(crate) struct UringOp {
    state: State,
}

impl UringOp {
    pub(crate) fn new(op: IoOp, submit: Submit) -> Self {
        Self {
            state: State::Start(op, submit),
        }
    }
}

impl Future for UringOp {
    type Output = Result<Completion>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Completion>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start(op, submit) => {
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
                let (pushed, unwoken) = {
                    let mut ring = engine.ring.lock();
                    let pushed = ring.push(op, cx.waker().clone()).map(|key| {
                        let now = submit == Submit::Now
                            || (!deferred && ring.submitted_in_flight() < SUBMIT_NOW_BELOW);
                        if now {
                            if let Err(e) = ring.submit() {
                                log::error!("io_uring submit: {e}");
                            }
                        }
                        (key, now)
                    });
                    (pushed, ring.take_unwoken())
                };
                wake_all(unwoken);
                match pushed {
                    Ok((key, submitted)) => {
                        if !submitted {
                            // Quietly: this is the home thread, which sees
                            // the bottom half before it blocks (or submits
                            // and cancels it in `resume_tasks`), and a
                            // notification would only cost an empty wait.
                            engine.submit_bh.schedule_quiet();
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
