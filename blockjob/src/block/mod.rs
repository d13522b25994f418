//! Block nodes, drivers and the graph that names them.
//!
//! A [`BlockNode`] is one layer: a driver (`file`, `raw`, `qcow2`,
//! `null-co`, `nbd`), a node name, its children (`file`, `backing`), a read-only
//! flag and the permissions its users hold. Drivers implement
//! [`BlockDriver`], an object-safe trait whose operations return boxed
//! `Send` futures, so nodes of different drivers stack freely and their
//! requests run as tasks on any `AioContext`.

use std::future::Future;
use std::pin::Pin;

pub(crate) mod bitmap;
mod blkdebug;
mod direct;
mod drain;
mod external_snapshot;
mod file;
mod filter;
mod graph;
mod image_json;
mod internal_snapshot;
mod nbd;
mod node;
mod null;
mod perm;
pub mod qcow2;
mod raw;
mod reopen;
mod root;
mod status;

pub use aio::file::Buffer;
pub use bitmap::{BitmapAddOptions, BitmapInfo, BitmapUndo, DirtyBitmap, Extent};
pub use drain::{DrainOptions, Drained};
pub use external_snapshot::{
    remove_created, NewImage, NewImageMode, PreparedSnapshot, SnapshotSyncOptions,
};
pub use filter::{
    filtered_child, insert_filter, is_job_filter, query_chain, FilterGuard, FilterKind,
    FilterOptions,
};
pub(crate) use graph::GraphRef;
pub use graph::{BlockGraph, OpenOptions};
pub use image_json::{image_info_json, snapshot_info_json};
pub use internal_snapshot::{SnapshotCreateOptions, SnapshotInfo, SnapshotRef};
pub use node::{
    BlockNode, DrainListener, DrainListenerGuard, OpBlocker, ReopenOptions, WriteHook,
    WriteHookGuard,
};
pub use perm::{Perm, PermGuard};
pub use qcow2::{CreateOptions, Preallocation};
pub(crate) use root::move_roots;
pub use root::BlockRoot;
pub use status::{map_to_qemu_json, ChainStatus, MapEntry};

use crate::{Error, Result};

/// Creates a qcow2 image at `path` (replacing any file there).
pub async fn create_qcow2(path: impl AsRef<std::path::Path>, opts: &CreateOptions) -> Result<()> {
    qcow2::create(path.as_ref(), opts).await
}

/// Creates a sparse raw image of `size` bytes at `path`.
pub fn create_raw(path: impl AsRef<std::path::Path>, size: u64) -> Result<()> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let f =
        std::fs::File::create(path).map_err(|e| Error::open(&name, crate::error::io_text(&e)))?;
    f.set_len(size)
        .map_err(|e| Error::open(&name, crate::error::io_text(&e)))
}

/// A boxed, `Send` future borrowing its driver for `'a`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one layer says about a range (QEMU's `BDRV_BLOCK_*` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStatus {
    /// Allocated in this layer (data or zero); otherwise the backing file
    /// decides.
    pub allocated: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Has data (not just zeroes) in this layer.
    pub data: bool,
    /// Compressed (qcow2).
    pub compressed: bool,
    /// Where the range lives in the layer's file child, if it has one place.
    pub offset: Option<u64>,
}

/// Per-driver facts for `aio-img info`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The format name (`qcow2`, `raw`, ...).
    pub format: String,
    /// The image's file name.
    pub filename: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size (qcow2).
    pub cluster_size: Option<u64>,
    /// The backing file name as recorded in the image.
    pub backing_filename: Option<String>,
    /// The backing file format as recorded in the image.
    pub backing_format: Option<String>,
    /// The format-specific facts QEMU prints (`compat`, `refcount bits`, ...).
    pub specific: Vec<(String, serde_json::Value)>,
    /// Whether the image is marked as not closed cleanly (qcow2's dirty
    /// bit); `None` for formats without one.
    pub dirty: Option<bool>,
}

