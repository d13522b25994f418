//! `blockdev-add`'s common options: `cache.direct` (O_DIRECT with
//! requests of any shape), `cache.no-flush`, `aio=native`, `discard`,
//! `detect-zeroes`, `auto-read-only`, and their errors. QEMU's tools
//! check the images afterwards.

mod common;
use common::*;

use blockjob::block::BlockGraph;
use serde_json::{json, Value};

fn add(
    ctx: &aio::AioContext,
    g: &BlockGraph,
    v: Value,
) -> blockjob::Result<std::sync::Arc<blockjob::block::BlockNode>> {
    ctx.block_on(g.blockdev_add(&v))
}

/// A deterministic pseudo-random byte stream.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn cache_direct_takes_unaligned_requests_and_qemu_reads_the_same_bytes() {
    // Not /dev/shm: tmpfs refuses O_DIRECT.
    let d = tmp();
    for engine in ["threads", "io_uring"] {
        let img = path(&d, &format!("d-{engine}.qcow2"));
        let raw = path(&d, &format!("d-{engine}.raw"));
        qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
        qemu_img(&["create", "-q", "-f", "raw", p(&raw), "4M"]);
        let ctx = aio::AioContext::new().unwrap();
        let g = BlockGraph::new();
        let cache = json!({"direct": true, "no-flush": false});
        let q = add(
            &ctx,
            &g,
            json!({"driver": "qcow2", "node-name": "q", "cache": cache,
            "file": {"driver": "file", "filename": p(&img), "aio": engine}}),
        )
        .unwrap();
        let r = add(
            &ctx,
            &g,
            json!({"driver": "raw", "node-name": "r",
            "file": {"driver": "file", "filename": p(&raw), "aio": "native",
                "cache": {"direct": true}}}),
        )
        .unwrap();
        // Odd offsets and lengths, overlapping, and some written in
        // parallel: each has to be read-modify-written without losing
        // its neighbours' bytes.
        let writes: Vec<(u64, usize)> = vec![
            (1, 7),
            (100, 1000),
            (4095, 2),
            (70_000, 200_000),
            (70_500, 17),
            (1_000_000, 4096),
            (1_000_512, 512),
            (4 * 1024 * 1024 - 3, 3),
        ];
        let mut model = vec![0u8; 4 << 20];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let b = bytes(i as u64 + 1, len);
            model[off as usize..off as usize + len].copy_from_slice(&b);
        }
        ctx.block_on(async {
            let mut hs = Vec::new();
            for (i, &(off, len)) in writes.iter().enumerate() {
                let (q, r) = (q.clone(), r.clone());
                // Overlapping pairs go one after the other, the rest at once.
                let b = bytes(i as u64 + 1, len);
                if i == 4 || i == 6 {
                    for h in hs.drain(..) {
                        let h: aio::JoinHandle<blockjob::Result<()>> = h;
                        h.await.unwrap().unwrap();
                    }
                }
                hs.push(aio::AioContext::current().unwrap().spawn(async move {
                    q.write(off, b.clone()).await?;
                    r.write(off, b).await
                }));
            }
            for h in hs {
                h.await.unwrap().unwrap();
            }
            // Unaligned zeroes and discards too.
            q.write_zeroes(10, 50).await.unwrap();
            r.write_zeroes(10, 50).await.unwrap();
            r.discard(100, 10).await.unwrap();
            q.flush().await.unwrap();
        });
        model[10..60].fill(0);
        // Reads of any shape come back right while open.
        for &(off, len) in &[(0u64, 13usize), (99, 1003), (70_001, 300_000), (4194300, 4)] {
            let got = ctx.block_on(q.read(off, vec![0; len])).unwrap();
            assert_eq!(
                got,
                model[off as usize..off as usize + len],
                "qcow2 {off}+{len} ({engine})"
            );
            let got = ctx.block_on(r.read(off, vec![0; len])).unwrap();
            assert_eq!(
                got,
                model[off as usize..off as usize + len],
                "raw {off}+{len} ({engine})"
            );
        }
        ctx.block_on(g.close_all()).unwrap();
        assert_eq!(std::fs::read(&raw).unwrap(), model, "raw file ({engine})");
        assert_eq!(
            std::fs::metadata(&raw).unwrap().len(),
            4 << 20,
            "raw size kept"
        );
        assert_eq!(
            to_raw(&img, d.path()),
            model,
            "qcow2 as QEMU reads it ({engine})"
        );
        assert_check(&img);
    }
}

