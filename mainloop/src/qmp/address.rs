//! Listen addresses (`unix:PATH`, `tcp:HOST:PORT`) and the sockets behind
//! them.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{IoContext, ServerError};

/// Where a QMP server listens, as given on a command line.
///
/// ```
/// use mainloop::qmp::QmpAddress;
/// let a: QmpAddress = "unix:/run/aiod/qmp.sock".parse()?;
/// assert_eq!(a, QmpAddress::Unix("/run/aiod/qmp.sock".into()));
/// let t: QmpAddress = "tcp:127.0.0.1:4444".parse()?;
/// assert_eq!(t.to_string(), "tcp:127.0.0.1:4444");
/// let v6: QmpAddress = "tcp:[::1]:0".parse()?;
/// assert_eq!(v6, QmpAddress::Tcp { host: "::1".into(), port: 0 });
/// assert!("udp:1".parse::<QmpAddress>().is_err());
/// # Ok::<(), mainloop::qmp::ServerError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QmpAddress {
    /// A unix socket at this path (created with mode 0600).
    Unix(PathBuf),
    /// A TCP socket; port 0 picks a free port (see
    /// [`ListenAddress`]).
    Tcp {
        /// Host name or IP address (no brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

impl FromStr for QmpAddress {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, ServerError> {
        let bad = |reason: &str| ServerError::BadAddress {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            return Ok(QmpAddress::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            let host = match host.strip_prefix('[') {
                Some(h) => h
                    .strip_suffix(']')
                    .ok_or_else(|| bad("unbalanced '[' in the host"))?,
                None => host,
            };
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            let port = port
                .parse::<u16>()
                .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
            return Ok(QmpAddress::Tcp {
                host: host.to_string(),
                port,
            });
        }
        Err(bad("expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl fmt::Display for QmpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            QmpAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            QmpAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// Where a server actually listens: for TCP, the bound address (with the
/// port the kernel chose for port 0).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ListenAddress {
    /// A unix socket path.
    Unix(PathBuf),
    /// A bound TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub(crate) enum ListenSocket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The socket file of a unix listener: removed on drop, but only if it is
/// still the file we created (same device and inode).
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the file now (idempotent).
    pub(crate) fn remove(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let path = std::mem::take(&mut self.path);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&path) {
                    log::warn!("QMP: removing socket {}: {e}", path.display());
                }
            }
            Ok(_) => log::debug!(
                "QMP: socket {} was replaced; leaving it alone",
                path.display()
            ),
            Err(_) => {}
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds `addr`: a non-blocking listening socket, its real address, and for
/// unix sockets the file guard.
pub(crate) fn bind(
    addr: &QmpAddress,
) -> Result<(ListenSocket, ListenAddress, Option<SocketFile>), ServerError> {
    match addr {
        QmpAddress::Unix(path) => {
            let (l, file) = bind_unix(path)?;
            Ok((
                ListenSocket::Unix(l),
                ListenAddress::Unix(path.clone()),
                Some(file),
            ))
        }
        QmpAddress::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .context(|| format!("resolving QMP address {addr}"))?
                .collect();
            let l =
                TcpListener::bind(&addrs[..]).context(|| format!("binding QMP socket {addr}"))?;
            l.set_nonblocking(true)
                .context(|| format!("making QMP socket {addr} non-blocking"))?;
            let local = l
                .local_addr()
                .context(|| format!("reading the address of {addr}"))?;
            if !local.ip().is_loopback() {
                log::warn!(
                    "QMP listening on non-loopback {local}: anyone who can reach it controls the daemon"
                );
            }
            Ok((ListenSocket::Tcp(l), ListenAddress::Tcp(local), None))
        }
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Creates a unix listener at `path` with mode 0600.
///
/// A live socket at `path` (one that accepts a connection) is refused; a
/// stale one is removed; any other file is refused. To avoid a window in
/// which the socket exists with the umask's permissions, it is bound in a
/// fresh private (0700) directory next to `path`, chmod-ed, and renamed into
/// place. Where that cannot be done (e.g. the temporary path would be too
/// long for `sun_path`) it is bound in place and chmod-ed at once.
fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ServerError> {
    let shown = || path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ServerError::SocketInUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("QMP: removing stale socket {}", shown());
                std::fs::remove_file(path)
                    .context(|| format!("removing stale QMP socket {}", shown()))?;
            }
            Err(e) => {
                return Err(ServerError::Io {
                    context: format!("probing existing QMP socket {}", shown()),
                    source: e,
                })
            }
        },
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ServerError::Io {
                context: format!("inspecting QMP socket path {}", shown()),
                source: e,
            })
        }
    }

    let listener = match bind_private_then_rename(path) {
        Ok(l) => l,
        Err(e) => {
            log::debug!(
                "QMP: binding {} through a private directory failed ({e}); binding in place",
                shown()
            );
            let l =
                UnixListener::bind(path).context(|| format!("binding QMP socket {}", shown()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .context(|| format!("setting the mode of QMP socket {}", shown()))?;
            l
        }
    };
    listener
        .set_nonblocking(true)
        .context(|| format!("making QMP socket {} non-blocking", shown()))?;
    let m =
        std::fs::symlink_metadata(path).context(|| format!("inspecting QMP socket {}", shown()))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        },
    ))
}

fn bind_private_then_rename(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.join(format!(
        ".qmp{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir)?;
    let result = (|| {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let tmp = dir.join("s");
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(dir.join("s"));
    let _ = std::fs::remove_dir(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<QmpAddress>().unwrap_err().to_string()
    }

    #[test]
    fn parse_when_malformed_then_clear_errors() {
        assert_eq!(
            err("foo"),
            "invalid QMP address 'foo': expected unix:PATH or tcp:HOST:PORT"
        );
        assert_eq!(
            err("unix:"),
            "invalid QMP address 'unix:': the socket path is empty"
        );
        assert_eq!(
            err("tcp:localhost"),
            "invalid QMP address 'tcp:localhost': expected tcp:HOST:PORT"
        );
        assert!(err("tcp:127.0.0.1:99999").contains("the port must be a number"));
        assert!(err("tcp::4444").contains("the host is empty"));
        assert!(err("tcp:[::1:4444").contains("unbalanced"));
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in ["unix:/tmp/q.sock", "tcp:localhost:0", "tcp:[::1]:4444"] {
            assert_eq!(s.parse::<QmpAddress>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn bind_unix_when_regular_file_then_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(bind_unix(&p), Err(ServerError::NotASocket { .. })));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
    }

    #[test]
    fn bind_unix_sets_0600_and_leaves_no_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qmp.sock");
        let (_l, mut file) = bind_unix(&p).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        file.remove();
        assert!(!p.exists());
        file.remove();
    }

    #[test]
    fn socket_file_when_replaced_then_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qmp.sock");
        let (l, file) = bind_unix(&p).unwrap();
        drop(l);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"someone else's").unwrap();
        drop(file);
        assert!(p.exists());
    }
}
