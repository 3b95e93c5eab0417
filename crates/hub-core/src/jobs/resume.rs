//! Workers that leave and come back: jobs of a session that ended (grace timers), a reconnecting
//! worker's resumption, unregistered workers, and reloading live jobs from the store at start.

use super::*;

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

impl Hub {
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
    pub(super) fn detached_note(&self, worker: &str) -> String {
        format!(
            "worker {worker} is disconnected: waiting up to {}s for it to come back",
            self.cfg.lost_after.as_secs()
        )
    }

    /// Ends a detached job as `lost` if its worker has not come back within `lost_after`.
    pub(super) fn grace_timer(&self, job: String, epoch: u64) {
        let grace = self.cfg.lost_after;
        self.end_unless_settled(
            job,
            grace,
            move |j| j.detached == Some(epoch),
            move |r| {
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
            },
            "job lost: its worker did not come back in time",
        );
    }

    /// After `after`, ends `job` with `finish` if it is still live and `unsettled` holds for it then;
    /// the timer holds the hub weakly (it does not keep it alive).
    fn end_unless_settled(
        &self,
        job: String,
        after: Duration,
        unsettled: impl FnOnce(&LiveJob) -> bool + Send + 'static,
        finish: impl FnOnce(&mut JobRecord) + Send + 'static,
        what: &'static str,
    ) {
        let hub = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let Some(hub) = hub.upgrade() else { return };
            let ended = {
                let mut guard = hub.state();
                let st = &mut *guard;
                if !st.jobs.get(&job).is_some_and(unsettled) {
                    return;
                }
                st.queue.retain(|q| q != &job);
                end_job(st, &job, finish)
            };
            if let Some(e) = ended {
                tracing::warn!(job = %job, "{what}");
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

    /// A reloaded streamed job not re-attached by its client within the grace is cancelled: nobody is
    /// there to want it.
    fn client_grace_timer(&self, job: String) {
        let grace = self.cfg.client_grace;
        self.end_unless_settled(
            job,
            grace,
            |j| j.awaiting_client,
            move |r| {
                r.state = JobState::Cancelled;
                r.error = Some(format!(
                    "cancelled before it started: the hub restarted, and the client streaming it did not come back within {}s",
                    grace.as_secs()
                ));
            },
            "queued job cancelled: its client did not re-attach after the restart",
        );
    }

    /// Loads the jobs a previous hub process left unfinished (called at start-up, before anything
    /// connects). Queued ones wait in the queue again; those a client was streaming wait for that client
    /// to re-attach first (it went with the old process, and comes back if it can), and are cancelled if
    /// it does not within [`crate::HubConfig::client_grace`]. Jobs offered to, or taken by, a worker wait for
    /// it to reconnect and resume them (see [`Hub::resume_jobs`]), or end `lost` after `lost_after`.
    /// Transfers in flight are lost: their client went with the old process.
    pub(crate) async fn reload(&self) -> Result<(), crate::store::StoreError> {
        let mut detached = Vec::new();
        let mut awaiting = Vec::new();
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
                r.state = JobState::Queued;
                r.worker = None;
                let streamed = r.streamed;
                if streamed {
                    r.waiting = Some(format!(
                        "the hub restarted: waiting up to {}s for the client streaming it to re-attach",
                        self.cfg.client_grace.as_secs()
                    ));
                }
                let mut live = LiveJob::new(r, None);
                live.awaiting_client = streamed;
                if streamed {
                    awaiting.push(id.clone());
                }
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
        for job in awaiting {
            self.client_grace_timer(job);
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
}