#[test]
fn common_options_are_checked_like_qemu() {
    let d = tmp();
    let img = path(&d, "a.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&img), "1M"]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let file = |extra: Value| {
        let mut v = json!({"driver": "file", "filename": p(&img)});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases = [
        (
            json!({"aio": "native"}),
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ),
        (
            json!({"cache": {"direct": 1}}),
            "Invalid parameter type for 'cache.direct', expected: boolean",
        ),
        (
            json!({"cache": {"writeback": true}}),
            "Parameter 'cache.writeback' is unexpected",
        ),
        (
            json!({"cache": true}),
            "Invalid parameter type for 'cache', expected: object",
        ),
        (
            json!({"discard": "sometimes"}),
            "Parameter 'discard' does not accept value 'sometimes'",
        ),
        (
            json!({"detect-zeroes": "yes"}),
            "Parameter 'detect-zeroes' does not accept value 'yes'",
        ),
        (
            json!({"auto-read-only": "on"}),
            "Invalid parameter type for 'auto-read-only', expected: boolean",
        ),
        (
            json!({"force-share": 1}),
            "Invalid parameter type for 'force-share', expected: boolean",
        ),
    ];
    for (extra, want) in cases {
        let e = add(&ctx, &g, file(extra.clone())).unwrap_err();
        assert_eq!(e.to_string(), want, "{extra}");
    }
    assert!(g.nodes().is_empty(), "a refused blockdev-add adds nothing");
    // What libvirt sends for a cache=none disk is accepted.
    let n = add(
        &ctx,
        &g,
        json!({"driver": "raw", "node-name": "disk", "read-only": false,
        "discard": "unmap", "cache": {"direct": true, "no-flush": false},
        "file": {"driver": "file", "filename": p(&img), "aio": "native",
            "auto-read-only": true, "discard": "unmap", "force-share": false}}),
    )
    .unwrap();
    assert!(!n.read_only());
    ctx.block_on(g.close_all()).unwrap();
}

#[test]
fn qcow2_l2_cache_size_is_taken_and_checked() {
    let d = tmp();
    let img = path(&d, "c.qcow2");
    // 512 B clusters: a table covers 32 KiB, so 1 MiB spans 32 tables.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&img),
        "1M",
    ]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let node = |size: Value| {
        json!({"driver": "qcow2", "node-name": "c", "l2-cache-size": size,
            "file": {"driver": "file", "filename": p(&img)}})
    };
    for (size, want) in [
        (
            json!("1M"),
            "Invalid parameter type for 'l2-cache-size', expected: integer",
        ),
        (json!(-1), "l2-cache-size must not be negative"),
        (
            json!(1.5),
            "Invalid parameter type for 'l2-cache-size', expected: integer",
        ),
    ] {
        let e = add(&ctx, &g, node(size.clone())).unwrap_err();
        assert_eq!(e.to_string(), want, "{size}");
    }
    assert!(g.nodes().is_empty(), "a refused blockdev-add adds nothing");
    // Two tables' worth of cache (0 is raised to that minimum) over 32
    // tables: writes across the image, last to first, evict changed
    // tables.
    let n = add(&ctx, &g, node(json!(0))).unwrap();
    let data = bytes(9, 1 << 20);
    for i in (0..32u64).rev() {
        let off = (i * 32 + 7) << 10;
        let end = (off + (40 << 10)).min(1 << 20);
        ctx.block_on(n.write(off, data[off as usize..end as usize].to_vec()))
            .unwrap();
    }
    ctx.block_on(n.write(0, data[..7 << 10].to_vec())).unwrap();
    ctx.block_on(g.close_all()).unwrap();
    assert_check(&img);
    let raw = path(&d, "c.raw");
    std::fs::write(&raw, &data).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&raw), p(&img)]);
}

#[test]
fn discard_ignore_keeps_data_and_detect_zeroes_makes_zero_clusters() {
    let d = tmp();
    let img = path(&d, "z.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    qemu_io(&img, &["write -P 9 0 128k".into()]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = add(
        &ctx,
        &g,
        json!({"driver": "qcow2", "node-name": "z", "discard": "ignore",
        "detect-zeroes": "on", "file": {"driver": "file", "filename": p(&img)}}),
    )
    .unwrap();
    ctx.block_on(async {
        n.discard(0, 65536).await.unwrap();
        n.write(65536, vec![0; 65536]).await.unwrap();
        n.write(131072, vec![5; 65536]).await.unwrap();
    });
    ctx.block_on(g.close_all()).unwrap();
    assert_check(&img);
    let map = qemu_map(&img);
    let at = |off: u64| {
        map.iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    // discard=ignore: the data is still there.
    assert_eq!(at(0)["data"], true);
    // detect-zeroes: a zero cluster, no data written.
    assert_eq!(at(65536)["zero"], true);
    assert_eq!(at(65536)["data"], false);
    assert_eq!(at(131072)["data"], true);
    let raw = to_raw(&img, d.path());
    assert!(raw[..65536].iter().all(|&b| b == 9));
    assert!(raw[65536..131072].iter().all(|&b| b == 0));
    assert!(raw[131072..196608].iter().all(|&b| b == 5));
}

#[test]
fn auto_read_only_falls_back_when_the_file_cannot_be_written() {
    // sysfs refuses O_RDWR on this read-only attribute even to root.
    let f = "/sys/kernel/notes";
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f)
        .is_ok()
        || std::fs::File::open(f).is_err()
    {
        eprintln!("{f}: not a readable, unwritable file here; skipping");
        return;
    }
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let e = add(
        &ctx,
        &g,
        json!({"driver": "file", "node-name": "w", "filename": f}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("Permission denied"), "{e}");
    let n = add(
        &ctx,
        &g,
        json!({"driver": "raw", "node-name": "ro", "auto-read-only": true,
        "file": {"driver": "file", "filename": f}}),
    )
    .unwrap();
    assert!(n.read_only(), "the format node follows its read-only file");
    assert!(n.file_child().unwrap().read_only());
    ctx.block_on(g.close_all()).unwrap();
}

/// `qemu-img info --force-share`'s `dirty-flag` of an image in use.
fn dirty_flag(img: &std::path::Path) -> bool {
    let v: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p(img)])).unwrap();
    v["dirty-flag"].as_bool().unwrap()
}

