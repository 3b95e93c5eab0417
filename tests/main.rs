//! Integration tests: one binary, grouped by topic. Process-level tests run the real `cla-hub` and
//! `cla-worker` binaries on loopback ports chosen by the OS, each in its own temp dir; every process a
//! test starts is killed when its guard drops.
//!
//! Unix only: the tests signal processes and read `/proc`. The library and both binaries compile for
//! Windows (`cargo check --target x86_64-pc-windows-gnu`); Windows runs come with the cross-platform work.
#![cfg(unix)]

mod common;

mod chaos;
mod cli_hub;
mod cli_worker;
mod daemon;
mod docs;
mod durable;
mod end_to_end;
mod eval;
mod first_hour;
mod first_hour_worker;
mod hostile;
mod masking;
mod policy;
mod protocol_golden;
mod resilience;
mod rulebook;
mod security;
mod tls;
mod transfer;
mod transfer_resume;
