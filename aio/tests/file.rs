//! Asynchronous file I/O on the thread pool: data integrity under
//! concurrency, end of file, zeroing and discard, sizes, error reporting,
//! O_DIRECT, engines.

mod util;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;

use aio::file::{AlignedBuf, Engine, File, OpenOptions};
use aio::{Error, PoolOptions, ThreadPool};
use std::cell::Cell;

// Each test runs once per engine; the engine and an AioContext (io_uring
// requests are submitted from the current context) are per test thread.
thread_local! {
    static ENGINE: Cell<Engine> = const { Cell::new(Engine::Threads) };
    static CTX: aio::AioContext = aio::AioContext::new().expect("AioContext");
}

/// Runs `f` to completion on this thread's context.
fn run<F: Future>(f: F) -> F::Output {
    CTX.with(|c| c.block_on(f))
}

/// The engine under test.
fn engine() -> Engine {
    ENGINE.with(Cell::get)
}

/// The engine's test-module name.
fn engine_name() -> &'static str {
    match engine() {
        Engine::Threads => "threads",
        _ => "io_uring",
    }
}

/// Defines `mod $name { threads, io_uring }` around a test body.
macro_rules! both_engines {
    ($($(#[$m:meta])* fn $name:ident() $body:block)*) => {$(
        fn $name() $body
        mod $name {
            #[test]
            $(#[$m])*
            fn threads() {
                super::ENGINE.with(|e| e.set(aio::file::Engine::Threads));
                super::$name()
            }
            #[test]
            $(#[$m])*
            fn io_uring() {
                super::ENGINE.with(|e| e.set(aio::file::Engine::IoUring));
                super::$name()
            }
        }
    )*};
}

const MIB: usize = 1 << 20;

/// The byte every test expects at file offset `o` — the same whichever
/// write put it there, so overlapping writes leave a known result.
fn pattern_byte(o: u64) -> u8 {
    let x = (o / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    (x >> ((o % 8) * 8)) as u8
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    // Word by word: the tests check hundreds of MiB in debug builds.
    let mut out = Vec::with_capacity(len + 16);
    let mut word = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        let x = word.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
        out.extend_from_slice(&x.to_le_bytes());
        word += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

/// Asserts `data` holds the pattern for `offset`, reporting the first
/// difference rather than dumping megabytes.
fn assert_pattern(data: &[u8], offset: u64) {
    let expect = pattern(offset, data.len());
    if data != expect {
        let i = (0..data.len()).find(|&i| data[i] != expect[i]).unwrap();
        panic!(
            "byte at offset {} is {:#x}, expected {:#x}",
            offset + i as u64,
            data[i],
            expect[i]
        );
    }
}

fn assert_zeroes(data: &[u8], offset: u64) {
    if let Some(i) = data.iter().position(|&b| b != 0) {
        panic!(
            "byte at offset {} is {:#x}, expected 0",
            offset + i as u64,
            data[i]
        );
    }
}

/// xorshift64*: deterministic randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A file path removed when the guard drops.
struct TempPath(PathBuf);

impl TempPath {
    /// A fresh path named after the test, in `dir`.
    fn new_in(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(format!("{name}-{}-{}", std::process::id(), engine_name()));
        let _ = std::fs::remove_file(&p);
        TempPath(p)
    }
    /// A fresh path on the disk under the cargo target directory.
    fn new(name: &str) -> Self {
        Self::new_in(&disk_dir(), name)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory under `target/tmp`: the real disk, not tmpfs.
fn disk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("aio-file")
}

/// The filesystem type name `stat -f` reports for `path` (statfs's f_type).
fn fs_type(path: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .expect("run stat -f");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn rw() -> OpenOptions {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .engine(engine())
}

fn open(path: &Path, opts: &OpenOptions) -> File {
    File::open(path, opts).unwrap()
}

fn io_error(err: &Error) -> (&str, &io::Error) {
    match err {
        Error::Io { context, source } => (context, source),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = aio::Result<T>> + Send>>;

/// Awaits futures in submission order, keeping at most `window` in flight.
struct Window<T> {
    window: usize,
    in_flight: VecDeque<aio::JoinHandle<aio::Result<T>>>,
    done: Vec<T>,
}

impl<T: Send + 'static> Window<T> {
    fn new(window: usize) -> Self {
        Self {
            window,
            in_flight: VecDeque::new(),
            done: Vec::new(),
        }
    }
    /// Starts `fut` as a task, so it is in flight on either engine
    /// (io_uring submits when first polled).
    fn push(&mut self, fut: BoxFut<T>) {
        if self.in_flight.len() == self.window {
            let h = self.in_flight.pop_front().unwrap();
            self.done.push(run(h).unwrap().unwrap());
        }
        self.in_flight.push_back(CTX.with(|c| c.spawn(fut)));
    }
    fn finish(mut self) -> Vec<T> {
        while let Some(h) = self.in_flight.pop_front() {
            self.done.push(run(h).unwrap().unwrap());
        }
        self.done
    }
}

/// Random `(offset, len)` pieces, 4 KiB to 1 MiB long (the last may be
/// shorter), that cover `[0, size)` exactly once, in shuffled order.
fn shuffled_partition(rng: &mut Rng, size: u64) -> Vec<(u64, usize)> {
    let mut pieces = Vec::new();
    let mut off = 0;
    while off < size {
        let len = rng.range(4096, MIB as u64).min(size - off);
        pieces.push((off, len as usize));
        off += len;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.range(0, i as u64) as usize);
    }
    pieces
}

both_engines! {
fn concurrent_random_writes_read_back_exactly() {
    const SIZE: u64 = 64 * MIB as u64;
    let tmp = TempPath::new("random-writes");
    let pool = ThreadPool::new(PoolOptions::new().max_workers(16).name("rwtest"));
    let f = open(&tmp.0, &rw().truncate(true).pool(pool.clone()));
    let mut rng = Rng(0x1234_5678_9abc_def1);

    // Cover the file exactly once in random order, then overwrite random
    // ranges again (same pattern, so overlaps cannot change the result),
    // 32 requests in flight, through all three write paths.
    let mut writes = shuffled_partition(&mut rng, SIZE);
    for _ in 0..100 {
        let len = rng.range(4096, MIB as u64);
        let off = rng.range(0, SIZE - len);
        writes.push((off, len as usize));
    }
    let mut w = Window::new(32);
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(off, len);
        let fut: BoxFut<()> = match i % 3 {
            0 => Box::pin(f.write_at(data, off).map_drop()),
            1 => {
                let mut buf = AlignedBuf::new(len, 4096).unwrap();
                buf.copy_from_slice(&data);
                Box::pin(f.write_at(buf, off).map_drop())
            }
            _ => {
                // Three segments, one of them empty.
                let (a, b) = data.split_at(len / 3);
                let bufs = vec![a.to_vec(), Vec::new(), b.to_vec()];
                Box::pin(f.writev_at(bufs, off).map_drop())
            }
        };
        w.push(fut);
    }
    w.finish();
    run(f.flush()).unwrap();
    assert_eq!(run(f.len()).unwrap(), SIZE);

    // Read it back in different random pieces, also through all paths.
    let mut r = Window::new(32);
    for (i, (off, len)) in shuffled_partition(&mut rng, SIZE).into_iter().enumerate() {
        let fut: BoxFut<(u64, Vec<u8>)> = match i % 3 {
            0 => Box::pin(f.read_at(vec![0u8; len], off).map_ok(move |(n, b)| {
                assert_eq!(n, len);
                (off, b)
            })),
            1 => Box::pin(
                f.read_exact_at(AlignedBuf::new(len, 512).unwrap(), off)
                    .map_ok(move |b| (off, b.to_vec())),
            ),
            _ => {
                let bufs = vec![vec![0u8; len / 2], vec![0u8; len - len / 2]];
                Box::pin(f.readv_at(bufs, off).map_ok(move |(n, b)| {
                    assert_eq!(n, len);
                    (off, b.concat())
                }))
            }
        };
        r.push(fut);
    }
    let mut pieces = r.finish();
    pieces.sort_by_key(|p| p.0);
    let mut expect_off = 0;
    for (off, data) in &pieces {
        assert_eq!(*off, expect_off, "pieces cover the file");
        assert_pattern(data, *off);
        expect_off += data.len() as u64;
    }
    assert_eq!(expect_off, SIZE);

    // And through std, bypassing the pool entirely.
    let all = std::fs::read(&tmp.0).unwrap();
    assert_eq!(all.len() as u64, SIZE);
    assert_pattern(&all, 0);
    let s = pool.stats();
    assert!(s.live_workers <= 16, "{s:?}");
    assert_eq!(s.cancelled, 0);
}
}

/// Adapters that keep the test's future plumbing short.
trait FutExt: Future + Sized + Send + 'static {
    fn map_ok<T, U>(
        self,
        f: impl FnOnce(T) -> U + Send + 'static,
    ) -> impl Future<Output = aio::Result<U>> + Send
    where
        Self: Future<Output = aio::Result<T>>,
    {
        async move { self.await.map(f) }
    }
    fn map_drop<T>(self) -> impl Future<Output = aio::Result<()>> + Send
    where
        Self: Future<Output = aio::Result<T>>,
    {
        async move { self.await.map(drop) }
    }
}

impl<F: Future + Send + 'static> FutExt for F {}

both_engines! {
fn pattern_is_the_same_byte_by_byte_and_word_by_word() {
    for off in [0u64, 1, 7, 8, 4093] {
        let p = pattern(off, 100);
        for (i, &b) in p.iter().enumerate() {
            assert_eq!(b, pattern_byte(off + i as u64));
        }
    }
}
}

both_engines! {
fn short_read_at_end_of_file_returns_the_count() {
    let tmp = TempPath::new("short-read");
    let f = open(&tmp.0, &rw());
    run(f.write_at(pattern(0, 10_000), 0)).unwrap();

    let (n, buf) = run(f.read_at(vec![0xffu8; 4096], 8192)).unwrap();
    assert_eq!(n, 10_000 - 8192, "short count, not an error");
    assert_pattern(&buf[..n], 8192);
    assert!(
        buf[n..].iter().all(|&b| b == 0xff),
        "bytes past EOF untouched"
    );

    let (n, bufs) =
        run(f.readv_at(vec![vec![0u8; 1000], vec![0u8; 1000]], 9000)).unwrap();
    assert_eq!(n, 1000);
    assert_pattern(&bufs[0], 9000);

    let err = run(f.read_exact_at(vec![0u8; 4096], 8192)).unwrap_err();
    let (context, source) = io_error(&err);
    assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
    assert!(
        context.contains("pread of 4096 bytes at offset 8192"),
        "{context}"
    );
}
}

both_engines! {
fn read_at_or_past_end_of_file_returns_zero() {
    let tmp = TempPath::new("past-eof");
    let f = open(&tmp.0, &rw());
    run(f.write_at(vec![1u8; 100], 0)).unwrap();
    for off in [100, 101, 1 << 40] {
        let (n, _) = run(f.read_at(vec![0u8; 512], off)).unwrap();
        assert_eq!(n, 0, "at offset {off}");
    }
    let (n, _) = run(f.read_at(Vec::new(), 0)).unwrap();
    assert_eq!(n, 0, "an empty buffer reads nothing");
}
}

/// Writes the pattern over 4 MiB, zeroes and discards ranges, checks
/// the result by reading.
fn zeroes_and_discard_on(dir: &Path) {
    let tmp = TempPath::new_in(dir, "zeroes");
    let f = open(&tmp.0, &rw());
    let size = 4 * MIB as u64;
    run(f.write_at(pattern(0, size as usize), 0)).unwrap();

    run(f.write_zeroes(65_536, 200_000)).unwrap();
    run(f.discard(MIB as u64, MIB as u64)).unwrap();
    run(f.write_zeroes(0, 0)).unwrap();
    run(f.discard(0, 0)).unwrap();

    let all = std::fs::read(&tmp.0).unwrap();
    assert_pattern(&all[..65_536], 0);
    assert_zeroes(&all[65_536..265_536], 65_536);
    assert_pattern(&all[265_536..MIB], 265_536);
    // Discard is advisory in general, but ext4 and tmpfs both punch holes.
    assert_zeroes(&all[MIB..2 * MIB], MIB as u64);
    assert_pattern(&all[2 * MIB..], 2 * MIB as u64);
    assert_eq!(run(f.len()).unwrap(), size, "discard keeps the size");

    // Zeroing past the end extends the file, like writing zeroes would.
    run(f.write_zeroes(size + 4096, 8192)).unwrap();
    assert_eq!(run(f.len()).unwrap(), size + 12_288);
    let (n, buf) = run(f.read_at(vec![0xffu8; 12_288], size)).unwrap();
    assert_eq!(n, 12_288);
    assert_zeroes(&buf, size);
}

both_engines! {
fn write_zeroes_and_discard_read_back_as_zeroes_on_disk() {
    zeroes_and_discard_on(&disk_dir());
}
}

both_engines! {
fn write_zeroes_falls_back_to_writing_on_tmpfs() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE: this takes the zero-buffer path.
    let shm = Path::new("/dev/shm");
    if fs_type(shm) != "tmpfs" {
        println!("skipped: /dev/shm is not tmpfs here");
        return;
    }
    zeroes_and_discard_on(shm);
}
}

both_engines! {
fn set_len_and_len() {
    let tmp = TempPath::new("set-len");
    let f = open(&tmp.0, &rw());
    assert_eq!(run(f.len()).unwrap(), 0);
    run(f.set_len(MIB as u64)).unwrap();
    assert_eq!(run(f.len()).unwrap(), MIB as u64);
    let (n, buf) = run(f.read_at(vec![0xffu8; 4096], MIB as u64 - 4096)).unwrap();
    assert_eq!(n, 4096);
    assert_zeroes(&buf, MIB as u64 - 4096);
    run(f.write_at(pattern(0, 1000), 0)).unwrap();
    run(f.set_len(100)).unwrap();
    assert_eq!(run(f.len()).unwrap(), 100);
    assert_eq!(std::fs::metadata(&tmp.0).unwrap().len(), 100);
    let (n, buf) = run(f.read_at(vec![0u8; 1000], 0)).unwrap();
    assert_eq!(n, 100);
    assert_pattern(&buf[..100], 0);
}
}

both_engines! {
fn flush_after_writes() {
    let tmp = TempPath::new("flush");
    let f = open(&tmp.0, &rw());
    run(f.write_at(pattern(0, 65_536), 0)).unwrap();
    run(f.flush()).unwrap();
    assert_pattern(&std::fs::read(&tmp.0).unwrap(), 0);
}
}

both_engines! {
fn vectored_io_with_more_segments_than_iov_max() {
    // 3000 segments of odd sizes (some empty): preadv/pwritev take at most
    // 1024 at a time, so this goes round the short-transfer loop.
    let tmp = TempPath::new("iovmax");
    let f = open(&tmp.0, &rw());
    let sizes: Vec<usize> = (0..3000)
        .map(|i| if i % 7 == 0 { 0 } else { 1 + i % 300 })
        .collect();
    let total: usize = sizes.iter().sum();
    let mut off = 0;
    let bufs: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| {
            let b = pattern(100 + off as u64, n);
            off += n;
            b
        })
        .collect();
    let back = run(f.writev_at(bufs, 100)).unwrap();
    assert_eq!(back.len(), 3000, "buffers come back");
    let all = std::fs::read(&tmp.0).unwrap();
    assert_eq!(all.len(), 100 + total);
    assert_pattern(&all[100..], 100);

    let bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let (n, bufs) = run(f.readv_at(bufs, 100)).unwrap();
    assert_eq!(n, total);
    assert_pattern(&bufs.concat(), 100);
}
}

both_engines! {
fn writing_a_read_only_file_fails_naming_pwrite_offset_and_path() {
    let tmp = TempPath::new("read-only");
    std::fs::write(&tmp.0, [0u8; 100]).unwrap();
    let f = open(&tmp.0, &OpenOptions::new().read(true).engine(engine()));
    let err = run(f.write_at(vec![1u8; 4096], 8192)).unwrap_err();
    let (context, source) = io_error(&err);
    assert_eq!(source.raw_os_error(), Some(libc_ebadf()), "{err}");
    let expect = format!("pwrite of 4096 bytes at offset 8192 in {}", tmp.0.display());
    assert_eq!(context, expect);
    assert!(err.to_string().starts_with(&expect), "{err}");

    let err = run(f.writev_at(vec![vec![1u8; 10]], 20)).unwrap_err();
    assert!(
        io_error(&err)
            .0
            .starts_with("pwritev of 10 bytes at offset 20 in"),
        "{err}"
    );
    // Reads still work on the same file.
    assert_eq!(run(f.read_at(vec![1u8; 100], 0)).unwrap().0, 100);
}
}

/// EBADF without depending on the libc crate in tests.
fn libc_ebadf() -> i32 {
    9
}

both_engines! {
fn opening_a_missing_file_names_the_path() {
    let tmp = TempPath::new("missing");
    let err = File::open(&tmp.0, &OpenOptions::new().read(true).engine(engine())).unwrap_err();
    let (context, source) = io_error(&err);
    assert_eq!(source.kind(), io::ErrorKind::NotFound);
    assert!(context.contains(&tmp.0.display().to_string()), "{context}");
}
}

both_engines! {
fn offsets_past_the_largest_file_offset_are_invalid_input() {
    let tmp = TempPath::new("huge-offset");
    let f = open(&tmp.0, &rw());
    let err = run(f.read_at(vec![0u8; 10], i64::MAX as u64 - 5)).unwrap_err();
    assert_eq!(err.io_kind(), Some(io::ErrorKind::InvalidInput), "{err}");
    let err = run(f.write_zeroes(u64::MAX, 1)).unwrap_err();
    assert_eq!(err.io_kind(), Some(io::ErrorKind::InvalidInput), "{err}");
}
}

/// A tmpfs mounted for the length of a test; unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: PathBuf, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(&dir).unwrap();
        if std::env::var_os("AIO_TEST_NO_MOUNT").is_some() {
            return None;
        }
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Mount(dir))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

both_engines! {
fn writing_past_the_capacity_of_a_small_tmpfs_fails_with_enospc() {
    let dir = disk_dir().join(format!("enospc-{}-{}", std::process::id(), engine_name()));
    let Some(mount) = Mount::tmpfs(dir.clone(), "1m") else {
        // No permission to mount (not root, or in a container): get a write
        // error from the file size limit instead, with EFBIG for ENOSPC. That
        // needs a process of its own, with SIGXFSZ ignored, so re-run this
        // test binary's `efbig_child` under `prlimit --fsize`.
        let _ = std::fs::remove_dir(&dir);
        println!("mount not permitted; checking EFBIG under RLIMIT_FSIZE instead");
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("sh")
            .args([
                "-c",
                r#"trap '' XFSZ; exec prlimit --fsize=1048576 -- "$@""#,
                "sh",
            ])
            .arg(exe)
            .args(["--exact", &format!("efbig_child::{}", engine_name())])
            .args(["--ignored", "--nocapture"])
            .env("AIO_EFBIG_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("EFBIG checked"),
            "child did not run the check: {stdout}"
        );
        return;
    };
    let tmp = TempPath::new_in(&mount.0, "full");
    let f = open(&tmp.0, &rw());
    // 2 MiB into 1 MiB: the first pwrite is short, the loop goes on, and
    // the next one fails.
    let err = run(f.write_at(pattern(0, 2 * MIB), 0)).unwrap_err();
    let (context, source) = io_error(&err);
    assert_eq!(source.raw_os_error(), Some(28), "ENOSPC expected: {err}");
    assert!(context.starts_with("pwrite of "), "{context}");
    assert!(context.contains(&tmp.0.display().to_string()), "{context}");
    drop(f);
    drop(tmp);
    drop(mount);
}
}

// Runs in a child process under RLIMIT_FSIZE = 1 MiB, SIGXFSZ ignored
// (see above): a write past the limit fails with EFBIG.
both_engines! {
#[ignore = "run by writing_past_the_capacity_of_a_small_tmpfs_fails_with_enospc when mount is not permitted"]
fn efbig_child() {
    if std::env::var_os("AIO_EFBIG_CHILD").is_none() {
        return;
    }
    let tmp = TempPath::new("efbig");
    let f = open(&tmp.0, &rw());
    let err = run(f.write_at(pattern(0, 2 * MIB), 0)).unwrap_err();
    let (context, source) = io_error(&err);
    assert_eq!(source.raw_os_error(), Some(27), "EFBIG expected: {err}");
    assert!(context.starts_with("pwrite of "), "{context}");
    println!("EFBIG checked: {err}");
}
}

/// Opens `name` with O_DIRECT on the real disk, or says why it cannot.
fn open_direct(name: &str, pool: Option<ThreadPool>) -> Option<(TempPath, File)> {
    let mut dir = disk_dir();
    std::fs::create_dir_all(&dir).unwrap();
    if fs_type(&dir) == "tmpfs" {
        dir = std::env::temp_dir();
    }
    let fs = fs_type(&dir);
    if fs == "tmpfs" {
        println!("skipped: no non-tmpfs directory for an O_DIRECT test");
        return None;
    }
    let tmp = TempPath::new_in(&dir, name);
    let mut opts = rw().direct(true);
    if let Some(p) = pool {
        opts = opts.pool(p);
    }
    match File::open(&tmp.0, &opts) {
        Ok(f) => Some((tmp, f)),
        Err(e) if e.raw_os_error() == Some(22) => {
            println!("skipped: {fs} at {} refuses O_DIRECT: {e}", dir.display());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

both_engines! {
fn o_direct_round_trip_with_aligned_buffers() {
    let Some((tmp, f)) = open_direct("direct", None) else {
        return;
    };
    let align = f.request_alignment();
    println!(
        "O_DIRECT alignment: offsets/lengths {align}, memory {}",
        f.memory_alignment()
    );
    assert!(align >= 512 && align.is_power_of_two(), "{align}");
    assert!(f.memory_alignment() <= 4096);
    let len = 256 * 1024;
    let mut futs = Vec::new();
    for i in 0..8u64 {
        let off = i * len as u64;
        let mut buf = AlignedBuf::new(len, 4096).unwrap();
        buf.copy_from_slice(&pattern(off, len));
        futs.push(f.write_at(buf, off));
    }
    for fut in futs {
        run(fut).unwrap();
    }
    run(f.flush()).unwrap();
    for i in (0..8u64).rev() {
        let off = i * len as u64;
        let buf = run(f.read_exact_at(AlignedBuf::new(len, 4096).unwrap(), off)).unwrap();
        assert_pattern(&buf, off);
    }
    // Vectored, and zeroes through the same alignment rules.
    let bufs = vec![
        AlignedBuf::new(4096, 4096).unwrap(),
        AlignedBuf::new(8192, 4096).unwrap(),
    ];
    let (n, bufs) = run(f.readv_at(bufs, 4096)).unwrap();
    assert_eq!(n, 12_288);
    assert_pattern(&bufs[0], 4096);
    assert_pattern(&bufs[1], 8192);
    run(f.write_zeroes(0, 4096)).unwrap();
    let (n, buf) = run(f.read_at(AlignedBuf::new(8192, 4096).unwrap(), 0)).unwrap();
    assert_eq!(n, 8192);
    assert_zeroes(&buf[..4096], 0);
    assert_pattern(&buf[4096..], 4096);
    // Reading across the end of file returns the short count.
    let size = 8 * len as u64;
    let (n, _) =
        run(f.read_at(AlignedBuf::new(16_384, 4096).unwrap(), size - 4096)).unwrap();
    assert_eq!(n, 4096);
    assert_pattern(&std::fs::read(&tmp.0).unwrap()[4096..], 4096);
}
}

both_engines! {
fn o_direct_misaligned_requests_are_refused_before_submission() {
    let pool = ThreadPool::new(PoolOptions::new().name("dmis"));
    let Some((_tmp, f)) = open_direct("direct-misaligned", Some(pool.clone())) else {
        return;
    };
    let align = f.request_alignment() as usize;
    let expect_invalid = |err: Error, what: &str| {
        assert_eq!(
            err.io_kind(),
            Some(io::ErrorKind::InvalidInput),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("O_DIRECT"), "{what}: {err}");
    };
    let buf = || AlignedBuf::new(4096, 4096).unwrap();
    expect_invalid(run(f.write_at(buf(), 100)).unwrap_err(), "offset");
    expect_invalid(
        run(f.read_at(AlignedBuf::new(align + 1, 4096).unwrap(), 0)).unwrap_err(),
        "length",
    );
    expect_invalid(
        run(f.writev_at(vec![buf(), AlignedBuf::new(100, 4096).unwrap()], 0))
            .unwrap_err(),
        "segment length",
    );
    expect_invalid(
        run(f.write_zeroes(1, 4096)).unwrap_err(),
        "zeroes offset",
    );
    // A Vec is refused exactly when its address is misaligned.
    let v = vec![0u8; 4096];
    let misaligned = v.as_ptr() as usize % f.memory_alignment() != 0;
    match run(f.write_at(v, 0)) {
        Err(e) => {
            assert!(misaligned, "{e}");
            expect_invalid(e, "Vec address");
        }
        Ok(_) => assert!(!misaligned),
    }
    let err = run(f.read_at(buf(), 100)).unwrap_err();
    assert!(
        err.to_string()
            .contains("pread of 4096 bytes at offset 100 in"),
        "{err}"
    );
    // Nothing reached the pool except the Vec write, if it was aligned.
    assert!(pool.stats().submitted <= 1, "{:?}", pool.stats());
}
}

both_engines! {
fn aligned_buf_needs_a_power_of_two_of_at_least_512() {
    for bad in [0, 1, 256, 511, 513, 1000, 3 << 10] {
        let err = AlignedBuf::new(4096, bad).unwrap_err();
        assert_eq!(
            err.io_kind(),
            Some(io::ErrorKind::InvalidInput),
            "{bad}: {err}"
        );
    }
    for good in [512, 4096, 1 << 21] {
        let b = AlignedBuf::new(10_000, good).unwrap();
        assert_eq!(
            (b.len(), b.align(), b.as_ptr() as usize % good),
            (10_000, good, 0)
        );
        assert!(b.iter().all(|&x| x == 0));
    }
    assert!(AlignedBuf::new(0, 512).unwrap().is_empty());
}
}

both_engines! {
fn the_default_pool_serves_files_opened_without_one() {
    let tmp = TempPath::new("default-pool");
    let f = open(&tmp.0, &rw());
    assert_eq!(f.pool().name(), "aio-file");
    let name = run(
        f.pool()
            .run(|| std::thread::current().name().map(str::to_string)),
    )
    .unwrap()
    .unwrap();
    assert!(name.starts_with("aio-file-worker-"), "{name}");
}
}

both_engines! {
fn dropping_the_file_with_operations_in_flight_completes_them() {
    let tmp = TempPath::new("drop-file");
    let f = open(&tmp.0, &rw());
    let futs: Vec<_> = (0..16u64)
        .map(|i| f.write_at(pattern(i * 4096, 4096), i * 4096))
        .collect();
    drop(f);
    for fut in futs {
        run(fut).unwrap();
    }
    assert_pattern(&std::fs::read(&tmp.0).unwrap(), 0);
}
}

/// A loop device over a file on the disk, detached on drop.
struct LoopDev {
    dev: PathBuf,
    _backing: TempPath,
}

impl LoopDev {
    fn new(size: u64, sector_size: u32) -> Option<LoopDev> {
        let backing = TempPath::new("loop-backing");
        std::fs::File::create(&backing.0)
            .unwrap()
            .set_len(size)
            .unwrap();
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(&backing.0)
            .output()
            .ok()?;
        if !out.status.success() {
            println!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDev {
            dev,
            _backing: backing,
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

both_engines! {
fn o_direct_on_a_block_device_uses_its_logical_block_size() {
    // Root can attach a loop device with 4 KiB sectors: BLKSSZGET then
    // says 4096, where a file on the same disk would say 512.
    let Some(lo) = LoopDev::new(4 * MIB as u64, 4096) else {
        return;
    };
    let f = open(
        &lo.dev,
        &OpenOptions::new().read(true).write(true).direct(true).engine(engine()),
    );
    assert_eq!(f.request_alignment(), 4096);
    assert_eq!(f.memory_alignment(), 4096);
    assert_eq!(
        run(f.len()).unwrap(),
        4 * MIB as u64,
        "size of a block device"
    );

    let mut buf = AlignedBuf::new(64 * 1024, 4096).unwrap();
    buf.copy_from_slice(&pattern(8192, 64 * 1024));
    run(f.write_at(buf, 8192)).unwrap();
    run(f.flush()).unwrap();
    let buf =
        run(f.read_exact_at(AlignedBuf::new(64 * 1024, 4096).unwrap(), 8192)).unwrap();
    assert_pattern(&buf, 8192);

    // 512-byte granularity is fine for the file underneath but not here.
    let err = run(f.read_at(AlignedBuf::new(512, 4096).unwrap(), 0)).unwrap_err();
    assert_eq!(err.io_kind(), Some(io::ErrorKind::InvalidInput), "{err}");
    let err = run(f.write_at(AlignedBuf::new(4096, 512).unwrap(), 4096));
    if let Err(err) = err {
        // Refused only if the allocator's 512-aligned address is not also
        // 4096-aligned.
        assert_eq!(err.io_kind(), Some(io::ErrorKind::InvalidInput), "{err}");
    }

    run(f.write_zeroes(8192, 4096)).unwrap();
    let buf = run(f.read_exact_at(AlignedBuf::new(8192, 4096).unwrap(), 8192)).unwrap();
    assert_zeroes(&buf[..4096], 8192);
    assert_pattern(&buf[4096..], 12_288);
    run(f.discard(MIB as u64, MIB as u64)).unwrap();
    // Reading at the end of the device is end of file.
    let (n, _) =
        run(f.read_at(AlignedBuf::new(8192, 4096).unwrap(), 4 * MIB as u64 - 4096))
            .unwrap();
    assert_eq!(n, 4096);
    drop(f);
}
}

both_engines! {
    fn extent_at_finds_data_and_holes() {
        let path = TempPath::new("extents");
        let f = open(&path.0, &rw());
        run(async {
            f.set_len(4 * MIB as u64).await.unwrap();
            f.write_at(vec![7u8; 65536], MIB as u64).await.unwrap();
            let at = |o: u64| f.extent_at(o);
            // ext4 tracks holes; a filesystem that does not reports data.
            let start = at(0).await.unwrap();
            if start.data {
                assert_eq!(start.len, 4 * MIB as u64, "all data when holes are not tracked");
                return;
            }
            assert_eq!(start.len, MIB as u64);
            let data = at(MIB as u64).await.unwrap();
            assert!(data.data);
            assert!(data.len >= 65536, "{data:?}");
            let tail = at(2 * MIB as u64).await.unwrap();
            assert!(!tail.data);
            assert_eq!(tail.len, 2 * MIB as u64);
            let end = at(4 * MIB as u64).await.unwrap();
            assert_eq!((end.data, end.len), (false, 0));
        });
    }
}
