//! Asynchronous file I/O: positioned and vectored reads and writes, flush,
//! write-zeroes, discard, size queries, `O_DIRECT`, on one of two engines
//! ([`Engine`]): a [`ThreadPool`] or the calling context's io_uring.
//!
//! Every operation takes its buffers by value and hands them back with the
//! result, so nothing is borrowed across threads or by the kernel. With the
//! threads engine the futures are executor-agnostic (they complete by
//! waking the `Waker` they were polled with) and operations are submitted
//! when the method is called, so issuing several calls before awaiting any
//! runs them concurrently; dropping a future before a worker picks the
//! operation up cancels it. With the io_uring engine an operation is
//! submitted at the future's first poll, on the current context: spawn a
//! task per request to keep several in flight.
//!
//! Short transfers are retried until the request is complete (or, for
//! reads, until end of file); `EINTR` and `EAGAIN` are retried and never
//! returned. Errors are [`Error::Io`] whose context names the system call,
//! the length, the offset and the path, e.g. `pread of 4096 bytes at offset
//! 8192 in /tmp/x: Bad file descriptor`.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut, Seek, SeekFrom};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{invalid_input, Error, IoContext, Result};
use crate::file_uring;
use crate::sys;
use crate::sys::alignedbuf::RawAlignedBuf;
use crate::thread_pool::{PoolOptions, ThreadPool};

/// `O_DIRECT` alignment assumed when the kernel does not report one.
const DEFAULT_DIRECT_ALIGN: u32 = 512;
/// The largest zero buffer `write_zeroes` writes at a time when the
/// filesystem cannot zero a range itself.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// How a [`File`] performs its I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    /// Blocking system calls on a [`ThreadPool`] (QEMU's `aio=threads`).
    #[default]
    Threads,
    /// io_uring (QEMU's `aio=io_uring`): requests go to a ring of the
    /// context the calling task runs on, submitted from its home thread at
    /// the future's first poll and reaped by the loop (which watches the
    /// ring's fd).
    /// Requests must be awaited inside a task or `block_on` of a context
    /// (otherwise they fail with [`Error::NotInTask`]).
    IoUring,
}

/// Options for [`File::open`].
///
/// The flags mean what they mean for [`std::fs::OpenOptions`]; all start
/// `false`.
///
/// ```
/// use aio::file::{Engine, OpenOptions};
/// let opts = OpenOptions::new().read(true).write(true).direct(true).engine(Engine::Threads);
/// assert!(opts.direct);
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// Create the file if it does not exist (needs `write`).
    pub create: bool,
    /// Truncate the file to 0 bytes (needs `write`).
    pub truncate: bool,
    /// Bypass the page cache (`O_DIRECT`). Buffers, offsets and lengths
    /// must then be aligned; see [`File::request_alignment`].
    pub direct: bool,
    /// The I/O engine.
    pub engine: Engine,
    /// The pool to run I/O on; `None` uses a process-wide pool named
    /// `aio-file`, created on first use.
    pub pool: Option<ThreadPool>,
}

impl OpenOptions {
    /// All flags off, the threads engine, the process-wide pool.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets read access.
    pub fn read(mut self, on: bool) -> Self {
        self.read = on;
        self
    }
    /// Sets write access.
    pub fn write(mut self, on: bool) -> Self {
        self.write = on;
        self
    }
    /// Creates the file if it is missing.
    pub fn create(mut self, on: bool) -> Self {
        self.create = on;
        self
    }
    /// Truncates the file on open.
    pub fn truncate(mut self, on: bool) -> Self {
        self.truncate = on;
        self
    }
    /// Opens with `O_DIRECT`.
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = on;
        self
    }
    /// Sets the I/O engine.
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }
    /// Runs this file's I/O on `pool`.
    pub fn pool(mut self, pool: ThreadPool) -> Self {
        self.pool = Some(pool);
        self
    }
}

/// How long a worker of the default file pool spins for the next request
/// after a short one ([`PoolOptions::spin`]). With 20 µs, `aio-img bench`
/// of 4 KiB reads at depth 1 from tmpfs through the threads engine went
/// from ~75,000 to ~120,000 IOPS; `O_DIRECT` requests take longer than
/// 20 µs, so disk rows never spin. docs/benchmarks.md, "Pool workers spin
/// after a short job (stop 18)".
const FILE_POOL_SPIN: Duration = Duration::from_micros(20);

