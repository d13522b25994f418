//! Creating qcow2 images (QEMU's layout: header, refcount table, one
//! refcount block, then the L1 table).

use std::path::Path;

use super::header::{Extension, Header, V3_HEADER_LEN};
use crate::{Error, Result};

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
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
            version: 3,
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
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V3_HEADER_LEN as u32,
        compression_type: 0,
        extra: Vec::new(),
        extensions: Vec::new(),
        backing_file: o.backing_file.clone(),
    };
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
    let mut block = vec![0u8; cs as usize];
    for i in 0..3 {
        block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    buf.extend_from_slice(&block);
    std::fs::write(path, &buf).map_err(|e| Error::open(&name, e.to_string()))?;
    Ok(())
}

/// Creates a qcow2 image at `path` (overwriting it): writes the skeleton,
/// opens it and grows it to `o.size`, then closes it cleanly.
pub(crate) async fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    write_skeleton(path, o)?;
    let graph = crate::block::BlockGraph::new();
    let opts = crate::block::OpenOptions {
        read_only: false,
        format: Some("qcow2".into()),
        no_backing: true,
        ..Default::default()
    };
    let node = graph.open_image(path, &opts).await?;
    let r = node.truncate(o.size).await;
    let c = node.close().await;
    r.and(c)
}
