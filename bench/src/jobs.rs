//! `aio-bench jobs`: block-job throughput of `aiod` against
//! qemu-storage-daemon, the same jobs on the same images in one run.
//!
//! Each case builds fresh qcow2 images with `qemu-img` and `qemu-io`, in
//! /dev/shm (buffered) or in a directory on disk (`cache.direct=on`, as
//! `aio-bench io` and `imgbench` measure disks), writes them back
//! (`sync -f`, so the fill's page-cache writeback is not timed), starts the daemon with
//! them as `--blockdev`s, sends the job
//! command over QMP with no speed limit and times it to
//! `BLOCK_JOB_COMPLETED` (mirror: to `BLOCK_JOB_READY`, then
//! `block-job-complete`, to `BLOCK_JOB_COMPLETED`). The two daemons
//! alternate round by round; the table shows medians in MiB/s of the
//! image's size, aiod / QSD, and each daemon's peak RSS (`VmHWM` when the
//! job completed, the largest of the rounds).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::nbd::{aiod_path, wait_for_socket};
use crate::{median_in_place as median, run_tool};

/// Where [`JobTarget::Disk`] images go unless told.
const DEFAULT_DISK_DIR: &str = "/var/tmp";

/// Options of `aio-bench jobs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobsOpts {
    /// A smaller image and one round.
    pub quick: bool,
    /// One JSON object per line instead of a table.
    pub json: bool,
    /// The `aiod` binary (default: next to the running executable).
    pub aiod: Option<PathBuf>,
    /// Where the images go, in this order (empty: /dev/shm only).
    pub targets: Vec<JobTarget>,
    /// The directory of [`JobTarget::Disk`] (default /var/tmp).
    pub disk_dir: Option<PathBuf>,
    /// Image size in MiB (default 1024, the 1 GiB chain; 128
    /// with `quick`).
    pub size_mib: Option<u64>,
    /// Alternating rounds per job (default 3; 1 with `quick`).
    pub rounds: Option<usize>,
    /// The jobs to run (empty: all four).
    pub jobs: Vec<String>,
}

impl JobsOpts {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The directory of [`JobTarget::Disk`]: `disk_dir`, or /var/tmp.
    fn disk_dir(&self) -> PathBuf {
        self.disk_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DISK_DIR))
    }
}

/// Where `aio-bench jobs` puts its images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobTarget {
    /// /dev/shm (tmpfs), through the page cache.
    Shm,
    /// A directory on disk, opened `cache.direct=on` by both daemons.
    Disk,
}

impl JobTarget {
    /// `shm`, `disk` or `both`.
    pub fn parse_list(s: &str) -> Option<Vec<JobTarget>> {
        match s {
            "shm" => Some(vec![JobTarget::Shm]),
            "disk" => Some(vec![JobTarget::Disk]),
            "both" => Some(vec![JobTarget::Shm, JobTarget::Disk]),
            _ => None,
        }
    }

    /// The name in the table and the JSON lines.
    pub fn label(self) -> &'static str {
        match self {
            JobTarget::Shm => "shm",
            JobTarget::Disk => "disk",
        }
    }
}

/// The jobs measured.
const JOBS: [&str; 4] = ["stream", "commit", "mirror", "backup"];

/// Which daemon runs the jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Daemon {
    Aiod,
    Qsd,
}

impl Daemon {
    fn label(self) -> &'static str {
        match self {
            Daemon::Aiod => "aiod",
            Daemon::Qsd => "qemu-storage-daemon",
        }
    }
}

/// A daemon process, killed on drop, with its QMP connection.
struct Running {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(which: Daemon, aiod: &Path, dir: &Path, blockdevs: &[Value]) -> Result<Self, String> {
        let sock = dir.join(format!("{}-qmp.sock", which.label()));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = match which {
            Daemon::Aiod => {
                let mut c = Command::new(aiod);
                c.env("RUST_LOG", "warn")
                    .arg("--qmp")
                    .arg(format!("unix:{}", sock.display()));
                c
            }
            Daemon::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--chardev")
                    .arg(format!(
                        "socket,path={},server=on,wait=off,id=m",
                        sock.display()
                    ))
                    .args(["--monitor", "chardev=m"]);
                c
            }
        };
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", which.label()))?;
        if let Err(e) = wait_for_socket(&mut child, &sock, which.label()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let stream = UnixStream::connect(&sock).map_err(|e| format!("connecting: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut r = Running {
            child,
            reader: BufReader::new(stream),
            writer,
        };
        r.recv()?; // greeting
        r.execute("qmp_capabilities", json!({}))?;
        Ok(r)
    }

    fn recv(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the daemon closed QMP".to_string()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP line: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Sends a command and returns its `return`, skipping events.
    fn execute(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let line = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let v = self.recv()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{name}: {e}"));
            }
        }
    }

