//! The io_uring backend: every watched fd has a one-shot
//! `IORING_OP_POLL_ADD` in flight; a completion reports the fd ready and the
//! poll is re-armed at the next wait, in the same `io_uring_enter` that
//! waits. Deadlines go in that call too (`IORING_ENTER_EXT_ARG` timespec),
//! so one syscall submits, re-arms and sleeps with nanosecond precision.
//!
//! One-shot rather than multishot polls: a multishot poll reports *changes*
//! of readiness (edge-like), while the loop's contract is level-triggered —
//! a handler that leaves data unread is called again. QEMU learned this the
//! hard way (multishot broke its FUSE export; iotest 308 hung). Re-arming
//! costs one SQE per dispatch and no extra syscall.
//!
//! Interest changes are queued and applied at the next wait, so the ring is
//! touched only by the waiting (home) thread and never while another thread
//! holds it.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;

use parking_lot::Mutex;
use slab::Slab;

use super::{remaining_ns, FdMonitor, Interest, Ready, Timeout};
use crate::sys::uring::Uring;

/// User data of poll-remove requests, whose completions are ignored.
const REMOVE_UD: u64 = u64::MAX;
const RING_ENTRIES: u32 = 256;

struct Watch {
    fd: RawFd,
    token: u64,
    mask: u32,
    /// Tags the poll request in flight; changes on every modify so stale
    /// completions are recognised.
    user_data: u64,
    armed: bool,
}

#[derive(Default)]
struct State {
    watches: Slab<Watch>,
    by_fd: HashMap<RawFd, usize>,
    generation: u32,
    /// Poll requests to cancel at the next wait.
    removals: Vec<u64>,
    /// Watches to (re-)arm at the next wait.
    to_arm: Vec<usize>,
}

impl State {
    fn user_data(&mut self, key: usize) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        (u64::from(self.generation) << 32) | key as u64
    }
}

/// The io_uring fd monitor.
pub(crate) struct IoUringMonitor {
    ring: Mutex<Uring>,
    state: Mutex<State>,
}

fn mask_of(interest: Interest) -> u32 {
    let mut m = 0;
    if interest.read {
        m |= (libc::POLLIN | libc::POLLRDHUP) as u32;
    }
    if interest.write {
        m |= libc::POLLOUT as u32;
    }
    m
}

impl IoUringMonitor {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            ring: Mutex::new(Uring::new(RING_ENTRIES)?),
            state: Mutex::new(State::default()),
        })
    }
}

impl IoUringMonitor {
    /// Turns queued removals and (re-)arms into SQEs; returns whether there
    /// were any.
    fn queue_changes(&self, ring: &mut Uring) -> io::Result<bool> {
        let mut s = self.state.lock();
        let mut any = false;
        for ud in std::mem::take(&mut s.removals) {
            ring.poll_remove(ud, REMOVE_UD)?;
            any = true;
        }
        let to_arm = std::mem::take(&mut s.to_arm);
        for key in to_arm {
            let Some(w) = s.watches.get_mut(key) else {
                continue; // removed since
            };
            if !w.armed {
                ring.poll_add(w.fd, w.mask, w.user_data)?;
                w.armed = true;
                any = true;
            }
        }
        Ok(any)
    }
}

impl FdMonitor for IoUringMonitor {
    fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.by_fd.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("fd {fd} is already registered"),
            ));
        }
        let entry = s.watches.vacant_entry();
        let key = entry.key();
        entry.insert(Watch {
            fd,
            token,
            mask: mask_of(interest),
            user_data: 0,
            armed: false,
        });
        let ud = s.user_data(key);
        s.watches[key].user_data = ud;
        s.by_fd.insert(fd, key);
        s.to_arm.push(key);
        Ok(())
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut s = self.state.lock();
        let key = *s.by_fd.get(&fd).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("fd {fd} is not registered"),
            )
        })?;
        let ud = s.user_data(key);
        let w = &mut s.watches[key];
        let old = std::mem::replace(&mut w.user_data, ud);
        let was_armed = std::mem::replace(&mut w.armed, false);
        w.token = token;
        w.mask = mask_of(interest);
        if was_armed {
            s.removals.push(old);
        }
        s.to_arm.push(key);
        Ok(())
    }

    fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut s = self.state.lock();
        let key = s.by_fd.remove(&fd).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("fd {fd} is not registered"),
            )
        })?;
        let w = s.watches.remove(key);
        if w.armed {
            s.removals.push(w.user_data);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut ring = self.ring.lock();
        if self.queue_changes(&mut ring)? {
            ring.submit_and_wait(None)?;
        }
        Ok(())
    }

    fn wait(&self, out: &mut Vec<Ready>, timeout: Timeout) -> io::Result<()> {
        let mut ring = self.ring.lock();
        self.queue_changes(&mut ring)?;
        let wait = match timeout {
            Timeout::Zero => None,
            Timeout::Infinite => Some(None),
            Timeout::Until(t) => Some(Some(remaining_ns(t))),
        };
        ring.submit_and_wait(wait)?;
        let mut done = Vec::new();
        ring.completions(&mut done);
        drop(ring);
        if done.is_empty() {
            return Ok(());
        }
        let mut s = self.state.lock();
        for (ud, res) in done {
            if ud == REMOVE_UD {
                continue;
            }
            let key = (ud & 0xffff_ffff) as usize;
            let Some(w) = s.watches.get_mut(key).filter(|w| w.user_data == ud) else {
                continue; // a request that was cancelled or replaced
            };
            w.armed = false;
            let token = w.token;
            if res == -libc::ECANCELED {
                continue;
            }
            let (readable, writable) = if res < 0 {
                log::warn!(
                    "io_uring poll on fd {} failed: {}",
                    w.fd,
                    io::Error::from_raw_os_error(-res)
                );
                (true, true)
            } else {
                let re = res as u32;
                let err = re & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) as u32 != 0;
                (
                    err || re & (libc::POLLIN | libc::POLLRDHUP) as u32 != 0,
                    err || re & libc::POLLOUT as u32 != 0,
                )
            };
            s.to_arm.push(key);
            out.push(Ready {
                token,
                readable,
                writable,
            });
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.ring.lock().as_raw_fd())
    }
}
