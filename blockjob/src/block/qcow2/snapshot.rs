//! Internal snapshots: the snapshot table (`docs/interop/qcow2.txt`,
//! "Snapshots"), and create / goto (revert) / delete on the refcounts.
//!
//! A snapshot is a copy of the active L1 table plus one more reference on
//! every L2 table and data cluster the active L1 reaches. The reference
//! count of a cluster is the number of L1 → L2 → data paths that reach it,
//! so a data cluster in an L2 table shared by two L1 tables has refcount 2
//! even though one L2 entry names it. The COPIED flag (bit 63) of an
//! active L1 or L2 entry says "refcount exactly 1": the write path writes
//! in place only then and copies otherwise (`write.rs`).
//!
//! Crash safety, without a journal: every operation raises refcounts
//! before anything points at the clusters, writes new tables to new
//! clusters, switches the header with one small write, and lowers
//! refcounts only after nothing points at the clusters any more. A crash
//! leaves leaked clusters and possibly stale COPIED flags (both repaired
//! by `qemu-img check -r all`, and the image is left dirty so QEMU does
//! that by itself), never a snapshot whose clusters the active layer
//! could overwrite in place.

use super::entry::{self, COPIED, OFFSET_MASK};
use super::header::{field, MAX_L1_SIZE};
use super::meta::{to_bytes, words, Deltas, Geom, Meta};
use super::Qcow2;
use crate::block::{BlockDriver as _, SnapshotCreateOptions, SnapshotInfo, SnapshotRef};
use crate::{Error, Result};

/// QEMU's limit on the number of snapshots.
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the size of the snapshot table.
const MAX_TABLE_SIZE: u64 = 64 << 20;
/// QEMU's limit on a snapshot entry's extra data.
const MAX_EXTRA: usize = 1024;
/// The fixed part of a table entry.
const ENTRY_HEAD: usize = 40;
/// Extra data we write: `vm_state_size_large`, `disk_size`, `icount`.
const OUR_EXTRA: usize = 24;

/// One entry of the snapshot table, kept byte-exact (unknown extra data
/// is preserved when the table is rewritten).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub(crate) l1_offset: u64,
    /// Entries in it.
    pub(crate) l1_size: u32,
    /// The id string (not NUL terminated on disk).
    pub(crate) id: Vec<u8>,
    /// The name.
    pub(crate) name: Vec<u8>,
    /// Creation time.
    pub(crate) date_sec: u32,
    /// Creation time, ns part.
    pub(crate) date_nsec: u32,
    /// Guest clock.
    pub(crate) vm_clock_nsec: u64,
    /// The 32-bit VM state size field.
    pub(crate) vm_state_size: u32,
    /// Extra data, as stored.
    pub(crate) extra: Vec<u8>,
}

fn be64(b: &[u8], off: usize) -> Option<u64> {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(off..off + 8)?);
    Some(u64::from_be_bytes(a))
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

impl Snapshot {
    /// The virtual disk size recorded in the extra data.
    pub(crate) fn disk_size(&self) -> Option<u64> {
        be64(&self.extra, 8)
    }

    /// What the list shows.
    pub(crate) fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: String::from_utf8_lossy(&self.id).into_owned(),
            name: String::from_utf8_lossy(&self.name).into_owned(),
            vm_state_size: be64(&self.extra, 0).unwrap_or(u64::from(self.vm_state_size)),
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: be64(&self.extra, 16).filter(|&i| i != u64::MAX),
            disk_size: self.disk_size(),
        }
    }

    /// The bytes of this entry, padded to 8.
    fn serialize_into(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.l1_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_state_size.to_be_bytes());
        b.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.extra);
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.name);
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
}

/// Why a table did not parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TableError {
    /// The buffer ends before the table: this many bytes are needed.
    Short(usize),
    /// The table is invalid.
    Corrupt(String),
}

