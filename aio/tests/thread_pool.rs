//! The thread pool: results, bounded and on-demand workers, idle exit,
//! cancellation, panics, shutdown. After QEMU's tests/unit/test-thread-pool.c.

mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aio::{Error, PoolOptions, ThreadPool};
use util::park::park_block_on;

/// A gate jobs block on until the test opens it, counting who is inside.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    inside: usize,
    max_inside: usize,
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Called by a job: waits until the gate opens.
    fn pass(&self) {
        let mut st = self.state.lock().unwrap();
        st.inside += 1;
        st.max_inside = st.max_inside.max(st.inside);
        self.cv.notify_all();
        while !st.open {
            st = self.cv.wait(st).unwrap();
        }
        st.inside -= 1;
    }

    /// Waits (bounded) until `n` jobs are blocked in the gate.
    fn wait_inside(&self, n: usize) {
        let st = self.state.lock().unwrap();
        let (st, res) = self
            .cv
            .wait_timeout_while(st, Duration::from_secs(10), |st| st.inside < n)
            .unwrap();
        assert!(!res.timed_out(), "only {} of {n} jobs started", st.inside);
    }

    fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.cv.notify_all();
    }

    fn max_inside(&self) -> usize {
        self.state.lock().unwrap().max_inside
    }
}

/// Polls `cond` every 5 ms for up to 10 s. For conditions no future
/// reports, such as a worker thread exiting.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// Names of this process's threads that start with `prefix` (from
/// /proc/self/task/*/comm, which the kernel truncates to 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

#[test]
fn ten_thousand_jobs_each_return_their_value() {
    let pool = ThreadPool::new(PoolOptions::new().max_workers(8).name("tenk"));
    // Submitted eagerly, so all 10 000 are queued before the first await.
    let futs: Vec<_> = (0..10_000u64)
        .map(|i| pool.run(move || i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i))
        .collect();
    for (i, f) in futs.into_iter().enumerate() {
        let i = i as u64;
        assert_eq!(
            park_block_on(f).unwrap(),
            i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i
        );
    }
    let s = pool.stats();
    assert_eq!(s.submitted, 10_000);
    assert_eq!(s.completed, 10_000, "a completed future is already counted");
    assert_eq!((s.cancelled, s.panicked, s.queued), (0, 0, 0));
    assert!(s.live_workers <= 8, "{s:?}");
}

#[test]
fn workers_never_exceed_max_workers() {
    let pool = ThreadPool::new(PoolOptions::new().max_workers(4).name("bounded"));
    let gate = Gate::new();
    let futs: Vec<_> = (0..20)
        .map(|i| {
            let g = gate.clone();
            pool.run(move || {
                g.pass();
                i
            })
        })
        .collect();
    gate.wait_inside(4);
    let s = pool.stats();
    assert_eq!(s.live_workers, 4, "{s:?}");
    assert_eq!(s.idle_workers, 0, "{s:?}");
    assert_eq!(s.queued, 16, "{s:?}");
    gate.open();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(park_block_on(f).unwrap(), i);
        assert!(pool.stats().live_workers <= 4);
    }
    assert_eq!(gate.max_inside(), 4, "exactly max_workers jobs ran at once");
    assert!(threads_named("bounded-worker-") <= 4);
}

#[test]
fn workers_start_on_demand_and_reuse_idle_ones() {
    let pool = ThreadPool::new(PoolOptions::new().name("ondemand"));
    assert_eq!(
        pool.stats().live_workers,
        0,
        "no thread before the first job"
    );
    for i in 0..50 {
        assert_eq!(park_block_on(pool.run(move || i)).unwrap(), i);
    }
    // A worker counts itself idle before waking the future, so each next
    // job finds it: one thread serves them all.
    let s = pool.stats();
    assert_eq!(
        (s.live_workers, s.submitted, s.completed),
        (1, 50, 50),
        "{s:?}"
    );
}

