//! The `file` protocol driver: a host file through `aio::file`.
//!
//! With `cache.direct` the file is opened `O_DIRECT` and requests of any
//! shape are made to fit it by [`super::direct`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use aio::file::{Engine, File, IoBuf, OpenOptions as FileOpen};

use super::direct::{Alignment, RangeLock};
use super::{BlockDriver, BlockStatus, BoxFuture, Buffer, ImageInfo};
use crate::{Error, Result};

/// How to open a host file: QMP's `aio`, `cache` and `auto-read-only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileOpenOptions {
    /// Open for writing.
    pub(crate) writable: bool,
    /// The I/O engine (`aio`).
    pub(crate) engine: Engine,
    /// Bypass the page cache (`cache.direct`).
    pub(crate) direct: bool,
    /// Make flushes no-ops (`cache.no-flush`).
    pub(crate) no_flush: bool,
    /// Fall back to read-only when the file cannot be opened for writing
    /// (`auto-read-only`).
    pub(crate) auto_read_only: bool,
}

impl FileOpenOptions {
    /// Buffered I/O on `engine`, flushes honoured.
    pub(crate) fn new(writable: bool, engine: Engine) -> Self {
        FileOpenOptions {
            writable,
            engine,
            direct: false,
            no_flush: false,
            auto_read_only: false,
        }
    }
}

/// A host file.
pub(crate) struct FileDriver {
    /// The file as opened.
    opened: File,
    /// The file opened again for writing, by a reopen read-write of a
    /// file opened read-only; kept from then on (the node's read-only
    /// flag is what refuses writes).
    rw: OnceLock<File>,
    opts: FileOpenOptions,
    name: String,
    len: AtomicU64,
    writable: bool,
    no_flush: bool,
    align: Alignment,
    /// Writes in flight, by aligned range (only with `O_DIRECT`).
    writes: RangeLock,
    /// Requests that went through a bounce buffer (only with `O_DIRECT`:
    /// an unaligned offset, length or buffer address).
    bounced: AtomicU64,
}

