//! `aiod --demo`: a three-layer qcow2 chain in a temporary folder, the four
//! block jobs run on it through the daemon's own QMP server (a client thread
//! drives it over the unix socket, as a management layer would), progress
//! and events printed, every result verified with `qemu-img compare` and
//! `qemu-img check` after a clean shutdown.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Args;

const MIB: u64 = 1 << 20;

fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("running {cmd}: {e} (is qemu-utils installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// The scratch folder and the images in it.
struct Scene {
    dir: PathBuf,
}

impl Scene {
    fn create() -> Result<Scene, String> {
        let dir = std::env::temp_dir().join(format!("aiod-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let s = Scene { dir };
        let (base, mid, top) = (
            s.path("base.qcow2"),
            s.path("mid.qcow2"),
            s.path("top.qcow2"),
        );
        sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "8M"])?;
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(&base),
                "-F",
                "qcow2",
                p(&mid),
            ],
        )?;
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(&mid),
                "-F",
                "qcow2",
                p(&top),
            ],
        )?;
        sh("qemu-io", &["-c", "write -P 0x11 0 4M", p(&base)])?;
        sh("qemu-io", &["-c", "write -P 0x22 2M 2M", p(&mid)])?;
        sh("qemu-io", &["-c", "write -P 0x33 3M 2M", p(&top)])?;
        sh("qemu-io", &["-c", "write -z 7M 512k", p(&top)])?;
        // What the guest sees through each layer, before any job.
        sh(
            "qemu-img",
            &["convert", "-O", "raw", p(&top), p(&s.path("top-view.raw"))],
        )?;
        sh(
            "qemu-img",
            &["convert", "-O", "raw", p(&mid), p(&s.path("mid-view.raw"))],
        )?;
        for t in ["backup.qcow2", "mirror.qcow2"] {
            sh(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", p(&s.path(t)), "8M"],
            )?;
        }
        Ok(s)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking QMP client, as a management layer would use.
struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Result<Client, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("connecting to {}: {e}", path.display())),
            }
        };
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut c = Client {
            w,
            r: BufReader::new(s),
        };
        c.read(None)?; // greeting
        c.cmd("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    /// One message; `None` on timeout.
    fn read(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, String> {
        self.r
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| e.to_string()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let req = json!({"execute": name, "arguments": args});
        self.w
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let Some(v) = self.read(None)? else { continue };
            if let Some(ev) = v.get("event") {
                print_event(ev, &v["data"]);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(format!("{name}: {}", v["error"]["desc"]));
        }
    }

    /// Prints events and a progress line every 100 ms until `until`
    /// returns true for an event.
    fn run_until(&mut self, job: &str, until: impl Fn(&str, &Value) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if Instant::now() > deadline {
                return Err(format!("job {job} did not finish"));
            }
            match self.read(Some(Duration::from_millis(100)))? {
                Some(v) if v.get("event").is_some() => {
                    let name = v["event"].as_str().unwrap_or_default().to_string();
                    print_event(&v["event"], &v["data"]);
                    if until(&name, &v["data"]) {
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => {
                    let jobs = self.cmd("query-block-jobs", json!({}))?;
                    for j in jobs.as_array().into_iter().flatten() {
                        let (off, len) = (
                            j["offset"].as_u64().unwrap_or(0),
                            j["len"].as_u64().unwrap_or(0),
                        );
                        println!(
                            "    {} {}: {:>5.1} %  ({off} / {len} bytes, {})",
                            j["type"].as_str().unwrap_or("?"),
                            j["device"].as_str().unwrap_or("?"),
                            if len > 0 {
                                off as f64 * 100.0 / len as f64
                            } else {
                                0.0
                            },
                            j["status"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
        }
    }
}

fn print_event(name: &Value, data: &Value) {
    println!("  <- {} {}", name.as_str().unwrap_or("?"), data);
}

fn finished(job: &'static str) -> impl Fn(&str, &Value) -> bool {
    move |name, data| {
        matches!(name, "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED") && data["device"] == job
    }
}

/// Paths in the scratch folder (without owning it).
struct Paths(PathBuf);

impl Paths {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// The management side: what a client such as libvirt would send.
fn drive(sock: &Path, dir: &Path) -> Result<bool, String> {
    let s = Paths(dir.to_path_buf());
    let mut c = Client::connect(sock)?;
    let qcow2 = |name: &str, file: &PathBuf, backing: Value| {
        json!({"driver": "qcow2", "node-name": name,
               "file": {"driver": "file", "filename": file}, "backing": backing})
    };
    c.cmd(
        "blockdev-add",
        qcow2("base", &s.path("base.qcow2"), Value::Null),
    )?;
    c.cmd(
        "blockdev-add",
        qcow2("mid", &s.path("mid.qcow2"), json!("base")),
    )?;
    c.cmd(
        "blockdev-add",
        qcow2("top", &s.path("top.qcow2"), json!("mid")),
    )?;
    c.cmd(
        "blockdev-add",
        qcow2("backup-tgt", &s.path("backup.qcow2"), Value::Null),
    )?;
    c.cmd(
        "blockdev-add",
        qcow2("mirror-tgt", &s.path("mirror.qcow2"), Value::Null),
    )?;
    println!("chain: base.qcow2 <- mid.qcow2 <- top.qcow2 (8 MiB, three layers of data)");

    println!("\n[1/4] blockdev-backup top -> backup.qcow2, sync=full, 16 MiB/s");
    let backup = c
        .cmd("query-commands", json!({}))?
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["name"] == "blockdev-backup"));
    if backup {
        c.cmd(
            "blockdev-backup",
            json!({"job-id": "backup0", "device": "top",
            "target": "backup-tgt", "sync": "full", "speed": 16 * MIB}),
        )?;
        c.run_until("backup0", finished("backup0"))?;
    } else {
        println!("  (blockdev-backup is not available in this build; skipped)");
    }

    println!("\n[2/4] blockdev-mirror top -> mirror.qcow2, sync=full; complete when READY");
    c.cmd(
        "blockdev-mirror",
        json!({"job-id": "mirror0", "device": "top",
        "target": "mirror-tgt", "sync": "full"}),
    )?;
    c.run_until("mirror0", |name, data| {
        name == "BLOCK_JOB_READY" && data["device"] == "mirror0"
    })?;
    c.cmd("block-job-complete", json!({"device": "mirror0"}))?;
    c.run_until("mirror0", finished("mirror0"))?;

    println!("\n[3/4] block-commit mid into base (intermediate commit), 16 MiB/s");
    c.cmd(
        "block-commit",
        json!({"job-id": "commit0", "device": "top",
        "top-node": "mid", "base-node": "base", "speed": 16 * MIB}),
    )?;
    c.run_until("commit0", finished("commit0"))?;

    println!("\n[4/4] block-stream base into top (top becomes standalone)");
    c.cmd(
        "block-stream",
        json!({"job-id": "stream0", "device": "top"}),
    )?;
    c.run_until("stream0", finished("stream0"))?;

    println!("\nquery-named-block-nodes:");
    for n in c
        .cmd("query-named-block-nodes", json!({}))?
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  {:<11} {:<6} depth {} {}",
            n["node-name"].as_str().unwrap_or("?"),
            n["drv"].as_str().unwrap_or("?"),
            n["backing_file_depth"],
            n["file"].as_str().unwrap_or("?")
        );
    }
    c.cmd("quit", json!({}))?;
    Ok(backup)
}

/// Checks every result with qemu-img once the daemon has closed them.
fn verify(s: &Scene, backup: bool) -> Result<(), String> {
    println!("\nverification (qemu-img, after a clean shutdown):");
    let checks = [
        ("backup.qcow2", "top-view.raw", "point-in-time copy of top"),
        ("mirror.qcow2", "top-view.raw", "mirror of top"),
        (
            "base.qcow2",
            "mid-view.raw",
            "base now holds mid's view (commit)",
        ),
        (
            "top.qcow2",
            "top-view.raw",
            "top standalone, same data (stream)",
        ),
    ];
    for (img, reference, what) in checks {
        if img == "backup.qcow2" && !backup {
            continue;
        }
        sh("qemu-img", &["check", "-q", p(&s.path(img))])?;
        sh(
            "qemu-img",
            &["compare", "-q", p(&s.path(reference)), p(&s.path(img))],
        )
        .map_err(|e| format!("{img}: {what}: {e}"))?;
        println!("  ok  {img:<13} {what}  (qemu-img check clean, compare identical)");
    }
    let info: Value = serde_json::from_str(&sh(
        "qemu-img",
        &["info", "--output=json", p(&s.path("top.qcow2"))],
    )?)
    .map_err(|e| e.to_string())?;
    if info.get("backing-filename").is_some() {
        return Err("top.qcow2 still has a backing file after stream".into());
    }
    println!("  ok  top.qcow2     has no backing file");
    Ok(())
}

/// Runs the demo; returns the process exit status.
pub(crate) fn run_demo() -> Result<(), String> {
    let scene = Scene::create()?;
    let sock = scene.path("qmp.sock");
    let args = Args {
        qmp: vec![format!("unix:{}", sock.display())
            .parse()
            .map_err(|e| format!("{e}"))?],
        ..Args::default()
    };
    println!("aiod --demo in {}", scene.dir.display());
    let driver = {
        let sock = sock.clone();
        let dir = scene.dir.clone();
        std::thread::spawn(move || drive(&sock, &dir))
    };
    let served = crate::run(&args).map_err(|e| e.to_string());
    let driven = driver
        .join()
        .map_err(|_| "the demo client panicked".to_string())?;
    served?;
    let backup = driven?;
    verify(&scene, backup)?;
    if backup {
        println!("\ndemo finished: all four jobs verified");
    } else {
        println!("\ndemo finished: mirror, commit and stream verified (backup not in this build)");
    }
    Ok(())
}
