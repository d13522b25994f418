//! `check`: rebuild the reference counts from the tables, compare, and
//! with `-r leaks|all` repair (QEMU's `qcow2_check_refcounts`, our code).
//!
//! Order of a repair: the references are counted from the tables
//! (refcount structures apart); the refcounts are compared; if a
//! referenced cluster has refcount 0 or the refcount table is damaged the
//! whole refcount structure is rebuilt at the end of the file (`-r all`
//! only, see [`repair`](super::repair)), otherwise each wrong refcount is
//! set to its reference count in place; the COPIED flags are checked last,
//! against the repaired refcounts.

use super::entry::{host_range, COMPRESSED, COPIED, OFFSET_MASK};
use super::meta::{words, Meta};
use super::Qcow2;
use crate::block::{BlockDriver as _, CheckOptions, CheckReport};
use crate::{Error, Result};

/// The references counted from the tables.
pub(super) struct Tally {
    /// References per host cluster, refcount table and blocks excluded.
    pub(super) refs: Vec<u64>,
    /// The clusters of the refcount table and (valid) refcount blocks.
    rc_structs: Vec<u64>,
    corrupt: Vec<String>,
    /// Errors in the refcount table (a rebuild repairs them).
    rc_corrupt: Vec<String>,
    /// The refcount table itself is damaged: only a rebuild repairs it.
    rebuild: bool,
    allocated: u64,
    /// Active clusters not right after their predecessor in the same L2
    /// table (compressed ones always), as QEMU counts them.
    fragmented: u64,
    compressed: u64,
}

fn inc(refs: &mut [u64], cs: u64, what: &str, off: u64, len: u64, corrupt: &mut Vec<String>) {
    if len == 0 {
        return;
    }
    let first = off / cs;
    let last = (off + len - 1) / cs;
    for c in first..=last {
        match refs.get_mut(c as usize) {
            Some(x) => *x = x.saturating_add(1),
            None => {
                corrupt.push(format!(
                    "ERROR {what} at {off:#x} is past the end of the image file"
                ));
                break;
            }
        }
    }
}

