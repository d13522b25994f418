//! `blockdev-backup` (QEMU's `block/backup.c`, `block-copy.c`,
//! `copy-before-write.c`): a point-in-time copy of the source, as of job
//! creation, into the target while the guest keeps writing.
//!
//! A copy-before-write hook on the source node copies a cluster's old
//! data to the target before a guest write changes it; the background
//! loop copies every cluster not yet copied, up to `x-perf.max-workers`
//! (64) copies of at most 1 MiB and [`DEFAULT_BYTES_IN_FLIGHT`] in
//! flight. Both claim clusters in one
//! per-cluster state map (to copy, being copied, copied), so each cluster
//! is copied exactly once and always with its data as of job start: a
//! guest write to a cluster being copied waits for that copy.
//!
//! Incremental backup (`sync: incremental` / `bitmap` with a `bitmap`):
//! only clusters dirty in the node's bitmap at job start are copied.
//! The bitmap is frozen (busy) while the job runs and keeps recording;
//! a successor records the guest writes made meanwhile. At the end, as
//! QEMU's `backup_cleanup_sync_bitmap`: if the job succeeded or
//! `bitmap-mode` is `always` (and it is not `never`), the bitmap becomes
//! the successor — what was written since the job started — plus, after a
//! failure with `always`, the clusters not copied; otherwise it keeps
//! everything (its old bits and the new writes). `full` and `top` with a
//! bitmap use it only as that output.
//!
//! Not implemented (refused): `compress`, `discard-source`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aio::{AioContext, CoQueue};
use parking_lot::Mutex;
use serde::Deserialize;

use super::pool::BufPool;
use super::window::{CopyResult, Window};
use super::{
    check_speed, copy_range, find_device, handle_io_error, job_options, yes, Held, Holds, OnError,
    SyncMode,
};
use crate::block::bitmap::{Bits, Check};
use crate::block::{
    BlockGraph, BlockNode, BoxFuture as NodeFuture, DirtyBitmap, FilterKind, FilterOptions, Perm,
    WriteHook,
};
use crate::job::{BoxFuture, IoOperation, Job, JobControl, JobDriver, JobRegistry, JobType};
use crate::{Error, Result};

/// QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`: 64 KiB.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;
/// QEMU's `BLOCK_COPY_MAX_WORKERS`: copies in flight by default.
const MAX_WORKERS: i64 = 64;
/// QEMU's `BLOCK_COPY_MAX_BUFFER`: the largest copy, 1 MiB.
const MAX_BUFFER: u64 = 1 << 20;
/// QEMU's `BLOCK_COPY_MAX_MEM`: bytes in flight at most, 128 MiB, when
/// `x-perf.max-workers` asks for many copies.
const MAX_MEM: u64 = 128 << 20;
/// Bytes of copies in flight unless `x-perf.max-workers` is given: 2 MiB,
/// two 1 MiB copies (or up to 32 of single 64 KiB clusters). QEMU lets its
/// 64 workers hold up to 128 MiB. Here that was slower on both media: 1 GiB
/// against qemu-storage-daemon, 5 rounds, tmpfs 1.17x with 64 copies in
/// flight and 1.92x with two; disk 0.97x and 1.10–1.26x.
/// docs/benchmarks.md, "Bytes in flight for mirror and backup (stop 18)".
pub const DEFAULT_BYTES_IN_FLIGHT: u64 = 2 << 20;

/// QMP `BitmapSyncMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapSyncMode {
    /// Clear copied bits only if the job succeeds.
    OnSuccess,
    /// Never touch the bitmap.
    Never,
    /// Always clear copied bits.
    Always,
}

/// QMP `BackupPerf` (`x-perf`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct BackupPerf {
    /// Accepted, ignored.
    #[serde(default)]
    pub use_copy_range: bool,
    /// Copies in flight at most (default 64, within
    /// [`DEFAULT_BYTES_IN_FLIGHT`]). Given, it also lifts the bytes in
    /// flight to `max-workers` copies of the largest size, up to 128 MiB.
    #[serde(default)]
    pub max_workers: Option<i64>,
    /// Bytes per copy at most (0 = no limit; copies never exceed 1 MiB).
    #[serde(default)]
    pub max_chunk: Option<i64>,
    /// Lower bound of the copy cluster size.
    #[serde(default)]
    pub min_cluster_size: Option<u64>,
}