/// The process-wide pool files use unless given one.
fn default_pool() -> ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(PoolOptions::new().name("aio-file").spin(FILE_POOL_SPIN)))
        .clone()
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for Vec<u8> {}
    impl Sealed for super::AlignedBuf {}
    impl Sealed for super::Buffer {}
}

pub use crate::buffer::{Buffer, BUFFER_ALIGN};

/// An owned buffer that can move to a worker thread for I/O and come back.
///
/// Implemented for `Vec<u8>` (its length, not its capacity, is the
/// transfer size), [`AlignedBuf`] and [`Buffer`]. Sealed.
pub trait IoBuf: sealed::Sealed + Send + 'static {
    /// The bytes to write, or the space to read into.
    fn bytes(&self) -> &[u8];
    /// The bytes, mutably.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl IoBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl IoBuf for AlignedBuf {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl IoBuf for Buffer {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// A run of data or of a hole in a file ([`File::extent_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileExtent {
    /// Data (`true`) or a hole that reads as zeroes.
    pub data: bool,
    /// Bytes from the asked offset that are the same kind (0 at the end
    /// of the file).
    pub len: u64,
}

/// A zero-initialised byte buffer whose address is aligned, for `O_DIRECT`.
///
/// ```
/// use aio::file::AlignedBuf;
/// let mut buf = AlignedBuf::new(8192, 4096)?;
/// assert_eq!(buf.as_ptr() as usize % 4096, 0);
/// assert!(buf.iter().all(|&b| b == 0));
/// buf[..5].copy_from_slice(b"hello");
/// assert!(AlignedBuf::new(4096, 256).is_err(), "alignment below 512");
/// # Ok::<(), aio::Error>(())
/// ```
pub struct AlignedBuf(RawAlignedBuf);

impl AlignedBuf {
    /// Allocates `len` zeroed bytes at an address that is a multiple of
    /// `align`. `align` must be a power of two and at least 512 (the
    /// smallest sector size); anything else is an `InvalidInput` error.
    pub fn new(len: usize, align: usize) -> Result<Self> {
        let context = || format!("allocating a {len}-byte buffer aligned to {align}");
        if !align.is_power_of_two() || align < 512 {
            return Err(invalid_input(
                context(),
                "alignment must be a power of two and at least 512",
            ));
        }
        RawAlignedBuf::zeroed(len, align)
            .map(AlignedBuf)
            .context(context)
    }

    /// The alignment the buffer was allocated with.
    pub fn align(&self) -> usize {
        self.0.align()
    }

    /// The bytes the allocation holds: the most [`set_len`](Self::set_len)
    /// can make visible.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Makes the first `len` bytes visible (clamped to the capacity), so
    /// one allocation can serve requests of different sizes. Bytes that
    /// come back into view hold what was last written there (zeroes for
    /// bytes never written), never uninitialised memory.
    ///
    /// ```
    /// use aio::file::AlignedBuf;
    /// let mut buf = AlignedBuf::new(8192, 4096)?;
    /// buf.set_len(512);
    /// assert_eq!(buf.len(), 512);
    /// buf.set_len(8192);
    /// assert_eq!(buf.len(), 8192);
    /// # Ok::<(), aio::Error>(())
    /// ```
    pub fn set_len(&mut self, len: usize) {
        self.0.set_len(len);
    }
}

impl AlignedBuf {
    pub(crate) fn into_raw(self) -> RawAlignedBuf {
        self.0
    }

    pub(crate) fn from_raw(raw: RawAlignedBuf) -> Self {
        Self(raw)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len())
            .field("align", &self.align())
            .finish()
    }
}

/// A file (or block device) whose I/O runs on a [`ThreadPool`].
///
/// Methods take `&self` and return `'static` futures that own everything
/// they need, so several operations can be in flight at once and the `File`
/// can be dropped while they run (the descriptor closes when the last one
/// finishes).
///
/// With `O_DIRECT` ([`OpenOptions::direct`]), every transfer's offset and
/// length must be multiples of [`request_alignment`](Self::request_alignment)
/// and every buffer address a multiple of
/// [`memory_alignment`](Self::memory_alignment) — use [`AlignedBuf`]. A
/// misaligned request fails with an `InvalidInput` [`Error::Io`] before
/// anything is submitted.
pub struct File {
    inner: Arc<FileInner>,
}

