//! A zero-initialised heap allocation with a caller-chosen alignment, for
//! `O_DIRECT` buffers.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::slice;

/// An owned, zeroed, aligned byte buffer: `Box<[u8]>` with an alignment.
pub(crate) struct RawAlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The layout the allocation was made with (size at least 1).
    layout: Layout,
}

// SAFETY: the buffer exclusively owns its allocation, like `Box<[u8]>`;
// nothing else holds the pointer, so moving it to another thread is sound.
unsafe impl Send for RawAlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`; there is no interior
// mutability.
unsafe impl Sync for RawAlignedBuf {}

impl RawAlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align`, which must be a
    /// power of two.
    pub(crate) fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        // A zero-sized allocation is undefined behaviour, so allocate at
        // least one byte; `len` stays the visible length.
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {len} bytes aligned to {align}"),
            )
        })?;
        Ok(Self { ptr, len, layout })
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` bytes that
        // were initialised (zeroed) at allocation and only ever written
        // through `as_mut_slice`; the borrow of `self` keeps it alive and
        // prevents mutable access for the slice's lifetime.
        unsafe { slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`; the unique borrow of `self` makes this
        // the only live reference to the bytes.
        unsafe { slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The alignment the buffer was allocated with.
    pub(crate) fn align(&self) -> usize {
        self.layout.align()
    }

    /// The bytes the allocation holds (the most `set_len` accepts).
    pub(crate) fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Makes the first `len` bytes of the allocation the visible ones.
    /// Every byte of the allocation was initialised (zeroed) when it was
    /// made, so growing back within the capacity exposes only bytes that
    /// were written before. `len` above the capacity is clamped to it.
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }
}

impl Drop for RawAlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with `self.layout`
        // and is freed exactly once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable() {
        for (len, align) in [(0, 512), (1, 512), (4096, 4096), (100_000, 1 << 16)] {
            let mut b = RawAlignedBuf::zeroed(len, align).unwrap();
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % align, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
            assert_eq!(b.align(), align);
        }
    }

    #[test]
    fn set_len_stays_within_the_allocation() {
        let mut b = RawAlignedBuf::zeroed(8192, 4096).unwrap();
        b.as_mut_slice().fill(3);
        b.set_len(100);
        assert_eq!(b.as_slice().len(), 100);
        b.set_len(1 << 20);
        assert_eq!(b.as_slice().len(), 8192, "clamped to the capacity");
        assert!(b.as_slice().iter().all(|&x| x == 3));
        let mut e = RawAlignedBuf::zeroed(0, 512).unwrap();
        e.set_len(1);
        assert_eq!(e.as_slice().len(), 1, "the one byte allocated for len 0");
    }

    #[test]
    fn bad_alignment_is_an_error() {
        assert!(RawAlignedBuf::zeroed(10, 3).is_err());
        assert!(RawAlignedBuf::zeroed(usize::MAX - 10, 4096).is_err());
    }
}
