//! `signalfd(2)`: signals as a readable fd.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::owned;

fn sigset(signals: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid value to pass to sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    syscall!(sigemptyset(&mut set))?;
    for &sig in signals {
        // SAFETY: `set` is a valid, writable sigset_t; bad numbers fail with EINVAL.
        syscall!(sigaddset(&mut set, sig))?;
    }
    Ok(set)
}

/// Blocks `signals` in the calling thread (threads it spawns later inherit
/// the mask), so that they queue for a signalfd instead of being delivered.
pub(crate) fn block(signals: &[i32]) -> io::Result<()> {
    let set = sigset(signals)?;
    // SAFETY: `set` is a valid sigset_t; the old-mask pointer may be null.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Sends `sig` to the calling thread.
pub(crate) fn raise_in_thread(sig: i32) -> io::Result<()> {
    // SAFETY: pthread_self is always valid for the calling thread.
    let rc = unsafe { libc::pthread_kill(libc::pthread_self(), sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// An owned, non-blocking signalfd.
#[derive(Debug)]
pub(crate) struct SignalFd(OwnedFd);

impl SignalFd {
    pub(crate) fn new(signals: &[i32]) -> io::Result<Self> {
        let set = sigset(signals)?;
        // SAFETY: `set` is a valid sigset_t for the duration of the call.
        let fd = syscall!(signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC))?;
        Ok(Self(owned(fd)))
    }

    /// Reads one pending signal number, if any.
    pub(crate) fn read(&self) -> io::Result<Option<i32>> {
        // SAFETY: an all-zero signalfd_siginfo is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: `info` is a valid, writable buffer of `size` bytes.
            let n = unsafe {
                libc::read(
                    self.0.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n == size as isize {
                return Ok(Some(info.ssi_signo as i32));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ if n >= 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short read of {n} bytes from a signalfd"),
                    ))
                }
                _ => return Err(err),
            }
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
