//! Images we create and write pass `qemu-img check` and read, through
//! QEMU, exactly like a raw reference written with the same operations.

mod common;
use common::*;

use std::path::Path;

use blockjob::block::{create_qcow2, BlockGraph, CreateOptions, OpenOptions};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Grow { by: u64 },
}

/// Applies `op` to the in-memory model (QEMU's semantics: discard makes
/// whole clusters read as zero and ignores partial ones).
fn apply_model(model: &mut Vec<u8>, cs: u64, op: &Op) {
    match *op {
        Op::Write { off, len, pat } => model[off as usize..(off + len) as usize].fill(pat),
        Op::Zero { off, len } => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard { off, len } => {
            let a = off.div_ceil(cs) * cs;
            let z = (off + len) / cs * cs;
            if a < z {
                model[a as usize..z as usize].fill(0);
            }
        }
        Op::Grow { by } => model.resize(model.len() + by as usize, 0),
    }
}

/// Runs `ops` on a fresh image (optionally over `backing`), checks it
/// with qemu-img and compares it with the model.
fn run(dir: &Path, cs: u64, size: u64, backing: Option<&Path>, ops: &[Op]) {
    run_with(dir, cs, size, backing, ops, &OpenOptions::new());
}

/// [`run`] with the image opened with `opts`.
fn run_with(
    dir: &Path,
    cs: u64,
    size: u64,
    backing: Option<&Path>,
    ops: &[Op],
    opts: &OpenOptions,
) {
    let img = dir.join("img.qcow2");
    let ctx = aio::AioContext::new().unwrap();
    let mut model = match backing {
        Some(b) => {
            let mut m = to_raw(b, dir);
            m.resize(size as usize, 0);
            m
        }
        None => vec![0u8; size as usize],
    };
    let mut co = CreateOptions::new(size).cluster_size(cs);
    if let Some(b) = backing {
        co = co.backing(b.file_name().unwrap().to_str().unwrap(), Some("qcow2"));
    }
    ctx.block_on(create_qcow2(&img, &co)).expect("create");
    let g = BlockGraph::new();
    let node = ctx.block_on(g.open_image(&img, opts)).expect("open rw");
    for op in ops {
        let r = match *op {
            Op::Write { off, len, pat } => ctx.block_on(node.write(off, vec![pat; len as usize])),
            Op::Zero { off, len } => ctx.block_on(node.write_zeroes(off, len)),
            Op::Discard { off, len } => ctx.block_on(node.discard(off, len)),
            Op::Grow { by } => ctx.block_on(node.truncate(node.len() + by)),
        };
        r.unwrap_or_else(|e| panic!("{op:?}: {e}"));
        apply_model(&mut model, cs, op);
    }
    // Our own reads agree with the model before closing.
    let got = read_all(&ctx, &node, 256 * 1024);
    assert!(got == model, "our read-back differs from the model");
    ctx.block_on(node.close()).expect("close");
    drop(node);
    drop(g);
    let (code, out) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(code, 0, "qemu-img check: {out}");
    let reference = dir.join("ref.raw");
    std::fs::write(&reference, &model).unwrap();
    let (code, out) = qemu_img_status(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        p(&reference),
        p(&img),
    ]);
    assert_eq!(code, 0, "qemu-img compare: {out}");
    // And our check agrees.
    let g = BlockGraph::new();
    let node = open_ro(&ctx, &g, &img);
    let report = ctx.block_on(node.check()).unwrap().unwrap();
    assert!(
        report.corruptions.is_empty() && report.leaks.is_empty(),
        "{report:?}"
    );
}

/// A deterministic pseudo-random op sequence.
fn ops(seed: u64, n: usize, size: u64, grow: bool) -> Vec<Op> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut size = size;
    let mut v = Vec::new();
    for _ in 0..n {
        let off = next() % size;
        let len = (next() % 200_000).min(size - off).max(1);
        let op = match next() % 10 {
            0..=4 => Op::Write {
                off,
                len,
                pat: (next() % 255 + 1) as u8,
            },
            5 | 6 => Op::Zero { off, len },
            7 | 8 => Op::Discard { off, len },
            _ if grow => {
                let by = (next() % 4 + 1) * 512 * 1024;
                size += by;
                Op::Grow { by }
            }
            _ => Op::Write {
                off,
                len: 1,
                pat: 0xee,
            },
        };
        v.push(op);
    }
    v
}

#[test]
fn random_ops_cs64k_pass_check_and_compare() {
    let dir = tmp();
    run(dir.path(), 65536, 4 << 20, None, &ops(1, 60, 4 << 20, true));
}

