//! The job lifecycle on the hub (DESIGN.md §5): `queued → offered → accepted → running → succeeded |
//! failed | cancelled | timed_out | lost`.
//!
//! A job is persisted when created and at each state change, before the change is acted on (a job is
//! stored as `offered` before the worker is sent it). Live jobs sit in memory with their subscribers (exec
//! streams) and waiters (`job show --wait`); ended jobs live only in the store. Queued jobs wait FIFO for a
//! connected matching worker with a free slot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Hub, Outbound, Session, State};
use cla_common::util::now_rfc3339;
use cla_protocol::api::{
    ApiError, JobRecord, JobSpec, JobState, STDERR_STREAM, STDOUT_STREAM, TRANSFER_STREAM, Target, Task,
};
use cla_protocol::{
    Chunk, CommandLine, EvalRequest, ExecRequest, FEATURE_TRANSFER, FetchRequest, Hello, HubMessage,
    JobResult, Outcome, Resumed, ShipRequest, TransferFrame, TransferOp, TransferSummary,
};
use cla_transfer::{Hop, Piece};

/// An error answer of the API: status plus the one-line [`ApiError`].
#[derive(Debug, Clone)]
pub struct ApiFail(pub StatusCode, pub ApiError);

impl ApiFail {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiFail(
            status,
            ApiError {
                code: code.to_owned(),
                error: message.into(),
                retry_after: None,
            },
        )
    }
}

impl From<crate::store::StoreError> for ApiFail {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!("{e}");
        ApiFail::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
    }
}

/// What subscribers of a job (exec streams) receive, in order.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Started {
        worker: String,
        /// A transfer's binary stream id, the same on both legs (the hub relays chunks unchanged).
        stream: Option<u64>,
    },
    /// The job is still queued, for this reason (sent when the reason changes).
    Waiting(String),
    /// Bytes on [`STDOUT_STREAM`] or [`STDERR_STREAM`].
    Output {
        stream: u64,
        data: Bytes,
    },
    Ended(Box<JobRecord>),
    /// A step of the job's transfer, from the worker.
    Transfer(TransferFrame),
    /// A chunk of a fetch's file data, from the worker (on the job's stream).
    Chunk(Chunk),
}

/// A job that has not ended.
pub(crate) struct LiveJob {
    record: JobRecord,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    subscribers: Vec<mpsc::Sender<JobEvent>>,
    waiters: Vec<oneshot::Sender<JobRecord>>,
    /// Sessions that refused this job; it is not offered to them again.
    refused_by: HashSet<String>,
    /// A cancel was asked for after the job left the queue: if it comes back to the queue, it ends instead.
    cancel_requested: bool,
    /// The client streaming the job left while it was offered: if it comes back to the queue, it ends
    /// (a worker that took it runs it, unlike an admin's cancel).
    client_gone: bool,
    /// Transfers: the binary stream of this job on its worker's session (kept when the worker resumes it).
    stream: Option<u64>,
    /// Transfers: the hub's end of the hop to the worker, kept across the worker's reconnects.
    relay: Option<Arc<Hop<Outbound>>>,
    /// Fetches: the receiving client's verdict (`committed` or `abort`).
    verdict: Option<Result<TransferSummary, String>>,
    /// Fetches: the worker's result, held until the client's verdict comes.
    parked: Option<JobResult>,
    /// When the job's queue timeout runs out (it still applies after a refused or lost offer).
    queue_deadline: Option<tokio::time::Instant>,
    /// Set while the job's worker is disconnected (the job waits for it to come back): the number of
    /// this disconnect, which its grace timer checks.
    detached: Option<u64>,
}

impl LiveJob {
    /// A job as it enters the hub's memory (new, or reloaded from the store after a restart).
    fn new(record: JobRecord, subscriber: Option<mpsc::Sender<JobEvent>>) -> LiveJob {
        let queue_deadline = (record.state == JobState::Queued)
            .then_some(record.spec.target.queue_timeout_secs)
            .flatten()
            .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
        LiveJob {
            stdout: record.stdout.clone().into_bytes(),
            stderr: record.stderr.clone().into_bytes(),
            record,
            subscribers: subscriber.into_iter().collect(),
            waiters: Vec::new(),
            refused_by: HashSet::new(),
            cancel_requested: false,
            client_gone: false,
            stream: None,
            relay: None,
            verdict: None,
            parked: None,
            queue_deadline,
            detached: None,
        }
    }

    /// The subscribers still listening (those whose client went away are dropped).
    fn live_subscribers(&mut self) -> Vec<mpsc::Sender<JobEvent>> {
        self.subscribers.retain(|s| !s.is_closed());
        self.subscribers.clone()
    }

    fn snapshot(&self) -> JobRecord {
        let mut r = self.record.clone();
        r.stdout = String::from_utf8_lossy(&self.stdout).into_owned();
        r.stderr = String::from_utf8_lossy(&self.stderr).into_owned();
        r
    }
}

/// A pending durable job write.
type Commit =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::store::StoreError>> + Send>>;

/// An offer on its way.
struct Offer {
    /// The session's channel and id.
    tx: mpsc::Sender<Outbound>,
    session: String,
    job: String,
    msg: HubMessage,
    /// The write of the `offered` state, which must be durable before the request goes.
    commit: Commit,
    /// Told how that write went (for a new job whose first write this is: see [`Hub::enqueue`]).
    stored: Option<oneshot::Sender<Result<(), crate::store::StoreError>>>,
}

/// What a dispatch pass decided, to act on once the state lock is released.
struct Dispatched {
    offers: Vec<Offer>,
    /// Subscribers of jobs still waiting, and the new reason why.
    told: Vec<(Vec<mpsc::Sender<JobEvent>>, String)>,
}

/// What a reconnecting worker gets back ([`Hub::resume_jobs`]): the jobs for its `welcome`, and what is
/// left to do once the welcome is sent.
#[derive(Default)]
pub(crate) struct Resumption {
    pub resumed: Vec<Resumed>,
    rest: Option<AfterWelcome>,
}

/// What [`Resumption::settle`] does.
struct AfterWelcome {
    tx: mpsc::Sender<Outbound>,
    /// Resumed transfers, with the units of the worker's pieces the hub has (the worker sends the rest).
    transfers: Vec<(String, u64)>,
    /// Jobs cancelled while the worker was away.
    cancels: Vec<String>,
    requeued: Vec<JobRecord>,
    ended: Vec<Ended>,
}

impl Resumption {
    /// After the welcome: each resumed transfer is told what the hub has of it; the cancels asked for
    /// while the worker was away go to it (it has the jobs back now); ended jobs are reported, re-queued
    /// ones dispatched.
    pub(crate) fn settle(self, hub: &Hub) {
        let Some(AfterWelcome {
            tx,
            transfers,
            cancels,
            requeued,
            ended,
        }) = self.rest
        else {
            return;
        };
        let hub = hub.me.clone();
        tokio::spawn(async move {
            for (job, received) in transfers {
                let msg = HubMessage::Transfer(TransferFrame {
                    job,
                    op: TransferOp::Resume { received },
                });
                let _ = tx.send(Outbound::message(msg)).await;
            }
            for job in cancels {
                let msg = HubMessage::Cancel {
                    job,
                    reason: "cancelled while the worker was disconnected".into(),
                };
                let _ = tx.send(Outbound::message(msg)).await;
            }
            if let Some(hub) = hub.upgrade() {
                hub.after_requeue(requeued, ended).await;
            }
        });
    }
}

/// A job that just ended: what must still be written and told, outside the state lock.
struct Ended {
    record: JobRecord,
    subscribers: Vec<mpsc::Sender<JobEvent>>,
    waiters: Vec<oneshot::Sender<JobRecord>>,
}

/// The answer to `job show --wait`.
pub enum Wait {
    Done(Box<JobRecord>),
    Pending(oneshot::Receiver<JobRecord>),
}

/// A new job id: creation time in hex milliseconds (so ids sort by age) plus 24 random bits.
fn new_job_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{ms:011x}{}", cla_common::token::random_hex(3))
}

/// True when the worker described by `hello` may run `spec`: it matches the target and knows the task.
pub(crate) fn matches(spec: &JobSpec, worker_id: &str, hello: &Hello) -> bool {
    knows(spec, hello) && on_target(&spec.target, worker_id, hello)
}

