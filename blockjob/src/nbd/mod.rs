//! NBD (Network Block Device): the protocol QEMU uses to move disks between
//! processes and hosts. [`proto`] is the wire format shared by the export
//! server and the client driver; [`server`] is the export server.

mod export;
pub mod proto;
pub mod server;
