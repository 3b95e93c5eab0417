//! The embedded store: one redb file, `hub.redb`, in the data dir. Each record is a JSON value under its
//! key; secrets are stored only as SHA-256 hashes. This is the zero-setup default behind [`Store`].

use std::path::Path;
use std::sync::{Arc, mpsc as std_mpsc};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{JobCommit, PasskeyRecord, Store, StoreError, WorkerRecord};
use cla_protocol::api::{JobRecord, JobState};

/// Memory redb may use for cached pages (read cache plus the write buffer). Its default, 1 GiB, let the
/// hub's RSS grow with the store (job records carry their kept output). The store's working set is
/// the recent jobs and the small tables; older pages come from the page cache when asked for.
const CACHE_BYTES: usize = 16 << 20;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PASSKEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("passkeys");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The store handle (cheap to share behind an `Arc`).
///
/// Job records, written at every state change, go through one writer thread that commits whatever has
/// queued up in one transaction (group commit): under load, many jobs share one fsync, and a caller that
/// needs its write durable waits for that commit only. Other records are written directly.
pub struct RedbStore {
    db: Arc<Database>,
    jobs: Option<std_mpsc::Sender<JobWrite>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Job records queued but not committed yet, newest per job: reads see them, so a job is never
    /// read back older than it was last written.
    pending: Arc<Pending>,
    /// Durable commits of job records so far (each one fsync).
    durable_commits: Arc<std::sync::atomic::AtomicU64>,
}

/// A job's newest queued write: its sequence number and its bytes.
type PendingWrite = (u64, Arc<Vec<u8>>);
type PendingMap = std::collections::HashMap<String, PendingWrite>;
type Pending = std::sync::Mutex<PendingMap>;
/// Queued job writes, by job id.
type Queued = Vec<(String, Arc<Vec<u8>>)>;

