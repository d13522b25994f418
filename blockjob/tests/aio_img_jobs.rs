//! `aio-img commit|stream|rebase|convert` (the offline job commands)
//! against `qemu-img`: each result read back by `qemu-img compare` against
//! a `qemu-img convert` reference of the guest view taken before, checked
//! by `qemu-img check`, and for commit and rebase compared with what
//! `qemu-img commit` / `qemu-img rebase` make of a copy of the same chain
//! (contents and backing links). Plus a commit interrupted by SIGINT, and
//! bad input.

mod common;
use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `make_chain`'s base ← mid ← top in `dir`, with relative backing links
/// (so that a copy of the directory is a chain of its own).
fn relative_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (base, mid, top) = make_chain(dir);
    qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", p(&mid)]);
    qemu_img(&["rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", p(&top)]);
    (base, mid, top)
}

/// Copies the files of `from` into a new directory `to`.
fn copy_images(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir") {
        let f = e.expect("dirent").path();
        if f.is_file() {
            let name = f.file_name().expect("file name");
            std::fs::copy(&f, to.join(name)).expect("copy image");
        }
    }
}

/// Runs our tool, expecting success.
fn ok(args: &[&str]) -> String {
    let (code, out, err) = aio_img(args);
    assert_eq!(code, 0, "aio-img {args:?}: {out}{err}");
    out
}

/// `qemu-img info --output=json`'s backing link and its format.
fn link(img: &Path) -> (Option<String>, Option<String>) {
    let out = qemu_img(&["info", "--output=json", "-U", p(img)]);
    let v: Value = serde_json::from_str(&out).expect("json");
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    (s("backing-filename"), s("backing-filename-format"))
}

/// `qemu-img map --output=json` entries.
fn map(img: &Path) -> Vec<Value> {
    let out = qemu_img(&["map", "--output=json", "-U", p(img)]);
    serde_json::from_str(&out).expect("map json")
}

