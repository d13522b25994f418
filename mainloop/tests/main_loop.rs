//! MainLoop and IOThread: quit, run_until, the iohandler context kept out
//! of nested polls, signals through signalfd, iothreads that leave nothing
//! running.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use aio::{AioContext, ClockType};
use mainloop::{IOThread, IOThreadOptions, MainLoop, MainLoopOptions};

fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with(prefix))
        .count()
}

#[test]
fn quit_from_another_thread_stops_run() {
    let ml = MainLoop::new(MainLoopOptions::new()).unwrap();
    let q = ml.quit_handle();
    let t = std::thread::spawn(move || q.quit());
    ml.run();
    t.join().unwrap();
    assert!(ml.quit_handle().is_quit());
}

#[test]
fn run_until_a_condition() {
    let ml = MainLoop::new(MainLoopOptions::new()).unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let h = ml.main_context().spawn(async move {
        for _ in 0..3 {
            aio::sleep_ns(ClockType::Realtime, 100_000).await;
            n2.fetch_add(1, Ordering::SeqCst);
        }
    });
    assert!(ml.run_until(|| n.load(Ordering::SeqCst) == 3));
    assert!(ml.main_context().block_on(h).is_ok());
}

#[test]
fn iohandler_work_never_runs_inside_a_nested_main_poll() {
    let ml = MainLoop::new(MainLoopOptions::new()).unwrap();
    let monitor_ran = Arc::new(AtomicBool::new(false));
    let seen_in_nested = Arc::new(AtomicBool::new(false));
    let io = ml.iohandler_context().clone();
    let (m, s) = (monitor_ran.clone(), seen_in_nested.clone());
    // A block-layer bottom half does a synchronous wait (nested poll) while
    // a "monitor command" is scheduled on the iohandler context.
    let bh = ml.main_context().bh_new(move |main: &AioContext| {
        let m2 = m.clone();
        io.bh_schedule_oneshot(move |_| m2.store(true, Ordering::SeqCst));
        main.block_on(main.sleep_ns(ClockType::Realtime, 2_000_000));
        s.store(m.load(Ordering::SeqCst), Ordering::SeqCst);
    });
    bh.schedule();
    assert!(ml.run_until(|| monitor_ran.load(Ordering::SeqCst)));
    assert!(
        !seen_in_nested.load(Ordering::SeqCst),
        "monitor work ran in a nested poll"
    );
}

#[test]
fn signals_arrive_through_the_iohandler_context() {
    let mut ml = MainLoop::new(MainLoopOptions::new()).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let g = got.clone();
    let quit = ml.quit_handle();
    ml.handle_signals(&[libc::SIGUSR2], move |sig| {
        assert_eq!(sig, libc::SIGUSR2);
        g.fetch_add(1, Ordering::SeqCst);
        quit.quit();
    })
    .unwrap();
    aio::SignalFd::raise_in_thread(libc::SIGUSR2).unwrap();
    ml.run();
    assert_eq!(got.load(Ordering::SeqCst), 1);
}

#[test]
fn iothread_runs_tasks_on_its_thread_and_stop_joins() {
    let t = IOThread::spawn("iot-test0", IOThreadOptions::new()).unwrap();
    assert_eq!(threads_named("iot-test0"), 1);
    let caller = AioContext::new().unwrap();
    let name = caller
        .block_on(t.context().spawn(async {
            aio::sleep_ns(ClockType::Realtime, 50_000).await;
            std::thread::current().name().map(str::to_string)
        }))
        .unwrap();
    assert_eq!(name.as_deref(), Some("iot-test0"));
    // A task still waiting when the thread stops is cancelled, not leaked.
    let token = Arc::new(());
    let tk = token.clone();
    let pending = t.context().spawn(async move {
        let _t = tk;
        aio::sleep_ns(ClockType::Realtime, 3_600_000_000_000).await;
    });
    t.stop().unwrap();
    assert_eq!(threads_named("iot-test0"), 0, "nothing left running");
    assert_eq!(Arc::strong_count(&token), 1);
    assert!(matches!(
        caller.block_on(pending),
        Err(aio::Error::TaskCancelled)
    ));
}

#[test]
fn task_moves_from_main_loop_to_iothread_and_back() {
    let ml = MainLoop::new(MainLoopOptions::new()).unwrap();
    let t = IOThread::spawn("iot-test1", IOThreadOptions::new()).unwrap();
    let (io_ctx, main_ctx) = (t.context().clone(), ml.main_context().clone());
    let h = ml.main_context().spawn(async move {
        aio::switch_to(&io_ctx).await.unwrap();
        let there = std::thread::current().name().map(str::to_string);
        aio::switch_to(&main_ctx).await.unwrap();
        there
    });
    let out = ml.main_context().block_on(h).unwrap();
    assert_eq!(out.as_deref(), Some("iot-test1"));
    drop(t); // drop stops and joins too
    assert_eq!(threads_named("iot-test1"), 0);
}
