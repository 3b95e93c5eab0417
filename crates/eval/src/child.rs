//! The eval child process: the worker starts its own executable with [`CHILD_ENV`] set, writes one
//! [`EvalInput`] (JSON) to its stdin and reads JSON lines from its stdout — [`ChildLine::Console`] as
//! the script logs, then one [`ChildLine::Done`]. Both binaries call [`main`] first thing.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::{EvalInput, evaluate};
use cla_common::exit::ExitCode;
use cla_protocol::{ConsoleLine, EvalOutput};

/// Set (to `1`) in the environment of an eval child.
pub const CHILD_ENV: &str = "CLA_WORKER_EVAL_CHILD";

/// One line of the child's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildLine {
    Console(ConsoleLine),
    Done(Box<EvalOutput>),
}

/// If this process is an eval child, runs the eval and returns the exit code; otherwise `None`.
pub fn main() -> Option<ExitCode> {
    if crate::template::child_main() {
        return Some(ExitCode::Success);
    }
    std::env::var_os(CHILD_ENV)?;
    // Not inherited by what the script runs with `cla.run`.
    // SAFETY: single-threaded at this point (called first thing in main, before any thread starts).
    unsafe { std::env::remove_var(CHILD_ENV) };
    let mut raw = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut raw) {
        eprintln!("eval child: cannot read the request: {e}");
        return Some(ExitCode::Failure);
    }
    let input: EvalInput = match serde_json::from_str(&raw) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("eval child: bad request: {e}");
            return Some(ExitCode::Failure);
        }
    };
    cap_memory(input.limits.memory_mib);
    let output = evaluate(&input, Some(emit_console));
    emit(&ChildLine::Done(Box::new(output)));
    Some(ExitCode::Success)
}

fn emit_console(line: &ConsoleLine) {
    emit(&ChildLine::Console(line.clone()));
}

fn emit(line: &ChildLine) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Caps the address space so a runaway allocation kills this child, not the machine.
pub(crate) fn cap_memory(mib: u64) {
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        use nix::sys::resource::{Resource, setrlimit};
        let bytes = mib.saturating_mul(1 << 20);
        let _ = setrlimit(Resource::RLIMIT_AS, bytes, bytes);
    }
    #[cfg(not(all(unix, not(target_os = "macos"))))]
    let _ = mib;
}
