//! QEMU's own Python QMP client (`qemu.qmp`) against `aiod`: runs
//! tests/qmp_python.py with python3. Skipped, saying why, only when python3
//! or the qemu.qmp module is missing (`pip install qemu.qmp`; .ci/run
//! installs it).

use std::process::Command;

#[test]
fn qemu_qmp_python_client_talks_to_aiod() {
    match Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
    {
        Err(e) => {
            eprintln!("SKIPPED qemu_qmp_python_client_talks_to_aiod: cannot run python3: {e}");
            return;
        }
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("No module named"),
                "python3 -c 'import qemu.qmp' failed for another reason:\n{err}"
            );
            eprintln!(
                "SKIPPED qemu_qmp_python_client_talks_to_aiod: the qemu.qmp module is missing \
                 (pip install qemu.qmp)"
            );
            return;
        }
        Ok(_) => {}
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qmp_python.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_aiod"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "tests/qmp_python.py failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
