//! The crate's error type.

use std::io;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed; `context` says what the loop was doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being attempted, e.g. "registering fd 7 with epoll".
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An operation reserved for the context's home thread was called from
    /// another thread. Schedule a bottom half on the context instead.
    #[error("{op} must be called on the AioContext's home thread")]
    NotHomeThread {
        /// The operation that was refused.
        op: &'static str,
    },
    /// The context the handle belongs to has been dropped.
    #[error("the AioContext has been dropped")]
    ContextGone,
    /// The task was dropped before it finished: aborted through its
    /// `JoinHandle`, cancelled with `cancel_tasks`, or its context was dropped.
    #[error("the task was cancelled before it finished")]
    TaskCancelled,
    /// The task panicked; the panic was caught and its message kept.
    #[error("the task panicked: {message}")]
    TaskPanicked {
        /// The panic message.
        message: String,
    },
    /// An operation that needs the current task was used outside one.
    #[error("not inside a task spawned on an AioContext")]
    NotInTask,
    /// A job run on a [`ThreadPool`](crate::ThreadPool) panicked. The pool
    /// caught the panic and keeps working.
    #[error("job on thread pool {pool:?} panicked: {message}")]
    JobPanicked {
        /// The pool's name.
        pool: String,
        /// The panic message, if it was a string.
        message: String,
    },
    /// The requested feature exists in the API but not (yet) in this build.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is missing, e.g. "the io_uring file engine is not built yet".
        what: String,
    },
}

impl Error {
    /// The `io::ErrorKind` of an [`Error::Io`], `None` for other variants.
    ///
    /// Invalid requests (a misaligned `O_DIRECT` transfer, an offset past
    /// `i64::MAX`) are `Io` errors of kind `InvalidInput`.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The OS error number of an [`Error::Io`], if it came from the OS.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An `Error::Io` of kind `InvalidInput`, for requests refused before any
/// syscall.
pub(crate) fn invalid_input(context: String, msg: impl Into<String>) -> Error {
    Error::Io {
        context,
        source: io::Error::new(io::ErrorKind::InvalidInput, msg.into()),
    }
}

/// Adds context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn context(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: f(),
            source,
        })
    }
}
