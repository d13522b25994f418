//! Helpers for the interop tests: run QEMU's tools, compare images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockjob::block::{BlockGraph, BlockNode, OpenOptions};

/// Runs `qemu-img ARGS`, panicking with its output on failure; returns stdout.
pub(crate) fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-img ARGS` and returns (exit code, stdout+stderr).
pub(crate) fn qemu_img_status(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `qemu-io -c CMD ... FILE`.
pub(crate) fn qemu_io(file: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(file).output().expect("run qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img convert -O raw` of `img` (following its chain).
pub(crate) fn to_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.raw",
        img.file_name().and_then(|s| s.to_str()).unwrap_or("img")
    ));
    qemu_img(&["convert", "-O", "raw", p(img), p(&out)]);
    std::fs::read(&out).expect("read raw")
}

/// A path as &str.
pub(crate) fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Opens an image read-only through our block layer.
pub(crate) fn open_ro(ctx: &aio::AioContext, g: &BlockGraph, img: &Path) -> Arc<BlockNode> {
    ctx.block_on(g.open_image(img, &OpenOptions::new().read_only(true)))
        .expect("open image")
}

/// Reads the whole node in chunks of `chunk` bytes.
pub(crate) fn read_all(ctx: &aio::AioContext, node: &Arc<BlockNode>, chunk: u64) -> Vec<u8> {
    let size = node.len();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        out.extend(
            ctx.block_on(node.read(pos, vec![0; n as usize]))
                .expect("read"),
        );
        pos += n;
    }
    out
}

/// A temporary directory.
pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// `dir/name`.
pub(crate) fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
