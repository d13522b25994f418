//! Block status across a backing chain, and `qemu-img map`'s view of it.

use std::sync::Arc;

use serde::Serialize;

use super::{BlockNode, BlockStatus};
use crate::Result;

/// Where a range of the top node's data lives in its chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainStatus {
    /// The status in the layer that decides (see `depth`).
    pub status: BlockStatus,
    /// The layer that decides, 0 = top. For a range allocated nowhere, the
    /// deepest layer that still covers it.
    pub depth: usize,
    /// Bytes from the offset with this status.
    pub len: u64,
}

impl BlockNode {
    /// The status of `offset..offset+len` through the backing chain:
    /// allocated in which layer (and how), or unallocated everywhere.
    pub async fn chain_status(self: &Arc<Self>, offset: u64, len: u64) -> Result<ChainStatus> {
        let mut node = self.clone();
        let mut depth = 0;
        let mut len = len;
        loop {
            let (st, n) = node.block_status(offset, len).await?;
            if st.allocated {
                return Ok(ChainStatus {
                    status: st,
                    depth,
                    len: n,
                });
            }
            len = n;
            match node.backing() {
                Some(b) if offset < b.len() => {
                    len = len.min(b.len() - offset);
                    node = b;
                    depth += 1;
                }
                _ => {
                    return Ok(ChainStatus {
                        status: BlockStatus {
                            zero: true,
                            ..Default::default()
                        },
                        depth,
                        len,
                    })
                }
            }
        }
    }

    /// The whole image's map, merged like `qemu-img map --output=json`.
    pub async fn map(self: &Arc<Self>) -> Result<Vec<MapEntry>> {
        let size = self.len();
        let mut out: Vec<MapEntry> = Vec::new();
        let mut pos = 0;
        while pos < size {
            let cs = self.chain_status(pos, size - pos).await?;
            let e = MapEntry {
                start: pos,
                length: cs.len,
                depth: cs.depth,
                present: cs.status.allocated,
                zero: cs.status.zero,
                data: cs.status.data,
                compressed: cs.status.compressed,
                offset: if cs.status.allocated {
                    cs.status.offset
                } else {
                    None
                },
            };
            pos += cs.len;
            if let Some(last) = out.last_mut() {
                if last.merges(&e) {
                    last.length += e.length;
                    continue;
                }
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// One line of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Layer the data comes from (0 = top).
    pub depth: usize,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Has data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset in that layer's file, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    fn merges(&self, next: &MapEntry) -> bool {
        let same = self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed;
        same && match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + self.length == b,
            _ => false,
        }
    }

    /// The entry exactly as `qemu-img map --output=json` prints it
    /// (without the surrounding `[`, `,` and `]`).
    pub fn to_qemu_json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// The whole `qemu-img map --output=json` text for `entries`.
pub fn map_to_qemu_json(entries: &[MapEntry]) -> String {
    let lines: Vec<String> = entries.iter().map(MapEntry::to_qemu_json).collect();
    format!("[{}]\n", lines.join(",\n"))
}