#[test]
fn idle_workers_exit_after_idle_timeout() {
    let pool = ThreadPool::new(
        PoolOptions::new()
            .max_workers(3)
            .idle_timeout(Duration::from_millis(50))
            .name("idle"),
    );
    let gate = Gate::new();
    let futs: Vec<_> = (0..3)
        .map(|_| {
            let g = gate.clone();
            pool.run(move || g.pass())
        })
        .collect();
    gate.wait_inside(3);
    assert_eq!(pool.stats().live_workers, 3);
    gate.open();
    for f in futs {
        park_block_on(f).unwrap();
    }
    // Nothing to await for an exit: poll the stats in small steps.
    wait_until("idle workers to exit", || pool.stats().live_workers == 0);
    assert_eq!(pool.stats().idle_workers, 0);
    wait_until("idle worker threads to be gone", || {
        threads_named("idle-worker-") == 0
    });
    // The pool starts a fresh worker for the next job.
    assert_eq!(park_block_on(pool.run(|| 7)).unwrap(), 7);
}

#[test]
fn idle_workers_stay_before_idle_timeout() {
    let pool = ThreadPool::new(
        PoolOptions::new()
            .idle_timeout(Duration::from_secs(30))
            .name("stay"),
    );
    park_block_on(pool.run(|| ())).unwrap();
    thread::sleep(Duration::from_millis(100));
    let s = pool.stats();
    assert_eq!((s.live_workers, s.idle_workers), (1, 1), "{s:?}");
}

#[test]
fn dropping_a_queued_future_cancels_its_job() {
    let pool = ThreadPool::new(PoolOptions::new().max_workers(1).name("cancel"));
    let gate = Gate::new();
    let g = gate.clone();
    let first = pool.run(move || {
        g.pass();
        1
    });
    gate.wait_inside(1);
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let second = pool.run(move || r.store(true, Ordering::SeqCst));
    assert_eq!(pool.stats().queued, 1);
    drop(second);
    let s = pool.stats();
    assert_eq!((s.cancelled, s.queued), (1, 0), "{s:?}");
    gate.open();
    assert_eq!(park_block_on(first).unwrap(), 1);
    // A third job runs after where the second would have: if the second had
    // run, it would have done so by now.
    park_block_on(pool.run(|| ())).unwrap();
    assert!(!ran.load(Ordering::SeqCst), "a cancelled job never runs");
    let s = pool.stats();
    assert_eq!((s.submitted, s.completed, s.cancelled), (3, 2, 1), "{s:?}");
}

#[test]
fn dropping_a_running_future_discards_the_result() {
    struct Result_(Arc<AtomicUsize>);
    impl Drop for Result_ {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let pool = ThreadPool::new(PoolOptions::new().max_workers(1).name("discard"));
    let gate = Gate::new();
    let dropped = Arc::new(AtomicUsize::new(0));
    let (g, d) = (gate.clone(), dropped.clone());
    let fut = pool.run(move || {
        g.pass();
        Result_(d)
    });
    gate.wait_inside(1);
    drop(fut);
    gate.open();
    // The job still runs to the end; its result is dropped, not leaked.
    park_block_on(pool.run(|| ())).unwrap();
    wait_until("the discarded result to be dropped", || {
        dropped.load(Ordering::SeqCst) == 1
    });
    let s = pool.stats();
    assert_eq!((s.completed, s.cancelled), (2, 0), "{s:?}");
}

#[test]
fn a_panicking_job_fails_its_future_and_the_pool_survives() {
    let pool = ThreadPool::new(PoolOptions::new().max_workers(1).name("panic"));
    let err = park_block_on(pool.run(|| -> u32 { panic!("boom {}", 42) })).unwrap_err();
    match &err {
        Error::JobPanicked { pool, message } => {
            assert_eq!(pool, "panic");
            assert_eq!(message, "boom 42");
        }
        other => panic!("expected JobPanicked, got {other:?}"),
    }
    assert!(err.to_string().contains("boom 42"), "{err}");
    // The same single worker keeps serving.
    assert_eq!(park_block_on(pool.run(|| 5)).unwrap(), 5);
    let s = pool.stats();
    assert_eq!(
        (s.completed, s.panicked, s.live_workers),
        (2, 1, 1),
        "{s:?}"
    );
}

#[test]
fn dropping_the_pool_finishes_queued_work_then_workers_exit() {
    let pool = ThreadPool::new(PoolOptions::new().max_workers(2).name("shutdn"));
    let gate = Gate::new();
    let futs: Vec<_> = (0..10)
        .map(|i| {
            let g = gate.clone();
            pool.run(move || {
                g.pass();
                i * 2
            })
        })
        .collect();
    gate.wait_inside(2);
    drop(pool);
    gate.open();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(park_block_on(f).unwrap(), i * 2, "queued work still runs");
    }
    wait_until("workers of a dropped pool to exit", || {
        threads_named("shutdn-worker-") == 0
    });
}

