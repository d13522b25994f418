//! The `Engine::IoUring` paths of [`crate::file::File`]: the same contract
//! as the threads engine (short transfers continued, `EINTR`/`EAGAIN`
//! retried, errors naming the operation, offset and file), on the current
//! context's io_uring.

use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::error::{Error, Result};
use crate::file::{AlignedBuf, Buffer, FileInner, IoBuf};
use crate::sys::uring_io::{IoOp, OwnedBuf};
use crate::uring_file::{Submit, UringOp};

/// Moves a caller's buffer into the form the ring owns. The type is
/// found through `Any` on an `Option` slot on the stack, so nothing is
/// allocated (a `Box<dyn Any>` per conversion was two allocations per
/// request).
pub(crate) fn to_owned_buf<B: IoBuf>(b: B) -> OwnedBuf {
    let mut slot = Some(b);
    let any: &mut dyn Any = &mut slot;
    let repr = if let Some(buf) = any.downcast_mut::<Option<Buffer>>() {
        buf.take().map(Buffer::into_repr)
    } else if let Some(v) = any.downcast_mut::<Option<Vec<u8>>>() {
        v.take().map(Ok)
    } else if let Some(a) = any.downcast_mut::<Option<AlignedBuf>>() {
        a.take().map(Err)
    } else {
        None
    };
    match repr {
        Some(Ok(v)) => OwnedBuf::Vec(v),
        Some(Err(a)) => OwnedBuf::Aligned(a.into_raw()),
        None => unreachable!("IoBuf is sealed to Vec<u8>, AlignedBuf and Buffer"),
    }
}

/// The inverse of [`to_owned_buf`].
pub(crate) fn from_owned_buf<B: IoBuf>(o: OwnedBuf) -> B {
    let r = match o {
        OwnedBuf::Vec(v) => Ok(v),
        OwnedBuf::Aligned(a) => Err(AlignedBuf::from_raw(a)),
    };
    let mut out: Option<B> = None;
    let any: &mut dyn Any = &mut out;
    if let Some(slot) = any.downcast_mut::<Option<Buffer>>() {
        *slot = Some(Buffer::from_repr(r));
    } else if let Some(slot) = any.downcast_mut::<Option<Vec<u8>>>() {
        *slot = r.ok();
    } else if let Some(slot) = any.downcast_mut::<Option<AlignedBuf>>() {
        *slot = r.err();
    }
    match out {
        Some(b) => b,
        None => unreachable!("a buffer comes back as the type it went in as"),
    }
}

fn os_error(inner: &FileInner, op: &str, len: usize, offset: u64, res: i32) -> Error {
    Error::Io {
        context: inner.what(op, len, offset),
        source: io::Error::from_raw_os_error(-res),
    }
}

fn retryable(res: i32) -> bool {
    res == -libc::EINTR || res == -libc::EAGAIN
}

fn fd(inner: &FileInner) -> RawFd {
    inner.file.as_raw_fd()
}

/// `O_DIRECT` requests go to the device at once; buffered ones batch.
fn submit_mode(inner: &FileInner) -> Submit {
    if inner.direct_mem_align().is_some() {
        Submit::Now
    } else {
        Submit::Batch
    }
}

fn one(bufs: Vec<OwnedBuf>) -> OwnedBuf {
    match bufs.into_iter().next() {
        Some(b) => b,
        None => unreachable!("a read or write request owns exactly one buffer"),
    }
}

/// Which way a transfer goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// The one transfer loop behind `pread`/`pwrite`/`preadv`/`pwritev`: goes
/// on after short transfers, retries `EINTR`/`EAGAIN`, stops a read at end
/// of file (or at a short `O_DIRECT` read, which is end of file too).
/// Returns the bytes done and the buffers.
async fn transfer(
    inner: &FileInner,
    dir: Dir,
    vectored: bool,
    mut bufs: Vec<OwnedBuf>,
    offset: u64,
) -> Result<(usize, Vec<OwnedBuf>)> {
    let name = match (dir, vectored) {
        (Dir::Read, false) => "pread",
        (Dir::Write, false) => "pwrite",
        (Dir::Read, true) => "preadv",
        (Dir::Write, true) => "pwritev",
    };
    let total: usize = bufs.iter().map(OwnedBuf::len).sum();
    let mut done = 0usize;
    while done < total {
        let (fd, skip, pos) = (fd(inner), done, offset + done as u64);
        let op = match (dir, vectored) {
            (Dir::Read, false) => IoOp::Read {
                fd,
                buf: one(bufs),
                skip,
                offset: pos,
            },
            (Dir::Write, false) => IoOp::Write {
                fd,
                buf: one(bufs),
                skip,
                offset: pos,
            },
            (Dir::Read, true) => IoOp::Readv {
                fd,
                bufs,
                skip,
                offset: pos,
            },
            (Dir::Write, true) => IoOp::Writev {
                fd,
                bufs,
                skip,
                offset: pos,
            },
        };
        let c = UringOp::new(op, submit_mode(inner)).await?;
        bufs = c.bufs;
        match c.result {
            0 if dir == Dir::Read => break,
            0 => {
                return Err(Error::Io {
                    context: inner.what(name, total - done, pos),
                    source: io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"),
                })
            }
            n if n > 0 => {
                let n = n as usize;
                done += n;
                if inner.misaligned_after(n) {
                    if dir == Dir::Read {
                        break;
                    }
                    if done < total {
                        return Err(Error::Io {
                            context: inner.what(name, total - done, pos),
                            source: io::Error::other(format!(
                                "short O_DIRECT write of {n} bytes left the rest misaligned"
                            )),
                        });
                    }
                }
            }
            r if retryable(r) => {}
            r => return Err(os_error(inner, name, total - done, pos, r)),
        }
    }
    Ok((done, bufs))
}

