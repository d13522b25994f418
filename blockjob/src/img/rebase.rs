//! `aio-img rebase`: `qemu-img rebase`, the safe mode as a job.

use std::sync::Arc;

use aio::AioContext;

use super::chain;
use super::run::{close_after, run_chunks, run_job, ChunkStep, Interrupt, RunOptions};
use crate::block::{BlockGraph, BlockNode, OpenOptions};
use crate::job::{BoxFuture, JobControl, JobDriver, JobOptions, JobRegistry, JobType};
use crate::jobs::allocated_above;
use crate::{Error, Result};

/// Options of [`rebase()`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RebaseOptions {
    /// The new backing file as it is to be recorded (relative names are
    /// relative to the image's directory); empty: none.
    pub backing: String,
    /// Its format (`-F`; `None`: probed).
    pub backing_format: Option<String>,
    /// Only rewrite the link (`-u`): no data is compared or copied, and
    /// neither backing chain is opened.
    pub unsafe_mode: bool,
    /// The image's format, speed limit, progress bar.
    pub run: RunOptions,
}

impl RebaseOptions {
    /// A safe rebase onto `backing` (`""`: onto nothing).
    pub fn new(backing: impl Into<String>) -> Self {
        Self {
            backing: backing.into(),
            ..Self::default()
        }
    }
}

/// Rebases `img` onto `opts.backing`. Safe mode: every range `img` does
/// not allocate itself and where the old chain and the new one read
/// differently gets the old contents written into `img` (a job: progress,
/// speed limit, Ctrl-C), then the link is rewritten, so `img` reads the
/// same before and after. Unsafe mode only rewrites the link.
///
/// # Errors
///
/// `img` or the new backing file cannot be opened (missing, bad format);
/// the new backing file is `img` or has it in its chain (a backing loop);
/// `img` is not qcow2; I/O errors; an interruption.
pub async fn rebase(ctx: &AioContext, img: &str, opts: &RebaseOptions) -> Result<()> {
    let intr = Interrupt::install()?;
    let g = BlockGraph::new();
    let r = if opts.unsafe_mode {
        rebase_unsafe(&g, img, opts).await
    } else {
        rebase_safe(ctx, &g, img, opts, &intr).await
    };
    close_after(&g, r).await
}

fn open_options(format: Option<&str>, writable: bool, no_backing: bool) -> OpenOptions {
    let mut o = OpenOptions::new()
        .read_only(!writable)
        .no_backing(no_backing);
    if let Some(f) = format {
        o = o.format(f);
    }
    o
}

fn refuse_non_qcow2(img: &str, node: &BlockNode) -> Result<()> {
    if node.driver_name() == "qcow2" {
        return Ok(());
    }
    Err(Error::unsupported(
        img,
        format!(
            "Driver '{}' does not support backing files",
            node.driver_name()
        ),
    ))
}

/// Refuses a new backing file that is `img` or has it in its chain.
fn refuse_loop(img: &str, new: &Arc<BlockNode>) -> Result<()> {
    let me = std::fs::canonicalize(img).ok();
    if new
        .chain()
        .iter()
        .any(|n| std::fs::canonicalize(n.filename()).ok() == me)
    {
        return Err(Error::InvalidArgument(format!(
            "Could not rebase '{img}' onto '{}': that would make a backing loop",
            new.filename()
        )));
    }
    Ok(())
}

async fn rebase_unsafe(g: &BlockGraph, img: &str, opts: &RebaseOptions) -> Result<()> {
    let node = g
        .open_image(img, &open_options(opts.run.format.as_deref(), true, true))
        .await?;
    refuse_non_qcow2(img, &node)?;
    if opts.backing.is_empty() {
        return node.set_backing_link(None, None).await;
    }
    let format = match &opts.backing_format {
        Some(f) => f.clone(),
        None => {
            // Probed, as qemu-img does; without -F the file must exist.
            let path = chain::relative_to(img, &opts.backing);
            let b = g
                .open_image(&path, &open_options(None, false, true))
                .await
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "Could not change the backing file of '{img}' to '{}': backing format must be specified ({e})",
                        opts.backing
                    ))
                })?;
            refuse_loop(img, &b)?;
            b.driver_name().to_string()
        }
    };
    node.set_backing_link(Some(&opts.backing), Some(&format))
        .await
}

