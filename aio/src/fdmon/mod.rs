//! fd monitors: the part of the loop that asks the kernel which fds are ready.
//!
//! A monitor keeps the kernel's interest set (or its own array for ppoll) and
//! waits with a nanosecond deadline. The context above it owns the handlers;
//! a monitor only knows fds and opaque tokens.

use std::io;
use std::os::fd::RawFd;

mod epoll;
mod io_uring;
mod ppoll;

pub(crate) use epoll::EpollMonitor;
pub(crate) use io_uring::IoUringMonitor;
pub(crate) use ppoll::PpollMonitor;

/// What a registered fd is watched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Interest {
    pub(crate) read: bool,
    pub(crate) write: bool,
}

impl Interest {
    pub(crate) fn is_empty(self) -> bool {
        !self.read && !self.write
    }
}

/// One ready fd, as reported by [`FdMonitor::wait`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ready {
    pub(crate) token: u64,
    /// Readable, hung up or in error: run the read callback.
    pub(crate) readable: bool,
    /// Writable or in error: run the write callback.
    pub(crate) writable: bool,
}

/// How long a wait may block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timeout {
    /// Do not block.
    Zero,
    /// Block until an fd is ready.
    Infinite,
    /// Block until the absolute `CLOCK_MONOTONIC` time, in ns.
    Until(i64),
}

/// The interface every backend implements. Mutations (`add`, `modify`,
/// `remove`) happen on the context's home thread only.
pub(crate) trait FdMonitor: Send + Sync {
    /// Starts watching `fd`; events carry `token`.
    fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()>;
    /// Changes the token and/or interest of a watched fd.
    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()>;
    /// Stops watching `fd`.
    fn remove(&self, fd: RawFd) -> io::Result<()>;
    /// Waits for ready fds and appends them to `out`.
    fn wait(&self, out: &mut Vec<Ready>, timeout: Timeout) -> io::Result<()>;
    /// The backend's name, for logs and benchmarks.
    fn name(&self) -> &'static str;
    /// Hands queued interest changes to the kernel without waiting, so that
    /// another loop watching [`poll_fd`](FdMonitor::poll_fd) sees them.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// An fd that polls readable when a wait would report something, so
    /// another loop can watch this one (epoll and io_uring have one).
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Nanoseconds from now until the absolute monotonic `until` (at least 0).
pub(crate) fn remaining_ns(until: i64) -> i64 {
    (until - crate::clock::monotonic_ns()).max(0)
}
