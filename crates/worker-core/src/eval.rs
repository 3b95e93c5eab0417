//! `eval`: run JavaScript in a child process of this executable (see `cla_eval` for why), stream its
//! console output as it is logged, and return its result, stash and errors. A timeout or cancel kills
//! the child's whole process tree (including commands started with `cla.run`); the worker is unaffected.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::exec::{ExecCtx, PIPE_LINGER, scrub_env};
use super::journal::{Journal, Stream};
use cla_common::process::{Ending, drain, exit_status, spawn_tree, supervise};
use cla_eval::child::{CHILD_ENV, ChildLine};
use cla_eval::{DEFAULT_TIMEOUT_MS, EvalInput, EvalLimits, WorkerInfo};
use cla_protocol::{ConsoleLine, EvalOutput, EvalRequest, JobResult, Outcome};

/// Child stderr read for the error message when the child dies (its first line is reported).
const STDERR_TAIL: usize = 4096;

/// Largest frame of streamed console output.
const FRAME: usize = 64 * 1024;

/// How long to wait for the child's last output after it exited normally.
const READ_WAIT: Duration = Duration::from_secs(60);

/// Largest eval outcome sent to the hub: well under the 16 MiB message limit (the limits in
/// `EvalLimits` keep a normal outcome far below this; this is the guard if they add up).
const MAX_OUTPUT_MESSAGE: usize = 12 << 20;

fn message_size(o: &EvalOutput) -> usize {
    serde_json::to_vec(o).map(|v| v.len()).unwrap_or(usize::MAX)
}

/// How a console line is streamed: `log` lines as they are, other levels prefixed.
fn render(line: &ConsoleLine) -> String {
    match line.level.as_str() {
        "log" => format!("{}\n", line.text),
        level => format!("[{level}] {}\n", line.text),
    }
}

fn own_executable() -> std::io::Result<std::path::PathBuf> {
    #[cfg(target_os = "linux")]
    {
        let proc_exe = std::path::PathBuf::from("/proc/self/exe");
        if proc_exe.exists() {
            return Ok(proc_exe);
        }
    }
    std::env::current_exe()
}

/// Runs one eval request to its end.
pub(crate) async fn handle(
    req: EvalRequest,
    ctx: &ExecCtx,
    journal: Arc<Journal>,
    cancel: CancellationToken,
) -> JobResult {
    let start = Instant::now();
    let result = |outcome, rc, error, eval| JobResult {
        job: req.job.clone(),
        outcome,
        rc,
        signal: None,
        duration_ms: start.elapsed().as_millis() as u64,
        error,
        code: None,
        eval,
        transfer: None,
        output_bytes: None,
    };
    // On Linux, /proc/self/exe still reaches this binary after it was replaced on disk by an upgrade
    // (current_exe() would then name a deleted path).
    let exe = match own_executable() {
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
        policy: (*ctx.policy).clone(),
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
    let mut tree = match spawn_tree(&mut cmd) {
        Ok(t) => t,
        Err(e) => {
            return result(
                Outcome::Error,
                None,
                Some(format!("cannot start the eval process: {e}")),
                None,
            );
        }
    };
    journal.started(tree.child.id()).await;

    let request = serde_json::to_vec(&input).expect("eval input serializes");
    let mut stdin = tree.child.stdin.take().expect("piped");
    let feeder = tokio::spawn(async move {
        let _ = stdin.write_all(&request).await;
        // Dropping stdin closes it: the child reads to EOF.
    });
    let out = journal.clone();
    let masks = ctx.masks.clone();
    let stdout = tree.child.stdout.take().expect("piped");
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut done = None;
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ChildLine>(&line) {
                Ok(ChildLine::Console(mut c)) => {
                    c.text = masks.text(&c.text);
                    // In frames of at most 64 KiB, like exec output: a huge line never makes a huge message.
                    let bytes = bytes::Bytes::from(render(&c).into_bytes());
                    for start in (0..bytes.len()).step_by(FRAME) {
                        out.output(Stream::Stdout, bytes.slice(start..bytes.len().min(start + FRAME)))
                            .await;
                    }
                }
                Ok(ChildLine::Done(o)) => done = Some(*o),
                Err(e) => tracing::warn!("unreadable line from the eval process: {e}"),
            }
        }
        done
    });
    let mut stderr = tree.child.stderr.take().expect("piped");
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
    let (ending, status) = supervise(&mut tree, &cancel, || {
        (start.elapsed() >= timeout).then(|| format!("timed out after {}s", timeout.as_secs_f64()))
    })
    .await;
    feeder.abort();
    // Nothing but the child holds its stdout (`cla.run` gives commands pipes of their own), so after a normal
    // exit the reader ends at EOF: wait for it — forwarding console lines may be slow when the hub is — rather
    // than lose the result. After a kill, only a short wait.
    let wait = if matches!(ending, Ending::Exited(_)) {
        READ_WAIT
    } else {
        PIPE_LINGER
    };
    let output: Option<EvalOutput> = drain([reader], wait).await.pop().flatten().flatten();
    let stderr_tail = drain([errors], Duration::from_millis(200))
        .await
        .pop()
        .flatten()
        .unwrap_or_default();
    match (ending, output) {
        (Ending::Cancelled, _) => result(Outcome::Cancelled, None, Some("cancelled".into()), None),
        (Ending::TimedOut(why), _) => result(Outcome::TimedOut, None, Some(why), None),
        (Ending::Exited(_), Some(o)) if message_size(&o) > MAX_OUTPUT_MESSAGE => {
            let why = format!(
                "the eval's output is {} bytes, over the {MAX_OUTPUT_MESSAGE}-byte limit",
                message_size(&o)
            );
            result(Outcome::Failed, Some(1), Some(why), None)
        }
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

/// Masks the secrets in an eval's output: its result and stash (every string), console lines and error.
pub(crate) fn mask_output(masks: &cla_common::mask::Masks, o: &mut EvalOutput) {
    if masks.is_empty() {
        return;
    }
    masks.json(&mut o.result);
    masks.json(&mut o.stash);
    for line in &mut o.console {
        line.text = masks.text(&line.text);
    }
    if let Some(e) = o.error.as_mut() {
        e.message = masks.text(&e.message);
        for frame in &mut e.stack {
            *frame = masks.text(frame);
        }
    }
}
