//! [`BlockNode`]: one layer of the graph.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::bitmap::{self, BitmapAddOptions, BitmapUndo, Check, DirtyBitmap};
use super::file::FileDriver;
use super::perm::PermUser;
use super::raw::RawDriver;
use super::{
    BlockDriver, BlockStatus, BoxFuture, Buffer, CheckOptions, CheckReport, ImageInfo, Perm,
    PermGuard, SnapshotCreateOptions, SnapshotInfo, SnapshotRef,
};
use crate::{Error, Result};

/// A node of the block graph: a driver instance with a name, a read-only
/// flag and the permissions of its users.
///
/// Requests are checked against the node's size and read-only flag, then
/// handed to the driver. All methods take `&self`; wrap the node in an
/// `Arc` (the graph does) to use it from tasks.
pub struct BlockNode {
    name: String,
    driver: Box<dyn BlockDriver>,
    read_only: AtomicBool,
    users: Mutex<Vec<PermUser>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    blockers: Mutex<Vec<(u64, String)>>,
    hooks: Mutex<Vec<(u64, Arc<dyn WriteHook>)>>,
    /// Named dirty bitmaps, newest first (QEMU lists them so).
    bitmaps: Mutex<Vec<Arc<DirtyBitmap>>>,
    /// [`RequestPolicy`], packed by [`RequestPolicy::bits`].
    policy: AtomicU8,
    /// The `blockdev-add` options the node was made with, children
    /// (`file`, `backing`) and `read-only` left out: what
    /// `blockdev-reopen` must be given again unchanged.
    options: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// Requests running through this node's methods.
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to 0 while someone waits.
    idle: aio::CoQueue,
    /// Set once a write hook or a dirty bitmap is added: until then a
    /// write takes neither lock to find it has none to tell.
    may_hook: AtomicBool,
    /// [`wait_idle`](Self::wait_idle) calls waiting: a request ending
    /// with nobody waiting does not touch `idle`.
    idle_waiters: AtomicUsize,
    /// Drained sections this node is in (see `super::drain`).
    quiesce: AtomicUsize,
    /// Added by a top-level `blockdev-add`: only `blockdev-del` removes it.
    by_user: AtomicBool,
    /// Told when a drained section begins and ends: jobs using the node.
    drain_listeners: Mutex<Vec<(u64, Arc<dyn DrainListener>)>>,
    /// Top-level users that follow this node when it is replaced.
    roots: super::root::Roots,
    /// A job's filter above this node, which guest reads go through
    /// ([`guest_read`](Self::guest_read)).
    read_filter: Mutex<Option<std::sync::Weak<BlockNode>>>,
}

/// Something that must stop issuing requests on a node while it is
/// drained: a block job (it pauses at its next pause point).
pub trait DrainListener: Send + Sync {
    /// The node's first drained section began.
    fn drained_begin(&self);
    /// The node's last drained section ended.
    fn drained_end(&self);
}

/// A registered [`DrainListener`]; dropping it unregisters it.
pub struct DrainListenerGuard {
    node: Arc<BlockNode>,
    id: u64,
}

impl fmt::Debug for DrainListenerGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainListenerGuard")
            .field("node", &self.node.name())
            .finish()
    }
}

impl Drop for DrainListenerGuard {
    fn drop(&mut self) {
        let mut l = self
            .node
            .drain_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        l.retain(|(i, _)| *i != self.id);
    }
}

/// One request counted in a node's `in_flight`.
struct InFlight<'a>(&'a BlockNode);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Pairs with the increment and the load in `wait_idle`: with both
        // sides sequentially consistent, either the waiter sees the count
        // at 0 or this sees the waiter (already queued on `idle`).
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.idle_waiters.load(Ordering::SeqCst) > 0
        {
            self.0.idle.notify_all();
        }
    }
}

/// How a node's reads and writes reach its driver: this crate's `file`
/// and `raw` drivers without boxed futures, any other through the
/// [`BlockDriver`] methods.
enum Route<'a> {
    /// Await the `file` driver's future inline.
    File(&'a FileDriver),
    /// Send the request to the `raw` driver's `file` child.
    Raw(&'a RawDriver),
    /// The boxed trait methods.
    Driver,
}

/// One [`BlockNode::wait_idle`] caller counted in `idle_waiters`.
struct IdleWaiter<'a>(&'a BlockNode);

impl Drop for IdleWaiter<'_> {
    fn drop(&mut self) {
        self.0.idle_waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// QMP's `detect-zeroes`: whether writes of zeroes become zero writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum DetectZeroes {
    /// Written as they are.
    #[default]
    Off,
    /// A buffer of zeroes becomes a zero write.
    On,
    /// As `On`, and the space may be freed (the zero write may discard).
    Unmap,
}

/// How a node treats some requests (`blockdev-add`'s `discard` and
/// `detect-zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestPolicy {
    /// Discard requests reach the driver (`discard=unmap`); otherwise
    /// they succeed doing nothing (`discard=ignore`).
    pub(crate) discard: bool,
    /// Zero detection on writes.
    pub(crate) detect_zeroes: DetectZeroes,
}

impl Default for RequestPolicy {
    fn default() -> Self {
        RequestPolicy {
            discard: true,
            detect_zeroes: DetectZeroes::Off,
        }
    }
}

impl RequestPolicy {
    fn bits(self) -> u8 {
        let dz = match self.detect_zeroes {
            DetectZeroes::Off => 0,
            DetectZeroes::On => 1,
            DetectZeroes::Unmap => 2,
        };
        u8::from(self.discard) | (dz << 1)
    }

