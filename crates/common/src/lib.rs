//! What both sides share and neither owns: the bottom of the crate graph.
//!
//! Nothing here knows whether it runs in a worker or a hub; nothing here depends on another crate of
//! ours. Side-specific code lives in `cla-worker-core` and `cla-hub-core`, the wire in `cla-protocol`.
//!
//! | module | owns |
//! |---|---|
//! | [`secret`], [`token`] | secrets with a redacted `Debug`; token generation, hashing and comparison |
//! | [`tls`] | certificates (given or self-signed), trust (a pin or a CA), mTLS client identities |
//! | [`mask`] | secret masking of streamed output |
//! | [`process`] | local process trees: spawn, kill the whole tree, the shell, exit statuses |
//! | [`util`] | atomic private writes, one-line escaping, time, host and user names, allocator tuning |
//! | [`exit`], [`shutdown`], [`logging`] | exit codes, signals as a cancellation token, tracing setup |

pub mod error;
pub mod exit;
pub mod fuzz;
pub mod logging;
pub mod mask;
pub mod output;
pub mod process;
pub mod secret;
pub mod shutdown;
pub mod tls;
pub mod token;
pub mod util;
pub mod yaml;

pub use error::{Error, Result};
pub use exit::ExitCode;

/// This build's version, sent in `hello` and shown by `workers`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod props;