/// Bytes `img`'s map says its own layer (depth 0) has data for.
fn own_data(img: &Path) -> u64 {
    map(img)
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

/// Whether the qcow2 header's dirty bit (incompatible feature bit 0) is
/// set.
fn dirty(img: &Path) -> bool {
    let h = std::fs::read(img).expect("read image");
    h[79] & 1 != 0
}

/// `qemu-img check` passes and the dirty bit is clear.
fn assert_clean<P: AsRef<Path>>(imgs: impl IntoIterator<Item = P>) {
    for img in imgs {
        let img = img.as_ref();
        assert_check(img);
        assert!(!dirty(img), "{} left dirty", img.display());
    }
}

/// The same chain twice, `ours/` and `theirs/`, and a reference of its
/// guest view.
struct Twins {
    _dir: tempfile::TempDir,
    ours: PathBuf,
    theirs: PathBuf,
    reference: PathBuf,
}

impl Twins {
    /// `relative_chain` in `ours/`, then `prepare(ours/)`, copied to
    /// `theirs/`.
    fn new(prepare: impl Fn(&Path)) -> Self {
        Self::with_chain(|dir| {
            relative_chain(dir);
            prepare(dir);
        })
    }

    /// Runs `aio-img CMD ARGS top.qcow2` in `ours/` and `qemu-img CMD
    /// ARGS top.qcow2` in `theirs/` (relative names resolve alike).
    fn run_both(&self, cmd: &str, args: &[&str]) {
        for (tool, dir) in [
            (env!("CARGO_BIN_EXE_aio-img"), &self.ours),
            ("qemu-img", &self.theirs),
        ] {
            let a = [&[cmd][..], args, &["top.qcow2"][..]].concat();
            let out = Command::new(tool)
                .args(&a)
                .current_dir(dir)
                .output()
                .expect("run tool");
            assert!(out.status.success(), "{tool} {a:?}: {out:?}");
        }
    }

    /// Both copies of each image read the same and have the same link.
    fn assert_alike(&self, names: &[&str]) {
        for name in names {
            let (a, b) = (self.ours.join(name), self.theirs.join(name));
            assert_same(&a, &b);
            assert_eq!(link(&a), link(&b), "{name}");
        }
    }

    /// Like [`new`](Self::new) with `make(ours/)` building the chain
    /// (its top `top.qcow2`) instead of `relative_chain`.
    fn with_chain(make: impl Fn(&Path)) -> Self {
        let d = tmp();
        let ours = d.path().join("ours");
        std::fs::create_dir(&ours).expect("mkdir");
        make(&ours);
        let theirs = d.path().join("theirs");
        copy_images(&ours, &theirs);
        let reference = snapshot(&ours.join("top.qcow2"), d.path(), "ref.qcow2");
        Self {
            _dir: d,
            ours,
            theirs,
            reference,
        }
    }

    fn ours(&self, name: &str) -> PathBuf {
        self.ours.join(name)
    }
}

const CHAIN: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

#[test]
fn commit_into_backing_file_matches_qemu_img_commit() {
    let t = Twins::new(|_| {});
    let top = t.ours("top.qcow2");
    assert_eq!(ok(&["commit", "-p", p(&top)]), "Image committed.\n");
    qemu_img(&["commit", "-q", p(&t.theirs.join("top.qcow2"))]);

    assert_same(&top, &t.reference);
    assert_clean(CHAIN.map(|n| t.ours(n)));
    t.assert_alike(&CHAIN);
    // Emptied, as qemu-img does: the top reads through to mid.
    assert_eq!(own_data(&top), 0);
    assert_eq!(own_data(&t.theirs.join("top.qcow2")), 0);
}

#[test]
fn commit_with_base_or_drop_keeps_the_top_like_qemu_img() {
    // `-b` names the base relative to the top's directory.
    for args in [&["-q", "-b", "base.qcow2"][..], &["-q", "-d"][..]] {
        let t = Twins::new(|_| {});
        let top = t.ours("top.qcow2");
        let top_data = own_data(&top);
        t.run_both("commit", args);

        assert_same(&top, &t.reference);
        assert_eq!(own_data(&top), top_data, "{args:?}: the top is kept");
        assert_clean(CHAIN.map(|n| t.ours(n)));
        t.assert_alike(&CHAIN);
    }
}

/// raw base ← v2 (compat=0.10, no zero flag) mid ← v2 top, relative
/// links, with zero writes in both qcow2 layers.
fn v2_chain_on_raw(dir: &Path) {
    let base = dir.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&base), "4M"]);
    let io = |img: &Path, fmt: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        assert!(c.arg(img).status().expect("qemu-io").success());
    };
    io(&base, "raw", &["write -P 1 0 2M"]);
    let v2 = ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b"];
    let mid = dir.join("mid.qcow2");
    qemu_img(&[&v2[..], &["base.raw", "-F", "raw", p(&mid)]].concat());
    io(&mid, "qcow2", &["write -P 2 1M 1M", "write -z 0 64k"]);
    let top = dir.join("top.qcow2");
    qemu_img(&[&v2[..], &["mid.qcow2", "-F", "qcow2", p(&top)]].concat());
    io(&top, "qcow2", &["write -P 3 3M 64k", "write -z 1M 64k"]);
}

#[test]
fn v2_images_on_a_raw_base_rebase_and_commit_like_qemu_img() {
    let t = Twins::with_chain(v2_chain_on_raw);
    t.run_both("rebase", &["-b", "base.raw", "-F", "raw"]);
    t.assert_alike(&["top.qcow2"]);
    assert_same(&t.ours("top.qcow2"), &t.reference);

    t.run_both("commit", &["-q"]);
    t.assert_alike(&["base.raw", "top.qcow2"]);
    assert_same(&t.ours("top.qcow2"), &t.reference);
    assert_same(&t.ours("base.raw"), &t.reference);
    assert_check(&t.ours("top.qcow2"));
    assert_eq!(own_data(&t.ours("top.qcow2")), 0);
}

#[test]
fn stream_with_and_without_base() {
    let d = tmp();
    let (base, mid, top) = relative_chain(d.path());
    let reference = snapshot(&top, d.path(), "ref.qcow2");

    ok(&["stream", "--base", p(&base), p(&top)]);
    assert_same(&top, &reference);
    assert_clean([&base, &mid, &top]);
    // The chain's own (relative) link to base is kept.
    assert_eq!(
        link(&top),
        (Some("base.qcow2".into()), Some("qcow2".into()))
    );

    ok(&["stream", "-p", p(&top)]);
    assert_same(&top, &reference);
    assert_clean([&top]);
    assert_eq!(link(&top), (None, None));
    assert_eq!(backing_of(&top), None);
}

