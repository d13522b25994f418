//! `aio-bench`: fd-scaling and timer-lateness benchmarks of the `aio` loop.
//!
//! ```text
//! cargo run --release -p bench --bin aio-bench -- fdscale [--quick] [--json]
//! cargo run --release -p bench --bin aio-bench -- timers  [--quick] [--json]
//! ```
//!
//! Results go to stdout (a table, or one JSON object per line with
//! `--json`); progress goes to stderr.

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use bench::{Fixture, Flavor, LatenessSummary, TimerSource, IDLE_COUNTS};

const USAGE: &str = "\
usage: aio-bench <command> [options]

commands:
  fdscale [--quick] [--json]   ns per ping-pong iteration against the number of
                               idle fds (1, 16, 256, 4096, 10000) for raw-epoll,
                               epoll, epoll+timerfd and ppoll
  timers  [--quick] [--json]   lateness of one-shot Realtime timers (100 us,
                               1 ms, 10 ms) for epoll, epoll+timerfd, ppoll and
                               a millisecond-timeout epoll_wait reference

options:
  --quick   fewer iterations / samples (fdscale < 30 s; timers skips 10 ms)
  --json    one JSON object per line on stdout instead of a table
  -h, --help  this text

Progress messages go to stderr.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opts {
    quick: bool,
    json: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    FdScale(Opts),
    Timers(Opts),
    /// Hidden: a plain ping-pong run, for strace / callgrind.
    PingPong {
        flavor: Flavor,
        idle: usize,
        iters: u64,
    },
}

fn parse(args: &[String]) -> Result<Command, String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err("missing command".into());
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "fdscale" | "timers" => {
            let mut opts = Opts {
                quick: false,
                json: false,
            };
            for a in rest {
                match a.as_str() {
                    "--quick" => opts.quick = true,
                    "--json" => opts.json = true,
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("unknown option for {cmd}: {other}")),
                }
            }
            Ok(if cmd == "fdscale" {
                Command::FdScale(opts)
            } else {
                Command::Timers(opts)
            })
        }
        "pingpong" => {
            let (mut flavor, mut idle, mut iters) = (Flavor::Epoll, 1usize, 100_000u64);
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                let mut value = || {
                    it.next()
                        .ok_or_else(|| format!("{a} needs a value"))
                        .cloned()
                };
                match a.as_str() {
                    "--backend" => {
                        let v = value()?;
                        flavor = Flavor::parse(&v).ok_or_else(|| format!("unknown backend {v}"))?;
                    }
                    "--idle" => {
                        let v = value()?;
                        idle = v.parse().map_err(|_| format!("bad --idle value {v}"))?;
                    }
                    "--iters" => {
                        let v = value()?;
                        iters = v.parse().map_err(|_| format!("bad --iters value {v}"))?;
                    }
                    other => return Err(format!("unknown option for pingpong: {other}")),
                }
            }
            Ok(Command::PingPong {
                flavor,
                idle,
                iters,
            })
        }
        other => Err(format!("unknown command: {other}")),
    }
}

