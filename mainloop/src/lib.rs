//! The process-level layer of the runtime: the main loop (a main
//! `AioContext` plus an "iohandler" context that nested block-layer polls
//! never run), iothreads, signal handling, and a generic, QEMU-compatible
//! QMP server ([`qmp`]) that runs on an [`AioContext`](aio::AioContext).
//!
//! See `docs/qmp.md` in the repository for the protocol as implemented.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bitmap_qmp;
pub mod block_qmp;
pub mod create_qmp;
pub mod drive_qmp;
mod error;
pub mod export_qmp;
pub mod internal_snapshot_qmp;
mod iothread;
pub mod iothread_qmp;
pub mod job_qmp;
mod main_loop;
pub mod qmp;
pub mod qtest_server;
pub mod reopen_qmp;
pub mod snapshot_qmp;
pub mod transaction_qmp;

pub use error::{Error, Result};
pub use iothread::{IOThread, IOThreadOptions};
pub use main_loop::{MainLoop, MainLoopOptions, QuitHandle};

/// The examples in `docs/qmp.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/qmp.md")]
pub struct QmpDocDoctests;
