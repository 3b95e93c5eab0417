//! Worker ↔ hub wire messages (protocol v1). Only serde types and constants live here.
//!
//! Text frames carry one JSON object tagged by `type` (`{"type":"exec",...}`); binary frames carry bulk
//! bytes prefixed by a stream id (see [`super::codec`]). Field names are part of the contract: the golden
//! tests in `tests/protocol_golden.rs` pin the JSON of every message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; sent in `hello` and checked by the hub.
pub const PROTOCOL_VERSION: u32 = 1;

/// The machine-readable code of a policy refusal (`JobResult::code`, `JobRecord::error_code`).
pub const POLICY_CODE: &str = "policy";

/// The WebSocket subprotocol both sides require.
pub const SUBPROTOCOL: &str = "cla.v1";

/// Path of the worker WebSocket endpoint.
pub const WS_PATH: &str = "/ws/v1";

/// Header carrying the worker id on the WebSocket upgrade and on `/api/v1/unregister`.
pub const WORKER_ID_HEADER: &str = "x-cla-worker-id";

/// Worker → hub.
// One message exists per frame for a moment, so the size of the largest variant (`finished`) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// First message of every session.
    Hello(Hello),
    /// The worker takes an offered job and will run it.
    Accepted { job: String },
    /// The worker cannot take an offered job now (draining, at capacity, policy); the hub may offer it elsewhere.
    Refused { job: String, reason: String },
    /// The job's process is running.
    Started { job: String, pid: Option<u32> },
    /// The job ended; all of its output frames were sent before this message.
    Finished(JobResult),
    /// The worker is draining: it finishes what runs and takes nothing new.
    Draining,
    /// The worker's tags and envs changed (SIGHUP reloaded its config); the session goes on.
    Update { tags: Vec<String>, envs: Vec<String> },
    /// A step of a transfer: file data the worker sends (fetch), or its acknowledgements (ship).
    Transfer(TransferFrame),
    /// The answer to `rotate`: whether the new token was saved (then the worker uses it from now on)
    /// and where, or why not (then the worker keeps its old token).
    Rotated { saved: bool, message: String },
    /// Answer to a message the worker could not handle.
    Error { code: ErrorCode, message: String },
}

/// Hub → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubMessage {
    /// Accepts the session.
    Welcome(Welcome),
    /// Refuses the session; the connection closes after it.
    Reject(Reject),
    /// Run a command.
    Exec(ExecRequest),
    /// Evaluate JavaScript (boa) with a stash.
    Eval(EvalRequest),
    /// Receive files: `transfer` frames and binary chunks on `stream` follow (see `docs/protocol.md`).
    Ship(ShipRequest),
    /// Send a file or directory back: the worker answers with `transfer` frames and chunks on `stream`.
    Fetch(FetchRequest),
    /// A step of a transfer: file data for a ship, or acknowledgements for a fetch.
    Transfer(TransferFrame),
    /// Stop a running job: kill its whole process tree (TERM, grace, KILL).
    Cancel { job: String, reason: String },
    /// Exit the worker process with code 10.
    Shutdown { reason: String },
    /// Take no new jobs, let the running ones finish, then exit (code 0): `cla-hub worker drain`.
    Drain { reason: String },
    /// The hub has deleted this worker's registration: the worker removes it from its config file,
    /// cancels its jobs and exits (code 0).
    Unregistered { reason: String },
    /// The hub has stored the job's end (its `finished` and all output before it): the worker forgets
    /// the job and deletes its spool.
    Ack { job: String },
    /// A new token for this worker (`cla-hub worker rotate`): the worker saves it into the config file
    /// that held the old one (atomically), uses it from then on, and answers `rotated`.
    Rotate { token: cla_common::secret::Secret },
    /// Answer to a message the hub could not handle.
    Error { code: ErrorCode, message: String },
}

/// The worker's self-description, sent first on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// The worker build (`cla-worker --version`).
    pub agent: String,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    pub capacity: u32,
    pub host: String,
    pub os: String,
    pub arch: String,
    pub pid: u32,
    /// Jobs the worker still runs, or has ended without the hub's `ack` of their result (on a restart,
    /// the jobs found in its spool). The hub answers with [`Welcome::resume`].
    #[serde(default)]
    pub resume: Vec<String>,
    /// Request kinds beyond exec and eval this worker handles ([`FEATURES`]); the hub offers a job only to
    /// a worker that can run it, so an older worker is never sent what it would not understand.
    #[serde(default)]
    pub features: Vec<String>,
}

