//! `aio-bench`: benchmarks of the `aio` loop, its executor and its file I/O.
//!
//! ```text
//! cargo run --release -p bench --bin aio-bench -- fdscale [--quick] [--json]
//! cargo run --release -p bench --bin aio-bench -- timers  [--quick] [--json]
//! cargo run --release -p bench --bin aio-bench -- tasks   [--quick] [--json]
//! cargo run --release -p bench --bin aio-bench -- io      [--quick] [--json] [--target shm|disk|both] [--size BYTES]
//! cargo run --release -p bench --bin aio-bench -- nbd     [--quick] [--json] [--rounds N] [--aiod PATH]
//! ```
//!
//! Results go to stdout (a table, or one JSON object per line with
//! `--json`); progress goes to stderr.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aio::file::Engine;
use aio::AioContext;
use bench::io::{self as bio, IoJob, IoRunner, Rw, Stop, BS};
use bench::tasks::{self, Placement, WakeCfg, WakeLoop};
use bench::{Fixture, Flavor, LatenessSummary, TimerSource, IDLE_COUNTS};

const USAGE: &str = "\
usage: aio-bench <command> [options]

commands:
  fdscale [--quick] [--json]   ns per ping-pong iteration against the number of
                               idle fds (1, 16, 256, 4096, 10000) for raw-epoll,
                               epoll, epoll+timerfd, io_uring, ppoll, and the
                               peers mio, calloop, event-manager (and glib,
                               built with --features glib)
  timers  [--quick] [--json]   lateness of one-shot Realtime timers (100 us,
                               1 ms, 10 ms) for epoll, epoll+timerfd, io_uring,
                               ppoll, a millisecond-timeout epoll_wait
                               reference, tokio's sleep and calloop's Timer
  tasks   [--quick] [--json]   executor: spawn+complete throughput (tasks/s)
                               and a same-thread ping-pong of two tasks through
                               CoQueues (wakes/s)
  wakeup  [--quick] [--json]   cross-thread wake -> resume latency of a blocked
                               home thread: aio task, AioContext::notify, mio's
                               Waker, tokio's Notify, raw eventfd+epoll_wait
  report  --out DIR [--quick]  runs fdscale, timers, wakeup, bh, tasks, io, jobs
                               (--quick: io on /dev/shm only), writes
                               DIR/results.json and SVG plots (fdscale.svg,
                               timers-*.svg); --quick takes about two minutes
  bh      [--quick] [--json]   bottom halves: schedule -> run throughput on the
                               home thread, and from another thread while the
                               loop blocks (runs/s, notify writes per run)
  io      [--quick] [--json]   4 KiB random read/write IOPS at queue depth 1 and
          [--target shm|disk|both] [--size BYTES] [--rw randread|randwrite|both]
          [--runtime SECS] [--rounds N] [--disk-dir DIR] [--no-fio]
                               on a prepared file (default 1 GiB, --quick
                               256 MiB) in /dev/shm (buffered) and on disk
                               (O_DIRECT; default DIR: target/aio-bench-io),
                               engines threads and io_uring, and fio's io_uring
                               with the same parameters in the same run
  snapcow [--json] [--size BYTES] [--rounds N] [--dir DIR] [--no-qemu]
                               qcow2 write MiB/s at depth 1 (64 KiB and 4 KiB
                               per cluster) before an internal snapshot, on
                               the first pass after it (copy-on-write) and the
                               second, against qemu-img bench in the same run
                               (default 128 MiB in /dev/shm, 3 rounds)

  imgbench [--quick] [--rounds N] [--count N] [--no-disk] [--disk DIR]
                               aio-img bench vs qemu-img bench, same command
                               lines: 4 KiB read/write, depth 1 and 32, raw
                               and preallocated qcow2, threads and io_uring,
                               /dev/shm and disk with -t none (needs a release
                               aio-img next to this binary)

  jobs    [--quick] [--json]   stream, commit, mirror and backup of 1 GiB
          [--aiod PATH]        (--quick 128 MiB; --size MIB) fully allocated
          [--size MIB] [--rounds N]  qcow2 chains on /dev/shm
          [--job J[,J..]]      (only these jobs)
          [--target shm|disk|both]  (default shm) and/or on disk (--disk-dir,
          [--disk-dir DIR]     default /var/tmp, cache.direct=on), no
                               speed limit, in aiod and in qemu-storage-daemon,
                               alternating; MiB/s and ratios (needs a release
                               aiod next to this binary); on disk also fio's
                               read+write ceiling of the device
  nbd     [--quick] [--json]   qemu-img bench over a unix socket (4 KiB strided
          [--rounds N] [--aiod PATH]
                               read and write at depth 16, 1 MiB sequential
                               read) against aiod's NBD export and qemu-nbd's
                               of the same 256 MiB raw image in /dev/shm,
                               alternating; needs a release aiod next to this
                               binary (cargo build --release -p mainloop)

options:
  --quick   fewer iterations / samples / shorter runs (fdscale < 30 s; timers
            skips 10 ms; tasks ~3 s; io ~30 s)
  --json    one JSON object per line on stdout instead of a table
  -h, --help  this text

io options:
  --target T     shm, disk or both (default both)
  --size BYTES   file size, a multiple of 4096; suffixes K, M, G (powers of 2)
  --rw R         randread, randwrite or both (default both)
  --runtime SECS seconds per measured run (default 2, --quick 1)
  --rounds N     measured runs per engine and row, interleaved (default 3,
                 --quick 1); the table shows medians
  --disk-dir DIR where the disk file goes (must not be tmpfs for O_DIRECT)
  --no-fio       skip the fio rows (they are skipped anyway when fio is not
                 on PATH)

Progress messages go to stderr.";

