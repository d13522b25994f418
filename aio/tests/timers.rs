//! Timers on the three clocks: order, re-arming, deletion, the virtual
//! clock's stepping, and nanosecond deadlines on the real clock.

mod util;

use std::sync::{Arc, Mutex};

use aio::{AioContext, ClockType, ContextOptions, Timer, VirtualClock};
use util::{ctx, Counter};

type Log = Arc<Mutex<Vec<(u32, i64)>>>;

/// A virtual-clock timer that logs (tag, virtual time when it fired).
fn logging_timer(ctx: &AioContext, log: &Log, tag: u32) -> Timer {
    let log = log.clone();
    ctx.timer_new(ClockType::Virtual, move |ctx: &AioContext| {
        log.lock()
            .unwrap()
            .push((tag, ctx.clock_now(ClockType::Virtual)));
    })
}

on_all_backends! {
    fn virtual_timers_fire_in_deadline_order_at_their_deadlines(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let timers: Vec<Timer> = (0..4).map(|i| logging_timer(&ctx, &log, i)).collect();
        timers[0].mod_ns(400);
        timers[1].mod_ns(100);
        timers[2].mod_ns(300);
        timers[3].mod_ns(200);
        assert_eq!(ctx.timer_deadline_ns(ClockType::Virtual), Some(100));
        assert!(!ctx.poll(false), "virtual time does not pass by itself");
        assert_eq!(ctx.virtual_step(1000), 1000);
        assert_eq!(*log.lock().unwrap(), vec![(1, 100), (3, 200), (2, 300), (0, 400)]);
        assert_eq!(ctx.timer_deadline_ns(ClockType::Virtual), None);
    }

    fn equal_deadlines_fire_in_creation_order(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let timers: Vec<Timer> = (0..5).map(|i| logging_timer(&ctx, &log, i)).collect();
        // Armed in reverse creation order.
        for t in timers.iter().rev() {
            t.mod_ns(50);
        }
        ctx.virtual_step(50);
        let tags: Vec<u32> = log.lock().unwrap().iter().map(|e| e.0).collect();
        assert_eq!(tags, vec![0, 1, 2, 3, 4]);
    }

    fn step_stops_short_of_later_deadlines(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let t = logging_timer(&ctx, &log, 7);
        t.mod_ns(1_000);
        ctx.virtual_step(999);
        assert!(log.lock().unwrap().is_empty());
        assert!(t.is_pending());
        assert_eq!(t.expire_time_ns(), Some(1_000));
        ctx.virtual_step(1);
        assert_eq!(*log.lock().unwrap(), vec![(7, 1_000)]);
        assert!(!t.is_pending());
    }

    fn step_next_jumps_to_the_earliest_deadline(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let t1 = logging_timer(&ctx, &log, 1);
        let t2 = logging_timer(&ctx, &log, 2);
        t1.mod_ns(5_000);
        t2.mod_ns(7_000);
        assert_eq!(ctx.virtual_step_next(), Some(5_000));
        assert_eq!(ctx.virtual_step_next(), Some(7_000));
        assert_eq!(ctx.virtual_step_next(), None, "nothing armed: the clock stays");
        assert_eq!(ctx.clock_now(ClockType::Virtual), 7_000);
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    fn periodic_timer_rearmed_from_its_callback(b: Backend) {
        let ctx = ctx(b);
        let fired: Arc<Mutex<Vec<i64>>> = Arc::default();
        let slot: Arc<Mutex<Option<Timer>>> = Arc::default();
        let (f, s) = (fired.clone(), slot.clone());
        let t = ctx.timer_new(ClockType::Virtual, move |ctx: &AioContext| {
            let now = ctx.clock_now(ClockType::Virtual);
            f.lock().unwrap().push(now);
            if let Some(t) = &*s.lock().unwrap() {
                t.mod_ns(now + 250);
            }
        });
        t.mod_ns(250);
        *slot.lock().unwrap() = Some(t);
        ctx.virtual_step(1_000);
        assert_eq!(*fired.lock().unwrap(), vec![250, 500, 750, 1_000]);
        slot.lock().unwrap().take();
    }

    fn del_and_drop_prevent_firing(b: Backend) {
        let ctx = ctx(b);
        let log: Log = Arc::default();
        let t1 = logging_timer(&ctx, &log, 1);
        let t2 = logging_timer(&ctx, &log, 2);
        t1.mod_ns(10);
        t2.mod_ns(10);
        t1.del();
        drop(t2);
        ctx.virtual_step(100);
        assert!(log.lock().unwrap().is_empty());
        assert!(!ctx.poll(false));
    }

    fn past_deadline_fires_on_next_poll(b: Backend) {
        let ctx = ctx(b);
        ctx.virtual_step(1_000);
        let n = Counter::new();
        let c = n.clone();
        let t = ctx.timer_new(ClockType::Virtual, move |_| c.inc());
        t.mod_ns(10);
        assert_eq!(ctx.timer_deadline_ns(ClockType::Virtual), Some(0));
        assert!(ctx.poll(true), "a due timer makes a blocking poll return at once");
        assert_eq!(n.get(), 1);
    }

    fn timer_rearmed_in_the_past_runs_once_per_poll(b: Backend) {
        // A timer that always re-arms itself already due must not loop
        // forever inside one poll.
        let ctx = ctx(b);
        let n = Counter::new();
        let slot: Arc<Mutex<Option<Timer>>> = Arc::default();
        let (c, s) = (n.clone(), slot.clone());
        let t = ctx.timer_new(ClockType::Virtual, move |_| {
            c.inc();
            if let Some(t) = &*s.lock().unwrap() {
                t.mod_ns(0);
            }
        });
        t.mod_ns(0);
        *slot.lock().unwrap() = Some(t);
        for i in 1..=3 {
            assert!(ctx.poll(false));
            assert_eq!(n.get(), i);
        }
        slot.lock().unwrap().take();
    }

    fn realtime_timer_blocks_then_fires_never_early(b: Backend) {
        let ctx = ctx(b);
        let fired_at = Arc::new(Mutex::new(None));
        let f = fired_at.clone();
        let t = ctx.timer_new(ClockType::Realtime, move |_| {
            *f.lock().unwrap() = Some(aio::monotonic_ns());
        });
        // 20 ms: long enough that a loop that spins (or whose wait ends
        // early) makes many iterations before the deadline even on a loaded
        // machine, where a loop that sleeps in the kernel makes one.
        let deadline = aio::monotonic_ns() + 20_000_000;
        t.mod_ns(deadline);
        let before = ctx.stats();
        // Iterations that began before the deadline: the first one, plus
        // one per spurious wake-up. Counted from the clock, not from how
        // many iterations the (possibly descheduled) thread got through.
        let mut early = 0u32;
        ctx.poll_while(|| {
            if fired_at.lock().unwrap().is_some() {
                return false;
            }
            if aio::monotonic_ns() < deadline {
                early += 1;
            }
            true
        });
        let at = fired_at.lock().unwrap().unwrap();
        assert!(at >= deadline, "fired {} ns early", deadline - at);
        let after = ctx.stats();
        assert!(
            after.blocking_waits > before.blocking_waits,
            "the loop slept rather than spun"
        );
        // The loop slept in the kernel until the deadline: a handful of
        // iterations before it at most (spurious wake-ups are allowed,
        // spinning or waking early is not).
        assert!(
            early <= 5,
            "{early} iterations began before the deadline: {before:?} -> {after:?}"
        );
    }

    fn host_clock_timer_fires(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let t = ctx.timer_new(ClockType::Host, move |_| c.inc());
        t.mod_in_ns(100_000);
        ctx.poll_while(|| n.get() == 0);
        assert!(ctx.timer_deadline_ns(ClockType::Host).is_none());
    }

    fn timer_armed_from_another_thread_wakes_the_loop(b: Backend) {
        let ctx = ctx(b);
        let n = Counter::new();
        let c = n.clone();
        let t = Arc::new(ctx.timer_new(ClockType::Realtime, move |_| c.inc()));
        let remote = t.clone();
        let th = std::thread::spawn(move || remote.mod_in_ns(0));
        ctx.poll_while(|| n.get() == 0);
        th.join().unwrap();
    }
}

#[test]
fn contexts_sharing_a_virtual_clock_see_the_same_time() {
    let clock = VirtualClock::new();
    let a = AioContext::with_options(ContextOptions::new().virtual_clock(clock.clone())).unwrap();
    let b = AioContext::with_options(ContextOptions::new().virtual_clock(clock.clone())).unwrap();
    let log: Log = Arc::default();
    let ta = logging_timer(&a, &log, 1);
    let tb = logging_timer(&b, &log, 2);
    ta.mod_ns(100);
    tb.mod_ns(100);
    a.virtual_step(150);
    assert_eq!(b.clock_now(ClockType::Virtual), 150);
    // a stepped through its own deadline; b's timer is due on the shared
    // clock and b runs it on its own poll, at the time b sees.
    assert_eq!(*log.lock().unwrap(), vec![(1, 100)]);
    assert!(b.poll(true));
    assert_eq!(*log.lock().unwrap(), vec![(1, 100), (2, 150)]);
    assert!(a.virtual_clock().same_clock(b.virtual_clock()));
}

#[test]
fn virtual_clock_never_goes_backwards() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(ctx.virtual_set(500), 500);
    assert_eq!(ctx.virtual_set(100), 500);
    assert_eq!(ctx.virtual_clock().advance_to(10), 500);
}

#[test]
fn creating_a_context_sets_one_ns_timer_slack() {
    std::thread::spawn(|| {
        let _ctx = AioContext::new().unwrap();
        assert_eq!(aio::timer_slack_ns().unwrap(), 1);
    })
    .join()
    .unwrap();
}

#[test]
fn timer_outliving_its_context_is_harmless() {
    let ctx = AioContext::new().unwrap();
    let t = ctx.timer_new(ClockType::Realtime, |_| panic!("must not run"));
    drop(ctx);
    t.mod_in_ns(1);
    assert!(!t.is_pending());
    t.del();
}
