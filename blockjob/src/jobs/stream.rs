//! `block-stream` (QEMU's `block/stream.c`): copy the data allocated in
//! the backing chain above `base` into the top node, then make `base` (or
//! nothing) its backing file and drop the streamed layers.

use std::sync::Arc;

use aio::{AioContext, ClockType};
use parking_lot::Mutex;
use serde::Deserialize;

use super::pool::BufPool;
use super::window::{copy_chunks, ChunkCopy, CopyResult, CHUNKS_IN_FLIGHT};
use super::{
    allocated_above, check_speed, drop_layers, find_backing_image, find_device, find_node,
    job_options, layers_above, yes, Held, Holds, OnError, CHUNK,
};
use crate::block::{
    BlockGraph, BlockNode, BoxFuture as NodeFuture, FilterKind, FilterOptions, GraphRef, Perm,
    WriteHook,
};
use crate::job::{BoxFuture, IoOperation, Job, JobControl, JobDriver, JobRegistry, JobType};
use crate::{Error, Result};

/// QMP `block-stream` arguments.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamArgs {
    /// Job id; defaults to `device`.
    #[serde(default)]
    pub job_id: Option<String>,
    /// The node to stream into (the top of the chain, or an intermediate
    /// node).
    pub device: String,
    /// The base by file name (exclusive with `base-node` and `bottom`).
    #[serde(default)]
    pub base: Option<String>,
    /// The base by node name.
    #[serde(default)]
    pub base_node: Option<String>,
    /// The last node to stream from (its backing becomes the base).
    #[serde(default)]
    pub bottom: Option<String>,
    /// The backing file name to record (default: the base's file name).
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Accepted, no effect (no protocol prefixes here).
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

impl StreamArgs {
    /// Arguments with QEMU's defaults for streaming the whole chain into
    /// `device`.
    pub fn new(job_id: impl Into<String>, device: impl Into<String>) -> Self {
        Self {
            job_id: Some(job_id.into()),
            device: device.into(),
            base: None,
            base_node: None,
            bottom: None,
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

/// Serialises the stream's copy-on-read of a range with guest writes to
/// the same range (QEMU makes copy-on-read requests serialising): without
/// it a guest write landing between the stream's read of the old data and
/// its write into the top would be overwritten with the old data.
#[derive(Default)]
struct Serialise {
    st: Mutex<SerState>,
}

#[derive(Default)]
struct SerState {
    /// The job's copies in flight.
    job: Vec<(u64, u64)>,
    guest: Vec<(u64, u64)>,
}

fn overlaps(a: (u64, u64), off: u64, len: u64) -> bool {
    a.0 < off + len && off < a.0 + a.1
}

/// How long a waiter sleeps before it looks again (one chunk of I/O
/// takes far longer).
const RETRY_NS: i64 = 20_000;

impl Serialise {
    async fn claim(&self, off: u64, len: u64) {
        loop {
            {
                let mut st = self.st.lock();
                if !st.guest.iter().any(|&g| overlaps(g, off, len)) {
                    st.job.push((off, len));
                    return;
                }
            }
            aio::sleep_ns(ClockType::Realtime, RETRY_NS).await;
        }
    }

    fn release(&self, off: u64, len: u64) {
        let mut st = self.st.lock();
        if let Some(i) = st.job.iter().position(|&j| j == (off, len)) {
            st.job.swap_remove(i);
        }
    }
}

impl WriteHook for Serialise {
    fn before_write<'a>(
        &'a self,
        _node: &'a BlockNode,
        offset: u64,
        len: u64,
    ) -> NodeFuture<'a, Result<()>> {
        Box::pin(async move {
            loop {
                {
                    let mut st = self.st.lock();
                    if !st.job.iter().any(|&j| overlaps(j, offset, len)) {
                        st.guest.push((offset, len));
                        return Ok(());
                    }
                }
                aio::sleep_ns(ClockType::Realtime, RETRY_NS).await;
            }
        })
    }

    fn after_write(&self, offset: u64, len: u64) {
        let mut st = self.st.lock();
        if let Some(i) = st.guest.iter().position(|&g| g == (offset, len)) {
            st.guest.swap_remove(i);
        }
    }
}

struct StreamJob {
    top: Arc<BlockNode>,
    base: Option<Arc<BlockNode>>,
    /// The layers streamed from: below `top`, above `base`.
    layers: Vec<Arc<BlockNode>>,
    backing_file: Option<String>,
    on_error: OnError,
    graph: GraphRef,
    held: Held,
    ser: Arc<Serialise>,
    /// Copy buffers, one per chunk in flight.
    pool: Arc<BufPool>,
}

impl StreamJob {
    async fn run_inner(&self, job: &JobControl) -> Result<()> {
        let len = self.top.len();
        job.set_total(len);
        copy_chunks(job, len, CHUNK, self.on_error, self).await
    }
}

impl ChunkCopy for StreamJob {
    /// Copy what the top does not have and a layer above the base does.
    fn plan(&self, off: u64, want: u64) -> NodeFuture<'_, Result<(bool, u64)>> {
        Box::pin(async move {
            let (st, n) = self.top.block_status(off, want).await?;
            if st.allocated {
                return Ok((false, n));
            }
            allocated_above(&self.layers, off, n).await
        })
    }