#[derive(Debug, Clone, PartialEq, Eq)]
struct ReportOpts {
    quick: bool,
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opts {
    quick: bool,
    json: bool,
}

/// Where the `io` benchmark puts its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    /// `/dev/shm` (tmpfs, buffered).
    Shm,
    /// A directory on the real disk (`O_DIRECT`).
    Disk,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Shm => "shm",
            Target::Disk => "disk",
        }
    }

    /// `shm`, `disk` or `both`.
    fn parse_list(s: &str) -> Option<Vec<Target>> {
        match s {
            "shm" => Some(vec![Target::Shm]),
            "disk" => Some(vec![Target::Disk]),
            "both" => Some(vec![Target::Shm, Target::Disk]),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IoOpts {
    quick: bool,
    json: bool,
    targets: Vec<Target>,
    rws: Vec<Rw>,
    size: Option<u64>,
    runtime: Option<Duration>,
    rounds: Option<usize>,
    disk_dir: Option<PathBuf>,
    fio: bool,
}

/// What the hidden `iorun` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEngine {
    Aio(Engine),
    Fio,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IoRunOpts {
    engine: RunEngine,
    target: Target,
    rw: Rw,
    depth: usize,
    size: u64,
    stop: Stop,
    file: Option<PathBuf>,
    disk_dir: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    FdScale(Opts),
    Timers(Opts),
    Tasks(Opts),
    Bh(Opts),
    Wakeup(Opts),
    Report(ReportOpts),
    Io(IoOpts),
    /// Hidden: a plain ping-pong run, for strace / callgrind.
    PingPong {
        flavor: Flavor,
        idle: usize,
        iters: u64,
    },
    /// Hidden: one I/O job, for strace (`--ops N` for a differential count).
    IoRun(IoRunOpts),
    /// qcow2 copy-on-write after a snapshot (options parsed by `snapcow`).
    SnapCow(Vec<String>),
    /// aio-img bench vs qemu-img bench (options parsed by `imgbench`).
    ImgBench(Vec<String>),
    Nbd(bench::nbd::NbdOpts),
    Jobs(bench::jobs::JobsOpts),
}

fn parse_jobs(rest: &[String]) -> Result<Command, String> {
    let mut o = bench::jobs::JobsOpts::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "-h" | "--help" => return Ok(Command::Help),
            "--aiod" => o.aiod = Some(PathBuf::from(it.next().ok_or("--aiod needs a value")?)),
            "--target" => {
                let v = it.next().ok_or("--target needs a value")?;
                o.targets = bench::jobs::JobTarget::parse_list(v)
                    .ok_or_else(|| format!("bad --target {v} (shm, disk or both)"))?;
            }
            "--disk-dir" => {
                o.disk_dir = Some(PathBuf::from(it.next().ok_or("--disk-dir needs a value")?));
            }
            "--size" => {
                let v = it.next().ok_or("--size needs a value (MiB)")?;
                o.size_mib = Some(v.parse().map_err(|_| format!("bad --size {v} (MiB)"))?);
            }
            "--rounds" => {
                let v = it.next().ok_or("--rounds needs a value")?;
                o.rounds = Some(v.parse().map_err(|_| format!("bad --rounds {v}"))?);
            }
            "--job" => {
                let v = it.next().ok_or("--job needs a value")?;
                for j in v.split(',') {
                    if !["stream", "commit", "mirror", "backup"].contains(&j) {
                        return Err(format!("bad --job {j} (stream, commit, mirror or backup)"));
                    }
                    o.jobs.push(j.to_string());
                }
            }
            other => return Err(format!("unknown option for jobs: {other}")),
        }
    }
    Ok(Command::Jobs(o))
}

fn parse_nbd(rest: &[String]) -> Result<Command, String> {
    let mut o = bench::nbd::NbdOpts::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "-h" | "--help" => return Ok(Command::Help),
            "--aiod" => o.aiod = Some(PathBuf::from(value()?)),
            "--rounds" => {
                let v = value()?;
                o.rounds = Some(
                    v.parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("bad --rounds {v}"))?,
                );
            }
            other => return Err(format!("unknown option for nbd: {other}")),
        }
    }
    Ok(Command::Nbd(o))
}

/// Parses `1073741824`, `1G`, `256M`, `64K` (powers of two).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn parse_secs(s: &str) -> Option<Duration> {
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v > 0.0 && v < 1e6).then(|| Duration::from_secs_f64(v))
}

/// Checks an `io` file size.
fn check_size(size: u64) -> Result<u64, String> {
    if size < BS as u64 || size % BS as u64 != 0 {
        Err(format!("--size {size} is not a positive multiple of {BS}"))
    } else {
        Ok(size)
    }
}

fn parse_io(rest: &[String]) -> Result<Command, String> {
    let mut o = IoOpts {
        quick: false,
        json: false,
        targets: vec![Target::Shm, Target::Disk],
        rws: Rw::ALL.to_vec(),
        size: None,
        runtime: None,
        rounds: None,
        disk_dir: None,
        fio: true,
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = true,
            "--no-fio" => o.fio = false,
            "-h" | "--help" => return Ok(Command::Help),
            "--target" => {
                let v = value()?;
                o.targets = Target::parse_list(&v).ok_or_else(|| format!("bad --target {v}"))?;
            }
            "--rw" => {
                let v = value()?;
                o.rws = match v.as_str() {
                    "both" => Rw::ALL.to_vec(),
                    _ => vec![Rw::parse(&v).ok_or_else(|| format!("bad --rw {v}"))?],
                };
            }
            "--size" => {
                let v = value()?;
                let n = parse_size(&v).ok_or_else(|| format!("bad --size {v}"))?;
                o.size = Some(check_size(n)?);
            }
            "--runtime" => {
                let v = value()?;
                o.runtime = Some(parse_secs(&v).ok_or_else(|| format!("bad --runtime {v}"))?);
            }
            "--rounds" => {
                let v = value()?;
                o.rounds = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &usize| n > 0)
                        .ok_or_else(|| format!("bad --rounds {v}"))?,
                );
            }
            "--disk-dir" => o.disk_dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown option for io: {other}")),
        }
    }
    Ok(Command::Io(o))
}

fn parse_iorun(rest: &[String]) -> Result<Command, String> {
    let mut o = IoRunOpts {
        engine: RunEngine::Aio(Engine::IoUring),
        target: Target::Shm,
        rw: Rw::RandRead,
        depth: 32,
        size: 256 << 20,
        stop: Stop::Ops(100_000),
        file: None,
        disk_dir: None,
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--engine" => {
                let v = value()?;
                o.engine = match v.as_str() {
                    "fio" => RunEngine::Fio,
                    _ => RunEngine::Aio(
                        bio::parse_engine(&v).ok_or_else(|| format!("bad --engine {v}"))?,
                    ),
                };
            }
            "--target" => {
                let v = value()?;
                o.target = match Target::parse_list(&v).as_deref() {
                    Some([t]) => *t,
                    _ => return Err(format!("bad --target {v} (shm or disk)")),
                };
            }
            "--rw" => {
                let v = value()?;
                o.rw = Rw::parse(&v).ok_or_else(|| format!("bad --rw {v}"))?;
            }
            "--depth" => {
                let v = value()?;
                o.depth = v
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .ok_or_else(|| format!("bad --depth {v}"))?;
            }
            "--size" => {
                let v = value()?;
                o.size = check_size(parse_size(&v).ok_or_else(|| format!("bad --size {v}"))?)?;
            }
            "--ops" => {
                let v = value()?;
                o.stop = Stop::Ops(v.parse().map_err(|_| format!("bad --ops {v}"))?);
            }
            "--runtime" => {
                let v = value()?;
                o.stop = Stop::After(parse_secs(&v).ok_or_else(|| format!("bad --runtime {v}"))?);
            }
            "--file" => o.file = Some(PathBuf::from(value()?)),
            "--disk-dir" => o.disk_dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown option for iorun: {other}")),
        }
    }
    if o.engine == RunEngine::Fio && matches!(o.stop, Stop::Ops(_)) {
        // fio runs time-based only here.
        o.stop = Stop::After(Duration::from_secs(2));
    }
    Ok(Command::IoRun(o))
}

