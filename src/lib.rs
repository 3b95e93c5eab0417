//! cla-worker: a pull agent (`cla-worker`) and the server it connects out to (`cla-hub`).
//!
//! Both binaries are thin shells over this library; everything they do lives here so that it can be tested
//! in-process and so that the wire protocol is defined exactly once.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`protocol`] | wire types (worker ↔ hub, admin client ↔ hub), the frame codec and the WebSocket [`protocol::Connection`] |
//! | [`config`] | the worker's layered YAML config: search order, validation, atomic `--save` |
//! | [`worker`] | the agent runtime: registration, session with backoff, request handlers (exec, eval, ship/fetch) |
//! | [`transfer`] | ship and fetch: one sender and one receiver (verified, atomic, flow-controlled) over any [`transfer::Link`] |
//! | [`hub`] | the server runtime: HTTP + WebSocket listener, registry of connected workers, jobs, embedded store |
//! | [`cli`] | clap argument types for both binaries and one `execute` per verb; nothing below it sees clap |
//! | [`http`] | a small JSON-over-HTTP client used by `register`, `unregister` and the hub's admin commands |
//! | [`tls`] | the hub's certificate (given or self-signed), how clients trust it (a pin or a CA), mTLS client certificates |
//! | [`policy`], [`mask`] | the worker's local policy (verbs, path allow-lists) and secret masking of job output |
//! | [`secret`], [`token`] | secrets with redacted `Debug`; token generation, hashing and comparison |
//! | [`exit`], [`error`], [`shutdown`], [`logging`] | process-level plumbing shared by both binaries |

pub mod cli;
pub mod config;
pub mod error;
pub mod eval;
pub mod exit;
pub mod http;
pub mod hub;
pub mod logging;
pub mod mask;
pub mod policy;
#[cfg(test)]
mod props;
pub mod protocol;
pub mod rulebook;
pub mod secret;
pub mod shutdown;
pub mod tls;
pub mod token;
pub mod transfer;
pub(crate) mod util;
pub use util::tune_allocator;
pub mod worker;

pub use error::{Error, Result};
pub use exit::ExitCode;

/// This build's version, sent in `hello` and shown by `workers`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
