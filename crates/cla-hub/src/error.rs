//! The hub binary's errors: whatever the crates it drives report, plus its own usage errors.

pub use cla_config::ConfigError;
pub use cla_protocol::ProtocolError;
pub use cla_protocol::http::HttpError;

/// Any error a `cla-hub` command reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `serve` could not start or run.
    #[error(transparent)]
    Hub(#[from] cla_hub_core::Error),
    /// An admin request, job stream or transfer failed.
    #[error(transparent)]
    Client(#[from] cla_client::Error),
    /// The demo's worker failed.
    #[error(transparent)]
    Worker(#[from] cla_worker_core::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Tls(#[from] cla_common::tls::TlsError),
    /// A command-line or input value that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// A failure with its own explanation.
    #[error("{0}")]
    Other(String),
    /// A file that cannot be read or written, with its path.
    #[error(transparent)]
    File(#[from] cla_common::Error),
    #[error(transparent)]
    PlainIo(#[from] std::io::Error),
}

/// `Result` with the hub binary's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