fn parse(args: &[String]) -> Result<Command, String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err("missing command".into());
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "io" => parse_io(rest),
        "snapcow" => Ok(Command::SnapCow(rest.to_vec())),
        "imgbench" => Ok(Command::ImgBench(rest.to_vec())),
        "iorun" => parse_iorun(rest),
        "nbd" => parse_nbd(rest),
        "jobs" => parse_jobs(rest),
        "fdscale" | "timers" | "tasks" | "bh" | "wakeup" => {
            let mut opts = Opts {
                quick: false,
                json: false,
            };
            for a in rest {
                match a.as_str() {
                    "--quick" => opts.quick = true,
                    "--json" => opts.json = true,
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("unknown option for {cmd}: {other}")),
                }
            }
            Ok(match cmd.as_str() {
                "fdscale" => Command::FdScale(opts),
                "timers" => Command::Timers(opts),
                "bh" => Command::Bh(opts),
                "wakeup" => Command::Wakeup(opts),
                _ => Command::Tasks(opts),
            })
        }
        "report" => {
            let (mut quick, mut out) = (false, None);
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--quick" => quick = true,
                    "--out" => {
                        out = Some(PathBuf::from(it.next().ok_or("--out needs a directory")?))
                    }
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("unknown option for report: {other}")),
                }
            }
            Ok(Command::Report(ReportOpts {
                quick,
                out: out.ok_or("report needs --out DIR")?,
            }))
        }
        "pingpong" => {
            let (mut flavor, mut idle, mut iters) = (Flavor::Epoll, 1usize, 100_000u64);
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                let mut value = || {
                    it.next()
                        .ok_or_else(|| format!("{a} needs a value"))
                        .cloned()
                };
                match a.as_str() {
                    "--backend" => {
                        let v = value()?;
                        flavor = Flavor::parse(&v).ok_or_else(|| format!("unknown backend {v}"))?;
                    }
                    "--idle" => {
                        let v = value()?;
                        idle = v.parse().map_err(|_| format!("bad --idle value {v}"))?;
                    }
                    "--iters" => {
                        let v = value()?;
                        iters = v.parse().map_err(|_| format!("bad --iters value {v}"))?;
                    }
                    other => return Err(format!("unknown option for pingpong: {other}")),
                }
            }
            Ok(Command::PingPong {
                flavor,
                idle,
                iters,
            })
        }
        other => Err(format!("unknown command: {other}")),
    }
}

