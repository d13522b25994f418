//! The `nbd` driver against QEMU's servers (`qemu-nbd`,
//! `qemu-storage-daemon`) and against broken fake servers: reads equal the
//! image, writes/zeroes/discards land (`qemu-img compare` after the server
//! stops), block status equals `qemu-img map`, read-only exports, open
//! errors that are clear and never hang, reconnect, and mirror/backup jobs
//! with an NBD target.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aio::{AioContext, ClockType};
use blockjob::block::{BlockGraph, BlockNode};
use blockjob::job::{Job, JobRegistry, JobStatus};
use blockjob::jobs::{start_backup, start_mirror, BackupArgs, MirrorArgs, OnError, SyncMode};
use common::*;
use serde_json::json;

/// A server process, killed (SIGTERM, so qcow2 images are closed cleanly)
/// and reaped on drop.
struct Server {
    child: Option<Child>,
    sock: PathBuf,
}

impl Server {
    /// `qemu-nbd -k SOCK -x NAME --persistent --shared=8 EXTRA... IMG`.
    fn qemu_nbd(sock: &Path, name: &str, img: &Path, extra: &[&str]) -> Server {
        let mut c = Command::new("qemu-nbd");
        c.arg("-k")
            .arg(sock)
            .args(["-f", "qcow2", "-x", name, "--persistent", "--shared=8"])
            .args(extra)
            .arg(img);
        Server::spawn(c, sock)
    }

    /// `qemu-storage-daemon` exporting `img` (qcow2) as `name`, writable.
    fn qsd(sock: &Path, name: &str, img: &Path) -> Server {
        let mut c = Command::new("qemu-storage-daemon");
        c.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,discard=unmap,filename={}",
                p(img)
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=q,discard=unmap,file=f")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", p(sock)))
            .arg("--export")
            .arg(format!("type=nbd,id=e,node-name=q,name={name},writable=on"));
        Server::spawn(c, sock)
    }

    fn spawn(mut c: Command, sock: &Path) -> Server {
        let _ = std::fs::remove_file(sock);
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn server");
        let mut s = Server {
            child: Some(child),
            sock: sock.to_path_buf(),
        };
        s.wait_listening();
        s
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("server exited: {st}");
                }
            }
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unix(sock: &Path, export: &str) -> serde_json::Value {
    json!({"driver": "nbd", "node-name": "n",
        "server": {"type": "unix", "path": p(sock)}, "export": export})
}

fn add(ctx: &AioContext, g: &BlockGraph, args: serde_json::Value) -> Arc<BlockNode> {
    ctx.block_on(g.blockdev_add(&args))
        .expect("blockdev-add nbd")
}

fn add_err(ctx: &AioContext, g: &BlockGraph, args: serde_json::Value) -> String {
    ctx.block_on(g.blockdev_add(&args))
        .expect_err("blockdev-add should fail")
        .to_string()
}

/// A 4 MiB qcow2 with data, a zero cluster and unallocated parts.
fn patterned(img: &Path) {
    create(img, "4M", None);
    qemu_io(
        img,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 1536k 64k".into(),
            "write -z 2M 128k".into(),
            "write -P 0x33 3M 100k".into(),
        ],
    );
}

/// A patterned image served by `qemu-nbd EXTRA...` as `disk`, and a
/// context and graph to open it in. Fields drop in order: the graph, the
/// server, then the directory.
struct Fixture {
    g: BlockGraph,
    ctx: AioContext,
    srv: Server,
    sock: PathBuf,
    img: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Starts a writable server again on the same socket and image.
    fn restart(&mut self) {
        self.srv = Server::qemu_nbd(&self.sock, "disk", &self.img, &[]);
    }
}

/// A small read fails with an error containing `needle`.
fn read_fails(ctx: &AioContext, n: &BlockNode, needle: &str) {
    let e = ctx
        .block_on(n.read(0, vec![0; 512]))
        .unwrap_err()
        .to_string();
    assert!(e.contains(needle), "{e}");
}

