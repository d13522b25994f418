//! The `file` protocol driver: a host file through `aio::file`.

use std::sync::atomic::{AtomicU64, Ordering};

use aio::file::{Engine, File, OpenOptions as FileOpen};

use super::{BlockDriver, BlockStatus, BoxFuture, ImageInfo};
use crate::{Error, Result};

/// A host file.
pub(crate) struct FileDriver {
    file: File,
    name: String,
    len: AtomicU64,
}

impl FileDriver {
    /// Opens `path` (creating nothing). The size is read once here and
    /// tracked from then on.
    pub(crate) fn open(path: &str, writable: bool, engine: Engine) -> Result<FileDriver> {
        let opts = FileOpen::new().read(true).write(writable).engine(engine);
        let file = File::open(path, &opts).map_err(|e| Error::from_open(path, e))?;
        let len = std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| Error::open(path, e.to_string()))?;
        Ok(FileDriver {
            file,
            name: path.to_string(),
            len: AtomicU64::new(len),
        })
    }
}

impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }
    fn filename(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn grows_on_write(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, offset: u64, buf: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let (n, mut buf) = self
                .file
                .read_at(buf, offset)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
            buf[n..].fill(0);
            Ok(buf)
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let end = offset + buf.len() as u64;
            self.file
                .write_at(buf, offset)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
            self.len.fetch_max(end, Ordering::AcqRel);
            Ok(())
        })
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.file
                .write_zeroes(offset, len)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
            self.len.fetch_max(offset + len, Ordering::AcqRel);
            Ok(())
        })
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.file
                .discard(offset, len)
                .await
                .map_err(|e| Error::io(&self.name, e))
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file
                .flush()
                .await
                .map_err(|e| Error::io(&self.name, e))
        })
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file
                .set_len(len)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
            self.len.store(len, Ordering::Release);
            Ok(())
        })
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>> {
        Box::pin(async move {
            let st = BlockStatus {
                allocated: true,
                data: true,
                offset: Some(offset),
                ..Default::default()
            };
            Ok((st, len))
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "file".into(),
            filename: self.name.clone(),
            virtual_size: self.len(),
            ..Default::default()
        }
    }
}
