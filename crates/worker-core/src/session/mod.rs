//! The worker's life on the wire: connect out to the hub, say `hello`, take requests until the
//! connection drops, then reconnect with capped, fully jittered exponential backoff (0.5 s → 60 s; reset
//! after a successful handshake). SIGINT/SIGTERM drains: no new jobs, running ones get a deadline, then
//! the kill ladder.
//!
//! Jobs outlive the connection they came on. Exec and eval output and results go through a [`Journal`]
//! (spooled on disk until the hub acknowledges the end); a transfer's pieces go through its
//! [`transfer::Leg`] (kept in memory until the far end has them). After a reconnect the worker lists
//! its jobs in `hello.resume` and sends what the hub missed.
//!
//! This module is the connection loop; `dispatch` serves one established session, `resume` replays
//! jobs after a reconnect, `jobs` keeps the table of taken jobs, `control` handles reloads, rotation,
//! revocation and draining.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cla_common::mask::Masks;
use cla_config::policy::{Access, Enforcer};
use tokio_util::task::TaskTracker;

use super::daemon::{ConnState, Reporter};
use super::eval;
use super::exec::{self, ExecCtx};
use super::journal::{Journal, Link, Spool};
use super::transfer;
use crate::error::{Error, Result};
use cla_config::WorkerSettings;
use cla_protocol::connection::Incoming;
use cla_protocol::{
    Connection, ConnectionReader, ConnectionWriter, ErrorCode, Frame, Hello, HubMessage, JobResult,
    OnDisconnect, Outcome, PROTOCOL_VERSION, ProtocolError, RejectCode, Resumed, TransferFrame, TransferOp,
    WORKER_ID_HEADER, WS_PATH, WorkerMessage, decode_text,
};
use cla_transfer::Piece;

mod control;
mod dispatch;
mod jobs;
mod resume;

use control::{forget_registration, masks_of, reload, save_rotated_token};
use jobs::running;

/// Backoff bounds (`docs/protocol.md`).
const BACKOFF_BASE: Duration = Duration::from_millis(500);

const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// How long the handshake may take once connected.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Re-reads the config (on SIGHUP): the file again, with the command line still winning.
pub type Reload = Arc<dyn Fn() -> Result<Reloaded> + Send + Sync>;

/// What a [`Reload`] read.
pub struct Reloaded {
    /// The settings as they would be resolved now.
    pub settings: WorkerSettings,
    /// Settings outside [`WorkerSettings`] (the log's, the pidfile) that changed since the worker
    /// started, by config key: a restart applies them.
    pub restart_needed: Vec<String>,
}

/// Options of `cla-worker run` that are not part of the config.
#[derive(Clone)]
pub struct RunOptions {
    /// On SIGINT/SIGTERM, how long running jobs may take before they are killed.
    pub drain_timeout: Duration,
    /// Wait a random time up to this before the first connection (a fleet started at once spreads out).
    pub startup_jitter: Duration,
    /// Where to keep the status `cla-worker status` reads (default: beside the spool,
    /// [`crate::daemon::foreground_status_file`]).
    pub status_file: Option<std::path::PathBuf>,
    /// The pidfile of a background worker, named in the spool's lock file for `cla-worker status`.
    pub pidfile: Option<std::path::PathBuf>,
    /// What SIGHUP does; `None` ignores it.
    pub reload: Option<Reload>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            drain_timeout: Duration::from_secs(30),
            startup_jitter: Duration::ZERO,
            status_file: None,
            pidfile: None,
            reload: None,
        }
    }
}

/// SIGHUP as a stream (never fires where there is no SIGHUP).
struct Hup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

/// What job tasks hand to the connection writer.
#[derive(Debug)]
pub(crate) enum Out {
    Message(Box<WorkerMessage>),
    Data(u64, Bytes),
    /// A chunk of a fetch's file data, for this stream.
    Chunk(cla_protocol::Chunk, u64),
}

impl Out {
    pub(crate) fn msg(m: WorkerMessage) -> Out {
        Out::Message(Box::new(m))
    }
}

