//! Several copy requests in flight per job, as QEMU's mirror operations
//! and block-copy tasks are: each request is a task on the job's context
//! (no thread of its own), and the window bounds how many run at once and
//! how many bytes they hold.
//!
//! The job loop stays the only place that decides what to copy next and
//! that applies progress, the rate limit, pauses and error policies: it
//! issues requests into the window in offset order and reaps them. Before
//! it sleeps for the rate limit or parks at a pause point it settles the
//! window, so a sleeping or paused job has no I/O in flight and what it
//! copied by then does not depend on completion order (replay on the
//! virtual clock stays deterministic).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use aio::{AioContext, JoinHandle};

use super::{handle_io_error, OnError};
use crate::block::BoxFuture;
use crate::job::{IoOperation, JobControl};
use crate::{Error, Result};

/// A request's outcome: bytes copied, or the failing direction and error.
pub(crate) type CopyResult = std::result::Result<u64, (IoOperation, Error)>;

/// A finished request: its range and outcome.
pub(crate) struct Done {
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) result: CopyResult,
}

struct Op {
    off: u64,
    len: u64,
    handle: JoinHandle<CopyResult>,
}

/// The requests in flight of one job.
pub(crate) struct Window {
    ctx: AioContext,
    ops: Vec<Op>,
    max_ops: usize,
    max_bytes: u64,
    bytes: u64,
}

impl Window {
    /// At most `max_ops` requests and `max_bytes` bytes at once (a single
    /// request may be larger than `max_bytes`).
    pub(crate) fn new(ctx: &AioContext, max_ops: usize, max_bytes: u64) -> Self {
        Window {
            ctx: ctx.clone(),
            ops: Vec::new(),
            max_ops: max_ops.max(1),
            max_bytes,
            bytes: 0,
        }
    }

    /// Whether nothing is in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes in flight.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a request of `len` bytes may start now.
    pub(crate) fn fits(&self, len: u64) -> bool {
        self.ops.is_empty() || (self.ops.len() < self.max_ops && self.bytes + len <= self.max_bytes)
    }

    /// Whether a request in flight overlaps `[off, off + len)`.
    pub(crate) fn overlaps(&self, off: u64, len: u64) -> bool {
        self.ops
            .iter()
            .any(|o| o.off < off + len && off < o.off + o.len)
    }

    /// Starts `fut`, the request for `[off, off + len)`, on the job's
    /// context.
    pub(crate) fn spawn(
        &mut self,
        off: u64,
        len: u64,
        fut: impl Future<Output = CopyResult> + Send + 'static,
    ) {
        self.bytes += len;
        self.ops.push(Op {
            off,
            len,
            handle: self.ctx.spawn(fut),
        });
    }

    /// Waits for one request to finish; `None` when none is in flight.
    pub(crate) async fn next(&mut self) -> Option<Done> {
        if self.ops.is_empty() {
            return None;
        }
        let i = Any { ops: &mut self.ops }.await;
        let op = self.ops.swap_remove(i.0);
        self.bytes -= op.len;
        let result = i.1.unwrap_or_else(|e| {
            Err((
                IoOperation::Read,
                Error::Job(format!("copy request failed: {e}")),
            ))
        });
        Some(Done {
            off: op.off,
            len: op.len,
            result,
        })
    }

    /// Waits for every request in flight; outcomes in completion order.
    pub(crate) async fn drain(&mut self) -> Vec<Done> {
        let mut v = Vec::new();
        while let Some(d) = self.next().await {
            v.push(d);
        }
        v
    }

    /// Reaps one finished request (all of them with `all`, or once one
    /// failed): progress for successes (unless `progress` is false: the
    /// caller counts), `failed(off, len)` for failures (to retry them) and
    /// the error policy for the first failure (`Err` fails the job; the
    /// others are logged: their ranges are retried and fail again if the
    /// error persists).
    pub(crate) async fn reap(
        &mut self,
        job: &JobControl,
        all: bool,
        progress: bool,
        policy: impl Fn(IoOperation) -> OnError,
        mut failed: impl FnMut(u64, u64),
    ) -> Result<()> {
        let mut done = if all {
            self.drain().await
        } else {
            self.next().await.into_iter().collect()
        };
        if done.iter().any(|d| d.result.is_err()) {
            done.extend(self.drain().await);
        }
        let mut first = None;
        for d in done {
            match d.result {
                Ok(_) => {
                    if progress {
                        job.add_progress(d.len);
                    }
                }
                Err(e) => {
                    failed(d.off, d.len);
                    if first.is_none() {
                        first = Some(e);
                    } else {
                        log::warn!("job {}: {}", job.id(), e.1);
                    }
                }
            }
        }
        match first {
            Some((op, e)) => handle_io_error(job, policy(op), op, e).await,
            None => Ok(()),
        }
    }
}

