//! Logging setup for both binaries: `tracing` to stderr, `info` by default, `-v` for debug, `-vv` for trace,
//! `RUST_LOG` to override; ANSI colours only when stderr is a terminal. `println!` stays for CLI output.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `verbose` is the number of `-v` flags. Safe to call more than once
/// (later calls are ignored), which in-process tests rely on.
pub fn init(verbose: u8) {
    init_from("info", verbose);
}

/// Like [`init`], with `quiet` as the level when no `-v` is given (the demo keeps logs to warnings).
pub fn init_from(quiet: &str, verbose: u8) {
    let level = match verbose {
        0 => quiet,
        1 => "debug",
        _ => "trace",
    };
    // Our crate at the chosen level; chatty dependencies one step quieter.
    let default =
        format!("{level},hyper=warn,hyper_util=warn,tungstenite=warn,tokio_tungstenite=warn,redb=warn");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
