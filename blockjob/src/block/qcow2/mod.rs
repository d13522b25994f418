//! The qcow2 format driver (version 3, and version 2 read/write without
//! zero clusters).
//!
//! Reads follow the L1/L2 tables: unallocated ranges come from the
//! backing node (zeroes past its end, or with no backing), zero clusters
//! read as zeroes, compressed clusters are inflated, extended L2 entries
//! are read per subcluster. Writes allocate through the refcounts, copy
//! partial clusters from the backing chain, and update metadata in the
//! order refcounts → data and L2 → L1 with flushes between (see `meta`).
//! Metadata changes are serialised by one `CoMutex`; reads and writes to
//! clusters already allocated (refcount 1) run concurrently.

use std::io::Read as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aio::{CoMutex, CoQueue};

mod bitmaps;
mod cache;
mod check;
mod create;
pub(crate) mod entry;
pub(crate) mod header;
pub(crate) mod meta;
mod prealloc;
mod repair;
mod reserve;
mod snapshot;
mod write;

pub(crate) use create::create;
pub use create::{CreateOptions, Preallocation};

use self::entry::Mapping;
use self::header::{field, Header, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY};
use self::meta::{Geom, Meta};
use super::bitmap::DirtyBitmap;
use super::{
    BlockDriver, BlockNode, BlockStatus, BoxFuture, Buffer, CheckOptions, CheckReport, ImageInfo,
    PermGuard, SnapshotCreateOptions, SnapshotInfo, SnapshotRef,
};
use crate::{Error, Result};

/// An open qcow2 image.
pub(crate) struct Qcow2 {
    g: Geom,
    _file_perm: PermGuard,
    backing: Mutex<Option<PermGuard>>,
    header: Mutex<Header>,
    read_only: AtomicBool,
    size: AtomicU64,
    meta: CoMutex<Meta>,
    dirty_set: AtomicBool,
    /// What the repair of a dirty image on open did, until a
    /// `check -r` reports it.
    dirty_repair: Mutex<Option<CheckReport>>,
    in_flight: InFlight,
    /// The bitmaps read at open, until the node takes them.
    loaded: Mutex<Vec<DirtyBitmap>>,
    /// A copy of the bitmap directory for `info` (the truth is in `meta`).
    dir_view: Mutex<Vec<bitmaps::DirEntry>>,
    allocating: write::Allocating,
    maps: write::MapQueue,
}

/// Requests doing data I/O after releasing the metadata lock (reads, and
/// writes in place to clusters with refcount 1). Operations that change
/// what those clusters mean (snapshot create and revert, and discards
/// and zero writes that free clusters) take the lock, so no new one
/// starts, and wait for these to finish: QEMU's drain, for this driver
/// only. Without that wait a freed cluster could be allocated again
/// while a late in-place write was still on its way to it.
#[derive(Default)]
struct InFlight {
    n: AtomicUsize,
    /// Set while `drain` waits, so the last guard of a request that
    /// nobody drains does not take the queue's lock to wake no one.
    draining: AtomicBool,
    idle: CoQueue,
}

/// One request counted in [`InFlight`]; dropping it ends the request.
pub(super) struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Counts a request; call with the metadata lock held.
    fn enter(&self) -> InFlightGuard<'_> {
        self.n.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self)
    }

    /// Waits until no request is counted; call with the metadata lock held.
    async fn drain(&self) {
        // Announce first, then queue, then look; a guard decrements,
        // then looks for the announcement. With sequentially consistent
        // operations on both sides, either this sees the count at 0 or
        // the last guard sees `draining` and wakes the queued waiter.
        self.draining.store(true, Ordering::SeqCst);
        loop {
            // A guard dropped after `wait` still wakes us (the waiter is
            // registered when `wait` is called).
            let w = self.idle.wait();
            if self.n.load(Ordering::SeqCst) == 0 {
                // One drain at a time (the metadata lock is held).
                self.draining.store(false, Ordering::SeqCst);
                return;
            }
            w.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        // Pairs with the stores and the load in `drain`.
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.draining.load(Ordering::SeqCst) {
            self.0.idle.notify_all();
        }
    }
}

