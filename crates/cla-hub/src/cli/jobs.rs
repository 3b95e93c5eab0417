//! The job verbs of `cla-hub`: `exec`, `eval`, `jobs`, `job show|cancel`, and the exit codes jobs map to.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use super::hub::{EvalArgs, ExecArgs, JobCommand, JobsArgs, Output, TargetArgs};
use super::print_json;
use super::table::{first_line, or_dash, render};
use crate::error::{Error, Result};
use cla_client::{AdminClient, ExecEvent};
use cla_common::exit::ExitCode;
use cla_protocol::api::{EvalTask, JobRecord, JobSpec, JobState, Target, Task};
use cla_protocol::{CommandLine, OnDisconnect};

/// The target flags shared by `exec`, `eval`, `ship` and `fetch`.
pub(crate) fn target(a: &TargetArgs) -> Result<Target> {
    let tags = super::list(&a.tags, &[]);
    if a.worker.is_none() && tags.is_empty() {
        return Err(Error::Usage(
            "a target is needed: --worker ID or --tags A,B".into(),
        ));
    }
    Ok(Target {
        worker: a.worker.clone(),
        tags,
        env: a.env.clone(),
        queue_timeout_secs: a.queue_timeout,
    })
}

/// `--cancel-after-disconnect SECS` as the job's disconnect policy.
fn on_disconnect(secs: Option<u64>) -> OnDisconnect {
    secs.map_or(OnDisconnect::Continue, OnDisconnect::CancelAfter)
}

/// Builds the job spec of `exec` arguments.
pub(crate) fn exec_spec(a: &ExecArgs) -> Result<JobSpec> {
    let target = target(&a.target)?;
    let env_vars: BTreeMap<String, String> =
        super::pairs("--setenv", "KEY", &a.setenv)?.into_iter().collect();
    Ok(JobSpec {
        target,
        task: Task::Exec(CommandLine::from_words(a.cmd.clone())),
        workdir: a.workdir.clone(),
        env_vars,
        timeout_secs: a.timeout,
        on_disconnect: on_disconnect(a.cancel_after_disconnect),
    })
}

/// Largest eval script read from a file or stdin (a protocol message holds at most 16 MiB).
const MAX_CODE_BYTES: u64 = 4 << 20;

/// Builds the job spec of `eval` arguments: code from the argument, `--file` or stdin (`-`).
pub(crate) fn eval_spec(a: &EvalArgs) -> Result<JobSpec> {
    let target = target(&a.target)?;
    let code = match (&a.file, a.code.as_deref()) {
        (Some(path), _) => cla_common::util::read_capped(path, MAX_CODE_BYTES, "script")?,
        (None, Some("-")) => {
            let mut code = String::new();
            std::io::stdin()
                .take(MAX_CODE_BYTES + 1)
                .read_to_string(&mut code)?;
            if code.len() as u64 > MAX_CODE_BYTES {
                return Err(Error::Usage(format!(
                    "the script on stdin is larger than {}: pass a smaller one",
                    cla_common::util::human_bytes(MAX_CODE_BYTES)
                )));
            }
            code
        }
        (None, Some(code)) => code.to_owned(),
        (None, None) => {
            return Err(Error::Usage(
                "eval needs code: CODE, --file FILE, or - for stdin".into(),
            ));
        }
    };
    let stash = match &a.stash {
        None => serde_json::Value::Null,
        Some(text) => {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| Error::Usage(format!("--stash is not JSON: {e}")))?;
            if !v.is_object() {
                return Err(Error::Usage(
                    "--stash must be a JSON object, like '{\"name\": 1}'".into(),
                ));
            }
            v
        }
    };
    Ok(JobSpec {
        target,
        task: Task::Eval(EvalTask { code, stash }),
        workdir: None,
        env_vars: BTreeMap::new(),
        timeout_secs: a.timeout,
        on_disconnect: Default::default(),
    })
}

