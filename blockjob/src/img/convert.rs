//! `aio-img convert`: copy an image's guest view into a new image, as a
//! job, keeping it sparse.

use std::sync::Arc;

use aio::AioContext;

use super::chain;
use super::run::{close_after, run_chunks, run_job, ChunkStep, Interrupt, RunOptions};
use crate::block::{create_qcow2, create_raw, BlockGraph, BlockNode, CreateOptions, OpenOptions};
use crate::job::{BoxFuture, JobControl, JobDriver, JobOptions, JobRegistry, JobType};
use crate::{Error, Result};

/// The unit zeroes are detected in within data (QEMU's default `-S`:
/// 4 KiB).
const SPARSE: u64 = 4096;

/// The output format of [`convert()`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputFormat {
    /// A raw file (holes where the source reads zeroes).
    #[default]
    Raw,
    /// qcow2 (unallocated clusters where the source reads zeroes).
    Qcow2,
}

/// Options of [`convert()`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ConvertOptions {
    /// The output format (`-O`).
    pub output_format: OutputFormat,
    /// The output's cluster size (qcow2 `-o cluster_size=N`).
    pub cluster_size: Option<u64>,
    /// The output's backing file (`-B`, qcow2): only what the source's
    /// top layer allocates is copied, as `qemu-img convert -B` does (it
    /// assumes the backing file reads as the source's backing chain).
    pub backing: Option<String>,
    /// The backing file's format (`None`: probed).
    pub backing_format: Option<String>,
    /// The source's format, speed limit, progress bar.
    pub run: RunOptions,
}

impl ConvertOptions {
    /// A raw output, no backing file.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Writes `dst`, a new image of `src`'s size, with what `src` reads,
/// leaving ranges that read as zeroes unallocated (qcow2) or as holes
/// (raw). An existing `dst` is replaced.
///
/// # Errors
///
/// The source or backing file cannot be opened; a raw output with a
/// backing file; I/O errors; an interruption (the output is then
/// incomplete, and consistent).
pub async fn convert(ctx: &AioContext, src: &str, dst: &str, opts: &ConvertOptions) -> Result<()> {
    let intr = Interrupt::install()?;
    let g = BlockGraph::new();
    let r = async {
        let mut o = OpenOptions::new().read_only(true);
        if let Some(f) = &opts.run.format {
            o = o.format(f);
        }
        let source = g.open_image(src, &o).await?;
        refuse_overwriting_source(&source, dst)?;
        create_output(&g, &source, dst, opts).await?;
        let out_fmt = match opts.output_format {
            OutputFormat::Raw => "raw",
            OutputFormat::Qcow2 => "qcow2",
        };
        let target = g
            .open_image(dst, &OpenOptions::new().read_only(false).format(out_fmt))
            .await?;
        let driver = Arc::new(ConvertJob {
            src: source,
            dst: target,
            top_only: opts.backing.is_some(),
        });
        let reg = JobRegistry::new(aio::ClockType::Realtime);
        let job = reg.create(
            ctx,
            JobOptions::new("convert").speed(opts.run.speed),
            driver,
        )?;
        job.start();
        let what = format!("convert of '{src}' to '{dst}'");
        run_job(ctx, &job, &intr, &what, &opts.run).await
    }
    .await;
    close_after(&g, r).await
}

/// Refuses an output that is the source or one of its backing files
/// (creating it would destroy what is to be read).
fn refuse_overwriting_source(source: &Arc<BlockNode>, dst: &str) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(dst) else {
        return Ok(());
    };
    match source
        .chain()
        .iter()
        .find(|n| std::fs::canonicalize(n.filename()).is_ok_and(|c| c == out))
    {
        Some(n) => Err(Error::InvalidArgument(format!(
            "'{dst}' is '{}', which is read for the conversion: not overwriting it",
            n.filename()
        ))),
        None => Ok(()),
    }
}

