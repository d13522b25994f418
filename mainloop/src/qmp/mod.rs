//! A QEMU-compatible QMP (QEMU Machine Protocol) server on an
//! [`AioContext`](aio::AioContext).
//!
//! The server is generic: it knows the protocol and four built-in commands
//! (`qmp_capabilities`, `query-version`, `query-commands`, `quit`); the
//! embedder registers everything else and emits events. What clients see —
//! greeting, negotiation, framing, limits and the exact error texts — is
//! described in `docs/qmp.md`, and matches QEMU 10 except where that
//! document says otherwise.
//!
//! ```
//! use aio::AioContext;
//! use mainloop::qmp::{QmpError, QmpServer, QmpServerOptions};
//!
//! mainloop::qmp_args! {
//!     /// Arguments of `block-job-set-speed`.
//!     pub struct SetSpeed {
//!         /// The job.
//!         pub device: String,
//!         /// Bytes per second.
//!         pub speed: i64,
//!     }
//! }
//!
//! let ctx = AioContext::new()?;
//! let server = QmpServer::new(&ctx, QmpServerOptions::new());
//! server.register("block-job-set-speed", |a: SetSpeed| {
//!     if a.speed < 0 {
//!         return Err(QmpError::generic("Parameter 'speed' expects a non-negative value"));
//!     }
//!     Ok(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Code map: [`protocol`] (wire format), `framing` (the streaming JSON
//! splitter), [`schema`] (argument schemas and validation), `registry`
//! (the command table), `server` (sockets, clients, dispatch, events),
//! `address` (listen addresses and unix socket files), [`error`].

mod address;
pub mod error;
mod framing;
pub mod protocol;
mod registry;
pub mod schema;
mod server;

pub use address::{ListenAddress, QmpAddress};
pub use error::{ErrorClass, QmpError, ServerError};
pub use protocol::{QmpEvent, QmpVersion, Timestamp};
pub use schema::{ArgType, IntKind, Member, NoArgs, QmpArgs, QmpType, Schema};
pub use server::{EventEmitter, QmpServer, QmpServerOptions, QuitCallback, SubscriptionId};

#[doc(hidden)]
pub use schema::__private;
