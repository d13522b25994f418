//! External snapshots: an overlay put on top of a node (QEMU's
//! `external_snapshot_action` + `bdrv_append`, for `blockdev-snapshot` and
//! `blockdev-snapshot-sync`), in two phases so that a QMP `transaction`
//! can prepare several and then commit all or undo all.
//!
//! *Prepare* does everything that can fail: the checks (with QEMU's
//! texts), creating and opening the overlay image for the `-sync` form,
//! recording the backing file in the overlay's header, and linking the
//! overlay onto the node in memory. *Commit* cannot fail; *abort* undoes
//! prepare in reverse order (unlink, restore the header, close the
//! overlay, delete the file if prepare created it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use super::{create_qcow2, BlockGraph, BlockNode, CreateOptions, OpBlocker};
use crate::{Error, Result};

/// The reason given to other operations while a snapshot is prepared.
const BUSY: &str = "node is part of an external snapshot in progress";

/// `mode` of `blockdev-snapshot-sync` (QAPI's `NewImageMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NewImageMode {
    /// Open an image that already exists.
    Existing,
    /// Create the image, recording the node's file name as its backing
    /// file (the default).
    #[default]
    AbsolutePaths,
}

/// What `blockdev-snapshot-sync` is asked to do.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SnapshotSyncOptions {
    /// `device`: looked up as a node name (there are no devices here).
    pub device: Option<String>,
    /// `node-name`: the node to snapshot.
    pub node_name: Option<String>,
    /// `snapshot-file`: the overlay's file name.
    pub snapshot_file: String,
    /// `snapshot-node-name`: the overlay's node name (required with
    /// `node_name`, as in QEMU).
    pub snapshot_node_name: Option<String>,
    /// `format` (default `qcow2`).
    pub format: Option<String>,
    /// `mode` (default `absolute-paths`).
    pub mode: NewImageMode,
}

impl SnapshotSyncOptions {
    /// Options for a snapshot of node `node_name` into `snapshot_file`.
    pub fn new(node_name: impl Into<String>, snapshot_file: impl Into<String>) -> Self {
        Self {
            node_name: Some(node_name.into()),
            snapshot_file: snapshot_file.into(),
            ..Self::default()
        }
    }
}

/// An overlay linked onto its node by [`BlockGraph::snapshot_prepare`] or
/// [`BlockGraph::snapshot_sync_prepare`]: finish it with
/// [`commit`](Self::commit) or [`abort`](Self::abort). Until then both
/// nodes carry an op blocker, so no job or `blockdev-del` can touch them.
#[must_use = "a prepared snapshot must be committed or aborted"]
pub struct PreparedSnapshot {
    graph: Arc<BlockGraph>,
    node: Arc<BlockNode>,
    overlay: Arc<BlockNode>,
    /// Whether prepare wrote the backing link into the overlay's header.
    recorded: bool,
    /// Whether prepare opened the overlay (`-sync`): abort closes it.
    opened: bool,
    /// The image file prepare created (did not exist before): abort
    /// deletes it.
    created: Option<PathBuf>,
    _blockers: Vec<OpBlocker>,
}

impl std::fmt::Debug for PreparedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSnapshot")
            .field("node", &self.node.name())
            .field("overlay", &self.overlay.name())
            .finish_non_exhaustive()
    }
}

impl PreparedSnapshot {
    /// The node that became the overlay's backing child.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }

    /// The overlay.
    pub fn overlay(&self) -> &Arc<BlockNode> {
        &self.overlay
    }

    /// Makes the snapshot permanent (releases the op blockers).
    pub fn commit(self) {
        log::info!(
            "snapshot: '{}' is now the overlay of '{}'",
            self.overlay.name(),
            self.node.name()
        );
    }

    /// [`commit`](Self::commit), then reopens the old node read-only, as
    /// QEMU does: it is a backing file now, and backing files are not
    /// written. A failure to reopen (a job still writes the node) is
    /// logged, not returned: the snapshot stands either way (QEMU's
    /// `external_snapshot_commit` ignores it too).
    pub async fn commit_read_only(self) {
        let node = self.node.clone();
        self.commit();
        if let Err(e) = node
            .reopen(&super::ReopenOptions::new().read_only(true))
            .await
        {
            log::warn!("snapshot: '{}' stays read-write: {e}", node.name());
        }
    }