/// Waits for the first of `ops` to finish: its index and output.
struct Any<'a> {
    ops: &'a mut Vec<Op>,
}

impl Future for Any<'_> {
    type Output = (usize, aio::Result<CopyResult>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        for (i, op) in self.ops.iter_mut().enumerate() {
            if let Poll::Ready(r) = Pin::new(&mut op.handle).poll(cx) {
                return Poll::Ready((i, r));
            }
        }
        Poll::Pending
    }
}

/// What stream and commit copy, chunk by chunk.
pub(crate) trait ChunkCopy {
    /// Whether to copy at `off`, and for how many bytes (≥ 1, ≤ `want`)
    /// the answer holds. An error is a read error.
    fn plan(&self, off: u64, want: u64) -> BoxFuture<'_, Result<(bool, u64)>>;
    /// The request copying `[off, off + len)`.
    fn copy(&self, off: u64, len: u64) -> BoxFuture<'static, CopyResult>;
}

/// Requests of one chunk (QEMU's 512 KiB) that stream and commit keep in
/// flight: a read and a write overlap, where QEMU copies one chunk at a
/// time. More did not help. With 8 (before stop 17), 1 GiB 5-round runs
/// against qemu-storage-daemon gave stream 2.13x and commit 1.29x on
/// tmpfs, and 1.24x and 1.07x on disk. With 2: 2.66x and 1.58x, 1.46x and
/// 1.07x. On tmpfs the CPU is the limit, and 8 concurrent 512 KiB copies
/// on two cores got in each other's way. With 1, nothing overlaps
/// (1.59x / 1.18x on tmpfs). docs/benchmarks.md, "Chunks in flight
/// (stop 17)".
pub(crate) const CHUNKS_IN_FLIGHT: usize = 2;

/// The loop of stream and commit over `[0, len)`: plans chunk by chunk in
/// offset order, keeps up to [`CHUNKS_IN_FLIGHT`] copies in flight, counts
/// progress for every byte planned (skipped now, copied when done),
/// charges the rate limit with the bytes copied, and retries failed
/// ranges after the error policy (`on_error` for both directions) let it.
pub(crate) async fn copy_chunks(
    job: &JobControl,
    len: u64,
    chunk: u64,
    on_error: OnError,
    what: &impl ChunkCopy,
) -> Result<()> {
    let mut win = Window::new(
        job.context(),
        CHUNKS_IN_FLIGHT,
        chunk * CHUNKS_IN_FLIGHT as u64,
    );
    let r = copy_chunks_in(job, len, chunk, on_error, what, &mut win).await;
    win.drain().await;
    r
}

async fn copy_chunks_in(
    job: &JobControl,
    len: u64,
    chunk: u64,
    on_error: OnError,
    what: &impl ChunkCopy,
    win: &mut Window,
) -> Result<()> {
    let policy = |_| on_error;
    let mut retry: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    loop {
        if job.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if job.pause_requested() {
            win.reap(job, true, true, policy, |o, l| retry.push((o, l)))
                .await?;
            job.pause_point().await;
            continue;
        }
        if !win.fits(chunk) {
            win.reap(job, false, true, policy, |o, l| retry.push((o, l)))
                .await?;
            continue;
        }
        let (at, want, fresh) = match retry.pop() {
            Some((o, l)) => (o, l, false),
            None if off < len => (off, chunk.min(len - off), true),
            None if win.is_empty() => return Ok(()),
            None => {
                win.reap(job, false, true, policy, |o, l| retry.push((o, l)))
                    .await?;
                continue;
            }
        };
        let (copy, n) = match what.plan(at, want).await {
            Ok(x) => x,
            Err(e) => {
                if !fresh {
                    retry.push((at, want));
                }
                win.reap(job, true, true, policy, |o, l| retry.push((o, l)))
                    .await?;
                handle_io_error(job, on_error, IoOperation::Read, e).await?;
                continue;
            }
        };
        if fresh {
            off += n;
        } else if n < want {
            retry.push((at + n, want - n));
        }
        if !copy {
            job.add_progress(n);
            // Block status may answer from the cache: let others run.
            aio::yield_now().await;
            continue;
        }
        win.spawn(at, n, what.copy(at, n));
        if job.over_limit(n) {
            win.reap(job, true, true, policy, |o, l| retry.push((o, l)))
                .await?;
            job.rate_limit(0).await;
        }
    }
}
