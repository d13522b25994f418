//! The NBD export server against QEMU's clients (`qemu-img`, `qemu-io`,
//! `qemu-nbd --list`) and against a raw client speaking the wire protocol
//! for what QEMU's tools never send (garbage, requests past the end).

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use aio::{AioContext, ClientType};
use blockjob::block::{BlockGraph, BlockNode, OpenOptions, Perm};
use blockjob::nbd::proto::*;
use blockjob::nbd::server::{DeleteMode, ExportOptions, NbdAddress, NbdServer, ServerOptions};

type Job = Box<dyn FnOnce(&AioContext) + Send>;

/// A context on its own thread (like an iothread); `run` executes a
/// closure on it and returns the result.
struct Loop {
    ctx: AioContext,
    jobs: mpsc::Sender<Job>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    fn new(name: &str) -> Loop {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ctx_tx, ctx_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let ctx = AioContext::new().unwrap();
                ctx_tx.send(ctx.clone()).unwrap();
                while !stop2.load(Ordering::Acquire) {
                    while let Ok(job) = rx.try_recv() {
                        job(&ctx);
                    }
                    ctx.poll(true);
                }
                ctx.cancel_tasks();
            })
            .unwrap();
        let ctx = ctx_rx.recv().unwrap();
        Loop {
            ctx,
            jobs: tx,
            stop,
            thread: Some(thread),
        }
    }

    fn run<R: Send + 'static>(&self, f: impl FnOnce(&AioContext) -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move |ctx| {
                let _ = tx.send(f(ctx));
            }))
            .unwrap();
        self.ctx.notify();
        rx.recv_timeout(Duration::from_secs(30)).expect("loop job")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.ctx.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server on one loop with its exports' nodes, optionally on a second
/// loop (an iothread).
struct Served {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    sock: PathBuf,
    graph: Arc<BlockGraph>,
    server: Arc<Mutex<Option<NbdServer>>>,
    deleted: Arc<Mutex<Vec<String>>>,
    main: Loop,
    io: Option<Loop>,
}

impl Served {
    fn new(iothread: bool) -> Served {
        let d = tmp();
        let dir = d.path().to_path_buf();
        let sock = dir.join("nbd.sock");
        let main = Loop::new("nbd-main");
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let (s, del) = (sock.clone(), deleted.clone());
        let server = main.run(move |ctx| {
            NbdServer::start(
                ctx,
                &NbdAddress::Unix(s),
                ServerOptions::new()
                    .on_export_deleted(move |id| del.lock().unwrap().push(id.to_string())),
            )
            .unwrap()
        });
        Served {
            _dir: d,
            dir,
            sock,
            graph: Arc::new(BlockGraph::new()),
            server: Arc::new(Mutex::new(Some(server))),
            deleted,
            main,
            io: iothread.then(|| Loop::new("nbd-io")),
        }
    }

    /// The loop the nodes live on.
    fn node_loop(&self) -> &Loop {
        self.io.as_ref().unwrap_or(&self.main)
    }

    fn open(&self, img: &Path, read_only: bool) -> Arc<BlockNode> {
        let g = self.graph.clone();
        let img = img.to_path_buf();
        self.node_loop().run(move |ctx| {
            ctx.block_on(g.open_image(&img, &OpenOptions::new().read_only(read_only)))
                .unwrap()
        })
    }

    fn export(&self, node: &Arc<BlockNode>, opts: ExportOptions) -> blockjob::Result<()> {
        let srv = self.server.lock().unwrap();
        srv.as_ref()
            .unwrap()
            .add_export(node.clone(), &self.node_loop().ctx, &opts)
    }

    fn remove(&self, id: &str, mode: DeleteMode) -> blockjob::Result<()> {
        self.server
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .remove_export(id, mode)
    }

