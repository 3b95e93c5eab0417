//! The hub's HTTP JSON API types: registration (`/api/v1/register`, `/api/v1/unregister`), the admin API
//! (`/api/v1/admin/...`) and the admin exec stream (`/api/v1/admin/exec`, a WebSocket whose text frames are
//! [`AdminRequest`] / [`AdminEvent`] and whose binary frames carry the job's stdout ([`STDOUT_STREAM`]) and
//! stderr ([`STDERR_STREAM`])).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::message::{CommandLine, EvalOutput, RawCommand, TransferFrame, TransferSummary};
use cla_common::secret::Secret;

/// Binary stream id of stdout on the admin exec stream.
pub const STDOUT_STREAM: u64 = 1;
/// Binary stream id of stderr on the admin exec stream.
pub const STDERR_STREAM: u64 = 2;
/// Marks a transfer's stream in the hub's stream table (on the wire, a transfer uses the id announced in
/// its `started` event).
pub const TRANSFER_STREAM: u64 = 3;

/// `POST /api/v1/register` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub passkey: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub envs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A certificate signing request (PEM) for the worker's client certificate (mTLS); its key never
    /// leaves the worker. Honoured by hubs serving TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// `POST /api/v1/register` answer. The token is shown once; the hub keeps only its hash.
#[derive(Serialize, Deserialize)]
pub struct RegisterResponse {
    pub id: String,
    pub token: String,
    pub projects: Vec<String>,
    /// The client certificate (PEM) issued for the request's `csr`, for a hub serving TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// `POST /api/v1/unregister` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnregisterResponse {
    pub id: String,
    /// Projects the worker was removed from.
    pub projects: Vec<String>,
}

/// Every non-2xx answer of the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable: `unauthorized`, `conflict`, `not_found`, `bad_request`, `rate_limited`, ...
    pub code: String,
    /// One line for a human, naming the problem and the fix.
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// `POST /api/v1/admin/passkeys` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasskeyCreate {
    pub project: String,
}

/// `POST /api/v1/admin/passkeys` answer: the passkey, shown once.
#[derive(Serialize, Deserialize)]
pub struct PasskeyCreated {
    pub passkey: String,
    pub project: String,
}

/// A passkey as listed: the hub stores only a hash and a short prefix to recognise it by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasskeyView {
    /// The first characters of the passkey, enough to name it in `passkey revoke`.
    pub prefix: String,
    pub project: String,
    pub created: String,
    pub revoked: bool,
}

/// `POST /api/v1/admin/passkeys/revoke` body: a whole passkey or a unique prefix of one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasskeyRevoke {
    pub passkey: Secret,
}

/// A worker as `cla-hub workers --json` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: String,
    pub projects: Vec<String>,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    pub state: WorkerState,
    pub running: u32,
    pub capacity: u32,
    pub version: Option<String>,
    pub host: Option<String>,
    pub last_seen: Option<String>,
    /// When the current session started (connected workers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// Ship/fetch jobs running (they are not counted in `running`, which is against `capacity`).
    #[serde(default)]
    pub transfers: u32,
}

/// What `cla-hub worker ACTION ID` asks of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerAction {
    /// Take no new jobs, finish the running ones, then exit.
    Drain,
    /// Stay connected but get no jobs (kept across reconnects and hub restarts) until `enable`.
    Disable,
    /// Undo `disable`.
    Enable,
    /// Exit now (code 10), cancelling running jobs.
    Shutdown,
    /// Delete the registration; a connected worker removes it from its config and exits.
    Unregister,
    /// Give the worker a new token (now if connected, else when it next connects); the old one is
    /// accepted for an overlap window until the worker confirms it saved the new one.
    Rotate,
}

/// The body of `POST /api/v1/admin/workers/{id}/{action}` (all optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerActionRequest {
    /// `rotate`: how long the old token stays valid once the new one is sent (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_secs: Option<u64>,
}

impl WorkerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerAction::Drain => "drain",
            WorkerAction::Disable => "disable",
            WorkerAction::Enable => "enable",
            WorkerAction::Shutdown => "shutdown",
            WorkerAction::Unregister => "unregister",
            WorkerAction::Rotate => "rotate",
        }
    }
}

impl std::str::FromStr for WorkerAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            format!("unknown action `{s}`: drain, disable, enable, shutdown, unregister or rotate")
        })
    }
}

/// The answer to a worker action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerActionDone {
    pub id: String,
    pub action: WorkerAction,
    /// Whether the worker was connected (and so was told at once).
    pub connected: bool,
    pub message: String,
}

/// A worker's state on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Connected, running nothing.
    Idle,
    /// Connected, running at least one job.
    Busy,
    /// Connected, finishing its jobs and taking no new ones.
    Draining,
    /// Connected, but the hub routes no jobs to it.
    Disabled,
    /// Not connected (never, or missed 3 heartbeats).
    Offline,
}

