//! The node graph: blockdev-add shaped options, naming, permissions.

mod common;
use common::*;

use blockjob::block::{BlockGraph, Perm};
use serde_json::json;

#[test]
fn blockdev_add_builds_a_chain_and_names_resolve() {
    let d = tmp();
    let base = path(&d, "base.qcow2");
    let top = path(&d, "top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "1M"]);
    qemu_io(&base, &["write -P 7 0 4k".into()]);
    qemu_img(&["create", "-q", "-f", "qcow2", p(&top), "1M"]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    ctx.block_on(g.blockdev_add(
        &json!({"driver":"qcow2","node-name":"base","read-only":true,
        "file":{"driver":"file","filename":p(&base)}}),
    ))
    .unwrap();
    let t = ctx
        .block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
            "file":{"driver":"file","filename":p(&top)},"backing":"base"})))
        .unwrap();
    assert_eq!(t.backing().unwrap().name(), "base");
    assert_eq!(ctx.block_on(t.read(0, vec![0; 4])).unwrap(), vec![7; 4]);
    assert_eq!(g.find(p(&base)).unwrap().name(), "base");
    assert_eq!(g.find("top").unwrap().filename(), p(&top));
    let e = ctx
        .block_on(g.blockdev_add(&json!({"driver":"null-co","node-name":"top"})))
        .unwrap_err();
    assert_eq!(e.to_string(), "Duplicate nodes with node-name='top'");
    let e = ctx
        .block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"x",
            "file":{"driver":"file","filename":p(&top)},"bogus":1})))
        .unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'bogus' is unexpected");
    let e = ctx
        .block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"ghost",
            "file":{"driver":"file","filename":p(&path(&d, "nope.qcow2"))}})))
        .unwrap_err();
    assert!(
        e.to_string()
            .ends_with("nope.qcow2': No such file or directory"),
        "{e}"
    );
    // backing: null leaves the image without its backing file.
    let solo = ctx
        .block_on(g.blockdev_add(
            &json!({"driver":"qcow2","node-name":"solo","read-only":true,
            "file":{"driver":"file","filename":p(&top)},"backing":null}),
        ))
        .unwrap();
    assert!(solo.backing().is_none());
    ctx.block_on(g.close_all()).unwrap();
}

#[test]
fn permissions_refuse_a_second_writer_and_read_only_writes() {
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = ctx
        .block_on(g.blockdev_add(&json!({"driver":"null-co","node-name":"n0","size":1048576})))
        .unwrap();
    let w = n
        .attach(
            "job0",
            "root",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ,
        )
        .unwrap();
    let e = n
        .attach("job1", "root", Perm::WRITE, Perm::ALL)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Conflicts with use by job0 as 'root', which does not allow 'write' on n0"
    );
    let e = n
        .attach(
            "reader",
            "root",
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Conflicts with use by job0 as 'root', which uses 'write' on n0"
    );
    drop(w);
    let _r = n.attach("job1", "root", Perm::WRITE, Perm::ALL).unwrap();
    let ro = ctx
        .block_on(g.blockdev_add(&json!({"driver":"null-co","node-name":"ro","read-only":true})))
        .unwrap();
    assert!(ro.attach("w", "root", Perm::WRITE, Perm::ALL).is_err());
    assert!(ctx.block_on(ro.write(0, vec![1])).is_err());
    assert_eq!(ctx.block_on(ro.read(0, vec![9; 8])).unwrap(), vec![0; 8]);
}

#[test]
fn a_qcow2_file_node_refuses_a_second_format_writer() {
    let d = tmp();
    let img = path(&d, "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    ctx.block_on(g.blockdev_add(&json!({"driver":"file","node-name":"f","filename":p(&img)})))
        .unwrap();
    ctx.block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"q1","file":"f"})))
        .unwrap();
    let e = ctx
        .block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"q2","file":"f"})))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Conflicts with use by q1 as 'file'"),
        "{e}"
    );
    ctx.block_on(g.close_all()).unwrap();
    assert_eq!(qemu_img_status(&["check", p(&img)]).0, 0);
}

/// A backing link shares write while nobody writes its parent (QEMU's rule
/// for backing children), and a first writer of the parent is refused
/// while someone else writes the backing file.
#[test]
fn a_backing_link_shares_write_only_while_its_parent_is_not_written() {
    let d = tmp();
    let (base, top) = (path(&d, "base.qcow2"), path(&d, "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", p(&top), "1M"]);
    let ctx = aio::AioContext::new().unwrap();
    let g = BlockGraph::new();
    let b = ctx
        .block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"base",
            "file":{"driver":"file","filename":p(&base)}})))
        .unwrap();
    let t = ctx
        .block_on(g.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
            "file":{"driver":"file","filename":p(&top)},"backing":"base"})))
        .unwrap();
    // Top written: its backing file takes no other writer.
    let top_writer = t.attach("guest", "root", Perm::WRITE, Perm::ALL).unwrap();
    let e = b
        .attach("other", "root", Perm::WRITE, Perm::ALL)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Conflicts with use by top as 'backing'"),
        "{e}"
    );
    // Top idle: base may be written (an active commit's pivot)...
    drop(top_writer);
    let base_writer = b.attach("other", "root", Perm::WRITE, Perm::ALL).unwrap();
    // ... and then top may not become written.
    let e = t
        .attach("guest", "root", Perm::WRITE, Perm::ALL)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Conflicts with use by other as 'root', which uses 'write' on base"),
        "{e}"
    );
    drop(base_writer);
    t.attach("guest", "root", Perm::WRITE, Perm::ALL).unwrap();
}
