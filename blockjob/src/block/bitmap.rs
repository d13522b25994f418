//! Dirty bitmaps: one bit per `granularity` bytes of a node's guest range.
//!
//! [`Bits`] is the bare bit array (the mirror and commit jobs use it as a
//! write hook of their own). [`DirtyBitmap`] is the named, user-visible
//! bitmap of QMP's `block-dirty-bitmap-*` commands: registered on a
//! [`BlockNode`](super::BlockNode), it marks every write, zero write and
//! discard through the node while it is enabled (QEMU's "recording").
//!
//! Persistent bitmaps (qcow2 only, image version 3): a bitmap added with
//! [`BitmapAddOptions::persistent`], or found in the image's bitmaps
//! extension when it is opened, is stored in the image when the node is
//! closed cleanly (`qcow2/bitmaps.rs`). Opening an image read-write marks
//! its stored bitmaps `in_use` on disk at once, as QEMU does, so a crash
//! leaves them flagged; a bitmap found `in_use` when the image is opened
//! is *inconsistent*: it is listed (`inconsistent: true`), records
//! nothing, and can only be removed. Bitmaps of a read-only image are
//! read-only (they cannot be cleared, enabled, disabled, merged into or
//! removed). Removing a persistent bitmap removes it from the image at
//! once.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::WriteHook;
use crate::{Error, Result};

/// The smallest granularity (QEMU's `BDRV_SECTOR_SIZE`).
pub(crate) const MIN_GRANULARITY: u64 = 512;
/// The largest granularity (2 GiB).
pub(crate) const MAX_GRANULARITY: u64 = 1 << 31;
/// The granularity when none is given and the image has no cluster size.
pub(crate) const DEFAULT_GRANULARITY: u64 = 64 * 1024;

/// A bit array over `size` bytes, one bit per `gran` bytes.
pub(crate) struct Bits {
    gran: u64,
    size: u64,
    bits: Mutex<Vec<bool>>,
}

impl Bits {
    pub(crate) fn new(size: u64, gran: u64) -> Self {
        Self {
            gran,
            size,
            bits: Mutex::new(vec![false; size.div_ceil(gran) as usize]),
        }
    }

    fn span(&self, off: u64, len: u64) -> Range<usize> {
        let end = off.saturating_add(len).min(self.size);
        let start = (off / self.gran) as usize;
        start..(end.div_ceil(self.gran) as usize).max(start)
    }

    /// Bytes per bit.
    pub(crate) fn granularity(&self) -> u64 {
        self.gran
    }

    pub(crate) fn set(&self, off: u64, len: u64, on: bool) {
        let r = self.span(off, len);
        self.bits.lock()[r].iter_mut().for_each(|b| *b = on);
    }

    /// The bits, bit `i` in bit `i % 8` of byte `i / 8`.
    fn to_bytes(&self) -> Vec<u8> {
        let bits = self.bits.lock();
        let mut out = vec![0u8; bits.len().div_ceil(8)];
        for (i, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
            out[i / 8] |= 1 << (i % 8);
        }
        out
    }

    /// Sets the bits from bytes laid out as [`to_bytes`](Self::to_bytes)
    /// writes them (bits past the end are ignored).
    fn load_bytes(&self, bytes: &[u8]) {
        let mut bits = self.bits.lock();
        for (i, b) in bits.iter_mut().enumerate() {
            *b = bytes.get(i / 8).is_some_and(|x| x & (1 << (i % 8)) != 0);
        }
    }

    /// Dirty bytes, the last granule cut at the end of the range.
    pub(crate) fn count(&self) -> u64 {
        let bits = self.bits.lock();
        let n = bits.iter().filter(|&&b| b).count() as u64;
        let last_short = bits.last().copied().unwrap_or(false) && self.size % self.gran != 0;
        n * self.gran
            - if last_short {
                self.gran - self.size % self.gran
            } else {
                0
            }
    }

