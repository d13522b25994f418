//! Creating qcow2 images (QEMU's layout: header, refcount table, one
//! refcount block, then the L1 table).

use std::path::Path;

use super::entry::set_refcount;
use super::header::{Extension, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_EXTL2, V3_HEADER_LEN};
use crate::{Error, Result};

/// QAPI's `PreallocMode`: what creating an image allocates up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Preallocation {
    /// Nothing: a sparse image (the default).
    #[default]
    Off,
    /// qcow2: every L2 table and data cluster allocated, the data
    /// clusters marked as reading zeroes; the file grows sparsely.
    Metadata,
    /// As `Metadata` with the file's space reserved (`fallocate`).
    Falloc,
    /// As `Metadata` with every byte written.
    Full,
}

impl Preallocation {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// The mode named `s` (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }
}

/// Options for creating a qcow2 image (`qemu-img create -f qcow2 -o ...`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name, recorded as given (relative names are resolved
    /// against the image's directory when opened).
    pub backing_file: Option<String>,
    /// Backing file format, recorded in the header extension.
    pub backing_format: Option<String>,
    /// qcow2 version: 3 (`compat=1.1`, default) or 2 (`compat=0.10`).
    pub version: u32,
    /// Refcount width in bits: a power of two from 1 to 64 (default 16;
    /// other widths need version 3).
    pub refcount_bits: u32,
    /// Set the lazy-refcounts compatible feature (version 3). Refcounts
    /// are still kept up to date here; QEMU may then write lazily.
    pub lazy_refcounts: bool,
    /// What to allocate up front.
    pub preallocation: Preallocation,
    /// Extended L2 entries (subclusters; version 3, clusters of 16 KiB or
    /// more). Such images are read here but not written: the image is
    /// created for QEMU, or to be opened read-only.
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            extended_l2: false,
        }
    }
}

impl CreateOptions {
    /// Options for an image of `size` bytes, other fields default.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            ..Default::default()
        }
    }
    /// Sets the cluster size.
    pub fn cluster_size(mut self, cs: u64) -> Self {
        self.cluster_size = cs;
        self
    }
    /// Sets the backing file and its format.
    pub fn backing(mut self, file: impl Into<String>, format: Option<&str>) -> Self {
        self.backing_file = Some(file.into());
        self.backing_format = format.map(str::to_string);
        self
    }
    /// Sets the qcow2 version (2 or 3).
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }
    /// Sets the refcount width in bits.
    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }
    /// Sets the lazy-refcounts feature bit.
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self
    }
    /// Sets the preallocation mode.
    pub fn preallocation(mut self, p: Preallocation) -> Self {
        self.preallocation = p;
        self
    }
    /// Sets extended L2 entries.
    pub fn extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self
    }
}

/// Writes an empty image skeleton of size 0 (cluster 0 header, cluster 1
/// refcount table, cluster 2 refcount block); the caller then opens it and
/// grows it to the wanted size, which allocates the L1 table.
pub(crate) fn write_skeleton(path: &Path, o: &CreateOptions) -> Result<()> {
    let name = path.display().to_string();
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {cs})"
        )));
    }
    if o.size % 512 != 0 {
        return Err(Error::InvalidArgument(format!(
            "Image size must be a multiple of 512 bytes (got {})",
            o.size
        )));
    }
    if !(2..=3).contains(&o.version) {
        return Err(Error::InvalidArgument(format!(
            "Invalid qcow2 version {}",
            o.version
        )));
    }
    let rb = o.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(Error::InvalidArgument(
            "Refcount width must be a power of two and may not exceed 64 bits".into(),
        ));
    }
    if o.version < 3 && rb != 16 {
        return Err(Error::InvalidArgument(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)".into(),
        ));
    }
    if o.version < 3 && o.lazy_refcounts {
        return Err(Error::InvalidArgument(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into(),
        ));
    }
    if o.extended_l2 {
        if o.version < 3 {
            return Err(Error::InvalidArgument(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into(),
            ));
        }
        if cs < 16384 {
            return Err(Error::InvalidArgument(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            ));
        }
        if o.preallocation != Preallocation::Off {
            return Err(Error::InvalidArgument(
                "preallocation with extended L2 entries is not supported".into(),
            ));
        }
    }
    if o.preallocation != Preallocation::Off && o.backing_file.is_some() && !o.extended_l2 {
        return Err(Error::InvalidArgument(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        ));
    }
    let mut h = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cs.trailing_zeros(),
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: rb.trailing_zeros(),
        header_length: V3_HEADER_LEN as u32,
        compression_type: 0,
        extra: Vec::new(),
        extensions: Vec::new(),
        backing_file: o.backing_file.clone(),
    };
    if o.extended_l2 {
        h.incompatible_features |= INCOMPAT_EXTL2;
        h.size = o.size;
        h.l1_size = o.size.div_ceil(cs * (cs / 16)) as u32;
        h.l1_table_offset = if h.l1_size > 0 { 3 * cs } else { 0 };
    }
    if let Some(f) = &o.backing_format {
        h.extensions.push(Extension::BackingFormat(f.clone()));
    }
    if o.version == 3 {
        h.extensions
            .push(Extension::FeatureTable(Header::qemu_feature_table()));
    }
    let mut buf = h
        .serialize()
        .map_err(|r| Error::InvalidArgument(format!("{name}: {r}")))?;
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    buf.extend_from_slice(&table);
    // With extended L2 entries the image is not opened read-write to be
    // grown (we do not write such images): its L1 table is laid out here,
    // after the refcount block, all zero.
    let l1_clusters = if o.extended_l2 {
        let l1_size = o.size.div_ceil(cs * (cs / 16));
        let n = (l1_size * 8).div_ceil(cs);
        let covered = cs * 8 / u64::from(rb);
        if 3 + n > covered {
            return Err(Error::InvalidArgument(format!(
                "{name}: the image is too large to be created with extended L2 entries here"
            )));
        }
        let l1_size = u32::try_from(l1_size)
            .map_err(|_| Error::InvalidArgument(format!("{name}: the image is too large")))?;
        (l1_size, n)
    } else {
        (0, 0)
    };
    let mut block = vec![0u8; cs as usize];
    for i in 0..3 + l1_clusters.1 {
        set_refcount(&mut block, rb.trailing_zeros(), i, 1);
    }
    buf.extend_from_slice(&block);
    buf.resize(buf.len() + (l1_clusters.1 * cs) as usize, 0);
    std::fs::write(path, &buf).map_err(|e| Error::open(&name, e.to_string()))?;
    Ok(())
}

/// Creates a qcow2 image at `path` (overwriting it): writes the skeleton,
/// opens it and grows it to `o.size`, then closes it cleanly.
pub(crate) async fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    write_skeleton(path, o)?;
    if o.extended_l2 {
        // Complete as written (see `write_skeleton`).
        return Ok(());
    }
    let graph = crate::block::BlockGraph::new();
    let opts = crate::block::OpenOptions {
        read_only: false,
        format: Some("qcow2".into()),
        no_backing: true,
        ..Default::default()
    };
    let node = graph.open_image(path, &opts).await?;
    let mut r = node.truncate(o.size).await;
    if r.is_ok() && o.preallocation != Preallocation::Off {
        r = node.preallocate(o.preallocation).await;
    }
    let c = node.close().await;
    r.and(c)
}
