//! Nested polls: from bottom halves, fd handlers and timers; no callback is
//! re-entered, and a suppressed fd does not make the nested loop spin.

mod util;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use aio::{AioContext, ClientType, ClockType, EventNotifier, FdHandler};
use util::{ctx, Counter};

on_all_backends! {
    fn running_handler_is_not_reentered_and_does_not_spin(b: Backend) {
        let ctx = ctx(b);
        let n = Arc::new(EventNotifier::new().unwrap());
        let depth = Arc::new(AtomicU32::new(0));
        let max_depth = Arc::new(AtomicU32::new(0));
        let calls = Counter::new();
        let (n2, d, md, c) = (n.clone(), depth.clone(), max_depth.clone(), calls.clone());
        ctx.set_event_notifier(
            &n,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |ctx: &AioContext| {
                let now = d.fetch_add(1, Ordering::SeqCst) + 1;
                md.fetch_max(now, Ordering::SeqCst);
                c.inc();
                if c.get() == 1 {
                    // Our fd is still readable (not cleared). A nested loop
                    // waiting for a timer must neither call us again nor spin
                    // on the level-triggered fd.
                    let fired = Arc::new(AtomicBool::new(false));
                    let f = fired.clone();
                    let t = ctx.timer_new(ClockType::Realtime, move |_| f.store(true, Ordering::SeqCst));
                    t.mod_in_ns(2_000_000);
                    let before = ctx.stats().iterations;
                    ctx.poll_while(|| !fired.load(Ordering::SeqCst));
                    let nested_iterations = ctx.stats().iterations - before;
                    assert!(nested_iterations < 20, "nested loop spun: {nested_iterations} iterations");
                }
                n2.test_and_clear().unwrap();
                d.fetch_sub(1, Ordering::SeqCst);
            })),
        )
        .unwrap();
        n.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!(max_depth.load(Ordering::SeqCst), 1, "never re-entered");
        assert_eq!(calls.get(), 1);
        // The suppressed fd is back in the interest set afterwards.
        n.set().unwrap();
        assert!(ctx.poll(true));
        assert_eq!(calls.get(), 2);
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn nested_poll_dispatches_other_handlers_once(b: Backend) {
        // x and z are ready in the same wait; x's callback runs a nested
        // poll that dispatches z. The outer poll must not dispatch z again.
        let ctx = ctx(b);
        let x = Arc::new(EventNotifier::new().unwrap());
        let z = Arc::new(EventNotifier::new().unwrap());
        let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (x2, l) = (x.clone(), log.clone());
        ctx.set_event_notifier(
            &x,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |ctx: &AioContext| {
                x2.test_and_clear().unwrap();
                l.lock().unwrap().push("x");
                ctx.poll(false);
            })),
        )
        .unwrap();
        let (z2, l) = (z.clone(), log.clone());
        ctx.set_event_notifier(
            &z,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                // A dispatch with nothing to read would be a spurious one.
                assert!(z2.test_and_clear().unwrap(), "spurious dispatch");
                l.lock().unwrap().push("z");
            })),
        )
        .unwrap();
        x.set().unwrap();
        z.set().unwrap();
        ctx.poll(false);
        while ctx.poll(false) {}
        let log = log.lock().unwrap().clone();
        assert_eq!(log.iter().filter(|e| **e == "z").count(), 1, "{log:?}");
        assert_eq!(log.iter().filter(|e| **e == "x").count(), 1, "{log:?}");
        ctx.set_event_notifier(&x, None).unwrap();
        ctx.set_event_notifier(&z, None).unwrap();
    }

    fn poll_while_waits_for_another_thread(b: Backend) {
        let ctx = ctx(b);
        let done = Arc::new(AtomicBool::new(false));
        let (d, remote) = (done.clone(), ctx.clone());
        let t = std::thread::spawn(move || {
            d.store(true, Ordering::SeqCst);
            // Whoever changes the condition kicks the loop.
            remote.notify();
        });
        ctx.poll_while(|| !done.load(Ordering::SeqCst));
        t.join().unwrap();
    }

    fn nested_poll_from_a_timer_callback(b: Backend) {
        let ctx = ctx(b);
        let bh_ran = Counter::new();
        let c = bh_ran.clone();
        let bh = Arc::new(ctx.bh_new(move |_| c.inc()));
        let (b2, c2) = (bh.clone(), bh_ran.clone());
        let t = ctx.timer_new(ClockType::Virtual, move |ctx: &AioContext| {
            b2.schedule();
            ctx.poll_while(|| c2.get() == 0);
        });
        t.mod_ns(10);
        ctx.virtual_step(10);
        assert_eq!(bh_ran.get(), 1);
    }
}
