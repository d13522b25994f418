//! The qcow2 write path: allocating writes with copy-on-write, zero
//! clusters, discard, growth.

use super::entry::{Mapping, COPIED, OFFSET_MASK, ZERO};
use super::header::field;
use super::meta::Meta;
use super::Qcow2;
use crate::block::BlockDriver as _;
use crate::block::Buffer;
use crate::{Error, Result};

/// A cluster freed once the tables no longer point to it: byte offset and
/// length (compressed data may cover several clusters partially).
type Freed = (u64, u64);

/// Metadata changes of one request, applied in crash-safe order.
#[derive(Default)]
struct Batch {
    /// L2 tables allocated by this request: (L1 index, offset).
    new_l2: Vec<(u64, u64)>,
    /// What to free afterwards.
    freed: Vec<Freed>,
}

/// What [`Qcow2::do_write_zeroes`] leaves in whole clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Zeroing {
    /// Reads as zeroes (zero clusters where the format has them).
    Zero,
    /// Discard: zero clusters on v3 (what QEMU's discard leaves), else
    /// unallocated.
    Discard,
    /// Unallocated: the backing file shows through (`bdrv_make_empty`).
    Unmap,
}

/// Guest ranges whose clusters a write is allocating with the metadata
/// lock released (data being written, not mapped yet); other writes to
/// them wait, so the clusters a mapping replaces are never ones a request
/// is writing in place.
#[derive(Default)]
pub(super) struct Allocating {
    ranges: std::sync::Mutex<Vec<(u64, u64)>>,
    /// How many ranges `ranges` holds, so the common case (none) is
    /// answered without taking its mutex on every in-place write.
    count: std::sync::atomic::AtomicUsize,
    /// Woken when a range ends.
    pub(super) done: aio::CoQueue,
}

/// One range in [`Allocating`]; dropping it ends it (call with the lock
/// held, so no write looks in between).
pub(super) struct AllocClaim<'a>(&'a Allocating, (u64, u64));

impl Allocating {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn overlaps(&self, off: u64, len: u64) -> bool {
        // Pairs with the updates in `claim` and `AllocClaim::drop`, all
        // made under the metadata lock like this read.
        if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return false;
        }
        self.list()
            .iter()
            .any(|&(o, l)| o < off + len && off < o + l)
    }
    fn claim(&self, off: u64, len: u64) -> AllocClaim<'_> {
        self.list().push((off, len));
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        AllocClaim(self, (off, len))
    }
}

impl Drop for AllocClaim<'_> {
    fn drop(&mut self) {
        {
            let mut l = self.0.list();
            if let Some(i) = l.iter().position(|&r| r == self.1) {
                l.swap_remove(i);
                self.0
                    .count
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        self.0.done.notify_all();
    }
}

/// Runs of clusters written with the lock released, waiting to be
/// mapped; the first of their requests to get the lock maps them all.
#[derive(Default)]
pub(super) struct MapQueue {
    st: std::sync::Mutex<MapState>,
}

#[derive(Default)]
struct MapState {
    next: u64,
    queued: Vec<QueuedMap>,
    /// Outcomes of runs mapped by another request (error text on failure).
    done: std::collections::HashMap<u64, std::result::Result<(), String>>,
}

/// Guest clusters `ci..ci + n` to map to host clusters from `host`.
struct QueuedMap {
    id: u64,
    ci: u64,
    n: u64,
    host: u64,
}

impl MapQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, MapState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn push(&self, ci: u64, n: u64, host: u64) -> u64 {
        let mut st = self.lock();
        st.next += 1;
        let id = st.next;
        st.queued.push(QueuedMap { id, ci, n, host });
        id
    }
    /// The outcome of run `id` if another request mapped it.
    fn result(&self, id: u64) -> Option<std::result::Result<(), String>> {
        self.lock().done.remove(&id)
    }
    fn take(&self) -> Vec<QueuedMap> {
        std::mem::take(&mut self.lock().queued)
    }
    /// Records the outcome of `runs` for their requests.
    fn finish(&self, runs: &[QueuedMap], r: std::result::Result<(), String>) {
        let mut st = self.lock();
        for q in runs {
            st.done.insert(q.id, r.clone());
        }
    }
}

