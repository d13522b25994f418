//! [`BlockNode`]: one layer of the graph.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::perm::PermUser;
use super::{BlockDriver, BlockStatus, CheckReport, ImageInfo, Perm, PermGuard};
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
        self.driver.write_zeroes(offset, len).await
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.driver.discard(offset, len).await
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
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if self.read_only && !(perm.without(Perm::CONSISTENT_READ | Perm::GRAPH_MOD)).is_empty() {
            return Err(Error::Permission {
                node: self.name.clone(),
                reason: format!("Block node '{}' is read-only", self.name),
            });
        }
        for u in users.iter() {
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
