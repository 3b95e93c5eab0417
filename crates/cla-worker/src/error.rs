//! The worker binary reports the worker runtime's errors as they are.

pub use cla_worker_core::error::{Error, Result};