    /// Dirty granules times the granularity (QEMU's `count`).
    pub(crate) fn count_granules(&self) -> u64 {
        self.bits.lock().iter().filter(|&&b| b).count() as u64 * self.gran
    }

    /// The first dirty run (at most `max` bytes, whole granules).
    pub(crate) fn next_run(&self, max: u64) -> Option<(u64, u64)> {
        let bits = self.bits.lock();
        let first = bits.iter().position(|&b| b)?;
        let most = (max / self.gran).max(1) as usize;
        let n = bits[first..].iter().take(most).take_while(|&&b| b).count();
        let off = first as u64 * self.gran;
        let len = (n as u64 * self.gran).min(self.size - off);
        Some((off, len))
    }

    /// Runs of equal bits covering `[off, off + len)` (cut at the end of
    /// the range): `(offset, length, dirty)`.
    pub(crate) fn extents(&self, off: u64, len: u64) -> Vec<Extent> {
        let end = off.saturating_add(len).min(self.size);
        let bits = self.bits.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < end {
            let i = (pos / self.gran) as usize;
            let dirty = bits.get(i).copied().unwrap_or(false);
            let next = ((i as u64 + 1) * self.gran).min(end);
            match out.last_mut() {
                Some(e) if e.dirty == dirty => e.len += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    dirty,
                }),
            }
            pos = next;
        }
        out
    }
}

impl WriteHook for Bits {
    fn after_write(&self, offset: u64, len: u64) {
        self.set(offset, len, true);
    }
}

/// A run of a bitmap's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Set (written since the bitmap was added or cleared).
    pub dirty: bool,
}

/// Options of [`BlockNode::add_bitmap`](super::BlockNode::add_bitmap).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct BitmapAddOptions {
    /// Bytes per bit: a power of two in 512..=2 GiB. Default: the
    /// image's cluster size (at least 4 KiB), else 64 KiB.
    pub granularity: Option<u64>,
    /// Start disabled (not recording).
    pub disabled: bool,
    /// Store the bitmap in the image (qcow2 v3) when the node is closed.
    pub persistent: bool,
}

/// What `query-named-block-nodes` reports of a bitmap (QEMU's
/// `BlockDirtyInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapInfo {
    /// The bitmap name.
    pub name: String,
    /// Marking writes (enabled).
    pub recording: bool,
    /// In use by an operation (an NBD export) that forbids changing it.
    pub busy: bool,
    /// Stored in the image.
    pub persistent: bool,
    /// Found `in_use` in the image: its bits are lost; it can only be
    /// removed.
    pub inconsistent: bool,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes (dirty bits times the granularity).
    pub count: u64,
}

/// A named dirty bitmap of a node.
pub struct DirtyBitmap {
    name: String,
    bits: Bits,
    enabled: AtomicBool,
    busy: AtomicBool,
    persistent: bool,
    inconsistent: bool,
    readonly: AtomicBool,
}

/// What an operation on a bitmap must not meet (QEMU's
/// `bdrv_dirty_bitmap_check` flags).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Check {
    /// Busy, read-only or inconsistent: changing a bitmap.
    Change,
    /// Busy or read-only: removing it.
    Remove,
    /// Busy or inconsistent: reading it (merge source, export).
    Read,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("granularity", &self.bits.gran)
            .finish()
    }
}

/// Checks a granularity as `block-dirty-bitmap-add` does.
pub(crate) fn check_granularity(gran: u64) -> Result<()> {
    if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&gran) || !gran.is_power_of_two() {
        return Err(Error::InvalidArgument(
            "Granularity must be power of 2 and at least 512".into(),
        ));
    }
    Ok(())
}

impl DirtyBitmap {
    pub(crate) fn new(name: &str, size: u64, gran: u64, enabled: bool) -> Self {
        Self {
            name: name.to_string(),
            bits: Bits::new(size, gran),
            enabled: AtomicBool::new(enabled),
            busy: AtomicBool::new(false),
            persistent: false,
            inconsistent: false,
            readonly: AtomicBool::new(false),
        }
    }

