//! Matching and the queue: which worker may take a job, why a job waits, queue timeouts, and the
//! dispatch pass that places queued jobs on free matching workers (FIFO per requirement).

use super::*;

/// True when the worker described by `hello` may run `spec`: it matches the target and knows the task.
pub(crate) fn matches(spec: &JobSpec, worker_id: &str, hello: &Hello) -> bool {
    knows(spec, hello) && on_target(&spec.target, worker_id, hello)
}

/// True when the worker is the one named, or carries all the tags (and the env).
pub(super) fn on_target(target: &Target, worker_id: &str, hello: &Hello) -> bool {
    target.worker.as_deref().is_none_or(|w| w == worker_id)
        && target.tags.iter().all(|t| hello.tags.contains(t))
        && target.env.as_ref().is_none_or(|e| hello.envs.contains(e))
}

/// True when the worker's version can run the task (ship and fetch need the `transfer` feature).
pub(super) fn knows(spec: &JobSpec, hello: &Hello) -> bool {
    !spec.task.is_transfer() || hello.features.iter().any(|f| f == FEATURE_TRANSFER)
}

/// Why a queued job is still waiting, for `jobs` and the waiting client: it is worth saying whether
/// no worker could take it at all or the ones that could are busy.
pub(super) fn why_waiting(job: &LiveJob, sessions: &HashMap<String, Session>) -> String {
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

impl Hub {
    /// Starts the timer of a queued job's queue timeout.
    pub(super) fn queue_timer(&self, id: &str, queue_deadline: Option<tokio::time::Instant>) {
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

    /// A job's queue timeout: if no worker has taken it yet, it ends `timed_out`, saying why it waited.
    pub(super) async fn queue_timed_out(&self, id: &str) {
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
    pub(super) fn dispatch_locked(&self, st: &mut State) -> Dispatched {
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
                let commit = self.store.put_job(&record);
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
    pub(super) fn after_dispatch(&self, Dispatched { offers, told }: Dispatched) {
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
}

/// Ends a job whose queue timeout ran out, saying why it waited.
pub(super) fn queue_timeout(r: &mut JobRecord) {
    let why = r.waiting.take().unwrap_or_else(|| "no worker took it".into());
    let secs = r.spec.target.queue_timeout_secs.unwrap_or_default();
    r.state = JobState::TimedOut;
    r.error = Some(format!(
        "was not started within its queue timeout of {secs}s: {why}; check `cla-hub workers` and the \
         target's tags/env"
    ));
}