impl FileDriver {
    /// Opens `path` (creating nothing). The size is read once here and
    /// tracked from then on.
    pub(crate) fn open(path: &str, opts: &FileOpenOptions) -> Result<FileDriver> {
        let open = |writable: bool| {
            let o = FileOpen::new()
                .read(true)
                .write(writable)
                .direct(opts.direct)
                .engine(opts.engine);
            File::open(path, &o)
        };
        let (file, writable) = match open(opts.writable) {
            Ok(f) => (f, opts.writable),
            Err(e) if opts.writable && opts.auto_read_only && denied(&e) => {
                log::info!("{path}: not writable ({e}); opened read-only (auto-read-only)");
                (open(false).map_err(|e| Error::from_open(path, e))?, false)
            }
            Err(e) => return Err(Error::from_open(path, e)),
        };
        let len = std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| Error::open(path, e.to_string()))?;
        let align = Alignment::of(&file);
        Ok(FileDriver {
            opened: file,
            rw: OnceLock::new(),
            opts: *opts,
            name: path.to_string(),
            len: AtomicU64::new(len),
            writable,
            no_flush: opts.no_flush,
            align,
            writes: RangeLock::default(),
            bounced: AtomicU64::new(0),
        })
    }

    /// Whether the file was opened for writing (`auto-read-only` may have
    /// fallen back).
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// The file to do I/O on.
    fn file(&self) -> &File {
        self.rw.get().unwrap_or(&self.opened)
    }

    /// Makes sure there is a file descriptor open for writing.
    fn reopen_rw(&self) -> Result<()> {
        if self.writable || self.rw.get().is_some() {
            return Ok(());
        }
        let o = FileOpen::new()
            .read(true)
            .write(true)
            .direct(self.opts.direct)
            .engine(self.opts.engine);
        let f = File::open(&self.name, &o).map_err(|e| Error::from_open(&self.name, e))?;
        // Two reopens racing: the loser's file is closed here.
        let _ = self.rw.set(f);
        Ok(())
    }

    /// Reads `buf`'s length at `offset`; what lies past the end of the
    /// file reads as zeroes.
    async fn read_filled<B: IoBuf>(&self, buf: B, offset: u64) -> Result<B> {
        let (n, mut buf) = self
            .file()
            .read_at(buf, offset)
            .await
            .map_err(|e| Error::io(&self.name, e))?;
        buf.bytes_mut()[n..].fill(0);
        Ok(buf)
    }

    /// A read through an aligned bounce buffer.
    async fn read_bounced(&self, offset: u64, mut buf: Buffer) -> Result<Buffer> {
        self.bounced.fetch_add(1, Ordering::Relaxed);
        let (start, end) = self.align.cover(offset, buf.len() as u64);
        let bounce = self
            .align
            .buffer(end - start)
            .map_err(|e| Error::io(&self.name, e))?;
        let bounce = self.read_filled(bounce, start).await?;
        let at = (offset - start) as usize;
        let len = buf.len();
        buf.copy_from_slice(&bounce[at..at + len]);
        Ok(buf)
    }

    /// A write on an `O_DIRECT` file: as it is when aligned, else
    /// read-modify-write of the blocks it touches; either way holding its
    /// aligned range against overlapping writes. The buffer comes back.
    async fn write_direct(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        let len = buf.len() as u64;
        let (start, end) = self.align.cover(offset, len);
        let _held = self.writes.lock(start, end).await;
        if self.align.fits(offset, len, &buf) {
            return self.write_raw_keep(offset, buf).await;
        }
        // Boxed: the aligned path's future stays small.
        Box::pin(self.write_bounced(offset, buf, (start, end))).await
    }

    /// The read-modify-write of an unaligned write on an `O_DIRECT` file,
    /// `cover` its aligned range (held by the caller).
    async fn write_bounced(&self, offset: u64, buf: Buffer, cover: (u64, u64)) -> Result<Buffer> {
        let (start, end) = cover;
        let len = buf.len() as u64;
        self.bounced.fetch_add(1, Ordering::Relaxed);
        let mut bounce = self
            .align
            .buffer(end - start)
            .map_err(|e| Error::io(&self.name, e))?;
        if start < offset || end > offset + len {
            bounce = self.read_filled(bounce, start).await?;
        }
        let at = (offset - start) as usize;
        bounce[at..at + buf.len()].copy_from_slice(&buf);
        // The bounce may reach past the end of the file (the tail of the
        // last block): cut the file back to where the request ends.
        let old_len = self.len();
        self.file()
            .write_at(bounce, start)
            .await
            .map_err(|e| Error::io(&self.name, e))?;
        let new_len = old_len.max(offset + len);
        if end > new_len {
            self.file()
                .set_len(new_len)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
        }
        self.len.fetch_max(new_len, Ordering::AcqRel);
        Ok(buf)
    }

    /// A write as it is; the buffer comes back.
    async fn write_raw_keep(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        let end = offset + buf.len() as u64;
        let buf = self
            .file()
            .write_at(buf, offset)
            .await
            .map_err(|e| Error::io(&self.name, e))?;
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(buf)
    }

    /// A read as [`BlockDriver::read`] does it, without boxing the common
    /// path (the node calls this directly on its request path).
    pub(crate) async fn read_unboxed(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        if !self.align.is_trivial() && !self.align.fits(offset, buf.len() as u64, &buf) {
            return Box::pin(self.read_bounced(offset, buf)).await;
        }
        self.read_filled(buf, offset).await
    }

    /// A write as [`BlockDriver::write_keep`] does it, without boxing (the
    /// node calls this directly on its request path).
    pub(crate) async fn write_keep_unboxed(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        if self.align.is_trivial() {
            self.write_raw_keep(offset, buf).await
        } else {
            // Boxed: the range lock makes this future twice the size of
            // the buffered one, and an `O_DIRECT` write waits for the
            // disk anyway.
            Box::pin(self.write_direct(offset, buf)).await
        }
    }

    /// Zeroes an unaligned head or tail on an `O_DIRECT` file.
    async fn zero_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.write_direct(offset, Buffer::zeroed(len as usize))
            .await
            .map(drop)
    }

    async fn write_zeroes_direct(&self, offset: u64, len: u64) -> Result<()> {
        let (a, b) = self.align.inside(offset, len);
        if a >= b {
            return self.zero_by_writing(offset, len).await;
        }
        self.zero_by_writing(offset, a - offset).await?;
        {
            let _held = self.writes.lock(a, b).await;
            self.file()
                .write_zeroes(a, b - a)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
        }
        self.zero_by_writing(b, offset + len - b).await?;
        self.len.fetch_max(offset + len, Ordering::AcqRel);
        Ok(())
    }
}