impl Qcow2 {
    /// The L2 table for `ci` (allocating one, refcount only, if needed)
    /// and the entry index in it.
    async fn l2_for(&self, m: &mut Meta, b: &mut Batch, ci: u64) -> Result<(u64, u64)> {
        let g = &self.g;
        let l1i = ci / g.l2_entries();
        let l2i = ci % g.l2_entries();
        let cur = m.l1.get(l1i as usize).copied().unwrap_or(0);
        if l1i as usize >= m.l1.len() {
            return Err(Error::corrupt(
                &g.name,
                format!("L1 index {l1i} out of range"),
            ));
        }
        if let Some(&(_, off)) = b.new_l2.iter().find(|(i, _)| *i == l1i) {
            return Ok((off, l2i));
        }
        let off = cur & OFFSET_MASK;
        if off != 0 {
            if m.l1_copied(l1i) {
                // Make sure it is loaded (and valid).
                m.l2_table(g, l1i, off).await?;
                return Ok((off, l2i));
            }
            // Shared with a snapshot (refcount > 1): copy the table. The
            // data clusters it names stay shared (both tables reach them),
            // so none of the copied entries is COPIED. The old table loses
            // the active L1's reference once the L1 points at the copy.
            let t: Vec<u64> = m
                .l2_table(g, l1i, off)
                .await?
                .iter()
                .map(|e| e & !COPIED)
                .collect();
            let new = m.alloc_data(g, 1).await?;
            m.cache_new_l2(g, new, t).await?;
            b.new_l2.push((l1i, new));
            b.freed.push((off, g.cs()));
            return Ok((new, l2i));
        }
        // From the reserve too: not past it, leaving a hole in the file.
        let off = m.alloc_data(g, 1).await?;
        m.cache_new_l2(g, off, vec![0; (g.cs() / 8) as usize])
            .await?;
        b.new_l2.push((l1i, off));
        Ok((off, l2i))
    }

    /// Sets entry `l2i` of table `off` in the cache, to be written back
    /// after a flush (which makes the data and refcounts it depends on
    /// durable first).
    async fn set_entry(&self, m: &mut Meta, off: u64, l2i: u64, v: u64) -> Result<()> {
        let t = m.l2_table(&self.g, 0, off).await?;
        t[l2i as usize] = v;
        m.mark_l2_dirty(&self.g, off, l2i);
        Ok(())
    }

    /// What the old entry held that must be freed once it is replaced.
    fn old_host(&self, word: u64) -> Option<Freed> {
        super::entry::host_range(word, self.g.cluster_bits)
    }

    /// Completes a batch whose entries are set in the cache. Changed
    /// entries of existing tables stay in the write-back cache. New tables
    /// and replaced clusters need them on disk first: the dirty L2 pieces
    /// are written (after a flush, when entries changed since the last
    /// one), flush, then
    /// the L1 entries of new tables, then the replaced clusters are freed.
    async fn commit(&self, m: &mut Meta, b: Batch) -> Result<()> {
        let g = &self.g;
        if b.new_l2.is_empty() && b.freed.is_empty() {
            return Ok(());
        }
        m.write_back_l2(g).await?;
        // New tables are on disk before the L1 names them; tables no
        // longer name the clusters freed below.
        g.flush().await?;
        for &(l1i, off) in &b.new_l2 {
            m.set_l1(g, l1i, off | COPIED).await?;
        }
        if !b.freed.is_empty() {
            if !b.new_l2.is_empty() {
                g.flush().await?;
            }
            for (off, len) in b.freed {
                let first = off / g.cs();
                let last = (off + len - 1) / g.cs();
                m.free(g, first * g.cs(), last - first + 1).await?;
            }
        }
        Ok(())
    }

    /// The current contents of guest cluster `ci`, read under the lock.
    async fn cluster_content(&self, m: &mut Meta, ci: u64) -> Result<Vec<u8>> {
        let cs = self.g.cs();
        let start = ci * cs;
        let end = start + cs;
        let mut out = Vec::with_capacity(cs as usize);
        let mut pos = start;
        while pos < end {
            let run = m.lookup(&self.g, pos, end - pos).await?;
            let piece = self
                .read_run(pos, run.map, &Buffer::default(), run.len)
                .await?;
            out.extend_from_slice(&piece);
            pos += run.len;
        }
        Ok(out)
    }

