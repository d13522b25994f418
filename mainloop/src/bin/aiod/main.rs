//! `aiod`: the runtime as a daemon, in the style of qemu-storage-daemon.
//!
//! It serves QMP on every `--qmp` address (or `--chardev socket,... --monitor
//! chardev=ID`, QSD's spelling) from the main loop's iohandler context, with
//! the block layer's commands: `blockdev-add`, `blockdev-del`,
//! `query-named-block-nodes`, the job queries and verbs. SIGINT and SIGTERM
//! (through a signalfd) or QMP `quit` shut it down cleanly: running jobs are
//! cancelled, images are closed (clean qcow2 dirty bit), socket files and
//! the pid file are removed. Logging goes to stderr through `env_logger`
//! (`RUST_LOG`, default `info`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aio::ClockType;
use blockjob::block::BlockGraph;
use blockjob::job::{JobRegistry, JobStatus};
use mainloop::block_qmp::{register_block_commands, BlockState};
use mainloop::export_qmp::{register_export_commands, Exports};
use mainloop::job_qmp::register_job_commands;

mod demo;
use mainloop::qmp::{QmpAddress, QmpServer, QmpServerOptions};
use mainloop::qtest_server::{QtestOptions, QtestServer};
use mainloop::{IOThread, IOThreadOptions, MainLoop, MainLoopOptions};
use serde_json::{Map, Value};

