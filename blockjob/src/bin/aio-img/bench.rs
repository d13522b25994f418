//! `aio-img bench`: `qemu-img bench` on our block layer.
//!
//! ```text
//! aio-img bench [-f FMT] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET]
//!     [-s BUFFER_SIZE] [-S STEP_SIZE] [-i threads|io_uring] [-w [--pattern=BYTE]] FILE
//! ```
//!
//! The options mean what they mean to `qemu-img bench` (defaults: 75000
//! requests of 4 KiB, 64 in parallel, step = size, from offset 0, reads,
//! cache=writeback), so one command line runs against both. Request `i`
//! goes to `OFFSET + i * STEP`, wrapped to the image as QEMU does. The
//! image is opened through the same graph code `aiod` uses; `DEPTH`
//! requests are kept in flight as tasks on the one `AioContext`.
//! `-t none|directsync` opens with `O_DIRECT`; `writethrough` and
//! `directsync` flush after each write. `-i native` and `-n` (Linux AIO)
//! are refused: there is no such engine here (`-i io_uring` is).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::out;

use aio::file::Engine;
use blockjob::block::{BlockGraph, BlockNode, Buffer, OpenOptions};
use blockjob::{Error, Result};

/// What one run does.
struct Plan {
    count: u64,
    depth: u64,
    size: u64,
    step: u64,
    offset: u64,
    write: bool,
    pattern: u8,
    flush_each: bool,
    image_size: u64,
}

impl Plan {
    /// The offset of request `i`: QEMU's walk (step on, wrap to the part
    /// of the image where a whole request fits).
    /// The first request goes to `offset` as given; each next one `step`
    /// further, modulo `image_size - size` (0 if the image is no larger
    /// than a request).
    fn offset(&self, i: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if self.image_size <= self.size {
            return 0;
        }
        let span = self.image_size - self.size;
        // 64-bit arithmetic when it cannot overflow (a 128-bit `%` is a
        // library call, on every request).
        match self
            .step
            .checked_mul(i)
            .and_then(|x| x.checked_add(self.offset))
        {
            Some(x) => x % span,
            None => {
                let x = u128::from(self.offset) + u128::from(self.step) * u128::from(i);
                (x % u128::from(span)) as u64
            }
        }
    }
}

fn number(flag: &str, v: &str) -> Result<u64> {
    super::parse_size(v)
        .map_err(|_| Error::InvalidArgument(format!("Invalid {flag} specified: {v}")))
}

/// Runs `aio-img bench ARGS`.
pub(crate) async fn bench(args: &[String]) -> super::Outcome {
    let with_value = ["-f", "-t", "-c", "-d", "-o", "-s", "-S", "-i", "--pattern"];
    let (flags, pos) = super::parse(args, &with_value)?;
    let mut allowed = with_value.to_vec();
    allowed.extend(["-w", "-n", "-q"]);
    super::check_flags(&flags, &allowed)?;
    let file = pos.first().ok_or_else(super::usage)?;
    let get = |k: &str| super::flag(&flags, k);
    let engine = match get("-i") {
        None | Some("threads") => Engine::Threads,
        Some("io_uring") => Engine::IoUring,
        Some("native") => {
            return Err(Error::InvalidArgument(
                "aio=native (Linux AIO) is not supported; use -i io_uring or -i threads".into(),
            ))
        }
        Some(o) => return Err(Error::InvalidArgument(format!("Invalid aio option: {o}"))),
    };
    if get("-n").is_some() {
        return Err(Error::InvalidArgument(
            "-n (aio=native, Linux AIO) is not supported; use -i io_uring".into(),
        ));
    }
    let (direct, flush_each) = match get("-t").unwrap_or("writeback") {
        "writeback" | "unsafe" => (false, false),
        "writethrough" => (false, true),
        "none" => (true, false),
        "directsync" => (true, true),
        o => return Err(Error::InvalidArgument(format!("Invalid cache option: {o}"))),
    };
    let write = get("-w").is_some();
    let size = get("-s").map_or(Ok(4096), |v| number("buffer size", v))?;
    if size == 0 || size > i32::MAX as u64 {
        return Err(Error::InvalidArgument(
            "Invalid buffer size specified".into(),
        ));
    }
    let pattern = match get("--pattern") {
        None => 0,
        Some(v) => v
            .parse::<u8>()
            .map_err(|_| Error::InvalidArgument(format!("Invalid pattern byte specified: {v}")))?,
    };
    let depth = get("-d").map_or(Ok(64), |v| number("queue depth", v))?;
    if depth == 0 {
        return Err(Error::InvalidArgument(
            "Invalid queue depth specified".into(),
        ));
    }
    let mut open = OpenOptions::new()
        .read_only(!write)
        .engine(engine)
        .direct(direct)
        .no_backing(false);
    if let Some(f) = get("-f") {
        open = open.format(f);
    }
    let g = BlockGraph::new();
    let node = g.open_image(file, &open).await?;
    let plan = Arc::new(Plan {
        count: get("-c").map_or(Ok(75000), |v| number("request count", v))?,
        depth,
        size,
        step: get("-S").map_or(Ok(size), |v| number("step size", v))?,
        offset: get("-o").map_or(Ok(0), |v| number("offset", v))?,
        write,
        pattern,
        flush_each,
        image_size: node.len(),
    });
    if get("-q").is_none() {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            plan.count,
            if write { "write" } else { "read" },
            plan.size,
            plan.depth,
            plan.offset,
            plan.step
        );
    }
    let t0 = Instant::now();
    run(&node, &plan).await?;
    if write {
        node.flush().await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    if get("-q").is_none() {
        println!("Run completed in {secs:.3} seconds.");
    }
    g.close_all().await?;
    Ok(0)
}

