//! QMP's internal snapshot commands on the block graph:
//! `blockdev-snapshot-internal-sync {device, name}` and
//! `blockdev-snapshot-delete-internal-sync {device, id?, name?}`, with the
//! checks in QEMU's order and its error texts (`blockdev.c`, as
//! qemu-storage-daemon answers them).
//!
//! The work runs on the node's context (the main context, or its
//! iothread's), like the other block commands.

use std::sync::Arc;

use aio::ClockType;
use blockjob::block::{BlockNode, SnapshotCreateOptions, SnapshotRef};
use serde_json::{json, Value};

use crate::block_qmp::BlockState;
use crate::qmp::{QmpArgs, QmpError, QmpServer, ServerError};
use crate::transaction_qmp::PreparedAction;

crate::qmp_args! {
    /// `blockdev-snapshot-internal-sync`.
    pub struct SnapshotInternalArgs {
        /// The node name (QEMU: device or node name).
        pub device: String,
        /// The new snapshot's name.
        pub name: String,
    }
}

crate::qmp_args! {
    /// `blockdev-snapshot-delete-internal-sync`.
    pub struct SnapshotDeleteInternalArgs {
        /// The node name.
        pub device: String,
        /// The snapshot id.
        pub id: Option<String>,
        /// The snapshot name.
        pub name: Option<String>,
    }
}

pub use blockjob::block::snapshot_info_json;

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// QEMU's `qmp_get_root_bs` lookup text for a missing node.
fn node(s: &BlockState, device: &str) -> Result<Arc<BlockNode>, QmpError> {
    s.graph
        .nodes()
        .into_iter()
        .find(|n| n.name() == device)
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })
}

/// Runs `f` on the context of `device`'s node and awaits it.
pub(crate) async fn on_node<T: Send + 'static>(
    s: &BlockState,
    device: &str,
    f: impl std::future::Future<Output = Result<T, QmpError>> + Send + 'static,
) -> Result<T, QmpError> {
    s.context_of(device)
        .spawn(f)
        .await
        .unwrap_or_else(|e| Err(QmpError::generic(format!("internal error: {e}"))))
}

async fn create(s: BlockState, a: SnapshotInternalArgs) -> Result<Value, QmpError> {
    let n = node(&s, &a.device)?;
    n.check_op_blockers().map_err(generic)?;
    if n.read_only() {
        return Err(QmpError::generic(format!(
            "Device '{}' is read only",
            a.device
        )));
    }
    if !n.supports_snapshots() {
        return Err(QmpError::generic(format!(
            "Block format '{}' used by device '{}' does not support internal snapshots",
            n.driver_name(),
            a.device
        )));
    }
    if a.name.is_empty() {
        return Err(QmpError::generic("Name is empty"));
    }
    let list = n.snapshot_list().await.map_err(generic)?;
    if SnapshotRef::Name(a.name.clone()).find(&list).is_some() {
        return Err(QmpError::generic(format!(
            "Snapshot with name '{}' already exists on device '{}'",
            a.name, a.device
        )));
    }
    let clock = s.context_of(&a.device).clock_now(ClockType::Virtual);
    let opts = SnapshotCreateOptions::new(a.name).vm_clock_nsec(clock.max(0) as u64);
    n.snapshot_create(&opts).await.map_err(generic)?;
    Ok(json!({}))
}

async fn delete(s: BlockState, a: SnapshotDeleteInternalArgs) -> Result<Value, QmpError> {
    let n = node(&s, &a.device)?;
    let which = match (a.id.clone(), a.name.clone()) {
        (None, None) => return Err(QmpError::generic("Name or id must be provided")),
        (Some(id), None) => SnapshotRef::Id(id),
        (None, Some(name)) => SnapshotRef::Name(name),
        (Some(id), Some(name)) => SnapshotRef::IdAndName { id, name },
    };
    n.check_op_blockers().map_err(generic)?;
    let list = n
        .snapshot_list()
        .await
        .map_err(|_| QmpError::generic("Failed to get a snapshot list: Operation not supported"))?;
    if which.find(&list).is_none() {
        let or_null = |o: &Option<String>| o.clone().unwrap_or_else(|| "null".into());
        return Err(QmpError::generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{}'",
            or_null(&a.id),
            or_null(&a.name),
            a.device
        )));
    }
    if n.read_only() {
        return Err(QmpError::generic(
            "Failed to remove snapshot from snapshot list: Operation not permitted",
        ));
    }
    let info = n.snapshot_delete(&which).await.map_err(generic)?;
    Ok(snapshot_info_json(&info))
}

/// Registers `blockdev-snapshot-internal-sync` and
/// `blockdev-snapshot-delete-internal-sync` on `server`.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_internal_snapshot_commands(
    server: &QmpServer,
    state: BlockState,
) -> Result<(), ServerError> {
    on_node_command(
        server,
        state.clone(),
        "blockdev-snapshot-internal-sync",
        |a: &SnapshotInternalArgs| a.device.clone(),
        create,
    )?;
    on_node_command(
        server,
        state.clone(),
        "blockdev-snapshot-delete-internal-sync",
        |a: &SnapshotDeleteInternalArgs| a.device.clone(),
        delete,
    )?;
    // As a `transaction` action: prepare takes the snapshot, abort deletes
    // it again (QEMU's internal_snapshot_action).
    state.actions.register(
        "blockdev-snapshot-internal-sync",
        |s: BlockState, a: SnapshotInternalArgs| async move {
            let (device, name) = (a.device.clone(), a.name.clone());
            on_node(&s, &device, create(s.clone(), a)).await?;
            Ok(Box::new(TakenSnapshot {
                state: s,
                device,
                name,
            }) as Box<dyn PreparedAction>)
        },
    )
}

/// An internal snapshot taken by a transaction that may still be undone.
struct TakenSnapshot {
    state: BlockState,
    device: String,
    name: String,
}

impl PreparedAction for TakenSnapshot {
    fn commit(self: Box<Self>) {}

    fn abort(self: Box<Self>) -> crate::transaction_qmp::BoxFuture<()> {
        Box::pin(async move {
            let TakenSnapshot {
                state,
                device,
                name,
            } = *self;
            let s = state.clone();
            let dev = device.clone();
            let undo = async move {
                let n = node(&s, &dev)?;
                n.snapshot_delete(&SnapshotRef::Name(name))
                    .await
                    .map_err(generic)
            };
            if let Err(e) = on_node(&state, &device, undo).await {
                log::warn!("transaction abort: deleting the internal snapshot on '{device}': {e}");
            }
        })
    }
}

/// Registers `name`, whose handler `run` runs on the context of the node
/// its arguments name.
fn on_node_command<A, Fut>(
    server: &QmpServer,
    state: BlockState,
    name: &str,
    device: fn(&A) -> String,
    run: fn(BlockState, A) -> Fut,
) -> Result<(), ServerError>
where
    A: QmpArgs + Send + 'static,
    Fut: std::future::Future<Output = Result<Value, QmpError>> + Send + 'static,
{
    server.register_async(name, move |a: A| {
        let s = state.clone();
        async move {
            let dev = device(&a);
            on_node(&s, &dev, run(s.clone(), a)).await
        }
    })
}
