//! `blockdev-reopen`: a list of nodes, each given again with the options
//! it was added with, changes `read-only` all together or not at all.

use std::sync::Arc;

use serde_json::Value;

use super::{BlockGraph, BlockNode, ReopenOptions};
use crate::{Error, Result};

fn generic(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// One checked element of the list.
struct Request {
    node: Arc<BlockNode>,
    read_only: bool,
}

/// Checks one element against the node it names, QEMU's way: the
/// `driver` and every other option as at `blockdev-add`, `file` naming
/// the current `file` child, `backing` present (naming the current one,
/// or `null` for none) when the node has a backing child.
fn check(graph: &BlockGraph, i: usize, v: &Value) -> Result<Request> {
    let o = v.as_object().ok_or_else(|| {
        generic(format!(
            "Invalid parameter type for 'options[{i}]', expected: object"
        ))
    })?;
    let name = match o.get("node-name") {
        Some(Value::String(n)) => n.clone(),
        Some(_) => {
            return Err(generic(format!(
                "Invalid parameter type for 'options[{i}].node-name', expected: string"
            )))
        }
        None => return Err(generic("node-name not specified".into())),
    };
    let node = graph
        .nodes()
        .into_iter()
        .find(|n| n.name() == name)
        .ok_or_else(|| generic(format!("Failed to find node with node-name='{name}'")))?;
    match o.get("driver") {
        Some(Value::String(d)) if d == node.driver_name() => {}
        Some(Value::String(_)) => return Err(generic("Cannot change the option 'driver'".into())),
        _ => {
            return Err(generic(format!(
                "Parameter 'options[{i}].driver' is missing"
            )))
        }
    }
    let read_only = match o.get("read-only") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(generic(format!(
                "Invalid parameter type for 'options[{i}].read-only', expected: boolean"
            )))
        }
    };
    if let Some(f) = node.file_child() {
        match o.get("file") {
            Some(Value::String(n)) if n == f.name() => {}
            Some(_) => return Err(generic("Cannot change the option 'file'".into())),
            None => return Err(generic(format!("Parameter 'options[{i}].file' is missing"))),
        }
    }
    match (o.get("backing"), node.backing()) {
        (None, Some(_)) => return Err(generic(format!("backing is missing for '{name}'"))),
        (None, None) | (Some(Value::Null), None) => {}
        (Some(Value::String(n)), Some(b)) if *n == b.name() => {}
        (Some(_), _) => {
            return Err(generic(format!(
                "Cannot change the backing link of '{name}' by reopen"
            )))
        }
    }
    let was = node.add_options();
    for (k, x) in o {
        if matches!(
            k.as_str(),
            "node-name" | "driver" | "read-only" | "file" | "backing"
        ) {
            continue;
        }
        if was.get(k) != Some(x) {
            return Err(generic(format!("Cannot change the option '{k}'")));
        }
    }
    if let Some(k) = was
        .keys()
        .find(|k| !o.contains_key(k.as_str()) && k.as_str() != "node-name")
    {
        return Err(generic(format!("Cannot change the option '{k}'")));
    }
    Ok(Request { node, read_only })
}

impl BlockGraph {
    /// QMP's `blockdev-reopen {options: [...]}`: each element names a
    /// node (`node-name`, `driver`, its `file` child by name, its
    /// `backing` by name or `null`) and may change `read-only` (absent:
    /// read-write, as in QEMU). All elements are checked first; then the
    /// nodes are reopened in order, and if one fails the ones before it
    /// go back to how they were.
    ///
    /// # Errors
    ///
    /// QEMU's texts: `Failed to find node with node-name='N'`, `Cannot
    /// change the option 'X'`, `backing is missing for 'N'`, and those of
    /// [`BlockNode::reopen`].
    pub async fn blockdev_reopen(&self, options: &[Value]) -> Result<()> {
        let reqs = options
            .iter()
            .enumerate()
            .map(|(i, v)| check(self, i, v))
            .collect::<Result<Vec<_>>>()?;
        let mut done: Vec<(Arc<BlockNode>, bool)> = Vec::new();
        for r in reqs {
            let was = r.node.read_only();
            match r
                .node
                .reopen(&ReopenOptions::new().read_only(r.read_only))
                .await
            {
                Ok(()) => done.push((r.node, was)),
                Err(e) => {
                    for (n, was) in done.into_iter().rev() {
                        if let Err(u) = n.reopen(&ReopenOptions::new().read_only(was)).await {
                            log::warn!("blockdev-reopen: could not undo on '{}': {u}", n.name());
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