/// What this build's workers announce in `hello`.
pub const FEATURES: &[&str] = &[FEATURE_TRANSFER, FEATURE_ROTATE];

/// `ship` and `fetch`.
pub const FEATURE_TRANSFER: &str = "transfer";

/// `rotate` (token rotation).
pub const FEATURE_ROTATE: &str = "rotate";

/// The hub's acceptance of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Identifies this session in the hub's logs.
    pub session: String,
    /// The hub pings this often; either side treats 3 silent intervals as a dead connection.
    pub heartbeat_secs: u64,
    pub limits: Limits,
    /// The jobs of `hello.resume` the hub still wants, with how much of their output it has. The worker
    /// replays the rest from its spool, then goes on; a job it listed that is not here is over for the
    /// hub (ended, cancelled or lost meanwhile): the worker stops it and forgets it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume: Vec<Resumed>,
}

/// One job the hub takes back after a reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    pub job: String,
    /// Output bytes the hub has of stdout and stderr: the worker sends what follows.
    pub stdout_offset: u64,
    pub stderr_offset: u64,
    /// The binary stream ids for stdout and stderr on this connection (eval: console on `stdout`). A
    /// transfer keeps the stream it had (these are 0); both sides then send `transfer {op: resume}`.
    pub stdout: u64,
    pub stderr: u64,
}

/// What a job does while its worker has no connection to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// Keep running; the output is spooled and sent when the connection is back (the default).
    #[default]
    Continue,
    /// Cancel the job when the connection has been down this many seconds.
    CancelAfter(u64),
}

impl OnDisconnect {
    pub fn is_continue(&self) -> bool {
        *self == OnDisconnect::Continue
    }
}

/// Limits the hub announces in `welcome`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest WebSocket message either side may send.
    pub max_frame_bytes: u64,
}

/// Why the hub refused a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
    /// Seconds to wait before connecting again (for retryable codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// Reasons for a [`Reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Unknown id or wrong token: the registration is gone. The worker stops.
    Unauthorized,
    /// The hub does not speak the worker's protocol version. The worker stops.
    Version,
    /// A live session with this id exists already. The worker retries later.
    Duplicate,
    /// The hub is shedding load. The worker retries after `retry_after`.
    Busy,
    /// The `hello` carries a value past the protocol's bounds (`bounds`), such as a tag over 64
    /// characters. The worker stops: its config must change.
    Invalid,
}

impl RejectCode {
    /// True when connecting again later can succeed.
    pub fn retryable(self) -> bool {
        matches!(self, RejectCode::Duplicate | RejectCode::Busy)
    }
}

/// Machine-readable error codes in `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A message type the receiver does not know.
    Unsupported,
    /// A message that could not be decoded.
    Malformed,
    /// A job id the receiver does not know.
    UnknownJob,
    /// A message past the protocol's bounds (`bounds`); it was ignored.
    Invalid,
    /// More messages of this kind than the receiver takes in a while; it was ignored.
    RateLimited,
}

/// The command of an exec request: one string for the shell, or an argv run directly. On the wire it is
/// `{"cmd": "..."}` or `{"argv": [...]}` — exactly one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCommand", into = "RawCommand")]
pub enum CommandLine {
    /// Run through the worker's shell (`sh -c` / `cmd /C`).
    Shell { cmd: String },
    /// Run directly, no shell; `argv[0]` is looked up in `PATH`.
    Argv { argv: Vec<String> },
}

/// The wire form of [`CommandLine`], checked when it is read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawCommand {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
}

impl TryFrom<RawCommand> for CommandLine {
    type Error = String;
    fn try_from(r: RawCommand) -> Result<Self, String> {
        match (r.cmd, r.argv) {
            (Some(cmd), None) => Ok(CommandLine::Shell { cmd }),
            (None, Some(argv)) => Ok(CommandLine::Argv { argv }),
            (Some(_), Some(_)) => Err("give `cmd` or `argv`, not both".into()),
            (None, None) => Err("missing `cmd` (a shell line) or `argv` (a list)".into()),
        }
    }
}

