//! The process-level layer of the runtime: the main loop (a main
//! `AioContext` plus an "iohandler" context that nested block-layer polls
//! never run), iothreads, and signal handling.

#![deny(unsafe_code)]

mod error;
mod iothread;
mod main_loop;

pub use error::{Error, Result};
pub use iothread::{IOThread, IOThreadOptions};
pub use main_loop::{MainLoop, MainLoopOptions, QuitHandle};
