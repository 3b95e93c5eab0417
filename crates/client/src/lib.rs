//! [`AdminClient`]: what `cla-hub` admin commands (and the demo) use to talk to a running hub — the
//! HTTP admin API plus the exec stream. Found through `--hub URL` + `CLA_HUB_TOKEN`, or `DATA_DIR/hub.json`.

mod error;
pub mod transfer;

pub use error::{Error, Result};
pub use transfer::{Update, fetch, ship};

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use tokio_util::sync::CancellationToken;

use cla_common::secret::Secret;
use cla_common::tls::Trust;
use cla_protocol::api::{
    AdminEvent, AdminRequest, HubFile, JobQuery, JobRecord, JobSpec, PasskeyCreate, PasskeyCreated,
    PasskeyRevoke, PasskeyView, STDERR_STREAM, STDOUT_STREAM, TRANSFER_STREAM, WorkerAction,
    WorkerActionDone, WorkerActionRequest, WorkerView,
};
use cla_protocol::connection::Incoming;
use cla_protocol::http::HttpClient;
use cla_protocol::{
    Chunk, Connection, ConnectionReader, ConnectionWriter, Frame, TransferFrame, decode_text,
};
use cla_transfer::{Link, Piece};

/// How long a command following a job keeps trying to reach the hub again after its connection
/// dropped, before it gives up with [`Error::HubLost`] (a hub restart takes seconds; a failover or a
/// network cut can take minutes).
pub const RECONNECT_FOR: Duration = Duration::from_secs(300);

/// What an exec stream reports as it goes.
#[derive(Debug)]
pub enum ExecEvent {
    Created(String),
    /// Still queued, for this reason.
    Waiting(String),
    Started {
        job: String,
        worker: String,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    /// The connection to the hub dropped (`why`); this is reconnect attempt `attempt` to follow `job`.
    Reconnecting {
        job: String,
        why: String,
        attempt: u32,
    },
    /// After a re-attach: `bytes` of output on `stream` that the hub did not keep (over its per-job cap)
    /// were sent while the connection was down, and are missing here.
    Missing {
        stream: u64,
        bytes: u64,
    },
}

/// A client for one hub's admin API.
#[derive(Clone)]
pub struct AdminClient {
    http: HttpClient,
    token: Secret,
    trust: Trust,
}

impl AdminClient {
    /// A client for a plain `http://` `url` with `token`.
    pub fn new(url: &str, token: Secret) -> Result<AdminClient> {
        AdminClient::with_trust(url, token, Trust::Unset)
    }

    /// A client for `url` with `token`, trusting the hub's certificate as `trust` says on `https://`.
    pub fn with_trust(url: &str, token: Secret, trust: Trust) -> Result<AdminClient> {
        Ok(AdminClient {
            http: HttpClient::with_trust(url, &trust)?,
            token,
            trust,
        })
    }

