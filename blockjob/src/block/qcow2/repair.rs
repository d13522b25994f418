//! Rebuilding the refcount structure from the references (`check -r all`
//! when a referenced cluster has refcount 0 or the refcount table is
//! damaged).
//!
//! The new refcount blocks and table go after everything the image uses,
//! so nothing in use is overwritten; the header switches to them only once
//! they are on disk (flushed), so a crash leaves the old structure in
//! place. The old table and blocks are then unreferenced: free clusters.

use std::collections::BTreeSet;

use super::entry::{max_refcount, set_refcount};
use super::header::field;
use super::meta::{to_bytes, Meta};
use super::Qcow2;
use crate::{Error, Result};

/// Where the new structure goes: refcount blocks for `blocks` (by table
/// index, in order) at `start`, then a table of `table_clusters`.
struct Layout {
    start: u64,
    blocks: Vec<u64>,
    table_entries: u64,
    table_clusters: u64,
}

impl Layout {
    /// The smallest layout at `start` covering the referenced clusters
    /// and itself (a fixed point: more clusters may need more blocks).
    fn new(refs: &[u64], start: u64, rpb: u64, cs: u64) -> Layout {
        let used: BTreeSet<u64> = refs
            .iter()
            .enumerate()
            .filter(|(_, &r)| r > 0)
            .map(|(c, _)| c as u64 / rpb)
            .collect();
        let (mut nb, mut tc) = (0u64, 0u64);
        loop {
            let end = start + nb + tc;
            let mut blocks = used.clone();
            blocks.extend(start / rpb..=(end.max(start + 1) - 1) / rpb);
            let entries = blocks.last().map_or(1, |&t| t + 1);
            let entries = entries.div_ceil(cs / 8) * (cs / 8);
            let ntc = (entries * 8).div_ceil(cs);
            // Blocks for the structure itself, counted with one more cluster
            // than last time until nothing changes.
            if blocks.len() as u64 == nb && ntc == tc {
                return Layout {
                    start,
                    blocks: blocks.into_iter().collect(),
                    table_entries: entries,
                    table_clusters: tc,
                };
            }
            nb = blocks.len() as u64;
            tc = ntc;
        }
    }

    fn end(&self) -> u64 {
        self.start + self.blocks.len() as u64 + self.table_clusters
    }
}

impl Qcow2 {
    /// Writes a new refcount structure holding exactly `refs` (the
    /// references without the refcount structure) and switches to it.
    pub(super) async fn rebuild_refcounts(&self, m: &mut Meta, refs: &[u64]) -> Result<()> {
        let g = &self.g;
        let cs = g.cs();
        let rpb = g.rpb();
        let order = g.refcount_order;
        if let Some((c, &r)) = refs
            .iter()
            .enumerate()
            .find(|(_, &r)| r > max_refcount(order))
        {
            return Err(Error::unsupported(
                &g.name,
                format!("cluster {c} has {r} references, more than its refcount can hold"),
            ));
        }
        let start = (refs.len() as u64).max(g.file.len().div_ceil(cs));
        let lay = Layout::new(refs, start, rpb, cs);
        if lay.table_clusters * cs > 8 << 20 {
            return Err(Error::unsupported(
                &g.name,
                "the refcount table would exceed 8 MiB",
            ));
        }
        let end = lay.end();
        let count = |c: u64| -> u64 {
            if c >= lay.start && c < end {
                1
            } else {
                refs.get(c as usize).copied().unwrap_or(0)
            }
        };
        let mut table = vec![0u64; lay.table_entries as usize];
        for (i, &t) in lay.blocks.iter().enumerate() {
            let off = (lay.start + i as u64) * cs;
            let mut blk = vec![0u8; cs as usize];
            for c in t * rpb..(t + 1) * rpb {
                let v = count(c);
                if v > 0 {
                    set_refcount(&mut blk, order, c % rpb, v);
                }
            }
            g.write_file(off, blk).await?;
            table[t as usize] = off;
        }
        let table_off = (lay.start + lay.blocks.len() as u64) * cs;
        let mut tbytes = to_bytes(&table);
        tbytes.resize((lay.table_clusters * cs) as usize, 0);
        g.write_file(table_off, tbytes).await?;
        g.flush().await?;
        let mut hdr = table_off.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(lay.table_clusters as u32).to_be_bytes());
        g.write_file(field::REFCOUNT_TABLE, hdr).await?;
        g.flush().await?;
        {
            let mut h = self.header();
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = lay.table_clusters as u32;
        }
        m.install_reftable(table, table_off, end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn layout_when_structure_crosses_a_block_then_covers_itself() {
        // 64 KiB clusters, 16-bit refcounts: 32768 clusters a block.
        let (rpb, cs) = (32768, 65536);
        let mut refs = vec![0u64; 32767];
        refs[0] = 1;
        refs[32766] = 1;
        let lay = Layout::new(&refs, 32767, rpb, cs);
        // Block 0 for the data; the structure starts in block 0 and ends
        // in block 1, which must exist too.
        assert_eq!(lay.blocks, vec![0, 1]);
        assert_eq!(lay.table_clusters, 1);
        assert_eq!(lay.end(), 32767 + 3);
    }

    #[test]
    fn layout_when_sparse_then_only_used_blocks() {
        let (rpb, cs) = (4096, 4096);
        let mut refs = vec![0u64; 3 * 4096];
        refs[5] = 1;
        refs[2 * 4096 + 1] = 2;
        let lay = Layout::new(&refs, 3 * 4096, rpb, cs);
        assert_eq!(lay.blocks, vec![0, 2, 3]);
        assert_eq!(lay.table_entries, 512);
    }
}