const USAGE: &str = "\
usage: aiod --demo
       aiod [--qmp ADDR]... [--blockdev OPTS]... [--object iothread,id=ID]...
            [--chardev socket,id=ID,path=PATH,server=on,wait=off --monitor chardev=ID]
            [--nbd-server addr.type=unix,addr.path=PATH] [--export type=nbd,...]...
            [--pidfile PATH] [--qtest unix:PATH]

  --demo            make a 3-layer qcow2 chain in a temporary folder, run
                    backup, mirror, commit and stream on it through QMP,
                    verify each result with qemu-img, exit
  --qmp ADDR        serve QMP on ADDR (repeatable): unix:PATH, or tcp:HOST:PORT
                    (port 0 picks a free port; the address is logged)
  --blockdev OPTS   add a block node at start-up, as QMP blockdev-add would:
                    JSON ({\"driver\":\"qcow2\",...}) or QEMU's dotted keys
                    (driver=qcow2,node-name=top,file.driver=file,file.filename=t.qcow2)
  --object iothread,id=ID
                    start an iothread
  --chardev socket,id=ID,path=PATH,server=on,wait=off
  --monitor chardev=ID
                    qemu-storage-daemon's spelling of --qmp unix:PATH
  --nbd-server addr.type=unix,addr.path=PATH[,max-connections=N]
  --nbd-server addr.type=inet,addr.host=HOST,addr.port=PORT
                    start the NBD server (QMP nbd-server-start)
  --export type=nbd,id=ID,node-name=NODE[,name=NAME][,description=TEXT][,writable=on]
                    export a node over NBD (QMP block-export-add)
  --pidfile PATH    write the process id to PATH (removed at exit)
  --qtest unix:PATH run on a virtual clock that only the qtest socket at
                    PATH moves (clock_step [NS], clock_set NS, clock_get)
  -h, --help        show this help";

/// The parsed command line.
#[derive(Debug, Default, PartialEq)]
struct Args {
    qmp: Vec<QmpAddress>,
    blockdevs: Vec<Value>,
    iothreads: Vec<String>,
    pidfile: Option<PathBuf>,
    qtest: Option<PathBuf>,
    demo: bool,
    /// `--nbd-server` options, then `--export`s, as key=value objects.
    nbd_server: Option<Value>,
    exports: Vec<Value>,
}

/// QEMU's dotted `key=value,...` syntax as a JSON object.
fn parse_keyval(s: &str) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got '{part}'"))?;
        let keys: Vec<&str> = key.split('.').collect();
        let last = keys.len() - 1;
        let leaf = keys[last];
        let boolean = matches!(
            leaf,
            "read-only" | "direct" | "no-flush" | "auto-read-only" | "force-share"
        );
        let value = match (leaf, val) {
            (_, "on" | "true") if boolean => Value::Bool(true),
            (_, "off" | "false") if boolean => Value::Bool(false),
            ("size", v) => v
                .parse::<u64>()
                .map(Value::from)
                .map_err(|_| format!("'{key}' expects a number, got '{v}'"))?,
            (_, v) => Value::String(v.to_string()),
        };
        let mut map = &mut root;
        for k in &keys[..last] {
            let entry = map
                .entry(k.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            map = entry
                .as_object_mut()
                .ok_or_else(|| format!("'{k}' is both a value and an object"))?;
        }
        map.insert(leaf.to_string(), value);
    }
    Ok(root)
}

/// `Ok(None)` for `--help`; `Err` is a usage error.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = Args::default();
    let mut chardevs: HashMap<String, String> = HashMap::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--demo" => out.demo = true,
            "--qmp" => {
                let v = value("--qmp").map_err(|_| "--qmp needs an address".to_string())?;
                out.qmp
                    .push(v.parse::<QmpAddress>().map_err(|e| e.to_string())?);
            }
            "--blockdev" => {
                let v = value("--blockdev")?;
                let obj = if v.trim_start().starts_with('{') {
                    serde_json::from_str::<Value>(&v)
                        .map_err(|e| format!("--blockdev: invalid JSON: {e}"))?
                } else {
                    Value::Object(parse_keyval(&v).map_err(|e| format!("--blockdev: {e}"))?)
                };
                out.blockdevs.push(obj);
            }
            "--object" => {
                let v = parse_keyval(&value("--object")?.replacen(
                    "iothread,",
                    "qom-type=iothread,",
                    1,
                ))
                .map_err(|e| format!("--object: {e}"))?;
                match (
                    v.get("qom-type").and_then(Value::as_str),
                    v.get("id").and_then(Value::as_str),
                ) {
                    (Some("iothread"), Some(id)) => out.iothreads.push(id.to_string()),
                    _ => return Err("--object: only iothread,id=ID is supported".into()),
                }
            }
            "--chardev" => {
                let v = value("--chardev")?;
                let rest = v
                    .strip_prefix("socket,")
                    .ok_or("--chardev: only socket chardevs are supported")?;
                let kv = parse_keyval(rest).map_err(|e| format!("--chardev: {e}"))?;
                let id = kv
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or("--chardev: id= is missing")?;
                let path = kv
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or("--chardev: path= is missing")?;
                chardevs.insert(id.to_string(), path.to_string());
            }
            "--monitor" => {
                let kv =
                    parse_keyval(&value("--monitor")?).map_err(|e| format!("--monitor: {e}"))?;
                let id = kv
                    .get("chardev")
                    .and_then(Value::as_str)
                    .ok_or("--monitor: chardev= is missing")?;
                let path = chardevs
                    .get(id)
                    .ok_or_else(|| format!("--monitor: no --chardev with id '{id}'"))?;
                out.qmp.push(
                    format!("unix:{path}")
                        .parse::<QmpAddress>()
                        .map_err(|e| e.to_string())?,
                );
            }
            "--nbd-server" => {
                let kv = parse_keyval(&value("--nbd-server")?)
                    .map_err(|e| format!("--nbd-server: {e}"))?;
                out.nbd_server = Some(Value::Object(kv));
            }
            "--export" => {
                let kv = parse_keyval(&value("--export")?).map_err(|e| format!("--export: {e}"))?;
                out.exports.push(Value::Object(kv));
            }
            "--pidfile" => out.pidfile = Some(PathBuf::from(value("--pidfile")?)),
            "--qtest" => {
                let v = value("--qtest")?;
                let path = v
                    .strip_prefix("unix:")
                    .ok_or("--qtest: expected unix:PATH")?;
                out.qtest = Some(PathBuf::from(path));
            }
            a => return Err(format!("unknown argument '{a}'")),
        }
    }
    if out.qmp.is_empty() && !out.demo {
        return Err("nothing to serve: give at least one --qmp".into());
    }
    Ok(Some(out))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Signals first: they must be blocked before any other thread starts.
    let clock = aio::VirtualClock::new();
    let mut ml = MainLoop::new(MainLoopOptions::new().virtual_clock(clock.clone()))?;
    let quit = ml.quit_handle();
    let q = quit.clone();
    ml.handle_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP], move |sig| {
        log::info!("signal {sig}: shutting down");
        q.quit();
    })?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("writing pid file {}: {e}", p.display()))?;
    }
    let mut iothreads = Vec::new();
    for id in &args.iothreads {
        // Each iothread has its own virtual clock, moved by the qtest
        // stepper in a fixed order (see `QtestOptions::peer`).
        iothreads.push(IOThread::spawn(
            id,
            IOThreadOptions::new().virtual_clock(aio::VirtualClock::new()),
        )?);
    }

    let main = ml.main_context().clone();
    let mut state = BlockState::new(
        main.clone(),
        std::sync::Arc::new(BlockGraph::new()),
        // Under qtest, jobs sleep and rate-limit on the virtual clock.
        JobRegistry::new(if args.qtest.is_some() {
            ClockType::Virtual
        } else {
            ClockType::Realtime
        }),
    );
    if args.qtest.is_some() {
        // NBD reconnect-delay too.
        state.graph.set_clock(ClockType::Virtual);
    }
    state.iothreads = std::sync::Arc::new(
        iothreads
            .iter()
            .map(|t| (t.id().to_string(), t.context().clone()))
            .collect(),
    );
    for bd in &args.blockdevs {
        main.block_on(state.graph.blockdev_add(bd))
            .map_err(|e| format!("--blockdev: {e}"))?;
    }

    let q = quit.clone();
    let server = QmpServer::new(
        ml.iohandler_context(),
        QmpServerOptions::new().on_quit(move |_| q.quit()),
    );
    register_block_commands(&server, state.clone())?;
    register_job_commands(&server, state.clone())?;
    let exports = register_export_commands(&server, state.clone())?;
    start_exports(&exports, args)?;
    for addr in &args.qmp {
        let bound = server.listen(addr)?;
        log::info!("QMP on {bound}");
    }

    let _qtest = match &args.qtest {
        Some(path) => {
            let jobs = state.jobs.clone();
            let mut opts = QtestOptions::new().busy(move || jobs.list().iter().any(|j| j.busy));
            for t in &iothreads {
                opts = opts.peer(t.context().clone());
            }
            Some(QtestServer::listen(
                ml.iohandler_context(),
                &main,
                path,
                opts,
            )?)
        }
        None => None,
    };

    ml.run();

    stop_exports(&ml, &exports);
    shutdown(&ml, &state);
    drop(server); // closes connections, removes the socket files
    for t in iothreads {
        t.stop()?;
    }
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// `--nbd-server` and `--export`, in that order.
fn start_exports(exports: &Exports, args: &Args) -> Result<(), String> {
    if let Some(o) = &args.nbd_server {
        exports
            .start_from_options(o)
            .map_err(|e| format!("--nbd-server: {}", e.desc))?;
    }
    for o in &args.exports {
        exports
            .add_from_options(o)
            .map_err(|e| format!("--export: {}", e.desc))?;
    }
    Ok(())
}

