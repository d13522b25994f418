//! The qtest server steps the virtual clocks of the main loop and of
//! iothreads together: timers on every thread fire in deadline order, each
//! with the clock at its own deadline, same-instant timers in a fixed
//! order, and a run is reproducible line for line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use aio::{ClockType, Timer, VirtualClock};
use mainloop::qtest_server::{QtestOptions, QtestServer};
use mainloop::{IOThread, IOThreadOptions, MainLoop, MainLoopOptions};

type Log = Arc<Mutex<Vec<(String, i64)>>>;

/// Arms, on `ctx`'s own thread, one virtual timer per deadline that logs
/// its context's name and the virtual time it saw.
fn arm(ctx: &aio::AioContext, name: &str, deadlines: &[i64], log: &Log) -> Vec<Timer> {
    let timers: Arc<Mutex<Vec<Timer>>> = Arc::default();
    let (t2, log, name, deadlines) = (
        timers.clone(),
        log.clone(),
        name.to_string(),
        deadlines.to_vec(),
    );
    let setup = move |ctx: &aio::AioContext| {
        for d in deadlines {
            let (log, name) = (log.clone(), name.clone());
            let t = ctx.timer_new(ClockType::Virtual, move |c| {
                log.lock()
                    .unwrap()
                    .push((name.clone(), c.clock_now(ClockType::Virtual)));
            });
            t.mod_ns(d);
            t2.lock().unwrap().push(t);
        }
    };
    if ctx.in_home_thread() {
        setup(ctx);
    } else {
        let done = Arc::new(std::sync::Barrier::new(2));
        let d2 = done.clone();
        ctx.bh_schedule_oneshot(move |ctx| {
            setup(ctx);
            d2.wait();
        });
        done.wait();
    }
    let v = std::mem::take(&mut *timers.lock().unwrap());
    v
}

/// One scripted run: timers on main, io0 and io1 interleaved in time, some
/// sharing an instant; the test steps deadline by deadline, then by a fixed
/// amount. Returns the qtest replies and the timer log.
fn scripted_run() -> (Vec<String>, Vec<(String, i64)>) {
    let clock = VirtualClock::new();
    let ml = MainLoop::new(MainLoopOptions::new().virtual_clock(clock.clone())).unwrap();
    let io0 = IOThread::spawn(
        "io0",
        IOThreadOptions::new().virtual_clock(VirtualClock::new()),
    )
    .unwrap();
    let io1 = IOThread::spawn(
        "io1",
        IOThreadOptions::new().virtual_clock(VirtualClock::new()),
    )
    .unwrap();
    let log: Log = Arc::default();
    let _t = (
        arm(ml.main_context(), "main", &[3_000, 5_000, 9_000], &log),
        arm(io0.context(), "io0", &[1_000, 5_000, 8_000], &log),
        arm(io1.context(), "io1", &[2_000, 5_000, 7_000, 20_000], &log),
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qtest.sock");
    let _server = QtestServer::listen(
        ml.iohandler_context(),
        ml.main_context(),
        &sock,
        QtestOptions::new()
            .peer(io0.context().clone())
            .peer(io1.context().clone()),
    )
    .unwrap();
    let quit = ml.quit_handle();
    let client = std::thread::spawn(move || {
        let s = UnixStream::connect(&sock).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut replies = Vec::new();
        let script = [
            "clock_step",
            "clock_step",
            "clock_step",
            "clock_step",
            "clock_step 2500",
            "clock_get",
            "clock_step",
            "clock_set 30000",
            "clock_step",
        ];
        for cmd in script {
            writeln!(w, "{cmd}").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            replies.push(format!("{cmd} -> {}", line.trim()));
        }
        quit.quit();
        replies
    });
    ml.run();
    let replies = client.join().unwrap();
    io0.stop().unwrap();
    io1.stop().unwrap();
    let log = log.lock().unwrap().clone();
    (replies, log)
}

#[test]
fn timers_on_iothreads_fire_in_deadline_order_at_their_deadlines() {
    let (replies, log) = scripted_run();
    assert_eq!(
        replies,
        [
            "clock_step -> OK 1000",
            "clock_step -> OK 2000",
            "clock_step -> OK 3000",
            "clock_step -> OK 5000",
            "clock_step 2500 -> OK 7500",
            "clock_get -> OK 7500",
            "clock_step -> OK 8000",
            "clock_set 30000 -> OK 30000",
            "clock_step -> FAIL no virtual-clock timer is pending",
        ]
    );
    let want: Vec<(String, i64)> = [
        ("io0", 1_000),
        ("io1", 2_000),
        ("main", 3_000),
        // Same instant: the main context first, then peers in order.
        ("main", 5_000),
        ("io0", 5_000),
        ("io1", 5_000),
        ("io1", 7_000),
        ("io0", 8_000),
        ("main", 9_000),
        ("io1", 20_000),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), *t))
    .collect();
    assert_eq!(log, want);
}

#[test]
fn two_runs_give_identical_replies_and_timer_logs() {
    assert_eq!(scripted_run(), scripted_run());
}
