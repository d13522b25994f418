//! `blockdev-mirror` (QEMU's `block/mirror.c`), and the machinery active
//! commit shares with it: a dirty bitmap fed by a write hook on the source
//! node, a copy loop that drains it, READY when in sync, `complete` for a
//! final sync and pivot, and a soft cancel after READY that completes
//! without pivoting.
//!
//! The pivot moves the source's users to the target: its roots (NBD
//! exports, see [`BlockRoot`](crate::block::BlockRoot)) and the nodes
//! backed by it; both nodes stay in the graph, as in QEMU, where the old
//! source (added by the user) stays until `blockdev-del`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{AioContext, ClientType};
use serde::Deserialize;

use super::pool::BufPool;
use super::window::Window;
use super::{
    allocated_above, check_speed, copy_range, find_device, handle_io_error, job_options, yes, Held,
    Holds, OnError, SyncMode,
};
use crate::block::bitmap::Bits;
use crate::block::GraphRef;
use crate::block::{
    BlockGraph, BlockNode, BoxFuture as NodeFuture, FilterKind, FilterOptions, Perm, WriteHook,
};
use crate::job::ratelimit::SLICE_NS;
use crate::job::{BoxFuture, IoOperation, Job, JobControl, JobDriver, JobRegistry, JobType};
use crate::{Error, Result};

/// The default `buf-size`, the bytes of copies in flight: 2 MiB, so two
/// 1 MiB copies at once. QEMU's (`DEFAULT_MIRROR_BUF_SIZE`) is 16 MiB, and
/// that was slower here on both media: 1 GiB against qemu-storage-daemon,
/// 5 rounds, tmpfs 1.04x with 16 MiB and 1.46x with 2 MiB; disk 0.94–0.99x
/// and 1.17–1.24x. On tmpfs 16 MiB of buffers in flight fall out of the
/// CPU caches; on disk fewer concurrent `O_DIRECT` copies keep the reads
/// and writes from queueing behind each other. Small dirty runs still go
/// 16 at a time ([`MAX_IN_FLIGHT`]). A `buf-size` given is used as is.
/// docs/benchmarks.md, "Bytes in flight for mirror and backup (stop 18)".
pub const DEFAULT_BUF_SIZE: u64 = 2 << 20;
/// QEMU's `MAX_IO_BYTES`: 1 MiB.
const MAX_IO_BYTES: u64 = 1 << 20;
/// QEMU's `MAX_IN_FLIGHT`.
pub(crate) const MAX_IN_FLIGHT: u64 = 16;

/// QMP `MirrorCopyMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Bitmap-driven background copy (the default; the only one here).
    #[default]
    Background,
    /// Synchronous writes to the target (not implemented: refused).
    WriteBlocking,
}

/// QMP `blockdev-mirror` arguments.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub struct MirrorArgs {
    /// Job id; defaults to `device`.
    #[serde(default)]
    pub job_id: Option<String>,
    /// The source node.
    pub device: String,
    /// The target node (existing, same size).
    pub target: String,
    /// Refused if given (not implemented).
    #[serde(default)]
    pub replaces: Option<String>,
    /// `full`, `top` or `none` (`incremental`/`bitmap` are refused, as in
    /// QEMU).
    pub sync: SyncMode,
    /// Speed limit, bytes/s (0 = unlimited); applies until READY.
    #[serde(default)]
    pub speed: i64,
    /// Dirty bitmap granularity: a power of two in [512 B, 64 MiB];
    /// default the target's cluster size (at least 4 KiB), 64 KiB without
    /// clusters.
    #[serde(default)]
    pub granularity: Option<u32>,
    /// Copy buffer size (default 16 MiB): the bytes in flight at most (in
    /// at most 16 operations); one operation copies at most
    /// `max(buf-size / 16, 1 MiB)` of contiguous dirty data.
    #[serde(default)]
    pub buf_size: Option<i64>,
    /// Policy for read errors (default `report`).
    #[serde(default)]
    pub on_source_error: OnError,
    /// Policy for write errors (default `report`).
    #[serde(default)]
    pub on_target_error: OnError,
    /// The node name of the job's filter node (QEMU's; absent: an
    /// implicit `#blockN` name).
    #[serde(default)]
    pub filter_node_name: Option<String>,
    /// `background` only.
    #[serde(default)]
    pub copy_mode: CopyMode,
    /// Default true.
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    /// Default true.
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
    /// Trust that the target reads as zeroes (accepted; the first pass
    /// copies zero ranges as zero writes either way).
    #[serde(default)]
    pub target_is_zero: bool,
}

