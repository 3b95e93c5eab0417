//! `cla-hub`: parse, run, map to an exit code. Everything else is in the library.

use cla_worker::cli::{self, hub::Args};
use clap::Parser;

fn main() -> std::process::ExitCode {
    // A worker runs each eval in a child process of its own executable (see `cla_worker::eval`).
    if let Some(code) = cla_worker::eval::child::main() {
        return code.into();
    }
    cla_worker::tune_allocator();
    let args = Args::parse();
    match cli::hub::run(args) {
        Ok(code) => code.into(),
        Err(err) => cli::report("cla-hub", &err).into(),
    }
}
