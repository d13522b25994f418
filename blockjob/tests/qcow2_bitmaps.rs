//! Persistent dirty bitmaps in qcow2 against QEMU: bitmaps QEMU stored
//! (`qemu-img bitmap`, `qemu-io` writes) load as the same dirty bitmaps
//! here; ours are listed by `qemu-img info`, pass `qemu-img check`, and
//! QEMU (`qemu-nbd -B`) sees the same dirty ranges; an image left open
//! read-write has them `in_use` (inconsistent when opened again); corrupt
//! directories give errors, not panics, and leave the image as it was.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockjob::block::{BitmapAddOptions, BlockGraph, BlockNode, OpenOptions};
use common::{p, qemu_img, qemu_img_status, qemu_io, tmp};
use serde_json::Value;

const MIB: u64 = 1 << 20;

struct Img {
    ctx: aio::AioContext,
    g: BlockGraph,
    n: Arc<BlockNode>,
}

impl Img {
    fn try_open(path: &Path, read_only: bool) -> blockjob::Result<Img> {
        let ctx = aio::AioContext::new().unwrap();
        let g = BlockGraph::new();
        let n = ctx.block_on(g.open_image(path, &OpenOptions::new().read_only(read_only)))?;
        Ok(Img { ctx, g, n })
    }
    fn open(path: &Path, read_only: bool) -> Img {
        Img::try_open(path, read_only).unwrap()
    }
    /// (name, granularity, recording, persistent, inconsistent) newest first.
    fn list(&self) -> Vec<(String, u64, bool, bool, bool)> {
        self.n
            .bitmaps()
            .iter()
            .map(|b| {
                let i = b.info();
                (
                    i.name,
                    i.granularity,
                    i.recording,
                    i.persistent,
                    i.inconsistent,
                )
            })
            .collect()
    }
    fn dirty(&self, name: &str) -> Vec<(u64, u64)> {
        let b = self.n.bitmap(name).unwrap();
        b.extents(0, b.size())
            .into_iter()
            .filter(|e| e.dirty)
            .map(|e| (e.offset, e.len))
            .collect()
    }
    fn write(&self, off: u64, len: usize) {
        self.ctx
            .block_on(self.n.write(off, vec![0x5a; len]))
            .unwrap();
    }
    fn close(self) {
        self.ctx.block_on(self.g.close_all()).unwrap();
    }
}

fn info(img: &Path) -> Value {
    let out = qemu_img(&["info", "-U", "--output=json", p(img)]);
    serde_json::from_str(&out).unwrap()
}

/// `qemu-img info`'s bitmaps: (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let i = info(img);
    let Some(list) = i["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags,
            )
        })
        .collect()
}

fn assert_clean(img: &Path) {
    let (code, out) = qemu_img_status(&["check", p(img)]);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");
}

/// The dirty ranges QEMU reads from bitmap `name` of `img`: `qemu-nbd -B`
/// and `qemu-img map` with `x-dirty-bitmap` (dirty shows as `data: false`).
fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = img.with_extension(format!("{name}.sock"));
    let st = Command::new("qemu-nbd")
        .args([
            "--fork",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            p(&sock),
            p(img),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "qemu-nbd -B {name}");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let map = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let map: Value = serde_json::from_str(&map).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"] == Value::Bool(false) {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match out.last_mut() {
                Some(x) if x.0 + x.1 == s => x.1 += l,
                _ => out.push((s, l)),
            }
        }
    }
    out
}

fn create(img: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", p(img), size]);
}

fn io(img: &Path, cmds: &[&str]) {
    qemu_io(img, &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>());
}