impl MirrorArgs {
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
            replaces: None,
            sync,
            speed: 0,
            granularity: None,
            buf_size: None,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            filter_node_name: None,
            copy_mode: CopyMode::Background,
            auto_finalize: true,
            auto_dismiss: true,
            target_is_zero: false,
        }
    }
}

/// What is dirty when the job starts.
pub(crate) enum Initial {
    /// Everything.
    Full,
    /// What is allocated in these layers (top first): sync `top` is the
    /// source alone; active commit is top down to above base.
    Allocated(Vec<Arc<BlockNode>>),
    /// Nothing (sync `none`).
    Nothing,
}

/// The mirror loop, shared by `blockdev-mirror` and active commit.
pub(crate) struct MirrorCore {
    pub(crate) source: Arc<BlockNode>,
    pub(crate) target: Arc<BlockNode>,
    pub(crate) bitmap: Arc<Bits>,
    pub(crate) initial: Initial,
    pub(crate) max_io: u64,
    /// Bytes in flight at most (`buf-size`).
    pub(crate) buf_size: u64,
    pub(crate) on_source_error: OnError,
    pub(crate) on_target_error: OnError,
    pub(crate) ready: AtomicBool,
    /// Grow the target to the source's size (active commit's base).
    pub(crate) grow_target: bool,
    /// Ranges the background copies are working on (write-blocking mode
    /// must not mark those clean).
    pub(crate) busy: Arc<BusyRanges>,
    /// Copy buffers, one per copy in flight (at most `buf-size` in all).
    pub(crate) pool: Arc<BufPool>,
}

/// Byte ranges of copies in flight.
#[derive(Default)]
pub(crate) struct BusyRanges(parking_lot::Mutex<Vec<(u64, u64)>>);

impl BusyRanges {
    fn add(&self, off: u64, len: u64) {
        self.0.lock().push((off, len));
    }
    fn remove(&self, off: u64, len: u64) {
        let mut v = self.0.lock();
        if let Some(i) = v.iter().position(|&r| r == (off, len)) {
            v.swap_remove(i);
        }
    }
    fn overlaps(&self, off: u64, len: u64) -> bool {
        self.0
            .lock()
            .iter()
            .any(|&(o, l)| o < off + len && off < o + l)
    }
}

/// `copy-mode: write-blocking`: a guest write to the source is written to
/// the target too before it completes (QEMU's active mirroring), and the
/// granules it covers whole are then clean — unless a background copy of
/// them is in flight, which may have read the old data: those stay dirty
/// and are copied again. Zero writes and discards are left to the
/// background copy (they only mark the bitmap).
struct ActiveMirror {
    target: Arc<BlockNode>,
    bitmap: Arc<Bits>,
    busy: Arc<BusyRanges>,
}

impl WriteHook for ActiveMirror {
    fn wants_data(&self) -> bool {
        true
    }
    fn after_write_data<'a>(&'a self, offset: u64, data: &'a [u8]) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            if self.target.write(offset, data.to_vec()).await.is_err() {
                // The range stays dirty: the background copy retries it,
                // under the job's error policy.
                return;
            }
            let g = self.bitmap.granularity();
            let (start, end) = (offset.div_ceil(g) * g, (offset + len) / g * g);
            if end > start && !self.busy.overlaps(start, end - start) {
                self.bitmap.set(start, end - start, false);
            }
        })
    }
}