    /// A persistent bitmap as stored in an image: `bits` are its bytes
    /// (bit `i` is bit `i % 8` of byte `i / 8`), `None` when the image
    /// flags it `in_use` (inconsistent: no bits, not recording).
    pub(crate) fn stored(
        name: &str,
        size: u64,
        gran: u64,
        enabled: bool,
        bits: Option<&[u8]>,
        readonly: bool,
    ) -> Self {
        let mut b = Self::new(name, size, gran, enabled && bits.is_some());
        b.persistent = true;
        b.inconsistent = bits.is_none();
        b.readonly = AtomicBool::new(readonly);
        if let Some(bytes) = bits {
            b.bits.load_bytes(bytes);
        }
        b
    }

    /// Makes a new bitmap persistent (before it is registered).
    pub(crate) fn set_persistent(&mut self) {
        self.persistent = true;
    }

    /// Whether the bitmap is stored in the image.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Whether the image had the bitmap `in_use` when it was opened.
    pub fn inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// The bits as stored in an image: bit `i` is bit `i % 8` of byte
    /// `i / 8`; `ceil(ceil(size / granularity) / 8)` bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        self.bits.to_bytes()
    }

    /// The bitmap name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.bits.gran
    }

    /// The bytes the bitmap covers (the node's size when it was added).
    pub fn size(&self) -> u64 {
        self.bits.size
    }

    /// Whether writes are being recorded.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether an operation holds the bitmap (it cannot be changed).
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// Marks the bitmap busy (`true`) or releases it; returns the old flag.
    pub fn set_busy(&self, busy: bool) -> bool {
        self.busy.swap(busy, Ordering::Relaxed)
    }

    /// Dirty bytes: dirty bits times the granularity.
    pub fn count(&self) -> u64 {
        self.bits.count_granules()
    }

    /// Runs of dirty and clean bytes over `[offset, offset + len)`, cut at
    /// the end of the node.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.bits.extents(offset, len)
    }

    /// The `query-named-block-nodes` view.
    pub fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: self.name.clone(),
            recording: self.enabled(),
            busy: self.busy(),
            persistent: self.persistent,
            inconsistent: self.inconsistent,
            granularity: self.granularity(),
            count: self.count(),
        }
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub(crate) fn clear(&self) {
        self.bits.set(0, self.bits.size, false);
    }

    /// Marks `[offset, offset + len)` dirty whether or not recording.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        self.bits.set(offset, len, true);
    }

    /// What [`BitmapUndo::undo`] puts back: the flag, and the bits if
    /// `with_bits`.
    pub(crate) fn undo_point(self: &Arc<Self>, with_bits: bool) -> BitmapUndo {
        BitmapUndo {
            bitmap: self.clone(),
            bits: with_bits.then(|| self.bits.bits.lock().clone()),
            enabled: self.enabled(),
        }
    }

    /// The errors QEMU gives, in its order, when `what` may not be done
    /// to the bitmap.
    /// Makes a stored bitmap read-only or writable with its node (a
    /// reopen of the image).
    pub(crate) fn set_readonly(&self, on: bool) {
        self.readonly.store(on, Ordering::Release);
    }

    pub(crate) fn check(&self, what: Check) -> Result<()> {
        if self.busy() {
            return Err(Error::InvalidArgument(format!(
                "Bitmap '{}' is currently in use by another operation and cannot be used",
                self.name
            )));
        }
        if self.readonly.load(Ordering::Acquire) && !matches!(what, Check::Read) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap '{}' is readonly and cannot be modified",
                self.name
            )));
        }
        if self.inconsistent && !matches!(what, Check::Remove) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                self.name
            )));
        }
        Ok(())
    }
}

impl WriteHook for DirtyBitmap {
    fn after_write(&self, offset: u64, len: u64) {
        if self.enabled() {
            self.bits.set(offset, len, true);
        }
    }
}

/// The state of a bitmap before a change (`transaction` aborts with it).
/// Dropping it keeps the change.
pub struct BitmapUndo {
    bitmap: Arc<DirtyBitmap>,
    bits: Option<Vec<bool>>,
    enabled: bool,
}