    fn url(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Stops the server and closes every node.
    fn close(&self) {
        self.server.lock().unwrap().take();
        let g = self.graph.clone();
        self.node_loop()
            .run(move |ctx| ctx.block_on(g.close_all()))
            .unwrap();
    }
}

/// A qcow2 image with data, a zero cluster and unallocated space, 4 MiB.
fn sample_qcow2(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 64k".into(),
            "write -P 0x22 192k 100k".into(),
            "write -z 1M 128k".into(),
            "write -P 0x33 3M 4k".into(),
        ],
    );
    img
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect("run tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn qemu_io_url(url: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_args(&["-f", "raw"], url, cmds)
}

fn qemu_io_args(opts: &[&str], url: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = opts.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(url);
    let (ok, text) = run("qemu-io", &args);
    (
        ok && !text.contains("failed") && !text.contains("error"),
        text,
    )
}

/// `qemu-img map --output=json` as (start, length, zero, data), merged.
fn map_of(args: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(args);
    let out = qemu_img(&a);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut m: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let t = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        );
        match m.last_mut() {
            Some(l) if l.2 == t.2 && l.3 == t.3 && l.0 + l.1 == t.0 => l.1 += t.1,
            _ => m.push(t),
        }
    }
    m
}

#[test]
fn qemu_img_reads_and_maps_the_export_like_the_image() {
    let s = Served::new(true);
    let base = sample_qcow2(&s.dir, "base.qcow2");
    let top = s.dir.join("top.qcow2");
    create(&top, "4M", Some(&base));
    qemu_io(
        &top,
        &["write -P 0x44 32k 64k".into(), "write -z 3M 4k".into()],
    );
    let node = s.open(&top, true);
    s.export(&node, ExportOptions::new("e0").name("top"))
        .unwrap();
    let url = s.url("top");
    let (ok, text) = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(&top), &url],
    );
    assert!(ok, "compare: {text}");
    assert_eq!(
        map_of(&["-f", "raw", &url]),
        map_of(&["-f", "qcow2", p(&top)]),
        "the export's map differs from the image's"
    );
    // Reads that straddle data, zero clusters and unallocated space.
    let (ok, text) = qemu_io_args(
        &["-r", "-f", "raw"],
        &url,
        &[
            "read -P 0x11 0 32k",
            "read -P 0x44 32k 64k",
            "read -P 0 96k 96k",
            "read -P 0x22 192k 100k",
            "read -P 0 1M 128k",
            "read -P 0 3M 4k",
        ],
    );
    assert!(ok, "{text}");
    s.close();
}

#[test]
fn writes_zeroes_and_discards_through_the_export_reach_the_image() {
    let s = Served::new(false);
    let img = sample_qcow2(&s.dir, "disk.qcow2");
    let reference = s.dir.join("ref.qcow2");
    std::fs::copy(&img, &reference).unwrap();
    let node = s.open(&img, false);
    s.export(
        &node,
        ExportOptions::new("disk").name("disk").writable(true),
    )
    .unwrap();
    let ops = [
        "write -P 0x55 4k 60k",
        "write -f -P 0x56 2M 8k",
        "write -z 192k 16k",
        "write -z -u 256k 64k",
        "discard 3M 64k",
        "write -P 0x57 4193792 512",
    ];
    let (ok, text) = qemu_io_url(&s.url("nope"), &ops);
    assert!(!ok && text.contains("export 'nope' not present"), "{text}");
    let (ok, text) = qemu_io_url(&s.url("disk"), &ops);
    assert!(ok, "{text}");
    // Fast zeroing is refused.
    let (ok, text) = qemu_io_url(&s.url("disk"), &["write -z -n 0 4k"]);
    assert!(!ok && text.contains("Operation not supported"), "{text}");
    s.close();
    qemu_io(&reference, &ops.map(String::from));
    qemu_img(&["compare", p(&img), p(&reference)]);
    qemu_img(&["check", p(&img)]);
    qemu_io(
        &img,
        &[
            "read -P 0x55 4k 60k".into(),
            "read -P 0x57 4193792 512".into(),
        ],
    );
}

