//! libqtest's role for `aiod`: spawn the daemon in qtest mode (its virtual
//! clock moves only when the test says so), talk QMP and qtest to it, wait
//! for events, and clean up — even when a test panics.
//!
//! ```no_run
//! let mut d = qtest::Daemon::spawn(&[])?;
//! assert_eq!(d.qtest.clock_get()?, 0);
//! d.qmp.execute("query-jobs", serde_json::json!({}))?;
//! let now = d.qtest.clock_step(Some(1_000_000_000))?;
//! assert_eq!(now, 1_000_000_000);
//! # Ok::<(), qtest::Error>(())
//! ```

pub mod images;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the test client.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Spawning or talking to the daemon failed.
    Io(String),
    /// A QMP command returned an error.
    Qmp {
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// The qtest server answered `FAIL`.
    Qtest(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(m) => write!(f, "{m}"),
            Error::Qmp { class, desc } => write!(f, "QMP error {class}: {desc}"),
            Error::Qtest(m) => write!(f, "qtest FAIL {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn io(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{what}: {e}"))
}

/// The `aiod` binary: `$AIOD`, or next to the running test's target
/// directory, built with cargo if it is not there yet.
pub fn aiod_path() -> Result<PathBuf> {
    static PATH: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("AIOD") {
            return Ok(PathBuf::from(p));
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/<test> → target/<profile>/aiod
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("cannot locate the target directory")?;
        let candidate = profile_dir.join("aiod");
        if !candidate.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let release = profile_dir.ends_with("release");
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", "mainloop", "--bin", "aiod"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().map_err(|e| format!("building aiod: {e}"))?;
            if !status.success() {
                return Err("building aiod failed".into());
            }
        }
        Ok(candidate)
    })
    .clone()
    .map_err(Error::Io)
}

fn connect(path: &Path, child: &mut Child) -> Result<UnixStream> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| io("socket", e))?;
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Io(format!("aiod exited early: {status}")));
        }
        if Instant::now() > deadline {
            return Err(Error::Io(format!("aiod did not create {}", path.display())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `aiod --qtest`, killed (and its directory removed) on drop.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    /// The QMP connection (negotiated).
    pub qmp: QmpClient,
    /// The qtest connection.
    pub qtest: QtestClient,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Daemon {
    /// Starts `aiod --qtest` with `extra` arguments (e.g. `--blockdev`),
    /// with its sockets in a fresh temporary directory.
    pub fn spawn(extra: &[String]) -> Result<Daemon> {
        let dir = tempfile::tempdir().map_err(|e| io("temp dir", e))?;
        Self::spawn_in(dir, extra)
    }

    /// Like [`spawn`](Daemon::spawn) in a directory the caller prepared
    /// (images already created in it).
    pub fn spawn_in(dir: tempfile::TempDir, extra: &[String]) -> Result<Daemon> {
        let qmp_path = dir.path().join("qmp.sock");
        let qtest_path = dir.path().join("qtest.sock");
        let mut child = Command::new(aiod_path()?)
            .arg("--qmp")
            .arg(format!("unix:{}", qmp_path.display()))
            .arg("--qtest")
            .arg(format!("unix:{}", qtest_path.display()))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io("spawning aiod", e))?;
        let qtest = QtestClient::new(connect(&qtest_path, &mut child)?)?;
        let mut qmp = QmpClient::new(connect(&qmp_path, &mut child)?)?;
        qmp.negotiate()?;
        Ok(Daemon {
            child,
            dir,
            qmp,
            qtest,
        })
    }

    /// The daemon's directory (put images here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking QMP client that keeps every event it reads.
pub struct QmpClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    pending: VecDeque<Value>,
    log: Vec<Value>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("events", &self.log.len())
            .finish()
    }
}

impl QmpClient {
    fn new(stream: UnixStream) -> Result<Self> {
        let writer = stream.try_clone().map_err(|e| io("socket", e))?;
        Ok(Self {
            writer,
            reader: BufReader::new(stream),
            pending: VecDeque::new(),
            log: Vec::new(),
        })
    }

    fn read_value(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| io("reading QMP", e))?;
        if n == 0 {
            return Err(Error::Io("QMP connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| io("parsing QMP", e))
    }

    /// Reads the greeting and negotiates capabilities.
    pub fn negotiate(&mut self) -> Result<()> {
        let greeting = self.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Io(format!("not a QMP greeting: {greeting}")));
        }
        self.execute("qmp_capabilities", json!({}))?;
        Ok(())
    }

    /// Runs a command; events read meanwhile are kept for
    /// [`wait_event`](QmpClient::wait_event).
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value> {
        let mut req = json!({"execute": name});
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| io("writing QMP", e))?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.log.push(v.clone());
                self.pending.push_back(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Qmp {
                    class: e["class"].as_str().unwrap_or("").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                });
            }
        }
    }

    /// Returns the first event named `name` whose `data` satisfies
    /// `filter`, reading from the socket as needed. Advances nothing by
    /// itself: the event must already be on its way.
    pub fn wait_event(&mut self, name: &str, filter: impl Fn(&Value) -> bool) -> Result<Value> {
        if let Some(i) = self
            .pending
            .iter()
            .position(|e| e["event"] == name && filter(&e["data"]))
        {
            return Ok(self.pending.remove(i).unwrap_or(Value::Null));
        }
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.log.push(v.clone());
                if v["event"] == name && filter(&v["data"]) {
                    return Ok(v);
                }
                self.pending.push_back(v);
            }
        }
    }

    /// Every event received so far, in order.
    pub fn events(&self) -> &[Value] {
        &self.log
    }
}

/// The qtest line protocol.
pub struct QtestClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl std::fmt::Debug for QtestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QtestClient").finish()
    }
}

impl QtestClient {
    fn new(stream: UnixStream) -> Result<Self> {
        let writer = stream.try_clone().map_err(|e| io("socket", e))?;
        Ok(Self {
            writer,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one raw line and returns the raw answer (without newline).
    pub fn raw(&mut self, line: &str) -> Result<String> {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| io("writing qtest", e))?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .map_err(|e| io("reading qtest", e))?;
        Ok(answer.trim_end().to_string())
    }

    fn ok_ns(&mut self, line: &str) -> Result<i64> {
        let a = self.raw(line)?;
        match a.split_once(' ') {
            Some(("OK", n)) => n
                .parse()
                .map_err(|_| Error::Io(format!("bad qtest answer '{a}'"))),
            Some(("FAIL", why)) => Err(Error::Qtest(why.to_string())),
            _ => Err(Error::Io(format!("bad qtest answer '{a}'"))),
        }
    }

    /// `clock_step [NS]`: the new virtual time.
    pub fn clock_step(&mut self, ns: Option<i64>) -> Result<i64> {
        match ns {
            Some(ns) => self.ok_ns(&format!("clock_step {ns}")),
            None => self.ok_ns("clock_step"),
        }
    }

    /// `clock_set NS`.
    pub fn clock_set(&mut self, ns: i64) -> Result<i64> {
        self.ok_ns(&format!("clock_set {ns}"))
    }

    /// `clock_get`.
    pub fn clock_get(&mut self) -> Result<i64> {
        self.ok_ns("clock_get")
    }
}

/// docs/testing.md's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../docs/testing.md")]
pub struct TestingDocDoctests;
