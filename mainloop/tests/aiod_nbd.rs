//! `aiod` as an NBD server: `--nbd-server` / `--export` spelled as
//! qemu-storage-daemon spells them, the export commands over QMP with
//! QSD's errors and `BLOCK_EXPORT_DELETED` events, QEMU's tools as
//! clients, and a clean SIGTERM (exports closed, socket file removed).

mod util;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use blockjob::nbd::proto::{
    OptionHeader, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT_EXPORT_NAME,
};
use serde_json::{json, Value};
use util::aiod::wait_exit;
use util::{generic, QmpClient};

const AIOD: &str = env!("CARGO_BIN_EXE_aiod");

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok_tool(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = tool(cmd, args);
    assert!(ok && !text.contains("failed"), "{cmd} {args:?}: {text}");
    text
}

/// A client in the transmission phase of export `name` (negotiated with
/// `NBD_OPT_EXPORT_NAME`), holding the connection open.
fn attach(sock: &Path, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(util::TIMEOUT)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let h = OptionHeader {
        option: OPT_EXPORT_NAME,
        len: name.len() as u32,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(name.as_bytes()).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    s
}

#[test]
fn exports_from_the_command_line_and_over_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (disk, ro, reference) = (
        d.join("disk.qcow2"),
        d.join("ro.qcow2"),
        d.join("ref.qcow2"),
    );
    for img in [&disk, &ro] {
        ok_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"],
        );
    }
    ok_tool(
        "qemu-io",
        &[
            "-c",
            "write -P 0x21 0 1M",
            "-c",
            "write -z 2M 64k",
            disk.to_str().unwrap(),
        ],
    );
    std::fs::copy(&disk, &reference).unwrap();
    let (qmp, nbd) = (d.join("qmp.sock"), d.join("nbd.sock"));
    let nbd_s = nbd.to_str().unwrap();
    let mut child = Command::new(AIOD)
        .args([
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                disk.display()
            ),
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={}",
                ro.display()
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={nbd_s}"),
            "--export",
            "type=nbd,id=e0,node-name=disk,writable=on",
            "--chardev",
            &format!("socket,id=m0,path={},server=on,wait=off", qmp.display()),
            "--monitor",
            "chardev=m0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    util::wait_until("aiod listens", || qmp.exists());
    let mut c = QmpClient::connect_unix(&qmp);
    c.negotiate();
    assert_eq!(
        c.ok("query-block-exports", Value::Null),
        json!([{"type": "nbd", "id": "e0", "node-name": "disk", "shutting-down": false}])
    );

    // QEMU's tools through the export.
    let url = format!("nbd+unix:///disk?socket={nbd_s}");
    let ops = ["write -P 0x5a 512k 1M", "write -z 0 4k", "discard 3M 64k"];
    let mut args = vec!["-f", "raw"];
    for o in &ops {
        args.extend(["-c", o]);
    }
    args.push(&url);
    ok_tool("qemu-io", &args);
    let mut args = vec![];
    for o in &ops {
        args.extend(["-c", *o]);
    }
    args.push(reference.to_str().unwrap());
    ok_tool("qemu-io", &args);
    ok_tool(
        "qemu-img",
        &["compare", "-F", "raw", reference.to_str().unwrap(), &url],
    );

    // QSD's errors, in QSD's order.
    let nbd2 = d.join("nbd2.sock");
    let legacy = json!({"addr": {"type": "unix", "data": {"path": nbd2}}});
    assert_eq!(
        c.err("nbd-server-start", legacy.clone()),
        generic("NBD server already running")
    );
    assert_eq!(
        c.err("nbd-server-start", json!({"addr": {"type": "unix"}})),
        generic("Parameter 'addr.data' is missing")
    );
    let add = |id: &str, node: &str, extra: Value| {
        let mut a = json!({"type": "nbd", "id": id, "node-name": node});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    assert_eq!(
        c.err("block-export-add", add("e0", "disk", json!({}))),
        generic("Block export id 'e0' is already in use")
    );
    assert_eq!(
        c.err("block-export-add", add("e1", "disk", json!({}))),
        generic("NBD server already has export named 'disk'")
    );
    assert_eq!(
        c.err("block-export-add", add("e2", "nope", json!({}))),
        generic("Cannot find device='' nor node-name='nope'")
    );
    assert_eq!(
        c.err(
            "block-export-add",
            add("e3", "ro", json!({"writable": true}))
        ),
        generic("Cannot export read-only node as writable")
    );
    assert_eq!(
        c.err("nbd-server-add", json!({"device": "nope"})),
        generic("Cannot find device='nope' nor node-name='nope'")
    );
    c.ok(
        "block-export-add",
        add("e4", "ro", json!({"description": "read me"})),
    );
    c.ok("nbd-server-add", json!({"device": "ro", "name": "ro2"}));
    let list = ok_tool("qemu-nbd", &["--list", "-k", nbd_s]);
    for name in ["export: 'disk'", "export: 'ro'", "export: 'ro2'", "read me"] {
        assert!(list.contains(name), "{list}");
    }
    let (ok, text) = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write 0 4k",
            &format!("nbd+unix:///ro?socket={nbd_s}"),
        ],
    );
    assert!(!ok || text.contains("failed"), "{text}");
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": "ro"})),
        generic("Node ro is in use")
    );
    assert_eq!(
        c.ok("query-block-exports", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        ["ro2", "e4", "e0"]
    );

    // Deleting: safe refuses while a client is attached, hard disconnects.
    let mut client = attach(&nbd, "disk");
    assert_eq!(
        c.err("block-export-del", json!({"id": "e0"})),
        generic("export 'e0' still in use")
    );
    c.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    let ev = c.recv_event();
    assert_eq!(ev["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    let mut b = [0u8; 1];
    assert!(matches!(client.read(&mut b), Ok(0) | Err(_)));
    assert_eq!(
        c.err("block-export-del", json!({"id": "e0"})),
        generic("Export 'e0' is not found")
    );
    // Without clients the event comes before the reply.
    c.ok("nbd-server-remove", json!({"name": "ro2"}));
    let ev = c.recv_event();
    assert_eq!(ev["data"], json!({"id": "ro2"}));
    c.ok("nbd-server-stop", Value::Null);
    assert_eq!(c.recv_event()["data"], json!({"id": "e4"}));
    assert!(!nbd.exists(), "nbd-server-stop left the socket file");
    assert_eq!(
        c.err("nbd-server-stop", Value::Null),
        generic("NBD server not running")
    );
    assert_eq!(
        c.err("nbd-server-add", json!({"device": "disk"})),
        generic("NBD server not running")
    );
    assert_eq!(c.ok("query-block-exports", Value::Null), json!([]));

    // Again with QEMU's legacy address; SIGTERM closes it all.
    c.ok("nbd-server-start", legacy);
    c.ok(
        "nbd-server-add",
        json!({"device": "disk", "writable": true}),
    );
    let _held = attach(&nbd2, "disk");
    let r = send_signal(&child, "TERM");
    assert!(r, "kill failed");
    assert!(wait_exit(&mut child).success());
    assert!(!nbd2.exists(), "SIGTERM left the NBD socket file");
    ok_tool("qemu-img", &["check", disk.to_str().unwrap()]);
    ok_tool(
        "qemu-img",
        &[
            "compare",
            disk.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
}

/// `kill -SIG pid`.
fn send_signal(child: &Child, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
