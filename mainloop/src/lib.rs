//! The daemon side of the runtime. Today: a generic, QEMU-compatible QMP
//! server ([`qmp`]) that runs on an [`AioContext`](aio::AioContext). The
//! main loop, IOThreads and signal handling join it later.
//!
//! See `docs/qmp.md` in the repository for the protocol as implemented.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod qmp;

/// The examples in `docs/qmp.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/qmp.md")]
pub struct QmpDocDoctests;
