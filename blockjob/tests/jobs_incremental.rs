//! Incremental backup: `sync: incremental` / `bitmap` copy only what the
//! node's dirty bitmap has dirty, and update the bitmap at the end as
//! QEMU does (`bitmap-mode` on-success, never, always). The backups are
//! checked with QEMU's tools: an incremental image on top of the full one
//! reads as the source, and holds exactly the dirty clusters.

mod common;

use std::path::Path;
use std::sync::Arc;

use aio::{AioContext, ClockType};
use blockjob::block::{BitmapAddOptions, BlockGraph, BlockNode};
use blockjob::jobs::{start_backup, BackupArgs, BitmapSyncMode, SyncMode};
use common::*;

const K64: u64 = 65536;

struct Setup {
    dir: tempfile::TempDir,
    ctx: AioContext,
    g: BlockGraph,
    src: Arc<BlockNode>,
    reg: blockjob::job::JobRegistry,
    log: JobLog,
}

/// A 4 MiB source with data and a recording bitmap `b` (64 KiB granules).
fn setup() -> Setup {
    let dir = tmp();
    let src = dir.path().join("src.qcow2");
    create(&src, "4M", None);
    qemu_io(&src, &["write -P 0x11 0 4M".into()]);
    let ctx = AioContext::new().unwrap();
    let g = BlockGraph::new();
    let src = add_image(&ctx, &g, "src", &src);
    let mut o = BitmapAddOptions::default();
    o.granularity = Some(K64);
    src.add_bitmap("b", &o).unwrap();
    let (reg, log) = registry(ClockType::Realtime);
    Setup {
        dir,
        ctx,
        g,
        src,
        reg,
        log,
    }
}

impl Setup {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, off: u64, len: usize, byte: u8) {
        self.ctx
            .block_on(self.src.write(off, vec![byte; len]))
            .unwrap();
    }
    /// Adds `img` as node `name` (its backing file not opened).
    fn add_target(&self, name: &str, img: &Path) {
        let a = serde_json::json!({"driver": "qcow2", "node-name": name, "backing": null,
            "file": {"driver": "file", "filename": p(img)}});
        self.ctx.block_on(self.g.blockdev_add(&a)).unwrap();
    }
    fn backup(
        &self,
        id: &str,
        target: &str,
        sync: SyncMode,
        mode: Option<BitmapSyncMode>,
    ) -> blockjob::job::JobInfo {
        let mut a = BackupArgs::new(id, "src", target, sync);
        a.bitmap = Some("b".into());
        a.bitmap_mode = mode;
        let job = start_backup(&self.ctx, &self.g, &self.reg, a).unwrap();
        self.ctx.block_on(job.wait_finished())
    }
    fn dirty(&self) -> Vec<(u64, u64)> {
        let b = self.src.bitmap("b").unwrap();
        b.extents(0, b.size())
            .into_iter()
            .filter(|e| e.dirty)
            .map(|e| (e.offset, e.len))
            .collect()
    }
}