/// Rebases a copy of the chain with qemu-img and one with aio-img, with
/// the same arguments, and compares.
fn rebase_both(args: &[&str], prepare: impl Fn(&Path)) {
    let t = Twins::new(prepare);
    t.run_both("rebase", args);
    t.assert_alike(&["top.qcow2"]);
    let top = t.ours("top.qcow2");
    assert_same(&top, &t.reference);
    assert_clean([&top]);
}

#[test]
fn rebase_onto_a_lower_layer_matches_qemu_img() {
    rebase_both(&["-b", "base.qcow2", "-F", "qcow2"], |_| {});
}

#[test]
fn rebase_onto_nothing_matches_qemu_img() {
    rebase_both(&["-b", ""], |_| {});
}

#[test]
fn rebase_onto_an_unrelated_image_matches_qemu_img() {
    rebase_both(&["-b", "other.qcow2", "-F", "qcow2"], |dir| {
        let other = dir.join("other.qcow2");
        create(&other, "2M", None);
        qemu_io(
            &other,
            &["write -P 0x11 0 512k".into(), "write -P 0x77 1M 1M".into()],
        );
    });
}

#[test]
fn rebase_unsafe_only_rewrites_the_link_like_qemu_img() {
    // Onto a copy of mid: the contents must not change.
    rebase_both(&["-u", "-b", "copy.qcow2", "-F", "qcow2"], |dir| {
        std::fs::copy(dir.join("mid.qcow2"), dir.join("copy.qcow2")).expect("copy");
    });
    // Onto a file that does not exist: only the link changes.
    let d = tmp();
    let (_, _, top) = relative_chain(d.path());
    let before = own_data(&top);
    ok(&["rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", p(&top)]);
    assert_eq!(
        link(&top),
        (Some("gone.qcow2".into()), Some("qcow2".into()))
    );
    ok(&["rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", p(&top)]);
    assert_eq!(own_data(&top), before);
    assert_check(&top);
}

#[test]
fn convert_to_qcow2_and_raw_keeps_contents_and_sparseness() {
    let d = tmp();
    let (_, _, top) = make_chain(d.path());
    let theirs = d.path().join("theirs.qcow2");
    qemu_img(&["convert", "-O", "qcow2", p(&top), p(&theirs)]);

    let ours = d.path().join("ours.qcow2");
    ok(&["convert", "-O", "qcow2", "-p", p(&top), p(&ours)]);
    assert_same(&ours, &top);
    assert_same(&ours, &theirs);
    assert_check(&ours);
    // Zero ranges (base's zeroed hole, mid's zero write) are left
    // unallocated: no more data than qemu-img's own convert writes.
    assert!(own_data(&ours) <= own_data(&theirs));
    assert!(map(&ours)
        .iter()
        .any(|e| e["data"] == false && e["start"] == 3 << 20));

    let small = d.path().join("small.qcow2");
    ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        p(&top),
        p(&small),
    ]);
    assert_same(&small, &top);
    assert_check(&small);
    assert!(qemu_img(&["info", p(&small)]).contains("cluster_size: 4096"));

    let raw = d.path().join("ours.raw");
    ok(&["convert", "-O", "raw", p(&top), p(&raw)]);
    assert_same(&raw, &top);
    assert!(own_data(&raw) <= own_data(&theirs));
    assert!(map(&raw).iter().any(|e| e["data"] == false));

    // Back from raw (probed), and with -f.
    let back = d.path().join("back.qcow2");
    ok(&["convert", "-f", "raw", "-O", "qcow2", p(&raw), p(&back)]);
    assert_same(&back, &top);
    assert_eq!(map(&back), map(&ours));
}

#[test]
fn convert_with_a_backing_file_copies_the_top_only_like_qemu_img() {
    let d = tmp();
    let (_, mid, top) = make_chain(d.path());
    let theirs = d.path().join("theirs.qcow2");
    let ours = d.path().join("ours.qcow2");
    let b = ["-O", "qcow2", "-B", p(&mid), "-F", "qcow2"];
    qemu_img(&[&["convert"][..], &b[..], &[p(&top), p(&theirs)][..]].concat());
    ok(&[&["convert"][..], &b[..], &[p(&top), p(&ours)][..]].concat());
    assert_same(&ours, &top);
    assert_check(&ours);
    assert_eq!(link(&ours), link(&theirs));
    assert_eq!(own_data(&ours), own_data(&theirs));
}

