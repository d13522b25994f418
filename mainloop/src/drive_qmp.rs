//! `drive-mirror` and `drive-backup`: `blockdev-mirror` / `blockdev-backup`
//! whose `target` is a file name. With `mode: absolute-paths` (the
//! default) the target is created at the source's size, in `format` (the
//! source's by default), with the source's backing file as its backing
//! file for `sync: top` and the source itself for `sync: none`, as QEMU
//! does; with `mode: existing` it is opened (format probed unless given).
//! The target is opened without its backing chain and the job started as
//! for the `blockdev-` commands. If anything fails, the target is closed
//! again and a file the command created is deleted.
//!
//! The `drive-mirror` target stays in the graph (`node-name`, or a
//! generated name) after the job; the `drive-backup` target is closed when
//! its job has concluded.

use std::path::PathBuf;
use std::sync::Arc;

use blockjob::block::{remove_created, BlockNode, NewImage, OpenOptions};
use serde_json::{json, Map, Value};

use crate::block_qmp::{on, BlockState};
use crate::job_qmp::{backup_schema, mirror_schema, negative_speed, parse};
use crate::qmp::{ArgType, QmpError, QmpServer, Schema, ServerError};

fn drive_members(s: Schema) -> Schema {
    s.optional("format", ArgType::Str)
        .optional("mode", ArgType::enumeration(["existing", "absolute-paths"]))
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// Which job a drive command starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mirror,
    Backup,
}

/// Creates (or opens) the target of a drive command; returns the target
/// node and the file created, if any.
async fn open_target(
    s: &BlockState,
    source: &Arc<BlockNode>,
    a: &mut Map<String, Value>,
) -> Result<(Arc<BlockNode>, Option<PathBuf>), QmpError> {
    let str_arg = |a: &mut Map<String, Value>, k: &str| match a.remove(k) {
        Some(Value::String(v)) => Some(v),
        _ => None,
    };
    let target = str_arg(a, "target").unwrap_or_default();
    let format = str_arg(a, "format");
    let existing = str_arg(a, "mode").as_deref() == Some("existing");
    let node_name = str_arg(a, "node-name");
    let created = if existing {
        None
    } else {
        let format = format.as_deref().unwrap_or(source.driver_name());
        let backing = match a.get("sync").and_then(Value::as_str) {
            Some("top") => source.backing(),
            Some("none") => Some(source.clone()),
            _ => None,
        };
        let img = NewImage::new(&target, format, source.len()).backing(backing.as_ref());
        s.graph.create_image(&img).await.map_err(generic)?
    };
    let mut opts = OpenOptions::new().read_only(false).no_backing(true);
    if let Some(f) = format {
        opts = opts.format(f);
    }
    if let Some(n) = node_name {
        opts = opts.node_name(n);
    }
    match s.graph.open_image(&target, &opts).await {
        Ok(node) => Ok((node, created)),
        Err(e) => {
            remove_created(created.as_deref());
            Err(generic(e))
        }
    }
}

/// The body of `drive-mirror` / `drive-backup`, on the main context.
async fn drive(s: BlockState, kind: Kind, mut a: Map<String, Value>) -> Result<Value, QmpError> {
    negative_speed(&a)?;
    let device = a
        .get("device")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let source = s
        .graph
        .lookup(Some(&device), Some(&device))
        .map_err(generic)?;
    a.remove("unmap");
    let (target, created) = open_target(&s, &source, &mut a).await?;
    a.insert("target".into(), json!(target.name()));
    let ctx = s.context_of(&device);
    let started = match kind {
        Kind::Mirror => parse(a).and_then(|args| {
            blockjob::jobs::start_mirror(&ctx, &s.graph, &s.jobs, args).map_err(generic)
        }),
        Kind::Backup => parse(a).and_then(|args| {
            blockjob::jobs::start_backup(&ctx, &s.graph, &s.jobs, args).map_err(generic)
        }),
    };
    let job = match started {
        Ok(job) => job,
        Err(e) => {
            if let Err(d) = s.graph.blockdev_del(target.name()).await {
                log::warn!("closing the target '{}': {d}", target.name());
            }
            remove_created(created.as_deref());
            return Err(e);
        }
    };
    if kind == Kind::Backup {
        let graph = s.graph.clone();
        let name = target.name().to_string();
        s.ctx
            .spawn(async move {
                job.wait_finished().await;
                if let Err(e) = graph.blockdev_del(&name).await {
                    log::warn!("drive-backup: closing the target '{name}': {e}");
                }
            })
            .detach();
    }
    Ok(json!({}))
}

/// Registers `drive-mirror` and `drive-backup`.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_drive_commands(server: &QmpServer, state: &BlockState) -> Result<(), ServerError> {
    let commands = [
        (
            "drive-mirror",
            Kind::Mirror,
            drive_members(mirror_schema())
                .optional("node-name", ArgType::Str)
                .optional("unmap", ArgType::Bool),
        ),
        ("drive-backup", Kind::Backup, drive_members(backup_schema())),
    ];
    for (name, kind, schema) in commands {
        let s = state.clone();
        // `register_with_schema` takes synchronous handlers only: take the
        // arguments unchecked and check them against the schema here.
        server.register_async(name, move |mut a: Map<String, Value>| {
            let s = s.clone();
            let schema = schema.clone();
            async move {
                schema.validate(&mut a)?;
                let ctx = s.ctx.clone();
                on(&ctx, drive(s, kind, a)).await
            }
        })?;
    }
    Ok(())
}
