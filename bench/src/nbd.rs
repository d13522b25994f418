//! The NBD export benchmark: `qemu-img bench` over a unix socket against
//! `aiod`'s export and against `qemu-nbd`'s export of the same raw image in
//! `/dev/shm`, alternating the two servers in one run.
//!
//! `qemu-img bench` has no random mode; the "random" cases stride through
//! the image by 1 MiB + 4 KiB (`-S`), which defeats any readahead and
//! touches every 4 KiB block of the image in turn, and the 1 MiB case is
//! sequential. The client is the same binary for both servers, so the
//! ratio compares the servers.

use crate::median_in_place as median;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of [`run`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdOpts {
    /// Fewer requests and one round.
    pub quick: bool,
    /// One JSON object per line instead of a table.
    pub json: bool,
    /// The `aiod` binary (default: next to the running executable).
    pub aiod: Option<PathBuf>,
    /// Measured runs per server and case, alternating (default 3, quick 1).
    pub rounds: Option<usize>,
}

impl NbdOpts {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The image size.
const IMAGE: u64 = 256 << 20;

struct Case {
    name: &'static str,
    size: u64,
    write: bool,
    step: u64,
    count: u64,
}

fn cases(quick: bool) -> [Case; 3] {
    let k = if quick { 1 } else { 2 };
    [
        Case {
            name: "randread-4k",
            size: 4096,
            write: false,
            step: (1 << 20) + 4096,
            count: 30_000 * k,
        },
        Case {
            name: "randwrite-4k",
            size: 4096,
            write: true,
            step: (1 << 20) + 4096,
            count: 30_000 * k,
        },
        Case {
            name: "seqread-1m",
            size: 1 << 20,
            write: false,
            step: 1 << 20,
            count: 1_000 * k,
        },
    ]
}

/// A server process, killed on drop.
pub(crate) struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn wait_for_socket(child: &mut Child, path: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{what} exited early: {st}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not create {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The `aiod` binary: `given`, or the one next to the running executable.
pub(crate) fn aiod_path(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name("aiod");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release -p mainloop --bin aiod) or pass --aiod PATH",
            p.display()
        ))
    }
}