    fn from_bits(b: u8) -> Self {
        RequestPolicy {
            discard: b & 1 != 0,
            detect_zeroes: match b >> 1 {
                0 => DetectZeroes::Off,
                1 => DetectZeroes::On,
                _ => DetectZeroes::Unmap,
            },
        }
    }
}

/// Options of [`BlockNode::reopen`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReopenOptions {
    /// Refuse writes from now on.
    pub read_only: bool,
}

impl ReopenOptions {
    /// Read-write (the default).
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets read-only.
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }
}

/// Something that watches writes through a node: a dirty bitmap (mirror)
/// or copy-before-write (backup). Hooks see writes, zero writes and
/// discards that go through [`BlockNode`]'s methods — guest I/O — not the
/// writes a driver makes to its own children.
pub trait WriteHook: Send + Sync {
    /// Runs before the request reaches the driver; an error fails the
    /// request (QEMU's copy-before-write with `on-cbw-error=break-guest-write`).
    fn before_write<'a>(
        &'a self,
        node: &'a BlockNode,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (node, offset, len);
        Box::pin(async { Ok(()) })
    }
    /// Runs after the request completed (successfully or not).
    fn after_write(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Runs when a flush of the node starts; `flush` names it in the
    /// matching [`after_flush`](Self::after_flush) (flushes may overlap).
    fn before_flush(&self, flush: u64) {
        let _ = flush;
    }
    /// Runs after the flush `flush` completed successfully: every write
    /// that completed before its [`before_flush`](Self::before_flush) is
    /// durable (a crash-point recorder marks its barrier here).
    fn after_flush(&self, flush: u64) {
        let _ = flush;
    }
    /// Whether [`after_write_data`](Self::after_write_data) wants the data
    /// of writes (it is then kept until the write is done).
    fn wants_data(&self) -> bool {
        false
    }
    /// Runs after a data write succeeded, after every hook's
    /// [`after_write`](Self::after_write), with the data written; the
    /// guest's write completes only when this does (a write-blocking
    /// mirror copies it to its target here).
    fn after_write_data<'a>(&'a self, offset: u64, data: &'a [u8]) -> BoxFuture<'a, ()> {
        let _ = (offset, data);
        Box::pin(async {})
    }
}

/// A registered [`WriteHook`]; dropping it unregisters the hook.
pub struct WriteHookGuard {
    node: Arc<BlockNode>,
    id: u64,
}

impl fmt::Debug for WriteHookGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteHookGuard")
            .field("node", &self.node.name())
            .finish()
    }
}

impl Drop for WriteHookGuard {
    fn drop(&mut self) {
        let mut h = self.node.hooks.lock().unwrap_or_else(|e| e.into_inner());
        h.retain(|(i, _)| *i != self.id);
    }
}

/// An op blocker (QEMU's `bdrv_op_block_all`): while it lives, jobs and
/// `blockdev-del` on the node are refused with
/// `Node 'X' is busy: <reason>`.
pub struct OpBlocker {
    node: Arc<BlockNode>,
    id: u64,
}

impl fmt::Debug for OpBlocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpBlocker")
            .field("node", &self.node.name())
            .finish()
    }
}

impl OpBlocker {
    /// The blocked node.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }
}

impl Drop for OpBlocker {
    fn drop(&mut self) {
        let mut b = self.node.blockers.lock().unwrap_or_else(|e| e.into_inner());
        b.retain(|(i, _)| *i != self.id);
    }
}

impl fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .field("filename", &self.driver.filename())
            .field("read_only", &self.read_only())
            .finish()
    }
}

fn after_write(hooks: &[Arc<dyn WriteHook>], offset: u64, len: u64) {
    for h in hooks {
        h.after_write(offset, len);
    }
}

impl BlockNode {
    /// Wraps a driver instance.
    pub(crate) fn new(name: String, driver: Box<dyn BlockDriver>, read_only: bool) -> Arc<Self> {
        // Newest first: the image's last bitmap heads the list, as in QEMU.
        let stored: Vec<Arc<DirtyBitmap>> = driver
            .take_stored_bitmaps()
            .into_iter()
            .rev()
            .map(Arc::new)
            .collect();
        let has_stored = !stored.is_empty();
        let node = Arc::new(BlockNode {
            name,
            driver,
            read_only: AtomicBool::new(read_only),
            users: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            blockers: Mutex::new(Vec::new()),
            hooks: Mutex::new(Vec::new()),
            bitmaps: Mutex::new(stored),
            policy: AtomicU8::new(RequestPolicy::default().bits()),
            options: Mutex::new(serde_json::Map::new()),
            in_flight: AtomicUsize::new(0),
            idle: aio::CoQueue::new(),
            idle_waiters: AtomicUsize::new(0),
            may_hook: AtomicBool::new(has_stored),
            quiesce: AtomicUsize::new(0),
            by_user: AtomicBool::new(false),
            drain_listeners: Mutex::new(Vec::new()),
            roots: Default::default(),
            read_filter: Mutex::new(None),
        });
        if let Some(b) = node.backing() {
            b.link_parent(&node);
        }
        node
    }

    pub(crate) fn add_root(&self, r: &Arc<super::BlockRoot>) {
        self.roots.add(r);
    }

    /// The live roots on this node.
    pub(crate) fn roots(&self) -> Vec<Arc<super::BlockRoot>> {
        self.roots.live()
    }

