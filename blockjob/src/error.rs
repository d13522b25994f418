//! The crate's error type.
//!
//! Every variant names the file (or node) it is about, so that a tool can
//! print it as one line, e.g. `Could not open 'x.qcow2': Image is not in
//! qcow2 format` — the wording QEMU uses, where QEMU has one.

use std::io;

/// Errors returned by the block layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image could not be opened: missing file, bad header, unsupported
    /// feature, backing loop. `reason` is QEMU's text where QEMU has one.
    #[error("Could not open '{file}': {reason}")]
    Open {
        /// The file (or node) being opened.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error from the operating system.
    #[error("{file}: {source}")]
    Io {
        /// The file the I/O was on.
        file: String,
        /// The underlying error (its context names the operation).
        #[source]
        source: aio::Error,
    },
    /// Image metadata is inconsistent (an L2 entry past the end of the
    /// file, a misaligned offset, ...). Nothing is written to the image.
    #[error("{file}: corrupt image: {reason}")]
    Corrupt {
        /// The image file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The operation or image feature is not supported by this driver.
    #[error("{file}: {reason}")]
    Unsupported {
        /// The image file or node.
        file: String,
        /// What is not supported.
        reason: String,
    },
    /// A permission conflict or a write to a read-only node.
    #[error("{reason}")]
    Permission {
        /// The node refused.
        node: String,
        /// QEMU-style explanation.
        reason: String,
    },
    /// A request or option is invalid (out of range, unknown option, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A job verb or argument was refused; the message is QEMU's wording
    /// (QMP class `GenericError`).
    #[error("{0}")]
    Job(String),
    /// The job was cancelled.
    #[error("operation cancelled")]
    Cancelled,
    /// A job failed with this message.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// The OS error number behind an [`Error::Io`] (e.g. `ENOSPC` for a
    /// full disk), if the OS gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// An [`Error::Io`] for `file`.
    pub(crate) fn io(file: &str, source: aio::Error) -> Self {
        Error::Io {
            file: file.to_string(),
            source,
        }
    }

    /// An [`Error::Open`] for `file`.
    pub(crate) fn open(file: &str, reason: impl Into<String>) -> Self {
        Error::Open {
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Corrupt`] for `file`.
    pub(crate) fn corrupt(file: &str, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Unsupported`] for `file`.
    pub(crate) fn unsupported(file: &str, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    /// Turns an OS error from opening `file` into QEMU's wording:
    /// `Could not open 'FILE': No such file or directory`.
    pub(crate) fn from_open(file: &str, err: aio::Error) -> Self {
        match &err {
            aio::Error::Io { source, .. } => Error::open(file, os_error_text(source)),
            _ => Error::io(file, err),
        }
    }
}

/// `strerror`-style text of an OS error, without Rust's " (os error N)".
fn os_error_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// `strerror`-style text of an `io::Error`.
pub(crate) fn io_text(e: &io::Error) -> String {
    os_error_text(e)
}
