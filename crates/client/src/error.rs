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
    /// A failure with its own explanation: the hub ended a stream, a source cannot be read.
    #[error("{0}")]
    Other(String),
    /// The connection to the hub was lost and could not be re-established in time; the job may still
    /// run.
    #[error("lost the hub while following job {job}: {why}")]
    HubLost { job: String, why: String },
    /// The hub refused the request on a job stream, with its error code.
    #[error("{}", .0.error)]
    Api(cla_protocol::api::ApiError),
}

impl Error {
    /// The hub's error code (`no_match`, `unknown_worker`, ...), when the hub refused the request.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Error::Api(e) => Some(&e.code),
            Error::Http(HttpError::Status { code, .. }) => Some(code),
            _ => None,
        }
    }
}

/// `Result` with the admin client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
