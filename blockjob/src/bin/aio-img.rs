//! `aio-img`: a small `qemu-img` on the blockjob block layer.
//!
//! ```text
//! aio-img create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o cluster_size=N,compat=1.1,refcount_bits=N,lazy_refcounts=on,preallocation=MODE] FILE [SIZE]
//! aio-img info [--backing-chain] [--output=json] FILE
//! aio-img map [--output=json] FILE
//! aio-img check [-r leaks|all] FILE
//! aio-img compare FILE1 FILE2
//! aio-img snapshot [-l | -c NAME | -a NAME | -d NAME] FILE
//! aio-img commit [-f FMT] [-b BASE] [-d] [-s SPEED] [-p] [-q] TOP
//! aio-img stream [-f FMT] [--base BASE] [-s SPEED] [-p] TOP
//! aio-img rebase [-f FMT] -b NEW [-F FMT] [-u] [-s SPEED] [-p] IMG
//! aio-img convert [-f FMT] [-O qcow2|raw] [-o cluster_size=N] [-B BACKING [-F FMT]] [-s SPEED] [-p] SRC DST
//! ```
//!
//! `commit`, `stream`, `rebase` and `convert` run as jobs
//! ([`blockjob::img`]): `-p` shows a progress bar, Ctrl-C stops them
//! cleanly (exit code 1, images consistent; run again to finish).
//!
//! Errors are one line on stderr, `aio-img: ...` naming the file, exit
//! code 1 (`compare`: 2, as qemu-img). `check` exits 0 when clean, 2 on
//! corruptions, 3 on leaks only, 63 for formats without checks.

use std::process::ExitCode;
use std::sync::Arc;

use blockjob::block::{
    create_qcow2, create_raw, map_to_qemu_json, BlockGraph, BlockNode, CheckOptions, CheckReport,
    CreateOptions, OpenOptions, Preallocation, SnapshotCreateOptions, SnapshotInfo, SnapshotRef,
};
use blockjob::img::{
    CommitOptions, ConvertOptions, OutputFormat, RebaseOptions, RunOptions, StreamOptions,
};
use blockjob::{Error, Result};
use serde_json::Value;

/// `println!`/`print!` that end the process quietly when stdout is a
/// closed pipe (`aio-img map IMG | head -1`), as Unix tools do, instead of
/// panicking on `EPIPE` (Rust ignores `SIGPIPE`).
macro_rules! println {
    () => { out(format_args!("\n")) };
    ($($t:tt)*) => { out(format_args!("{}\n", format_args!($($t)*))) };
}

macro_rules! print {
    ($($t:tt)*) => { out(format_args!($($t)*)) };
}

fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // What a shell reports for a process killed by SIGPIPE.
            std::process::exit(141);
        }
        eprintln!("aio-img: writing to stdout: {e}");
        std::process::exit(1);
    }
}

#[path = "aio-img/bench.rs"]
mod bench;

/// A command's outcome: an exit code, or an error to print.
type Outcome = Result<u8>;

