//! An io_uring for file I/O whose buffers the ring itself owns while the
//! kernel uses them.
//!
//! Soundness rests on one rule: a request's buffers (and iovec array) move
//! into the ring's table when it is submitted and leave it only after its
//! completion has been reaped. Dropping the ring first waits for every
//! request in flight. So the kernel never writes to memory that was freed,
//! whatever the caller does with its futures.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::Waker;

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use super::alignedbuf::RawAlignedBuf;

/// A heap buffer whose address does not change when the value moves.
pub(crate) enum OwnedBuf {
    /// A vector; its length (not capacity) is the transfer size.
    Vec(Vec<u8>),
    /// An aligned allocation (for `O_DIRECT`).
    Aligned(RawAlignedBuf),
}

impl OwnedBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            OwnedBuf::Vec(v) => v.as_mut_ptr(),
            OwnedBuf::Aligned(a) => a.as_mut_slice().as_mut_ptr(),
        }
    }

    /// The buffer's length in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            OwnedBuf::Vec(v) => v.len(),
            OwnedBuf::Aligned(a) => a.as_slice().len(),
        }
    }
}

/// One request.
pub(crate) enum IoOp {
    /// `pread` into `buf[skip..]`.
    Read {
        /// The file.
        fd: RawFd,
        /// The buffer.
        buf: OwnedBuf,
        /// Bytes of `buf` already done.
        skip: usize,
        /// File offset for `buf[skip]`.
        offset: u64,
    },
    /// `pwrite` from `buf[skip..]`.
    Write {
        /// The file.
        fd: RawFd,
        /// The buffer.
        buf: OwnedBuf,
        /// Bytes of `buf` already done.
        skip: usize,
        /// File offset for `buf[skip]`.
        offset: u64,
    },
    /// `preadv` into the buffers, skipping the first `skip` bytes.
    Readv {
        /// The file.
        fd: RawFd,
        /// The buffers, in order.
        bufs: Vec<OwnedBuf>,
        /// Bytes already done.
        skip: usize,
        /// File offset of the first byte not yet done.
        offset: u64,
    },
    /// `pwritev` from the buffers, skipping the first `skip` bytes.
    Writev {
        /// The file.
        fd: RawFd,
        /// The buffers, in order.
        bufs: Vec<OwnedBuf>,
        /// Bytes already done.
        skip: usize,
        /// File offset of the first byte not yet done.
        offset: u64,
    },
    /// `fdatasync`.
    Fdatasync {
        /// The file.
        fd: RawFd,
    },
    /// `fallocate(mode, offset, len)`.
    Fallocate {
        /// The file.
        fd: RawFd,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// The most one request transfers; longer transfers complete short and are
/// resubmitted by the caller.
const MAX_TRANSFER: usize = 1 << 30;
/// Most iovecs in one request (IOV_MAX).
const MAX_IOVECS: usize = 1024;

struct InFlight {
    bufs: Vec<OwnedBuf>,
    /// Kept alive for vectored requests; the kernel reads it at submission,
    /// but holding it to completion costs nothing and needs no argument.
    _iovecs: Vec<libc::iovec>,
    result: Option<i32>,
    waker: Option<Waker>,
    abandoned: bool,
}

// SAFETY: `iovec` holds raw pointers into `bufs`, which this struct owns;
// nothing else aliases them, so moving the whole to another thread is sound.
unsafe impl Send for InFlight {}

/// A finished request: its result (bytes or `-errno`) and its buffers.
pub(crate) struct Completion {
    /// What the syscall returned: a byte count or a negated errno.
    pub(crate) result: i32,
    /// The request's buffers, back to the caller.
    pub(crate) bufs: Vec<OwnedBuf>,
}

/// The ring and its table of requests in flight.
///
/// The ring's own fd is what a loop watches: it polls readable exactly
/// while the completion queue holds entries the caller has not reaped (or
/// completions wait in the kernel's overflow list), so reaping everything
/// is also what clears it. Unlike an eventfd registered with the ring,
/// this needs no `read` per wake-up, and a caller that reaped without being
/// told (see [`IoRing::has_completions`]) leaves no stale readiness behind.
pub(crate) struct IoRing {
    ring: IoUring,
    ops: Slab<InFlight>,
    queued: usize,
    /// Successful submissions (`io_uring_enter` calls) so far.
    submits: u64,
    /// Wakers of requests reaped while submitting (CQ full), for the caller
    /// to wake once it has let go of the ring ([`IoRing::take_unwoken`]),
    /// or for the next [`IoRing::reap`] to return.
    unwoken: Vec<Waker>,
}

impl std::fmt::Debug for IoRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoRing")
            .field("in_flight", &self.ops.len())
            .finish()
    }
}

