//! Futures on a context: spawn, ordering, wake-ups from other threads,
//! sleeps on the virtual clock, block_on nesting, moving tasks between
//! contexts, cancellation, and the co-operative mutex and queue.

mod util;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;

use aio::{yield_now, AioContext, ClockType, CoMutex, CoQueue, Error};
use util::{ctx, Counter};

/// A one-shot signal another thread can fire: a minimal cross-thread future.
#[derive(Clone, Default)]
struct Signal(Arc<Mutex<(bool, Option<Waker>)>>);

impl Signal {
    fn fire(&self) {
        let w = {
            let mut g = self.0.lock().unwrap();
            g.0 = true;
            g.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl Future for Signal {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.0.lock().unwrap();
        if g.0 {
            Poll::Ready(())
        } else {
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, s: impl Into<String>) {
    log.lock().unwrap().push(s.into());
}

/// Runs an AioContext on its own thread until dropped.
struct LoopThread {
    ctx: AioContext,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    id: ThreadId,
}

impl LoopThread {
    fn spawn(backend: aio::Backend) -> Self {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let ctx = util::ctx(backend);
            tx.send(ctx.clone()).unwrap();
            ctx.poll_while(|| !st.load(Ordering::SeqCst));
            ctx.cancel_tasks();
        });
        let ctx = rx.recv().unwrap();
        let id = thread.thread().id();
        Self {
            ctx,
            stop,
            thread: Some(thread),
            id,
        }
    }
}

impl Drop for LoopThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.ctx.notify();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

on_all_backends! {
    fn spawn_and_block_on(b: Backend) {
        let ctx = ctx(b);
        let h = ctx.spawn(async { 40 + 2 });
        assert_eq!(ctx.task_count(), 1);
        assert_eq!(ctx.block_on(h).unwrap(), 42);
        assert_eq!(ctx.task_count(), 0);
    }

    fn tasks_run_in_spawn_order_and_interleave_at_yields(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let hs: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                let log = log.clone();
                ctx.spawn(async move {
                    for i in 0..3 {
                        push(&log, format!("{name}{i}"));
                        yield_now().await;
                    }
                })
            })
            .collect();
        for h in hs {
            ctx.block_on(h).unwrap();
        }
        assert_eq!(
            log.lock().unwrap().join(" "),
            "a0 b0 c0 a1 b1 c1 a2 b2 c2"
        );
    }

