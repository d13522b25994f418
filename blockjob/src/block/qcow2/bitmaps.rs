//! Persistent dirty bitmaps: the bitmaps extension, the bitmap directory
//! and the bitmap tables (`docs/interop/qcow2.rst`, "Bitmaps").
//!
//! Open: the extension is trusted only with autoclear bit 0 set (else it
//! is ignored, as the spec says: a program without bitmap support wrote
//! the image). The directory and every table are validated (QEMU's
//! constraints: aligned offsets inside the file, granularity 2^9..2^31,
//! names of 1..=1023 bytes of UTF-8, no extra data, no unknown flags,
//! tables big enough for the disk, table and data clusters allocated and
//! clear of the other metadata and of each other, since storing frees
//! them; and our own limit of 2^28 bits per bitmap, held a byte each);
//! anything wrong fails the open with a message, never a panic. A bitmap
//! flagged `in_use` is loaded as inconsistent (no bits). Opening
//! read-write sets `in_use` on the others in place, with the autoclear bit
//! dropped while the directory is rewritten, so a crash leaves them
//! flagged.
//!
//! Close (and removal): new data clusters, new tables and a new directory
//! are written and flushed first, then one header write switches to them,
//! then the old ones are freed: a crash leaves at worst leaked clusters.

use std::collections::HashSet;
use std::sync::Arc;

use super::entry::OFFSET_MASK;
use super::header::{field, Extension, Header, AUTOCLEAR_BITMAPS};
use super::meta::{to_bytes, words, Geom, Meta};
use super::Qcow2;
use crate::block::bitmap::DirtyBitmap;
use crate::{Error, Result};

/// Directory entry flag: not saved cleanly.
const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: recording (enabled).
const FLAG_AUTO: u32 = 1 << 1;
/// Every other flag (bit 2, `extra_data_compatible`, included: QEMU
/// knows no extra data, so it refuses it as it does).
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// QEMU's limit on the number of bitmaps.
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the directory size.
const MAX_DIR_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's limit on a bitmap table's entries.
const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// QEMU's limit on a bitmap's data bytes.
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Granularity bits QEMU supports.
const GRAN_BITS: std::ops::RangeInclusive<u32> = 9..=31;
/// QEMU's limit on a name.
pub(crate) const MAX_NAME: usize = 1023;
/// The fixed part of a directory entry.
const ENTRY_HEAD: usize = 24;
/// Bitmap table entry: reserved bits 1-8 and 56-63.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: the data cluster offset.
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry without offset: the cluster reads as all ones.
const TABLE_ALL_ONES: u64 = 1;
/// Our own limit on the bits of one bitmap held in memory (a byte each).
const MAX_BITS: u64 = 1 << 28;

/// The bitmaps extension's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ext {
    /// Number of bitmaps (≥ 1).
    pub(crate) nb: u32,
    /// Directory size in bytes.
    pub(crate) dir_size: u64,
    /// Directory offset (cluster aligned).
    pub(crate) dir_offset: u64,
}

fn be(b: &[u8], off: usize, n: usize) -> u64 {
    b[off..off + n]
        .iter()
        .fold(0u64, |a, &x| (a << 8) | u64::from(x))
}

impl Ext {
    /// Parses and checks the extension's data.
    pub(crate) fn parse(d: &[u8], cluster_size: u64) -> std::result::Result<Ext, String> {
        if d.len() != 24 {
            return Err(format!(
                "bitmaps_ext: Invalid extension length ({} bytes, 24 expected)",
                d.len()
            ));
        }
        let e = Ext {
            nb: be(d, 0, 4) as u32,
            dir_size: be(d, 8, 8),
            dir_offset: be(d, 16, 8),
        };
        if be(d, 4, 4) != 0 {
            return Err("bitmaps_ext: Reserved field is not zero".into());
        }
        if e.nb == 0 {
            return Err("bitmaps_ext: found bitmaps extension with zero bitmaps".into());
        }
        if e.nb > MAX_BITMAPS {
            return Err(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                e.nb
            ));
        }
        if e.dir_offset == 0 || e.dir_offset % cluster_size != 0 {
            return Err("bitmaps_ext: invalid dirty bitmap directory offset".into());
        }
        if e.dir_size == 0 || e.dir_size > MAX_DIR_SIZE {
            return Err(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the QEMU supported maximum of {MAX_DIR_SIZE}",
                e.dir_size
            ));
        }
        Ok(e)
    }

    fn to_bytes(self) -> Vec<u8> {
        let mut b = self.nb.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.dir_size.to_be_bytes());
        b.extend_from_slice(&self.dir_offset.to_be_bytes());
        b
    }
}

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    /// Offset of the bitmap table.
    pub(crate) table_offset: u64,
    /// Entries in it.
    pub(crate) table_size: u32,
    /// `in_use`, `auto`.
    pub(crate) flags: u32,
    /// log2 of the granularity.
    pub(crate) gran_bits: u8,
    /// The name.
    pub(crate) name: String,
}

