//! Users at the top of the graph (QEMU's `BlockBackend`): an NBD export,
//! a device. A root holds permissions on one node and follows it when a
//! job replaces that node in the graph — the pivot of `blockdev-mirror`
//! and of an active `block-commit` — so that the requests it issues from
//! then on reach the new node, as in QEMU where `bdrv_replace_node` moves
//! every parent of the old node.

use std::sync::{Arc, Mutex, Weak};

use super::{BlockNode, Perm, PermGuard};
use crate::Result;

/// A top-level user of a node that follows the node when a job replaces
/// it (see the module documentation).
///
/// # Examples
///
/// ```
/// # use blockjob::block::{BlockGraph, BlockRoot, Perm};
/// # use serde_json::json;
/// let ctx = aio::AioContext::new()?;
/// let graph = BlockGraph::new();
/// let node = ctx.block_on(graph.blockdev_add(&json!({"driver": "null-co", "node-name": "n"})))?;
/// let root = BlockRoot::attach(&node, "export 'e'", Perm::CONSISTENT_READ, Perm::ALL)?;
/// assert_eq!(root.node().name(), "n");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct BlockRoot {
    user: String,
    perm: Perm,
    shared: Perm,
    state: Mutex<RootState>,
}

struct RootState {
    node: Arc<BlockNode>,
    /// `None` once released: the root no longer follows anything.
    guard: Option<PermGuard>,
}

impl BlockRoot {
    /// Takes `perm` on `node` for `user` (sharing `shared`), in the role
    /// `root`.
    ///
    /// # Errors
    ///
    /// [`Error::Permission`](crate::Error::Permission) when the node is
    /// read-only and `perm` writes, or another user conflicts.
    pub fn attach(
        node: &Arc<BlockNode>,
        user: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<Arc<BlockRoot>> {
        let guard = node.attach(user, "root", perm, shared)?;
        let root = Arc::new(BlockRoot {
            user: user.to_string(),
            perm,
            shared,
            state: Mutex::new(RootState {
                node: node.clone(),
                guard: Some(guard),
            }),
        });
        node.add_root(&root);
        Ok(root)
    }

    /// The node the root uses now.
    pub fn node(&self) -> Arc<BlockNode> {
        self.lock().node.clone()
    }

    /// Gives the permissions back (the user is gone). [`node`](Self::node)
    /// still answers; a later replacement no longer moves the root.
    pub fn release(&self) {
        let guard = self.lock().guard.take();
        drop(guard);
    }

    /// Takes this root's permissions on `node`.
    fn take_perms(&self, node: &Arc<BlockNode>) -> Result<PermGuard> {
        node.attach(&self.user, "root", self.perm, self.shared)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RootState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for BlockRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockRoot")
            .field("user", &self.user)
            .field("node", &self.node().name())
            .finish()
    }
}

/// Moves every live root of `from` to `to`: all of them or none (on a
/// refusal they take their permissions on `from` back).
/// Synchronous, so no request can start between the check that the nodes
/// are in sync and the switch.
///
/// # Errors
///
/// The permission error of the first root `to` cannot take; then no root
/// has moved.
pub(crate) fn move_roots(from: &Arc<BlockNode>, to: &Arc<BlockNode>) -> Result<()> {
    let roots: Vec<Arc<BlockRoot>> = from
        .roots()
        .into_iter()
        .filter(|r| {
            let st = r.lock();
            st.guard.is_some() && Arc::ptr_eq(&st.node, from)
        })
        .collect();
    // Give up the old permissions first: while the roots write `from`, a
    // backing link from it to `to` would not let them write `to`.
    let old: Vec<Option<PermGuard>> = roots.iter().map(|r| r.lock().guard.take()).collect();
    drop(old);
    let mut guards = Vec::with_capacity(roots.len());
    for r in &roots {
        match r.take_perms(to) {
            Ok(g) => guards.push(g),
            Err(e) => {
                drop(guards);
                for r in &roots {
                    match r.take_perms(from) {
                        Ok(g) => r.lock().guard = Some(g),
                        Err(e) => {
                            log::error!("{} lost its permissions on '{}': {e}", r.user, from.name())
                        }
                    }
                }
                return Err(e);
            }
        }
    }
    for (r, g) in roots.iter().zip(guards) {
        {
            let mut st = r.lock();
            st.node = to.clone();
            st.guard = Some(g);
        }
        to.add_root(r);
    }
    from.forget_roots(|r| !Arc::ptr_eq(&r.node(), from));
    Ok(())
}

/// The roots a node keeps: weak, so that a dropped root is simply gone.
#[derive(Default)]
pub(crate) struct Roots(Mutex<Vec<Weak<BlockRoot>>>);

impl Roots {
    pub(crate) fn add(&self, r: &Arc<BlockRoot>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(r));
    }

    pub(crate) fn live(&self) -> Vec<Arc<BlockRoot>> {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().filter_map(Weak::upgrade).collect()
    }

    pub(crate) fn retain(&self, keep: impl Fn(&BlockRoot) -> bool) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.upgrade().is_some_and(|r| keep(&r)));
    }
}
