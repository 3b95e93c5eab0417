//! The job verbs of `cla-hub`: `exec`, `eval`, `jobs`, `job show|cancel`, and the exit codes jobs map to.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::hub::{EvalArgs, ExecArgs, JobCommand, JobsArgs, TargetArgs};
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
/// waiting (`None`).
async fn stream(c: &AdminClient, spec: &JobSpec, mut stdout_sink: impl Write) -> Result<Option<JobRecord>> {
    let (cancel, give_up, signals) = super::on_ctrl_c("cancelling the job");
    let streaming = c.exec(spec, cancel, |ev| match ev {
        ExecEvent::Stdout(b) => {
            let _ = stdout_sink.write_all(&b);
            let _ = stdout_sink.flush();
        }
        ExecEvent::Stderr(b) => {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(&b);
            let _ = e.flush();
        }
        ExecEvent::Created(id) => tracing::debug!(job = %id, "job created"),
        ExecEvent::Waiting(why) => super::waiting(&why),
        ExecEvent::Started { worker, .. } => tracing::debug!(%worker, "job started"),
    });
    let record = tokio::select! {
        r = streaming => Some(r?),
        _ = give_up.cancelled() => None,
    };
    signals.abort();
    Ok(record)
}

pub(crate) async fn exec(c: &AdminClient, spec: JobSpec, detach: bool, json: bool) -> Result<ExitCode> {
    if detach {
        let r = c.submit(&spec).await?;
        println!("{}", r.id);
        return Ok(ExitCode::Success);
    }
    let Some(record) = stream(c, &spec, std::io::stdout()).await? else {
        return Ok(ExitCode::Interrupted);
    };
    if json {
        print_json(&record)?;
    }
    Ok(exit_of(&record))
}

/// `eval`: console output goes to stderr as it is logged; the result (or with `--json` the whole
/// `{result, stash, console, error}`) to stdout. A JavaScript error exits 1.
pub(crate) async fn eval(c: &AdminClient, spec: JobSpec, json: bool) -> Result<ExitCode> {
    let Some(record) = stream(c, &spec, std::io::stderr()).await? else {
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

/// The exit code a job's record maps to: the remote status, 124 timed out, 130 cancelled,
/// 255 could not run or lost.
pub(crate) fn exit_code(r: &JobRecord) -> ExitCode {
    match (r.state, r.rc) {
        (JobState::Succeeded, _) => ExitCode::Success,
        (JobState::Failed, Some(rc)) => ExitCode::Remote(rc.clamp(0, 255) as u8),
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
        ExitCode::TimedOut if r.started.is_none() => eprintln!("cla-hub: job {} {why}", r.id),
        ExitCode::TimedOut => eprintln!("cla-hub: job {} {why}: its process tree was killed", r.id),
        ExitCode::Interrupted => eprintln!("cla-hub: job {} cancelled", r.id),
        _ => eprintln!("cla-hub: job {} {}: {why}", r.id, r.state.as_str()),
    }
    code
}

pub(crate) async fn list(c: &AdminClient, a: JobsArgs, json: bool) -> Result<ExitCode> {
    let js = c.jobs(a.state).await?;
    if json {
        print_json(&js)?;
        return Ok(ExitCode::Success);
    }
    print!("{}", table(&js));
    Ok(ExitCode::Success)
}

/// The `jobs` table: one row per job, the first line of its command, the exit code `exec` gives.
pub(crate) fn table(js: &[JobRecord]) -> String {
    let rows: Vec<_> = js
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.state.as_str().to_owned(),
                or_dash(j.worker.clone().unwrap_or_default()),
                rc_cell(j),
                j.created.clone(),
                first_line(&j.spec.task.display()),
                or_dash(j.waiting.clone().or_else(|| j.error.clone()).unwrap_or_default()),
            ]
        })
        .collect();
    render(
        &["ID", "STATE", "WORKER", "RC", "CREATED", "COMMAND", "NOTE"],
        &rows,
    )
}

pub(crate) async fn job(c: &AdminClient, cmd: JobCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        JobCommand::Show { id, wait } => {
            let r = if wait {
                c.wait(&id).await?
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
                println!(
                    "rc       {}",
                    r.rc.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
                );
                println!("created  {}", r.created);
                println!("started  {}", r.started.as_deref().unwrap_or("-"));
                println!("ended    {}", r.ended.as_deref().unwrap_or("-"));
                if let Some(w) = &r.waiting {
                    println!("waiting  {w}");
                }
                if let Some(e) = &r.error {
                    println!("error    {e}");
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