    /// Undoes prepare: unlinks the overlay (restoring its header), closes
    /// it if prepare opened it, and deletes its file if prepare created it.
    /// Every step is attempted; the first error is returned.
    pub async fn abort(mut self) -> Result<()> {
        // Closing the overlay below is refused while the blockers hold.
        self._blockers.clear();
        let mut first = self
            .overlay
            .set_backing(None, self.recorded, None)
            .await
            .err();
        if self.opened {
            if let Err(e) = self.graph.blockdev_del(self.overlay.name()).await {
                first.get_or_insert(e);
            }
        }
        if let Some(p) = &self.created {
            if let Err(e) = std::fs::remove_file(p) {
                first.get_or_insert(Error::Failed(format!(
                    "Could not remove '{}': {}",
                    p.display(),
                    crate::error::io_text(&e)
                )));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl BlockGraph {
    /// A node that uses `node` as a child, and the role (`backing hd` or
    /// `file`), as QEMU names it in `Node 'X' is busy: node is used as
    /// ROLE of 'P'`.
    pub fn parent_of(&self, node: &Arc<BlockNode>) -> Option<(Arc<BlockNode>, &'static str)> {
        self.nodes().into_iter().find_map(|p| {
            if Arc::ptr_eq(&p, node) {
                None
            } else if p.backing().is_some_and(|b| Arc::ptr_eq(&b, node)) {
                Some((p, "backing hd"))
            } else if p.file_child().is_some_and(|f| Arc::ptr_eq(&f, node)) {
                Some((p, "file"))
            } else {
                None
            }
        })
    }

    /// QEMU's `bdrv_lookup_bs(device, node_name)`: `device` and then
    /// `node_name` as node names (there are no devices here).
    ///
    /// # Errors
    ///
    /// `Cannot find device='D' nor node-name='N'`.
    pub fn lookup(&self, device: Option<&str>, node_name: Option<&str>) -> Result<Arc<BlockNode>> {
        let by_name = |n: &str| self.nodes().into_iter().find(|x| x.name() == n);
        device
            .and_then(by_name)
            .or_else(|| node_name.and_then(by_name))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "Cannot find device='{}' nor node-name='{}'",
                    device.unwrap_or(""),
                    node_name.unwrap_or("")
                ))
            })
    }

    /// `bdrv_op_is_blocked` for an external snapshot: a job's op blocker,
    /// or a parent (QEMU blocks a backing child's operations).
    fn check_snapshot_blockers(&self, node: &Arc<BlockNode>) -> Result<()> {
        if let Some((p, role)) = self.parent_of(node) {
            return Err(Error::InvalidArgument(format!(
                "Node '{}' is busy: node is used as {role} of '{}'",
                node.name(),
                p.name()
            )));
        }
        node.check_op_blockers()
    }

    /// Prepares `blockdev-snapshot {node, overlay}`: checks (QEMU's order
    /// and texts), flushes `node`, records `node` as the backing file in
    /// the overlay's header (if the overlay is writable and its header
    /// names none) and links the overlay onto `node`.
    ///
    /// # Errors
    ///
    /// `Node 'X' is busy: ...`, `The overlay is already in use`, `The
    /// overlay already has a backing image`, `The overlay does not support
    /// backing images`, `Making 'O' a backing child of 'N' would create a
    /// cycle`, or an I/O error writing the header (nothing is changed
    /// then).
    pub async fn snapshot_prepare(
        self: &Arc<Self>,
        node: &Arc<BlockNode>,
        overlay: &Arc<BlockNode>,
    ) -> Result<PreparedSnapshot> {
        self.link_overlay(node, overlay, None).await
    }

