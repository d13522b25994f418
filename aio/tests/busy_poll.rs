//! Adaptive busy polling: a handler's poll window grows after short waits,
//! and a busy-poll hit dispatches without sleeping.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{
    AioContext, ClientType, ClockType, ContextOptions, EventNotifier, FdHandler, PollParams,
};
use util::Counter;

on_all_backends! {
    fn poll_hit_dispatches_without_a_kernel_wait(b: Backend) {
        let ctx = AioContext::with_options(
            ContextOptions::new().backend(b).poll_params(PollParams::new(50_000_000)),
        )
        .unwrap();
        let n = Arc::new(EventNotifier::new().unwrap());
        let ring = Arc::new(AtomicBool::new(false)); // "work in a shared ring"
        let (reads, readies) = (Counter::new(), Counter::new());
        let (n2, r, c1, c2) = (n.clone(), ring.clone(), reads.clone(), readies.clone());
        let r2 = ring.clone();
        ctx.set_event_notifier(
            &n,
            Some(
                FdHandler::new(ClientType::INTERNAL)
                    .on_read(move |_| {
                        n2.test_and_clear().unwrap();
                        c1.inc();
                    })
                    .on_poll(move |_| r.load(Ordering::SeqCst))
                    .on_poll_ready(move |_| {
                        r2.store(false, Ordering::SeqCst);
                        c2.inc();
                    }),
            ),
        )
        .unwrap();
        // First dispatch through the fd: the wait was short, so the
        // handler's poll window opens.
        n.set().unwrap();
        assert!(ctx.poll(true));
        assert_eq!(reads.get(), 1);
        // Work appears without any fd activity; only busy polling finds it.
        // A guard timer turns a failure into an assertion, not a hang.
        let guard_fired = Arc::new(AtomicBool::new(false));
        let g = guard_fired.clone();
        let guard = ctx.timer_new(ClockType::Realtime, move |_| g.store(true, Ordering::SeqCst));
        guard.mod_in_ns(2_000_000_000);
        ring.store(true, Ordering::SeqCst);
        let waits = ctx.stats().blocking_waits;
        assert!(ctx.poll(true));
        assert_eq!(readies.get(), 1, "poll_ready ran");
        assert!(!guard_fired.load(Ordering::SeqCst));
        assert_eq!(ctx.stats().poll_hits, 1);
        assert_eq!(ctx.stats().polled_events, 1, "found by polling");
        assert_eq!(ctx.stats().waited_events, 1, "found by waiting (the first read)");
        assert_eq!(ctx.stats().blocking_waits, waits, "no kernel wait was allowed to block");
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn no_polling_when_a_handler_cannot_poll(b: Backend) {
        // With a handler that has no poll callback, busy polling would
        // starve its fd: the loop must sleep in the kernel instead.
        let ctx = AioContext::with_options(
            ContextOptions::new().backend(b).poll_params(PollParams::new(50_000_000)),
        )
        .unwrap();
        let plain = Arc::new(EventNotifier::new().unwrap());
        let count = Counter::new();
        let (p2, c) = (plain.clone(), count.clone());
        ctx.set_event_notifier(
            &plain,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                p2.test_and_clear().unwrap();
                c.inc();
            })),
        )
        .unwrap();
        let remote = plain.clone();
        let t = std::thread::spawn(move || remote.set().unwrap());
        ctx.poll_while(|| count.get() == 0);
        t.join().unwrap();
        assert_eq!(ctx.stats().poll_hits, 0);
        ctx.set_event_notifier(&plain, None).unwrap();
    }
}
