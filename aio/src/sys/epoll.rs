//! `epoll(7)`: the O(ready) readiness interface.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{owned, timespec};

/// An owned epoll instance.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

/// How long [`Epoll::wait`] may block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum EpollTimeout {
    /// Return at once.
    Zero,
    /// Block until an event.
    Infinite,
    /// Block at most this many nanoseconds (needs `epoll_pwait2`).
    Nanos(i64),
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
        Ok(Self(owned(fd)))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        syscall!(epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev)).map(drop)
    }

    pub(crate) fn add(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)
    }

    pub(crate) fn modify(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, data)
    }

    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events, filling `buf` (its capacity bounds the batch).
    ///
    /// `EINTR` is reported as zero events.
    pub(crate) fn wait(
        &self,
        buf: &mut Vec<libc::epoll_event>,
        timeout: EpollTimeout,
    ) -> io::Result<usize> {
        buf.clear();
        let cap = buf.capacity().clamp(1, i32::MAX as usize) as libc::c_int;
        let res = match timeout {
            EpollTimeout::Zero | EpollTimeout::Infinite => {
                let ms = if matches!(timeout, EpollTimeout::Zero) {
                    0
                } else {
                    -1
                };
                // SAFETY: `buf` has room for `cap` events; the kernel writes at
                // most that many and we set the length from its return value.
                syscall!(epoll_wait(self.0.as_raw_fd(), buf.as_mut_ptr(), cap, ms))
            }
            EpollTimeout::Nanos(ns) => {
                let ts = timespec(ns);
                // SAFETY: as above; `ts` is a valid timespec and a null
                // sigmask means "do not change the mask".
                syscall!(epoll_pwait2(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr(),
                    cap,
                    &ts,
                    std::ptr::null()
                ))
            }
        };
        match res {
            Ok(n) => {
                let n = n as usize;
                // SAFETY: the kernel initialised the first `n` entries, and
                // `n <= cap <= capacity`.
                unsafe { buf.set_len(n) };
                Ok(n)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Whether this kernel implements `epoll_pwait2` (Linux 5.11+).
    pub(crate) fn has_pwait2(&self) -> bool {
        let mut buf = Vec::with_capacity(1);
        match self.wait(&mut buf, EpollTimeout::Nanos(0)) {
            Ok(_) => true,
            Err(e) => {
                log::debug!("epoll_pwait2 unavailable ({e}); using a timerfd for deadlines");
                false
            }
        }
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