pub(crate) struct FileInner {
    pub(crate) file: fs::File,
    pub(crate) path: PathBuf,
    pool: ThreadPool,
    /// `Some` for `O_DIRECT` files.
    direct: Option<Align>,
    engine: Engine,
}

/// `O_DIRECT` alignment requirements.
#[derive(Clone, Copy, Debug)]
struct Align {
    /// Buffer addresses.
    mem: u64,
    /// Offsets and lengths.
    offset: u64,
}

impl File {
    /// Opens `path` (synchronously, on the calling thread).
    ///
    /// With `direct`, also works out the alignment `O_DIRECT` needs: the
    /// logical block size (`BLKSSZGET`) for a block device; for a file, what
    /// `statx(STATX_DIOALIGN)` reports, or 512 where the kernel does not
    /// say.
    ///
    /// The engine is fixed at open; [`Engine::IoUring`] never falls back to
    /// threads.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<File> {
        let path = path.as_ref();
        let mut o = fs::OpenOptions::new();
        o.read(opts.read)
            .write(opts.write)
            .create(opts.create)
            .truncate(opts.truncate);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).context(|| {
            let direct = if opts.direct { " with O_DIRECT" } else { "" };
            format!("opening {}{direct}", path.display())
        })?;
        let direct = if opts.direct {
            Some(direct_alignment(&file, path)?)
        } else {
            None
        };
        if let Some(a) = direct {
            log::debug!(
                "{}: O_DIRECT, offsets/lengths aligned to {}, memory to {}",
                path.display(),
                a.offset,
                a.mem
            );
        }
        Ok(File {
            inner: Arc::new(FileInner {
                file,
                path: path.to_path_buf(),
                pool: opts.pool.clone().unwrap_or_else(default_pool),
                direct,
                engine: opts.engine,
            }),
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The alignment of offsets and lengths this file requires: 1 unless it
    /// was opened with `O_DIRECT`.
    pub fn request_alignment(&self) -> u64 {
        self.inner.direct.map_or(1, |a| a.offset)
    }

    /// The alignment of buffer addresses this file requires: 1 unless it
    /// was opened with `O_DIRECT`.
    pub fn memory_alignment(&self) -> usize {
        self.inner.direct.map_or(1, |a| a.mem as usize)
    }

    /// The pool this file's I/O runs on.
    pub fn pool(&self) -> &ThreadPool {
        &self.inner.pool
    }

    /// Reads into `buf` at `offset` until `buf` is full or end of file.
    ///
    /// Resolves to the number of bytes read — less than `buf.len()` only at
    /// end of file, 0 at or past it — and the buffer.
    pub fn read_at<B: IoBuf>(
        &self,
        buf: B,
        offset: u64,
    ) -> impl Future<Output = Result<(usize, B)>> + Send + 'static {
        let check = self.check("pread", offset, [buf.bytes()]);
        self.dispatch(
            check,
            buf,
            move |inner, mut buf| {
                let n = inner.read_full(buf.bytes_mut(), offset)?;
                Ok((n, buf))
            },
            move |inner, buf| async move { file_uring::read(&inner, buf, offset).await },
        )
    }

    /// Reads exactly `buf.len()` bytes at `offset`; reaching end of file
    /// first is an `UnexpectedEof` error.
    pub fn read_exact_at<B: IoBuf>(
        &self,
        buf: B,
        offset: u64,
    ) -> impl Future<Output = Result<B>> + Send + 'static {
        let eof = move |inner: &FileInner, len: usize, n: usize| Error::Io {
            context: inner.what("pread", len, offset),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of file after {n} bytes"),
            ),
        };
        let check = self.check("pread", offset, [buf.bytes()]);
        self.dispatch(
            check,
            buf,
            move |inner, mut buf| {
                let len = buf.bytes().len();
                let n = inner.read_full(buf.bytes_mut(), offset)?;
                if n < len {
                    return Err(eof(inner, len, n));
                }
                Ok(buf)
            },
            move |inner, buf| async move {
                let len = buf.bytes().len();
                let (n, buf) = file_uring::read(&inner, buf, offset).await?;
                if n < len {
                    return Err(eof(&inner, len, n));
                }
                Ok(buf)
            },
        )
    }

    /// Writes all of `buf` at `offset`, extending the file if needed.
    /// Resolves to the buffer.
    pub fn write_at<B: IoBuf>(
        &self,
        buf: B,
        offset: u64,
    ) -> impl Future<Output = Result<B>> + Send + 'static {
        let check = self.check("pwrite", offset, [buf.bytes()]);
        self.dispatch(
            check,
            buf,
            move |inner, buf| {
                inner.write_full(buf.bytes(), offset)?;
                Ok(buf)
            },
            move |inner, buf| async move { file_uring::write(&inner, buf, offset).await },
        )
    }

    /// Reads into `bufs`, in order, at `offset` (`preadv`) until they are all
    /// full or end of file. Resolves to the total read and the buffers.
    pub fn readv_at<B: IoBuf>(
        &self,
        bufs: Vec<B>,
        offset: u64,
    ) -> impl Future<Output = Result<(usize, Vec<B>)>> + Send + 'static {
        let check = self.check("preadv", offset, bufs.iter().map(|b| b.bytes()));
        self.dispatch(
            check,
            bufs,
            move |inner, mut bufs| {
                let n = inner.readv_full(&mut bufs, offset)?;
                Ok((n, bufs))
            },
            move |inner, bufs| async move { file_uring::readv(&inner, bufs, offset).await },
        )
    }

    /// Writes all of `bufs`, in order, at `offset` (`pwritev`). Resolves to
    /// the buffers.
    pub fn writev_at<B: IoBuf>(
        &self,
        bufs: Vec<B>,
        offset: u64,
    ) -> impl Future<Output = Result<Vec<B>>> + Send + 'static {
        let check = self.check("pwritev", offset, bufs.iter().map(|b| b.bytes()));
        self.dispatch(
            check,
            bufs,
            move |inner, bufs| {
                inner.writev_full(&bufs, offset)?;
                Ok(bufs)
            },
            move |inner, bufs| async move { file_uring::writev(&inner, bufs, offset).await },
        )
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.dispatch(
            Ok(()),
            (),
            |inner, ()| {
                retry(|| sys::file::fdatasync(&inner.file))
                    .context(|| format!("fdatasync of {}", inner.path.display()))
            },
            |inner, ()| async move { file_uring::flush(&inner).await },
        )
    }

    /// Makes `len` bytes at `offset` read back as zeroes, extending the file
    /// if the range ends past it.
    ///
    /// Uses `fallocate(FALLOC_FL_ZERO_RANGE)`; where the filesystem does not
    /// support that (`EOPNOTSUPP`, e.g. tmpfs), writes zero buffers instead.
    /// On an `O_DIRECT` file the range must be aligned.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let check = self.check_range("fallocate(ZERO_RANGE)", offset, len, true);
        self.dispatch(
            check,
            (),
            move |inner, ()| inner.write_zeroes(offset, len),
            move |inner, ()| async move { file_uring::write_zeroes(&inner, offset, len).await },
        )
    }

    /// Tells the filesystem that `len` bytes at `offset` are no longer
    /// needed: they read back as zeroes and their space may be freed
    /// (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`). The file
    /// size does not change.
    ///
    /// Discard is advisory: where the filesystem cannot punch holes
    /// (`EOPNOTSUPP`) this succeeds without effect (logged at debug level),
    /// so the range then keeps its old contents.
    pub fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let check = self.check_range("fallocate(PUNCH_HOLE)", offset, len, false);
        self.dispatch(
            check,
            (),
            move |inner, ()| inner.discard(offset, len),
            move |inner, ()| async move { file_uring::discard(&inner, offset, len).await },
        )
    }

    /// The run of data or hole that `offset` is in (`lseek` with
    /// `SEEK_DATA` / `SEEK_HOLE`), up to the end of the file. Filesystems
    /// without hole tracking report everything as data. At or past the
    /// end, an empty hole.
    pub fn extent_at(
        &self,
        offset: u64,
    ) -> impl Future<Output = Result<FileExtent>> + Send + 'static {
        self.submit(Ok(()), move |inner| {
            let ctx = || {
                format!(
                    "lseek(SEEK_DATA/SEEK_HOLE) at {offset} of {}",
                    inner.path.display()
                )
            };
            let end = (&inner.file).seek(SeekFrom::End(0)).context(ctx)?;
            if offset >= end {
                return Ok(FileExtent {
                    data: false,
                    len: 0,
                });
            }
            let next_data = match sys::file::seek_data_or_hole(&inner.file, offset, true) {
                // No hole tracking here: all data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(offset),
                r => r.context(ctx)?,
            };
            Ok(match next_data {
                Some(d) if d == offset => {
                    let hole = match sys::file::seek_data_or_hole(&inner.file, offset, false) {
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(end),
                        r => r.context(ctx)?,
                    }
                    .unwrap_or(end);
                    FileExtent {
                        data: true,
                        len: hole.min(end).saturating_sub(offset).max(1),
                    }
                }
                Some(d) => FileExtent {
                    data: false,
                    len: d.min(end) - offset,
                },
                None => FileExtent {
                    data: false,
                    len: end - offset,
                },
            })
        })
    }

    /// The size in bytes (of a file, or of a block device).
    pub fn len(&self) -> impl Future<Output = Result<u64>> + Send + 'static {
        self.submit(Ok(()), |inner| {
            (&inner.file)
                .seek(SeekFrom::End(0))
                .context(|| format!("lseek(SEEK_END) of {}", inner.path.display()))
        })
    }

    /// Truncates or extends the file to `len` bytes (`ftruncate`).
    pub fn set_len(&self, len: u64) -> impl Future<Output = Result<()>> + Send + 'static {
        self.submit(Ok(()), move |inner| {
            inner
                .file
                .set_len(len)
                .context(|| format!("ftruncate of {} to {len} bytes", inner.path.display()))
        })
    }

    /// One operation on this file's engine: with threads, `pooled(inner,
    /// state)` is queued now (if `check` passed), nothing boxed; with
    /// io_uring, `ring(inner, state)`'s future runs at the first poll. The
    /// future resolves to the check's error or the operation's result.
    ///
    /// The ring's future is boxed: it is over a kilobyte, and the block
    /// layer awaits this future a few `async fn`s deep, each of which
    /// would otherwise copy it into its own state (callgrind: +235
    /// instructions of `memcpy` per qcow2 read, more than a `malloc` and
    /// `free` cost).
    fn dispatch<S, T, P, R, RF>(
        &self,
        check: Result<()>,
        state: S,
        pooled: P,
        ring: R,
    ) -> impl Future<Output = Result<T>> + Send + 'static
    where
        S: Send + 'static,
        T: Send + 'static,
        P: FnOnce(&FileInner, S) -> Result<T> + Send + 'static,
        R: FnOnce(Arc<FileInner>, S) -> RF,
        RF: Future<Output = Result<T>> + Send + 'static,
    {
        /// Where the operation goes.
        enum Path<RF, PF> {
            Ring(Pin<Box<RF>>),
            Pool(PF),
        }
        let path = check.map(|()| {
            let inner = self.inner.clone();
            if self.inner.engine == Engine::IoUring {
                Path::Ring(Box::pin(ring(inner, state)))
            } else {
                Path::Pool(self.inner.pool.run(move || pooled(&inner, state)))
            }
        });
        async move {
            match path? {
                Path::Ring(f) => f.await,
                Path::Pool(f) => f.await?,
            }
        }
    }

    /// Queues `op` on the pool if `check` passed; the future resolves to the
    /// check's error, the job's error or the job's result.
    fn submit<T, F>(
        &self,
        check: Result<()>,
        op: F,
    ) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&FileInner) -> Result<T> + Send + 'static,
    {
        let submitted = check.map(|()| {
            let inner = self.inner.clone();
            self.inner.pool.run(move || op(&inner))
        });
        async move { submitted?.await? }
    }

    /// Refuses a transfer that overflows the file offset range or, on an
    /// `O_DIRECT` file, is misaligned.
    fn check<'a, I>(&self, op: &str, offset: u64, bufs: I) -> Result<()>
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone,
    {
        let bufs = bufs.into_iter();
        let total: usize = bufs.clone().map(<[u8]>::len).sum();
        let inner = &self.inner;
        let what = || inner.what(op, total, offset);
        check_end(offset, total as u64).map_err(|msg| invalid_input(what(), msg))?;
        let Some(a) = inner.direct else {
            return Ok(());
        };
        if offset % a.offset != 0 {
            return Err(invalid_input(
                what(),
                format!("O_DIRECT offset must be a multiple of {}", a.offset),
            ));
        }
        for b in bufs {
            if b.len() as u64 % a.offset != 0 {
                return Err(invalid_input(
                    what(),
                    format!(
                        "O_DIRECT buffer length {} is not a multiple of {}",
                        b.len(),
                        a.offset
                    ),
                ));
            }
            if b.as_ptr() as u64 % a.mem != 0 {
                return Err(invalid_input(
                    what(),
                    format!(
                        "O_DIRECT buffer address {:p} is not aligned to {} bytes (use AlignedBuf)",
                        b.as_ptr(),
                        a.mem
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Like `check` for a range with no buffer; `aligned` asks for the
    /// `O_DIRECT` alignment check.
    fn check_range(&self, op: &str, offset: u64, len: u64, aligned: bool) -> Result<()> {
        let inner = &self.inner;
        let what = || {
            format!(
                "{op} of {len} bytes at offset {offset} in {}",
                inner.path.display()
            )
        };
        check_end(offset, len).map_err(|msg| invalid_input(what(), msg))?;
        match inner.direct {
            Some(a) if aligned && (offset % a.offset != 0 || len % a.offset != 0) => {
                Err(invalid_input(
                    what(),
                    format!(
                        "O_DIRECT offset and length must be multiples of {}",
                        a.offset
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Checks that `offset + len` fits in `off_t`.
fn check_end(offset: u64, len: u64) -> std::result::Result<(), String> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(format!(
            "the range ends past the largest file offset ({})",
            i64::MAX
        )),
    }
}

impl fmt::Debug for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("File")
            .field("path", &self.inner.path)
            .field("direct", &self.inner.direct.is_some())
            .field("pool", &self.inner.pool.name())
            .finish_non_exhaustive()
    }
}

/// Works out the `O_DIRECT` alignment of an open file.
fn direct_alignment(file: &fs::File, path: &Path) -> Result<Align> {
    let meta = file
        .metadata()
        .context(|| format!("fstat of {}", path.display()))?;
    if meta.file_type().is_block_device() {
        let size = sys::file::logical_block_size(file)
            .context(|| format!("ioctl(BLKSSZGET) on {}", path.display()))?;
        let size = u64::from(size.max(1));
        return Ok(Align {
            mem: size,
            offset: size,
        });
    }
    match sys::file::dio_align(file) {
        Ok(Some(a)) => Ok(Align {
            mem: u64::from(a.mem),
            offset: u64::from(a.offset),
        }),
        other => {
            if let Err(e) = other {
                log::debug!("statx(STATX_DIOALIGN) on {}: {e}", path.display());
            }
            let size = u64::from(DEFAULT_DIRECT_ALIGN);
            Ok(Align {
                mem: size,
                offset: size,
            })
        }
    }
}

/// Retries a system call on `EINTR` and `EAGAIN`, which callers never see.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            res => return res,
        }
    }
}

/// Whether an error is `EOPNOTSUPP` (`ENOTSUP` is the same on Linux).
fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// The operations, run on a pool worker.
impl FileInner {
    /// "pread of 4096 bytes at offset 8192 in /tmp/x"
    pub(crate) fn what(&self, op: &str, len: usize, offset: u64) -> String {
        format!(
            "{op} of {len} bytes at offset {offset} in {}",
            self.path.display()
        )
    }

    /// Whether a short `O_DIRECT` transfer of `n` bytes left the rest
    /// misaligned (the kernel would refuse the next call with `EINVAL`).
    /// The buffer alignment zero buffers need on an `O_DIRECT` file.
    pub(crate) fn direct_mem_align(&self) -> Option<usize> {
        self.direct.map(|a| (a.mem as usize).max(512))
    }

    pub(crate) fn misaligned_after(&self, n: usize) -> bool {
        self.direct.is_some_and(|a| n as u64 % a.offset != 0)
    }

    fn read_full(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let chunk = &mut buf[done..];
            let len = chunk.len();
            let n = retry(|| sys::file::pread(&self.file, chunk, pos))
                .context(|| self.what("pread", len, pos))?;
            if n == 0 {
                break;
            }
            done += n;
            // A short O_DIRECT read that is not a whole number of blocks
            // ended inside the last block: that is end of file.
            if self.misaligned_after(n) {
                break;
            }
        }
        Ok(done)
    }

    fn write_full(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let chunk = &buf[done..];
            let n = retry(|| sys::file::pwrite(&self.file, chunk, pos))
                .context(|| self.what("pwrite", chunk.len(), pos))?;
            if n == 0 {
                return Err(Error::Io {
                    context: self.what("pwrite", chunk.len(), pos),
                    source: io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"),
                });
            }
            done += n;
            if done < buf.len() && self.misaligned_after(n) {
                return Err(Error::Io {
                    context: self.what("pwrite", chunk.len(), pos),
                    source: io::Error::other(format!(
                        "short O_DIRECT write of {n} bytes left the rest misaligned"
                    )),
                });
            }
        }
        Ok(())
    }

    fn readv_full<B: IoBuf>(&self, bufs: &mut [B], offset: u64) -> Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = bufs
            .iter_mut()
            .map(|b| IoSliceMut::new(b.bytes_mut()))
            .collect();
        let mut rest = &mut slices[..];
        IoSliceMut::advance_slices(&mut rest, 0); // skip leading empty buffers
        let mut done = 0;
        while !rest.is_empty() {
            let pos = offset + done as u64;
            let len: usize = rest.iter().map(|s| s.len()).sum();
            let n = retry(|| sys::file::preadv(&self.file, rest, pos))
                .context(|| self.what("preadv", len, pos))?;
            if n == 0 {
                break;
            }
            done += n;
            if self.misaligned_after(n) {
                break;
            }
            IoSliceMut::advance_slices(&mut rest, n);
        }
        Ok(done)
    }

    fn writev_full<B: IoBuf>(&self, bufs: &[B], offset: u64) -> Result<()> {
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b.bytes())).collect();
        let mut rest = &mut slices[..];
        IoSlice::advance_slices(&mut rest, 0);
        let mut done = 0;
        while !rest.is_empty() {
            let pos = offset + done as u64;
            let len: usize = rest.iter().map(|s| s.len()).sum();
            let n = retry(|| sys::file::pwritev(&self.file, rest, pos))
                .context(|| self.what("pwritev", len, pos))?;
            if n == 0 {
                return Err(Error::Io {
                    context: self.what("pwritev", len, pos),
                    source: io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"),
                });
            }
            done += n;
            if n < len && self.misaligned_after(n) {
                return Err(Error::Io {
                    context: self.what("pwritev", len, pos),
                    source: io::Error::other(format!(
                        "short O_DIRECT write of {n} bytes left the rest misaligned"
                    )),
                });
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(()); // fallocate refuses len 0 with EINVAL
        }
        match retry(|| sys::file::fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, offset, len)) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => {
                log::debug!(
                    "{}: no FALLOC_FL_ZERO_RANGE ({e}); writing zero buffers",
                    self.path.display()
                );
                self.write_zero_buffers(offset, len)
            }
            Err(e) => Err(Error::Io {
                context: format!(
                    "fallocate(ZERO_RANGE) of {len} bytes at offset {offset} in {}",
                    self.path.display()
                ),
                source: e,
            }),
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = usize::try_from(len).unwrap_or(usize::MAX).min(ZERO_CHUNK);
        let zeroes: Box<dyn IoBuf> = match self.direct {
            Some(a) => Box::new(AlignedBuf::new(chunk, (a.mem as usize).max(512))?),
            None => Box::new(vec![0u8; chunk]),
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            self.write_full(&zeroes.bytes()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match retry(|| sys::file::fallocate(&self.file, mode, offset, len)) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => {
                log::debug!(
                    "{}: discard of {len} bytes at offset {offset} ignored: {e}",
                    self.path.display()
                );
                Ok(())
            }
            Err(e) => Err(Error::Io {
                context: format!(
                    "fallocate(PUNCH_HOLE) of {len} bytes at offset {offset} in {}",
                    self.path.display()
                ),
                source: e,
            }),
        }
    }
}