#[test]
fn workers_are_named_after_the_pool() {
    let pool = ThreadPool::new(PoolOptions::new().name("named"));
    let name = park_block_on(pool.run(|| thread::current().name().map(str::to_string))).unwrap();
    assert_eq!(name.as_deref(), Some("named-worker-1"));
}

#[test]
fn completes_when_polled_from_another_thread_than_the_submitter() {
    let pool = ThreadPool::new(PoolOptions::new().name("xthread"));
    let gate = Gate::new();
    let g = gate.clone();
    let fut = pool.run(move || {
        g.pass();
        "done"
    });
    let waiter = thread::spawn(move || park_block_on(fut).unwrap());
    gate.wait_inside(1);
    gate.open();
    assert_eq!(waiter.join().unwrap(), "done");
}

#[test]
fn clones_share_one_pool() {
    let pool = ThreadPool::new(PoolOptions::new().max_workers(1).name("clones"));
    let other = pool.clone();
    park_block_on(other.run(|| ())).unwrap();
    drop(other);
    park_block_on(pool.run(|| ())).unwrap();
    assert_eq!(pool.stats().submitted, 2);
}

/// The pool's futures complete on the caller's context: a task awaiting
/// `run` resumes on the context's home thread, woken through the executor.
#[test]
fn completion_resumes_the_task_on_its_context() {
    let ctx = aio::AioContext::new().unwrap();
    let pool = ThreadPool::new(PoolOptions::default().max_workers(4));
    let home = std::thread::current().id();
    let hs: Vec<_> = (0..1000u64)
        .map(|i| {
            let pool = pool.clone();
            ctx.spawn(async move {
                let (worker, v) = pool
                    .run(move || (std::thread::current().id(), i * 3))
                    .await
                    .unwrap();
                assert_ne!(worker, std::thread::current().id(), "ran on a worker");
                assert_eq!(
                    std::thread::current().id(),
                    home,
                    "resumed on the home thread"
                );
                v
            })
        })
        .collect();
    let total: u64 = hs.into_iter().map(|h| ctx.block_on(h).unwrap()).sum();
    assert_eq!(total, 3 * (0..1000u64).sum::<u64>());
    assert_eq!(pool.stats().completed, 1000);
}

/// A pool named `name` whose workers spin for `spin` after a short job.
fn spinning_pool(name: &str, spin: Duration) -> ThreadPool {
    ThreadPool::new(PoolOptions::new().name(name).spin(spin))
}

