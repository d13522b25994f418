//! Errors: the ones QMP sends to clients ([`QmpError`]) and the ones the
//! embedder gets when setting a server up ([`ServerError`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

/// The `class` member of a QMP error reply.
///
/// QEMU's `QapiErrorClass`; the names serialise exactly as QEMU spells
/// them. Clients are expected to switch on the class, never on `desc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Every error without a more specific class (the vast majority).
    GenericError,
    /// The command does not exist, or is not available in the current
    /// mode (before capabilities negotiation, `qmp_capabilities` after it).
    CommandNotFound,
    /// A named device does not exist (legacy; most lookups say
    /// `GenericError`).
    DeviceNotFound,
    /// The device exists but is not active: e.g. `block-job-pause` of a job
    /// that does not exist.
    DeviceNotActive,
    /// The KVM capability the command needs is missing.
    KVMMissingCap,
}

impl ErrorClass {
    /// The name on the wire, e.g. `"GenericError"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
///
/// Command handlers return it; the server builds the protocol errors
/// (parse errors, argument errors, unknown commands) with the same texts as
/// QEMU.
///
/// ```
/// use mainloop::qmp::{ErrorClass, QmpError};
/// let e = QmpError::generic("Job not found");
/// assert_eq!(e.class, ErrorClass::GenericError);
/// assert_eq!(
///     serde_json::to_string(&e).unwrap(),
///     r#"{"class":"GenericError","desc":"Job not found"}"#
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// A human-readable description. Not for parsing.
    pub desc: String,
}

impl QmpError {
    /// An error of class `class`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    // ----- the texts QEMU uses (qapi/qmp/qerror.h and the input visitor) --

    /// `Parameter 'NAME' is missing`.
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// `Invalid parameter type for 'NAME', expected: TYPE`.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// `Parameter 'NAME' expects WHAT` (QEMU's `QERR_INVALID_PARAMETER_VALUE`).
    pub fn invalid_parameter_value(name: &str, expects: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expects}"))
    }

    /// `Parameter 'NAME' is unexpected`.
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// `Parameter 'NAME' does not accept value 'VALUE'`.
    pub fn bad_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}

/// Errors from setting up or driving a [`QmpServer`](super::QmpServer).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A listen address string could not be parsed.
    #[error("invalid QMP address '{input}': {reason}")]
    BadAddress {
        /// The string given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A unix socket path is already served by a live process.
    #[error("QMP socket {}: another server is listening there", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The unix socket path exists and is not a socket; it is left alone.
    #[error("QMP socket {}: the path exists and is not a socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A system call failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being attempted.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The event loop refused an operation (e.g. called off its home thread).
    #[error(transparent)]
    Aio(#[from] aio::Error),
    /// A command of that name is already registered.
    #[error("QMP command '{0}' is already registered")]
    DuplicateCommand(String),
    /// The server has been shut down (`quit`, [`shutdown`](super::QmpServer::shutdown)).
    #[error("the QMP server has been shut down")]
    ShutDown,
}

/// Adds context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn context(self, f: impl FnOnce() -> String) -> Result<T, ServerError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, f: impl FnOnce() -> String) -> Result<T, ServerError> {
        self.map_err(|source| ServerError::Io {
            context: f(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_class_serialises_with_qemu_names() {
        for (class, name) in [
            (ErrorClass::GenericError, "GenericError"),
            (ErrorClass::CommandNotFound, "CommandNotFound"),
            (ErrorClass::DeviceNotFound, "DeviceNotFound"),
            (ErrorClass::DeviceNotActive, "DeviceNotActive"),
            (ErrorClass::KVMMissingCap, "KVMMissingCap"),
        ] {
            assert_eq!(serde_json::to_value(class).unwrap(), name);
            assert_eq!(class.as_str(), name);
        }
    }

    #[test]
    fn argument_error_texts_match_qemu() {
        assert_eq!(
            QmpError::missing_parameter("device").desc,
            "Parameter 'device' is missing"
        );
        assert_eq!(
            QmpError::invalid_parameter_type("speed", "integer").desc,
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            QmpError::unexpected_parameter("bogus").desc,
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            QmpError::bad_enum_value("sync", "sideways").desc,
            "Parameter 'sync' does not accept value 'sideways'"
        );
        assert_eq!(
            QmpError::invalid_parameter_value("x", "uint64").desc,
            "Parameter 'x' expects uint64"
        );
    }
}
