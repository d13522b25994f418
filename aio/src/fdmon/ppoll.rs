//! The ppoll backend: the array of every registered fd goes to the kernel on
//! each wait, so a wait costs O(registered fds). It is the baseline the
//! benchmarks compare epoll against, and a fallback where epoll is unwanted.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;

use parking_lot::Mutex;

use super::{remaining_ns, FdMonitor, Interest, Ready, Timeout};
use crate::sys::ppoll::ppoll;

#[derive(Debug, Default)]
struct PollSet {
    fds: Vec<libc::pollfd>,
    tokens: Vec<u64>,
    index: HashMap<RawFd, usize>,
}

/// ppoll over a maintained `pollfd` array (swap-remove keeps it dense).
#[derive(Debug, Default)]
pub(crate) struct PpollMonitor {
    set: Mutex<PollSet>,
}

fn events_of(interest: Interest) -> libc::c_short {
    let mut ev = 0;
    if interest.read {
        ev |= libc::POLLIN | libc::POLLRDHUP;
    }
    if interest.write {
        ev |= libc::POLLOUT;
    }
    ev
}

fn exists(fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("fd {fd} is already registered"),
    )
}

fn missing(fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("fd {fd} is not registered"),
    )
}

impl PpollMonitor {
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

impl FdMonitor for PpollMonitor {
    fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut set = self.set.lock();
        if set.index.contains_key(&fd) {
            return Err(exists(fd));
        }
        let i = set.fds.len();
        set.fds.push(libc::pollfd {
            fd,
            events: events_of(interest),
            revents: 0,
        });
        set.tokens.push(token);
        set.index.insert(fd, i);
        Ok(())
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut set = self.set.lock();
        let i = *set.index.get(&fd).ok_or_else(|| missing(fd))?;
        set.fds[i].events = events_of(interest);
        set.tokens[i] = token;
        Ok(())
    }

    fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut set = self.set.lock();
        let i = set.index.remove(&fd).ok_or_else(|| missing(fd))?;
        set.fds.swap_remove(i);
        set.tokens.swap_remove(i);
        if let Some(moved) = set.fds.get(i).map(|p| p.fd) {
            set.index.insert(moved, i);
        }
        Ok(())
    }

    fn wait(&self, out: &mut Vec<Ready>, timeout: Timeout) -> io::Result<()> {
        let timeout_ns = match timeout {
            Timeout::Zero => Some(0),
            Timeout::Infinite => None,
            Timeout::Until(t) => Some(remaining_ns(t)),
        };
        // Mutations only come from the home thread, which is here, so this
        // lock is never contended while ppoll blocks.
        let mut set = self.set.lock();
        let n = ppoll(&mut set.fds, timeout_ns)?;
        if n == 0 {
            return Ok(());
        }
        let PollSet { fds, tokens, .. } = &mut *set;
        for (p, &token) in fds.iter_mut().zip(tokens.iter()) {
            let re = std::mem::take(&mut p.revents);
            if re == 0 {
                continue;
            }
            let err = re & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
            out.push(Ready {
                token,
                readable: err || re & (libc::POLLIN | libc::POLLRDHUP) != 0,
                writable: err || re & libc::POLLOUT != 0,
            });
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "ppoll"
    }
}
