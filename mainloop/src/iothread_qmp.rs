//! `x-blockdev-set-iothread`: move a node, with every node connected to it
//! through `file` and `backing` links, to an iothread's context (or back
//! to the main loop's with `null`). Later commands on those nodes — jobs,
//! exports — run there.
//!
//! QEMU moves running users along. Here a job or an export is bound to the
//! context it started on, so a node in use is refused, as is an `nbd` node
//! (its connection belongs to its context).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use blockjob::block::BlockNode;
use serde_json::{json, Map, Value};

use crate::block_qmp::BlockState;
use crate::qmp::{ArgType, QmpError, QmpServer, Schema, ServerError};

fn schema() -> Schema {
    Schema::new()
        .required("node-name", ArgType::Str)
        .required(
            "iothread",
            ArgType::Alternate {
                name: "StrOrNull".into(),
                branches: vec![ArgType::Str, ArgType::Null],
            },
        )
        .optional("force", ArgType::Bool)
}

/// The nodes reachable from `start` through `file`/`backing` links in
/// either direction, by name.
fn component(all: &[Arc<BlockNode>], start: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
    let by_name: HashMap<&str, &Arc<BlockNode>> = all.iter().map(|n| (n.name(), n)).collect();
    let children = |n: &BlockNode| -> Vec<String> {
        n.file_child()
            .into_iter()
            .chain(n.backing())
            .map(|c| c.name().to_string())
            .collect()
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut todo = vec![start.name().to_string()];
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(n) = by_name.get(name.as_str()) else {
            continue;
        };
        todo.extend(children(n));
        // Parents: nodes that have `name` as a child.
        for p in all {
            if children(p).contains(&name) {
                todo.push(p.name().to_string());
            }
        }
    }
    seen.iter()
        .filter_map(|n| by_name.get(n.as_str()).map(|n| (*n).clone()))
        .collect()
}

/// Why `n` cannot change its context, if it cannot.
fn refusal(n: &BlockNode) -> Option<String> {
    if n.driver_name() == "nbd" {
        return Some(format!(
            "Node '{}' ({}) cannot change its AioContext: its connection belongs to it",
            n.name(),
            n.driver_name()
        ));
    }
    if let Err(e) = n.check_op_blockers() {
        return Some(e.to_string());
    }
    n.users()
        .into_iter()
        .find(|(_, role, _, _)| role != "file" && role != "backing")
        .map(|(user, role, _, _)| {
            format!(
                "Node '{}' is in use by {user} ({role}) and cannot change its AioContext",
                n.name()
            )
        })
}

/// Registers `x-blockdev-set-iothread` on `server`.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_iothread_commands(
    server: &QmpServer,
    state: BlockState,
) -> Result<(), ServerError> {
    let schema = schema();
    server.register_async(
        "x-blockdev-set-iothread",
        move |mut args: Map<String, Value>| {
            let s = state.clone();
            let checked = schema.validate(&mut args);
            async move {
                checked?;
                let name = args
                    .get("node-name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let target = match args.get("iothread") {
                    Some(Value::String(id)) => {
                        Some(s.iothreads.get(id).cloned().ok_or_else(|| {
                            QmpError::generic(format!("Cannot find iothread {id}"))
                        })?)
                    }
                    _ => None,
                };
                let all = s.graph.nodes();
                let node = all.iter().find(|n| n.name() == name).ok_or_else(|| {
                    QmpError::generic(format!("Failed to find node with node-name='{name}'"))
                })?;
                let members = component(&all, node);
                if let Some(why) = members.iter().find_map(|n| refusal(n)) {
                    return Err(QmpError::generic(why));
                }
                let mut map = s.node_contexts.lock();
                for n in &members {
                    match &target {
                        Some(ctx) => {
                            map.insert(n.name().to_string(), ctx.clone());
                        }
                        None => {
                            map.remove(n.name());
                        }
                    }
                }
                log::info!(
                    "x-blockdev-set-iothread: {} node(s) with '{name}' now on {}",
                    members.len(),
                    target.as_ref().map_or("the main loop", |c| c.name())
                );
                Ok(json!({}))
            }
        },
    )
}