impl MirrorCore {
    async fn populate(&self) -> Result<()> {
        let len = self.source.len();
        match &self.initial {
            Initial::Nothing => {}
            Initial::Full => self.bitmap.set(0, len, true),
            Initial::Allocated(layers) => {
                let mut off = 0;
                while off < len {
                    let (a, n) = allocated_above(layers, off, len - off).await?;
                    if a {
                        self.bitmap.set(off, n, true);
                    }
                    off += n;
                }
            }
        }
        Ok(())
    }

    fn policy(&self, op: IoOperation) -> OnError {
        match op {
            IoOperation::Read => self.on_source_error,
            _ => self.on_target_error,
        }
    }

    pub(crate) async fn run(&self, job: &JobControl) -> Result<()> {
        if self.grow_target && self.target.len() < self.source.len() {
            self.target.truncate(self.source.len()).await?;
        }
        if let Err(e) = self.populate().await {
            handle_io_error(job, self.on_source_error, IoOperation::Read, e).await?;
            self.bitmap.set(0, self.source.len(), true);
        }
        let mut win = Window::new(job.context(), MAX_IN_FLIGHT as usize, self.buf_size);
        let r = self.copy_loop(job, &mut win).await;
        // Whatever ended the loop, nothing stays in flight.
        win.drain().await;
        r
    }

    /// Re-marks a failed request's range dirty: it is copied again.
    fn redirty(&self) -> impl FnMut(u64, u64) + '_ {
        |off, len| self.bitmap.set(off, len, true)
    }

    async fn copy_loop(&self, job: &JobControl, win: &mut Window) -> Result<()> {
        let policy = |op| self.policy(op);
        loop {
            let ready = self.ready.load(Ordering::Acquire);
            if job.is_cancelled() && (job.is_force_cancelled() || !ready) {
                return Err(Error::Cancelled);
            }
            if job.pause_requested() {
                // Paused with nothing in flight, as QEMU's mirror_pause.
                win.reap(job, true, true, policy, self.redirty()).await?;
                job.pause_point().await;
                continue;
            }
            let (done, _) = job.progress();
            job.set_total(done + self.bitmap.count() + win.bytes());
            if !win.fits(self.max_io) {
                win.reap(job, false, true, policy, self.redirty()).await?;
                continue;
            }
            if let Some((off, n)) = self.bitmap.next_run(self.max_io) {
                if win.overlaps(off, n) {
                    // Dirtied again while being copied: after that copy.
                    win.reap(job, false, true, policy, self.redirty()).await?;
                    continue;
                }
                self.bitmap.set(off, n, false);
                let (src, dst) = (self.source.clone(), self.target.clone());
                let (busy, pool) = (self.busy.clone(), self.pool.clone());
                busy.add(off, n);
                win.spawn(off, n, async move {
                    let r = copy_range(&src, &dst, off, n, &pool).await.map(|()| n);
                    busy.remove(off, n);
                    r
                });
                // Throttled only until READY, as in QEMU.
                if job.over_limit(if ready { 0 } else { n }) {
                    win.reap(job, true, true, policy, self.redirty()).await?;
                    job.rate_limit(0).await;
                }
                continue;
            }
            if !win.is_empty() {
                win.reap(job, false, true, policy, self.redirty()).await?;
                continue;
            }
            // In sync: nothing dirty, nothing in flight.
            if let Err(e) = self.target.flush().await {
                handle_io_error(job, self.on_target_error, IoOperation::Write, e).await?;
                continue;
            }
            if !ready {
                self.ready.store(true, Ordering::Release);
                job.set_ready();
            }
            if job.should_complete() || job.is_cancelled() {
                // `complete` (pivot) or a soft cancel after READY (no
                // pivot): either way the target is in sync right now —
                // every request runs on this context, so no guest write
                // can land between the check above and here.
                return Ok(());
            }
            job.sleep_ns(SLICE_NS).await;
        }
    }

    /// Copies what guest writes dirtied after the copy loop found the
    /// nodes in sync (with `auto-finalize: false` or in a transaction the
    /// job waits in between), until nothing is dirty, no request runs on
    /// the source and the target is flushed. Nothing is awaited after that
    /// last check, so a caller that switches users synchronously right
    /// after loses no write.
    async fn final_sync(&self) -> Result<()> {
        loop {
            while let Some((off, n)) = self.bitmap.next_run(self.max_io) {
                self.bitmap.set(off, n, false);
                if let Err(e) = copy_range(&self.source, &self.target, off, n, &self.pool).await {
                    self.bitmap.set(off, n, true);
                    return Err(e.1);
                }
            }
            if self.source.in_flight() > 0 {
                self.source.wait_idle().await;
                continue;
            }
            self.target.flush().await?;
            if self.bitmap.count() == 0 && self.source.in_flight() == 0 {
                return Ok(());
            }
        }
    }

    /// The pivot of `complete`: `replaced` (the source, or the node
    /// `replaces` names) is replaced by the target for its users (QEMU's
    /// `bdrv_replace_node`): an export of it serves the target from now
    /// on, an overlay backed by it reads the target. External clients are
    /// held off meanwhile (QEMU drains around the pivot), the last writes
    /// are copied, and the switch happens with no await after the check
    /// that the nodes are in sync.
    pub(crate) async fn pivot(
        &self,
        held: &Held,
        graph: &GraphRef,
        replaced: &Arc<BlockNode>,
    ) -> Result<()> {
        let _clients = match AioContext::current() {
            Some(ctx) => Some(
                ctx.disable_clients(ClientType::EXTERNAL.mask())
                    .map_err(|e| Error::Job(format!("cannot pivot: {e}")))?,
            ),
            None => None,
        };
        self.final_sync().await?;
        held.drop_perms();
        held.drop_hooks();
        graph.replace_node(replaced, &self.target).await
    }

    /// Before READY every cancel is a force cancel.
    pub(crate) fn cancel(&self, force: bool) -> bool {
        force || !self.ready.load(Ordering::Acquire)
    }
}

