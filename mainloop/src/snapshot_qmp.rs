//! External snapshots over QMP: `blockdev-snapshot {node, overlay}` and
//! `blockdev-snapshot-sync {node-name | device, snapshot-file, ...}`, each
//! both a command and a `transaction` action type. The block-layer work
//! (checks, image creation, the link) is
//! `BlockGraph::snapshot_prepare` / `snapshot_sync_prepare`.

use blockjob::block::{NewImageMode, PreparedSnapshot, SnapshotSyncOptions};
use serde_json::{Map, Value};

use crate::block_qmp::BlockState;
use crate::qmp::{QmpError, QmpServer, ServerError};
use crate::transaction_qmp::{run_single, BoxFuture, PrepareResult, PreparedAction};

crate::qmp_args! {
    /// `blockdev-snapshot`.
    pub struct BlockdevSnapshotArgs {
        /// The node to snapshot.
        pub node: String,
        /// A node added with `"backing": null`; it becomes the top.
        pub overlay: String,
    }
}

crate::qmp_enum! {
    /// QAPI's `NewImageMode`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum NewImageModeArg {
        /// Open an existing image.
        Existing = "existing",
        /// Create the image with the node as its backing file.
        AbsolutePaths = "absolute-paths",
    }
}

crate::qmp_args! {
    /// `blockdev-snapshot-sync`.
    pub struct BlockdevSnapshotSyncArgs {
        /// The node to snapshot (looked up as a node name).
        pub device: Option<String>,
        /// The node to snapshot.
        pub node_name: Option<String>,
        /// The overlay's file.
        pub snapshot_file: String,
        /// The overlay's node name (required with `node-name`).
        pub snapshot_node_name: Option<String>,
        /// The overlay's format (default `qcow2`).
        pub format: Option<String>,
        /// `existing` or `absolute-paths` (default).
        pub mode: Option<NewImageModeArg>,
    }
}

struct Snapshot(PreparedSnapshot);

impl PreparedAction for Snapshot {
    fn commit(self: Box<Self>) {
        self.0.commit();
    }
    fn commit_async(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(self.0.commit_read_only())
    }
    fn abort(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            if let Err(e) = self.0.abort().await {
                log::warn!("undoing an external snapshot: {e}");
            }
        })
    }
}

fn prepared(r: blockjob::Result<PreparedSnapshot>) -> PrepareResult {
    match r {
        Ok(p) => Ok(Box::new(Snapshot(p))),
        Err(e) => Err(QmpError::generic(e.to_string())),
    }
}

async fn prepare_snapshot(s: BlockState, a: BlockdevSnapshotArgs) -> PrepareResult {
    let node = s.graph.lookup(Some(&a.node), Some(&a.node));
    let overlay = s.graph.lookup(Some(&a.overlay), Some(&a.overlay));
    match (node, overlay) {
        (Ok(n), Ok(o)) => prepared(s.graph.snapshot_prepare(&n, &o).await),
        (Err(e), _) | (_, Err(e)) => Err(QmpError::generic(e.to_string())),
    }
}

async fn prepare_snapshot_sync(s: BlockState, a: BlockdevSnapshotSyncArgs) -> PrepareResult {
    let mut o = SnapshotSyncOptions::default();
    o.device = a.device;
    o.node_name = a.node_name;
    o.snapshot_file = a.snapshot_file;
    o.snapshot_node_name = a.snapshot_node_name;
    o.format = a.format;
    o.mode = match a.mode {
        Some(NewImageModeArg::Existing) => NewImageMode::Existing,
        Some(NewImageModeArg::AbsolutePaths) | None => NewImageMode::AbsolutePaths,
    };
    prepared(s.graph.snapshot_sync_prepare(&o).await)
}

/// Registers `blockdev-snapshot` and `blockdev-snapshot-sync` as commands
/// and as `transaction` action types.
///
/// # Errors
///
/// A name clash with a command or action already registered.
pub fn register_snapshot_commands(
    server: &QmpServer,
    state: &BlockState,
) -> Result<(), ServerError> {
    state
        .actions
        .register("blockdev-snapshot", prepare_snapshot)?;
    state
        .actions
        .register("blockdev-snapshot-sync", prepare_snapshot_sync)?;
    for name in ["blockdev-snapshot", "blockdev-snapshot-sync"] {
        let s = state.clone();
        server.register_async(name, move |args: Map<String, Value>| {
            run_single(s.clone(), name, args)
        })?;
    }
    Ok(())
}
