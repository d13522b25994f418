//! Clusters allocated ahead for whole-cluster data writes.
//!
//! A job copying into an empty image allocates a run of clusters per
//! request; each allocation used to write its refcounts (one metadata
//! round trip, under the metadata lock, per request). The reserve takes
//! a bigger run at once — up to [`RESERVE_BYTES`], within one refcount
//! block, one refcount write — from the free tail of the image (holes
//! are still filled exactly), and hands its clusters out to the
//! following whole-cluster writes in order, so consecutive requests also
//! land contiguously in the file.
//!
//! Crash safety: reserved clusters have refcount 1 (written) before any
//! table names them, and L2 entries are written back only after a flush
//! (see `meta`), so a crash leaves them as leaks, nothing worse. The
//! reserve itself is not flushed: nothing needs its refcounts durable
//! before the next write-back, which flushes anyway. What is
//! left of the reserve is given back (refcounts to 0) before a flush, at
//! close and before every whole-image metadata operation (check,
//! snapshots, bitmaps, truncate, preallocation), so an image that was
//! flushed or closed has no leaks from it.

use super::meta::{Geom, Meta};
use super::Qcow2;
use crate::Result;

/// The largest run taken ahead.
pub(super) const RESERVE_BYTES: u64 = 32 << 20;

impl Meta {
    /// `n` contiguous clusters for a whole-cluster data write or a new L2
    /// table (refcount 1, written, not flushed), from the reserve, which is
    /// refilled when it is short. Returns the byte offset of the first.
    pub(crate) async fn alloc_data(&mut self, g: &Geom, n: u64) -> Result<u64> {
        let (first, count) = self.data_reserve;
        if count >= n {
            self.data_reserve = (first + n, count - n);
            return Ok(first * g.cs());
        }
        self.release_data_reserve(g).await?;
        // Holes are filled exactly; only the free tail of the image is
        // taken ahead, within one refcount block (one refcount write per
        // refill).
        let c = self.find_free(g, n).await?;
        if c + n < self.end_cluster {
            return self.alloc(g, n).await;
        }
        let ahead = (RESERVE_BYTES / g.cs()).min(g.rpb()).max(n);
        let off = self.alloc(g, ahead).await?;
        // The file covers the reserve, so the data writes into it do not
        // extend the file one by one (on ext4 an `O_DIRECT` write past the
        // end takes the inode lock exclusively, serialising the copies).
        let end = off + ahead * g.cs();
        if g.file.len() < end {
            g.file.truncate(end).await?;
        }
        let c = off / g.cs();
        self.data_reserve = (c + n, ahead - n);
        Ok(off)
    }

    /// Gives back what is left of the reserve (one refcount write per
    /// refcount block it spans).
    pub(crate) async fn release_data_reserve(&mut self, g: &Geom) -> Result<()> {
        let (first, count) = std::mem::take(&mut self.data_reserve);
        if count == 0 {
            return Ok(());
        }
        if let Err(e) = self.put_refcounts(g, first, count, 0).await {
            // Not given back: the clusters stay allocated (a leak), and
            // are not handed out again either.
            log::warn!("{}: giving back {count} reserved clusters: {e}", g.name);
            return Err(e);
        }
        // A reserve at the tail grew the file (see `alloc_data`): shrink
        // it back once the refcounts saying so are on disk, so a crash in
        // between leaves at worst leaked clusters inside the file.
        let (start, end) = (first * g.cs(), (first + count) * g.cs());
        if g.file.len() == end {
            g.flush().await?;
            g.file.truncate(start).await?;
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Gives back the reserve before an operation that looks at the
    /// whole image's refcounts or must leave no leaks.
    pub(super) async fn settle_reserve(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.meta.lock().await.release_data_reserve(&self.g).await
    }
}
