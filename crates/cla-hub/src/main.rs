//! `cla-hub`: parse, run, map to an exit code. Everything else is in the library crates.

mod cli;
mod error;

fn main() -> std::process::ExitCode {
    // `demo` runs a worker in this process, and a worker runs each eval in a child process of its own
    // executable (see `cla_eval`).
    if let Some(code) = cla_eval::child::main() {
        return code.into();
    }
    // `{{ js }}` templates run in a child of this executable, under a time and memory limit.
    if let Ok(exe) = std::env::current_exe() {
        cla_eval::template::use_child_process(exe);
    }
    cla_common::util::tune_allocator();
    let args = cli::hub::parse();
    match cli::hub::run(args) {
        Ok(code) => code.into(),
        Err(err) => cli::report("cla-hub", &err).into(),
    }
}
