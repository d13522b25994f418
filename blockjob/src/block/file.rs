//! The `file` protocol driver: a host file through `aio::file`.

use std::sync::atomic::{AtomicU64, Ordering};

use aio::file::{AlignedBuf, Engine, File, OpenOptions as FileOpen};

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
    pub(crate) fn open(
        path: &str,
        writable: bool,
        engine: Engine,
        direct: bool,
    ) -> Result<FileDriver> {
        let opts = FileOpen::new()
            .read(true)
            .write(writable)
            .engine(engine)
            .direct(direct);
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

    /// With `O_DIRECT`: the offset/length alignment and the buffer
    /// alignment to use.
    fn direct(&self) -> Option<(u64, usize)> {
        let ra = self.file.request_alignment();
        let ma = self.file.memory_alignment();
        (ra > 1 || ma > 1).then(|| (ra.max(512), ma.max(ra as usize).max(512)))
    }

    /// Reads the aligned range around `offset..offset + len` into an
    /// aligned buffer (zeroes past the end of the file); returns it and
    /// where the range starts.
    async fn read_aligned(
        &self,
        offset: u64,
        len: u64,
        a: (u64, usize),
    ) -> Result<(AlignedBuf, u64)> {
        let start = offset - offset % a.0;
        let end = (offset + len).div_ceil(a.0) * a.0;
        let buf =
            AlignedBuf::new((end - start) as usize, a.1).map_err(|e| Error::io(&self.name, e))?;
        let (n, mut buf) = self
            .file
            .read_at(buf, start)
            .await
            .map_err(|e| Error::io(&self.name, e))?;
        buf[n..].fill(0);
        Ok((buf, start))
    }

    /// `write` under `O_DIRECT`: aligned writes go through an aligned copy;
    /// others read, patch and write the aligned range around them. Callers
    /// (qcow2 metadata, under its lock) do not write the same block
    /// concurrently, so the read-modify-write needs no serialising here.
    async fn write_direct(&self, offset: u64, data: Vec<u8>, a: (u64, usize)) -> Result<u64> {
        let len = data.len() as u64;
        let (mut buf, start) = if offset % a.0 == 0 && len % a.0 == 0 {
            let b = AlignedBuf::new(data.len(), a.1).map_err(|e| Error::io(&self.name, e))?;
            (b, offset)
        } else {
            self.read_aligned(offset, len, a).await?
        };
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(&data);
        let end = start + buf.len() as u64;
        self.file
            .write_at(buf, start)
            .await
            .map_err(|e| Error::io(&self.name, e))?;
        Ok(end)
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
            if let Some(a) = self.direct() {
                let mut buf = buf;
                let (ab, start) = self.read_aligned(offset, buf.len() as u64, a).await?;
                let at = (offset - start) as usize;
                let n = buf.len();
                buf.copy_from_slice(&ab[at..at + n]);
                return Ok(buf);
            }
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
            let end = match self.direct() {
                Some(a) => self.write_direct(offset, buf, a).await?,
                None => {
                    let end = offset + buf.len() as u64;
                    self.file
                        .write_at(buf, offset)
                        .await
                        .map_err(|e| Error::io(&self.name, e))?;
                    end
                }
            };
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
