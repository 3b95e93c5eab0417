//! The worker runtime's errors: what stops a session, a registration or the daemon plumbing.
//!
//! Variants name the failure, not the source type; their messages are for a user and say what to do.

use std::path::PathBuf;

pub use cla_config::ConfigError;
pub use cla_protocol::ProtocolError;
pub use cla_protocol::http::HttpError;

/// Any error the worker runtime reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Tls(#[from] cla_common::tls::TlsError),
    /// The hub no longer knows this worker's credentials.
    #[error("registration revoked: {0}; run `cla-worker register` to register again")]
    Revoked(String),
    /// The hub told the worker to exit (`cla-hub worker shutdown`).
    #[error("the hub ordered this worker to shut down: {0}")]
    HubShutdown(String),
    /// A value that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// A failure with its own explanation (for conditions too rare for a variant of their own).
    #[error("{0}")]
    Other(String),
    /// A file that cannot be read or written, with its path.
    #[error(transparent)]
    File(#[from] cla_common::Error),
    #[error(transparent)]
    PlainIo(#[from] std::io::Error),
}

/// `Result` with the worker runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns, so the message names the file.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File(cla_common::Error::io(path, source))
    }
}