fn start_aiod(bin: &Path, dir: &Path, img: &Path) -> Result<Server, String> {
    let sock = dir.join("aiod-nbd.sock");
    let mut child = Command::new(bin)
        .env("RUST_LOG", "warn")
        .arg("--qmp")
        .arg(format!("unix:{}", dir.join("aiod-qmp.sock").display()))
        .arg("--blockdev")
        .arg(format!(
            "driver=raw,node-name=d,file.driver=file,file.filename={}",
            img.display()
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg("type=nbd,id=d,node-name=d,writable=on")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    wait_for_socket(&mut child, &sock, "aiod")?;
    Ok(Server {
        child,
        url: format!("nbd+unix:///d?socket={}", sock.display()),
    })
}

fn start_qemu_nbd(dir: &Path, img: &Path) -> Result<Server, String> {
    let sock = dir.join("qemu-nbd.sock");
    let mut child = Command::new("qemu-nbd")
        .args(["--persistent", "--shared=16", "-f", "raw", "-x", "d"])
        .args(["--cache=writeback", "--aio=threads", "-k"])
        .arg(&sock)
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting qemu-nbd: {e}"))?;
    wait_for_socket(&mut child, &sock, "qemu-nbd")?;
    Ok(Server {
        child,
        url: format!("nbd+unix:///d?socket={}", sock.display()),
    })
}

/// The qemu-img bench command line of `case` against `url`.
fn bench_args(case: &Case, url: &str) -> Vec<String> {
    let mut a: Vec<String> = ["bench", "-f", "raw", "-t", "none", "-d", "16", "-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(case.count.to_string());
    a.extend(["-s".to_string(), case.size.to_string()]);
    a.extend(["-S".to_string(), case.step.to_string()]);
    if case.write {
        a.push("-w".to_string());
    }
    a.push(url.to_string());
    a
}

/// Runs one `qemu-img bench`; the seconds it reports.
fn qemu_img_bench(case: &Case, url: &str) -> Result<f64, String> {
    let out = Command::new("qemu-img")
        .args(bench_args(case, url))
        .output()
        .map_err(|e| format!("running qemu-img bench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "qemu-img bench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
                .and_then(|s| s.parse::<f64>().ok())
        })
        .ok_or_else(|| format!("no timing in qemu-img bench output: {text}"))
}

/// Runs the benchmark and prints the results.
///
/// # Errors
///
/// A tool or server that cannot be started, or a failed run.
pub fn run(opts: &NbdOpts) -> Result<(), String> {
    let aiod = aiod_path(opts.aiod.as_deref())?;
    let dir = PathBuf::from(format!("/dev/shm/aio-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let res = run_in(opts, &aiod, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn run_in(opts: &NbdOpts, aiod: &Path, dir: &Path) -> Result<(), String> {
    let img = dir.join("disk.raw");
    // Fully written, so reads hit page-cache pages on both servers.
    let chunk = vec![0x5au8; 1 << 20];
    let mut data = Vec::with_capacity(IMAGE as usize);
    while (data.len() as u64) < IMAGE {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&img, &data).map_err(|e| format!("{}: {e}", img.display()))?;
    drop(data);
    let ours = start_aiod(aiod, dir, &img)?;
    let theirs = start_qemu_nbd(dir, &img)?;
    let rounds = opts.rounds.unwrap_or(if opts.quick { 1 } else { 3 }).max(1);
    if !opts.json {
        println!(
            "{:<14} {:>12} {:>12} {:>10} {:>10} {:>7}",
            "case", "aiod IOPS", "qemu-nbd", "aiod MiB/s", "qemu MiB/s", "ratio"
        );
    }
    for case in cases(opts.quick) {
        let (mut a, mut q) = (Vec::new(), Vec::new());
        // Warm-up run each, not counted.
        qemu_img_bench(&case, &ours.url)?;
        qemu_img_bench(&case, &theirs.url)?;
        for r in 0..rounds {
            eprintln!("nbd: {} round {}/{rounds}", case.name, r + 1);
            a.push(qemu_img_bench(&case, &ours.url)?);
            q.push(qemu_img_bench(&case, &theirs.url)?);
        }
        let (ta, tq) = (median(&mut a), median(&mut q));
        let iops = |t: f64| case.count as f64 / t;
        let mibs = |t: f64| case.count as f64 * case.size as f64 / t / f64::from(1 << 20);
        let ratio = tq / ta;
        if opts.json {
            for (server, t) in [("aiod", ta), ("qemu-nbd", tq)] {
                println!(
                    "{{\"bench\":\"nbd\",\"case\":\"{}\",\"server\":\"{server}\",\"iops\":{:.0},\"mib_s\":{:.1},\"secs\":{t:.3},\"rounds\":{rounds}}}",
                    case.name,
                    iops(t),
                    mibs(t)
                );
            }
            println!(
                "{{\"bench\":\"nbd\",\"case\":\"{}\",\"ratio_aiod_over_qemu_nbd\":{ratio:.3}}}",
                case.name
            );
        } else {
            println!(
                "{:<14} {:>12.0} {:>12.0} {:>10.1} {:>10.1} {:>7.2}",
                case.name,
                iops(ta),
                iops(tq),
                mibs(ta),
                mibs(tq),
                ratio
            );
        }
    }
    if !opts.json {
        let example = &cases(opts.quick)[0];
        println!(
            "\nclient: qemu-img {} (medians of {rounds}; ratio > 1: aiod faster)",
            bench_args(example, "nbd+unix:///d?socket=SOCK").join(" ")
        );
    }
    Ok(())
}
