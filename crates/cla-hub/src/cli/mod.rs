//! The hub's command line: clap types and one `execute` match, one fn per verb. Below this
//! module nothing sees clap: values are turned into config and library types here.

pub mod demo;
pub mod hub;
mod jobs;
pub(crate) mod rulebook;
mod table;
pub(crate) mod transfer;

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
    // The message may quote what a worker said of itself (its tags): shown escaped, on one line.
    eprintln!(
        "{bin}: error: {}",
        cla_common::util::one_line(&err.to_string(), 4000)
    );
    match err {
        Error::Usage(_) | Error::Client(cla_client::Error::Usage(_)) => ExitCode::Usage,
        Error::Client(cla_client::Error::HubLost { job, .. }) => {
            eprintln!(
                "{bin}: job {job} goes on without this command: `cla-hub job logs {job} --follow` follows it, \
                 `cla-hub job show {job}` says where it is"
            );
            ExitCode::HubLost
        }
        Error::Client(e) if matches!(e.api_code(), Some(cla_protocol::api::NO_MATCH | "unknown_worker")) => {
            ExitCode::NoWorker
        }
        _ => ExitCode::Failure,
    }
}

/// Ctrl-C (or SIGTERM) while a job streams: the first fires `cancel` (the hub is asked to cancel the job,
/// and the stream goes on to its real end), a second one fires `give_up` (stop waiting). After SIGTERM,
/// which supervisors send expecting the process to end, `give_up` also fires by itself after
/// [`TERM_GRACE`], should the hub not answer. Abort the task when done.
pub(crate) fn on_ctrl_c(
    doing: &'static str,
) -> (
    tokio_util::sync::CancellationToken,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (cancel, give_up) = (
        tokio_util::sync::CancellationToken::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let (c, g) = (cancel.clone(), give_up.clone());
    let task = tokio::spawn(async move {
        match interrupted().await {
            None => return,
            Some(Stop::Interrupt) => eprintln!("cla-hub: {doing} (Ctrl-C again to stop waiting)"),
            Some(Stop::Terminate) => {
                eprintln!(
                    "cla-hub: terminated: {doing} (giving up in {} s if the hub does not answer)",
                    TERM_GRACE.as_secs()
                );
                let g = g.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(TERM_GRACE).await;
                    g.cancel();
                });
            }
        }
        c.cancel();
        if interrupted().await.is_some() {
            g.cancel();
        }
    });
    (cancel, give_up, task)
}

/// How long a SIGTERM'd command waits for its job's cancel to be confirmed.
const TERM_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

enum Stop {
    /// Ctrl-C.
    Interrupt,
    /// SIGTERM, which a job runner, systemd or `timeout` sends.
    #[cfg_attr(not(unix), allow(dead_code))]
    Terminate,
}

/// Waits for Ctrl-C or (on Unix) SIGTERM; `None` if signals cannot be watched.
async fn interrupted() -> Option<Stop> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return tokio::signal::ctrl_c().await.ok().map(|_| Stop::Interrupt);
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.ok().map(|_| Stop::Interrupt),
            _ = term.recv() => Some(Stop::Terminate),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.ok().map(|_| Stop::Interrupt)
    }
}

/// `NAME=VALUE` flag values (`--var`, `--setenv`) as pairs; the name is trimmed, the value kept as given.
pub(crate) fn pairs(
    flag: &str,
    name: &str,
    values: &[String],
) -> crate::error::Result<Vec<(String, String)>> {
    values
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .ok_or_else(|| Error::Usage(format!("{flag} `{kv}`: use {name}=VALUE")))
        })
        .collect()
}

/// Splits repeated/comma-separated flag values (`--tags a,b --tag c`) into one list.
pub(crate) fn list(a: &[String], b: &[String]) -> Vec<String> {
    cla_common::util::split_list(a.iter().chain(b))
}

/// Writes output to stdout line by line, each line behind `prefix` (a last line without its newline gets
/// one).
pub(crate) fn print_prefixed(prefix: &str, bytes: &[u8]) {
    use std::io::Write;
    let text = String::from_utf8_lossy(bytes);
    let mut out = std::io::stdout().lock();
    for line in text.split_inclusive('\n') {
        let _ = write!(out, "{prefix}{line}");
        if !line.ends_with('\n') {
            let _ = writeln!(out);
        }
    }
    let _ = out.flush();
}

/// Tells a person at a terminal why their job has not started yet (scripts see it with `-v`).
pub(crate) fn waiting(why: &str) {
    use std::io::IsTerminal;
    let why = cla_common::util::one_line(why, 500);
    if std::io::stderr().is_terminal() {
        eprintln!("cla-hub: waiting for a worker: {why}");
    } else {
        tracing::info!("waiting for a worker: {why}");
    }
}