/// True when the worker is the one named, or carries all the tags (and the env).
fn on_target(target: &Target, worker_id: &str, hello: &Hello) -> bool {
    target.worker.as_deref().is_none_or(|w| w == worker_id)
        && target.tags.iter().all(|t| hello.tags.contains(t))
        && target.env.as_ref().is_none_or(|e| hello.envs.contains(e))
}

/// True when the worker's version can run the task (ship and fetch need the `transfer` feature).
fn knows(spec: &JobSpec, hello: &Hello) -> bool {
    !spec.task.is_transfer() || hello.features.iter().any(|f| f == FEATURE_TRANSFER)
}

/// Why a queued job is still waiting, for `jobs` and the waiting client: it is worth saying whether
/// no worker could take it at all or the ones that could are busy.
fn why_waiting(job: &LiveJob, sessions: &HashMap<String, Session>) -> String {
    let spec = &job.record.spec;
    let target = spec.target.describe();
    let on: Vec<&Session> = sessions
        .values()
        .filter(|s| on_target(&spec.target, &s.id, &s.hello))
        .collect();
    if on.is_empty() {
        return match &spec.target.worker {
            Some(w) if !sessions.contains_key(w) => format!("worker {w} is not connected"),
            _ => format!("no connected worker matches {target}"),
        };
    }
    let able: Vec<&Session> = on.into_iter().filter(|s| knows(spec, &s.hello)).collect();
    if able.is_empty() {
        return format!(
            "the connected workers matching {target} are too old for {} (no `{FEATURE_TRANSFER}` feature): upgrade them",
            spec.task.verb()
        );
    }
    let n = able.len();
    let open: Vec<&Session> = able
        .into_iter()
        .filter(|s| !s.draining && !s.disabled && !job.refused_by.contains(&s.session))
        .collect();
    if open.is_empty() {
        return format!("the {n} matching worker(s) are draining, disabled, or refused the job");
    }
    if spec.task.is_transfer() {
        let limit = cla_transfer::MAX_CONCURRENT;
        return match open.as_slice() {
            [one] => format!("the matching worker {} is running {limit} transfers", one.id),
            _ => format!(
                "all {} matching workers are running {limit} transfers",
                open.len()
            ),
        };
    }
    match open.as_slice() {
        [one] => format!(
            "the matching worker {} is busy ({}/{} running)",
            one.id,
            one.exec_running(),
            one.hello.capacity
        ),
        _ => format!("all {} matching workers busy", open.len()),
    }
}

/// Largest eval source accepted.
const MAX_CODE_BYTES: usize = 1 << 20;
/// Largest stash accepted (it travels in the job's messages and record).
const MAX_STASH_BYTES: usize = 2 << 20;

fn validate(spec: &JobSpec) -> Result<(), ApiFail> {
    let bad = |m: String| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", m);
    match &spec.task {
        Task::Exec(CommandLine::Shell { cmd }) if cmd.trim().is_empty() => {
            return Err(bad("empty command".into()));
        }
        Task::Exec(CommandLine::Argv { argv }) if argv.first().is_none_or(|a| a.is_empty()) => {
            return Err(bad("empty command: argv[0] is missing".into()));
        }
        Task::Eval(e) if e.code.trim().is_empty() => return Err(bad("empty eval code".into())),
        Task::Eval(e) if e.code.len() > MAX_CODE_BYTES => {
            return Err(bad(format!(
                "eval code is {} bytes; the limit is {MAX_CODE_BYTES}",
                e.code.len()
            )));
        }
        Task::Eval(e) if !(e.stash.is_null() || e.stash.is_object()) => {
            return Err(bad("the stash must be a JSON object".into()));
        }
        Task::Ship(t) if t.dest.trim().is_empty() => return Err(bad("ship needs a destination path".into())),
        Task::Fetch(t) if t.path.trim().is_empty() => {
            return Err(bad("fetch needs a path on the worker".into()));
        }
        Task::Eval(e) => {
            let stash = serde_json::to_string(&e.stash).expect("JSON values serialize");
            if stash.len() > MAX_STASH_BYTES {
                return Err(bad(format!("the stash is over {MAX_STASH_BYTES} bytes of JSON")));
            }
            if cla_protocol::codec::depth(&stash) > cla_protocol::codec::MAX_DEPTH {
                return Err(bad(format!(
                    "the stash nests deeper than {} levels",
                    cla_protocol::codec::MAX_DEPTH
                )));
            }
        }
        _ => {}
    }
    for k in spec.env_vars.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(bad(format!("invalid environment variable name `{k}`")));
        }
    }
    if let Some(t) = spec.timeout_secs
        && !(t > 0.0 && t.is_finite())
    {
        return Err(bad(format!(
            "timeout must be a positive number of seconds, not {t}"
        )));
    }
    if let Some(t) = spec.target.queue_timeout_secs
        && !(t > 0.0 && t <= 1e10)
    {
        return Err(bad(format!(
            "queue timeout must be a positive number of seconds (at most 1e10), not {t}"
        )));
    }
    Ok(())
}

