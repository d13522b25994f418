//! `block-commit` (QEMU's `block/commit.c`, and `mirror.c` for active
//! commit).
//!
//! *Intermediate commit* (top below the active layer): copy every range
//! allocated in `top`..above `base` into `base`, then point the overlay
//! of `top` at `base` (rewriting its backing file link) and drop the
//! committed layers. No READY.
//!
//! *Active commit* (top is the device): the mirror loop with target
//! `base` and the initial dirty set "allocated above base"; guest writes
//! through the top are tracked by a dirty bitmap. READY when in sync;
//! `complete` makes the graph's top `base`: the layers above it are closed
//! and dropped from the graph (their images are left as they are, as
//! QEMU does), and the caller moves the device's users to `base`. A soft
//! cancel after READY completes without that pivot: the chain is
//! unchanged (base merely holds a copy of what is above it).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use aio::AioContext;
use serde::Deserialize;

use super::mirror::{default_granularity, Initial, MirrorCore, DEFAULT_BUF_SIZE, MAX_IN_FLIGHT};
use super::pool::BufPool;
use super::window::{copy_chunks, ChunkCopy, CopyResult, CHUNKS_IN_FLIGHT};
use super::{
    allocated_above, check_speed, copy_range, drop_layers, find_backing_image, find_device,
    find_node, job_options, layers_above, yes, Held, Holds, OnError, CHUNK,
};
use crate::block::bitmap::Bits;
use crate::block::{
    BlockGraph, BlockNode, BoxFuture as NodeFuture, FilterKind, FilterOptions, GraphRef, Perm,
};
use crate::job::{BoxFuture, Job, JobControl, JobDriver, JobRegistry, JobType};
use crate::{Error, Result};

/// QMP `block-commit` arguments.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct CommitArgs {
    /// Job id; defaults to `device`.
    #[serde(default)]
    pub job_id: Option<String>,
    /// The active layer of the chain.
    pub device: String,
    /// The base by node name (default: the deepest backing image).
    #[serde(default)]
    pub base_node: Option<String>,
    /// The base by file name (deprecated in QEMU).
    #[serde(default)]
    pub base: Option<String>,
    /// The top by node name (default: the active layer).
    #[serde(default)]
    pub top_node: Option<String>,
    /// The top by file name (deprecated in QEMU).
    #[serde(default)]
    pub top: Option<String>,
    /// The backing file name to record in the overlay (default: the
    /// base's file name).
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Accepted, no effect.
    #[serde(default)]
    pub backing_mask_protocol: bool,
    /// Speed limit, bytes/s (0 = unlimited).
    #[serde(default)]
    pub speed: i64,
    /// Error policy (default `report`).
    #[serde(default)]
    pub on_error: OnError,
    /// The node name of the job's filter node (QEMU's; absent: an
    /// implicit `#blockN` name).
    #[serde(default)]
    pub filter_node_name: Option<String>,
    /// Default true.
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    /// Default true.
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
}

impl CommitArgs {
    /// Arguments with QEMU's defaults (active commit of the whole chain).
    pub fn new(job_id: impl Into<String>, device: impl Into<String>) -> Self {
        Self {
            job_id: Some(job_id.into()),
            device: device.into(),
            base_node: None,
            base: None,
            top_node: None,
            top: None,
            backing_file: None,
            backing_mask_protocol: false,
            speed: 0,
            on_error: OnError::Report,
            filter_node_name: None,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

struct CommitJob {
    top: Arc<BlockNode>,
    base: Arc<BlockNode>,
    /// `top` down to above `base`.
    layers: Vec<Arc<BlockNode>>,
    /// The node whose backing is `top`.
    overlay: Arc<BlockNode>,
    backing_file: Option<String>,
    on_error: OnError,
    graph: GraphRef,
    held: Held,
    /// Copy buffers, one per chunk in flight.
    pool: Arc<BufPool>,
}

impl CommitJob {
    async fn run_inner(&self, job: &JobControl) -> Result<()> {
        let len = self.top.len();
        job.set_total(len);
        if self.base.len() < len {
            // QEMU grows a smaller base; it never shrinks one.
            self.base.truncate(len).await?;
        }
        copy_chunks(job, len, CHUNK, self.on_error, self).await
    }
}

impl ChunkCopy for CommitJob {
    fn plan(&self, off: u64, want: u64) -> NodeFuture<'_, Result<(bool, u64)>> {
        Box::pin(allocated_above(&self.layers, off, want))
    }
    fn copy(&self, off: u64, len: u64) -> NodeFuture<'static, CopyResult> {
        let (top, base, pool) = (self.top.clone(), self.base.clone(), self.pool.clone());
        Box::pin(async move { copy_range(&top, &base, off, len, &pool).await.map(|()| len) })
    }
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run_inner(job))
    }
    fn prepare<'a>(&'a self, _job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.held.drop_filter();
            self.held.drop_perms();
            // The committed data is durable in base before the overlay
            // stops naming the layers that held it (QEMU's
            // `bdrv_drop_intermediate`).
            self.base.flush().await?;
            self.overlay
                .set_backing(Some(&self.base), true, self.backing_file.as_deref())
                .await?;
            drop_layers(&self.graph, &self.layers).await
        })
    }
    fn clean(&self) {
        self.held.release();
    }
}