fn usage() -> Error {
    Error::InvalidArgument(
        "usage: aio-img create|info|map|check|compare|snapshot|commit|stream|rebase|convert [options] FILE... (see --help)"
            .into(),
    )
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().cloned().unwrap_or_default();
    if cmd == "--help" || cmd == "-h" {
        println!("{}", HELP);
        return ExitCode::SUCCESS;
    }
    let rest = &args[args.len().min(1)..];
    let ctx = match aio::AioContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aio-img: {e}");
            return ExitCode::from(1);
        }
    };
    let r: Outcome = match cmd.as_str() {
        "create" => ctx.block_on(create(rest)),
        "info" => ctx.block_on(info(rest)),
        "map" => ctx.block_on(map(rest)),
        "check" => ctx.block_on(check(rest)),
        "bench" => ctx.block_on(bench::bench(rest)),
        "snapshot" => ctx.block_on(snapshot(rest)),
        "commit" => ctx.block_on(commit(&ctx, rest)),
        "stream" => ctx.block_on(stream(&ctx, rest)),
        "rebase" => ctx.block_on(rebase(&ctx, rest)),
        "convert" => ctx.block_on(convert(&ctx, rest)),
        "compare" => match ctx.block_on(compare(rest)) {
            Ok(c) => Ok(c),
            Err(e) => {
                eprintln!("aio-img: {}", one_line(&e));
                return ExitCode::from(2);
            }
        },
        _ => Err(usage()),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("aio-img: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

const HELP: &str = "aio-img create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o cluster_size=N,compat=0.10|1.1,refcount_bits=N,lazy_refcounts=on|off,extended_l2=on|off,preallocation=off|metadata|falloc|full] FILE [SIZE]
aio-img info [--backing-chain] [--output=json] FILE
aio-img map [--output=json] FILE
aio-img check [-r leaks|all] FILE
aio-img compare FILE1 FILE2
aio-img snapshot [-l | -c NAME | -a NAME | -d NAME] FILE
aio-img commit [-f FMT] [-b BASE] [-d] [-s SPEED] [-p] [-q] TOP
    commit TOP into its backing file (or BASE), then empty TOP (not with -d or -b)
aio-img stream [-f FMT] [--base BASE] [-s SPEED] [-p] TOP
    copy into TOP what it reads from the layers above BASE; BASE (or none) becomes its backing file
aio-img rebase [-f FMT] -b NEW [-F FMT] [-u] [-s SPEED] [-p] IMG
    make NEW ('' for none) IMG's backing file, copying what would change (-u: only the link)
aio-img convert [-f FMT] [-O qcow2|raw] [-o cluster_size=N] [-B BACKING [-F FMT]] [-s SPEED] [-p] SRC DST
    copy SRC's contents into a new image DST, leaving zero ranges sparse
aio-img bench [-f FMT] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET] [-s SIZE] [-S STEP] [-i threads|io_uring] [-w [--pattern=BYTE]] FILE
SPEED: bytes/s (suffixes k, M, G). -p: progress bar. Ctrl-C stops a job cleanly (exit code 1).";

fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}

/// Splits `args` into flags (with values for those in `with_value`) and
/// positional arguments.
/// Parsed command line: (flag, value) pairs and positional arguments.
type Parsed = (Vec<(String, String)>, Vec<String>);

fn parse(args: &[String], with_value: &[&str]) -> Result<Parsed> {
    let mut flags = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some((k, v)) = a.split_once('=').filter(|_| a.starts_with("--")) {
            flags.push((k.to_string(), v.to_string()));
        } else if with_value.contains(&a.as_str()) {
            let v = args
                .get(i + 1)
                .ok_or_else(|| Error::InvalidArgument(format!("option '{a}' needs a value")))?;
            flags.push((a.clone(), v.clone()));
            i += 1;
        } else if a.starts_with('-') && a.len() > 1 {
            flags.push((a.clone(), String::new()));
        } else {
            pos.push(a.clone());
        }
        i += 1;
    }
    Ok((flags, pos))
}

fn flag<'a>(flags: &'a [(String, String)], k: &str) -> Option<&'a str> {
    flags
        .iter()
        .rev()
        .find(|(f, _)| f == k)
        .map(|(_, v)| v.as_str())
}

fn check_flags(flags: &[(String, String)], allowed: &[&str]) -> Result<()> {
    match flags.iter().find(|(f, _)| !allowed.contains(&f.as_str())) {
        Some((f, _)) => Err(Error::InvalidArgument(format!("unknown option '{f}'"))),
        None => Ok(()),
    }
}

fn json_output(flags: &[(String, String)]) -> Result<bool> {
    match flag(flags, "--output") {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(o) => Err(Error::InvalidArgument(format!(
            "--output must be human or json, not '{o}'"
        ))),
    }
}