impl Hub {
    /// Creates a job and queues it; `subscriber` (an exec stream) is attached before the job can start,
    /// so it misses nothing. The job waits until a matching worker is free (or connects), or until its
    /// queue timeout. Fails at once only for a worker id that is not registered.
    pub async fn create_job(
        self: &Arc<Self>,
        spec: JobSpec,
        subscriber: Option<mpsc::Sender<JobEvent>>,
    ) -> Result<JobRecord, ApiFail> {
        validate(&spec)?;
        if spec.task.is_transfer() && subscriber.is_none() {
            return Err(ApiFail::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "ship and fetch stream through the client that starts them: use `cla-hub ship` / `cla-hub fetch` \
                 (the exec stream), not a detached job",
            ));
        }
        if let Some(w) = &spec.target.worker
            && self.store.worker(w)?.is_none()
        {
            return Err(ApiFail::new(
                StatusCode::NOT_FOUND,
                "unknown_worker",
                format!("no worker `{w}` is registered: see `cla-hub workers` for the ids"),
            ));
        }
        let mut record = JobRecord::queued(new_job_id(), spec, now_rfc3339());
        record.streamed = subscriber.is_some();
        // The rest runs as its own task: a caller dropped half-way (an HTTP client that left) must not
        // leave a stored job that nothing in memory backs.
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            let id = record.id.clone();
            let (now, stored) = hub.enqueue(record, subscriber).await;
            // The caller hears of the job only once it is stored.
            match stored.await {
                Ok(()) => Ok(now),
                Err(e) => {
                    hub.unstored(&id, &e.to_string()).await;
                    Err(e.into())
                }
            }
        })
        .await
        .map_err(|e| ApiFail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    }

    /// Puts a new job in the queue and dispatches. Returns the job as it is then, and a future that
    /// completes when its first write is durable.
    ///
    /// That first write is the `offered` state when a free worker takes the job in this same pass, and
    /// the `queued` state otherwise — one fsync either way, where storing `queued` and then `offered`
    /// took two for every job that found a worker at once (the store's writer thread had usually
    /// committed the first before the second reached it). Both happen under the state lock, so the
    /// store sees the job's states in order. No worker hears of a job before it is stored: an offer is
    /// sent only once its write is durable.
    async fn enqueue(
        self: &Arc<Self>,
        record: JobRecord,
        subscriber: Option<mpsc::Sender<JobEvent>>,
    ) -> (JobRecord, Commit) {
        let live = LiveJob::new(record.clone(), subscriber);
        let queue_deadline = live.queue_deadline;
        let (dispatched, stored) = {
            let mut guard = self.state();
            guard.jobs.insert(record.id.clone(), live);
            guard.queue.push_back(record.id.clone());
            let mut dispatched = self.dispatch_locked(&mut guard);
            let stored: Commit = match dispatched.offers.iter_mut().find(|o| o.job == record.id) {
                Some(offer) => {
                    let (tx, rx) = oneshot::channel();
                    offer.stored = Some(tx);
                    Box::pin(async move {
                        rx.await.unwrap_or_else(|_| {
                            Err(crate::store::StoreError::Db(
                                "the offer was dropped before it was stored".into(),
                            ))
                        })
                    })
                }
                None => {
                    let snapshot = guard.jobs.get(&record.id).map(LiveJob::snapshot);
                    Box::pin(self.store.put_job(snapshot.as_ref().unwrap_or(&record)))
                }
            };
            (dispatched, stored)
        };
        tracing::info!(job = %record.id, target = %record.spec.target.describe(), task = %record.spec.task.display(), "job queued");
        self.after_dispatch(dispatched);
        self.queue_timer(&record.id, queue_deadline);
        // A worker unregistered while the job was being stored: it fails now rather than wait for ever.
        if let Some(w) = &record.spec.target.worker
            && self.store.worker(w).ok().flatten().is_none()
        {
            self.worker_unregistered(w).await;
        }
        (self.job(&record.id).unwrap_or(record), stored)
    }

    /// Starts the timer of a queued job's queue timeout.
    fn queue_timer(&self, id: &str, queue_deadline: Option<tokio::time::Instant>) {
        if let Some(deadline) = queue_deadline {
            // The timer does not keep the hub alive; a job that has left the queue by then is left alone
            // (should it come back, `requeue_or_cancel` applies the deadline).
            let hub = self.me.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if let Some(hub) = hub.upgrade() {
                    hub.queue_timed_out(&id).await;
                }
            });
        }
    }

    /// A new job could not be stored: it fails (no offer of it was sent, as offers wait for the store).
    async fn unstored(&self, id: &str, why: &str) {
        let ended = {
            let mut guard = self.state();
            let st = &mut *guard;
            st.queue.retain(|q| q != id);
            let worker = st.jobs.get(id).and_then(|j| j.record.worker.clone());
            if let Some(s) = worker.and_then(|w| st.sessions.get_mut(&w)) {
                release(s, id);
            }
            end_job(st, id, |r| {
                r.state = JobState::Failed;
                r.error = Some(format!("the hub could not store the job: {why}"));
            })
        };
        if let Some(e) = ended {
            self.deliver(e).await;
        }
    }

    /// A job's queue timeout: if no worker has taken it yet, it ends `timed_out`, saying why it waited.
    async fn queue_timed_out(&self, id: &str) {
        let ended = {
            let mut guard = self.state();
            let st = &mut *guard;
            if st.jobs.get(id).is_none_or(|j| j.record.state != JobState::Queued) {
                return;
            }
            st.queue.retain(|q| q != id);
            end_job(st, id, queue_timeout)
        };
        if let Some(e) = ended {
            tracing::warn!(job = id, "job timed out in the queue");
            self.deliver(e).await;
        }
    }

    /// Offers queued jobs, oldest first, to matching workers with a free slot (least loaded first).
    pub(crate) async fn dispatch(&self) {
        let dispatched = self.dispatch_locked(&mut self.state());
        self.after_dispatch(dispatched);
    }

    /// The part of [`Hub::dispatch`] that needs the state: picks the offers and queues their writes.
    fn dispatch_locked(&self, st: &mut State) -> Dispatched {
        let mut offers: Vec<Offer> = Vec::new();
        let mut told = Vec::new();
        {
            let State {
                sessions,
                jobs,
                queue,
            } = st;
            let mut waiting = std::collections::VecDeque::new();
            while let Some(job_id) = queue.pop_front() {
                let Some(job) = jobs.get_mut(&job_id) else {
                    continue;
                };
                if job.record.state != JobState::Queued {
                    continue;
                }
                let transfer = job.record.spec.task.is_transfer();
                let pick = sessions
                    .values_mut()
                    .filter(|s| {
                        let has_room = if transfer {
                            s.transfers.len() < cla_transfer::MAX_CONCURRENT
                        } else {
                            (s.exec_running() as u32) < s.hello.capacity
                        };
                        !s.draining
                            && !s.disabled
                            && has_room
                            && !job.refused_by.contains(&s.session)
                            && matches(&job.record.spec, &s.id, &s.hello)
                    })
                    .min_by_key(|s| s.running.len());
                let Some(session) = pick else {
                    let why = why_waiting(job, sessions);
                    if job.record.waiting.as_ref() != Some(&why) {
                        told.push((job.live_subscribers(), why.clone()));
                        job.record.waiting = Some(why);
                    }
                    waiting.push_back(job_id);
                    continue;
                };
                job.record.waiting = None;
                let req = offer(session, job);
                let record = job.snapshot();
                // Written under the lock, so the store sees a job's states in order.
                let commit = Box::pin(self.store.put_job(&record));
                offers.push(Offer {
                    tx: session.tx.clone(),
                    session: session.session.clone(),
                    job: record.id,
                    msg: req,
                    commit,
                    stored: None,
                });
            }
            *queue = waiting;
        }
        Dispatched { offers, told }
    }

    /// The part of [`Hub::dispatch`] after the state lock: sends the offers, tells the waiting.
    fn after_dispatch(&self, Dispatched { offers, told }: Dispatched) {
        if !offers.is_empty() {
            self.send_offers(offers);
        }
        // Only informative: a client that is not reading misses it rather than holding up dispatch.
        for (subs, why) in told {
            for s in subs {
                let _ = s.try_send(JobEvent::Waiting(why.clone()));
            }
        }
    }

    /// Sends offers once each is stored (a restarted hub then knows every job it offered, and to whom),
    /// and starts their leases. Runs as its own task: the caller does not wait for the disk.
    fn send_offers(&self, offers: Vec<Offer>) {
        let (hub, lease) = (self.me.clone(), self.cfg.offer_lease);
        tokio::spawn(async move {
            // First every write (queued together, they are usually committed together), telling a new
            // job's creator at once: a send below can wait for room on a busy session's channel, and
            // that must not hold up an unrelated caller.
            let mut written = Vec::with_capacity(offers.len());
            for Offer {
                tx,
                session,
                job,
                msg,
                commit,
                stored,
            } in offers
            {
                let result = commit.await;
                if let Some(stored) = stored {
                    let _ = stored.send(result.clone());
                }
                written.push((tx, session, job, msg, result));
            }
            for (tx, session, job, msg, result) in written {
                match result {
                    Ok(()) => {
                        tracing::info!(job = %job, "job offered");
                        // A closed channel means the session is ending; its cleanup sees to the job.
                        let _ = tx.send(Outbound::message(msg)).await;
                    }
                    // Not sent: the lease below puts it back in the queue (or, for a new job, it fails:
                    // `unstored`).
                    Err(e) => tracing::error!(job = %job, "offer not sent: {e}"),
                }
                let hub = hub.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lease).await;
                    if let Some(hub) = hub.upgrade() {
                        hub.offer_expired(&job, &session).await;
                    }
                });
            }
        });
    }

    /// An offer's lease ran out: if the worker has neither taken nor refused the job, it is offered
    /// elsewhere (and should the worker accept it late, it is told to cancel).
    async fn offer_expired(&self, job: &str, session: &str) {
        let (requeued, ended) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(j) = st.jobs.get_mut(job) else { return };
            let Some(worker) = j.record.worker.clone() else {
                return;
            };
            let Some(s) = st.sessions.get_mut(&worker) else {
                return;
            };
            if j.record.state != JobState::Offered || j.detached.is_some() || s.session != session {
                return;
            }
            tracing::warn!(job, worker = %worker, "the worker did not answer the offer within {:?}: offering the job elsewhere", self.cfg.offer_lease);
            release(s, job);
            j.refused_by.insert(session.to_owned());
            let (requeued, ended) = requeue_or_cancel(st, job);
            if let Some(r) = &requeued {
                self.persist(r);
            }
            (requeued, ended)
        };
        self.after_requeue(requeued, ended).await;
    }

    /// The worker took the job. A worker answering an offer that is no longer its own (the lease ran out
    /// and the job went elsewhere, or it ended) is told to drop it.
    pub(crate) async fn job_accepted(&self, worker: &str, job: &str) {
        let stale = {
            let mut st = self.state();
            match st.jobs.get_mut(job) {
                Some(j) if j.record.worker.as_deref() == Some(worker) => {
                    if j.record.state == JobState::Offered {
                        j.record.state = JobState::Accepted;
                        self.persist(&j.snapshot());
                    }
                    None
                }
                _ => st.sessions.get(worker).map(|s| s.tx.clone()),
            }
        };
        if let Some(tx) = stale {
            tracing::warn!(
                job,
                worker,
                "the worker accepted an offer it no longer holds: telling it to cancel"
            );
            let msg = HubMessage::Cancel {
                job: job.to_owned(),
                reason: "the offer expired before the worker accepted it".into(),
            };
            // Not from the read loop itself: it must never wait on the session's outbound queue.
            tokio::spawn(async move { tx.send(Outbound::message(msg)).await });
        }
    }

    /// The worker refused the job: it goes back to the front of the queue, not to be offered there again
    /// (or ends, if it was cancelled meanwhile).
    pub(crate) async fn job_refused(&self, worker: &str, job: &str, reason: &str) {
        let (requeued, ended) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(j) = st.jobs.get_mut(job) else { return };
            if j.record.worker.as_deref() != Some(worker) {
                return;
            }
            if let Some(s) = st.sessions.get_mut(worker) {
                release(s, job);
                j.refused_by.insert(s.session.clone());
            }
            let (requeued, ended) = requeue_or_cancel(st, job);
            if let Some(r) = &requeued {
                self.persist(r);
            }
            (requeued, ended)
        };
        tracing::info!(job, worker, reason, "job refused");
        self.after_requeue(requeued, ended).await;
    }

    /// After jobs went back to the queue (stored already) or ended: reports the ended ones, fails the
    /// re-queued ones pinned to a worker that has been unregistered meanwhile, and dispatches.
    async fn after_requeue(
        &self,
        requeued: impl IntoIterator<Item = JobRecord>,
        ended: impl IntoIterator<Item = Ended>,
    ) {
        self.deliver_all(ended.into_iter().collect()).await;
        let pinned: HashSet<String> = requeued
            .into_iter()
            .filter_map(|r| r.spec.target.worker)
            .collect();
        for w in pinned {
            if self.store.worker(&w).ok().flatten().is_none() {
                self.worker_unregistered(&w).await;
            }
        }
        self.dispatch().await;
    }

    /// The job's process is running.
    pub(crate) async fn job_started(&self, worker: &str, job: &str) {
        let (subs, stream) = {
            let mut st = self.state();
            match st.jobs.get_mut(job) {
                // A resumed job's start is told again; once is enough.
                Some(j)
                    if j.record.worker.as_deref() == Some(worker) && j.record.state != JobState::Running =>
                {
                    j.record.state = JobState::Running;
                    j.record.started = Some(now_rfc3339());
                    self.persist(&j.snapshot());
                    (j.subscribers.clone(), j.stream)
                }
                _ => return,
            }
        };
        for s in subs {
            let _ = s
                .send(JobEvent::Started {
                    worker: worker.to_owned(),
                    stream,
                })
                .await;
        }
    }

    /// A binary frame of `worker`'s session: output of a job (kept up to the cap and streamed), or a
    /// fetch's file data (relayed as it is).
    pub(crate) async fn job_output(&self, worker: &str, chunk: Chunk) {
        let cap = self.cfg.max_output_bytes;
        let stream = chunk.stream();
        let (which, subs) = {
            let mut guard = self.state();
            let State { sessions, jobs, .. } = &mut *guard;
            let Some((job_id, which)) = sessions.get(worker).and_then(|s| s.streams.get(&stream)).cloned()
            else {
                tracing::debug!(worker, stream, "output for an unknown stream dropped");
                return;
            };
            let Some(j) = jobs.get_mut(&job_id) else { return };
            // File bytes (TRANSFER_STREAM) are relayed, not kept; the relay counts them for a resume.
            if which == TRANSFER_STREAM {
                if let Some(relay) = &j.relay {
                    relay.incoming(&Piece::Data(chunk.clone()));
                }
            } else {
                let data = chunk.payload();
                if which == STDOUT_STREAM {
                    j.record.stdout_bytes += data.len() as u64;
                } else {
                    j.record.stderr_bytes += data.len() as u64;
                }
                let (buf, truncated) = if which == STDOUT_STREAM {
                    (&mut j.stdout, &mut j.record.stdout_truncated)
                } else {
                    (&mut j.stderr, &mut j.record.stderr_truncated)
                };
                let room = cap.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..room.min(data.len())]);
                if data.len() > room {
                    *truncated = true;
                }
            }
            (which, j.live_subscribers())
        };
        let event = if which == TRANSFER_STREAM {
            JobEvent::Chunk(chunk)
        } else {
            JobEvent::Output {
                stream: which,
                data: chunk.data(),
            }
        };
        for s in subs {
            let _ = s.send(event.clone()).await;
        }
    }

    /// The job ended on the worker. A fetch that the worker sent completely ends only with its receiving
    /// client's verdict (see [`Hub::transfer_from_client`]).
    pub(crate) async fn job_finished(&self, worker: &str, result: JobResult) {
        let job = result.job.clone();
        let ended = 'ended: {
            let mut guard = self.state();
            let st = &mut *guard;
            // Not live, or not this worker's: ended here already (cancelled, lost), or a repeat after a
            // reconnect. The worker may forget it.
            let Some(j) = st
                .jobs
                .get_mut(&result.job)
                .filter(|j| j.record.worker.as_deref() == Some(worker))
            else {
                break 'ended None;
            };
            let hold = matches!(j.record.spec.task, Task::Fetch(_))
                && result.outcome == Outcome::Succeeded
                && j.verdict.is_none();
            if hold {
                j.parked = Some(result.clone());
            }
            if let Some(s) = st.sessions.get_mut(worker) {
                release(s, &result.job);
            }
            if hold { None } else { finish_with(st, result) }
        };
        // Stored (durably) before the worker is told it may forget the job; if the store failed, the
        // worker keeps it and sends it again after its next reconnect.
        let stored = match ended {
            Some(e) => self.deliver(e).await,
            None => true,
        };
        if stored {
            self.ack(worker, &job);
        }
        self.dispatch().await;
    }

    /// Tells a worker the hub has the end of `job` (it drops the job's spool). Sent from its own task:
    /// the session's read loop must never wait on the session's outbound queue.
    fn ack(&self, worker: &str, job: &str) {
        let tx = self.state().sessions.get(worker).map(|s| s.tx.clone());
        if let Some(tx) = tx {
            let msg = HubMessage::Ack { job: job.to_owned() };
            tokio::spawn(async move { tx.send(Outbound::message(msg)).await });
        }
    }

    /// A transfer frame from the worker: relayed to the job's client. A `resume` (the worker is back and
    /// says what it has) makes the relay send the worker what follows.
    pub(crate) async fn transfer_from_worker(&self, worker: &str, frame: TransferFrame) {
        let (subs, relay, tx) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let tx = st.sessions.get(worker).map(|s| s.tx.clone());
            match st.jobs.get_mut(&frame.job) {
                Some(j) if j.record.worker.as_deref() == Some(worker) => {
                    (j.live_subscribers(), j.relay.clone(), tx)
                }
                _ => {
                    tracing::debug!(job = %frame.job, worker, "transfer frame for no live job dropped");
                    return;
                }
            }
        };
        if let TransferOp::Resume { received } = frame.op {
            if let (Some(relay), Some(tx)) = (relay, tx) {
                self.relink(frame.job, relay, tx, received);
            }
            return;
        }
        let piece = Piece::Op(frame.op);
        if let Some(relay) = &relay {
            relay.incoming(&piece);
        }
        let Piece::Op(op) = piece else { unreachable!() };
        let frame = TransferFrame { job: frame.job, op };
        for s in subs {
            let _ = s.send(JobEvent::Transfer(frame.clone())).await;
        }
    }

    /// The worker resumed a transfer and has `received` units of the hub's pieces: the relay sends what
    /// follows, from its own task (the session's read loop must never wait on its outbound queue). If
    /// it cannot, the job is cancelled.
    fn relink(&self, job: String, relay: Arc<Hop<Outbound>>, tx: mpsc::Sender<Outbound>, received: u64) {
        let hub = self.me.clone();
        tokio::spawn(async move {
            let wire = |p| transfer_piece(&job, p);
            match relay.relink(tx, received, wire, Vec::new).await {
                Ok(n) => tracing::info!(job = %job, pieces = n, "transfer resumed"),
                Err(e) => {
                    tracing::error!(job = %job, "{e}: cancelling it");
                    if let Some(hub) = hub.upgrade() {
                        let _ = hub.cancel_job(&job).await;
                    }
                }
            }
        });
    }

    /// The relay of a started transfer job, and the job's stream.
    fn relay(&self, job: &str) -> Option<(Arc<Hop<Outbound>>, u64)> {
        let st = self.state();
        let j = st.jobs.get(job)?;
        Some((j.relay.clone()?, j.stream?))
    }

    /// File bytes from the job's client (a ship): relayed to the worker (kept until it has them). The
    /// session's bounded channel pushes back on the client when the worker's connection is slower.
    pub(crate) async fn transfer_data_from_client(&self, job: &str, chunk: Chunk) {
        match self.relay(job) {
            Some((relay, stream)) => {
                let chunk = Piece::Data(chunk.addressed(stream));
                relay.send(chunk, |p| transfer_piece(job, p)).await
            }
            None => tracing::debug!(job, "file bytes for a transfer that is not running dropped"),
        }
    }

    /// A transfer frame from the job's client: relayed to the worker; a fetch's verdict (`committed`,
    /// or the client's `abort`) is also kept for the job's end.
    pub(crate) async fn transfer_from_client(&self, frame: TransferFrame) {
        let ended = {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(j) = st.jobs.get_mut(&frame.job) else {
                return;
            };
            if matches!(j.record.spec.task, Task::Fetch(_)) {
                match &frame.op {
                    TransferOp::Committed(summary) => j.verdict = Some(Ok(summary.clone())),
                    TransferOp::Abort { error } => {
                        j.verdict = Some(Err(format!("the receiving client stopped the fetch: {error}")))
                    }
                    _ => {}
                }
            }
            // A verdict ends a fetch the worker has finished sending.
            if matches!(frame.op, TransferOp::Committed(_) | TransferOp::Abort { .. }) {
                j.parked.take().and_then(|result| finish_with(st, result))
            } else {
                None
            }
        };
        if let Some(e) = ended {
            self.deliver(e).await;
            return;
        }
        if matches!(frame.op, TransferOp::Committed(_)) {
            return;
        }
        match self.relay(&frame.job) {
            Some((relay, _)) => {
                let job = frame.job;
                relay.send(Piece::Op(frame.op), |p| transfer_piece(&job, p)).await;
            }
            None => {
                tracing::debug!(job = %frame.job, "transfer frame for a transfer that is not running dropped")
            }
        }
    }

    /// The client streaming a job went away. A transfer cannot go on without it (see
    /// [`Hub::transfer_client_gone`]); any other job goes on if it has started, and is dropped if not
    /// (see [`Hub::stream_client_gone`]).
    pub(crate) async fn client_gone(&self, job: &str) {
        let transfer = self
            .state()
            .jobs
            .get(job)
            .is_some_and(|j| j.record.spec.task.is_transfer());
        if transfer {
            self.transfer_client_gone(job).await;
        } else {
            self.stream_client_gone(job).await;
        }
    }

    /// The client of a transfer went away: the transfer cannot go on. A fetch it was receiving fails, and
    /// the job is cancelled on the worker (a ship's partial files are removed there).
    async fn transfer_client_gone(&self, job: &str) {
        let ended = {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(j) = st.jobs.get_mut(job) else { return };
            if matches!(j.record.spec.task, Task::Fetch(_)) && j.verdict.is_none() {
                j.verdict = Some(Err("the client receiving the files disconnected".into()));
            }
            j.parked.take().and_then(|result| finish_with(st, result))
        };
        if let Some(e) = ended {
            self.deliver(e).await;
            return;
        }
        tracing::warn!(job, "transfer client disconnected: cancelling the job");
        let _ = self.cancel_job(job).await;
    }

    /// The client streaming a job went away: a job no worker has started yet is cancelled (its client,
    /// a command or a rulebook step, is no longer there to want it); a started one goes on (`job show`).
    async fn stream_client_gone(&self, job: &str) {
        let ended = {
            let mut guard = self.state();
            let st = &mut *guard;
            match st.jobs.get_mut(job).map(|j| (j.record.state, j)) {
                Some((JobState::Queued, _)) => {
                    st.queue.retain(|q| q != job);
                    end_job(st, job, |r| {
                        r.state = JobState::Cancelled;
                        r.error = Some("its client went away before it started".into());
                    })
                }
                // Offered: if the worker takes it, it runs (started jobs go on); if it comes back to the
                // queue, it ends there.
                Some((JobState::Offered, j)) => {
                    j.client_gone = true;
                    None
                }
                _ => None,
            }
        };
        if let Some(e) = ended {
            tracing::info!(job, "the job's client went away before it started: cancelled");
            self.deliver(e).await;
        }
    }

    /// A worker was unregistered: queued jobs pinned to it can never run, and fail.
    pub(crate) async fn worker_unregistered(&self, worker: &str) {
        let ended: Vec<Ended> = {
            let mut guard = self.state();
            let st = &mut *guard;
            let pinned: HashSet<String> = st
                .queue
                .iter()
                .filter(|id| {
                    st.jobs
                        .get(*id)
                        .is_some_and(|j| j.record.spec.target.worker.as_deref() == Some(worker))
                })
                .cloned()
                .collect();
            st.queue.retain(|id| !pinned.contains(id));
            let mut ended: Vec<Ended> = pinned
                .iter()
                .filter_map(|id| {
                    end_job(st, id, |r| {
                        r.state = JobState::Failed;
                        r.error = Some(format!("worker {worker} was unregistered before the job started"));
                    })
                })
                .collect();
            // Jobs waiting for the worker to come back: it will not.
            let waiting: Vec<String> = st
                .jobs
                .iter()
                .filter(|(_, j)| j.detached.is_some() && j.record.worker.as_deref() == Some(worker))
                .map(|(id, _)| id.clone())
                .collect();
            for id in waiting {
                ended.extend(end_job(st, &id, |r| {
                    r.error = Some(format!(
                        "worker {worker} was unregistered while disconnected, with the job {}",
                        r.state.as_str()
                    ));
                    r.state = JobState::Lost;
                }));
            }
            ended
        };
        self.deliver_all(ended).await;
    }

    /// A worker's session ended. Its jobs (offered, accepted or running) wait for it to come back, for
    /// `lost_after`: it resumes them with what the hub missed, or they end `lost`.
    pub(crate) async fn session_ended(&self, worker: &str, session: &str) {
        let mut detached = Vec::new();
        let mut relays = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            if st.sessions.get(worker).is_none_or(|s| s.session != session) {
                return;
            }
            let s = st.sessions.remove(worker).expect("checked above");
            for job_id in s.running {
                let Some(j) = st.jobs.get_mut(&job_id) else {
                    continue;
                };
                let epoch = self.epochs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                j.detached = Some(epoch);
                let note = self.detached_note(worker);
                j.record.waiting = Some(note.clone());
                // A transfer keeps its stream (its client knows it); its relay keeps what it sends.
                match &j.relay {
                    Some(relay) => relays.push((relay.clone(), j.live_subscribers(), note)),
                    None => j.stream = None,
                }
                detached.push((job_id, epoch));
            }
        }
        if !detached.is_empty() {
            tracing::warn!(
                worker,
                jobs = detached.len(),
                "worker disconnected with jobs: they wait {:?} for it to come back",
                self.cfg.lost_after
            );
        }
        for (job, epoch) in detached {
            self.grace_timer(job, epoch);
        }
        for (relay, subs, note) in relays {
            relay.detach().await;
            for s in subs {
                let _ = s.send(JobEvent::Waiting(note.clone())).await;
            }
        }
        // Waiting jobs' reasons change.
        self.dispatch().await;
    }

    /// What `jobs` says of a job whose worker is away.
    fn detached_note(&self, worker: &str) -> String {
        format!(
            "worker {worker} is disconnected: waiting up to {}s for it to come back",
            self.cfg.lost_after.as_secs()
        )
    }

    /// Ends a detached job as `lost` if its worker has not come back within `lost_after`.
    fn grace_timer(&self, job: String, epoch: u64) {
        let (hub, grace) = (self.me.clone(), self.cfg.lost_after);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(hub) = hub.upgrade() else { return };
            let ended = {
                let mut guard = hub.state();
                let st = &mut *guard;
                if st.jobs.get(&job).is_none_or(|j| j.detached != Some(epoch)) {
                    return;
                }
                end_job(st, &job, |r| {
                    let worker = r.worker.clone().unwrap_or_default();
                    r.error = Some(format!(
                        "worker {worker} did not come back within {}s of disconnecting, with the job {}{}",
                        grace.as_secs(),
                        r.state.as_str(),
                        if r.state == JobState::Offered {
                            " (it may have started there)"
                        } else {
                            ""
                        }
                    ));
                    r.state = JobState::Lost;
                })
            };
            if let Some(e) = ended {
                tracing::warn!(job = %job, "job lost: its worker did not come back in time");
                hub.deliver(e).await;
            }
        });
    }

    /// A worker connected (session `session`, already in the state) naming in `hello.resume` the jobs it
    /// still has. The hub's jobs waiting for this worker that it named are taken back on this session,
    /// with new stream ids and the output offsets the worker replays from; an offered one it did not name
    /// never reached it (or it restarted before taking it) and goes back to the queue; an accepted or
    /// running one it did not name is lost (the worker restarted without it). Returns what `welcome`
    /// says; the cancels asked for meanwhile are sent after it.
    ///
    /// Called under the state lock that inserted the session, so nothing is offered to the session
    /// before its resumed jobs count against its capacity; [`Resumption::settle`] does the rest once the
    /// welcome is sent.
    pub(crate) fn resume_jobs(
        &self,
        st: &mut State,
        worker: &str,
        session: &str,
        named: &[String],
    ) -> Resumption {
        let named: HashSet<&str> = named.iter().map(String::as_str).collect();
        let mut resumed = Vec::new();
        let mut cancels = Vec::new();
        let mut requeued = Vec::new();
        let mut ended = Vec::new();
        let mut transfers = Vec::new();
        let tx;
        {
            let mut unnamed = Vec::new();
            {
                let State { sessions, jobs, .. } = &mut *st;
                let Some(s) = sessions.get_mut(worker).filter(|s| s.session == session) else {
                    return Resumption::default();
                };
                tx = s.tx.clone();
                // Resumed transfers keep their streams: new ones on this session start past them.
                let kept = jobs
                    .iter()
                    .filter(|(id, j)| {
                        j.detached.is_some()
                            && j.record.worker.as_deref() == Some(worker)
                            && named.contains(id.as_str())
                    })
                    .filter_map(|(_, j)| j.relay.as_ref().and(j.stream));
                s.next_stream = s.next_stream.max(kept.max().map_or(0, |m| m + 1));
                for (id, j) in jobs.iter_mut() {
                    if j.detached.is_none() || j.record.worker.as_deref() != Some(worker) {
                        continue;
                    }
                    j.detached = None;
                    j.record.waiting = None;
                    if !named.contains(id.as_str()) {
                        unnamed.push((id.clone(), j.record.state));
                        continue;
                    }
                    s.running.insert(id.clone());
                    if let (Some(relay), Some(stream)) = (&j.relay, j.stream) {
                        s.transfers.insert(id.clone());
                        s.streams.insert(stream, (id.clone(), TRANSFER_STREAM));
                        transfers.push((id.clone(), relay.received()));
                        resumed.push(Resumed {
                            job: id.clone(),
                            stdout_offset: 0,
                            stderr_offset: 0,
                            stdout: 0,
                            stderr: 0,
                        });
                    } else {
                        let mut stream = |which: u64| {
                            let n = s.next_stream;
                            s.next_stream += 1;
                            s.streams.insert(n, (id.clone(), which));
                            n
                        };
                        resumed.push(Resumed {
                            job: id.clone(),
                            stdout_offset: j.record.stdout_bytes,
                            stderr_offset: j.record.stderr_bytes,
                            stdout: stream(STDOUT_STREAM),
                            stderr: stream(STDERR_STREAM),
                        });
                    }
                    if j.cancel_requested {
                        cancels.push(id.clone());
                    }
                    tracing::info!(job = %id, worker, "job resumed after the worker reconnected");
                }
            }
            for (id, state) in unnamed {
                if state == JobState::Offered {
                    let (r, e) = requeue_or_cancel(st, &id);
                    if let Some(r) = &r {
                        self.persist(r);
                    }
                    requeued.extend(r);
                    ended.extend(e);
                } else {
                    tracing::warn!(job = %id, worker, "job lost: the worker reconnected without it");
                    ended.extend(end_job(st, &id, |r| {
                        r.error = Some(format!(
                            "worker {worker} reconnected without the job, which was {} (the worker restarted, or lost its spool)",
                            r.state.as_str()
                        ));
                        r.state = JobState::Lost;
                    }));
                }
            }
        }
        Resumption {
            resumed,
            rest: Some(AfterWelcome {
                tx,
                transfers,
                cancels,
                requeued,
                ended,
            }),
        }
    }

    /// Loads the jobs a previous hub process left unfinished (called at start-up, before anything
    /// connects). Queued ones wait in the queue again — except those a client was streaming: that client
    /// went with the old process, so they are cancelled. Jobs offered to, or taken by, a worker wait for
    /// it to reconnect and resume them (see [`Hub::resume_jobs`]), or end `lost` after `lost_after`.
    /// Transfers in flight are lost: their client went with the old process.
    pub(crate) async fn reload(&self) -> Result<(), crate::store::StoreError> {
        let mut detached = Vec::new();
        let mut ended = Vec::new();
        let (mut queued, mut waiting) = (0, 0);
        for mut r in self.store.jobs()?.into_iter().filter(|r| !r.state.is_terminal()) {
            let id = r.id.clone();
            let stop = |r: &mut JobRecord, state: JobState, why: String| {
                r.state = state;
                r.error = Some(why);
                r.ended = Some(now_rfc3339());
                r.waiting = None;
            };
            if r.spec.task.is_transfer() {
                let why = format!(
                    "the hub restarted while the transfer was {}; run it again",
                    r.state.as_str()
                );
                stop(&mut r, JobState::Lost, why);
                ended.push(r);
                continue;
            }
            if r.state == JobState::Queued || r.worker.is_none() {
                if r.streamed {
                    let why = "cancelled before it started: the hub restarted, and the client streaming it went with it".to_owned();
                    stop(&mut r, JobState::Cancelled, why);
                    ended.push(r);
                    continue;
                }
                r.state = JobState::Queued;
                r.worker = None;
                let live = LiveJob::new(r, None);
                let deadline = live.queue_deadline;
                {
                    let mut st = self.state();
                    st.jobs.insert(id.clone(), live);
                    st.queue.push_back(id.clone());
                }
                self.queue_timer(&id, deadline);
                queued += 1;
                continue;
            }
            let epoch = self.epochs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut live = LiveJob::new(r, None);
            live.detached = Some(epoch);
            live.record.waiting = live.record.worker.as_deref().map(|w| self.detached_note(w));
            self.state().jobs.insert(id.clone(), live);
            detached.push((id, epoch));
            waiting += 1;
        }
        for r in &ended {
            self.store.put_job_now(r)?;
        }
        for (job, epoch) in detached {
            self.grace_timer(job, epoch);
        }
        if queued + waiting + ended.len() > 0 {
            tracing::warn!(
                queued,
                waiting_for_workers = waiting,
                ended = ended.len(),
                "jobs left unfinished by the previous hub process reloaded"
            );
        }
        Ok(())
    }

    /// Cancels a job: a queued one ends at once, a started one is killed by its worker (tree and all).
    pub async fn cancel_job(&self, id: &str) -> Result<JobRecord, ApiFail> {
        enum Action {
            Ended(Box<Ended>),
            Tell(mpsc::Sender<Outbound>, Box<JobRecord>),
            TellClient(Vec<mpsc::Sender<JobEvent>>, Box<JobRecord>),
            Later(Box<JobRecord>),
        }
        let action = {
            let mut guard = self.state();
            let st = &mut *guard;
            match st.jobs.get(id).map(|j| (j.record.state, j.record.worker.clone())) {
                None => None,
                Some((JobState::Queued, _)) => {
                    st.queue.retain(|q| q != id);
                    end_job(st, id, |r| {
                        r.state = JobState::Cancelled;
                        r.error = Some("cancelled before it started".into());
                    })
                    .map(|e| Action::Ended(Box::new(e)))
                }
                Some(_) if st.jobs.get(id).is_some_and(|j| j.parked.is_some()) => {
                    // A fetch the worker has sent completely: its client still receives. It is told to stop,
                    // and its verdict ends the job (cancelled if it stopped in time, succeeded if the files
                    // were already in place).
                    let j = st.jobs.get_mut(id).expect("matched above");
                    j.cancel_requested = true;
                    Some(Action::TellClient(j.live_subscribers(), Box::new(j.snapshot())))
                }
                Some((_, worker)) => {
                    let tx = worker.and_then(|w| st.sessions.get(&w)).map(|s| s.tx.clone());
                    let j = st.jobs.get_mut(id).expect("matched above");
                    j.cancel_requested = true;
                    let snapshot = j.snapshot();
                    // A job whose worker is disconnected is cancelled when the worker comes back.
                    Some(match tx {
                        Some(tx) => Action::Tell(tx, Box::new(snapshot)),
                        None => Action::Later(Box::new(snapshot)),
                    })
                }
            }
        };
        match action {
            Some(Action::Ended(e)) => {
                let record = e.record.clone();
                self.deliver(*e).await;
                Ok(record)
            }
            Some(Action::Tell(tx, record)) => {
                tracing::info!(job = id, "cancel requested");
                let msg = HubMessage::Cancel {
                    job: id.to_owned(),
                    reason: "cancelled by an admin".into(),
                };
                let _ = tx.send(Outbound::message(msg)).await;
                Ok(*record)
            }
            Some(Action::Later(record)) => {
                tracing::info!(
                    job = id,
                    "cancel requested; sent when the job's worker reconnects"
                );
                Ok(*record)
            }
            Some(Action::TellClient(subs, record)) => {
                let frame = TransferFrame {
                    job: id.to_owned(),
                    op: TransferOp::Abort {
                        error: "cancelled by an admin".into(),
                    },
                };
                for s in subs {
                    let _ = s.send(JobEvent::Transfer(frame.clone())).await;
                }
                Ok(*record)
            }
            None => match self.store.job(id)? {
                Some(r) => Err(ApiFail::new(
                    StatusCode::CONFLICT,
                    "ended",
                    format!("job {id} has already ended ({})", r.state.as_str()),
                )),
                None => Err(unknown_job(id)),
            },
        }
    }

    /// The current record of a job (live or ended).
    pub fn job(&self, id: &str) -> Result<JobRecord, ApiFail> {
        if let Some(j) = self.state().jobs.get(id) {
            return Ok(j.snapshot());
        }
        self.store.job(id)?.ok_or_else(|| unknown_job(id))
    }

    /// The record now if the job has ended, else a receiver for when it does.
    pub fn wait_job(&self, id: &str) -> Result<Wait, ApiFail> {
        if let Some(j) = self.state().jobs.get_mut(id) {
            let (tx, rx) = oneshot::channel();
            // Waiters whose client gave up (a timed-out long poll) are dropped here.
            j.waiters.retain(|w| !w.is_closed());
            j.waiters.push(tx);
            return Ok(Wait::Pending(rx));
        }
        self.store
            .job(id)?
            .map(|r| Wait::Done(Box::new(r)))
            .ok_or_else(|| unknown_job(id))
    }

    /// Every job, oldest first, optionally only those in `state`; live jobs show their current output.
    pub fn jobs(&self, state: Option<JobState>) -> Result<Vec<JobRecord>, ApiFail> {
        let mut all = self.store.jobs()?;
        {
            let st = self.state();
            for r in all.iter_mut() {
                if let Some(j) = st.jobs.get(&r.id) {
                    *r = j.snapshot();
                }
            }
        }
        all.retain(|r| state.is_none_or(|s| r.state == s));
        Ok(all)
    }

    /// Stores a job's state without waiting for the write (it is committed in order, and its failure
    /// logged, by the store's writer).
    fn persist(&self, record: &JobRecord) {
        drop(self.store.put_job(record));
    }

    /// Stores an ended job and tells whoever waits for it; true when the end is durable.
    async fn deliver(&self, e: Ended) -> bool {
        self.deliver_all(vec![e]).await
    }

    /// Stores ended jobs and tells their waiters and subscribers, each end durable before anyone hears of
    /// it. The writes are queued before the first await, and the telling runs as its own task: a caller
    /// dropped half-way (an HTTP handler whose client left) cannot lose an end.
    async fn deliver_all(&self, ended: Vec<Ended>) -> bool {
        if ended.is_empty() {
            return true;
        }
        let stored: Vec<_> = ended
            .into_iter()
            .map(|e| (self.store.put_job(&e.record), e))
            .collect();
        let tell = tokio::spawn(async move {
            let mut all_stored = true;
            for (commit, e) in stored {
                if let Err(err) = commit.await {
                    tracing::error!(job = %e.record.id, "{err}");
                    all_stored = false;
                }
                tracing::info!(job = %e.record.id, state = e.record.state.as_str(), rc = ?e.record.rc, "job ended");
                for w in e.waiters {
                    let _ = w.send(e.record.clone());
                }
                for s in e.subscribers {
                    let _ = s.send(JobEvent::Ended(Box::new(e.record.clone()))).await;
                }
            }
            all_stored
        });
        tell.await.unwrap_or(false)
    }
}

