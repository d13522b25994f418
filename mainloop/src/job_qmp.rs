//! The job-starting commands: `block-stream`, `block-commit`,
//! `blockdev-mirror`, `blockdev-backup`. Arguments are checked against a
//! schema first (QEMU's texts for missing, mistyped, unknown and bad enum
//! arguments), then handed to the job constructors in `blockjob::jobs`.

use serde_json::{json, Map, Value};

use crate::block_qmp::{on, BlockState};
use crate::qmp::{ArgType, IntKind, QmpError, QmpServer, Schema, ServerError};
use crate::transaction_qmp::{BoxFuture, PreparedAction};

fn on_error() -> ArgType {
    ArgType::enumeration(["report", "ignore", "enospc", "stop", "auto"])
}

fn common(s: Schema) -> Schema {
    s.optional("job-id", ArgType::Str)
        .required("device", ArgType::Str)
        .optional("speed", ArgType::Int(IntKind::I64))
        .optional("filter-node-name", ArgType::Str)
        .optional("auto-finalize", ArgType::Bool)
        .optional("auto-dismiss", ArgType::Bool)
}

fn stream_schema() -> Schema {
    common(Schema::new())
        .optional("base", ArgType::Str)
        .optional("base-node", ArgType::Str)
        .optional("bottom", ArgType::Str)
        .optional("backing-file", ArgType::Str)
        .optional("backing-mask-protocol", ArgType::Bool)
        .optional("on-error", on_error())
}

fn commit_schema() -> Schema {
    common(Schema::new())
        .optional("base-node", ArgType::Str)
        .optional("base", ArgType::Str)
        .optional("top-node", ArgType::Str)
        .optional("top", ArgType::Str)
        .optional("backing-file", ArgType::Str)
        .optional("backing-mask-protocol", ArgType::Bool)
        .optional("on-error", on_error())
}

pub(crate) fn mirror_schema() -> Schema {
    common(Schema::new())
        .required("target", ArgType::Str)
        .optional("replaces", ArgType::Str)
        .required(
            "sync",
            ArgType::enumeration(["top", "full", "none", "incremental", "bitmap"]),
        )
        .optional("granularity", ArgType::Int(IntKind::U32))
        .optional("buf-size", ArgType::Int(IntKind::I64))
        .optional("on-source-error", on_error())
        .optional("on-target-error", on_error())
        .optional(
            "copy-mode",
            ArgType::enumeration(["background", "write-blocking"]),
        )
        .optional("target-is-zero", ArgType::Bool)
}

pub(crate) fn backup_schema() -> Schema {
    let perf = Schema::new()
        .optional("use-copy-range", ArgType::Bool)
        .optional("max-workers", ArgType::Int(IntKind::I64))
        .optional("max-chunk", ArgType::Int(IntKind::I64))
        .optional("min-cluster-size", ArgType::Int(IntKind::U64));
    common(Schema::new())
        .required("target", ArgType::Str)
        .required(
            "sync",
            ArgType::enumeration(["top", "full", "none", "incremental", "bitmap"]),
        )
        .optional("bitmap", ArgType::Str)
        .optional(
            "bitmap-mode",
            ArgType::enumeration(["on-success", "never", "always"]),
        )
        .optional("compress", ArgType::Bool)
        .optional("on-source-error", on_error())
        .optional("on-target-error", on_error())
        .optional("discard-source", ArgType::Bool)
        .optional("x-perf", ArgType::object(perf))
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    args: Map<String, Value>,
) -> Result<T, QmpError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| QmpError::generic(e.to_string()))
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The context of the job's `device` node (its iothread's, or main).
fn device_context(s: &BlockState, args: &Map<String, Value>) -> aio::AioContext {
    args.get("device")
        .and_then(Value::as_str)
        .map_or_else(|| s.ctx.clone(), |d| s.context_of(d))
}

