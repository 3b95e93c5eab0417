//! `exec`: run a command, stream its stdout and stderr separately as they come, enforce its timeouts,
//! and report how it ended. Cancels and timeouts kill the whole process tree.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::journal::{Journal, Stream};
use super::session::Out;
use cla_common::process::{Ending, drain_while_moving, exit_status, shell, spawn_tree, supervise};
use cla_protocol::{CommandLine, ExecRequest, JobResult, Outcome};

/// Read size for output pipes: large enough for throughput, and a read returns as soon as any bytes
/// are there, so small writes are not held back.
const CHUNK: usize = 64 * 1024;

/// After the main process exits, how long to keep reading pipes that background processes hold open.
pub(crate) const PIPE_LINGER: Duration = Duration::from_secs(2);

/// Variables of the worker's own environment that jobs must not inherit: credentials (the docs suggest
/// passing the token this way to keep it out of `ps`) and the eval child marker.
const SCRUBBED_ENV: &[&str] = &[
    "CLA_WORKER_TOKEN",
    "CLA_WORKER_PASSKEY",
    "CLA_HUB_TOKEN",
    cla_eval::child::CHILD_ENV,
];

/// Removes [`SCRUBBED_ENV`] from what a child process inherits.
pub(crate) fn scrub_env(cmd: &mut Command) {
    for name in SCRUBBED_ENV {
        cmd.env_remove(name);
    }
}

/// What a job needs from its worker.
#[derive(Clone)]
pub(crate) struct ExecCtx {
    pub worker_id: String,
    pub hub_url: String,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    pub workdir: Option<PathBuf>,
    pub out: mpsc::Sender<Out>,
    /// Where the session delivers the pieces of running transfers.
    pub routes: super::transfer::Routes,
    /// The local policy (eval hands it to its child, for the host API).
    pub policy: std::sync::Arc<cla_config::policy::Enforcer>,
    /// The secrets masked in job output.
    pub masks: cla_common::mask::Masks,
}

impl ExecCtx {
    /// The variables every job gets, before the request's own.
    pub(crate) fn env(&self, job: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("CLA_WORKER_ID".to_owned(), self.worker_id.clone()),
            ("CLA_JOB_ID".to_owned(), job.to_owned()),
            ("CLA_HUB_URL".to_owned(), self.hub_url.clone()),
            ("CLA_WORKER_TAGS".to_owned(), self.tags.join(",")),
            ("CLA_WORKER_ENVS".to_owned(), self.envs.join(",")),
        ])
    }
}

/// Runs one exec request to its end.
pub(crate) async fn handle(
    req: ExecRequest,
    ctx: &ExecCtx,
    journal: Arc<Journal>,
    cancel: CancellationToken,
) -> JobResult {
    let start = Instant::now();
    let result = |outcome, rc, signal, error| JobResult {
        job: req.job.clone(),
        outcome,
        rc,
        signal,
        duration_ms: start.elapsed().as_millis() as u64,
        error,
        code: None,
        eval: None,
        transfer: None,
        output_bytes: None,
    };
    let mut cmd = match &req.command {
        CommandLine::Shell { cmd } => Command::from(shell(cmd)),
        CommandLine::Argv { argv } => {
            let Some((program, args)) = argv.split_first() else {
                return result(
                    Outcome::Error,
                    None,
                    None,
                    Some("empty argv: nothing to run".into()),
                );
            };
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    let workdir = req
        .workdir
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| ctx.workdir.clone());
    if let Some(dir) = &workdir {
        if !dir.is_dir() {
            let msg = format!(
                "workdir {} does not exist on worker {}",
                dir.display(),
                ctx.worker_id
            );
            return result(Outcome::Error, None, None, Some(msg));
        }
        cmd.current_dir(dir);
    }
    scrub_env(&mut cmd);
    cmd.envs(ctx.env(&req.job))
        .envs(&req.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut tree = match spawn_tree(&mut cmd) {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("cannot run `{}`: {e}", req.command.display());
            return result(Outcome::Error, None, None, Some(msg));
        }
    };
    journal.started(tree.child.id()).await;

    let last_output = Arc::new(AtomicU64::new(0));
    // Each stream's masker outlives its pump: a pump cut off after the linger (a background process
    // holding the pipe open) may hold back the start of what could be a secret, sent after the drain.
    let maskers = [Stream::Stdout, Stream::Stderr].map(|s| (s, Arc::new(Mutex::new(ctx.masks.stream()))));
    let spawn_pump = |pipe: Box<dyn AsyncRead + Unpin + Send>, i: usize| {
        let (stream, masker) = (maskers[i].0, maskers[i].1.clone());
        tokio::spawn(pump(
            pipe,
            stream,
            journal.clone(),
            start,
            last_output.clone(),
            masker,
        ))
    };
    let pumps = [
        spawn_pump(Box::new(tree.child.stdout.take().expect("piped")), 0),
        spawn_pump(Box::new(tree.child.stderr.take().expect("piped")), 1),
    ];

    let timeout = req.timeout_ms.map(Duration::from_millis);
    let output_timeout = req.output_timeout_ms.map(Duration::from_millis);
    let silent_for = || {
        start
            .elapsed()
            .saturating_sub(Duration::from_millis(last_output.load(Ordering::Relaxed)))
    };
    let (ending, status) = supervise(&mut tree, &cancel, || {
        if let Some(t) = timeout.filter(|t| start.elapsed() >= *t) {
            return Some(format!("timed out after {}", secs(t)));
        }
        output_timeout
            .filter(|t| silent_for() >= *t)
            .map(|t| format!("no output for {}", secs(t)))
    })
    .await;
    let (outcome, error) = match ending {
        Ending::Exited(s) if s.success() => (Outcome::Succeeded, None),
        Ending::Exited(_) => (Outcome::Failed, None),
        Ending::Cancelled => (Outcome::Cancelled, Some("cancelled".to_owned())),
        Ending::TimedOut(why) => (Outcome::TimedOut, Some(why)),
        Ending::WaitFailed(why) => (Outcome::Error, Some(why)),
    };
    // The linger counts from the pumps' last progress: output held back by a slow connection is not cut
    // off, a pipe held open by a silent background process is.
    let moved = last_output.clone();
    let base = tokio::time::Instant::from_std(start);
    drain_while_moving(pumps, PIPE_LINGER, || {
        base + Duration::from_millis(moved.load(Ordering::Relaxed))
    })
    .await;
    for (stream, masker) in &maskers {
        let rest = masker.lock().expect("masker lock").finish();
        if !rest.is_empty() {
            journal.output(*stream, Bytes::from(rest)).await;
        }
    }
    let (rc, signal) = status.map(exit_status).unwrap_or((None, None));
    result(outcome, rc, signal, error)
}

/// Copies a pipe into the job's journal (which sends it on to the hub) until EOF, masking secrets on the
/// way (a possible start of one is held back until the next read shows whether it is one).
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    stream: Stream,
    journal: Arc<Journal>,
    start: Instant,
    last: Arc<AtomicU64>,
    masker: Arc<Mutex<cla_common::mask::StreamMasker>>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let rest = masker.lock().expect("masker lock").finish();
                if !rest.is_empty() {
                    journal.output(stream, Bytes::from(rest)).await;
                }
                return;
            }
            Ok(n) => {
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                let out = masker.lock().expect("masker lock").push(&buf[..n]);
                if !out.is_empty() {
                    journal.output(stream, Bytes::from(out)).await;
                }
                // Handed on: progress too (the pipe linger counts from here).
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}
