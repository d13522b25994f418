//! Permissions on nodes (QEMU's `BLK_PERM_*`): what a user of a node does
//! and what it lets others do. Attaching a user whose needs clash with
//! another user's sharing is refused, which is how two writers, or a job
//! and a resize, are kept apart.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};
use std::sync::Arc;

use super::BlockNode;

/// A set of permissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// No permissions.
    pub const NONE: Perm = Perm(0);
    /// Reads see consistent data.
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// Writes that change what the node reads as.
    pub const WRITE: Perm = Perm(2);
    /// Writes that do not change what it reads as (copy-on-read, commit of
    /// identical data).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(8);
    /// Changing the graph below (backing links).
    pub const GRAPH_MOD: Perm = Perm(16);
    /// Everything.
    pub const ALL: Perm = Perm(31);

    /// Whether every permission in `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions in `self` but not in `other`.
    pub fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitOrAssign for Perm {
    fn bitor_assign(&mut self, rhs: Perm) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for Perm {
    /// QEMU's names, comma-separated: `consistent read, write, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 5] = [
            "consistent read",
            "write",
            "write unchanged",
            "resize",
            "change children",
        ];
        let names: Vec<&str> = (0..5)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| NAMES[i])
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// One user's hold on a node.
#[derive(Clone, Debug)]
pub(crate) struct PermUser {
    pub(crate) id: u64,
    pub(crate) user: String,
    pub(crate) role: String,
    pub(crate) perm: Perm,
    pub(crate) shared: Perm,
    /// For a `backing` link: the node it is the backing child of. While
    /// nobody writes that node, the link also shares write and resize
    /// (QEMU's rule for backing children: an image nobody writes does not
    /// care whether its backing file changes, which is how an active
    /// commit's base can take the old top's writers at the pivot).
    pub(crate) parent: Option<std::sync::Weak<BlockNode>>,
}

impl PermUser {
    /// What this user lets others do now.
    pub(crate) fn shared_now(&self) -> Perm {
        let idle_parent = self
            .parent
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|p| !p.is_written());
        if idle_parent {
            self.shared | Perm::WRITE | Perm::RESIZE
        } else {
            self.shared
        }
    }
}

/// A user's permissions on a node; dropping it releases them.
pub struct PermGuard {
    pub(crate) node: Arc<BlockNode>,
    pub(crate) id: u64,
}

impl PermGuard {
    /// The node the permissions are held on.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }
}

impl fmt::Debug for PermGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermGuard")
            .field("node", &self.node.name())
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for PermGuard {
    fn drop(&mut self) {
        self.node.detach(self.id);
    }
}
