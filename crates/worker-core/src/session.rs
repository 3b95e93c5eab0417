//! The worker's life on the wire: connect out to the hub, say `hello`, take requests until the
//! connection drops, then reconnect with capped, fully jittered exponential backoff (0.5 s → 60 s; reset
//! after a successful handshake). SIGINT/SIGTERM drains: no new jobs, running ones get a deadline, then
//! the kill ladder.
//!
//! Jobs outlive the connection they came on. Exec and eval output and results go through a [`Journal`]
//! (spooled on disk until the hub acknowledges the end); a transfer's pieces go through its
//! [`transfer::Leg`] (kept in memory until the far end has them). After a reconnect the worker lists
//! its jobs in `hello.resume` and sends what the hub missed.

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

/// Backoff bounds (DESIGN.md §4).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// How long the handshake may take once connected.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Re-reads tags and envs (on SIGHUP): the config file again, with the command line still winning.
pub type Reload = Arc<dyn Fn() -> Result<WorkerSettings> + Send + Sync>;

/// Options of `cla-worker run` that are not part of the config.
#[derive(Clone)]
pub struct RunOptions {
    /// On SIGINT/SIGTERM, how long running jobs may take before they are killed.
    pub drain_timeout: Duration,
    /// Wait a random time up to this before the first connection (a fleet started at once spreads out).
    pub startup_jitter: Duration,
    /// Where to keep the status `cla-worker status` reads.
    pub status_file: Option<std::path::PathBuf>,
    /// What SIGHUP does; `None` ignores it.
    pub reload: Option<Reload>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            drain_timeout: Duration::from_secs(30),
            startup_jitter: Duration::ZERO,
            status_file: None,
            reload: None,
        }
    }
}