    /// Waits for event `name` (a job error fails the wait).
    fn wait_event(&mut self, name: &str) -> Result<Value, String> {
        loop {
            let v = self.recv()?;
            match v.get("event").and_then(Value::as_str) {
                Some(n) if n == name => return Ok(v),
                Some("BLOCK_JOB_ERROR") => return Err(format!("job error: {v}")),
                _ => {}
            }
        }
    }
}

/// Runs a tool, discarding its output.
fn tool(cmd: &str, args: &[&str]) -> Result<(), String> {
    run_tool(cmd, args).map(|_| ())
}

fn qcow2(path: &Path, size_mib: u64, backing: Option<&Path>, fill: bool) -> Result<(), String> {
    let p = path.to_string_lossy().into_owned();
    let size = format!("{size_mib}M");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let b;
    if let Some(bk) = backing {
        b = bk.to_string_lossy().into_owned();
        args.extend(["-b", &b, "-F", "qcow2"]);
    }
    args.extend([p.as_str(), size.as_str()]);
    tool("qemu-img", &args)?;
    if fill {
        tool(
            "qemu-io",
            &["-c", &format!("write -P 0x5a 0 {size_mib}M"), &p],
        )?;
    }
    Ok(())
}

fn node(name: &str, file: &Path, backing: Option<&str>, direct: bool) -> Value {
    let mut v = json!({"driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": file}});
    if direct {
        v["cache"] = json!({"direct": true});
    }
    if let Some(b) = backing {
        v["backing"] = json!(b);
    }
    v
}

/// Builds the images of `job` in `dir`; returns the blockdevs and the
/// job command.
fn setup(
    job: &str,
    dir: &Path,
    mib: u64,
    direct: bool,
) -> Result<(Vec<Value>, &'static str, Value), String> {
    let p = |n: &str| dir.join(format!("{job}-{n}.qcow2"));
    let node = |name: &str, file: &Path, backing: Option<&str>| node(name, file, backing, direct);
    Ok(match job {
        "stream" => {
            qcow2(&p("base"), mib, None, true)?;
            qcow2(&p("top"), mib, Some(&p("base")), false)?;
            (
                vec![
                    node("base", &p("base"), None),
                    node("top", &p("top"), Some("base")),
                ],
                "block-stream",
                json!({"job-id": "j", "device": "top"}),
            )
        }
        "commit" => {
            qcow2(&p("base"), mib, None, false)?;
            qcow2(&p("mid"), mib, Some(&p("base")), true)?;
            qcow2(&p("top"), mib, Some(&p("mid")), false)?;
            (
                vec![
                    node("base", &p("base"), None),
                    node("mid", &p("mid"), Some("base")),
                    node("top", &p("top"), Some("mid")),
                ],
                "block-commit",
                json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base"}),
            )
        }
        "mirror" | "backup" => {
            qcow2(&p("src"), mib, None, true)?;
            qcow2(&p("tgt"), mib, None, false)?;
            let cmd = if job == "mirror" {
                "blockdev-mirror"
            } else {
                "blockdev-backup"
            };
            (
                vec![node("src", &p("src"), None), node("tgt", &p("tgt"), None)],
                cmd,
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
            )
        }
        other => return Err(format!("unknown job {other}")),
    })
}

