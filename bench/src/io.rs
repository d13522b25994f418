//! File I/O benchmark: 4 KiB random reads or writes at a fixed queue depth
//! on a prepared file, through [`aio::file::File`] with either engine, and
//! the same job run by `fio` for reference.
//!
//! Queue depth `N` is `N` tasks on one context, each looping over one
//! request at a time (pick a random block, issue the request, await it), so
//! exactly `N` requests are in flight. Offsets are uniform over the file's
//! 4 KiB blocks, with replacement (fio: `--norandommap`).

use std::fmt;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aio::file::{AlignedBuf, Engine, File, OpenOptions};
use aio::AioContext;

use crate::Result;

/// The block size of every request.
pub const BS: usize = 4096;

/// Bytes written per call when preparing the file.
const PREP_CHUNK: usize = 1 << 20;

/// Random reads or random writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rw {
    /// 4 KiB reads at random block offsets.
    RandRead,
    /// 4 KiB writes at random block offsets.
    RandWrite,
}

impl Rw {
    /// Both, in table order.
    pub const ALL: [Rw; 2] = [Rw::RandRead, Rw::RandWrite];

    /// The fio name, used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
        }
    }

    /// The `Rw` whose label is `s`.
    pub fn parse(s: &str) -> Option<Rw> {
        Rw::ALL.into_iter().find(|r| r.label() == s)
    }
}

impl fmt::Display for Rw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The name of an engine in tables and JSON: `threads` or `io_uring`.
pub fn engine_label(e: Engine) -> &'static str {
    match e {
        Engine::Threads => "threads",
        Engine::IoUring => "io_uring",
        _ => "unknown",
    }
}

/// The engine whose [`engine_label`] is `s`.
pub fn parse_engine(s: &str) -> Option<Engine> {
    [Engine::Threads, Engine::IoUring]
        .into_iter()
        .find(|&e| engine_label(e) == s)
}

/// One benchmark job: what fio calls a job file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoJob {
    /// The file (prepared with [`prepare_file`]).
    pub path: PathBuf,
    /// Its size; offsets are drawn from `[0, size / BS)` blocks.
    pub size: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Reads or writes.
    pub rw: Rw,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// Check that every block read starts with its own offset (as
    /// [`prepare_file`] and this benchmark's writes leave it). Only valid
    /// while nothing else (fio) has written the file.
    pub verify: bool,
}

/// The 8-byte stamp at the start of the block at `offset`.
fn stamp(offset: u64) -> [u8; 8] {
    (offset ^ 0xa10b_e7c4_0000_0000).to_le_bytes()
}

/// Creates (or truncates) `path` and writes all `size` bytes of it, so
/// that no timed request allocates blocks or page-cache/tmpfs pages. Every
/// 4 KiB block starts with an 8-byte stamp of its offset, the rest is a
/// fixed non-zero pattern. With `direct` the writes use `O_DIRECT` (so the
/// page cache is left empty), and the file is `fsync`ed either way.
/// Returns how long it took.
///
/// # Errors
///
/// When `size` is not a positive multiple of [`BS`], or any I/O fails.
pub fn prepare_file(path: &Path, size: u64, direct: bool) -> Result<Duration> {
    if size == 0 || size % BS as u64 != 0 {
        return Err(format!("file size {size} is not a positive multiple of {BS}").into());
    }
    let start = Instant::now();
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut buf = AlignedBuf::new(PREP_CHUNK, BS)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x as u8) | 1;
    }
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(PREP_CHUNK as u64) as usize;
        for (i, block) in buf[..n].chunks_mut(BS).enumerate() {
            block[..8].copy_from_slice(&stamp(off + (i * BS) as u64));
        }
        f.write_all_at(&buf[..n], off)
            .map_err(|e| format!("writing {n} bytes at {off} in {}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_all()
        .map_err(|e| format!("fsync of {}: {e}", path.display()))?;
    Ok(start.elapsed())
}

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Issue no new request after this long (in-flight ones finish).
    After(Duration),
    /// Issue exactly this many requests in total.
    Ops(u64),
}