struct ActiveCommitJob {
    core: MirrorCore,
    held: Held,
    graph: GraphRef,
}

impl JobDriver for ActiveCommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.core.run(job))
    }
    fn cancel(&self, force: bool, _job: &JobControl) -> bool {
        self.core.cancel(force)
    }
    fn complete(&self, _job: &JobControl) -> Result<()> {
        Ok(())
    }
    fn prepare<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.held.drop_filter();
            if !job.should_complete() || job.is_cancelled() {
                // Soft cancel after READY: no pivot, chain unchanged.
                self.held.drop_hooks();
                return Ok(());
            }
            // The users of the old active layer (an export) move to
            // `base`. As in QEMU, the committed layers stay nodes of their
            // own (the monitor still owns the old active layer, which
            // `blockdev-del` removes later).
            self.core
                .pivot(&self.held, &self.graph, &self.core.source)
                .await?;
            log::info!(
                "job {}: pivot: '{}' is now the top of the chain",
                job.id(),
                self.core.target.name()
            );
            Ok(())
        })
    }
    fn clean(&self) {
        self.held.release();
    }
}

/// The nodes a `block-commit` with `args` works on: the device, the top
/// and the base, resolved as [`start_commit`] does (node names, file
/// names, defaults), without checking anything else. A caller that must
/// prepare the base (reopen it read-write) looks it up here first.
///
/// # Errors
///
/// As [`start_commit`] for missing nodes and nodes outside the chain.
pub fn commit_nodes(
    graph: &BlockGraph,
    args: &CommitArgs,
) -> Result<(Arc<BlockNode>, Arc<BlockNode>, Arc<BlockNode>)> {
    let dev = find_device(graph, &args.device)?;
    dev.check_op_blockers()?;
    let in_chain =
        |from: &Arc<BlockNode>, n: &Arc<BlockNode>| from.chain().iter().any(|c| Arc::ptr_eq(c, n));
    let top = match (&args.top_node, &args.top) {
        (Some(_), Some(_)) => {
            return Err(Error::Job(
                "'top-node' and 'top' are mutually exclusive".into(),
            ))
        }
        (Some(t), None) => {
            let n = find_node(graph, t)?;
            if !in_chain(&dev, &n) {
                return Err(Error::Job(format!(
                    "'{t}' is not in this backing file chain"
                )));
            }
            n
        }
        (None, Some(t)) => {
            if dev.filename() == t {
                dev.clone()
            } else {
                find_backing_image(&dev, t)
                    .ok_or_else(|| Error::Job(format!("Top image file {t} not found")))?
            }
        }
        (None, None) => dev.clone(),
    };
    let base = match (&args.base_node, &args.base) {
        (Some(_), Some(_)) => {
            return Err(Error::Job(
                "'base-node' and 'base' are mutually exclusive".into(),
            ))
        }
        (Some(b), None) => {
            let n = find_node(graph, b)?;
            if !in_chain(&top, &n) {
                return Err(Error::Job(format!(
                    "'{b}' is not in this backing file chain"
                )));
            }
            n
        }
        (None, Some(b)) => find_backing_image(&top, b)
            .ok_or_else(|| Error::Job(format!("Can't find '{b}' in the backing chain")))?,
        (None, None) => top
            .chain()
            .into_iter()
            .skip(1)
            .last()
            .ok_or_else(|| Error::Job("There is no backimg image".into()))?,
    };
    Ok((dev, top, base))
}

