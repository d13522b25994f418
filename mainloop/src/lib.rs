//! The process-level layer of the runtime: the main loop (a main
//! `AioContext` plus an "iohandler" context that nested block-layer polls
//! never run), iothreads, signal handling, and a generic, QEMU-compatible
//! QMP server ([`qmp`]) that runs on an [`AioContext`](aio::AioContext).
//!
//! See `docs/qmp.md` in the repository for the protocol as implemented.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod block_qmp;
mod error;
pub mod export_qmp;
mod iothread;
pub mod job_qmp;
mod main_loop;
pub mod qmp;
pub mod qtest_server;

pub use error::{Error, Result};
pub use iothread::{IOThread, IOThreadOptions};
pub use main_loop::{MainLoop, MainLoopOptions, QuitHandle};

/// The examples in `docs/qmp.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/qmp.md")]
pub struct QmpDocDoctests;
