//! `aio-img bench` against `qemu-img bench`: the same command lines are
//! accepted and announce the same run; writes land where QEMU's would.

mod common;

use common::*;

/// Runs both tools with `args` + `img`; asserts both succeed and print
/// the same first line ("Sending ...").
fn same_announcement(args: &[&str], img: &std::path::Path) {
    let mut a: Vec<&str> = vec!["bench"];
    a.extend_from_slice(args);
    a.push(p(img));
    let (qc, qout) = qemu_img_status(&a);
    assert_eq!(qc, 0, "{qout}");
    let (c, out, err) = aio_img(&a);
    assert_eq!(c, 0, "{out}{err}");
    let first = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("Sending"))
            .map(str::to_string)
    };
    assert_eq!(first(&out), first(&qout), "ours {out} qemu {qout}");
    assert!(out.contains("Run completed in "), "{out}");
}

#[test]
fn bench_reads_and_writes_like_qemu_img_bench() {
    let d = tmp();
    let raw = d.path().join("r.raw");
    let q = d.path().join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", p(&raw), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        p(&q),
        "1M",
    ]);
    same_announcement(&["-f", "raw", "-c", "300", "-d", "4", "-s", "4k"], &raw);
    same_announcement(
        &[
            "-f", "qcow2", "-c", "300", "-d", "32", "-o", "8192", "-S", "12288", "-i", "io_uring",
        ],
        &q,
    );
    // Writes wrap at the end as QEMU's do: 600 x 4 KiB over 1 MiB.
    let args = [
        "-f",
        "qcow2",
        "-c",
        "600",
        "-d",
        "8",
        "-w",
        "--pattern=7",
        "-t",
        "none",
    ];
    same_announcement(&args, &q);
    qemu_io(&q, &["read -P 7 0 1020k".into()]);
    let (c, text) = qemu_img_status(&["check", p(&q)]);
    assert_eq!(c, 0, "{text}");
}

#[test]
fn bench_bad_options_are_one_line_errors() {
    let d = tmp();
    let raw = d.path().join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&raw), "1M"]);
    for args in [
        vec!["bench", "-d", "0", p(&raw)],
        vec!["bench", "-i", "native", p(&raw)],
        vec!["bench", "-t", "bogus", p(&raw)],
        vec!["bench", "-s", "x", p(&raw)],
        vec!["bench", "--pattern=300", "-w", p(&raw)],
    ] {
        let (c, out, err) = aio_img(&args);
        assert_eq!(c, 1, "{args:?}: {out}{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
