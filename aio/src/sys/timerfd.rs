//! `timerfd(2)` on `CLOCK_MONOTONIC`, armed with absolute deadlines.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{owned, read_u64, timespec};

/// An owned, non-blocking timerfd on the monotonic clock.
#[derive(Debug)]
pub(crate) struct TimerFd(OwnedFd);

impl TimerFd {
    pub(crate) fn new() -> io::Result<Self> {
        let fd = syscall!(timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC
        ))?;
        Ok(Self(owned(fd)))
    }

    /// Arms the timer to fire at the absolute monotonic time `deadline_ns`,
    /// or disarms it with `None`.
    pub(crate) fn set_abs(&self, deadline_ns: Option<i64>) -> io::Result<()> {
        let value = match deadline_ns {
            // A zero it_value disarms, so an already-past deadline is
            // clamped to 1 ns (the epoch), which fires immediately.
            Some(ns) => timespec(ns.max(1)),
            None => timespec(0),
        };
        let spec = libc::itimerspec {
            it_interval: timespec(0),
            it_value: value,
        };
        // SAFETY: `spec` is a valid itimerspec; the old-value pointer may be null.
        syscall!(timerfd_settime(
            self.0.as_raw_fd(),
            libc::TFD_TIMER_ABSTIME,
            &spec,
            std::ptr::null_mut()
        ))
        .map(drop)
    }

    /// Consumes an expiration, if any.
    pub(crate) fn read(&self) -> io::Result<bool> {
        Ok(read_u64(&self.0)?.is_some())
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
