//! Positioned and vectored file I/O, `fallocate`, `fdatasync`, `lseek`
//! for data and holes, and the
//! queries that tell how `O_DIRECT` transfers must be aligned.
//!
//! Each wrapper makes exactly one system call: retrying `EINTR`/`EAGAIN`
//! and looping over short transfers is the caller's job.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

/// Linux's `UIO_MAXIOV`: the most iovecs one `preadv`/`pwritev` accepts.
/// Longer lists are transferred by the caller's short-transfer loop.
const IOV_MAX: usize = 1024;

/// Converts a file offset to `off_t`.
fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} does not fit in off_t"),
        )
    })
}

/// One `pread(2)` into `buf` at `offset`; may read less than asked.
pub(crate) fn pread(fd: &impl AsRawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = off_t(offset)?;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let n = syscall!(pread(
        fd.as_raw_fd(),
        buf.as_mut_ptr().cast(),
        buf.len(),
        off
    ))?;
    Ok(n as usize)
}

/// One `pwrite(2)` of `buf` at `offset`; may write less than asked.
pub(crate) fn pwrite(fd: &impl AsRawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
    let off = off_t(offset)?;
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call.
    let n = syscall!(pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off))?;
    Ok(n as usize)
}

/// One `preadv(2)` into up to [`IOV_MAX`] of `bufs` at `offset`.
pub(crate) fn preadv(
    fd: &impl AsRawFd,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    let off = off_t(offset)?;
    let cnt = bufs.len().min(IOV_MAX) as libc::c_int;
    // SAFETY: `IoSliceMut` is documented to be ABI-compatible with `iovec`
    // on Unix; the array holds at least `cnt` entries, each describing
    // memory borrowed mutably (so valid for writes) for the call.
    let n = syscall!(preadv(
        fd.as_raw_fd(),
        bufs.as_mut_ptr().cast::<libc::iovec>().cast_const(),
        cnt,
        off
    ))?;
    Ok(n as usize)
}

/// One `pwritev(2)` of up to [`IOV_MAX`] of `bufs` at `offset`.
pub(crate) fn pwritev(fd: &impl AsRawFd, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let off = off_t(offset)?;
    let cnt = bufs.len().min(IOV_MAX) as libc::c_int;
    // SAFETY: `IoSlice` is documented to be ABI-compatible with `iovec` on
    // Unix; the array holds at least `cnt` entries, each describing memory
    // valid for reads for the call.
    let n = syscall!(pwritev(
        fd.as_raw_fd(),
        bufs.as_ptr().cast::<libc::iovec>(),
        cnt,
        off
    ))?;
    Ok(n as usize)
}

/// `fallocate(2)` with `mode` over `len` bytes at `offset`.
pub(crate) fn fallocate(
    fd: &impl AsRawFd,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let (off, len) = (off_t(offset)?, off_t(len)?);
    // SAFETY: plain integer arguments; no memory is passed.
    syscall!(fallocate(fd.as_raw_fd(), mode, off, len)).map(drop)
}

/// `lseek(2)` with `SEEK_DATA` (`data`) or `SEEK_HOLE`: the first offset
/// at or after `offset` that starts data or a hole; `None` where the
/// kernel says there is none (`ENXIO`: no data up to the end, or
/// `offset` at or past the end).
pub(crate) fn seek_data_or_hole(
    fd: &impl AsRawFd,
    offset: u64,
    data: bool,
) -> io::Result<Option<u64>> {
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: plain integer arguments; no memory is passed.
    match syscall!(lseek(fd.as_raw_fd(), off_t(offset)?, whence)) {
        Ok(pos) => Ok(Some(pos as u64)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fdatasync(2)`.
pub(crate) fn fdatasync(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: plain integer argument; no memory is passed.
    syscall!(fdatasync(fd.as_raw_fd())).map(drop)
}

/// A block device's logical block size (`ioctl(BLKSSZGET)`).
pub(crate) fn logical_block_size(fd: &impl AsRawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points
    // to a live, writable `c_int`.
    syscall!(ioctl(
        fd.as_raw_fd(),
        libc::BLKSSZGET,
        &mut size as *mut libc::c_int
    ))?;
    u32::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("BLKSSZGET returned {size}"),
        )
    })
}

/// `O_DIRECT` alignment requirements reported by `statx(STATX_DIOALIGN)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// Required alignment of buffer addresses, in bytes.
    pub(crate) mem: u32,
    /// Required alignment of file offsets and lengths, in bytes.
    pub(crate) offset: u32,
}

/// The file's `O_DIRECT` alignment from `statx(STATX_DIOALIGN)` (Linux
/// 6.1+). `Ok(None)` when the kernel or filesystem does not report it.
pub(crate) fn dio_align(fd: &impl AsRawFd) -> io::Result<Option<DioAlign>> {
    // SAFETY: `statx` is a plain C struct of integers, for which all-zero
    // bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated (empty) string, which with
    // AT_EMPTY_PATH means "the fd itself"; `stx` is a live, writable statx.
    let res = syscall!(statx(
        fd.as_raw_fd(),
        c"".as_ptr(),
        libc::AT_EMPTY_PATH,
        libc::STATX_DIOALIGN,
        &mut stx
    ));
    match res {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(None),
        Err(e) => return Err(e),
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(None);
    }
    Ok(Some(DioAlign {
        mem: stx.stx_dio_mem_align.max(1),
        offset: stx.stx_dio_offset_align,
    }))
}
