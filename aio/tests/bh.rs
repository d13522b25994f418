//! Bottom halves, after QEMU's tests/unit/test-aio.c `/aio/bh/*`, plus the
//! guarantees QEMU does not give (FIFO order, nested batches).

mod util;

use std::sync::{Arc, Mutex};

use aio::{AioContext, Bh};
use util::{ctx, Counter};

on_all_backends! {
    fn schedule_runs_once_then_no_progress(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = ctx.bh_new(move |_| c.inc());
        assert!(!ctx.poll(false), "nothing scheduled yet");
        bh.schedule();
        assert!(bh.is_scheduled());
        assert_eq!(n.get(), 0, "scheduling does not run it");
        assert!(ctx.poll(true));
        assert_eq!(n.get(), 1);
        assert!(!bh.is_scheduled());
        assert!(!ctx.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn double_schedule_runs_once(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = ctx.bh_new(move |_| c.inc());
        bh.schedule();
        bh.schedule();
        bh.schedule();
        assert!(ctx.poll(false));
        assert!(!ctx.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn self_rescheduling_runs_once_per_poll(b: Backend) {
        // /aio/bh/schedule10: a BH that reschedules itself runs on the next
        // iteration, not in a loop inside one poll.
        let ctx = ctx(b);
        let n = Counter::new();
        let slot: Arc<Mutex<Option<Bh>>> = Arc::default();
        let (c, s) = (n.clone(), slot.clone());
        let bh = ctx.bh_new(move |_| {
            c.inc();
            if c.get() < 10 {
                if let Some(bh) = &*s.lock().unwrap() {
                    bh.schedule();
                }
            }
        });
        bh.schedule();
        *slot.lock().unwrap() = Some(bh);
        for i in 1..=10 {
            assert!(ctx.poll(false));
            assert_eq!(n.get(), i, "exactly one run per poll");
        }
        assert!(!ctx.poll(false));
        assert_eq!(n.get(), 10);
        slot.lock().unwrap().take();
    }

    fn cancel_prevents_the_run(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = ctx.bh_new(move |_| c.inc());
        bh.schedule();
        bh.cancel();
        assert!(!bh.is_scheduled());
        assert!(!ctx.poll(false));
        assert_eq!(n.get(), 0);
        // Rescheduling after a cancel works.
        bh.schedule();
        assert!(ctx.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn drop_deletes_a_scheduled_bh(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = ctx.bh_new(move |_| c.inc());
        bh.schedule();
        drop(bh);
        assert!(!ctx.poll(false));
        assert_eq!(n.get(), 0);
    }

    fn delete_from_own_callback(b: Backend) {
        // /aio/bh/callback-delete/one
        let ctx = ctx(b);
        let n = Counter::new();
        let slot: Arc<Mutex<Option<Bh>>> = Arc::default();
        let (c, s) = (n.clone(), slot.clone());
        let bh = ctx.bh_new(move |_| {
            c.inc();
            s.lock().unwrap().take(); // drops the Bh (and this closure's box)
        });
        bh.schedule();
        *slot.lock().unwrap() = Some(bh);
        assert!(ctx.poll(false));
        assert_eq!(n.get(), 1);
        assert!(slot.lock().unwrap().is_none());
        assert!(!ctx.poll(false));
    }

    fn delete_many_with_different_lifetimes(b: Backend) {
        // /aio/bh/callback-delete/many: bh[i] deletes bh[i+1] when it runs.
        let ctx = ctx(b);
        let n = Counter::new();
        let slots: Arc<Mutex<Vec<Option<Bh>>>> = Arc::default();
        for i in 0..6 {
            let (c, s) = (n.clone(), slots.clone());
            let bh = ctx.bh_new(move |_| {
                c.inc();
                if i % 2 == 0 {
                    if let Some(next) = s.lock().unwrap().get_mut(i + 1) {
                        next.take();
                    }
                }
            });
            bh.schedule();
            slots.lock().unwrap().push(Some(bh));
        }
        assert!(ctx.poll(false));
        assert_eq!(n.get(), 3, "even BHs ran and deleted the odd ones");
        assert!(!ctx.poll(false));
    }

    fn fifo_order(b: Backend) {
        let ctx = ctx(b);
        let log: Arc<Mutex<Vec<u32>>> = Arc::default();
        let bhs: Vec<Bh> = (0..5)
            .map(|i| {
                let l = log.clone();
                ctx.bh_new(move |_| l.lock().unwrap().push(i))
            })
            .collect();
        for i in [3, 1, 4, 0, 2] {
            bhs[i].schedule();
        }
        assert!(ctx.poll(false));
        assert_eq!(*log.lock().unwrap(), vec![3, 1, 4, 0, 2]);
    }

    fn oneshot_runs_once(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        ctx.bh_schedule_oneshot(move |_| c.inc());
        assert!(ctx.poll(true));
        assert!(!ctx.poll(false));
        assert_eq!(n.get(), 1);
    }

    fn flush_with_blocking_poll(b: Backend) {
        // /aio/bh/flush: a blocking poll runs what is pending, then nothing
        // is left to run.
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = ctx.bh_new(move |_| c.inc());
        bh.schedule();
        assert!(ctx.poll(true));
        assert_eq!(n.get(), 1);
        assert!(!ctx.poll(false));
    }

    fn idle_bh_is_not_progress_and_still_runs(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = ctx.bh_new(move |_| c.inc());
        bh.schedule_idle();
        // With only idle work, a blocking poll waits at most 10 ms, then
        // runs it without reporting progress.
        assert!(!ctx.poll(true));
        assert_eq!(n.get(), 1);
    }

    fn schedule_from_another_thread_wakes_blocking_poll(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let bh = Arc::new(ctx.bh_new(move |_| c.inc()));
        let remote = bh.clone();
        let t = std::thread::spawn(move || remote.schedule());
        ctx.poll_while(|| n.get() == 0);
        t.join().unwrap();
        assert_eq!(n.get(), 1);
    }

    fn many_threads_schedule_concurrently(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let total = 4 * 500;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let ctx = ctx.clone();
                let n = n.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let c = n.clone();
                        ctx.bh_schedule_oneshot(move |_| c.inc());
                    }
                })
            })
            .collect();
        ctx.poll_while(|| n.get() < total);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(n.get(), total);
    }

    fn nested_poll_finishes_outer_batch_first(b: Backend) {
        let ctx = ctx(b);
        let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let l = log.clone();
        let a = ctx.bh_new(move |ctx: &AioContext| {
            l.lock().unwrap().push("a-start");
            // The nested poll runs B and C, which were scheduled in the same
            // batch as A, before anything scheduled later.
            ctx.poll(false);
            l.lock().unwrap().push("a-end");
        });
        let l = log.clone();
        let bb = ctx.bh_new(move |_| l.lock().unwrap().push("b"));
        let l = log.clone();
        let c = ctx.bh_new(move |_| l.lock().unwrap().push("c"));
        a.schedule();
        bb.schedule();
        c.schedule();
        assert!(ctx.poll(false));
        assert_eq!(*log.lock().unwrap(), vec!["a-start", "b", "c", "a-end"]);
        assert!(!ctx.poll(false), "nothing left: B and C ran once");
    }

    fn running_bh_rescheduled_in_nested_poll_is_not_reentered(b: Backend) {
        let ctx = ctx(b);
        let depth = Arc::new(Mutex::new((0u32, 0u32))); // (current, max)
        let runs = Counter::new();
        let slot: Arc<Mutex<Option<Bh>>> = Arc::default();
        let (d, r, s) = (depth.clone(), runs.clone(), slot.clone());
        let bh = ctx.bh_new(move |ctx: &AioContext| {
            {
                let mut d = d.lock().unwrap();
                d.0 += 1;
                d.1 = d.1.max(d.0);
            }
            r.inc();
            if r.get() == 1 {
                if let Some(bh) = &*s.lock().unwrap() {
                    bh.schedule();
                }
                // Must not run ourselves again from here.
                ctx.poll(false);
                ctx.poll(false);
            }
            d.lock().unwrap().0 -= 1;
        });
        bh.schedule();
        *slot.lock().unwrap() = Some(bh);
        ctx.poll(false);
        assert_eq!(runs.get(), 1);
        // The deferred run happens on a later iteration.
        ctx.poll(false);
        assert_eq!(runs.get(), 2);
        assert_eq!(depth.lock().unwrap().1, 1, "never re-entered");
        slot.lock().unwrap().take();
    }
}

#[test]
fn bh_outliving_its_context_is_harmless() {
    let ctx = AioContext::new().unwrap();
    let bh = ctx.bh_new(|_| panic!("must not run"));
    drop(ctx);
    bh.schedule();
    bh.cancel();
    drop(bh);
}