    /// The overlay half of a prepare: the overlay checks, then the link.
    async fn link_overlay(
        self: &Arc<Self>,
        node: &Arc<BlockNode>,
        overlay: &Arc<BlockNode>,
        created: Option<PathBuf>,
    ) -> Result<PreparedSnapshot> {
        // Again: a `-sync` prepare has waited (creating the image) since
        // its first check.
        self.check_snapshot_blockers(node)?;
        // Parents are refused above; any other user (a job, an export)
        // would go on using the node under its overlay: nothing here can
        // move it to the overlay, so refuse.
        if let Some((user, role, _, _)) = node
            .users()
            .into_iter()
            .find(|(_, role, _, _)| role != "backing" && role != "file")
        {
            return Err(Error::InvalidArgument(format!(
                "Node '{}' is busy: it is used by {user} as '{role}', which cannot be moved to \
                 the overlay",
                node.name()
            )));
        }
        let foreign_user = overlay
            .users()
            .into_iter()
            .any(|(_, role, _, _)| role != "backing" && role != "file");
        if foreign_user {
            return Err(Error::InvalidArgument(
                "The overlay is already in use".into(),
            ));
        }
        self.check_snapshot_blockers(overlay)?;
        if overlay.backing().is_some() {
            return Err(Error::InvalidArgument(
                "The overlay already has a backing image".into(),
            ));
        }
        if overlay.driver_name() != "qcow2" {
            return Err(Error::InvalidArgument(
                "The overlay does not support backing images".into(),
            ));
        }
        if node.chain().iter().any(|n| Arc::ptr_eq(n, overlay)) {
            return Err(Error::InvalidArgument(format!(
                "Making '{}' a backing child of '{}' would create a cycle",
                node.name(),
                overlay.name()
            )));
        }
        let blockers = vec![node.op_block(BUSY), overlay.op_block(BUSY)];
        node.flush().await?;
        let record = !overlay.read_only() && overlay.info().backing_filename.is_none();
        overlay.set_backing(Some(node), record, None).await?;
        Ok(PreparedSnapshot {
            graph: self.clone(),
            node: node.clone(),
            overlay: overlay.clone(),
            recorded: record,
            opened: false,
            created,
            _blockers: blockers,
        })
    }

    /// Prepares `blockdev-snapshot-sync`: finds the node, creates the
    /// overlay image (`absolute-paths`: qcow2 with the node's file name
    /// and format as backing, the node's size) or opens an existing one,
    /// opens it as `snapshot-node-name` (read-only if the node is), and
    /// links it as [`snapshot_prepare`](Self::snapshot_prepare) does. On
    /// any error everything done so far is undone, including the created
    /// file.
    ///
    /// # Errors
    ///
    /// QEMU's texts: `Cannot find device='D' nor node-name='N'`, `New
    /// overlay node-name missing`, `New overlay node-name already in use`,
    /// `Unknown file format 'F'`, `Backing file not supported for file
    /// format 'raw'`, `Could not create 'F': REASON`, `Could not open 'F':
    /// REASON`, and those of `snapshot_prepare`. Creating over a file open
    /// in the graph is refused.
    pub async fn snapshot_sync_prepare(
        self: &Arc<Self>,
        o: &SnapshotSyncOptions,
    ) -> Result<PreparedSnapshot> {
        let node = self.lookup(o.device.as_deref(), o.node_name.as_deref())?;
        self.check_snapshot_blockers(&node)?;
        if let Some(n) = &o.snapshot_node_name {
            if self.nodes().iter().any(|x| x.name() == n) {
                return Err(Error::InvalidArgument(
                    "New overlay node-name already in use".into(),
                ));
            }
        } else if o.node_name.is_some() {
            return Err(Error::InvalidArgument(
                "New overlay node-name missing".into(),
            ));
        }
        let format = o.format.as_deref().unwrap_or("qcow2");
        let created = match o.mode {
            NewImageMode::Existing => {
                if !matches!(format, "qcow2" | "raw") {
                    return Err(Error::InvalidArgument(format!("Unknown driver '{format}'")));
                }
                None
            }
            NewImageMode::AbsolutePaths => self.create_overlay(&node, o, format).await?,
        };
        let mut add = json!({
            "driver": format,
            "read-only": node.read_only(),
            "file": {"driver": "file", "filename": o.snapshot_file},
        });
        if let Some(n) = &o.snapshot_node_name {
            add["node-name"] = json!(n);
        }
        if format == "qcow2" {
            add["backing"] = serde_json::Value::Null;
        }
        let overlay = match self.blockdev_add_inner(&add).await {
            Ok(ov) => ov,
            Err(e) => {
                remove_created(created.as_deref());
                return Err(e);
            }
        };
        match self.link_overlay(&node, &overlay, created.clone()).await {
            Ok(mut p) => {
                p.opened = true;
                Ok(p)
            }
            Err(e) => {
                if let Err(d) = self.blockdev_del(overlay.name()).await {
                    log::warn!(
                        "snapshot: closing '{}' after a failure: {d}",
                        overlay.name()
                    );
                }
                remove_created(created.as_deref());
                Err(e)
            }
        }
    }