fn fixture(extra: &[&str]) -> Fixture {
    let dir = tmp();
    let img = path(&dir, "a.qcow2");
    patterned(&img);
    let sock = path(&dir, "s.sock");
    let srv = Server::qemu_nbd(&sock, "disk", &img, extra);
    Fixture {
        g: BlockGraph::new(),
        ctx: AioContext::new().unwrap(),
        srv,
        sock,
        img,
        dir,
    }
}

#[test]
fn reads_equal_the_image_from_qemu_nbd() {
    let Fixture {
        g,
        ctx,
        srv: _srv,
        sock,
        img,
        dir,
    } = fixture(&["-r"]);
    let want = to_raw(&img, dir.path());
    let n = add(&ctx, &g, unix(&sock, "disk"));
    assert_eq!(n.len(), 4 << 20);
    assert_eq!(n.driver_name(), "nbd");
    assert_eq!(
        n.filename(),
        format!("nbd+unix:///disk?socket={}", p(&sock))
    );
    // Unaligned chunk sizes so requests straddle data, zero and holes.
    assert!(read_all(&ctx, &n, 300_000) == want);
    // Many requests in flight on the one connection at once.
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let n = n.clone();
            ctx.spawn(async move { n.read(i * 65536, vec![0xff; 65536]).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = ctx.block_on(t).unwrap().unwrap();
        assert!(got[..] == want[i * 65536..(i + 1) * 65536], "chunk {i}");
    }
    ctx.block_on(g.close_all()).unwrap();
}

#[test]
fn read_only_export_gives_a_read_only_node() {
    let Fixture { g, ctx, sock, .. } = &fixture(&["-r"]);
    let (g, ctx, sock) = (g, ctx, sock.as_path());
    let n = add(ctx, g, unix(sock, "disk"));
    assert!(n.read_only());
    let e = ctx
        .block_on(n.write(0, vec![1; 512]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
}

/// Applies the same writes through the node and with qemu-io to a copy.
fn write_mix_and_compare(dir: &tempfile::TempDir, srv: impl FnOnce(&Path, &Path) -> Server) {
    let img = path(dir, "a.qcow2");
    patterned(&img);
    let want = snapshot(&img, dir.path(), "want.qcow2");
    let sock = path(dir, "s.sock");
    let mut srv = srv(&sock, &img);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = add(&ctx, &g, unix(&sock, "disk"));
    assert!(!n.read_only());
    ctx.block_on(n.write(4096, vec![0xa5; 70_000])).unwrap();
    ctx.block_on(n.write((4 << 20) - 512, vec![0x5a; 512]))
        .unwrap();
    ctx.block_on(n.write_zeroes(512 << 10, 128 << 10)).unwrap();
    ctx.block_on(n.discard(3 << 20, 1 << 20)).unwrap();
    ctx.block_on(n.flush()).unwrap();
    // Our own reads see the writes.
    let got = ctx.block_on(n.read(4096, vec![0; 70_000])).unwrap();
    assert!(got.iter().all(|&b| b == 0xa5));
    ctx.block_on(g.blockdev_del("n")).unwrap();
    srv.stop();
    qemu_io(
        &want,
        &[
            "write -P 0xa5 4096 70000".into(),
            "write -P 0x5a 4193792 512".into(),
            "write -z 512k 128k".into(),
            "discard 3M 1M".into(),
        ],
    );
    assert_same(&img, &want);
    assert_check(&img);
}

#[test]
fn writes_zeroes_and_discards_through_qemu_nbd_land_in_the_image() {
    let dir = tmp();
    write_mix_and_compare(&dir, |sock, img| {
        Server::qemu_nbd(sock, "disk", img, &["--discard=unmap"])
    });
}

#[test]
fn writes_zeroes_and_discards_through_qemu_storage_daemon_land_in_the_image() {
    let dir = tmp();
    write_mix_and_compare(&dir, |sock, img| Server::qsd(sock, "disk", img));
}

#[test]
fn unknown_export_and_missing_socket_are_clear_open_errors() {
    let f = fixture(&["-r"]);
    let (g, ctx, sock, dir) = (&f.g, &f.ctx, f.sock.as_path(), &f.dir);
    let e = add_err(ctx, g, unix(sock, "nope"));
    assert!(
        e.starts_with(&format!(
            "Could not open 'nbd+unix:///nope?socket={}': Requested export 'nope' not available",
            p(sock)
        )),
        "{e}"
    );
    let gone = path(dir, "gone.sock");
    let e = add_err(ctx, g, unix(&gone, "disk"));
    assert!(
        e.ends_with(&format!(
            "Failed to connect to '{}': No such file or directory",
            p(&gone)
        )),
        "{e}"
    );
    // Bad options.
    let e = add_err(
        ctx,
        g,
        json!({"driver": "nbd", "server": {"type": "vsock", "cid": "3"}}),
    );
    assert_eq!(e, "Parameter 'server.type' does not accept value 'vsock'");
    let e = add_err(
        ctx,
        g,
        json!({"driver": "nbd", "server": {"type": "unix", "path": "/x", "host": "h"}}),
    );
    assert_eq!(e, "Parameter 'server.host' is unexpected");
    let e = add_err(ctx, g, json!({"driver": "nbd"}));
    assert_eq!(e, "Parameter 'server' is missing");
    assert!(g.nodes().is_empty());
}

/// A fake server on a unix socket: runs `script` on the first connection
/// in a thread.
fn fake_server(
    sock: &Path,
    script: impl FnOnce(UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            script(s);
        }
    })
}

/// The server's greeting: NBDMAGIC, IHAVEOPT, fixed newstyle | no zeroes.
fn greeting() -> Vec<u8> {
    let mut g = b"NBDMAGIC".to_vec();
    g.extend_from_slice(b"IHAVEOPT");
    g.extend_from_slice(&3u16.to_be_bytes());
    g
}

#[test]
fn garbage_or_a_dying_server_during_negotiation_is_a_clear_open_error() {
    type Script = Box<dyn FnOnce(UnixStream) + Send>;
    let cases: Vec<(&str, Script)> = vec![
        (
            "not an NBD server (bad magic",
            Box::new(|mut s| {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n");
            }),
        ),
        (
            "the server closed the connection during the handshake",
            Box::new(drop),
        ),
        (
            // Reading or writing, depending on who is faster.
            "the server closed the connection",
            Box::new(|mut s| {
                let _ = s.write_all(&greeting());
                let mut f = [0u8; 4];
                let _ = s.read_exact(&mut f);
            }),
        ),
        (
            "bad option reply magic",
            Box::new(|mut s| {
                let _ = s.write_all(&greeting());
                let mut f = [0u8; 4 + 16];
                let _ = s.read_exact(&mut f);
                let _ = s.write_all(&[0xee; 20]);
                std::thread::sleep(Duration::from_millis(100));
            }),
        ),
        (
            "the server uses oldstyle negotiation",
            Box::new(|mut s| {
                let mut g = b"NBDMAGIC".to_vec();
                g.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
                g.extend_from_slice(&[0; 8 + 4 + 124]);
                let _ = s.write_all(&g);
            }),
        ),
        (
            "option reply of 4294967295 bytes is too long",
            Box::new(|mut s| {
                let _ = s.write_all(&greeting());
                let mut f = [0u8; 4 + 16];
                let _ = s.read_exact(&mut f);
                let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                r.extend_from_slice(&8u32.to_be_bytes());
                r.extend_from_slice(&1u32.to_be_bytes());
                r.extend_from_slice(&u32::MAX.to_be_bytes());
                let _ = s.write_all(&r);
                std::thread::sleep(Duration::from_millis(100));
            }),
        ),
    ];
    for (i, (want, script)) in cases.into_iter().enumerate() {
        let dir = tmp();
        let sock = path(&dir, "fake.sock");
        let t = fake_server(&sock, script);
        let ctx = AioContext::new().unwrap();
        let g = BlockGraph::new();
        let e = add_err(&ctx, &g, unix(&sock, "x"));
        assert!(
            e.starts_with(&format!(
                "Could not open 'nbd+unix:///x?socket={}': ",
                p(&sock)
            )) && e.contains(want),
            "case {i}: {e}"
        );
        t.join().unwrap();
    }
}

/// (start, length, zero, data) runs, neighbours with equal flags merged.
fn runs(entries: impl IntoIterator<Item = (u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for (start, len, zero, data) in entries {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == start && l.2 == zero && l.3 == data => l.1 += len,
            _ => out.push((start, len, zero, data)),
        }
    }
    out
}

/// `qemu-img map --output=json ARGS` as runs.
fn qemu_map(args: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&qemu_img(&a)).expect("map json");
    let list = v.as_array().expect("map array").clone();
    runs(list.iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        )
    }))
}