/// Streams a job to its end: stdout bytes to `stdout_sink`, stderr bytes to stderr. First Ctrl-C asks
/// the hub to cancel (the worker kills the tree) and keeps waiting for the end; a second one stops
/// waiting (`None`), saying how to follow the job on. `job` is `Some` to follow an existing job.
async fn stream(
    c: &AdminClient,
    what: Stream<'_>,
    reconnect_for: Duration,
    mut stdout_sink: impl Write,
) -> Result<Option<JobRecord>> {
    // Ctrl-C on a job this command created cancels it; on one it only follows, it stops following.
    let (cancel, give_up, signals) = match what {
        Stream::New(_) => super::on_ctrl_c("cancelling the job"),
        Stream::Existing(_) => {
            let give_up = tokio_util::sync::CancellationToken::new();
            let g = give_up.clone();
            let task = tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    g.cancel();
                }
            });
            (tokio_util::sync::CancellationToken::new(), give_up, task)
        }
    };
    let mut job_id = String::new();
    let on_event = |ev| match ev {
        ExecEvent::Stdout(b) => {
            let _ = stdout_sink.write_all(&b);
            let _ = stdout_sink.flush();
        }
        ExecEvent::Stderr(b) => {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(&b);
            let _ = e.flush();
        }
        ExecEvent::Created(id) => {
            tracing::debug!(job = %id, "job created");
            job_id = id;
        }
        ExecEvent::Waiting(why) => super::waiting(&why),
        ExecEvent::Started { worker, .. } => tracing::debug!(%worker, "job started"),
        ExecEvent::Reconnecting { job, why, attempt } => {
            // Said once, then every 10th attempt: a restart is short, a long outage should not flood.
            if attempt == 1 || attempt % 10 == 0 {
                eprintln!(
                    "cla-hub: lost the connection to the hub ({}); reconnecting to follow job {job}",
                    cla_common::util::one_line(&why, 300)
                );
            }
        }
        ExecEvent::Missing { stream, bytes } => eprintln!(
            "cla-hub: {bytes} bytes of {} sent while the connection was down are missing here (past the hub's per-job output cap)",
            if stream == cla_protocol::api::STDOUT_STREAM {
                "stdout"
            } else {
                "stderr"
            },
        ),
    };
    let streaming = async {
        match what {
            Stream::New(spec) => c.exec(spec, cancel, reconnect_for, on_event).await,
            Stream::Existing(id) => c.follow(id, cancel, reconnect_for, on_event).await,
        }
    };
    let record = tokio::select! {
        r = streaming => Some(r?),
        _ = give_up.cancelled() => None,
    };
    signals.abort();
    if record.is_none() {
        let id = match what {
            Stream::New(_) => job_id.as_str(),
            Stream::Existing(id) => id,
        };
        if !id.is_empty() {
            eprintln!(
                "cla-hub: stopped waiting; job {id} may go on: `cla-hub job logs {id} --follow` follows it"
            );
        }
    }
    Ok(record)
}