#[test]
fn read_only_export_refuses_writes_and_lists() {
    let s = Served::new(false);
    let img = sample_qcow2(&s.dir, "ro.qcow2");
    let node = s.open(&img, true);
    let e = s
        .export(&node, ExportOptions::new("w").writable(true))
        .unwrap_err();
    assert_eq!(e.to_string(), "Cannot export read-only node as writable");
    s.export(
        &node,
        ExportOptions::new("r").name("ro").description("the sample"),
    )
    .unwrap();
    let (ok, text) = qemu_io_url(&s.url("ro"), &["write 0 4k"]);
    assert!(!ok, "a write to a read-only export worked: {text}");
    // On the wire: EPERM, and the connection goes on.
    let mut c = RawClient::go(&s.sock, "ro", true);
    c.request(0, CMD_WRITE, 1, 0, &[1u8; 512]);
    assert_eq!(c.reply().error(), Some(EPERM));
    c.request(0, CMD_READ, 2, 0, &[]);
    assert_eq!(c.reply().data(), vec![0x11u8; 512]);
    // Listing.
    let (ok, text) = run("qemu-nbd", &["--list", "-k", s.sock.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("export: 'ro'"), "{text}");
    assert!(text.contains("description: the sample"), "{text}");
    assert!(text.contains("readonly"), "{text}");
    assert!(text.contains("base:allocation"), "{text}");
    s.close();
}

/// A blocking client that speaks the wire protocol directly.
struct RawClient {
    s: UnixStream,
    structured: bool,
}

/// A reply: error and chunks (flags, type, payload), or a simple reply.
#[derive(Debug)]
enum Reply {
    Simple(u32, u64),
    Chunks(u64, Vec<(u16, u16, Vec<u8>)>),
}

impl Reply {
    fn error(&self) -> Option<u32> {
        match self {
            Reply::Simple(0, _) => None,
            Reply::Simple(e, _) => Some(*e),
            Reply::Chunks(_, cs) => cs
                .iter()
                .find(|c| c.1 & 0x8000 != 0)
                .map(|c| u32::from_be_bytes(c.2[..4].try_into().unwrap())),
        }
    }

    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple(_, c) | Reply::Chunks(c, _) => *c,
        }
    }

    /// The data chunks of a structured read, holes as zeroes, in order.
    fn data(&self) -> Vec<u8> {
        let Reply::Chunks(_, cs) = self else {
            panic!("not structured: {self:?}")
        };
        let mut v: Vec<(u64, Vec<u8>)> = Vec::new();
        for (_, t, p) in cs {
            let off = u64::from_be_bytes(p[..8].try_into().unwrap());
            match *t {
                REPLY_TYPE_OFFSET_DATA => v.push((off, p[8..].to_vec())),
                REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                    v.push((off, vec![0; n as usize]))
                }
                _ => {}
            }
        }
        v.sort();
        v.into_iter().flat_map(|(_, d)| d).collect()
    }
}