/// How one connection ended.
enum End {
    /// We were told to stop (signal) and have drained.
    Shutdown,
    /// The hub sent `shutdown`.
    HubShutdown(String),
    /// The hub deleted the registration.
    Unregistered(String),
    /// The connection failed or dropped; try again (not before `retry_after`).
    Lost {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// Refuses settings this build cannot run with (checked before a daemon takes its pidfile, so `start`
/// sees the failure instead of a worker that looked started).
pub fn check(settings: &WorkerSettings) -> Result<()> {
    if settings.url.starts_with("https://") {
        // No pin and no CA, an unreadable CA file, or a client certificate that cannot be used: say so
        // now, not at every reconnect.
        let identity = settings.client_identity()?;
        settings
            .trust
            .client_config_for(&settings.url, identity.as_ref())?;
    }
    Ok(())
}

/// Runs the worker until `shutdown` fires (Ok), the registration is revoked, or the hub orders a
/// shutdown (errors the binary maps to exit codes 1 and 10).
pub async fn run(mut settings: WorkerSettings, opts: RunOptions, shutdown: CancellationToken) -> Result<()> {
    check(&settings)?;
    // The spool's lock first: it is what keeps a second process of this worker from starting (and from
    // writing over the first one's status file).
    let spool = Arc::new(Spool::open(
        &settings.spool_dir,
        settings.spool_max_bytes,
        opts.pidfile.as_deref(),
    )?);
    let mut worker = WorkerJobs::new(spool);
    worker.masks = masks_of(&settings)?;
    let s = &settings;
    // A worker in the foreground keeps its status beside its spool, where `cla-worker status` finds it.
    let status_file = opts
        .status_file
        .clone()
        .unwrap_or_else(|| super::daemon::foreground_status_file(&s.spool_dir));
    let reporter = Arc::new(Reporter::new(
        Some(status_file),
        &s.id,
        &s.url,
        s.capacity,
        &s.tags,
        &s.envs,
    ));
    let mut hup = Hup::new();
    let mut backoff = Backoff::default();
    worker.recover().await;
    tracing::info!(id = %settings.id, url = %settings.url, tags = ?settings.tags, capacity = settings.capacity, "cla-worker {} starting", cla_common::VERSION);
    #[cfg(unix)]
    if nix::unistd::geteuid().is_root() && settings.policy == Default::default() {
        let file = settings
            .source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the config file".into());
        tracing::warn!(
            "running as root with no policy: the hub may run any command and ship or fetch any file here; limit it with `policy:` in {file} (docs/security.md)"
        );
    }
    if !opts.startup_jitter.is_zero() {
        let wait = opts.startup_jitter.mul_f64(cla_common::util::unit_random());
        tracing::info!("startup jitter: connecting in {:.1}s", wait.as_secs_f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    let result = loop {
        let end = match connect_once(
            &mut settings,
            &opts,
            &shutdown,
            &mut backoff,
            &mut worker,
            &reporter,
            &mut hup,
        )
        .await
        {
            Ok(end) => end,
            Err(e) => break Err(e),
        };
        let (reason, retry_after) = match end {
            End::Shutdown => break Ok(()),
            End::HubShutdown(reason) => break Err(Error::HubShutdown(reason)),
            End::Unregistered(reason) => {
                forget_registration(&settings, &reason);
                break Ok(());
            }
            End::Lost { reason, retry_after } => (reason, retry_after),
        };
        reporter.state(ConnState::Reconnecting, Some(reason.clone()));
        // The hub's `retry_after` is a floor; the jitter on top keeps the workers it turned away from
        // all coming back in the same instant.
        let wait = match retry_after {
            Some(floor) => floor + backoff.next(),
            None => backoff.next(),
        };
        tracing::warn!(
            attempt = backoff.attempt,
            "{reason}; reconnecting in {:.1}s",
            wait.as_secs_f64()
        );
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = shutdown.cancelled() => break,
                _ = hup.recv() => {
                    // Applied with the next hello (tags, envs) and to the jobs it brings.
                    reload(&opts, &mut settings, &reporter, &mut worker.masks);
                }
            }
        }
        if shutdown.is_cancelled() {
            break Ok(());
        }
    };
    // Stopped while disconnected: jobs still running get the drain deadline; their ends wait in the
    // spool for the next start.
    worker.drain_offline(opts.drain_timeout).await;
    reporter.remove();
    result
}

async fn connect_once(
    s: &mut WorkerSettings,
    opts: &RunOptions,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    worker: &mut WorkerJobs,
    reporter: &Arc<Reporter>,
    hup: &mut Hup,
) -> Result<End> {
    let url = format!("{}{WS_PATH}", s.url);
    let auth = format!("Bearer {}", s.token.expose());
    let headers = [
        ("authorization", auth.as_str()),
        (WORKER_ID_HEADER, s.id.as_str()),
    ];
    let identity = match s.client_identity() {
        Ok(i) => i,
        Err(e) => return Ok(lost(e.to_string())),
    };
    let connecting = Connection::connect_tls(&url, &headers, &s.trust, identity.as_ref());
    let conn = tokio::select! {
        c = connecting => c,
        _ = shutdown.cancelled() => return Ok(End::Shutdown),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(ProtocolError::Refused {
            status: 401, body, ..
        }) => return Err(Error::Revoked(body)),
        Err(e) => return Ok(lost(e.to_string())),
    };
    let (mut writer, mut reader) = conn.split();
    let mut greeting = hello(s, "");
    greeting.resume = worker.resumable();
    if let Err(e) = writer.send(&WorkerMessage::Hello(greeting)).await {
        return Ok(lost(e.to_string()));
    }
    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, first_message(&mut reader)).await {
        Err(_) => return Ok(lost("the hub did not answer hello".into())),
        Ok(Err(e)) => return Ok(lost(e.to_string())),
        Ok(Ok(HubMessage::Welcome(w))) => w,
        Ok(Ok(HubMessage::Reject(r))) => {
            return match r.code {
                RejectCode::Unauthorized => Err(Error::Revoked(r.message)),
                RejectCode::Version | RejectCode::Invalid => Err(Error::Other(format!(
                    "the hub refused this worker: {}",
                    r.message
                ))),
                RejectCode::Duplicate | RejectCode::Busy => Ok(End::Lost {
                    reason: format!("the hub asked us to wait: {}", r.message),
                    retry_after: r.retry_after.map(Duration::from_secs),
                }),
            };
        }
        Ok(Ok(other)) => return Ok(lost(format!("unexpected first message from the hub: {other:?}"))),
    };
    backoff.reset();
    reporter.state(ConnState::Connected, None);
    tracing::info!(session = %welcome.session, "connected to hub {} as {}", s.url, s.id);
    let heartbeat = Duration::from_secs(welcome.heartbeat_secs.max(1));
    let mut live = Live::new(s, writer, reporter.clone(), heartbeat, opts.clone(), worker);
    live.resume(&welcome.resume).await;
    let end = live.serve(&mut reader, shutdown, s, hup).await;
    live.finish(matches!(end, End::Lost { .. })).await;
    Ok(end)
}

/// This worker's `hello`; `agent_note` marks a special client (`doctor`).
pub(crate) fn hello(s: &WorkerSettings, agent_note: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        agent: format!("cla-worker {}{agent_note}", cla_common::VERSION),
        tags: s.tags.clone(),
        envs: s.envs.clone(),
        capacity: s.capacity,
        host: cla_common::util::hostname(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        pid: std::process::id(),
        resume: Vec::new(),
        features: cla_protocol::FEATURES.iter().map(|f| (*f).to_owned()).collect(),
    }
}

fn lost(reason: String) -> End {
    End::Lost {
        reason,
        retry_after: None,
    }
}

async fn first_message(reader: &mut ConnectionReader) -> Result<HubMessage, ProtocolError> {
    loop {
        match reader.read().await? {
            None => return Err(ProtocolError::Transport("the hub closed the connection".into())),
            Some(Incoming::Frame(Frame::Text(t))) => return decode_text(&t),
            Some(_) => continue,
        }
    }
}

/// A job this worker process has taken, kept across connections until the hub acknowledges its end.
struct Taken {
    cancel: CancellationToken,
    keep: Keep,
    on_disconnect: OnDisconnect,
    /// The job's task is over; its end waits for the hub's `ack`.
    ended: bool,
}

/// What keeps a job's output and end across connections.
#[derive(Clone)]
pub(crate) enum Keep {
    /// Exec and eval: the journal, on disk.
    Journal(Arc<Journal>),
    /// Ship and fetch (which have their own limit): the transfer's leg, in memory.
    Leg(Arc<transfer::Leg>),
}

type Table = Arc<Mutex<HashMap<String, Taken>>>;

/// The jobs of this worker process, across connections.
struct WorkerJobs {
    table: Table,
    tracker: TaskTracker,
    spool: Arc<Spool>,
    /// Where the session delivers the pieces of running transfers.
    routes: transfer::Routes,
    /// Ids of accepted jobs (so a repeated offer is answered, not run twice).
    seen: BoundedIds,
    /// Counts established connections: a disconnect policy applies only if no new one came since.
    epoch: Arc<std::sync::atomic::AtomicU64>,
    /// The secrets masked in job output.
    masks: Masks,
}

/// How long a worker stays idle before it returns its free heap to the OS.
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(2);

/// One established session: the writer task and what it needs to take jobs.
struct Live<'w> {
    reporter: Arc<Reporter>,
    /// The hub's heartbeat: 3 silent ones mean the connection is dead.
    heartbeat: Duration,
    opts: RunOptions,
    ctx: ExecCtx,
    capacity: usize,
    worker: &'w mut WorkerJobs,
    /// Cancelled when the writer fails: the connection is dead.
    dead: CancellationToken,
    /// Jobs cancelled before their offer arrived.
    cancelled_early: BoundedIds,
    writer: tokio::task::JoinHandle<()>,
    /// Replays of resumed jobs, stopped if the connection ends first.
    relinks: Vec<tokio::task::JoinHandle<()>>,
}