impl Qcow2 {
    /// Counts the references the header, tables and snapshots make.
    async fn tally(&self, m: &mut Meta) -> Result<Tally> {
        let g = &self.g;
        let cs = g.cs();
        let flen = g.file.len();
        let n = flen.div_ceil(cs).max(m.end_cluster) as usize;
        let mut refs = vec![0u64; n];
        let mut corrupt = Vec::new();
        let (mut allocated, mut fragmented, mut compressed) = (0, 0, 0);
        inc(&mut refs, cs, "header", 0, cs, &mut corrupt);
        let l1_len = m.l1.len() as u64 * 8;
        inc(&mut refs, cs, "L1 table", m.l1_offset, l1_len, &mut corrupt);
        let (st_off, st_len) = m.snapshots_at;
        inc(
            &mut refs,
            cs,
            "snapshot table",
            st_off,
            st_len,
            &mut corrupt,
        );
        for (what, r) in self.bitmap_clusters(m).await {
            match r {
                Ok(v) => v
                    .into_iter()
                    .for_each(|(off, len)| inc(&mut refs, cs, &what, off, len, &mut corrupt)),
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
            inc(
                &mut refs,
                cs,
                "snapshot L1 table",
                sn.l1_offset,
                len,
                &mut corrupt,
            );
            l1s.push((words(&g.read_file(sn.l1_offset, len).await?), false));
        }
        let step = if g.extended_l2 { 2 } else { 1 };
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
                inc(&mut refs, cs, "L2 table", off, cs, &mut corrupt);
                let t = m.l2_table(g, l1i as u64, off).await?.clone();
                let mut next_contiguous = 0;
                for &w in t.iter().step_by(step) {
                    let Some((host, len)) = host_range(w, g.cluster_bits) else {
                        continue;
                    };
                    if w & COMPRESSED == 0 && host % cs != 0 {
                        corrupt.push(format!("ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."));
                        continue;
                    }
                    inc(&mut refs, cs, "data cluster", host, len, &mut corrupt);
                    if active {
                        allocated += 1;
                        if w & COMPRESSED != 0 {
                            compressed += 1;
                            fragmented += 1;
                        } else {
                            fragmented +=
                                u64::from(next_contiguous != 0 && host != next_contiguous);
                            next_contiguous = host + cs;
                        }
                    }
                }
            }
        }
        // The refcount structure last, counted apart: a rebuild replaces it.
        let mut rc_refs = vec![0u64; n];
        let rt_len = (m.reftable.len() as u64 * 8).div_ceil(cs) * cs;
        let mut rc_corrupt = Vec::new();
        inc(
            &mut rc_refs,
            cs,
            "refcount table",
            m.reftable_offset,
            rt_len,
            &mut rc_corrupt,
        );
        for (i, &e) in m.reftable.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                rc_corrupt.push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            inc(&mut rc_refs, cs, "refcount block", off, cs, &mut rc_corrupt);
        }
        let rebuild = !rc_corrupt.is_empty();
        let rc_structs = rc_refs
            .iter()
            .enumerate()
            .flat_map(|(c, &k)| std::iter::repeat_n(c as u64, k as usize))
            .collect();
        Ok(Tally {
            refs,
            rc_structs,
            corrupt,
            rc_corrupt,
            rebuild,
            allocated,
            fragmented,
            compressed,
        })
    }

    /// The refcount of `c`, or `None` where its refcount block cannot be
    /// read (a damaged refcount table entry).
    async fn refcount_or_none(&self, m: &mut Meta, c: u64) -> Option<u64> {
        m.refcount(&self.g, c).await.ok()
    }

    pub(super) async fn do_check(&self) -> Result<CheckReport> {
        self.do_check_repair(&CheckOptions::new()).await
    }

    /// Checks, and repairs what `opts` allows.
    pub(super) async fn do_check_repair(&self, opts: &CheckOptions) -> Result<CheckReport> {
        let fix = opts.repair_leaks || opts.repair_errors;
        if fix {
            self.refuse_read_only("repair the image")?;
        }
        let g = &self.g;
        let cs = g.cs();
        let mut r = CheckReport::default();
        let mut m = self.meta.lock().await;
        if fix {
            // A repair rewrites tables and refcounts from what is on disk.
            m.write_back_l2(g).await?;
        }
        let mut t = self.tally(&mut m).await?;
        if fix {
            // What a dirty open repaired belongs to this repair's report.
            let done = self
                .dirty_repair
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(done) = done {
                r.repairs = done.repairs;
                r.leaks_fixed = done.leaks_fixed;
                r.corruptions_fixed = done.corruptions_fixed;
            }
        }
        let mut want = t.refs.clone();
        for &c in &t.rc_structs {
            want[c as usize] += 1;
        }
        // Compare, report only. Refcount mismatches go to `rc_corrupt`:
        // repairing the refcounts repairs them.
        let mut rc_corrupt = std::mem::take(&mut t.rc_corrupt);
        let mut mismatches = Vec::new();
        let rpb = g.rpb();
        let covered = m.reftable.len() as u64 * rpb;
        let mut c = 0u64;
        let mut scan_end = want.len() as u64;
        while c < scan_end.max(covered) {
            let w = want.get(c as usize).copied().unwrap_or(0);
            let ti = (c / rpb) as usize;
            if c >= want.len() as u64 && m.reftable.get(ti).is_none_or(|e| e & OFFSET_MASK == 0) {
                // Past the file, no refcount block: nothing counted there.
                c = (c / rpb + 1) * rpb;
                continue;
            }
            let Some(rc) = self.refcount_or_none(&mut m, c).await else {
                // A damaged refcount table entry, reported by `tally`.
                c = (c / rpb + 1) * rpb;
                continue;
            };
            if rc != w && c >= want.len() as u64 {
                // Refcounts beyond the file for clusters nobody references.
                scan_end = c + 1;
            }
            if rc == w {
                c += 1;
                continue;
            }
            if rc == 0 {
                t.rebuild = true;
            }
            if rc < w {
                rc_corrupt.push(format!("ERROR cluster {c} refcount={rc} reference={w}"));
            } else {
                r.leaks
                    .push(format!("Leaked cluster {c} refcount={rc} reference={w}"));
            }
            mismatches.push((c, rc, w));
            c += 1;
        }
        if fix {
            // What was found comes first in the repair log, as QEMU prints it.
            r.repairs
                .extend(t.corrupt.iter().chain(&rc_corrupt).chain(&r.leaks).cloned());
        }
        if fix && t.rebuild {
            if !opts.repair_errors {
                return Err(Error::corrupt(
                    &g.name,
                    "ERROR need to rebuild refcount structures (repair with -r all)",
                ));
            }
            r.repairs.push("Rebuilding refcount structure".into());
            self.rebuild_refcounts(&mut m, &t.refs).await?;
            r.leaks_fixed = r.leaks.len() as u64;
            r.corruptions_fixed = rc_corrupt.len() as u64;
            r.leaks.clear();
            rc_corrupt.clear();
        } else if fix {
            let max = super::entry::max_refcount(g.refcount_order);
            for (c, rc, w) in mismatches {
                let allowed = if rc > w {
                    opts.repair_leaks
                } else {
                    opts.repair_errors
                };
                if !allowed || w > max {
                    continue;
                }
                r.repairs
                    .push(format!("Repairing cluster {c} refcount={rc} reference={w}"));
                m.update_refcount(g, c, w as i64 - rc as i64).await?;
                if rc > w {
                    r.leaks_fixed += 1;
                    r.leaks
                        .retain(|l| !l.starts_with(&format!("Leaked cluster {c} ")));
                } else {
                    r.corruptions_fixed += 1;
                    rc_corrupt.retain(|l| !l.starts_with(&format!("ERROR cluster {c} ")));
                }
            }
            g.flush().await?;
        }
        t.corrupt.extend(rc_corrupt);
        self.check_copied(&mut m, opts, &mut r, &mut t.corrupt)
            .await?;
        let mut end = 0;
        let scan_end = scan_end.max(m.end_cluster);
        let mut c = 0;
        while c < scan_end {
            match self.refcount_or_none(&mut m, c).await {
                Some(0) => {}
                Some(_) => end = c + 1,
                None => c = (c / rpb + 1) * rpb - 1,
            }
            c += 1;
        }
        r.corruptions = t.corrupt;
        r.allocated_clusters = t.allocated;
        r.fragmented_clusters = t.fragmented;
        r.compressed_clusters = t.compressed;
        r.total_clusters = self.len().div_ceil(cs);
        r.image_end_offset = end * cs;
        Ok(r)
    }

    /// Checks the COPIED flags of the active tables against the refcounts
    /// and, with `-r all`, rewrites the wrong ones.
    async fn check_copied(
        &self,
        m: &mut Meta,
        opts: &CheckOptions,
        r: &mut CheckReport,
        corrupt: &mut Vec<String>,
    ) -> Result<()> {
        let g = &self.g;
        let cs = g.cs();
        let flen = g.file.len();
        let step = if g.extended_l2 { 2 } else { 1 };
        let mut wrong = 0;
        let mut note = |r: &mut CheckReport, text: String| {
            wrong += 1;
            if opts.repair_errors {
                r.repairs.push(format!("Repairing {text}"));
                r.corruptions_fixed += 1;
            } else {
                corrupt.push(format!("ERROR {text}"));
            }
        };
        for (l1i, e) in m.l1.clone().into_iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 || off % cs != 0 || off + cs > flen {
                continue;
            }
            let t = m.l2_table(g, l1i as u64, off).await?.clone();
            for &w in t.iter().step_by(step) {
                let host = w & OFFSET_MASK;
                if w & COMPRESSED != 0 || host == 0 || host % cs != 0 {
                    continue;
                }
                let Some(rc) = self.refcount_or_none(m, host / cs).await else {
                    continue;
                };
                if (w & COPIED != 0) != (rc == 1) {
                    note(
                        r,
                        format!("OFLAG_COPIED data cluster: l2_entry={w:x} refcount={rc}"),
                    );
                }
            }
            let Some(rc) = self.refcount_or_none(m, off / cs).await else {
                continue;
            };
            if (e & COPIED != 0) != (rc == 1) {
                note(
                    r,
                    format!("OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"),
                );
            }
        }
        if wrong > 0 && opts.repair_errors {
            self.fix_copied(m).await?;
        }
        Ok(())
    }
}