/// Offset and length of the bitmap directory, from the header extension.
fn dir_at(img: &Path) -> (u64, u64) {
    let b = std::fs::read(img).unwrap();
    let be = |o: usize, n: usize| b[o..o + n].iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
    let mut off = be(100, 4) as usize;
    loop {
        let (kind, len) = (be(off, 4), be(off + 4, 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return (be(off + 24, 8), be(off + 16, 8));
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

fn patch(img: &Path, off: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn qemu_bitmaps_load_with_their_names_granularities_and_bits() {
    let d = tmp();
    let img = d.path().join("a.qcow2");
    create(&img, "4M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", p(&img), "fine"]);
    qemu_img(&["bitmap", "--add", "--disable", p(&img), "off"]);
    // qemu-io loads the bitmaps and records its writes in the enabled ones.
    io(&img, &["write 0 1k", "write 1M 64k", "write -z 3M 4k"]);
    qemu_img(&["bitmap", "--add", p(&img), "copy"]);
    qemu_img(&["bitmap", "--merge", "b0", p(&img), "copy"]);
    qemu_img(&["bitmap", "--add", p(&img), "empty"]);

    // aio-img info lists them as qemu-img info does.
    let (code, out, err) = common::aio_img(&["info", "--output=json", p(&img)]);
    assert_eq!(code, 0, "{err}");
    let ours: Value = serde_json::from_str(&out).unwrap();
    let bitmaps = &ours["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps, &info(&img)["format-specific"]["data"]["bitmaps"]);
    assert_eq!(bitmaps.as_array().map(Vec::len), Some(5));

    let want_b0 = vec![(0, 65536), (MIB, 65536), (3 * MIB, 65536)];
    assert_eq!(qemu_dirty(&img, "b0"), want_b0);
    let i = Img::open(&img, true);
    assert_eq!(
        i.list(),
        vec![
            ("empty".into(), 65536, true, true, false),
            ("copy".into(), 65536, true, true, false),
            ("off".into(), 65536, false, true, false),
            ("fine".into(), 512, true, true, false),
            ("b0".into(), 65536, true, true, false),
        ]
    );
    assert_eq!(i.dirty("b0"), want_b0);
    assert_eq!(i.dirty("copy"), want_b0);
    assert_eq!(
        i.dirty("fine"),
        vec![(0, 1024), (MIB, 65536), (3 * MIB, 4096)]
    );
    assert_eq!(i.dirty("off"), vec![]);
    assert_eq!(i.dirty("empty"), vec![]);
    // Our check counts the directory, tables and data clusters.
    let r = i.ctx.block_on(i.n.check()).unwrap().unwrap();
    assert!(r.corruptions.is_empty() && r.leaks.is_empty(), "{r:?}");
    // Read-only image: its bitmaps are read-only.
    let e = i.ctx.block_on(i.n.remove_bitmap("b0")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bitmap 'b0' is readonly and cannot be modified"
    );
    assert!(i.n.clear_bitmap("b0").is_err());
    let mut o = BitmapAddOptions::default();
    o.persistent = true;
    assert_eq!(
        i.n.add_bitmap("n", &o).unwrap_err().to_string(),
        format!(
            "Can't make bitmap 'n' persistent in '{}': No write access",
            i.n.name()
        )
    );
    i.close();
    assert_clean(&img);
}

#[test]
fn stored_bitmaps_read_back_by_qemu_and_by_us() {
    let d = tmp();
    let img = d.path().join("a.qcow2");
    create(&img, "8M");
    qemu_img(&["bitmap", "--add", p(&img), "q"]);
    io(&img, &["write 2M 4k"]);

    let i = Img::open(&img, false);
    // Open read-write: the stored bitmap is in use on disk.
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("q".into(), 65536, vec!["in-use".into(), "auto".into()])]
    );
    let mut o = BitmapAddOptions::default();
    o.persistent = true;
    i.n.add_bitmap("p0", &o).unwrap();
    o.granularity = Some(4096);
    o.disabled = true;
    i.n.add_bitmap("p1", &o).unwrap();
    let mut m = BitmapAddOptions::default();
    m.granularity = Some(512);
    i.n.add_bitmap("mem", &m).unwrap();
    i.write(0, 512);
    i.write(5 * MIB + 4096, 8192);
    i.n.set_bitmap_enabled("p1", true).unwrap();
    i.write(7 * MIB, 1);
    i.n.set_bitmap_enabled("p1", false).unwrap();
    i.close();

    assert_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        // Stored ones keep their place, new ones follow newest first (as
        // qemu-storage-daemon orders them).
        vec![
            ("q".into(), 65536, vec!["auto".into()]),
            ("p1".into(), 4096, vec![]),
            ("p0".into(), 65536, vec!["auto".into()]),
        ]
    );
    let p0 = vec![(0, 65536), (5 * MIB, 65536), (7 * MIB, 65536)];
    assert_eq!(qemu_dirty(&img, "p0"), p0);
    assert_eq!(qemu_dirty(&img, "p1"), vec![(7 * MIB, 4096)]);
    let q = vec![
        (0, 65536),
        (2 * MIB, 65536),
        (5 * MIB, 65536),
        (7 * MIB, 65536),
    ];
    assert_eq!(qemu_dirty(&img, "q"), q);

    // Again through us: remove one, write more, close; QEMU agrees.
    let i = Img::open(&img, false);
    assert_eq!(i.dirty("p0"), p0);
    i.ctx.block_on(i.n.remove_bitmap("q")).unwrap();
    // Removed from the image at once.
    assert_eq!(qemu_bitmaps(&img).len(), 2);
    i.write(6 * MIB, 1);
    i.close();
    assert_clean(&img);
    assert_eq!(
        qemu_dirty(&img, "p0"),
        vec![
            (0, 65536),
            (5 * MIB, 65536),
            (6 * MIB, 65536),
            (7 * MIB, 65536)
        ]
    );
    assert_eq!(qemu_dirty(&img, "p1"), vec![(7 * MIB, 4096)]);

    // Remove the last ones: extension gone, image clean, QEMU lists none.
    let i = Img::open(&img, false);
    for b in ["p0", "p1"] {
        i.ctx.block_on(i.n.remove_bitmap(b)).unwrap();
    }
    i.close();
    assert_clean(&img);
    assert_eq!(qemu_bitmaps(&img), vec![]);
    let ac = info(&img);
    assert!(ac["format-specific"]["data"].get("bitmaps").is_none());
}

#[test]
fn image_left_open_has_bitmaps_in_use_and_they_load_inconsistent() {
    let d = tmp();
    let img = d.path().join("a.qcow2");
    create(&img, "1M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    let i = Img::open(&img, false);
    // What a crash leaves: the file as it is while open.
    let crashed = d.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    i.close();
    assert_eq!(
        qemu_bitmaps(&crashed),
        vec![("b0".into(), 65536, vec!["in-use".into(), "auto".into()])]
    );
    qemu_img(&["check", "-r", "all", p(&crashed)]);

    let c = Img::open(&crashed, false);
    assert_eq!(c.list(), vec![("b0".into(), 65536, false, true, true)]);
    let e = c.n.clear_bitmap("b0").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bitmap 'b0' is inconsistent and cannot be used"
    );
    assert!(c.n.set_bitmap_enabled("b0", true).is_err());
    c.write(0, 4096);
    c.close();
    // Kept, still in use, image clean.
    assert_eq!(
        qemu_bitmaps(&crashed),
        vec![("b0".into(), 65536, vec!["in-use".into(), "auto".into()])]
    );
    assert_clean(&crashed);
    let c = Img::open(&crashed, false);
    c.ctx.block_on(c.n.remove_bitmap("b0")).unwrap();
    c.close();
    assert_eq!(qemu_bitmaps(&crashed), vec![]);
    assert_clean(&crashed);
}

#[test]
fn autoclear_bit_clear_means_the_extension_is_ignored() {
    let d = tmp();
    let img = d.path().join("a.qcow2");
    create(&img, "1M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    patch(&img, 88, &0u64.to_be_bytes());
    let i = Img::open(&img, true);
    assert_eq!(i.list(), vec![]);
    i.close();
}

#[test]
fn corrupt_directories_fail_the_open_and_change_nothing() {
    let d = tmp();
    let good = d.path().join("good.qcow2");
    create(&good, "1M");
    qemu_img(&["bitmap", "--add", p(&good), "b0"]);
    io(&good, &["write 0 4k"]);
    let (dir, len) = dir_at(&good);
    assert_eq!(len, 32);
    let table = {
        let b = std::fs::read(&good).unwrap();
        u64::from_be_bytes(b[dir as usize..dir as usize + 8].try_into().unwrap())
    };
    let hdr = |at: usize| {
        let b = std::fs::read(&good).unwrap();
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    };
    let (l1, reftable) = (hdr(40), hdr(48));
    let cases: Vec<(u64, Vec<u8>, &str)> = vec![
        (
            table,
            l1.to_be_bytes().to_vec(),
            "also used by other metadata",
        ),
        (
            dir,
            reftable.to_be_bytes().to_vec(),
            "also used by other metadata",
        ),
        (
            table,
            table.to_be_bytes().to_vec(),
            "also used by other metadata",
        ),
        // A cluster inside the file that nothing has allocated.
        (
            table,
            (64u64 << 20).to_be_bytes().to_vec(),
            "has refcount 0",
        ),
        (dir + 16, vec![2], "doesn't satisfy the constraints"),
        (dir + 17, vec![40], "doesn't satisfy the constraints"),
        (
            dir + 12,
            4u32.to_be_bytes().to_vec(),
            "doesn't satisfy the constraints",
        ),
        (
            dir,
            (table + 1).to_be_bytes().to_vec(),
            "doesn't satisfy the constraints",
        ),
        (
            dir + 8,
            0u32.to_be_bytes().to_vec(),
            "doesn't satisfy the constraints",
        ),
        (
            dir + 18,
            200u16.to_be_bytes().to_vec(),
            "Broken bitmap directory",
        ),
        (
            dir + 20,
            8u32.to_be_bytes().to_vec(),
            "Broken bitmap directory",
        ),
        (dir + 24, vec![0xff], "not valid UTF-8"),
        (
            table,
            (1u64 << 40).to_be_bytes().to_vec(),
            "bitmap table entry 0",
        ),
        (table, 3u64.to_be_bytes().to_vec(), "bitmap table entry 0"),
        (
            dir,
            (1u64 << 40).to_be_bytes().to_vec(),
            "past the end of the file",
        ),
    ];
    for (i, (off, bytes, want)) in cases.into_iter().enumerate() {
        let img = d.path().join(format!("bad{i}.qcow2"));
        std::fs::copy(&good, &img).unwrap();
        // Room for the unallocated cluster of the refcount-0 case.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(65 << 20).unwrap();
        patch(&img, off, &bytes);
        let before = std::fs::read(&img).unwrap();
        for ro in [true, false] {
            let e = Img::try_open(&img, ro).err().expect("open must fail");
            assert!(e.to_string().contains(want), "case {i}: {e}");
        }
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "case {i} changed the image"
        );
    }
    // The extension itself: count 0, unaligned directory.
    let ext_at = {
        let b = std::fs::read(&good).unwrap();
        let mut off = 112usize;
        while u32::from_be_bytes(b[off..off + 4].try_into().unwrap()) != 0x2385_2875 {
            let len = u32::from_be_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
            off += 8 + len.div_ceil(8) * 8;
        }
        off as u64 + 8
    };
    for (k, bytes) in [
        (0u64, 0u32.to_be_bytes().to_vec()),
        (16, (dir + 8).to_be_bytes().to_vec()),
    ] {
        let img = d.path().join(format!("ext{k}.qcow2"));
        std::fs::copy(&good, &img).unwrap();
        patch(&img, ext_at + k, &bytes);
        let e = Img::try_open(&img, true).err().expect("open must fail");
        assert!(e.to_string().contains("bitmaps_ext"), "{e}");
    }
    // All-ones table entry: every bit set.
    let img = d.path().join("ones.qcow2");
    std::fs::copy(&good, &img).unwrap();
    patch(&img, table, &1u64.to_be_bytes());
    let i = Img::open(&img, true);
    assert_eq!(i.dirty("b0"), vec![(0, MIB)]);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// An image with two bitmaps and data; where its extension, directory
    /// and first table are.
    fn base() -> &'static (tempfile::TempDir, std::path::PathBuf, Vec<u64>) {
        static B: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf, Vec<u64>)> =
            std::sync::OnceLock::new();
        B.get_or_init(|| {
            let d = tmp();
            let img = d.path().join("base.qcow2");
            create(&img, "2M");
            qemu_img(&["bitmap", "--add", p(&img), "b0"]);
            qemu_img(&["bitmap", "--add", "-g", "512", p(&img), "b1"]);
            io(&img, &["write 0 64k", "write 1M 4k"]);
            let (dir, _) = dir_at(&img);
            let b = std::fs::read(&img).unwrap();
            let table = u64::from_be_bytes(b[dir as usize..dir as usize + 8].try_into().unwrap());
            (d, img, vec![112, dir, table])
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Byte changes in the extension, the directory or a table: the
        /// open succeeds or fails with an error, never panics; a failed
        /// open leaves the file as it was.
        #[test]
        fn corrupted_bitmap_metadata_never_panics(
            muts in proptest::collection::vec((0usize..3, 0u64..96, any::<u8>()), 1..6),
            writable in any::<bool>(),
        ) {
            let (d, img, at) = base();
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let copy = d.path().join(format!("m{n}.qcow2"));
            std::fs::copy(img, &copy).unwrap();
            for (r, off, v) in muts {
                patch(&copy, at[r] + off, &[v]);
            }
            let before = std::fs::read(&copy).unwrap();
            match Img::try_open(&copy, !writable) {
                Ok(i) => {
                    let _ = i.ctx.block_on(i.g.close_all());
                }
                Err(_) => prop_assert!(std::fs::read(&copy).unwrap() == before),
            }
            let _ = std::fs::remove_file(&copy);
        }
    }
}

#[test]
fn no_room_for_the_extension_fails_the_store_and_writes_nothing() {
    let d = tmp();
    // 512-byte clusters and a 360-byte backing file name: the header has
    // room for it but not for the bitmaps extension as well.
    let sub = d.path().join("a".repeat(200));
    std::fs::create_dir(&sub).unwrap();
    let base = sub.join("b".repeat(159));
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(MIB))
        .unwrap();
    let img = d.path().join("top.qcow2");
    let name = format!("{}/{}", "a".repeat(200), "b".repeat(159));
    assert_eq!(name.len(), 360);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        &name,
        "-F",
        "raw",
        p(&img),
        "1M",
    ]);
    let i = Img::open(&img, false);
    let mut o = BitmapAddOptions::default();
    o.persistent = true;
    i.n.add_bitmap("b0", &o).unwrap();
    i.write(0, 4096);
    let e = i.ctx.block_on(i.g.close_all()).unwrap_err();
    assert!(
        e.to_string().contains("storing the bitmap directory"),
        "{e}"
    );
    assert_clean(&img);
    assert_eq!(qemu_bitmaps(&img), vec![]);
}

