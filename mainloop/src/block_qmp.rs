//! The block layer's QMP commands, for a daemon (or an embedder) that
//! serves a [`BlockGraph`] and a [`JobRegistry`]: `blockdev-add`,
//! `blockdev-del`, `query-named-block-nodes`, `query-block-jobs`,
//! `query-jobs`, and the `block-job-*` / `job-*` verbs, with QEMU's error
//! classes and texts (reference/qsd-measure.md).
//!
//! Block work runs on the *main* context (where the nodes and jobs live),
//! not on the iohandler context the QMP server runs on: each handler spawns
//! its work there and awaits it.

use std::future::Future;
use std::sync::Arc;

use aio::AioContext;
use blockjob::block::{BlockGraph, BlockNode};
use blockjob::job::{Job, JobEvent, JobRegistry};
use serde_json::{json, Map, Value};

use crate::qmp::{EventEmitter, QmpError, QmpServer, ServerError};

crate::qmp_args! {
    /// `query-named-block-nodes`' arguments.
    pub struct QueryNodesArgs {
        /// Leave out each image's `backing-image` (libvirt asks so).
        pub flat: Option<bool>,
    }
}

crate::qmp_args! {
    /// `{device}` of the `block-job-*` verbs.
    pub struct DeviceArg {
        /// The job id.
        pub device: String,
    }
}

crate::qmp_args! {
    /// `{id}` of the `job-*` verbs and `block-job-finalize/dismiss`.
    pub struct IdArg {
        /// The job id.
        pub id: String,
    }
}

crate::qmp_args! {
    /// `block-job-set-speed`.
    pub struct SetSpeedArgs {
        /// The job id.
        pub device: String,
        /// Bytes per second, 0 for unlimited.
        pub speed: i64,
    }
}

crate::qmp_args! {
    /// `block-job-cancel`.
    pub struct CancelArgs {
        /// The job id.
        pub device: String,
        /// Abandon at once (default false: a READY mirror completes without
        /// pivoting).
        pub force: Option<bool>,
    }
}

crate::qmp_args! {
    /// `blockdev-del`.
    pub struct NodeNameArg {
        /// The node to remove.
        pub node_name: String,
    }
}

/// What the block commands operate on.
#[derive(Clone)]
pub struct BlockState {
    /// The main context: nodes and jobs run here unless a node was added
    /// with an `iothread`.
    pub ctx: AioContext,
    /// The node graph.
    pub graph: Arc<BlockGraph>,
    /// The jobs.
    pub jobs: JobRegistry,
    /// The iothreads `blockdev-add` may name, by id.
    pub iothreads: Arc<std::collections::HashMap<String, AioContext>>,
    /// Nodes added with an `iothread`: node name → that iothread's context.
    pub node_contexts: Arc<parking_lot::Mutex<std::collections::HashMap<String, AioContext>>>,
    /// The action types `transaction` accepts.
    pub actions: crate::transaction_qmp::TransactionActions,
    /// While a `transaction` with `completion-mode: grouped` prepares its
    /// actions: the group their jobs join (set on the copy of the state
    /// the actions get, never on the server's).
    pub txn: Option<blockjob::job::JobTxn>,
}

impl BlockState {
    /// State on `ctx` with no iothreads.
    pub fn new(ctx: AioContext, graph: Arc<BlockGraph>, jobs: JobRegistry) -> Self {
        Self {
            ctx,
            graph,
            jobs,
            iothreads: Arc::default(),
            node_contexts: Arc::default(),
            actions: Default::default(),
            txn: None,
        }
    }

    /// The context a node (and the jobs on it) runs on: its iothread's, or
    /// the main context.
    pub fn context_of(&self, node: &str) -> AioContext {
        self.node_contexts
            .lock()
            .get(node)
            .cloned()
            .unwrap_or_else(|| self.ctx.clone())
    }

    /// `blockdev-add` arguments with QEMU's `iothread` option taken out:
    /// returns the iothread's context, if one was named.
    ///
    /// # Errors
    ///
    /// An unknown iothread or a non-string value.
    pub fn take_iothread(
        &self,
        args: &mut Map<String, Value>,
    ) -> Result<Option<AioContext>, QmpError> {
        match args.remove("iothread") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(id)) => self
                .iothreads
                .get(&id)
                .cloned()
                .map(Some)
                .ok_or_else(|| QmpError::generic(format!("Cannot find iothread {id}"))),
            Some(_) => Err(QmpError::generic(
                "Invalid parameter type for 'iothread', expected: string",
            )),
        }
    }
}

impl std::fmt::Debug for BlockState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockState").finish_non_exhaustive()
    }
}