    /// Creates the overlay image of an `absolute-paths` snapshot; returns
    /// its path if the file did not exist before (abort deletes it then).
    async fn create_overlay(
        &self,
        node: &Arc<BlockNode>,
        o: &SnapshotSyncOptions,
        format: &str,
    ) -> Result<Option<PathBuf>> {
        self.create_image(&NewImage {
            filename: &o.snapshot_file,
            format,
            size: node.len(),
            backing: Some(node),
        })
        .await
    }

    /// Creates an image for a command that names a new file
    /// (`blockdev-snapshot-sync`, `drive-mirror`, `drive-backup` with
    /// `mode: absolute-paths`), with `backing`'s file name and format
    /// recorded as its backing file. An existing file is overwritten, as
    /// in QEMU, but never one that a node of the graph has open. Returns
    /// the path if the file did not exist before, so that a caller
    /// undoing its work can delete it.
    ///
    /// # Errors
    ///
    /// `Unknown file format 'F'`, `Backing file not supported for file
    /// format 'raw'`, `Error: Trying to create an image with the same
    /// filename as the backing file`, `Could not create 'F': REASON`, and
    /// creation errors.
    pub async fn create_image(&self, img: &NewImage<'_>) -> Result<Option<PathBuf>> {
        let file = img.filename;
        match (img.format, img.backing) {
            ("qcow2", _) | ("raw", None) => {}
            ("raw" | "file", Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "Backing file not supported for file format '{}'",
                    img.format
                )))
            }
            (other, _) => {
                return Err(Error::InvalidArgument(format!(
                    "Unknown file format '{other}'"
                )))
            }
        }
        let path = PathBuf::from(file);
        if let Ok(canon) = std::fs::canonicalize(&path) {
            // A format node rather than its file node, if both match.
            let in_use = self
                .nodes()
                .into_iter()
                .rev()
                .find(|n| std::fs::canonicalize(n.filename()).ok().as_ref() == Some(&canon));
            let in_chain = |n: &Arc<BlockNode>| {
                img.backing.is_some_and(|b| {
                    b.chain().iter().any(|x| {
                        Arc::ptr_eq(x, n) || x.file_child().is_some_and(|f| Arc::ptr_eq(&f, n))
                    })
                })
            };
            match in_use {
                Some(n) if in_chain(&n) => {
                    return Err(Error::InvalidArgument(
                        "Error: Trying to create an image with the same filename as the \
                         backing file"
                            .into(),
                    ))
                }
                Some(n) => {
                    return Err(Error::InvalidArgument(format!(
                        "Could not create '{file}': the file is in use by node '{}'",
                        n.name()
                    )))
                }
                None => {}
            }
        }
        let existed = path.exists();
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "Could not create '{file}': {}",
                    crate::error::io_text(&e)
                ))
            })?;
        let created = (!existed).then(|| path.clone());
        let r = if img.format == "raw" {
            super::create_raw(&path, img.size)
        } else {
            let mut opts = CreateOptions::new(img.size);
            if let Some(b) = img.backing {
                opts = opts.backing(b.filename(), Some(b.driver_name()));
            }
            create_qcow2(&path, &opts).await
        };
        if let Err(e) = r {
            remove_created(created.as_deref());
            return Err(e);
        }
        Ok(created)
    }
}

/// An image for [`BlockGraph::create_image`] to create.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct NewImage<'a> {
    /// The file name.
    pub filename: &'a str,
    /// `qcow2` or `raw`.
    pub format: &'a str,
    /// The virtual size in bytes.
    pub size: u64,
    /// The node whose file name and format the image records as its
    /// backing file (qcow2 only).
    pub backing: Option<&'a Arc<BlockNode>>,
}

impl<'a> NewImage<'a> {
    /// A `format` image of `size` bytes at `filename`, without backing.
    pub fn new(filename: &'a str, format: &'a str, size: u64) -> Self {
        Self {
            filename,
            format,
            size,
            backing: None,
        }
    }

    /// Records `node` as the backing file.
    pub fn backing(mut self, node: Option<&'a Arc<BlockNode>>) -> Self {
        self.backing = node;
        self
    }
}

/// Deletes a file a command created, while undoing the command.
pub fn remove_created(path: Option<&Path>) {
    if let Some(p) = path {
        if let Err(e) = std::fs::remove_file(p) {
            log::warn!("removing {}: {e}", p.display());
        }
    }
}