/// Waits until `f` holds, or fails after a generous deadline (not a timing
/// assertion: only a guard against hanging).
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) when the test ends, failed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `aio-img ARGS` (a speed-limited job), waits until it has grown
/// `written`, sends `signal`, and checks the command stops with exit code
/// 1 and a one-line error naming `name`.
fn interrupt(args: &[&str], written: &Path, signal: &str, name: &str) {
    let before = std::fs::metadata(written).expect("stat").len();
    let mut guard = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_aio-img"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn aio-img"),
    );
    let child = &mut guard.0;
    // The job is copying once the file grows (the signalfd is set up
    // before the images are opened).
    wait_until("the job to write", || {
        std::fs::metadata(written).map(|m| m.len()).unwrap_or(0) > before
    });
    let pid = child.id().to_string();
    let kill = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    // A command that ignored the signal would run on: kill it and fail
    // instead of hanging.
    let mut status = None;
    wait_until("the command to stop", || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    let mut err = String::new();
    let mut out = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).expect("read stderr");
    }
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out).expect("read stdout");
    }
    let status = status.expect("exited");
    assert_eq!(status.code(), Some(1), "{args:?}: stderr: {err}");
    assert!(err.contains("interrupted") && err.contains(name), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(out.is_empty(), "{out}");
}

/// base ← top, 32 MiB, filled by one qemu-io command each (absolute
/// link), and a reference of top's guest view.
fn base_and_top(d: &tempfile::TempDir, base_io: &str, top_io: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = path(d, "base.qcow2");
    let top = path(d, "top.qcow2");
    create(&base, "32M", None);
    create(&top, "32M", Some(&base));
    qemu_io(&base, &[base_io.into()]);
    qemu_io(&top, &[top_io.into()]);
    let reference = snapshot(&top, d.path(), "ref.qcow2");
    (base, top, reference)
}

#[test]
fn sigint_stops_a_commit_cleanly_and_running_it_again_finishes() {
    let d = tmp();
    // Base's first half is unallocated: the commit grows the file.
    let (base, top, reference) = base_and_top(&d, "write -P 0x11 16M 16M", "write -P 0x22 0 16M");

    // 1 MiB/s: the 16 MiB take long enough to be interrupted.
    interrupt(&["commit", "-s", "1M", p(&top)], &base, "-INT", p(&top));
    // Consistent and clean; the top still reads as before.
    assert_clean([&base, &top]);
    assert_same(&top, &reference);
    assert_eq!(backing_of(&top).as_deref(), Some(p(&base)));

    ok(&["commit", p(&top)]);
    assert_clean([&base, &top]);
    assert_same(&top, &reference);
    assert_same(&base, &reference);
    assert_eq!(own_data(&top), 0);
}

#[test]
fn sigterm_stops_a_stream_with_the_link_unchanged_and_running_it_again_finishes() {
    let d = tmp();
    let (base, top, reference) = base_and_top(&d, "write -P 0x11 0 16M", "read 0 512");

    interrupt(&["stream", "-s", "1M", p(&top)], &top, "-TERM", p(&top));
    assert_clean([&base, &top]);
    assert_same(&top, &reference);
    assert_eq!(backing_of(&top).as_deref(), Some(p(&base)));

    ok(&["stream", p(&top)]);
    assert_clean([&top]);
    assert_same(&top, &reference);
    assert_eq!(backing_of(&top), None);
}

#[test]
fn stream_across_directories_records_a_link_that_resolves() {
    // lower/base ← lower/mid ← upper/top, linked relatively.
    let d = tmp();
    let lower = d.path().join("lower");
    std::fs::create_dir(&lower).expect("mkdir");
    let upper = d.path().join("upper");
    std::fs::create_dir(&upper).expect("mkdir");
    let (base, _, mid_top) = relative_chain(&lower);
    let top = upper.join("top.qcow2");
    std::fs::rename(&mid_top, &top).expect("move top");
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "../lower/mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    let reference = snapshot(&top, d.path(), "ref.qcow2");

    ok(&["stream", "--base", p(&base), p(&top)]);
    assert_same(&top, &reference);
    assert_clean([&top]);
    // mid's "base.qcow2" would not resolve from upper/: the absolute path.
    let canon = std::fs::canonicalize(&base).expect("canonicalize");
    assert_eq!(backing_of(&top).as_deref(), Some(p(&canon)));
}