    /// A write: in place when the whole request falls in clusters this
    /// image owns alone (the common case of a guest rewriting its data),
    /// else through [`write_runs`](Self::write_runs), boxed so that the
    /// in-place path's future stays small.
    pub(super) async fn do_write(&self, offset: u64, buf: Buffer) -> Result<()> {
        if let Some((host, _io)) = self.in_place(offset, buf.len() as u64).await? {
            return self.g.write_file(host, buf).await;
        }
        Box::pin(self.write_runs(offset, buf)).await.map(drop)
    }

    /// [`do_write`](Self::do_write) handing the buffer back, copying
    /// nothing when the request is one run (in place, or whole clusters
    /// newly allocated); a job's copy buffers go back to its pool this way.
    pub(super) async fn do_write_keep(&self, offset: u64, buf: Buffer) -> Result<Buffer> {
        if let Some((host, _io)) = self.in_place(offset, buf.len() as u64).await? {
            return self.g.file.write_keep(host, buf).await;
        }
        Box::pin(self.write_runs(offset, buf)).await
    }

    /// Where a write of `len` bytes at `offset` can go in place: one run
    /// of data clusters with refcount 1 (COPIED) that no allocating write
    /// is replacing. The request is counted in flight before the metadata
    /// lock is released, so discards, zero writes and snapshot operations
    /// that free or share those clusters wait for it (`InFlight::drain`).
    /// The lock is taken at once when it is free (no queueing behind the
    /// lock's future), and a lookup that hits the L2 cache does no I/O.
    pub(super) async fn in_place(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, super::InFlightGuard<'_>)>> {
        let mut m = match self.meta.try_lock() {
            Some(m) => m,
            None => self.meta.lock().await,
        };
        let run = m.lookup(&self.g, offset, len).await?;
        if run.len < len || self.allocating.overlaps(offset, len) {
            return Ok(None);
        }
        match run.map {
            Mapping::Data { host } if run.entry.word & COPIED != 0 => {
                Ok(Some((host, self.in_flight.enter())))
            }
            _ => Ok(None),
        }
    }

    /// A write run by run: in place, allocating whole clusters with the
    /// lock released, or copy-on-write of partial clusters. The buffer
    /// comes back.
    async fn write_runs(&self, offset: u64, mut buf: Buffer) -> Result<Buffer> {
        let g = &self.g;
        let total = buf.len() as u64;
        let mut pos = 0u64;
        while pos < total {
            let mut m = self.meta.lock().await;
            let run = m.lookup(g, offset + pos, total - pos).await?;
            if self.allocating.overlaps(offset + pos, run.len) {
                // Clusters being allocated by another request: after it.
                let w = self.allocating.done.wait();
                drop(m);
                w.await;
                continue;
            }
            // One run covering the whole request takes the buffer as is
            // (and gives it back when written).
            let whole = pos == 0 && run.len == total;
            let chunk = if whole {
                std::mem::take(&mut buf)
            } else {
                buf.copy_of(&buf[pos as usize..(pos + run.len) as usize])
                    .map_err(|e| Error::io(&g.name, e))?
            };
            if let Mapping::Data { host } = run.map {
                if run.entry.word & COPIED != 0 {
                    let _io = self.in_flight.enter();
                    drop(m);
                    let back = g.file.write_keep(host, chunk).await?;
                    if whole {
                        buf = back;
                    }
                    pos += run.len;
                    continue;
                }
            }
            let at = offset + pos;
            if at % g.cs() == 0 && run.len % g.cs() == 0 {
                // Whole clusters: allocate them, write the data without
                // the lock (other requests go on meanwhile), then map them.
                let n = run.len / g.cs();
                let host = m.alloc_data(g, n).await?;
                let io = self.in_flight.enter();
                let claim = self.allocating.claim(at, run.len);
                drop(m);
                let r = g.file.write_keep(host, chunk).await;
                // Not counted while waiting for the lock: a snapshot
                // operation holding it waits for the requests counted.
                drop(io);
                match r {
                    Ok(back) if whole => buf = back,
                    Ok(_) => {}
                    Err(e) => {
                        let mut m = self.meta.lock().await;
                        drop(claim);
                        m.free(g, host, n).await?;
                        return Err(e);
                    }
                }
                let id = self.maps.push(at / g.cs(), n, host);
                let mut m = self.meta.lock().await;
                let r = match self.maps.result(id) {
                    // Mapped by another request's batch meanwhile.
                    Some(r) => r.map_err(|msg| {
                        let source = aio::Error::Io {
                            context: "mapping newly written clusters".into(),
                            source: std::io::Error::other(msg),
                        };
                        Error::io(&g.name, source)
                    }),
                    None => {
                        let r = self.map_pending(&mut m).await;
                        // Our own outcome is `r`.
                        self.maps.result(id);
                        r
                    }
                };
                drop(claim);
                r?;
                pos += run.len;
                continue;
            }
            let back = self.write_alloc(&mut m, at, chunk).await?;
            if whole {
                buf = back;
            }
            pos += run.len;
        }
        Ok(buf)
    }