/// `pread` until `buf` is full or end of file.
pub(crate) async fn read<B: IoBuf>(inner: &FileInner, buf: B, offset: u64) -> Result<(usize, B)> {
    let (n, bufs) = transfer(inner, Dir::Read, false, vec![to_owned_buf(buf)], offset).await?;
    Ok((n, from_owned_buf(one(bufs))))
}

/// `pwrite` all of `buf`.
pub(crate) async fn write<B: IoBuf>(inner: &FileInner, buf: B, offset: u64) -> Result<B> {
    let (_, bufs) = transfer(inner, Dir::Write, false, vec![to_owned_buf(buf)], offset).await?;
    Ok(from_owned_buf(one(bufs)))
}

/// `preadv` until the buffers are full or end of file.
pub(crate) async fn readv<B: IoBuf>(
    inner: &FileInner,
    bufs: Vec<B>,
    offset: u64,
) -> Result<(usize, Vec<B>)> {
    let owned = bufs.into_iter().map(to_owned_buf).collect();
    let (n, owned) = transfer(inner, Dir::Read, true, owned, offset).await?;
    Ok((n, owned.into_iter().map(from_owned_buf).collect()))
}

/// `pwritev` all of the buffers.
pub(crate) async fn writev<B: IoBuf>(
    inner: &FileInner,
    bufs: Vec<B>,
    offset: u64,
) -> Result<Vec<B>> {
    let owned = bufs.into_iter().map(to_owned_buf).collect();
    let (_, owned) = transfer(inner, Dir::Write, true, owned, offset).await?;
    Ok(owned.into_iter().map(from_owned_buf).collect())
}

/// `fdatasync`.
pub(crate) async fn flush(inner: &FileInner) -> Result<()> {
    loop {
        let c = UringOp::new(IoOp::Fdatasync { fd: fd(inner) }, submit_mode(inner)).await?;
        match c.result {
            r if r >= 0 => return Ok(()),
            r if retryable(r) => {}
            r => {
                return Err(Error::Io {
                    context: format!("fdatasync of {}", inner.path.display()),
                    source: io::Error::from_raw_os_error(-r),
                })
            }
        }
    }
}

/// `fallocate`; `Ok(false)` when the filesystem does not support `mode`.
pub(crate) async fn fallocate(
    inner: &FileInner,
    name: &str,
    mode: i32,
    offset: u64,
    len: u64,
) -> Result<bool> {
    loop {
        let c = UringOp::new(
            IoOp::Fallocate {
                fd: fd(inner),
                mode,
                offset,
                len,
            },
            submit_mode(inner),
        )
        .await?;
        match c.result {
            r if r >= 0 => return Ok(true),
            r if r == -libc::EOPNOTSUPP => return Ok(false),
            r if retryable(r) => {}
            r => {
                return Err(Error::Io {
                    context: format!(
                        "{name} of {len} bytes at offset {offset} in {}",
                        inner.path.display()
                    ),
                    source: io::Error::from_raw_os_error(-r),
                })
            }
        }
    }
}

/// Zeroes `len` bytes at `offset`: `FALLOC_FL_ZERO_RANGE`, or zero buffers
/// where the filesystem lacks it.
pub(crate) async fn write_zeroes(inner: &FileInner, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let name = "fallocate(ZERO_RANGE)";
    if fallocate(inner, name, libc::FALLOC_FL_ZERO_RANGE, offset, len).await? {
        return Ok(());
    }
    log::debug!(
        "{}: no FALLOC_FL_ZERO_RANGE; writing zero buffers",
        inner.path.display()
    );
    let chunk = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(crate::file::ZERO_CHUNK);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk as u64) as usize;
        match inner.direct_mem_align() {
            Some(align) => {
                let zeroes = AlignedBuf::new(n, align)?;
                write(inner, zeroes, offset + done).await?;
            }
            None => {
                write(inner, vec![0u8; n], offset + done).await?;
            }
        }
        done += n as u64;
    }
    Ok(())
}

/// Punches a hole (advisory: unsupported is not an error).
pub(crate) async fn discard(inner: &FileInner, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    if !fallocate(inner, "fallocate(PUNCH_HOLE)", mode, offset, len).await? {
        log::debug!("{}: discard unsupported; ignored", inner.path.display());
    }
    Ok(())
}
