//! Embedding the QMP server: typed commands (sync and async), events from
//! another thread, and `quit` ending the loop.
//!
//! `cargo run -p mainloop --example qmp_embed` starts a server on a free
//! TCP port, talks to it from a client thread, and exits when the client
//! sends `quit`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::{AioContext, ClockType};
use mainloop::qmp::{ListenAddress, NoArgs, QmpError, QmpServer, QmpServerOptions, QmpVersion};
use serde_json::json;

mainloop::qmp_enum! {
    /// How a job copies (QAPI's `MirrorSyncMode`, abridged).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum SyncMode {
        /// Only the top image.
        Top = "top",
        /// The whole chain.
        Full = "full",
    }
}

mainloop::qmp_args! {
    /// Arguments of `x-start-job`; on the wire `job-id`, `device`, `sync`,
    /// `speed`.
    #[derive(Debug)]
    pub struct StartJob {
        /// The job's name.
        pub job_id: String,
        /// The node to copy.
        pub device: String,
        /// The sync mode.
        pub sync: SyncMode,
        /// Bytes per second; unlimited if absent.
        pub speed: Option<i64>,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let ctx = AioContext::new()?; // this thread is its home thread
    let quit = Arc::new(AtomicBool::new(false));
    let q = quit.clone();
    let server = QmpServer::new(
        &ctx,
        QmpServerOptions::new()
            .version(QmpVersion::new(10, 0, 0, "qmp_embed example"))
            .on_quit(move |_ctx| q.store(true, Ordering::Release)),
    );

    // A synchronous command with typed, validated arguments. Capture an
    // EventEmitter, not the server, in command closures.
    let events = server.emitter();
    server.register("x-start-job", move |a: StartJob| {
        if a.speed.is_some_and(|s| s < 0) {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        events.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": a.job_id, "status": "created"}),
        );
        Ok(json!({"job-id": a.job_id, "sync": a.sync}))
    })?;

    // An asynchronous command: a future run as a task on the context.
    server.register_async("x-sleep", |_: NoArgs| async {
        aio::sleep_ns(ClockType::Realtime, 10_000_000).await;
        Ok(json!({"slept-ms": 10}))
    })?;

    let ListenAddress::Tcp(addr) = server.listen(&"tcp:127.0.0.1:0".parse()?)? else {
        unreachable!("a tcp address binds a tcp socket")
    };

    // Events can come from any thread.
    let emitter = server.emitter();
    let client = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        let mut lines = BufReader::new(stream.try_clone()?).lines();
        println!("<- {}", lines.next().unwrap()?);
        for cmd in [
            r#"{"execute": "qmp_capabilities"}"#,
            r#"{"execute": "x-start-job", "arguments": {"job-id": "j0", "device": "d0", "sync": "full"}, "id": 1}"#,
            r#"{"execute": "x-start-job", "arguments": {"job-id": "j1", "device": "d0", "sync": "sideways"}, "id": 2}"#,
            r#"{"execute": "x-sleep", "id": 3}"#,
        ] {
            println!("-> {cmd}");
            writeln!(stream, "{cmd}")?;
            loop {
                let line = lines.next().unwrap()?;
                println!("<- {line}");
                if !line.contains("\"event\"") {
                    break;
                }
            }
        }
        emitter.emit("HELLO_FROM_A_THREAD", json!({"n": 1}));
        println!("<- {}", lines.next().unwrap()?);
        writeln!(stream, r#"{{"execute": "quit"}}"#)?;
        println!("<- {}", lines.next().unwrap()?);
        Ok(())
    });

    while !quit.load(Ordering::Acquire) {
        ctx.poll(true);
    }
    client.join().expect("client thread")?;
    Ok(())
}