/// Runs aio-img expecting a one-line error naming `file` (and `want`),
/// exit code 1, and every image in `dir` unchanged.
fn assert_refused(dir: &Path, args: &[&str], file: &str, want: &str) {
    let before = snapshot_bytes(dir);
    let (code, out, err) = aio_img(args);
    assert_eq!(code, 1, "{args:?}: {out}{err}");
    assert!(out.is_empty(), "{args:?}: {out}");
    assert!(
        err.starts_with("aio-img: ") && err.trim_end().lines().count() == 1,
        "{args:?}: {err}"
    );
    assert!(err.contains(file) && err.contains(want), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(snapshot_bytes(dir), before, "{args:?} changed an image");
}

/// Every file in `dir` and its bytes.
fn snapshot_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("dirent").path())
        .filter(|f| f.is_file())
        .map(|f| {
            let b = std::fs::read(&f).expect("read");
            (f, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn bad_input_is_one_line_exit_1_and_leaves_images_alone() {
    let d = tmp();
    let (base, mid, top) = relative_chain(d.path());
    let (b, m, t) = (p(&base), p(&mid), p(&top));
    let missing = path(&d, "missing.qcow2");
    let nope = p(&missing);
    let junk = path(&d, "junk.img");
    std::fs::write(&junk, vec![0x5a; 4096]).expect("write junk");
    let j = p(&junk);
    // A loop: l1 ← l2 ← l1.
    let l1 = path(&d, "l1.qcow2");
    let l2 = path(&d, "l2.qcow2");
    create(&l1, "1M", None);
    create(&l2, "1M", Some(&l1));
    qemu_img(&["rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", p(&l1)]);
    let dir = d.path();
    let no_such = "No such file or directory";

    for cmd in ["commit", "stream", "rebase"] {
        let mut a = vec![cmd];
        if cmd == "rebase" {
            a.extend(["-b", b]);
        }
        a.push(nope);
        assert_refused(dir, &a, nope, no_such);
        assert_refused(
            dir,
            &[&a[..a.len() - 1], &["-f", "qcow2", j]].concat(),
            j,
            "not in qcow2 format",
        );
        assert_refused(
            dir,
            &[&a[..a.len() - 1], &[p(&l2)]].concat(),
            "l2.qcow2",
            "Backing file loop",
        );
    }
    let x = path(&d, "x.raw");
    let x = p(&x);
    assert_refused(
        dir,
        &["convert", "-f", "qcow2", j, x],
        j,
        "not in qcow2 format",
    );

    assert_refused(dir, &["commit", "-b", nope, t], nope, "backing chain");
    assert_refused(dir, &["commit", "-b", t, t], t, "backing chain");
    assert_refused(dir, &["stream", "--base", nope, t], nope, "backing chain");
    assert_refused(dir, &["commit", b], b, "no backing file");
    assert_refused(dir, &["rebase", "-b", t, m], m, "backing loop");
    assert_refused(dir, &["rebase", "-b", "missing.qcow2", t], nope, no_such);
    assert_refused(
        dir,
        &["rebase", "-u", "-b", "missing.qcow2", t],
        t,
        "backing format",
    );
    assert_refused(
        dir,
        &["rebase", "-b", b, j],
        j,
        "does not support backing files",
    );
    assert_refused(dir, &["rebase", t], "-b", "rebase needs");
    assert_refused(dir, &["convert", nope, x], nope, no_such);
    assert_refused(
        dir,
        &["convert", "-O", "vmdk", t, x],
        "vmdk",
        "Unknown file format",
    );
    assert_refused(dir, &["convert", "-O", "qcow2", t, t], t, "not overwriting");
    assert_refused(dir, &["convert", "-O", "qcow2", t, b], b, "not overwriting");
    assert_refused(
        dir,
        &["convert", "-O", "raw", "-B", b, t, x],
        x,
        "backing file",
    );
    assert_refused(dir, &["commit", "-s", "fast", t], "fast", "Invalid");
    assert_refused(dir, &["stream", "-z", t], "-z", "unknown option");
    assert_clean([&base, &mid, &top]);
}