#[test]
fn reopen_read_only_stores_bitmaps_and_read_write_marks_them_in_use() {
    let d = tmp();
    let img = d.path().join("r.qcow2");
    create(&img, "4M");
    let x = Img::open(&img, false);
    let mut o = BitmapAddOptions::default();
    o.persistent = true;
    x.n.add_bitmap("b", &o).unwrap();
    x.write(0, 65536);
    let ro = blockjob::block::ReopenOptions::new().read_only(true);
    x.ctx.block_on(x.n.reopen(&ro)).unwrap();
    // Read-only: stored, not in use, the image clean while still open.
    assert_eq!(
        qemu_bitmaps(&img),
        [("b".to_string(), 65536, vec!["auto".to_string()])]
    );
    assert_eq!(qemu_dirty(&img, "b"), [(0, 65536)]);
    assert_eq!(info(&img)["dirty-flag"], false);
    let e = x.n.clear_bitmap("b").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bitmap 'b' is readonly and cannot be modified"
    );
    // Read-write again: in use in the image, recording writes.
    x.ctx
        .block_on(x.n.reopen(&blockjob::block::ReopenOptions::new()))
        .unwrap();
    assert_eq!(
        qemu_bitmaps(&img),
        [(
            "b".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
    x.write(2 * MIB, 4096);
    x.close();
    assert_eq!(qemu_dirty(&img, "b"), [(0, 65536), (2 * MIB, 65536)]);
    assert_clean(&img);
}