fn main() -> ExitCode {
    let args: Result<Vec<String>, OsString> = std::env::args_os()
        .skip(1)
        .map(OsString::into_string)
        .collect();
    let cmd = match args
        .map_err(|a| format!("argument is not UTF-8: {a:?}"))
        .and_then(|a| parse(&a))
    {
        Ok(cmd) => cmd,
        Err(msg) => {
            eprintln!("aio-bench: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::FdScale(o) => fdscale(o),
        Command::Timers(o) => timers(o),
        Command::Tasks(o) => tasks_cmd(o),
        Command::Bh(o) => bh_cmd(o),
        Command::Wakeup(o) => wakeup_cmd(o),
        Command::Report(o) => report_cmd(&o),
        Command::Io(o) => io_cmd(&o),
        Command::IoRun(o) => iorun(&o),
        Command::SnapCow(args) => snapcow(&args),
        Command::ImgBench(args) => bench::imgbench::main(&args).map_err(Into::into),
        Command::Nbd(o) => bench::nbd::run(&o).map_err(Into::into),
        Command::Jobs(o) => bench::jobs::run(&o).map_err(Into::into),
        Command::PingPong {
            flavor,
            idle,
            iters,
        } => pingpong(flavor, idle, iters),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aio-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- fdscale ---------------------------------------------------------

/// How long to measure one (flavor, N) cell.
struct MeasureCfg {
    warmup: Duration,
    batches: usize,
    batch: Duration,
}

impl MeasureCfg {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                warmup: Duration::from_millis(50),
                batches: 5,
                batch: Duration::from_millis(40),
            }
        } else {
            Self {
                warmup: Duration::from_millis(400),
                batches: 11,
                batch: Duration::from_millis(200),
            }
        }
    }
}

/// One measured cell.
struct Cell {
    ns_per_iter: f64,
    iters_per_batch: u64,
    /// (max − min) / median over the batches.
    spread: f64,
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Warms `fx` up in doubling chunks for `cfg.warmup`, and returns how many
/// iterations take about `batch`. Slow cells (ppoll with many fds) thus get
/// proportionally fewer iterations.
fn warm_up(fx: &mut Fixture, cfg: &MeasureCfg, batch: Duration) -> bench::Result<u64> {
    let (mut spent, mut done, mut chunk) = (Duration::ZERO, 0u64, 1u64);
    while spent < cfg.warmup {
        spent += fx.run_timed(chunk)?;
        done += chunk;
        chunk = (chunk * 2).min(1 << 20);
    }
    let est = ns(spent) / done as f64;
    Ok(((ns(batch) / est) as u64).clamp(3, 50_000_000))
}

/// ns per iteration of one batch of `iters`.
fn batch(fx: &mut Fixture, iters: u64) -> bench::Result<f64> {
    Ok(ns(fx.run_timed(iters)?) / iters as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    bench::nearest_rank(&v, 0.5)
}

/// The median ns/iteration over `cfg.batches` batches, after a warm-up.
fn measure(fx: &mut Fixture, cfg: &MeasureCfg) -> bench::Result<Cell> {
    let per_batch = warm_up(fx, cfg, cfg.batch)?;
    let mut per_iter = Vec::with_capacity(cfg.batches);
    for _ in 0..cfg.batches {
        per_iter.push(batch(fx, per_batch)?);
    }
    let lo = per_iter.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per_iter.iter().copied().fold(0.0, f64::max);
    let med = median(per_iter);
    Ok(Cell {
        ns_per_iter: med,
        iters_per_batch: per_batch,
        spread: (hi - lo) / med,
    })
}

/// A ratio measured with interleaved batches.
struct Paired {
    /// Median over batch pairs of ns/iter(a) / ns/iter(b).
    ratio: f64,
    a_ns: f64,
    b_ns: f64,
}

/// Measures `a` against `b` with alternating batches (a b, b a, a b, ...),
/// both fixtures alive in one process, so that the host's slow drifts hit
/// both sides alike. Cross-cell ratios from the table compare cells
/// measured up to a minute apart, which on a shared VM moves by ±20 %.
fn paired(a: &mut Fixture, b: &mut Fixture, cfg: &MeasureCfg) -> bench::Result<Paired> {
    let half = cfg.batch / 2;
    let (na, nb) = (warm_up(a, cfg, half)?, warm_up(b, cfg, half)?);
    let pairs = cfg.batches * 2;
    let (mut ratios, mut ta, mut tb) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let (x, y) = if i % 2 == 0 {
            let x = batch(a, na)?;
            (x, batch(b, nb)?)
        } else {
            let y = batch(b, nb)?;
            (batch(a, na)?, y)
        };
        ratios.push(x / y);
        ta.push(x);
        tb.push(y);
    }
    Ok(Paired {
        ratio: median(ratios),
        a_ns: median(ta),
        b_ns: median(tb),
    })
}

/// The two tight targets, measured paired.
struct PairedTargets {
    /// epoll@max / epoll@min.
    epoll_scaling: Paired,
    /// epoll@min / raw-epoll@min.
    epoll_vs_raw: Paired,
}

fn paired_targets(cfg: &MeasureCfg) -> bench::Result<PairedTargets> {
    let (lo, hi) = (IDLE_COUNTS[0], IDLE_COUNTS[IDLE_COUNTS.len() - 1]);
    let mut e_lo = Fixture::new(Flavor::Epoll, lo)?;
    let epoll_scaling = {
        let mut e_hi = Fixture::new(Flavor::Epoll, hi)?;
        paired(&mut e_hi, &mut e_lo, cfg)?
    };
    eprintln!(
        "  paired: epoll@{hi} / epoll@{lo} = {:.2}x ({:.1} / {:.1} ns)",
        epoll_scaling.ratio, epoll_scaling.a_ns, epoll_scaling.b_ns
    );
    let mut raw_lo = Fixture::new(Flavor::RawEpoll, lo)?;
    let epoll_vs_raw = paired(&mut e_lo, &mut raw_lo, cfg)?;
    eprintln!(
        "  paired: epoll@{lo} / raw-epoll@{lo} = {:.2}x ({:.1} / {:.1} ns)",
        epoll_vs_raw.ratio, epoll_vs_raw.a_ns, epoll_vs_raw.b_ns
    );
    Ok(PairedTargets {
        epoll_scaling,
        epoll_vs_raw,
    })
}

fn fdscale(o: Opts) -> bench::Result<()> {
    let max_idle = IDLE_COUNTS[IDLE_COUNTS.len() - 1];
    let limit = bench::raise_fd_limit_for(max_idle)?;
    eprintln!("fdscale: RLIMIT_NOFILE = {limit}; {} mode", mode(o.quick));
    let cfg = MeasureCfg::new(o.quick);
    let mut results: HashMap<(Flavor, usize), f64> = HashMap::new();
    for &n in &IDLE_COUNTS {
        for flavor in Flavor::ALL.into_iter().filter(|f| f.available()) {
            let mut fx = Fixture::new(flavor, n)
                .map_err(|e| format!("setting up {flavor} with {n} idle fds: {e}"))?;
            if fx.backend_name() != flavor.label() {
                eprintln!(
                    "  note: {flavor} runs as {} on this kernel",
                    fx.backend_name()
                );
            }
            let cell = measure(&mut fx, &cfg)
                .map_err(|e| format!("measuring {flavor} with {n} idle fds: {e}"))?;
            drop(fx);
            eprintln!(
                "  {:<14} idle_fds={:<6} {:>12.1} ns/iter  ({} batches x {} iters, spread {:.1}%)",
                flavor.label(),
                n,
                cell.ns_per_iter,
                cfg.batches,
                cell.iters_per_batch,
                cell.spread * 100.0
            );
            if o.json {
                println!(
                    "{{\"bench\":\"fdscale\",\"backend\":\"{}\",\"idle_fds\":{},\"ns_per_iter\":{:.1}}}",
                    flavor.label(),
                    n,
                    cell.ns_per_iter
                );
            }
            results.insert((flavor, n), cell.ns_per_iter);
        }
    }
    eprintln!("fdscale: paired (interleaved) measurements for the ratio targets");
    let paired = paired_targets(&cfg)?;
    if !o.json {
        print_fdscale_table(&results, cfg.batches, &paired);
    }
    Ok(())
}

fn print_fdscale_table(r: &HashMap<(Flavor, usize), f64>, batches: usize, p: &PairedTargets) {
    let get = |f: Flavor, n: usize| r.get(&(f, n)).copied().unwrap_or(f64::NAN);
    println!("fdscale: ns per ping-pong iteration (median of {batches} batches)");
    let flavors: Vec<Flavor> = Flavor::ALL.into_iter().filter(|f| f.available()).collect();
    print!("{:>8}", "idle_fds");
    for f in &flavors {
        print!(" {:>14}", f.label());
    }
    println!(" {:>12} {:>16}", "ppoll/epoll", "epoll/raw-epoll");
    for &n in &IDLE_COUNTS {
        print!("{n:>8}");
        for &f in &flavors {
            print!(" {:>14.1}", get(f, n));
        }
        let epoll = get(Flavor::Epoll, n);
        println!(
            " {:>11.1}x {:>15.2}x",
            get(Flavor::Ppoll, n) / epoll,
            epoll / get(Flavor::RawEpoll, n)
        );
    }
    let (lo, hi) = (IDLE_COUNTS[0], IDLE_COUNTS[IDLE_COUNTS.len() - 1]);
    let e_hi = get(Flavor::Epoll, hi);
    println!();
    println!("targets (paired = interleaved batches in one process, decides the verdict;");
    println!("table = ratio of the two table cells above, measured at different times):");
    target(
        &format!("epoll@{hi} within 1.5x of epoll@{lo}"),
        p.epoll_scaling.ratio <= 1.5,
        &format!(
            "paired {:.2}x ({:.1} / {:.1} ns), table {:.2}x",
            p.epoll_scaling.ratio,
            p.epoll_scaling.a_ns,
            p.epoll_scaling.b_ns,
            e_hi / get(Flavor::Epoll, lo)
        ),
    );
    let p_hi = get(Flavor::Ppoll, hi);
    target(
        &format!("ppoll@{hi} at least 100x epoll@{hi}"),
        p_hi / e_hi >= 100.0,
        &format!("table {:.0}x ({p_hi:.1} / {e_hi:.1} ns)", p_hi / e_hi),
    );
    target(
        &format!("epoll@{lo} within 1.25x of raw-epoll@{lo}"),
        p.epoll_vs_raw.ratio <= 1.25,
        &format!(
            "paired {:.2}x ({:.1} / {:.1} ns), table {:.2}x",
            p.epoll_vs_raw.ratio,
            p.epoll_vs_raw.a_ns,
            p.epoll_vs_raw.b_ns,
            get(Flavor::Epoll, lo) / get(Flavor::RawEpoll, lo)
        ),
    );
}

fn target(what: &str, ok: bool, detail: &str) {
    let verdict = if ok { "PASS" } else { "MISS" };
    println!("  {verdict}  {what:<42} {detail}");
}

fn mode(quick: bool) -> &'static str {
    if quick {
        "quick"
    } else {
        "full"
    }
}

// ----- timers ----------------------------------------------------------

fn timers(o: Opts) -> bench::Result<()> {
    // (period, samples); 10 ms only in the full run.
    let plan: &[(i64, usize)] = if o.quick {
        &[(100_000, 300), (1_000_000, 300)]
    } else {
        &[(100_000, 2_000), (1_000_000, 2_000), (10_000_000, 200)]
    };
    let warmup = if o.quick { 5 } else { 20 };
    eprintln!("timers: {} mode", mode(o.quick));
    let mut rows = Vec::new();
    for &(period, samples) in plan {
        for src in TimerSource::ALL {
            let lat = src
                .lateness(period, warmup, samples)
                .map_err(|e| format!("{} timers at {period} ns: {e}", src.label()))?;
            let s = LatenessSummary::of(&lat).ok_or("no samples")?;
            eprintln!(
                "  {:<14} period={:>8} ns  median={:>9} p99={:>9} max={:>9} ns  early={}",
                src.label(),
                period,
                s.median,
                s.p99,
                s.max,
                s.early
            );
            if o.json {
                let mut sorted = lat.clone();
                sorted.sort_unstable();
                let cdf: Vec<[serde_json::Value; 2]> = bench::report::cdf(&sorted)
                    .into_iter()
                    .map(|(q, v)| [q.into(), v.into()])
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "timers",
                        "backend": src.label(),
                        "period_ns": period,
                        "samples": s.samples,
                        "median_late_ns": s.median,
                        "p99_late_ns": s.p99,
                        "max_late_ns": s.max,
                        "early": s.early,
                        "cdf_ns": cdf,
                    })
                );
            }
            rows.push((src, period, s));
        }
    }
    // The aio contexts set this thread's slack; ms-epoll ran with it too.
    let slack =
        aio::timer_slack_ns().map_or_else(|e| format!("unknown ({e})"), |v| format!("{v} ns"));
    eprintln!("timers: thread timer slack {slack}");
    if !o.json {
        println!("timers: lateness = t(callback) - deadline, Realtime clock; timer slack {slack}");
        println!(
            "{:<14} {:>8} {:>8} {:>12} {:>12} {:>12} {:>6}",
            "backend", "period", "samples", "median", "p99", "max", "early"
        );
        for (src, period, s) in &rows {
            println!(
                "{:<14} {:>8} {:>8} {:>12} {:>12} {:>12} {:>6}",
                src.label(),
                human(*period),
                s.samples,
                human(s.median),
                human(s.p99),
                human(s.max),
                s.early
            );
        }
        let early: usize = rows
            .iter()
            .filter(|(src, _, _)| src.is_aio())
            .map(|(_, _, s)| s.early)
            .sum();
        println!();
        println!(
            "  {}  no aio timer fired early ({early} early fires)",
            if early == 0 { "PASS" } else { "MISS" }
        );
    }
    Ok(())
}