#[test]
fn after_a_short_job_the_worker_spins_and_takes_the_next_itself() {
    // A window far longer than the gap between two jobs, even on a loaded
    // machine.
    let pool = spinning_pool("spinner", Duration::from_millis(200));
    for i in 0..20 {
        assert_eq!(park_block_on(pool.run(move || i)).unwrap(), i);
        // The gap a caller takes to come back with the next request (were
        // it shorter, the next job would be queued before the worker looks).
        thread::sleep(Duration::from_millis(1));
    }
    let s = pool.stats();
    assert_eq!(s.live_workers, 1, "{s:?}");
    // The first job finds no spinner; a descheduled test thread may let a
    // spin run out now and then.
    assert!(s.spin_hits >= 15, "{s:?}");

    let quiet = ThreadPool::new(PoolOptions::new().name("nospin"));
    for i in 0..20 {
        assert_eq!(park_block_on(quiet.run(move || i)).unwrap(), i);
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(quiet.stats().spin_hits, 0, "spin is off by default");
}

#[test]
fn a_job_longer_than_the_spin_window_does_not_spin() {
    let pool = spinning_pool("slowjobs", Duration::from_micros(100));
    for i in 0..5 {
        let job = move || {
            thread::sleep(Duration::from_millis(2));
            i
        };
        assert_eq!(park_block_on(pool.run(job)).unwrap(), i);
    }
    assert_eq!(pool.stats().spin_hits, 0, "{:?}", pool.stats());
}

#[test]
fn no_worker_spins_while_another_is_busy() {
    let pool = spinning_pool("busyspin", Duration::from_millis(200));
    let gate = Gate::new();
    let g = gate.clone();
    let long = pool.run(move || g.pass());
    gate.wait_inside(1);
    // The long job keeps one worker busy: the short ones' worker must
    // sleep between them, and is woken for each.
    for i in 0..5 {
        assert_eq!(park_block_on(pool.run(move || i)).unwrap(), i);
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pool.stats().spin_hits, 0, "{:?}", pool.stats());
    gate.open();
    park_block_on(long).unwrap();
    // Now alone, the worker of a short job spins again.
    park_block_on(pool.run(|| ())).unwrap();
    thread::sleep(Duration::from_millis(1));
    park_block_on(pool.run(|| ())).unwrap();
    assert!(pool.stats().spin_hits >= 1, "{:?}", pool.stats());
}

#[test]
fn dropping_the_pool_while_a_worker_spins_lets_it_exit() {
    let pool = spinning_pool("dropspin", Duration::from_millis(50));
    for i in 0..3 {
        assert_eq!(park_block_on(pool.run(move || i)).unwrap(), i);
    }
    drop(pool);
    wait_until("the spinning worker of a dropped pool to exit", || {
        threads_named("dropspin-worke") == 0
    });
}

#[test]
fn a_job_that_ran_alongside_another_does_not_spin_after_it() {
    let pool = spinning_pool("sidebyside", Duration::from_millis(200));
    let (first, second) = (Gate::new(), Gate::new());
    let g = first.clone();
    let a = pool.run(move || g.pass());
    first.wait_inside(1);
    let g = second.clone();
    let b = pool.run(move || g.pass());
    second.wait_inside(1);
    // `a` ends first: when `b` ends, its worker is the only busy one, but
    // `b` did not run alone, so the worker sleeps.
    first.open();
    park_block_on(a).unwrap();
    second.open();
    park_block_on(b).unwrap();
    thread::sleep(Duration::from_millis(1));
    park_block_on(pool.run(|| ())).unwrap();
    assert_eq!(pool.stats().spin_hits, 0, "{:?}", pool.stats());
}

#[test]
fn a_burst_queued_to_sleeping_workers_starts_together() {
    const N: usize = 8;
    let pool = ThreadPool::new(PoolOptions::new().max_workers(N).name("burst"));
    // Start N workers, then let them all go to sleep.
    for _ in 0..2 {
        let gate = Gate::new();
        let futs: Vec<_> = (0..N)
            .map(|_| {
                let g = gate.clone();
                pool.run(move || g.pass())
            })
            .collect();
        // Every job of the burst runs at once: the submitter woke at most
        // one sleeper, and each woken worker woke the next.
        gate.wait_inside(N);
        gate.open();
        for f in futs {
            park_block_on(f).unwrap();
        }
        wait_until("the workers to go idle", || pool.stats().idle_workers == N);
    }
    let s = pool.stats();
    assert_eq!(
        s.live_workers, N,
        "the second burst reused the workers: {s:?}"
    );
}

#[test]
fn many_submitters_with_mixed_job_lengths_lose_no_wake_up() {
    // Several threads submit at once into a small pool that spins and
    // hands wake-ups on; a lost wake-up leaves a future pending forever,
    // which the deadline turns into a failure.
    let pool = ThreadPool::new(
        PoolOptions::new()
            .max_workers(4)
            .name("mixed")
            .spin(Duration::from_micros(20)),
    );
    let submitters: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for round in 0..50u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Bursts of 1 to 8 jobs, some of them longer than the
                    // spin window.
                    let burst = 1 + (x % 8);
                    let futs: Vec<_> = (0..burst)
                        .map(|i| {
                            let us = if (x >> i) & 3 == 0 { 200 } else { 0 };
                            pool.run(move || {
                                if us > 0 {
                                    thread::sleep(Duration::from_micros(us));
                                }
                                round * 100 + i
                            })
                        })
                        .collect();
                    for (i, f) in futs.into_iter().enumerate() {
                        assert_eq!(park_block_on(f).unwrap(), round * 100 + i as u64);
                    }
                    // Now and then a pause past the spin window, so that
                    // workers go to sleep and must be woken.
                    if x % 4 == 0 {
                        thread::sleep(Duration::from_micros(300));
                    }
                }
            })
        })
        .collect();
    wait_until("every submitter to finish", || {
        submitters.iter().all(|s| s.is_finished())
    });
    for s in submitters {
        s.join().unwrap();
    }
    let s = pool.stats();
    assert_eq!(s.submitted, s.completed, "{s:?}");
    assert!(s.live_workers <= 4, "{s:?}");
}
