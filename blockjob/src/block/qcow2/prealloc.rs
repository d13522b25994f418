//! Preallocation of a new image (`preallocation=metadata|falloc|full`):
//! every guest cluster gets an L2 entry and a host cluster, so later
//! writes go in place without allocating.

use super::entry::{COPIED, OFFSET_MASK};
use super::meta::to_bytes;
use super::Qcow2;
use crate::block::qcow2::create::Preallocation;
use crate::block::BlockDriver as _;
use crate::Result;

/// Zeroes are written in pieces of this size (`full`).
const ZERO_CHUNK: u64 = 1 << 20;

impl Qcow2 {
    /// Allocates every unallocated guest cluster, one L2 table's worth at
    /// a time: refcounts, then the data clusters' contents (`falloc`,
    /// `full`) and the file's new length, then the L2 table, then its L1
    /// entry, with flushes between, so a crash leaves only leaks. With
    /// `metadata` the data clusters are left unwritten: the file is
    /// extended sparsely to cover them and they read as zeroes from its
    /// holes, as in QEMU.
    pub(super) async fn do_preallocate(&self, mode: Preallocation) -> Result<()> {
        self.refuse_read_only("preallocate")?;
        if mode == Preallocation::Off {
            return Ok(());
        }
        let g = &self.g;
        let cs = g.cs();
        let clusters = self.len().div_ceil(cs);
        let per_table = g.l2_entries();
        let mut m = self.meta.lock().await;
        let mut file_end = g.file.len();
        for l1i in 0..clusters.div_ceil(per_table) {
            let first = l1i * per_table;
            let n = per_table.min(clusters - first);
            let cur = m.l1.get(l1i as usize).copied().unwrap_or(0) & OFFSET_MASK;
            let (table_off, mut table) = if cur != 0 {
                (cur, m.l2_table(g, l1i, cur).await?.clone())
            } else {
                (m.alloc(g, 1).await?, vec![0u64; per_table as usize])
            };
            let todo: Vec<usize> = (0..n as usize).filter(|&i| table[i] == 0).collect();
            if todo.is_empty() {
                continue;
            }
            let data = m.alloc(g, todo.len() as u64).await?;
            let bytes = todo.len() as u64 * cs;
            match mode {
                Preallocation::Falloc => g.file.write_zeroes(data, bytes).await?,
                Preallocation::Full => {
                    let mut off = 0;
                    while off < bytes {
                        let k = ZERO_CHUNK.min(bytes - off);
                        g.write_file(data + off, vec![0; k as usize]).await?;
                        off += k;
                    }
                }
                _ => {
                    // `metadata`: the clusters read as what the file holds
                    // there, zeroes past its end; a reused cluster inside
                    // it is zeroed.
                    if data < file_end {
                        g.file
                            .write_zeroes(data, bytes.min(file_end - data))
                            .await?;
                    }
                }
            }
            file_end = file_end.max(data + bytes).max(table_off + cs);
            // The file covers the clusters before the refcounts and the
            // L2 entries naming them can be durable: a reference past
            // the end of the file is corruption to `qemu-img check`.
            if g.file.len() < file_end {
                g.file.truncate(file_end).await?;
            }
            for (k, &i) in todo.iter().enumerate() {
                table[i] = (data + k as u64 * cs) | COPIED;
            }
            g.flush().await?;
            g.write_file(table_off, to_bytes(&table)).await?;
            m.cache_l2(g, table_off, table).await?;
            g.flush().await?;
            if cur == 0 {
                m.set_l1(g, l1i, table_off | COPIED).await?;
            }
        }
        g.flush().await
    }
}