    fn wakes_from_another_thread_run_on_the_home_thread(b: Backend) {
        let ctx = ctx(b);
        let home = std::thread::current().id();
        let signals: Vec<Signal> = (0..3).map(|_| Signal::default()).collect();
        let log: Log = Arc::default();
        let hs: Vec<_> = signals
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (s, log) = (s.clone(), log.clone());
                ctx.spawn(async move {
                    s.await;
                    assert_eq!(std::thread::current().id(), home, "polled on the home thread");
                    push(&log, i.to_string());
                })
            })
            .collect();
        ctx.run_until_idle(); // all three are now waiting
        // Fire in the order 2, 0, 1 from another thread: tasks run in wake order.
        let s = signals.clone();
        std::thread::spawn(move || {
            s[2].fire();
            s[0].fire();
            s[1].fire();
        })
        .join()
        .unwrap();
        for h in hs {
            ctx.block_on(h).unwrap();
        }
        assert_eq!(log.lock().unwrap().join(""), "201");
    }

    fn sleep_on_the_virtual_clock_is_stepped_deterministically(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let l = log.clone();
        let h = ctx.spawn(async move {
            for _ in 0..3 {
                aio::sleep_ns(ClockType::Virtual, 1_000).await;
                let now = AioContext::current().unwrap().clock_now(ClockType::Virtual);
                push(&l, now.to_string());
            }
        });
        ctx.run_until_idle();
        assert!(log.lock().unwrap().is_empty(), "virtual time has not moved");
        ctx.virtual_step(999);
        assert!(log.lock().unwrap().is_empty());
        ctx.virtual_step(1);
        assert_eq!(*log.lock().unwrap(), vec!["1000"]);
        ctx.virtual_step(10_000);
        assert_eq!(*log.lock().unwrap(), vec!["1000", "2000", "3000"]);
        assert!(h.is_finished());
    }

    fn block_on_a_realtime_sleep_sleeps_in_the_kernel(b: Backend) {
        let ctx = ctx(b);
        let start = aio::monotonic_ns();
        ctx.block_on(ctx.sleep_ns(ClockType::Realtime, 2_000_000));
        assert!(aio::monotonic_ns() - start >= 2_000_000);
        assert!(ctx.stats().iterations < 20, "block_on spun: {:?}", ctx.stats());
    }

    fn yield_now_in_block_on_lets_spawned_tasks_run(b: Backend) {
        let ctx = ctx(b);
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let seen = ctx.block_on(async {
            let _h = AioContext::current()
                .unwrap()
                .spawn(async move { r.store(true, Ordering::SeqCst) });
            // One yield is one loop iteration: the task runs in it.
            yield_now().await;
            ran.load(Ordering::SeqCst)
        });
        assert!(seen, "block_on's future yielded without the loop running");
    }

    fn block_on_nested_inside_a_callback(b: Backend) {
        let ctx = ctx(b);
        let sig = Signal::default();
        let s = sig.clone();
        let h = Arc::new(Mutex::new(Some(ctx.spawn(async move {
            s.await;
            7
        }))));
        let got = Arc::new(Mutex::new(None));
        let (h2, g2) = (h.clone(), got.clone());
        let bh = ctx.bh_new(move |ctx: &AioContext| {
            let h = h2.lock().unwrap().take().unwrap();
            // A synchronous wait inside a callback: a nested poll.
            *g2.lock().unwrap() = Some(ctx.block_on(h).unwrap());
        });
        bh.schedule();
        let remote = sig.clone();
        let t = std::thread::spawn(move || remote.fire());
        ctx.poll_while(|| got.lock().unwrap().is_none());
        t.join().unwrap();
        assert_eq!(*got.lock().unwrap(), Some(7));
    }

    fn task_moves_between_contexts_on_two_threads(b: Backend) {
        let ctx = ctx(b);
        let other = LoopThread::spawn(b);
        let (home, other_id) = (std::thread::current().id(), other.id);
        let target = other.ctx.clone();
        let back = ctx.clone();
        let h = ctx.spawn(async move {
            let mut seen = vec![std::thread::current().id()];
            aio::switch_to(&target).await.unwrap();
            seen.push(std::thread::current().id());
            assert!(AioContext::current().unwrap().ptr_eq(&target));
            aio::sleep_ns(ClockType::Realtime, 100_000).await; // a timer on the other context
            seen.push(std::thread::current().id());
            aio::switch_to(&back).await.unwrap();
            seen.push(std::thread::current().id());
            seen
        });
        let seen = ctx.block_on(h).unwrap();
        assert_eq!(seen, vec![home, other_id, other_id, home]);
        assert_eq!(ctx.task_count(), 0);
        assert_eq!(other.ctx.task_count(), 0);
    }

    fn join_handle_awaited_from_another_task(b: Backend) {
        let ctx = ctx(b);
        let inner = ctx.spawn(async {
            yield_now().await;
            "inner"
        });
        let outer = ctx.spawn(async move { format!("{} done", inner.await.unwrap()) });
        assert_eq!(ctx.block_on(outer).unwrap(), "inner done");
    }

    fn panicking_task_reports_an_error_and_the_loop_goes_on(b: Backend) {
        let ctx = ctx(b);
        let h = ctx.spawn(async {
            yield_now().await;
            panic!("boom");
        });
        match ctx.block_on(h) {
            Err(Error::TaskPanicked { message }) => assert_eq!(message, "boom"),
            other => panic!("unexpected: {other:?}"),
        }
        assert_eq!(ctx.block_on(ctx.spawn(async { 1 })).unwrap(), 1);
        assert_eq!(ctx.task_count(), 0);
    }

    fn abort_drops_the_future_without_polling_it_again(b: Backend) {
        let ctx = ctx(b);
        let polls = Counter::new();
        let token = Arc::new(());
        let (p, t) = (polls.clone(), token.clone());
        let h = ctx.spawn(async move {
            let _t = t;
            loop {
                p.inc();
                Signal::default().await; // never fires
            }
        });
        ctx.run_until_idle();
        assert_eq!(polls.get(), 1);
        h.abort();
        ctx.run_until_idle();
        assert_eq!(polls.get(), 1, "not polled after abort");
        assert_eq!(Arc::strong_count(&token), 1, "future dropped");
        assert!(matches!(ctx.block_on(h), Err(Error::TaskCancelled)));
        assert_eq!(ctx.task_count(), 0);
    }

    fn spawn_from_another_thread(b: Backend) {
        let ctx = ctx(b);
        let remote = ctx.clone();
        let h = std::thread::spawn(move || remote.spawn(async { std::thread::current().id() }))
            .join()
            .unwrap();
        assert_eq!(ctx.block_on(h).unwrap(), std::thread::current().id());
    }

    fn co_mutex_is_fifo_and_exclusive(b: Backend) {
        let ctx = ctx(b);
        let m = Arc::new(CoMutex::new(Vec::new()));
        let hs: Vec<_> = (0..5)
            .map(|i| {
                let m = m.clone();
                ctx.spawn(async move {
                    let mut g = m.lock().await;
                    g.push(format!("{i}<"));
                    yield_now().await;
                    yield_now().await;
                    g.push(format!(">{i}"));
                })
            })
            .collect();
        for h in hs {
            ctx.block_on(h).unwrap();
        }
        let g = ctx.block_on(m.lock());
        assert_eq!(g.join(""), "0<>01<>12<>23<>34<>4");
        drop(g);
        assert!(!m.is_locked());
    }

    fn co_queue_notify_one_all_and_wait_unlocking(b: Backend) {
        let ctx = ctx(b);
        let q = Arc::new(CoQueue::new());
        let m = Arc::new(CoMutex::new(0u32));
        let woken = Counter::new();
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (q, m, w) = (q.clone(), m.clone(), woken.clone());
                ctx.spawn(async move {
                    let g = m.lock().await;
                    let mut g = q.wait_unlocking(g).await;
                    *g += 1;
                    w.inc();
                })
            })
            .collect();
        ctx.run_until_idle();
        assert_eq!(woken.get(), 0);
        assert!(!m.is_locked(), "waiters released the mutex");
        assert!(q.notify_one());
        ctx.run_until_idle();
        assert_eq!(woken.get(), 1);
        assert_eq!(q.notify_all(), 2);
        for h in hs {
            ctx.block_on(h).unwrap();
        }
        assert_eq!(*ctx.block_on(m.lock()), 3);
        assert!(!q.notify_one(), "nobody left; notifications are not stored");
    }
}

#[test]
fn dropping_the_context_drops_its_tasks() {
    let token = Arc::new(());
    let waker_slot = Signal::default();
    let h = {
        let ctx = AioContext::new().unwrap();
        let (t, s) = (token.clone(), waker_slot.clone());
        let h = ctx.spawn(async move {
            let _t = t;
            s.await;
            unreachable!("never resumed after its context is gone");
        });
        ctx.run_until_idle();
        assert_eq!(Arc::strong_count(&token), 2);
        h
    };
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "future dropped with the context"
    );
    // A late wake-up polls nothing.
    waker_slot.fire();
    let other = AioContext::new().unwrap();
    assert!(matches!(other.block_on(h), Err(Error::TaskCancelled)));
}

#[test]
fn switch_to_outside_a_task_is_an_error() {
    let ctx = AioContext::new().unwrap();
    let other = AioContext::new().unwrap();
    assert!(matches!(
        ctx.block_on(aio::switch_to(&other)),
        Err(Error::NotInTask)
    ));
}
