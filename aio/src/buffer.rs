//! [`Buffer`]: the owned I/O buffer the block layer passes down to files,
//! either a plain vector or an aligned allocation.
//!
//! A request that starts in a job or an export with an aligned buffer
//! reaches an `O_DIRECT` file with that same memory, so the file needs no
//! bounce copy (QEMU allocates every I/O buffer with `qemu_blockalign` for
//! the same reason). Metadata code and tests keep using vectors, which
//! convert for free.

use std::fmt;
use std::ops::{Deref, DerefMut};

use crate::error::Result;
use crate::file::AlignedBuf;

/// The alignment [`Buffer::aligned`] uses: a page, which covers the memory
/// alignment of every `O_DIRECT` device (512 bytes or 4 KiB).
pub const BUFFER_ALIGN: usize = 4096;

/// An owned byte buffer for I/O: a `Vec<u8>` or an [`AlignedBuf`].
///
/// It derefs to the visible bytes. Converting from a `Vec<u8>` moves it;
/// [`into_vec`](Self::into_vec) is free for a vector and copies an aligned
/// buffer. An aligned buffer keeps its allocation when shortened with
/// [`set_len`](Self::set_len), so a pool can reuse it for requests of any
/// size up to its capacity.
///
/// ```
/// use aio::file::Buffer;
/// let mut b = Buffer::aligned(8192)?;
/// assert!(b.is_aligned_to(4096));
/// b[..2].copy_from_slice(b"hi");
/// b.set_len(2);
/// assert_eq!(b, b"hi"[..]);
/// let v: Buffer = vec![1u8, 2, 3].into();
/// assert_eq!(v.into_vec(), vec![1, 2, 3]);
/// # Ok::<(), aio::Error>(())
/// ```
pub struct Buffer(Repr);

enum Repr {
    Vec(Vec<u8>),
    Aligned(AlignedBuf),
}

impl Buffer {
    /// `len` zeroed bytes aligned to [`BUFFER_ALIGN`].
    pub fn aligned(len: usize) -> Result<Buffer> {
        AlignedBuf::new(len, BUFFER_ALIGN).map(|b| Buffer(Repr::Aligned(b)))
    }

    /// `len` zeroed bytes in a plain vector.
    pub fn zeroed(len: usize) -> Buffer {
        Buffer(Repr::Vec(vec![0; len]))
    }

    /// `len` zeroed bytes of the same kind as `self` (aligned the same
    /// way); for the pieces of a split request.
    pub fn zeroed_like(&self, len: usize) -> Result<Buffer> {
        match &self.0 {
            Repr::Vec(_) => Ok(Buffer::zeroed(len)),
            Repr::Aligned(a) => AlignedBuf::new(len, a.align()).map(|b| Buffer(Repr::Aligned(b))),
        }
    }

    /// A buffer of the same kind as `self` (aligned the same way) holding
    /// a copy of `bytes`; used when a request is split into pieces.
    pub fn copy_of(&self, bytes: &[u8]) -> Result<Buffer> {
        match &self.0 {
            Repr::Vec(_) => Ok(Buffer(Repr::Vec(bytes.to_vec()))),
            Repr::Aligned(a) => {
                let mut b = AlignedBuf::new(bytes.len(), a.align())?;
                b.copy_from_slice(bytes);
                Ok(Buffer(Repr::Aligned(b)))
            }
        }
    }

    /// Whether the bytes start at a multiple of `align`.
    pub fn is_aligned_to(&self, align: usize) -> bool {
        align <= 1 || (self.as_ptr() as usize) % align == 0
    }

    /// The bytes the buffer can show without reallocating.
    pub fn capacity(&self) -> usize {
        match &self.0 {
            Repr::Vec(v) => v.capacity(),
            Repr::Aligned(a) => a.capacity(),
        }
    }

    /// Makes the first `len` bytes visible. A vector grows with zeroes; an
    /// aligned buffer is clamped to its capacity and shows what was last
    /// written there (never uninitialised memory).
    pub fn set_len(&mut self, len: usize) {
        match &mut self.0 {
            Repr::Vec(v) => v.resize(len, 0),
            Repr::Aligned(a) => a.set_len(len),
        }
    }