/// What [`stream`] follows.
#[derive(Clone, Copy)]
enum Stream<'a> {
    /// A job it creates.
    New(&'a JobSpec),
    /// A job that exists (`job logs --follow`).
    Existing(&'a str),
}

pub(crate) async fn exec(
    c: &AdminClient,
    spec: JobSpec,
    detach: bool,
    reconnect_for: Duration,
    json: bool,
) -> Result<ExitCode> {
    if detach {
        let r = c.submit(&spec).await?;
        println!("{}", r.id);
        return Ok(ExitCode::Success);
    }
    let t0 = std::time::Instant::now();
    let Some(record) = stream(c, Stream::New(&spec), reconnect_for, std::io::stdout()).await? else {
        return Ok(ExitCode::Interrupted);
    };
    if json {
        print_json(&record)?;
    }
    let code = exit_of(&record);
    if std::io::stderr().is_terminal() && !json {
        summary_line(&record, code, t0.elapsed());
    }
    Ok(code)
}

/// The last line of `exec` on a terminal: where it ran, its exit code, how long it took.
fn summary_line(r: &JobRecord, code: ExitCode, took: Duration) {
    let took = if took < Duration::from_secs(1) {
        format!("{} ms", took.as_millis())
    } else {
        format!("{:.1} s", took.as_secs_f64())
    };
    eprintln!(
        "cla-hub: [{}, exit {}, {took}]",
        r.worker.as_deref().unwrap_or("no worker"),
        code.code()
    );
}

/// `eval`: console output goes to stderr as it is logged; the result (or with `--json` the whole
/// `{result, stash, console, error}`) to stdout. A JavaScript error exits 1.
pub(crate) async fn eval(c: &AdminClient, spec: JobSpec, json: bool) -> Result<ExitCode> {
    let Some(record) = stream(
        c,
        Stream::New(&spec),
        cla_client::RECONNECT_FOR,
        std::io::stderr(),
    )
    .await?
    else {
        return Ok(ExitCode::Interrupted);
    };
    let Some(out) = &record.eval else {
        return Ok(exit_of(&record));
    };
    if json {
        print_json(out)?;
    } else if out.error.is_none() {
        print_json(&out.result)?;
    }
    if let Some(e) = &out.error {
        if !json {
            // The message and stack come from the script: shown escaped, a line each.
            eprintln!(
                "cla-hub: eval failed on {}: {}",
                record.worker.as_deref().unwrap_or("-"),
                cla_common::util::one_line(&e.message, 2000)
            );
            for frame in &e.stack {
                eprintln!("    {}", cla_common::util::one_line(frame, 500));
            }
        }
        return Ok(ExitCode::Failure);
    }
    Ok(ExitCode::Success)
}

/// The exit code a job's record maps to: the remote status, 124 timed out, 130 cancelled, 253 timed out
/// in the queue, 255 could not run or lost.
pub(crate) fn exit_code(r: &JobRecord) -> ExitCode {
    match (r.state, r.rc) {
        (JobState::Succeeded, _) => ExitCode::Success,
        (JobState::Failed, Some(rc)) => ExitCode::Remote(rc.clamp(0, 255) as u8),
        (JobState::TimedOut, _) if r.timed_out_in_queue() => ExitCode::QueueTimeout,
        (JobState::TimedOut, _) => ExitCode::TimedOut,
        (JobState::Cancelled, _) => ExitCode::Interrupted,
        _ => ExitCode::CouldNotRun,
    }
}

/// The RC column: the exit code `exec` and `job show --wait` give for the job (124 for a timeout, not the
/// status of the killed process), `-` while it has not ended.
fn rc_cell(r: &JobRecord) -> String {
    match r.state.is_terminal() {
        true => exit_code(r).code().to_string(),
        false => "-".into(),
    }
}

/// [`exit_code`], with a line on stderr when the job did not end with an exit status of its own.
pub(crate) fn exit_of(r: &JobRecord) -> ExitCode {
    // The error may come from the worker: shown escaped, on one line.
    let why = cla_common::util::one_line(r.error.as_deref().unwrap_or(""), 2000);
    let code = exit_code(r);
    match code {
        ExitCode::Success | ExitCode::Remote(_) => {}
        ExitCode::QueueTimeout => eprintln!("cla-hub: job {} {why}", r.id),
        ExitCode::TimedOut => eprintln!("cla-hub: job {} {why}: its process tree was killed", r.id),
        ExitCode::Interrupted => eprintln!("cla-hub: job {} cancelled", r.id),
        _ => eprintln!("cla-hub: job {} {}: {why}", r.id, r.state.as_str()),
    }
    code
}

pub(crate) async fn list(c: &AdminClient, a: JobsArgs, json: bool) -> Result<ExitCode> {
    let since = a.since.as_deref().map(since).transpose()?;
    let q = cla_protocol::api::JobQuery {
        state: a.state.map(|s| s.as_str().to_owned()),
        worker: a.worker.clone(),
        since,
        limit: Some(a.limit),
    };
    let js = c.jobs(&q).await?;
    let output = match (a.output, json) {
        (Some(o), _) => o,
        (None, true) => Output::Json,
        (None, false) => Output::Table,
    };
    if a.quiet {
        for j in &js {
            println!("{}", j.id);
        }
        return Ok(ExitCode::Success);
    }
    match output {
        Output::Json => print_json(&js)?,
        Output::Yaml => print!(
            "{}",
            serde_saphyr::to_string(&js).map_err(|e| Error::Other(format!("cannot print YAML: {e}")))?
        ),
        Output::Table | Output::Wide => {
            let text = table_at(&js, output == Output::Wide, std::time::SystemTime::now());
            let text = match a.no_headers {
                true => text.split_once('\n').map_or("", |(_, rest)| rest),
                false => &text,
            };
            print!("{text}");
        }
    }
    Ok(ExitCode::Success)
}

/// `--since`: an age (`30m`, `2h`, `7d`) back from now, or an RFC 3339 time, as the RFC 3339 time the
/// API takes.
fn since(text: &str) -> Result<String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(humantime::format_rfc3339_seconds(t).to_string());
    }
    let age = humantime::parse_duration(text).map_err(|_| {
        Error::Usage(format!(
            "--since `{text}`: give an age like 30m, 2h or 7d, or a time like 2026-12-07T10:00:00Z"
        ))
    })?;
    let t = std::time::SystemTime::now()
        .checked_sub(age)
        .ok_or_else(|| Error::Usage(format!("--since `{text}` reaches before 1970")))?;
    Ok(humantime::format_rfc3339_seconds(t).to_string())
}

