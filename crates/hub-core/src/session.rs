//! One connected worker on the hub: handshake (`hello` → `welcome`/`reject`), heartbeats, and the frames
//! of its jobs. Reading and writing run as two loops; everything else reaches the worker through the
//! session's channel.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::store::WorkerRecord;
use super::{Hub, Outbound, Session};
use cla_common::logging::Throttle;
use cla_common::util::now_rfc3339;
use cla_protocol::bounds;
use cla_protocol::connection::Incoming;
use cla_protocol::{
    Connection, ConnectionReader, ConnectionWriter, ErrorCode, Frame, Hello, HubMessage, Limits,
    PROTOCOL_VERSION, ProtocolError, Reject, RejectCode, Welcome, WorkerMessage, decode_text,
};

/// Lines about bad frames and refused updates, at most once per interval for all workers together.
static BAD_FRAME_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static UPDATE_REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(10));
/// Rejected handshakes (wrong credentials, bounds, versions) and connections dropped before `hello`.
static REJECT_LOG: Throttle = Throttle::new(Duration::from_secs(10));

/// How long a new connection may take to send `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Heartbeats a peer may miss before its connection is considered dead.
pub const MISSED_HEARTBEATS: u32 = 3;

/// The result of checking the upgrade's credentials.
pub(crate) enum Auth {
    /// The worker's record, and whether it presented the token before a rotation.
    Ok(Box<WorkerRecord>, bool),
    Denied(String),
}

/// Counts a handshake in progress while it lives.
struct Handshake<'h>(&'h std::sync::atomic::AtomicUsize);

impl Drop for Handshake<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Seconds a worker refused as `busy` is told to wait: 1 to 4, so the refused ones do not all come
/// back together (the worker adds its own jitter too).
fn busy_retry_after() -> u64 {
    1 + (cla_common::util::unit_random() * 3.0).round() as u64
}

/// Runs a worker session to its end.
pub(crate) async fn run(hub: Arc<Hub>, conn: Connection, auth: Auth) {
    let (mut writer, mut reader) = conn.split();
    let busy = hub.handshakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let handshake = Handshake(&hub.handshakes);
    if busy >= hub.cfg.max_handshakes {
        // Read the hello first, so the worker gets the reason rather than a dropped connection.
        let _ = read_hello(&mut reader).await;
        let msg = format!("the hub is busy with {busy} connecting workers");
        return reject(&mut writer, RejectCode::Busy, msg, Some(busy_retry_after())).await;
    }
    let hello = match read_hello(&mut reader).await {
        Ok(h) => h,
        Err(e) => {
            if let Some(held) = REJECT_LOG.allow(std::time::Instant::now()) {
                tracing::warn!(
                    "worker connection dropped before hello: {e}{}",
                    REJECT_LOG.suffix(held)
                );
            }
            writer.close().await;
            return;
        }
    };
    let (id, disabled, old_token) = match auth {
        Auth::Ok(r, old) => (r.id, r.disabled, old),
        Auth::Denied(why) => return reject(&mut writer, RejectCode::Unauthorized, why, None).await,
    };
    if let Err(why) = hello.check() {
        let msg = format!("worker {id}: {why}; fix it in the worker's config");
        return reject(&mut writer, RejectCode::Invalid, msg, None).await;
    }
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "this hub speaks protocol v{PROTOCOL_VERSION}, the worker v{}: upgrade the older side",
            hello.version
        );
        return reject(&mut writer, RejectCode::Version, msg, None).await;
    }
    let hb = hub.cfg.heartbeat;
    let session = cla_common::token::random_hex(8);
    let (tx, rx) = mpsc::channel(256);
    let close = hub.shutdown.child_token();
    let (duplicate, resumption) = {
        let mut st = hub.state();
        let duplicate = st.sessions.contains_key(&id);
        let mut resumption = Default::default();
        if !duplicate {
            st.sessions.insert(
                id.clone(),
                Session {
                    id: id.clone(),
                    session: session.clone(),
                    tx,
                    hello: hello.clone(),
                    connected_since: now_rfc3339(),
                    running: Default::default(),
                    transfers: Default::default(),
                    draining: false,
                    disabled,
                    streams: Default::default(),
                    next_stream: 1,
                    close: close.clone(),
                    old_token,
                },
            );
            // The jobs this worker had when its last connection (or the last hub process) went.
            resumption = hub.resume_jobs(&mut st, &id, &session, &hello.resume);
        }
        (duplicate, resumption)
    };
    if duplicate {
        let retry = (hb * MISSED_HEARTBEATS).as_secs().max(1);
        let msg = format!("worker {id} is already connected (another process with the same id?)");
        return reject(&mut writer, RejectCode::Duplicate, msg, Some(retry)).await;
    }
    if !remember(&hub, &id, Some(&hello)) {
        // Unregistered while we waited for hello.
        resumption.settle(&hub);
        hub.session_ended(&id, &session).await;
        hub.worker_unregistered(&id).await;
        let msg = format!("worker {id} is not registered on this hub (unregistered)");
        return reject(&mut writer, RejectCode::Unauthorized, msg, None).await;
    }
    let super::jobs::Resumption { resumed, .. } = &resumption;
    let welcome = Welcome {
        resume: resumed.clone(),
        session: session.clone(),
        heartbeat_secs: hb.as_secs().max(1),
        limits: Limits {
            max_frame_bytes: cla_protocol::connection::MAX_MESSAGE_BYTES as u64,
        },
    };
    let welcomed = writer.send(&HubMessage::Welcome(welcome)).await.is_ok();
    resumption.settle(&hub);
    drop(handshake);
    if welcomed {
        tracing::info!(worker = %id, session = %session, host = %hello.host, tags = ?hello.tags, "worker connected");
        // The writer must run before anything is offered: offers go through the session's bounded channel.
        let writing = tokio::spawn(write_loop(writer, rx, hb, close.clone()));
        hub.dispatch().await;
        // A rotation asked for while the worker was away, or not confirmed before it dropped.
        if let Err(e) = hub.deliver_rotation(&id).await {
            tracing::warn!(worker = %id, "token rotation not sent: {}", e.1.error);
        }
        read_loop(&hub, &id, &mut reader, hb, &close).await;
        close.cancel();
        // A send stuck on a half-dead connection must not keep the session (and its id) forever.
        let abort = writing.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), writing)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    hub.session_ended(&id, &session).await;
    remember(&hub, &id, None);
    tracing::info!(worker = %id, session = %session, "worker disconnected");
}

