//! A small, safe surface over an `io_uring` instance for fd monitoring:
//! poll-add and poll-remove requests only, which reference no user memory.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

/// An io_uring used to watch fds (`IORING_OP_POLL_ADD`).
pub(crate) struct Uring {
    ring: IoUring,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

impl Uring {
    /// Creates a ring with `entries` submission slots. Needs
    /// `IORING_FEAT_EXT_ARG` (Linux 5.11) for timed waits.
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(8))
            .build(entries)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_EXT_ARG (timed waits); Linux 5.11+ is required",
            ));
        }
        Ok(Self { ring })
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: poll-add and poll-remove entries carry no pointers to
            // user memory, so nothing must outlive the submission.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            match pushed {
                Ok(()) => return Ok(()),
                // Submission queue full: hand what is queued to the kernel.
                Err(_) => {
                    self.ring.submit()?;
                }
            }
        }
    }

    /// Queues a one-shot poll of `fd` for `mask` (poll(2) bits).
    pub(crate) fn poll_add(&mut self, fd: RawFd, mask: u32, user_data: u64) -> io::Result<()> {
        self.push(
            opcode::PollAdd::new(types::Fd(fd), mask)
                .build()
                .user_data(user_data),
        )
    }

    /// Queues the cancellation of the poll request tagged `target`.
    pub(crate) fn poll_remove(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        self.push(opcode::PollRemove::new(target).build().user_data(user_data))
    }

    /// Submits what is queued and waits: `None` not at all, `Some(None)`
    /// until one completion, `Some(Some(ns))` at most `ns` nanoseconds.
    /// A timeout or a signal is not an error.
    pub(crate) fn submit_and_wait(&mut self, wait: Option<Option<i64>>) -> io::Result<()> {
        let res = match wait {
            None => self.ring.submit(),
            Some(None) => self.ring.submitter().submit_and_wait(1),
            Some(Some(ns)) => {
                let ns = ns.max(0);
                let ts = types::Timespec::new()
                    .sec((ns / 1_000_000_000) as u64)
                    .nsec((ns % 1_000_000_000) as u32);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The ring's fd: it polls readable when completions are available.
    pub(crate) fn as_raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.ring)
    }

    /// Moves every available completion into `out` as (user data, result).
    pub(crate) fn completions(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}