    /// A client from `--hub`/`CLA_HUB_TOKEN` (with `trust` from `--pin`/`--ca`) if given, else from
    /// `DATA_DIR/hub.json` (which carries the pin of a TLS hub).
    pub fn locate(
        hub: Option<&str>,
        token: Option<Secret>,
        trust: Trust,
        data_dir: &Path,
    ) -> Result<AdminClient> {
        if let Some(url) = hub {
            let token =
                token.ok_or_else(|| Error::Usage("--hub needs the admin token in CLA_HUB_TOKEN".into()))?;
            return AdminClient::with_trust(url, token, trust);
        }
        let path = data_dir.join("hub.json");
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::Other(format!(
                "cannot read {}: {e}; start the hub with `cla-hub serve` (same --data-dir), or pass --hub URL with CLA_HUB_TOKEN",
                path.display()
            ))
        })?;
        let file: HubFile = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Other(format!("{} is not a hub.json file: {e}", path.display())))?;
        let trust = match (&file.pin, trust) {
            (Some(pin), Trust::Unset) => Trust::Pin(cla_common::tls::Fingerprint::parse(pin)?),
            (_, given) => given,
        };
        AdminClient::with_trust(
            &file.url,
            token.unwrap_or_else(|| Secret::new(file.admin_token)),
            trust,
        )
    }

    /// The hub's base URL.
    pub fn url(&self) -> &str {
        self.http.base()
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token.expose())
    }

    async fn get<R: serde::de::DeserializeOwned>(&self, path: &str) -> Result<R> {
        Ok(self.http.get(path, &[("authorization", &self.auth())]).await?)
    }

    async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R> {
        Ok(self
            .http
            .post(path, &[("authorization", &self.auth())], body)
            .await?)
    }

    pub async fn workers(&self) -> Result<Vec<WorkerView>> {
        self.get("/api/v1/admin/workers").await
    }

    /// `cla-hub worker ACTION ID`.
    pub async fn worker_action(
        &self,
        id: &str,
        action: WorkerAction,
        req: &WorkerActionRequest,
    ) -> Result<WorkerActionDone> {
        self.post(&format!("/api/v1/admin/workers/{id}/{}", action.as_str()), req)
            .await
    }

    pub async fn passkey_create(&self, project: &str) -> Result<PasskeyCreated> {
        self.post(
            "/api/v1/admin/passkeys",
            &PasskeyCreate {
                project: project.to_owned(),
            },
        )
        .await
    }

    pub async fn passkeys(&self) -> Result<Vec<PasskeyView>> {
        self.get("/api/v1/admin/passkeys").await
    }

    pub async fn passkey_revoke(&self, passkey: &str) -> Result<PasskeyView> {
        self.post(
            "/api/v1/admin/passkeys/revoke",
            &PasskeyRevoke {
                passkey: Secret::new(passkey),
            },
        )
        .await
    }

    /// Queues a job and returns at once.
    pub async fn submit(&self, spec: &JobSpec) -> Result<JobRecord> {
        self.post("/api/v1/admin/jobs", spec).await
    }

    /// Jobs, newest first, as `q` filters them.
    pub async fn jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>> {
        self.get(&format!("/api/v1/admin/jobs{}", q.to_query())).await
    }

    pub async fn job(&self, id: &str) -> Result<JobRecord> {
        self.get(&format!("/api/v1/admin/jobs/{}", path_segment(id)?))
            .await
    }

    /// Blocks until the job has ended (in long polls of up to a minute each). A hub that cannot be
    /// reached (restarting, a network cut) is asked again with backoff for up to `reconnect_for`; past
    /// that the call fails with [`Error::HubLost`].
    pub async fn wait(&self, id: &str, reconnect_for: Duration) -> Result<JobRecord> {
        let path = format!("/api/v1/admin/jobs/{}?wait=55", path_segment(id)?);
        let mut lost: Option<(std::time::Instant, Duration)> = None;
        loop {
            let asked = std::time::Instant::now();
            let answer = self
                .http
                .request::<(), JobRecord>(
                    Method::GET,
                    &path,
                    &[("authorization", &self.auth())],
                    None,
                    Duration::from_secs(70),
                )
                .await;
            let r = match answer {
                Ok(r) => r,
                Err(
                    e @ (cla_protocol::http::HttpError::Connect { .. }
                    | cla_protocol::http::HttpError::Timeout(_)),
                ) => {
                    let (since, delay) =
                        *lost.get_or_insert((std::time::Instant::now(), Duration::from_millis(200)));
                    if since.elapsed() >= reconnect_for {
                        return Err(Error::HubLost {
                            job: id.to_owned(),
                            why: e.to_string(),
                        });
                    }
                    tokio::time::sleep(delay).await;
                    lost = Some((since, (delay * 2).min(Duration::from_secs(5))));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            lost = None;
            if r.state.is_terminal() {
                return Ok(r);
            }
            // The hub answered early without an end (it should not): do not ask again at once.
            if asked.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        self.post(&format!("/api/v1/admin/jobs/{}/cancel", path_segment(id)?), &())
            .await
    }

    /// Creates a job and streams it: `on_event` sees its id, its start and every output chunk as it
    /// arrives; the ended job is returned. When `cancel` fires, the hub is asked to cancel the job and the
    /// stream goes on until the job has really ended.
    ///
    /// Once the job exists, a dropped connection (a hub restart, a network cut) does not end the call:
    /// it reconnects with backoff for up to `reconnect_for`, re-attaches to the job and goes on from the
    /// output it has, so that no byte is shown twice and none is lost that the hub kept
    /// ([`ExecEvent::Reconnecting`], [`ExecEvent::Missing`]). Past that it fails with
    /// [`Error::HubLost`], which names the job.
    pub async fn exec(
        &self,
        spec: &JobSpec,
        cancel: CancellationToken,
        reconnect_for: Duration,
        mut on_event: impl FnMut(ExecEvent),
    ) -> Result<JobRecord> {
        let mut stream = self.open_stream(spec, cancel.clone()).await?;
        let mut follow = Follower::default();
        loop {
            let why = match follow.run(&mut stream, &mut on_event).await {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => "the hub closed the stream before the job ended".to_owned(),
                Err(Error::Api(e)) => return Err(Error::Api(e)),
                Err(e) if follow.job.is_empty() => return Err(e),
                Err(e) => e.to_string(),
            };
            stream = self
                .reattach(&follow, cancel.clone(), reconnect_for, &why, &mut on_event)
                .await?;
        }
    }

    /// Follows a job that already exists from the start of its output (`job logs --follow`), with the
    /// same reconnects as [`AdminClient::exec`].
    pub async fn follow(
        &self,
        job: &str,
        cancel: CancellationToken,
        reconnect_for: Duration,
        mut on_event: impl FnMut(ExecEvent),
    ) -> Result<JobRecord> {
        let mut follow = Follower {
            job: path_segment(job)?.to_owned(),
            ..Follower::default()
        };
        let mut stream = self.open_attach(&follow, cancel.clone()).await?;
        loop {
            let why = match follow.run(&mut stream, &mut on_event).await {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => "the hub closed the stream before the job ended".to_owned(),
                Err(Error::Api(e)) => return Err(Error::Api(e)),
                Err(e) => e.to_string(),
            };
            stream = self
                .reattach(&follow, cancel.clone(), reconnect_for, &why, &mut on_event)
                .await?;
        }
    }

    /// Reconnects to the hub and attaches to `follow`'s job from the output it has, trying with backoff
    /// (0.2 s doubling to 5 s) for up to `reconnect_for`.
    async fn reattach(
        &self,
        follow: &Follower,
        cancel: CancellationToken,
        reconnect_for: Duration,
        why: &str,
        on_event: &mut impl FnMut(ExecEvent),
    ) -> Result<JobStream> {
        let deadline = std::time::Instant::now() + reconnect_for;
        let mut delay = Duration::from_millis(200);
        let mut last = why.to_owned();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            on_event(ExecEvent::Reconnecting {
                job: follow.job.clone(),
                why: last.clone(),
                attempt,
            });
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::HubLost {
                    job: follow.job.clone(),
                    why: last,
                });
            }
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            match self.open_attach(follow, cancel.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(Error::Api(e)) => return Err(Error::Api(e)),
                Err(e) => last = e.to_string(),
            }
        }
    }

    /// Opens an exec stream that attaches to `follow`'s job from the output it has.
    async fn open_attach(&self, follow: &Follower, cancel: CancellationToken) -> Result<JobStream> {
        let url = format!("{}/api/v1/admin/exec", self.url());
        let conn = Connection::connect_with(&url, &[("authorization", &self.auth())], &self.trust).await?;
        let (mut writer, reader) = conn.split();
        writer
            .send(&AdminRequest::Attach {
                job: follow.job.clone(),
                stdout: follow.have[0],
                stderr: follow.have[1],
            })
            .await?;
        Ok(JobStream::new(writer, reader, cancel))
    }

    /// Opens the admin exec stream and creates the job on it.
    async fn open_stream(&self, spec: &JobSpec, cancel: CancellationToken) -> Result<JobStream> {
        let url = format!("{}/api/v1/admin/exec", self.url());
        let conn = Connection::connect_with(&url, &[("authorization", &self.auth())], &self.trust).await?;
        let (mut writer, reader) = conn.split();
        writer.send(&AdminRequest::Exec(Box::new(spec.clone()))).await?;
        Ok(JobStream::new(writer, reader, cancel))
    }
}