fn unknown_job(id: &str) -> ApiFail {
    ApiFail::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no job {id}: see `cla-hub jobs`"),
    )
}

/// Ends a live job with the worker's result (and, for a fetch, its client's verdict).
fn finish_with(st: &mut State, result: JobResult) -> Option<Ended> {
    let (verdict, cancel_requested) = match st.jobs.get_mut(&result.job) {
        Some(j) => (j.verdict.take(), j.cancel_requested),
        None => (None, false),
    };
    end_job(st, &result.job, |r| {
        r.state = match result.outcome {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Failed | Outcome::Error => JobState::Failed,
            Outcome::TimedOut => JobState::TimedOut,
            Outcome::Cancelled => JobState::Cancelled,
            Outcome::Lost => JobState::Lost,
        };
        r.rc = result.rc;
        r.signal = result.signal;
        r.error = result.error.clone();
        r.error_code = result.code.clone();
        // Every byte the worker says the job wrote should be here; if not, the record says so.
        if let Some([out, err]) = result.output_bytes
            && (out, err) != (r.stdout_bytes, r.stderr_bytes)
        {
            let note = format!(
                "output incomplete: the hub received {} of {out} stdout and {} of {err} stderr bytes",
                r.stdout_bytes, r.stderr_bytes
            );
            tracing::error!(job = %r.id, "{note}");
            r.error = Some(match r.error.take() {
                Some(e) => format!("{e}; {note}"),
                None => note,
            });
        }
        r.eval = result.eval.clone();
        r.transfer = result.transfer.clone();
        match verdict {
            // The receiving client has the last word on a fetch.
            Some(Ok(summary)) if result.outcome == Outcome::Succeeded => r.transfer = Some(summary),
            Some(Err(e)) if r.state == JobState::Succeeded || r.state == JobState::Cancelled => {
                r.state = if cancel_requested {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                r.error = Some(e);
                r.transfer = None;
            }
            _ => {}
        }
    })
}

/// Assigns `job` to `session`: stream ids, running slot, `offered` state. Returns the request to send.
fn offer(session: &mut Session, job: &mut LiveJob) -> HubMessage {
    let id = job.record.id.clone();
    session.running.insert(id.clone());
    if job.record.spec.task.is_transfer() {
        session.transfers.insert(id.clone());
    }
    job.record.state = JobState::Offered;
    job.record.worker = Some(session.id.clone());
    // Each request gets the binary streams it uses.
    let mut stream = |which: u64| {
        let s = session.next_stream;
        session.next_stream += 1;
        session.streams.insert(s, (id.clone(), which));
        s
    };
    let spec = &job.record.spec;
    let timeout_ms = spec.timeout_secs.map(|s| (s * 1000.0).round() as u64);
    match &spec.task {
        Task::Exec(command) => HubMessage::Exec(ExecRequest {
            job: id.clone(),
            command: command.clone(),
            workdir: spec.workdir.clone(),
            env: spec.env_vars.clone(),
            timeout_ms,
            output_timeout_ms: None,
            stdout: stream(STDOUT_STREAM),
            stderr: stream(STDERR_STREAM),
            on_disconnect: spec.on_disconnect,
        }),
        Task::Eval(e) => HubMessage::Eval(EvalRequest {
            job: id.clone(),
            code: e.code.clone(),
            stash: e.stash.clone(),
            timeout_ms,
            stdout: stream(STDOUT_STREAM),
            on_disconnect: spec.on_disconnect,
        }),
        Task::Ship(t) => {
            let s = stream(TRANSFER_STREAM);
            job.stream = Some(s);
            job.relay = Some(Arc::new(Hop::new(session.tx.clone())));
            HubMessage::Ship(ShipRequest {
                job: id.clone(),
                dest: t.dest.clone(),
                mkdir: t.mkdir,
                stream: s,
            })
        }
        Task::Fetch(t) => {
            let s = stream(TRANSFER_STREAM);
            job.stream = Some(s);
            job.relay = Some(Arc::new(Hop::new(session.tx.clone())));
            HubMessage::Fetch(FetchRequest {
                job: id.clone(),
                path: t.path.clone(),
                stream: s,
            })
        }
    }
}

/// Puts an offered job back at the front of the queue — or, if a cancel was asked for, ends it as
/// cancelled. Returns the record to store, or the ended job to report.
fn requeue_or_cancel(st: &mut State, id: &str) -> (Option<JobRecord>, Option<Ended>) {
    let Some(j) = st.jobs.get_mut(id) else {
        return (None, None);
    };
    if j.cancel_requested || j.client_gone {
        let why = if j.cancel_requested {
            "cancelled before it started"
        } else {
            "its client went away before it started"
        };
        let e = end_job(st, id, |r| {
            r.state = JobState::Cancelled;
            r.error = Some(why.into());
        });
        return (None, e);
    }
    if j.queue_deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
        return (None, end_job(st, id, queue_timeout));
    }
    j.record.state = JobState::Queued;
    j.record.worker = None;
    let snapshot = j.snapshot();
    st.queue.push_front(id.to_owned());
    (Some(snapshot), None)
}

