//! The qcow2 header and its extensions (`docs/interop/qcow2.rst`):
//! parsing with QEMU's validation order and error texts, and serialising.

use std::fmt::Write as _;

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// The size of the fixed version-2 header.
pub(crate) const V2_HEADER_LEN: usize = 72;
/// The size of the version-3 header QEMU writes (with compression type).
pub(crate) const V3_HEADER_LEN: usize = 112;
/// The smallest legal version-3 header.
const V3_MIN_HEADER_LEN: u32 = 104;
/// QEMU's largest cluster size, 2 MiB.
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// The smallest cluster size, 512 bytes.
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// QEMU's limit on the refcount table (8 MiB).
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// QEMU's limit on the L1 table (32 MiB).
pub(crate) const MAX_L1_SIZE: u64 = 32 << 20;
/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;

/// Extension: end of the extension area.
pub(crate) const EXT_END: u32 = 0;
/// Extension: backing file format name.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: feature name table.
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension: persistent dirty bitmaps.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;

/// Incompatible feature bit 0: refcounts may be inconsistent.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: external data file.
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression type field is valid.
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this implementation knows.
pub(crate) const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Compatible feature bit 0: lazy refcounts.
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Byte offsets of header fields that are rewritten in place.
pub(crate) mod field {
    /// `size` (u64).
    pub(crate) const SIZE: u64 = 24;
    /// `l1_size` (u32) followed by `l1_table_offset` (u64).
    pub(crate) const L1: u64 = 36;
    /// `refcount_table_offset` (u64) followed by `refcount_table_clusters` (u32).
    pub(crate) const REFCOUNT_TABLE: u64 = 48;
    /// `nb_snapshots` (u32) followed by `snapshots_offset` (u64).
    pub(crate) const SNAPSHOTS: u64 = 60;
    /// `incompatible_features` (u64).
    pub(crate) const INCOMPATIBLE: u64 = 72;
    /// `autoclear_features` (u64).
    pub(crate) const AUTOCLEAR: u64 = 88;
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub(crate) kind: u8,
    /// Bit number.
    pub(crate) bit: u8,
    /// Name (up to 46 bytes).
    pub(crate) name: String,
}

/// A header extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Extension {
    /// Backing file format name.
    BackingFormat(String),
    /// Feature name table.
    FeatureTable(Vec<FeatureName>),
    /// Bitmaps extension, kept as raw bytes and preserved.
    Bitmaps(Vec<u8>),
    /// Anything else, preserved.
    Unknown {
        /// Extension type.
        kind: u32,
        /// Its data.
        data: Vec<u8>,
    },
}

/// A parsed qcow2 header (version 2 or 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) backing_file_offset: u64,
    pub(crate) backing_file_size: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) crypt_method: u32,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
    pub(crate) nb_snapshots: u32,
    pub(crate) snapshots_offset: u64,
    pub(crate) incompatible_features: u64,
    pub(crate) compatible_features: u64,
    pub(crate) autoclear_features: u64,
    pub(crate) refcount_order: u32,
    pub(crate) header_length: u32,
    pub(crate) compression_type: u8,
    /// Header bytes past the fields we know (v3, `header_length` > 112), preserved.
    pub(crate) extra: Vec<u8>,
    /// Extensions in file order (without the end marker).
    pub(crate) extensions: Vec<Extension>,
    /// The backing file name, if any.
    pub(crate) backing_file: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// QEMU's `validate_table_offset`: aligned, no overflow, within limits.
fn table_offset_ok(offset: u64, entries: u64, entry_len: u64, cluster_size: u64) -> bool {
    if entries > i64::MAX as u64 / entry_len {
        return false;
    }
    let size = entries * entry_len;
    if offset > i64::MAX as u64 - size {
        return false;
    }
    offset % cluster_size == 0
}