/// Stops the NBD server (exports go, clients are disconnected, the socket
/// file is removed) and waits, bounded, for the connections to finish.
fn stop_exports(ml: &MainLoop, exports: &Exports) {
    if exports.stop().is_err() {
        return;
    }
    poll_until(ml, Duration::from_secs(5), || {
        exports.connection_count() == 0
    });
}

/// Runs the main loop until `done` holds or `limit` has passed (it
/// wakes at least every 10 ms to look); returns whether `done` held.
fn poll_until(ml: &MainLoop, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let main = ml.main_context();
    let deadline = Instant::now() + limit;
    let tick = main.timer_new(ClockType::Realtime, |_| {});
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tick.mod_in_ns(10_000_000);
        main.poll(true);
    }
    true
}

/// Cancels running jobs, waits (bounded) for them to finish, closes every
/// image.
fn shutdown(ml: &MainLoop, state: &BlockState) {
    for info in state.jobs.list() {
        if !matches!(info.status, JobStatus::Concluded | JobStatus::Null) {
            if let Some(job) = state.jobs.get(&info.id) {
                log::info!("cancelling job {}", info.id);
                let _ = job.cancel(true);
            }
        }
    }
    poll_until(ml, Duration::from_secs(10), || {
        state
            .jobs
            .list()
            .iter()
            .all(|j| matches!(j.status, JobStatus::Concluded | JobStatus::Null))
    });
    // Requests still in flight finish before the images close; a device
    // that never completes one must not hang the shutdown, so the wait is
    // bounded and the images are then left open (a qcow2 image keeps its
    // dirty bit and is repaired on its next open).
    let main = ml.main_context();
    let graph = state.graph.clone();
    let closing = main.spawn(async move { graph.close_all().await });
    if !poll_until(ml, Duration::from_secs(10), || closing.is_finished()) {
        log::error!("requests still in flight after 10 s; leaving the images open");
        return;
    }
    match main.block_on(closing) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::error!("closing images: {e}"),
        Err(e) => log::error!("closing images: {e}"),
    }
}