/// A block driver: the operations one node type implements.
///
/// Offsets and lengths are bytes; requests never reach past
/// [`len`](Self::len) ([`BlockNode`] checks). Buffers are owned and
/// handed back, as in `aio::file`.
pub trait BlockDriver: Send + Sync {
    /// The driver name (`file`, `raw`, `qcow2`, `null-co`).
    fn driver_name(&self) -> &'static str;
    /// The file this node is about (for error messages and naming).
    fn filename(&self) -> &str;
    /// The virtual size in bytes.
    fn len(&self) -> u64;
    /// Whether the node is empty (size 0).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether writes past the end grow the node (protocol drivers).
    fn grows_on_write(&self) -> bool {
        false
    }
    /// The `file` child, if any.
    fn file_child(&self) -> Option<std::sync::Arc<BlockNode>> {
        None
    }
    /// The `backing` child, if any.
    fn backing(&self) -> Option<std::sync::Arc<BlockNode>> {
        None
    }
    /// The driver as [`Any`](std::any::Any), so that [`BlockNode`] can
    /// run the requests of this crate's `file` and `raw` drivers without
    /// boxing their futures. The default (`None`) always goes through the
    /// boxed methods below.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>>;
    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>>;
    /// Writes `buf` at `offset` and hands the buffer back, for a caller
    /// that writes from the same buffer again. The default writes a copy;
    /// drivers on the request path (`file`, `raw`, `qcow2` in place)
    /// return the buffer their child gave back, copying nothing.
    fn write_keep<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(async move { self.write(offset, buf.clone()).await.map(|()| buf) })
    }
    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>>;
    /// Discards `len` bytes at `offset` (contents afterwards: unspecified
    /// for `file`; the backing file's for qcow2 without a zero flag).
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>>;
    /// Makes completed writes durable.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    /// Changes the virtual size.
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>>;
    /// This layer's status of the range at `offset`: the status and how
    /// many bytes from `offset` (≥ 1, ≤ `len`) share it.
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>>;
    /// Flushes and marks the image clean (qcow2 dirty bit). Idempotent.
    fn close(&self) -> BoxFuture<'_, Result<()>>;
    /// Facts for `info`.
    fn info(&self) -> ImageInfo;
    /// Replaces the backing child (`None`: no backing) and, with `record`
    /// = `Some((file name, format))`, rewrites the backing file link in
    /// the image. Formats without backing files refuse.
    fn set_backing<'a>(
        &'a self,
        backing: Option<PermGuard>,
        record: Option<(Option<String>, Option<String>)>,
    ) -> BoxFuture<'a, Result<()>> {
        drop(backing);
        let _ = record;
        let name = self.filename().to_string();
        let drv = self.driver_name();
        Box::pin(async move {
            Err(Error::unsupported(
                &name,
                format!("Driver '{drv}' does not support backing files"),
            ))
        })
    }
    /// Switches this layer between read-only and read-write (QEMU's
    /// `bdrv_reopen` of the `read-only` option); the node has already
    /// reopened its `file` child read-write (before this, going
    /// read-write) or will reopen it read-only (after this, going
    /// read-only). Drivers without state of their own accept.
    fn reopen(&self, read_only: bool) -> BoxFuture<'_, Result<()>> {
        let _ = read_only;
        Box::pin(async { Ok(()) })
    }
    /// Allocates the whole image up front (a new image's
    /// `preallocation`); formats without allocation refuse.
    fn preallocate(&self, mode: Preallocation) -> BoxFuture<'_, Result<()>> {
        let name = self.filename().to_string();
        let drv = self.driver_name();
        Box::pin(async move {
            Err(Error::unsupported(
                &name,
                format!(
                    "Driver '{drv}' does not support preallocation={}",
                    mode.as_str()
                ),
            ))
        })
    }
    /// Makes every cluster of this layer unallocated, so that it reads
    /// its backing file everywhere (QEMU's `bdrv_make_empty`, which
    /// `qemu-img commit` runs on the committed image). Formats without
    /// backing files refuse.
    fn make_empty(&self) -> BoxFuture<'_, Result<()>> {
        let e = Error::unsupported(
            self.filename(),
            format!("Driver '{}' cannot be emptied", self.driver_name()),
        );
        Box::pin(async { Err(e) })
    }
    /// Checks metadata consistency; `None` if the format has no checks.
    fn check(&self) -> BoxFuture<'_, Result<Option<CheckReport>>> {
        Box::pin(async { Ok(None) })
    }
    /// Checks and repairs what `opts` allows (`qemu-img check -r`);
    /// `None`: the format has no checks. Without repairs it is
    /// [`check`](Self::check).
    fn check_repair<'a>(
        &'a self,
        opts: &'a CheckOptions,
    ) -> BoxFuture<'a, Result<Option<CheckReport>>> {
        if opts.repair_leaks || opts.repair_errors {
            Box::pin(async { Ok(None) })
        } else {
            self.check()
        }
    }
    /// Whether the format stores internal snapshots (qcow2).
    fn supports_snapshots(&self) -> bool {
        false
    }
    /// The persistent bitmaps found in the image when it was opened, in
    /// the image's order; the node takes them once.
    fn take_stored_bitmaps(&self) -> Vec<bitmap::DirtyBitmap> {
        Vec::new()
    }
    /// Whether a new persistent bitmap `name` could be stored: `None` if
    /// the format stores none, else why not (QEMU's texts).
    fn can_store_bitmap(
        &self,
        name: &str,
        granularity: u64,
    ) -> Option<std::result::Result<(), String>> {
        let _ = (name, granularity);
        None
    }
    /// Stores the node's persistent bitmaps (clean close) and drops the
    /// stored ones not in `list`.
    fn store_bitmaps<'a>(
        &'a self,
        list: &'a [std::sync::Arc<bitmap::DirtyBitmap>],
    ) -> BoxFuture<'a, Result<()>> {
        let _ = list;
        Box::pin(async { Ok(()) })
    }
    /// Removes a stored bitmap from the image (nothing if not stored).
    fn remove_stored_bitmap<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        let _ = name;
        Box::pin(async { Ok(()) })
    }
    /// The internal snapshots, in table order.
    fn snapshot_list(&self) -> BoxFuture<'_, Result<Vec<SnapshotInfo>>> {
        no_snapshots(self.filename(), self.driver_name())
    }
    /// Takes an internal snapshot of the current contents.
    fn snapshot_create<'a>(
        &'a self,
        opts: &'a SnapshotCreateOptions,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        let _ = opts;
        no_snapshots(self.filename(), self.driver_name())
    }
    /// Makes the snapshot's contents the current contents
    /// (`qemu-img snapshot -a`).
    fn snapshot_goto<'a>(&'a self, which: &'a SnapshotRef) -> BoxFuture<'a, Result<SnapshotInfo>> {
        let _ = which;
        no_snapshots(self.filename(), self.driver_name())
    }
    /// Deletes a snapshot and frees what only it used.
    fn snapshot_delete<'a>(
        &'a self,
        which: &'a SnapshotRef,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        let _ = which;
        no_snapshots(self.filename(), self.driver_name())
    }
}

