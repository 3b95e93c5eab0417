//! The hub: where workers connect, jobs are created and routed, and admins ask questions.
//!
//! - [`server`]: the HTTP + WebSocket listener (axum) and [`server::run`].
//! - [`session`]: one task per connected worker (handshake, heartbeats, frames in and out).
//! - [`jobs`]: the job engine: lifecycle, scheduler, dispatch, live streams, the transfer relay, resumption.
//! - [`api`]: registration endpoints; [`admin`]: the admin API and the live exec stream.
//! - `control`: `cla-hub worker drain|disable|enable|shutdown|unregister`.
//! - [`listener`]: TCP and TLS, each connection tagged with its peer, and HTTP/1 on each; [`gate`]: the
//!   caps on connections that have not authenticated; [`guard`]: the registration rate limit and audit
//!   log; `rotate`: token rotation.
//! - [`store`]: the embedded store (redb).
//!
//! The hub talks to workers only through `cla-protocol`: it links no worker code. Its admin clients
//! (`cla-client`) are a crate of their own.
//!
//! The hub never binds ports or installs signal handlers itself: `server::run` gets a listener and a
//! shutdown token.

pub mod admin;
pub mod api;
mod control;
pub mod error;
pub mod gate;
pub mod guard;
pub mod jobs;
pub mod listener;
mod rotate;
pub mod server;
pub mod session;
pub mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cla_protocol::{Hello, HubMessage};
use store::Store;

/// Settings of a running hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    /// Ping interval; 3 silent intervals mark a worker OFFLINE.
    pub heartbeat: Duration,
    /// Output kept per job and stream for `job show` (the live stream is not cut).
    pub max_output_bytes: usize,
    /// How long the jobs of a disconnected worker wait for it to come back before they are `lost`.
    pub lost_after: Duration,
    /// How long a worker has to accept or refuse an offer before the job is offered elsewhere.
    pub offer_lease: Duration,
    /// Worker handshakes in progress at once; more are refused with `busy` and a `retry_after` (a
    /// restarted hub sheds the reconnect storm instead of drowning in it).
    pub max_handshakes: usize,
    /// Serve HTTPS/WSS with this identity; `None` is plain HTTP.
    pub tls: Option<TlsOptions>,
    /// Failed registrations allowed per source address and minute before it gets `429` (0: no limit).
    pub register_failures_per_minute: u32,
    /// Caps on connections that have not authenticated; `None`: from the open file limit
    /// ([`gate::GateLimits::for_file_limit`]).
    pub pending_connections: Option<gate::GateLimits>,
    /// How long a client has to send a request's head ([`listener::DEFAULT_HEADER_TIMEOUT`]).
    pub header_timeout: Duration,
    /// After a restart, how long a queued job that a client was streaming waits for that client to
    /// re-attach before it is cancelled (it is not started meanwhile).
    pub client_grace: Duration,
}

/// Where the hub's certificate comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM certificate chain and private key; with neither, a self-signed pair in `DATA_DIR/tls/`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Extra names (host names, IP addresses) for a self-signed certificate made now.
    pub names: Vec<String>,
    /// Require workers to present the client certificate issued at their registration.
    pub mtls: bool,
}

impl HubConfig {
    /// Defaults for a data dir: 5 s heartbeat, 1 MiB of output kept per stream.
    pub fn new(data_dir: PathBuf) -> Self {
        HubConfig {
            data_dir,
            heartbeat: Duration::from_secs(5),
            max_output_bytes: 1 << 20,
            lost_after: Duration::from_secs(300),
            offer_lease: Duration::from_secs(30),
            max_handshakes: 128,
            tls: None,
            register_failures_per_minute: 10,
            pending_connections: None,
            header_timeout: listener::DEFAULT_HEADER_TIMEOUT,
            client_grace: Duration::from_secs(30),
        }
    }
}

pub use cla_protocol::api::HubFile;
pub use error::{Error, Result};

/// Default data dir: the platform's data dir for `cla-hub` (e.g. `~/.local/share/cla-hub`).
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "cla-hub")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".cla-hub"))
}

/// Frames the session writer sends to its worker. Both kinds are boxed: a session's channel allocates
/// room for 32 items up front, and with a `HubMessage` inline that was 5 KiB for every connected worker,
/// idle or not (a sixth of a 10,000-worker hub's memory).
#[derive(Debug)]
pub(crate) enum Outbound {
    Message(Box<HubMessage>),
    /// A chunk of a ship's file data (it carries its stream id).
    Chunk(Box<cla_protocol::Chunk>),
}

// Kept small on purpose (see above).
const _: () = assert!(std::mem::size_of::<Outbound>() <= 16);

