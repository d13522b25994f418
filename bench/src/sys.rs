//! The only module of the bench crate with `unsafe`: eventfd creation, the
//! raw-epoll ping-pong floor and the millisecond-timeout `epoll_wait` used
//! as the timer reference. Everything is plain libc, with no event loop
//! around it, so that it measures what the kernel costs and nothing else.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Events harvested per `epoll_wait`: the same batch as `aio`'s epoll
/// monitor, so both floors hand the kernel the same buffer size.
const EVENT_CAP: usize = 256;

/// The epoll token of the active eventfd; idle fds get their index.
const ACTIVE_TOKEN: u64 = u64::MAX;

/// Turns a `-1` return into the thread's `errno`.
fn check(res: libc::c_int) -> io::Result<libc::c_int> {
    if res == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

/// Takes ownership of a descriptor a syscall just created.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall that created
    // it, so nothing else owns or will close it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Creates an eventfd (`EFD_NONBLOCK | EFD_CLOEXEC`, counter 0).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; it only returns a new fd or -1.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    Ok(owned(fd))
}

fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointers; it only returns a new fd or -1.
    let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    Ok(owned(fd))
}

fn epoll_add(epfd: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `ev` is a valid epoll_event that outlives the call; the
    // kernel copies it and keeps no pointer.
    check(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

fn empty_events() -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; EVENT_CAP]
}

/// The raw-epoll floor: the ping-pong of [`AioPingPong`](crate::AioPingPong)
/// written directly against libc.
///
/// `idle` eventfds that are never signalled plus one active eventfd, all
/// level-triggered `EPOLLIN` in one epoll instance, the active one added
/// last. One [`iteration`](RawEpollPingPong::iteration) is `write` (set the
/// active eventfd), `epoll_wait` (which must report exactly it) and `read`
/// (clear it): three syscalls.
#[derive(Debug)]
pub struct RawEpollPingPong {
    events: Vec<libc::epoll_event>,
    epfd: RawFd,
    active_fd: RawFd,
    // Owned descriptors last: they close after the raw copies are unused.
    epoll: OwnedFd,
    _active: OwnedFd,
    idle: Vec<OwnedFd>,
}

impl RawEpollPingPong {
    /// Builds the fixture with `idle` never-signalled eventfds.
    pub fn new(idle: usize) -> io::Result<Self> {
        let epoll = epoll_create()?;
        let mut idle_fds = Vec::with_capacity(idle);
        for i in 0..idle {
            let fd = eventfd()?;
            epoll_add(epoll.as_raw_fd(), fd.as_raw_fd(), i as u64)?;
            idle_fds.push(fd);
        }
        let active = eventfd()?;
        epoll_add(epoll.as_raw_fd(), active.as_raw_fd(), ACTIVE_TOKEN)?;
        Ok(Self {
            events: empty_events(),
            epfd: epoll.as_raw_fd(),
            active_fd: active.as_raw_fd(),
            epoll,
            _active: active,
            idle: idle_fds,
        })
    }

    /// The number of idle eventfds.
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// One ping-pong: returns whether every syscall succeeded and the wait
    /// reported exactly the active eventfd.
    #[inline]
    pub fn iteration(&mut self) -> bool {
        let one: u64 = 1;
        // SAFETY: `one` is a readable 8-byte value alive for the call;
        // `active_fd` is open (owned by `self.active`).
        let w = unsafe { libc::write(self.active_fd, (&one as *const u64).cast(), 8) };
        // SAFETY: `events` holds EVENT_CAP initialised entries and the
        // kernel writes at most EVENT_CAP of them; `epfd` is open (owned by
        // `self.epoll`).
        let n = unsafe {
            libc::epoll_wait(
                self.epfd,
                self.events.as_mut_ptr(),
                EVENT_CAP as libc::c_int,
                -1,
            )
        };
        let mut val: u64 = 0;
        // SAFETY: `val` is a writable 8-byte location alive for the call.
        let r = unsafe { libc::read(self.active_fd, (&mut val as *mut u64).cast(), 8) };
        // Copy the (packed) field out before comparing.
        let token = self.events[0].u64;
        w == 8 && n == 1 && token == ACTIVE_TOKEN && r == 8
    }