/// `block-commit`: intermediate commit when `top` is below the device,
/// active commit (a READY job) when `top` is the device.
///
/// # Errors
///
/// QEMU's texts: `Cannot find device='X' nor node-name='X'`, `'N' is not
/// in this backing file chain`, `cannot commit an image into itself`,
/// `There is no backimg image` (sic), `Node 'X' is busy: ...`, `Job ID
/// 'J' already in use`. A read-only base is refused (`Block node 'B' is
/// read-only`): the caller reopens it read-write first, as QMP's
/// `block-commit` does (see [`commit_nodes`]).
pub fn start_commit(
    ctx: &AioContext,
    graph: &BlockGraph,
    registry: &JobRegistry,
    args: CommitArgs,
) -> Result<Job> {
    let (dev, top, base) = commit_nodes(graph, &args)?;
    let layers = layers_above(&top, Some(&base));
    Holds::check(&layers.iter().chain([&base]).collect::<Vec<_>>())?;
    if Arc::ptr_eq(&top, &base) {
        return Err(Error::Job("cannot commit an image into itself".into()));
    }
    if base.read_only() {
        return Err(Error::Job(format!(
            "Block node '{}' is read-only",
            base.name()
        )));
    }
    let speed = check_speed(args.speed)?;
    let id = args.job_id.clone().unwrap_or_else(|| args.device.clone());
    let user = format!("block job '{id}'");
    // The job owns the chain top..base: the backing links inside it do
    // not stop it from writing base (what it writes there is hidden by
    // the layers above, until they are dropped).
    let inside: Vec<String> = layers.iter().map(|l| l.name().to_string()).collect();
    let mut holds = Holds::default();
    holds.perms.push(base.attach_ignoring(
        &user,
        "base",
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::GRAPH_MOD,
        &inside,
    )?);
    let active = Arc::ptr_eq(&top, &dev);
    for l in &layers {
        let shared = if active && Arc::ptr_eq(l, &top) {
            Perm::ALL
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::GRAPH_MOD
        };
        holds
            .perms
            .push(l.attach(&user, "intermediate node", Perm::CONSISTENT_READ, shared)?);
    }
    let kind = if active {
        FilterKind::MirrorTop
    } else {
        FilterKind::CommitTop
    };
    let f = FilterOptions::new(kind, &user).node_name(args.filter_node_name.clone());
    holds.insert_filter(graph, &top, JobType::Commit, f)?;
    let opts = job_options(&id, speed, args.auto_finalize, args.auto_dismiss);
    let mut nodes: Vec<&Arc<BlockNode>> = vec![&dev];
    nodes.extend(layers.iter().filter(|l| !Arc::ptr_eq(l, &dev)));
    nodes.push(&base);
    if active {
        let gran = default_granularity(&base);
        let bitmap = Arc::new(Bits::new(top.len(), gran));
        let driver = Arc::new(ActiveCommitJob {
            core: MirrorCore {
                source: top.clone(),
                target: base.clone(),
                bitmap: bitmap.clone(),
                initial: Initial::Allocated(layers.clone()),
                max_io: (DEFAULT_BUF_SIZE / 16).max(1 << 20),
                buf_size: DEFAULT_BUF_SIZE,
                on_source_error: args.on_error,
                on_target_error: args.on_error,
                ready: AtomicBool::new(false),
                grow_target: true,
                busy: Arc::default(),
                pool: Arc::new(BufPool::new(MAX_IN_FLIGHT as usize)),
            },
            held: Held::default(),
            graph: graph.handle(),
        });
        let job = registry.create(ctx, opts, driver.clone())?;
        for n in nodes {
            holds.block(n, JobType::Commit);
        }
        holds.hooks.push(top.add_write_hook(bitmap));
        holds.pause_on_drain(&job);
        *driver.held.0.lock() = holds;
        job.start();
        return Ok(job);
    }
    let overlay = dev
        .chain()
        .into_iter()
        .find(|n| n.backing().is_some_and(|b| Arc::ptr_eq(&b, &top)))
        .ok_or_else(|| Error::Job(format!("Could not find the overlay of '{}'", top.name())))?;
    if overlay.read_only() {
        // Its backing file link is rewritten at the end.
        return Err(Error::Job(format!(
            "Block node '{}' is read-only",
            overlay.name()
        )));
    }
    let driver = Arc::new(CommitJob {
        top: top.clone(),
        base: base.clone(),
        layers: layers.clone(),
        overlay,
        backing_file: args.backing_file.clone(),
        on_error: args.on_error,
        graph: graph.handle(),
        held: Held::default(),
        pool: Arc::new(BufPool::new(CHUNKS_IN_FLIGHT)),
    });
    let job = registry.create(ctx, opts, driver.clone())?;
    for n in nodes {
        holds.block(n, JobType::Commit);
    }
    holds.pause_on_drain(&job);
    *driver.held.0.lock() = holds;
    job.start();
    Ok(job)
}
