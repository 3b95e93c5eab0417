//! The worker's table of jobs it has taken: kept across connections until the hub acknowledges each
//! end, recovered from the spool at start, drained or stopped at shutdown; and the bounded id sets.

use super::*;

impl Keep {
    pub(super) fn is_transfer(&self) -> bool {
        matches!(self, Keep::Leg(_))
    }

    /// The job's end is kept (the task may not have marked its entry yet).
    pub(super) async fn ended(&self) -> bool {
        match self {
            Keep::Journal(j) => j.ended().await,
            Keep::Leg(l) => l.ended(),
        }
    }

    /// Keeps the job's end and sends it if connected.
    pub(super) async fn finish(&self, result: JobResult) {
        match self {
            Keep::Journal(j) => j.finish(result).await,
            Keep::Leg(l) => l.finish(result).await,
        }
    }
}

impl WorkerJobs {
    pub(super) fn new(spool: Arc<Spool>) -> WorkerJobs {
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
    pub(super) async fn recover(&mut self) {
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
    pub(super) fn resumable(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.table.lock().expect("jobs lock").keys().cloned().collect();
        ids.sort();
        ids
    }

    pub(super) fn running(&self) -> u32 {
        running(&self.table)
    }

    /// Stopping without a connection: running jobs get `timeout`, then are cancelled.
    pub(super) async fn drain_offline(&self, timeout: Duration) {
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
    pub(super) async fn stop_all(&self) {
        for t in self.table.lock().expect("jobs lock").values() {
            t.cancel.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

pub(super) fn running(table: &Table) -> u32 {
    table
        .lock()
        .expect("jobs lock")
        .values()
        .filter(|t| !t.ended)
        .count() as u32
}

impl BoundedIds {
    pub(super) fn new(capacity: usize) -> Self {
        BoundedIds {
            ids: HashSet::new(),
            order: Default::default(),
            capacity,
        }
    }

    /// Records `id`; false if it was known already.
    pub(super) fn insert(&mut self, id: String) -> bool {
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
    pub(super) fn remove(&mut self, id: &str) -> bool {
        let known = self.ids.remove(id);
        if known {
            self.order.retain(|o| o != id);
        }
        known
    }
}
