//! The crate's error type: one `thiserror` enum per domain, wrapped by [`Error`].
//!
//! Variants name the failure, not the source type, and their messages are meant to be read by a user:
//! they say what went wrong and, where there is one, what to do about it. `anyhow` appears only in the
//! binaries' edges and in tests.

use std::path::PathBuf;

pub use crate::config::ConfigError;
pub use crate::http::HttpError;
pub use crate::hub::store::StoreError;
pub use crate::protocol::ProtocolError;

/// Any error the library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The hub no longer knows this worker's credentials.
    #[error("registration revoked: {0}; run `cla-worker register` to register again")]
    Revoked(String),
    /// The hub told the worker to exit (`cla-hub worker shutdown`).
    #[error("the hub ordered this worker to shut down: {0}")]
    HubShutdown(String),
    /// A command-line or input value that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// A failure with its own explanation (for conditions too rare for a variant of their own).
    #[error("{0}")]
    Other(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    PlainIo(#[from] std::io::Error),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns, so the message names the file.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
