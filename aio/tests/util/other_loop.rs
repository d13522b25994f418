//! A context running on a thread of its own, for cross-thread wake-ups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use aio::AioContext;

/// A context polled by its own thread until [`OtherLoop::stop`].
pub struct OtherLoop {
    ctx: AioContext,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl OtherLoop {
    /// Starts the thread and its context.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let ctx = AioContext::new().unwrap();
            tx.send(ctx.clone()).unwrap();
            ctx.poll_while(|| !s.load(Ordering::Acquire));
        });
        let ctx = rx.recv().unwrap();
        Self { ctx, stop, thread }
    }

    /// The thread's context (spawn tasks on it from anywhere).
    pub fn ctx(&self) -> AioContext {
        self.ctx.clone()
    }

    /// Stops the loop and joins its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.ctx.notify();
        self.thread.join().unwrap();
    }
}