impl RawClient {
    fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawClient {
            s,
            structured: false,
        };
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], &INIT_MAGIC.to_be_bytes());
        assert_eq!(&hello[8..16], &OPTS_MAGIC.to_be_bytes());
        c
    }

    /// Sends the client flags.
    fn start(sock: &Path) -> RawClient {
        let mut c = Self::connect(sock);
        c.s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        c
    }

    /// Sends an option and reads replies up to the final one.
    fn opt(&mut self, option: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let h = OptionHeader {
            option,
            len: payload.len() as u32,
        }
        .encode();
        self.s.write_all(&h).unwrap();
        self.s.write_all(payload).unwrap();
        let mut out = Vec::new();
        loop {
            let mut b = [0u8; OptionReply::LEN];
            self.s.read_exact(&mut b).unwrap();
            let r = OptionReply::decode(&b).unwrap();
            assert_eq!(r.option, option);
            let mut p = vec![0u8; r.len as usize];
            self.s.read_exact(&mut p).unwrap();
            let last = r.reply == REP_ACK || r.reply & REP_FLAG_ERROR != 0;
            out.push((r.reply, p));
            if last {
                return out;
            }
        }
    }

    /// Negotiates down to the transmission phase of `name`.
    fn go(sock: &Path, name: &str, structured: bool) -> RawClient {
        let mut c = Self::start(sock);
        if structured {
            assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
            let m = MetaContextRequest {
                export: name.into(),
                queries: vec![META_BASE_ALLOCATION.into()],
            };
            let r = c.opt(OPT_SET_META_CONTEXT, &m.encode());
            assert_eq!(r[0].0, REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], META_BASE_ALLOCATION.as_bytes());
            c.structured = true;
        }
        let g = GoRequest {
            name: name.into(),
            info: vec![],
        };
        let r = c.opt(OPT_GO, &g.encode());
        assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
        c
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.request_len(
            flags,
            kind,
            cookie,
            offset,
            data.len().max(512) as u32,
            data,
        );
    }

    fn request_len(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(data).unwrap();
    }

    /// Reads one reply; a successful simple read reply carries `read_len`
    /// bytes (512 in these tests).
    fn reply(&mut self) -> Reply {
        let mut chunks = Vec::new();
        loop {
            let mut b = [0u8; 16];
            self.s.read_exact(&mut b).unwrap();
            match ReplyHeader::decode(&b).unwrap() {
                ReplyHeader::Simple(s) => {
                    assert!(chunks.is_empty());
                    return Reply::Simple(s.error, s.cookie);
                }
                ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie,
                } => {
                    let mut l = [0u8; 4];
                    self.s.read_exact(&mut l).unwrap();
                    let mut p = vec![0u8; u32::from_be_bytes(l) as usize];
                    self.s.read_exact(&mut p).unwrap();
                    chunks.push((flags, kind, p));
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Reply::Chunks(cookie, chunks);
                    }
                }
            }
        }
    }

    /// Whether the server has closed the connection (end of stream, or a
    /// reset when it left our bytes unread).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