/// QMP `blockdev-backup` arguments.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct BackupArgs {
    /// Job id; defaults to `device`.
    #[serde(default)]
    pub job_id: Option<String>,
    /// The source node.
    pub device: String,
    /// The target node (existing, same size).
    pub target: String,
    /// `full`, `top` or `none`.
    pub sync: SyncMode,
    /// Speed limit, bytes/s (0 = unlimited).
    #[serde(default)]
    pub speed: i64,
    /// A dirty bitmap of `device`: what `bitmap`/`incremental` sync
    /// copies, and what the job updates at its end.
    #[serde(default)]
    pub bitmap: Option<String>,
    /// What happens to `bitmap` at the end (required with a bitmap,
    /// except for `incremental`, which means `on-success`).
    #[serde(default)]
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Not supported (refused when true).
    #[serde(default)]
    pub compress: bool,
    /// Policy for read errors (default `report`).
    #[serde(default)]
    pub on_source_error: OnError,
    /// Policy for write errors (default `report`).
    #[serde(default)]
    pub on_target_error: OnError,
    /// Default true.
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    /// Default true.
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
    /// The node name of the job's `copy-before-write` filter node
    /// (absent: an implicit `#blockN` name).
    #[serde(default)]
    pub filter_node_name: Option<String>,
    /// Not supported (refused when true).
    #[serde(default)]
    pub discard_source: bool,
    /// Performance knobs.
    #[serde(default)]
    pub x_perf: Option<BackupPerf>,
}

impl BackupArgs {
    /// Arguments with QEMU's defaults.
    pub fn new(
        job_id: impl Into<String>,
        device: impl Into<String>,
        target: impl Into<String>,
        sync: SyncMode,
    ) -> Self {
        Self {
            job_id: Some(job_id.into()),
            device: device.into(),
            target: target.into(),
            sync,
            speed: 0,
            bitmap: None,
            bitmap_mode: None,
            compress: false,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            auto_finalize: true,
            auto_dismiss: true,
            filter_node_name: None,
            discard_source: false,
            x_perf: None,
        }
    }
}

/// A cluster still to copy.
const TODO: u8 = 0;
/// A cluster being copied (by the job or a copy-before-write).
const BUSY: u8 = 1;
/// A cluster copied, or needing no copy.
const DONE: u8 = 2;

/// Which clusters are copied, being copied or still to copy, shared by the
/// job and the copy-before-write hook (QEMU's `BlockCopyState`). A cluster
/// is claimed (TODO → BUSY) under a short lock and copied without it, so
/// many copies run at once; each cluster is copied exactly once, with its
/// data as of job start, because a guest write to a BUSY cluster waits
/// for that copy to end.
struct CopyState {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    cluster: u64,
    len: u64,
    /// Skip clusters not allocated in the source's top layer (`top`).
    top_only: bool,
    states: Mutex<Vec<u8>>,
    /// Woken whenever a BUSY cluster becomes DONE or TODO again.
    changed: CoQueue,
    /// Bytes of DONE clusters (the job's progress).
    done_bytes: AtomicU64,
    /// Bytes to copy at job start (the job's total).
    todo_bytes: u64,
    /// Copy buffers, one per copy in flight.
    pool: BufPool,
}

impl CopyState {
    /// Bytes of clusters `first..first + n`.
    fn span(&self, first: u64, n: u64) -> (u64, u64) {
        let off = first * self.cluster;
        (off, (n * self.cluster).min(self.len - off))
    }

    /// Claims the TODO clusters of `first..=last`, as runs (first, count);
    /// also says whether some of them are BUSY with another copy.
    fn claim_range(&self, first: u64, last: u64) -> (Vec<(u64, u64)>, bool) {
        let mut st = self.states.lock();
        let (mut runs, mut busy) = (Vec::new(), false);
        for i in first..=last {
            match st[i as usize] {
                TODO => {
                    st[i as usize] = BUSY;
                    match runs.last_mut() {
                        Some((a, n)) if *a + *n == i => *n += 1,
                        _ => runs.push((i, 1)),
                    }
                }
                BUSY => busy = true,
                _ => {}
            }
        }
        (runs, busy)
    }

