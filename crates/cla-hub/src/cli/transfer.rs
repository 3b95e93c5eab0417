//! `cla-hub ship` and `cla-hub fetch`: files to and from a worker, with a progress bar on a terminal and a
//! one-line summary (or `--json`) at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::hub::{FetchArgs, ShipArgs};
use super::jobs::target;
use super::print_json;
use crate::error::Result;
use cla_client::AdminClient;
use cla_client::{Update, fetch, ship};
use cla_common::exit::ExitCode;
use cla_protocol::TransferSummary;
use cla_protocol::api::{JobRecord, JobState};

/// How a finished transfer is reported (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub job: String,
    pub worker: String,
    /// `ship` or `fetch`.
    pub direction: &'static str,
    pub from: String,
    /// Where the files are now (the receiver's verified destination).
    pub to: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub skipped: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub sha256: String,
}

impl Report {
    pub(crate) fn new(
        direction: &'static str,
        record: &JobRecord,
        from: String,
        s: &TransferSummary,
        took: Duration,
    ) -> Report {
        let seconds = took.as_secs_f64();
        Report {
            job: record.id.clone(),
            worker: record.worker.clone().unwrap_or_default(),
            direction,
            from,
            to: s.path.clone(),
            files: s.files,
            dirs: s.dirs,
            symlinks: s.symlinks,
            skipped: s.skipped,
            bytes: s.bytes,
            seconds,
            mb_per_s: s.bytes as f64 / seconds.max(1e-9) / 1e6,
            sha256: s.sha256.clone(),
        }
    }

    /// `shipped dist → w1:/opt/app: 12 files, 1.0 GiB in 1.43 s (751 MB/s), sha256 …`
    pub(crate) fn line(&self) -> String {
        let (verb, from, to) = match self.direction {
            "ship" => (
                "shipped",
                self.from.clone(),
                format!("{}:{}", self.worker, self.to),
            ),
            _ => (
                "fetched",
                format!("{}:{}", self.worker, self.from),
                self.to.clone(),
            ),
        };
        let what = if self.dirs == 0 {
            human_bytes(self.bytes)
        } else {
            format!(
                "{} file{}, {} dir{}{}, {}",
                self.files,
                if self.files == 1 { "" } else { "s" },
                self.dirs,
                if self.dirs == 1 { "" } else { "s" },
                if self.symlinks > 0 {
                    format!(", {} symlinks", self.symlinks)
                } else {
                    String::new()
                },
                human_bytes(self.bytes)
            )
        };
        let digest = if self.dirs == 0 {
            "sha256"
        } else {
            "manifest sha256"
        };
        format!(
            "{verb} {from} → {to}: {what} in {:.2} s ({:.0} MB/s), {digest} {}",
            self.seconds, self.mb_per_s, self.sha256
        )
    }
}

fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// A progress bar on stderr when it is a terminal (and not `--json`); hidden otherwise.
fn bar(total: u64, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {binary_bytes}/{binary_total_bytes} [{bar:30}] {binary_bytes_per_sec}, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints the outcome and picks the exit code: 0 verified and in place, 130 cancelled, 1 otherwise.
fn conclude(
    direction: &'static str,
    from: String,
    record: &JobRecord,
    took: Duration,
    json: bool,
) -> Result<ExitCode> {
    match (&record.state, &record.transfer) {
        (JobState::Succeeded, Some(s)) => {
            let report = Report::new(direction, record, from, s, took);
            if json {
                print_json(&report)?;
            } else {
                println!("{}", report.line());
            }
            Ok(ExitCode::Success)
        }
        (JobState::Cancelled, _) => {
            if json {
                print_json(record)?;
            }
            eprintln!(
                "cla-hub: {direction} cancelled (job {}); nothing was kept",
                record.id
            );
            Ok(ExitCode::Interrupted)
        }
        _ => {
            if json {
                print_json(record)?;
            }
            let why = record.error.as_deref().unwrap_or("no reason given");
            eprintln!(
                "cla-hub: {direction} failed (job {}, {}): {why}",
                record.id,
                record.state.as_str()
            );
            Ok(ExitCode::Failure)
        }
    }
}

pub(crate) async fn ship_cmd(c: &AdminClient, a: ShipArgs, json: bool) -> Result<ExitCode> {
    let target = target(&a.target)?;
    let from = a.local.display().to_string();
    run_cmd("ship", from, json, |cancel, progress| {
        ship(c, target, a.local, a.remote, !a.no_mkdir, cancel, progress)
    })
    .await
}

pub(crate) async fn fetch_cmd(c: &AdminClient, a: FetchArgs, json: bool) -> Result<ExitCode> {
    let target = target(&a.target)?;
    let from = a.remote.clone();
    run_cmd("fetch", from, json, |cancel, progress| {
        fetch(c, target, a.remote, a.local, !a.no_mkdir, cancel, progress)
    })
    .await
}

type OnUpdate = Box<dyn FnMut(Update) + Send>;

/// Runs a transfer with the progress bar and Ctrl-C handling, then reports it.
async fn run_cmd<F, Fut>(direction: &'static str, from: String, json: bool, start: F) -> Result<ExitCode>
where
    F: FnOnce(CancellationToken, OnUpdate) -> Fut,
    Fut: std::future::Future<Output = cla_client::Result<JobRecord>>,
{
    let (cancel, give_up, signals) = super::on_ctrl_c("cancelling the transfer");
    let bar = bar(0, json);
    let b = bar.clone();
    let started = Instant::now();
    let work = start(
        cancel,
        Box::new(move |u: Update| match u {
            Update::Progress(p) => {
                b.set_length(p.total);
                b.set_position(p.done);
            }
            Update::Waiting(why) => super::waiting(&why),
        }),
    );
    let record = tokio::select! {
        r = work => r,
        _ = give_up.cancelled() => return Ok(ExitCode::Interrupted),
    };
    bar.finish_and_clear();
    signals.abort();
    conclude(direction, from, &record?, started.elapsed(), json)
}
