//! NBD (Network Block Device): the protocol QEMU uses to move disks between
//! processes and hosts. [`proto`] is the wire format shared by the export
//! server and the client driver; [`server`] is the export server, and
//! `client` the client's connection (negotiation, request multiplexing,
//! reconnect) behind the `nbd` block driver.

pub(crate) mod client;
mod export;
pub mod proto;
pub mod server;
