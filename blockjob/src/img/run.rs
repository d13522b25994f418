//! Running one job to its end from a command: progress bar, completing a
//! READY job, and cancelling it on SIGINT/SIGTERM.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{AioContext, ClientType, ClockType, FdHandler, SignalFd};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::block::BlockGraph;
use crate::job::{BoxFuture, Job, JobControl, JobStatus};
use crate::jobs::CHUNK;
use crate::{Error, Result};

/// What every job command takes.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RunOptions {
    /// The image's (or source's) format (`-f`; `None`: probed).
    pub format: Option<String>,
    /// Speed limit, bytes/s (0: none).
    pub speed: u64,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

impl RunOptions {
    /// Probed format, no limit, no bar.
    pub fn new() -> Self {
        Self::default()
    }
}

/// How often the command looks at its job (progress, READY, end).
const TICK_NS: i64 = 50_000_000;

/// SIGINT and SIGTERM, queued on a signalfd from the moment a command
/// starts until it ends (the process exits then).
///
/// Install it before anything spawns a thread (the first file I/O starts
/// the thread pool): threads inherit the blocked mask, so no thread gets
/// the default action (death with a dirty image).
pub(crate) struct Interrupt {
    sfd: Arc<SignalFd>,
    hit: Arc<AtomicBool>,
}

impl Interrupt {
    pub(crate) fn install() -> Result<Self> {
        let sfd = SignalFd::new(&[libc::SIGINT, libc::SIGTERM])
            .map_err(|e| Error::Failed(format!("cannot watch for Ctrl-C: {e}")))?;
        Ok(Self {
            sfd: Arc::new(sfd),
            hit: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// Waits for `job` to end: updates the bar, completes the job once it is
/// READY (active commit), and cancels it when a signal arrives. `what`
/// names the command and its image for messages: `commit of 'top.qcow2'`.
///
/// # Errors
///
/// `WHAT: interrupted ...` after a signal (even one that came as the job
/// was finishing: the caller then skips its own last steps); `WHAT:
/// REASON` if the job failed.
pub(crate) async fn run_job(
    ctx: &AioContext,
    job: &Job,
    intr: &Interrupt,
    what: &str,
    opts: &RunOptions,
) -> Result<()> {
    let fd = intr.sfd.as_raw_fd();
    let (sfd, hit, j) = (intr.sfd.clone(), intr.hit.clone(), job.clone());
    let on_signal = FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
        while let Ok(Some(sig)) = sfd.read() {
            log::info!("signal {sig}: cancelling job '{}'", j.id());
            hit.store(true, Ordering::Release);
            // Refused only once the job is already finishing.
            if let Err(e) = j.cancel(false) {
                log::debug!("cancel: {e}");
            }
        }
    });
    ctx.set_fd_handler(fd, Some(on_signal))
        .map_err(|e| Error::Failed(format!("cannot watch for Ctrl-C: {e}")))?;
    let bar = opts.progress.then(progress_bar);
    let mut completing = false;
    let info = loop {
        let info = job.info();
        if let Some(b) = &bar {
            b.set_length(info.total.max(1));
            b.set_position(info.current.min(info.total));
        }
        if matches!(info.status, JobStatus::Concluded | JobStatus::Null) {
            break info;
        }
        if info.status == JobStatus::Ready && !completing && !intr.hit.load(Ordering::Acquire) {
            completing = true;
            if let Err(e) = job.complete() {
                // Not expected in READY; end the job rather than wait.
                log::warn!("job '{}': complete: {e}", job.id());
                if let Err(e) = job.cancel(true) {
                    log::debug!("cancel: {e}");
                }
            }
        }
        ctx.sleep_ns(ClockType::Realtime, TICK_NS).await;
    };
    if let Err(e) = ctx.set_fd_handler(fd, None) {
        log::debug!("removing the signal handler: {e}");
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if intr.hit.load(Ordering::Acquire) {
        return Err(Error::Failed(format!(
            "{what}: interrupted; the images are consistent, run the command again to finish"
        )));
    }
    match info.error {
        Some(e) => Err(Error::Failed(format!("{what}: {e}"))),
        None => Ok(()),
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{wide_bar} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Closes every node of `g` (clearing qcow2 dirty bits) whatever `r` is;
/// `r`'s error first.
pub(crate) async fn close_after<T>(g: &BlockGraph, r: Result<T>) -> Result<T> {
    let closed = g.close_all().await;
    let v = r?;
    closed?;
    Ok(v)
}

/// A job that walks its image in chunks.
pub(crate) trait ChunkStep: Send + Sync {
    /// Handles up to `want` bytes at `off`: how many bytes it covered
    /// (at least 1) and how many it wrote (for the speed limit).
    fn step(&self, off: u64, want: u64) -> BoxFuture<'_, Result<(u64, u64)>>;
}

/// The loop of a chunked job over `len` bytes: progress, cancel checks,
/// the speed limit (which includes a pause point).
pub(crate) async fn run_chunks(s: &dyn ChunkStep, job: &JobControl, len: u64) -> Result<()> {
    job.set_total(len);
    let mut off = 0;
    while off < len {
        if job.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let (n, written) = s.step(off, CHUNK.min(len - off)).await?;
        off += n;
        job.add_progress(n);
        job.rate_limit(written).await;
    }
    Ok(())
}