pub(crate) fn negative_speed(args: &Map<String, Value>) -> Result<(), QmpError> {
    if args
        .get("speed")
        .and_then(Value::as_i64)
        .is_some_and(|s| s < 0)
    {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    Ok(())
}

/// Registers the four job-starting commands.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_job_commands(server: &QmpServer, state: BlockState) -> Result<(), ServerError> {
    let s = state.clone();
    server.register_with_schema("block-stream", stream_schema(), move |a| {
        negative_speed(&a)?;
        let ctx = device_context(&s, &a);
        blockjob::jobs::start_stream(&ctx, &s.graph, &s.jobs, parse(a)?)
            .map(|_| json!({}))
            .map_err(generic)
    })?;
    let s = state.clone();
    server.register_async_with_schema("block-commit", commit_schema(), move |a| {
        let s = s.clone();
        async move {
            negative_speed(&a)?;
            let ctx = device_context(&s, &a);
            let args = parse(a)?;
            let main = s.ctx.clone();
            on(&main, commit(s, ctx, args)).await
        }
    })?;
    let s = state.clone();
    server.register_with_schema("blockdev-mirror", mirror_schema(), move |a| {
        negative_speed(&a)?;
        let ctx = device_context(&s, &a);
        blockjob::jobs::start_mirror(&ctx, &s.graph, &s.jobs, parse(a)?)
            .map(|_| json!({}))
            .map_err(generic)
    })?;
    let s = state.clone();
    server.register_with_schema("blockdev-backup", backup_schema(), move |a| {
        negative_speed(&a)?;
        let ctx = device_context(&s, &a);
        blockjob::jobs::start_backup(&ctx, &s.graph, &s.jobs, parse(a)?)
            .map(|_| json!({}))
            .map_err(generic)
    })?;
    state
        .actions
        .register_with_schema("blockdev-backup", backup_schema(), |s, a| async move {
            negative_speed(&a)?;
            let ctx = device_context(&s, &a);
            let job = blockjob::jobs::create_backup(&ctx, &s.graph, &s.jobs, parse(a)?)
                .map_err(generic)?;
            if let Some(t) = &s.txn {
                t.add(&job);
            }
            Ok(Box::new(BackupAction(job)) as Box<dyn PreparedAction>)
        })?;
    Ok(())
}

/// `block-commit`. A read-only base (a backing file, as after a snapshot)
/// is reopened read-write for the job, as in QEMU, and read-only again
/// when the job ends, unless an active commit completed: the base is the
/// active layer then, and stays read-write.
async fn commit(
    s: BlockState,
    ctx: aio::AioContext,
    args: blockjob::jobs::CommitArgs,
) -> Result<Value, QmpError> {
    use blockjob::block::ReopenOptions;
    let (dev, top, base) = blockjob::jobs::commit_nodes(&s.graph, &args).map_err(generic)?;
    let active = std::sync::Arc::ptr_eq(&dev, &top);
    let reopened = base.read_only();
    if reopened {
        base.reopen(&ReopenOptions::new()).await.map_err(generic)?;
    }
    let job = match blockjob::jobs::start_commit(&ctx, &s.graph, &s.jobs, args) {
        Ok(job) => job,
        Err(e) => {
            if reopened {
                if let Err(u) = base.reopen(&ReopenOptions::new().read_only(true)).await {
                    log::warn!("block-commit: '{}' stays read-write: {u}", base.name());
                }
            }
            return Err(generic(e));
        }
    };
    if reopened {
        s.ctx
            .spawn(async move {
                let info = job.wait_finished().await;
                // A completed active commit made the base the active layer.
                let pivoted = active && info.error.is_none();
                if !pivoted {
                    if let Err(e) = base.reopen(&ReopenOptions::new().read_only(true)).await {
                        log::warn!("block-commit: '{}' stays read-write: {e}", base.name());
                    }
                }
            })
            .detach();
    }
    Ok(json!({}))
}

/// A `blockdev-backup` inside `transaction`: the job is created (and the
/// point in time fixed) at prepare, started at commit, and dropped
/// without ever running on abort.
struct BackupAction(blockjob::job::Job);

impl PreparedAction for BackupAction {
    fn commit(self: Box<Self>) {
        self.0.start();
    }
    fn abort(self: Box<Self>) -> BoxFuture<()> {
        self.0.cancel_unstarted();
        // Concluded before the reply: its nodes are free again, as in QEMU.
        let done = self.0.wait_finished();
        Box::pin(async move {
            done.await;
        })
    }
}
