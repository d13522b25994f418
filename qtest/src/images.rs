//! Building and checking images with QEMU's own tools, so a test's inputs
//! and its verdict come from the oracle, not from the code under test.
//!
//! ```no_run
//! use qtest::images::Chain;
//! let dir = tempfile::tempdir()?;
//! // base (32 MiB of 0x5a) <- top (empty)
//! let chain = Chain::new(dir.path(), "32M")
//!     .layer("base", &["write -P 0x5a 0 32M"])
//!     .layer("top", &[])
//!     .build()?;
//! let mut d = qtest::Daemon::spawn(&chain.blockdev_args())?;
//! // ... run a job on node "top" ...
//! drop(d);
//! assert!(qtest::images::check(&chain.path("top").unwrap()).is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::{Error, Result};

/// Runs a tool; its stdout on success, the exit status and stderr in the
/// error otherwise.
fn tool(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| Error::Io(format!("running {cmd}: {e} (is qemu-utils installed?)")))?;
    if !out.status.success() {
        return Err(Error::Io(format!(
            "{cmd} {}: {} {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Io(format!("{} is not UTF-8", p.display())))
}

/// `qemu-img ARGS`; its stdout.
///
/// # Errors
///
/// The tool is missing or fails.
pub fn qemu_img(args: &[&str]) -> Result<String> {
    tool("qemu-img", args)
}

/// `qemu-io -c CMD ... IMAGE` (format probed); its stdout.
///
/// # Errors
///
/// The tool is missing or fails (qemu-io exits non-zero on a failed
/// command, e.g. a `read -P` that finds other data).
pub fn qemu_io(image: &Path, commands: &[&str]) -> Result<String> {
    let mut args = Vec::with_capacity(commands.len() * 2 + 1);
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(path_str(image)?);
    let out = tool("qemu-io", &args)?;
    // qemu-io reports a failed command on stdout and may still exit 0.
    if out.contains("Pattern verification failed") || out.contains("failed:") {
        return Err(Error::Io(format!("qemu-io {commands:?}: {out}")));
    }
    Ok(out)
}

/// Whether two images read the same (`qemu-img compare`, formats probed).
///
/// # Errors
///
/// `qemu-img` is missing or cannot open an image (exit status 2).
pub fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", path_str(a)?, path_str(b)?])
        .output()
        .map_err(|e| Error::Io(format!("running qemu-img: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(Error::Io(format!(
            "qemu-img compare {} {}: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        ))),
    }
}

/// `qemu-img check`: Ok if the image has no errors and no leaks.
///
/// # Errors
///
/// What `qemu-img check` reported.
pub fn check(image: &Path) -> Result<()> {
    tool("qemu-img", &["check", path_str(image)?]).map(|_| ())
}

/// One qcow2 layer of a [`Chain`]: its node name and the `qemu-io`
/// commands that fill it.
#[derive(Clone, Debug)]
struct Layer {
    name: String,
    writes: Vec<String>,
}

/// A qcow2 backing chain built with `qemu-img create -b` and filled with
/// `qemu-io`: layers are given base first; each image is `DIR/NAME.qcow2`
/// and its node name is `NAME`.
#[derive(Clone, Debug)]
pub struct Chain {
    dir: PathBuf,
    size: String,
    layers: Vec<Layer>,
    built: Vec<(String, PathBuf)>,
}

impl Chain {
    /// A chain of `size` (qemu-img syntax: `32M`) images in `dir`.
    pub fn new(dir: &Path, size: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            size: size.to_string(),
            layers: Vec::new(),
            built: Vec::new(),
        }
    }

    /// Adds a layer above the previous ones, filled by `writes` (qemu-io
    /// commands such as `write -P 0x5a 0 1M`).
    #[must_use]
    pub fn layer(mut self, name: &str, writes: &[&str]) -> Self {
        self.layers.push(Layer {
            name: name.to_string(),
            writes: writes.iter().map(|w| w.to_string()).collect(),
        });
        self
    }

    /// Creates and fills the images, base first.
    ///
    /// # Errors
    ///
    /// A tool failed.
    pub fn build(mut self) -> Result<Self> {
        let mut below: Option<PathBuf> = None;
        for l in &self.layers {
            let img = self.dir.join(format!("{}.qcow2", l.name));
            let img_s = path_str(&img)?.to_string();
            match &below {
                Some(b) => {
                    let b = path_str(b)?.to_string();
                    qemu_img(&[
                        "create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &img_s,
                    ])?
                }
                None => qemu_img(&["create", "-q", "-f", "qcow2", &img_s, &self.size])?,
            };
            if !l.writes.is_empty() {
                let cmds: Vec<&str> = l.writes.iter().map(String::as_str).collect();
                qemu_io(&img, &cmds)?;
            }
            self.built.push((l.name.clone(), img.clone()));
            below = Some(img);
        }
        Ok(self)
    }

    /// The image of layer `name` (after [`build`](Self::build)).
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.built
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
    }

    /// `--blockdev` arguments for `aiod` opening every layer as a node
    /// named after it, each with the one below as its backing node.
    pub fn blockdev_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut below: Option<&str> = None;
        for (name, img) in &self.built {
            let mut o = json!({"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": img}});
            if let Some(b) = below {
                o["backing"] = json!(b);
            }
            out.push("--blockdev".to_string());
            out.push(o.to_string());
            below = Some(name);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_reads_through_to_its_base_and_passes_check() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chain::new(dir.path(), "1M")
            .layer("base", &["write -P 0x11 0 64k"])
            .layer("top", &["write -P 0x22 64k 64k"])
            .build()
            .unwrap();
        let top = c.path("top").unwrap();
        qemu_io(&top, &["read -P 0x11 0 64k", "read -P 0x22 64k 64k"]).unwrap();
        assert!(qemu_io(&top, &["read -P 0x33 0 64k"]).is_err());
        check(&top).unwrap();
        assert!(!same_content(&top, &c.path("base").unwrap()).unwrap());
        let args = c.blockdev_args();
        assert_eq!(args.len(), 4);
        assert!(args[3].contains("\"backing\":\"base\""), "{}", args[3]);
    }
}