#[test]
fn block_status_over_nbd_equals_qemu_img_map() {
    let f = fixture(&["-r"]);
    let n = add(&f.ctx, &f.g, unix(&f.sock, "disk"));
    let ours = runs(
        f.ctx
            .block_on(n.map())
            .unwrap()
            .into_iter()
            .map(|e| (e.start, e.length, e.zero, e.data)),
    );
    let local = qemu_map(&["-U", p(&f.img)]);
    assert_eq!(ours, local);
    // QEMU's own NBD client sees the same.
    let uri = format!("nbd+unix:///disk?socket={}", p(&f.sock));
    assert_eq!(ours, qemu_map(&["-f", "raw", &uri]));
    // The image has data, zeroes and holes, so the comparison means something.
    assert!(ours.iter().any(|r| r.3) && ours.iter().any(|r| r.2 && !r.3));
    assert!(ours.len() >= 4, "{ours:?}");
}

/// Moves the virtual clock forward by `ns` in 250 ms steps, letting real
/// I/O (connection attempts, negotiation) run at each step.
fn advance(ctx: &AioContext, ns: i64) {
    let end = ctx.clock_now(ClockType::Virtual) + ns;
    loop {
        let now = ctx.clock_now(ClockType::Virtual);
        if now >= end {
            return;
        }
        ctx.virtual_set((now + 250_000_000).min(end));
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            ctx.poll(false);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn reconnect_delay_zero_fails_at_once_and_a_later_request_reconnects() {
    let mut f = fixture(&[]);
    let n = add(&f.ctx, &f.g, unix(&f.sock, "disk"));
    let want = f.ctx.block_on(n.read(0, vec![0; 65536])).unwrap();
    f.srv.stop();
    let t0 = Instant::now();
    let e = f
        .ctx
        .block_on(n.read(0, vec![0; 65536]))
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        e.starts_with(&format!(
            "nbd+unix:///disk?socket={}: NBD READ of 65536 bytes at offset 0: ",
            p(&f.sock)
        )) && e.contains("the server closed the connection"),
        "{e}"
    );
    // With no server, each request makes one attempt and fails.
    read_fails(&f.ctx, &n, "reconnecting failed: Failed to connect to");
    f.restart();
    let got = f.ctx.block_on(n.read(0, vec![0; 65536])).unwrap();
    assert!(got == want);
    f.ctx.block_on(f.g.close_all()).unwrap();
}

#[test]
fn reconnect_delay_waits_on_the_graph_clock_then_fails() {
    let mut f = fixture(&[]);
    f.g.set_clock(ClockType::Virtual);
    let mut args = unix(&f.sock, "disk");
    args["reconnect-delay"] = json!(5);
    let n = add(&f.ctx, &f.g, args);
    let want = f.ctx.block_on(n.read(0, vec![0; 65536])).unwrap();

    // The server comes back within the delay: the request completes.
    f.srv.stop();
    let n2 = n.clone();
    let t = f.ctx.spawn(async move { n2.read(0, vec![0; 65536]).await });
    advance(&f.ctx, 4_750_000_000);
    assert!(!t.is_finished());
    f.restart();
    advance(&f.ctx, 250_000_000);
    let got = f.ctx.block_on(t).unwrap().unwrap();
    assert!(got == want);

    // It does not: the request fails when the delay has passed.
    f.srv.stop();
    let n2 = n.clone();
    let t = f.ctx.spawn(async move { n2.write(0, vec![7; 4096]).await });
    advance(&f.ctx, 4_750_000_000);
    assert!(!t.is_finished());
    advance(&f.ctx, 250_000_000);
    let e = f.ctx.block_on(t).unwrap().unwrap_err().to_string();
    assert!(
        e.contains("NBD WRITE of 4096 bytes at offset 0")
            && e.contains("reconnecting failed: Failed to connect to"),
        "{e}"
    );
    // After a failed wait, requests fail at once until the server is back.
    read_fails(&f.ctx, &n, "reconnecting failed");
    f.restart();
    assert!(f.ctx.block_on(n.read(0, vec![0; 65536])).unwrap() == want);
}

/// What the fake transmission-phase server saw: (command, offset, length).
type Seen = Arc<std::sync::Mutex<Vec<(u16, u64, u32)>>>;

/// A minimal old-fashioned server: no structured replies, no meta
/// contexts, no WRITE_ZEROES or TRIM, a 64 KiB maximum block size; serves
/// a 1 MiB in-memory disk with simple replies.
fn simple_server(sock: &Path, seen: Seen) -> std::thread::JoinHandle<()> {
    fake_server(sock, move |mut s| {
        let mut disk = vec![0u8; 1 << 20];
        for (i, b) in disk.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        let _ = s.write_all(&greeting());
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            let reply = |s: &mut UnixStream, rep: u32, payload: &[u8]| {
                let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                r.extend_from_slice(&opt.to_be_bytes());
                r.extend_from_slice(&rep.to_be_bytes());
                r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                r.extend_from_slice(payload);
                s.write_all(&r).unwrap();
            };
            if opt != 7 {
                reply(&mut s, (1 << 31) | 1, b"not here");
                continue;
            }
            let mut export = 0u16.to_be_bytes().to_vec();
            export.extend_from_slice(&(disk.len() as u64).to_be_bytes());
            // HAS_FLAGS | SEND_FLUSH
            export.extend_from_slice(&(1u16 | 4).to_be_bytes());
            reply(&mut s, 3, &export);
            let mut sizes = 3u16.to_be_bytes().to_vec();
            for v in [1u32, 4096, 65536] {
                sizes.extend_from_slice(&v.to_be_bytes());
            }
            reply(&mut s, 3, &sizes);
            reply(&mut s, 1, &[]);
            break;
        }
        loop {
            let mut r = [0u8; 28];
            if s.read_exact(&mut r).is_err() {
                return;
            }
            let kind = u16::from_be_bytes([r[6], r[7]]);
            let cookie = &r[8..16];
            let off = u64::from_be_bytes(r[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
            seen.lock().unwrap().push((kind, off, len));
            let range = off as usize..off as usize + len as usize;
            let mut out = 0x6744_6698u32.to_be_bytes().to_vec();
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(cookie);
            match kind {
                0 => out.extend_from_slice(&disk[range]),
                1 => s.read_exact(&mut disk[range]).unwrap(),
                2 => return,
                _ => {}
            }
            s.write_all(&out).unwrap();
        }
    })
}

#[test]
fn simple_replies_split_requests_zero_fallback_and_disc_on_blockdev_del() {
    let dir = tmp();
    let sock = path(&dir, "simple.sock");
    let seen: Seen = Arc::default();
    let t = simple_server(&sock, seen.clone());
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let n = add(&ctx, &g, unix(&sock, "x"));
    assert_eq!(n.len(), 1 << 20);
    assert!(!n.read_only());
    // Larger than the server's 64 KiB maximum: split.
    let got = ctx.block_on(n.read(1000, vec![0; 200_000])).unwrap();
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((i + 1000) / 512) as u8));
    ctx.block_on(n.write(0, vec![0xee; 100_000])).unwrap();
    // No WRITE_ZEROES: zero buffers are written instead.
    ctx.block_on(n.write_zeroes(200_000, 70_000)).unwrap();
    // No TRIM: discard is a no-op.
    ctx.block_on(n.discard(0, 4096)).unwrap();
    ctx.block_on(n.flush()).unwrap();
    // No meta context: everything is data.
    let (st, len) = ctx.block_on(n.block_status(0, 1 << 20)).unwrap();
    assert!(st.allocated && st.data && !st.zero && len == 1 << 20);
    let got = ctx.block_on(n.read(0, vec![1; 300_000])).unwrap();
    assert!(got[..100_000].iter().all(|&b| b == 0xee));
    assert!(got[200_000..270_000].iter().all(|&b| b == 0));
    assert_eq!(got[270_000], (270_000 / 512) as u8);
    ctx.block_on(g.blockdev_del("n")).unwrap();
    t.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|&(_, _, len)| len <= 65536), "{seen:?}");
    let kinds: Vec<u16> = seen.iter().map(|s| s.0).collect();
    assert!(!kinds.contains(&6) && !kinds.contains(&4), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&2), "DISC last: {kinds:?}");
    assert_eq!(kinds.iter().filter(|&&k| k == 3).count(), 1);
}