impl WorkerState {
    /// The upper-case label of the human table.
    pub fn label(self) -> &'static str {
        match self {
            WorkerState::Idle => "IDLE",
            WorkerState::Busy => "BUSY",
            WorkerState::Draining => "DRAINING",
            WorkerState::Disabled => "DISABLED",
            WorkerState::Offline => "OFFLINE",
        }
    }
}

/// Which workers may run a job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Target {
    /// This worker only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Any worker carrying all of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Only workers whose `envs` include this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Give up (as `timed_out`) when no matching worker has taken the job within this many seconds.
    /// Without it a job waits in the queue until one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_secs: Option<f64>,
}

impl Target {
    /// "worker w1", "tags [a, b]", "any worker" — for messages.
    pub fn describe(&self) -> String {
        let mut s = match (&self.worker, self.tags.is_empty()) {
            (Some(w), _) => format!("worker {w}"),
            (None, false) => format!("tags [{}]", self.tags.join(", ")),
            (None, true) => "any worker".to_owned(),
        };
        if let Some(env) = &self.env {
            s.push_str(&format!(" in env {env}"));
        }
        s
    }
}

/// What a job does: run a command (`cmd` or `argv`) or evaluate JavaScript (`code`, `stash`). On the wire
/// exactly one of `cmd`, `argv` and `code` is present, and `stash` only with `code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTask", into = "RawTask")]
pub enum Task {
    Exec(CommandLine),
    Eval(EvalTask),
    Ship(ShipTask),
    Fetch(FetchTask),
}

/// The wire form of [`Task`], checked when it is read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawTask {
    #[serde(flatten)]
    pub command: RawCommand,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stash: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ship: Option<ShipTask>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchTask>,
}

impl TryFrom<RawTask> for Task {
    type Error = String;
    fn try_from(r: RawTask) -> Result<Self, String> {
        let has_command = r.command.cmd.is_some() || r.command.argv.is_some();
        let given = [has_command, r.code.is_some(), r.ship.is_some(), r.fetch.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err("give one of `cmd`, `argv`, `code`, `ship` or `fetch`, not several".into());
        }
        if let Some(ship) = r.ship {
            return Ok(Task::Ship(ship));
        }
        if let Some(fetch) = r.fetch {
            return Ok(Task::Fetch(fetch));
        }
        match (r.code, has_command) {
            (Some(_), true) => Err("give one of `cmd`, `argv` or `code`, not several".into()),
            (Some(code), false) => Ok(Task::Eval(EvalTask {
                code,
                stash: r.stash.unwrap_or_default(),
            })),
            (None, _) if r.stash.is_some() => Err("`stash` goes with `code` (an eval)".into()),
            (None, _) => Ok(Task::Exec(CommandLine::try_from(r.command)?)),
        }
    }
}

impl From<Task> for RawTask {
    fn from(t: Task) -> Self {
        match t {
            Task::Exec(c) => RawTask {
                command: c.into(),
                ..RawTask::default()
            },
            Task::Eval(e) => RawTask {
                code: Some(e.code),
                stash: (!e.stash.is_null()).then_some(e.stash),
                ..RawTask::default()
            },
            Task::Ship(t) => RawTask {
                ship: Some(t),
                ..RawTask::default()
            },
            Task::Fetch(t) => RawTask {
                fetch: Some(t),
                ..RawTask::default()
            },
        }
    }
}

/// JavaScript to evaluate on the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTask {
    pub code: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub stash: serde_json::Value,
}

/// Files to send to the worker (`cla-hub ship`); the bytes come from the client that created the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipTask {
    /// The destination on the worker (see [`super::message::ShipRequest::dest`]).
    pub dest: String,
    /// Create missing parent directories (default true).
    #[serde(default = "yes")]
    pub mkdir: bool,
    /// The client's source path, for listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A file or directory to bring back from the worker (`cla-hub fetch`) to the client that created the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchTask {
    /// The path on the worker.
    pub path: String,
    /// The client's destination path, for listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
}

fn yes() -> bool {
    true
}

impl Task {
    /// True for ship and fetch, which need their client connected for the whole job.
    pub fn is_transfer(&self) -> bool {
        matches!(self, Task::Ship(_) | Task::Fetch(_))
    }

    /// The verb: `exec`, `eval`, `ship` or `fetch`.
    pub fn verb(&self) -> &'static str {
        match self {
            Task::Exec(_) => "exec",
            Task::Eval(_) => "eval",
            Task::Ship(_) => "ship",
            Task::Fetch(_) => "fetch",
        }
    }

    /// A short human rendering for logs and listings.
    pub fn display(&self) -> String {
        match self {
            Task::Exec(c) => c.display(),
            Task::Ship(t) => format!("ship {} → {}", t.source.as_deref().unwrap_or("(client)"), t.dest),
            Task::Fetch(t) => format!("fetch {} → {}", t.path, t.dest.as_deref().unwrap_or("(client)")),
            Task::Eval(e) => {
                let first = e.code.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                let cut: String = first.chars().take(60).collect();
                let more = if cut.len() < e.code.trim().len() {
                    "…"
                } else {
                    ""
                };
                format!("eval: {cut}{more}")
            }
        }
    }
}

