//! Cross-thread `notify` and its syscall elision, counted with `stats()`.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use util::ctx;

on_all_backends! {
    fn notify_wakes_a_blocking_poll_without_progress(b: Backend) {
        let ctx = ctx(b);
        let remote = ctx.clone();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        // Keep notifying until the poller has returned: we cannot know when
        // it is blocked, and must not sleep to guess.
        let t = std::thread::spawn(move || {
            while !d.load(Ordering::Acquire) {
                remote.notify();
                std::thread::yield_now();
            }
        });
        assert!(!ctx.poll(true), "a wake-up by notify alone is not progress");
        done.store(true, Ordering::Release);
        t.join().unwrap();
        let s = ctx.stats();
        assert!(s.notify_writes >= 1 || s.blocking_waits == 0, "{s:?}");
    }

    fn notify_is_elided_when_the_loop_is_not_blocked(b: Backend) {
        let ctx = ctx(b);
        let remote = ctx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let t = std::thread::spawn(move || {
            let mut n = 0u64;
            while !st.load(Ordering::Acquire) || n < 1000 {
                remote.notify();
                n += 1;
            }
            n
        });
        // Only non-blocking polls: the home thread never waits, so no
        // notify may cost a syscall.
        for _ in 0..2000 {
            ctx.poll(false);
        }
        stop.store(true, Ordering::Release);
        let sent = t.join().unwrap();
        let s = ctx.stats();
        assert_eq!(s.notify_writes, 0, "{s:?}");
        assert_eq!(s.notify_calls, sent);
        assert_eq!(s.blocking_waits, 0);
    }

    fn same_thread_bh_scheduling_costs_no_syscall(b: Backend) {
        let ctx = ctx(b);
        let bh = ctx.bh_new(|_| {});
        for _ in 0..100 {
            bh.schedule();
            assert!(ctx.poll(true));
        }
        let s = ctx.stats();
        assert_eq!(s.notify_writes, 0, "{s:?}");
        assert_eq!(s.blocking_waits, 0, "work was due each time: no wait blocked");
    }

    fn writes_are_bounded_by_iterations_under_a_storm(b: Backend) {
        // Four threads notify as fast as they can while the loop blocks and
        // wakes: each write needs a fresh notification that the loop has
        // not yet accepted, so writes never exceed iterations + 1.
        let ctx = ctx(b);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (remote, st) = (ctx.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !st.load(Ordering::Acquire) {
                        remote.notify();
                    }
                })
            })
            .collect();
        for _ in 0..500 {
            ctx.poll(true);
        }
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
        let s = ctx.stats();
        assert!(s.notify_writes <= s.iterations + 1, "{s:?}");
        assert!(s.notify_calls > s.notify_writes, "most notifies were elided: {s:?}");
    }
}