fn iovecs(bufs: &mut [OwnedBuf], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(bufs.len().min(MAX_IOVECS));
    let mut total = 0usize;
    for b in bufs.iter_mut() {
        let len = b.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(MAX_TRANSFER - total);
        out.push(libc::iovec {
            // SAFETY: `skip < len`, so the pointer stays inside the buffer.
            iov_base: unsafe { b.as_mut_ptr().add(skip) }.cast(),
            iov_len: take,
        });
        skip = 0;
        total += take;
        if out.len() == MAX_IOVECS || total == MAX_TRANSFER {
            break;
        }
    }
    out
}

impl IoRing {
    /// Creates a ring with `entries` slots.
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        // COOP_TASKRUN (5.19+): completions are not signalled by
        // interrupting the task, so a wait in epoll is not cut short with
        // EINTR; fall back without it on older kernels.
        let ring = match IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_coop_taskrun()
            .build(entries)
        {
            Ok(r) => r,
            Err(_) => IoUring::builder()
                .setup_cqsize(entries.saturating_mul(4))
                .build(entries)?,
        };
        Ok(Self {
            ring,
            ops: Slab::new(),
            queued: 0,
            submits: 0,
            unwoken: Vec::new(),
        })
    }

    /// The ring's fd: readable while completions wait to be reaped.
    pub(crate) fn poll_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Whether a [`reap`](IoRing::reap) would find something: completions
    /// in the ring, wakers kept from a submission, or completions the
    /// kernel holds in its overflow list. Two loads of shared memory and no
    /// syscall; completions that interrupted a wait (task work run on the
    /// way back to user space) are visible here before the fd is polled.
    pub(crate) fn has_completions(&mut self) -> bool {
        !self.unwoken.is_empty()
            || !self.ring.completion().is_empty()
            || self.ring.submission().cq_overflow()
    }

    /// The wakers of requests reaped by a submission that found the
    /// completion queue full: the caller wakes them once it no longer holds
    /// the ring (their completions no longer make the fd readable).
    pub(crate) fn take_unwoken(&mut self) -> Vec<Waker> {
        std::mem::take(&mut self.unwoken)
    }

    /// Whether requests are queued but not yet handed to the kernel.
    pub(crate) fn has_queued(&self) -> bool {
        self.queued > 0
    }

    /// Successful submissions (`io_uring_enter` calls) so far.
    pub(crate) fn submits(&self) -> u64 {
        self.submits
    }

    /// Requests the kernel has and has not completed yet.
    pub(crate) fn submitted_in_flight(&self) -> usize {
        self.ops.len() - self.queued
    }

    /// Queues `op`; its buffers stay in the ring until it completes.
    /// Returns the request's key.
    pub(crate) fn push(&mut self, op: IoOp, waker: Waker) -> io::Result<usize> {
        let entry = self.ops.vacant_entry();
        let key = entry.key();
        let (sqe, bufs, iov) = match op {
            IoOp::Read {
                fd,
                mut buf,
                skip,
                offset,
            } => {
                let len = buf.len().saturating_sub(skip).min(MAX_TRANSFER);
                // SAFETY: `skip.min(len)` keeps the pointer inside the
                // buffer or one past its end (with a zero length then).
                let ptr = unsafe { buf.as_mut_ptr().add(skip.min(buf.len())) };
                let sqe = opcode::Read::new(types::Fd(fd), ptr, len as u32)
                    .offset(offset)
                    .build();
                (sqe, vec![buf], Vec::new())
            }
            IoOp::Write {
                fd,
                mut buf,
                skip,
                offset,
            } => {
                let len = buf.len().saturating_sub(skip).min(MAX_TRANSFER);
                // SAFETY: as for `Read`.
                let ptr = unsafe { buf.as_mut_ptr().add(skip.min(buf.len())) };
                let sqe = opcode::Write::new(types::Fd(fd), ptr, len as u32)
                    .offset(offset)
                    .build();
                (sqe, vec![buf], Vec::new())
            }
            IoOp::Readv {
                fd,
                mut bufs,
                skip,
                offset,
            } => {
                let iov = iovecs(&mut bufs, skip);
                let sqe = opcode::Readv::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                    .offset(offset)
                    .build();
                (sqe, bufs, iov)
            }
            IoOp::Writev {
                fd,
                mut bufs,
                skip,
                offset,
            } => {
                let iov = iovecs(&mut bufs, skip);
                let sqe = opcode::Writev::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                    .offset(offset)
                    .build();
                (sqe, bufs, iov)
            }
            IoOp::Fdatasync { fd } => (
                opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                Vec::new(),
                Vec::new(),
            ),
            IoOp::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => (
                opcode::Fallocate::new(types::Fd(fd), len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                Vec::new(),
                Vec::new(),
            ),
        };
        // The buffers (and iovecs, whose heap array does not move with the
        // Vec) are now owned by the table entry, before the kernel sees them.
        entry.insert(InFlight {
            bufs,
            _iovecs: iov,
            result: None,
            waker: Some(waker),
            abandoned: false,
        });
        let sqe: squeue::Entry = sqe.user_data(key as u64);
        loop {
            // SAFETY: every pointer in `sqe` points into buffers owned by
            // `self.ops[key]`, which is only removed after the completion for
            // `key` has been reaped (or, on drop, after waiting for it).
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            match pushed {
                Ok(()) => break,
                Err(_) => {
                    // Full: hand what is queued to the kernel first.
                    if let Err(e) = self.submit() {
                        self.ops.remove(key);
                        return Err(e);
                    }
                }
            }
        }
        self.queued += 1;
        Ok(key)
    }

    /// Hands queued requests to the kernel (one `io_uring_enter`).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    self.submits += 1;
                    return Ok(());
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => continue,
                // The CQ is full: reap, and leave the SQEs queued for the
                // next submission. The wakers are kept for the caller to
                // wake ([`IoRing::take_unwoken`]), not woken here under the
                // caller's lock.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    let woken = self.reap();
                    self.unwoken.extend(woken);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves completions into the table; returns the wakers to wake. Frees
    /// the entries of abandoned requests.
    ///
    /// Completions that overflowed the CQ ring wait in the kernel until an
    /// `io_uring_enter(GETEVENTS)` moves them into the ring, and no wake-up
    /// announces them when they do: so while the kernel flags an overflow,
    /// the ring is drained and flushed (that enter also submits whatever is
    /// queued) until it does not.
    pub(crate) fn reap(&mut self) -> Vec<Waker> {
        let mut wakers = std::mem::take(&mut self.unwoken);
        let mut done: Vec<(u64, i32)> = Vec::new();
        loop {
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if !self.ring.submission().cq_overflow() {
                break;
            }
            // With the overflow flag set, `submit` enters with GETEVENTS.
            match self.ring.submit() {
                Ok(_) => self.queued = 0,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => {}
                Err(e) => {
                    log::error!("io_uring: flushing overflowed completions: {e}");
                    break;
                }
            }
        }
        for (ud, res) in done {
            let key = ud as usize;
            let Some(op) = self.ops.get_mut(key) else {
                continue;
            };
            if op.abandoned {
                self.ops.remove(key);
                continue;
            }
            op.result = Some(res);
            if let Some(w) = op.waker.take() {
                wakers.push(w);
            }
        }
        wakers
    }

    /// Takes the completion of `key`, or records `waker` if it is still in
    /// flight.
    pub(crate) fn take(&mut self, key: usize, waker: &Waker) -> Option<Completion> {
        let op = self.ops.get_mut(key)?;
        match op.result {
            Some(result) => {
                let op = self.ops.remove(key);
                Some(Completion {
                    result,
                    bufs: op.bufs,
                })
            }
            None => {
                op.waker = Some(waker.clone());
                None
            }
        }
    }

    /// The caller no longer wants the result of `key`: its entry is freed
    /// when the completion arrives (or now, if it already did).
    pub(crate) fn abandon(&mut self, key: usize) {
        if let Some(op) = self.ops.get_mut(key) {
            if op.result.is_some() {
                self.ops.remove(key);
            } else {
                op.abandoned = true;
                op.waker = None;
            }
        }
    }
}

impl Drop for IoRing {
    fn drop(&mut self) {
        // Wait for every request in flight, so the kernel never writes into
        // buffers we free.
        while !self.ops.is_empty() {
            let res = self.ring.submit_and_wait(1);
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for ud in done {
                if self.ops.contains(ud as usize) {
                    self.ops.remove(ud as usize);
                }
            }
            if let Err(e) = res {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring teardown: {e}; leaking {} buffers", self.ops.len());
                    // Leaking is safe; freeing memory the kernel may still
                    // write is not.
                    for op in self.ops.drain() {
                        std::mem::forget(op);
                    }
                    return;
                }
            }
        }
    }
}