/// ns as a short human-readable duration.
fn human(ns: i64) -> String {
    let a = ns.unsigned_abs();
    if a >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if a >= 1_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

// ----- tasks -------------------------------------------------------------

/// Median, nearest rank, of `v` (not empty).
fn median_of(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    bench::nearest_rank(&s, 0.5)
}

fn tasks_cmd(o: Opts) -> bench::Result<()> {
    // (batch size, warm-up batches, measured batches)
    let (spawn_n, spawn_warm, spawn_batches) = if o.quick {
        (10_000, 2, 5)
    } else {
        (10_000, 5, 21)
    };
    let (pp_rounds, pp_warm, pp_batches) = if o.quick {
        (20_000, 1, 3)
    } else {
        (50_000, 2, 11)
    };
    eprintln!("tasks: {} mode", mode(o.quick));
    let ctx = AioContext::new()?;

    // (a) spawn N trivial tasks, await all.
    for _ in 0..spawn_warm {
        tasks::spawn_batch(&ctx, spawn_n)?;
    }
    let mut spawn_rates = Vec::with_capacity(spawn_batches);
    for _ in 0..spawn_batches {
        let d = tasks::spawn_batch(&ctx, spawn_n)?;
        spawn_rates.push(spawn_n as f64 / d.as_secs_f64());
    }
    let spawn = median_of(&spawn_rates);
    eprintln!(
        "  spawn     {:>12.0} tasks/s  ({spawn_batches} batches of {spawn_n}; min {:.0}, max {:.0})",
        spawn,
        spawn_rates.iter().copied().fold(f64::INFINITY, f64::min),
        spawn_rates.iter().copied().fold(0.0, f64::max)
    );

    // (b) ping-pong through CoQueues.
    for _ in 0..pp_warm {
        tasks::pingpong(&ctx, pp_rounds)?;
    }
    let mut pp_rates = Vec::with_capacity(pp_batches);
    let mut fallback = 0;
    for _ in 0..pp_batches {
        let r = tasks::pingpong(&ctx, pp_rounds)?;
        fallback += r.fallback_yields;
        pp_rates.push(r.wakes as f64 / r.elapsed.as_secs_f64());
    }
    let pp = median_of(&pp_rates);
    eprintln!(
        "  pingpong  {:>12.0} wakes/s  ({pp_batches} batches of {} wakes; fallback yields {fallback})",
        pp,
        2 * pp_rounds
    );
    if o.json {
        println!(
            "{{\"bench\":\"tasks\",\"case\":\"spawn\",\"per_sec\":{spawn:.0},\"batch\":{spawn_n},\"batches\":{spawn_batches}}}"
        );
        println!(
            "{{\"bench\":\"tasks\",\"case\":\"pingpong\",\"per_sec\":{pp:.0},\"unit\":\"wakes\",\"batch\":{},\"batches\":{pp_batches}}}",
            2 * pp_rounds
        );
    }
    drop(ctx);

    if !o.json {
        println!("tasks: executor throughput on one context (median of batches)");
        println!("{:<10} {:>14} {:>10}", "case", "per second", "ns each");
        println!(
            "{:<10} {:>14.0} {:>10.1}   tasks spawned and joined, {spawn_n} per batch",
            "spawn",
            spawn,
            1e9 / spawn
        );
        println!(
            "{:<10} {:>14.0} {:>10.1}   task wakes, two tasks through two CoQueues",
            "pingpong",
            pp,
            1e9 / pp
        );
    }
    Ok(())
}

// ----- wakeup --------------------------------------------------------------

fn wakeup_cmd(o: Opts) -> bench::Result<()> {
    let wake = if o.quick {
        WakeCfg {
            warmup: 10,
            samples: 300,
            gap: Duration::from_micros(200),
        }
    } else {
        WakeCfg {
            warmup: 50,
            samples: 3_000,
            gap: Duration::from_micros(200),
        }
    };
    eprintln!("wakeup: {} mode", mode(o.quick));
    // (c) cross-thread wake latency.
    let mut rows = Vec::new();
    for placement in Placement::ALL {
        if !placement.available() {
            eprintln!("  note: {} needs CPUs 0 and 1; skipped", placement.label());
            continue;
        }
        for lp in WakeLoop::ALL {
            let v = tasks::wake_latency(lp, placement, wake)
                .map_err(|e| format!("wake latency {lp} {}: {e}", placement.label()))?;
            let mut sorted = v.clone();
            sorted.sort_unstable();
            let (med, p90, p99, max) = (
                bench::nearest_rank(&sorted, 0.5),
                bench::nearest_rank(&sorted, 0.9),
                bench::nearest_rank(&sorted, 0.99),
                sorted[sorted.len() - 1],
            );
            eprintln!(
                "  wakeup {:<11} {:<9} median={:>8} p90={:>8} p99={:>8} max={:>9} ns",
                lp.label(),
                placement.label(),
                med,
                p90,
                p99,
                max
            );
            if o.json {
                println!(
                    "{{\"bench\":\"wakeup\",\"loop\":\"{}\",\"placement\":\"{}\",\"samples\":{},\"median_ns\":{med},\"p90_ns\":{p90},\"p99_ns\":{p99},\"max_ns\":{max}}}",
                    lp.label(),
                    placement.label(),
                    sorted.len()
                );
            }
            rows.push((lp, placement, med, p90, p99, max));
        }
    }
    if !o.json {
        println!(
            "wakeup: another thread wakes the blocked home thread; t(resume) - t(before wake), {} samples, {} us apart",
            wake.samples,
            wake.gap.as_micros()
        );
        println!(
            "{:<12} {:<10} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "loop", "placement", "median", "p90", "p99", "max", "median/raw"
        );
        for &(lp, pl, med, p90, p99, max) in &rows {
            let raw = rows
                .iter()
                .find(|r| r.0 == WakeLoop::RawEventfd && r.1 == pl)
                .map_or(f64::NAN, |r| r.2 as f64);
            println!(
                "{:<12} {:<10} {:>10} {:>10} {:>10} {:>10} {:>11.2}x",
                lp.label(),
                pl.label(),
                human(med),
                human(p90),
                human(p99),
                human(max),
                med as f64 / raw
            );
        }
        let raw = |pl: Placement| {
            rows.iter()
                .find(|r| r.0 == WakeLoop::RawEventfd && r.1 == pl)
                .map_or(f64::NAN, |r| r.2 as f64)
        };
        if let Some(r) = rows
            .iter()
            .find(|r| r.0 == WakeLoop::AioNotify && r.1 == Placement::Unpinned)
        {
            let ratio = r.2 as f64 / raw(Placement::Unpinned);
            println!();
            target(
                "aio-notify median within 1.3x of raw-eventfd",
                ratio <= 1.3,
                &format!("{ratio:.2}x (unpinned)"),
            );
        }
    }
    Ok(())
}

// ----- report --------------------------------------------------------------

/// The subcommands a report runs, with their extra arguments in quick mode.
const REPORT_PLAN: &[(&str, &[&str])] = &[
    ("fdscale", &[]),
    ("timers", &[]),
    ("wakeup", &[]),
    ("bh", &[]),
    ("tasks", &[]),
    ("io", &["--target", "shm"]),
    ("jobs", &[]),
];

/// Runs `aio-bench SUB --json [--quick] [extra]` as a child (its progress
/// goes to our stderr) and returns its JSON lines.
fn run_child(sub: &str, quick: bool, extra: &[&str]) -> bench::Result<Vec<serde_json::Value>> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(sub).arg("--json");
    if quick {
        cmd.arg("--quick").args(extra);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running aio-bench {sub}: {e}"))?;
    if !out.status.success() {
        return Err(format!("aio-bench {sub} failed ({})", out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// What the results were measured on.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

fn report_cmd(o: &ReportOpts) -> bench::Result<()> {
    std::fs::create_dir_all(&o.out).map_err(|e| format!("creating {}: {e}", o.out.display()))?;
    let start = Instant::now();
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for (sub, extra) in REPORT_PLAN {
        eprintln!("report: {sub} ({})", mode(o.quick));
        match run_child(sub, o.quick, extra) {
            Ok(r) => records.extend(r),
            Err(e) => {
                eprintln!("report: {e}; going on");
                failures.push(serde_json::json!({"bench": sub, "error": e.to_string()}));
            }
        }
    }
    let mut plots = bench::report::plot_fdscale(&records, &o.out)?;
    plots.extend(bench::report::plot_timers(&records, &o.out)?);
    let secs = start.elapsed().as_secs_f64();
    let results = serde_json::json!({
        "command": format!("aio-bench report{} --out {}", if o.quick { " --quick" } else { "" }, o.out.display()),
        "mode": mode(o.quick),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "duration_s": (secs * 10.0).round() / 10.0,
        "machine": machine(),
        "records": records,
        "failures": failures,
        "plots": plots,
    });
    let path = o.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!(
        "report: {} records, {} failures, plots {:?}, {secs:.0} s -> {}",
        results["records"].as_array().map_or(0, Vec::len),
        failures.len(),
        plots,
        path.display()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} benchmark(s) failed", failures.len()).into())
    }
}

// ----- io ----------------------------------------------------------------

/// The queue depths of the `io` benchmark.
const DEPTHS: [usize; 2] = [1, 32];

/// The target directory's default: `target/aio-bench-io` next to the
/// binary's profile directory, else the temp dir.
fn default_disk_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("aio-bench-io")))
        .unwrap_or_else(|| std::env::temp_dir().join("aio-bench-io"))
}

/// The directory of `target`, created if needed, and whether to use
/// `O_DIRECT` there (not on tmpfs).
fn target_dir(target: Target, disk_dir: Option<&Path>) -> bench::Result<(PathBuf, bool)> {
    let dir = match target {
        Target::Shm => PathBuf::from("/dev/shm"),
        Target::Disk => disk_dir.map_or_else(default_disk_dir, Path::to_path_buf),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmpfs = bio::is_tmpfs(&dir)?;
    match (target, tmpfs) {
        (Target::Shm, false) => eprintln!("  note: {} is not tmpfs", dir.display()),
        (Target::Disk, true) => eprintln!(
            "  note: {} is tmpfs: no O_DIRECT, so this is not a disk measurement",
            dir.display()
        ),
        _ => {}
    }
    Ok((dir, target == Target::Disk && !tmpfs))
}

/// A prepared benchmark file, removed on drop.
struct BenchFile(PathBuf);

impl BenchFile {
    fn prepare(dir: &Path, size: u64, direct: bool) -> bench::Result<(Self, Duration)> {
        let path = dir.join(format!("aio-bench-io.{}.dat", std::process::id()));
        let f = BenchFile(path);
        let d = bio::prepare_file(&f.0, size, direct)?;
        Ok((f, d))
    }
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The engines of one row, in column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Threads,
    Uring,
    Fio,
}

/// One measured row: IOPS per round per engine.
struct IoRow {
    target: Target,
    rw: Rw,
    depth: usize,
    direct: bool,
    threads: Vec<f64>,
    uring: Vec<f64>,
    fio: Vec<f64>,
}

impl IoRow {
    fn med(v: &[f64]) -> Option<f64> {
        (!v.is_empty()).then(|| median_of(v))
    }

    /// The median over rounds of a / b measured in the same round.
    fn paired(a: &[f64], b: &[f64]) -> Option<f64> {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        Self::med(&r)
    }
}

fn io_cmd(o: &IoOpts) -> bench::Result<()> {
    let size = o.size.unwrap_or(if o.quick { 256 << 20 } else { 1 << 30 });
    let runtime = o
        .runtime
        .unwrap_or(Duration::from_secs(if o.quick { 1 } else { 2 }));
    let rounds = o.rounds.unwrap_or(if o.quick { 1 } else { 3 });
    let warmup = runtime.mul_f64(0.15).min(Duration::from_millis(300));
    let fio = if o.fio {
        let f = bio::fio_path();
        match &f {
            Some(p) => eprintln!(
                "io: fio: {} ({})",
                p.display(),
                bio::fio_version(p).unwrap_or_else(|| "version unknown".into())
            ),
            None => eprintln!("io: note: fio is not on PATH; its rows are skipped"),
        }
        f
    } else {
        None
    };
    eprintln!(
        "io: {} mode: {} MiB file, {rounds} round(s) x {:.1} s per engine and row, warm-up {} ms",
        mode(o.quick),
        size >> 20,
        runtime.as_secs_f64(),
        warmup.as_millis()
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    for &target in &o.targets {
        let (dir, direct) = target_dir(target, o.disk_dir.as_deref())?;
        let (file, prep) = BenchFile::prepare(&dir, size, direct)?;
        eprintln!(
            "io: {}: prepared {} ({} MiB{}, written in {:.2} s)",
            target.label(),
            file.0.display(),
            size >> 20,
            if direct { ", O_DIRECT" } else { "" },
            prep.as_secs_f64()
        );
        for &rw in &o.rws {
            for depth in DEPTHS {
                let job = IoJob {
                    path: file.0.clone(),
                    size,
                    depth,
                    rw,
                    direct,
                    // Reads run before any fio write in this file: the
                    // stamps are intact, so check them (a few ns per read).
                    verify: rw == Rw::RandRead,
                };
                let row = io_row(target, &job, fio.as_deref(), runtime, rounds, warmup)?;
                print_row_json(o.json, &row);
                rows.push(row);
            }
        }
        drop(file);
    }
    eprintln!("io: done in {:.0} s", started.elapsed().as_secs_f64());
    if !o.json {
        print_io_table(&rows, size, runtime, rounds, fio.is_some());
    }
    Ok(())
}

fn io_row(
    target: Target,
    job: &IoJob,
    fio: Option<&Path>,
    runtime: Duration,
    rounds: usize,
    warmup: Duration,
) -> bench::Result<IoRow> {
    let what = format!("{} {} depth {}", target.label(), job.rw, job.depth);
    let threads =
        IoRunner::new(job, Engine::Threads).map_err(|e| format!("{what}: threads engine: {e}"))?;
    let uring =
        IoRunner::new(job, Engine::IoUring).map_err(|e| format!("{what}: io_uring engine: {e}"))?;
    for r in [&threads, &uring] {
        r.run(Stop::After(warmup), 0xdead)
            .map_err(|e| format!("{what}: {} warm-up: {e}", bio::engine_label(r.engine())))?;
    }
    let mut row = IoRow {
        target,
        rw: job.rw,
        depth: job.depth,
        direct: job.direct,
        threads: Vec::new(),
        uring: Vec::new(),
        fio: Vec::new(),
    };
    let mut cols = vec![Col::Threads, Col::Uring];
    if fio.is_some() {
        cols.push(Col::Fio);
    }
    for round in 0..rounds {
        // Rotate the order every round so no engine always runs first.
        let mut order = cols.clone();
        order.rotate_left(round % cols.len());
        let mut line = Vec::new();
        for col in order {
            let seed = (round as u64 + 1) * 0x1_0000_0001;
            let iops = match col {
                Col::Threads => threads.run(Stop::After(runtime), seed)?.iops(),
                Col::Uring => uring.run(Stop::After(runtime), seed)?.iops(),
                Col::Fio => match fio {
                    Some(f) => bio::run_fio(f, job, "io_uring", runtime)
                        .map_err(|e| format!("{what}: {e}"))?,
                    None => continue,
                },
            };
            let (name, v) = match col {
                Col::Threads => ("threads", &mut row.threads),
                Col::Uring => ("io_uring", &mut row.uring),
                Col::Fio => ("fio", &mut row.fio),
            };
            v.push(iops);
            line.push(format!("{name} {iops:.0}"));
        }
        eprintln!("  {what:<24} round {}: {}", round + 1, line.join(", "));
    }
    Ok(row)
}

fn print_row_json(json: bool, row: &IoRow) {
    if !json {
        return;
    }
    let cols: [(&str, &[f64]); 3] = [
        ("threads", &row.threads),
        ("io_uring", &row.uring),
        ("fio", &row.fio),
    ];
    for (engine, v) in cols {
        let Some(iops) = IoRow::med(v) else { continue };
        let extra = if engine == "fio" {
            ",\"ioengine\":\"io_uring\""
        } else {
            ""
        };
        println!(
            "{{\"bench\":\"io\",\"engine\":\"{engine}\",\"rw\":\"{}\",\"bs\":{BS},\"depth\":{},\"target\":\"{}\",\"iops\":{iops:.0},\"direct\":{},\"rounds\":{}{extra}}}",
            row.rw.label(),
            row.depth,
            row.target.label(),
            row.direct,
            v.len()
        );
    }
    let x = |v: Option<f64>| v.map_or_else(|| "null".to_string(), |r| format!("{r:.3}"));
    println!(
        "{{\"bench\":\"io_ratio\",\"rw\":\"{}\",\"bs\":{BS},\"depth\":{},\"target\":\"{}\",\"io_uring_vs_fio\":{},\"threads_vs_fio\":{},\"io_uring_vs_threads\":{}}}",
        row.rw.label(),
        row.depth,
        row.target.label(),
        x(IoRow::paired(&row.uring, &row.fio)),
        x(IoRow::paired(&row.threads, &row.fio)),
        x(IoRow::paired(&row.uring, &row.threads))
    );
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn print_io_table(rows: &[IoRow], size: u64, runtime: Duration, rounds: usize, fio: bool) {
    println!(
        "io: 4 KiB random I/O, IOPS (median of {rounds} round(s) x {:.1} s); {} MiB file; \
         shm = tmpfs, buffered; disk = O_DIRECT",
        runtime.as_secs_f64(),
        size >> 20
    );
    println!(
        "{:<6} {:<10} {:>5} {:>10} {:>10} {:>10} {:>11} {:>11} {:>14}",
        "target",
        "rw",
        "depth",
        "threads",
        "io_uring",
        "fio",
        "uring/fio",
        "threads/fio",
        "uring/threads"
    );
    let x = |r: f64| format!("{r:.2}x");
    for r in rows {
        println!(
            "{:<6} {:<10} {:>5} {:>10} {:>10} {:>10} {:>11} {:>11} {:>14}",
            r.target.label(),
            r.rw.label(),
            r.depth,
            fmt_opt(IoRow::med(&r.threads), |v| format!("{v:.0}")),
            fmt_opt(IoRow::med(&r.uring), |v| format!("{v:.0}")),
            fmt_opt(IoRow::med(&r.fio), |v| format!("{v:.0}")),
            fmt_opt(IoRow::paired(&r.uring, &r.fio), x),
            fmt_opt(IoRow::paired(&r.threads, &r.fio), x),
            fmt_opt(IoRow::paired(&r.uring, &r.threads), x),
        );
    }
    println!("(fio = fio's io_uring engine, same file and parameters; ratios are medians of per-round ratios)");
    println!();
    println!("targets (depth 32):");
    let verdict = |what: &str, ok: bool, detail: &str| {
        let v = if ok { "PASS" } else { "MISS" };
        println!("  {v}  {what:<50} {detail}");
    };
    for r in rows.iter().filter(|r| r.depth == 32) {
        let row = format!("{} {}", r.target.label(), r.rw.label());
        if let Some(v) = IoRow::paired(&r.uring, &r.threads) {
            verdict(
                &format!("io_uring >= threads ({row})"),
                v >= 1.0,
                &format!("{v:.2}x"),
            );
        }
        match IoRow::paired(&r.uring, &r.fio) {
            Some(v) => verdict(
                &format!("io_uring >= 0.8x fio io_uring ({row})"),
                v >= 0.8,
                &format!("{v:.2}x"),
            ),
            None if !fio => println!("  SKIP  io_uring >= 0.8x fio io_uring ({row}): no fio"),
            None => {}
        }
    }
}

// ----- iorun (hidden) ----------------------------------------------------

fn iorun(o: &IoRunOpts) -> bench::Result<()> {
    let (dir, direct) = target_dir(o.target, o.disk_dir.as_deref())?;
    let (path, _file) = match &o.file {
        Some(p) => (p.clone(), None),
        None => {
            let (f, d) = BenchFile::prepare(&dir, o.size, direct)?;
            eprintln!(
                "iorun: prepared {} in {:.2} s",
                f.0.display(),
                d.as_secs_f64()
            );
            (f.0.clone(), Some(f))
        }
    };
    let job = IoJob {
        path,
        size: o.size,
        depth: o.depth,
        rw: o.rw,
        direct,
        verify: false,
    };
    match o.engine {
        RunEngine::Fio => {
            let fio = bio::fio_path().ok_or("fio is not on PATH")?;
            let Stop::After(runtime) = o.stop else {
                return Err("fio runs need --runtime".into());
            };
            let iops = bio::run_fio(&fio, &job, "io_uring", runtime)?;
            eprintln!(
                "iorun: fio io_uring {} depth {} {iops:.0} IOPS",
                o.rw, o.depth
            );
        }
        RunEngine::Aio(engine) => {
            let r = IoRunner::new(&job, engine)?;
            let before = r.context().stats();
            let run = r.run(o.stop, 42)?;
            let s = r.context().stats();
            eprintln!(
                "iorun: {} {} depth {} ops={} {:.0} IOPS in {:.3} s",
                bio::engine_label(engine),
                o.rw,
                o.depth,
                run.ops,
                run.iops(),
                run.elapsed.as_secs_f64()
            );
            let per = |a: u64, b: u64| (a - b) as f64 / run.ops.max(1) as f64;
            eprintln!(
                "iorun: per request: loop iterations {:.3}, blocking waits {:.3}, fd dispatches {:.3}, BH runs {:.3}, notify writes {:.3}",
                per(s.iterations, before.iterations),
                per(s.blocking_waits, before.blocking_waits),
                per(s.dispatches, before.dispatches),
                per(s.bh_runs, before.bh_runs),
                per(s.notify_writes, before.notify_writes)
            );
        }
    }
    Ok(())
}

// ----- pingpong (hidden) -----------------------------------------------

fn pingpong(flavor: Flavor, idle: usize, iters: u64) -> bench::Result<()> {
    bench::raise_fd_limit_for(idle)?;
    let mut fx = Fixture::new(flavor, idle)?;
    let d = fx.run_timed(iters)?;
    eprintln!(
        "pingpong: backend={} idle_fds={idle} iters={iters} {:.1} ns/iter",
        fx.backend_name(),
        if iters == 0 {
            0.0
        } else {
            ns(d) / iters as f64
        }
    );
    if let Some(s) = fx.aio_stats() {
        eprintln!(
            "pingpong: stats iterations={} dispatches={} blocking_waits={} notify_writes={}",
            s.iterations, s.dispatches, s.blocking_waits, s.notify_writes
        );
    }
    Ok(())
}

/// `bh`: bottom-half schedule→run throughput, same thread and cross-thread.
fn bh_cmd(o: Opts) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let n: u64 = if o.quick { 200_000 } else { 2_000_000 };

    // Same thread: schedule, then one non-blocking poll runs it.
    let ctx = aio::AioContext::new()?;
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let bh = ctx.bh_new(move |_| {
        r.fetch_add(1, Ordering::Relaxed);
    });
    let start = Instant::now();
    for _ in 0..n {
        bh.schedule();
        ctx.poll(false);
    }
    let same = n as f64 / start.elapsed().as_secs_f64();
    if runs.load(Ordering::Relaxed) != n {
        return Err("a scheduled bottom half did not run".into());
    }

    // Cross thread: another thread schedules oneshot BHs as fast as it can;
    // the home thread blocks in poll(true) until all have run.
    let ctx2 = aio::AioContext::new()?;
    let done = Arc::new(AtomicU64::new(0));
    let remote = ctx2.clone();
    let d = done.clone();
    let start = Instant::now();
    let t = std::thread::spawn(move || {
        for _ in 0..n {
            let d = d.clone();
            remote.bh_schedule_oneshot(move |_| {
                d.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    ctx2.poll_while(|| done.load(Ordering::Relaxed) < n);
    let cross = n as f64 / start.elapsed().as_secs_f64();
    t.join().map_err(|_| "scheduler thread panicked")?;
    let stats = ctx2.stats();
    let writes_per_run = stats.notify_writes as f64 / n as f64;

    if o.json {
        println!("{{\"bench\":\"bh\",\"case\":\"same-thread\",\"per_sec\":{same:.0}}}");
        println!(
            "{{\"bench\":\"bh\",\"case\":\"cross-thread\",\"per_sec\":{cross:.0},\"notify_writes_per_run\":{writes_per_run:.4}}}"
        );
    } else {
        println!("bh: {n} bottom halves per case");
        println!(
            "  same thread (schedule + poll(false)): {:>12.0} runs/s ({:.0} ns each)",
            same,
            1e9 / same
        );
        println!(
            "  cross thread (oneshot, loop blocking): {:>11.0} runs/s; eventfd writes per run {:.4} ({} of {} notifies)",
            cross, writes_per_run, stats.notify_writes, stats.notify_calls
        );
    }
    Ok(())
}

/// `snapcow`: see `bench::snapshot_cow`.
fn snapcow(args: &[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut o = bench::snapshot_cow::CowOptions::default();
    let mut json = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--json" => json = true,
            "--no-qemu" => o.qemu = false,
            "--size" => {
                let v = value()?;
                o.size = parse_size(v)
                    .filter(|s| *s > 0 && s % (64 << 10) == 0)
                    .ok_or(format!("bad --size {v} (a multiple of 64K)"))?;
            }
            "--rounds" => {
                let v = value()?;
                o.rounds = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("bad --rounds {v}"))?;
            }
            "--dir" => o.dir = PathBuf::from(value()?),
            other => return Err(format!("unknown option for snapcow: {other}").into()),
        }
    }
    print!("{}", bench::snapshot_cow::report(&o, json)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_commands() {
        let o = |quick, json| Opts { quick, json };
        assert_eq!(
            parse(&args("fdscale")),
            Ok(Command::FdScale(o(false, false)))
        );
        assert_eq!(
            parse(&args("timers --json --quick")),
            Ok(Command::Timers(o(true, true)))
        );
        assert_eq!(parse(&args("--help")), Ok(Command::Help));
        assert_eq!(
            parse(&args("pingpong --iters 5 --backend ppoll --idle 3")),
            Ok(Command::PingPong {
                flavor: Flavor::Ppoll,
                idle: 3,
                iters: 5
            })
        );
        assert!(parse(&args("")).is_err());
        assert!(parse(&args("bogus")).is_err());
        assert!(parse(&args("fdscale --fast")).is_err());
        assert!(parse(&args("pingpong --iters")).is_err());
        assert!(parse(&args("pingpong --backend nope")).is_err());
        assert_eq!(
            parse(&args("tasks --quick")),
            Ok(Command::Tasks(o(true, false)))
        );
        assert!(parse(&args("tasks --bogus")).is_err());
    }

    #[test]
    fn parses_io() {
        let Ok(Command::Io(o)) = parse(&args("io")) else {
            panic!("io did not parse");
        };
        assert_eq!(o.targets, vec![Target::Shm, Target::Disk]);
        assert_eq!(o.rws, Rw::ALL.to_vec());
        assert!(o.fio && !o.quick && !o.json && o.size.is_none());
        let Ok(Command::Io(o)) = parse(&args(
            "io --quick --json --target disk --size 64M --rw randwrite --runtime 0.5 --rounds 2 --disk-dir /x --no-fio",
        )) else {
            panic!("io options did not parse");
        };
        assert_eq!(o.targets, vec![Target::Disk]);
        assert_eq!(o.rws, vec![Rw::RandWrite]);
        assert_eq!(o.size, Some(64 << 20));
        assert_eq!(o.runtime, Some(Duration::from_millis(500)));
        assert_eq!(o.rounds, Some(2));
        assert_eq!(o.disk_dir, Some(PathBuf::from("/x")));
        assert!(o.quick && o.json && !o.fio);
        for bad in [
            "io --target nfs",
            "io --size 4097",
            "io --size 0",
            "io --size lots",
            "io --rounds 0",
            "io --runtime -1",
            "io --rw read",
            "io --depth 4",
            "io --size",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad}");
        }
        let Ok(Command::IoRun(r)) = parse(&args(
            "iorun --engine threads --depth 4 --ops 10 --target disk --rw randwrite --size 1G",
        )) else {
            panic!("iorun did not parse");
        };
        assert_eq!(r.engine, RunEngine::Aio(Engine::Threads));
        assert_eq!((r.depth, r.stop, r.size), (4, Stop::Ops(10), 1 << 30));
        assert!(parse(&args("iorun --target both")).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(999), "999 ns");
        assert_eq!(human(12_340), "12.3 us");
        assert_eq!(human(1_500_000), "1.50 ms");
    }
}
