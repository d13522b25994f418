//! Requests of any shape on an `O_DIRECT` file (`cache.direct=on`).
//!
//! `O_DIRECT` wants offsets, lengths and buffer addresses aligned (to the
//! logical block size and the memory alignment `aio::file` measured at
//! open). The block layer above issues requests of any shape: qcow2
//! writes 8-byte header fields, guests write 512-byte sectors to a disk
//! with 4 KiB blocks. Here an unaligned request goes through an aligned
//! bounce buffer; an unaligned write becomes read-modify-write of the
//! blocks it touches.
//!
//! Read-modify-write would lose data if another write to the same blocks
//! ran between its read and its write, so every write on the file holds a
//! lock on its block-aligned range while it runs (QEMU's serialising
//! requests); writes to disjoint blocks still run in parallel, and reads
//! take no lock.

use std::sync::Mutex;

use aio::file::{AlignedBuf, File};
use aio::CoQueue;

/// Offsets and lengths an `O_DIRECT` file needs, and where a request
/// stands against them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Alignment {
    /// Offsets and lengths: a power of two.
    pub(crate) request: u64,
    /// Buffer addresses: a power of two.
    pub(crate) memory: usize,
}

impl Alignment {
    pub(crate) fn of(file: &File) -> Alignment {
        Alignment {
            request: file.request_alignment().max(1),
            memory: file.memory_alignment().max(1),
        }
    }

    /// Whether nothing needs aligning (a file without `O_DIRECT`).
    pub(crate) fn is_trivial(&self) -> bool {
        self.request == 1 && self.memory == 1
    }

    fn down(&self, x: u64) -> u64 {
        x & !(self.request - 1)
    }

    fn up(&self, x: u64) -> u64 {
        x.div_ceil(self.request) * self.request
    }

    /// The block-aligned range covering `[offset, offset + len)`.
    pub(crate) fn cover(&self, offset: u64, len: u64) -> (u64, u64) {
        (self.down(offset), self.up(offset + len))
    }

    /// The block-aligned range inside `[offset, offset + len)` (empty:
    /// `start >= end`).
    pub(crate) fn inside(&self, offset: u64, len: u64) -> (u64, u64) {
        (self.up(offset), self.down(offset + len))
    }

    /// Whether a request at `offset` of `len` bytes from `buf` can go to
    /// the file as it is.
    pub(crate) fn fits(&self, offset: u64, len: u64, buf: &[u8]) -> bool {
        offset % self.request == 0
            && len % self.request == 0
            && (buf.as_ptr() as usize) % self.memory == 0
    }

    /// A zeroed aligned buffer of `len` bytes.
    pub(crate) fn buffer(&self, len: u64) -> aio::Result<AlignedBuf> {
        AlignedBuf::new(len as usize, self.memory.max(512))
    }
}

/// Byte ranges of writes in flight; a new write waits while its range
/// overlaps one of them.
#[derive(Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: CoQueue,
}

/// A held range; dropping it lets overlapping writes go on.
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub(crate) async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            // Queue first, then look: a guard dropped in between still
            // wakes this waiter.
            let w = self.freed.wait();
            {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        lock: self,
                        range: (start, end),
                    };
                }
            }
            w.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        {
            let mut held = self.lock.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = held.iter().position(|&r| r == self.range) {
                held.swap_remove(i);
            }
        }
        self.lock.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_and_inside_round_outwards_and_inwards() {
        let a = Alignment {
            request: 4096,
            memory: 4096,
        };
        assert_eq!(a.cover(100, 8), (0, 4096));
        assert_eq!(a.cover(4095, 2), (0, 8192));
        assert_eq!(a.cover(4096, 4096), (4096, 8192));
        assert_eq!(a.inside(100, 8), (4096, 0));
        assert_eq!(a.inside(100, 10000), (4096, 8192));
        assert!(!a.is_trivial());
        let v = a.buffer(8192).unwrap();
        assert!(a.fits(4096, 8192, &v));
        assert!(!a.fits(512, 8192, &v));
        assert!(!a.fits(4096, 8192, &v[512..]));
    }

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let ctx = aio::AioContext::new().unwrap();
        let lock = std::sync::Arc::new(RangeLock::default());
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        ctx.block_on(async {
            let first = lock.lock(0, 4096).await;
            // Disjoint: granted at once.
            let other = lock.lock(4096, 8192).await;
            let (l, o) = (lock.clone(), order.clone());
            let waiter = ctx.spawn(async move {
                let _g = l.lock(1024, 2048).await;
                o.lock().unwrap().push("overlapping");
            });
            aio::yield_now().await;
            order.lock().unwrap().push("first released");
            drop(first);
            waiter.await.unwrap();
            drop(other);
        });
        assert_eq!(
            *order.lock().unwrap(),
            vec!["first released", "overlapping"]
        );
    }
}