impl DirEntry {
    pub(crate) fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    fn serialize_into(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.table_offset.to_be_bytes());
        b.extend_from_slice(&self.table_size.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.push(1); // dirty tracking bitmap
        b.push(self.gran_bits);
        b.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }

    /// Bytes of bitmap data for a disk of `size` bytes.
    fn data_bytes(&self, size: u64) -> u64 {
        size.div_ceil(1 << self.gran_bits).div_ceil(8)
    }
}

/// `qemu-img info`'s `bitmaps`: `[{flags, name, granularity}]`.
pub(crate) fn info_json(dir: &[DirEntry]) -> serde_json::Value {
    dir.iter()
        .map(|e| {
            let mut flags = Vec::new();
            if e.in_use() {
                flags.push("in-use");
            }
            if e.flags & FLAG_AUTO != 0 {
                flags.push("auto");
            }
            serde_json::json!({
                "flags": flags,
                "name": e.name,
                "granularity": 1u64 << e.gran_bits,
            })
        })
        .collect()
}

/// The directory's bytes.
pub(crate) fn serialize_dir(list: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in list {
        e.serialize_into(&mut b);
    }
    b
}

/// Parses a directory of `nb` entries filling `buf` exactly, checking
/// each entry against QEMU's constraints for a disk of `size` bytes.
pub(crate) fn parse_dir(
    buf: &[u8],
    nb: u32,
    cluster_size: u64,
    size: u64,
) -> std::result::Result<Vec<DirEntry>, String> {
    let broken = || "Broken bitmap directory".to_string();
    let mut out: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let head = buf.get(pos..pos + ENTRY_HEAD).ok_or_else(broken)?;
        if out.len() as u32 >= nb {
            return Err("More bitmaps found than specified in header extension".into());
        }
        let name_len = be(head, 18, 2) as usize;
        let extra = be(head, 20, 4) as usize;
        let end = (pos + ENTRY_HEAD)
            .checked_add(extra)
            .and_then(|x| x.checked_add(name_len))
            .ok_or_else(broken)?;
        if end.div_ceil(8) * 8 > buf.len() {
            return Err(broken());
        }
        if extra != 0 {
            return Err("Bitmap extra data is not supported".into());
        }
        let raw = &buf[pos + ENTRY_HEAD..end];
        let shown = String::from_utf8_lossy(raw).into_owned();
        let e = DirEntry {
            table_offset: be(head, 0, 8),
            table_size: be(head, 8, 4) as u32,
            flags: be(head, 12, 4) as u32,
            gran_bits: head[17],
            name: shown.clone(),
        };
        let kind = head[16];
        if kind != 1 || !entry_ok(&e, name_len, cluster_size, size) {
            return Err(format!("Bitmap '{shown}' doesn't satisfy the constraints"));
        }
        if std::str::from_utf8(raw).is_err() {
            return Err(format!("Bitmap name '{shown}' is not valid UTF-8"));
        }
        if out.iter().any(|x| x.name == e.name) {
            return Err(format!("Duplicate bitmap name '{shown}'"));
        }
        out.push(e);
        pos = end.div_ceil(8) * 8;
    }
    if (out.len() as u32) < nb {
        return Err("Less bitmaps found than specified in header extension".into());
    }
    Ok(out)
}

/// QEMU's `check_dir_entry`.
fn entry_ok(e: &DirEntry, name_len: usize, cluster_size: u64, size: u64) -> bool {
    let phys = u64::from(e.table_size) * cluster_size;
    let basic = e.table_size != 0
        && e.table_offset != 0
        && e.table_offset % cluster_size == 0
        && u64::from(e.table_size) <= MAX_TABLE_SIZE
        && GRAN_BITS.contains(&u32::from(e.gran_bits))
        && e.flags & RESERVED_FLAGS == 0
        && (1..=MAX_NAME).contains(&name_len)
        && phys <= MAX_PHYS_SIZE;
    // A consistent bitmap's table must cover the disk.
    basic && (e.in_use() || size.div_ceil(1 << e.gran_bits) <= phys * 8)
}