/// The peak resident set size of process `pid` in KiB (`VmHWM`), if
/// /proc tells.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// One timed run: seconds from the command to `BLOCK_JOB_COMPLETED`, and
/// the daemon's peak RSS (KiB, 0 if unknown) at that point.
fn once(
    which: Daemon,
    aiod: &Path,
    job: &str,
    dir: &Path,
    mib: u64,
    direct: bool,
) -> Result<(f64, u64), String> {
    let (blockdevs, cmd, args) = setup(job, dir, mib, direct)?;
    // qemu-io filled the images through the page cache: write that back
    // now, or it is written back during the job (an `O_DIRECT` read
    // flushes the dirty pages of its range first), doubling the disk
    // traffic the job is timed on.
    tool("sync", &["-f", &dir.to_string_lossy()])?;
    let mut d = Running::start(which, aiod, dir, &blockdevs)?;
    let start = Instant::now();
    d.execute(cmd, args)?;
    if job == "mirror" {
        d.wait_event("BLOCK_JOB_READY")?;
        d.execute("block-job-complete", json!({"device": "j"}))?;
    }
    let ev = d.wait_event("BLOCK_JOB_COMPLETED")?;
    let secs = start.elapsed().as_secs_f64();
    let rss = peak_rss_kib(d.child.id()).unwrap_or(0);
    if let Some(e) = ev["data"].get("error") {
        return Err(format!("{} {job}: {e}", which.label()));
    }
    let _ = d.execute("quit", json!({}));
    drop(d);
    for f in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        if f.file_name().to_string_lossy().ends_with(".qcow2") {
            let _ = std::fs::remove_file(f.path());
        }
    }
    Ok((secs, rss))
}

/// One row of the result: medians in MiB/s and peak RSS in KiB.
struct Row {
    job: &'static str,
    aiod: f64,
    qsd: f64,
    /// The median of the rounds' aiod/QSD ratios.
    ratio: f64,
    aiod_rss: u64,
    qsd_rss: u64,
}

/// Runs every job on one target, the daemons alternating round by round.
fn run_target(
    opts: &JobsOpts,
    aiod: &Path,
    target: JobTarget,
    mib: u64,
    rounds: usize,
) -> Result<Vec<Row>, String> {
    let base = match target {
        JobTarget::Shm if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        JobTarget::Shm => std::env::temp_dir(),
        JobTarget::Disk => opts.disk_dir(),
    };
    let dir = tempfile::Builder::new()
        .prefix("aio-bench-jobs")
        .tempdir_in(&base)
        .map_err(|e| format!("temp dir in {}: {e}", base.display()))?;
    let direct = target == JobTarget::Disk;
    eprintln!(
        "jobs: {mib} MiB qcow2 images in {}{}, {rounds} round(s), aiod {}",
        dir.path().display(),
        if direct { " (cache.direct=on)" } else { "" },
        aiod.display()
    );
    let mut rows = Vec::new();
    for job in JOBS
        .into_iter()
        .filter(|j| opts.jobs.is_empty() || opts.jobs.iter().any(|o| o == j))
    {
        let (mut a, mut q) = (Vec::new(), Vec::new());
        let (mut a_rss, mut q_rss) = (0u64, 0u64);
        for round in 0..rounds {
            // Alternate which daemon goes first.
            let order = if round % 2 == 0 {
                [Daemon::Aiod, Daemon::Qsd]
            } else {
                [Daemon::Qsd, Daemon::Aiod]
            };
            for which in order {
                let (secs, rss) = once(which, aiod, job, dir.path(), mib, direct)?;
                let rate = mib as f64 / secs;
                eprintln!(
                    "  {:<4} {job:<7} round {} {:<20} {rate:>8.0} MiB/s  peak RSS {:>4} MiB",
                    target.label(),
                    round + 1,
                    which.label(),
                    rss >> 10
                );
                match which {
                    Daemon::Aiod => {
                        a.push(rate);
                        a_rss = a_rss.max(rss);
                    }
                    Daemon::Qsd => {
                        q.push(rate);
                        q_rss = q_rss.max(rss);
                    }
                }
            }
        }
        // Each round's two runs are minutes apart at most, so their ratio
        // is what a drifting disk (cloud volumes move by 20% from one
        // minute to the next) disturbs least; the order alternates, so
        // going first or second cancels out over an even number of rounds.
        let mut ratios: Vec<f64> = a.iter().zip(&q).map(|(a, q)| a / q).collect();
        let ratio = median(&mut ratios);
        let (a, q) = (median(&mut a), median(&mut q));
        if opts.json {
            println!(
                "{}",
                json!({"bench": "jobs", "target": target.label(), "job": job,
                    "size_mib": mib, "rounds": rounds,
                    "aiod_mib_per_s": a.round(), "qsd_mib_per_s": q.round(),
                    "aiod_vs_qsd": (ratio * 1000.0).round() / 1000.0,
                    "aiod_peak_rss_kib": a_rss, "qsd_peak_rss_kib": q_rss})
            );
        }
        rows.push(Row {
            job,
            aiod: a,
            qsd: q,
            ratio,
            aiod_rss: a_rss,
            qsd_rss: q_rss,
        });
    }
    Ok(rows)
}

