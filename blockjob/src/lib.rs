//! A QEMU-style block layer and block jobs on the `aio` runtime: a graph of
//! block nodes (`file`, `raw`, `qcow2`, `null-co`) with backing chains and
//! permissions, block status across a chain, the `aio-img` tool, and QEMU's
//! job model (states, verbs, pause nesting, rate limits, events) with jobs
//! as async state machines on a context, and the four block jobs on it
//! ([`jobs`]: stream, commit, mirror, backup).
//!
//! Every image this crate writes is one QEMU reads the same way; the tests
//! check that against `qemu-img` and `qemu-io`.
//!
//! ```no_run
//! use blockjob::block::{BlockGraph, OpenOptions};
//! let ctx = aio::AioContext::new()?;
//! let graph = BlockGraph::new();
//! let top = ctx.block_on(graph.open_image("top.qcow2", &OpenOptions::new().read_only(true)))?;
//! let data = ctx.block_on(top.read(0, vec![0; 4096]))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See `docs/architecture.md` in the repository for the design.

#![deny(unsafe_code)]

pub mod block;
mod error;
pub mod img;
pub mod job;
pub mod jobs;
pub mod nbd;

pub use error::{Error, Result};