/// The source chain (top → mid → base, 4 MiB) and an empty target image
/// exported by qemu-nbd as `tgt`, added to `g` as nodes `top` and `n`.
struct JobSetup {
    g: BlockGraph,
    ctx: AioContext,
    srv: Server,
    sock: PathBuf,
    tgt: PathBuf,
    top: PathBuf,
    dir: tempfile::TempDir,
}

fn job_setup(reconnect_delay: u64) -> JobSetup {
    let dir = tmp();
    let (base, mid, top) = make_chain(dir.path());
    let tgt = path(&dir, "tgt.qcow2");
    create(&tgt, "4M", None);
    let sock = path(&dir, "t.sock");
    let srv = Server::qemu_nbd(&sock, "tgt", &tgt, &[]);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    g.set_clock(ClockType::Virtual);
    add_chain(&ctx, &g, &base, &mid, &top);
    let mut args = unix(&sock, "tgt");
    args["reconnect-delay"] = json!(reconnect_delay);
    add(&ctx, &g, args);
    JobSetup {
        g,
        ctx,
        srv,
        sock,
        tgt,
        top,
        dir,
    }
}

impl JobSetup {
    /// A mirror of `top` to the NBD node at 1 MiB/s (virtual) that stops
    /// on target errors.
    /// The registry must outlive the job for its events to be logged.
    fn throttled_mirror(&self) -> (Job, JobLog, JobRegistry) {
        let (reg, log) = registry(ClockType::Virtual);
        let mut a = MirrorArgs::new("m", "top", "n", SyncMode::Full);
        a.speed = 1 << 20;
        a.on_target_error = OnError::Stop;
        (start_mirror(&self.ctx, &self.g, &reg, a).unwrap(), log, reg)
    }

