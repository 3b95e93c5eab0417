//! `cla-worker`: parse, run, map to an exit code. Everything else is in the library crates.

mod cli;
mod error;

use clap::Parser;
use cli::worker::Args;

fn main() -> std::process::ExitCode {
    // A worker runs each eval in a child process of its own executable (see `cla_eval`).
    if let Some(code) = cla_eval::child::main() {
        return code.into();
    }
    cla_common::util::tune_allocator();
    let args = Args::parse();
    match cli::worker::run(args) {
        Ok(code) => code.into(),
        Err(err) => cli::report("cla-worker", &err).into(),
    }
}