    /// Claims the first run of at most `max` TODO clusters at or after
    /// `from`.
    fn claim_next(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut st = self.states.lock();
        let first = (from as usize..st.len()).find(|&i| st[i] == TODO)?;
        let mut n = 0;
        while n < max as usize && first + n < st.len() && st[first + n] == TODO {
            st[first + n] = BUSY;
            n += 1;
        }
        Some((first as u64, n as u64))
    }

    /// Ends the copy of clusters `first..first + n`: DONE, or TODO again
    /// after a failure.
    fn finish(&self, first: u64, n: u64, ok: bool) {
        {
            let mut st = self.states.lock();
            for s in &mut st[first as usize..(first + n) as usize] {
                *s = if ok { DONE } else { TODO };
            }
        }
        if ok {
            self.done_bytes
                .fetch_add(self.span(first, n).1, Ordering::AcqRel);
        }
        self.changed.notify_all();
    }

    fn any(&self, first: u64, last: u64, state: u8) -> bool {
        self.states.lock()[first as usize..=last as usize].contains(&state)
    }

    fn all_done(&self) -> bool {
        self.states.lock().iter().all(|&s| s == DONE)
    }

    /// Copies the claimed clusters `first..first + n` from `src` and
    /// finishes them; the bytes actually copied.
    async fn copy_run(&self, src: &BlockNode, first: u64, n: u64) -> CopyResult {
        let r = self.copy_claimed(src, first, n).await;
        self.finish(first, n, r.is_ok());
        r
    }

    async fn copy_claimed(&self, src: &BlockNode, first: u64, n: u64) -> CopyResult {
        let (off, len) = self.span(first, n);
        if !self.top_only {
            copy_range(src, &self.target, off, len, &self.pool).await?;
            return Ok(len);
        }
        let (end, cs) = (off + len, self.cluster);
        let (mut pos, mut copied) = (off, 0);
        while pos < end {
            let (st, k) = src
                .block_status(pos, end - pos)
                .await
                .map_err(|e| (IoOperation::Read, e))?;
            // Whole clusters are skipped; a cluster allocated in part is
            // copied whole.
            let skip = (pos + k) / cs * cs;
            if !st.allocated && skip > pos {
                // Not in the top layer: the target's backing has it.
                pos = skip;
                continue;
            }
            let stop = (pos + k).div_ceil(cs) * cs;
            let n = stop.min(end) - pos;
            copy_range(src, &self.target, pos, n, &self.pool).await?;
            copied += n;
            pos += n;
        }
        Ok(copied)
    }

    /// Copy-before-write of clusters `first..=last`: copies those still to
    /// copy, waits for those another copy is busy with.
    async fn before_guest_write(&self, src: &BlockNode, first: u64, last: u64) -> Result<()> {
        loop {
            let (runs, busy) = self.claim_range(first, last);
            let mut runs = runs.into_iter();
            while let Some((a, n)) = runs.next() {
                if let Err((_, e)) = self.copy_run(src, a, n).await {
                    for (a, n) in runs {
                        self.finish(a, n, false);
                    }
                    return Err(e);
                }
            }
            if !busy {
                return Ok(());
            }
            // Queue first, then look: a copy ending in between still
            // wakes us.
            let w = self.changed.wait();
            if self.any(first, last, BUSY) {
                w.await;
            }
        }
    }
}

/// The copy-before-write hook on the source.
struct Cbw(Arc<CopyState>);

impl WriteHook for Cbw {
    fn before_write<'a>(
        &'a self,
        node: &'a BlockNode,
        offset: u64,
        len: u64,
    ) -> NodeFuture<'a, Result<()>> {
        Box::pin(async move {
            let cs = self.0.cluster;
            let end = (offset + len).min(self.0.len);
            if offset >= end {
                return Ok(());
            }
            // on-cbw-error=break-guest-write: a failed copy fails the
            // guest write, so the snapshot is never silently broken.
            self.0
                .before_guest_write(node, offset / cs, (end - 1) / cs)
                .await
        })
    }
}