fn main() -> ExitCode {
    // The demo prints its own story; keep the log to warnings there.
    let demo = std::env::args().any(|a| a == "--demo");
    let default_level = if demo { "warn" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("aiod: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.demo {
        return match demo::run_demo() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aiod --demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aiod: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parse_args_accepts_repeated_qmp_in_both_forms() {
        let a = parse(&["--qmp", "unix:/tmp/a", "--qmp=tcp:127.0.0.1:0"])
            .unwrap()
            .unwrap();
        assert_eq!(a.qmp.len(), 2);
        assert_eq!(a.qmp[1].to_string(), "tcp:127.0.0.1:0");
    }

    #[test]
    fn parse_args_usage_errors() {
        assert!(parse(&[]).unwrap_err().contains("--qmp"));
        assert_eq!(parse(&["--qmp"]).unwrap_err(), "--qmp needs an address");
        assert_eq!(
            parse(&["--bogus"]).unwrap_err(),
            "unknown argument '--bogus'"
        );
        assert!(parse(&["--qmp", "udp:x"])
            .unwrap_err()
            .contains("expected unix:PATH or tcp:HOST:PORT"));
        assert_eq!(parse(&["--help"]), Ok(None));
        assert!(parse(&["--qmp", "unix:/x", "--blockdev", "{bad"])
            .unwrap_err()
            .contains("invalid JSON"));
        assert!(parse(&["--qmp", "unix:/x", "--monitor", "chardev=nope"])
            .unwrap_err()
            .contains("no --chardev with id 'nope'"));
    }

    #[test]
    fn blockdev_in_dotted_keys_becomes_nested_json() {
        let a = parse(&[
            "--qmp",
            "unix:/x",
            "--blockdev",
            "driver=qcow2,node-name=top,file.driver=file,file.filename=/t.qcow2,read-only=on",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            a.blockdevs[0],
            serde_json::json!({"driver": "qcow2", "node-name": "top", "read-only": true,
                "file": {"driver": "file", "filename": "/t.qcow2"}})
        );
        // QSD's spelling of a cache=none disk.
        let a = parse(&[
            "--qmp",
            "unix:/x",
            "--blockdev",
            "driver=file,node-name=f,filename=/d,aio=native,cache.direct=on,cache.no-flush=off,auto-read-only=on",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            a.blockdevs[0],
            serde_json::json!({"driver": "file", "node-name": "f", "filename": "/d",
                "aio": "native", "cache": {"direct": true, "no-flush": false},
                "auto-read-only": true})
        );
    }

    #[test]
    fn qsd_chardev_and_monitor_spelling() {
        let a = parse(&[
            "--chardev",
            "socket,id=m0,path=/tmp/q.sock,server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--object",
            "iothread,id=io0",
            "--pidfile",
            "/tmp/p",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.qmp[0].to_string(), "unix:/tmp/q.sock");
        assert_eq!(a.iothreads, vec!["io0"]);
        assert_eq!(a.pidfile, Some(PathBuf::from("/tmp/p")));
    }

    #[test]
    fn nbd_server_and_export_in_qsd_spelling() {
        let a = parse(&[
            "--qmp",
            "unix:/x",
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=10809",
            "--export",
            "type=nbd,id=e0,node-name=top,writable=on",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            a.nbd_server,
            Some(
                serde_json::json!({"addr": {"type": "inet", "host": "127.0.0.1", "port": "10809"}})
            )
        );
        assert_eq!(
            a.exports,
            [serde_json::json!({"type": "nbd", "id": "e0", "node-name": "top", "writable": "on"})]
        );
    }
}