impl Qcow2 {
    /// Parses the header of the image in `file` (no tables yet).
    pub(crate) async fn read_header(file: &BlockNode, writable: bool) -> Result<Header> {
        let n = file.len().min(2 << 20);
        let buf = file.read(0, vec![0; n as usize]).await?;
        Header::parse(&buf, writable).map_err(|r| Error::open(file.filename(), r))
    }

    /// Opens an image on an attached file child with an already opened
    /// backing node (attached by the caller).
    pub(crate) async fn open(
        file: PermGuard,
        header: Header,
        backing: Option<PermGuard>,
        writable: bool,
        l2_cache_size: Option<u64>,
    ) -> Result<Qcow2> {
        let name = file.node().filename().to_string();
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::open(&name, "external data files are not supported"));
        }
        if header.compression_type != 0 {
            return Err(Error::open(&name, "zstd compression is not supported"));
        }
        if header.crypt_method != 0 {
            return Err(Error::open(&name, "encrypted images are not supported"));
        }
        if writable && header.extended_l2() {
            return Err(Error::open(
                &name,
                "writing images with extended L2 entries (subclusters) is not supported; open read-only",
            ));
        }
        let g = Geom {
            name: name.clone(),
            file: file.node().clone(),
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            refcount_order: header.refcount_order,
            version: header.version,
        };
        let mut meta = Meta::load(
            &g,
            header.l1_table_offset,
            header.l1_size,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            l2_cache_size,
        )
        .await?;
        let (snapshots, table_len) =
            snapshot::load(&g, header.nb_snapshots, header.snapshots_offset).await?;
        meta.snapshots = snapshots;
        meta.snapshots_at = (header.snapshots_offset, table_len);
        let stored = bitmaps::load(&g, &header, &mut meta, !writable).await?;
        meta.bitmap_dir = stored.dir;
        meta.bitmaps_at = stored.at;
        if writable {
            bitmaps::mark_in_use(&g, &mut meta).await?;
        }
        let q = Qcow2 {
            g,
            _file_perm: file,
            backing: Mutex::new(backing),
            size: AtomicU64::new(header.size),
            header: Mutex::new(header),
            read_only: AtomicBool::new(!writable),
            meta: CoMutex::new(meta),
            dirty_set: AtomicBool::new(false),
            dirty_repair: Mutex::new(None),
            in_flight: InFlight::default(),
            loaded: Mutex::new(stored.bitmaps),
            dir_view: Mutex::new(Vec::new()),
            allocating: write::Allocating::default(),
            maps: write::MapQueue::default(),
        };
        q.set_dir_view(&q.meta.lock().await.bitmap_dir);
        if writable {
            let dirty = q.header().incompatible_features & INCOMPAT_DIRTY != 0;
            q.mark_dirty().await?;
            if dirty {
                q.repair_dirty().await?;
            }
        }
        Ok(q)
    }

    /// Repairs an image left dirty (a writer with lazy refcounts that did
    /// not close it): refcounts rebuilt from the references, leaks freed,
    /// COPIED flags fixed, as QEMU does when it opens one read-write.
    /// Refuses the open if errors remain.
    async fn repair_dirty(&self) -> Result<()> {
        log::warn!(
            "qcow2: image '{}' was not closed cleanly; repairing its refcounts",
            self.g.name
        );
        let r = self.do_check_repair(&CheckOptions::all()).await?;
        log::info!(
            "qcow2: '{}': {} leaked clusters and {} corruptions repaired",
            self.g.name,
            r.leaks_fixed,
            r.corruptions_fixed
        );
        *self.dirty_repair.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        let after = self.do_check().await?;
        if !after.corruptions.is_empty() || !after.leaks.is_empty() {
            return Err(Error::open(
                &self.g.name,
                format!(
                    "the image was dirty and could not be repaired ({} errors and {} leaks remain: {}); open it read-only",
                    after.corruptions.len(),
                    after.leaks.len(),
                    after.corruptions.first().or(after.leaks.first()).map_or("", |s| s.as_str())
                ),
            ));
        }
        Ok(())
    }

    /// Sets the dirty bit (v3) and clears the autoclear bits we do not
    /// maintain (all but bitmaps, kept when the image has a bitmap
    /// directory we loaded), then flushes.
    async fn mark_dirty(&self) -> Result<()> {
        if self.g.version < 3 {
            return Ok(());
        }
        let has_dir = self.meta.lock().await.bitmaps_at.0 != 0;
        let (autoclear, incompat) = {
            let mut h = self.header();
            let keep = if has_dir {
                header::AUTOCLEAR_BITMAPS
            } else {
                0
            };
            h.autoclear_features &= keep;
            (h.autoclear_features, h.incompatible_features)
        };
        // Always written: `bitmaps::mark_in_use` may have cleared it.
        self.g
            .write_file(field::AUTOCLEAR, autoclear.to_be_bytes().to_vec())
            .await?;
        let v = incompat | INCOMPAT_DIRTY;
        self.g
            .write_file(field::INCOMPATIBLE, v.to_be_bytes().to_vec())
            .await?;
        self.g.flush().await?;
        self.dirty_set.store(true, Ordering::Release);
        Ok(())
    }

    /// Updates the copy of the bitmap directory `info` shows.
    pub(crate) fn set_dir_view(&self, dir: &[bitmaps::DirEntry]) {
        *self.dir_view.lock().unwrap_or_else(|e| e.into_inner()) = dir.to_vec();
    }

    /// `Could not WHAT of 'FILE': read-only image` on a read-only image.
    fn refuse_read_only(&self, what: &str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::Permission {
                node: self.g.name.clone(),
                reason: format!("Could not {what} of '{}': read-only image", self.g.name),
            });
        }
        Ok(())
    }

    fn header(&self) -> std::sync::MutexGuard<'_, Header> {
        self.header.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the backing child and, with `record`, the backing file name
    /// and format recorded in the image (QEMU's
    /// `qcow2_change_backing_file`).
    ///
    /// Ordering: everything written so far (data, L2/L1, refcounts) is
    /// flushed *before* the header is rewritten, and the header is flushed
    /// before the in-memory backing link changes, so the image on disk
    /// never names a backing file whose data it still relies on without
    /// having its own copy. The header cluster is re-read from disk (the
    /// truth: L1/refcount table moves and the dirty bit are written there
    /// field by field), modified and written back whole, under the
    /// metadata lock.
    async fn do_set_backing(
        &self,
        backing: Option<PermGuard>,
        record: Option<(Option<String>, Option<String>)>,
    ) -> Result<()> {
        if let Some((name, format)) = record {
            self.refuse_read_only("update backing file link")?;
            let _m = self.meta.lock().await;
            self.g.flush().await?;
            let cs = self.g.cs();
            let buf = self.g.read_file(0, cs).await?;
            let mut h = Header::parse(&buf, false).map_err(|r| Error::corrupt(&self.g.name, r))?;
            h.backing_file = name;
            h.extensions
                .retain(|e| !matches!(e, header::Extension::BackingFormat(_)));
            if h.backing_file.is_some() {
                if let Some(f) = format {
                    h.extensions.insert(0, header::Extension::BackingFormat(f));
                }
            }
            let out = h
                .serialize()
                .map_err(|r| Error::InvalidArgument(format!("{}: {r}", self.g.name)))?;
            self.g.write_file(0, out).await?;
            self.g.flush().await?;
            let mut mem = self.header();
            mem.backing_file = h.backing_file.clone();
            mem.extensions = h.extensions.clone();
        }
        let old = {
            let mut b = self.backing.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *b, backing)
        };
        drop(old);
        Ok(())
    }

    fn backing_node(&self) -> Option<Arc<BlockNode>> {
        let b = self.backing.lock().unwrap_or_else(|e| e.into_inner());
        b.as_ref().map(|p| p.node().clone())
    }

    /// Reads `buf.len()` bytes at `offset` from the backing chain into
    /// `buf` (zeroes where there is none or past its end); a backing node
    /// covering the whole range reads straight into it.
    pub(crate) async fn read_backing(&self, offset: u64, mut buf: Buffer) -> Result<Buffer> {
        let len = buf.len() as u64;
        let Some(b) = self.backing_node() else {
            buf.fill(0);
            return Ok(buf);
        };
        let blen = b.len();
        if offset + len <= blen {
            return b.read(offset, buf).await;
        }
        buf.fill(0);
        if offset < blen {
            let n = (blen - offset).min(len);
            let part = b
                .read(
                    offset,
                    buf.zeroed_like(n as usize)
                        .map_err(|e| Error::io(&self.g.name, e))?,
                )
                .await?;
            buf[..n as usize].copy_from_slice(&part);
        }
        Ok(buf)
    }

    /// Inflates the compressed cluster at `host` (`len` bytes at most).
    pub(crate) async fn read_compressed(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        let flen = self.g.file.len();
        let len = len.min(flen.saturating_sub(host));
        let src = self.g.file.read(host, vec![0; len as usize]).await?;
        let mut out = vec![0u8; self.g.cs() as usize];
        flate2::read::DeflateDecoder::new(&src[..])
            .read_exact(&mut out)
            .map_err(|e| {
                Error::corrupt(
                    &self.g.name,
                    format!("compressed cluster at {host:#x}: {e}"),
                )
            })?;
        Ok(out)
    }

    /// Reads a run as mapped.
    async fn read_run(&self, offset: u64, map: Mapping, like: &Buffer, len: u64) -> Result<Buffer> {
        let buf = like
            .zeroed_like(len as usize)
            .map_err(|e| Error::io(&self.g.name, e))?;
        self.read_run_into(offset, map, buf).await
    }

    /// Reads a run as mapped into `buf` (its length is the run's).
    async fn read_run_into(&self, offset: u64, map: Mapping, mut buf: Buffer) -> Result<Buffer> {
        let len = buf.len() as u64;
        match map {
            Mapping::Unallocated => self.read_backing(offset, buf).await,
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(buf)
            }
            Mapping::Data { host } => self.g.read_file_into(host, buf).await,
            Mapping::Compressed { host, len: clen } => {
                let c = self.read_compressed(host, clen).await?;
                let start = (offset % self.g.cs()) as usize;
                buf.copy_from_slice(&c[start..start + len as usize]);
                Ok(buf)
            }
        }
    }

    /// A read: straight from the file into the caller's buffer when the
    /// whole request is one run of data clusters (no copy, no boxed
    /// future), else run by run through [`read_runs`](Self::read_runs).
    async fn do_read(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        if let Some((host, _io)) = self.data_at(offset, buf.len() as u64).await? {
            return self.g.read_file_into(host, buf).await;
        }
        Box::pin(self.read_runs(offset, buf)).await
    }

    /// The host offset of `len` bytes at `offset` if they are one run of
    /// data clusters, the read counted in flight (see
    /// [`in_place`](Self::in_place) for the locking).
    async fn data_at(&self, offset: u64, len: u64) -> Result<Option<(u64, InFlightGuard<'_>)>> {
        let mut m = match self.meta.try_lock() {
            Some(m) => m,
            None => self.meta.lock().await,
        };
        let run = m.lookup(&self.g, offset, len).await?;
        match run.map {
            Mapping::Data { host } if run.len == len => Ok(Some((host, self.in_flight.enter()))),
            _ => Ok(None),
        }
    }

    async fn read_runs(&self, offset: u64, mut buf: Buffer) -> Result<Buffer> {
        let total = buf.len() as u64;
        let mut pos = 0u64;
        while pos < total {
            let (run, _io) = {
                let mut m = self.meta.lock().await;
                let run = m.lookup(&self.g, offset + pos, total - pos).await?;
                (run, self.in_flight.enter())
            };
            if pos == 0 && run.len == total {
                // One run: read straight into the caller's buffer.
                return self.read_run_into(offset, run.map, buf).await;
            }
            let data = self.read_run(offset + pos, run.map, &buf, run.len).await?;
            buf[pos as usize..(pos + run.len) as usize].copy_from_slice(&data);
            pos += run.len;
        }
        Ok(buf)
    }

    async fn do_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let run = {
            let mut m = self.meta.lock().await;
            m.lookup(&self.g, offset, len).await?
        };
        let st = match run.map {
            Mapping::Unallocated => BlockStatus::default(),
            Mapping::Zero { host } => BlockStatus {
                allocated: true,
                zero: true,
                offset: host.map(|h| h + offset % self.g.cs()),
                ..Default::default()
            },
            Mapping::Data { host } => BlockStatus {
                allocated: true,
                data: true,
                offset: Some(host),
                ..Default::default()
            },
            Mapping::Compressed { .. } => BlockStatus {
                allocated: true,
                data: true,
                compressed: true,
                ..Default::default()
            },
        };
        Ok((st, run.len))
    }

    fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Going read-write: the checks of a read-write open, then the dirty
    /// bit. Going read-only: what a clean close writes (flush, dirty bit
    /// cleared).
    async fn do_reopen(&self, read_only: bool) -> Result<()> {
        if read_only == self.is_read_only() {
            return Ok(());
        }
        if read_only {
            self.do_close().await?;
            self.read_only.store(true, Ordering::Release);
            return Ok(());
        }
        let (extended_l2, incompat) = {
            let h = self.header();
            (h.extended_l2(), h.incompatible_features)
        };
        if extended_l2 {
            return Err(Error::open(
                &self.g.name,
                "writing images with extended L2 entries (subclusters) is not supported",
            ));
        }
        if incompat & INCOMPAT_DIRTY != 0 {
            return Err(Error::open(
                &self.g.name,
                "the image is dirty (refcounts may be stale); it cannot be reopened read-write",
            ));
        }
        self.read_only.store(false, Ordering::Release);
        let r = async {
            // Stored bitmaps are now being changed: `in_use` in the image,
            // as at a read-write open (which clears the autoclear bit;
            // setting the dirty bit writes it again).
            {
                let mut m = self.meta.lock().await;
                bitmaps::mark_in_use(&self.g, &mut m).await?;
                self.set_dir_view(&m.bitmap_dir);
            }
            self.mark_dirty().await
        }
        .await;
        if r.is_err() {
            self.read_only.store(true, Ordering::Release);
        }
        r
    }

    /// Writes the L2 cache's changed entries (not flushed).
    async fn write_back(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.meta.lock().await.write_back_l2(&self.g).await
    }

    async fn do_close(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.settle_reserve().await?;
        self.write_back().await?;
        self.g.flush().await?;
        if self.dirty_set.swap(false, Ordering::AcqRel) {
            let v = self.header().incompatible_features & !INCOMPAT_DIRTY;
            self.g
                .write_file(field::INCOMPATIBLE, v.to_be_bytes().to_vec())
                .await?;
            self.g.flush().await?;
        }
        Ok(())
    }
}