struct BackupJob {
    state: Arc<CopyState>,
    sync: SyncMode,
    on_source_error: OnError,
    on_target_error: OnError,
    /// Parallel copies at most (`x-perf.max-workers`).
    max_workers: usize,
    /// Bytes of copies in flight at most.
    max_bytes: u64,
    /// Clusters per copy at most (`x-perf.max-chunk`, at most 1 MiB).
    chunk_clusters: u64,
    /// The `bitmap` and what to do with it at the end.
    sync_bitmap: Option<SyncBitmap>,
    held: Held,
}

/// A job's `bitmap`, frozen while the job runs, and its successor.
struct SyncBitmap {
    bitmap: Arc<DirtyBitmap>,
    mode: BitmapSyncMode,
    /// Guest writes since job start (recorded only if the bitmap was).
    successor: Arc<Successor>,
}

/// Records writes like the bitmap it succeeds.
struct Successor {
    bits: Bits,
    recording: bool,
}

impl WriteHook for Successor {
    fn after_write(&self, offset: u64, len: u64) {
        if self.recording {
            self.bits.set(offset, len, true);
        }
    }
}

impl SyncBitmap {
    /// The end of the job: `ok` whether it succeeded.
    fn settle(&self, state: &CopyState, ok: bool) {
        let b = &self.bitmap;
        let abdicate =
            (ok || self.mode == BitmapSyncMode::Always) && self.mode != BitmapSyncMode::Never;
        if abdicate {
            b.clear();
            for e in self.successor.bits.extents(0, state.len) {
                if e.dirty {
                    b.mark(e.offset, e.len);
                }
            }
            if !ok {
                // `always` after a failure: what was not copied stays dirty.
                let st = state.states.lock();
                for (i, s) in st.iter().enumerate() {
                    if *s != DONE {
                        let (off, len) = state.span(i as u64, 1);
                        b.mark(off, len);
                    }
                }
            }
        }
        // Otherwise the bitmap, which kept recording, holds its old bits
        // and the new writes: QEMU's reclaim.
        b.set_busy(false);
    }
}

impl BackupJob {
    async fn run_inner(&self, job: &JobControl) -> Result<()> {
        let st = &self.state;
        if self.sync == SyncMode::None {
            // Only what the guest overwrites is copied (image fleecing):
            // the job lives until it is cancelled.
            while !job.is_cancelled() {
                job.sleep_ns(crate::job::ratelimit::SLICE_NS).await;
            }
            return Err(Error::Cancelled);
        }
        job.set_total(st.todo_bytes);
        let mut win = Window::new(job.context(), self.max_workers, self.max_bytes);
        let mut reported = 0;
        let r = self.copy_loop(job, &mut win, &mut reported).await;
        win.drain().await;
        self.report_progress(job, &mut reported);
        r?;
        if let Err(e) = st.target.flush().await {
            handle_io_error(job, self.on_target_error, IoOperation::Write, e).await?;
        }
        Ok(())
    }

    fn report_progress(&self, job: &JobControl, reported: &mut u64) {
        let d = self.state.done_bytes.load(Ordering::Acquire);
        if d > *reported {
            job.add_progress(d - *reported);
            *reported = d;
        }
    }

