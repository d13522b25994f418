//! `check`: rebuild the reference counts from the tables and compare.

use super::entry::{host_range, COMPRESSED, COPIED, OFFSET_MASK};
use super::meta::words;
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
        let (st_off, st_len) = m.snapshots_at;
        inc("snapshot table", st_off, st_len, &mut corrupt);
        for (what, r) in self.bitmap_clusters(&m).await {
            match r {
                Ok(v) => v
                    .into_iter()
                    .for_each(|(off, len)| inc(&what, off, len, &mut corrupt)),
                Err(e) => corrupt.push(format!("ERROR {what}: {e}")),
            }
        }
        let mut l1s = vec![(m.l1.clone(), true)];
        for sn in m.snapshots.clone() {
            let len = u64::from(sn.l1_size) * 8;
            if sn.l1_offset.checked_add(len).is_none_or(|e| e > flen) {
                corrupt.push(format!(
                    "ERROR snapshot {} ({}) L1 table at {:#x} is past the end of the file",
                    String::from_utf8_lossy(&sn.id),
                    String::from_utf8_lossy(&sn.name),
                    sn.l1_offset
                ));
                continue;
            }
            inc("snapshot L1 table", sn.l1_offset, len, &mut corrupt);
            l1s.push((words(&g.read_file(sn.l1_offset, len).await?), false));
        }
        let step = if g.extended_l2 { 2 } else { 1 };
        let mut data_entries = Vec::new();
        for (l1, active) in l1s {
            for (l1i, &e) in l1.iter().enumerate() {
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
                for &w in t.iter().step_by(step) {
                    let Some((host, len)) = host_range(w, g.cluster_bits) else {
                        continue;
                    };
                    if w & COMPRESSED == 0 && host % cs != 0 {
                        corrupt.push(format!("ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."));
                        continue;
                    }
                    inc("data cluster", host, len, &mut corrupt);
                    if active {
                        r.allocated_clusters += 1;
                        if w & COMPRESSED == 0 {
                            data_entries.push(w);
                        }
                    }
                }
                if !active {
                    continue;
                }
                let rc = m.refcount(g, off / cs).await?;
                if (e & COPIED != 0) != (rc == 1) {
                    corrupt.push(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"
                    ));
                }
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
