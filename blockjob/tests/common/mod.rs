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

/// Runs our `aio-img ARGS`: (exit code, stdout, stderr).
pub(crate) fn aio_img(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aio-img"))
        .args(args)
        .output()
        .expect("run aio-img");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// A fresh qcow2 image of `size` bytes (QEMU's defaults) at `img`,
/// opened read-write on `ctx` in `g`.
pub(crate) fn fresh_qcow2(
    ctx: &aio::AioContext,
    g: &BlockGraph,
    img: &Path,
    size: u64,
) -> Arc<BlockNode> {
    let opts = blockjob::block::CreateOptions::new(size);
    ctx.block_on(blockjob::block::create_qcow2(img, &opts))
        .expect("create image");
    ctx.block_on(g.open_image(img, &OpenOptions::new()))
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

/// Job events as short strings: status names, and event names for the
/// others (`created running ... BLOCK_JOB_COMPLETED concluded null`).
pub(crate) type JobLog = Arc<std::sync::Mutex<Vec<String>>>;

/// A registry on `clock` whose events are logged.
pub(crate) fn registry(clock: aio::ClockType) -> (blockjob::job::JobRegistry, JobLog) {
    let reg = blockjob::job::JobRegistry::new(clock);
    let log: JobLog = Arc::default();
    let l = log.clone();
    reg.subscribe(move |ev: &blockjob::job::JobEvent| {
        let s = match ev {
            blockjob::job::JobEvent::StatusChange { status, .. } => status.as_str().to_string(),
            other => other.name().to_string(),
        };
        l.lock().unwrap().push(s);
    });
    (reg, log)
}

/// The log joined with spaces.
pub(crate) fn events(log: &JobLog) -> String {
    log.lock().unwrap().join(" ")
}

/// `qemu-img map --output=json IMG`'s entries.
pub(crate) fn qemu_map(img: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["map", "--output=json", p(img)]);
    serde_json::from_str(&out).expect("qemu-img map JSON")
}

/// A qcow2 image of `size` bytes (64 KiB clusters), optionally backed.
pub(crate) fn create(img: &Path, size: &str, backing: Option<&Path>) {
    match backing {
        Some(b) => qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(b),
            "-F",
            "qcow2",
            p(img),
            size,
        ]),
        None => qemu_img(&["create", "-q", "-f", "qcow2", p(img), size]),
    };
}

/// base ← mid ← top, 4 MiB: base all 0x11 with a zeroed hole, mid and
/// top patterns over parts of it (some overlapping, one zero write in
/// mid).
pub(crate) fn make_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    create(&base, "4M", None);
    create(&mid, "4M", Some(&base));
    create(&top, "4M", Some(&mid));
    qemu_io(
        &base,
        &["write -P 0x11 0 4M".into(), "write -z 3M 256k".into()],
    );
    qemu_io(
        &mid,
        &[
            "write -P 0x22 512k 1M".into(),
            "write -P 0x23 2560k 64k".into(),
            "write -z 3584k 128k".into(),
        ],
    );
    qemu_io(
        &top,
        &[
            "write -P 0x33 1M 256k".into(),
            "write -P 0x34 4032k 64k".into(),
        ],
    );
    (base, mid, top)
}

/// `blockdev-add` of the chain with node names top, mid, base (all
/// writable, as QSD's nested `blockdev-add` opens them).
pub(crate) fn add_chain(
    ctx: &aio::AioContext,
    g: &BlockGraph,
    base: &Path,
    mid: &Path,
    top: &Path,
) -> Arc<BlockNode> {
    let args = serde_json::json!({
        "driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": p(top)},
        "backing": {"driver": "qcow2", "node-name": "mid",
            "file": {"driver": "file", "filename": p(mid)},
            "backing": {"driver": "qcow2", "node-name": "base",
                "file": {"driver": "file", "filename": p(base)}}}});
    ctx.block_on(g.blockdev_add(&args)).expect("blockdev-add")
}

/// `blockdev-add` of one image with its chain from the header.
pub(crate) fn add_image(
    ctx: &aio::AioContext,
    g: &BlockGraph,
    name: &str,
    img: &Path,
) -> Arc<BlockNode> {
    let args = serde_json::json!({"driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": p(img)}});
    ctx.block_on(g.blockdev_add(&args)).expect("blockdev-add")
}

/// Runs the loop until the job waits for a timer or a kick (not in I/O).
pub(crate) fn settle(ctx: &aio::AioContext, job: &blockjob::job::Job) {
    loop {
        ctx.run_until_idle();
        if !job.info().busy {
            ctx.run_until_idle();
            if !job.info().busy {
                return;
            }
        }
        ctx.poll(true);
    }
}

/// Advances the virtual clock by `ns`, timer by timer, letting the job's
/// file I/O finish at each virtual instant (virtual time does not pass
/// while the job waits for its I/O).
pub(crate) fn vstep(ctx: &aio::AioContext, job: &blockjob::job::Job, ns: i64) {
    let target = ctx.clock_now(aio::ClockType::Virtual) + ns;
    loop {
        settle(ctx, job);
        let now = ctx.clock_now(aio::ClockType::Virtual);
        match ctx.timer_deadline_ns(aio::ClockType::Virtual) {
            Some(d) if now + d <= target => {
                ctx.virtual_set(now + d);
            }
            _ => break,
        }
    }
    ctx.virtual_set(target);
    settle(ctx, job);
}

/// `qemu-img compare A B` succeeds (same guest view).
pub(crate) fn assert_same(a: &Path, b: &Path) {
    let (code, out) = qemu_img_status(&["compare", p(a), p(b)]);
    assert_eq!(code, 0, "qemu-img compare {a:?} {b:?}: {out}");
}

/// `qemu-img check` finds no errors and no leaks.
pub(crate) fn assert_check(img: &Path) {
    let (code, out) = qemu_img_status(&["check", p(img)]);
    assert_eq!(code, 0, "qemu-img check {img:?}: {out}");
}

/// The backing file qemu-img reports, if any.
pub(crate) fn backing_of(img: &Path) -> Option<String> {
    let out = qemu_img(&["info", "--output=json", "-U", p(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_string)
}

/// Runs the loop until the job reaches `status`.
pub(crate) fn wait_status(
    ctx: &aio::AioContext,
    job: &blockjob::job::Job,
    status: blockjob::job::JobStatus,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while job.status() != status {
        assert!(
            std::time::Instant::now() < deadline,
            "job stuck in {:?}",
            job.status()
        );
        ctx.poll(true);
    }
}

/// `qemu-img convert -O qcow2` of `img`'s guest view into `dir/name`.
pub(crate) fn snapshot(img: &Path, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    qemu_img(&["convert", "-O", "qcow2", p(img), p(&out)]);
    out
}

/// Writes `bytes` at `off` in `file` (growing it if needed).
pub(crate) fn patch(file: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(file).expect("read image");
    if b.len() < off + bytes.len() {
        b.resize(off + bytes.len(), 0);
    }
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(file, b).expect("write image");
}

/// The big-endian u64 at `off`.
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Deterministic pseudo-random numbers (xorshift), so failures replay.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next number.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