/// Ends a job whose queue timeout ran out, saying why it waited.
fn queue_timeout(r: &mut JobRecord) {
    let why = r.waiting.take().unwrap_or_else(|| "no worker took it".into());
    let secs = r.spec.target.queue_timeout_secs.unwrap_or_default();
    r.state = JobState::TimedOut;
    r.error = Some(format!(
        "was not started within its queue timeout of {secs}s: {why}; check `cla-hub workers` and the \
         target's tags/env"
    ));
}

/// A transfer's piece as it goes to the worker (a chunk keeps the stream it came with: the job's).
fn transfer_piece(job: &str, piece: Piece) -> Outbound {
    match piece {
        Piece::Op(op) => Outbound::message(HubMessage::Transfer(TransferFrame {
            job: job.to_owned(),
            op,
        })),
        Piece::Data(chunk) => Outbound::Chunk(Box::new(chunk)),
    }
}

/// Frees the job's slot and stream ids on its session.
fn release(session: &mut Session, job: &str) {
    session.running.remove(job);
    session.transfers.remove(job);
    session.streams.retain(|_, (j, _)| j != job);
}

/// Removes a live job, applies the final changes and stamps `ended`.
fn end_job(st: &mut State, id: &str, finish: impl FnOnce(&mut JobRecord)) -> Option<Ended> {
    let mut j = st.jobs.remove(id)?;
    finish(&mut j.record);
    j.record.waiting = None;
    j.record.ended = Some(now_rfc3339());
    Some(Ended {
        record: j.snapshot(),
        subscribers: j.subscribers,
        waiters: j.waiters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cla_protocol::api::EvalTask;
    use tokio_util::sync::CancellationToken;

    fn eval_spec(stash: serde_json::Value) -> JobSpec {
        JobSpec {
            target: Target {
                worker: Some("w".into()),
                tags: vec![],
                env: None,
                queue_timeout_secs: None,
            },
            task: Task::Eval(EvalTask {
                code: "1".into(),
                stash,
            }),
            workdir: None,
            env_vars: Default::default(),
            timeout_secs: None,
            on_disconnect: Default::default(),
        }
    }

    /// A hub with one connected simulated worker (capacity 1): the hub and the worker's channel.
    fn hub_with_session(dir: &std::path::Path) -> (Arc<Hub>, mpsc::Receiver<Outbound>) {
        let store = crate::store::Store::open(dir).unwrap();
        let cfg = crate::HubConfig::new(dir.to_path_buf());
        let hub = Hub::new(store, cfg, String::new(), CancellationToken::new(), None);
        let (tx, rx) = mpsc::channel(8);
        let hello = cla_protocol::Hello {
            version: cla_protocol::PROTOCOL_VERSION,
            agent: "test".into(),
            tags: vec![],
            envs: vec![],
            capacity: 1,
            host: "h".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            pid: 1,
            resume: vec![],
            features: vec![],
        };
        let session = Session {
            id: "w".into(),
            session: "s1".into(),
            tx,
            hello,
            connected_since: now_rfc3339(),
            running: Default::default(),
            transfers: Default::default(),
            draining: false,
            disabled: false,
            streams: Default::default(),
            next_stream: 1,
            close: CancellationToken::new(),
            old_token: false,
        };
        hub.state().sessions.insert("w".into(), session);
        (hub, rx)
    }

    fn exec_spec() -> JobSpec {
        let mut spec = eval_spec(serde_json::Value::Null);
        spec.target.worker = None;
        spec.task = Task::Exec(cla_protocol::CommandLine::Argv {
            argv: vec!["true".into()],
        });
        spec
    }

    /// A new job that a free worker takes at once is stored with one fsync (its `offered` state), not
    /// two; one that has to wait is stored `queued` (one fsync) before the caller hears of it, and its
    /// offer later costs one more. Either way the offer goes out only after the write.
    #[tokio::test]
    async fn a_new_job_costs_one_fsync_before_its_offer() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, mut rx) = hub_with_session(dir.path());
        let before = hub.store.durable_commits();
        let first = hub.create_job(exec_spec(), None).await.unwrap();
        assert_eq!(first.state, JobState::Offered, "{first:?}");
        assert_eq!(hub.store.durable_commits() - before, 1);
        let stored = hub.store.job(&first.id).unwrap().unwrap();
        assert_eq!(stored.state, JobState::Offered);
        let offer = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(offer, Outbound::Message(m) if matches!(&*m, HubMessage::Exec(r) if r.job == first.id))
        );

        // The worker is full: the next job waits, stored as queued.
        let before = hub.store.durable_commits();
        let second = hub.create_job(exec_spec(), None).await.unwrap();
        assert_eq!(second.state, JobState::Queued, "{second:?}");
        assert_eq!(hub.store.durable_commits() - before, 1);
        assert_eq!(
            hub.store.job(&second.id).unwrap().unwrap().state,
            JobState::Queued
        );
        assert!(rx.try_recv().is_err(), "nothing is offered to a full worker");
    }

    #[test]
    fn stash_limits() {
        assert!(validate(&eval_spec(serde_json::json!({"a": [1, {"b": 2}]}))).is_ok());
        let mut deep = serde_json::json!(1);
        for _ in 0..70 {
            deep = serde_json::json!({ "a": deep });
        }
        let e = validate(&eval_spec(deep)).unwrap_err();
        assert!(e.1.error.contains("nests deeper than 64"), "{}", e.1.error);
        let big = serde_json::json!({ "s": "x".repeat(MAX_STASH_BYTES) });
        let e = validate(&eval_spec(big)).unwrap_err();
        assert!(e.1.error.contains("bytes of JSON"), "{}", e.1.error);
        let e = validate(&eval_spec(serde_json::json!([1]))).unwrap_err();
        assert!(e.1.error.contains("must be a JSON object"), "{}", e.1.error);
    }
}