async fn read_hello(reader: &mut ConnectionReader) -> Result<Hello, ProtocolError> {
    let read = async {
        loop {
            match reader.read().await? {
                None => return Err(ProtocolError::Transport("closed".into())),
                Some(Incoming::Alive) => continue,
                Some(Incoming::Frame(Frame::Text(t))) => {
                    return match decode_text::<WorkerMessage>(&t)? {
                        WorkerMessage::Hello(h) => Ok(h),
                        _ => Err(ProtocolError::Malformed(
                            "the first message must be `hello`".into(),
                        )),
                    };
                }
                Some(Incoming::Frame(Frame::Binary(_))) => {
                    return Err(ProtocolError::Malformed("binary frame before `hello`".into()));
                }
            }
        }
    };
    tokio::time::timeout(HELLO_TIMEOUT, read)
        .await
        .map_err(|_| ProtocolError::Timeout("hello"))?
}

async fn reject(writer: &mut ConnectionWriter, code: RejectCode, message: String, retry_after: Option<u64>) {
    if code == RejectCode::Busy {
        tracing::debug!("worker asked to come back later: {message}");
    } else if let Some(held) = REJECT_LOG.allow(std::time::Instant::now()) {
        tracing::warn!(?code, "worker rejected: {message}{}", REJECT_LOG.suffix(held));
    }
    let _ = writer
        .send(&HubMessage::Reject(Reject {
            code,
            message,
            retry_after,
        }))
        .await;
    writer.close().await;
}

/// Stores what the worker said about itself and when it was last seen, in one transaction with the
/// read so that a concurrent unregister or register is never undone. False when the worker is gone.
fn remember(hub: &Hub, id: &str, hello: Option<&Hello>) -> bool {
    let updated = hub.store.update_worker(id, |rec| {
        if let Some(h) = hello {
            rec.tags = h.tags.clone();
            rec.envs = h.envs.clone();
            rec.host = Some(h.host.clone());
            rec.version = Some(h.agent.clone());
            rec.capacity = h.capacity;
        }
        rec.last_seen = Some(now_rfc3339());
    });
    match updated {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(worker = id, "{e}");
            true
        }
    }
}

async fn write_loop(
    mut writer: ConnectionWriter,
    mut rx: mpsc::Receiver<Outbound>,
    hb: Duration,
    close: CancellationToken,
) {
    let mut ping = tokio::time::interval(hb);
    ping.tick().await;
    loop {
        let sent = tokio::select! {
            _ = close.cancelled() => break,
            msg = rx.recv() => match msg {
                Some(Outbound::Message(m)) => writer.send(&m).await,
                Some(Outbound::Chunk(chunk)) => {
                    let stream = chunk.stream();
                    writer.send_chunk(*chunk, stream).await
                }
                None => break,
            },
            _ = ping.tick() => writer.ping().await,
        };
        if let Err(e) = sent {
            tracing::debug!("write to worker failed: {e}");
            break;
        }
    }
    close.cancel();
    writer.close().await;
}