/// Whether a table entry is valid (QEMU's `check_table_entry`).
fn table_entry_ok(w: u64, cluster_size: u64) -> bool {
    let off = w & TABLE_OFFSET;
    w & TABLE_RESERVED == 0 && (off == 0 || (w & TABLE_ALL_ONES == 0 && off % cluster_size == 0))
}

/// Why a new persistent bitmap cannot be stored (QEMU's
/// `qcow2_co_can_store_new_dirty_bitmap` texts), for a disk of `size`.
pub(crate) fn check_new(
    version: u32,
    cluster_size: u64,
    size: u64,
    name: &str,
    gran: u64,
) -> std::result::Result<(), String> {
    if version < 3 {
        return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
    }
    if gran > 1 << GRAN_BITS.end() {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << GRAN_BITS.end()
        ));
    }
    if gran < 1 << GRAN_BITS.start() {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << GRAN_BITS.start()
        ));
    }
    let bytes = size.div_ceil(gran).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * cluster_size {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME} characters)"
        ));
    }
    Ok(())
}

/// The stored bitmaps of an image being opened: the directory entries,
/// where the directory is (0: none), and one bitmap per entry in
/// directory order.
pub(crate) struct Loaded {
    pub(crate) dir: Vec<DirEntry>,
    pub(crate) at: (u64, u64),
    pub(crate) bitmaps: Vec<DirtyBitmap>,
}

/// Reads the bitmaps of an image being opened (see the module docs).
pub(crate) async fn load(g: &Geom, h: &Header, m: &mut Meta, read_only: bool) -> Result<Loaded> {
    let mut out = Loaded {
        dir: Vec::new(),
        at: (0, 0),
        bitmaps: Vec::new(),
    };
    let Some(data) = h.extensions.iter().find_map(|e| match e {
        Extension::Bitmaps(d) => Some(d),
        _ => None,
    }) else {
        return Ok(out);
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        log::warn!(
            "{}: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent (ignored)",
            g.name
        );
        return Ok(out);
    }
    let bad = |r: String| Error::open(&g.name, r);
    let ext = Ext::parse(data, g.cs()).map_err(bad)?;
    let flen = g.file.len();
    if ext.dir_offset.saturating_add(ext.dir_size) > flen {
        return Err(bad(format!(
            "bitmaps_ext: the bitmap directory at {:#x} ({} bytes) runs past the end of the file",
            ext.dir_offset, ext.dir_size
        )));
    }
    let buf = g.read_file(ext.dir_offset, ext.dir_size).await?;
    out.dir = parse_dir(&buf, ext.nb, g.cs(), h.size).map_err(bad)?;
    out.at = (ext.dir_offset, ext.dir_size);
    let mut used = fixed_clusters(g, m, out.at);
    for e in &out.dir {
        let gran = 1u64 << e.gran_bits;
        let enabled = e.flags & FLAG_AUTO != 0;
        let could_not = |r: String| {
            bad(format!(
                "Could not read bitmap '{}' from image: {r}",
                e.name
            ))
        };
        if h.size.div_ceil(gran) > MAX_BITS {
            return Err(could_not(format!(
                "more than {MAX_BITS} bits; this implementation does not load bitmaps that large"
            )));
        }
        // Every table is checked, in use or not: removing or storing the
        // bitmap frees what it names.
        let table = read_table(g, e).await.map_err(could_not)?;
        claim_clusters(g, m, e, &table, &mut used)
            .await
            .map_err(could_not)?;
        let bits = if e.in_use() {
            None
        } else {
            Some(read_data(g, e, &table, h.size).await.map_err(could_not)?)
        };
        out.bitmaps.push(DirtyBitmap::stored(
            &e.name,
            h.size,
            gran,
            enabled,
            bits.as_deref(),
            read_only,
        ));
    }
    Ok(out)
}