    pub(crate) fn forget_roots(&self, keep: impl Fn(&super::BlockRoot) -> bool) {
        self.roots.retain(keep);
    }

    fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    /// Requests now running through this node.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the node is in a drained section.
    pub fn is_drained(&self) -> bool {
        self.quiesce.load(Ordering::Acquire) > 0
    }

    /// Waits until no request runs through this node.
    pub(crate) async fn wait_idle(&self) {
        self.idle_waiters.fetch_add(1, Ordering::SeqCst);
        let _counted = IdleWaiter(self);
        loop {
            // Queue first, then look: a request ending in between still
            // wakes this waiter.
            let w = self.idle.wait();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            w.await;
        }
    }

    /// Enters a drained section: the first one tells the listeners.
    pub(crate) fn quiesce_begin(&self) {
        if self.quiesce.fetch_add(1, Ordering::AcqRel) == 0 {
            for l in self.drain_listeners() {
                l.drained_begin();
            }
        }
    }

    /// Leaves a drained section: the last one tells the listeners.
    pub(crate) fn quiesce_end(&self) {
        if self.quiesce.fetch_sub(1, Ordering::AcqRel) == 1 {
            for l in self.drain_listeners() {
                l.drained_end();
            }
        }
    }

    fn drain_listeners(&self) -> Vec<Arc<dyn DrainListener>> {
        self.drain_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Registers `l` to be told about drained sections of this node (a
    /// listener added while the node is drained is told at once).
    pub fn add_drain_listener(self: &Arc<Self>, l: Arc<dyn DrainListener>) -> DrainListenerGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.drain_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, l.clone()));
        if self.is_drained() {
            l.drained_begin();
        }
        DrainListenerGuard {
            node: self.clone(),
            id,
        }
    }

    /// Whether the node was added by a top-level `blockdev-add` (not as
    /// an inline child, nor opened from an image header): jobs that drop
    /// it from a chain leave it in the graph for `blockdev-del`.
    pub fn added_by_user(&self) -> bool {
        self.by_user.load(Ordering::Acquire)
    }

    pub(crate) fn set_added_by_user(&self) {
        self.by_user.store(true, Ordering::Release);
    }

    /// Records the options the node was added with (see `options`).
    pub(crate) fn set_add_options(&self, o: serde_json::Map<String, serde_json::Value>) {
        *self.options.lock().unwrap_or_else(|e| e.into_inner()) = o;
    }

    /// The options the node was added with, without children and
    /// `read-only` (empty for nodes opened from an image header).
    pub fn add_options(&self) -> serde_json::Map<String, serde_json::Value> {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets how discards and writes of zeroes are treated.
    pub(crate) fn set_request_policy(&self, p: RequestPolicy) {
        self.policy.store(p.bits(), Ordering::Relaxed);
    }

    fn request_policy(&self) -> RequestPolicy {
        RequestPolicy::from_bits(self.policy.load(Ordering::Relaxed))
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver name (`qcow2`, `raw`, `file`, `null-co`).
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// The file the node is about.
    pub fn filename(&self) -> &str {
        self.driver.filename()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Switches the node between read-only and read-write (QEMU's
    /// `blockdev-reopen` of `read-only`, and what `block-commit` does to a
    /// read-only base for the length of the job). Going read-write, the
    /// `file` child is reopened read-write first; going read-only, the
    /// node's image is made clean (qcow2: flushed, dirty bit cleared)
    /// before its `file` child follows.
    ///
    /// # Errors
    ///
    /// Going read-only while a user holds the write or resize permission
    /// (`Block node 'N' is in use as writer by USER`), a file that cannot
    /// be opened for writing, an image that cannot be written (qcow2 with
    /// subclusters or a dirty bit), an NBD export that is read-only.
    pub async fn reopen(&self, opts: &ReopenOptions) -> Result<()> {
        if opts.read_only == self.read_only() {
            return Ok(());
        }
        if opts.read_only {
            let writer = {
                let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
                users
                    .iter()
                    .find(|u| u.perm.contains(Perm::WRITE) || u.perm.contains(Perm::RESIZE))
                    .map(|u| u.user.clone())
            };
            if let Some(u) = writer {
                return Err(Error::Permission {
                    node: self.name.clone(),
                    reason: format!("Block node '{}' is in use as writer by {u}", self.name),
                });
            }
            // Persistent bitmaps go into the image now, as at a close
            // (QEMU stores them on a reopen read-only too).
            self.store_bitmaps().await?;
            self.read_only.store(true, Ordering::Release);
            let r = self.driver.reopen(true).await;
            if let Err(e) = r {
                self.read_only.store(false, Ordering::Release);
                return Err(e);
            }
            self.set_stored_bitmaps_readonly(true);
            if let Some(f) = self.file_child() {
                f.set_child_perm(&self.name, "file", Perm::CONSISTENT_READ)?;
                // A failure to reopen the file read-only (someone else
                // writes it) leaves it as it was, which is harmless.
                let _ = Box::pin(f.reopen(opts)).await;
            }
            return Ok(());
        }
        if let Some(f) = self.file_child() {
            Box::pin(f.reopen(opts)).await?;
            f.set_child_perm(
                &self.name,
                "file",
                Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            )?;
        }
        if let Err(e) = self.driver.reopen(false).await {
            if let Some(f) = self.file_child() {
                let _ = f.set_child_perm(&self.name, "file", Perm::CONSISTENT_READ);
            }
            return Err(e);
        }
        self.read_only.store(false, Ordering::Release);
        self.set_stored_bitmaps_readonly(false);
        Ok(())
    }

    fn set_stored_bitmaps_readonly(&self, on: bool) {
        for b in self.bitmaps().iter().filter(|b| b.persistent()) {
            b.set_readonly(on);
        }
    }

    /// Whether `u` lets another user take `perm`.
    fn check_shared_by(&self, u: &PermUser, perm: Perm) -> Result<()> {
        let denied = perm.without(u.shared_now());
        if denied.is_empty() {
            return Ok(());
        }
        Err(Error::Permission {
            node: self.name.clone(),
            reason: format!(
                "Conflicts with use by {} as '{}', which does not allow '{}' on {}",
                u.user, u.role, denied, self.name
            ),
        })
    }

    /// Changes what `user` (in `role`) uses of this node, checked against
    /// what the other users share.
    fn set_child_perm(&self, user: &str, role: &str, perm: Perm) -> Result<()> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for u in users.iter().filter(|u| !(u.user == user && u.role == role)) {
            self.check_shared_by(u, perm)?;
        }
        for u in users
            .iter_mut()
            .filter(|u| u.user == user && u.role == role)
        {
            u.perm = perm;
        }
        Ok(())
    }

    /// The virtual size in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len()
    }

    /// Whether the size is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `file` child.
    pub fn file_child(&self) -> Option<Arc<BlockNode>> {
        self.driver.file_child()
    }

    /// The `backing` child.
    pub fn backing(&self) -> Option<Arc<BlockNode>> {
        self.driver.backing()
    }

    /// This node and its backing chain, top first.
    pub fn chain(self: &Arc<Self>) -> Vec<Arc<BlockNode>> {
        let mut v = vec![self.clone()];
        while let Some(b) = v.last().and_then(|n| n.backing()) {
            v.push(b);
        }
        v
    }

    /// Facts for `info`.
    pub fn info(&self) -> ImageInfo {
        self.driver.info()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!(
                "{}: request of {len} bytes at offset {offset} is past the end ({size} bytes)",
                self.filename()
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::Permission {
                node: self.name.clone(),
                reason: format!("Block node '{}' is read-only", self.name),
            });
        }
        Ok(())
    }

    /// A guest's read (an export's): through the job filter above this
    /// node while there is one (a stream's `copy-on-read` copies what it
    /// reads into this node), else [`read`](Self::read). QEMU moves the
    /// node's parents onto the filter; here they keep the node and their
    /// reads are sent up.
    pub async fn guest_read(&self, offset: u64, buf: impl Into<Buffer>) -> Result<Buffer> {
        let buf = buf.into();
        let filter = self
            .read_filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(std::sync::Weak::upgrade);
        match filter {
            Some(f) => f.read(offset, buf).await,
            None => self.read(offset, buf).await,
        }
    }

    /// Sets (or with `None` clears) the filter node guest reads of this
    /// node go through.
    pub(crate) fn set_read_filter(&self, filter: Option<std::sync::Weak<BlockNode>>) {
        *self.read_filter.lock().unwrap_or_else(|e| e.into_inner()) = filter;
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read(&self, offset: u64, buf: impl Into<Buffer>) -> Result<Buffer> {
        let buf = buf.into();
        let _req = self.enter();
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        match self.route() {
            Route::File(f) => f.read_unboxed(offset, buf).await,
            // What `RawDriver::read` does; boxed, because this future
            // holds its child node's (and inline, every node's read
            // future, the `file` node's under qcow2 too, would be the
            // larger to build and move).
            Route::Raw(raw) => Box::pin(raw.f().read(offset, buf)).await,
            Route::Driver => self.driver.read(offset, buf).await,
        }
    }

    /// How this node's reads and writes reach its driver.
    fn route(&self) -> Route<'_> {
        let Some(any) = self.driver.as_any() else {
            return Route::Driver;
        };
        if let Some(f) = any.downcast_ref::<FileDriver>() {
            Route::File(f)
        } else if let Some(r) = any.downcast_ref::<RawDriver>() {
            Route::Raw(r)
        } else {
            Route::Driver
        }
    }

    /// The driver's write; `keep`: hand the buffer back.
    async fn driver_write(&self, offset: u64, buf: Buffer, keep: bool) -> Result<Option<Buffer>> {
        if keep {
            self.driver.write_keep(offset, buf).await.map(Some)
        } else {
            self.driver.write(offset, buf).await.map(|()| None)
        }
    }

    /// Writes `buf` at `offset` (with `detect-zeroes`, a buffer of zeroes
    /// becomes a zero write).
    pub async fn write(&self, offset: u64, buf: impl Into<Buffer>) -> Result<()> {
        self.write_inner(offset, buf.into(), false).await.map(drop)
    }

    /// Writes `buf` at `offset` as [`write`](Self::write) does and hands
    /// the buffer back, so a caller writing the same bytes again (`aio-img
    /// bench`) needs no copy per request.
    pub async fn write_keep(&self, offset: u64, buf: impl Into<Buffer>) -> Result<Buffer> {
        self.write_inner(offset, buf.into(), true)
            .await
            .map(Option::unwrap_or_default)
    }

    /// A write: checks, zero detection and hooks around the driver's
    /// write; with `give_back` (or a hook wanting the data) the driver
    /// hands the buffer back.
    async fn write_inner(
        &self,
        offset: u64,
        buf: Buffer,
        give_back: bool,
    ) -> Result<Option<Buffer>> {
        let _req = self.enter();
        self.check_writable()?;
        if !self.driver.grows_on_write() {
            self.check_range(offset, buf.len() as u64)?;
        }
        if buf.is_empty() {
            return Ok(Some(buf));
        }
        if self.request_policy().detect_zeroes != DetectZeroes::Off && buf.iter().all(|&b| b == 0) {
            // Boxed: a rare path whose future would make every write's
            // future larger to build and move.
            Box::pin(self.write_zeroes(offset, buf.len() as u64)).await?;
            return Ok(Some(buf));
        }
        let len = buf.len() as u64;
        let hooks = self.before_write(offset, len).await?;
        let wants_data = hooks.iter().any(|h| h.wants_data());
        let keep = give_back || wants_data;
        let r = match self.route() {
            Route::File(f) => f
                .write_keep_unboxed(offset, buf)
                .await
                .map(|b| keep.then_some(b)),
            // What `RawDriver::write{,_keep}` does; boxed as in `read`.
            Route::Raw(raw) => Box::pin(raw.f().write_inner(offset, buf, keep)).await,
            Route::Driver => self.driver_write(offset, buf, keep).await,
        };
        after_write(&hooks, offset, len);
        if let (Ok(Some(data)), true) = (&r, wants_data) {
            for h in hooks.iter().filter(|h| h.wants_data()) {
                h.after_write_data(offset, data).await;
            }
        }
        r
    }

    /// A write that does not change what the node reads as (copy-on-read
    /// by a stream job; QEMU's `BDRV_REQ_WRITE_UNCHANGED`): write hooks do
    /// not see it. An all-zero buffer becomes a zero write. The buffer
    /// comes back, for a caller that reuses it.
    pub async fn write_unchanged(&self, offset: u64, buf: impl Into<Buffer>) -> Result<Buffer> {
        let buf = buf.into();
        let _req = self.enter();
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        if buf.iter().all(|&b| b == 0) {
            self.driver.write_zeroes(offset, buf.len() as u64).await?;
            return Ok(buf);
        }
        match self.route() {
            Route::File(f) => f.write_keep_unboxed(offset, buf).await,
            _ => self.driver.write_keep(offset, buf).await,
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _req = self.enter();
        self.check_writable()?;
        if !self.driver.grows_on_write() {
            self.check_range(offset, len)?;
        }
        if len == 0 {
            return Ok(());
        }
        let hooks = self.before_write(offset, len).await?;
        let r = self.driver.write_zeroes(offset, len).await;
        after_write(&hooks, offset, len);
        r
    }

    /// Discards `len` bytes at `offset`; with `discard=ignore`, succeeds
    /// doing nothing.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _req = self.enter();
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 || !self.request_policy().discard {
            return Ok(());
        }
        let hooks = self.before_write(offset, len).await?;
        let r = self.driver.discard(offset, len).await;
        after_write(&hooks, offset, len);
        r
    }

    async fn before_write(&self, offset: u64, len: u64) -> Result<Vec<Arc<dyn WriteHook>>> {
        let hooks = self.write_hooks();
        for h in &hooks {
            h.before_write(self, offset, len).await?;
        }
        Ok(hooks)
    }

    /// The write hooks and dirty bitmaps a write must tell, in order.
    fn write_hooks(&self) -> Vec<Arc<dyn WriteHook>> {
        // Pairs with the stores in `add_write_hook`, `add_bitmap` and
        // `restore_bitmap`, made before the hook is in its list: a write
        // ordered after an addition sees the flag.
        if !self.may_hook.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut hooks: Vec<Arc<dyn WriteHook>> = {
            let h = self.hooks.lock().unwrap_or_else(|e| e.into_inner());
            h.iter().map(|(_, h)| h.clone()).collect()
        };
        hooks.extend(
            self.bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|b| b.clone() as Arc<dyn WriteHook>),
        );
        hooks
    }

    fn bitmaps_locked(&self) -> std::sync::MutexGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.bitmaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a named dirty bitmap (`block-dirty-bitmap-add`), recording
    /// unless `opts.disabled`.
    ///
    /// # Errors
    ///
    /// QEMU's texts, in its order: `Bitmap name cannot be empty`,
    /// `Granularity must be power of 2 and at least 512`, for a
    /// persistent bitmap `Can't store persistent bitmaps to NODE:
    /// Operation not supported` (not qcow2) or `Can't make bitmap 'NAME'
    /// persistent in 'NODE': REASON` (qcow2 v2, read-only: `No write
    /// access`, limits), `Bitmap already exists: NAME`.
    pub fn add_bitmap(&self, name: &str, opts: &BitmapAddOptions) -> Result<Arc<DirtyBitmap>> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
        }
        let gran = match opts.granularity {
            Some(g) => {
                bitmap::check_granularity(g)?;
                g
            }
            None => self
                .info()
                .cluster_size
                .map(|c| c.max(4096))
                .unwrap_or(bitmap::DEFAULT_GRANULARITY),
        };
        if opts.persistent {
            match self.driver.can_store_bitmap(name, gran) {
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "Can't store persistent bitmaps to {}: Operation not supported",
                        self.name
                    )))
                }
                Some(Err(r)) => {
                    return Err(Error::InvalidArgument(format!(
                        "Can't make bitmap '{name}' persistent in '{}': {r}",
                        self.name
                    )))
                }
                Some(Ok(())) => {}
            }
        }
        if name.len() > 1023 {
            return Err(Error::InvalidArgument("Bitmap name is too long".into()));
        }
        self.may_hook.store(true, Ordering::Release);
        let mut list = self.bitmaps_locked();
        if list.iter().any(|b| b.name() == name) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        let mut b = DirtyBitmap::new(name, self.len(), gran, !opts.disabled);
        if opts.persistent {
            b.set_persistent();
        }
        let b = Arc::new(b);
        list.insert(0, b.clone());
        Ok(b)
    }

    /// The bitmap called `name`.
    ///
    /// # Errors
    ///
    /// `Dirty bitmap 'NAME' not found`.
    pub fn bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        self.bitmaps_locked()
            .iter()
            .find(|b| b.name() == name)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))
    }

    /// Removes a bitmap (`block-dirty-bitmap-remove`), and a persistent
    /// one from the image too; returns it.
    ///
    /// # Errors
    ///
    /// Not found, busy (held by an NBD export), read-only (a stored
    /// bitmap of a read-only image), or the image could not be updated
    /// (the bitmap then stays).
    pub async fn remove_bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let b = self.bitmap(name)?;
        b.check(Check::Remove)?;
        if b.persistent() {
            self.driver.remove_stored_bitmap(name).await?;
        }
        self.bitmaps_locked().retain(|x| !Arc::ptr_eq(x, &b));
        Ok(b)
    }

    /// Drops `b` from the node (a `transaction` undoing its add).
    pub fn forget_bitmap(&self, b: &Arc<DirtyBitmap>) {
        self.bitmaps_locked().retain(|x| !Arc::ptr_eq(x, b));
    }

    /// Removes a bitmap from the node like
    /// [`remove_bitmap`](Self::remove_bitmap) and returns it with its
    /// place in the list, for [`restore_bitmap`](Self::restore_bitmap).
    /// The image is not changed (see [`unstore_bitmap`](Self::unstore_bitmap);
    /// else a persistent bitmap leaves it when the node is closed).
    ///
    /// # Errors
    ///
    /// Not found, busy, or read-only.
    pub fn take_bitmap(&self, name: &str) -> Result<(usize, Arc<DirtyBitmap>)> {
        let b = self.bitmap(name)?;
        b.check(Check::Remove)?;
        let mut list = self.bitmaps_locked();
        let i = list.iter().position(|x| Arc::ptr_eq(x, &b)).unwrap_or(0);
        list.retain(|x| !Arc::ptr_eq(x, &b));
        Ok((i, b))
    }

    /// Takes a persistent bitmap out of the image only (a `transaction`
    /// removing it, after [`take_bitmap`](Self::take_bitmap); if the
    /// transaction aborts, the bitmap put back is stored again at close).
    ///
    /// # Errors
    ///
    /// The image could not be updated.
    pub async fn unstore_bitmap(&self, b: &DirtyBitmap) -> Result<()> {
        if !b.persistent() {
            return Ok(());
        }
        self.driver.remove_stored_bitmap(b.name()).await
    }

    /// Puts back a bitmap taken by [`take_bitmap`](Self::take_bitmap) at
    /// its place (a `transaction` undoing a remove).
    pub fn restore_bitmap(&self, at: usize, b: Arc<DirtyBitmap>) {
        self.may_hook.store(true, Ordering::Release);
        let mut list = self.bitmaps_locked();
        let at = at.min(list.len());
        list.insert(at, b);
    }

    /// Clears a bitmap (`block-dirty-bitmap-clear`); the returned undo
    /// puts the old bits back.
    ///
    /// # Errors
    ///
    /// Not found, or busy.
    pub fn clear_bitmap(&self, name: &str) -> Result<BitmapUndo> {
        let b = self.bitmap(name)?;
        b.check(Check::Change)?;
        let undo = b.undo_point(true);
        b.clear();
        Ok(undo)
    }

    /// Starts (`true`) or stops recording writes in a bitmap
    /// (`block-dirty-bitmap-enable` / `-disable`); the returned undo puts
    /// the old flag back.
    ///
    /// # Errors
    ///
    /// Not found, or busy.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<BitmapUndo> {
        let b = self.bitmap(name)?;
        b.check(Check::Change)?;
        let undo = b.undo_point(false);
        b.set_enabled(enabled);
        Ok(undo)
    }

    /// ORs `sources` (bitmaps of this or other nodes of the same size)
    /// into this node's bitmap `target` (`block-dirty-bitmap-merge`);
    /// granularities may differ (a source granule marks every target
    /// granule it touches).
    ///
    /// # Errors
    ///
    /// In QEMU's order: the target not found, a source of another size
    /// (`Bitmaps are of different sizes (destination size is D, source
    /// size is S) and can't be merged`), the target busy. The returned
    /// undo puts the target's old bits back.
    pub fn merge_bitmaps(&self, target: &str, sources: &[Arc<DirtyBitmap>]) -> Result<BitmapUndo> {
        let t = self.bitmap(target)?;
        for s in sources {
            if s.size() != t.size() {
                return Err(Error::InvalidArgument(format!(
                    "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                    t.size(),
                    s.size()
                )));
            }
        }
        t.check(Check::Change)?;
        for s in sources {
            s.check(Check::Read)?;
        }
        let undo = t.undo_point(true);
        for s in sources {
            for e in s.extents(0, s.size()).into_iter().filter(|e| e.dirty) {
                t.mark(e.offset, e.len);
            }
        }
        Ok(undo)
    }

    /// The node's bitmaps, newest first: one snapshot under one lock.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        self.bitmaps_locked().clone()
    }

    /// Registers a hook on writes through this node.
    pub fn add_write_hook(self: &Arc<Self>, hook: Arc<dyn WriteHook>) -> WriteHookGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.may_hook.store(true, Ordering::Release);
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, hook));
        WriteHookGuard {
            node: self.clone(),
            id,
        }
    }

    /// Blocks operations (jobs, `blockdev-del`) on the node with `reason`,
    /// e.g. `block device is in use by block job: stream`.
    pub fn op_block(self: &Arc<Self>, reason: impl Into<String>) -> OpBlocker {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.blockers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, reason.into()));
        OpBlocker {
            node: self.clone(),
            id,
        }
    }

    /// QEMU's `bdrv_op_is_blocked`: `Node 'X' is busy: <reason>` if an op
    /// blocker is set.
    pub fn check_op_blockers(&self) -> Result<()> {
        let b = self.blockers.lock().unwrap_or_else(|e| e.into_inner());
        match b.first() {
            Some((_, reason)) => Err(Error::Job(format!(
                "Node '{}' is busy: {reason}",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Makes `backing` (or nothing) this node's backing child, taking the
    /// usual backing permissions on it, and with `update_image` records its
    /// file name and format in the image (qcow2 header). The old backing
    /// child is released.
    /// `backing_file` overrides the recorded name (QMP's `backing-file`).
    pub async fn set_backing(
        self: &Arc<Self>,
        backing: Option<&Arc<BlockNode>>,
        update_image: bool,
        backing_file: Option<&str>,
    ) -> Result<()> {
        let guard = match backing {
            Some(b) => Some(b.attach(
                &self.name,
                "backing",
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::GRAPH_MOD,
            )?),
            None => None,
        };
        let record = update_image.then(|| match backing {
            Some(b) => (
                Some(backing_file.unwrap_or(b.filename()).to_string()),
                Some(b.driver_name().to_string()),
            ),
            None => (None, None),
        });
        self.driver.set_backing(guard, record).await?;
        if let Some(b) = backing {
            b.link_parent(self);
        }
        Ok(())
    }

    /// Rewrites the backing file link in the image without opening the
    /// file it names (`qemu-img rebase -u`): `file` `None` removes it.
    /// Only for a node without a backing child (opened with
    /// `no_backing`): what it reads is unchanged until it is reopened.
    pub async fn set_backing_link(&self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        self.check_op_blockers()?;
        if self.backing().is_some() {
            return Err(Error::InvalidArgument(format!(
                "{}: the backing link of a node with a backing child is changed with set_backing",
                self.filename()
            )));
        }
        let record = (file.map(str::to_string), format.map(str::to_string));
        self.driver.set_backing(None, Some(record)).await
    }

    /// Makes the node empty: every cluster unallocated, so that it reads
    /// as its backing file (QEMU's `bdrv_make_empty`; `qemu-img commit`
    /// does it after committing). qcow2 only.
    pub async fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        self.check_op_blockers()?;
        self.driver.make_empty().await
    }

    /// Closes this layer and its `file` child but not its backing chain
    /// (a layer dropped from the middle of a chain).
    pub async fn close_layer(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.store_bitmaps().await;
        let r = r.and(self.driver.close().await);
        if let Some(f) = self.file_child() {
            f.close().await?;
        }
        r
    }

    /// Stores the persistent bitmaps in the image (before a close).
    async fn store_bitmaps(&self) -> Result<()> {
        let list = self.bitmaps();
        self.driver.store_bitmaps(&list).await.map_err(|e| {
            log::error!("{}: storing persistent bitmaps: {e}", self.name);
            e
        })
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        let _req = self.enter();
        if self.read_only() {
            return Ok(());
        }
        let hooks: Vec<Arc<dyn WriteHook>> = {
            let h = self.hooks.lock().unwrap_or_else(|e| e.into_inner());
            h.iter().map(|(_, h)| h.clone()).collect()
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        for h in &hooks {
            h.before_flush(id);
        }
        self.driver.flush().await?;
        for h in &hooks {
            h.after_flush(id);
        }
        Ok(())
    }

    /// Changes the virtual size. Needs the node writable.
    pub async fn truncate(&self, len: u64) -> Result<()> {
        let _req = self.enter();
        self.check_writable()?;
        if self.bitmaps_locked().iter().any(|b| b.persistent()) {
            return Err(Error::InvalidArgument(
                "Can't resize an image which has bitmaps".into(),
            ));
        }
        self.driver.truncate(len).await
    }

    /// This layer's status at `offset`: the status and how many bytes
    /// (≥ 1 when `len` ≥ 1) share it.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let _req = self.enter();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok((BlockStatus::default(), 0));
        }
        self.driver.block_status(offset, len).await
    }

    /// Allocates the whole image up front (`preallocation` of a new
    /// image).
    pub async fn preallocate(&self, mode: super::Preallocation) -> Result<()> {
        self.check_writable()?;
        self.driver.preallocate(mode).await
    }

    /// Checks the image's metadata (`None`: the format has no checks).
    pub async fn check(&self) -> Result<Option<CheckReport>> {
        self.driver.check().await
    }

    /// Checks the image's metadata and repairs what `opts` allows
    /// (`qemu-img check -r`); the node must be writable to repair.
    pub async fn check_repair(&self, opts: &CheckOptions) -> Result<Option<CheckReport>> {
        self.driver.check_repair(opts).await
    }

    /// Whether the node's format stores internal snapshots (qcow2).
    pub fn supports_snapshots(&self) -> bool {
        self.driver.supports_snapshots()
    }

    /// The node's internal snapshots, in table order.
    pub async fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        self.driver.snapshot_list().await
    }

    /// Takes an internal snapshot of what the node reads now. Refused on
    /// a read-only node, while an op blocker (a job) is set, and for a
    /// name already used; the image is then unchanged.
    pub async fn snapshot_create(&self, opts: &SnapshotCreateOptions) -> Result<SnapshotInfo> {
        self.check_writable()?;
        self.check_op_blockers()?;
        self.driver.snapshot_create(opts).await
    }

    /// Reverts the node to a snapshot (`qemu-img snapshot -a`): what it
    /// reads afterwards is what it read when the snapshot was taken.
    pub async fn snapshot_goto(&self, which: &SnapshotRef) -> Result<SnapshotInfo> {
        self.check_writable()?;
        self.check_op_blockers()?;
        self.driver.snapshot_goto(which).await
    }

    /// Deletes a snapshot, freeing the clusters only it used; returns
    /// what it was.
    pub async fn snapshot_delete(&self, which: &SnapshotRef) -> Result<SnapshotInfo> {
        self.check_writable()?;
        self.check_op_blockers()?;
        self.driver.snapshot_delete(which).await
    }

    /// Closes the node and its children, top down: flushes, and for qcow2
    /// clears the dirty bit. Idempotent; the node must not be used after.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.store_bitmaps().await;
        let r = r.and(self.driver.close().await);
        let mut children: Vec<Arc<BlockNode>> = Vec::new();
        children.extend(self.file_child());
        children.extend(self.backing());
        for c in children {
            Box::pin(c.close()).await?;
        }
        r
    }

    /// Takes permissions on the node for `user` (in `role`, e.g. `file`,
    /// `backing`, `root`): it will use `perm` and lets others use `shared`.
    ///
    /// Refused if the node is read-only and `perm` writes or resizes, or if
    /// `perm` is not shared by a current user, or a current user's
    /// permission is not in `shared`. Dropping the guard releases them.
    pub fn attach(
        self: &Arc<Self>,
        user: &str,
        role: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<PermGuard> {
        self.attach_ignoring(user, role, perm, shared, &[])
    }

    /// [`attach`](Self::attach), not checking against the users named in
    /// `ignore`: a job takes over the permissions of the nodes inside the
    /// chain it owns (QEMU's `ignore_children` in permission updates; the
    /// job's op blockers keep anyone else out of those nodes).
    pub fn attach_ignoring(
        self: &Arc<Self>,
        user: &str,
        role: &str,
        perm: Perm,
        shared: Perm,
        ignore: &[String],
    ) -> Result<PermGuard> {
        if perm.contains(Perm::WRITE) && !self.is_written() {
            // The first writer makes the backing link strict again.
            if let Some(b) = self.backing() {
                b.check_strict_backing_of(self)?;
            }
        }
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if self.read_only() && !(perm.without(Perm::CONSISTENT_READ | Perm::GRAPH_MOD)).is_empty() {
            return Err(Error::Permission {
                node: self.name.clone(),
                reason: format!("Block node '{}' is read-only", self.name),
            });
        }
        for u in users.iter().filter(|u| !ignore.contains(&u.user)) {
            self.check_shared_by(u, perm)?;
            self.check_uses_within(u, shared)?;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        users.push(PermUser {
            id,
            user: user.to_string(),
            role: role.to_string(),
            perm,
            shared,
            parent: None,
        });
        Ok(PermGuard {
            node: self.clone(),
            id,
        })
    }

    /// Whether a user writes this node.
    pub(crate) fn is_written(&self) -> bool {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.iter().any(|u| u.perm.contains(Perm::WRITE))
    }

    /// Records that the `backing` user named after `parent` is `parent`'s
    /// backing link (see [`PermUser::shared_now`]).
    pub(crate) fn link_parent(&self, parent: &Arc<BlockNode>) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for u in users
            .iter_mut()
            .filter(|u| u.role == "backing" && u.user == parent.name())
        {
            u.parent = Some(Arc::downgrade(parent));
        }
    }

    /// Refuses a first writer of `parent` while another user writes or
    /// resizes this node, its backing child: the link shares neither once
    /// its parent is written.
    fn check_strict_backing_of(&self, parent: &BlockNode) -> Result<()> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let ours = users
            .iter()
            .find(|u| u.role == "backing" && u.user == parent.name());
        let Some(ours) = ours else { return Ok(()) };
        for u in users.iter().filter(|u| u.id != ours.id) {
            self.check_uses_within(u, ours.shared)?;
        }
        Ok(())
    }

    /// Refuses when `u` uses more of this node than `shared` allows.
    fn check_uses_within(&self, u: &PermUser, shared: Perm) -> Result<()> {
        let used = u.perm.without(shared);
        if used.is_empty() {
            return Ok(());
        }
        Err(Error::Permission {
            node: self.name.clone(),
            reason: format!(
                "Conflicts with use by {} as '{}', which uses '{}' on {}",
                u.user, u.role, used, self.name
            ),
        })
    }

    /// The current users: (user, role, perm, shared), one snapshot.
    pub fn users(&self) -> Vec<(String, String, Perm, Perm)> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users
            .iter()
            .map(|u| (u.user.clone(), u.role.clone(), u.perm, u.shared))
            .collect()
    }

    pub(crate) fn detach(&self, id: u64) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.retain(|u| u.id != id);
    }
}
