//! The crate's error type.

/// Errors of the main loop layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An event-loop operation failed.
    #[error(transparent)]
    Aio(#[from] aio::Error),
    /// An iothread could not be started or stopped.
    #[error("iothread '{id}': {reason}")]
    IOThread {
        /// The iothread's id.
        id: String,
        /// What went wrong.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