/// Whether opening for writing failed for lack of permission (so a
/// read-only open may work).
fn denied(e: &aio::Error) -> bool {
    matches!(
        e.io_kind(),
        Some(std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem)
    )
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
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.read_unboxed(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.write_keep_unboxed(offset, buf).await.map(drop) })
    }
    fn write_keep<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.write_keep_unboxed(offset, buf))
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if !self.align.is_trivial() {
                return self.write_zeroes_direct(offset, len).await;
            }
            self.file()
                .write_zeroes(offset, len)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
            self.len.fetch_max(offset + len, Ordering::AcqRel);
            Ok(())
        })
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // Discard is advisory: on an `O_DIRECT` file only the whole
            // blocks inside the range go.
            let (offset, len) = if self.align.is_trivial() {
                (offset, len)
            } else {
                let (a, b) = self.align.inside(offset, len);
                if a >= b {
                    return Ok(());
                }
                (a, b - a)
            };
            self.file()
                .discard(offset, len)
                .await
                .map_err(|e| Error::io(&self.name, e))
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.no_flush {
                return Ok(());
            }
            self.file()
                .flush()
                .await
                .map_err(|e| Error::io(&self.name, e))
        })
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file()
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
            // Holes read as zeroes (QEMU's file-posix: ZERO, not DATA).
            let e = self
                .file()
                .extent_at(offset)
                .await
                .map_err(|e| Error::io(&self.name, e))?;
            let (data, n) = if e.len == 0 {
                (false, len)
            } else {
                (e.data, e.len.min(len))
            };
            let st = BlockStatus {
                allocated: true,
                data,
                zero: !data,
                offset: Some(offset),
                ..Default::default()
            };
            Ok((st, n))
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn reopen(&self, read_only: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if read_only {
                Ok(())
            } else {
                self.reopen_rw()
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On an `O_DIRECT` file, aligned requests from aligned buffers go to
    /// the file as they are; only an unaligned one is bounced. Both
    /// engines, both directions, and the bytes are right either way.
    #[test]
    fn aligned_buffers_are_not_bounced_on_o_direct() {
        // Not /dev/shm: tmpfs refuses O_DIRECT.
        let dir = tempfile::tempdir().unwrap();
        for engine in [Engine::Threads, Engine::IoUring] {
            let path = dir.path().join(format!("{engine:?}.raw"));
            std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
            let name = path.to_str().unwrap();
            let mut o = FileOpenOptions::new(true, engine);
            o.direct = true;
            let ctx = aio::AioContext::new().unwrap();
            let f = FileDriver::open(name, &o).unwrap();
            ctx.block_on(async {
                let mut data = Buffer::aligned(64 << 10).unwrap();
                data.fill(0xa5);
                let data = f.write_keep(8192, data).await.unwrap();
                let back = f
                    .read(8192, Buffer::aligned(64 << 10).unwrap())
                    .await
                    .unwrap();
                assert_eq!(back, data);
                assert_eq!(f.bounced.load(Ordering::Relaxed), 0, "{engine:?}");
                // An odd offset needs the bounce, and still reads right.
                let odd = f.read(8191, Buffer::zeroed(2)).await.unwrap();
                assert_eq!(odd, [0u8, 0xa5]);
                f.write(8193, vec![1u8, 2, 3].into()).await.unwrap();
                assert_eq!(f.bounced.load(Ordering::Relaxed), 2, "{engine:?}");
                let all = f.read(8192, Buffer::aligned(4096).unwrap()).await.unwrap();
                assert_eq!(&all[..5], &[0xa5, 1, 2, 3, 0xa5]);
            });
        }
    }
}
