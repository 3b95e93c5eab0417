//! JavaScript eval (boa_engine): the engine setup, the host API offered to scripts, and the child-process
//! entry the worker runs each eval in.
//!
//! Why a child process (a deviation from "a blocking thread", the obvious design; see `docs/eval.md`): boa has
//! no way to interrupt a running script, so only a process can be stopped at a wall-clock deadline; a
//! script that exhausts memory or the native stack then takes down only its own process; and a worker
//! that never evals never pays for a JS context.
//!
//! - [`engine`]: runs one script in a fresh context with limits, converts results to JSON.
//! - [`host`]: `console.*` and the `cla` object (files, env, worker info, commands).
//! - [`child`]: the child's `main` (stdin: [`EvalInput`], stdout: JSON lines) and its line format.
//! - [`template`]: rulebook `{{ js }}` expressions, with no host API, under the same kinds of limits (a
//!   child process for the wall clock and the memory cap).
//!
//! Its error type is the protocol's `EvalError` (message and stack): a script's failure is a result the
//! worker sends to the hub, not an error of the worker, so it is defined once, on the wire.

pub mod child;
pub mod engine;
mod host;
pub mod template;

use serde::{Deserialize, Serialize};

pub use engine::evaluate;

/// Who is running the script, for `cla.worker`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
}

/// Limits of one eval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLimits {
    /// Iterations one loop may make before it throws `RuntimeLimitError`.
    pub loop_iterations: u64,
    /// Nested calls before `RuntimeLimitError`.
    pub recursion: usize,
    /// Console output kept in the result (the live stream is not cut).
    pub max_console_bytes: usize,
    /// Largest result or stash (JSON bytes). Result, stash and console together must fit one protocol
    /// message (16 MiB) with room to spare: 2 + 2 + 1 MiB.
    pub max_result_bytes: usize,
    /// Address-space cap of the eval process, in MiB (Unix).
    pub memory_mib: u64,
}

impl Default for EvalLimits {
    fn default() -> Self {
        EvalLimits {
            loop_iterations: 10_000_000,
            recursion: 512,
            max_console_bytes: 1 << 20,
            max_result_bytes: 2 << 20,
            memory_mib: 2048,
        }
    }
}

/// Everything one eval needs: what the worker writes to the child's stdin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalInput {
    pub code: String,
    #[serde(default)]
    pub stash: serde_json::Value,
    pub worker: WorkerInfo,
    #[serde(default)]
    pub limits: EvalLimits,
    /// The worker's local policy, applied to the host API (`cla.readFile`, `cla.run`, ...).
    #[serde(default)]
    pub policy: cla_config::policy::Enforcer,
}

/// Default wall-clock limit of an eval.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
