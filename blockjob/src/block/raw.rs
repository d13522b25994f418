//! The `raw` format driver: passes everything to its `file` child.

use std::sync::Arc;

use super::{BlockDriver, BlockNode, BlockStatus, BoxFuture, Buffer, ImageInfo, PermGuard};
use crate::Result;

/// Raw image: guest offset = file offset.
pub(crate) struct RawDriver {
    file: PermGuard,
}

impl RawDriver {
    /// Wraps an attached `file` child.
    pub(crate) fn new(file: PermGuard) -> RawDriver {
        RawDriver { file }
    }
    /// The `file` child every request goes to.
    pub(crate) fn f(&self) -> &Arc<BlockNode> {
        self.file.node()
    }
}

impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }
    fn filename(&self) -> &str {
        self.f().filename()
    }
    fn len(&self) -> u64 {
        self.f().len()
    }
    fn file_child(&self) -> Option<Arc<BlockNode>> {
        Some(self.f().clone())
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.f().read(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.f().write(offset, buf))
    }
    fn write_keep<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.f().write_keep(offset, buf))
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.f().write_zeroes(offset, len))
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.f().discard(offset, len))
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.f().flush())
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.f().truncate(len))
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>> {
        Box::pin(self.f().block_status(offset, len))
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw".into(),
            filename: self.filename().to_string(),
            virtual_size: self.len(),
            ..Default::default()
        }
    }
}