/// SIGHUP as a stream (never fires where there is no SIGHUP).
struct Hup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hup {
    fn new() -> Hup {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            Hup { signal }
        }
        #[cfg(not(unix))]
        Hup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.signal.as_mut() {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// Applies a reload to the settings; returns the new tags and envs if they changed.
fn reload(
    opts: &RunOptions,
    settings: &mut WorkerSettings,
    reporter: &Reporter,
) -> Option<(Vec<String>, Vec<String>)> {
    let f = opts.reload.as_ref()?;
    let fresh = f().map(|fresh| {
        if fresh.policy != settings.policy {
            tracing::info!("SIGHUP: policy reloaded");
            settings.policy = fresh.policy.clone();
        }
        (fresh.tags, fresh.envs)
    });
    match fresh {
        Ok((tags, envs)) if tags != settings.tags || envs != settings.envs => {
            tracing::info!(?tags, ?envs, "SIGHUP: tags/envs reloaded");
            settings.tags = tags.clone();
            settings.envs = envs.clone();
            reporter.update(|s| {
                s.tags = tags.clone();
                s.envs = envs.clone();
            });
            Some((tags, envs))
        }
        Ok(_) => {
            tracing::info!("SIGHUP: config reloaded, tags and envs unchanged");
            None
        }
        Err(e) => {
            tracing::warn!("SIGHUP: config not reloaded: {e}");
            None
        }
    }
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
    let s = &settings;
    let reporter = Arc::new(Reporter::new(
        opts.status_file.clone(),
        &s.id,
        &s.url,
        s.capacity,
        &s.tags,
        &s.envs,
    ));
    let mut hup = Hup::new();
    let mut backoff = Backoff::default();
    let spool = Arc::new(Spool::open(&settings.spool_dir, settings.spool_max_bytes)?);
    let mut worker = WorkerJobs::new(spool);
    worker.masks = masks_of(&settings)?;
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
                    // Applied with the next hello.
                    reload(&opts, &mut settings, &reporter);
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

/// The masks of `settings`, logging what cannot be masked.
fn masks_of(settings: &WorkerSettings) -> Result<Masks> {
    let (masks, warnings) = settings.masks().map_err(Error::Usage)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(masks)
}

/// After the hub deleted this worker's registration: removes it from the config file it came from.
fn forget_registration(s: &WorkerSettings, reason: &str) {
    match &s.source {
        Some(path) => match cla_config::save::remove_registration(path, &s.id) {
            Ok(true) => tracing::warn!(
                "registration {} removed from {} ({reason}); register again with `cla-worker register`",
                s.id,
                path.display()
            ),
            Ok(false) => tracing::warn!("registration {} was not in {} ({reason})", s.id, path.display()),
            Err(e) => tracing::error!(
                "could not remove registration {} from {}: {e}",
                s.id,
                path.display()
            ),
        },
        None => tracing::warn!(
            "registration {} deleted by the hub ({reason}); it came from flags, not a config file",
            s.id
        ),
    }
}

/// A new token from the hub (`cla-hub worker rotate`): saved into the config file the old one came from,
/// then used for every later connection. If it cannot be saved, the old token stays (the hub undoes the
/// rotation when told so).
fn save_rotated_token(s: &mut WorkerSettings, token: cla_common::secret::Secret) -> WorkerMessage {
    let result = match &s.token_file {
        None => Err(
            "its token was given with --token or CLA_WORKER_TOKEN, not read from a config file: \
                     register with --save, or rotate by registering again"
                .to_owned(),
        ),
        Some(path) => cla_config::save::replace_token(path, &s.id, &token)
            .map(|()| path.display().to_string())
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(place) => {
            tracing::info!("the hub rotated this worker's token: the new one is saved in {place}");
            s.token = token;
            WorkerMessage::Rotated {
                saved: true,
                message: place,
            }
        }
        Err(why) => {
            tracing::warn!("the hub sent a new token, which cannot be saved: {why}; keeping the old one");
            WorkerMessage::Rotated {
                saved: false,
                message: why,
            }
        }
    }
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
                RejectCode::Version => Err(Error::Other(format!(
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

impl Keep {
    fn is_transfer(&self) -> bool {
        matches!(self, Keep::Leg(_))
    }

    /// The job's end is kept (the task may not have marked its entry yet).
    async fn ended(&self) -> bool {
        match self {
            Keep::Journal(j) => j.ended().await,
            Keep::Leg(l) => l.ended(),
        }
    }

    /// Keeps the job's end and sends it if connected.
    async fn finish(&self, result: JobResult) {
        match self {
            Keep::Journal(j) => j.finish(result).await,
            Keep::Leg(l) => l.finish(result).await,
        }
    }
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

impl WorkerJobs {
    fn new(spool: Arc<Spool>) -> WorkerJobs {
        WorkerJobs {
            table: Arc::default(),
            tracker: TaskTracker::new(),
            spool,
            routes: Arc::default(),
            seen: BoundedIds::new(SEEN_CAPACITY),
            epoch: Arc::default(),
            masks: Masks::none(),
        }
    }

    /// Takes in the journals a previous process left in the spool; a job without an end is lost.
    async fn recover(&mut self) {
        for journal in self.spool.recover() {
            journal
                .end_if_unfinished("the worker process stopped while the job ran (killed or crashed); its processes may have outlived it")
                .await;
            tracing::info!(job = %journal.job, "found in the spool: its end goes to the hub on connect");
            self.seen.insert(journal.job.clone());
            self.table.lock().expect("jobs lock").insert(
                journal.job.clone(),
                Taken {
                    cancel: CancellationToken::new(),
                    keep: Keep::Journal(journal),
                    on_disconnect: OnDisconnect::Continue,
                    ended: true,
                },
            );
        }
    }

    /// The jobs to name in `hello.resume`: all of them, running or ended.
    fn resumable(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.table.lock().expect("jobs lock").keys().cloned().collect();
        ids.sort();
        ids
    }

    fn running(&self) -> u32 {
        running(&self.table)
    }

    /// Stopping without a connection: running jobs get `timeout`, then are cancelled.
    async fn drain_offline(&self, timeout: Duration) {
        self.tracker.close();
        let running = self.running();
        if running == 0 {
            return;
        }
        tracing::info!(
            running,
            "draining while disconnected: running jobs get {timeout:?}"
        );
        if tokio::time::timeout(timeout, self.tracker.wait()).await.is_err() {
            tracing::warn!("drain deadline passed: cancelling running jobs");
            self.stop_all().await;
        }
    }

    /// Cancels every running job and waits until their tasks are over (takes no new ones after).
    async fn stop_all(&self) {
        for t in self.table.lock().expect("jobs lock").values() {
            t.cancel.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// How long a worker stays idle before it returns its free heap to the OS.
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(2);

fn running(table: &Table) -> u32 {
    table
        .lock()
        .expect("jobs lock")
        .values()
        .filter(|t| !t.ended)
        .count() as u32
}

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

impl<'w> Live<'w> {
    fn new(
        s: &WorkerSettings,
        writer: ConnectionWriter,
        reporter: Arc<Reporter>,
        heartbeat: Duration,
        opts: RunOptions,
        worker: &'w mut WorkerJobs,
    ) -> Live<'w> {
        let (tx, rx) = mpsc::channel(256);
        let dead = CancellationToken::new();
        let writer = tokio::spawn(write_loop(writer, rx, dead.clone()));
        worker.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Live {
            reporter,
            heartbeat,
            opts,
            ctx: ExecCtx {
                worker_id: s.id.clone(),
                hub_url: s.url.clone(),
                tags: s.tags.clone(),
                envs: s.envs.clone(),
                workdir: s.workdir.clone(),
                out: tx,
                routes: worker.routes.clone(),
                policy: Arc::new(Enforcer::new(s.policy.clone(), s.source.clone())),
                masks: worker.masks.clone(),
            },
            capacity: s.capacity as usize,
            worker,
            dead,
            cancelled_early: BoundedIds::new(EARLY_CANCELS),
            writer,
            relinks: Vec::new(),
        }
    }

    async fn send(&self, msg: WorkerMessage) {
        let _ = self.ctx.out.send(Out::msg(msg)).await;
    }

    /// Takes back the jobs the hub still wants after a reconnect (each replays what the hub missed, in
    /// its own task), and gives up those it does not.
    async fn resume(&mut self, wanted: &[Resumed]) {
        let wanted: HashMap<&str, &Resumed> = wanted.iter().map(|r| (r.job.as_str(), r)).collect();
        let mut dropped = Vec::new();
        let mut relinks = Vec::new();
        let mut messages = Vec::new();
        {
            let mut table = self.worker.table.lock().expect("jobs lock");
            table.retain(|id, t| {
                if let Some(r) = wanted.get(id.as_str()) {
                    match &t.keep {
                        Keep::Journal(journal) => {
                            let (journal, r) = (journal.clone(), (*r).clone());
                            let link = Link {
                                out: self.ctx.out.clone(),
                                streams: [r.stdout, r.stderr],
                            };
                            relinks.push(tokio::spawn(async move { journal.relink(link, &r).await }));
                        }
                        // The rest follows the hub's `resume` (see `Live::relink_transfer`).
                        Keep::Leg(leg) => messages.extend(leg.resume_messages()),
                    }
                    return true;
                }
                // The hub ended the job meanwhile (its end stored, cancelled, lost): stop it and forget it.
                if t.ended {
                    tracing::debug!(job = %id, "the hub has this job's end: dropping it");
                } else {
                    tracing::warn!(job = %id, "the hub no longer has this job: stopping it and dropping it");
                }
                t.cancel.cancel();
                dropped.push(t.keep.clone());
                false
            });
        }
        self.relinks = relinks;
        for m in messages {
            let _ = self.ctx.out.send(m).await;
        }
        for k in dropped {
            if let Keep::Journal(j) = k {
                j.remove().await;
            }
        }
        self.reporter.update(|s| s.running = running(&self.worker.table));
    }

    async fn serve(
        &mut self,
        reader: &mut ConnectionReader,
        shutdown: &CancellationToken,
        settings: &mut WorkerSettings,
        hup: &mut Hup,
    ) -> End {
        let opts = &self.opts.clone();
        let silence = self.heartbeat * 3;
        // Draining: no new jobs; the worker stops once the running ones end. A signal drains with a
        // deadline (then the kill ladder); the hub's `drain` without one.
        let mut draining = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut bad = cla_protocol::connection::BadFrames::default();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                    let running = self.worker.running();
                    tracing::info!(running, "draining: no new jobs; running ones get {:?}", opts.drain_timeout);
                    if !draining {
                        self.start_draining().await;
                        draining = true;
                    }
                    drain_deadline = Some(tokio::time::Instant::now() + opts.drain_timeout);
                    continue;
                }
                _ = self.worker.tracker.wait(), if draining => return End::Shutdown,
                _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                    tracing::warn!("drain deadline passed: cancelling running jobs");
                    self.worker.stop_all().await;
                    return End::Shutdown;
                }
                _ = self.dead.cancelled() => return lost("connection to the hub failed".into()),
                _ = hup.recv() => {
                    let changed = reload(opts, settings, &self.reporter);
                    self.ctx.policy = Arc::new(Enforcer::new(settings.policy.clone(), settings.source.clone()));
                    if let Ok(masks) = masks_of(settings) {
                        self.ctx.masks = masks.clone();
                        self.worker.masks = masks;
                    }
                    if let Some((tags, envs)) = changed {
                        self.ctx.tags = tags.clone();
                        self.ctx.envs = envs.clone();
                        self.send(WorkerMessage::Update { tags, envs }).await;
                    }
                    continue;
                }
                r = tokio::time::timeout(silence, reader.read()) => r,
            };
            let frame = match incoming {
                Err(_) => return lost(format!("no word from the hub for {silence:?}")),
                Ok(Err(e)) => return lost(e.to_string()),
                Ok(Ok(None)) => return lost("the hub closed the connection".into()),
                Ok(Ok(Some(Incoming::Alive))) => continue,
                Ok(Ok(Some(Incoming::Frame(f)))) => f,
            };
            let text = match frame {
                Frame::Text(t) => t,
                Frame::Binary(chunk) => {
                    let stream = chunk.stream();
                    if !transfer::route(&self.ctx.routes, None, Some(stream), Piece::Data(chunk)) {
                        tracing::debug!(stream, "binary frame for no running transfer ignored");
                    }
                    continue;
                }
            };
            let msg = match decode_text::<HubMessage>(&text) {
                Ok(m) => m,
                Err(e) => {
                    let code = match e {
                        ProtocolError::UnknownType(_) => ErrorCode::Unsupported,
                        _ => ErrorCode::Malformed,
                    };
                    tracing::warn!("{e}");
                    if bad.record() {
                        return lost(format!(
                            "the hub sent more than {} malformed or unsupported frames within {:?}",
                            cla_protocol::connection::MAX_BAD_FRAMES,
                            cla_protocol::connection::BAD_FRAME_WINDOW
                        ));
                    }
                    self.send(WorkerMessage::Error {
                        code,
                        message: e.to_string(),
                    })
                    .await;
                    continue;
                }
            };
            match msg {
                HubMessage::Exec(req) => {
                    let kind = Kind::Journaled {
                        streams: [req.stdout, req.stderr],
                        on_disconnect: req.on_disconnect,
                    };
                    let (job, what) = (req.job.clone(), req.command.display());
                    let denied = self.ctx.policy.verb("exec").err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Journal(journal) = keep else {
                            unreachable!("exec jobs have a journal")
                        };
                        exec::handle(req, &ctx, journal, cancel).await
                    };
                    self.start_job(job, what, kind, draining, denied, work).await
                }
                HubMessage::Eval(req) => {
                    let kind = Kind::Journaled {
                        streams: [req.stdout, 0],
                        on_disconnect: req.on_disconnect,
                    };
                    let (job, what) = (
                        req.job.clone(),
                        format!("eval ({} bytes of JavaScript)", req.code.len()),
                    );
                    let denied = self.ctx.policy.verb("eval").err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Journal(journal) = keep else {
                            unreachable!("eval jobs have a journal")
                        };
                        eval::handle(req, &ctx, journal, cancel).await
                    };
                    self.start_job(job, what, kind, draining, denied, work).await
                }
                HubMessage::Ship(req) => {
                    let (job, what, stream) = (req.job.clone(), format!("ship → {}", req.dest), req.stream);
                    let policy = &self.ctx.policy;
                    let denied = policy
                        .verb("ship")
                        .and_then(|()| {
                            let dest = std::path::Path::new(&req.dest);
                            policy.path("ship", Access::Write, dest, self.ctx.workdir.as_deref())
                        })
                        .err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Leg(leg) = keep else {
                            unreachable!("transfers have a leg")
                        };
                        transfer::ship(req, &ctx, leg, cancel).await
                    };
                    self.start_job(job, what, Kind::Transfer { stream }, draining, denied, work)
                        .await
                }
                HubMessage::Fetch(req) => {
                    let (job, what, stream) = (req.job.clone(), format!("fetch {}", req.path), req.stream);
                    let policy = &self.ctx.policy;
                    let denied = policy
                        .verb("fetch")
                        .and_then(|()| {
                            let path = std::path::Path::new(&req.path);
                            policy.path("fetch", Access::Read, path, self.ctx.workdir.as_deref())
                        })
                        .err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Leg(leg) = keep else {
                            unreachable!("transfers have a leg")
                        };
                        transfer::fetch(req, &ctx, leg, cancel).await
                    };
                    self.start_job(job, what, Kind::Transfer { stream }, draining, denied, work)
                        .await
                }
                HubMessage::Ack { job } => self.acknowledged(&job).await,
                HubMessage::Transfer(TransferFrame {
                    job,
                    op: TransferOp::Resume { received },
                }) => self.relink_transfer(&job, received),
                HubMessage::Transfer(TransferFrame { job, op }) => {
                    if !transfer::route(&self.ctx.routes, Some(&job), None, Piece::Op(op)) {
                        tracing::debug!(job = %job, "transfer frame for no running transfer ignored");
                    }
                }
                HubMessage::Cancel { job, reason } => {
                    match self.worker.table.lock().expect("jobs lock").get(&job) {
                        Some(t) => {
                            tracing::info!(job = %job, "cancel: {reason}");
                            t.cancel.cancel();
                        }
                        None => {
                            // The offer may still be on its way (sent after the cancel): remember it, bounded.
                            tracing::debug!(job = %job, "cancel for a job not running here (yet)");
                            self.cancelled_early.insert(job);
                        }
                    }
                }
                HubMessage::Drain { reason } => {
                    let running = self.worker.running();
                    tracing::warn!(
                        running,
                        "the hub asked this worker to drain ({reason}): no new jobs; exiting when the running ones end"
                    );
                    if !draining {
                        self.start_draining().await;
                        draining = true;
                    }
                }
                HubMessage::Unregistered { reason } => {
                    tracing::warn!(
                        "the hub deleted this worker's registration ({reason}): cancelling its jobs and exiting"
                    );
                    self.worker.stop_all().await;
                    return End::Unregistered(reason);
                }
                HubMessage::Shutdown { reason } => {
                    tracing::warn!("the hub ordered a shutdown: {reason}");
                    self.worker.stop_all().await;
                    return End::HubShutdown(reason);
                }
                HubMessage::Rotate { token } => {
                    let answer = save_rotated_token(settings, token);
                    self.send(answer).await;
                }
                HubMessage::Error { code, message } => tracing::warn!(?code, "hub reported: {message}"),
                HubMessage::Welcome(_) | HubMessage::Reject(_) => {
                    tracing::debug!("handshake message mid-session ignored")
                }
            }
        }
    }

    /// Stops taking jobs: tells the hub, the status file, and closes the tracker (so it can run empty).
    async fn start_draining(&mut self) {
        self.send(WorkerMessage::Draining).await;
        self.reporter.state(ConnState::Draining, None);
        self.worker.tracker.close();
    }

    /// The hub has stored the job's end: forget it.
    async fn acknowledged(&mut self, job: &str) {
        let keep = self
            .worker
            .table
            .lock()
            .expect("jobs lock")
            .get(job)
            .map(|t| t.keep.clone());
        let Some(keep) = keep else { return };
        // The task marks its entry ended only after `finished` went out, so the ack can come first:
        // the journal (or leg) knows.
        if !keep.ended().await {
            return;
        }
        let removed = self.worker.table.lock().expect("jobs lock").remove(job);
        if let Some(Keep::Journal(j)) = removed.map(|t| t.keep) {
            j.remove().await;
            tracing::debug!(job, "end acknowledged by the hub; spool dropped");
        }
    }

    /// The hub resumed a transfer and has `received` units of its pieces: the leg sends what follows,
    /// in its own task (the replay may be up to a window).
    fn relink_transfer(&mut self, job: &str, received: u64) {
        let taken = self
            .worker
            .table
            .lock()
            .expect("jobs lock")
            .get(job)
            .map(|t| (t.keep.clone(), t.cancel.clone()));
        let Some((Keep::Leg(leg), cancel)) = taken else {
            tracing::debug!(job, "resume for a transfer not kept here ignored");
            return;
        };
        let out = self.ctx.out.clone();
        self.relinks.push(tokio::spawn(async move {
            if let Err(e) = leg.relink(out, received).await {
                tracing::error!(job = %leg.job, "{e}: cancelling it");
                cancel.cancel();
            }
        }));
    }

    /// Accepts (or refuses) an offered job and runs `work` for it as a tracked task.
    /// `denied`: the local policy's refusal, if it refuses the job: it is accepted (so that the hub does not
    /// offer it elsewhere) and ends at once with the `policy` error, having done nothing.
    async fn start_job<F, Fut>(
        &mut self,
        job: String,
        what: String,
        kind: Kind,
        draining: bool,
        denied: Option<String>,
        work: F,
    ) where
        F: FnOnce(ExecCtx, Keep, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobResult> + Send + 'static,
    {
        let is_transfer = matches!(kind, Kind::Transfer { .. });
        if !self.worker.seen.insert(job.clone()) {
            // Taken here before (a late answer to an offer whose lease ran out, or a transfer stopped by
            // a dropped connection): never run twice here; refusing lets the hub place it elsewhere.
            tracing::warn!(job = %job, "job offered again; not running it twice");
            let reason = "this worker took the job before; it does not run it twice".to_owned();
            self.send(WorkerMessage::Refused { job, reason }).await;
            return;
        }
        if self.cancelled_early.remove(&job) {
            let result = JobResult::not_run(job, Outcome::Cancelled, "cancelled before it started");
            self.send(WorkerMessage::Finished(result)).await;
            return;
        }
        let busy = self
            .worker
            .table
            .lock()
            .expect("jobs lock")
            .values()
            .filter(|t| !t.ended && t.keep.is_transfer() == is_transfer)
            .count();
        let limit = if is_transfer {
            cla_transfer::MAX_CONCURRENT
        } else {
            self.capacity
        };
        let refusal = if draining {
            Some("the worker is draining".to_owned())
        } else if busy >= limit {
            let what = if is_transfer { "transfers" } else { "capacity" };
            Some(format!("at {what} limit ({busy}/{limit})"))
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.worker.seen.remove(&job);
            self.send(WorkerMessage::Refused { job, reason }).await;
            return;
        }
        // The journal (and its spool file) exists before the hub hears the job is taken.
        let (keep, on_disconnect) = match kind {
            Kind::Journaled {
                streams,
                on_disconnect,
            } => {
                let link = Link {
                    out: self.ctx.out.clone(),
                    streams,
                };
                (
                    Keep::Journal(Journal::create(&self.worker.spool, &job, link)),
                    on_disconnect,
                )
            }
            Kind::Transfer { stream } => (
                Keep::Leg(transfer::Leg::new(&job, stream, self.ctx.out.clone())),
                OnDisconnect::Continue,
            ),
        };
        self.send(WorkerMessage::Accepted { job: job.clone() }).await;
        let cancel = CancellationToken::new();
        self.worker.table.lock().expect("jobs lock").insert(
            job.clone(),
            Taken {
                cancel: cancel.clone(),
                keep: keep.clone(),
                on_disconnect,
                ended: false,
            },
        );
        let (ctx, table, reporter) = (self.ctx.clone(), self.worker.table.clone(), self.reporter.clone());
        reporter.update(|s| s.running = running(&table));
        let span = tracing::info_span!("job", job_id = %job);
        self.worker.tracker.spawn(tracing::Instrument::instrument(
            async move {
                let result = match denied {
                    Some(why) => {
                        tracing::warn!("refused {what}: {why}");
                        JobResult::refused_by_policy(job, why)
                    }
                    None => {
                        tracing::info!("running {what}");
                        let masks = ctx.masks.clone();
                        let mut result = work(ctx, keep.clone(), cancel).await;
                        // Secrets never leave in a result either.
                        result.error = result.error.map(|e| masks.text(&e));
                        if let Some(ev) = result.eval.as_mut() {
                            crate::eval::mask_output(&masks, ev);
                        }
                        result
                    }
                };
                tracing::info!(outcome = ?result.outcome, rc = ?result.rc, ms = result.duration_ms, "finished");
                let job = result.job.clone();
                // Sent (now, or after a reconnect) and kept until the hub's ack.
                keep.finish(result).await;
                if let Some(t) = table.lock().expect("jobs lock").get_mut(&job) {
                    t.ended = true;
                }
                let now_running = running(&table);
                reporter.update(|s| s.running = now_running);
                if now_running == 0 {
                    // Idle: once it has stayed so for a moment, hand back the memory busy times took.
                    let table = table.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(IDLE_TRIM_AFTER).await;
                        if running(&table) == 0 {
                            cla_common::util::release_free_memory();
                        }
                    });
                }
            },
            span,
        ));
    }

    /// Ends the session. When the connection was lost, the writer may be stuck in a write to a peer that
    /// is gone: it is aborted first, so tasks sending to it fail at once. Jobs go on, their journals and
    /// legs keeping what they produce for the next connection, unless their policy cancels them after a
    /// while.
    async fn finish(self, connection_lost: bool) {
        if connection_lost {
            self.writer.abort();
        }
        for r in &self.relinks {
            r.abort();
        }
        let kept: Vec<Keep> = {
            let table = self.worker.table.lock().expect("jobs lock");
            let epoch = self.worker.epoch.load(std::sync::atomic::Ordering::SeqCst);
            for (id, t) in table.iter().filter(|(_, t)| !t.ended) {
                match t.on_disconnect {
                    OnDisconnect::Continue => {}
                    OnDisconnect::CancelAfter(secs) => {
                        let (cancel, epochs, id) = (t.cancel.clone(), self.worker.epoch.clone(), id.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(secs)).await;
                            if epochs.load(std::sync::atomic::Ordering::SeqCst) == epoch {
                                tracing::warn!(job = %id, "still disconnected after {secs}s: cancelling the job (its on_disconnect policy)");
                                cancel.cancel();
                            }
                        });
                    }
                }
            }
            table.values().map(|t| t.keep.clone()).collect()
        };
        for k in kept {
            match k {
                Keep::Journal(j) => j.unlink().await,
                Keep::Leg(l) => l.detach().await,
            }
        }
        drop(self.ctx);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer).await;
    }
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