/// Parses `nb` entries from `buf` (the bytes at `snapshots_offset`).
/// Returns the entries and the table's length in bytes.
pub(crate) fn parse_table(
    buf: &[u8],
    nb: u32,
    version: u32,
    cluster_bits: u32,
) -> std::result::Result<(Vec<Snapshot>, u64), TableError> {
    if nb > MAX_SNAPSHOTS {
        return Err(TableError::Corrupt(format!(
            "Too many snapshots ({nb}, at most {MAX_SNAPSHOTS})"
        )));
    }
    let mut out = Vec::with_capacity(nb.min(1024) as usize);
    let mut pos = 0usize;
    for i in 0..nb {
        let head = buf
            .get(pos..pos + ENTRY_HEAD)
            .ok_or(TableError::Short(pos + ENTRY_HEAD))?;
        let l1_offset = be64(head, 0).unwrap_or(0);
        let l1_size = be32(head, 8);
        let id_len = usize::from(u16::from_be_bytes([head[12], head[13]]));
        let name_len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        let extra_len = be32(head, 36) as usize;
        if extra_len > MAX_EXTRA {
            return Err(TableError::Corrupt(format!(
                "Too much extra metadata in snapshot table entry {i} ({extra_len} bytes)"
            )));
        }
        if version >= 3 && extra_len < 16 {
            return Err(TableError::Corrupt(format!(
                "Snapshot table entry {i} is incomplete: {extra_len} bytes of extra data, version 3 needs 16"
            )));
        }
        if l1_offset % (1u64 << cluster_bits) != 0 {
            return Err(TableError::Corrupt(format!(
                "Snapshot L1 table offset invalid (entry {i}: {l1_offset:#x})"
            )));
        }
        if u64::from(l1_size) > MAX_L1_SIZE / 8 {
            return Err(TableError::Corrupt(format!(
                "Snapshot L1 table too large (entry {i}: {l1_size} entries)"
            )));
        }
        let body = pos + ENTRY_HEAD;
        let end = body + extra_len + id_len + name_len;
        let rest = buf.get(body..end).ok_or(TableError::Short(end))?;
        let (extra, rest) = rest.split_at(extra_len);
        let (id, name) = rest.split_at(id_len);
        if id.is_empty() {
            return Err(TableError::Corrupt(format!(
                "Snapshot table entry {i} has an empty id"
            )));
        }
        out.push(Snapshot {
            l1_offset,
            l1_size,
            id: id.to_vec(),
            name: name.to_vec(),
            date_sec: be32(head, 16),
            date_nsec: be32(head, 20),
            vm_clock_nsec: be64(head, 24).unwrap_or(0),
            vm_state_size: be32(head, 32),
            extra: extra.to_vec(),
        });
        pos = end.div_ceil(8) * 8;
        if pos as u64 > MAX_TABLE_SIZE {
            return Err(TableError::Corrupt("Snapshot table too large".into()));
        }
    }
    Ok((out, pos as u64))
}

/// The table's bytes.
pub(crate) fn serialize_table(list: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in list {
        s.serialize_into(&mut b);
    }
    b
}

/// Reads and parses the table of an image being opened.
pub(crate) async fn load(g: &Geom, nb: u32, offset: u64) -> Result<(Vec<Snapshot>, u64)> {
    if nb == 0 {
        return Ok((Vec::new(), 0));
    }
    let flen = g.file.len();
    let mut want = (g.cs() as usize).max(64 << 10);
    loop {
        let avail = flen.saturating_sub(offset).min(MAX_TABLE_SIZE) as usize;
        let buf = g.read_file(offset, want.min(avail) as u64).await?;
        match parse_table(&buf, nb, g.version, g.cluster_bits) {
            Ok((list, len)) => return Ok((list, len)),
            Err(TableError::Corrupt(r)) => return Err(Error::corrupt(&g.name, r)),
            Err(TableError::Short(n)) if n <= avail && n > buf.len() => {
                want = n.max(want * 2);
            }
            Err(TableError::Short(n)) => {
                return Err(Error::corrupt(
                    &g.name,
                    format!("the snapshot table at {offset:#x} needs {n} bytes and runs past the end of the file"),
                ))
            }
        }
    }
}

