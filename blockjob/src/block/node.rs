//! [`BlockNode`]: one layer of the graph.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::bitmap::{self, BitmapAddOptions, BitmapUndo, DirtyBitmap};
use super::perm::PermUser;
use super::{
    BlockDriver, BlockStatus, BoxFuture, CheckOptions, CheckReport, ImageInfo, Perm, PermGuard,
    SnapshotCreateOptions, SnapshotInfo, SnapshotRef,
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
    read_only: bool,
    users: Mutex<Vec<PermUser>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    blockers: Mutex<Vec<(u64, String)>>,
    hooks: Mutex<Vec<(u64, Arc<dyn WriteHook>)>>,
    /// Named dirty bitmaps, newest first (QEMU lists them so).
    bitmaps: Mutex<Vec<Arc<DirtyBitmap>>>,
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
            .field("read_only", &self.read_only)
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
        Arc::new(BlockNode {
            name,
            driver,
            read_only,
            users: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            blockers: Mutex::new(Vec::new()),
            hooks: Mutex::new(Vec::new()),
            bitmaps: Mutex::new(Vec::new()),
        })
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
        self.read_only
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
        if self.read_only {
            return Err(Error::Permission {
                node: self.name.clone(),
                reason: format!("Block node '{}' is read-only", self.name),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.driver.read(offset, buf).await
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<()> {
        self.check_writable()?;
        if !self.driver.grows_on_write() {
            self.check_range(offset, buf.len() as u64)?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let hooks = self.before_write(offset, len).await?;
        let r = self.driver.write(offset, buf).await;
        after_write(&hooks, offset, len);
        r
    }

    /// A write that does not change what the node reads as (copy-on-read
    /// by a stream job; QEMU's `BDRV_REQ_WRITE_UNCHANGED`): write hooks do
    /// not see it. An all-zero buffer becomes a zero write.
    pub async fn write_unchanged(&self, offset: u64, buf: Vec<u8>) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if buf.iter().all(|&b| b == 0) {
            return self.driver.write_zeroes(offset, buf.len() as u64).await;
        }
        self.driver.write(offset, buf).await
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
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

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let hooks = self.before_write(offset, len).await?;
        let r = self.driver.discard(offset, len).await;
        after_write(&hooks, offset, len);
        r
    }

    async fn before_write(&self, offset: u64, len: u64) -> Result<Vec<Arc<dyn WriteHook>>> {
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
        for h in &hooks {
            h.before_write(self, offset, len).await?;
        }
        Ok(hooks)
    }

    fn bitmaps_locked(&self) -> std::sync::MutexGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.bitmaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a named dirty bitmap (`block-dirty-bitmap-add`), recording
    /// unless `opts.disabled`.
    ///
    /// # Errors
    ///
    /// QEMU's texts: `Bitmap already exists: NAME`, `Bitmap name cannot be
    /// empty`, `Granularity must be power of 2 and at least 512`.
    pub fn add_bitmap(&self, name: &str, opts: &BitmapAddOptions) -> Result<Arc<DirtyBitmap>> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
        }
        if name.len() > 1023 {
            return Err(Error::InvalidArgument("Bitmap name is too long".into()));
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
        let mut list = self.bitmaps_locked();
        if list.iter().any(|b| b.name() == name) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        let b = Arc::new(DirtyBitmap::new(name, self.len(), gran, !opts.disabled));
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

    /// Removes a bitmap (`block-dirty-bitmap-remove`); returns it.
    ///
    /// # Errors
    ///
    /// Not found, or busy (held by an NBD export).
    pub fn remove_bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let b = self.bitmap(name)?;
        b.check_not_busy()?;
        self.bitmaps_locked().retain(|x| !Arc::ptr_eq(x, &b));
        Ok(b)
    }

    /// Drops `b` from the node (a `transaction` undoing its add).
    pub fn forget_bitmap(&self, b: &Arc<DirtyBitmap>) {
        self.bitmaps_locked().retain(|x| !Arc::ptr_eq(x, b));
    }

    /// Removes a bitmap like [`remove_bitmap`](Self::remove_bitmap) and
    /// returns it with its place in the list, for
    /// [`restore_bitmap`](Self::restore_bitmap).
    ///
    /// # Errors
    ///
    /// Not found, or busy.
    pub fn take_bitmap(&self, name: &str) -> Result<(usize, Arc<DirtyBitmap>)> {
        let b = self.bitmap(name)?;
        b.check_not_busy()?;
        let mut list = self.bitmaps_locked();
        let i = list.iter().position(|x| Arc::ptr_eq(x, &b)).unwrap_or(0);
        list.retain(|x| !Arc::ptr_eq(x, &b));
        Ok((i, b))
    }

    /// Puts back a bitmap taken by [`take_bitmap`](Self::take_bitmap) at
    /// its place (a `transaction` undoing a remove).
    pub fn restore_bitmap(&self, at: usize, b: Arc<DirtyBitmap>) {
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
        b.check_not_busy()?;
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
        b.check_not_busy()?;
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
        t.check_not_busy()?;
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
        self.driver.set_backing(guard, record).await
    }

    /// Closes this layer and its `file` child but not its backing chain
    /// (a layer dropped from the middle of a chain).
    pub async fn close_layer(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.driver.close().await;
        if let Some(f) = self.file_child() {
            f.close().await?;
        }
        r
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.driver.flush().await
    }

    /// Changes the virtual size. Needs the node writable.
    pub async fn truncate(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        self.driver.truncate(len).await
    }

    /// This layer's status at `offset`: the status and how many bytes
    /// (≥ 1 when `len` ≥ 1) share it.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok((BlockStatus::default(), 0));
        }
        self.driver.block_status(offset, len).await
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
        let r = self.driver.close().await;
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
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if self.read_only && !(perm.without(Perm::CONSISTENT_READ | Perm::GRAPH_MOD)).is_empty() {
            return Err(Error::Permission {
                node: self.name.clone(),
                reason: format!("Block node '{}' is read-only", self.name),
            });
        }
        for u in users.iter().filter(|u| !ignore.contains(&u.user)) {
            let denied = perm.without(u.shared);
            if !denied.is_empty() {
                return Err(Error::Permission {
                    node: self.name.clone(),
                    reason: format!(
                        "Conflicts with use by {} as '{}', which does not allow '{}' on {}",
                        u.user, u.role, denied, self.name
                    ),
                });
            }
            let used = u.perm.without(shared);
            if !used.is_empty() {
                return Err(Error::Permission {
                    node: self.name.clone(),
                    reason: format!(
                        "Conflicts with use by {} as '{}', which uses '{}' on {}",
                        u.user, u.role, used, self.name
                    ),
                });
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        users.push(PermUser {
            id,
            user: user.to_string(),
            role: role.to_string(),
            perm,
            shared,
        });
        Ok(PermGuard {
            node: self.clone(),
            id,
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
