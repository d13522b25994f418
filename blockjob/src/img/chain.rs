//! A backing chain as its headers describe it, reopened with chosen
//! layers writable (`open_image` opens backing files read-only, but
//! commit writes its base).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::block::{BlockGraph, BlockNode, OpenOptions};
use crate::{Error, Result};

/// One layer of a chain.
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    /// The path it was opened by (the top: as given; below: resolved
    /// from the link in the layer above).
    pub(crate) file: String,
    /// Its format (`qcow2`, `raw`).
    pub(crate) format: String,
    /// The backing link recorded in it.
    pub(crate) link: Option<String>,
}

/// Reads `file`'s chain, top first, by opening it read-only and closing
/// it again. Missing files, bad headers and backing loops fail here.
pub(crate) async fn probe(file: &str, format: Option<&str>) -> Result<Vec<Layer>> {
    let g = BlockGraph::new();
    let mut o = OpenOptions::new().read_only(true);
    if let Some(f) = format {
        o = o.format(f);
    }
    let top = g.open_image(file, &o).await?;
    let layers = top
        .chain()
        .iter()
        .map(|n| Layer {
            file: n.filename().to_string(),
            format: n.driver_name().to_string(),
            link: n.info().backing_filename,
        })
        .collect();
    drop(top);
    g.close_all().await?;
    Ok(layers)
}

/// The node name of layer `i` in [`open`]'s graph.
pub(crate) fn node_name(i: usize) -> String {
    format!("layer{i}")
}

/// Opens `layers` in `g` as nodes [`node_name`]`(i)`, each the backing of
/// the one above, writable where `writable` lists it; returns them top
/// first.
pub(crate) async fn open(
    g: &BlockGraph,
    layers: &[Layer],
    writable: &[usize],
) -> Result<Vec<Arc<BlockNode>>> {
    let mut nodes = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate().rev() {
        let mut args = json!({
            "driver": l.format,
            "node-name": node_name(i),
            "read-only": !writable.contains(&i),
            "file": {"driver": "file", "filename": l.file},
        });
        if l.format != "raw" {
            args["backing"] = if i + 1 < layers.len() {
                json!(node_name(i + 1))
            } else {
                serde_json::Value::Null
            };
        }
        nodes.push(g.blockdev_add(&args).await?);
    }
    nodes.reverse();
    Ok(nodes)
}

fn canon(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// The directory `file` is in (links in it are relative to it).
pub(crate) fn dir_of(file: &str) -> PathBuf {
    Path::new(file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `name` as a path to open: relative names are relative to the
/// directory of `image`, as QEMU resolves backing file names.
pub(crate) fn relative_to(image: &str, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir_of(image).join(p)
    }
}

/// Which layer below the top `name` names (QEMU's
/// `bdrv_find_backing_image`): the link recorded in the layer above it,
/// or the same file, relative to the current directory or to the top's.
pub(crate) fn find(layers: &[Layer], name: &str) -> Option<usize> {
    let top = layers.first()?;
    let wanted: Vec<PathBuf> = [PathBuf::from(name), relative_to(&top.file, name)]
        .iter()
        .filter_map(|p| canon(p))
        .collect();
    (1..layers.len()).find(|&i| {
        layers[i - 1].link.as_deref() == Some(name)
            || canon(Path::new(&layers[i].file)).is_some_and(|c| wanted.contains(&c))
    })
}

/// [`find`], or QEMU's error naming the chain's top.
pub(crate) fn find_or_fail(layers: &[Layer], name: &str) -> Result<usize> {
    find(layers, name).ok_or_else(|| {
        let top = layers.first().map(|l| l.file.as_str()).unwrap_or_default();
        Error::InvalidArgument(format!(
            "Did not find '{name}' in the backing chain of '{top}'"
        ))
    })
}

/// The backing link the top should record for layer `i`: the link the
/// layer above `i` records, when that one is in the top's directory (or
/// the link is absolute); otherwise `i`'s absolute path.
pub(crate) fn link_for(layers: &[Layer], i: usize) -> Result<String> {
    let above = &layers[i - 1];
    let (Some(top), Some(link)) = (layers.first(), above.link.as_ref()) else {
        return Err(Error::InvalidArgument(format!(
            "'{}' has no backing file",
            layers[0].file
        )));
    };
    let same_dir = canon(&dir_of(&top.file).join(".")) == canon(&dir_of(&above.file).join("."));
    if Path::new(link).is_absolute() || same_dir {
        return Ok(link.clone());
    }
    canon(Path::new(&layers[i].file))
        .map(|p| p.display().to_string())
        .ok_or_else(|| Error::open(&layers[i].file, "No such file or directory"))
}