    /// Starts the server again on the same socket and image.
    fn restart(&mut self) {
        self.srv = Server::qemu_nbd(&self.sock, "tgt", &self.tgt, &[]);
    }

    /// Lifts the speed limit, waits for READY, completes, and checks the
    /// job succeeded.
    fn unthrottle_and_complete(&self, job: &Job) {
        job.set_speed(0).unwrap();
        wait_status(&self.ctx, job, JobStatus::Ready);
        job.complete().unwrap();
        let info = self.ctx.block_on(job.wait_finished());
        assert_eq!(info.error, None);
    }

    /// Closes the graph, stops the server and compares the images.
    fn finish_and_compare(mut self) {
        self.ctx.block_on(self.g.close_all()).unwrap();
        self.srv.stop();
        assert_same(&self.tgt, &self.top);
        assert_check(&self.tgt);
        drop(self.dir);
    }
}

const MIRROR_READY_SEQ: &str =
    "created running ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null";

#[test]
fn mirror_to_an_nbd_target_makes_it_equal_to_the_source() {
    let s = job_setup(0);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_mirror(
        &s.ctx,
        &s.g,
        &reg,
        MirrorArgs::new("m", "top", "n", SyncMode::Full),
    )
    .unwrap();
    s.unthrottle_and_complete(&job);
    assert_eq!(events(&log), MIRROR_READY_SEQ);
    s.finish_and_compare();
}

