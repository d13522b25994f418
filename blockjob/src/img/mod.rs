//! The offline `aio-img` commands that run block jobs: [`commit()`],
//! [`stream()`], [`rebase()`] and [`convert()`].
//!
//! Each opens its images in a graph of its own and runs a job on the
//! caller's [`AioContext`](aio::AioContext) through the same
//! [`JobRegistry`](crate::job::JobRegistry) machinery `aiod` uses:
//! `commit` and `stream` are the `block-commit` (active commit) and
//! `block-stream` jobs of [`crate::jobs`]; `rebase` and `convert` are
//! drivers of their own here, as QEMU's `qemu-img` has them outside its
//! job layer. A job reports progress (shown as a bar on a terminal with
//! `progress`), honours a speed limit, and stops at its next pause point
//! on SIGINT or SIGTERM: the command then closes every image (clearing
//! the qcow2 dirty bit) and returns [`Error::Failed`](crate::Error) saying
//! it was interrupted. What an interrupted command leaves is consistent
//! and running it again finishes the work:
//!
//! - commit: base holds part of the top's data, which the top still
//!   hides; the top is untouched.
//! - stream, rebase: the top holds part of what it read through its old
//!   backing chain; its backing link is unchanged.
//! - convert: the output holds part of the data.
//!
//! Each command blocks SIGINT and SIGTERM in the calling thread (and the
//! threads it spawns afterwards) for the rest of the process, so that they
//! queue for the command instead of killing it: it is meant for a tool's
//! main thread.

mod chain;
mod commit;
mod convert;
mod rebase;
mod run;
mod stream;

pub use commit::{commit, CommitOptions};
pub use convert::{convert, ConvertOptions, OutputFormat};
pub use rebase::{rebase, RebaseOptions};
pub use run::RunOptions;
pub use stream::{stream, StreamOptions};