/// The top-level fields a [`JobSpec`] accepts (its flattened target and task included): the admin API
/// refuses a request with any other, so a misspelt `timeout_secs` is an error, not a job without a
/// timeout. A unit test keeps the list in step with the type.
pub const JOB_SPEC_FIELDS: &[&str] = &[
    "worker",
    "tags",
    "env",
    "queue_timeout_secs",
    "cmd",
    "argv",
    "code",
    "stash",
    "ship",
    "fetch",
    "workdir",
    "env_vars",
    "timeout_secs",
    "on_disconnect",
];

/// Refuses a JSON object with a field not in `accepted`, naming it and listing the accepted ones.
pub fn check_fields(value: &serde_json::Value, what: &str, accepted: &[&str]) -> Result<(), String> {
    let Some(obj) = value.as_object() else {
        return Ok(());
    };
    match obj.keys().find(|k| !accepted.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown field `{}` in the {what}: accepted fields are {}",
            crate::bounds::shown(k),
            accepted.join(", ")
        )),
        None => Ok(()),
    }
}

/// What to run and where: the body of `POST /api/v1/admin/jobs` and of an exec stream's first message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    #[serde(flatten)]
    pub target: Target,
    #[serde(flatten)]
    pub task: Task,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    /// What the job does while its worker is disconnected from the hub (exec and eval).
    #[serde(default, skip_serializing_if = "crate::OnDisconnect::is_continue")]
    pub on_disconnect: crate::OnDisconnect,
}

/// A job's lifecycle (`docs/reliability.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Offered,
    Accepted,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl JobState {
    /// True for the states a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Cancelled
                | JobState::TimedOut
                | JobState::Lost
        )
    }

    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Offered => "offered",
            JobState::Accepted => "accepted",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Lost => "lost",
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            format!(
                "unknown job state `{s}`: use one of queued, offered, accepted, running, succeeded, failed, \
                 cancelled, timed_out, lost"
            )
        })
    }
}

/// A job as the hub reports it (`job show --json`, `jobs --json`, the end of an exec stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    pub spec: JobSpec,
    /// The worker that took the job.
    pub worker: Option<String>,
    pub rc: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Captured stdout (lossy UTF-8), at most the hub's per-job cap.
    pub stdout: String,
    pub stderr: String,
    /// True when the captured output was cut at the cap (the live stream had all of it).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Output bytes received from the worker per stream (the kept text stops at the cap). A worker that
    /// reconnects, or a restarted hub, resumes the output from here.
    #[serde(default)]
    pub stdout_bytes: u64,
    #[serde(default)]
    pub stderr_bytes: u64,
    pub created: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    /// Why the job failed to run, was lost or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A machine-readable kind of `error`: `policy` when the worker's local policy refused the job,
    /// [`QUEUE_TIMEOUT`] when no worker started it within its queue timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// An eval job's result, stash, console and error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalOutput>,
    /// What a ship or fetch moved, as its receiver verified it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferSummary>,
    /// While the job is queued: why no worker has taken it yet ("all 2 matching workers busy"); while
    /// its worker is disconnected: that it waits for the worker to come back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Created by a client that streams it (`exec`, `ship`, a rulebook step) rather than detached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streamed: bool,
}

/// [`JobRecord::error_code`] of a job that timed out waiting for a worker (not while running).
pub const QUEUE_TIMEOUT: &str = "queue_timeout";

/// The API error code of a job refused because no registered worker can match its target; an unknown
/// worker id is `unknown_worker`.
pub const NO_MATCH: &str = "no_match";

impl JobRecord {
    /// True when the job timed out in the queue: no worker started it within its queue timeout.
    pub fn timed_out_in_queue(&self) -> bool {
        self.state == JobState::TimedOut
            && (self.error_code.as_deref() == Some(QUEUE_TIMEOUT) || self.started.is_none())
    }

    /// A new job, queued: nothing has happened to it yet.
    pub fn queued(id: String, spec: JobSpec, created: String) -> JobRecord {
        JobRecord {
            id,
            state: JobState::Queued,
            spec,
            worker: None,
            rc: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            created,
            started: None,
            ended: None,
            error: None,
            error_code: None,
            eval: None,
            transfer: None,
            waiting: None,
            streamed: false,
        }
    }
}