struct MirrorJob {
    core: MirrorCore,
    held: Held,
    graph: GraphRef,
    /// What the target replaces at the pivot: the source, or `replaces`.
    replaced: Arc<BlockNode>,
    /// `copy-mode: write-blocking`.
    write_blocking: bool,
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        JobType::Mirror
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
    fn actively_synced(&self) -> Option<bool> {
        // QEMU sets it once a write-blocking mirror is in sync.
        Some(self.write_blocking && self.core.ready.load(Ordering::Acquire))
    }
    fn prepare<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // The job's `mirror_top` leaves the graph first, as in QEMU,
            // so the pivot does not relink it.
            self.held.drop_filter();
            if !job.should_complete() || job.is_cancelled() {
                // A soft cancel after READY: the target is in sync, the
                // users stay on the source.
                self.held.drop_hooks();
                return Ok(());
            }
            self.core
                .pivot(&self.held, &self.graph, &self.replaced)
                .await?;
            log::info!(
                "job {}: pivot: '{}' replaces '{}'",
                job.id(),
                self.core.target.name(),
                self.replaced.name()
            );
            Ok(())
        })
    }
    fn clean(&self) {
        self.held.release();
    }
}

/// The granularity QEMU picks: the target's cluster size, at least
/// 4 KiB; 64 KiB for formats without clusters.
pub(crate) fn default_granularity(target: &BlockNode) -> u64 {
    match target.info().cluster_size {
        Some(cs) => cs.max(4096),
        None => 64 << 10,
    }
}

/// The node `replaces` names, checked as QEMU checks it: a node name (not
/// a generated one), and one the target may stand in for without the data
/// its users see changing abruptly. Here that is the source itself: QEMU
/// also accepts nodes below the source through filters and quorum, which
/// this block layer does not have yet.
fn replaces_node(
    graph: &BlockGraph,
    source: &Arc<BlockNode>,
    name: &str,
) -> Result<Arc<BlockNode>> {
    let node = graph
        .nodes()
        .into_iter()
        .find(|n| n.name() == name && !name.starts_with('#'))
        .ok_or_else(|| Error::Job(format!("Failed to find node with node-name='{name}'")))?;
    if !Arc::ptr_eq(&node, source) {
        return Err(Error::Job(format!(
            "Cannot replace '{name}' by a node mirrored from '{}', because it cannot be \
             guaranteed that doing so would not lead to an abrupt change of visible data",
            source.name()
        )));
    }
    Ok(node)
}