impl Outbound {
    pub fn message(m: HubMessage) -> Outbound {
        Outbound::Message(Box::new(m))
    }
}

/// A connected worker, as the hub tracks it.
pub(crate) struct Session {
    pub id: String,
    pub session: String,
    pub tx: mpsc::Sender<Outbound>,
    pub hello: Hello,
    pub connected_since: String,
    pub running: HashSet<String>,
    /// The transfers among `running` (they have their own limit instead of the worker's capacity).
    pub transfers: HashSet<String>,
    pub draining: bool,
    /// `cla-hub worker disable`: offered nothing.
    pub disabled: bool,
    /// Binary stream id → (job id, admin stream id: stdout or stderr).
    pub streams: HashMap<u64, (String, u64)>,
    pub next_stream: u64,
    /// Cancelled to close this session (unregister, replacement, hub shutdown).
    pub close: CancellationToken,
    /// The worker connected with its token from before a rotation (it never saved the new one).
    pub old_token: bool,
}

impl Session {
    /// The exec and eval jobs running: what counts against the worker's `capacity` (transfers do not).
    pub(crate) fn exec_running(&self) -> usize {
        self.running.len() - self.transfers.len()
    }
}

/// Everything that changes while the hub runs, under one lock (held briefly, never across an await).
#[derive(Default)]
pub(crate) struct State {
    pub sessions: HashMap<String, Session>,
    pub jobs: HashMap<String, jobs::LiveJob>,
    pub queue: VecDeque<String>,
}

/// How long [`Hub::registered`] reuses what it read.
const REGISTRY_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The hub's shared state.
pub struct Hub {
    pub(crate) store: Box<dyn Store>,
    pub(crate) cfg: HubConfig,
    pub(crate) admin_hash: String,
    pub(crate) shutdown: CancellationToken,
    state: Mutex<State>,
    /// This hub, for the timers it starts (they hold it weakly: they do not keep it alive).
    pub(crate) me: std::sync::Weak<Hub>,
    /// Numbers each disconnect of a job, so a grace timer ends only the disconnect it was set for.
    pub(crate) epochs: std::sync::atomic::AtomicU64,
    /// Worker handshakes in progress (see [`HubConfig::max_handshakes`]).
    pub(crate) handshakes: std::sync::atomic::AtomicUsize,
    /// Failed registrations per source.
    pub(crate) register_limit: guard::FailureLimit,
    /// `DATA_DIR/audit.log`.
    pub(crate) audit: guard::Audit,
    /// Admin requests waiting for a worker's answer to `rotate`.
    pub(crate) rotations: Mutex<HashMap<String, rotate::RotationAnswer>>,
    /// Issues workers' client certificates (TLS hubs only).
    pub(crate) client_ca: Option<cla_common::tls::ClientCa>,
    /// The registered workers as last read, and when: waiting reasons name offline workers from it
    /// (see [`Hub::registered`]).
    registry: Mutex<Option<(std::time::Instant, Arc<Vec<store::WorkerRecord>>)>>,
}

impl Hub {
    pub(crate) fn new(
        store: Box<dyn Store>,
        cfg: HubConfig,
        admin_hash: String,
        shutdown: CancellationToken,
        client_ca: Option<cla_common::tls::ClientCa>,
    ) -> Arc<Hub> {
        Arc::new_cyclic(|me| Hub {
            store,
            register_limit: guard::FailureLimit::new(cfg.register_failures_per_minute),
            audit: guard::Audit::new(&cfg.data_dir),
            rotations: Default::default(),
            client_ca,
            cfg,
            admin_hash,
            shutdown,
            state: Mutex::new(State::default()),
            me: me.clone(),
            epochs: Default::default(),
            handshakes: Default::default(),
            registry: Default::default(),
        })
    }

    /// The registered workers, read from the store at most once per [`REGISTRY_TTL`]: waiting
    /// reasons, computed at every dispatch pass for every waiting job, name offline workers from it
    /// without a store scan each time. A reason may lag a registration by that long.
    pub(crate) fn registered(&self) -> Arc<Vec<store::WorkerRecord>> {
        let mut cache = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, workers)) = cache.as_ref()
            && at.elapsed() < REGISTRY_TTL
        {
            return Arc::clone(workers);
        }
        let workers = Arc::new(self.store.workers().unwrap_or_else(|e| {
            tracing::error!("reading the registered workers: {e}");
            Vec::new()
        }));
        *cache = Some((std::time::Instant::now(), Arc::clone(&workers)));
        workers
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough data (no invariant spans two fields
        // that a panic could split), so keep serving rather than poisoning every later request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
