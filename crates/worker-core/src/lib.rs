//! The agent: registration, the session with the hub (connect, backoff, dispatch) and the request
//! handlers. One file per request kind (`exec.rs`, `eval.rs`, `transfer.rs` for ship and fetch); the
//! output journal (`journal.rs`), the daemon's pidfile and status file (`daemon.rs`), `doctor`.
//! Process-tree control, which differs per OS, is `cla_common::process`; the config is `cla-config`'s.
//! Nothing here knows the hub's insides: the session speaks `cla-protocol` and nothing else.

pub mod daemon;
pub mod doctor;
pub mod error;
mod eval;
mod exec;
mod journal;
pub mod registration;
pub mod session;
mod transfer;

pub use error::{Error, Result};
pub use session::{Reload, Reloaded, RunOptions, run};
