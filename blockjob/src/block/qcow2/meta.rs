//! qcow2 metadata in memory: the L1 table, an L2 table cache, the
//! refcount table and a refcount block cache; mapping lookups, cluster
//! allocation and refcount updates.
//!
//! The refcount block cache is write-through: a change is written when it
//! is made. The L2 cache is write-back, like QEMU's: a changed entry is
//! written when the image is flushed or closed, when its table leaves the
//! cache, or when a request must have it on disk (before an L1 entry names
//! a new table, before a cluster it no longer names is freed). Writes are
//! whole 4 KiB pieces of a table. Ordering keeps a crash harmless (at worst
//! leaked clusters): refcounts and data → (flush) → L2 → (flush) → L1 and
//! frees; a write-back flushes first when an entry changed since the
//! last one (QEMU's L2-depends-on-refcount-cache ordering, which also
//! keeps an entry from reaching the disk before its data).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::cache::Lru;
use super::entry::{self, L2Entry, Mapping, COPIED, OFFSET_MASK};
use super::header::field;
use crate::block::{BlockNode, Buffer};
use crate::{Error, Result};

/// The immutable geometry of an open image and its file child.
pub(crate) struct Geom {
    pub(crate) name: String,
    pub(crate) file: Arc<BlockNode>,
    pub(crate) cluster_bits: u32,
    pub(crate) extended_l2: bool,
    pub(crate) refcount_order: u32,
    pub(crate) version: u32,
}

impl Geom {
    pub(crate) fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub(crate) fn l2_entries(&self) -> u64 {
        self.cs() / if self.extended_l2 { 16 } else { 8 }
    }
    pub(crate) fn sc_size(&self) -> u64 {
        if self.extended_l2 {
            self.cs() / 32
        } else {
            self.cs()
        }
    }
    /// Refcount entries per refcount block.
    pub(crate) fn rpb(&self) -> u64 {
        (self.cs() * 8) >> self.refcount_order
    }
    fn corrupt(&self, reason: String) -> Error {
        Error::corrupt(&self.name, reason)
    }
    pub(crate) async fn read_file(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read_file_into(offset, Buffer::zeroed(len as usize))
            .await
            .map(Buffer::into_vec)
    }
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub(crate) async fn read_file_into(&self, offset: u64, mut buf: Buffer) -> Result<Buffer> {
        let len = buf.len() as u64;
        let flen = self.file.len();
        if offset.checked_add(len).is_none_or(|e| e > flen) {
            // Reads past the end read zeroes, as in QEMU.
            buf.fill(0);
            if offset < flen {
                let n = (flen - offset) as usize;
                let head = self.file.read(offset, vec![0; n]).await?;
                buf[..n].copy_from_slice(&head);
            }
            return Ok(buf);
        }
        self.file.read(offset, buf).await
    }
    pub(crate) async fn write_file(&self, offset: u64, buf: impl Into<Buffer>) -> Result<()> {
        self.file.write(offset, buf).await
    }
    pub(crate) async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }
}