impl From<CommandLine> for RawCommand {
    fn from(c: CommandLine) -> Self {
        match c {
            CommandLine::Shell { cmd } => RawCommand {
                cmd: Some(cmd),
                argv: None,
            },
            CommandLine::Argv { argv } => RawCommand {
                cmd: None,
                argv: Some(argv),
            },
        }
    }
}

impl CommandLine {
    /// The shell form for one word, argv for several (the `cla-hub exec -- CMD..` rule).
    pub fn from_words(words: Vec<String>) -> Self {
        match <[String; 1]>::try_from(words) {
            Ok([cmd]) => CommandLine::Shell { cmd },
            Err(argv) => CommandLine::Argv { argv },
        }
    }

    /// A short human rendering for logs and listings.
    pub fn display(&self) -> String {
        match self {
            CommandLine::Shell { cmd } => cmd.clone(),
            CommandLine::Argv { argv } => argv.join(" "),
        }
    }
}

/// `exec`: run a command on the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub job: String,
    #[serde(flatten)]
    pub command: CommandLine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Extra environment variables for the process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kill the tree and report `timed_out` after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Kill the tree and report `timed_out` after this many milliseconds without output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_timeout_ms: Option<u64>,
    /// Binary stream id for stdout bytes.
    pub stdout: u64,
    /// Binary stream id for stderr bytes.
    pub stderr: u64,
    #[serde(default, skip_serializing_if = "OnDisconnect::is_continue")]
    pub on_disconnect: OnDisconnect,
}

/// How a job ended, from the worker's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exited with status 0.
    Succeeded,
    /// Exited non-zero or was killed by a signal it did not get from us.
    Failed,
    /// Killed by us after `timeout_ms` / `output_timeout_ms`.
    TimedOut,
    /// Killed by us after a `cancel` (or a drain deadline).
    Cancelled,
    /// Never ran: the command could not be started (not found, bad workdir, ...).
    Error,
    /// The worker process stopped while the job ran (killed, crashed): a restarted worker found the
    /// job in its spool without an end. Its processes may have outlived it.
    Lost,
}

/// `finished`: the end of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: String,
    pub outcome: Outcome,
    /// Exit status; for a signal death 128 + signal number, as shells report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rc: Option<i32>,
    /// The signal that ended the process, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub duration_ms: u64,
    /// Why the job could not run, or what killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A machine-readable kind of `error`: `policy` when the worker's local policy refused the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What an eval produced (eval jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalOutput>,
    /// What a ship or fetch moved (transfer jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferSummary>,
    /// The output bytes the job wrote, `[stdout, stderr]` (exec and eval): the hub checks it received
    /// all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<[u64; 2]>,
}

impl JobResult {
    /// The end of a job the worker's local policy refused: it never ran, and is not tried elsewhere.
    pub fn refused_by_policy(job: String, error: String) -> Self {
        JobResult {
            code: Some(POLICY_CODE.to_owned()),
            ..JobResult::not_run(job, Outcome::Error, error)
        }
    }

    /// The end of a job that never ran (refused repeat, cancelled before it started).
    pub fn not_run(job: String, outcome: Outcome, error: impl Into<String>) -> Self {
        JobResult {
            job,
            outcome,
            rc: None,
            signal: None,
            duration_ms: 0,
            error: Some(error.into()),
            code: None,
            eval: None,
            transfer: None,
            output_bytes: None,
        }
    }
}

/// `eval`: run JavaScript on the worker (see `docs/eval.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRequest {
    pub job: String,
    pub code: String,
    /// Visible to the code as the global `stash`; returned, possibly changed, in the result.
    #[serde(default)]
    pub stash: serde_json::Value,
    /// Wall-clock limit (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Binary stream id for console output, streamed as it is logged.
    pub stdout: u64,
    #[serde(default, skip_serializing_if = "OnDisconnect::is_continue")]
    pub on_disconnect: OnDisconnect,
}