#[test]
fn random_ops_cs512_grow_refcount_table_pass_check_and_compare() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB of file,
    // so this grows the refcount table and L1.
    let dir = tmp();
    let mut v = ops(2, 40, 6 << 20, true);
    v.push(Op::Write {
        off: 0,
        len: 6 << 20,
        pat: 0x42,
    });
    v.push(Op::Grow { by: 4 << 20 });
    v.push(Op::Write {
        off: 6 << 20,
        len: 4 << 20,
        pat: 0x43,
    });
    run(dir.path(), 512, 6 << 20, None, &v);
}

#[test]
fn random_ops_with_a_two_table_l2_cache_pass_check_and_compare() {
    // 512 B clusters (a table covers 32 KiB) and an L2 cache of two
    // tables: changed tables are written back when evicted, also new
    // tables of a request that spans more tables than the cache holds.
    let dir = tmp();
    let opts = OpenOptions::new().l2_cache_size(1024);
    run_with(
        dir.path(),
        512,
        2 << 20,
        None,
        &ops(7, 60, 2 << 20, true),
        &opts,
    );
}

#[test]
fn random_ops_cs2m_pass_check_and_compare() {
    let dir = tmp();
    run(
        dir.path(),
        2 << 20,
        8 << 20,
        None,
        &ops(3, 30, 8 << 20, true),
    );
}

#[test]
fn cow_over_backing_passes_check_and_compare() {
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    qemu_io(
        &base,
        &["write -P 0x61 0 4M".into(), "write -z 1M 64k".into()],
    );
    run(
        dir.path(),
        65536,
        5 << 20,
        Some(&base),
        &ops(4, 60, 5 << 20, false),
    );
}

#[test]
fn reopen_after_close_is_clean_and_writable() {
    let dir = tmp();
    let img = dir.path().join("a.qcow2");
    let ctx = aio::AioContext::new().unwrap();
    ctx.block_on(create_qcow2(&img, &CreateOptions::new(1 << 20)))
        .unwrap();
    for round in 0..3u8 {
        let g = BlockGraph::new();
        let n = ctx
            .block_on(g.open_image(&img, &OpenOptions::new()))
            .unwrap();
        ctx.block_on(n.write(u64::from(round) * 4096, vec![round + 1; 4096]))
            .unwrap();
        ctx.block_on(g.close_all()).unwrap();
    }
    let (code, out) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(code, 0, "{out}");
    let info = qemu_img(&["info", "--output=json", p(&img)]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
}

#[test]
fn open_for_write_sets_dirty_bit_until_close() {
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    let ctx = aio::AioContext::new().unwrap();
    ctx.block_on(create_qcow2(&img, &CreateOptions::new(1 << 20)))
        .unwrap();
    let g = BlockGraph::new();
    let n = ctx
        .block_on(g.open_image(&img, &OpenOptions::new()))
        .unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[79] & 1, 1, "dirty bit set while open");
    ctx.block_on(n.close()).unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[79] & 1, 0, "dirty bit cleared on close");
}

#[test]
fn concurrent_writes_from_tasks_pass_check() {
    let dir = tmp();
    let img = dir.path().join("c.qcow2");
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = fresh_qcow2(&ctx, &g, &img, 8 << 20);
    let hs: Vec<_> = (0..16u64)
        .map(|i| {
            let n = n.clone();
            ctx.spawn(async move {
                // Overlapping clusters: every task writes into two.
                n.write(i * 300_000, vec![i as u8 + 1; 100_000]).await
            })
        })
        .collect();
    for h in hs {
        ctx.block_on(h).unwrap().unwrap();
    }
    let mut model = vec![0u8; 8 << 20];
    for i in 0..16u64 {
        model[(i * 300_000) as usize..(i * 300_000 + 100_000) as usize].fill(i as u8 + 1);
    }
    assert!(read_all(&ctx, &n, 1 << 20) == model);
    ctx.block_on(n.close()).unwrap();
    let (code, out) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(code, 0, "{out}");
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |off| (Just(off), 1..=(size - off).min(150_000)));
    prop_oneof![
        3 => (range.clone(), any::<u8>()).prop_map(|((off, len), pat)| Op::Write { off, len, pat }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_match_model_and_qemu(
        ops in proptest::collection::vec(op_strategy(2 << 20), 1..25),
        cs in prop::sample::select(vec![512u64, 4096, 65536]),
    ) {
        let dir = tmp();
        run(dir.path(), cs, 2 << 20, None, &ops);
    }
}
