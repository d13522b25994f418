//! README's "run the main job" command: `aiod --demo` builds a chain, runs
//! the jobs over QMP, verifies with qemu-img and exits 0.

#[test]
fn demo_runs_the_jobs_and_verifies_them() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aiod"))
        .arg("--demo")
        .output()
        .expect("run aiod --demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("demo finished"), "{stdout}");
    assert!(stdout.contains("all four jobs verified"), "{stdout}");
    for job in ["backup0", "mirror0", "commit0", "stream0"] {
        assert!(
            stdout.contains(&format!("BLOCK_JOB_COMPLETED {{\"device\":\"{job}\"")),
            "{job} did not complete:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("ok  top.qcow2     has no backing file"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
