//! The wire protocol, defined once for both binaries (`docs/protocol.md`).
//!
//! - [`message`]: the worker ↔ hub messages (serde-tagged JSON in text frames) and [`PROTOCOL_VERSION`].
//! - [`api`]: the HTTP JSON API (registration, admin) and the admin exec stream (job specs, job records).
//! - [`codec`]: text and binary frame encoding with clear errors for malformed input.
//! - [`connection`]: the WebSocket [`Connection`]; nothing outside this module touches tungstenite.

pub mod api;
pub mod bounds;
pub mod codec;
pub mod connection;
pub mod http;
pub mod message;

pub use codec::{Chunk, Frame, decode_binary, decode_text, encode_binary, encode_text};
pub use connection::{Connection, ConnectionReader, ConnectionWriter};
pub use message::*;

/// What can go wrong with frames and connections.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A text frame that is not JSON, or JSON that is not one of our messages.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A well-formed message of a type this build does not know (answered with `error {code: "unsupported"}`).
    #[error("unsupported message type `{0}`")]
    UnknownType(String),
    /// A binary frame too short to hold its 8-byte stream id.
    #[error("malformed binary frame: {0} bytes, need at least 8 for the stream id")]
    ShortBinary(usize),
    /// The hub (or worker) is not reachable or the WebSocket upgrade failed.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The upgrade was refused with an HTTP status.
    #[error("the hub at {url} refused the connection: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Refused { url: String, status: u16, body: String },
    /// The peer spoke another protocol version.
    #[error("protocol version mismatch: we speak v{ours}, the peer v{theirs}")]
    Version { ours: u32, theirs: u32 },
    /// An I/O or WebSocket error on an open connection.
    #[error("connection error: {0}")]
    Transport(String),
    /// A frame we expected did not arrive in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

#[cfg(test)]
mod props;
