//! `aio-bench imgbench`: `aio-img bench` against `qemu-img bench`, the
//! same command line for both, alternating round by round.
//!
//! Rows: 4 KiB reads and writes at queue depth 1 and 32, on a raw and on a
//! preallocated (`preallocation=full`) qcow2 image, with the `threads` and
//! `io_uring` engines, on /dev/shm (page cache, `-t writeback`) and on a
//! disk directory with `-t none` (`O_DIRECT`). `qemu-img bench` walks the
//! image with a fixed step, it has no random mode; the step here is
//! 1 MiB + 4 KiB, so consecutive requests land in different clusters and
//! L2 ranges and the walk covers the image in strides. Each row reports
//! the median IOPS of each tool over the rounds (from the time the tools
//! print, "Run completed in X seconds.") and ours/QEMU as the median of
//! the rounds' ratios; which tool goes first alternates by round.

use std::path::{Path, PathBuf};

use crate::{median_in_place as median, run_tool};

/// What to run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ImgBenchOptions {
    /// Requests per run on /dev/shm at depth 1 (4x at depth 32); a fifth
    /// of that on disk.
    pub count: u64,
    /// Rounds per tool, alternating.
    pub rounds: usize,
    /// Image size in bytes.
    pub size: u64,
    /// The page-cache directory.
    pub shm: PathBuf,
    /// The disk directory (runs with `-t none`); `None` skips the disk rows.
    pub disk: Option<PathBuf>,
    /// Our `aio-img` (release build).
    pub aio_img: PathBuf,
}

impl Default for ImgBenchOptions {
    fn default() -> Self {
        let aio_img = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("aio-img")))
            .unwrap_or_else(|| PathBuf::from("aio-img"));
        ImgBenchOptions {
            count: 100_000,
            rounds: 3,
            size: 128 << 20,
            shm: PathBuf::from("/dev/shm"),
            disk: Some(PathBuf::from("/var/tmp")),
            aio_img,
        }
    }
}

/// One measured row.
#[derive(Clone, Debug)]
pub struct Row {
    /// `shm` or `disk`.
    pub medium: &'static str,
    /// `raw` or `qcow2`.
    pub format: &'static str,
    /// `threads` or `io_uring`.
    pub engine: &'static str,
    /// Writes (else reads).
    pub write: bool,
    /// Requests in flight.
    pub depth: u32,
    /// Median IOPS, ours.
    pub ours: f64,
    /// Median IOPS, qemu-img.
    pub qemu: f64,
    /// Ours/QEMU: the median of the rounds' ratios (each round runs both
    /// tools back to back, so drift of the machine or the disk between
    /// rounds cancels out of its ratio).
    pub ratio: f64,
}

/// The seconds a bench printed ("Run completed in X seconds.").
fn seconds(out: &str) -> Result<f64, String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|r| r.strip_suffix(" seconds."))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no run time in: {out}"))
}

/// Creates the image `dir/imgbench.FMT`, fully preallocated.
fn create(dir: &Path, format: &str, size: u64) -> Result<PathBuf, String> {
    let img = dir.join(format!("imgbench.{format}"));
    let path = img.to_str().ok_or("non-UTF-8 path")?;
    let size = size.to_string();
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            format,
            "-o",
            "preallocation=full",
            path,
            &size,
        ],
    )?;
    // The preallocated zeroes went through the page cache: write them back
    // now, not during the first `-t none` rows (an `O_DIRECT` request
    // flushes the dirty pages of its range first).
    run_tool("sync", &["-f", path])?;
    Ok(img)
}