pub(crate) fn words(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// The unit L2 tables are written in: a common file system block.
pub(crate) const ENTRY_BLOCK: u64 = 4096;

/// How many [`ENTRY_BLOCK`] pieces an L2 table has (1 for clusters
/// smaller than a piece).
fn l2_pieces(g: &Geom) -> u64 {
    (g.cs() / ENTRY_BLOCK).max(1)
}

pub(crate) fn to_bytes(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// Entry `l2i` of an L2 table (of extended entries when `ext`).
fn entry_at(t: &[u64], l2i: usize, ext: bool) -> L2Entry {
    if ext {
        L2Entry {
            word: t[2 * l2i],
            bitmap: Some(t[2 * l2i + 1]),
        }
    } else {
        L2Entry {
            word: t[l2i],
            bitmap: None,
        }
    }
}

/// The mutable metadata, behind the driver's `CoMutex`.
pub(crate) struct Meta {
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_offset: u64,
    l2_cache: Lru<Vec<u64>>,
    /// Cached L2 tables changed since they were last written: table
    /// offset → which of its [`ENTRY_BLOCK`] pieces changed. A dirty table
    /// is always in `l2_cache` (eviction writes it first).
    l2_dirty: BTreeMap<u64, Vec<bool>>,
    /// An L2 entry changed since the last write-back's flush: the data and
    /// refcounts it depends on may not be durable, so flush before
    /// writing any L2 piece.
    l2_flush_first: bool,
    pub(crate) reftable: Vec<u64>,
    pub(crate) reftable_offset: u64,
    rb_cache: Lru<Vec<u8>>,
    free_hint: u64,
    /// Clusters allocated ahead for whole-cluster data writes (first
    /// cluster, count): refcount 1 on disk, named by no table (a crash
    /// leaks them, nothing worse). See `reserve`.
    pub(super) data_reserve: (u64, u64),
    /// One past the highest cluster that may be in use.
    pub(crate) end_cluster: u64,
    /// The internal snapshots, in table order.
    pub(crate) snapshots: Vec<super::snapshot::Snapshot>,
    /// Where the snapshot table is (0: none) and its length in bytes.
    pub(crate) snapshots_at: (u64, u64),
    /// The persistent bitmaps' directory, as on disk.
    pub(crate) bitmap_dir: Vec<super::bitmaps::DirEntry>,
    /// Where the bitmap directory is (0: none) and its length in bytes.
    pub(crate) bitmaps_at: (u64, u64),
}

/// Reference count changes by host cluster index, applied in order.
pub(crate) type Deltas = std::collections::BTreeMap<u64, i64>;

/// A mapping lookup's answer for a run of bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    /// How the run reads; for `Data`, `host` is the first byte's offset.
    pub(crate) map: Mapping,
    /// Bytes in the run.
    pub(crate) len: u64,
    /// The raw L2 entry of the run's first cluster.
    pub(crate) entry: L2Entry,
}

impl Meta {
    /// Loads the L1 and refcount tables.
    pub(crate) async fn load(
        g: &Geom,
        l1_offset: u64,
        l1_size: u32,
        reftable_offset: u64,
        reftable_clusters: u32,
        l2_cache_size: Option<u64>,
    ) -> Result<Meta> {
        let l1 = words(&g.read_file(l1_offset, u64::from(l1_size) * 8).await?);
        let reftable = words(
            &g.read_file(reftable_offset, u64::from(reftable_clusters) * g.cs())
                .await?,
        );
        let l2_cap = ((8u64 << 20) / g.cs()).clamp(4, 256) as usize;
        // QEMU's `l2-cache-size`: bytes of tables, at least two.
        let l2_tables = match l2_cache_size {
            Some(b) => (b / g.cs()).clamp(2, 1 << 16) as usize,
            None => l2_cap,
        };
        Ok(Meta {
            l1,
            l1_offset,
            l2_cache: Lru::new(l2_tables),
            l2_dirty: BTreeMap::new(),
            l2_flush_first: false,
            reftable,
            reftable_offset,
            rb_cache: Lru::new(l2_cap),
            free_hint: 0,
            data_reserve: (0, 0),
            end_cluster: g.file.len().div_ceil(g.cs()),
            snapshots: Vec::new(),
            snapshots_at: (0, 0),
            bitmap_dir: Vec::new(),
            bitmaps_at: (0, 0),
        })
    }

    /// The L2 table at `l2_offset` (for L1 index `l1i`), from the cache
    /// or the file. Offsets are validated first.
    pub(crate) async fn l2_table(
        &mut self,
        g: &Geom,
        l1i: u64,
        l2_offset: u64,
    ) -> Result<&mut Vec<u64>> {
        if self.l2_cache.get(l2_offset).is_none() {
            if l2_offset % g.cs() != 0 {
                return Err(g.corrupt(format!(
                    "L2 table offset {l2_offset:#x} unaligned (L1 index: {l1i:#x})"
                )));
            }
            if l2_offset + g.cs() > g.file.len() {
                return Err(g.corrupt(format!(
                    "L2 table offset {l2_offset:#x} (L1 index: {l1i:#x}) is past the end of the file"
                )));
            }
            let t = words(&g.file.read(l2_offset, vec![0; g.cs() as usize]).await?);
            self.insert_l2(g, l2_offset, t).await?;
        }
        match self.l2_cache.get(l2_offset) {
            Some(t) => Ok(t),
            None => Err(g.corrupt("L2 cache lost a table".into())),
        }
    }

    /// Puts an L2 table just written whole into the cache (clean).
    pub(crate) async fn cache_l2(&mut self, g: &Geom, l2_offset: u64, t: Vec<u64>) -> Result<()> {
        self.l2_dirty.remove(&l2_offset);
        self.insert_l2(g, l2_offset, t).await
    }

    /// Puts a table not on disk yet (new, or a copy) into the cache, all
    /// of it dirty.
    pub(crate) async fn cache_new_l2(
        &mut self,
        g: &Geom,
        l2_offset: u64,
        t: Vec<u64>,
    ) -> Result<()> {
        self.insert_l2(g, l2_offset, t).await?;
        self.l2_dirty
            .insert(l2_offset, vec![true; l2_pieces(g) as usize]);
        self.l2_flush_first = true;
        Ok(())
    }

    /// Inserts a table into the cache, first writing the one it evicts
    /// if that is dirty (on failure nothing is evicted).
    async fn insert_l2(&mut self, g: &Geom, l2_offset: u64, t: Vec<u64>) -> Result<()> {
        if let Some(victim) = self.l2_cache.victim(l2_offset) {
            if self.l2_dirty.contains_key(&victim) {
                self.write_back_l2_table(g, victim).await?;
            }
        }
        self.l2_cache.insert(l2_offset, t);
        Ok(())
    }

    /// Records that word `word` of cached table `l2_offset` changed. The
    /// data and refcounts the new entry depends on are written (not
    /// necessarily flushed) by now: the next write-back flushes first.
    pub(crate) fn mark_l2_dirty(&mut self, g: &Geom, l2_offset: u64, word: u64) {
        let pieces = l2_pieces(g);
        let p = word / (g.cs() / 8 / pieces);
        let dirty = self
            .l2_dirty
            .entry(l2_offset)
            .or_insert_with(|| vec![false; pieces as usize]);
        if let Some(d) = dirty.get_mut(p as usize) {
            *d = true;
        }
        self.l2_flush_first = true;
    }

    /// Writes every changed L2 piece (after a flush when needed). The
    /// writes are not flushed; a table whose write fails stays dirty.
    pub(crate) async fn write_back_l2(&mut self, g: &Geom) -> Result<()> {
        while let Some(&off) = self.l2_dirty.keys().next() {
            self.write_back_l2_table(g, off).await?;
        }
        Ok(())
    }

    /// Writes the changed pieces of table `off`: runs of dirty pieces
    /// (with at most one clean piece between two dirty ones) in one write
    /// each. On an `O_DIRECT` file a write smaller than the file system
    /// block costs a read first and, on ext4, waits for every write in
    /// flight to the file; whole pieces do not.
    async fn write_back_l2_table(&mut self, g: &Geom, off: u64) -> Result<()> {
        let Some(dirty) = self.l2_dirty.get(&off).cloned() else {
            return Ok(());
        };
        if self.l2_flush_first {
            g.flush().await?;
            self.l2_flush_first = false;
        }
        let pieces = dirty.len();
        let piece_words = (g.cs() / 8) as usize / pieces;
        let mut p = 0;
        while p < pieces {
            if !dirty[p] {
                p += 1;
                continue;
            }
            let first = p;
            let mut end = p + 1;
            while end < pieces && (dirty[end] || (end + 1 < pieces && dirty[end + 1])) {
                end += 1;
            }
            let bytes = match self.l2_cache.peek(off) {
                Some(t) => to_bytes(&t[first * piece_words..end * piece_words]),
                None => return Err(g.corrupt(format!("dirty L2 table {off:#x} left the cache"))),
            };
            g.write_file(off + (first * piece_words * 8) as u64, bytes)
                .await?;
            p = end;
        }
        self.l2_dirty.remove(&off);
        Ok(())
    }

    /// Forgets cached L2 tables among clusters `c0..c0 + n` whose refcount
    /// is now 0: their clusters may be reused, and a late write of a dirty
    /// one would land on whatever took them.
    async fn forget_freed_l2(&mut self, g: &Geom, c0: u64, n: u64) -> Result<()> {
        for c in c0..c0 + n {
            let off = c * g.cs();
            if (self.l2_cache.contains(off) || self.l2_dirty.contains_key(&off))
                && self.refcount(g, c).await? == 0
            {
                self.forget_l2(off);
            }
        }
        Ok(())
    }

    /// Drops the table at `off` from the cache, changes and all.
    fn forget_l2(&mut self, off: u64) {
        self.l2_cache.remove(off);
        self.l2_dirty.remove(&off);
    }

    /// The L2 entry for guest cluster `ci`, with its L2 table offset (0 if
    /// the L1 entry is empty).
    pub(crate) async fn l2_entry(&mut self, g: &Geom, ci: u64) -> Result<(L2Entry, u64)> {
        let l1i = ci / g.l2_entries();
        let l2i = ci % g.l2_entries();
        let l2_off = self.l1.get(l1i as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            let e = L2Entry {
                word: 0,
                bitmap: g.extended_l2.then_some(0),
            };
            return Ok((e, 0));
        }
        let ext = g.extended_l2;
        // A cached table is read without building `l2_table`'s future
        // (the common case on the request path). The miss path is boxed:
        // inline, its future (a read, maybe an eviction's write-back)
        // would make every request's future bigger.
        let e = match self.l2_cache.get(l2_off) {
            Some(t) => entry_at(t, l2i as usize, ext),
            None => entry_at(
                Box::pin(self.l2_table(g, l1i, l2_off)).await?,
                l2i as usize,
                ext,
            ),
        };
        Ok((e, l2_off))
    }

    /// How `offset` maps, and for how many bytes (≤ `max`) the mapping
    /// continues the same way (same kind, contiguous host offsets).
    pub(crate) async fn lookup(&mut self, g: &Geom, offset: u64, max: u64) -> Result<Run> {
        let cs = g.cs();
        let sc_size = g.sc_size();
        let ci = offset >> g.cluster_bits;
        let (entry, l2_off) = self.l2_entry(g, ci).await?;
        let first = self.decode(g, &entry, offset, l2_off, ci)?;
        let in_sc = offset % sc_size;
        let mut len = (sc_size - in_sc).min(max);
        let mut pos = offset - in_sc + sc_size;
        let l2_span_end = (ci / g.l2_entries() + 1) * g.l2_entries() * cs;
        if l2_off == 0 {
            // The whole L2 range is unallocated.
            len = (l2_span_end - offset).min(max);
            return Ok(Run {
                map: Mapping::Unallocated,
                len,
                entry,
            });
        }
        let map = match first {
            Mapping::Data { host } => Mapping::Data { host: host + in_sc },
            m => m,
        };
        if matches!(map, Mapping::Compressed { .. }) {
            let len = (cs - offset % cs).min(max);
            return Ok(Run { map, len, entry });
        }
        while len < max && pos < l2_span_end {
            let pci = pos >> g.cluster_bits;
            let e = if pci == ci {
                entry
            } else {
                self.l2_entry(g, pci).await?.0
            };
            let m = self.decode(g, &e, pos, l2_off, pci)?;
            let same = match (map, m) {
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                (Mapping::Data { host: h0 }, Mapping::Data { host: h }) => h == h0 + (pos - offset),
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + sc_size).min(max);
            pos += sc_size;
        }
        Ok(Run { map, len, entry })
    }

    fn decode(&self, g: &Geom, e: &L2Entry, offset: u64, l2_off: u64, ci: u64) -> Result<Mapping> {
        let sc = (offset % g.cs()) / g.sc_size();
        let m = e
            .mapping(g.cluster_bits, sc, g.sc_size())
            .map_err(|r| g.corrupt(r))?;
        let l2i = ci % g.l2_entries();
        match m {
            Mapping::Data { host } | Mapping::Zero { host: Some(host) } => {
                let hc = host - host % g.cs();
                if e.host() % g.cs() != 0 {
                    return Err(g.corrupt(format!(
                        "Cluster allocation offset {:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {l2i:#x})",
                        e.host()
                    )));
                }
                if hc >= g.file.len() {
                    return Err(g.corrupt(format!(
                        "L2 entry {l2i:#x} in L2 table {l2_off:#x} points to {:#x}, past the end of the file",
                        e.host()
                    )));
                }
            }
            Mapping::Compressed { host, .. } if host >= g.file.len() => {
                return Err(g.corrupt(format!(
                    "compressed cluster at {host:#x} (L2 table {l2_off:#x}, index {l2i:#x}) is past the end of the file"
                )));
            }
            _ => {}
        }
        Ok(m)
    }

    // ---- refcounts ----

    async fn refblock(&mut self, g: &Geom, block_off: u64) -> Result<&mut Vec<u8>> {
        if self.rb_cache.get(block_off).is_none() {
            if block_off % g.cs() != 0 || block_off + g.cs() > g.file.len() {
                return Err(g.corrupt(format!(
                    "refcount block offset {block_off:#x} is unaligned or past the end of the file"
                )));
            }
            let b = g.file.read(block_off, vec![0; g.cs() as usize]).await?;
            self.rb_cache.insert(block_off, b.into_vec());
        }
        match self.rb_cache.get(block_off) {
            Some(b) => Ok(b),
            None => Err(g.corrupt("refcount cache lost a block".into())),
        }
    }

    /// The refcount of host cluster `c`.
    pub(crate) async fn refcount(&mut self, g: &Geom, c: u64) -> Result<u64> {
        let t = (c / g.rpb()) as usize;
        let off = self.reftable.get(t).copied().unwrap_or(0) & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = g.refcount_order;
        let rpb = g.rpb();
        let b = self.refblock(g, off).await?;
        Ok(entry::get_refcount(b, order, c % rpb))
    }

    /// Sets the refcount of cluster `c`, whose refcount block must exist,
    /// and writes the changed bytes.
    async fn put_refcount(&mut self, g: &Geom, c: u64, v: u64) -> Result<()> {
        let t = (c / g.rpb()) as usize;
        let off = self.reftable[t] & OFFSET_MASK;
        let order = g.refcount_order;
        let i = c % g.rpb();
        let b = self.refblock(g, off).await?;
        entry::set_refcount(b, order, i, v);
        let width = ((1u64 << order) / 8).max(1);
        let byte = (i << order) / 8;
        let byte = byte - byte % width;
        let bytes = b[byte as usize..(byte + width) as usize].to_vec();
        g.write_file(off + byte, bytes).await?;
        if v == 0 {
            self.free_hint = self.free_hint.min(c);
        }
        Ok(())
    }

    /// Adds `delta` to cluster `c`'s refcount, allocating its refcount
    /// block (and growing the table) if needed.
    pub(crate) async fn update_refcount(&mut self, g: &Geom, c: u64, delta: i64) -> Result<()> {
        self.ensure_refblock(g, c / g.rpb()).await?;
        let old = self.refcount(g, c).await?;
        let new = old as i128 + delta as i128;
        if new < 0 || new as u128 > entry::max_refcount(g.refcount_order) as u128 {
            return Err(g.corrupt(format!(
                "refcount of cluster {c} would become {new} (was {old})"
            )));
        }
        self.put_refcount(g, c, new as u64).await
    }

    /// Checks that every change of `d` keeps its refcount within 0 and the
    /// width's maximum; changes nothing.
    pub(crate) async fn check_deltas(&mut self, g: &Geom, d: &Deltas) -> Result<()> {
        let max = entry::max_refcount(g.refcount_order);
        for (&c, &v) in d {
            let old = self.refcount(g, c).await?;
            let new = i128::from(old) + i128::from(v);
            if new < 0 {
                return Err(g.corrupt(format!(
                    "refcount of cluster {c} is {old}, lower than its {} references",
                    -v
                )));
            }
            if new > i128::from(max) {
                return Err(Error::unsupported(
                    &g.name,
                    format!(
                        "refcount of cluster {c} would exceed {max}, the most {}-bit refcounts hold",
                        1u32 << g.refcount_order
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies `d` (already checked with [`check_deltas`](Self::check_deltas)),
    /// writing each changed refcount block once.
    pub(crate) async fn apply_deltas(&mut self, g: &Geom, d: &Deltas) -> Result<()> {
        let rpb = g.rpb();
        let order = g.refcount_order;
        let changes: Vec<(u64, i64)> = d
            .iter()
            .map(|(&c, &v)| (c, v))
            .filter(|c| c.1 != 0)
            .collect();
        for block in changes.chunk_by(|a, b| a.0 / rpb == b.0 / rpb) {
            let t = block[0].0 / rpb;
            self.ensure_refblock(g, t).await?;
            let off = self.reftable[t as usize] & OFFSET_MASK;
            let b = self.refblock(g, off).await?;
            let mut lowest_free = None;
            let mut unused = Vec::new();
            for &(c, v) in block {
                let old = entry::get_refcount(b, order, c % rpb);
                let new = (i128::from(old) + i128::from(v)).max(0) as u64;
                entry::set_refcount(b, order, c % rpb, new);
                if new == 0 {
                    lowest_free.get_or_insert(c);
                    unused.push(c);
                }
            }
            let bytes = b.clone();
            for c in unused {
                // A table no longer used: see `forget_freed_l2`.
                self.forget_l2(c * g.cs());
            }
            g.write_file(off, bytes).await?;
            if let Some(c) = lowest_free {
                self.free_hint = self.free_hint.min(c);
            }
        }
        Ok(())
    }

    /// Makes sure refcount block `t` exists.
    fn ensure_refblock<'a>(
        &'a mut self,
        g: &'a Geom,
        t: u64,
    ) -> crate::block::BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            loop {
                if (t as usize) < self.reftable.len()
                    && self.reftable[t as usize] & OFFSET_MASK != 0
                {
                    return Ok(());
                }
                if t as usize >= self.reftable.len() {
                    self.grow_reftable(g, t + 1).await?;
                    continue;
                }
                let b = self.find_free(g, 1).await?;
                let tb = b / g.rpb();
                let cs = g.cs();
                if tb == t {
                    // Self-describing block.
                    let mut blk = vec![0u8; cs as usize];
                    entry::set_refcount(&mut blk, g.refcount_order, b % g.rpb(), 1);
                    g.write_file(b * cs, blk.clone()).await?;
                    g.flush().await?;
                    self.set_reftable_entry(g, t, b * cs).await?;
                    self.rb_cache.insert(b * cs, blk);
                } else if (tb as usize) >= self.reftable.len()
                    || self.reftable[tb as usize] & OFFSET_MASK == 0
                {
                    self.ensure_refblock(g, tb).await?;
                    continue;
                } else {
                    self.put_refcount(g, b, 1).await?;
                    let blk = vec![0u8; cs as usize];
                    g.write_file(b * cs, blk.clone()).await?;
                    g.flush().await?;
                    self.set_reftable_entry(g, t, b * cs).await?;
                    self.rb_cache.insert(b * cs, blk);
                }
                self.end_cluster = self.end_cluster.max(b + 1);
                g.flush().await?;
                return Ok(());
            }
        })
    }

    async fn set_reftable_entry(&mut self, g: &Geom, t: u64, off: u64) -> Result<()> {
        self.reftable[t as usize] = off;
        g.write_file(self.reftable_offset + t * 8, off.to_be_bytes().to_vec())
            .await
    }

    /// A free run of `n` clusters: the first run of `n` free clusters from
    /// the hint, or a run that starts in the free tail of the image and
    /// continues past its end. Moves the hint to the first free cluster
    /// seen (the caller moves it past what it allocates).
    pub(super) async fn find_free(&mut self, g: &Geom, n: u64) -> Result<u64> {
        let mut c = self.free_hint;
        let mut first_free = None;
        let (mut start, mut run) = (c, 0);
        while c < self.end_cluster && run < n {
            if self.refcount(g, c).await? == 0 {
                first_free.get_or_insert(c);
                if run == 0 {
                    start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        self.free_hint = first_free.unwrap_or(self.end_cluster);
        Ok(if run > 0 { start } else { self.end_cluster })
    }

    /// Sets the refcounts of clusters `c..c + n` (their refcount blocks
    /// must exist) to `v`, writing each block's changed bytes with one
    /// write.
    pub(super) async fn put_refcounts(&mut self, g: &Geom, c: u64, n: u64, v: u64) -> Result<()> {
        let rpb = g.rpb();
        let order = g.refcount_order;
        let width = ((1u64 << order) / 8).max(1);
        let mut first = c;
        while first < c + n {
            let t = first / rpb;
            let last = (c + n).min((t + 1) * rpb) - 1;
            let off = self.reftable[t as usize] & OFFSET_MASK;
            let b = self.refblock(g, off).await?;
            for x in first..=last {
                entry::set_refcount(b, order, x % rpb, v);
            }
            let lo = ((first % rpb) << order) / 8;
            let lo = lo - lo % width;
            let hi = ((last % rpb) << order) / 8;
            let hi = hi - hi % width + width;
            let bytes = b[lo as usize..hi as usize].to_vec();
            g.write_file(off + lo, bytes).await?;
            first = last + 1;
        }
        if v == 0 {
            self.free_hint = self.free_hint.min(c);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcount 1 each, written but not
    /// flushed) and returns the byte offset of the first.
    pub(crate) async fn alloc(&mut self, g: &Geom, n: u64) -> Result<u64> {
        let rpb = g.rpb();
        'retry: loop {
            let c = self.find_free(g, n).await?;
            for t in c / rpb..=(c + n - 1) / rpb {
                self.ensure_refblock(g, t).await?;
            }
            // Allocating refcount blocks may have used the candidate, and
            // past the end of the file there may be clusters a crash left
            // allocated (refcounts written, data not): the next search
            // looks past them.
            for i in 0..n {
                if self.refcount(g, c + i).await? != 0 {
                    self.end_cluster = self.end_cluster.max(c + i + 1);
                    continue 'retry;
                }
            }
            self.put_refcounts(g, c, n, 1).await?;
            self.end_cluster = self.end_cluster.max(c + n);
            // As QEMU's free_cluster_index: the next search starts after
            // this run (holes too small for it are not scanned again until
            // a free lowers the hint).
            self.free_hint = c + n;
            return Ok(c * g.cs());
        }
    }

    /// Allocates enough clusters for `bytes`, writes them (zero padded
    /// to whole clusters, not flushed) and returns their offset.
    pub(crate) async fn alloc_write(&mut self, g: &Geom, bytes: &[u8]) -> Result<u64> {
        let clusters = (bytes.len() as u64).div_ceil(g.cs()).max(1);
        let off = self.alloc(g, clusters).await?;
        let mut b = bytes.to_vec();
        b.resize((clusters * g.cs()) as usize, 0);
        g.write_file(off, b).await?;
        Ok(off)
    }

    /// Decrements the refcounts of `n` clusters at byte offset `off`.
    pub(crate) async fn free(&mut self, g: &Geom, off: u64, n: u64) -> Result<()> {
        let c0 = off / g.cs();
        for c in c0..c0 + n {
            self.update_refcount(g, c, -1).await?;
        }
        self.forget_freed_l2(g, c0, n).await
    }

    /// Replaces the refcount table with a bigger one of at least `min`
    /// entries, placed with the refcount blocks covering it at the end of
    /// the image. Crash-safe: the header switches to the new table only
    /// after it and its blocks are on disk.
    async fn grow_reftable(&mut self, g: &Geom, min: u64) -> Result<()> {
        let cs = g.cs();
        let rpb = g.rpb();
        let end = self.end_cluster;
        let per_cluster = cs / 8;
        let mut entries = min
            .max(self.reftable.len() as u64 * 2)
            .div_ceil(per_cluster)
            * per_cluster;
        let mut nb = 0u64;
        let (tc, new_blocks) = loop {
            let tc = entries.div_ceil(per_cluster);
            let last = end + nb + tc - 1;
            let new_blocks: Vec<u64> = (end / rpb..=last / rpb)
                .filter(|&t| self.reftable.get(t as usize).copied().unwrap_or(0) & OFFSET_MASK == 0)
                .collect();
            let need_entries = (last / rpb + 1).max(min);
            if new_blocks.len() as u64 == nb && need_entries <= entries {
                break (tc, new_blocks);
            }
            nb = new_blocks.len() as u64;
            entries = entries.max(need_entries.div_ceil(per_cluster) * per_cluster);
        };
        if tc * cs > 8 << 20 {
            return Err(Error::unsupported(
                &g.name,
                "the refcount table would exceed 8 MiB",
            ));
        }
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        let mut blocks: HashMap<u64, Vec<u8>> = HashMap::new();
        for (i, &t) in new_blocks.iter().enumerate() {
            table[t as usize] = (end + i as u64) * cs;
            blocks.insert(t, vec![0u8; cs as usize]);
        }
        // Refcounts of the new clusters: in old blocks or new ones.
        for c in end..end + nb + tc {
            let t = c / rpb;
            if let Some(b) = blocks.get_mut(&t) {
                entry::set_refcount(b, g.refcount_order, c % rpb, 1);
            } else {
                self.put_refcount(g, c, 1).await?;
            }
        }
        for (i, &t) in new_blocks.iter().enumerate() {
            if let Some(b) = blocks.remove(&t) {
                g.write_file((end + i as u64) * cs, b.clone()).await?;
                self.rb_cache.insert((end + i as u64) * cs, b);
            }
        }
        let table_off = (end + nb) * cs;
        let mut tbytes = to_bytes(&table);
        tbytes.resize((tc * cs) as usize, 0);
        g.write_file(table_off, tbytes).await?;
        g.flush().await?;
        let mut hdr = table_off.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(tc as u32).to_be_bytes());
        g.write_file(field::REFCOUNT_TABLE, hdr).await?;
        g.flush().await?;
        let old_off = self.reftable_offset;
        let old_clusters = (self.reftable.len() as u64 * 8).div_ceil(cs);
        self.reftable = table;
        self.reftable_offset = table_off;
        self.end_cluster = end + nb + tc;
        self.free(g, old_off, old_clusters).await?;
        Ok(())
    }

    /// Switches to a refcount table written elsewhere (a rebuild): its
    /// offset and entries, and the new end of the image. Forgets cached
    /// refcount blocks.
    pub(crate) fn install_reftable(&mut self, table: Vec<u64>, offset: u64, end_cluster: u64) {
        self.reftable = table;
        self.reftable_offset = offset;
        self.rb_cache = Lru::new(self.rb_cache.cap);
        self.free_hint = 0;
        // The new table does not count the reserve.
        self.data_reserve = (0, 0);
        self.end_cluster = self.end_cluster.max(end_cluster);
    }

    /// Writes L1 entry `l1i`.
    pub(crate) async fn set_l1(&mut self, g: &Geom, l1i: u64, v: u64) -> Result<()> {
        self.l1[l1i as usize] = v;
        g.write_file(self.l1_offset + l1i * 8, v.to_be_bytes().to_vec())
            .await
    }

    /// Grows the L1 table to `n` entries (a new table at the end; the
    /// header switches after it is on disk; the old one is freed).
    pub(crate) async fn grow_l1(&mut self, g: &Geom, n: u64) -> Result<()> {
        if n <= self.l1.len() as u64 {
            return Ok(());
        }
        if n > (32 << 20) / 8 {
            return Err(Error::unsupported(&g.name, "Active L1 table too large"));
        }
        let cs = g.cs();
        let clusters = (n * 8).div_ceil(cs);
        let off = self.alloc(g, clusters).await?;
        let mut t = self.l1.clone();
        t.resize(n as usize, 0);
        let mut bytes = to_bytes(&t);
        bytes.resize((clusters * cs) as usize, 0);
        g.write_file(off, bytes).await?;
        g.flush().await?;
        let mut hdr = (n as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&off.to_be_bytes());
        g.write_file(field::L1, hdr).await?;
        g.flush().await?;
        let old_off = self.l1_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.l1 = t;
        self.l1_offset = off;
        if old_clusters > 0 && old_off != 0 {
            self.free(g, old_off, old_clusters).await?;
        }
        Ok(())
    }

    /// Whether an L1 entry's table has refcount 1.
    pub(crate) fn l1_copied(&self, l1i: u64) -> bool {
        self.l1.get(l1i as usize).is_some_and(|e| e & COPIED != 0)
    }
}
