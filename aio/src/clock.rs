//! Clocks: the two host clocks and a virtual clock that moves only when told.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::context::Inner;

/// The clock a timer is armed on.
///
/// All values are nanoseconds. `Realtime` and `Host` deadlines are absolute
/// times on their clock; `Virtual` deadlines are absolute times on the
/// context's [`VirtualClock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClockType {
    /// The host's monotonic clock (`CLOCK_MONOTONIC`); QEMU's
    /// `QEMU_CLOCK_REALTIME`. Use it for anything that is not guest state.
    Realtime,
    /// The host's wall clock (`CLOCK_REALTIME`), which follows NTP steps.
    Host,
    /// A clock that advances only when stepped or set, for deterministic
    /// tests (QEMU's virtual clock under qtest).
    Virtual,
}

impl ClockType {
    pub(crate) const ALL: [ClockType; 3] =
        [ClockType::Realtime, ClockType::Host, ClockType::Virtual];

    pub(crate) fn index(self) -> usize {
        match self {
            ClockType::Realtime => 0,
            ClockType::Host => 1,
            ClockType::Virtual => 2,
        }
    }
}

/// Now on `CLOCK_MONOTONIC`, in ns.
pub fn monotonic_ns() -> i64 {
    crate::sys::clock_ns(libc::CLOCK_MONOTONIC)
}

/// Now on `CLOCK_REALTIME`, in ns since the epoch.
pub fn host_ns() -> i64 {
    crate::sys::clock_ns(libc::CLOCK_REALTIME)
}

#[derive(Debug, Default)]
struct VirtualInner {
    now: AtomicI64,
    contexts: Mutex<Vec<Weak<Inner>>>,
}

/// A clock that only moves forward, and only when told.
///
/// Every [`AioContext`](crate::AioContext) has one; several contexts may share
/// one (pass it in [`ContextOptions::virtual_clock`](crate::ContextOptions::virtual_clock)),
/// so that one test driver owns the time of a whole process. Moving the clock
/// through [`AioContext::virtual_step`](crate::AioContext::virtual_step) fires
/// the timers it passes, deadline by deadline; [`VirtualClock::advance_to`]
/// only moves the time and wakes every attached context, which then runs its
/// expired timers itself.
#[derive(Clone, Debug, Default)]
pub struct VirtualClock {
    inner: Arc<VirtualInner>,
}

impl VirtualClock {
    /// Creates a clock reading 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current virtual time in ns.
    pub fn now(&self) -> i64 {
        self.inner.now.load(Ordering::Acquire)
    }

    /// Moves the clock forward to `ns` (a time in the past is ignored) and
    /// wakes every attached context. Returns the time afterwards.
    pub fn advance_to(&self, ns: i64) -> i64 {
        let prev = self.inner.now.fetch_max(ns, Ordering::AcqRel);
        if ns > prev {
            self.wake_contexts();
        }
        prev.max(ns)
    }

    /// Whether two handles refer to the same clock.
    pub fn same_clock(&self, other: &VirtualClock) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn attach(&self, ctx: Weak<Inner>) {
        let mut list = self.inner.contexts.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(ctx);
    }

    fn wake_contexts(&self) {
        let list: Vec<_> = self
            .inner
            .contexts
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for ctx in list {
            crate::context::notify_inner(&ctx);
        }
    }
}