/// The result of one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IoRun {
    /// Requests completed.
    pub ops: u64,
    /// From the first spawn to the last join.
    pub elapsed: Duration,
}

impl IoRun {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// A small xorshift64* generator: a few ns per offset, no dependency.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `[0, n)` (`n > 0`; the modulo bias is below 2^-40 for
    /// any file size here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One engine's view of a job: a context (whose home thread is the
/// thread that created the runner) and the file opened on it. Reused for
/// the warm-up and every round, so the threads engine's pool workers and
/// the io_uring engine's ring exist before the timed runs.
pub struct IoRunner {
    job: IoJob,
    engine: Engine,
    ctx: AioContext,
    file: Arc<File>,
}

impl fmt::Debug for IoRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoRunner")
            .field("job", &self.job)
            .field("engine", &engine_label(self.engine))
            .finish_non_exhaustive()
    }
}

impl IoRunner {
    /// Opens the job's file (read+write, `O_DIRECT` if the job says so)
    /// with `engine` on a new context.
    ///
    /// # Errors
    ///
    /// When the context cannot be created or the file opened, or the job
    /// has depth 0 or a size below one block.
    pub fn new(job: &IoJob, engine: Engine) -> Result<Self> {
        if job.depth == 0 || job.size < BS as u64 {
            return Err(format!("bad job: depth {} size {}", job.depth, job.size).into());
        }
        let ctx = AioContext::new()?;
        let opts = OpenOptions::new()
            .read(true)
            .write(true)
            .direct(job.direct)
            .engine(engine);
        let file = File::open(&job.path, &opts)?;
        if job.direct && (BS as u64 % file.request_alignment() != 0 || file.memory_alignment() > BS)
        {
            return Err(format!(
                "{}: O_DIRECT needs {}-byte requests and {}-byte buffers; this benchmark uses {BS}",
                job.path.display(),
                file.request_alignment(),
                file.memory_alignment()
            )
            .into());
        }
        Ok(Self {
            job: job.clone(),
            engine,
            ctx,
            file: Arc::new(file),
        })
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The context the requests are issued on.
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// Runs the job: `depth` tasks, each issuing one request at a time,
    /// until `stop`. `seed` picks the offsets.
    ///
    /// # Errors
    ///
    /// The first request that failed, or (with `verify`) a block that read
    /// back with the wrong stamp.
    pub fn run(&self, stop: Stop, seed: u64) -> Result<IoRun> {
        let blocks = self.job.size / BS as u64;
        let (deadline, budget) = match stop {
            Stop::After(d) => (
                aio::monotonic_ns().saturating_add(d.as_nanos().min(i64::MAX as u128) as i64),
                None,
            ),
            Stop::Ops(n) => (i64::MAX, Some(Arc::new(AtomicU64::new(n)))),
        };
        let (rw, verify) = (self.job.rw, self.job.verify);
        let start = Instant::now();
        let mut handles = Vec::with_capacity(self.job.depth);
        for slot in 0..self.job.depth {
            let file = self.file.clone();
            let budget = budget.clone();
            let mut rng = Rng::new(seed ^ ((slot as u64 + 1) << 32));
            handles.push(self.ctx.spawn(async move {
                let mut buf = AlignedBuf::new(BS, BS)?;
                buf.fill(0x5a);
                let mut ops = 0u64;
                loop {
                    if let Some(b) = &budget {
                        if b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                            v.checked_sub(1)
                        })
                        .is_err()
                        {
                            break;
                        }
                    } else if aio::monotonic_ns() >= deadline {
                        break;
                    }
                    let off = rng.below(blocks) * BS as u64;
                    buf = match rw {
                        Rw::RandRead => {
                            let b = file.read_exact_at(buf, off).await?;
                            if verify && b[..8] != stamp(off) {
                                return Err(format!(
                                    "block at {off} read back {:02x?}, expected {:02x?}",
                                    &b[..8],
                                    stamp(off)
                                )
                                .into());
                            }
                            b
                        }
                        Rw::RandWrite => {
                            buf[..8].copy_from_slice(&stamp(off));
                            file.write_at(buf, off).await?
                        }
                    };
                    ops += 1;
                }
                Ok::<u64, crate::Error>(ops)
            }));
        }
        let ops = self.ctx.block_on(async move {
            let mut total = 0u64;
            let mut first_err = None;
            for h in handles {
                match h.await {
                    Ok(Ok(n)) => total += n,
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e.into());
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })?;
        Ok(IoRun {
            ops,
            elapsed: start.elapsed(),
        })
    }
}

