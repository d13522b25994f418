//! `aio::net::AsyncFd`: tasks wait for socket readiness on the loop,
//! disabled client types keep their sockets quiet, idle fds do not spin the
//! loop, and dropping unregisters.

mod util;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use aio::net::AsyncFd;
use aio::{AioContext, Backend, ClientType};
use util::ctx;

/// A task reads a whole message that arrives in pieces from another thread.
fn read_across_threads(b: Backend) {
    let ctx = ctx(b);
    let (a, peer) = UnixStream::pair().unwrap();
    let a = Arc::new(AsyncFd::new(&ctx, a, ClientType::INTERNAL).unwrap());
    let a2 = a.clone();
    let reader = ctx.spawn(async move {
        let mut buf = vec![0u8; 3 * 4096];
        a2.read_exact(&mut buf).await.map(|()| buf)
    });
    let writer = std::thread::spawn(move || {
        for i in 0..3u8 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            (&peer).write_all(&[i; 4096]).unwrap();
        }
        peer
    });
    let got = ctx.block_on(reader).unwrap().unwrap();
    assert_eq!(&got[..4096], &[0u8; 4096][..]);
    assert_eq!(&got[8192..], &[2u8; 4096][..]);
    drop(writer.join().unwrap());
}

/// A writer blocked on a full socket buffer resumes once the peer reads.
fn write_waits_for_room(b: Backend) {
    let ctx = ctx(b);
    let (a, peer) = UnixStream::pair().unwrap();
    let a = AsyncFd::new(&ctx, a, ClientType::INTERNAL).unwrap();
    let total = 4 << 20; // far more than a socket buffer holds
    let reader = std::thread::spawn(move || {
        let mut got = 0usize;
        let mut buf = vec![0u8; 65536];
        while got < total {
            let n = (&peer).read(&mut buf).unwrap();
            assert!(n > 0);
            assert!(buf[..n].iter().all(|&x| x == 7));
            got += n;
        }
        got
    });
    let data = vec![7u8; total];
    ctx.block_on(a.write_all_vectored(&[&data[..1000], &data[1000..]]))
        .unwrap();
    assert_eq!(reader.join().unwrap(), total);
}

/// An EXTERNAL socket stays quiet while external clients are disabled and
/// its waiting task runs once they are enabled again.
fn external_quiet_while_disabled(b: Backend) {
    let ctx = ctx(b);
    let (a, peer) = UnixStream::pair().unwrap();
    let a = Arc::new(AsyncFd::new(&ctx, a, ClientType::EXTERNAL).unwrap());
    let a2 = a.clone();
    let reader = ctx.spawn(async move {
        let mut buf = [0u8; 1];
        a2.read_exact(&mut buf).await.map(|()| buf[0])
    });
    ctx.run_until_idle();
    let guard = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
    (&peer).write_all(&[42]).unwrap();
    for _ in 0..10 {
        ctx.poll(false);
    }
    assert!(!reader.is_finished(), "dispatched while disabled");
    drop(guard);
    assert_eq!(ctx.block_on(reader).unwrap().unwrap(), 42);
}

/// A readable socket nobody waits on leaves the kernel set: the loop does
/// not dispatch it over and over.
fn idle_readable_fd_does_not_spin(b: Backend) {
    let ctx = ctx(b);
    let (a, peer) = UnixStream::pair().unwrap();
    let a = Arc::new(AsyncFd::new(&ctx, a, ClientType::INTERNAL).unwrap());
    let a2 = a.clone();
    // Wait for readiness once, then stop waiting without reading.
    let t = ctx.spawn(async move { a2.readable().await });
    (&peer).write_all(b"xyz").unwrap();
    ctx.block_on(t).unwrap().unwrap();
    let before = ctx.stats().dispatches;
    for _ in 0..20 {
        ctx.poll(false);
    }
    let extra = ctx.stats().dispatches - before;
    assert!(extra <= 2, "{extra} dispatches of an fd nobody waits on");
    assert_eq!(ctx.handler_count(), 0, "interest not dropped");
}

/// Dropping the `AsyncFd` while registered removes its handler.
fn drop_unregisters(b: Backend) {
    let ctx = ctx(b);
    let (a, _peer) = UnixStream::pair().unwrap();
    let a = Arc::new(AsyncFd::new(&ctx, a, ClientType::INTERNAL).unwrap());
    let a2 = a.clone();
    let t = ctx.spawn(async move { a2.readable().await });
    ctx.run_until_idle();
    assert_eq!(ctx.handler_count(), 1);
    t.abort();
    ctx.run_until_idle();
    drop(a);
    assert_eq!(ctx.handler_count(), 0);
}

/// accept() on a listener, then a request/response exchange.
fn accept_and_echo(b: Backend) {
    let ctx = ctx(b);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let l = AsyncFd::new(
        &ctx,
        UnixListener::bind(&path).unwrap(),
        ClientType::EXTERNAL,
    )
    .unwrap();
    let server = ctx.spawn(async move {
        let s = l.accept().await?;
        let s = AsyncFd::new(&AioContext::current().unwrap(), s, ClientType::EXTERNAL)
            .map_err(std::io::Error::other)?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        s.write_all(&buf).await?;
        Ok::<_, std::io::Error>(())
    });
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        buf
    });
    ctx.block_on(server).unwrap().unwrap();
    assert_eq!(&client.join().unwrap(), b"ping");
}

/// End of stream surfaces as UnexpectedEof from read_exact.
fn eof_is_unexpected_eof(b: Backend) {
    let ctx = ctx(b);
    let (a, peer) = UnixStream::pair().unwrap();
    let a = AsyncFd::new(&ctx, a, ClientType::INTERNAL).unwrap();
    (&peer).write_all(b"ab").unwrap();
    drop(peer);
    let mut buf = [0u8; 4];
    let e = ctx.block_on(a.read_exact(&mut buf)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

on_all_backends! {
    fn read_across(b: Backend) { read_across_threads(b) }
    fn write_room(b: Backend) { write_waits_for_room(b) }
    fn external_disabled(b: Backend) { external_quiet_while_disabled(b) }
    fn idle_no_spin(b: Backend) { idle_readable_fd_does_not_spin(b) }
    fn drop_unreg(b: Backend) { drop_unregisters(b) }
    fn accept_echo(b: Backend) { accept_and_echo(b) }
    fn eof(b: Backend) { eof_is_unexpected_eof(b) }
}
