//! The four block jobs — `block-stream`, `block-commit`,
//! `blockdev-mirror`, `blockdev-backup` — as [`JobDriver`]s, with
//! argument structs that deserialize from QMP's arguments (QEMU's names
//! and defaults) and `start_*` functions that check the arguments the way
//! QEMU does (same error texts), block the nodes, create the job in a
//! [`JobRegistry`] and start it on an [`AioContext`]. Each job keeps
//! several copies in flight as tasks on its context, bounded as QEMU
//! bounds them (mirror: `buf-size` and 16 operations; backup:
//! `x-perf.max-workers`; stream and commit: 8 chunks of 512 KiB).
//!
//! For its lifetime each job puts QEMU's filter node above the node it
//! works on (`copy-on-read`, `commit_top`, `mirror_top`,
//! `copy-before-write`; see [`crate::block::FilterKind`]), named
//! `filter-node-name` or implicitly. Sync modes `bitmap` and
//! `incremental` (backup), `copy-mode: write-blocking` (mirror) and
//! grouped completion of transactions ([`crate::job::JobTxn`]) are
//! implemented. Not modelled: mirror's `replaces`, and parents of the
//! filtered node are not moved onto the filter (other users' I/O does
//! not pass through it; the graph queries show it where QEMU does). See
//! `docs/architecture.md`.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::block::{
    BlockGraph, BlockNode, DrainListener, DrainListenerGuard, OpBlocker, PermGuard, WriteHookGuard,
};
use crate::job::{ErrorAction, IoOperation, Job, JobControl, JobOptions, JobType};
use crate::{Error, Result};
use pool::BufPool;

pub mod backup;
pub mod commit;
pub mod create;
mod job_filter;
pub mod mirror;
mod pool;
pub mod stream;
mod window;

pub use backup::{create_backup, start_backup, BackupArgs, BitmapSyncMode};
pub use commit::{commit_nodes, start_commit, CommitArgs};
pub use create::{start_create, CreateSpec, Preallocation};
pub use mirror::{start_mirror, CopyMode, MirrorArgs};
pub use stream::{start_stream, StreamArgs};

/// QEMU's `STREAM_CHUNK` and `COMMIT_BUFFER_SIZE`: 512 KiB.
pub const CHUNK: u64 = 512 << 10;

/// QMP `BlockdevOnError`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Fail the job (the default).
    #[default]
    Report,
    /// Emit `BLOCK_JOB_ERROR` and retry later.
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Pause the job until `resume`, then retry.
    Stop,
    /// Like `enospc` for jobs.
    Auto,
}

/// QMP `MirrorSyncMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Only data allocated in the top layer.
    Top,
    /// Everything.
    Full,
    /// Only what changes from now on.
    None,
    /// What a dirty bitmap has dirty, the bitmap cleared on success
    /// (backup only).
    Incremental,
    /// What a dirty bitmap has dirty (backup only).
    Bitmap,
}

