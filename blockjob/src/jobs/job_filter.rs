//! Where each job puts its filter node (see `block::filter`): the filter
//! is one of the job's holds, so it leaves the graph when the job lets go
//! of its nodes (at `prepare` for stream and commit, at `clean` for all),
//! on success, failure and cancel alike.

use std::sync::Arc;

use super::{Held, Holds};
use crate::block::{insert_filter, BlockGraph, BlockNode, FilterKind, FilterOptions};
use crate::Result;

impl Holds {
    /// Inserts the job's `kind` filter above `node`, named `name`
    /// (`filter-node-name`) or implicitly; `cor_layers` are what a
    /// `copy-on-read` filter copies up from.
    pub(crate) fn insert_filter(
        &mut self,
        graph: &BlockGraph,
        node: &Arc<BlockNode>,
        kind: FilterKind,
        name: Option<&String>,
        user: &str,
        cor_layers: &[Arc<BlockNode>],
    ) -> Result<()> {
        let opts = FilterOptions::new(kind, user)
            .node_name(name.cloned())
            .cor_layers(cor_layers.to_vec());
        self.filter = Some(insert_filter(graph, node, opts)?);
        Ok(())
    }
}

impl Held {
    /// Takes the job's filter out of the graph.
    pub(crate) fn drop_filter(&self) {
        let f = self.0.lock().filter.take();
        drop(f);
    }
}