/// Where a followed job's output stands: what the caller has been given of each stream, and the stream
/// position of the next byte the hub sends (which can be before what the caller has, after a
/// re-attach to a restarted hub: those bytes are skipped).
#[derive(Default)]
struct Follower {
    job: String,
    started: bool,
    /// Bytes of stdout and stderr handed to the caller.
    have: [u64; 2],
    /// Position of the next byte of each stream on this connection.
    pos: [u64; 2],
}

impl Follower {
    /// Reads `stream` until the job ends (`Some`), the hub closes it (`None`) or it fails.
    async fn run(
        &mut self,
        stream: &mut JobStream,
        on_event: &mut impl FnMut(ExecEvent),
    ) -> Result<Option<JobRecord>> {
        // A new connection's output starts at 0 unless the hub says where (`attached`).
        self.pos = [0, 0];
        loop {
            match stream.next().await? {
                None => return Ok(None),
                Some(StreamItem::Chunk(chunk)) => {
                    let i = match chunk.stream() {
                        STDOUT_STREAM => 0,
                        STDERR_STREAM => 1,
                        _ => continue,
                    };
                    let data = chunk.data();
                    let n = data.len() as u64;
                    let skip = self.have[i].saturating_sub(self.pos[i]).min(n);
                    self.pos[i] += n;
                    self.have[i] = self.have[i].max(self.pos[i]);
                    if skip < n {
                        let fresh = data.slice(skip as usize..);
                        on_event(if i == 0 {
                            ExecEvent::Stdout(fresh)
                        } else {
                            ExecEvent::Stderr(fresh)
                        });
                    }
                }
                Some(StreamItem::Event(ev)) => match ev {
                    AdminEvent::Created { job } => {
                        if self.job.is_empty() {
                            on_event(ExecEvent::Created(job.clone()));
                        }
                        self.job = job;
                    }
                    AdminEvent::Attached { stdout, stderr, .. } => {
                        for (i, from) in [stdout, stderr].into_iter().enumerate() {
                            if from > self.have[i] {
                                on_event(ExecEvent::Missing {
                                    stream: if i == 0 { STDOUT_STREAM } else { STDERR_STREAM },
                                    bytes: from - self.have[i],
                                });
                                self.have[i] = from;
                            }
                            self.pos[i] = from;
                        }
                    }
                    // A late reason (dispatch runs concurrently) must not override the start.
                    AdminEvent::Waiting { reason, .. } if !self.started => {
                        on_event(ExecEvent::Waiting(reason))
                    }
                    AdminEvent::Waiting { .. } => {}
                    AdminEvent::Started { job, worker, .. } => {
                        // Told once, not again on each re-attach.
                        if !self.started {
                            on_event(ExecEvent::Started { job, worker });
                        }
                        self.started = true;
                    }
                    AdminEvent::Ended(record) => {
                        stream.writer.close().await;
                        return Ok(Some(*record));
                    }
                    AdminEvent::Error(e) => return Err(Error::Api(e)),
                    AdminEvent::Transfer(_) | AdminEvent::Unknown => {}
                },
            }
        }
    }
}