/// `qemu-img map`'s data ranges allocated in `img` itself (depth 0).
fn own_data(img: &Path) -> Vec<(u64, u64)> {
    qemu_map(img)
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn full_then_incremental_chain_reads_as_the_source() {
    let s = setup();
    let full = s.path("full.qcow2");
    create(&full, "4M", None);
    s.add_target("full", &full);
    // The full backup clears the bitmap (`on-success`): the chain starts.
    let info = s.backup("f", "full", SyncMode::Full, Some(BitmapSyncMode::OnSuccess));
    assert!(info.error.is_none(), "{info:?}");
    assert_eq!(s.dirty(), []);
    // The guest writes two places: one cluster, and 4 KiB across a
    // cluster boundary.
    s.write(K64, K64 as usize, 0x22);
    s.write(3 * K64 - 2048, 4096, 0x33);
    assert_eq!(s.dirty(), [(K64, 3 * K64)]);
    let inc = s.path("inc.qcow2");
    create(&inc, "4M", Some(&full));
    s.add_target("inc", &inc);
    let info = s.backup("i", "inc", SyncMode::Incremental, None);
    assert!(info.error.is_none(), "{info:?}");
    // Progress counts what was copied: three clusters.
    assert_eq!((info.current, info.total), (3 * K64, 3 * K64));
    assert_eq!(s.dirty(), [], "a successful incremental clears the bitmap");
    assert_eq!(
        events(&s.log),
        "created running waiting pending BLOCK_JOB_COMPLETED concluded null \
         created running waiting pending BLOCK_JOB_COMPLETED concluded null"
    );
    let src = s.path("src.qcow2");
    s.ctx.block_on(s.g.close_all()).unwrap();
    assert_same(&src, &inc);
    assert_eq!(own_data(&inc), [(K64, 3 * K64)]);
    assert_check(&inc);
}

#[test]
fn writes_during_the_job_stay_dirty_and_failures_keep_the_bits() {
    let s = setup();
    s.write(0, 4096, 0x44);
    s.write(K64 * 10, 4096, 0x45);
    // A target whose every write fails: the job fails.
    let t = s.path("t.qcow2");
    create(&t, "4M", None);
    let dbg = serde_json::json!({"driver": "blkdebug", "node-name": "bad",
        "inject-error": [{"event": "write_aio", "errno": 5}],
        "image": {"driver": "qcow2", "node-name": "tq", "backing": null,
            "file": {"driver": "file", "filename": p(&t)}}});
    s.ctx.block_on(s.g.blockdev_add(&dbg)).unwrap();
    let before = s.dirty();
    assert_eq!(before, [(0, K64), (K64 * 10, K64)]);
    for mode in [BitmapSyncMode::OnSuccess, BitmapSyncMode::Never] {
        let info = s.backup("x", "bad", SyncMode::Bitmap, Some(mode));
        assert!(info.error.is_some());
        assert_eq!(s.dirty(), before, "{mode:?}: a failed job keeps every bit");
    }
    // `always` after a failure: what was written during the job (nothing
    // here) plus what was not copied (everything).
    let info = s.backup("y", "bad", SyncMode::Bitmap, Some(BitmapSyncMode::Always));
    assert!(info.error.is_some());
    assert_eq!(s.dirty(), before);

    // A working target, a speed limit, and a guest write while the job
    // runs: with `never` the bitmap keeps its bits and gains the write.
    let ok = s.path("ok.qcow2");
    create(&ok, "4M", None);
    s.add_target("ok", &ok);
    let mut a = BackupArgs::new("z", "src", "ok", SyncMode::Bitmap);
    a.bitmap = Some("b".into());
    a.bitmap_mode = Some(BitmapSyncMode::Never);
    a.speed = 256 << 10;
    let job = start_backup(&s.ctx, &s.g, &s.reg, a).unwrap();
    // Frozen while the job runs.
    let e = s.src.clear_bitmap("b").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bitmap 'b' is currently in use by another operation and cannot be used"
    );
    s.write(K64 * 20, 4096, 0x46);
    let info = s.ctx.block_on(job.wait_finished());
    assert!(info.error.is_none(), "{info:?}");
    assert_eq!(s.dirty(), [(0, K64), (K64 * 10, K64), (K64 * 20, K64)]);
    // `on-success` now: only the write made during the job stays.
    let ok2 = s.path("ok2.qcow2");
    create(&ok2, "4M", None);
    s.add_target("ok2", &ok2);
    let mut a = BackupArgs::new("w", "src", "ok2", SyncMode::Bitmap);
    a.bitmap = Some("b".into());
    a.bitmap_mode = Some(BitmapSyncMode::OnSuccess);
    a.speed = 256 << 10;
    let job = start_backup(&s.ctx, &s.g, &s.reg, a).unwrap();
    s.write(K64 * 30, 4096, 0x47);
    let info = s.ctx.block_on(job.wait_finished());
    assert!(info.error.is_none(), "{info:?}");
    assert_eq!(s.dirty(), [(K64 * 30, K64)]);
    s.src.clear_bitmap("b").unwrap();
    s.ctx.block_on(s.g.close_all()).unwrap();
    // The point-in-time copy holds the three dirty clusters of its start.
    assert_eq!(own_data(&ok2), [(0, K64), (K64 * 10, K64), (K64 * 20, K64)]);
    assert_check(&ok2);
}

#[test]
fn bitmap_arguments_are_checked_in_qemus_order_and_words() {
    let s = setup();
    let t = s.path("t.qcow2");
    create(&t, "4M", None);
    s.add_target("t", &t);
    let err = |sync, bitmap: Option<&str>, mode| {
        let mut a = BackupArgs::new("e", "src", "t", sync);
        a.bitmap = bitmap.map(str::to_string);
        a.bitmap_mode = mode;
        start_backup(&s.ctx, &s.g, &s.reg, a)
            .unwrap_err()
            .to_string()
    };
    use BitmapSyncMode::*;
    let cases = [
        (
            SyncMode::Bitmap,
            None,
            None,
            "must provide a valid bitmap name for 'bitmap' sync mode",
        ),
        (
            SyncMode::Incremental,
            Some("b"),
            Some(Always),
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        ),
        (
            SyncMode::Bitmap,
            Some("nope"),
            Some(Never),
            "Bitmap 'nope' could not be found",
        ),
        (
            SyncMode::Bitmap,
            Some("b"),
            None,
            "Bitmap sync mode must be given when providing a bitmap",
        ),
        (
            SyncMode::None,
            Some("b"),
            Some(OnSuccess),
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ),
        (
            SyncMode::Full,
            Some("b"),
            Some(Never),
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'",
        ),
        (
            SyncMode::Full,
            None,
            Some(Always),
            "Cannot specify bitmap sync mode without a bitmap",
        ),
    ];
    for (sync, bitmap, mode, want) in cases {
        assert_eq!(
            err(sync, bitmap, mode),
            want,
            "{sync:?} {bitmap:?} {mode:?}"
        );
    }
    // A busy bitmap (an NBD export holds it, say) is refused.
    s.src.bitmap("b").unwrap().set_busy(true);
    assert_eq!(
        err(SyncMode::Bitmap, Some("b"), Some(OnSuccess)),
        "Bitmap 'b' is currently in use by another operation and cannot be used"
    );
}
