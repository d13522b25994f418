//! Signals delivered through a `signalfd`, as an fd a context can watch.

use std::os::fd::{AsRawFd, RawFd};

use crate::error::{IoContext, Result};
use crate::sys::signalfd;

/// A set of signals read from a `signalfd` instead of being delivered
/// asynchronously.
///
/// Creating it blocks the signals in the calling thread; threads spawned
/// afterwards inherit the mask. Create it on the main thread before
/// spawning others (iothreads, thread pools), or a signal may be delivered
/// to a thread that does not block it.
///
/// ```
/// use aio::SignalFd;
/// let sfd = SignalFd::new(&[libc::SIGUSR1])?;
/// assert_eq!(sfd.read()?, None);
/// aio::SignalFd::raise_in_thread(libc::SIGUSR1)?; // queued, not delivered
/// assert_eq!(sfd.read()?, Some(libc::SIGUSR1));
/// # Ok::<(), aio::Error>(())
/// ```
#[derive(Debug)]
pub struct SignalFd {
    fd: signalfd::SignalFd,
}

impl SignalFd {
    /// Blocks `signals` in the calling thread and opens a signalfd for them.
    pub fn new(signals: &[i32]) -> Result<Self> {
        signalfd::block(signals).context(|| format!("blocking signals {signals:?}"))?;
        let fd = signalfd::SignalFd::new(signals)
            .context(|| format!("creating a signalfd for {signals:?}"))?;
        Ok(Self { fd })
    }

    /// Reads one pending signal number, or `None` if none is pending.
    pub fn read(&self) -> Result<Option<i32>> {
        self.fd
            .read()
            .context(|| "reading the signalfd".to_string())
    }

    /// Sends `sig` to the calling thread (for tests and self-shutdown).
    pub fn raise_in_thread(sig: i32) -> Result<()> {
        signalfd::raise_in_thread(sig).context(|| format!("raising signal {sig}"))
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