    async fn copy_loop(
        &self,
        job: &JobControl,
        win: &mut Window,
        reported: &mut u64,
    ) -> Result<()> {
        let st = &self.state;
        let policy = |op| match op {
            IoOperation::Read => self.on_source_error,
            _ => self.on_target_error,
        };
        // Failed copies are TODO again: the next pass retries them.
        let failed = |_, _| {};
        let chunk = self.chunk_clusters * st.cluster;
        let mut cursor = 0;
        loop {
            self.report_progress(job, reported);
            if job.is_cancelled() {
                return Err(Error::Cancelled);
            }
            if job.pause_requested() {
                win.reap(job, true, false, policy, failed).await?;
                job.pause_point().await;
                continue;
            }
            if !win.fits(chunk) {
                win.reap(job, false, false, policy, failed).await?;
                continue;
            }
            if let Some((first, n)) = st.claim_next(cursor, self.chunk_clusters) {
                cursor = first + n;
                let (off, len) = st.span(first, n);
                let s = st.clone();
                win.spawn(off, len, async move {
                    let src = s.source.clone();
                    s.copy_run(&src, first, n).await
                });
                if job.over_limit(len) {
                    win.reap(job, true, false, policy, failed).await?;
                    self.report_progress(job, reported);
                    job.rate_limit(0).await;
                }
                continue;
            }
            if !win.is_empty() {
                win.reap(job, false, false, policy, failed).await?;
                continue;
            }
            if st.all_done() {
                return Ok(());
            }
            if cursor > 0 {
                // Another pass for clusters a failed copy left TODO.
                cursor = 0;
                continue;
            }
            // The rest is BUSY with copy-before-writes: wait for them.
            let w = st.changed.wait();
            if st.any(0, st.len.div_ceil(st.cluster) - 1, BUSY) {
                w.await;
            }
        }
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run_inner(job))
    }
    fn commit(&self) {
        if let Some(sb) = &self.sync_bitmap {
            sb.settle(&self.state, true);
        }
    }
    fn abort(&self) {
        if let Some(sb) = &self.sync_bitmap {
            sb.settle(&self.state, false);
        }
    }
    fn clean(&self) {
        self.held.release();
    }
}

/// How many copies of what size a backup keeps in flight.
#[derive(Debug, PartialEq, Eq)]
struct Limits {
    /// Copies at most.
    workers: usize,
    /// Bytes per copy at most.
    chunk: u64,
    /// Bytes in flight at most.
    bytes: u64,
}

/// `x-perf`'s `max-workers` (default 64) and the copy size (`max-chunk`,
/// 0 = no limit, capped at QEMU's 1 MiB buffer), checked as QEMU does, and
/// the bytes in flight: [`DEFAULT_BYTES_IN_FLIGHT`], or `max-workers`
/// copies of `chunk` (at most 128 MiB) when `max-workers` is given.
fn perf_limits(perf: Option<&BackupPerf>, cluster: u64) -> Result<Limits> {
    let given = perf.and_then(|p| p.max_workers);
    let workers = given.unwrap_or(MAX_WORKERS);
    if !(1..=i64::from(i32::MAX)).contains(&workers) {
        return Err(Error::Job(format!(
            "max-workers must be between 1 and {}",
            i32::MAX
        )));
    }
    let chunk = perf.and_then(|p| p.max_chunk).unwrap_or(0);
    if chunk < 0 {
        return Err(Error::Job(
            "max-chunk must be zero (which means no limit) or positive".into(),
        ));
    }
    let chunk = chunk as u64;
    if chunk != 0 && chunk < cluster {
        return Err(Error::Job(format!(
            "Required max-chunk ({chunk}) is less than backup cluster size ({cluster})"
        )));
    }
    let chunk = if chunk == 0 {
        MAX_BUFFER
    } else {
        chunk.min(MAX_BUFFER)
    };
    let bytes = match given {
        Some(_) => (workers as u64).saturating_mul(chunk).min(MAX_MEM),
        None => DEFAULT_BYTES_IN_FLIGHT,
    };
    Ok(Limits {
        workers: workers as usize,
        chunk,
        bytes,
    })
}