/// The outcome of an eval.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalOutput {
    /// The value of the last expression as JSON (`undefined` gives `null`).
    pub result: serde_json::Value,
    /// The `stash` global after the code ran.
    pub stash: serde_json::Value,
    /// Everything logged with `console.*`, in order (capped; see `console_truncated`).
    pub console: Vec<ConsoleLine>,
    #[serde(default)]
    pub console_truncated: bool,
    /// The exception, if the code threw (or a limit stopped it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EvalError>,
}

/// One `console.log/info/warn/error` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleLine {
    /// `log`, `info`, `warn` or `error`.
    pub level: String,
    pub text: String,
}

/// A JavaScript exception.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalError {
    /// `Error: boom`, `TypeError: ...`, `SyntaxError: ...`, `RuntimeLimitError: ...`.
    pub message: String,
    /// The JS stack, innermost frame first (`at f (unknown at :1:24)`).
    #[serde(default)]
    pub stack: Vec<String>,
}

/// `ship`: the worker receives a file or directory and writes it at `dest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipRequest {
    pub job: String,
    /// Where it goes. A file lands at `dest`, or inside it when `dest` ends with `/` or is a directory; a
    /// directory's contents land in `dest` (created or merged), or in `dest/NAME` when `dest` ends with `/`.
    pub dest: String,
    /// Create missing parent directories of the destination (default); false refuses instead.
    #[serde(default = "yes")]
    pub mkdir: bool,
    /// Binary stream id of the file bytes.
    pub stream: u64,
}

/// `fetch`: the worker sends the file or directory at `path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub job: String,
    pub path: String,
    /// Binary stream id the worker sends the file bytes on.
    pub stream: u64,
}

fn yes() -> bool {
    true
}

/// One step of a transfer, for job `job`. The sender sends `begin`, the entries (`dir`, `file` + binary
/// chunks + `file_end`, `symlink`) and then `end`; the receiver sends `ack`s as it writes, and `committed` or
/// `abort` at the end. The same frames travel hub ↔ worker and admin client ↔ hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferFrame {
    pub job: String,
    #[serde(flatten)]
    pub op: TransferOp,
}

/// What a [`TransferFrame`] says. Entry paths are relative, `/`-separated, and start with the name of
/// the transferred file or directory (`dist`, `dist/app.js`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TransferOp {
    /// The first frame: what the sender is about to send (for progress and ETA).
    Begin { files: u64, bytes: u64 },
    /// A directory. Its mode and mtime are applied once its contents are in place.
    Dir { path: String, mode: u32, mtime_ns: i64 },
    /// A regular file of `size` bytes: its bytes follow as binary frames, then `file_end`.
    File {
        path: String,
        size: u64,
        mode: u32,
        mtime_ns: i64,
    },
    /// The end of the current file's bytes, with the SHA-256 of all of them (hex).
    FileEnd { sha256: String },
    /// A symbolic link, kept as a link (never followed).
    Symlink { path: String, target: String },
    /// Nothing more follows; totals for the receiver to check (`sha256`: see [`TransferSummary`]).
    End { files: u64, bytes: u64, sha256: String },
    /// Receiver → sender: this much of the stream is written (in window units: bytes plus
    /// `FRAME_COST` of the transfer crate per frame); the sender may have at most a window more in flight.
    Ack { consumed: u64 },
    /// Either side gives up; the receiver removes what it wrote.
    Abort { error: String },
    /// Receiver → hub (fetch): everything is verified and in place.
    Committed(TransferSummary),
    /// Hub ↔ worker only, after a reconnect resumed the transfer: the sending side has received this many
    /// units of the other side's pieces (every piece but `ack`, counted like the window); the other side
    /// sends what follows from its copy of them (see `docs/transfer.md`). Never relayed.
    Resume { received: u64 },
}

/// What a transfer moved, as the receiver verified it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TransferSummary {
    /// The destination path on the receiving side.
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Special files (sockets, fifos, devices) the sender skipped.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
    pub bytes: u64,
    /// For a single file, its SHA-256; for a directory, the SHA-256 of its manifest: one line
    /// `SHA256  PATH\n` per file (PATH below the directory), in the order sent (depth first; in each
    /// directory its files and links, then its subdirectories, names sorted bytewise).
    pub sha256: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
