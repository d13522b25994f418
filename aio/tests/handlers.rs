//! fd handlers and event notifiers, after test-aio.c's `/aio/event/*`, plus
//! removal and replacement from inside callbacks.

mod util;

use std::sync::{Arc, Mutex};

use aio::{AioContext, ClientType, Error, EventNotifier, FdHandler};
use util::{ctx, drain, poke, socketpair, Counter};

fn notifier() -> Arc<EventNotifier> {
    Arc::new(EventNotifier::new().unwrap())
}

/// A read handler that clears `n` and counts.
fn clearing(n: &Arc<EventNotifier>, count: &Counter) -> FdHandler {
    let (n, c) = (n.clone(), count.clone());
    FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
        n.test_and_clear().unwrap();
        c.inc();
    })
}

on_all_backends! {
    fn add_remove_is_not_progress(b: Backend) {
        let ctx = ctx(b);
        let n = notifier();
        let count = Counter::new();
        ctx.set_event_notifier(&n, Some(clearing(&n, &count))).unwrap();
        assert!(!ctx.poll(false));
        ctx.set_event_notifier(&n, None).unwrap();
        assert!(!ctx.poll(false));
        assert_eq!(ctx.handler_count(), 0);
        // Removing what is not registered is fine.
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn set_dispatches_once(b: Backend) {
        let ctx = ctx(b);
        let n = notifier();
        let count = Counter::new();
        ctx.set_event_notifier(&n, Some(clearing(&n, &count))).unwrap();
        n.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!(count.get(), 1);
        assert!(!ctx.poll(false), "no spurious re-dispatch");
        assert_eq!(count.get(), 1);
        n.set().unwrap();
        assert!(ctx.poll(true));
        assert_eq!(count.get(), 2);
        ctx.set_event_notifier(&n, None).unwrap();
        n.set().unwrap();
        assert!(!ctx.poll(false), "removed handler is not dispatched");
        assert_eq!(count.get(), 2);
    }

    fn level_triggered_until_drained(b: Backend) {
        let ctx = ctx(b);
        let n = notifier();
        let count = Counter::new();
        let c = count.clone();
        // Does not clear: the fd stays readable.
        ctx.set_event_notifier(&n, Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| c.inc())))
            .unwrap();
        n.set().unwrap();
        for i in 1..=3 {
            assert!(ctx.poll(false));
            assert_eq!(count.get(), i);
        }
        n.test_and_clear().unwrap();
        assert!(!ctx.poll(false));
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn handler_rearms_its_own_notifier(b: Backend) {
        // /aio/event/flush: the handler sets its notifier again 10 times; a
        // loop of blocking polls runs until it stops.
        let ctx = ctx(b);
        let n = notifier();
        let count = Counter::new();
        let (n2, c) = (n.clone(), count.clone());
        ctx.set_event_notifier(
            &n,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                n2.test_and_clear().unwrap();
                c.inc();
                if c.get() < 10 {
                    n2.set().unwrap();
                }
            })),
        )
        .unwrap();
        n.set().unwrap();
        ctx.poll_while(|| count.get() < 10);
        assert_eq!(count.get(), 10);
        assert!(!ctx.poll(false));
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn set_from_another_thread_wakes_blocking_poll(b: Backend) {
        let ctx = ctx(b);
        let n = notifier();
        let count = Counter::new();
        ctx.set_event_notifier(&n, Some(clearing(&n, &count))).unwrap();
        let remote = n.clone();
        let t = std::thread::spawn(move || remote.set().unwrap());
        while count.get() == 0 {
            ctx.poll(true);
        }
        t.join().unwrap();
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn two_notifiers_one_active(b: Backend) {
        // /aio/event/wait/no-flush-cb: an inactive notifier next to an
        // active one neither blocks the loop nor gets dispatched.
        let ctx = ctx(b);
        let (a, z) = (notifier(), notifier());
        let (ca, cz) = (Counter::new(), Counter::new());
        ctx.set_event_notifier(&a, Some(clearing(&a, &ca))).unwrap();
        ctx.set_event_notifier(&z, Some(clearing(&z, &cz))).unwrap();
        a.set().unwrap();
        assert!(ctx.poll(true));
        assert_eq!((ca.get(), cz.get()), (1, 0));
        ctx.set_event_notifier(&a, None).unwrap();
        ctx.set_event_notifier(&z, None).unwrap();
    }

    fn write_callback_on_writable_socket(b: Backend) {
        let ctx = ctx(b);
        let (s, _peer) = socketpair();
        let writes = Counter::new();
        let (c, s2) = (writes.clone(), s.clone());
        ctx.set_fd_handler(
            util::raw(&*s),
            Some(FdHandler::new(ClientType::INTERNAL).on_write(move |ctx: &AioContext| {
                c.inc();
                // One write is enough: stop watching for writability.
                ctx.set_fd_handler(util::raw(&*s2), None).unwrap();
            })),
        )
        .unwrap();
        assert!(ctx.poll(true));
        assert_eq!(writes.get(), 1);
        assert!(!ctx.poll(false));
    }

    fn hangup_runs_the_read_callback(b: Backend) {
        let ctx = ctx(b);
        let (s, peer) = socketpair();
        let reads = Counter::new();
        let (c, s2) = (reads.clone(), s.clone());
        ctx.set_fd_handler(
            util::raw(&*s),
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |ctx: &AioContext| {
                c.inc();
                assert_eq!(drain(&s2), 0, "EOF");
                ctx.set_fd_handler(util::raw(&*s2), None).unwrap();
            })),
        )
        .unwrap();
        drop(peer);
        assert!(ctx.poll(true));
        assert_eq!(reads.get(), 1);
    }

    fn remove_other_handler_during_dispatch(b: Backend) {
        // Both fds are ready in the same wait; whichever runs first removes
        // the other, which then must not run.
        let ctx = ctx(b);
        let (x, z) = (notifier(), notifier());
        let ran: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let mk = |me: &Arc<EventNotifier>, other: &Arc<EventNotifier>, name: &'static str| {
            let (me, other, ran) = (me.clone(), other.clone(), ran.clone());
            FdHandler::new(ClientType::INTERNAL).on_read(move |ctx: &AioContext| {
                me.test_and_clear().unwrap();
                ran.lock().unwrap().push(name);
                ctx.set_event_notifier(&other, None).unwrap();
            })
        };
        ctx.set_event_notifier(&x, Some(mk(&x, &z, "x"))).unwrap();
        ctx.set_event_notifier(&z, Some(mk(&z, &x, "z"))).unwrap();
        x.set().unwrap();
        z.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!(ran.lock().unwrap().len(), 1, "the removed handler never ran");
        assert_eq!(ctx.handler_count(), 1);
        // Drain whatever is left so the survivor's fd does not stay ready.
        while ctx.poll(false) {}
        let total = ran.lock().unwrap().len();
        assert!(total <= 2);
    }

    fn remove_self_skips_own_write_callback(b: Backend) {
        let ctx = ctx(b);
        let (s, peer) = socketpair();
        poke(&peer); // readable and writable at once
        let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (l1, l2, s2) = (log.clone(), log.clone(), s.clone());
        ctx.set_fd_handler(
            util::raw(&*s),
            Some(
                FdHandler::new(ClientType::INTERNAL)
                    .on_read(move |ctx: &AioContext| {
                        l1.lock().unwrap().push("read");
                        ctx.set_fd_handler(util::raw(&*s2), None).unwrap();
                    })
                    .on_write(move |_| l2.lock().unwrap().push("write")),
            ),
        )
        .unwrap();
        assert!(ctx.poll(false));
        assert_eq!(*log.lock().unwrap(), vec!["read"]);
        assert!(!ctx.poll(false));
    }

    fn replace_self_from_callback(b: Backend) {
        let ctx = ctx(b);
        let n = notifier();
        let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (n2, l) = (n.clone(), log.clone());
        ctx.set_event_notifier(
            &n,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |ctx: &AioContext| {
                n2.test_and_clear().unwrap();
                l.lock().unwrap().push("old");
                let (n3, l3) = (n2.clone(), l.clone());
                ctx.set_event_notifier(
                    &n2,
                    Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                        n3.test_and_clear().unwrap();
                        l3.lock().unwrap().push("new");
                    })),
                )
                .unwrap();
            })),
        )
        .unwrap();
        n.set().unwrap();
        assert!(ctx.poll(false));
        n.set().unwrap();
        assert!(ctx.poll(false));
        n.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!(*log.lock().unwrap(), vec!["old", "new", "new"]);
        assert_eq!(ctx.handler_count(), 1);
        ctx.set_event_notifier(&n, None).unwrap();
    }

    fn dropped_callback_state_is_released(b: Backend) {
        // A handler's closure is dropped when the handler is removed, even
        // when removal happens from inside that closure.
        let ctx = ctx(b);
        let n = notifier();
        let token = Arc::new(());
        let (t, n2) = (token.clone(), n.clone());
        ctx.set_event_notifier(
            &n,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |ctx: &AioContext| {
                let _keep = &t;
                n2.test_and_clear().unwrap();
                ctx.set_event_notifier(&n2, None).unwrap();
            })),
        )
        .unwrap();
        assert_eq!(Arc::strong_count(&token), 2);
        n.set().unwrap();
        assert!(ctx.poll(false));
        assert_eq!(Arc::strong_count(&token), 1, "closure dropped after removal");
    }

    fn handler_changes_off_home_thread_are_refused(b: Backend) {
        let ctx = ctx(b);
        let n = notifier();
        let remote = ctx.clone();
        let n2 = n.clone();
        let err = std::thread::spawn(move || {
            remote.set_event_notifier(&n2, Some(FdHandler::new(ClientType::INTERNAL).on_read(|_| {})))
        })
        .join()
        .unwrap()
        .unwrap_err();
        assert!(matches!(err, Error::NotHomeThread { op: "set_fd_handler" }), "{err}");
        assert_eq!(ctx.handler_count(), 0);
    }
}

#[test]
fn epoll_refuses_a_regular_file_with_a_clear_error() {
    let ctx = ctx(aio::Backend::Epoll);
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    let err = ctx
        .set_fd_handler(
            util::raw(&f),
            Some(FdHandler::new(ClientType::INTERNAL).on_read(|_| {})),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("registering fd") && msg.contains("epoll"),
        "{msg}"
    );
    assert_eq!(ctx.handler_count(), 0);
    // The context still works.
    let n = EventNotifier::new().unwrap();
    n.set().unwrap();
    let count = Counter::new();
    let c = count.clone();
    ctx.set_event_notifier(
        &n,
        Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| c.inc())),
    )
    .unwrap();
    assert!(ctx.poll(false));
    assert_eq!(count.get(), 1);
}