    /// Writes `data` at `offset` into newly allocated clusters, copying
    /// the rest of partially written clusters from their old contents.
    /// The clusters under one L2 table are allocated as one contiguous
    /// run and written with one write. `data` comes back.
    async fn write_alloc(&self, m: &mut Meta, offset: u64, mut data: Buffer) -> Result<Buffer> {
        let g = &self.g;
        let cs = g.cs();
        let end = offset + data.len() as u64;
        let last = (end - 1) / cs;
        let mut b = Batch::default();
        let mut ci = offset / cs;
        while ci <= last {
            let group_last = last.min((ci / g.l2_entries() + 1) * g.l2_entries() - 1);
            let n = group_last - ci + 1;
            let gstart = ci * cs;
            let gend = (group_last + 1) * cs;
            let mut olds = Vec::with_capacity(n as usize);
            for c in ci..=group_last {
                olds.push(m.l2_entry(g, c).await?.0.word);
            }
            let whole = offset == gstart && end == gend;
            let content = if whole {
                // Aligned and whole: the caller's buffer.
                std::mem::take(&mut data)
            } else {
                let mut out = data
                    .zeroed_like((n * cs) as usize)
                    .map_err(|e| Error::io(&g.name, e))?;
                for c in ci..=group_last {
                    let cstart = c * cs;
                    let at = (cstart - gstart) as usize;
                    let s = offset.max(cstart);
                    let e = end.min(cstart + cs);
                    if s != cstart || e != cstart + cs {
                        // Partly written: the rest keeps its contents
                        // (the buffer is zeroed beyond what they cover).
                        let old = self.cluster_content(m, c).await?;
                        let k = old.len().min(cs as usize);
                        out[at..at + k].copy_from_slice(&old[..k]);
                    }
                    let from = (s - cstart) as usize;
                    out[at + from..at + from + (e - s) as usize]
                        .copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
                }
                out
            };
            let (l2off, l2i) = self.l2_for(m, &mut b, ci).await?;
            let host = m.alloc(g, n).await?;
            let back = g.file.write_keep(host, content).await?;
            if whole {
                data = back;
            }
            for (k, old) in olds.into_iter().enumerate() {
                let k = k as u64;
                self.set_entry(m, l2off, l2i + k, (host + k * cs) | COPIED)
                    .await?;
                b.freed.extend(self.old_host(old));
            }
            ci = group_last + 1;
        }
        self.commit(m, b).await?;
        Ok(data)
    }

    /// Maps every queued run of newly written clusters (this request's
    /// and those of requests still waiting for the lock) in one batch;
    /// the entries go to the write-back L2 cache (which flushes before it
    /// writes them). What a run's clusters mapped before is read now,
    /// under the lock, and freed: a request that changed them while the
    /// data was written came first.
    async fn map_pending(&self, m: &mut Meta) -> Result<()> {
        let g = &self.g;
        let runs = self.maps.take();
        let r = async {
            let mut b = Batch::default();
            for q in &runs {
                let mut olds = Vec::with_capacity(q.n as usize);
                for c in q.ci..q.ci + q.n {
                    olds.push(m.l2_entry(g, c).await?.0.word);
                }
                let (l2off, l2i) = self.l2_for(m, &mut b, q.ci).await?;
                for (k, old) in olds.into_iter().enumerate() {
                    let k = k as u64;
                    let v = (q.host + k * g.cs()) | COPIED;
                    self.set_entry(m, l2off, l2i + k, v).await?;
                    b.freed.extend(self.old_host(old));
                }
            }
            self.commit(m, b).await
        }
        .await;
        let shared = r.as_ref().map(|_| ()).map_err(|e| e.to_string());
        self.maps.finish(&runs, shared);
        r
    }