fn main() -> ExitCode {
    let args: Result<Vec<String>, OsString> = std::env::args_os()
        .skip(1)
        .map(OsString::into_string)
        .collect();
    let cmd = match args
        .map_err(|a| format!("argument is not UTF-8: {a:?}"))
        .and_then(|a| parse(&a))
    {
        Ok(cmd) => cmd,
        Err(msg) => {
            eprintln!("aio-bench: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::FdScale(o) => fdscale(o),
        Command::Timers(o) => timers(o),
        Command::PingPong {
            flavor,
            idle,
            iters,
        } => pingpong(flavor, idle, iters),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aio-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- fdscale ---------------------------------------------------------

/// How long to measure one (flavor, N) cell.
struct MeasureCfg {
    warmup: Duration,
    batches: usize,
    batch: Duration,
}

impl MeasureCfg {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                warmup: Duration::from_millis(50),
                batches: 5,
                batch: Duration::from_millis(40),
            }
        } else {
            Self {
                warmup: Duration::from_millis(400),
                batches: 11,
                batch: Duration::from_millis(200),
            }
        }
    }
}

/// One measured cell.
struct Cell {
    ns_per_iter: f64,
    iters_per_batch: u64,
    /// (max − min) / median over the batches.
    spread: f64,
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Warms `fx` up in doubling chunks for `cfg.warmup`, and returns how many
/// iterations take about `batch`. Slow cells (ppoll with many fds) thus get
/// proportionally fewer iterations.
fn warm_up(fx: &mut Fixture, cfg: &MeasureCfg, batch: Duration) -> bench::Result<u64> {
    let (mut spent, mut done, mut chunk) = (Duration::ZERO, 0u64, 1u64);
    while spent < cfg.warmup {
        spent += fx.run_timed(chunk)?;
        done += chunk;
        chunk = (chunk * 2).min(1 << 20);
    }
    let est = ns(spent) / done as f64;
    Ok(((ns(batch) / est) as u64).clamp(3, 50_000_000))
}

/// ns per iteration of one batch of `iters`.
fn batch(fx: &mut Fixture, iters: u64) -> bench::Result<f64> {
    Ok(ns(fx.run_timed(iters)?) / iters as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    bench::nearest_rank(&v, 0.5)
}

/// The median ns/iteration over `cfg.batches` batches, after a warm-up.
fn measure(fx: &mut Fixture, cfg: &MeasureCfg) -> bench::Result<Cell> {
    let per_batch = warm_up(fx, cfg, cfg.batch)?;
    let mut per_iter = Vec::with_capacity(cfg.batches);
    for _ in 0..cfg.batches {
        per_iter.push(batch(fx, per_batch)?);
    }
    let lo = per_iter.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per_iter.iter().copied().fold(0.0, f64::max);
    let med = median(per_iter);
    Ok(Cell {
        ns_per_iter: med,
        iters_per_batch: per_batch,
        spread: (hi - lo) / med,
    })
}

/// A ratio measured with interleaved batches.
struct Paired {
    /// Median over batch pairs of ns/iter(a) / ns/iter(b).
    ratio: f64,
    a_ns: f64,
    b_ns: f64,
}

/// Measures `a` against `b` with alternating batches (a b, b a, a b, ...),
/// both fixtures alive in one process, so that the host's slow drifts hit
/// both sides alike. Cross-cell ratios from the table compare cells
/// measured up to a minute apart, which on a shared VM moves by ±20 %.
fn paired(a: &mut Fixture, b: &mut Fixture, cfg: &MeasureCfg) -> bench::Result<Paired> {
    let half = cfg.batch / 2;
    let (na, nb) = (warm_up(a, cfg, half)?, warm_up(b, cfg, half)?);
    let pairs = cfg.batches * 2;
    let (mut ratios, mut ta, mut tb) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let (x, y) = if i % 2 == 0 {
            let x = batch(a, na)?;
            (x, batch(b, nb)?)
        } else {
            let y = batch(b, nb)?;
            (batch(a, na)?, y)
        };
        ratios.push(x / y);
        ta.push(x);
        tb.push(y);
    }
    Ok(Paired {
        ratio: median(ratios),
        a_ns: median(ta),
        b_ns: median(tb),
    })
}

/// The two tight targets, measured paired.
struct PairedTargets {
    /// epoll@max / epoll@min.
    epoll_scaling: Paired,
    /// epoll@min / raw-epoll@min.
    epoll_vs_raw: Paired,
}

fn paired_targets(cfg: &MeasureCfg) -> bench::Result<PairedTargets> {
    let (lo, hi) = (IDLE_COUNTS[0], IDLE_COUNTS[IDLE_COUNTS.len() - 1]);
    let mut e_lo = Fixture::new(Flavor::Epoll, lo)?;
    let epoll_scaling = {
        let mut e_hi = Fixture::new(Flavor::Epoll, hi)?;
        paired(&mut e_hi, &mut e_lo, cfg)?
    };
    eprintln!(
        "  paired: epoll@{hi} / epoll@{lo} = {:.2}x ({:.1} / {:.1} ns)",
        epoll_scaling.ratio, epoll_scaling.a_ns, epoll_scaling.b_ns
    );
    let mut raw_lo = Fixture::new(Flavor::RawEpoll, lo)?;
    let epoll_vs_raw = paired(&mut e_lo, &mut raw_lo, cfg)?;
    eprintln!(
        "  paired: epoll@{lo} / raw-epoll@{lo} = {:.2}x ({:.1} / {:.1} ns)",
        epoll_vs_raw.ratio, epoll_vs_raw.a_ns, epoll_vs_raw.b_ns
    );
    Ok(PairedTargets {
        epoll_scaling,
        epoll_vs_raw,
    })
}

fn fdscale(o: Opts) -> bench::Result<()> {
    let max_idle = IDLE_COUNTS[IDLE_COUNTS.len() - 1];
    let limit = bench::raise_fd_limit_for(max_idle)?;
    eprintln!("fdscale: RLIMIT_NOFILE = {limit}; {} mode", mode(o.quick));
    let cfg = MeasureCfg::new(o.quick);
    let mut results: HashMap<(Flavor, usize), f64> = HashMap::new();
    for &n in &IDLE_COUNTS {
        for flavor in Flavor::ALL {
            let mut fx = Fixture::new(flavor, n)
                .map_err(|e| format!("setting up {flavor} with {n} idle fds: {e}"))?;
            if fx.backend_name() != flavor.label() {
                eprintln!(
                    "  note: {flavor} runs as {} on this kernel",
                    fx.backend_name()
                );
            }
            let cell = measure(&mut fx, &cfg)
                .map_err(|e| format!("measuring {flavor} with {n} idle fds: {e}"))?;
            drop(fx);
            eprintln!(
                "  {:<14} idle_fds={:<6} {:>12.1} ns/iter  ({} batches x {} iters, spread {:.1}%)",
                flavor.label(),
                n,
                cell.ns_per_iter,
                cfg.batches,
                cell.iters_per_batch,
                cell.spread * 100.0
            );
            if o.json {
                println!(
                    "{{\"bench\":\"fdscale\",\"backend\":\"{}\",\"idle_fds\":{},\"ns_per_iter\":{:.1}}}",
                    flavor.label(),
                    n,
                    cell.ns_per_iter
                );
            }
            results.insert((flavor, n), cell.ns_per_iter);
        }
    }
    eprintln!("fdscale: paired (interleaved) measurements for the ratio targets");
    let paired = paired_targets(&cfg)?;
    if !o.json {
        print_fdscale_table(&results, cfg.batches, &paired);
    }
    Ok(())
}

fn print_fdscale_table(r: &HashMap<(Flavor, usize), f64>, batches: usize, p: &PairedTargets) {
    let get = |f: Flavor, n: usize| r.get(&(f, n)).copied().unwrap_or(f64::NAN);
    println!("fdscale: ns per ping-pong iteration (median of {batches} batches)");
    print!("{:>8}", "idle_fds");
    for f in Flavor::ALL {
        print!(" {:>14}", f.label());
    }
    println!(" {:>12} {:>16}", "ppoll/epoll", "epoll/raw-epoll");
    for &n in &IDLE_COUNTS {
        print!("{n:>8}");
        for f in Flavor::ALL {
            print!(" {:>14.1}", get(f, n));
        }
        let epoll = get(Flavor::Epoll, n);
        println!(
            " {:>11.1}x {:>15.2}x",
            get(Flavor::Ppoll, n) / epoll,
            epoll / get(Flavor::RawEpoll, n)
        );
    }
    let (lo, hi) = (IDLE_COUNTS[0], IDLE_COUNTS[IDLE_COUNTS.len() - 1]);
    let e_hi = get(Flavor::Epoll, hi);
    println!();
    println!("targets (paired = interleaved batches in one process, decides the verdict;");
    println!("table = ratio of the two table cells above, measured at different times):");
    target(
        &format!("epoll@{hi} within 1.5x of epoll@{lo}"),
        p.epoll_scaling.ratio <= 1.5,
        &format!(
            "paired {:.2}x ({:.1} / {:.1} ns), table {:.2}x",
            p.epoll_scaling.ratio,
            p.epoll_scaling.a_ns,
            p.epoll_scaling.b_ns,
            e_hi / get(Flavor::Epoll, lo)
        ),
    );
    let p_hi = get(Flavor::Ppoll, hi);
    target(
        &format!("ppoll@{hi} at least 100x epoll@{hi}"),
        p_hi / e_hi >= 100.0,
        &format!("table {:.0}x ({p_hi:.1} / {e_hi:.1} ns)", p_hi / e_hi),
    );
    target(
        &format!("epoll@{lo} within 1.25x of raw-epoll@{lo}"),
        p.epoll_vs_raw.ratio <= 1.25,
        &format!(
            "paired {:.2}x ({:.1} / {:.1} ns), table {:.2}x",
            p.epoll_vs_raw.ratio,
            p.epoll_vs_raw.a_ns,
            p.epoll_vs_raw.b_ns,
            get(Flavor::Epoll, lo) / get(Flavor::RawEpoll, lo)
        ),
    );
}

fn target(what: &str, ok: bool, detail: &str) {
    let verdict = if ok { "PASS" } else { "MISS" };
    println!("  {verdict}  {what:<42} {detail}");
}

fn mode(quick: bool) -> &'static str {
    if quick {
        "quick"
    } else {
        "full"
    }
}

// ----- timers ----------------------------------------------------------

fn timers(o: Opts) -> bench::Result<()> {
    // (period, samples); 10 ms only in the full run.
    let plan: &[(i64, usize)] = if o.quick {
        &[(100_000, 300), (1_000_000, 300)]
    } else {
        &[(100_000, 2_000), (1_000_000, 2_000), (10_000_000, 200)]
    };
    let warmup = if o.quick { 5 } else { 20 };
    eprintln!("timers: {} mode", mode(o.quick));
    let mut rows = Vec::new();
    for &(period, samples) in plan {
        for src in TimerSource::ALL {
            let lat = src
                .lateness(period, warmup, samples)
                .map_err(|e| format!("{} timers at {period} ns: {e}", src.label()))?;
            let s = LatenessSummary::of(&lat).ok_or("no samples")?;
            eprintln!(
                "  {:<14} period={:>8} ns  median={:>9} p99={:>9} max={:>9} ns  early={}",
                src.label(),
                period,
                s.median,
                s.p99,
                s.max,
                s.early
            );
            if o.json {
                println!(
                    "{{\"bench\":\"timers\",\"backend\":\"{}\",\"period_ns\":{},\"samples\":{},\
                     \"median_late_ns\":{},\"p99_late_ns\":{},\"max_late_ns\":{},\"early\":{}}}",
                    src.label(),
                    period,
                    s.samples,
                    s.median,
                    s.p99,
                    s.max,
                    s.early
                );
            }
            rows.push((src, period, s));
        }
    }
    // The aio contexts set this thread's slack; ms-epoll ran with it too.
    let slack =
        aio::timer_slack_ns().map_or_else(|e| format!("unknown ({e})"), |v| format!("{v} ns"));
    eprintln!("timers: thread timer slack {slack}");
    if !o.json {
        println!("timers: lateness = t(callback) - deadline, Realtime clock; timer slack {slack}");
        println!(
            "{:<14} {:>8} {:>8} {:>12} {:>12} {:>12} {:>6}",
            "backend", "period", "samples", "median", "p99", "max", "early"
        );
        for (src, period, s) in &rows {
            println!(
                "{:<14} {:>8} {:>8} {:>12} {:>12} {:>12} {:>6}",
                src.label(),
                human(*period),
                s.samples,
                human(s.median),
                human(s.p99),
                human(s.max),
                s.early
            );
        }
        let early: usize = rows
            .iter()
            .filter(|(src, _, _)| *src != TimerSource::MsEpoll)
            .map(|(_, _, s)| s.early)
            .sum();
        println!();
        println!(
            "  {}  no aio timer fired early ({early} early fires)",
            if early == 0 { "PASS" } else { "MISS" }
        );
    }
    Ok(())
}

/// ns as a short human-readable duration.
fn human(ns: i64) -> String {
    let a = ns.unsigned_abs();
    if a >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if a >= 1_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

// ----- pingpong (hidden) -----------------------------------------------

fn pingpong(flavor: Flavor, idle: usize, iters: u64) -> bench::Result<()> {
    bench::raise_fd_limit_for(idle)?;
    let mut fx = Fixture::new(flavor, idle)?;
    let d = fx.run_timed(iters)?;
    eprintln!(
        "pingpong: backend={} idle_fds={idle} iters={iters} {:.1} ns/iter",
        fx.backend_name(),
        if iters == 0 {
            0.0
        } else {
            ns(d) / iters as f64
        }
    );
    if let Some(s) = fx.aio_stats() {
        eprintln!(
            "pingpong: stats iterations={} dispatches={} blocking_waits={} notify_writes={}",
            s.iterations, s.dispatches, s.blocking_waits, s.notify_writes
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_commands() {
        let o = |quick, json| Opts { quick, json };
        assert_eq!(
            parse(&args("fdscale")),
            Ok(Command::FdScale(o(false, false)))
        );
        assert_eq!(
            parse(&args("timers --json --quick")),
            Ok(Command::Timers(o(true, true)))
        );
        assert_eq!(parse(&args("--help")), Ok(Command::Help));
        assert_eq!(
            parse(&args("pingpong --iters 5 --backend ppoll --idle 3")),
            Ok(Command::PingPong {
                flavor: Flavor::Ppoll,
                idle: 3,
                iters: 5
            })
        );
        assert!(parse(&args("")).is_err());
        assert!(parse(&args("bogus")).is_err());
        assert!(parse(&args("fdscale --fast")).is_err());
        assert!(parse(&args("pingpong --iters")).is_err());
        assert!(parse(&args("pingpong --backend nope")).is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(999), "999 ns");
        assert_eq!(human(12_340), "12.3 us");
        assert_eq!(human(1_500_000), "1.50 ms");
    }
}