/// The answer of the snapshot operations of formats without them.
fn no_snapshots<'a, T: Send + 'a>(file: &str, driver: &str) -> BoxFuture<'a, Result<T>> {
    let e = Error::unsupported(
        file,
        format!("Block format '{driver}' does not support internal snapshots"),
    );
    Box::pin(async { Err(e) })
}

/// The result of a consistency check (`qemu-img check`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Corruptions: refcount lower than the references, bad offsets.
    pub corruptions: Vec<String>,
    /// Leaks: refcount higher than the references.
    pub leaks: Vec<String>,
    /// Clusters allocated.
    pub allocated_clusters: u64,
    /// Clusters the virtual disk spans.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with the previous one of their
    /// L2 table, compressed ones included (QEMU's `fragmented-clusters`).
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// The end of the used part of the file.
    pub image_end_offset: u64,
    /// Leaked clusters repaired (`qemu-img check -r leaks`).
    pub leaks_fixed: u64,
    /// Corruptions repaired (`qemu-img check -r all`).
    pub corruptions_fixed: u64,
    /// What the repair did, one line each (`Repairing cluster 5
    /// refcount=0 reference=1`), in order.
    pub repairs: Vec<String>,
}

/// What [`BlockDriver::check_repair`] may repair (`qemu-img check -r`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOptions {
    /// Lower refcounts above the references (`-r leaks`).
    pub repair_leaks: bool,
    /// Also raise refcounts below the references, rebuild the refcount
    /// structure if it is broken, and fix COPIED flags (`-r all`).
    pub repair_errors: bool,
}

impl CheckOptions {
    /// Check only.
    pub fn new() -> Self {
        Self::default()
    }
    /// `-r leaks`.
    pub fn leaks() -> Self {
        CheckOptions {
            repair_leaks: true,
            repair_errors: false,
        }
    }
    /// `-r all`.
    pub fn all() -> Self {
        CheckOptions {
            repair_leaks: true,
            repair_errors: true,
        }
    }
}