async fn rebase_safe(
    ctx: &AioContext,
    g: &BlockGraph,
    img: &str,
    opts: &RebaseOptions,
    intr: &Interrupt,
) -> Result<()> {
    let node = g
        .open_image(img, &open_options(opts.run.format.as_deref(), true, false))
        .await?;
    refuse_non_qcow2(img, &node)?;
    let new = if opts.backing.is_empty() {
        None
    } else {
        let path = chain::relative_to(img, &opts.backing);
        let b = g
            .open_image(
                &path,
                &open_options(opts.backing_format.as_deref(), false, false),
            )
            .await?;
        refuse_loop(img, &b)?;
        Some(b)
    };
    // Where the new backing file is a layer of the old chain, only what
    // the layers above it allocate can differ.
    let old = node.chain();
    let above_common = new.as_ref().and_then(|n| {
        let c = std::fs::canonicalize(n.filename()).ok()?;
        let k = old
            .iter()
            .skip(1)
            .position(|o| std::fs::canonicalize(o.filename()).ok().as_ref() == Some(&c))?;
        Some(old[1..=k].to_vec())
    });
    let gran = node.info().cluster_size.unwrap_or(64 << 10);
    let driver = Arc::new(RebaseJob {
        img: node,
        new,
        above_common,
        link: (!opts.backing.is_empty()).then(|| opts.backing.clone()),
        gran,
    });
    let reg = JobRegistry::new(aio::ClockType::Realtime);
    let job = reg.create(ctx, JobOptions::new("rebase").speed(opts.run.speed), driver)?;
    job.start();
    run_job(ctx, &job, intr, &format!("rebase of '{img}'"), &opts.run).await
}

/// The safe rebase as a job driver. Its type is `stream`: it is one (copy
/// into the top what it reads through its backing file, then change the
/// link), with a comparison against the new backing file on the way.
struct RebaseJob {
    img: Arc<BlockNode>,
    new: Option<Arc<BlockNode>>,
    /// The old chain's layers above the new backing file, when that file
    /// is in the old chain.
    above_common: Option<Vec<Arc<BlockNode>>>,
    link: Option<String>,
    /// The unit of comparison and copy: the image's cluster size.
    gran: u64,
}

impl RebaseJob {
    /// What the new chain reads at `off` (zeroes past its end or with no
    /// backing file).
    async fn read_new(&self, off: u64, n: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n as usize];
        if let Some(b) = &self.new {
            if off < b.len() {
                let m = (b.len() - off).min(n);
                let part = b.read(off, vec![0; m as usize]).await?;
                buf[..m as usize].copy_from_slice(&part);
            }
        }
        Ok(buf)
    }

    /// Writes the pieces of `old` (at `off`) that differ from `new`, one
    /// granule at a time; returns the bytes written.
    async fn write_differences(&self, off: u64, old: &[u8], new: &[u8]) -> Result<u64> {
        let end = off + old.len() as u64;
        let mut written = 0;
        let mut s = off;
        while s < end {
            let e = ((s / self.gran + 1) * self.gran).min(end);
            let (a, b) = ((s - off) as usize, (e - off) as usize);
            if old[a..b] != new[a..b] {
                if old[a..b].iter().all(|&x| x == 0) {
                    self.img.write_zeroes(s, e - s).await?;
                } else {
                    self.img.write(s, old[a..b].to_vec()).await?;
                }
                written += e - s;
            }
            s = e;
        }
        Ok(written)
    }

    /// One chunk: skipped where the image allocates it or nothing
    /// between it and the common layer does; otherwise compared.
    async fn one_step(&self, off: u64, want: u64) -> Result<(u64, u64)> {
        let (st, mut n) = self.img.block_status(off, want).await?;
        let mut differs = !st.allocated;
        if differs {
            if let Some(layers) = &self.above_common {
                let (a, m) = allocated_above(layers, off, n).await?;
                differs = a;
                n = m;
            }
        }
        if !differs {
            return Ok((n, 0));
        }
        // Unallocated in the image: it reads the old chain here.
        let old = self.img.read(off, vec![0; n as usize]).await?;
        let new = self.read_new(off, n).await?;
        Ok((n, self.write_differences(off, &old, &new).await?))
    }
}

impl ChunkStep for RebaseJob {
    fn step(&self, off: u64, want: u64) -> BoxFuture<'_, Result<(u64, u64)>> {
        Box::pin(self.one_step(off, want))
    }
}

impl JobDriver for RebaseJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(run_chunks(self, job, self.img.len()))
    }
    fn prepare<'a>(&'a self, _job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // The copies are durable before the link stops naming the
            // chain they came from.
            self.img.flush().await?;
            self.img
                .set_backing(self.new.as_ref(), true, self.link.as_deref())
                .await
        })
    }
}
