//! Running the `aiod` binary and QEMU's image tools from tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const AIOD: &str = env!("CARGO_BIN_EXE_aiod");

/// Runs one `qemu-io` command on `img`, panicking if it fails.
pub fn qemu_io(img: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-c", cmd])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 [-b backing -F qcow2] img [size]` (an
/// empty `size`: the backing file's).
pub fn create_qcow2(img: &Path, size: &str, backing: Option<&Path>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b.to_str().unwrap(), "-F", "qcow2"]);
    }
    args.push(img.to_str().unwrap());
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img(&args);
}

pub fn wait_for(child: &mut Child, path: &Path) {
    let deadline = Instant::now() + super::TIMEOUT;
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "aiod exited early");
        assert!(Instant::now() < deadline, "aiod did not create {path:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts aiod serving QMP on `sock` with `extra` arguments; returns once
/// the socket exists.
pub fn start_aiod(sock: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(AIOD)
        .args(["--qmp", &format!("unix:{}", sock.display())])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut child, sock);
    child
}

/// Starts qemu-storage-daemon with its monitor on `sock` and `extra`
/// arguments; returns once the socket exists.
pub fn start_qsd(sock: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=m",
            sock.display()
        ))
        .args(["--monitor", "chardev=m"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&mut child, sock);
    child
}

/// Starts `daemon` (`"aiod"` or `"qsd"`: qemu-storage-daemon) with
/// `--blockdev` for each of `blockdevs`, its monitor on `sock`, and
/// returns it with a negotiated client: the same setup for both, so a
/// test can compare their answers.
pub fn start_daemon(daemon: &str, sock: &Path, blockdevs: &[String]) -> (Child, super::QmpClient) {
    let mut args: Vec<&str> = Vec::new();
    for b in blockdevs {
        args.extend(["--blockdev", b.as_str()]);
    }
    let child = match daemon {
        "aiod" => start_aiod(sock, &args),
        "qsd" => start_qsd(sock, &args),
        other => panic!("unknown daemon {other}"),
    };
    let mut c = super::QmpClient::connect_unix(sock);
    c.negotiate();
    (child, c)
}

/// `base.qcow2` (`size`, its first `data` filled with 0x42) and `top.qcow2`
/// over it, in `d`.
pub fn base_and_top(d: &Path, size: &str, data: &str) -> (PathBuf, PathBuf) {
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), size]);
    let io = Command::new("qemu-io")
        .args([
            "-c",
            &format!("write -P 0x42 0 {data}"),
            base.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(io.status.success());
    create_qcow2(&top, "", Some(&base));
    (base, top)
}

pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + super::TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("aiod did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