#[test]
fn negotiation_answers_bad_options_and_garbage_drops_only_that_client() {
    let s = Served::new(false);
    let img = sample_qcow2(&s.dir, "n.qcow2");
    let node = s.open(&img, true);
    s.export(&node, ExportOptions::new("n").name("n")).unwrap();
    let mut c = RawClient::start(&s.sock);
    assert_eq!(c.opt(99, b"whatever")[0].0, REP_ERR_UNSUP);
    assert_eq!(c.opt(OPT_GO, &[0, 0, 0, 9, b'x'])[0].0, REP_ERR_INVALID);
    assert_eq!(c.opt(OPT_LIST, b"x")[0].0, REP_ERR_INVALID);
    let unknown = GoRequest {
        name: "nope".into(),
        info: vec![],
    };
    assert_eq!(c.opt(OPT_INFO, &unknown.encode())[0].0, REP_ERR_UNKNOWN);
    assert_eq!(c.opt(OPT_STARTTLS, &[])[0].0, REP_ERR_POLICY);
    let list = c.opt(OPT_LIST, &[]);
    assert_eq!(list.len(), 2);
    assert_eq!(&list[0].1[4..], b"n");
    // SET_META_CONTEXT needs structured replies.
    let m = MetaContextRequest {
        export: "n".into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    };
    assert_eq!(
        c.opt(OPT_SET_META_CONTEXT, &m.encode())[0].0,
        REP_ERR_INVALID
    );
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ERR_INVALID);
    // qemu: queries match nothing (no dirty bitmaps); base: lists.
    let q = MetaContextRequest {
        export: "n".into(),
        queries: vec!["qemu:dirty-bitmap:b0".into(), "base:".into()],
    };
    let r = c.opt(OPT_LIST_META_CONTEXT, &q.encode());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(&r[0].1[4..], META_BASE_ALLOCATION.as_bytes());
    // INFO with the items asked for.
    let info = GoRequest {
        name: "n".into(),
        info: vec![INFO_NAME, INFO_BLOCK_SIZE],
    };
    let r = c.opt(OPT_INFO, &info.encode());
    let kinds: Vec<u16> = r[..r.len() - 1]
        .iter()
        .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    assert_eq!(kinds, [INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);
    assert_eq!(&r[0].1[2..10], &(4u64 << 20).to_be_bytes());
    let tflags = u16::from_be_bytes([r[0].1[10], r[0].1[11]]);
    assert_ne!(tflags & TFLAG_READ_ONLY, 0);
    assert_eq!(&r[1].1[2..], b"n");
    // Garbage instead of an option: that client is dropped...
    c.s.write_all(&[0xde; 32]).unwrap();
    assert!(c.closed());
    // ... garbage client flags too ...
    let mut g = RawClient::connect(&s.sock);
    g.s.write_all(&[0xff; 4]).unwrap();
    assert!(g.closed());
    // ... and an unknown EXPORT_NAME (which cannot be answered).
    let mut e = RawClient::start(&s.sock);
    e.s.write_all(
        &OptionHeader {
            option: OPT_EXPORT_NAME,
            len: 4,
        }
        .encode(),
    )
    .unwrap();
    e.s.write_all(b"nope").unwrap();
    assert!(e.closed());
    // Others are still served, EXPORT_NAME included.
    let mut ok = RawClient::start(&s.sock);
    ok.s.write_all(
        &OptionHeader {
            option: OPT_EXPORT_NAME,
            len: 1,
        }
        .encode(),
    )
    .unwrap();
    ok.s.write_all(b"n").unwrap();
    let mut b = [0u8; 10];
    ok.s.read_exact(&mut b).unwrap();
    assert_eq!(&b[..8], &(4u64 << 20).to_be_bytes());
    ok.request(0, CMD_READ, 5, 0, &[]);
    let mut h = [0u8; 16];
    ok.s.read_exact(&mut h).unwrap();
    assert_eq!(
        ReplyHeader::decode(&h).unwrap(),
        ReplyHeader::Simple(SimpleReply {
            error: 0,
            cookie: 5
        })
    );
    let mut data = [0u8; 512];
    ok.s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0x11; 512]);
    let (okc, text) = run("qemu-img", &["compare", "-F", "raw", p(&img), &s.url("n")]);
    assert!(okc, "{text}");
    s.close();
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let s = Served::new(true);
    let img = sample_qcow2(&s.dir, "b.qcow2");
    let node = s.open(&img, false);
    s.export(&node, ExportOptions::new("b").name("b").writable(true))
        .unwrap();
    let size = 4u64 << 20;
    let mut c = RawClient::go(&s.sock, "b", true);
    c.request(0, CMD_READ, 1, size - 256, &[]);
    assert_eq!(c.reply().error(), Some(EINVAL));
    c.request(0, CMD_WRITE, 2, size, &[7u8; 512]);
    assert_eq!(c.reply().error(), Some(ENOSPC));
    c.request_len(0, CMD_READ, 3, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(c.reply().error(), Some(EINVAL));
    c.request_len(CMD_FLAG_DF, CMD_READ, 4, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(c.reply().error(), Some(EOVERFLOW));
    c.request(CMD_FLAG_REQ_ONE, CMD_READ, 5, 0, &[]);
    assert_eq!(c.reply().error(), Some(EINVAL));
    c.request(0, 42, 6, 0, &[]);
    assert_eq!(c.reply().error(), Some(EINVAL));
    // Still in sync: a read, a sparse read, block status.
    c.request(0, CMD_READ, 7, 0, &[]);
    let r = c.reply();
    assert_eq!((r.cookie(), r.data()), (7, vec![0x11; 512]));
    c.request_len(0, CMD_READ, 8, 1 << 20, 64 << 10, &[]);
    let r = c.reply();
    let Reply::Chunks(_, ref chunks) = r else {
        panic!("{r:?}")
    };
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, REPLY_TYPE_OFFSET_HOLE);
    assert_eq!(r.data(), vec![0; 64 << 10]);
    c.request_len(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 9, 0, 1 << 20, &[]);
    let r = c.reply();
    let Reply::Chunks(_, chunks) = r else {
        panic!("{r:?}")
    };
    assert_eq!(chunks[0].1, REPLY_TYPE_BLOCK_STATUS);
    // One extent: 64 KiB of data.
    assert_eq!(&chunks[0].2[4..], &[0, 1, 0, 0, 0, 0, 0, 0]);
    // Several requests in flight; every cookie answered once.
    for i in 0..40u64 {
        c.request(0, CMD_READ, 100 + i, i * 4096, &[]);
    }
    let mut seen: Vec<u64> = (0..40).map(|_| c.reply().cookie()).collect();
    seen.sort();
    assert_eq!(seen, (100..140).collect::<Vec<_>>());
    // A simple-reply client gets simple errors.
    let mut simple = RawClient::go(&s.sock, "b", false);
    simple.request(0, CMD_READ, 1, size, &[]);
    let r = simple.reply();
    assert!(matches!(r, Reply::Simple(EINVAL, 1)), "{r:?}");
    // A bad magic drops that connection only.
    c.s.write_all(&[0x55; REQUEST_LEN]).unwrap();
    assert!(c.closed());
    simple.request(0, CMD_FLUSH, 2, 0, &[]);
    let r = simple.reply();
    assert!(matches!(r, Reply::Simple(0, 2)), "{r:?}");
    s.close();
}