#[test]
fn backup_to_an_nbd_target_makes_it_equal_to_the_source() {
    let s = job_setup(0);
    let (reg, log) = registry(ClockType::Realtime);
    let job = start_backup(
        &s.ctx,
        &s.g,
        &reg,
        BackupArgs::new("b", "top", "n", SyncMode::Full),
    )
    .unwrap();
    let info = s.ctx.block_on(job.wait_finished());
    assert_eq!(info.error, None);
    assert_eq!(
        events(&log),
        "created running waiting pending BLOCK_JOB_COMPLETED concluded null"
    );
    s.finish_and_compare();
}

#[test]
fn mirror_stops_when_the_server_goes_away_and_completes_after_it_returns() {
    let mut s = job_setup(0);
    let (job, log, _reg) = s.throttled_mirror();
    vstep(&s.ctx, &job, 1_000_000_000);
    assert_eq!(job.status(), JobStatus::Running);
    s.srv.stop();
    vstep(&s.ctx, &job, 1_000_000_000);
    wait_status(&s.ctx, &job, JobStatus::Paused);
    assert_eq!(events(&log), "created running BLOCK_JOB_ERROR paused");
    // Still paused, whatever time passes.
    vstep(&s.ctx, &job, 2_000_000_000);
    assert_eq!(job.status(), JobStatus::Paused);
    s.restart();
    job.resume().unwrap();
    s.unthrottle_and_complete(&job);
    assert_eq!(
        events(&log),
        "created running BLOCK_JOB_ERROR paused running ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null"
    );
    s.finish_and_compare();
}