/// Runs `f` as a task on `ctx` and awaits it (from any context).
pub(crate) async fn on<T: Send + 'static>(
    ctx: &AioContext,
    f: impl Future<Output = Result<T, QmpError>> + Send + 'static,
) -> Result<T, QmpError> {
    match ctx.spawn(f).await {
        Ok(r) => r,
        Err(e) => Err(QmpError::generic(format!("internal error: {e}"))),
    }
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// A `block-job-*` lookup: QEMU answers `DeviceNotActive` for a missing job.
fn block_job(jobs: &JobRegistry, id: &str) -> Result<Job, QmpError> {
    jobs.get(id)
        .filter(|j| j.info().job_type.is_block_job())
        .ok_or_else(|| QmpError::device_not_active(format!("Block job '{id}' not found")))
}

/// A `job-*` lookup: QEMU answers `GenericError "Job not found"`.
fn any_job(jobs: &JobRegistry, id: &str) -> Result<Job, QmpError> {
    jobs.get(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

/// `BlockDeviceInfo` of `query-named-block-nodes`: the node's facts and
/// its image's `ImageInfo` (with internal snapshots), shaped like
/// qemu-storage-daemon's (the throttling fields are all zero: there is no
/// I/O throttling here).
///
/// Unless `flat`, `image` nests the backing chain's `ImageInfo`s under
/// `backing-image`, as QEMU does; the chain is walked as QEMU walks it,
/// through the job filters of `graph` (a filter's `backing-image` is its
/// child's image, and it counts in `backing_file_depth`).
pub async fn block_device_info(graph: &BlockGraph, node: &Arc<BlockNode>, flat: bool) -> Value {
    let chain = blockjob::block::query_chain(graph, node);
    let mut image = blockjob::block::image_info_json(node).await;
    let filtered = blockjob::block::filtered_child(node);
    if let Some(c) = &filtered {
        // A filter's `actual-size` is its child's (also when its file
        // name is a `json:` one).
        if let Some(a) = blockjob::block::image_info_json(c).await.get("actual-size") {
            image["actual-size"] = a.clone();
        }
    }
    if !flat {
        let mut infos = Vec::new();
        for b in chain.iter().skip(1) {
            infos.push(blockjob::block::image_info_json(b).await);
        }
        // Innermost first: each one becomes its parent's `backing-image`.
        let nested = infos
            .into_iter()
            .rev()
            .fold(None, |inner: Option<Value>, mut v| {
                if let Some(i) = inner {
                    v["backing-image"] = i;
                }
                Some(v)
            });
        if let Some(n) = nested {
            image["backing-image"] = n;
        }
    }
    let backing_file = image.get("backing-filename").cloned();
    // QEMU counts the depth along the nested `backing-image`s, so a flat
    // query reports 0 for every node; scripts compare against QEMU's
    // answers, so do the same.
    let depth = if flat { 0 } else { chain.len() - 1 };
    let mut v = json!({
        "node-name": node.name(),
        "drv": node.driver_name(),
        "file": node.filename(),
        "ro": node.read_only(),
        "active": true,
        "encrypted": false,
        "detect_zeroes": "off",
        "backing_file_depth": depth,
        "write_threshold": 0,
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image,
    });
    if let Some(b) = backing_file {
        v["backing_file"] = b;
    }
    v["cache"] = cache_info(filtered.as_ref().unwrap_or(node));
    // A filter shows the bitmaps of the node it filters, as QEMU does.
    if let Some(b) = crate::bitmap_qmp::dirty_bitmaps_json(filtered.as_ref().unwrap_or(node)) {
        v["dirty-bitmaps"] = b;
    }
    v
}

/// QEMU's `BlockdevCacheInfo` of a node: `cache.direct` and
/// `cache.no-flush` as the node was added with (inline children inherit
/// them), `writeback` always true (there is no writethrough mode).
fn cache_info(node: &BlockNode) -> Value {
    let opts = node.add_options();
    let flag = |k: &str| {
        opts.get("cache")
            .and_then(|c| c.get(k))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    json!({"writeback": true, "direct": flag("direct"), "no-flush": flag("no-flush")})
}

/// Registers the block commands on `server`, and forwards job events to its
/// clients.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_block_commands(server: &QmpServer, state: BlockState) -> Result<(), ServerError> {
    crate::internal_snapshot_qmp::register_internal_snapshot_commands(server, state.clone())?;
    crate::iothread_qmp::register_iothread_commands(server, state.clone())?;
    crate::bitmap_qmp::register_bitmap_commands(server, state.clone())?;
    let emitter: EventEmitter = server.emitter();
    state
        .jobs
        .subscribe(move |ev: &JobEvent| emitter.emit(ev.name(), ev.data()));

    let s = state.clone();
    server.register_async("blockdev-add", move |mut args: Map<String, Value>| {
        let s = s.clone();
        async move {
            let iothread = s.take_iothread(&mut args)?;
            let ctx = iothread.clone().unwrap_or_else(|| s.ctx.clone());
            on(&ctx, async move {
                let node = s
                    .graph
                    .blockdev_add(&Value::Object(args))
                    .await
                    .map_err(generic)?;
                // A name may be reused after blockdev-del: never inherit
                // an old node's context.
                let mut map = s.node_contexts.lock();
                match iothread {
                    Some(io) => map.insert(node.name().to_string(), io),
                    None => map.remove(node.name()),
                };
                Ok(json!({}))
            })
            .await
        }
    })?;

    let s = state.clone();
    server.register_async("blockdev-del", move |a: NodeNameArg| {
        let s = s.clone();
        async move {
            let ctx = s.ctx.clone();
            on(&ctx, async move {
                s.graph
                    .blockdev_del(&a.node_name)
                    .await
                    .map(|()| json!({}))
                    .map_err(generic)
            })
            .await
        }
    })?;

    let s = state.clone();
    server.register_async("query-named-block-nodes", move |a: QueryNodesArgs| {
        let s = s.clone();
        let flat = a.flat.unwrap_or(false);
        async move {
            let ctx = s.ctx.clone();
            on(&ctx, async move {
                let mut out = Vec::new();
                for n in s.graph.nodes() {
                    out.push(block_device_info(&s.graph, &n, flat).await);
                }
                Ok(Value::Array(out))
            })
            .await
        }
    })?;

    // `query-block` lists block backends with a name or a device; like
    // qemu-storage-daemon's (whose exports' backends are anonymous), this
    // daemon has none.
    server.register("query-block", |_: crate::qmp::NoArgs| {
        Ok(Value::Array(Vec::new()))
    })?;

    let s = state.clone();
    server.register("query-block-jobs", move |_: crate::qmp::NoArgs| {
        Ok(Value::Array(
            s.jobs
                .list()
                .iter()
                .filter(|j| j.job_type.is_block_job())
                .map(|j| j.block_job_info())
                .collect(),
        ))
    })?;

    let s = state.clone();
    server.register("query-jobs", move |_: crate::qmp::NoArgs| {
        Ok(Value::Array(
            s.jobs.list().iter().map(|j| j.job_info()).collect(),
        ))
    })?;

    let s = state.clone();
    server.register("block-job-set-speed", move |a: SetSpeedArgs| {
        if a.speed < 0 {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        block_job(&s.jobs, &a.device)?
            .set_speed(a.speed as u64)
            .map(|()| json!({}))
            .map_err(generic)
    })?;

    let s = state.clone();
    server.register("block-job-cancel", move |a: CancelArgs| {
        block_job(&s.jobs, &a.device)?
            .cancel(a.force.unwrap_or(false))
            .map(|()| json!({}))
            .map_err(generic)
    })?;

    type Verb = fn(&Job) -> blockjob::Result<()>;
    let block_verbs: [(&str, Verb); 3] = [
        ("block-job-pause", Job::pause),
        ("block-job-resume", Job::resume),
        ("block-job-complete", Job::complete),
    ];
    for (name, verb) in block_verbs {
        let s = state.clone();
        server.register(name, move |a: DeviceArg| {
            verb(&block_job(&s.jobs, &a.device)?)
                .map(|()| json!({}))
                .map_err(generic)
        })?;
    }
    let id_verbs: [(&str, Verb, bool); 8] = [
        ("block-job-finalize", Job::finalize, true),
        ("block-job-dismiss", Job::dismiss, true),
        ("job-pause", Job::pause, false),
        ("job-resume", Job::resume, false),
        ("job-cancel", |j| j.cancel(true), false),
        ("job-complete", Job::complete, false),
        ("job-finalize", Job::finalize, false),
        ("job-dismiss", Job::dismiss, false),
    ];
    for (name, verb, block) in id_verbs {
        let s = state.clone();
        server.register(name, move |a: IdArg| {
            let job = if block {
                block_job(&s.jobs, &a.id)?
            } else {
                any_job(&s.jobs, &a.id)?
            };
            verb(&job).map(|()| json!({})).map_err(generic)
        })?;
    }
    crate::snapshot_qmp::register_snapshot_commands(server, &state)?;
    crate::reopen_qmp::register_reopen_commands(server, &state)?;
    crate::transaction_qmp::register_transaction(server, &state)?;
    crate::create_qmp::register_create_commands(server, &state)?;
    crate::drive_qmp::register_drive_commands(server, &state)?;
    Ok(())
}