/// How long ago an RFC 3339 time was, in its largest unit (`45s`, `12m`, `3h`, `2d`); `-` if unreadable.
fn age(time: &str, now: std::time::SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339(time) else {
        return "-".into();
    };
    let secs = now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// How long a job ran (or has run so far), `-` before it started.
fn duration(r: &JobRecord, now: std::time::SystemTime) -> String {
    let Some(start) = r
        .started
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
    else {
        return "-".into();
    };
    let end = r
        .ended
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .unwrap_or(now);
    let secs = end.duration_since(start).map(|d| d.as_secs()).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The `jobs` table: one row per job, the first line of its command, the exit code `exec` gives.
pub(crate) fn table(js: &[JobRecord]) -> String {
    table_at(js, false, std::time::SystemTime::now())
}

/// [`table`] at `now`; `wide` adds the times and the note whole.
fn table_at(js: &[JobRecord], wide: bool, now: std::time::SystemTime) -> String {
    let rows: Vec<_> = js
        .iter()
        .map(|j| {
            let note = or_dash(j.waiting.clone().or_else(|| j.error.clone()).unwrap_or_default());
            let mut row = vec![
                j.id.clone(),
                j.state.as_str().to_owned(),
                or_dash(j.worker.clone().unwrap_or_default()),
                rc_cell(j),
                age(&j.created, now),
                first_line(&j.spec.task.display()),
            ];
            if wide {
                row.extend([
                    j.created.clone(),
                    or_dash(j.started.clone().unwrap_or_default()),
                    duration(j, now),
                    j.spec.target.describe(),
                ]);
            }
            row.push(note);
            row
        })
        .collect();
    let headers: &[&str] = match wide {
        false => &["ID", "STATE", "WORKER", "RC", "AGE", "COMMAND", "NOTE"],
        true => &[
            "ID", "STATE", "WORKER", "RC", "AGE", "COMMAND", "CREATED", "STARTED", "DURATION", "TARGET",
            "NOTE",
        ],
    };
    render(headers, &rows)
}

pub(crate) async fn job(c: &AdminClient, cmd: JobCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        JobCommand::Show { id, wait } => {
            let r = if wait {
                c.wait(&id, cla_client::RECONNECT_FOR).await?
            } else {
                c.job(&id).await?
            };
            if json {
                print_json(&r)?;
            } else {
                println!("job      {}", r.id);
                println!("state    {}", r.state.as_str());
                println!("worker   {}", r.worker.as_deref().unwrap_or("-"));
                println!("task     {}", r.spec.task.display());
                // The exit code `exec` gives for the job (124 for a timeout, not the killed process's).
                println!("rc       {}", rc_cell(&r));
                println!("created  {}", r.created);
                println!("started  {}", r.started.as_deref().unwrap_or("-"));
                println!("ended    {}", r.ended.as_deref().unwrap_or("-"));
                if let Some(w) = &r.waiting {
                    println!("waiting  {}", cla_common::util::one_line(w, 2000));
                }
                if let Some(e) = &r.error {
                    println!("error    {}", cla_common::util::one_line(e, 2000));
                }
                for (name, text, cut) in [
                    ("stdout", &r.stdout, r.stdout_truncated),
                    ("stderr", &r.stderr, r.stderr_truncated),
                ] {
                    if !text.is_empty() {
                        println!("--- {name}{}", if cut { " (truncated)" } else { "" });
                        print!("{text}");
                        if !text.ends_with('\n') {
                            println!();
                        }
                    }
                }
            }
            Ok(if wait { exit_code(&r) } else { ExitCode::Success })
        }
        JobCommand::Logs { id, follow: true } => {
            let Some(r) = stream(
                c,
                Stream::Existing(&id),
                cla_client::RECONNECT_FOR,
                std::io::stdout(),
            )
            .await?
            else {
                return Ok(ExitCode::Interrupted);
            };
            if json {
                print_json(&r)?;
            }
            Ok(exit_of(&r))
        }
        JobCommand::Logs { id, follow: false } => {
            let r = c.job(&id).await?;
            if json {
                print_json(&serde_json::json!({
                    "id": r.id,
                    "stdout": r.stdout,
                    "stderr": r.stderr,
                    "stdout_truncated": r.stdout_truncated,
                    "stderr_truncated": r.stderr_truncated,
                }))?;
                return Ok(ExitCode::Success);
            }
            std::io::stdout().write_all(r.stdout.as_bytes())?;
            std::io::stdout().flush()?;
            std::io::stderr().write_all(r.stderr.as_bytes())?;
            for (name, cut, total) in [
                ("stdout", r.stdout_truncated, r.stdout_bytes),
                ("stderr", r.stderr_truncated, r.stderr_bytes),
            ] {
                if cut {
                    eprintln!(
                        "cla-hub: job {}'s {name} was {total} bytes; the hub kept the first {} (its per-job output cap)",
                        r.id,
                        if name == "stdout" {
                            r.stdout.len()
                        } else {
                            r.stderr.len()
                        }
                    );
                }
            }
            if !r.state.is_terminal() {
                eprintln!(
                    "cla-hub: job {} is {}: `cla-hub job logs {} --follow` follows it",
                    r.id,
                    r.state.as_str(),
                    r.id
                );
            }
            Ok(ExitCode::Success)
        }
        JobCommand::Cancel { id } => {
            let r = c.cancel(&id).await?;
            if json {
                print_json(&r)?;
            } else if r.state.is_terminal() {
                println!("job {} {}", r.id, r.state.as_str());
            } else {
                println!(
                    "cancel requested for job {} ({} on {})",
                    r.id,
                    r.state.as_str(),
                    r.worker.as_deref().unwrap_or("-")
                );
            }
            Ok(ExitCode::Success)
        }
    }
}