/// `1M`, `64k`, `512` → bytes.
fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::InvalidArgument(format!("Invalid image size specified: '{s}'"));
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(bad()),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(bad)
}

async fn open_ro(g: &BlockGraph, file: &str) -> Result<Arc<BlockNode>> {
    g.open_image(file, &OpenOptions::new().read_only(true))
        .await
}

async fn create(args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-b", "-F", "-o"])?;
    check_flags(&flags, &["-f", "-b", "-F", "-o", "-q"])?;
    let file = pos.first().ok_or_else(usage)?;
    let fmt = flag(&flags, "-f").unwrap_or("raw");
    let backing = flag(&flags, "-b");
    let size = match pos.get(1) {
        Some(s) => Some(parse_size(s)?),
        None => None,
    };
    match fmt {
        "raw" => {
            if backing.is_some() {
                return Err(Error::InvalidArgument(
                    "raw images cannot have a backing file".into(),
                ));
            }
            let size = size.ok_or_else(|| {
                Error::InvalidArgument("Image creation needs a size parameter".into())
            })?;
            create_raw(file, size)?;
            Ok(0)
        }
        "qcow2" => {
            let mut o = CreateOptions::default();
            if let Some(opts) = flag(&flags, "-o") {
                for kv in opts.split(',').filter(|s| !s.is_empty()) {
                    match kv.split_once('=') {
                        Some(("cluster_size", v)) => o.cluster_size = parse_size(v)?,
                        Some(("compat", "1.1" | "v3")) => o.version = 3,
                        Some(("compat", "0.10" | "v2")) => o.version = 2,
                        Some(("refcount_bits", v)) => {
                            o.refcount_bits = v.parse().map_err(|_| {
                                Error::InvalidArgument(format!("Invalid refcount_bits '{v}'"))
                            })?
                        }
                        Some(("extended_l2", "on" | "true")) => o.extended_l2 = true,
                        Some(("extended_l2", "off" | "false")) => o.extended_l2 = false,
                        Some(("lazy_refcounts", "on" | "true")) => o.lazy_refcounts = true,
                        Some(("lazy_refcounts", "off" | "false")) => o.lazy_refcounts = false,
                        Some(("preallocation", v)) => {
                            o.preallocation = Preallocation::parse(v).ok_or_else(|| {
                                Error::InvalidArgument(format!("Invalid preallocation mode: '{v}'"))
                            })?
                        }
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "Invalid option '{kv}' for qcow2"
                            )))
                        }
                    }
                }
            }
            if let Some(b) = backing {
                let bfmt = flag(&flags, "-F");
                let size_needed = size.is_none();
                // Like qemu-img: the backing file must open, relative to the new image.
                let dir = std::path::Path::new(file)
                    .parent()
                    .unwrap_or(std::path::Path::new(""));
                let bpath = if std::path::Path::new(b).is_absolute() {
                    b.into()
                } else {
                    dir.join(b)
                };
                let g = BlockGraph::new();
                let mut bo = OpenOptions::new().read_only(true);
                if let Some(f) = bfmt {
                    bo = bo.format(f);
                }
                let bn = g.open_image(&bpath, &bo).await?;
                let fmt_name = bfmt
                    .map(str::to_string)
                    .unwrap_or_else(|| bn.driver_name().to_string());
                o.size = if size_needed {
                    bn.len()
                } else {
                    size.unwrap_or(0)
                };
                o.backing_file = Some(b.to_string());
                o.backing_format = Some(fmt_name);
                g.close_all().await?;
            } else {
                o.size = size.ok_or_else(|| {
                    Error::InvalidArgument("Image creation needs a size parameter".into())
                })?;
            }
            create_qcow2(file, &o).await?;
            Ok(0)
        }
        other => Err(Error::InvalidArgument(format!(
            "Unknown file format '{other}'"
        ))),
    }
}