impl AdminClient {
    /// Creates a ship or fetch job and waits until a worker has started it: `Ok(stream)` to move the
    /// files through, or `Err(record)` when the job ended first (no worker took it, the source is missing,
    /// it was cancelled). `cancel` asks the hub to cancel the job, now or later; the stream then goes on
    /// until the job has really ended.
    pub async fn open_transfer(
        &self,
        spec: &JobSpec,
        cancel: CancellationToken,
        on_waiting: &mut (dyn FnMut(String) + Send),
    ) -> Result<std::result::Result<JobStream, Box<JobRecord>>> {
        let mut stream = self.open_stream(spec, cancel).await?;
        loop {
            match stream.next_event().await? {
                None => {
                    return Err(stream.error.take().unwrap_or_else(|| {
                        Error::Other("the hub closed the stream before the transfer started".to_owned())
                    }));
                }
                Some(AdminEvent::Created { job }) => stream.job = job,
                Some(AdminEvent::Waiting { reason, .. }) => on_waiting(reason),
                Some(AdminEvent::Started {
                    worker, stream: s, ..
                }) => {
                    stream.worker = worker;
                    stream.stream = s.unwrap_or(TRANSFER_STREAM);
                    return Ok(Ok(stream));
                }
                Some(AdminEvent::Ended(record)) => return Ok(Err(record)),
                Some(_) => {}
            }
        }
    }
}

/// A job on the admin exec stream: what `exec` reads, and for a ship or fetch the client's end of the
/// transfer (a [`Link`] for [`cla_transfer`]), then the job's end.
pub struct JobStream {
    writer: ConnectionWriter,
    reader: ConnectionReader,
    /// The job, and the worker that runs it.
    pub job: String,
    pub worker: String,
    /// The binary stream of a transfer's file data (announced in `started`).
    stream: u64,
    cancel: CancellationToken,
    cancel_sent: bool,
    ended: Option<Box<JobRecord>>,
    error: Option<Error>,
}

