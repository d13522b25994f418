//! The crate's error type.

/// Errors of the block layer and the jobs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An event-loop or file operation failed.
    #[error(transparent)]
    Aio(#[from] aio::Error),
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

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
