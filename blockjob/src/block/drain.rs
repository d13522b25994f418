//! Drained sections (QEMU's `bdrv_drained_begin` / `_end`): while one is
//! held on a node, no request runs through the node or any node above it
//! (its parents, up to the roots), external clients of the caller's
//! context start no new work, and jobs using those nodes stay paused at
//! their next pause point. The holder has the nodes to itself: to change
//! the graph, switch a node's context, or look at a quiet image.
//!
//! A drained section is entered with [`BlockGraph::drained_begin`] from a
//! task and left by dropping the returned [`Drained`]. The task must not
//! itself be inside a request on one of the nodes (it would wait for
//! itself). From outside any task, `ctx.block_on(graph.drained_begin(..))`
//! is the nested-poll form.

use std::fmt;
use std::sync::Arc;

use aio::{AioContext, ClientGuard, ClientType};

use super::{BlockGraph, BlockNode};
use crate::{Error, Result};

/// Options of [`BlockGraph::drained_begin`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainOptions {
    /// Leave the external clients of the caller's context (guest
    /// ioeventfds, NBD export sockets) enabled. By default they are
    /// disabled for the length of the section, so no new request comes
    /// in from outside.
    pub keep_external_clients: bool,
}

impl DrainOptions {
    /// The defaults: external clients disabled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets [`keep_external_clients`](Self::keep_external_clients).
    pub fn keep_external_clients(mut self, on: bool) -> Self {
        self.keep_external_clients = on;
        self
    }
}

/// A drained section; dropping it ends the section (jobs resume, clients
/// come back).
pub struct Drained {
    nodes: Vec<Arc<BlockNode>>,
    _clients: Option<ClientGuard>,
}

impl fmt::Debug for Drained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name()).collect();
        f.debug_struct("Drained").field("nodes", &names).finish()
    }
}

impl Drained {
    /// The drained nodes: the node asked for, then its ancestors.
    pub fn nodes(&self) -> &[Arc<BlockNode>] {
        &self.nodes
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.quiesce_end();
        }
    }
}

impl BlockGraph {
    /// `node` and every node that has it as a child, directly or not.
    pub fn ancestors(&self, node: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
        let all = self.nodes();
        let mut out = vec![node.clone()];
        let mut i = 0;
        while i < out.len() {
            let child = out[i].clone();
            for n in &all {
                let is_parent = n.file_child().is_some_and(|c| Arc::ptr_eq(&c, &child))
                    || n.backing().is_some_and(|c| Arc::ptr_eq(&c, &child));
                if is_parent && !out.iter().any(|o| Arc::ptr_eq(o, n)) {
                    out.push(n.clone());
                }
            }
            i += 1;
        }
        out
    }

    /// Begins a drained section on `node` and its ancestors: marks them
    /// drained (their jobs pause at the next pause point), disables the
    /// external clients of the calling task's context unless told not
    /// to, then waits until no request runs through any of them.
    ///
    /// # Errors
    ///
    /// Only if the context cannot disable its clients.
    ///
    /// # Examples
    ///
    /// ```
    /// # use blockjob::block::{BlockGraph, DrainOptions};
    /// # use serde_json::json;
    /// let ctx = aio::AioContext::new()?;
    /// let graph = BlockGraph::new();
    /// ctx.block_on(async {
    ///     let n = graph.blockdev_add(&json!({"driver": "null-co", "node-name": "n"})).await?;
    ///     let drained = graph.drained_begin(&n, &DrainOptions::new()).await?;
    ///     assert!(n.is_drained() && n.in_flight() == 0);
    ///     drop(drained);
    ///     assert!(!n.is_drained());
    ///     Ok::<_, blockjob::Error>(())
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn drained_begin(
        &self,
        node: &Arc<BlockNode>,
        opts: &DrainOptions,
    ) -> Result<Drained> {
        let nodes = self.ancestors(node);
        let clients = match (opts.keep_external_clients, AioContext::current()) {
            (false, Some(ctx)) => Some(
                ctx.disable_clients(ClientType::EXTERNAL.mask())
                    .map_err(|e| Error::Job(format!("cannot drain '{}': {e}", node.name())))?,
            ),
            _ => None,
        };
        for n in &nodes {
            n.quiesce_begin();
        }
        let drained = Drained {
            nodes,
            _clients: clients,
        };
        wait_all_idle(&drained.nodes).await;
        Ok(drained)
    }
}

/// Waits until no request runs on any of `nodes`. A request on a parent
/// may start one on a child, so this looks until a whole pass finds every
/// node idle.
pub(crate) async fn wait_all_idle(nodes: &[Arc<BlockNode>]) {
    loop {
        let mut waited = false;
        for n in nodes {
            if n.in_flight() > 0 {
                n.wait_idle().await;
                waited = true;
            }
        }
        if !waited {
            return;
        }
    }
}
