//! aiod against qemu-storage-daemon, through QEMU's own Python QMP client:
//! the same job scenarios must give the same event sequences and the same
//! image contents (`tests/qsd_compare.py`).

use std::process::Command;

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn aiod_and_qemu_storage_daemon_agree_on_events_and_images() {
    if !have("python3", &["-c", "import qemu.qmp"]) {
        println!("skipped: python3 with the qemu.qmp package is not available");
        return;
    }
    if !have("qemu-storage-daemon", &["--version"]) {
        println!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qsd_compare.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_aiod"))
        .args(KNOWN_TO_MATCH)
        .output()
        .expect("run qsd_compare.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in KNOWN_TO_MATCH {
        assert!(stdout.contains(&format!("{s}: same")), "{stdout}");
    }
}

/// The scenarios compared (every one the script has).
const KNOWN_TO_MATCH: &[&str] = &[
    "stream-all",
    "stream-base",
    "commit-intermediate",
    "commit-active",
    "mirror-full",
    "snapshot-stream",
    "create",
];