    /// Write-zeroes ([`Zeroing::Zero`]), discard or unmap.
    ///
    /// Whole clusters become zero clusters (v3) or unallocated (v2, and
    /// discard without a backing file; always for unmap); their data
    /// clusters are freed. Partial clusters are written with zeroes, or
    /// for discard and unmap left alone, as QEMU does.
    pub(super) async fn do_write_zeroes(&self, offset: u64, len: u64, mode: Zeroing) -> Result<()> {
        let discard = mode != Zeroing::Zero;
        let g = &self.g;
        let cs = g.cs();
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        let z = (end / cs) * cs;
        if a >= z {
            if !discard {
                self.zero_partial(offset, end).await?;
            }
            return Ok(());
        }
        if !discard {
            self.zero_partial(offset, a).await?;
            self.zero_partial(z, end).await?;
        }
        let has_backing = self.backing_node().is_some();
        if g.version < 3 && !discard && has_backing {
            // No zero flag: write real zeroes over the backing data.
            let mut pos = a;
            while pos < z {
                let n = (z - pos).min(1 << 20);
                self.do_write(pos, Buffer::zeroed(n as usize)).await?;
                pos += n;
            }
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        let mut b = Batch::default();
        let mut freed_data = Vec::new();
        for ci in a / cs..z / cs {
            let (old, l2off) = m.l2_entry(g, ci).await?;
            let allocated = old.word != 0;
            let new = if mode != Zeroing::Unmap && g.version >= 3 && (has_backing || allocated) {
                ZERO
            } else {
                0
            };
            if new == old.word {
                continue;
            }
            if l2off == 0 && new == 0 {
                continue;
            }
            let (l2off, l2i) = self.l2_for(&mut m, &mut b, ci).await?;
            self.set_entry(&mut m, l2off, l2i, new).await?;
            if let Some(f) = self.old_host(old.word) {
                if old.word & super::entry::COMPRESSED == 0 {
                    freed_data.push(f);
                }
                b.freed.push(f);
            }
        }
        if !b.freed.is_empty() {
            // Reads and in-place writes counted in flight may still be on
            // the clusters freed below: once free, an allocation could
            // hand them to another cluster or a table, and a late write
            // would land there. No new one starts (they look up under
            // the lock held here), so wait for those running.
            self.in_flight.drain().await;
        }
        self.commit(&mut m, b).await?;
        // Only clusters nobody uses any more (a snapshot may still).
        let mut unused = Vec::new();
        for (off, len) in freed_data {
            if m.refcount(g, off >> g.cluster_bits).await? == 0 {
                unused.push((off, len));
            }
        }
        drop(m);
        if discard {
            for (off, len) in unused {
                g.file
                    .discard(off, len.min(g.file.len().saturating_sub(off)))
                    .await?;
            }
        }
        Ok(())
    }

    /// Zeroes `[s, e)` within one cluster by writing, unless it already
    /// reads as zeroes.
    async fn zero_partial(&self, s: u64, e: u64) -> Result<()> {
        if s >= e {
            return Ok(());
        }
        let run = {
            let mut m = self.meta.lock().await;
            m.lookup(&self.g, s, e - s).await?
        };
        let already = match run.map {
            Mapping::Zero { .. } => run.len >= e - s,
            Mapping::Unallocated => run.len >= e - s && self.backing_node().is_none(),
            _ => false,
        };
        if already {
            return Ok(());
        }
        self.do_write(s, Buffer::zeroed((e - s) as usize)).await
    }

    pub(super) async fn do_truncate(&self, len: u64) -> Result<()> {
        let g = &self.g;
        let old = self.len();
        if len < old {
            return Err(Error::unsupported(
                &g.name,
                "shrinking a qcow2 image is not supported",
            ));
        }
        if len % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: the size must be a multiple of 512 bytes",
                g.name
            )));
        }
        let mut m = self.meta.lock().await;
        let need = len.div_ceil(g.l2_entries() * g.cs());
        m.grow_l1(g, need).await?;
        g.write_file(field::SIZE, len.to_be_bytes().to_vec())
            .await?;
        g.flush().await?;
        self.size.store(len, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
