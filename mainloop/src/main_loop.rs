//! The main loop: the main context and the iohandler context.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{AioContext, Backend, ClientType, ContextOptions, FdHandler, SignalFd, VirtualClock};

use crate::error::Result;

/// Options for [`MainLoop::new`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct MainLoopOptions {
    /// Backend of the main context (the iohandler context always uses
    /// epoll, which has the pollable fd the main context watches).
    pub backend: Backend,
    /// A virtual clock to share with both contexts (qtest mode).
    pub virtual_clock: Option<VirtualClock>,
}

impl MainLoopOptions {
    /// The defaults: epoll, own virtual clock.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the main context's backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
    /// Shares `clock` as the virtual clock of both contexts.
    pub fn virtual_clock(mut self, clock: VirtualClock) -> Self {
        self.virtual_clock = Some(clock);
        self
    }
}

/// A cloneable, `Send + Sync` handle that stops [`MainLoop::run`].
#[derive(Clone, Debug)]
pub struct QuitHandle {
    flag: Arc<AtomicBool>,
    ctx: AioContext,
}

impl QuitHandle {
    /// Makes `run()` return after the current iteration. Callable from any
    /// thread and from callbacks.
    pub fn quit(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.ctx.notify();
    }

    /// Whether `quit` was called.
    pub fn is_quit(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// The process's main loop, as in QEMU: the main `AioContext` (block layer,
/// jobs, bottom halves) and the *iohandler* context for clients that
/// nested block-layer polls must never run — the QMP monitor and signals.
///
/// The iohandler context is attached to the main one
/// ([`AioContext::attach_child`]): only the outermost poll of the main
/// context (the one [`run`](MainLoop::run) makes) runs it. A drain or a
/// synchronous wait inside a callback polls the main context nested and
/// so cannot start a new monitor command.
///
/// Both contexts have the thread that created the `MainLoop` as home.
///
/// ```
/// let ml = mainloop::MainLoop::new(mainloop::MainLoopOptions::new())?;
/// let quit = ml.quit_handle();
/// ml.iohandler_context().bh_schedule_oneshot(move |_| quit.quit());
/// ml.run(); // returns once the bottom half ran
/// # Ok::<(), mainloop::Error>(())
/// ```
pub struct MainLoop {
    main: AioContext,
    iohandler: AioContext,
    quit: QuitHandle,
    signals: Option<Arc<SignalFd>>,
}

impl std::fmt::Debug for MainLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MainLoop")
            .field("main", &self.main)
            .field("iohandler", &self.iohandler)
            .finish()
    }
}

impl MainLoop {
    /// Creates the two contexts on the calling thread.
    pub fn new(opts: MainLoopOptions) -> Result<Self> {
        let clock = opts.virtual_clock.unwrap_or_default();
        let main = AioContext::with_options(
            ContextOptions::new()
                .backend(opts.backend)
                .virtual_clock(clock.clone())
                .name("main"),
        )?;
        let iohandler = AioContext::with_options(
            ContextOptions::new()
                .backend(Backend::Epoll)
                .virtual_clock(clock)
                .name("iohandler"),
        )?;
        main.attach_child(&iohandler)?;
        let quit = QuitHandle {
            flag: Arc::new(AtomicBool::new(false)),
            ctx: main.clone(),
        };
        Ok(Self {
            main,
            iohandler,
            quit,
            signals: None,
        })
    }

    /// The main context: block layer, jobs, the default for new work.
    pub fn main_context(&self) -> &AioContext {
        &self.main
    }

    /// The iohandler context: monitor connections, signals.
    pub fn iohandler_context(&self) -> &AioContext {
        &self.iohandler
    }

    /// A handle that stops [`run`](MainLoop::run).
    pub fn quit_handle(&self) -> QuitHandle {
        self.quit.clone()
    }

    /// Runs the loop until [`QuitHandle::quit`] is called.
    pub fn run(&self) {
        while !self.quit.is_quit() {
            self.main.poll(true);
        }
    }

    /// Runs the loop until `cond` returns true or quit is called. Returns
    /// whether `cond` became true.
    pub fn run_until(&self, mut cond: impl FnMut() -> bool) -> bool {
        loop {
            if cond() {
                return true;
            }
            if self.quit.is_quit() {
                return false;
            }
            self.main.poll(true);
        }
    }

    /// Delivers `signals` (e.g. `SIGINT`, `SIGTERM`) through a signalfd on
    /// the iohandler context: `handler` runs there, in the outermost loop,
    /// once per signal received. Call it before spawning other threads: the
    /// signals are blocked in this thread, and threads spawned later inherit
    /// the mask. Replaces an earlier registration.
    pub fn handle_signals(
        &mut self,
        signals: &[i32],
        mut handler: impl FnMut(i32) + Send + 'static,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        let sfd = Arc::new(SignalFd::new(signals)?);
        if let Some(old) = self.signals.take() {
            self.iohandler.set_fd_handler(old.as_raw_fd(), None)?;
        }
        let reader = sfd.clone();
        self.iohandler.set_fd_handler(
            sfd.as_raw_fd(),
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| loop {
                match reader.read() {
                    Ok(Some(sig)) => handler(sig),
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("{e}");
                        break;
                    }
                }
            })),
        )?;
        self.signals = Some(sfd);
        Ok(())
    }
}

impl Drop for MainLoop {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let Some(sfd) = self.signals.take() {
            let _ = self.iohandler.set_fd_handler(sfd.as_raw_fd(), None);
        }
        // Tasks may hold handles to their own context; drop them so the
        // contexts are freed.
        self.iohandler.cancel_tasks();
        self.main.cancel_tasks();
    }
}
