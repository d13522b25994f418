//! Where each job puts its filter node (see `block::filter`): the filter
//! is one of the job's holds, so it leaves the graph when the job lets go
//! of its nodes (at `prepare` for stream and commit, at `clean` for all),
//! on success, failure and cancel alike.

use std::sync::Arc;

use super::{Held, Holds};
use crate::block::{insert_filter, BlockGraph, BlockNode, FilterKind, FilterOptions};
use crate::job::JobType;
use crate::Result;

impl Holds {
    /// Inserts the filter `opts` describe, of a job of type `t`, above
    /// `node`.
    pub(crate) fn insert_filter(
        &mut self,
        graph: &BlockGraph,
        node: &Arc<BlockNode>,
        t: JobType,
        opts: FilterOptions,
    ) -> Result<()> {
        let kind = opts.kind;
        // What `blockdev-del` of the filter meets first in QEMU: the
        // job's op blocker (mirror_top, copy-before-write), the overlay's
        // blocker on its backing child (commit_top), or the job's block
        // backend (copy-on-read: the filter's `root` user).
        let parent = graph.parent_of(node);
        let filter = insert_filter(graph, node, opts)?;
        match kind {
            FilterKind::MirrorTop | FilterKind::CopyBeforeWrite => self.block(filter.node(), t),
            FilterKind::CommitTop => {
                if let Some((p, role)) = parent {
                    let reason = format!("node is used as {role} of '{}'", p.name());
                    self.blockers.push(filter.node().op_block(reason));
                }
            }
            _ => {}
        }
        self.filter = Some(filter);
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
