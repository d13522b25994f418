//! Allocating writes running at once (their data written with the
//! metadata lock released) leave an image that reads as one of the
//! possible orders and passes `qemu-img check`: no leak, no cluster
//! mapped twice.

mod common;
use common::*;

use blockjob::block::BlockGraph;

const CS: u64 = 64 << 10;

#[test]
fn overlapping_whole_cluster_writes_at_once_pass_check() {
    let dir = tmp();
    let img = dir.path().join("c.qcow2");
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = fresh_qcow2(&ctx, &g, &img, 8 << 20);
    // Task i writes clusters i and i + 1 (two tasks per cluster), plus a
    // partial write into cluster i + 40 racing with a whole-cluster one.
    let hs: Vec<_> = (0..32u64)
        .flat_map(|i| {
            let (a, b) = (n.clone(), n.clone());
            [
                ctx.spawn(async move { a.write(i * CS, vec![i as u8 + 1; 2 * CS as usize]).await }),
                ctx.spawn(async move {
                    b.write((i + 40) * CS + 512, vec![i as u8 + 100; 4096])
                        .await
                }),
            ]
        })
        .collect();
    for h in hs {
        ctx.block_on(h).unwrap().unwrap();
    }
    let data = read_all(&ctx, &n, 1 << 20);
    for c in 0..33u64 {
        let cl = &data[(c * CS) as usize..((c + 1) * CS) as usize];
        let first = cl[0];
        assert!(cl.iter().all(|&b| b == first), "cluster {c} is torn");
        // Written by task c (pattern c + 1) or c - 1 (pattern c).
        assert!(
            first == c as u8 + 1 || first == c as u8,
            "cluster {c}: {first}"
        );
    }
    for i in 0..32u64 {
        let at = ((i + 40) * CS + 512) as usize;
        assert!(data[at..at + 4096].iter().all(|&b| b == i as u8 + 100));
    }
    ctx.block_on(n.close()).unwrap();
    let (code, out) = qemu_img_status(&["check", p(&img)]);
    assert_eq!(code, 0, "{out}");
}
