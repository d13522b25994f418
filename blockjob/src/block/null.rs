//! The `null-co` driver: reads zeroes, discards writes, and, with
//! `latency-ns`, takes that long for each request (a slow device for
//! tests and benchmarks, as in QEMU).

use std::sync::atomic::{AtomicU64, Ordering};

use aio::{AioContext, ClockType};

use super::{BlockDriver, BlockStatus, BoxFuture, Buffer, ImageInfo};
use crate::{Error, Result};

/// A sink and a source of zeroes of a given size.
pub(crate) struct NullDriver {
    len: AtomicU64,
    latency_ns: u64,
    clock: ClockType,
}

impl NullDriver {
    /// A null device of `len` bytes whose requests each take `latency_ns`
    /// on `clock` (QEMU sleeps on its realtime clock; the graph passes its
    /// own clock, which is the virtual one under qtest, so that a test
    /// decides when a slow request ends).
    pub(crate) fn new(len: u64, latency_ns: u64, clock: ClockType) -> NullDriver {
        NullDriver {
            len: AtomicU64::new(len),
            latency_ns,
            clock,
        }
    }

    /// Waits out the configured latency on the running task's context.
    async fn delay(&self) -> Result<()> {
        if self.latency_ns == 0 {
            return Ok(());
        }
        let ns = i64::try_from(self.latency_ns).unwrap_or(i64::MAX);
        let ctx = AioContext::current().ok_or_else(|| {
            Error::Job("null-co: a request with latency-ns must run on an AioContext".into())
        })?;
        ctx.sleep_ns(self.clock, ns).await;
        Ok(())
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
    fn read<'a>(&'a self, _offset: u64, mut buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(async move {
            self.delay().await?;
            buf.fill(0);
            Ok(buf)
        })
    }
    fn write<'a>(&'a self, _offset: u64, _buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.delay())
    }
    fn write_keep<'a>(&'a self, _offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(async move { self.delay().await.map(|()| buf) })
    }
    fn write_zeroes<'a>(&'a self, _offset: u64, _len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.delay())
    }
    fn discard<'a>(&'a self, _offset: u64, _len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.delay())
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.delay())
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
