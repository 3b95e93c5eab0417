//! Ship and fetch: moving files and directories between a client and a worker, verified and atomic.
//!
//! One implementation serves every side: [`send`] (the CLI for a ship, the worker for a fetch) and
//! [`receive`] (the worker for a ship, the CLI for a fetch). They talk through a [`Link`] — the worker's
//! session, or the admin client's stream — in [`Piece`]s: `transfer` frames and binary chunks.
//!
//! - **Flow control.** The sender keeps at most [`WINDOW`] units un-acknowledged (a unit is a byte of
//!   data, plus [`FRAME_COST`] per frame so that many small files count too); the receiver acks as its
//!   writer thread gets through them. Neither side, nor the hub between them, ever holds more than that.
//! - **Off the executor.** Reading + hashing (sender) and writing + hashing (receiver) run on one
//!   blocking thread per transfer, fed through bounded channels, so hashing overlaps the network.
//! - **Verified and atomic.** Every file's SHA-256 is checked by the receiver before anything is put in
//!   place; files are written to temp names beside their target, fsynced, and renamed only once the whole
//!   transfer is in; a failure or cancel removes everything it wrote (see [`receive`]).

mod backlog;
mod path;
mod receive;
mod send;

use std::future::Future;

pub use backlog::{Backlog, Hop};
pub use path::from_base;
pub use receive::{Received, receive};
pub use send::{Source, send};

use cla_protocol::{Chunk, TransferOp};

/// Size of the data chunks a sender reads and sends.
pub const CHUNK: usize = 1 << 20;

/// Flow-control window: the most un-acknowledged units a sender may have in flight.
pub const WINDOW: u64 = 16 << 20;

// A full chunk and its frame always fit in the window, so a sender never waits for an ack it cannot get.
const _: () = assert!(CHUNK as u64 + FRAME_COST <= WINDOW);

/// Transfers a worker runs at once (they do not use its exec `capacity`); more wait in the hub's queue.
pub const MAX_CONCURRENT: usize = 8;

/// Window units a frame costs beyond its data bytes.
pub const FRAME_COST: u64 = 512;

/// The receiver acks each time it has consumed this much more (a quarter window).
const ACK_EVERY: u64 = WINDOW / 4;

/// One thing on a transfer's way: a frame, or a chunk of the current file's bytes (kept as a whole binary
/// frame, so that no hop copies it just to put a stream id in front).
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Op(TransferOp),
    Data(Chunk),
}

impl Piece {
    /// Window units this piece takes.
    pub fn cost(&self) -> u64 {
        match self {
            Piece::Op(_) => FRAME_COST,
            Piece::Data(d) => d.payload().len() as u64 + FRAME_COST,
        }
    }
}

/// How a transfer talks to the other side. `recv` gives `None` when the link is gone (connection
/// closed, job ended).
pub trait Link {
    fn send(&mut self, piece: Piece) -> impl Future<Output = Result<(), String>> + Send;
    fn recv(&mut self) -> impl Future<Output = Option<Piece>> + Send;
}

/// Why a transfer did not complete.
#[derive(Debug, Clone, PartialEq)]
pub enum TransferError {
    /// Stopped on request; nothing was left behind.
    Cancelled,
    /// A one-line reason naming the problem (and the fix where there is one).
    Failed(String),
}

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransferError::Cancelled => f.write_str("cancelled"),
            TransferError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<String> for TransferError {
    fn from(m: String) -> Self {
        TransferError::Failed(m)
    }
}

/// Progress as a transfer goes: data bytes done out of the total the sender announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// A file's line in a directory's manifest: `SHA256  PATH\n`, the path below the transferred directory
/// (so the digest does not depend on the directory's name).
fn manifest_line(sha256: &str, wire: &str) -> String {
    let below = wire.split_once('/').map_or(wire, |(_, rest)| rest);
    format!("{sha256}  {below}\n")
}

/// Lowercase hex of a digest.
fn hex(digest: &[u8]) -> String {
    hex::encode(digest)
}

/// Test hooks, compiled into debug builds only (the integration tests run debug binaries):
/// `CLA_TEST_CORRUPT_CHUNK=1` makes a sender flip a byte of its first chunk after hashing it;
/// `CLA_TEST_CHUNK_DELAY_MS=N` makes a sender sleep N ms before each chunk (a slow disk);
/// `CLA_TEST_FAIL_WRITE_AFTER=N` makes a receiver fail with "no space left" once N bytes are written.
#[cfg(debug_assertions)]
mod hooks {
    pub fn corrupt_first_chunk() -> bool {
        std::env::var_os("CLA_TEST_CORRUPT_CHUNK").is_some()
    }
    pub fn chunk_delay() -> Option<std::time::Duration> {
        let ms = std::env::var("CLA_TEST_CHUNK_DELAY_MS").ok()?.parse().ok()?;
        Some(std::time::Duration::from_millis(ms))
    }
    pub fn fail_write_after() -> Option<u64> {
        std::env::var("CLA_TEST_FAIL_WRITE_AFTER").ok()?.parse().ok()
    }
}

#[cfg(not(debug_assertions))]
mod hooks {
    pub fn corrupt_first_chunk() -> bool {
        false
    }
    pub fn chunk_delay() -> Option<std::time::Duration> {
        None
    }
    pub fn fail_write_after() -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests;