async fn info_human(n: &Arc<BlockNode>) -> String {
    let i = n.info();
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\n",
        i.filename,
        i.format,
        human_size(i.virtual_size),
        i.virtual_size
    );
    if let Ok(md) = std::fs::metadata(&i.filename) {
        use std::os::unix::fs::MetadataExt;
        s += &format!("disk size: {}\n", human_size(md.blocks() * 512));
    }
    if let Some(cs) = i.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &i.backing_filename {
        s += &format!("backing file: {b}");
        if let Some(bn) = n.backing() {
            if bn.filename() != b {
                s += &format!(" (actual path: {})", bn.filename());
            }
        }
        s.push('\n');
    }
    if let Some(f) = &i.backing_format {
        s += &format!("backing file format: {f}\n");
    }
    if n.supports_snapshots() {
        s += &snapshot_table(&n.snapshot_list().await.unwrap_or_default());
    }
    if !i.specific.is_empty() {
        s += "Format specific information:\n";
        for (k, v) in &i.specific {
            human_value(&mut s, 4, &k.replace('-', " "), v);
        }
    }
    s
}

/// One `key: value` line, or for lists and objects (qcow2 `bitmaps`) a
/// `key:` line and the members below it, indented as `qemu-img info`
/// prints them (`[0]: ...`; `flags`, `name`, `granularity` first).
fn human_value(s: &mut String, indent: usize, key: &str, v: &Value) {
    let pad = " ".repeat(indent);
    match v {
        Value::Array(a) => {
            *s += &format!("{pad}{key}:\n");
            for (i, x) in a.iter().enumerate() {
                human_value(s, indent + 4, &format!("[{i}]"), x);
            }
        }
        Value::Object(o) => {
            *s += &format!("{pad}{key}:\n");
            let first = ["flags", "name", "granularity"];
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_by_key(|k| first.iter().position(|f| f == k).unwrap_or(first.len()));
            for k in keys {
                human_value(s, indent + 4, k, &o[k]);
            }
        }
        Value::String(x) => *s += &format!("{pad}{key}: {x}\n"),
        v => *s += &format!("{pad}{key}: {v}\n"),
    }
}

fn human_size(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", U[u])
    } else {
        format!("{v:.3} {}", U[u]).trim_end_matches('0').to_string()
    }
}

