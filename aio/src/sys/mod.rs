//! Thin, owned wrappers around the Linux syscalls the loop needs.
//!
//! This module and its children are the only places in the crate with
//! `unsafe`; everything above it is safe code. Every libc call goes through
//! [`syscall!`], which turns a `-1` return into `io::Error::last_os_error()`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Calls a libc function and maps a `-1` return to the thread's `errno`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: every call site passes valid pointers/lengths for the
        // duration of the call; the comment at each call site says why.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

pub(crate) mod alignedbuf;
pub(crate) mod epoll;
pub(crate) mod eventfd;
pub(crate) mod file;
pub(crate) mod ppoll;
pub(crate) mod signalfd;
pub(crate) mod timerfd;
pub(crate) mod uring;
pub(crate) mod uring_io;

/// Takes ownership of a freshly created descriptor.
pub(crate) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall that created
    // it, so nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads one `u64` (the eventfd/timerfd counter format) from a non-blocking fd.
///
/// Returns `Ok(None)` when nothing is pending (`EAGAIN`).
pub(crate) fn read_u64(fd: &impl AsRawFd) -> io::Result<Option<u64>> {
    let mut buf = 0u64;
    loop {
        // SAFETY: `buf` is a valid, writable 8-byte location for the whole call.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        if n == 8 {
            return Ok(Some(buf));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ if n >= 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read of {n} bytes from a counter fd"),
                ))
            }
            _ => return Err(err),
        }
    }
}

/// Adds `val` to an eventfd-style counter.
///
/// `EAGAIN` (the counter is saturated) is not an error: the fd is already
/// readable, which is all a writer wants.
pub(crate) fn write_u64(fd: &impl AsRawFd, val: u64) -> io::Result<()> {
    loop {
        // SAFETY: `val` is a valid, readable 8-byte location for the whole call.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&val as *const u64).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(()),
            _ => return Err(err),
        }
    }
}

/// Reads a clock with `clock_gettime`, in nanoseconds.
#[allow(clippy::unnecessary_cast)] // time_t/c_long are not i64 everywhere
pub(crate) fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime cannot fail
    // for CLOCK_MONOTONIC / CLOCK_REALTIME with a valid pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
}

/// Converts nanoseconds to a `timespec` (negative values clamp to zero).
pub(crate) fn timespec(ns: i64) -> libc::timespec {
    let ns = ns.max(0);
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`) in ns.
///
/// Linux's default slack is 50 µs, which would swamp a sub-100 µs deadline.
pub(crate) fn set_timer_slack(ns: u64) -> io::Result<()> {
    syscall!(prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0)).map(drop)
}

/// Reads the calling thread's timer slack in ns.
pub(crate) fn timer_slack() -> io::Result<u64> {
    syscall!(prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0)).map(|v| v as u64)
}

/// Raises the soft `RLIMIT_NOFILE` towards `want` (capped at the hard limit).
///
/// Returns the soft limit in force afterwards.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub(crate) fn raise_nofile_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
    if lim.rlim_cur >= want as libc::rlim_t {
        return Ok(lim.rlim_cur as u64);
    }
    lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
    // SAFETY: `lim` is a valid, readable rlimit.
    syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    Ok(lim.rlim_cur as u64)
}
