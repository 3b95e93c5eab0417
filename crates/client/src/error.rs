//! The admin client's errors.

pub use cla_protocol::ProtocolError;
pub use cla_protocol::http::HttpError;

/// Any error an admin request, job stream or transfer reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Tls(#[from] cla_common::tls::TlsError),
    /// A value that cannot be used (an id that cannot be a path segment, a missing token).
    #[error("{0}")]
    Usage(String),
    /// A failure with its own explanation: the hub refused or ended a stream, a source cannot be read.
    #[error("{0}")]
    Other(String),
}

/// `Result` with the admin client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