async fn info(args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f"])?;
    check_flags(&flags, &["--backing-chain", "--output", "-f"])?;
    let file = pos.first().ok_or_else(usage)?;
    let as_json = json_output(&flags)?;
    let g = BlockGraph::new();
    let top = open_ro(&g, file).await?;
    let chain = if flag(&flags, "--backing-chain").is_some() {
        top.chain()
    } else {
        vec![top.clone()]
    };
    if as_json {
        let mut v: Vec<Value> = Vec::with_capacity(chain.len());
        for n in &chain {
            v.push(blockjob::block::image_info_json(n).await);
        }
        let out = if flag(&flags, "--backing-chain").is_some() {
            Value::Array(v)
        } else {
            v.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        let mut parts: Vec<String> = Vec::with_capacity(chain.len());
        for n in &chain {
            parts.push(info_human(n).await);
        }
        print!("{}", parts.join("\n"));
    }
    Ok(0)
}

async fn map(args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f"])?;
    check_flags(&flags, &["--output", "-f"])?;
    let file = pos.first().ok_or_else(usage)?;
    let as_json = json_output(&flags)?;
    let g = BlockGraph::new();
    let top = open_ro(&g, file).await?;
    let entries = top.map().await?;
    if as_json {
        print!("{}", map_to_qemu_json(&entries));
    } else {
        let chain = top.chain();
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for e in entries.iter().filter(|e| e.data && e.offset.is_some()) {
            let f = chain
                .get(e.depth)
                .map(|n| n.filename().to_string())
                .unwrap_or_default();
            println!(
                "{:<#16x}{:<#16x}{:<#16x}{f}",
                e.start,
                e.length,
                e.offset.unwrap_or(0)
            );
        }
    }
    Ok(0)
}

async fn check(args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-r"])?;
    check_flags(&flags, &["-f", "-q", "-r", "--repair", "--output"])?;
    let file = pos.first().ok_or_else(usage)?;
    let as_json = json_output(&flags)?;
    let opts = match flag(&flags, "-r").or(flag(&flags, "--repair")) {
        None => CheckOptions::new(),
        Some("leaks") => CheckOptions::leaks(),
        Some("all") => CheckOptions::all(),
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {other}"
            )))
        }
    };
    let repair = opts != CheckOptions::new();
    let g = BlockGraph::new();
    let mut open = OpenOptions::new().read_only(!repair).no_backing(true);
    if let Some(f) = flag(&flags, "-f") {
        open = open.format(f);
    }
    let top = g.open_image(file, &open).await?;
    let Some(mut r) = top.check_repair(&opts).await? else {
        eprintln!("aio-img: This image format does not support checks");
        return Ok(63);
    };
    // As qemu-img: what the check found and did on stderr, the summary on
    // stdout; after repairs, the summary is that of a second check (with
    // the first one's repair counts in JSON).
    for l in r.corruptions.iter().chain(&r.leaks).chain(&r.repairs) {
        eprintln!("{l}");
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        if !as_json {
            println!("The following inconsistencies were found and repaired:\n");
            println!("    {} leaked clusters", r.leaks_fixed);
            println!("    {} corruptions\n", r.corruptions_fixed);
            println!("Double checking the fixed image now...");
        }
        let (leaks_fixed, corruptions_fixed) = (r.leaks_fixed, r.corruptions_fixed);
        r = top.check().await?.unwrap_or_default();
        r.leaks_fixed = leaks_fixed;
        r.corruptions_fixed = corruptions_fixed;
        for l in r.corruptions.iter().chain(&r.leaks) {
            eprintln!("{l}");
        }
    }
    let code = if as_json {
        println!("{}", r.to_qemu_json(file, top.driver_name()));
        check_exit_code(&r)
    } else {
        print_check_summary(&r)
    };
    top.close().await?;
    Ok(code)
}

