//! The job lifecycle on the hub (`docs/reliability.md`): `queued → offered → accepted → running → succeeded |
//! failed | cancelled | timed_out | lost`.
//!
//! A job is persisted when created and at each state change, before the change is acted on (a job is
//! stored as `offered` before the worker is sent it). Live jobs sit in memory with their subscribers (exec
//! streams) and waiters (`job show --wait`); ended jobs live only in the store. Queued jobs wait FIFO for a
//! connected matching worker with a free slot.
//!
//! This module holds the job's records and states: creating, storing and ending jobs, and answering
//! queries. The rest of the engine is split by concern:
//!
//! | module | owns |
//! |---|---|
//! | `scheduler` | matching, waiting reasons, queue timeouts, the dispatch pass |
//! | `dispatch` | offers and their leases, what the worker says back (accepted … finished), cancels |
//! | `streams` | live output to admin clients, and clients that go away |
//! | `relay` | the transfer relay between a worker's leg and a client's leg |
//! | `resume` | sessions that end and workers that come back; reloading live jobs at start |

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Hub, Outbound, Session, State};
use crate::store::WorkerRecord;
use cla_common::util::now_rfc3339;
use cla_protocol::api::{
    ApiError, JobQuery, JobRecord, JobSpec, JobState, STDERR_STREAM, STDOUT_STREAM, TRANSFER_STREAM, Target,
    Task,
};
use cla_protocol::{
    Chunk, CommandLine, EvalRequest, ExecRequest, FEATURE_TRANSFER, FetchRequest, Hello, HubMessage,
    JobResult, Outcome, Resumed, ShipRequest, TransferFrame, TransferOp, TransferSummary,
};
use cla_transfer::{Hop, Piece};

mod dispatch;
mod relay;
mod resume;
mod scheduler;
mod streams;
#[cfg(test)]
mod tests;

use dispatch::{offer, release, requeue_or_cancel};
use scheduler::queue_timeout;
pub use streams::Attachment;

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
    /// Reloaded after a restart while queued with a client streaming it: not offered until a client
    /// attaches (that client went with the old process, and may come back), cancelled if none does in
    /// time ([`crate::HubConfig::client_grace`]).
    awaiting_client: bool,
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
            awaiting_client: false,
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
        self.check_target(&spec.target)?;
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

    /// Refuses a target that no registered worker can match (an unknown id, a tag or env no worker
    /// has): such a job would wait for ever. A connected matching worker settles it without reading the
    /// store; otherwise every registered worker is read, as last written (a worker registered a moment
    /// ago counts).
    fn check_target(&self, target: &Target) -> Result<(), ApiFail> {
        if self
            .state()
            .sessions
            .values()
            .any(|s| scheduler::on_target(target, &s.id, &s.hello))
        {
            return Ok(());
        }
        let workers = self.store.workers()?;
        scheduler::check_registered(target, &workers).map_err(|why| {
            let code = match &target.worker {
                Some(w) if !workers.iter().any(|r| &r.id == w) => "unknown_worker",
                _ => cla_protocol::api::NO_MATCH,
            };
            ApiFail::new(StatusCode::NOT_FOUND, code, why)
        })
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
                    self.store.put_job(snapshot.as_ref().unwrap_or(&record))
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

    /// Jobs, newest first, filtered by `q` (state, worker, created since, at most `limit`); live jobs
    /// show their current output.
    pub fn jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, ApiFail> {
        let state = q
            .state
            .as_deref()
            .map(str::parse::<JobState>)
            .transpose()
            .map_err(|m| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", m))?;
        if let Some(since) = &q.since {
            humantime::parse_rfc3339(since).map_err(|_| {
                ApiFail::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("`since` must be an RFC 3339 time like 2026-12-07T10:00:00Z, not `{since}`"),
                )
            })?;
        }
        let mut all = self.store.jobs()?;
        {
            let st = self.state();
            for r in all.iter_mut() {
                if let Some(j) = st.jobs.get(&r.id) {
                    *r = j.snapshot();
                }
            }
        }
        // Timestamps are all RFC 3339 UTC to the second, so they compare as strings.
        let since = q.since.as_deref().map(|s| {
            humantime::format_rfc3339_seconds(humantime::parse_rfc3339(s).expect("checked above")).to_string()
        });
        all.retain(|r| {
            state.is_none_or(|s| r.state == s)
                && q.worker.as_ref().is_none_or(|w| r.worker.as_ref() == Some(w))
                && since.as_ref().is_none_or(|t| r.created.as_str() >= t.as_str())
        });
        all.reverse();
        if let Some(n) = q.limit.filter(|n| *n > 0) {
            all.truncate(n);
        }
        Ok(all)
    }

    /// The full id of the job `id` names: itself, or the one job whose id starts with it (at least 6
    /// characters, as git takes abbreviated hashes). Several matches are an error that lists them.
    pub fn resolve_job(&self, id: &str) -> Result<String, ApiFail> {
        if self.state().jobs.contains_key(id) || self.store.job(id)?.is_some() {
            return Ok(id.to_owned());
        }
        if id.len() < MIN_PREFIX {
            return Err(unknown_job(id));
        }
        let mut found: std::collections::BTreeSet<String> = self
            .state()
            .jobs
            .keys()
            .filter(|k| k.starts_with(id))
            .take(6)
            .cloned()
            .collect();
        found.extend(self.store.job_ids_with_prefix(id, 6)?);
        let found: Vec<String> = found.into_iter().collect();
        match found.as_slice() {
            [] => Err(unknown_job(id)),
            [one] => Ok(one.clone()),
            many => Err(ApiFail::new(
                StatusCode::BAD_REQUEST,
                "ambiguous",
                format!(
                    "`{id}` is the start of several job ids ({}{}): give more of it",
                    many.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if many.len() > 5 { ", ..." } else { "" }
                ),
            )),
        }
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

/// The shortest job id prefix [`Hub::resolve_job`] takes.
const MIN_PREFIX: usize = 6;

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
