//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aio::{AioContext, Backend, ContextOptions};

pub mod deadline;
pub mod other_loop;
pub mod park;

/// A file path removed (if it exists) when the guard is dropped, however
/// the test ends.
#[derive(Debug)]
pub struct Remove(pub std::path::PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A context on `backend`, home thread = the caller.
pub fn ctx(backend: Backend) -> AioContext {
    AioContext::with_options(ContextOptions::new().backend(backend)).expect("create AioContext")
}

/// A shared counter for callbacks.
#[derive(Clone, Default, Debug)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A connected, non-blocking socket pair: a readiness source we control.
pub fn raw(fd: &impl std::os::fd::AsRawFd) -> std::os::fd::RawFd {
    fd.as_raw_fd()
}

/// A connected, non-blocking socket pair.
pub fn socketpair() -> (Arc<UnixStream>, Arc<UnixStream>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (Arc::new(a), Arc::new(b))
}

/// Writes one byte, making the peer readable.
pub fn poke(s: &UnixStream) {
    (&*s).write_all(b"x").expect("write");
}

/// Reads everything available; returns the byte count.
pub fn drain(s: &UnixStream) -> usize {
    let mut buf = [0u8; 256];
    let mut total = 0;
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Generates one `#[test]` per backend around `body`.
#[macro_export]
macro_rules! on_all_backends {
    ($(fn $name:ident($b:ident: Backend) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                fn run($b: aio::Backend) $body
                #[test]
                fn epoll() {
                    run(aio::Backend::Epoll)
                }
                #[test]
                fn epoll_timerfd() {
                    run(aio::Backend::EpollTimerfd)
                }
                #[test]
                fn ppoll() {
                    run(aio::Backend::Ppoll)
                }
                #[test]
                fn io_uring() {
                    run(aio::Backend::IoUring)
                }
            }
        )*
    };
}
