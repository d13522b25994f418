//! The `null-co` driver: reads zeroes, discards writes.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockDriver, BlockStatus, BoxFuture, ImageInfo};
use crate::Result;

/// A sink and a source of zeroes of a given size.
pub(crate) struct NullDriver {
    len: AtomicU64,
}

impl NullDriver {
    /// A null device of `len` bytes.
    pub(crate) fn new(len: u64) -> NullDriver {
        NullDriver {
            len: AtomicU64::new(len),
        }
    }
}

impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }
    fn filename(&self) -> &str {
        "null-co://"
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read<'a>(&'a self, _offset: u64, mut buf: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>>> {
        buf.fill(0);
        Box::pin(async move { Ok(buf) })
    }
    fn write<'a>(&'a self, _offset: u64, _buf: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes<'a>(&'a self, _offset: u64, _len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn discard<'a>(&'a self, _offset: u64, _len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        self.len.store(len, Ordering::Release);
        Box::pin(async { Ok(()) })
    }
    fn block_status<'a>(
        &'a self,
        _offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>> {
        let st = BlockStatus {
            allocated: true,
            zero: true,
            ..Default::default()
        };
        Box::pin(async move { Ok((st, len)) })
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "null-co".into(),
            filename: self.filename().into(),
            virtual_size: self.len(),
            ..Default::default()
        }
    }
}