/// Keeps `plan.depth` requests in flight: that many tasks on this
/// context, each taking the next request number when its last one ends.
async fn run(node: &Arc<BlockNode>, plan: &Arc<Plan>) -> Result<()> {
    let ctx = aio::AioContext::current()
        .ok_or_else(|| Error::InvalidArgument("bench must run on an AioContext".into()))?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..plan.depth.min(plan.count) {
        let (node, plan, next) = (node.clone(), plan.clone(), next.clone());
        tasks.push(ctx.spawn(async move {
            // Aligned (qemu-img bench allocates with qemu_blockalign too),
            // filled once and handed back by each write, as QEMU's bench
            // reuses its buffer.
            let aligned = |what: &str| {
                Buffer::aligned(plan.size as usize).map_err(|e| {
                    Error::InvalidArgument(format!("bench: allocating the {what} buffer: {e}"))
                })
            };
            let mut data = aligned("write")?;
            data.fill(plan.pattern);
            let mut buf = aligned("read")?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.count {
                    return Ok::<(), Error>(());
                }
                let off = plan.offset(i);
                if plan.write {
                    data = node.write_keep(off, data).await?;
                    if plan.flush_each {
                        node.flush().await?;
                    }
                } else {
                    buf = node.read(off, buf).await?;
                }
            }
        }));
    }
    let mut first_err = None;
    for t in tasks {
        let r = t
            .await
            .map_err(|e| Error::InvalidArgument(format!("bench task: {e}")))
            .and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::Plan;

    fn plan(image_size: u64, size: u64, step: u64, offset: u64) -> Plan {
        Plan {
            count: 0,
            depth: 1,
            size,
            step,
            offset,
            write: false,
            pattern: 0,
            flush_each: false,
            image_size,
        }
    }

    #[test]
    fn offset_when_past_end_then_wraps_inside_image() {
        let p = plan(64 << 10, 4096, 4096, 0);
        assert_eq!(p.offset(0), 0);
        assert_eq!(p.offset(1), 4096);
        // 60 KiB is where the last whole request fits; wrap there.
        assert!((0..100).all(|i| p.offset(i) + 4096 <= 64 << 10));
    }

    #[test]
    fn offset_when_step_times_index_overflows_then_wraps_like_128_bit() {
        let p = plan(1 << 30, 4096, u64::MAX / 3, 12345);
        let span = u128::from((1u64 << 30) - 4096);
        for i in [0u64, 1, 2, 3, 4, 1000] {
            let want = if i == 0 {
                12345
            } else {
                ((12345u128 + u128::from(u64::MAX / 3) * u128::from(i)) % span) as u64
            };
            assert_eq!(p.offset(i), want, "request {i}");
        }
    }

    #[test]
    fn offset_when_image_smaller_than_request_then_zero() {
        let p = plan(1024, 4096, 4096, 512);
        assert_eq!((p.offset(0), p.offset(7)), (512, 0));
    }
}