// ----- fio ---------------------------------------------------------------

/// The `fio` binary on `PATH`, if any.
pub fn fio_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("fio"))
        .find(|p| p.is_file())
}

/// `fio --version`, e.g. `fio-3.33`.
pub fn fio_version(fio: &Path) -> Option<String> {
    let out = Command::new(fio).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// fio's arguments for `job` with `ioengine`, time-based for `runtime`:
/// one job, the same file, size, block size, depth, direct flag and
/// access pattern as ours; no random map (uniform with replacement, like
/// ours), no cache invalidation before the run.
pub fn fio_args(job: &IoJob, ioengine: &str, runtime: Duration) -> Vec<String> {
    vec![
        "--name=aio-bench".to_string(),
        format!("--filename={}", job.path.display()),
        format!("--size={}", job.size),
        format!("--rw={}", job.rw.label()),
        format!("--bs={BS}"),
        format!("--iodepth={}", job.depth),
        format!("--ioengine={ioengine}"),
        format!("--direct={}", u8::from(job.direct)),
        "--time_based".to_string(),
        format!("--runtime={}ms", runtime.as_millis().max(1)),
        "--norandommap".to_string(),
        "--randrepeat=0".to_string(),
        "--invalidate=0".to_string(),
        "--output-format=json".to_string(),
    ]
}

/// Runs fio (see [`fio_args`]) and returns its IOPS for the job's
/// direction.
///
/// # Errors
///
/// When fio cannot be started, fails, or prints no IOPS figure.
pub fn run_fio(fio: &Path, job: &IoJob, ioengine: &str, runtime: Duration) -> Result<f64> {
    let args = fio_args(job, ioengine, runtime);
    let out = Command::new(fio)
        .args(&args)
        .output()
        .map_err(|e| format!("starting {}: {e}", fio.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    parse_fio_iops(&stdout, job.rw).ok_or_else(|| {
        let text: String = stdout.trim().chars().take(400).collect();
        format!("no {} iops in fio's output: {text}", job.rw).into()
    })
}

/// The first job's `iops` for `rw` in fio's `--output-format=json` output:
/// the number after `"iops" :` inside the object `"read" : {` (or
/// `"write" : {`). A deliberately small scan rather than a JSON parser;
/// fio's layout is stable and the tests pin it.
pub fn parse_fio_iops(json: &str, rw: Rw) -> Option<f64> {
    let key = match rw {
        Rw::RandRead => "\"read\"",
        Rw::RandWrite => "\"write\"",
    };
    let jobs = json.find("\"jobs\"")?;
    let mut rest = &json[jobs..];
    // The key followed by `:` and `{` (not e.g. a string value).
    let obj = loop {
        let at = rest.find(key)?;
        let after = rest[at + key.len()..].trim_start();
        if let Some(a) = after.strip_prefix(':') {
            if let Some(body) = a.trim_start().strip_prefix('{') {
                break body;
            }
        }
        rest = &rest[at + key.len()..];
    };
    let at = obj.find("\"iops\"")?;
    let num = obj[at + 6..].trim_start().strip_prefix(':')?.trim_start();
    let end = num
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
        .unwrap_or(num.len());
    num[..end].parse().ok()
}

/// Whether `path` is on a tmpfs (where this benchmark does not use
/// `O_DIRECT`).
///
/// # Errors
///
/// When `statfs` fails (e.g. the path does not exist).
pub fn is_tmpfs(path: &Path) -> Result<bool> {
    crate::sys::is_tmpfs(path).map_err(|e| format!("statfs of {}: {e}", path.display()).into())
}
