//! Offers and leases: sending a placed job to its worker once its `offered` write is durable, offers
//! that expire, and what the worker says back (accepted, refused, started, finished), and cancels.

use super::*;

impl Hub {
    /// Sends offers once each is stored (a restarted hub then knows every job it offered, and to whom),
    /// and starts their leases. Runs as its own task: the caller does not wait for the disk.
    pub(super) fn send_offers(&self, offers: Vec<Offer>) {
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
    pub(super) async fn offer_expired(&self, job: &str, session: &str) {
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
    pub(super) async fn after_requeue(
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
    pub(super) fn ack(&self, worker: &str, job: &str) {
        let tx = self.state().sessions.get(worker).map(|s| s.tx.clone());
        if let Some(tx) = tx {
            let msg = HubMessage::Ack { job: job.to_owned() };
            tokio::spawn(async move { tx.send(Outbound::message(msg)).await });
        }
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
}

/// Assigns `job` to `session`: stream ids, running slot, `offered` state. Returns the request to send.
pub(super) fn offer(session: &mut Session, job: &mut LiveJob) -> HubMessage {
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
pub(super) fn requeue_or_cancel(st: &mut State, id: &str) -> (Option<JobRecord>, Option<Ended>) {
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

/// Frees the job's slot and stream ids on its session.
pub(super) fn release(session: &mut Session, job: &str) {
    session.running.remove(job);
    session.transfers.remove(job);
    session.streams.retain(|_, (j, _)| j != job);
}