/// A job record on its way to the writer thread.
struct JobWrite {
    key: String,
    bytes: Arc<Vec<u8>>,
    /// Orders the writes of one job in `pending`.
    seq: u64,
    durable: bool,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

fn lock_pending(p: &Pending) -> std::sync::MutexGuard<'_, PendingMap> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most job writes committed in one transaction.
const MAX_BATCH: usize = 4096;

/// The writer thread: takes what has queued up, commits it (durably if any write asks for it: a durable
/// commit also makes the earlier non-durable ones durable), and tells the waiting callers.
fn write_jobs(
    db: Arc<Database>,
    rx: std_mpsc::Receiver<JobWrite>,
    pending: Arc<Pending>,
    durable_commits: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|w| w.durable);
        let commit = || -> Result<(), StoreError> {
            let mut tx = db.begin_write().map_err(db_err)?;
            tx.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(db_err)?;
            {
                let mut t = tx.open_table(JOBS).map_err(db_err)?;
                for w in &batch {
                    t.insert(w.key.as_str(), w.bytes.as_slice()).map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)
        };
        let result = commit().map_err(|e| e.to_string());
        if durable && result.is_ok() {
            durable_commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(e) = &result {
            tracing::error!("storing {} job record(s) failed: {e}", batch.len());
        }
        {
            // Committed (or failed: then the database has the older record, and so will readers).
            let mut p = lock_pending(&pending);
            for w in &batch {
                if p.get(&w.key).is_some_and(|(seq, _)| *seq == w.seq) {
                    p.remove(&w.key);
                }
            }
        }
        for w in batch {
            if let Some(done) = w.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

impl Drop for RedbStore {
    /// Lets the writer thread commit what is queued, and waits for it (so the file is closed when this
    /// returns, and a new `RedbStore` may open it).
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl RedbStore {
    /// Opens (or creates) `DATA_DIR/hub.redb`.
    pub fn open(data_dir: &Path) -> Result<RedbStore, StoreError> {
        cla_common::util::create_private_dir(data_dir).map_err(|e| StoreError::Open {
            path: data_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let path = data_dir.join("hub.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(data_dir.to_path_buf()),
                other => StoreError::Open {
                    path: path.clone(),
                    reason: other.to_string(),
                },
            })?;
        // redb creates the file with the process's umask; the store holds token hashes and job output.
        cla_common::util::make_private(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // Create the tables up front so readers never meet a missing one.
        let tx = db.begin_write().map_err(db_err)?;
        for t in [META, PASSKEYS, WORKERS, JOBS] {
            tx.open_table(t).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (jobs, rx) = std_mpsc::channel();
        let pending: Arc<Pending> = Default::default();
        let durable_commits: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let (for_writer, pending_for_writer, commits_for_writer) = (
            Arc::clone(&db),
            Arc::clone(&pending),
            Arc::clone(&durable_commits),
        );
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_jobs(for_writer, rx, pending_for_writer, commits_for_writer))
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(RedbStore {
            db,
            jobs: Some(jobs),
            writer: Some(writer),
            pending,
            durable_commits,
        })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.put_with(table, key, value, Durability::Immediate)
    }

    fn put_with<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        let mut tx = self.db.begin_write().map_err(db_err)?;
        tx.set_durability(durability).map_err(db_err)?;
        tx.open_table(table)
            .map_err(db_err)?
            .insert(key, bytes.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        Self::get_in(&tx, table, key)
    }

    fn get_in<T: DeserializeOwned>(
        tx: &redb::ReadTransaction,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let t = tx.open_table(table).map_err(db_err)?;
        match t.get(key).map_err(db_err)? {
            None => Ok(None),
            Some(v) => decode(key, v.value()).map(Some),
        }
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let existed = tx
            .open_table(table)
            .map_err(db_err)?
            .remove(key)
            .map_err(db_err)?
            .is_some();
        tx.commit().map_err(db_err)?;
        Ok(existed)
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        Self::all_in(&tx, table)
    }

    fn all_in<T: DeserializeOwned>(
        tx: &redb::ReadTransaction,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let key = k.value().to_owned();
            // One unreadable record must not make every listing (or the hub's start-up) fail.
            match decode(&key, v.value()) {
                Ok(value) => out.push((key, value)),
                Err(e) => tracing::error!("{e}; skipped"),
            }
        }
        Ok(out)
    }

    /// The job writes not committed yet, and a read snapshot of the database, taken together: a write
    /// leaves `pending` only after its commit, so whatever is in neither was committed before the snapshot.
    fn snapshot(&self) -> Result<(Queued, redb::ReadTransaction), StoreError> {
        let p = lock_pending(&self.pending);
        let tx = self.db.begin_read().map_err(db_err)?;
        let queued = p.iter().map(|(k, (_, b))| (k.clone(), Arc::clone(b))).collect();
        Ok((queued, tx))
    }
}

impl Store for RedbStore {
    fn admin_token_hash(&self) -> Result<Option<String>, StoreError> {
        self.get(META, "admin_token_hash")
    }

    fn set_admin_token_hash(&self, hash: &str) -> Result<(), StoreError> {
        self.put(META, "admin_token_hash", &hash)
    }

    fn put_passkey(&self, hash: &str, rec: &PasskeyRecord) -> Result<(), StoreError> {
        self.put(PASSKEYS, hash, rec)
    }

    fn passkey(&self, hash: &str) -> Result<Option<PasskeyRecord>, StoreError> {
        self.get(PASSKEYS, hash)
    }

    fn passkeys(&self) -> Result<Vec<(String, PasskeyRecord)>, StoreError> {
        let mut v = self.all::<PasskeyRecord>(PASSKEYS)?;
        v.sort_by(|a, b| a.1.created.cmp(&b.1.created));
        Ok(v)
    }

    fn put_worker(&self, rec: &WorkerRecord) -> Result<(), StoreError> {
        self.put(WORKERS, &rec.id, rec)
    }

    fn update_worker_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut WorkerRecord),
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let found = {
            let mut t = tx.open_table(WORKERS).map_err(db_err)?;
            let current: Option<WorkerRecord> = match t.get(id).map_err(db_err)? {
                Some(v) => Some(decode(id, v.value())?),
                None => None,
            };
            match current {
                Some(mut rec) => {
                    change(&mut rec);
                    let bytes = serde_json::to_vec(&rec).expect("records serialize");
                    t.insert(id, bytes.as_slice()).map_err(db_err)?;
                    true
                }
                None => false,
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(found)
    }

    fn worker(&self, id: &str) -> Result<Option<WorkerRecord>, StoreError> {
        self.get(WORKERS, id)
    }

    fn remove_worker(&self, id: &str) -> Result<bool, StoreError> {
        self.remove(WORKERS, id)
    }

    fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(self.all(WORKERS)?.into_iter().map(|(_, w)| w).collect())
    }

    fn durable_commits(&self) -> u64 {
        self.durable_commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn put_job(&self, rec: &JobRecord) -> JobCommit {
        let durable = matches!(rec.state, JobState::Queued | JobState::Offered) || rec.state.is_terminal();
        let (tx, rx) = oneshot::channel();
        let bytes = Arc::new(serde_json::to_vec(rec).expect("records serialize"));
        let sent = self.jobs.as_ref().is_some_and(|jobs| {
            // `pending` is updated and the write queued under one lock, so the two orders agree.
            let mut p = lock_pending(&self.pending);
            let seq = p.get(&rec.id).map_or(0, |(seq, _)| seq + 1);
            let queued = jobs
                .send(JobWrite {
                    key: rec.id.clone(),
                    bytes: Arc::clone(&bytes),
                    seq,
                    durable,
                    done: Some(tx),
                })
                .is_ok();
            if queued {
                p.insert(rec.id.clone(), (seq, bytes));
            }
            queued
        });
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Db("the store is closed".into()));
            }
            match rx.await {
                Ok(r) => r.map_err(StoreError::Db),
                Err(_) => Err(StoreError::Db("the store writer stopped".into())),
            }
        })
    }

    fn put_job_now(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.put_with(JOBS, &rec.id, rec, Durability::Immediate)
    }

    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        // As in `snapshot`: the read transaction begins while `pending` is held.
        let tx = {
            let p = lock_pending(&self.pending);
            if let Some((_, bytes)) = p.get(id) {
                return decode(id, bytes).map(Some);
            }
            self.db.begin_read().map_err(db_err)?
        };
        Self::get_in(&tx, JOBS, id)
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let (queued, tx) = self.snapshot()?;
        let mut all: std::collections::BTreeMap<String, JobRecord> =
            Self::all_in(&tx, JOBS)?.into_iter().collect();
        for (key, bytes) in queued {
            match decode(&key, &bytes) {
                Ok(r) => {
                    all.insert(key, r);
                }
                Err(e) => tracing::error!("{e}; skipped"),
            }
        }
        Ok(all.into_values().collect())
    }

    fn job_ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let (queued, tx) = self.snapshot()?;
        let t = tx.open_table(JOBS).map_err(db_err)?;
        let mut ids = std::collections::BTreeSet::new();
        // Keys sort as strings, so the ones with the prefix are one range from it on.
        for item in t.range(prefix..).map_err(db_err)? {
            let (k, _) = item.map_err(db_err)?;
            let key = k.value();
            if !key.starts_with(prefix) || ids.len() >= limit {
                break;
            }
            ids.insert(key.to_owned());
        }
        ids.extend(
            queued
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with(prefix)),
        );
        Ok(ids.into_iter().take(limit).collect())
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