/// QEMU's checks of `sync`, `bitmap` and `bitmap-mode`, in its order
/// and words; `incremental` becomes `bitmap` with `on-success`.
fn check_bitmap_args(
    source: &BlockNode,
    args: &BackupArgs,
) -> Result<(SyncMode, Option<Arc<DirtyBitmap>>, Option<BitmapSyncMode>)> {
    let mut sync = args.sync;
    let mut mode = args.bitmap_mode;
    if matches!(sync, SyncMode::Bitmap | SyncMode::Incremental) && args.bitmap.is_none() {
        return Err(Error::Job(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            sync.as_str()
        )));
    }
    if sync == SyncMode::Incremental {
        if mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
            return Err(Error::Job(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'".into(),
            ));
        }
        sync = SyncMode::Bitmap;
        mode = Some(BitmapSyncMode::OnSuccess);
    }
    let bitmap = match &args.bitmap {
        None => None,
        Some(name) => {
            let b = source
                .bitmap(name)
                .map_err(|_| Error::Job(format!("Bitmap '{name}' could not be found")))?;
            let Some(m) = mode else {
                return Err(Error::Job(
                    "Bitmap sync mode must be given when providing a bitmap".into(),
                ));
            };
            b.check(Check::Read)?;
            if sync == SyncMode::None {
                return Err(Error::Job(
                    "sync mode 'none' does not produce meaningful bitmap outputs".into(),
                ));
            }
            if m == BitmapSyncMode::Never && sync != SyncMode::Bitmap {
                return Err(Error::Job(format!(
                    "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
                    sync.as_str()
                )));
            }
            Some(b)
        }
    };
    if bitmap.is_none() && mode.is_some() {
        return Err(Error::Job(
            "Cannot specify bitmap sync mode without a bitmap".into(),
        ));
    }
    Ok((sync, bitmap, mode))
}

/// `blockdev-backup`. The point in time is the moment this returns: the
/// copy-before-write hook is in place before the job is started.
///
/// # Errors
///
/// QEMU's texts for missing and busy nodes and duplicate ids;
/// `Source and target image have different sizes`; refusals of the
/// features not implemented.
pub fn start_backup(
    ctx: &AioContext,
    graph: &BlockGraph,
    registry: &JobRegistry,
    args: BackupArgs,
) -> Result<Job> {
    let job = create_backup(ctx, graph, registry, args)?;
    job.start();
    Ok(job)
}