/// What kind of job is being started.
enum Kind {
    /// Exec and eval: journaled, with their output streams on this connection.
    Journaled {
        streams: [u64; 2],
        on_disconnect: OnDisconnect,
    },
    /// Ship and fetch, with their binary stream.
    Transfer { stream: u64 },
}

async fn write_loop(mut writer: ConnectionWriter, mut rx: mpsc::Receiver<Out>, dead: CancellationToken) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Out::Message(m) => writer.send(&*m).await,
            Out::Data(stream, data) => writer.send_binary(stream, &data).await,
            Out::Chunk(chunk, stream) => writer.send_chunk(chunk, stream).await,
        };
        if let Err(e) = sent {
            tracing::debug!("write to hub failed: {e}");
            dead.cancel();
            // Keep draining so job tasks never block on a full channel.
            while rx.recv().await.is_some() {}
            return;
        }
    }
    writer.close().await;
}

/// A set of job ids that forgets its oldest entries past a capacity. Used for the ids this worker has
/// accepted (so a re-offer after a reconnect is answered instead of run twice; re-offers come within
/// seconds) and for cancels that arrived before their offer.
pub(crate) struct BoundedIds {
    ids: HashSet<String>,
    order: std::collections::VecDeque<String>,
    capacity: usize,
}

/// Accepted job ids remembered across reconnects.
const SEEN_CAPACITY: usize = 10_000;

/// Early cancels remembered.
const EARLY_CANCELS: usize = 1024;

/// Full-jitter exponential backoff: the n-th wait is uniform in [0, min(cap, base·2ⁿ)].
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    pub attempt: u32,
}

impl Backoff {
    pub fn next(&mut self) -> Duration {
        let ceiling = BACKOFF_BASE
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_CAP);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(cla_common::util::unit_random())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests;
