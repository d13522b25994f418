//! Event notifiers: an eventfd that one side sets and the loop clears.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use crate::error::{IoContext, Result};
use crate::sys::eventfd::EventFd;

/// A level-triggered, cross-thread signal backed by an `eventfd`.
///
/// `set` may be called from any thread (or another process sharing the fd,
/// like a KVM ioeventfd); the loop sees the fd readable until
/// `test_and_clear` consumes it. Register it with
/// [`AioContext::set_event_notifier`](crate::AioContext::set_event_notifier).
///
/// ```
/// let n = aio::EventNotifier::new()?;
/// assert!(!n.test_and_clear()?);
/// n.set()?;
/// n.set()?;
/// assert!(n.test_and_clear()?);
/// assert!(!n.test_and_clear()?);
/// # Ok::<(), aio::Error>(())
/// ```
#[derive(Debug)]
pub struct EventNotifier {
    fd: EventFd,
}

impl EventNotifier {
    /// Creates a notifier that is not set.
    pub fn new() -> Result<Self> {
        let fd = EventFd::new().context(|| "creating an eventfd".to_string())?;
        Ok(Self { fd })
    }

    /// Sets the notifier (idempotent until cleared).
    pub fn set(&self) -> Result<()> {
        let fd = self.fd.as_raw_fd();
        self.fd.write().context(|| format!("writing eventfd {fd}"))
    }

    /// Clears the notifier; returns whether it was set.
    pub fn test_and_clear(&self) -> Result<bool> {
        let fd = self.fd.as_raw_fd();
        self.fd.read().context(|| format!("reading eventfd {fd}"))
    }
}

impl AsRawFd for EventNotifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
