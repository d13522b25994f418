//! Client masks: disabled client types are not dispatched, leave the kernel
//! interest set (no spinning on a ready fd), nest, and come back.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{AioContext, ClientMask, ClientType, ClockType, EventNotifier, FdHandler};
use util::{ctx, Counter};

/// A notifier with a counting, clearing handler of `client`.
fn source(ctx: &AioContext, client: ClientType) -> (Arc<EventNotifier>, Counter) {
    let n = Arc::new(EventNotifier::new().unwrap());
    let c = Counter::new();
    let (n2, c2) = (n.clone(), c.clone());
    ctx.set_event_notifier(
        &n,
        Some(FdHandler::new(client).on_read(move |_| {
            n2.test_and_clear().unwrap();
            c2.inc();
        })),
    )
    .unwrap();
    (n, c)
}

/// Blocks in the loop until a realtime timer `ns` from now fires.
fn wait_ns(ctx: &AioContext, ns: i64) {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let t = ctx.timer_new(ClockType::Realtime, move |_| {
        f.store(true, Ordering::SeqCst)
    });
    t.mod_in_ns(ns);
    ctx.poll_while(|| !fired.load(Ordering::SeqCst));
}

on_all_backends! {
    fn disabled_client_is_not_dispatched_and_does_not_spin(b: Backend) {
        let ctx = ctx(b);
        let (ext, ext_count) = source(&ctx, ClientType::EXTERNAL);
        let (int, int_count) = source(&ctx, ClientType::INTERNAL);
        let guard = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
        assert!(ctx.is_client_disabled(ClientType::EXTERNAL));
        ext.set().unwrap();
        int.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!((ext_count.get(), int_count.get()), (0, 1), "internal still runs");
        // The external fd stays readable; a blocking wait must sleep, not spin.
        let before = ctx.stats().iterations;
        wait_ns(&ctx, 2_000_000);
        assert!(ctx.stats().iterations - before < 20, "{:?}", ctx.stats());
        assert_eq!(ext_count.get(), 0);
        drop(guard);
        assert!(!ctx.is_client_disabled(ClientType::EXTERNAL));
        assert!(ctx.poll(false));
        assert_eq!(ext_count.get(), 1, "dispatched once re-enabled");
        ctx.set_event_notifier(&ext, None).unwrap();
        ctx.set_event_notifier(&int, None).unwrap();
    }

    fn guards_nest(b: Backend) {
        // test-aio.c's /aio/external-client, with a mask.
        let ctx = ctx(b);
        let (ext, count) = source(&ctx, ClientType::EXTERNAL);
        ext.set().unwrap();
        let g1 = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
        let g2 = ctx.disable_clients(ClientMask::ALL).unwrap();
        assert!(!ctx.poll(false));
        drop(g1);
        assert!(!ctx.poll(false), "still disabled by the second guard");
        assert_eq!(count.get(), 0);
        drop(g2);
        assert!(ctx.poll(false));
        assert_eq!(count.get(), 1);
        ctx.set_event_notifier(&ext, None).unwrap();
    }

    fn handler_registered_while_disabled_waits_for_enable(b: Backend) {
        let ctx = ctx(b);
        let guard = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
        let (ext, count) = source(&ctx, ClientType::EXTERNAL);
        ext.set().unwrap();
        assert!(!ctx.poll(false));
        // Removing and re-adding while disabled is fine too.
        ctx.set_event_notifier(&ext, None).unwrap();
        let (ext2, count2) = source(&ctx, ClientType::EXTERNAL);
        ext2.set().unwrap();
        drop(guard);
        assert!(ctx.poll(false));
        assert_eq!((count.get(), count2.get()), (0, 1));
        ctx.set_event_notifier(&ext2, None).unwrap();
    }

    fn custom_client_types_are_independent(b: Backend) {
        let ctx = ctx(b);
        let export = ClientType::custom(2).unwrap();
        let guest = ClientType::custom(3).unwrap();
        let (e, ec) = source(&ctx, export);
        let (g, gc) = (source(&ctx, guest).0, Counter::new());
        let _ = gc;
        let guard = ctx.disable_clients(export.mask()).unwrap();
        e.set().unwrap();
        g.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!(ec.get(), 0);
        drop(guard);
        assert!(ctx.poll(false));
        assert_eq!(ec.get(), 1);
        ctx.set_event_notifier(&e, None).unwrap();
        ctx.set_event_notifier(&g, None).unwrap();
    }

    fn nested_poll_inside_a_drain_lets_no_external_request_in(b: Backend) {
        // The pattern the masks exist for: a block-layer callback disables
        // external clients, then waits in a nested poll for its own
        // (internal) completion. A guest request arriving meanwhile waits.
        let ctx = ctx(b);
        let (guest, guest_count) = source(&ctx, ClientType::EXTERNAL);
        let (done, done_count) = source(&ctx, ClientType::INTERNAL);
        let seen_during_drain = Arc::new(AtomicBool::new(false));
        let (g2, d2, gc, dc, seen) = (guest.clone(), done.clone(), guest_count.clone(), done_count.clone(), seen_during_drain.clone());
        let bh = ctx.bh_new(move |ctx: &AioContext| {
            let _drained = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
            g2.set().unwrap(); // a new guest request arrives
            let d3 = d2.clone();
            std::thread::spawn(move || d3.set().unwrap()); // completion
            ctx.poll_while(|| dc.get() == 0);
            seen.store(gc.get() > 0, Ordering::SeqCst);
        });
        bh.schedule();
        ctx.poll(false);
        assert!(!seen_during_drain.load(Ordering::SeqCst), "external request ran inside the drain");
        assert!(ctx.poll(false));
        assert_eq!(guest_count.get(), 1, "and runs once the drain ends");
        ctx.set_event_notifier(&guest, None).unwrap();
        ctx.set_event_notifier(&done, None).unwrap();
    }

    fn guard_dropped_on_another_thread_reenables_on_home(b: Backend) {
        let ctx = ctx(b);
        let (ext, count) = source(&ctx, ClientType::EXTERNAL);
        let guard = ctx.disable_clients(ClientType::EXTERNAL.mask()).unwrap();
        ext.set().unwrap();
        std::thread::spawn(move || drop(guard)).join().unwrap();
        ctx.poll_while(|| count.get() == 0);
        assert!(!ctx.is_client_disabled(ClientType::EXTERNAL));
        ctx.set_event_notifier(&ext, None).unwrap();
    }
}
