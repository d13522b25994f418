//! Embedding the runtime in a VMM: a main loop with its iohandler context,
//! an iothread for a device's I/O, a task that moves between them, a QMP
//! server with the VMM's own command, signals for shutdown.
//!
//! `cargo run -p mainloop --example embed` runs it end to end and exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aio::{ClientType, ClockType, EventNotifier, FdHandler};
use mainloop::qmp::{NoArgs, QmpServer, QmpServerOptions};
use mainloop::{IOThread, IOThreadOptions, MainLoop, MainLoopOptions};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The main loop first: signals are blocked in this thread and the
    //    threads it spawns afterwards inherit the mask.
    let mut ml = MainLoop::new(MainLoopOptions::new())?;
    let quit = ml.quit_handle();
    let q = quit.clone();
    ml.handle_signals(&[libc::SIGINT, libc::SIGTERM], move |_| q.quit())?;

    // 2. An iothread for the device's queue: its own context on its own thread.
    let io = IOThread::spawn("io0", IOThreadOptions::new())?;

    // 3. The "guest kick": an eventfd the device's handler serves on the
    //    iothread. Handlers are registered on the home thread, so do it
    //    from a task there.
    let kick = Arc::new(EventNotifier::new()?);
    let served = Arc::new(AtomicU64::new(0));
    let (k, s) = (kick.clone(), served.clone());
    ml.main_context().block_on(io.context().spawn(async move {
        let ctx = aio::AioContext::current().expect("running in a task");
        let k2 = k.clone();
        ctx.set_event_notifier(
            &k,
            Some(FdHandler::new(ClientType::EXTERNAL).on_read(move |_| {
                if k2.test_and_clear().unwrap_or(false) {
                    s.fetch_add(1, Ordering::SeqCst);
                }
            })),
        )
    }))??;

    // 4. QMP on the iohandler context, with the VMM's own command.
    let server = QmpServer::new(
        ml.iohandler_context(),
        QmpServerOptions::new().on_quit({
            let q = quit.clone();
            move |_| q.quit()
        }),
    );
    let s = served.clone();
    server.register("x-device-stats", move |_: NoArgs| {
        Ok(json!({"kicks-served": s.load(Ordering::SeqCst)}))
    })?;

    // 5. A task that does work on the iothread, then reports on the main
    //    context, and ends the demo.
    let (io_ctx, main_ctx) = (io.context().clone(), ml.main_context().clone());
    let q = quit.clone();
    let served2 = served.clone();
    ml.main_context()
        .spawn(async move {
            aio::switch_to(&io_ctx).await.ok();
            for _ in 0..3 {
                kick.set().ok();
                aio::sleep_ns(ClockType::Realtime, 1_000_000).await;
            }
            aio::switch_to(&main_ctx).await.ok();
            println!("kicks served on io0: {}", served2.load(Ordering::SeqCst));
            q.quit();
        })
        .detach();

    ml.run();
    drop(server);
    io.stop()?;
    Ok(())
}
