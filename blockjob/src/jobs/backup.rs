//! `blockdev-backup` (QEMU's `block/backup.c`, `block-copy.c`,
//! `copy-before-write.c`): a point-in-time copy of the source, as of job
//! creation, into the target while the guest keeps writing.
//!
//! A copy-before-write hook on the source node copies a cluster's old
//! data to the target before a guest write changes it; the background
//! loop copies every cluster not yet copied. Both go through one
//! per-cluster "done" map under one `CoMutex`, so each cluster is copied
//! exactly once and always with its data as of job start.
//!
//! Not implemented (refused): `bitmap` / `incremental` sync and the
//! `bitmap` argument (persistent bitmaps load as ordinary dirty bitmaps;
//! incremental backup is still to come), `compress`,
//! `discard-source`.

use std::sync::Arc;

use aio::{AioContext, CoMutex};
use serde::Deserialize;

use super::{
    check_speed, copy_range, find_device, handle_io_error, job_options, yes, Held, Holds, OnError,
    SyncMode,
};
use crate::block::{BlockGraph, BlockNode, BoxFuture as NodeFuture, Perm, WriteHook};
use crate::job::{BoxFuture, IoOperation, Job, JobControl, JobDriver, JobRegistry, JobType};
use crate::{Error, Result};

/// QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`: 64 KiB.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;

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
    /// Accepted, ignored (one copy at a time here).
    #[serde(default)]
    pub max_workers: Option<i64>,
    /// Accepted, ignored.
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
    /// Not supported yet (refused).
    #[serde(default)]
    pub bitmap: Option<String>,
    /// Not supported yet (refused).
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
    /// Accepted, ignored: the copy-before-write hook is not a node.
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

/// Which clusters are copied (or need no copy), shared by the job and the
/// copy-before-write hook.
struct CopyState {
    target: Arc<BlockNode>,
    cluster: u64,
    len: u64,
    /// Skip clusters not allocated in the source's top layer (`top`).
    top_only: bool,
    done: CoMutex<Vec<bool>>,
}

impl CopyState {
    /// Copies clusters `first..=last` that are not done yet from `src`.
    /// Returns the bytes actually copied.
    async fn copy(
        &self,
        src: &BlockNode,
        first: u64,
        last: u64,
    ) -> std::result::Result<u64, (IoOperation, Error)> {
        let mut done = self.done.lock().await;
        let mut copied = 0;
        for i in first..=last {
            if done[i as usize] {
                continue;
            }
            let off = i * self.cluster;
            let n = self.cluster.min(self.len - off);
            if self.top_only {
                let (st, _) = src
                    .block_status(off, n)
                    .await
                    .map_err(|e| (IoOperation::Read, e))?;
                if !st.allocated {
                    // Not in the top layer: the target's backing has it.
                    done[i as usize] = true;
                    continue;
                }
            }
            copy_range(src, &self.target, off, n).await?;
            done[i as usize] = true;
            copied += n;
        }
        Ok(copied)
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
                .copy(node, offset / cs, (end - 1) / cs)
                .await
                .map(|_| ())
                .map_err(|(_, e)| e)
        })
    }
}

struct BackupJob {
    source: Arc<BlockNode>,
    state: Arc<CopyState>,
    sync: SyncMode,
    on_source_error: OnError,
    on_target_error: OnError,
    held: Held,
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
        job.set_total(st.len);
        let clusters = st.len.div_ceil(st.cluster);
        let mut i = 0;
        while i < clusters {
            if job.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let copied = match st.copy(&self.source, i, i).await {
                Ok(n) => n,
                Err((op, e)) => {
                    let policy = match op {
                        IoOperation::Read => self.on_source_error,
                        _ => self.on_target_error,
                    };
                    handle_io_error(job, policy, op, e).await?;
                    continue;
                }
            };
            job.add_progress(st.cluster.min(st.len - i * st.cluster));
            job.rate_limit(copied).await;
            i += 1;
        }
        if let Err(e) = st.target.flush().await {
            handle_io_error(job, self.on_target_error, IoOperation::Write, e).await?;
        }
        Ok(())
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run_inner(job))
    }
    fn clean(&self) {
        self.held.release();
    }
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
    match (args.sync, &args.bitmap) {
        (_, Some(b)) => return Err(Error::Job(format!("Bitmap '{b}' could not be found"))),
        (SyncMode::Incremental, None) => {
            return Err(Error::Job(
                "must provide a valid bitmap name for 'incremental' sync mode".into(),
            ))
        }
        (SyncMode::Bitmap, None) => {
            return Err(Error::Job(
                "must provide a valid bitmap name for 'bitmap' sync mode".into(),
            ))
        }
        _ => {}
    }
    if args.bitmap_mode.is_some() {
        return Err(Error::Job(
            "Cannot specify bitmap sync mode without a bitmap".into(),
        ));
    }
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
    let len = source.len();
    let state = Arc::new(CopyState {
        target: target.clone(),
        cluster,
        len,
        top_only: args.sync == SyncMode::Top,
        done: CoMutex::new(vec![false; len.div_ceil(cluster) as usize]),
    });
    let driver = Arc::new(BackupJob {
        source: source.clone(),
        state: state.clone(),
        sync: args.sync,
        on_source_error: args.on_source_error,
        on_target_error: args.on_target_error,
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
    holds.pause_on_drain(&job);
    *driver.held.0.lock() = holds;
    Ok(job)
}