/// The clusters of the image's other metadata: header, L1 table, L2
/// tables of the active L1, refcount table and blocks, snapshot table and
/// snapshot L1 tables, and the bitmap directory at `dir`.
fn fixed_clusters(g: &Geom, m: &Meta, dir: (u64, u64)) -> HashSet<u64> {
    let cs = g.cs();
    let mut set = HashSet::new();
    let mut add = |off: u64, len: u64| {
        if let Some(last) = off
            .checked_add(len)
            .filter(|_| len > 0)
            .map(|e| (e - 1) / cs)
        {
            set.extend(off / cs..=last);
        }
    };
    add(0, cs);
    add(m.l1_offset, m.l1.len() as u64 * 8);
    add(m.reftable_offset, m.reftable.len() as u64 * 8);
    for &e in m.reftable.iter().chain(m.l1.iter()) {
        add(e & OFFSET_MASK, if e & OFFSET_MASK != 0 { cs } else { 0 });
    }
    add(m.snapshots_at.0, m.snapshots_at.1);
    for sn in &m.snapshots {
        add(sn.l1_offset, u64::from(sn.l1_size) * 8);
    }
    add(dir.0, dir.1);
    set
}

/// Checks that a bitmap's table and data clusters are allocated and used
/// by nothing else seen so far (other metadata, other bitmaps), and
/// records them in `used`.
async fn claim_clusters(
    g: &Geom,
    m: &mut Meta,
    e: &DirEntry,
    table: &[u64],
    used: &mut HashSet<u64>,
) -> std::result::Result<(), String> {
    let cs = g.cs();
    let table_clusters = (u64::from(e.table_size) * 8).div_ceil(cs);
    let first = e.table_offset / cs;
    let data = table.iter().map(|w| w & TABLE_OFFSET).filter(|&o| o != 0);
    let all: Vec<(u64, &str)> = (first..first + table_clusters)
        .map(|c| (c, "table"))
        .chain(data.map(|o| (o / cs, "data")))
        .collect();
    for (c, what) in all {
        if !used.insert(c) {
            return Err(format!(
                "{what} cluster {:#x} is also used by other metadata",
                c * cs
            ));
        }
        if m.refcount(g, c).await.map_err(|x| x.to_string())? == 0 {
            return Err(format!("{what} cluster {:#x} has refcount 0", c * cs));
        }
    }
    Ok(())
}

/// Reads and checks a bitmap table.
async fn read_table(g: &Geom, e: &DirEntry) -> std::result::Result<Vec<u64>, String> {
    let len = u64::from(e.table_size) * 8;
    if e.table_offset.saturating_add(len) > g.file.len() {
        return Err(format!(
            "its table at {:#x} runs past the end of the file",
            e.table_offset
        ));
    }
    let t = words(
        &g.read_file(e.table_offset, len)
            .await
            .map_err(|x| x.to_string())?,
    );
    for (i, &w) in t.iter().enumerate() {
        if !table_entry_ok(w, g.cs()) || (w & TABLE_OFFSET) + g.cs() > g.file.len() {
            return Err(format!("bitmap table entry {i} ({w:#x}) is invalid"));
        }
    }
    Ok(t)
}

/// A consistent bitmap's data bytes.
async fn read_data(
    g: &Geom,
    e: &DirEntry,
    t: &[u64],
    size: u64,
) -> std::result::Result<Vec<u8>, String> {
    let bytes = e.data_bytes(size);
    let cs = g.cs();
    if bytes.div_ceil(cs) != u64::from(e.table_size) {
        return Err(format!(
            "its table has {} entries, {} expected for the disk size",
            e.table_size,
            bytes.div_ceil(cs)
        ));
    }
    let mut out = Vec::with_capacity(bytes as usize);
    for &w in t {
        let off = w & TABLE_OFFSET;
        let chunk = if off == 0 {
            vec![if w & TABLE_ALL_ONES != 0 { 0xff } else { 0 }; cs as usize]
        } else {
            g.read_file(off, cs).await.map_err(|x| x.to_string())?
        };
        out.extend_from_slice(&chunk);
    }
    out.truncate(bytes as usize);
    Ok(out)
}

/// Sets `in_use` on the consistent bitmaps of an image opened read-write
/// (autoclear bit off, directory rewritten in place, flushed; the caller
/// sets the bit again with the dirty bit).
pub(crate) async fn mark_in_use(g: &Geom, m: &mut Meta) -> Result<()> {
    if m.bitmap_dir.iter().all(DirEntry::in_use) {
        return Ok(());
    }
    g.write_file(field::AUTOCLEAR, 0u64.to_be_bytes().to_vec())
        .await?;
    g.flush().await?;
    for e in m.bitmap_dir.iter_mut() {
        e.flags |= FLAG_IN_USE;
    }
    g.write_file(m.bitmaps_at.0, serialize_dir(&m.bitmap_dir))
        .await?;
    g.flush().await
}

