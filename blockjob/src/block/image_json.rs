//! QEMU's `ImageInfo` as JSON: what `qemu-img info --output=json` prints
//! for one image and what `query-named-block-nodes` puts under `image`.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{BlockNode, SnapshotInfo};

/// QMP's `SnapshotInfo` for one internal snapshot (`icount` only when
/// the image records one).
pub fn snapshot_info_json(s: &SnapshotInfo) -> Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    if let Some(i) = s.icount {
        v["icount"] = json!(i);
    }
    v
}

/// The `ImageInfo` object of `node` (its own layer, not its backing
/// chain): `filename`, `format`, `virtual-size`, `cluster-size`,
/// `actual-size` (when the file name is a local file), the backing file
/// names, `dirty-flag`, `format-specific` and `snapshots` (only when there
/// are some, as QEMU does).
///
/// # Examples
///
/// ```
/// # use blockjob::block::{BlockGraph, OpenOptions, image_info_json};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("a.raw");
/// blockjob::block::create_raw(&path, 1 << 20)?;
/// let ctx = aio::AioContext::new()?;
/// let graph = BlockGraph::new();
/// let v = ctx.block_on(async {
///     let node = graph.open_image(&path, &OpenOptions::default()).await?;
///     Ok::<_, blockjob::Error>(image_info_json(&node).await)
/// })?;
/// assert_eq!(v["format"], "raw");
/// assert_eq!(v["virtual-size"], 1 << 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub async fn image_info_json(node: &Arc<BlockNode>) -> Value {
    let i = node.info();
    let mut m = Map::new();
    m.insert("virtual-size".into(), json!(i.virtual_size));
    m.insert("filename".into(), json!(i.filename));
    if let Some(cs) = i.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(i.format));
    if let Ok(md) = std::fs::metadata(&i.filename) {
        use std::os::unix::fs::MetadataExt;
        m.insert("actual-size".into(), json!(md.blocks() * 512));
    }
    if let Some(b) = &i.backing_filename {
        m.insert("backing-filename".into(), json!(b));
        if let Some(bn) = node.backing() {
            m.insert("full-backing-filename".into(), json!(bn.filename()));
        }
    }
    if let Some(f) = &i.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    // QEMU reports the flag for every node, false for formats without one.
    m.insert("dirty-flag".into(), json!(i.dirty.unwrap_or(false)));
    if i.specific.is_empty() && i.format == "file" {
        // file-posix reports its (here empty) specific facts.
        m.insert(
            "format-specific".into(),
            json!({"type": "file", "data": {}}),
        );
    } else if !i.specific.is_empty() {
        let data: Map<String, Value> = i.specific.iter().cloned().collect();
        m.insert(
            "format-specific".into(),
            json!({"type": i.format, "data": data}),
        );
    }
    if node.supports_snapshots() {
        // A list that fails to load is left out, as an empty one is.
        let list = node.snapshot_list().await.unwrap_or_default();
        if !list.is_empty() {
            let v: Vec<Value> = list.iter().map(snapshot_info_json).collect();
            m.insert("snapshots".into(), Value::Array(v));
        }
    }
    Value::Object(m)
}
