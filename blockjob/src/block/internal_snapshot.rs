//! Internal snapshots as the block layer sees them (QEMU's
//! `QEMUSnapshotInfo` and the `bdrv_snapshot_*` operations): what a list
//! entry says, how a snapshot is named in a request, and the options of
//! `create`. The qcow2 driver implements them; other formats refuse.

/// One internal snapshot, as `qemu-img snapshot -l` and QMP's
/// `SnapshotInfo` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// The snapshot id (QEMU assigns `1`, `2`, ...: the next free number).
    pub id: String,
    /// The snapshot name (QEMU's "tag").
    pub name: String,
    /// Size of the saved VM state in bytes (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// The guest's virtual clock when the snapshot was taken, in ns.
    pub vm_clock_nsec: u64,
    /// Instruction count (record/replay), if the image records one.
    pub icount: Option<u64>,
    /// The virtual disk size when the snapshot was taken, if recorded.
    pub disk_size: Option<u64>,
}

/// Which snapshot a request names.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotRef {
    /// An id, or else a name (`qemu-img snapshot -a/-d`: ids are tried
    /// first).
    IdOrName(String),
    /// Exactly this id.
    Id(String),
    /// Exactly this name.
    Name(String),
    /// Both must match (QMP's `blockdev-snapshot-delete-internal-sync`
    /// with `id` and `name`).
    IdAndName {
        /// The id.
        id: String,
        /// The name.
        name: String,
    },
}

impl SnapshotRef {
    /// The snapshot of `list` this names, by QEMU's rules.
    pub fn find<'a>(&self, list: &'a [SnapshotInfo]) -> Option<&'a SnapshotInfo> {
        let mut it = list.iter();
        match self {
            SnapshotRef::IdOrName(s) => list
                .iter()
                .find(|i| &i.id == s)
                .or_else(|| list.iter().find(|i| &i.name == s)),
            SnapshotRef::Id(id) => it.find(|i| &i.id == id),
            SnapshotRef::Name(n) => it.find(|i| &i.name == n),
            SnapshotRef::IdAndName { id, name } => it.find(|i| &i.id == id && &i.name == name),
        }
    }
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotRef::IdOrName(s) => write!(f, "'{s}'"),
            SnapshotRef::Id(id) => write!(f, "with id '{id}'"),
            SnapshotRef::Name(n) => write!(f, "with name '{n}'"),
            SnapshotRef::IdAndName { id, name } => write!(f, "with id '{id}' and name '{name}'"),
        }
    }
}

/// Options of [`BlockNode::snapshot_create`](super::BlockNode::snapshot_create).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotCreateOptions {
    /// The name; must not be empty or already used on the image.
    pub name: String,
    /// Creation time (seconds, nanoseconds); `None`: now.
    pub date: Option<(u32, u32)>,
    /// The guest's virtual clock in ns (0 for `qemu-img`-style snapshots).
    pub vm_clock_nsec: u64,
    /// The instruction count to record; `None` records "none" (QEMU's -1,
    /// what a QMP snapshot without record/replay stores; `qemu-img`
    /// records 0).
    pub icount: Option<u64>,
}

impl SnapshotCreateOptions {
    /// Options for a snapshot called `name`, taken now.
    pub fn new(name: impl Into<String>) -> Self {
        SnapshotCreateOptions {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Sets the virtual clock value recorded in the snapshot.
    pub fn vm_clock_nsec(mut self, ns: u64) -> Self {
        self.vm_clock_nsec = ns;
        self
    }

    /// Sets the instruction count recorded in the snapshot.
    pub fn icount(mut self, icount: u64) -> Self {
        self.icount = Some(icount);
        self
    }

    /// Sets the creation time recorded in the snapshot.
    pub fn date(mut self, sec: u32, nsec: u32) -> Self {
        self.date = Some((sec, nsec));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn find_when_id_or_name_then_id_first() {
        let l = [info("1", "2"), info("2", "a")];
        assert_eq!(SnapshotRef::IdOrName("2".into()).find(&l), Some(&l[1]));
        assert_eq!(SnapshotRef::IdOrName("a".into()).find(&l), Some(&l[1]));
        assert_eq!(SnapshotRef::Name("2".into()).find(&l), Some(&l[0]));
        assert_eq!(
            SnapshotRef::IdAndName {
                id: "1".into(),
                name: "a".into()
            }
            .find(&l),
            None
        );
        assert_eq!(SnapshotRef::Id("3".into()).find(&l), None);
    }
}
