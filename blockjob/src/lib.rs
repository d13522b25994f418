//! The block layer and block jobs: QEMU's job model (states, verbs, pause
//! nesting, rate limits, events) with jobs as async state machines on an
//! `aio` context.

#![deny(unsafe_code)]

mod error;
pub mod job;

pub use error::{Error, Result};