/// Prints `qemu-img check`'s summary of `r`; returns its exit code.
fn print_check_summary(r: &CheckReport) -> u8 {
    if r.corruptions.is_empty() && r.leaks.is_empty() {
        println!("No errors were found on the image.");
    } else {
        if !r.corruptions.is_empty() {
            println!();
            println!("{} errors were found on the image.", r.corruptions.len());
            println!("Data may be corrupted, or further writes to the image may corrupt it.");
        }
        if !r.leaks.is_empty() {
            println!();
            println!("{} leaked clusters were found on the image.", r.leaks.len());
            println!("This means waste of disk space, but no harm to data.");
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
    check_exit_code(r)
}

/// `qemu-img check`'s exit code for `r`: 2 corrupt, 3 leaks only, 0 clean.
fn check_exit_code(r: &CheckReport) -> u8 {
    if !r.corruptions.is_empty() {
        2
    } else if !r.leaks.is_empty() {
        3
    } else {
        0
    }
}

async fn compare(args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-F"])?;
    check_flags(&flags, &["-f", "-F", "-q", "-s"])?;
    let (a, b) = match (pos.first(), pos.get(1)) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(usage()),
    };
    let g = BlockGraph::new();
    let open = |f: &str, fmt: Option<&str>| {
        let mut o = OpenOptions::new().read_only(true);
        if let Some(fmt) = fmt {
            o = o.format(fmt);
        }
        (f.to_string(), o)
    };
    let (fa, oa) = open(a, flag(&flags, "-f"));
    let (fb, ob) = open(b, flag(&flags, "-F"));
    let na = g.open_image(&fa, &oa).await?;
    let nb = g.open_image(&fb, &ob).await?;
    let strict = flag(&flags, "-s").is_some();
    if strict && na.len() != nb.len() {
        println!("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let common = na.len().min(nb.len());
    const CHUNK: u64 = 1 << 20;
    let mut pos = 0;
    while pos < common {
        let n = CHUNK.min(common - pos);
        let x = na.read(pos, vec![0; n as usize]).await?;
        let y = nb.read(pos, vec![0; n as usize]).await?;
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            println!("Content mismatch at offset {}!", pos + i as u64);
            return Ok(1);
        }
        pos += n;
    }
    let longer = if na.len() > nb.len() { &na } else { &nb };
    while pos < longer.len() {
        let n = CHUNK.min(longer.len() - pos);
        let x = longer.read(pos, vec![0; n as usize]).await?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            println!("Content mismatch at offset {}!", pos + i as u64);
            return Ok(1);
        }
        pos += n;
    }
    println!("Images are identical.");
    Ok(0)
}

/// `qemu-img snapshot`: `-l` lists (nothing for formats without
/// snapshots), `-c` creates, `-a` applies (reverts to), `-d` deletes;
/// errors read `Could not create snapshot 'NAME': REASON`.
async fn snapshot(args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-c", "-a", "-d"])?;
    check_flags(&flags, &["-f", "-l", "-c", "-a", "-d", "-q", "-U"])?;
    let file = pos.first().ok_or_else(usage)?;
    let actions: Vec<&(String, String)> = flags
        .iter()
        .filter(|(f, _)| ["-l", "-c", "-a", "-d"].contains(&f.as_str()))
        .collect();
    let [(action, name)] = actions[..] else {
        return Err(Error::InvalidArgument(
            "Cannot mix '-l', '-a', '-c', '-d'".into(),
        ));
    };
    let g = BlockGraph::new();
    let mut o = OpenOptions::new()
        .read_only(action == "-l")
        .no_backing(true);
    if let Some(f) = flag(&flags, "-f") {
        o = o.format(f);
    }
    let node = g.open_image(file, &o).await?;
    let which = SnapshotRef::IdOrName(name.clone());
    let (r, verb) = match action.as_str() {
        "-l" => {
            if let Ok(list) = node.snapshot_list().await {
                print!("{}", snapshot_table(&list));
            }
            (Ok(()), "list")
        }
        "-c" => (
            node.snapshot_create(&SnapshotCreateOptions::new(name.clone()).icount(0))
                .await
                .map(drop),
            "create",
        ),
        "-a" => (node.snapshot_goto(&which).await.map(drop), "apply"),
        _ => (node.snapshot_delete(&which).await.map(drop), "delete"),
    };
    let closed = g.close_all().await;
    r.map_err(|e| {
        Error::InvalidArgument(format!(
            "Could not {verb} snapshot '{name}': {}",
            one_line(&e)
        ))
    })?;
    closed?;
    Ok(0)
}

/// `qemu-img snapshot -l`'s table (QEMU's `bdrv_snapshot_dump`); empty
/// when there are no snapshots.
fn snapshot_table(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "Snapshot list:\n{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    let tz = jiff::tz::TimeZone::system();
    for sn in list {
        let date = jiff::Timestamp::from_second(i64::from(sn.date_sec))
            .map(|t| {
                t.to_zoned_datetime(tz.clone())
                    .strftime("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_default();
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s += &format!(
            "{:<7} {:<16} {:>8}{:>20}{:>16}{:>11}\n",
            sn.id,
            sn.name,
            qemu_size_to_str(sn.vm_state_size),
            date,
            clock,
            icount
        );
    }
    s
}

/// QEMU's `size_to_str`: three significant digits and a binary unit.
fn qemu_size_to_str(n: u64) -> String {
    const U: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 * 0.95 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    // `%0.3g`: three significant digits, no trailing zeroes.
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let t = format!("{v:.digits$}");
    let t = if t.contains('.') {
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        t
    };
    format!("{t} {}", U[u])
}

/// `-f FMT`, `-s SPEED` (or qemu-img's `-r`; bytes/s, size suffixes)
/// and `-p`.
fn run_options(flags: &[(String, String)]) -> Result<RunOptions> {
    let mut o = RunOptions::new();
    o.format = flag(flags, "-f").map(str::to_string);
    o.speed = match flag(flags, "-s").or(flag(flags, "-r")) {
        Some(s) => parse_size(s)?,
        None => 0,
    };
    o.progress = flag(flags, "-p").is_some();
    Ok(o)
}

/// The single positional argument a job command takes.
fn one_image<'a>(pos: &'a [String], cmd: &str) -> Result<&'a str> {
    match pos {
        [f] => Ok(f),
        _ => Err(Error::InvalidArgument(format!(
            "{cmd} takes one image file name (see --help)"
        ))),
    }
}

async fn commit(ctx: &aio::AioContext, args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-b", "-s", "-r", "-t"])?;
    check_flags(&flags, &["-f", "-b", "-s", "-r", "-t", "-d", "-p", "-q"])?;
    let top = one_image(&pos, "commit")?;
    let mut o = CommitOptions::new();
    o.base = flag(&flags, "-b").map(str::to_string);
    o.drop = flag(&flags, "-d").is_some();
    o.run = run_options(&flags)?;
    blockjob::img::commit(ctx, top, &o).await?;
    if flag(&flags, "-q").is_none() {
        println!("Image committed.");
    }
    Ok(0)
}

async fn stream(ctx: &aio::AioContext, args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "--base", "-s"])?;
    check_flags(&flags, &["-f", "--base", "-s", "-p", "-q"])?;
    let top = one_image(&pos, "stream")?;
    let mut o = StreamOptions::new();
    o.base = flag(&flags, "--base").map(str::to_string);
    o.run = run_options(&flags)?;
    blockjob::img::stream(ctx, top, &o).await?;
    Ok(0)
}