#[test]
fn export_is_quiet_while_external_clients_are_disabled() {
    let s = Served::new(true);
    let img = sample_qcow2(&s.dir, "q.qcow2");
    let node = s.open(&img, true);
    s.export(&node, ExportOptions::new("q").name("q")).unwrap();
    let mut c = RawClient::go(&s.sock, "q", true);
    c.request(0, CMD_READ, 1, 0, &[]);
    assert_eq!(c.reply().cookie(), 1);
    let io = s.node_loop();
    let guard = io.run(|ctx| {
        let g = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
        Arc::new(Mutex::new(Some(g)))
    });
    c.request(0, CMD_READ, 2, 0, &[]);
    c.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = c.s.read(&mut b);
    assert!(
        r.is_err(),
        "answered while external clients were disabled: {r:?}"
    );
    io.run(move |_| guard.lock().unwrap().take());
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(c.reply().cookie(), 2);
    s.close();
}

#[test]
fn delete_modes_permissions_and_deleted_callback() {
    let s = Served::new(false);
    let img = sample_qcow2(&s.dir, "d.qcow2");
    let node = s.open(&img, false);
    // A user that does not share writing keeps writable exports out.
    let holder = node
        .attach(
            "test",
            "blocker",
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ,
        )
        .unwrap();
    let e = s
        .export(&node, ExportOptions::new("w").writable(true))
        .unwrap_err();
    assert!(
        e.to_string().contains("which does not allow 'write'"),
        "{e}"
    );
    drop(holder);
    s.export(&node, ExportOptions::new("w").name("w").writable(true))
        .unwrap();
    let e = s.export(&node, ExportOptions::new("w")).unwrap_err();
    assert_eq!(e.to_string(), "Block export id 'w' is already in use");
    let e = s
        .export(&node, ExportOptions::new("w2").name("w"))
        .unwrap_err();
    assert_eq!(e.to_string(), "NBD server already has export named 'w'");
    // The node is in use.
    let g = s.graph.clone();
    let name = node.name().to_string();
    let e = s
        .main
        .run(move |ctx| ctx.block_on(g.blockdev_del(&name)))
        .unwrap_err();
    assert_eq!(e.to_string(), format!("Node {} is in use", node.name()));
    let mut c = RawClient::go(&s.sock, "w", false);
    let e = s.remove("w", DeleteMode::Safe).unwrap_err();
    assert_eq!(e.to_string(), "export 'w' still in use");
    assert_eq!(
        s.remove("nope", DeleteMode::Safe).unwrap_err().to_string(),
        "Export 'nope' is not found"
    );
    s.remove("w", DeleteMode::Hard).unwrap();
    assert!(c.closed());
    for _ in 0..100 {
        if !s.deleted.lock().unwrap().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(*s.deleted.lock().unwrap(), ["w"]);
    assert!(node.users().is_empty(), "{:?}", node.users());
    // Without clients, deletion is immediate.
    s.export(&node, ExportOptions::new("x")).unwrap();
    s.remove("x", DeleteMode::Safe).unwrap();
    assert_eq!(*s.deleted.lock().unwrap(), ["w", "x"]);
    s.close();
    assert!(!s.sock.exists(), "socket file left behind");
}

/// `(id, [(len, flags)])` of a `BLOCK_STATUS` chunk.
fn status_chunk(p: &[u8]) -> (u32, Vec<(u32, u32)>) {
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let ext = p[4..].chunks(8).map(|e| (be(e), be(&e[4..]))).collect();
    (be(p), ext)
}

#[test]
fn dirty_bitmap_context_with_base_allocation_in_one_reply() {
    let sv = Served::new(false);
    let img = sample_qcow2(&sv.dir, "bm.qcow2");
    let node = sv.open(&img, false);
    let mut o = blockjob::block::BitmapAddOptions::default();
    o.granularity = Some(65536);
    node.add_bitmap("b0", &o).unwrap();
    let n = node.clone();
    sv.node_loop()
        .run(move |ctx| ctx.block_on(n.write(128 << 10, vec![7u8; 4096])))
        .unwrap();
    let bad = sv.export(&node, ExportOptions::new("e").bitmaps(vec!["bx".into()]));
    assert_eq!(bad.unwrap_err().to_string(), "Bitmap 'bx' is not found");
    sv.export(
        &node,
        ExportOptions::new("e")
            .name("bm")
            .writable(true)
            .bitmaps(vec!["b0".into()]),
    )
    .unwrap();

    let mut c = RawClient::start(&sv.sock);
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
    for q in ["qemu:", "qemu:dirty-bitmap:"] {
        let m = MetaContextRequest {
            export: "bm".into(),
            queries: vec![q.into()],
        };
        let r = c.opt(OPT_LIST_META_CONTEXT, &m.encode());
        assert_eq!(r.len(), 2, "{q}: {r:?}");
        assert_eq!(&r[0].1[4..], b"qemu:dirty-bitmap:b0");
    }
    let m = MetaContextRequest {
        export: "bm".into(),
        queries: vec![
            META_BASE_ALLOCATION.into(),
            "qemu:dirty-bitmap:b0".into(),
            "qemu:dirty-bitmap:b1".into(),
        ],
    };
    let r = c.opt(OPT_SET_META_CONTEXT, &m.encode());
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(&r[0].1[..4], &0u32.to_be_bytes());
    assert_eq!(&r[1].1[..4], &1u32.to_be_bytes());
    c.structured = true;
    let g = GoRequest {
        name: "bm".into(),
        info: vec![],
    };
    assert_eq!(c.opt(OPT_GO, &g.encode()).last().unwrap().0, REP_ACK);

    c.request_len(0, CMD_BLOCK_STATUS, 5, 0, 256 << 10, &[]);
    let Reply::Chunks(5, chunks) = c.reply() else {
        panic!("not a structured reply");
    };
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].0 & REPLY_FLAG_DONE, 0);
    assert_eq!(status_chunk(&chunks[0].2).0, 0);
    assert_eq!(
        status_chunk(&chunks[1].2),
        (1, vec![(128 << 10, 0), (64 << 10, 1), (64 << 10, 0)])
    );
    drop(c);
    sv.remove("e", DeleteMode::Hard).unwrap();
    sv.close();
}
