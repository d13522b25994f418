//! QMP's dirty bitmap commands: `block-dirty-bitmap-add`, `-remove`,
//! `-clear`, `-enable`, `-disable` and `-merge`, with QEMU's error texts
//! (as qemu-storage-daemon answers them), and the `dirty-bitmaps` member of
//! `query-named-block-nodes`.
//!
//! `persistent: true` is accepted on qcow2 (v3, read-write) nodes: the
//! bitmap is stored in the image when the node is closed, and
//! `block-dirty-bitmap-remove` takes a persistent bitmap out of the image
//! at once (on the node's context). Other nodes refuse it with QEMU's
//! texts. Bitmaps found in the image at open are listed with
//! `persistent: true`, and with `inconsistent: true` when the image had
//! them `in_use` (not saved cleanly). The other operations take a short
//! lock on the node's bitmap list and run on the QMP thread.

use std::sync::Arc;

use blockjob::block::{BitmapAddOptions, BitmapUndo, BlockNode, DirtyBitmap};
use serde_json::{json, Value};

use crate::block_qmp::BlockState;
use crate::internal_snapshot_qmp::on_node;
use crate::qmp::{QmpError, QmpServer, ServerError};
use crate::transaction_qmp::{BoxFuture, PrepareResult, PreparedAction};

crate::qmp_args! {
    /// `block-dirty-bitmap-add`.
    pub struct BitmapAddArgs {
        /// The node.
        pub node: String,
        /// The new bitmap's name.
        pub name: String,
        /// Bytes per bit (power of two, 512 B..2 GiB).
        pub granularity: Option<u32>,
        /// Store in the image (qcow2 v3 nodes).
        pub persistent: Option<bool>,
        /// Start disabled.
        pub disabled: Option<bool>,
    }
}

crate::qmp_args! {
    /// `block-dirty-bitmap-remove/clear/enable/disable`.
    pub struct BitmapArgs {
        /// The node.
        pub node: String,
        /// The bitmap.
        pub name: String,
    }
}

crate::qmp_args! {
    /// `block-dirty-bitmap-merge`.
    pub struct BitmapMergeArgs {
        /// The node of the target (and of sources given by name).
        pub node: String,
        /// The bitmap merged into.
        pub target: String,
        /// Source bitmaps: names on `node`, or `{node, name}` objects (any
        /// node of the same size).
        pub bitmaps: Vec<Value>,
    }
}

/// The `dirty-bitmaps` member of a node's `query-named-block-nodes`
/// entry (QEMU's `BlockDirtyInfo` list), newest first; `None` when the
/// node has no bitmap (QEMU leaves the member out).
pub fn dirty_bitmaps_json(node: &BlockNode) -> Option<Value> {
    let list = node.bitmaps();
    if list.is_empty() {
        return None;
    }
    Some(Value::Array(
        list.iter()
            .map(|b| {
                let i = b.info();
                let mut v = json!({
                    "name": i.name,
                    "recording": i.recording,
                    "persistent": i.persistent,
                    "busy": i.busy,
                    "granularity": i.granularity,
                    "count": i.count,
                });
                if i.inconsistent {
                    v["inconsistent"] = json!(true);
                }
                v
            })
            .collect(),
    ))
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn find(s: &BlockState, name: &str) -> Option<Arc<BlockNode>> {
    s.graph.nodes().into_iter().find(|n| n.name() == name)
}

/// `block-dirty-bitmap-add` looks nodes up as `qmp_get_root_bs` does.
fn node_for_add(s: &BlockState, name: &str) -> Result<Arc<BlockNode>, QmpError> {
    find(s, name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// The other commands use `block_dirty_bitmap_lookup`'s text.
fn node(s: &BlockState, name: &str) -> Result<Arc<BlockNode>, QmpError> {
    find(s, name).ok_or_else(|| QmpError::generic(format!("Node '{name}' not found")))
}

/// Adds a bitmap as `block-dirty-bitmap-add` does; returns the node and
/// the bitmap (the transaction action undoes with them).
pub(crate) fn add(
    s: &BlockState,
    a: &BitmapAddArgs,
) -> Result<(Arc<BlockNode>, Arc<DirtyBitmap>), QmpError> {
    let n = node_for_add(s, &a.node)?;
    let mut opts = BitmapAddOptions::default();
    opts.granularity = a.granularity.map(u64::from);
    opts.disabled = a.disabled.unwrap_or(false);
    opts.persistent = a.persistent.unwrap_or(false);
    let b = n.add_bitmap(&a.name, &opts).map_err(generic)?;
    Ok((n, b))
}

fn merge(s: &BlockState, a: &BitmapMergeArgs) -> Result<BitmapUndo, QmpError> {
    let n = node(s, &a.node)?;
    n.bitmap(&a.target).map_err(generic)?;
    let mut sources = Vec::with_capacity(a.bitmaps.len());
    for (i, v) in a.bitmaps.iter().enumerate() {
        let b = match v {
            Value::String(name) => n.bitmap(name),
            Value::Object(o) => {
                let field = |k: &str| {
                    o.get(k).and_then(Value::as_str).ok_or_else(|| {
                        QmpError::generic(format!("Parameter 'bitmaps[{i}].{k}' is missing"))
                    })
                };
                let (on, name) = (field("node")?, field("name")?);
                node(s, on)?.bitmap(name)
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'bitmaps[{i}]', expected: BlockDirtyBitmapOrStr"
                )))
            }
        };
        sources.push(b.map_err(generic)?);
    }
    n.merge_bitmaps(&a.target, &sources).map_err(generic)
}