/// [`start_backup`] without the start: the job is CREATED, the
/// copy-before-write hook already in place (the point in time is now),
/// and nothing is copied until [`Job::start`]. For `transaction`, which
/// starts it on commit or drops it with [`Job::cancel_unstarted`] on
/// abort.
///
/// # Errors
///
/// As [`start_backup`].
pub fn create_backup(
    ctx: &AioContext,
    graph: &BlockGraph,
    registry: &JobRegistry,
    args: BackupArgs,
) -> Result<Job> {
    let source = find_device(graph, &args.device)?;
    let target = find_device(graph, &args.target)?;
    source.check_op_blockers()?;
    target.check_op_blockers()?;
    let (sync, bitmap, bitmap_mode) = check_bitmap_args(&source, &args)?;
    if args.compress {
        return Err(Error::Job(format!(
            "Compression is not supported for this drive {}",
            target.name()
        )));
    }
    if args.discard_source {
        return Err(Error::Job("discard-source is not supported".into()));
    }
    if Arc::ptr_eq(&source, &target) {
        return Err(Error::Job("Source and target cannot be the same".into()));
    }
    if source.len() != target.len() {
        return Err(Error::Job(
            "Source and target image have different sizes".into(),
        ));
    }
    let speed = check_speed(args.speed)?;
    let min = args
        .x_perf
        .as_ref()
        .and_then(|p| p.min_cluster_size)
        .unwrap_or(0);
    let cluster = DEFAULT_CLUSTER
        .max(min)
        .max(target.info().cluster_size.unwrap_or(0));
    let Limits {
        workers: max_workers,
        chunk: max_chunk,
        bytes: max_bytes,
    } = perf_limits(args.x_perf.as_ref(), cluster)?;
    let id = args.job_id.clone().unwrap_or_else(|| args.device.clone());
    let user = format!("block job '{id}'");
    let mut holds = Holds::default();
    holds
        .perms
        .push(source.attach(&user, "source", Perm::CONSISTENT_READ, Perm::ALL)?);
    holds.perms.push(target.attach(
        &user,
        "target",
        Perm::WRITE | Perm::RESIZE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )?);
    let f = FilterOptions::new(FilterKind::CopyBeforeWrite, &user)
        .node_name(args.filter_node_name.clone());
    holds.insert_filter(graph, &source, JobType::Backup, f)?;
    let len = source.len();
    let mut states = vec![TODO; len.div_ceil(cluster) as usize];
    if let (SyncMode::Bitmap, Some(b)) = (sync, &bitmap) {
        // Only the clusters the bitmap has dirty bits in.
        let mut dirty = vec![false; states.len()];
        for e in b.extents(0, len).into_iter().filter(|e| e.dirty) {
            let last = (e.offset + e.len - 1) / cluster;
            for d in &mut dirty[(e.offset / cluster) as usize..=last as usize] {
                *d = true;
            }
        }
        for (s, d) in states.iter_mut().zip(dirty) {
            if !d {
                *s = DONE;
            }
        }
    }
    let todo_bytes = states
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == TODO)
        .map(|(i, _)| (cluster).min(len - i as u64 * cluster))
        .sum();
    let state = Arc::new(CopyState {
        source: source.clone(),
        target: target.clone(),
        cluster,
        len,
        top_only: sync == SyncMode::Top,
        states: Mutex::new(states),
        changed: CoQueue::new(),
        done_bytes: AtomicU64::new(0),
        todo_bytes,
        pool: BufPool::new(max_workers),
    });
    let sync_bitmap = match (bitmap, bitmap_mode) {
        (Some(b), Some(mode)) => Some(SyncBitmap {
            successor: Arc::new(Successor {
                bits: Bits::new(len, b.granularity()),
                recording: b.enabled(),
            }),
            bitmap: b,
            mode,
        }),
        _ => None,
    };
    let successor = sync_bitmap.as_ref().map(|b| b.successor.clone());
    let frozen = sync_bitmap.as_ref().map(|b| b.bitmap.clone());
    let driver = Arc::new(BackupJob {
        state: state.clone(),
        sync,
        sync_bitmap,
        on_source_error: args.on_source_error,
        on_target_error: args.on_target_error,
        max_workers,
        max_bytes,
        chunk_clusters: (max_chunk / cluster).max(1),
        held: Held::default(),
    });
    let job = registry.create(
        ctx,
        job_options(&id, speed, args.auto_finalize, args.auto_dismiss),
        driver.clone(),
    )?;
    holds.block(&source, JobType::Backup);
    holds.block(&target, JobType::Backup);
    holds
        .hooks
        .push(source.add_write_hook(Arc::new(Cbw(state))));
    if let (Some(succ), Some(b)) = (successor, frozen) {
        holds.hooks.push(source.add_write_hook(succ));
        b.set_busy(true);
    }
    holds.pause_on_drain(&job);
    *driver.held.0.lock() = holds;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perf(v: serde_json::Value) -> BackupPerf {
        serde_json::from_value(v).expect("x-perf")
    }

    #[test]
    fn the_default_keeps_two_full_copies_in_flight() {
        let l = perf_limits(None, DEFAULT_CLUSTER).expect("limits");
        assert_eq!(
            l,
            Limits {
                workers: 64,
                chunk: 1 << 20,
                bytes: 2 << 20
            }
        );
        // Single clusters still go many at a time.
        assert_eq!(l.bytes / DEFAULT_CLUSTER, 32);
    }

    #[test]
    fn max_workers_given_sets_the_bytes_in_flight_up_to_qemus_cap() {
        let l = perf_limits(
            Some(&perf(serde_json::json!({"max-workers": 8}))),
            DEFAULT_CLUSTER,
        )
        .expect("limits");
        assert_eq!((l.workers, l.bytes), (8, 8 << 20));
        let l = perf_limits(
            Some(&perf(
                serde_json::json!({"max-workers": 4, "max-chunk": 65536}),
            )),
            DEFAULT_CLUSTER,
        )
        .expect("limits");
        assert_eq!((l.workers, l.chunk, l.bytes), (4, 65536, 4 * 65536));
        let l = perf_limits(
            Some(&perf(serde_json::json!({"max-workers": 1000}))),
            DEFAULT_CLUSTER,
        )
        .expect("limits");
        assert_eq!(l.bytes, MAX_MEM);
    }
}
