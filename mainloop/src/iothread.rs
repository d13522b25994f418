//! IOThreads: named threads, each running its own `AioContext`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use aio::{AioContext, Backend, ContextOptions, PollParams, VirtualClock};

use crate::error::{Error, Result};

/// Options for [`IOThread::spawn`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IOThreadOptions {
    /// Busy polling; QEMU's iothread default is `poll-max-ns=32768`.
    pub poll: PollParams,
    /// The fd monitor.
    pub backend: Backend,
    /// A virtual clock to share (qtest mode).
    pub virtual_clock: Option<VirtualClock>,
}

impl Default for IOThreadOptions {
    fn default() -> Self {
        Self {
            poll: PollParams::new(32_768),
            backend: Backend::Epoll,
            virtual_clock: None,
        }
    }
}

impl IOThreadOptions {
    /// QEMU's defaults: epoll, poll-max-ns 32768, grow/shrink 0.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the busy-polling parameters.
    pub fn poll_params(mut self, poll: PollParams) -> Self {
        self.poll = poll;
        self
    }
    /// Sets the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
    /// Shares `clock` as the thread's virtual clock.
    pub fn virtual_clock(mut self, clock: VirtualClock) -> Self {
        self.virtual_clock = Some(clock);
        self
    }
}

/// A thread running its own [`AioContext`] (QEMU's `-object iothread`).
///
/// Work reaches it through its context: spawn a task there, schedule a
/// bottom half, or move a task with [`aio::switch_to`]. [`stop`](IOThread::stop)
/// (or drop) cancels the context's tasks, stops the loop and joins the
/// thread: nothing is left running.
///
/// ```
/// let t = mainloop::IOThread::spawn("io0", mainloop::IOThreadOptions::new())?;
/// let caller = aio::AioContext::new()?;
/// let name = caller.block_on(t.context().spawn(async {
///     std::thread::current().name().map(str::to_string)
/// }))?;
/// assert_eq!(name.as_deref(), Some("io0"));
/// t.stop()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct IOThread {
    id: String,
    ctx: AioContext,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IOThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IOThread").field("id", &self.id).finish()
    }
}

impl IOThread {
    /// Starts a thread named `id` running a new context.
    pub fn spawn(id: &str, opts: IOThreadOptions) -> Result<IOThread> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let name = id.to_string();
        let thread = std::thread::Builder::new()
            .name(id.to_string())
            .spawn(move || {
                let mut copts = ContextOptions::new()
                    .backend(opts.backend)
                    .poll_params(opts.poll)
                    .name(name);
                if let Some(c) = opts.virtual_clock {
                    copts = copts.virtual_clock(c);
                }
                let ctx = match AioContext::with_options(copts) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if tx.send(Ok(ctx.clone())).is_err() {
                    return;
                }
                ctx.poll_while(|| !st.load(Ordering::SeqCst));
                ctx.cancel_tasks();
                // Run what cancelling scheduled (handle completions), then go.
                ctx.run_until_idle();
            })
            .map_err(|e| Error::IOThread {
                id: id.to_string(),
                reason: format!("spawning the thread: {e}"),
            })?;
        let ctx = match rx.recv() {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::IOThread {
                    id: id.to_string(),
                    reason: "the thread exited before creating its context".to_string(),
                });
            }
        };
        log::debug!("iothread {id} started");
        Ok(IOThread {
            id: id.to_string(),
            ctx,
            stop,
            thread: Some(thread),
        })
    }

    /// The iothread's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The iothread's context (a `Send + Sync` handle).
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// Stops the loop (cancelling its tasks) and joins the thread.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::SeqCst);
        self.ctx.notify();
        thread.join().map_err(|_| Error::IOThread {
            id: self.id.clone(),
            reason: "the thread panicked".to_string(),
        })?;
        log::debug!("iothread {} stopped", self.id);
        Ok(())
    }
}

impl Drop for IOThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            log::error!("{e}");
        }
    }
}