async fn create_output(
    g: &BlockGraph,
    source: &BlockNode,
    dst: &str,
    opts: &ConvertOptions,
) -> Result<()> {
    let size = source.len();
    match opts.output_format {
        OutputFormat::Raw => {
            if opts.backing.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "'{dst}': raw images cannot have a backing file"
                )));
            }
            if opts.cluster_size.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "'{dst}': raw images have no cluster size"
                )));
            }
            create_raw(dst, size)
        }
        OutputFormat::Qcow2 => {
            let mut c = CreateOptions {
                size,
                ..CreateOptions::default()
            };
            if let Some(cs) = opts.cluster_size {
                c.cluster_size = cs;
            }
            if let Some(b) = &opts.backing {
                // It must open, relative to the output, as qemu-img checks.
                let mut o = OpenOptions::new().read_only(true);
                if let Some(f) = &opts.backing_format {
                    o = o.format(f);
                }
                let bn = g.open_image(chain::relative_to(dst, b), &o).await?;
                c.backing_file = Some(b.clone());
                c.backing_format = Some(bn.driver_name().to_string());
            }
            create_qcow2(dst, &c).await
        }
    }
}

/// The copy: ranges the source reads as zeroes are skipped (a new image
/// reads zeroes there), data is written in runs of non-zero 4 KiB pieces.
/// With a backing file (`top_only`), only the source's top layer is
/// copied, its zero ranges as zero writes (they hide the backing file).
struct ConvertJob {
    src: Arc<BlockNode>,
    dst: Arc<BlockNode>,
    top_only: bool,
}

/// What to do with a range.
enum Plan {
    Skip,
    Zero,
    Copy,
}

impl ConvertJob {
    async fn plan(&self, off: u64, want: u64) -> Result<(Plan, u64)> {
        if self.top_only {
            let (st, n) = self.src.block_status(off, want).await?;
            let plan = match (st.allocated, st.zero && !st.data) {
                (false, _) => Plan::Skip,
                (true, true) => Plan::Zero,
                (true, false) => Plan::Copy,
            };
            return Ok((plan, n));
        }
        let cs = self.src.chain_status(off, want).await?;
        let plan = if cs.status.zero && !cs.status.data {
            Plan::Skip
        } else {
            Plan::Copy
        };
        Ok((plan, cs.len.max(1)))
    }

    /// Copies `n` bytes at `off`, writing only the non-zero pieces (runs
    /// of them at once), or zero writes for them with a backing file.
    /// Returns the bytes written.
    async fn copy(&self, off: u64, n: u64) -> Result<u64> {
        let buf = self.src.read(off, vec![0; n as usize]).await?;
        let end = off + n;
        let mut written = 0;
        let mut run: Option<u64> = None;
        let mut s = off;
        while s <= end {
            let e = ((s / SPARSE + 1) * SPARSE).min(end);
            let zero = s == end
                || buf[(s - off) as usize..(e - off) as usize]
                    .iter()
                    .all(|&x| x == 0);
            match (zero, run) {
                (false, None) => run = Some(s),
                (true, Some(r)) => {
                    let piece = buf[(r - off) as usize..(s - off) as usize].to_vec();
                    written += piece.len() as u64;
                    self.dst.write(r, piece).await?;
                    run = None;
                }
                _ => {}
            }
            if zero && s < end && self.top_only {
                self.dst.write_zeroes(s, e - s).await?;
            }
            if s == end {
                break;
            }
            s = e;
        }
        Ok(written)
    }

    async fn one_step(&self, off: u64, want: u64) -> Result<(u64, u64)> {
        let (plan, n) = self.plan(off, want).await?;
        let written = match plan {
            Plan::Skip => 0,
            Plan::Zero => {
                self.dst.write_zeroes(off, n).await?;
                0
            }
            Plan::Copy => self.copy(off, n).await?,
        };
        Ok((n, written))
    }
}

impl ChunkStep for ConvertJob {
    fn step(&self, off: u64, want: u64) -> BoxFuture<'_, Result<(u64, u64)>> {
        Box::pin(self.one_step(off, want))
    }
}

impl JobDriver for ConvertJob {
    /// A full copy into a new image: what `blockdev-backup` does.
    fn job_type(&self) -> JobType {
        JobType::Backup
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(run_chunks(self, job, self.src.len()))
    }
    fn prepare<'a>(&'a self, _job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.dst.flush())
    }
}