impl Header {
    /// The cluster size in bytes.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub(crate) fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Entries per L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    /// The backing format from the extension, if present.
    pub(crate) fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// Parses and validates a header from the start of an image.
    ///
    /// `buf` holds the first bytes of the file (at least the first cluster
    /// where the file is that long); missing bytes read as zero, as QEMU's
    /// block layer pads reads past the end. `writable` refuses images QEMU
    /// only opens read-only. Errors are QEMU's texts.
    pub(crate) fn parse(buf: &[u8], writable: bool) -> Result<Header, String> {
        let mut b = buf.to_vec();
        if b.len() < V3_HEADER_LEN {
            b.resize(V3_HEADER_LEN, 0);
        }
        if be32(&b, 0) != MAGIC {
            return Err("Image is not in qcow2 format".into());
        }
        let version = be32(&b, 4);
        if !(2..=3).contains(&version) {
            return Err(format!("Unsupported qcow2 version {version}"));
        }
        let cluster_bits = be32(&b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(format!("Unsupported cluster size: 2^{cluster_bits}"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits,
            size: be64(&b, 24),
            crypt_method: be32(&b, 32),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            extra: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            h.incompatible_features = be64(&b, 72);
            h.compatible_features = be64(&b, 80);
            h.autoclear_features = be64(&b, 88);
            h.refcount_order = be32(&b, 96);
            h.header_length = be32(&b, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err("qcow2 header too short".into());
            }
            if u64::from(h.header_length) > cluster_size {
                return Err("qcow2 header exceeds cluster size".into());
            }
            if h.header_length as usize >= V3_HEADER_LEN {
                h.compression_type = b[104];
            }
            let hl = h.header_length as usize;
            if hl > V3_HEADER_LEN {
                if b.len() < hl {
                    b.resize(hl, 0);
                }
                h.extra = b[V3_HEADER_LEN..hl].to_vec();
            }
        }
        if h.backing_file_offset > cluster_size {
            return Err("Invalid backing file offset".into());
        }

        // Extensions: from the end of the header to the backing file name
        // (or the end of the first cluster).
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        };
        let mut off = h.header_length as u64;
        let mut seen = Vec::new();
        while off < ext_end {
            if off + 8 > ext_end {
                return Err(
                    "qcow2_read_extension: ERROR: pread fail from offset ".to_string()
                        + &off.to_string(),
                );
            }
            if b.len() < (off + 8) as usize {
                b.resize((off + 8) as usize, 0);
            }
            let kind = be32(&b, off as usize);
            let len = u64::from(be32(&b, off as usize + 4));
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > ext_end - off {
                return Err("Header extension too large".into());
            }
            if b.len() < (off + len) as usize {
                b.resize((off + len) as usize, 0);
            }
            let data = b[off as usize..(off + len) as usize].to_vec();
            if seen.contains(&kind) && kind != EXT_END {
                return Err(format!("Duplicate header extension 0x{kind:x}"));
            }
            seen.push(kind);
            let ext = match kind {
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(format!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        ));
                    }
                    Extension::BackingFormat(String::from_utf8_lossy(&data).into_owned())
                }
                EXT_FEATURE_TABLE => Extension::FeatureTable(
                    data.chunks_exact(48)
                        .map(|e| {
                            let name = &e[2..];
                            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                            FeatureName {
                                kind: e[0],
                                bit: e[1],
                                name: String::from_utf8_lossy(&name[..end]).into_owned(),
                            }
                        })
                        .collect(),
                ),
                EXT_BITMAPS => Extension::Bitmaps(data),
                _ => Extension::Unknown { kind, data },
            };
            h.extensions.push(ext);
            off += len.div_ceil(8) * 8;
        }

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(format!(
                "Unsupported qcow2 feature(s): {}",
                h.unsupported_features(unknown)
            ));
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 && writable {
            return Err("qcow2: Image is corrupt; cannot be opened read/write".into());
        }
        if h.refcount_order > 6 {
            return Err("Reference count width too large; may not exceed 64 bits".into());
        }
        if u64::from(h.refcount_table_clusters) > MAX_REFTABLE_SIZE / cluster_size {
            return Err("Reference count table too large".into());
        }
        if h.refcount_table_clusters == 0 {
            return Err("Image does not contain a reference count table".into());
        }
        if !table_offset_ok(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
            cluster_size,
            cluster_size,
        ) {
            return Err("Reference count table offset invalid".into());
        }
        if h.nb_snapshots != 0
            && !table_offset_ok(
                h.snapshots_offset,
                u64::from(h.nb_snapshots),
                1,
                cluster_size,
            )
        {
            return Err("Snapshot table offset invalid".into());
        }
        if u64::from(h.l1_size) > MAX_L1_SIZE / 8 {
            return Err("Active L1 table too large".into());
        }
        let l2_coverage = h.l2_entries() * cluster_size;
        if h.size.div_ceil(l2_coverage) > u64::from(h.l1_size) {
            return Err("L1 table is too small".into());
        }
        if !table_offset_ok(h.l1_table_offset, u64::from(h.l1_size), 8, cluster_size) {
            return Err("Active L1 table offset invalid".into());
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err("The cluster size must be at least 16 KiB with extended L2 entries".into());
        }
        if h.compression_type > 1 {
            return Err(format!("Unknown compression type '{}'", h.compression_type));
        }
        if h.compression_type != 0 && h.incompatible_features & INCOMPAT_COMPRESSION == 0 {
            return Err("Compression type incompatible feature bit must be set".into());
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME
                || h.backing_file_offset + u64::from(h.backing_file_size) > cluster_size
            {
                return Err("Backing file name too long".into());
            }
            let start = h.backing_file_offset as usize;
            let end = start + h.backing_file_size as usize;
            if b.len() < end {
                b.resize(end, 0);
            }
            h.backing_file = Some(String::from_utf8_lossy(&b[start..end]).into_owned());
        }
        Ok(h)
    }

    /// QEMU's `report_unsupported_feature`: named bits by name, the rest as
    /// one hex mask.
    fn unsupported_features(&self, mut mask: u64) -> String {
        let mut out = Vec::new();
        for e in self.extensions.iter() {
            if let Extension::FeatureTable(t) = e {
                for f in t {
                    if f.kind == 0 && f.bit < 64 && mask & (1 << f.bit) != 0 {
                        out.push(f.name.clone());
                        mask &= !(1 << f.bit);
                    }
                }
            }
        }
        let mut s = out.join(", ");
        if mask != 0 {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let _ = write!(s, "Unknown incompatible feature: {mask:x}");
        }
        s
    }

    /// Serialises the header, its extensions and the backing file name
    /// into one buffer of `cluster_size` bytes (cluster 0). Sets
    /// `header_length`, `backing_file_offset` and `backing_file_size`.
    ///
    /// Like QEMU, drops the feature name table when it does not fit.
    pub(crate) fn serialize(&mut self) -> Result<Vec<u8>, String> {
        match self.serialize_once() {
            Err(_)
                if self
                    .extensions
                    .iter()
                    .any(|e| matches!(e, Extension::FeatureTable(_))) =>
            {
                self.extensions
                    .retain(|e| !matches!(e, Extension::FeatureTable(_)));
                self.serialize_once()
            }
            r => r,
        }
    }

    fn serialize_once(&mut self) -> Result<Vec<u8>, String> {
        let cs = self.cluster_size() as usize;
        let mut b = Vec::with_capacity(cs);
        let hl = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            V3_HEADER_LEN + self.extra.len()
        };
        self.header_length = hl as u32;
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&[0; 12]); // backing offset/size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            b.push(self.compression_type);
            b.extend_from_slice(&[0; 7]);
            b.extend_from_slice(&self.extra);
        }
        // Version 2 has extensions too, right after its 72-byte header
        // (QEMU writes the backing format there).
        for e in &self.extensions {
            let (kind, data) = match e {
                Extension::BackingFormat(f) => (EXT_BACKING_FORMAT, f.as_bytes().to_vec()),
                Extension::FeatureTable(t) => {
                    let mut d = Vec::with_capacity(t.len() * 48);
                    for f in t {
                        let mut ent = [0u8; 48];
                        ent[0] = f.kind;
                        ent[1] = f.bit;
                        let n = f.name.len().min(46);
                        ent[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                        d.extend_from_slice(&ent);
                    }
                    (EXT_FEATURE_TABLE, d)
                }
                Extension::Bitmaps(d) => (EXT_BITMAPS, d.clone()),
                Extension::Unknown { kind, data } => (*kind, data.clone()),
            };
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(&data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err("Backing file name too long".into());
            }
            self.backing_file_offset = b.len() as u64;
            self.backing_file_size = name.len() as u32;
            b.extend_from_slice(name.as_bytes());
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if b.len() > cs {
            return Err("Header, extensions and backing file name exceed the first cluster".into());
        }
        b.resize(cs, 0);
        Ok(b)
    }

    /// The feature name table QEMU writes.
    pub(crate) fn qemu_feature_table() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            extra: Vec::new(),
            extensions: vec![
                Extension::BackingFormat("qcow2".into()),
                Extension::FeatureTable(Header::qemu_feature_table()),
            ],
            backing_file: Some("base.qcow2".into()),
        }
    }

    #[test]
    fn serialize_then_parse_round_trips() {
        let mut h = sample();
        let b = h.serialize().unwrap();
        assert_eq!(Header::parse(&b, true).unwrap(), h);
        assert_eq!(h.backing_format(), Some("qcow2"));
    }

    #[test]
    fn parse_when_bad_fields_then_qemu_texts() {
        let mut h = sample();
        let good = h.serialize().unwrap();
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, vec![0, 0, 0, 0], "Image is not in qcow2 format"),
            (
                4,
                99u32.to_be_bytes().to_vec(),
                "Unsupported qcow2 version 99",
            ),
            (
                20,
                40u32.to_be_bytes().to_vec(),
                "Unsupported cluster size: 2^40",
            ),
            (
                40,
                (3u64 << 16 | 1).to_be_bytes().to_vec(),
                "Active L1 table offset invalid",
            ),
            (
                36,
                0x1000_0000u32.to_be_bytes().to_vec(),
                "Active L1 table too large",
            ),
            (
                48,
                12345u64.to_be_bytes().to_vec(),
                "Reference count table offset invalid",
            ),
            (
                72,
                (1u64 << 40).to_be_bytes().to_vec(),
                "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000",
            ),
            (
                72,
                INCOMPAT_CORRUPT.to_be_bytes().to_vec(),
                "qcow2: Image is corrupt; cannot be opened read/write",
            ),
            (100, 0u32.to_be_bytes().to_vec(), "qcow2 header too short"),
        ];
        for (off, bytes, want) in cases {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            assert_eq!(Header::parse(&b, true).unwrap_err(), want, "field at {off}");
        }
        assert_eq!(
            Header::parse(&good[..50], false).unwrap_err(),
            "qcow2 header too short"
        );
    }

    #[test]
    fn parse_when_corrupt_bit_then_read_only_allowed() {
        let mut h = sample();
        h.incompatible_features = INCOMPAT_CORRUPT;
        let b = h.serialize().unwrap();
        assert!(Header::parse(&b, false).is_ok());
    }

    #[test]
    fn parse_when_named_unknown_feature_then_name_reported() {
        let mut h = sample();
        h.extensions = vec![Extension::FeatureTable(vec![FeatureName {
            kind: 0,
            bit: 9,
            name: "frobnication".into(),
        }])];
        h.incompatible_features = 1 << 9 | 1 << 12;
        let b = h.serialize().unwrap();
        assert_eq!(
            Header::parse(&b, false).unwrap_err(),
            "Unsupported qcow2 feature(s): frobnication, Unknown incompatible feature: 1000"
        );
    }

    #[test]
    fn serialize_when_512b_clusters_then_feature_table_dropped() {
        let mut h = sample();
        h.cluster_bits = 9;
        h.l1_size = 1 << 15;
        h.l1_table_offset = 3 * 512;
        h.refcount_table_offset = 512;
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 512);
        assert_eq!(h.extensions, vec![Extension::BackingFormat("qcow2".into())]);
        assert_eq!(Header::parse(&b, true).unwrap(), h);
    }

    #[test]
    fn version2_round_trips() {
        let mut h = sample();
        h.version = 2;
        h.extensions.clear();
        h.header_length = 72;
        let b = h.serialize().unwrap();
        assert_eq!(Header::parse(&b, true).unwrap(), h);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn round_trip(
                cluster_bits in 10u32..=21,
                size in 0u64..(1 << 34),
                incompat in prop::sample::select(vec![0u64, INCOMPAT_DIRTY, INCOMPAT_EXTL2]),
                compat in any::<u64>(),
                autoclear in any::<u64>(),
                name in proptest::option::of("[a-z0-9./]{1,60}"),
                extra in proptest::collection::vec(any::<u8>(), 0..3),
            ) {
                let cluster_bits = if incompat & INCOMPAT_EXTL2 != 0 { cluster_bits.max(14) } else { cluster_bits };
                let mut h = sample();
                h.cluster_bits = cluster_bits;
                h.size = size;
                let cs = 1u64 << cluster_bits;
                let l2 = cs / if incompat & INCOMPAT_EXTL2 != 0 { 16 } else { 8 };
                h.l1_size = size.div_ceil(l2 * cs) as u32;
                h.l1_table_offset = 3 * cs;
                h.refcount_table_offset = cs;
                h.incompatible_features = incompat;
                h.compatible_features = compat;
                h.autoclear_features = autoclear;
                h.backing_file = name;
                h.extra = extra.iter().flat_map(|&x| [x; 8]).collect();
                let b = h.serialize().unwrap();
                prop_assert_eq!(Header::parse(&b, true).unwrap(), h);
            }

            #[test]
            fn mutations_never_panic(
                muts in proptest::collection::vec((0usize..4096, any::<u8>()), 1..16),
                cut in 0usize..5000,
                writable in any::<bool>(),
            ) {
                let mut h = sample();
                h.cluster_bits = 12;
                h.l1_table_offset = 3 << 12;
                h.refcount_table_offset = 1 << 12;
                h.l1_size = 512;
                h.autoclear_features = AUTOCLEAR_BITMAPS;
                let mut ext = 1u32.to_be_bytes().to_vec();
                ext.extend_from_slice(&[0; 4]);
                ext.extend_from_slice(&32u64.to_be_bytes());
                ext.extend_from_slice(&(4u64 << 12).to_be_bytes());
                h.extensions.push(Extension::Bitmaps(ext));
                let mut b = h.serialize().unwrap();
                for (i, v) in muts {
                    if i < b.len() { b[i] = v; }
                }
                b.truncate(cut);
                if let Ok(h) = Header::parse(&b, writable) {
                    for e in &h.extensions {
                        if let Extension::Bitmaps(d) = e {
                            let _ = super::super::super::bitmaps::Ext::parse(d, h.cluster_size());
                        }
                    }
                }
            }
        }
    }
}