#[test]
fn mirror_rides_out_a_server_restart_within_reconnect_delay() {
    let mut s = job_setup(10);
    let (job, log, _reg) = s.throttled_mirror();
    vstep(&s.ctx, &job, 1_000_000_000);
    s.srv.stop();
    // The job's next write waits for the reconnect instead of failing.
    advance(&s.ctx, 2_000_000_000);
    assert_eq!(job.status(), JobStatus::Running);
    s.restart();
    advance(&s.ctx, 2_000_000_000);
    s.unthrottle_and_complete(&job);
    assert_eq!(events(&log), MIRROR_READY_SEQ);
    s.finish_and_compare();
}

#[test]
fn a_server_that_accepts_and_says_nothing_times_out_on_the_graph_clock() {
    let dir = tmp();
    let sock = path(&dir, "silent.sock");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = fake_server(&sock, move |_s| {
        let _ = rx.recv();
    });
    let ctx = AioContext::new().unwrap();
    let g = Arc::new(BlockGraph::new());
    g.set_clock(ClockType::Virtual);
    let g2 = g.clone();
    let args = unix(&sock, "x");
    let open = ctx.spawn(async move { g2.blockdev_add(&args).await.map(|_| ()) });
    advance(&ctx, 9_750_000_000);
    assert!(!open.is_finished());
    advance(&ctx, 250_000_000);
    let e = ctx.block_on(open).unwrap().unwrap_err().to_string();
    assert!(
        e.ends_with("the server did not complete negotiation within 10 s"),
        "{e}"
    );
    drop(tx);
    t.join().unwrap();
}
