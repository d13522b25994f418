//! Child contexts (a main loop's "iohandler" context) and outermost-only
//! client types: run by the outermost poll, never by nested ones.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{AioContext, Backend, ClientType, ClockType, ContextOptions, EventNotifier, FdHandler};
use util::Counter;

fn pair(parent: Backend, child: Backend) -> (AioContext, AioContext) {
    let p = AioContext::with_options(ContextOptions::new().backend(parent).name("main")).unwrap();
    let c =
        AioContext::with_options(ContextOptions::new().backend(child).name("iohandler")).unwrap();
    p.attach_child(&c).unwrap();
    (p, c)
}

fn counting_notifier(ctx: &AioContext, client: ClientType) -> (Arc<EventNotifier>, Counter) {
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

/// Blocks in `ctx`'s loop until a realtime timer `ns` from now fires.
fn wait_ns(ctx: &AioContext, ns: i64) {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let t = ctx.timer_new(ClockType::Realtime, move |_| {
        f.store(true, Ordering::SeqCst)
    });
    t.mod_in_ns(ns);
    ctx.poll_while(|| !fired.load(Ordering::SeqCst));
}

macro_rules! parent_backends {
    ($($name:ident),*) => {$(
        mod $name {
            use super::*;
            #[test] fn epoll() { run(Backend::Epoll, Backend::Epoll) }
            #[test] fn io_uring_parent() { run(Backend::IoUring, Backend::Epoll) }
            #[test] fn io_uring_child() { run(Backend::Epoll, Backend::IoUring) }
            #[test] fn ppoll_parent() { run(Backend::Ppoll, Backend::Epoll) }
            fn run(p: Backend, c: Backend) { super::$name(p, c) }
        }
    )*};
}

parent_backends!(
    child_fd_handler_runs_from_the_parent_loop,
    child_bh_from_another_thread_wakes_the_parent,
    child_timer_and_task_run_from_the_parent_loop,
    nested_parent_poll_never_runs_the_child
);

fn child_fd_handler_runs_from_the_parent_loop(p: Backend, c: Backend) {
    let (parent, child) = pair(p, c);
    let (n, count) = counting_notifier(&child, ClientType::INTERNAL);
    let remote = n.clone();
    let t = std::thread::spawn(move || remote.set().unwrap());
    parent.poll_while(|| count.get() == 0);
    t.join().unwrap();
    child.set_event_notifier(&n, None).unwrap();
}

fn child_bh_from_another_thread_wakes_the_parent(p: Backend, c: Backend) {
    let (parent, child) = pair(p, c);
    let count = Counter::new();
    let c2 = count.clone();
    let remote = child.clone();
    let t = std::thread::spawn(move || remote.bh_schedule_oneshot(move |_| c2.inc()));
    parent.poll_while(|| count.get() == 0);
    t.join().unwrap();
}

fn child_timer_and_task_run_from_the_parent_loop(p: Backend, c: Backend) {
    let (parent, child) = pair(p, c);
    let h = child.spawn(async {
        aio::sleep_ns(ClockType::Realtime, 200_000).await;
        aio::AioContext::current().map(|c| c.name().to_string())
    });
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let watcher = parent.spawn(async move {
        let name = h.await.unwrap();
        d.store(true, Ordering::SeqCst);
        name
    });
    parent.poll_while(|| !done.load(Ordering::SeqCst));
    assert_eq!(
        parent.block_on(watcher).unwrap().as_deref(),
        Some("iohandler")
    );
}

fn nested_parent_poll_never_runs_the_child(p: Backend, c: Backend) {
    let (parent, child) = pair(p, c);
    let (n, count) = counting_notifier(&child, ClientType::INTERNAL);
    let bh_count = Counter::new();
    let spun = Arc::new(AtomicBool::new(false));
    let (n2, cnt, bc, sp) = (n.clone(), count.clone(), bh_count.clone(), spun.clone());
    let remote_child = child.clone();
    let outer = parent.bh_new(move |parent: &AioContext| {
        // While the parent is nested (e.g. a drain), the child gets an fd
        // event and a bottom half; neither may run, and the nested loop
        // must sleep rather than spin on the child's readable fd.
        n2.set().unwrap();
        let c = bc.clone();
        remote_child.bh_schedule_oneshot(move |_| c.inc());
        let before = parent.stats().iterations;
        wait_ns(parent, 2_000_000);
        sp.store(parent.stats().iterations - before > 20, Ordering::SeqCst);
        assert_eq!(cnt.get(), 0, "child fd handler ran inside a nested poll");
        assert_eq!(bc.get(), 0, "child bottom half ran inside a nested poll");
    });
    outer.schedule();
    parent.poll(false);
    assert!(!spun.load(Ordering::SeqCst), "nested poll spun");
    parent.poll_while(|| count.get() == 0 || bh_count.get() == 0);
    child.set_event_notifier(&n, None).unwrap();
}

#[test]
fn outermost_only_client_on_one_context() {
    let ctx = AioContext::new().unwrap();
    let monitor = ClientType::custom(5).unwrap();
    ctx.set_outermost_only(monitor.mask()).unwrap();
    let (n, count) = counting_notifier(&ctx, monitor);
    let n2 = n.clone();
    let c2 = count.clone();
    let bh = ctx.bh_new(move |ctx: &AioContext| {
        n2.set().unwrap();
        assert_eq!(ctx.poll_depth(), 1);
        ctx.poll(false);
        ctx.poll(false);
        assert_eq!(c2.get(), 0, "outermost-only client ran in a nested poll");
    });
    bh.schedule();
    ctx.poll(false);
    assert_eq!(ctx.poll_depth(), 0);
    assert!(ctx.poll(false));
    assert_eq!(count.get(), 1);
    ctx.set_event_notifier(&n, None).unwrap();
}

#[test]
fn ppoll_child_is_refused_with_a_clear_error() {
    let parent = AioContext::new().unwrap();
    let child = AioContext::with_options(ContextOptions::new().backend(Backend::Ppoll)).unwrap();
    let err = parent.attach_child(&child).unwrap_err();
    assert!(err.to_string().contains("pollable fd"), "{err}");
}
