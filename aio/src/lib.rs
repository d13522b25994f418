//! A QEMU-style `AioContext` for Rust: an event loop on epoll (or ppoll)
//! with fd handlers, event notifiers, bottom halves, nanosecond timers on
//! three clocks, cross-thread notify with syscall elision, nested polling
//! and client masks; plus a [`ThreadPool`] for blocking work and
//! asynchronous [`file`](mod@file) I/O on it, whose futures work with any executor.
//!
//! ```
//! use aio::{AioContext, ClockType};
//! use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
//!
//! let ctx = AioContext::new()?;
//! let hits = Arc::new(AtomicU32::new(0));
//! let h = hits.clone();
//! let bh = ctx.bh_new(move |_| { h.fetch_add(1, Ordering::Relaxed); });
//! let h = hits.clone();
//! let timer = ctx.timer_new(ClockType::Realtime, move |_| { h.fetch_add(10, Ordering::Relaxed); });
//! bh.schedule();
//! timer.mod_in_ns(50_000); // 50 µs from now
//! ctx.poll_while(|| hits.load(Ordering::Relaxed) < 11);
//! # Ok::<(), aio::Error>(())
//! ```
//!
//! See `docs/architecture.md` in the repository for the design.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod bh;
mod buffer;
mod clock;
mod context;
mod error;
mod executor;
mod fdmon;
pub mod file;
mod file_uring;
mod handler;
pub mod net;
mod notifier;
mod notify;
mod signals;
mod sync;
mod sys;
pub mod testing;
mod thread_pool;
mod timer;
mod uring_file;

pub use bh::Bh;
pub use clock::{host_ns, monotonic_ns, ClockType, VirtualClock};
pub use context::{
    AioContext, Backend, ClientGuard, ContextOptions, PollParams, Stats, WeakAioContext,
};
pub use error::{Error, Result};
pub use executor::{
    sleep_ns, sleep_until, switch_to, yield_now, JoinHandle, Sleep, SwitchTo, YieldNow,
};
pub use handler::{ClientMask, ClientType, FdHandler};
pub use notifier::EventNotifier;
pub use signals::SignalFd;
pub use sync::{CoMutex, CoMutexGuard, CoMutexLock, CoQueue, CoQueueWait};
pub use thread_pool::{PoolOptions, PoolStats, RunFuture, ThreadPool};
pub use timer::Timer;

/// The repository README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// Raises the soft `RLIMIT_NOFILE` to `want` (capped at the hard limit) and
/// returns the limit in force. For programs that register many fds.
pub fn raise_fd_limit(want: u64) -> Result<u64> {
    use error::IoContext;
    sys::raise_nofile_limit(want).context(|| format!("raising RLIMIT_NOFILE to {want}"))
}

/// The calling thread's timer slack in ns (`PR_GET_TIMERSLACK`).
pub fn timer_slack_ns() -> Result<u64> {
    use error::IoContext;
    sys::timer_slack().context(|| "reading the timer slack".to_string())
}