    /// Shortens the buffer to `len` bytes (no-op if it is shorter).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.set_len(len);
        }
    }

    /// The bytes as a vector: free for a vector, a copy for an aligned
    /// buffer.
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Vec(v) => v,
            Repr::Aligned(a) => a.to_vec(),
        }
    }

    /// The vector, if the buffer is one (else the buffer back).
    pub fn try_into_vec(self) -> std::result::Result<Vec<u8>, Buffer> {
        match self.0 {
            Repr::Vec(v) => Ok(v),
            r => Err(Buffer(r)),
        }
    }

    pub(crate) fn into_repr(self) -> std::result::Result<Vec<u8>, AlignedBuf> {
        match self.0 {
            Repr::Vec(v) => Ok(v),
            Repr::Aligned(a) => Err(a),
        }
    }

    pub(crate) fn from_repr(r: std::result::Result<Vec<u8>, AlignedBuf>) -> Buffer {
        match r {
            Ok(v) => Buffer(Repr::Vec(v)),
            Err(a) => Buffer(Repr::Aligned(a)),
        }
    }
}

impl Default for Buffer {
    /// An empty vector.
    fn default() -> Self {
        Buffer(Repr::Vec(Vec::new()))
    }
}

impl Clone for Buffer {
    /// A copy of the visible bytes, aligned as `self` is (a vector if the
    /// aligned allocation fails).
    fn clone(&self) -> Self {
        self.copy_of(self)
            .unwrap_or_else(|_| Buffer(Repr::Vec(self.to_vec())))
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(v: Vec<u8>) -> Self {
        Buffer(Repr::Vec(v))
    }
}

impl From<&[u8]> for Buffer {
    fn from(v: &[u8]) -> Self {
        Buffer(Repr::Vec(v.to_vec()))
    }
}

impl From<AlignedBuf> for Buffer {
    fn from(a: AlignedBuf) -> Self {
        Buffer(Repr::Aligned(a))
    }
}

impl From<Buffer> for Vec<u8> {
    fn from(b: Buffer) -> Self {
        b.into_vec()
    }
}

impl IntoIterator for Buffer {
    type Item = u8;
    type IntoIter = std::vec::IntoIter<u8>;
    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Buffer {
    type Item = &'a u8;
    type IntoIter = std::slice::Iter<'a, u8>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Vec(v) => v,
            Repr::Aligned(a) => a,
        }
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Repr::Vec(v) => v,
            Repr::Aligned(a) => a,
        }
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        self[..] == other[..]
    }
}

impl Eq for Buffer {}

impl PartialEq<[u8]> for Buffer {
    fn eq(&self, other: &[u8]) -> bool {
        self[..] == *other
    }
}

impl PartialEq<Vec<u8>> for Buffer {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self[..] == other[..]
    }
}

impl PartialEq<Buffer> for Vec<u8> {
    fn eq(&self, other: &Buffer) -> bool {
        self[..] == other[..]
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Buffer {
    fn eq(&self, other: &[u8; N]) -> bool {
        self[..] == other[..]
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0 {
            Repr::Vec(_) => "vec",
            Repr::Aligned(_) => "aligned",
        };
        f.debug_struct("Buffer")
            .field("len", &self.len())
            .field("kind", &kind)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_stay_aligned_through_copies_and_length_changes() {
        let mut b = Buffer::aligned(16384).unwrap();
        assert!(b.is_aligned_to(BUFFER_ALIGN));
        b.fill(9);
        b.set_len(4096);
        assert_eq!(b.len(), 4096);
        let c = b.clone();
        assert!(c.is_aligned_to(BUFFER_ALIGN));
        assert_eq!(c, b);
        assert!(b.zeroed_like(512).unwrap().is_aligned_to(BUFFER_ALIGN));
        let piece = b.copy_of(&[1, 2, 3]).unwrap();
        assert!(piece.is_aligned_to(BUFFER_ALIGN));
        assert_eq!(piece, [1u8, 2, 3]);
        b.set_len(16384);
        assert!(b.iter().all(|&x| x == 9), "the earlier bytes come back");
        b.truncate(100_000);
        assert_eq!(b.len(), 16384, "truncate never grows");
        assert_eq!(b.capacity(), 16384);
    }

    #[test]
    fn vectors_convert_without_copying_and_grow_with_zeroes() {
        let v = vec![7u8; 10];
        let p = v.as_ptr();
        let mut b = Buffer::from(v);
        assert_eq!(b.as_ptr(), p);
        b.set_len(12);
        assert_eq!(&b[10..], &[0, 0]);
        let back = b.into_vec();
        assert_eq!(back.len(), 12);
        assert_eq!(Buffer::zeroed(3), vec![0u8, 0, 0]);
        assert_eq!(Buffer::default().len(), 0);
    }
}