async fn rebase(ctx: &aio::AioContext, args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-b", "-F", "-s", "-t", "-T"])?;
    check_flags(
        &flags,
        &["-f", "-b", "-F", "-s", "-t", "-T", "-u", "-p", "-q"],
    )?;
    let img = one_image(&pos, "rebase")?;
    let backing = flag(&flags, "-b").ok_or_else(|| {
        Error::InvalidArgument("rebase needs -b NEW_BACKING ('' for none)".into())
    })?;
    let mut o = RebaseOptions::new(backing);
    o.backing_format = flag(&flags, "-F").map(str::to_string);
    o.unsafe_mode = flag(&flags, "-u").is_some();
    o.run = run_options(&flags)?;
    blockjob::img::rebase(ctx, img, &o).await?;
    Ok(0)
}

async fn convert(ctx: &aio::AioContext, args: &[String]) -> Outcome {
    let (flags, pos) = parse(args, &["-f", "-O", "-o", "-B", "-F", "-s"])?;
    check_flags(&flags, &["-f", "-O", "-o", "-B", "-F", "-s", "-p", "-q"])?;
    let [src, dst] = &pos[..] else {
        return Err(Error::InvalidArgument(
            "convert takes a source and a target file name (see --help)".into(),
        ));
    };
    let mut o = ConvertOptions::new();
    o.output_format = match flag(&flags, "-O").unwrap_or("raw") {
        "raw" => OutputFormat::Raw,
        "qcow2" => OutputFormat::Qcow2,
        other => {
            return Err(Error::InvalidArgument(format!(
                "Unknown file format '{other}'"
            )))
        }
    };
    for kv in flag(&flags, "-o")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        match kv.split_once('=') {
            Some(("cluster_size", v)) => o.cluster_size = Some(parse_size(v)?),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "Invalid option '{kv}' for convert"
                )))
            }
        }
    }
    o.backing = flag(&flags, "-B").map(str::to_string);
    o.backing_format = flag(&flags, "-F").map(str::to_string);
    o.run = run_options(&flags)?;
    blockjob::img::convert(ctx, src, dst, &o).await?;
    Ok(0)
}