impl BlockDriver for Qcow2 {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }
    fn filename(&self) -> &str {
        &self.g.name
    }
    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn file_child(&self) -> Option<Arc<BlockNode>> {
        Some(self.g.file.clone())
    }
    fn backing(&self) -> Option<Arc<BlockNode>> {
        self.backing_node()
    }
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.do_read(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_write(offset, buf))
    }
    fn write_keep<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.do_write_keep(offset, buf))
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_write_zeroes(offset, len, write::Zeroing::Zero))
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_write_zeroes(offset, len, write::Zeroing::Discard))
    }
    fn make_empty(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.refuse_read_only("empty")?;
            let cs = self.g.cs();
            let end = self.len().div_ceil(cs) * cs;
            self.do_write_zeroes(0, end, write::Zeroing::Unmap).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.write_back().await?;
            self.g.flush().await
        })
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_truncate(len).await
        })
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>> {
        Box::pin(self.do_block_status(offset, len))
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_close())
    }
    fn reopen(&self, read_only: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_reopen(read_only))
    }
    fn preallocate(&self, mode: Preallocation) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_preallocate(mode).await
        })
    }
    fn info(&self) -> ImageInfo {
        let h = &*self.header();
        let mut specific = vec![(
            "compat".to_string(),
            serde_json::Value::from(if h.version == 2 { "0.10" } else { "1.1" }),
        )];
        if h.version == 3 {
            specific.push((
                "compression-type".into(),
                serde_json::Value::from(if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                    "zstd"
                } else {
                    "zlib"
                }),
            ));
            specific.push((
                "lazy-refcounts".into(),
                serde_json::Value::from(h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0),
            ));
            let dir = self.dir_view.lock().unwrap_or_else(|e| e.into_inner());
            if !dir.is_empty() {
                specific.push(("bitmaps".into(), bitmaps::info_json(&dir)));
            }
        }
        specific.push((
            "refcount-bits".into(),
            serde_json::Value::from(1u64 << h.refcount_order),
        ));
        specific.push((
            "corrupt".into(),
            serde_json::Value::from(h.incompatible_features & header::INCOMPAT_CORRUPT != 0),
        ));
        specific.push((
            "extended-l2".into(),
            serde_json::Value::from(h.extended_l2()),
        ));
        ImageInfo {
            format: "qcow2".into(),
            filename: self.g.name.clone(),
            virtual_size: self.len(),
            cluster_size: Some(self.g.cs()),
            backing_filename: h.backing_file.clone(),
            backing_format: h.backing_format().map(str::to_string),
            specific,
            dirty: Some(h.incompatible_features & INCOMPAT_DIRTY != 0),
        }
    }
    fn check(&self) -> BoxFuture<'_, Result<Option<CheckReport>>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_check().await.map(Some)
        })
    }
    fn check_repair<'a>(
        &'a self,
        opts: &'a CheckOptions,
    ) -> BoxFuture<'a, Result<Option<CheckReport>>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_check_repair(opts).await.map(Some)
        })
    }
    fn supports_snapshots(&self) -> bool {
        true
    }
    fn take_stored_bitmaps(&self) -> Vec<DirtyBitmap> {
        std::mem::take(&mut *self.loaded.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn can_store_bitmap(
        &self,
        name: &str,
        granularity: u64,
    ) -> Option<std::result::Result<(), String>> {
        // QEMU's checks, then ours: QEMU accepts a persistent bitmap on a
        // read-only node and loses it at close.
        let r = bitmaps::check_new(self.g.version, self.g.cs(), self.len(), name, granularity);
        if r.is_ok() && self.is_read_only() {
            return Some(Err("No write access".into()));
        }
        Some(r)
    }
    fn store_bitmaps<'a>(&'a self, list: &'a [Arc<DirtyBitmap>]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_store_bitmaps(list).await
        })
    }
    fn remove_stored_bitmap<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_remove_stored_bitmap(name).await
        })
    }
    fn snapshot_list(&self) -> BoxFuture<'_, Result<Vec<SnapshotInfo>>> {
        Box::pin(self.do_snapshot_list())
    }
    fn snapshot_create<'a>(
        &'a self,
        opts: &'a SnapshotCreateOptions,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_snapshot_create(opts).await
        })
    }
    fn snapshot_goto<'a>(&'a self, which: &'a SnapshotRef) -> BoxFuture<'a, Result<SnapshotInfo>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_snapshot_goto(which).await
        })
    }
    fn snapshot_delete<'a>(
        &'a self,
        which: &'a SnapshotRef,
    ) -> BoxFuture<'a, Result<SnapshotInfo>> {
        Box::pin(async move {
            self.settle_reserve().await?;
            self.do_snapshot_delete(which).await
        })
    }
    fn set_backing<'a>(
        &'a self,
        backing: Option<PermGuard>,
        record: Option<(Option<String>, Option<String>)>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_set_backing(backing, record))
    }
}