impl BoundedIds {
    fn new(capacity: usize) -> Self {
        BoundedIds {
            ids: HashSet::new(),
            order: Default::default(),
            capacity,
        }
    }

    /// Records `id`; false if it was known already.
    fn insert(&mut self, id: String) -> bool {
        if !self.ids.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }

    /// Forgets `id`; true if it was known.
    fn remove(&mut self, id: &str) -> bool {
        let known = self.ids.remove(id);
        if known {
            self.order.retain(|o| o != id);
        }
        known
    }
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
mod tests {
    use super::*;

    #[test]
    fn bounded_ids_forget_the_oldest() {
        let mut ids = BoundedIds::new(2);
        assert!(ids.insert("a".into()) && ids.insert("b".into()));
        assert!(!ids.insert("a".into()), "known ids are reported");
        assert!(ids.insert("c".into()));
        assert!(ids.insert("a".into()), "the oldest was forgotten");
        assert!(ids.remove("c") && !ids.remove("c"));
        assert!(ids.ids.len() <= 2 && ids.order.len() <= 2);
    }

    #[test]
    fn backoff_is_bounded_and_resets() {
        let mut b = Backoff::default();
        for n in 0..40u32 {
            let w = b.next();
            let ceiling = BACKOFF_BASE.saturating_mul(1 << n.min(16)).min(BACKOFF_CAP);
            assert!(w <= ceiling, "attempt {n}: {w:?} > {ceiling:?}");
        }
        assert_eq!(b.attempt, 40);
        b.reset();
        assert!(b.next() <= BACKOFF_BASE);
    }
}