/// `GET /api/v1/admin/jobs` filters: jobs newest first, only those in `state`, on `worker`, created at
/// or after `since` (RFC 3339), at most `limit` of them (0 or none: all).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl JobQuery {
    /// The query string (`?state=running&limit=50`), empty without filters. Values are
    /// percent-encoded.
    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("state", self.state.clone()),
            ("worker", self.worker.clone()),
            ("since", self.since.clone()),
            ("limit", self.limit.map(|n| n.to_string())),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", percent(&v)));
            }
        }
        match parts.is_empty() {
            true => String::new(),
            false => format!("?{}", parts.join("&")),
        }
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn percent(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Admin client → hub on the exec stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Create a job and stream it (must be the first message).
    Exec(Box<JobSpec>),
    /// Follow an existing job instead (as the first message): a client whose stream dropped comes
    /// back, or `job logs --follow`. `stdout` and `stderr` are how many bytes of each the client already
    /// has; the hub answers with [`AdminEvent::Attached`] and sends what follows. Not for ship or fetch.
    Attach {
        job: String,
        #[serde(default)]
        stdout: u64,
        #[serde(default)]
        stderr: u64,
    },
    /// Cancel the streamed job (Ctrl-C on the CLI).
    Cancel,
    /// A step of the job's transfer (ship: the client's entries and `end`; fetch: its acks and verdict).
    /// File bytes travel as binary frames on [`TRANSFER_STREAM`].
    Transfer(TransferFrame),
}

/// Hub → admin client on the exec stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminEvent {
    /// The job exists, with this id.
    Created { job: String },
    /// A worker took the job and started it. For a ship or fetch, `stream` is the binary stream id of
    /// the file data, on this stream as on the worker's session.
    Started {
        job: String,
        worker: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<u64>,
    },
    /// The job is still queued, for this reason (sent again when the reason changes).
    Waiting { job: String, reason: String },
    /// The answer to [`AdminRequest::Attach`]: the output that follows on each stream starts at these
    /// byte positions (the stored output from the client's offsets, then live output). A position past
    /// the client's offset means the bytes between are gone (the hub keeps only the first
    /// `max_output_bytes` of each stream); one before it means bytes the client has come again, which it
    /// skips. The job's state follows as `started`, `waiting` or `ended`.
    Attached { job: String, stdout: u64, stderr: u64 },
    /// The job ended; every output frame came before this.
    Ended(Box<JobRecord>),
    /// A step of the job's transfer, relayed from the worker.
    Transfer(TransferFrame),
    /// The job could not be created or streamed.
    Error(ApiError),
    /// An event of a newer hub, which this client does not know: ignored.
    #[serde(other)]
    Unknown,
}

/// `DATA_DIR/hub.json`: how local admin commands find and authenticate to the hub. Mode 0600.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubFile {
    pub url: String,
    pub admin_token: String,
    /// The fingerprint of the hub's TLS certificate, when it serves TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field in [`JOB_SPEC_FIELDS`] is one a job really has: a spec using all of them (one per kind
    /// of task) keeps each through a round trip, and the union of their keys is the whole list.
    #[test]
    fn job_spec_fields_are_the_fields_of_a_job_spec() {
        let specs = [
            r#"{"worker":"w1","tags":["a"],"env":"prod","queue_timeout_secs":5.0,"cmd":"true","workdir":"/tmp",
                "env_vars":{"A":"1"},"timeout_secs":3.0,"on_disconnect":{"cancel_after":5}}"#,
            r#"{"argv":["uname","-a"]}"#,
            r#"{"code":"1+1","stash":{"a":1}}"#,
            r#"{"ship":{"dest":"/srv/app","mkdir":false,"source":"app.tar"}}"#,
            r#"{"fetch":{"path":"/etc/hosts"}}"#,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for text in specs {
            let given: serde_json::Value = serde_json::from_str(text).unwrap();
            check_fields(&given, "job request", JOB_SPEC_FIELDS).unwrap();
            let spec: JobSpec = serde_json::from_value(given.clone()).unwrap();
            let back = serde_json::to_value(&spec).unwrap();
            for k in given.as_object().unwrap().keys() {
                assert!(
                    back.get(k).is_some(),
                    "`{k}` did not survive a round trip: {back}"
                );
                seen.insert(k.clone());
            }
        }
        let listed: std::collections::BTreeSet<String> =
            JOB_SPEC_FIELDS.iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, listed);
    }

    #[test]
    fn an_unknown_field_is_named_with_the_accepted_ones() {
        let v: serde_json::Value = serde_json::from_str(r#"{"cmd":"sleep 9","timeout":1}"#).unwrap();
        let e = check_fields(&v, "job request", JOB_SPEC_FIELDS).unwrap_err();
        assert!(
            e.starts_with("unknown field `timeout` in the job request: accepted fields are worker, tags"),
            "{e}"
        );
    }
}
