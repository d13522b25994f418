//! `aio-img stream`: `block-stream` offline.

use aio::AioContext;

use super::chain;
use super::run::{close_after, run_job, Interrupt, RunOptions};
use crate::block::BlockGraph;
use crate::job::JobRegistry;
use crate::jobs::{start_stream, StreamArgs};
use crate::{Error, Result};

/// Options of [`stream()`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Stream from the layers above this image of the chain, which becomes
    /// the backing file (`None`: all of them; no backing file after).
    pub base: Option<String>,
    /// Format, speed limit, progress bar.
    pub run: RunOptions,
}

impl StreamOptions {
    /// Stream everything.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Copies into `top` what it reads from the layers between it and
/// `opts.base` with the `block-stream` job, then makes `base` (or
/// nothing) its backing file. The link recorded for the base is the one
/// the chain used for it (or its absolute path where that one would not
/// resolve from the top's directory).
///
/// # Errors
///
/// As [`commit`](super::commit()): open failures, a base not in the
/// chain (`Did not find 'B' in the backing chain of 'T'`), I/O errors, an
/// interruption.
pub async fn stream(ctx: &AioContext, top: &str, opts: &StreamOptions) -> Result<()> {
    let intr = Interrupt::install()?;
    let layers = chain::probe(top, opts.run.format.as_deref()).await?;
    let base = match &opts.base {
        None => None,
        Some(b) => Some(chain::find_or_fail(&layers, b)?),
    };
    if layers[0].format == "raw" {
        return Err(Error::unsupported(
            top,
            "Driver 'raw' does not support backing files",
        ));
    }
    let g = BlockGraph::new();
    let r = async {
        chain::open(&g, &layers, &[0]).await?;
        let reg = JobRegistry::new(aio::ClockType::Realtime);
        let mut args = StreamArgs::new("stream", chain::node_name(0));
        if let Some(b) = base {
            args.base_node = Some(chain::node_name(b));
            args.backing_file = Some(chain::link_for(&layers, b)?);
        }
        args.speed = i64::try_from(opts.run.speed).unwrap_or(i64::MAX);
        let job = start_stream(ctx, &g, &reg, args)?;
        run_job(ctx, &job, &intr, &format!("stream into '{top}'"), &opts.run).await
    }
    .await;
    close_after(&g, r).await
}
