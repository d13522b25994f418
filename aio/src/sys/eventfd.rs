//! `eventfd(2)`: a kernel counter usable as a wake-up primitive.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::{owned, read_u64, write_u64};

/// An owned, non-blocking, close-on-exec eventfd.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        let fd = syscall!(eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?;
        Ok(Self(owned(fd)))
    }

    /// Adds one to the counter, making the fd readable.
    pub(crate) fn write(&self) -> io::Result<()> {
        write_u64(&self.0, 1)
    }

    /// Resets the counter; returns whether it was non-zero.
    pub(crate) fn read(&self) -> io::Result<bool> {
        Ok(read_u64(&self.0)?.is_some())
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