impl std::fmt::Debug for BitmapUndo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitmapUndo")
            .field("bitmap", &self.bitmap.name)
            .finish()
    }
}

impl BitmapUndo {
    /// Puts the bitmap back as it was (bits written since are lost only
    /// when the change was a clear: they are replaced by the old bits).
    pub fn undo(self) {
        if let Some(bits) = self.bits {
            *self.bitmap.bits.bits.lock() = bits;
        }
        self.bitmap.set_enabled(self.enabled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_when_two_granules_dirty_then_runs_merge() {
        let b = DirtyBitmap::new("b0", 1000, 256, true);
        b.after_write(300, 10);
        b.after_write(600, 1);
        assert_eq!(
            b.extents(0, 1000),
            vec![
                Extent {
                    offset: 0,
                    len: 256,
                    dirty: false
                },
                Extent {
                    offset: 256,
                    len: 512,
                    dirty: true
                },
                Extent {
                    offset: 768,
                    len: 232,
                    dirty: false
                },
            ]
        );
        assert_eq!(b.count(), 512);
    }

    #[test]
    fn write_when_disabled_then_not_marked() {
        let b = DirtyBitmap::new("b0", 4096, 512, false);
        b.after_write(0, 4096);
        assert_eq!(b.count(), 0);
        b.set_enabled(true);
        b.after_write(0, 1);
        assert_eq!(b.count(), 512);
        b.clear();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn undo_when_cleared_then_bits_and_flag_come_back() {
        let b = Arc::new(DirtyBitmap::new("b0", 4096, 512, true));
        b.after_write(1024, 512);
        let u = b.undo_point(true);
        b.clear();
        b.set_enabled(false);
        u.undo();
        assert_eq!(b.count(), 512);
        assert!(b.enabled());
    }

    #[test]
    fn granularity_when_bad_then_qemu_text() {
        for g in [0, 256, 1000, 1 << 32] {
            let e = check_granularity(g).unwrap_err();
            assert_eq!(
                e.to_string(),
                "Granularity must be power of 2 and at least 512"
            );
        }
        assert!(check_granularity(512).is_ok());
        assert!(check_granularity(1 << 31).is_ok());
    }

    #[test]
    fn bytes_when_round_tripped_then_same_bits_lsb_first() {
        let b = DirtyBitmap::new("b0", 20 * 512, 512, true);
        b.mark(0, 1);
        b.mark(9 * 512, 512);
        b.mark(19 * 512, 1);
        assert_eq!(b.to_bytes(), vec![0b0000_0001, 0b0000_0010, 0b0000_1000]);
        let c = DirtyBitmap::stored("b0", 20 * 512, 512, true, Some(&b.to_bytes()), false);
        assert_eq!(c.extents(0, 20 * 512), b.extents(0, 20 * 512));
        assert!(c.persistent() && !c.inconsistent() && c.enabled());
    }

    #[test]
    fn check_when_inconsistent_or_readonly_then_qemu_texts() {
        let b = DirtyBitmap::stored("b", 4096, 512, true, None, false);
        assert!(!b.enabled());
        assert_eq!(
            b.check(Check::Change).unwrap_err().to_string(),
            "Bitmap 'b' is inconsistent and cannot be used"
        );
        assert!(b.check(Check::Remove).is_ok());
        let r = DirtyBitmap::stored("r", 4096, 512, true, Some(&[]), true);
        assert_eq!(
            r.check(Check::Remove).unwrap_err().to_string(),
            "Bitmap 'r' is readonly and cannot be modified"
        );
        assert!(r.check(Check::Read).is_ok());
    }

    #[test]
    fn last_granule_when_short_then_count_rounds_up() {
        let b = Bits::new(1000, 512);
        b.set(900, 100, true);
        assert_eq!(b.count(), 488);
        assert_eq!(b.count_granules(), 512);
        assert_eq!(b.next_run(4096), Some((512, 488)));
    }
}
