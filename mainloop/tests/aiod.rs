//! The `aiod` binary: command line, serving QMP until `quit`, exit status,
//! socket cleanup.

mod util;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mainloop::qmp::ListenAddress;
use serde_json::Value;
use util::QmpClient;

const AIOD: &str = env!("CARGO_BIN_EXE_aiod");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(AIOD).args(args).output().expect("run aiod")
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    for (args, msg) in [
        (&[][..], "nothing to serve"),
        (&["--qmp"][..], "--qmp needs an address"),
        (
            &["--qmp", "udp:1"][..],
            "expected unix:PATH or tcp:HOST:PORT",
        ),
        (
            &["--qmp", "tcp:127.0.0.1:http"][..],
            "the port must be a number",
        ),
        (&["--frobnicate"][..], "unknown argument '--frobnicate'"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(err.contains("usage: aiod"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--qmp ADDR"));
}

fn spawn(args: &[&str]) -> Child {
    Command::new(AIOD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aiod")
}

fn wait_for_socket(child: &mut Child, path: &Path) {
    let deadline = Instant::now() + util::TIMEOUT;
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "aiod exited early");
        assert!(Instant::now() < deadline, "aiod did not create {path:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + util::TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("aiod did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn serves_until_quit_then_exits_0_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let sock2 = dir.path().join("second.sock");
    let mut child = spawn(&[
        "--qmp",
        &format!("unix:{}", sock.display()),
        &format!("--qmp=unix:{}", sock2.display()),
    ]);
    wait_for_socket(&mut child, &sock);
    wait_for_socket(&mut child, &sock2);
    let mut a = QmpClient::connect_unix(&sock);
    let mut b = QmpClient::connect_unix(&sock2);
    a.negotiate();
    b.negotiate();
    assert_eq!(a.ok("query-version", Value::Null)["qemu"]["major"], 10);
    assert_eq!(
        b.err("no-such-command", Value::Null),
        util::not_found("The command no-such-command has not been found")
    );
    assert_eq!(b.ok("quit", Value::Null), serde_json::json!({}));
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists() && !sock2.exists(), "sockets removed");
    assert!(a.is_closed());
}

#[test]
fn tcp_port_0_is_logged_and_a_busy_socket_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut first = spawn(&["--qmp", &format!("unix:{}", sock.display())]);
    wait_for_socket(&mut first, &sock);
    let second = Command::new(AIOD)
        .args(["--qmp", &format!("unix:{}", sock.display())])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another server is listening"));
    assert!(sock.exists(), "the first daemon keeps its socket");

    let mut tcp = Command::new(AIOD)
        .args(["--qmp", "tcp:127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(tcp.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0);
        if let Some(a) = line.trim().split("QMP listening on tcp:").nth(1) {
            break a.parse().unwrap();
        }
    };
    let mut c = QmpClient::connect(&ListenAddress::Tcp(addr));
    c.negotiate();
    c.ok("quit", Value::Null);
    assert_eq!(wait_exit(&mut tcp).code(), Some(0));

    let mut q = QmpClient::connect_unix(&sock);
    q.negotiate();
    q.ok("quit", Value::Null);
    assert_eq!(wait_exit(&mut first).code(), Some(0));
}