impl SyncMode {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Top => "top",
            SyncMode::Full => "full",
            SyncMode::None => "none",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

pub(crate) fn yes() -> bool {
    true
}

/// `bdrv_lookup_bs(device, device)`.
pub(crate) fn find_device(graph: &BlockGraph, name: &str) -> Result<Arc<BlockNode>> {
    graph
        .nodes()
        .into_iter()
        .find(|n| n.name() == name)
        .ok_or_else(|| {
            Error::Job(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
}

/// `bdrv_lookup_bs(NULL, node_name)`.
pub(crate) fn find_node(graph: &BlockGraph, name: &str) -> Result<Arc<BlockNode>> {
    graph
        .nodes()
        .into_iter()
        .find(|n| n.name() == name)
        .ok_or_else(|| Error::Job(format!("Cannot find device='' nor node-name='{name}'")))
}

/// `bdrv_find_backing_image`: a node below `top` by file name (or node
/// name).
pub(crate) fn find_backing_image(top: &Arc<BlockNode>, name: &str) -> Option<Arc<BlockNode>> {
    let canon = std::fs::canonicalize(name).ok();
    top.chain().into_iter().skip(1).find(|n| {
        n.name() == name
            || n.filename() == name
            || (canon.is_some() && std::fs::canonicalize(n.filename()).ok() == canon)
    })
}

pub(crate) fn check_speed(speed: i64) -> Result<u64> {
    u64::try_from(speed)
        .map_err(|_| Error::Job("Parameter 'speed' expects a non-negative value".into()))
}

/// The layers from `top` down to, not including, `base` (all of them with
/// no base).
pub(crate) fn layers_above(
    top: &Arc<BlockNode>,
    base: Option<&Arc<BlockNode>>,
) -> Vec<Arc<BlockNode>> {
    let mut v = Vec::new();
    for n in top.chain() {
        if base.is_some_and(|b| Arc::ptr_eq(b, &n)) {
            break;
        }
        v.push(n);
    }
    v
}

/// QEMU's `bdrv_is_allocated_above` over `layers` (top first): whether
/// `offset` is allocated in one of them, and for how many bytes (≥ 1,
/// ≤ `len`) the answer holds. A layer shorter than the offset counts as
/// allocated (it reads as zeroes there, hiding what is below).
pub(crate) async fn allocated_above(
    layers: &[Arc<BlockNode>],
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut len = len;
    for l in layers {
        if offset >= l.len() {
            return Ok((true, len));
        }
        len = len.min(l.len() - offset);
        let (st, n) = l.block_status(offset, len).await?;
        if st.allocated {
            return Ok((true, n.min(len)));
        }
        len = n.min(len);
    }
    Ok((false, len))
}

/// Copies `len` bytes at `offset` from `src` (its whole chain's view) to
/// `dst` through a buffer of the job's `pool`; an all-zero range becomes a
/// zero write. Errors carry the direction for the error policy.
pub(crate) async fn copy_range(
    src: &BlockNode,
    dst: &BlockNode,
    offset: u64,
    len: u64,
    pool: &BufPool,
) -> std::result::Result<(), (IoOperation, Error)> {
    let buf = pool.get(len as usize).map_err(|e| (IoOperation::Read, e))?;
    let buf = src
        .read(offset, buf)
        .await
        .map_err(|e| (IoOperation::Read, e))?;
    let r = if buf.iter().all(|&b| b == 0) {
        pool.put(buf);
        dst.write_zeroes(offset, len).await
    } else {
        dst.write_keep(offset, buf).await.map(|b| pool.put(b))
    };
    r.map_err(|e| (IoOperation::Write, e))
}

/// Applies an error policy to an I/O error (QEMU's
/// `block_job_error_action`): `Ok` means retry the request, `Err` fail
/// the job. `stop` pauses the job first (it retries after `resume`).
pub(crate) async fn handle_io_error(
    job: &JobControl,
    policy: OnError,
    op: IoOperation,
    err: Error,
) -> Result<()> {
    let nospace = err.raw_os_error() == Some(libc::ENOSPC);
    let action = match policy {
        OnError::Ignore => ErrorAction::Ignore,
        OnError::Stop => ErrorAction::Stop,
        // QEMU: `enospc` stops on a full disk and reports anything else;
        // for jobs `auto` means the same.
        OnError::Enospc | OnError::Auto if nospace => ErrorAction::Stop,
        OnError::Report | OnError::Enospc | OnError::Auto => ErrorAction::Report,
    };
    log::warn!("job {}: {err}", job.id());
    job.report_error(op, action);
    match action {
        ErrorAction::Report => Err(err),
        ErrorAction::Stop => {
            job.pause_point().await;
            Ok(())
        }
        _ => {
            job.sleep_ns(crate::job::ratelimit::SLICE_NS).await;
            Ok(())
        }
    }
}

/// What a job holds on its nodes; released in `clean`.
#[derive(Default)]
pub(crate) struct Holds {
    pub(crate) blockers: Vec<OpBlocker>,
    pub(crate) perms: Vec<PermGuard>,
    pub(crate) hooks: Vec<WriteHookGuard>,
    pub(crate) drains: Vec<DrainListenerGuard>,
    pub(crate) filter: Option<crate::block::FilterGuard>,
}

/// Pauses a job while a node it uses is drained (QEMU's
/// `child_job_drained_begin`): an internal pause, so the job parks at its
/// next pause point and `query-jobs` shows it paused.
struct PauseWhileDrained(Job);

impl DrainListener for PauseWhileDrained {
    fn drained_begin(&self) {
        self.0.pause_internal();
    }
    fn drained_end(&self) {
        self.0.resume_internal();
    }
}

impl Holds {
    /// Checks that none of `nodes` is blocked (QEMU's `bdrv_op_is_blocked`).
    pub(crate) fn check(nodes: &[&Arc<BlockNode>]) -> Result<()> {
        nodes.iter().try_for_each(|n| n.check_op_blockers())
    }

    /// Blocks `node` for a job of type `t`.
    pub(crate) fn block(&mut self, node: &Arc<BlockNode>, t: JobType) {
        self.blockers
            .push(node.op_block(format!("block device is in use by block job: {t}")));
    }

    /// Makes `job` pause while any node it blocks is drained.
    pub(crate) fn pause_on_drain(&mut self, job: &Job) {
        let l: Arc<dyn DrainListener> = Arc::new(PauseWhileDrained(job.clone()));
        for b in &self.blockers {
            self.drains.push(b.node().add_drain_listener(l.clone()));
        }
    }
}

/// The part every driver shares: the holds, released in `clean`.
#[derive(Default)]
pub(crate) struct Held(pub(crate) Mutex<Holds>);

impl Held {
    pub(crate) fn drop_perms(&self) {
        let perms = std::mem::take(&mut self.0.lock().perms);
        drop(perms);
    }
    pub(crate) fn drop_hooks(&self) {
        let hooks = std::mem::take(&mut self.0.lock().hooks);
        drop(hooks);
    }
    pub(crate) fn release(&self) {
        let h = std::mem::take(&mut *self.0.lock());
        drop(h);
    }
}

/// Job options from the common arguments.
pub(crate) fn job_options(
    id: &str,
    speed: u64,
    auto_finalize: bool,
    auto_dismiss: bool,
) -> JobOptions {
    JobOptions::new(id)
        .speed(speed)
        .auto_finalize(auto_finalize)
        .auto_dismiss(auto_dismiss)
}

/// Drops `layers` from the graph after a stream or commit: unlinks each
/// from its backing (releasing its hold on the next), closes it and its
/// `file` child, and removes both from the graph. A node added with
/// `blockdev-add` is only unlinked: as in QEMU it stays open and named
/// until `blockdev-del` (libvirt deletes the dropped layers itself).
pub(crate) async fn drop_layers(
    graph: &crate::block::GraphRef,
    layers: &[Arc<BlockNode>],
) -> Result<()> {
    for l in layers {
        l.set_backing(None, false, None).await?;
        if l.added_by_user() {
            continue;
        }
        l.close_layer().await?;
        if let Some(f) = l.file_child() {
            graph.remove_node(&f);
        }
        graph.remove_node(l);
    }
    Ok(())
}