    /// Copy-on-read: the top's own view, written into the top, serialised
    /// with guest writes to the range.
    fn copy(&self, off: u64, len: u64) -> NodeFuture<'static, CopyResult> {
        let (top, ser, pool) = (self.top.clone(), self.ser.clone(), self.pool.clone());
        Box::pin(async move {
            ser.claim(off, len).await;
            let r = async {
                let buf = pool.get(len as usize).map_err(|e| (IoOperation::Read, e))?;
                let buf = top
                    .read(off, buf)
                    .await
                    .map_err(|e| (IoOperation::Read, e))?;
                top.write_unchanged(off, buf)
                    .await
                    .map(|b| pool.put(b))
                    .map_err(|e| (IoOperation::Write, e))
            }
            .await;
            ser.release(off, len);
            r.map(|()| len)
        })
    }
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run_inner(job))
    }

    fn prepare<'a>(&'a self, _job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.held.drop_filter();
            self.held.drop_perms();
            self.held.drop_hooks();
            // Everything copied is on disk before the image stops naming
            // the layers it was copied from.
            self.top.flush().await?;
            self.top
                .set_backing(self.base.as_ref(), true, self.backing_file.as_deref())
                .await?;
            drop_layers(&self.graph, &self.layers).await
        })
    }

    fn clean(&self) {
        self.held.release();
    }
}

/// `block-stream`: checks the arguments as QEMU does, blocks the top and
/// the streamed layers, creates job `job-id` and starts it.
///
/// # Errors
///
/// QEMU's texts: `Cannot find device='X' nor node-name='X'`,
/// `Node 'B' is not a backing image of 'X'`, `Node 'X' is busy: block
/// device is in use by block job: T`, `Job ID 'J' already in use`, ...
pub fn start_stream(
    ctx: &AioContext,
    graph: &BlockGraph,
    registry: &JobRegistry,
    args: StreamArgs,
) -> Result<Job> {
    let top = find_device(graph, &args.device)?;
    let given = [
        args.base.is_some(),
        args.base_node.is_some(),
        args.bottom.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        let names: Vec<&str> = ["base", "base-node", "bottom"]
            .iter()
            .zip(given)
            .filter(|(_, g)| *g)
            .map(|(n, _)| *n)
            .collect();
        return Err(Error::Job(format!(
            "'{}' and '{}' cannot be specified at the same time",
            names[0], names[1]
        )));
    }
    let base = if let Some(b) = &args.base {
        Some(
            find_backing_image(&top, b)
                .ok_or_else(|| Error::Job(format!("Can't find '{b}' in the backing chain")))?,
        )
    } else if let Some(b) = &args.base_node {
        let n = find_node(graph, b)?;
        if !top.chain().iter().skip(1).any(|c| Arc::ptr_eq(c, &n)) {
            return Err(Error::Job(format!(
                "Node '{b}' is not a backing image of '{}'",
                args.device
            )));
        }
        Some(n)
    } else if let Some(b) = &args.bottom {
        let n = find_node(graph, b)?;
        if !top.chain().iter().skip(1).any(|c| Arc::ptr_eq(c, &n)) {
            return Err(Error::Job(format!(
                "Node '{b}' is not in a chain starting from '{}'",
                args.device
            )));
        }
        n.backing()
    } else {
        None
    };
    let speed = check_speed(args.speed)?;
    let chain = layers_above(&top, base.as_ref());
    Holds::check(&chain.iter().collect::<Vec<_>>())?;
    if top.read_only() {
        return Err(Error::Job(format!(
            "Block node '{}' is read-only",
            top.name()
        )));
    }
    let id = args.job_id.clone().unwrap_or_else(|| args.device.clone());
    let mut holds = Holds::default();
    let user = format!("block job '{id}'");
    let f = FilterOptions::new(FilterKind::CopyOnRead, &user)
        .node_name(args.filter_node_name.clone())
        .cor_layers(chain[1..].to_vec());
    holds.insert_filter(graph, &top, JobType::Stream, f)?;
    holds.perms.push(top.attach(
        &user,
        "stream",
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        Perm::ALL,
    )?);
    for l in &chain[1..] {
        holds.perms.push(l.attach(
            &user,
            "intermediate node",
            Perm::NONE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )?);
    }
    let driver = Arc::new(StreamJob {
        top: top.clone(),
        base,
        layers: chain[1..].to_vec(),
        backing_file: args.backing_file.clone(),
        on_error: args.on_error,
        graph: graph.handle(),
        held: Held::default(),
        ser: Arc::new(Serialise::default()),
        pool: Arc::new(BufPool::new(CHUNKS_IN_FLIGHT)),
    });
    let job = registry.create(
        ctx,
        job_options(&id, speed, args.auto_finalize, args.auto_dismiss),
        driver.clone(),
    )?;
    for n in &chain {
        holds.block(n, JobType::Stream);
    }
    holds.hooks.push(top.add_write_hook(driver.ser.clone()));
    holds.pause_on_drain(&job);
    *driver.held.0.lock() = holds;
    job.start();
    Ok(job)
}
