//! The epoll backend: O(ready fds) per wait, nanosecond deadlines through
//! `epoll_pwait2` or, on kernels without it, a timerfd in the interest set.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use parking_lot::Mutex;

use super::{remaining_ns, FdMonitor, Interest, Ready, Timeout};
use crate::sys::epoll::{Epoll, EpollTimeout};
use crate::sys::timerfd::TimerFd;

/// Token of the internal deadline timerfd; never handed to the context.
const TIMERFD_TOKEN: u64 = u64::MAX - 1;

/// Events harvested per wait; more stay pending (level-triggered) for the
/// next wait.
const BATCH: usize = 256;

#[derive(Debug)]
struct DeadlineTimer {
    fd: TimerFd,
    /// The absolute deadline the timerfd is armed for, if any.
    armed: Option<i64>,
}

/// epoll, level-triggered, like QEMU's fdmon-epoll.
#[derive(Debug)]
pub(crate) struct EpollMonitor {
    epoll: Epoll,
    /// `None` when `epoll_pwait2` carries the deadline.
    timer: Option<Mutex<DeadlineTimer>>,
}

thread_local! {
    /// The harvest buffer. Waits on one thread never overlap (a nested
    /// poll waits only after the outer wait returned), so one per thread
    /// suffices and costs no lock.
    static BUF: std::cell::RefCell<Vec<libc::epoll_event>> =
        std::cell::RefCell::new(Vec::with_capacity(BATCH));
}

fn events_of(interest: Interest) -> u32 {
    let mut ev = 0;
    if interest.read {
        ev |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
    }
    if interest.write {
        ev |= libc::EPOLLOUT as u32;
    }
    ev
}

impl EpollMonitor {
    /// Creates the monitor. With `force_timerfd`, deadlines go through a
    /// timerfd even where `epoll_pwait2` exists (both paths stay tested).
    pub(crate) fn new(force_timerfd: bool) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = if force_timerfd || !epoll.has_pwait2() {
            let fd = TimerFd::new()?;
            epoll.add(fd.as_raw_fd(), libc::EPOLLIN as u32, TIMERFD_TOKEN)?;
            Some(Mutex::new(DeadlineTimer { fd, armed: None }))
        } else {
            None
        };
        Ok(Self { epoll, timer })
    }

    /// Turns a context timeout into an epoll timeout, arming the timerfd
    /// when that is how deadlines reach the kernel.
    fn prepare(&self, timeout: Timeout) -> io::Result<EpollTimeout> {
        match (&self.timer, timeout) {
            (_, Timeout::Zero) => Ok(EpollTimeout::Zero),
            (None, Timeout::Infinite) => Ok(EpollTimeout::Infinite),
            (None, Timeout::Until(t)) => Ok(EpollTimeout::Nanos(remaining_ns(t))),
            (Some(timer), timeout) => {
                let want = match timeout {
                    Timeout::Until(t) => Some(t),
                    _ => None,
                };
                let mut timer = timer.lock();
                // Re-arm only when the deadline moved. A timerfd armed for a
                // later time than needed, or armed with nothing pending, is
                // re-armed or disarmed so a wait never ends spuriously.
                if timer.armed != want {
                    timer.fd.set_abs(want)?;
                    timer.armed = want;
                }
                Ok(EpollTimeout::Infinite)
            }
        }
    }
}

impl FdMonitor for EpollMonitor {
    fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.epoll.add(fd, events_of(interest), token)
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.epoll.modify(fd, events_of(interest), token)
    }

    fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.delete(fd)
    }

    fn wait(&self, out: &mut Vec<Ready>, timeout: Timeout) -> io::Result<()> {
        let epoll_timeout = self.prepare(timeout)?;
        BUF.with(|buf| self.harvest(&mut buf.borrow_mut(), epoll_timeout, out))
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn name(&self) -> &'static str {
        if self.timer.is_some() {
            "epoll+timerfd"
        } else {
            "epoll"
        }
    }
}

impl EpollMonitor {
    fn harvest(
        &self,
        buf: &mut Vec<libc::epoll_event>,
        timeout: EpollTimeout,
        out: &mut Vec<Ready>,
    ) -> io::Result<()> {
        self.epoll.wait(buf, timeout)?;
        for ev in buf.iter() {
            let (events, token) = (ev.events, ev.u64);
            if token == TIMERFD_TOKEN {
                if let Some(timer) = &self.timer {
                    let mut timer = timer.lock();
                    timer.fd.read()?;
                    timer.armed = None;
                }
                continue;
            }
            let err = events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            out.push(Ready {
                token,
                readable: err || events & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
                writable: err || events & libc::EPOLLOUT as u32 != 0,
            });
        }
        Ok(())
    }
}