/// QEMU's `find_new_snapshot_id`: one more than the largest numeric id.
fn next_id(list: &[Snapshot]) -> String {
    let max = list
        .iter()
        .filter_map(|s| std::str::from_utf8(&s.id).ok()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // QEMU takes the time in microseconds.
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

impl Qcow2 {
    /// Adds `d` to `out` for every L2 table and data cluster `l1` reaches
    /// (once per path).
    async fn add_refs(&self, m: &mut Meta, l1: &[u64], d: i64, out: &mut Deltas) -> Result<()> {
        let g = &self.g;
        let step = if g.extended_l2 { 2 } else { 1 };
        for (l1i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            *out.entry(off >> g.cluster_bits).or_default() += d;
            let t = m.l2_table(g, l1i as u64, off).await?;
            for &w in t.iter().step_by(step) {
                for c in entry::host_clusters(w, g.cluster_bits) {
                    *out.entry(c).or_default() += d;
                }
            }
        }
        Ok(())
    }

    /// Sets COPIED on the active L1 and L2 entries whose cluster has
    /// refcount 1 and clears it on the others (QEMU's
    /// `qcow2_update_snapshot_refcount(.., 0)`). L2 tables first, then
    /// the L1 entries.
    pub(super) async fn fix_copied(&self, m: &mut Meta) -> Result<()> {
        let g = &self.g;
        let step = if g.extended_l2 { 2 } else { 1 };
        let l1 = m.l1.clone();
        let mut l1_changes = Vec::new();
        for (l1i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let mut t = m.l2_table(g, l1i as u64, off).await?.clone();
            let mut changed = false;
            for i in (0..t.len()).step_by(step) {
                let w = t[i];
                let host = w & OFFSET_MASK;
                if w & entry::COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let rc = m.refcount(g, host >> g.cluster_bits).await?;
                let want = if rc == 1 { w | COPIED } else { w & !COPIED };
                changed |= want != w;
                t[i] = want;
            }
            if changed {
                g.write_file(off, to_bytes(&t)).await?;
                m.cache_l2(g, off, t).await?;
            }
            let rc = m.refcount(g, off >> g.cluster_bits).await?;
            let want = if rc == 1 { e | COPIED } else { e & !COPIED };
            if want != e {
                l1_changes.push((l1i as u64, want));
            }
        }
        if !l1_changes.is_empty() {
            g.flush().await?;
            for (i, v) in l1_changes {
                m.set_l1(g, i, v).await?;
            }
        }
        g.flush().await
    }

    /// Writes `l1` (COPIED cleared, padded with zeroes to `len` entries)
    /// to newly allocated clusters; returns their offset (0 if empty).
    async fn write_l1_copy(&self, m: &mut Meta, l1: &[u64], len: usize) -> Result<u64> {
        let g = &self.g;
        if len == 0 {
            return Ok(0);
        }
        let clusters = (len as u64 * 8).div_ceil(g.cs());
        let off = m.alloc(g, clusters).await?;
        let mut t: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
        t.resize(len, 0);
        let mut bytes = to_bytes(&t);
        bytes.resize((clusters * g.cs()) as usize, 0);
        g.write_file(off, bytes).await?;
        Ok(off)
    }

    /// Reads a snapshot's L1 table, checking that it lies in the file.
    async fn snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        let g = &self.g;
        let len = u64::from(s.l1_size) * 8;
        if s.l1_offset
            .checked_add(len)
            .is_none_or(|e| e > g.file.len())
        {
            return Err(Error::corrupt(
                &g.name,
                format!(
                    "the L1 table of snapshot '{}' at {:#x} is past the end of the file",
                    String::from_utf8_lossy(&s.id),
                    s.l1_offset
                ),
            ));
        }
        Ok(words(&g.read_file(s.l1_offset, len).await?))
    }

    /// Writes `list` as the new snapshot table: new clusters, flush, one
    /// header write (count and offset together), flush, then the old
    /// table's clusters are freed.
    async fn write_table(&self, m: &mut Meta, list: Vec<Snapshot>) -> Result<()> {
        let g = &self.g;
        let cs = g.cs();
        let bytes = serialize_table(&list);
        let off = if list.is_empty() {
            0
        } else {
            let off = m.alloc_write(g, &bytes).await?;
            g.flush().await?;
            off
        };
        let mut hdr = (list.len() as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&off.to_be_bytes());
        g.write_file(field::SNAPSHOTS, hdr).await?;
        g.flush().await?;
        let (old_off, old_len) = m.snapshots_at;
        m.snapshots_at = (off, bytes.len() as u64);
        {
            let mut h = self.header();
            h.nb_snapshots = list.len() as u32;
            h.snapshots_offset = off;
        }
        m.snapshots = list;
        if old_off != 0 && old_len != 0 {
            m.free(g, old_off, old_len.div_ceil(cs)).await?;
        }
        Ok(())
    }

    fn find(&self, m: &Meta, which: &SnapshotRef) -> Result<usize> {
        let infos: Vec<SnapshotInfo> = m.snapshots.iter().map(Snapshot::info).collect();
        which
            .find(&infos)
            .and_then(|f| infos.iter().position(|i| std::ptr::eq(i, f)))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{}: there is no snapshot {which}", self.g.name))
            })
    }

    pub(super) async fn do_snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        let m = self.meta.lock().await;
        Ok(m.snapshots.iter().map(Snapshot::info).collect())
    }

    pub(super) async fn do_snapshot_create(
        &self,
        opts: &SnapshotCreateOptions,
    ) -> Result<SnapshotInfo> {
        let g = &self.g;
        self.refuse_read_only("change snapshots")?;
        if opts.name.is_empty() {
            return Err(Error::InvalidArgument("Name is empty".into()));
        }
        if opts.name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument(
                "the snapshot name is longer than 65535 bytes".into(),
            ));
        }
        let mut m = self.meta.lock().await;
        // The snapshot shares the active tables as they are on disk.
        m.write_back_l2(g).await?;
        if m.snapshots.iter().any(|s| s.name == opts.name.as_bytes()) {
            return Err(Error::InvalidArgument(format!(
                "{}: a snapshot named '{}' already exists",
                g.name, opts.name
            )));
        }
        if m.snapshots.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Error::unsupported(&g.name, "Too many snapshots"));
        }
        // Data writes in place that looked up their cluster before the
        // lock was taken must land before the refcounts say "shared".
        self.in_flight.drain().await;
        let l1 = m.l1.clone();
        let mut d = Deltas::new();
        self.add_refs(&mut m, &l1, 1, &mut d).await?;
        m.check_deltas(g, &d).await?;
        let l1_offset = self.write_l1_copy(&mut m, &l1, l1.len()).await?;
        m.apply_deltas(g, &d).await?;
        g.flush().await?;
        self.fix_copied(&mut m).await?;
        let (date_sec, date_nsec) = opts.date.unwrap_or_else(now);
        let mut extra = vec![0u8; OUR_EXTRA];
        extra[8..16].copy_from_slice(&self.len().to_be_bytes());
        extra[16..24].copy_from_slice(&opts.icount.unwrap_or(u64::MAX).to_be_bytes());
        let sn = Snapshot {
            l1_offset,
            l1_size: l1.len() as u32,
            id: next_id(&m.snapshots).into_bytes(),
            name: opts.name.as_bytes().to_vec(),
            date_sec,
            date_nsec,
            vm_clock_nsec: opts.vm_clock_nsec,
            vm_state_size: 0,
            extra,
        };
        let info = sn.info();
        let mut list = m.snapshots.clone();
        list.push(sn);
        self.write_table(&mut m, list).await?;
        Ok(info)
    }

    pub(super) async fn do_snapshot_goto(&self, which: &SnapshotRef) -> Result<SnapshotInfo> {
        let g = &self.g;
        self.refuse_read_only("change snapshots")?;
        let mut m = self.meta.lock().await;
        // Tables this frees or shares are written, never left dirty.
        m.write_back_l2(g).await?;
        let sn = m.snapshots[self.find(&m, which)?].clone();
        let sn_l1 = self.snapshot_l1(&sn).await?;
        let size = sn.disk_size().unwrap_or_else(|| self.len());
        let need = size.div_ceil(g.l2_entries() * g.cs());
        if (sn_l1.len() as u64) < need {
            return Err(Error::corrupt(
                &g.name,
                format!(
                    "snapshot '{}' has {} L1 entries, too few for its size {size}",
                    String::from_utf8_lossy(&sn.id),
                    sn_l1.len()
                ),
            ));
        }
        self.in_flight.drain().await;
        let mut inc = Deltas::new();
        self.add_refs(&mut m, &sn_l1, 1, &mut inc).await?;
        m.check_deltas(g, &inc).await?;
        let old_l1 = m.l1.clone();
        let len = old_l1.len().max(sn_l1.len());
        let off = self.write_l1_copy(&mut m, &sn_l1, len).await?;
        m.apply_deltas(g, &inc).await?;
        g.flush().await?;
        // size, crypt_method, l1_size, l1_table_offset: one write.
        let crypt = self.header().crypt_method;
        let mut hdr = size.to_be_bytes().to_vec();
        hdr.extend_from_slice(&crypt.to_be_bytes());
        hdr.extend_from_slice(&(len as u32).to_be_bytes());
        hdr.extend_from_slice(&off.to_be_bytes());
        g.write_file(field::SIZE, hdr).await?;
        g.flush().await?;
        let old_off = m.l1_offset;
        m.l1 = sn_l1.iter().map(|e| e & !COPIED).collect();
        m.l1.resize(len, 0);
        m.l1_offset = off;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        {
            let mut h = self.header();
            h.size = size;
            h.l1_size = len as u32;
            h.l1_table_offset = off;
        }
        let mut dec = Deltas::new();
        self.add_refs(&mut m, &old_l1, -1, &mut dec).await?;
        m.check_deltas(g, &dec).await?;
        m.apply_deltas(g, &dec).await?;
        if old_off != 0 && !old_l1.is_empty() {
            m.free(g, old_off, (old_l1.len() as u64 * 8).div_ceil(g.cs()))
                .await?;
        }
        self.fix_copied(&mut m).await?;
        Ok(sn.info())
    }

    pub(super) async fn do_snapshot_delete(&self, which: &SnapshotRef) -> Result<SnapshotInfo> {
        let g = &self.g;
        self.refuse_read_only("change snapshots")?;
        let mut m = self.meta.lock().await;
        m.write_back_l2(g).await?;
        let i = self.find(&m, which)?;
        let sn = m.snapshots[i].clone();
        let sn_l1 = self.snapshot_l1(&sn).await?;
        let mut dec = Deltas::new();
        self.add_refs(&mut m, &sn_l1, -1, &mut dec).await?;
        m.check_deltas(g, &dec).await?;
        let mut list = m.snapshots.clone();
        list.remove(i);
        self.write_table(&mut m, list).await?;
        m.apply_deltas(g, &dec).await?;
        if sn.l1_offset != 0 && sn.l1_size != 0 {
            m.free(
                g,
                sn.l1_offset,
                (u64::from(sn.l1_size) * 8).div_ceil(g.cs()),
            )
            .await?;
        }
        self.fix_copied(&mut m).await?;
        Ok(sn.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap(id: &str, name: &str, extra: usize) -> Snapshot {
        Snapshot {
            l1_offset: 0x30000,
            l1_size: 1,
            id: id.as_bytes().to_vec(),
            name: name.as_bytes().to_vec(),
            date_sec: 1_700_000_000,
            date_nsec: 5000,
            vm_clock_nsec: 3_000_000_001,
            vm_state_size: 0,
            extra: vec![0; extra],
        }
    }

    #[test]
    fn parse_when_qemu_layout_then_fields_and_padding() {
        let list = vec![snap("1", "snap1", 24), snap("12", "a longer name", 16)];
        let b = serialize_table(&list);
        // 40 + 24 + 1 + 5 = 70 → 72; 40 + 16 + 2 + 13 = 71 → 72.
        assert_eq!(b.len(), 144);
        let (got, len) = parse_table(&b, 2, 3, 16).unwrap();
        assert_eq!(got, list);
        assert_eq!(len, 144);
        assert_eq!(got[0].info().icount, Some(0));
        assert_eq!(got[1].info().icount, None);
    }

    #[test]
    fn parse_when_truncated_then_short_with_needed_length() {
        let b = serialize_table(&[snap("1", "x", 24)]);
        assert_eq!(parse_table(&b[..30], 1, 3, 16), Err(TableError::Short(40)));
        assert_eq!(parse_table(&b[..60], 1, 3, 16), Err(TableError::Short(66)));
    }

    #[test]
    fn parse_when_bad_entries_then_corrupt() {
        let bad = |s: Snapshot, version| {
            let b = serialize_table(&[s]);
            match parse_table(&b, 1, version, 16) {
                Err(TableError::Corrupt(r)) => r,
                r => panic!("expected corrupt, got {r:?}"),
            }
        };
        assert!(bad(snap("1", "x", 8), 3).contains("incomplete"));
        assert!(bad(snap("1", "x", 1025), 2).contains("Too much extra"));
        assert!(bad(snap("", "x", 24), 3).contains("empty id"));
        let mut s = snap("1", "x", 24);
        s.l1_offset = 0x30001;
        assert!(bad(s, 3).contains("L1 table offset invalid"));
        let mut s = snap("1", "x", 24);
        s.l1_size = u32::MAX;
        assert!(bad(s, 3).contains("L1 table too large"));
        assert!(matches!(
            parse_table(&[], MAX_SNAPSHOTS + 1, 3, 16),
            Err(TableError::Corrupt(_))
        ));
    }

    #[test]
    fn next_id_when_gaps_and_names_then_max_plus_one() {
        assert_eq!(next_id(&[]), "1");
        let l = [snap("3", "a", 24), snap("x", "b", 24), snap("1", "c", 24)];
        assert_eq!(next_id(&l), "4");
    }

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        (
            (0u64..1 << 20).prop_map(|c| c << 16),
            0u32..1 << 16,
            "[0-9]{1,4}",
            ".{0,40}",
            any::<(u32, u32, u64, u32)>(),
            proptest::collection::vec(any::<u8>(), 16..64),
        )
            .prop_map(|(l1_offset, l1_size, id, name, t, extra)| Snapshot {
                l1_offset,
                l1_size,
                id: id.into_bytes(),
                name: name.into_bytes(),
                date_sec: t.0,
                date_nsec: t.1,
                vm_clock_nsec: t.2,
                vm_state_size: t.3,
                extra,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn table_round_trips(list in proptest::collection::vec(arb_snapshot(), 0..8)) {
            let b = serialize_table(&list);
            let (got, len) = parse_table(&b, list.len() as u32, 3, 16).unwrap();
            prop_assert_eq!(got, list);
            prop_assert_eq!(len, b.len() as u64);
            prop_assert_eq!(len % 8, 0);
        }

        #[test]
        fn mutated_tables_never_panic(
            list in proptest::collection::vec(arb_snapshot(), 1..4),
            muts in proptest::collection::vec((0usize..512, any::<u8>()), 1..12),
            cut in 0usize..600,
            nb in 0u32..6,
            version in 2u32..=3,
        ) {
            let mut b = serialize_table(&list);
            for (i, v) in muts {
                if i < b.len() { b[i] = v; }
            }
            b.truncate(cut);
            match parse_table(&b, nb, version, 16) {
                Ok((got, len)) => {
                    prop_assert_eq!(got.len(), nb as usize);
                    prop_assert!(len as usize <= b.len() + 7);
                }
                Err(TableError::Short(n)) => prop_assert!(n > b.len()),
                Err(TableError::Corrupt(_)) => {}
            }
        }
    }
}
