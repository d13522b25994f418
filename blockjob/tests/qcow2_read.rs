//! Images built by qemu-img/qemu-io read back byte-identical through our
//! qcow2 driver (versus `qemu-img convert -O raw` of the same chain).

mod common;
use common::*;

use blockjob::block::BlockGraph;

/// Builds a chain of `depth` qcow2 images (base first) with cluster size
/// `cs`, each layer written with its own pattern at its own offsets.
fn build_chain(dir: &tempfile::TempDir, depth: usize, cs: u64, extra: &str) -> std::path::PathBuf {
    let size = 4 << 20;
    let mut prev: Option<String> = None;
    let mut top = path(dir, "x");
    for i in 0..depth {
        let name = format!("l{i}.qcow2");
        let img = path(dir, &name);
        let opts = format!("cluster_size={cs}{extra}");
        let sz = (size - (depth - 1 - i) as u64 * 512 * 1024).to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        if let Some(b) = &prev {
            args.extend(["-b", b.as_str(), "-F", "qcow2"]);
        }
        args.extend([p(&img), sz.as_str()]);
        qemu_img(&args);
        let k = i as u64 + 1;
        qemu_io(
            &img,
            &[
                format!("write -P 0x{:02x} {} {}", 0x10 * k, k * 3 * 1000, 70_000),
                format!("write -P 0x{:02x} {} 4096", 0x10 * k + 1, k * 700_000),
                format!("write -z {} 8192", k * 300_000 + 4096),
                format!("write -P 0x{:02x} 2097152 512", 0x10 * k + 2),
                format!("discard {} {}", 1_048_576 + k * 65536, 131072),
            ],
        );
        prev = Some(name);
        top = img;
    }
    top
}

fn check_chain(depth: usize, cs: u64, extra: &str) {
    let dir = tmp();
    let top = build_chain(&dir, depth, cs, extra);
    let want = to_raw(&top, dir.path());
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let node = open_ro(&ctx, &g, &top);
    assert_eq!(node.chain().len(), depth);
    for chunk in [4096, 65536 + 512, 1 << 20] {
        let got = read_all(&ctx, &node, chunk);
        assert!(
            got == want,
            "depth {depth} cs {cs}{extra} chunk {chunk}: contents differ"
        );
    }
}

#[test]
fn chain_depth1_cs64k_reads_like_qemu() {
    check_chain(1, 65536, "");
}

#[test]
fn chain_depth3_cs512_reads_like_qemu() {
    check_chain(3, 512, "");
}

#[test]
fn chain_depth2_cs2m_reads_like_qemu() {
    check_chain(2, 2 << 20, "");
}

#[test]
fn chain_depth4_cs64k_reads_like_qemu() {
    check_chain(4, 65536, "");
}

#[test]
fn extended_l2_chain_reads_like_qemu() {
    check_chain(2, 65536, ",extended_l2=on");
}

#[test]
fn version2_image_reads_like_qemu() {
    check_chain(2, 65536, ",compat=0.10");
}

#[test]
fn compressed_image_reads_like_qemu() {
    let dir = tmp();
    let src = path(&dir, "src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&src), "2M"]);
    qemu_io(
        &src,
        &[
            "write -P 0x5a 0 300000".into(),
            "write -P 0x33 1000000 65536".into(),
        ],
    );
    let comp = path(&dir, "comp.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&src), p(&comp)]);
    let want = to_raw(&comp, dir.path());
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let node = open_ro(&ctx, &g, &comp);
    assert_eq!(read_all(&ctx, &node, 100_000), want);
}

#[test]
fn raw_backing_reads_like_qemu() {
    let dir = tmp();
    let base = path(&dir, "base.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&base), "1M"]);
    qemu_io(&base, &["write -P 0x77 4096 100000".into()]);
    let top = path(&dir, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&top),
        "2M",
    ]);
    qemu_io(&top, &["write -P 0x11 65536 512".into()]);
    let want = to_raw(&top, dir.path());
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let node = open_ro(&ctx, &g, &top);
    assert_eq!(node.chain()[1].driver_name(), "raw");
    assert_eq!(read_all(&ctx, &node, 65536), want);
}
