//! `eval`: run JavaScript in a child process of this executable (see `crate::eval` for why), stream its
//! console output as it is logged, and return its result, stash and errors. A timeout or cancel kills
//! the child's whole process tree (including commands started with `cla.run`); the worker is unaffected.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::exec::{ExecCtx, PIPE_LINGER, scrub_env};
use super::process::{Ending, drain, exit_status, own_group, supervise};
use super::session::Out;
use crate::eval::child::{CHILD_ENV, ChildLine};
use crate::eval::{DEFAULT_TIMEOUT_MS, EvalInput, EvalLimits, WorkerInfo};
use crate::protocol::{ConsoleLine, EvalOutput, EvalRequest, JobResult, Outcome};

/// Child stderr read for the error message when the child dies (its first line is reported).
const STDERR_TAIL: usize = 4096;

/// How a console line is streamed: `log` lines as they are, other levels prefixed.
fn render(line: &ConsoleLine) -> String {
    match line.level.as_str() {
        "log" => format!("{}\n", line.text),
        level => format!("[{level}] {}\n", line.text),
    }
}

/// Runs one eval request to its end.
pub(crate) async fn handle(req: EvalRequest, ctx: &ExecCtx, cancel: CancellationToken) -> JobResult {
    let start = Instant::now();
    let result = |outcome, rc, error, eval| JobResult {
        job: req.job.clone(),
        outcome,
        rc,
        signal: None,
        duration_ms: start.elapsed().as_millis() as u64,
        error,
        eval,
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return result(
                Outcome::Error,
                None,
                Some(format!("cannot find the worker executable: {e}")),
                None,
            );
        }
    };
    let input = EvalInput {
        code: req.code.clone(),
        stash: req.stash.clone(),
        worker: WorkerInfo {
            id: ctx.worker_id.clone(),
            tags: ctx.tags.clone(),
            envs: ctx.envs.clone(),
        },
        limits: EvalLimits::default(),
    };
    let mut cmd = Command::new(exe);
    scrub_env(&mut cmd);
    cmd.env(CHILD_ENV, "1")
        // A dying child's first stderr line is the message we report; keep backtraces out of it.
        .env("RUST_BACKTRACE", "0")
        .envs(ctx.env(&req.job))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = ctx.workdir.as_ref().filter(|d| d.is_dir()) {
        cmd.current_dir(dir);
    }
    own_group(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return result(
                Outcome::Error,
                None,
                Some(format!("cannot start the eval process: {e}")),
                None,
            );
        }
    };
    ctx.started(&req.job, child.id()).await;

    let request = serde_json::to_vec(&input).expect("eval input serializes");
    let mut stdin = child.stdin.take().expect("piped");
    let feeder = tokio::spawn(async move {
        let _ = stdin.write_all(&request).await;
        // Dropping stdin closes it: the child reads to EOF.
    });
    let (out, stream) = (ctx.out.clone(), req.stdout);
    let stdout = child.stdout.take().expect("piped");
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut done = None;
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ChildLine>(&line) {
                Ok(ChildLine::Console(c)) => {
                    let _ = out.send(Out::Data(stream, render(&c).into_bytes().into())).await;
                }
                Ok(ChildLine::Done(o)) => done = Some(*o),
                Err(e) => tracing::warn!("unreadable line from the eval process: {e}"),
            }
        }
        done
    });
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(STDERR_TAIL as u64).read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_owned()
    });

    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS));
    let (ending, status) = supervise(&mut child, &cancel, || {
        (start.elapsed() >= timeout).then(|| format!("timed out after {}s", timeout.as_secs_f64()))
    })
    .await;
    feeder.abort();
    let output: Option<EvalOutput> = drain([reader], PIPE_LINGER).await.pop().flatten().flatten();
    let stderr_tail = drain([errors], Duration::from_millis(200))
        .await
        .pop()
        .flatten()
        .unwrap_or_default();
    match (ending, output) {
        (Ending::Cancelled, _) => result(Outcome::Cancelled, None, Some("cancelled".into()), None),
        (Ending::TimedOut(why), _) => result(Outcome::TimedOut, None, Some(why), None),
        (Ending::Exited(_), Some(o)) => match &o.error {
            None => result(Outcome::Succeeded, Some(0), None, Some(o)),
            Some(e) => result(Outcome::Failed, Some(1), Some(e.message.clone()), Some(o)),
        },
        (_, _) => {
            let how = match status.map(exit_status) {
                Some((_, Some(sig))) => format!("killed by signal {sig}"),
                Some((Some(rc), None)) => format!("exit status {rc}"),
                _ => "no exit status".to_owned(),
            };
            let detail = if stderr_tail.is_empty() {
                String::new()
            } else {
                format!(": {stderr_tail}")
            };
            result(
                Outcome::Error,
                None,
                Some(format!("the eval process ended without a result ({how}){detail}")),
                None,
            )
        }
    }
}
