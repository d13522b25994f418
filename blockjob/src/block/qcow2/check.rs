//! `check`: rebuild the reference counts from the tables and compare.

use super::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use super::Qcow2;
use crate::block::{BlockDriver as _, CheckReport};
use crate::Result;

impl Qcow2 {
    pub(super) async fn do_check(&self) -> Result<CheckReport> {
        let g = &self.g;
        let cs = g.cs();
        let mut r = CheckReport::default();
        let mut m = self.meta.lock().await;
        let flen = g.file.len();
        let n = flen.div_ceil(cs).max(m.end_cluster) as usize;
        let mut refs = vec![0u64; n];
        let mut corrupt = Vec::new();
        let mut inc = |what: &str, off: u64, len: u64, corrupt: &mut Vec<String>| {
            if len == 0 {
                return;
            }
            let first = off / cs;
            let last = (off + len - 1) / cs;
            for c in first..=last {
                match refs.get_mut(c as usize) {
                    Some(x) => *x += 1,
                    None => {
                        corrupt.push(format!(
                            "ERROR {what} at {off:#x} is past the end of the image file"
                        ));
                        break;
                    }
                }
            }
        };
        inc("header", 0, cs, &mut corrupt);
        let l1_len = m.l1.len() as u64 * 8;
        inc("L1 table", m.l1_offset, l1_len, &mut corrupt);
        let rt_len = (m.reftable.len() as u64 * 8).div_ceil(cs) * cs;
        inc("refcount table", m.reftable_offset, rt_len, &mut corrupt);
        for (i, &e) in m.reftable.clone().iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                corrupt.push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            inc("refcount block", off, cs, &mut corrupt);
        }
        let l2e = g.l2_entries();
        let words = if g.extended_l2 { 2 } else { 1 };
        let mut data_entries = Vec::new();
        for (l1i, &e) in m.l1.clone().iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 || off + cs > flen {
                corrupt.push(format!("ERROR l2_offset={off:x}: L2 table is not cluster aligned or past the end of the file"));
                continue;
            }
            inc("L2 table", off, cs, &mut corrupt);
            let t = m.l2_table(g, l1i as u64, off).await?.clone();
            for i in 0..l2e as usize {
                let w = t[i * words];
                if w & COMPRESSED != 0 {
                    let x = 62 - (g.cluster_bits - 8);
                    let host = w & ((1u64 << x) - 1);
                    let sectors = ((w & !(COMPRESSED | COPIED)) >> x) + 1;
                    inc(
                        "compressed cluster",
                        host & !511,
                        sectors * 512,
                        &mut corrupt,
                    );
                    r.allocated_clusters += 1;
                    continue;
                }
                let host = w & OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                if host % cs != 0 {
                    corrupt.push(format!("ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."));
                    continue;
                }
                inc("data cluster", host, cs, &mut corrupt);
                r.allocated_clusters += 1;
                data_entries.push(w);
            }
            let rc = m.refcount(g, off / cs).await?;
            if (e & COPIED != 0) != (rc == 1) {
                corrupt.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"
                ));
            }
        }
        for w in data_entries {
            let rc = m.refcount(g, (w & OFFSET_MASK) / cs).await?;
            if (w & COPIED != 0) != (rc == 1) {
                corrupt.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={w:x} refcount={rc}"
                ));
            }
        }
        let mut end = 0;
        for (c, &want) in refs.iter().enumerate() {
            let rc = m.refcount(g, c as u64).await?;
            if rc > 0 {
                end = c as u64 + 1;
            }
            if rc < want {
                corrupt.push(format!("ERROR cluster {c} refcount={rc} reference={want}"));
            } else if rc > want {
                r.leaks
                    .push(format!("Leaked cluster {c} refcount={rc} reference={want}"));
            }
        }
        // Refcounts beyond the file for clusters nobody references.
        let mut c = n as u64;
        while c < (m.reftable.len() as u64) * g.rpb() {
            let t = (c / g.rpb()) as usize;
            if m.reftable[t] & OFFSET_MASK == 0 {
                c = (t as u64 + 1) * g.rpb();
                continue;
            }
            let rc = m.refcount(g, c).await?;
            if rc > 0 {
                r.leaks
                    .push(format!("Leaked cluster {c} refcount={rc} reference=0"));
                end = c + 1;
            }
            c += 1;
        }
        r.corruptions = corrupt;
        r.total_clusters = self.len().div_ceil(cs);
        r.image_end_offset = end * cs;
        Ok(r)
    }
}