async fn read_loop(
    hub: &Arc<Hub>,
    id: &str,
    reader: &mut ConnectionReader,
    hb: Duration,
    close: &CancellationToken,
) {
    let deadline = hb * MISSED_HEARTBEATS;
    let mut bad = cla_protocol::connection::BadFrames::default();
    let mut updates = UpdateLimit::default();
    loop {
        let next = tokio::select! {
            _ = close.cancelled() => return,
            r = tokio::time::timeout(deadline, reader.read()) => r,
        };
        let incoming = match next {
            Err(_) => {
                tracing::warn!(
                    worker = id,
                    "no sign of life for {MISSED_HEARTBEATS} heartbeats ({deadline:?}): marking OFFLINE"
                );
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!(worker = id, "connection error: {e}");
                return;
            }
            Ok(Ok(Some(i))) => i,
        };
        match incoming {
            Incoming::Alive => {}
            Incoming::Frame(Frame::Binary(chunk)) => hub.job_output(id, chunk).await,
            Incoming::Frame(Frame::Text(text)) => {
                if !handle(hub, id, &text, &mut updates).await && bad.record() {
                    tracing::warn!(
                        worker = id,
                        "more than {} malformed or unsupported frames within {:?}: closing the connection",
                        cla_protocol::connection::MAX_BAD_FRAMES,
                        cla_protocol::connection::BAD_FRAME_WINDOW
                    );
                    return;
                }
            }
        }
    }
}

/// `update` messages a worker may send per [`UPDATE_WINDOW`]; more are refused (and count as bad frames).
/// Each costs a store commit and a log line, and a worker sends one when its config changes.
const MAX_UPDATES: u32 = 10;
const UPDATE_WINDOW: Duration = Duration::from_secs(60);

/// Counts a session's `update` messages.
struct UpdateLimit {
    since: std::time::Instant,
    count: u32,
}

impl Default for UpdateLimit {
    fn default() -> Self {
        UpdateLimit {
            since: std::time::Instant::now(),
            count: 0,
        }
    }
}

impl UpdateLimit {
    /// Counts one; false when it is over the limit.
    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now.duration_since(self.since) > UPDATE_WINDOW {
            self.since = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= MAX_UPDATES
    }
}

/// Handles one text frame; false when it could not be decoded, was past the bounds or over a rate limit
/// (answered with an `error`).
async fn handle(hub: &Arc<Hub>, id: &str, text: &str, updates: &mut UpdateLimit) -> bool {
    let msg = match decode_text::<WorkerMessage>(text) {
        Ok(m) => m,
        Err(e) => {
            let code = match e {
                ProtocolError::UnknownType(_) => ErrorCode::Unsupported,
                _ => ErrorCode::Malformed,
            };
            if let Some(held) = BAD_FRAME_LOG.allow(std::time::Instant::now()) {
                tracing::warn!(worker = id, "{e}{}", BAD_FRAME_LOG.suffix(held));
            }
            send(
                hub,
                id,
                HubMessage::Error {
                    code,
                    message: e.to_string(),
                },
            )
            .await;
            return false;
        }
    };
    match msg {
        WorkerMessage::Hello(_) => tracing::warn!(worker = id, "duplicate hello ignored"),
        WorkerMessage::Accepted { job } => hub.job_accepted(id, &job).await,
        WorkerMessage::Refused { job, reason } => hub.job_refused(id, &job, &reason).await,
        WorkerMessage::Started { job, .. } => hub.job_started(id, &job).await,
        WorkerMessage::Finished(result) => hub.job_finished(id, result).await,
        WorkerMessage::Transfer(frame) => hub.transfer_from_worker(id, frame).await,
        WorkerMessage::Draining => {
            if let Some(s) = hub.state().sessions.get_mut(id) {
                s.draining = true;
            }
            tracing::info!(worker = id, "worker is draining");
            // The reasons of waiting jobs change.
            hub.dispatch().await;
        }
        WorkerMessage::Update { tags, envs } => {
            let refused = if !updates.allow() {
                Some((
                    ErrorCode::RateLimited,
                    format!(
                        "more than {MAX_UPDATES} updates in {} s: ignored",
                        UPDATE_WINDOW.as_secs()
                    ),
                ))
            } else {
                let checked =
                    bounds::check_labels("tag", &tags).and_then(|()| bounds::check_labels("env", &envs));
                checked
                    .err()
                    .map(|why| (ErrorCode::Invalid, format!("update ignored: {why}")))
            };
            if let Some((code, message)) = refused {
                if let Some(held) = UPDATE_REFUSED_LOG.allow(std::time::Instant::now()) {
                    tracing::warn!(worker = id, "{message}{}", UPDATE_REFUSED_LOG.suffix(held));
                }
                send(hub, id, HubMessage::Error { code, message }).await;
                return false;
            }
            if let Some(s) = hub.state().sessions.get_mut(id) {
                s.hello.tags = tags.clone();
                s.hello.envs = envs.clone();
            }
            let _ = hub.store.update_worker(id, |r| {
                r.tags = tags.clone();
                r.envs = envs.clone();
            });
            tracing::info!(worker = id, ?tags, ?envs, "worker updated its tags/envs");
            // Queued jobs may match now.
            hub.dispatch().await;
        }
        WorkerMessage::Rotated { saved, message } => hub.rotated(id, saved, message),
        WorkerMessage::Error { code, message } => {
            tracing::warn!(worker = id, ?code, "worker reported: {message}")
        }
    }
    true
}

/// Sends a message to a connected worker (dropped if it is gone).
async fn send(hub: &Hub, id: &str, msg: HubMessage) {
    let tx = hub.state().sessions.get(id).map(|s| s.tx.clone());
    if let Some(tx) = tx {
        let _ = tx.send(Outbound::message(msg)).await;
    }
}
