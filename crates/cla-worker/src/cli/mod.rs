//! The worker's command line: clap types and one `execute` match, one fn per verb. Below this module
//! nothing sees clap: values are turned into config and library types here.

pub mod daemon;
pub mod list;
#[cfg(windows)]
pub mod service;
pub mod worker;

pub(crate) use cla_common::output::{print_json, print_out};

use crate::error::Error;
use cla_common::exit::ExitCode;

/// Prints an error once, at the edge, and picks the exit code it deserves.
pub fn report(bin: &str, err: &Error) -> ExitCode {
    if let Error::PlainIo(e) = err
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        return ExitCode::Success;
    }
    eprintln!("{bin}: error: {err}");
    match err {
        Error::HubShutdown(_) => ExitCode::HubShutdown,
        Error::Usage(_) => ExitCode::Usage,
        _ => ExitCode::Failure,
    }
}

/// Splits repeated/comma-separated flag values (`--tags a,b --tag c`) into one list.
pub(crate) fn list(a: &[String], b: &[String]) -> Vec<String> {
    cla_common::util::split_list(a.iter().chain(b))
}
