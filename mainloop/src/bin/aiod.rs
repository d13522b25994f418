//! `aiod`: the runtime as a daemon, in the style of qemu-storage-daemon.
//!
//! Today it serves QMP (the built-in commands) on every `--qmp` address
//! until a client sends `quit`. Logging goes to stderr through `env_logger`
//! (`RUST_LOG`, default `info`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aio::AioContext;
use mainloop::qmp::{QmpAddress, QmpServer, QmpServerOptions};

const USAGE: &str = "\
usage: aiod --qmp unix:PATH|tcp:HOST:PORT [--qmp ...]

  --qmp ADDR   serve QMP on ADDR (repeatable): unix:PATH, or tcp:HOST:PORT
               (port 0 picks a free port; the address is logged)
  -h, --help   show this help";

/// The parsed command line.
#[derive(Debug, PartialEq)]
struct Args {
    qmp: Vec<QmpAddress>,
}

/// `Ok(None)` for `--help`; `Err` is a usage error.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut qmp = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--qmp" => it.next().ok_or("--qmp needs an address")?,
            a if a.starts_with("--qmp=") => a["--qmp=".len()..].to_string(),
            a => return Err(format!("unknown argument '{a}'")),
        };
        qmp.push(value.parse::<QmpAddress>().map_err(|e| e.to_string())?);
    }
    if qmp.is_empty() {
        return Err("nothing to serve: give at least one --qmp".into());
    }
    Ok(Some(Args { qmp }))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = AioContext::new()?;
    let quit = Arc::new(AtomicBool::new(false));
    let q = quit.clone();
    let server = QmpServer::new(
        &ctx,
        QmpServerOptions::new().on_quit(move |_| q.store(true, Ordering::Release)),
    );
    for addr in &args.qmp {
        server.listen(addr)?;
    }
    while !quit.load(Ordering::Acquire) {
        ctx.poll(true);
    }
    // Closes the connections and removes the socket files.
    drop(server);
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
    }
}