/// What a job stream brings: a chunk (output, or file data), or an event.
enum StreamItem {
    Chunk(Chunk),
    Event(AdminEvent),
}

impl JobStream {
    fn new(writer: ConnectionWriter, reader: ConnectionReader, cancel: CancellationToken) -> JobStream {
        JobStream {
            writer,
            reader,
            job: String::new(),
            worker: String::new(),
            stream: TRANSFER_STREAM,
            cancel,
            cancel_sent: false,
            ended: None,
            error: None,
        }
    }

    /// The next chunk or event; `None` when the hub closed the stream. Sends the cancel request when
    /// `cancel` fires.
    async fn next(&mut self) -> Result<Option<StreamItem>> {
        loop {
            let incoming = tokio::select! {
                _ = self.cancel.cancelled(), if !self.cancel_sent => {
                    self.cancel_sent = true;
                    self.writer.send(&AdminRequest::Cancel).await?;
                    continue;
                }
                r = self.reader.read() => r?,
            };
            return Ok(match incoming {
                None => None,
                Some(Incoming::Alive) => continue,
                Some(Incoming::Frame(Frame::Binary(chunk))) => Some(StreamItem::Chunk(chunk)),
                Some(Incoming::Frame(Frame::Text(t))) => Some(StreamItem::Event(decode_text(&t)?)),
            });
        }
    }

    /// The next event (chunks are skipped); `None` when the stream ended, with an `error` event's text
    /// kept for the caller.
    async fn next_event(&mut self) -> Result<Option<AdminEvent>> {
        loop {
            match self.next().await? {
                None => return Ok(None),
                Some(StreamItem::Chunk(_)) => {}
                Some(StreamItem::Event(AdminEvent::Error(e))) => {
                    self.error = Some(Error::Api(e));
                    return Ok(None);
                }
                Some(StreamItem::Event(ev)) => return Ok(Some(ev)),
            }
        }
    }

    /// Waits for the job's end and returns its record.
    pub async fn finish(mut self) -> Result<JobRecord> {
        if let Some(r) = self.ended.take() {
            self.writer.close().await;
            return Ok(*r);
        }
        loop {
            match self.next_event().await? {
                Some(AdminEvent::Ended(r)) => {
                    self.writer.close().await;
                    return Ok(*r);
                }
                Some(_) => {}
                None => {
                    return Err(self.error.take().unwrap_or_else(|| {
                        Error::Other("the hub closed the stream before the transfer ended".to_owned())
                    }));
                }
            }
        }
    }
}

impl Link for JobStream {
    async fn send(&mut self, piece: Piece) -> std::result::Result<(), String> {
        let sent = match piece {
            Piece::Op(op) => {
                let frame = TransferFrame {
                    job: self.job.clone(),
                    op,
                };
                self.writer.send(&AdminRequest::Transfer(frame)).await
            }
            Piece::Data(chunk) => self.writer.send_chunk(chunk, self.stream).await,
        };
        sent.map_err(|e| format!("the connection to the hub failed: {e}"))
    }

    async fn recv(&mut self) -> Option<Piece> {
        if self.ended.is_some() {
            return None;
        }
        loop {
            match self.next().await {
                Ok(Some(StreamItem::Chunk(chunk))) if chunk.stream() == self.stream => {
                    return Some(Piece::Data(chunk));
                }
                Ok(Some(StreamItem::Event(AdminEvent::Transfer(f)))) => return Some(Piece::Op(f.op)),
                Ok(Some(StreamItem::Event(AdminEvent::Ended(r)))) => {
                    self.ended = Some(r);
                    return None;
                }
                Ok(Some(StreamItem::Event(AdminEvent::Error(e)))) => {
                    self.error = Some(Error::Api(e));
                    return None;
                }
                // The worker went away mid-transfer: the transfer waits for it to come back.
                Ok(Some(StreamItem::Event(AdminEvent::Waiting { reason, .. }))) => tracing::warn!("{reason}"),
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            }
        }
    }
}

/// A job id as a URL path segment: ids are hex, so anything else is refused rather than escaped.
fn path_segment(id: &str) -> Result<&str> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(id)
    } else {
        Err(Error::Usage(format!(
            "`{id}` is not a job id (see `cla-hub jobs`)"
        )))
    }
}