/// What the disk itself allows a copy job: fio reading and writing
/// 512 KiB `O_DIRECT` requests at the same time (`--rw=rw`, depth 8, the
/// chunk size and about the requests in flight of stream and commit) on a
/// file of the images' size in `dir`, for 5 s. A job reads and writes each
/// byte once, so neither daemon can copy faster than the smaller of the two
/// figures for long. `(read, write)` in MiB/s, or `None` without fio (or
/// when it fails: the ceiling is context, not a result).
fn device_ceiling(dir: &Path, mib: u64) -> Option<(f64, f64)> {
    let fio = crate::io::fio_path()?;
    let file = dir.join("fio-ceiling.dat");
    let out = Command::new(fio)
        .args([
            "--name=ceiling".to_string(),
            format!("--filename={}", file.display()),
            format!("--size={}M", mib),
            "--rw=rw".to_string(),
            "--bs=512k".to_string(),
            "--iodepth=8".to_string(),
            "--ioengine=io_uring".to_string(),
            "--direct=1".to_string(),
            "--time_based".to_string(),
            "--runtime=5s".to_string(),
            "--output-format=json".to_string(),
        ])
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.ok().filter(|o| o.status.success())?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let job = v.get("jobs")?.get(0)?;
    let bw = |dir: &str| Some(job.get(dir)?.get("bw")?.as_f64()? / 1024.0);
    Some((bw("read")?, bw("write")?))
}

/// Runs the benchmark; the table (or JSON lines) goes to stdout.
///
/// # Errors
///
/// A missing tool or binary, or a job that fails.
pub fn run(opts: &JobsOpts) -> Result<(), String> {
    let aiod = aiod_path(opts.aiod.as_deref())?;
    let (mib, rounds) = if opts.quick { (128, 1) } else { (1024, 3) };
    let mib = opts.size_mib.unwrap_or(mib).max(1);
    let rounds = opts.rounds.unwrap_or(rounds).max(1);
    let targets = if opts.targets.is_empty() {
        vec![JobTarget::Shm]
    } else {
        opts.targets.clone()
    };
    let mut tables = Vec::new();
    for target in targets {
        let rows = run_target(opts, &aiod, target, mib, rounds)?;
        let ceiling = if target == JobTarget::Disk {
            eprintln!("jobs: measuring the disk's read+write ceiling with fio (5 s)");
            device_ceiling(&opts.disk_dir(), mib)
        } else {
            None
        };
        if let (true, Some((r, w))) = (opts.json, ceiling) {
            println!(
                "{}",
                json!({"bench": "jobs-ceiling", "target": target.label(),
                    "tool": "fio", "bs": 512 * 1024, "depth": 8,
                    "read_mib_per_s": r.round(), "write_mib_per_s": w.round()})
            );
        }
        tables.push((target, rows, ceiling));
    }
    if opts.json {
        return Ok(());
    }
    for (target, rows, ceiling) in tables {
        let on = match target {
            JobTarget::Shm => "/dev/shm",
            JobTarget::Disk => "disk, cache.direct=on",
        };
        println!(
            "jobs: {mib} MiB qcow2 on {on}, no speed limit, median of {rounds} \
             (aiod/QSD: median of the rounds' ratios)"
        );
        println!(
            "{:<8} {:>12} {:>12} {:>10} {:>14} {:>13}",
            "job", "aiod MiB/s", "QSD MiB/s", "aiod/QSD", "aiod RSS MiB", "QSD RSS MiB"
        );
        for r in rows {
            println!(
                "{:<8} {:>12.0} {:>12.0} {:>9.2}x {:>14} {:>13}",
                r.job,
                r.aiod,
                r.qsd,
                r.ratio,
                r.aiod_rss >> 10,
                r.qsd_rss >> 10
            );
        }
        if let Some((r, w)) = ceiling {
            println!(
                "disk ceiling (fio, 512 KiB O_DIRECT reads and writes at once, depth 8): \
                 read {r:.0} + write {w:.0} MiB/s"
            );
        }
    }
    Ok(())
}
