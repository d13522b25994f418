//! L1 and L2 table entries, and refcount block entries of any width.

/// Bits 9–55: a cluster-aligned host offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63 of L1/L2 entries: the refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: reads as zeroes (v3).
pub(crate) const ZERO: u64 = 1;

/// What one (sub)cluster of guest data maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated in this layer: read from the backing file.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster, if any.
    Zero {
        /// The host cluster still owned by the entry, if any.
        host: Option<u64>,
    },
    /// Data at this host offset (of the (sub)cluster's start).
    Data {
        /// Host byte offset.
        host: u64,
    },
    /// A compressed cluster: `len` bytes at `host` (not aligned).
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Upper bound of the compressed length in bytes.
        len: u64,
    },
}

/// A decoded L2 entry (both words for extended L2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct L2Entry {
    /// The first (standard) word.
    pub(crate) word: u64,
    /// The subcluster bitmap (extended L2 only).
    pub(crate) bitmap: Option<u64>,
}

impl L2Entry {
    /// Host cluster offset of a standard entry (0 = none).
    pub(crate) fn host(&self) -> u64 {
        self.word & OFFSET_MASK
    }

    /// Whether this is a compressed cluster.
    pub(crate) fn is_compressed(&self) -> bool {
        self.word & COMPRESSED != 0
    }

    /// How subcluster `sc` (0 for standard L2) reads. `cluster_bits`
    /// decides the compressed descriptor layout; `sc_size` is the
    /// subcluster size. Errors describe invalid entries.
    pub(crate) fn mapping(
        &self,
        cluster_bits: u32,
        sc: u64,
        sc_size: u64,
    ) -> Result<Mapping, String> {
        if self.is_compressed() {
            let x = 62 - (cluster_bits - 8);
            let host = self.word & ((1u64 << x) - 1);
            let sectors = ((self.word & !(COMPRESSED | COPIED)) >> x) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            return Ok(Mapping::Compressed { host, len });
        }
        let host = self.host();
        match self.bitmap {
            None => {
                if self.word & ZERO != 0 {
                    Ok(Mapping::Zero {
                        host: (host != 0).then_some(host),
                    })
                } else if host != 0 {
                    Ok(Mapping::Data { host })
                } else {
                    Ok(Mapping::Unallocated)
                }
            }
            Some(bm) => {
                let alloc = bm & (1 << sc) != 0;
                let zero = bm & (1 << (sc + 32)) != 0;
                if alloc && zero {
                    return Err(format!(
                        "subcluster {sc} is both allocated and zero (bitmap {bm:#018x})"
                    ));
                }
                if alloc {
                    if host == 0 {
                        return Err(format!("subcluster {sc} allocated without a host cluster"));
                    }
                    Ok(Mapping::Data {
                        host: host + sc * sc_size,
                    })
                } else if zero {
                    Ok(Mapping::Zero { host: None })
                } else {
                    Ok(Mapping::Unallocated)
                }
            }
        }
    }
}

/// The host bytes a standard or compressed L2 entry word owns, as
/// (offset, length): a whole cluster, or the 512-byte sectors of a
/// compressed cluster (which may straddle clusters). `None` when the entry
/// owns nothing (unallocated, or zero without a preallocated cluster).
pub(crate) fn host_range(word: u64, cluster_bits: u32) -> Option<(u64, u64)> {
    if word & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = word & ((1u64 << x) - 1);
        let sectors = ((word & !(COMPRESSED | COPIED)) >> x) + 1;
        return Some((host & !511, sectors * 512));
    }
    let host = word & OFFSET_MASK;
    (host != 0).then_some((host, 1 << cluster_bits))
}

/// The host clusters a [`host_range`] covers.
pub(crate) fn host_clusters(word: u64, cluster_bits: u32) -> std::ops::Range<u64> {
    match host_range(word, cluster_bits) {
        Some((off, len)) => (off >> cluster_bits)..((off + len - 1) >> cluster_bits) + 1,
        None => 0..0,
    }
}

/// Reads refcount `index` from a refcount block of width `1 << order` bits.
pub(crate) fn get_refcount(block: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let off = index as usize * n;
        block[off..off + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let per_byte = 8 / bits;
        let byte = block[(index / per_byte) as usize];
        let shift = (index % per_byte) * bits;
        (u64::from(byte) >> shift) & ((1 << bits) - 1)
    }
}

/// Writes refcount `index` into a refcount block of width `1 << order` bits.
pub(crate) fn set_refcount(block: &mut [u8], order: u32, index: u64, value: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let off = index as usize * n;
        let be = value.to_be_bytes();
        block[off..off + n].copy_from_slice(&be[8 - n..]);
    } else {
        let per_byte = 8 / bits;
        let i = (index / per_byte) as usize;
        let shift = (index % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) << shift;
        block[i] = ((u64::from(block[i]) & !mask) | ((value << shift) & mask)) as u8;
    }
}

/// The largest refcount of width `1 << order` bits.
pub(crate) fn max_refcount(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set_refcount(
                    &mut block,
                    order,
                    i,
                    i % (max_refcount(order).min(1000) + 1),
                );
            }
            for i in 0..entries {
                assert_eq!(
                    get_refcount(&block, order, i),
                    i % (max_refcount(order).min(1000) + 1),
                    "order {order} index {i}"
                );
            }
        }
    }

    #[test]
    fn standard_entries_decode() {
        let e = |w| {
            L2Entry {
                word: w,
                bitmap: None,
            }
            .mapping(16, 0, 65536)
            .unwrap()
        };
        assert_eq!(e(0), Mapping::Unallocated);
        assert_eq!(e(1), Mapping::Zero { host: None });
        assert_eq!(e(COPIED | 0x50000), Mapping::Data { host: 0x50000 });
        assert_eq!(
            e(0x50000 | 1),
            Mapping::Zero {
                host: Some(0x50000)
            }
        );
    }

    #[test]
    fn compressed_entry_decodes() {
        // cluster_bits 16: x = 54; 2 additional sectors, host 0x12345.
        let w = COMPRESSED | (2u64 << 54) | 0x12345;
        let m = L2Entry {
            word: w,
            bitmap: None,
        }
        .mapping(16, 0, 65536)
        .unwrap();
        assert_eq!(
            m,
            Mapping::Compressed {
                host: 0x12345,
                len: 3 * 512 - 0x145
            }
        );
    }

    #[test]
    fn host_range_when_compressed_then_sectors_across_clusters() {
        let w = COMPRESSED | (2u64 << 54) | 0x1fe45;
        assert_eq!(host_range(w, 16), Some((0x1fe00, 3 * 512)));
        assert_eq!(host_clusters(w, 16), 1..3);
        assert_eq!(host_clusters(COPIED | 0x50000, 16), 5..6);
        assert_eq!(host_clusters(ZERO, 16), 0..0);
        assert_eq!(host_range(0, 16), None);
    }

    #[test]
    fn subclusters_decode() {
        let ent = L2Entry {
            word: 0x40000,
            bitmap: Some(1 | (1 << 33)),
        };
        assert_eq!(
            ent.mapping(16, 0, 2048).unwrap(),
            Mapping::Data { host: 0x40000 }
        );
        assert_eq!(
            ent.mapping(16, 1, 2048).unwrap(),
            Mapping::Zero { host: None }
        );
        assert_eq!(ent.mapping(16, 2, 2048).unwrap(), Mapping::Unallocated);
        let bad = L2Entry {
            word: 0x40000,
            bitmap: Some(1 | (1 << 32)),
        };
        assert!(bad.mapping(16, 0, 2048).is_err());
    }
}
