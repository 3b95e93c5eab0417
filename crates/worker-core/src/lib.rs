//! The agent: registration, the session with the hub (connect, backoff, dispatch) and the request
//! handlers. One file per request kind (`exec.rs`, `eval.rs`, `transfer.rs` for ship and fetch); process-tree
//! control, which differs per OS, is in `process.rs`.

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
pub use session::{Reload, RunOptions, run};