impl Qcow2 {
    /// Writes `b`'s data clusters and table (allocated, not flushed);
    /// returns its directory entry.
    async fn write_bitmap(&self, m: &mut Meta, b: &DirtyBitmap) -> Result<DirEntry> {
        let g = &self.g;
        let cs = g.cs();
        let bytes = b.to_bytes();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let mut table = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let start = (i * cs as usize).min(bytes.len());
            let end = ((i + 1) * cs as usize).min(bytes.len());
            let chunk = &bytes[start..end];
            if chunk.iter().all(|&x| x == 0) {
                table.push(0);
                continue;
            }
            table.push(m.alloc_write(g, chunk).await?);
        }
        let toff = m.alloc_write(g, &to_bytes(&table)).await?;
        Ok(DirEntry {
            table_offset: toff,
            table_size: n as u32,
            flags: if b.enabled() { FLAG_AUTO } else { 0 },
            gran_bits: b.granularity().trailing_zeros() as u8,
            name: b.name().to_string(),
        })
    }

    /// Frees a bitmap's data clusters and table; what looks invalid is
    /// left (leaked) with a warning.
    async fn free_bitmap(&self, m: &mut Meta, e: &DirEntry) {
        let g = &self.g;
        let t = match read_table(g, e).await {
            Ok(t) => t,
            Err(r) => {
                log::warn!("{}: bitmap '{}' not freed: {r}", g.name, e.name);
                return;
            }
        };
        let mut r = Ok(());
        for w in t.into_iter().map(|w| w & TABLE_OFFSET).filter(|&o| o != 0) {
            r = r.and(m.free(g, w, 1).await);
        }
        let tc = (u64::from(e.table_size) * 8).div_ceil(g.cs());
        r = r.and(m.free(g, e.table_offset, tc).await);
        if let Err(x) = r {
            log::warn!("{}: freeing bitmap '{}': {x}", g.name, e.name);
        }
    }

    /// The header as on disk with the bitmaps extension `ext` (or none)
    /// and the autoclear bit to match, and its bytes.
    async fn header_with(&self, ext: Option<Ext>) -> Result<(Header, Vec<u8>)> {
        let g = &self.g;
        let buf = g.read_file(0, g.cs()).await?;
        let mut h = Header::parse(&buf, false).map_err(|r| Error::corrupt(&g.name, r))?;
        h.extensions.retain(|e| !matches!(e, Extension::Bitmaps(_)));
        match ext {
            None => h.autoclear_features &= !AUTOCLEAR_BITMAPS,
            Some(x) => {
                h.extensions.push(Extension::Bitmaps(x.to_bytes()));
                h.autoclear_features |= AUTOCLEAR_BITMAPS;
            }
        }
        let out = h.serialize().map_err(|r| {
            Error::unsupported(&g.name, format!("storing the bitmap directory: {r}"))
        })?;
        Ok((h, out))
    }

    /// Makes `entries` the directory: written to new clusters, flushed,
    /// switched to with one header write, flushed; then the old directory
    /// and the bitmaps of `drop` are freed.
    async fn write_dir(
        &self,
        m: &mut Meta,
        entries: Vec<DirEntry>,
        drop: &[DirEntry],
    ) -> Result<()> {
        let g = &self.g;
        let cs = g.cs();
        let bytes = serialize_dir(&entries);
        let at = if entries.is_empty() {
            (0, 0)
        } else {
            (m.alloc_write(g, &bytes).await?, bytes.len() as u64)
        };
        g.flush().await?;
        let ext = (!entries.is_empty()).then_some(Ext {
            nb: entries.len() as u32,
            dir_size: at.1,
            dir_offset: at.0,
        });
        let (h, out) = match self.header_with(ext).await {
            Ok(x) => x,
            Err(e) => {
                if at.0 != 0 {
                    m.free(g, at.0, at.1.div_ceil(cs)).await?;
                }
                return Err(e);
            }
        };
        g.write_file(0, out).await?;
        g.flush().await?;
        {
            let mut mem = self.header();
            mem.extensions = h.extensions.clone();
            mem.autoclear_features = h.autoclear_features;
        }
        let (old_off, old_len) = std::mem::replace(&mut m.bitmaps_at, at);
        self.set_dir_view(&entries);
        m.bitmap_dir = entries;
        if old_off != 0 && old_len != 0 {
            m.free(g, old_off, old_len.div_ceil(cs)).await?;
        }
        for e in drop {
            self.free_bitmap(m, e).await;
        }
        g.flush().await
    }

    /// Stores the node's persistent bitmaps (clean close): consistent ones
    /// get new tables and data, inconsistent ones keep their entry (still
    /// `in_use`), entries of bitmaps no longer on the node go.
    ///
    /// A failure part way leaves the image as it was plus leaked clusters.
    pub(super) async fn do_store_bitmaps(&self, list: &[Arc<DirtyBitmap>]) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        let persistent: Vec<&Arc<DirtyBitmap>> = list.iter().filter(|b| b.persistent()).collect();
        if persistent.is_empty() && m.bitmap_dir.is_empty() {
            return Ok(());
        }
        // The directory keeps its order (stored bitmaps in place, new ones
        // appended in the node's order), as QEMU's store does.
        // Nothing is written if the header has no room for the extension.
        if !persistent.is_empty() {
            let probe = Ext {
                nb: 1,
                dir_size: 0,
                dir_offset: 0,
            };
            self.header_with(Some(probe)).await?;
        }
        let old = m.bitmap_dir.clone();
        let mut order: Vec<&Arc<DirtyBitmap>> = Vec::with_capacity(persistent.len());
        for e in &old {
            order.extend(persistent.iter().copied().find(|b| b.name() == e.name));
        }
        for b in &persistent {
            if !old.iter().any(|e| e.name == b.name()) {
                order.push(b);
            }
        }
        let mut kept = HashSet::new();
        let mut new = Vec::with_capacity(order.len());
        for b in order {
            if b.inconsistent() {
                if let Some(e) = old.iter().find(|e| e.name == b.name()) {
                    kept.insert(e.name.clone());
                    new.push(e.clone());
                }
                continue;
            }
            new.push(self.write_bitmap(&mut m, b).await?);
        }
        let drop: Vec<DirEntry> = old
            .into_iter()
            .filter(|e| !kept.contains(&e.name))
            .collect();
        self.write_dir(&mut m, new, &drop).await
    }

    /// Removes bitmap `name` from the image (nothing if it is not there).
    pub(super) async fn do_remove_stored_bitmap(&self, name: &str) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        let Some(i) = m.bitmap_dir.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let mut list = m.bitmap_dir.clone();
        let gone = list.remove(i);
        self.write_dir(&mut m, list, &[gone]).await
    }

    /// The clusters the bitmaps use, for `check`: the directory, then per
    /// bitmap its table and data clusters (`Err` for an invalid table).
    pub(super) async fn bitmap_clusters(
        &self,
        m: &Meta,
    ) -> Vec<(String, std::result::Result<Vec<(u64, u64)>, String>)> {
        let g = &self.g;
        let mut out = vec![("bitmap directory".to_string(), Ok(vec![m.bitmaps_at]))];
        for e in &m.bitmap_dir {
            let what = format!("bitmap '{}'", e.name);
            let r = read_table(g, e).await.map(|t| {
                let mut v = vec![(e.table_offset, u64::from(e.table_size) * 8)];
                v.extend(
                    t.iter()
                        .map(|w| w & TABLE_OFFSET)
                        .filter(|&o| o != 0)
                        .map(|o| (o, g.cs())),
                );
                v
            });
            out.push((what, r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: u64 = 65536;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 5 * CS,
            table_size: 1,
            flags,
            gran_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn dir_round_trips_with_padding() {
        let list = vec![entry("b0", FLAG_AUTO), entry("a longer name", FLAG_IN_USE)];
        let b = serialize_dir(&list);
        // 24 + 2 → 32; 24 + 13 → 40.
        assert_eq!(b.len(), 72);
        assert_eq!(parse_dir(&b, 2, CS, 1 << 30).unwrap(), list);
    }

    #[test]
    fn dir_when_bad_then_clear_errors() {
        let good = serialize_dir(&[entry("b0", FLAG_AUTO)]);
        let err = |b: &[u8], nb| parse_dir(b, nb, CS, 1 << 30).unwrap_err();
        assert_eq!(
            err(&good, 0),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(
            err(&good, 2),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(err(&good[..20], 1), "Broken bitmap directory");
        let mut b = good.clone();
        b[23] = 8; // extra data
        b.resize(48, 0);
        assert_eq!(err(&b, 1), "Bitmap extra data is not supported");
        let c = "Bitmap 'b0' doesn't satisfy the constraints";
        for (at, v) in [(7usize, 1u8), (15, 4), (16, 2), (17, 8), (17, 32), (11, 0)] {
            let mut b = good.clone();
            b[at] = v;
            assert_eq!(err(&b, 1), c, "byte {at} = {v}");
        }
        // A table too small for a disk of 2^40 bytes at 64 KiB granularity.
        assert_eq!(parse_dir(&good, 1, CS, 1 << 40).unwrap_err(), c);
        // ... unless in use.
        let iu = serialize_dir(&[entry("b0", FLAG_IN_USE)]);
        assert!(parse_dir(&iu, 1, CS, 1 << 40).is_ok());
        let mut b = good.clone();
        b[24] = 0xff;
        assert!(err(&b, 1).contains("not valid UTF-8"));
        let two = serialize_dir(&[entry("b0", 0), entry("b0", 0)]);
        assert_eq!(err(&two, 2), "Duplicate bitmap name 'b0'");
    }

    #[test]
    fn ext_when_bad_then_errors() {
        let ok = Ext {
            nb: 1,
            dir_size: 32,
            dir_offset: 4 * CS,
        };
        assert_eq!(Ext::parse(&ok.to_bytes(), CS).unwrap(), ok);
        let mut cases = vec![];
        for bad in [
            Ext { nb: 0, ..ok },
            Ext {
                nb: MAX_BITMAPS + 1,
                ..ok
            },
            Ext {
                dir_offset: 4 * CS + 8,
                ..ok
            },
            Ext {
                dir_offset: 0,
                ..ok
            },
            Ext { dir_size: 0, ..ok },
            Ext {
                dir_size: MAX_DIR_SIZE + 1,
                ..ok
            },
        ] {
            cases.push(bad.to_bytes());
        }
        let mut r = ok.to_bytes();
        r[5] = 1;
        cases.push(r);
        cases.push(ok.to_bytes()[..16].to_vec());
        for c in cases {
            assert!(Ext::parse(&c, CS).is_err(), "{c:?}");
        }
    }

    #[test]
    fn table_entries_checked_like_qemu() {
        assert!(table_entry_ok(0, CS));
        assert!(table_entry_ok(TABLE_ALL_ONES, CS));
        assert!(table_entry_ok(3 * CS, CS));
        assert!(!table_entry_ok((3 * CS) | 1, CS));
        assert!(!table_entry_ok(3 * CS + 512, CS));
        assert!(!table_entry_ok(1 << 60, CS));
        assert!(!table_entry_ok(2, CS));
    }

    #[test]
    fn check_new_when_bad_then_qemu_texts() {
        assert_eq!(
            check_new(2, CS, 1 << 20, "b", CS).unwrap_err(),
            "Cannot store dirty bitmaps in qcow2 v2 files"
        );
        assert_eq!(
            check_new(3, CS, 1 << 20, &"x".repeat(1024), CS).unwrap_err(),
            "Name length exceeds maximum (1023 characters)"
        );
        assert!(check_new(3, 512, 1 << 50, "b", 512)
            .unwrap_err()
            .starts_with("Too much space"));
        assert!(check_new(3, CS, 1 << 20, "b", 512).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn mutated_dirs_never_panic(
            names in proptest::collection::vec("[a-z]{1,12}", 1..4),
            muts in proptest::collection::vec((0usize..200, any::<u8>()), 1..12),
            cut in 0usize..220,
            nb in 0u32..6,
            size in 0u64..(1 << 42),
        ) {
            let list: Vec<DirEntry> = names.iter().map(|n| entry(n, 0)).collect();
            let mut b = serialize_dir(&list);
            for (i, v) in muts {
                if i < b.len() { b[i] = v; }
            }
            b.truncate(cut);
            if let Ok(got) = parse_dir(&b, nb, CS, size) {
                prop_assert_eq!(got.len(), nb as usize);
            }
            let _ = Ext::parse(&b[..b.len().min(24)], CS);
        }
    }
}