/// Runs the rows; progress on stderr.
///
/// # Errors
///
/// A tool that fails or prints no run time, as text.
pub fn run(o: &ImgBenchOptions) -> Result<Vec<Row>, String> {
    let aio_img = o.aio_img.to_str().ok_or("non-UTF-8 aio-img path")?;
    let mut media = vec![("shm", o.shm.clone(), "writeback", o.count)];
    if let Some(d) = &o.disk {
        media.push(("disk", d.clone(), "none", (o.count / 5).max(1)));
    }
    let mut rows = Vec::new();
    for (medium, dir, cache, count) in media {
        for format in ["raw", "qcow2"] {
            let img = create(&dir, format, o.size)?;
            let path = img.to_str().ok_or("non-UTF-8 path")?.to_string();
            for engine in ["threads", "io_uring"] {
                for write in [false, true] {
                    for depth in [1u32, 32] {
                        // Depth 32 runs 4x the requests, so that its run
                        // (several times the IOPS of depth 1) still lasts
                        // about a second: 0.2 s runs varied by 50 % from
                        // one to the next on a shared machine.
                        let count = if depth == 32 { count * 4 } else { count };
                        let n = count as f64;
                        let count = count.to_string();
                        let d = depth.to_string();
                        let mut args = vec![
                            "bench", "-f", format, "-t", cache, "-i", engine, "-c", &count, "-d",
                            &d, "-s", "4096", "-S", "1052672",
                        ];
                        if write {
                            args.extend(["-w", "--pattern=165"]);
                        }
                        args.push(&path);
                        let (mut ours, mut qemu) = (Vec::new(), Vec::new());
                        for round in 0..o.rounds {
                            // Alternate which tool goes first.
                            let run = |tool: &str| -> Result<f64, String> {
                                Ok(n / seconds(&run_tool(tool, &args)?)?)
                            };
                            if round % 2 == 0 {
                                ours.push(run(aio_img)?);
                                qemu.push(run("qemu-img")?);
                            } else {
                                qemu.push(run("qemu-img")?);
                                ours.push(run(aio_img)?);
                            }
                        }
                        let mut ratios: Vec<f64> =
                            ours.iter().zip(&qemu).map(|(a, q)| a / q).collect();
                        let row = Row {
                            medium,
                            format,
                            engine,
                            write,
                            depth,
                            ours: median(&mut ours),
                            qemu: median(&mut qemu),
                            ratio: median(&mut ratios),
                        };
                        eprintln!("{}", line(&row));
                        rows.push(row);
                    }
                }
            }
            let _ = std::fs::remove_file(&img);
        }
    }
    Ok(rows)
}

fn line(r: &Row) -> String {
    format!(
        "| {:<4} | {:<5} | {:<8} | {:<5} | {:>2} | {:>9.0} | {:>9.0} | {:>5.2} |",
        r.medium,
        r.format,
        r.engine,
        if r.write { "write" } else { "read" },
        r.depth,
        r.ours,
        r.qemu,
        r.ratio
    )
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| medium | format | engine | op | depth | ours IOPS | qemu-img IOPS | ours/QEMU |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&line(r));
        s.push('\n');
    }
    s
}

/// `aio-bench imgbench [--quick] [--rounds N] [--count N] [--no-disk]
/// [--disk DIR] [--shm DIR] [--aio-img PATH]`: runs and prints the table.
///
/// # Errors
///
/// Bad options, or a failed run, as text.
pub fn main(args: &[String]) -> Result<(), String> {
    let mut o = ImgBenchOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {
                o.count = 10_000;
                o.rounds = 1;
                o.size = 32 << 20;
            }
            "--rounds" => o.rounds = value()?.parse().map_err(|_| "bad --rounds")?,
            "--count" => o.count = value()?.parse().map_err(|_| "bad --count")?,
            "--no-disk" => o.disk = None,
            "--disk" => o.disk = Some(PathBuf::from(value()?)),
            "--shm" => o.shm = PathBuf::from(value()?),
            "--aio-img" => o.aio_img = PathBuf::from(value()?),
            other => return Err(format!("unknown option for imgbench: {other}")),
        }
    }
    if o.rounds == 0 || o.count == 0 {
        return Err("--rounds and --count must be at least 1".into());
    }
    let rows = run(&o)?;
    print!("{}", table(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::seconds;

    #[test]
    fn seconds_when_qemu_output_then_parsed() {
        let out = "Sending 10 read requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)\nRun completed in 0.123 seconds.\n";
        assert_eq!(seconds(out), Ok(0.123));
        assert!(seconds("nothing").is_err());
    }
}
