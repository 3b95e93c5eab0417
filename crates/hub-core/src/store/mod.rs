//! What the hub keeps: passkeys, registered workers, the admin token's hash, and jobs with their
//! output. [`Store`] is the interface the hub uses; [`RedbStore`] (`embedded.rs`) is the embedded
//! implementation and the zero-setup default. Another implementation (PostgreSQL, for several hub
//! replicas) implements the same trait: nothing in its signatures is redb's.
//!
//! The calls are synchronous and short, except [`Store::put_job`]: job records, written at every state
//! change, are committed in groups, and the caller gets the commit as a future, to await where the write
//! must be durable before the hub acts (an offer is sent only once its `offered` record is).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use cla_protocol::api::{JobRecord, PasskeyView};

mod embedded;

pub use embedded::RedbStore;

/// A job record's write on its way: resolves once it is committed (durably, for the states that must
/// be). Dropping it does not cancel the write.
pub type JobCommit = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {0} is in use by another cla-hub: stop it, or pick another --data-dir")]
    Locked(PathBuf),
    #[error("cannot open the store {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("store error: {0}")]
    Db(String),
    #[error("corrupt record `{key}` in the store: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A passkey as stored: its hash is the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasskeyRecord {
    pub prefix: String,
    pub project: String,
    pub created: String,
    pub revoked: bool,
}

impl PasskeyRecord {
    pub fn view(&self) -> PasskeyView {
        PasskeyView {
            prefix: self.prefix.clone(),
            project: self.project.clone(),
            created: self.created.clone(),
            revoked: self.revoked,
        }
    }
}

/// A registered worker as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub token_hash: String,
    pub projects: Vec<String>,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    pub host: Option<String>,
    pub version: Option<String>,
    pub capacity: u32,
    pub registered: String,
    pub last_seen: Option<String>,
    /// `cla-hub worker disable`: the hub offers this worker nothing until `enable`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// The token before a rotation, still accepted until `old_token_until` (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_token_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_token_until: Option<u64>,
    /// A rotation asked for and not yet confirmed by the worker: its overlap in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<u64>,
    /// The fingerprint of the client certificate issued at the last registration (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

impl WorkerRecord {
    /// Which of this worker's tokens `presented` is: `Some(false)` the current one, `Some(true)` the
    /// one before a rotation, still inside its overlap window; `None` neither.
    pub fn check_token(&self, presented: &str, now_unix: u64) -> Option<bool> {
        if cla_common::token::verify(presented, &self.token_hash) {
            return Some(false);
        }
        match (&self.old_token_hash, self.old_token_until) {
            (Some(old), Some(until)) if now_unix < until && cla_common::token::verify(presented, old) => {
                Some(true)
            }
            _ => None,
        }
    }
}

/// The hub's store. One is shared by every task of the hub (`Send + Sync`); it keeps each job's writes
/// in order, and a job is never read back older than it was last written.
pub trait Store: Send + Sync {
    /// The admin token's hash, if one was set.
    fn admin_token_hash(&self) -> Result<Option<String>, StoreError>;

    /// Keeps the hash of the bootstrap admin token.
    fn set_admin_token_hash(&self, hash: &str) -> Result<(), StoreError>;

    /// Stores a passkey under its hash.
    fn put_passkey(&self, hash: &str, rec: &PasskeyRecord) -> Result<(), StoreError>;

    /// The passkey with this hash.
    fn passkey(&self, hash: &str) -> Result<Option<PasskeyRecord>, StoreError>;

    /// Every passkey with its hash, oldest first.
    fn passkeys(&self) -> Result<Vec<(String, PasskeyRecord)>, StoreError>;

    /// Stores (or replaces) a registered worker.
    fn put_worker(&self, rec: &WorkerRecord) -> Result<(), StoreError>;

    /// Changes a worker record in one transaction (read and write together); false if there is none.
    /// Callers use `update_worker` on `dyn Store`, which takes any `FnOnce`.
    fn update_worker_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut WorkerRecord),
    ) -> Result<bool, StoreError>;

    /// The registered worker with this id.
    fn worker(&self, id: &str) -> Result<Option<WorkerRecord>, StoreError>;

    /// Forgets a registered worker; false if there was none.
    fn remove_worker(&self, id: &str) -> Result<bool, StoreError>;

    /// Every registered worker, by id.
    fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError>;

    /// How many durable (fsynced) commits of job records the store has made.
    fn durable_commits(&self) -> u64;

    /// Stores a job, in order with the job writes before it. A queued, offered or ended job is fsynced
    /// before the returned future completes (an offer is sent only then, so a restarted hub knows every
    /// offer it made); `accepted` and `running` are not, to spare a round trip two fsyncs: after a crash
    /// such a job falls back to `offered` to the same worker, which resumes it when it reconnects.
    /// Dropping the future does not cancel the write.
    fn put_job(&self, rec: &JobRecord) -> JobCommit;

    /// Stores a job now, bypassing the writer thread (start-up, before anything else writes).
    fn put_job_now(&self, rec: &JobRecord) -> Result<(), StoreError>;

    /// A job as last written (committed or still queued for the writer).
    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// Every job as last written, oldest first (job ids sort by creation time).
    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// The ids of jobs that start with `prefix`, at most `limit` of them, in order.
    fn job_ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError>;
}

impl dyn Store {
    /// Changes a worker record in one transaction (read and write together); false if there is none.
    pub fn update_worker(
        &self,
        id: &str,
        change: impl FnOnce(&mut WorkerRecord),
    ) -> Result<bool, StoreError> {
        let mut change = Some(change);
        self.update_worker_with(id, &mut |rec| {
            if let Some(change) = change.take() {
                change(rec)
            }
        })
    }
}