impl CheckReport {
    /// `qemu-img check --output=json`'s object for this report: QEMU's
    /// `ImageCheck`, where `check-errors` is always present and every
    /// other count only when nonzero, with the keys in the order QEMU
    /// prints them (its dictionary's hash order) and its 4-space
    /// indentation; no trailing newline.
    pub fn to_qemu_json(&self, filename: &str, format: &str) -> String {
        let n = |v: u64| (v != 0).then(|| v.to_string());
        let s = |v: &str| Some(serde_json::Value::from(v).to_string());
        let fields = [
            ("image-end-offset", n(self.image_end_offset)),
            ("compressed-clusters", n(self.compressed_clusters)),
            ("total-clusters", n(self.total_clusters)),
            ("corruptions", n(self.corruptions.len() as u64)),
            ("corruptions-fixed", n(self.corruptions_fixed)),
            ("check-errors", Some("0".to_string())),
            ("leaks", n(self.leaks.len() as u64)),
            ("leaks-fixed", n(self.leaks_fixed)),
            ("allocated-clusters", n(self.allocated_clusters)),
            ("filename", s(filename)),
            ("format", s(format)),
            ("fragmented-clusters", n(self.fragmented_clusters)),
        ];
        let body: Vec<String> = fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("    \"{k}\": {v}")))
            .collect();
        format!("{{\n{}\n}}", body.join(",\n"))
    }
}