#[test]
fn blockdev_reopen_switches_read_only_all_or_nothing() {
    let d = tmp();
    let (base, other) = (path(&d, "base.qcow2"), path(&d, "other.qcow2"));
    for img in [&base, &other] {
        qemu_img(&["create", "-q", "-f", "qcow2", p(img), "1M"]);
    }
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let b = add(
        &ctx,
        &g,
        json!({"driver": "qcow2", "node-name": "b", "read-only": true,
        "cache": {"direct": false},
        "file": {"driver": "file", "node-name": "bf", "filename": p(&base)}}),
    )
    .unwrap();
    let o = add(
        &ctx,
        &g,
        json!({"driver": "qcow2", "node-name": "o",
        "file": {"driver": "file", "node-name": "of", "filename": p(&other)}}),
    )
    .unwrap();
    let reopen = |v: Value| ctx.block_on(g.blockdev_reopen(v.as_array().unwrap()));
    assert!(b.read_only() && !dirty_flag(&base));
    assert!(ctx.block_on(b.write(0, vec![1; 512])).is_err());

    reopen(
        json!([{"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": false,
        "cache": {"direct": false}}]),
    )
    .unwrap();
    assert!(!b.read_only() && !b.file_child().unwrap().read_only());
    assert!(dirty_flag(&base), "open read-write: the dirty bit is set");
    ctx.block_on(b.write(0, vec![1; 512])).unwrap();

    let errors = [
        (
            json!([{"driver": "qcow2", "node-name": "nope", "file": "x"}]),
            "Failed to find node with node-name='nope'",
        ),
        (
            json!([{"driver": "raw", "node-name": "b", "file": "bf"}]),
            "Cannot change the option 'driver'",
        ),
        (
            json!([{"driver": "qcow2", "node-name": "b", "file": "of", "cache": {"direct": false}}]),
            "Cannot change the option 'file'",
        ),
        (
            json!([{"driver": "qcow2", "node-name": "b", "file": "bf", "cache": {"direct": true}}]),
            "Cannot change the option 'cache'",
        ),
        (
            json!([{"driver": "qcow2", "node-name": "b", "file": "bf"}]),
            "Cannot change the option 'cache'",
        ),
        (
            json!([{"driver": "qcow2", "node-name": "b"}]),
            "Parameter 'options[0].file' is missing",
        ),
        // The file node is written by its qcow2 parent.
        (
            json!([{"driver": "file", "node-name": "bf", "filename": p(&base), "read-only": true,
                "cache": {"direct": false}}]),
            "Block node 'bf' is in use as writer by b",
        ),
    ];
    for (v, want) in errors {
        let e = reopen(v.clone()).unwrap_err();
        assert_eq!(e.to_string(), want, "{v}");
    }
    // All or nothing: `b` goes read-only, then `o` fails (not given its
    // file), so `b` comes back read-write.
    let e = reopen(json!([
        {"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": true, "cache": {"direct": false}},
        {"driver": "qcow2", "node-name": "o", "file": "of", "read-only": true, "backing": "b"},
    ]))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot change the backing link of 'o' by reopen"
    );
    assert!(!b.read_only() && !o.read_only());

    // Read-only again: flushed and clean on disk while still open.
    reopen(
        json!([{"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": true,
        "cache": {"direct": false}}]),
    )
    .unwrap();
    assert!(b.read_only());
    assert!(!dirty_flag(&base), "reopened read-only: clean");
    assert!(ctx.block_on(b.write(0, vec![2; 512])).is_err());
    assert_check(&base);
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(
        &to_raw(&base, d.path())[..513],
        &[[1u8; 512].as_slice(), &[0]].concat()[..]
    );
}