    /// Whether the active eventfd is still readable (a non-blocking wait
    /// reports anything at all). For tests: after an iteration it must not be.
    pub fn anything_pending(&mut self) -> io::Result<bool> {
        // SAFETY: as in `iteration`; a zero timeout never blocks.
        let n = check(unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENT_CAP as libc::c_int,
                0,
            )
        })?;
        Ok(n > 0)
    }
}

/// A bare epoll instance with nothing registered, used to sleep with a
/// millisecond timeout the way ms-granular event loops do (`epoll_wait`'s
/// `int timeout` in ms).
#[derive(Debug)]
pub struct MsEpollSleeper {
    events: Vec<libc::epoll_event>,
    epoll: OwnedFd,
}

impl MsEpollSleeper {
    /// Creates the epoll instance.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            events: empty_events(),
            epoll: epoll_create()?,
        })
    }

    /// Waits up to `timeout_ms` milliseconds (nothing can wake it earlier,
    /// except a signal). Returns the number of events, i.e. 0.
    pub fn wait_ms(&mut self, timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: `events` holds EVENT_CAP initialised entries and the
        // kernel writes at most that many; the epoll fd is open.
        let res = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENT_CAP as libc::c_int,
                timeout_ms,
            )
        };
        match check(res) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
            Err(e) => Err(e),
        }
    }
}

// ----- cross-thread wake floor ------------------------------------------

/// The raw floor of the cross-thread wake benchmark: one eventfd in one
/// epoll instance. One thread blocks in [`wait`](Self::wait) (plain
/// `epoll_wait(-1)`), another [`signal`](Self::signal)s (one 8-byte
/// `write`). Both methods take `&self`: share it in an `Arc`.
#[derive(Debug)]
pub struct CrossThreadEventfd {
    efd: OwnedFd,
    epoll: OwnedFd,
}

impl CrossThreadEventfd {
    /// Creates the eventfd (counter 0) and registers it, level-triggered.
    pub fn new() -> io::Result<Self> {
        let epoll = epoll_create()?;
        let efd = eventfd()?;
        epoll_add(epoll.as_raw_fd(), efd.as_raw_fd(), ACTIVE_TOKEN)?;
        Ok(Self { efd, epoll })
    }

    /// Adds 1 to the counter, making a waiter return. Any thread.
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: `one` is a readable 8-byte value alive for the call; the
        // eventfd is open (owned by `self`).
        let n = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n == 8 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Blocks in `epoll_wait(-1)` until the eventfd is readable (retrying
    /// on `EINTR`). Does not clear it: see [`clear`](Self::clear).
    pub fn wait(&self) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        loop {
            // SAFETY: `ev` is one writable epoll_event and maxevents is 1;
            // the epoll fd is open (owned by `self`).
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, -1) };
            match check(n) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads (and so resets) the counter; `Ok(false)` if it was 0.
    pub fn clear(&self) -> io::Result<bool> {
        let mut val: u64 = 0;
        // SAFETY: `val` is a writable 8-byte location alive for the call;
        // the eventfd is open and non-blocking.
        let n = unsafe { libc::read(self.efd.as_raw_fd(), (&mut val as *mut u64).cast(), 8) };
        if n == 8 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(e)
        }
    }
}

// ----- CPU affinity, filesystems ----------------------------------------

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET only writes bit `cpu` of `set`, and refuses (does
    // nothing for) a cpu past the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    check(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) }).map(drop)
}

/// Whether every CPU in `cpus` is in the calling thread's affinity mask.
pub(crate) fn cpus_allowed(cpus: &[usize]) -> io::Result<bool> {
    // SAFETY: as in `pin_current_thread`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    check(unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) })?;
    Ok(cpus.iter().all(|&c| {
        // SAFETY: CPU_ISSET only reads bit `c` (false past the set's size).
        unsafe { libc::CPU_ISSET(c, &set) }
    }))
}

/// Whether `path` lies on a tmpfs (`statfs` magic).
pub(crate) fn is_tmpfs(path: &std::path::Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is a plain C struct; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path alive for the call and `st` a
    // writable statfs.
    check(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
    Ok(st.f_type == libc::TMPFS_MAGIC)
}
