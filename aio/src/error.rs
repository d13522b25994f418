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
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

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