/// A prepared `block-dirty-bitmap-add` action: abort drops the bitmap.
struct Added(Arc<BlockNode>, Arc<DirtyBitmap>);

impl PreparedAction for Added {
    fn commit(self: Box<Self>) {}
    fn abort(self: Box<Self>) -> BoxFuture<()> {
        self.0.forget_bitmap(&self.1);
        Box::pin(async {})
    }
}

/// A prepared `block-dirty-bitmap-remove` action: abort puts the bitmap
/// back where it was.
struct Removed(Arc<BlockNode>, usize, Arc<DirtyBitmap>);

impl PreparedAction for Removed {
    fn commit(self: Box<Self>) {}
    fn abort(self: Box<Self>) -> BoxFuture<()> {
        self.0.restore_bitmap(self.1, self.2.clone());
        Box::pin(async {})
    }
}

/// A prepared clear/enable/disable/merge action: abort puts the old state back.
struct Changed(BitmapUndo);

impl PreparedAction for Changed {
    fn commit(self: Box<Self>) {}
    fn abort(self: Box<Self>) -> BoxFuture<()> {
        self.0.undo();
        Box::pin(async {})
    }
}

fn changed(r: blockjob::Result<BitmapUndo>) -> PrepareResult {
    r.map(|u| Box::new(Changed(u)) as Box<dyn PreparedAction>)
        .map_err(generic)
}

/// Registers the `block-dirty-bitmap-*` commands, and the `transaction`
/// actions of the same names.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_bitmap_commands(server: &QmpServer, state: BlockState) -> Result<(), ServerError> {
    let s = state.clone();
    server.register("block-dirty-bitmap-add", move |a: BitmapAddArgs| {
        add(&s, &a).map(|_| json!({}))
    })?;
    let s = state.clone();
    server.register_async("block-dirty-bitmap-remove", move |a: BitmapArgs| {
        let s = s.clone();
        async move {
            let n = node(&s, &a.node)?;
            let remove = async move { n.remove_bitmap(&a.name).await.map_err(generic) };
            on_node(&s, &a.node, remove).await.map(|_| json!({}))
        }
    })?;
    let s = state.clone();
    server.register("block-dirty-bitmap-clear", move |a: BitmapArgs| {
        node(&s, &a.node)?
            .clear_bitmap(&a.name)
            .map(|_| json!({}))
            .map_err(generic)
    })?;
    for (cmd, on) in [
        ("block-dirty-bitmap-enable", true),
        ("block-dirty-bitmap-disable", false),
    ] {
        let s = state.clone();
        server.register(cmd, move |a: BitmapArgs| {
            node(&s, &a.node)?
                .set_bitmap_enabled(&a.name, on)
                .map(|_| json!({}))
                .map_err(generic)
        })?;
    }
    let s = state.clone();
    server.register("block-dirty-bitmap-merge", move |a: BitmapMergeArgs| {
        merge(&s, &a).map(|_| json!({}))
    })?;

    let actions = &state.actions;
    actions.register(
        "block-dirty-bitmap-add",
        |s: BlockState, a: BitmapAddArgs| async move {
            add(&s, &a).map(|(n, b)| Box::new(Added(n, b)) as Box<dyn PreparedAction>)
        },
    )?;
    actions.register(
        "block-dirty-bitmap-remove",
        |s: BlockState, a: BitmapArgs| async move {
            let n = node(&s, &a.node)?;
            let (at, b) = n.take_bitmap(&a.name).map_err(generic)?;
            // Out of the image now, as QEMU does; an abort puts it back in
            // memory and the close stores it again.
            let (n2, b2) = (n.clone(), b.clone());
            let unstore = async move { n2.unstore_bitmap(&b2).await.map_err(generic) };
            if let Err(e) = on_node(&s, &a.node, unstore).await {
                n.restore_bitmap(at, b);
                return Err(e);
            }
            Ok(Box::new(Removed(n, at, b)) as Box<dyn PreparedAction>)
        },
    )?;
    actions.register(
        "block-dirty-bitmap-merge",
        |s: BlockState, a: BitmapMergeArgs| async move {
            merge(&s, &a).map(|u| Box::new(Changed(u)) as Box<dyn PreparedAction>)
        },
    )?;
    actions.register(
        "block-dirty-bitmap-clear",
        |s: BlockState, a: BitmapArgs| async move {
            changed(node(&s, &a.node)?.clear_bitmap(&a.name))
        },
    )?;
    actions.register(
        "block-dirty-bitmap-enable",
        |s: BlockState, a: BitmapArgs| async move {
            changed(node(&s, &a.node)?.set_bitmap_enabled(&a.name, true))
        },
    )?;
    actions.register(
        "block-dirty-bitmap-disable",
        |s: BlockState, a: BitmapArgs| async move {
            changed(node(&s, &a.node)?.set_bitmap_enabled(&a.name, false))
        },
    )?;
    Ok(())
}
