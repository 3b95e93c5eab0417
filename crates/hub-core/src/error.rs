//! The hub runtime's errors: what stops `serve` from starting or running.

pub use crate::store::StoreError;

/// Any error that ends the hub.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] cla_common::tls::TlsError),
    /// A failure with its own explanation.
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `Result` with the hub runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
