//! `aio-img commit`: `qemu-img commit` on the active-commit job.

use aio::AioContext;

use super::chain;
use super::run::{close_after, run_job, Interrupt, RunOptions};
use crate::block::BlockGraph;
use crate::job::JobRegistry;
use crate::jobs::{start_commit, CommitArgs};
use crate::{Error, Result};

/// Options of [`commit()`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct CommitOptions {
    /// Commit into this image of the chain (`-b`; default: the top's
    /// backing file). Implies [`drop`](Self::drop), as in `qemu-img`.
    pub base: Option<String>,
    /// Leave the top as it is (`-d`) instead of emptying it.
    pub drop: bool,
    /// Format, speed limit, progress bar.
    pub run: RunOptions,
}

impl CommitOptions {
    /// QEMU's defaults: into the backing file, then empty the top.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Commits `top` into its backing file (or `opts.base`) with the
/// `block-commit` job (active commit, completed once READY), then, unless
/// `-d` or `-b`, empties `top` so that it reads through to what now holds
/// its data. Like `qemu-img commit`, no backing link changes: layers
/// between the top and an explicit base read wrongly afterwards (base
/// holds data from above them).
///
/// # Errors
///
/// The top or a backing file cannot be opened (missing, bad format,
/// backing loop); the top has no backing file; `base` is not in its chain
/// (`Did not find 'B' in the backing chain of 'T'`); I/O errors; an
/// interruption.
pub async fn commit(ctx: &AioContext, top: &str, opts: &CommitOptions) -> Result<()> {
    let intr = Interrupt::install()?;
    let layers = chain::probe(top, opts.run.format.as_deref()).await?;
    if layers.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "'{top}' has no backing file to commit into"
        )));
    }
    let base = match &opts.base {
        None => 1,
        Some(b) => chain::find_or_fail(&layers, b)?,
    };
    let empty_top = !opts.drop && opts.base.is_none();
    let writable: &[usize] = if empty_top { &[0, base] } else { &[base] };
    let g = BlockGraph::new();
    let r = async {
        let nodes = chain::open(&g, &layers, writable).await?;
        let reg = JobRegistry::new(aio::ClockType::Realtime);
        let mut args = CommitArgs::new("commit", chain::node_name(0));
        args.base_node = Some(chain::node_name(base));
        args.speed = i64::try_from(opts.run.speed).unwrap_or(i64::MAX);
        let job = start_commit(ctx, &g, &reg, args)?;
        let what = format!("commit of '{top}'");
        run_job(ctx, &job, &intr, &what, &opts.run).await?;
        if empty_top {
            nodes[0].make_empty().await?;
        }
        Ok(())
    }
    .await;
    close_after(&g, r).await
}
