//! Copy buffers a job reuses (QEMU's mirror keeps its `buf-size` of
//! buffers for the whole job the same way).
//!
//! Each copy takes a buffer and gives it back after its write, so a job
//! allocates (and zeroes) at most as many buffers as it has copies in
//! flight, once, instead of one fresh buffer per chunk. The buffers are
//! aligned ([`Buffer::aligned`]), so on a `cache.direct=on` image they go
//! to the file as they are, with no bounce copy.

use std::sync::Mutex;

use crate::block::Buffer;
use crate::{Error, Result};

/// Free copy buffers of one job.
pub(crate) struct BufPool {
    free: Mutex<Vec<Buffer>>,
    /// The most buffers kept between copies (the job's copies in flight).
    keep: usize,
}

impl BufPool {
    /// A pool that keeps up to `keep` free buffers.
    pub(crate) fn new(keep: usize) -> BufPool {
        BufPool {
            free: Mutex::new(Vec::new()),
            keep: keep.max(1),
        }
    }

    /// A buffer of `len` bytes: a free one large enough, else a new one.
    /// Its contents are unspecified (the read that fills it overwrites
    /// them all).
    pub(crate) fn get(&self, len: usize) -> Result<Buffer> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter()
                .position(|b| b.capacity() >= len)
                .map(|i| free.swap_remove(i))
        };
        match reused {
            Some(mut b) => {
                b.set_len(len);
                Ok(b)
            }
            None => Buffer::aligned(len)
                .map_err(|e| Error::Failed(format!("allocating a {len}-byte copy buffer: {e}"))),
        }
    }

    /// Gives a buffer back (dropped if the pool holds enough already).
    pub(crate) fn put(&self, buf: Buffer) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }

    /// Free buffers held.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_limit_and_keep_their_memory() {
        let pool = BufPool::new(2);
        let a = pool.get(1 << 20).unwrap();
        assert!(a.is_aligned_to(4096));
        let addr = a.as_ptr();
        pool.put(a);
        let b = pool.get(4096).unwrap();
        assert_eq!(b.as_ptr(), addr, "the free buffer serves a smaller copy");
        assert_eq!(b.len(), 4096);
        let c = pool.get(1 << 20).unwrap();
        assert_ne!(c.as_ptr(), addr);
        let d = pool.get(512).unwrap();
        pool.put(b);
        pool.put(c);
        pool.put(d);
        assert_eq!(pool.held(), 2, "no more than `keep` are kept");
        let e = pool.get(1 << 20).unwrap();
        assert_eq!(
            e.len(),
            1 << 20,
            "a reused buffer grows back to its capacity"
        );
    }
}
