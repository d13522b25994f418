//! The wake-up handshake between `AioContext::notify` (any thread) and the
//! home thread about to block in the kernel.
//!
//! Two words, in the style of QEMU's `notify_me` / `notified`:
//!
//! * `waiters` counts home-thread `poll` calls that are in (or about to enter)
//!   a blocking wait. Only the home thread changes it.
//! * `notified` says "something happened since the home thread last looked".
//!
//! The protocol is a Dekker-style (store-buffering) handshake and needs a
//! full fence on both sides, as QEMU's `smp_mb()` pairs do:
//!
//! ```text
//!   notifier                          poller (home thread)
//!   --------                          --------------------
//!   publish work (BH push ...)        waiters += 1            (A)
//!   old = notified.swap(true)   (N)   if notified: don't block (B)
//!   if !old && waiters > 0:     (W)   ... block in epoll/ppoll ...
//!       write eventfd                 waiters -= 1
//!                                     notified.swap(false)    (C), then run work
//! ```
//!
//! A SeqCst fence sits between `N` and `W`, and between `A` and `B`. The two
//! fences are totally ordered: if the notifier's comes first, `B` sees `N`
//! (the poller does not block); if the poller's comes first, `W` sees `A`
//! (the notifier writes the eventfd). Either way no wake-up is lost. (Fences
//! rather than SeqCst accesses also let `loom`, which models SeqCst accesses
//! only as AcqRel, check the protocol faithfully.)
//!
//! The `swap` in `N` lets concurrent notifiers skip the syscall: if `notified`
//! was already set, the earlier notifier either wrote the eventfd or saw no
//! waiter, and `C` has not yet run, so the poller has not yet consumed the
//! earlier notification and will observe this notifier's work when it does
//! (the poller's swap in `C` reads the value our swap wrote, which makes our
//! published work visible to it).
//!
//! The `loom` model below explores every interleaving of these operations:
//! `RUSTFLAGS="--cfg loom" cargo test -p aio --release --lib notify::model`.

#[cfg(all(loom, test))]
use ::loom::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
#[cfg(not(all(loom, test)))]
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};

/// The shared state of the notify handshake.
#[derive(Debug, Default)]
pub(crate) struct NotifyState {
    waiters: AtomicU32,
    notified: AtomicBool,
}

impl NotifyState {
    /// Creates the state with no waiter and nothing notified.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Notifier side. Returns `true` when the caller must write the eventfd
    /// because the home thread is (or is about to be) blocked.
    pub(crate) fn notify(&self) -> bool {
        // N. Release publishes the caller's work to the poller's swap in C;
        // a `true` here means an earlier notification is not yet accepted.
        if self.notified.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Pairs with the fence in `begin_wait` (store-buffering: one of the
        // two sides must see the other's store).
        fence(Ordering::SeqCst);
        // W
        self.waiters.load(Ordering::Relaxed) > 0
    }

    /// Poller side, before blocking. Returns `false` if a notification is
    /// already pending, in which case the caller must not block.
    pub(crate) fn begin_wait(&self) -> bool {
        // A
        self.waiters.fetch_add(1, Ordering::Relaxed);
        // Pairs with the fence in `notify`.
        fence(Ordering::SeqCst);
        // B
        !self.notified.load(Ordering::Relaxed)
    }

    /// Poller side, after the wait returned.
    pub(crate) fn end_wait(&self) {
        // A notifier that still sees us waiting only costs a spare eventfd
        // write, never a missed wake-up.
        self.waiters.fetch_sub(1, Ordering::Release);
    }

    /// Poller side: consumes the pending notification, before running the
    /// work it announced. Returns whether one was pending.
    pub(crate) fn accept(&self) -> bool {
        // Skip the read-modify-write in the common case. A stale `false`
        // only leaves the flag set, which makes the next wait not block.
        if !self.notified.load(Ordering::Acquire) {
            return false;
        }
        // C: reading `true` acquires the work published before N.
        self.notified.swap(false, Ordering::AcqRel)
    }

    /// Whether a notification is pending (used by busy polling).
    pub(crate) fn is_notified(&self) -> bool {
        self.notified.load(Ordering::Acquire)
    }
}

#[cfg(all(loom, test))]
mod model {
    //! Model checks of the handshake. The eventfd is modelled by
    //! `loom::sync::Notify`, which keeps one permit like an eventfd keeps a
    //! non-zero counter. A lost wake-up leaves the poller blocked forever,
    //! which loom reports as a deadlock in that interleaving.
    use super::NotifyState;
    use ::loom::sync::atomic::{AtomicUsize, Ordering};
    use ::loom::sync::{Arc, Notify};
    use ::loom::thread;

    struct World {
        state: NotifyState,
        /// The work a notifier publishes before notifying (a scheduled BH).
        work: AtomicUsize,
        eventfd: Notify,
        writes: AtomicUsize,
    }

    fn world() -> Arc<World> {
        Arc::new(World {
            state: NotifyState::new(),
            work: AtomicUsize::new(0),
            eventfd: Notify::new(),
            writes: AtomicUsize::new(0),
        })
    }

    fn notifier(w: &World) {
        w.work.fetch_add(1, Ordering::Relaxed);
        if w.state.notify() {
            w.writes.fetch_add(1, Ordering::Relaxed);
            w.eventfd.notify();
        }
    }

    /// One blocking iteration of the poller; returns the work it can see.
    /// The modelled eventfd, like a real wait, may wake spuriously.
    fn poll_once(w: &World) -> usize {
        if w.state.begin_wait() {
            w.eventfd.wait();
        }
        w.state.end_wait();
        w.state.accept();
        w.work.load(Ordering::Relaxed)
    }

    /// Bounded preemptions keep the two-notifier model to seconds; every
    /// lost-wake-up interleaving needs at most two preemptions.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = ::loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(f);
    }

    #[test]
    fn one_notifier_never_loses_the_wake_up() {
        model(|| {
            let w = world();
            let w2 = w.clone();
            let t = thread::spawn(move || notifier(&w2));
            // Waits may end spuriously (as EINTR ends a real one), so the
            // poller loops; a lost wake-up would block it forever.
            while poll_once(&w) == 0 {}
            t.join().unwrap();
        });
    }

    #[test]
    fn two_notifiers_elide_and_still_wake() {
        model(|| {
            let w = world();
            let (a, b) = (w.clone(), w.clone());
            let ta = thread::spawn(move || notifier(&a));
            let tb = thread::spawn(move || notifier(&b));
            let mut polls = 0;
            while poll_once(&w) < 2 {
                polls += 1;
            }
            ta.join().unwrap();
            tb.join().unwrap();
            // Each write needs a fresh `notified` transition, and the poller
            // clears it once per iteration.
            assert!(w.writes.load(Ordering::Relaxed) <= polls + 1);
        });
    }

    #[test]
    fn no_write_when_nobody_waits() {
        model(|| {
            let w = world();
            let w2 = w.clone();
            let t = thread::spawn(move || notifier(&w2));
            t.join().unwrap();
            // The poller was never blocked: no syscall was needed.
            assert_eq!(w.writes.load(Ordering::Relaxed), 0);
            assert!(w.state.accept());
            assert_eq!(w.work.load(Ordering::Relaxed), 1);
        });
    }
}