/// `blockdev-mirror`.
///
/// # Errors
///
/// QEMU's texts for missing nodes, busy nodes, bad granularity and
/// unsupported sync modes; `Source and target image have different
/// sizes`.
pub fn start_mirror(
    ctx: &AioContext,
    graph: &BlockGraph,
    registry: &JobRegistry,
    args: MirrorArgs,
) -> Result<Job> {
    let source = find_device(graph, &args.device)?;
    let target = find_device(graph, &args.target)?;
    source.check_op_blockers()?;
    target.check_op_blockers()?;
    let replaced = match &args.replaces {
        None => source.clone(),
        Some(r) => replaces_node(graph, &source, r)?,
    };
    let gran = match args.granularity {
        None | Some(0) => default_granularity(&target),
        Some(g) => {
            if !(512..=64 << 20).contains(&g) {
                return Err(Error::Job(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]".into(),
                ));
            }
            if !g.is_power_of_two() {
                return Err(Error::Job(
                    "Parameter 'granularity' expects a power of 2".into(),
                ));
            }
            u64::from(g)
        }
    };
    let buf_size = match args.buf_size {
        None | Some(0) => DEFAULT_BUF_SIZE,
        Some(b) if b < 0 => {
            return Err(Error::Job(
                "Parameter 'buf-size' expects a non-negative value".into(),
            ))
        }
        Some(b) => (b as u64).div_ceil(gran) * gran,
    };
    let initial = match args.sync {
        SyncMode::Full => Initial::Full,
        SyncMode::Top => Initial::Allocated(vec![source.clone()]),
        SyncMode::None => Initial::Nothing,
        SyncMode::Incremental | SyncMode::Bitmap => {
            let s = if args.sync == SyncMode::Bitmap {
                "bitmap"
            } else {
                "incremental"
            };
            return Err(Error::Job(format!("Sync mode '{s}' not supported")));
        }
    };
    if Arc::ptr_eq(&source, &target) {
        return Err(Error::Job("Can't mirror node into itself".into()));
    }
    if source.len() != target.len() {
        return Err(Error::Job(
            "Source and target image have different sizes".into(),
        ));
    }
    let speed = check_speed(args.speed)?;
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
    let f =
        FilterOptions::new(FilterKind::MirrorTop, &user).node_name(args.filter_node_name.clone());
    holds.insert_filter(graph, &source, JobType::Mirror, f)?;
    let bitmap = Arc::new(Bits::new(source.len(), gran));
    let driver = Arc::new(MirrorJob {
        core: MirrorCore {
            source: source.clone(),
            target: target.clone(),
            bitmap: bitmap.clone(),
            initial,
            max_io: (buf_size / MAX_IN_FLIGHT).max(MAX_IO_BYTES).min(buf_size),
            buf_size,
            on_source_error: args.on_source_error,
            on_target_error: args.on_target_error,
            ready: AtomicBool::new(false),
            grow_target: false,
            busy: Arc::default(),
            pool: Arc::new(BufPool::new(MAX_IN_FLIGHT as usize)),
        },
        held: Held::default(),
        graph: graph.handle(),
        replaced,
        write_blocking: args.copy_mode == CopyMode::WriteBlocking,
    });
    let job = registry.create(
        ctx,
        job_options(&id, speed, args.auto_finalize, args.auto_dismiss),
        driver.clone(),
    )?;
    holds.block(&source, JobType::Mirror);
    holds.block(&target, JobType::Mirror);
    holds.hooks.push(source.add_write_hook(bitmap.clone()));
    if args.copy_mode == CopyMode::WriteBlocking {
        // After the bitmap's hook: the write marks its granules dirty
        // first, then this copies it and marks them clean.
        holds
            .hooks
            .push(source.add_write_hook(Arc::new(ActiveMirror {
                target: target.clone(),
                bitmap,
                busy: driver.core.busy.clone(),
            })));
    }
    holds.pause_on_drain(&job);
    *driver.held.0.lock() = holds;
    job.start();
    Ok(job)
}
