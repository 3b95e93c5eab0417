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

/// At most this many workers are named in a waiting reason or a refusal; the rest are counted.
const NAMED: usize = 5;

/// `a, b, c and 4 more`: the first [`NAMED`] items of a list, and how many more there are.
fn named(items: &[String]) -> String {
    let mut s = items.iter().take(NAMED).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > NAMED {
        s.push_str(&format!(" and {} more", items.len() - NAMED));
    }
    s
}

/// The distinct values in use across workers (tags or envs), sorted, for a refusal: at most 20, then a
/// count.
fn in_use<'a>(values: impl Iterator<Item = &'a String>) -> String {
    let all: std::collections::BTreeSet<&String> = values.collect();
    if all.is_empty() {
        return "none".into();
    }
    let mut s = all
        .iter()
        .take(20)
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > 20 {
        s.push_str(&format!(" and {} more", all.len() - 20));
    }
    s
}

/// True when the registered worker `w` matches the target by what it last said of itself (its tags
/// and envs as of its last `hello` or `update`), connected or not.
pub(super) fn record_on_target(target: &Target, w: &WorkerRecord) -> bool {
    target.worker.as_deref().is_none_or(|id| id == w.id)
        && target.tags.iter().all(|t| w.tags.contains(t))
        && target.env.as_ref().is_none_or(|e| w.envs.contains(e))
}

/// Whether any registered worker could ever take a job for `target`; if none can, the refusal names
/// what exists, so a typo or a tag no worker has fails at once instead of waiting for ever.
pub(super) fn check_registered(target: &Target, workers: &[WorkerRecord]) -> Result<(), String> {
    if workers.iter().any(|w| record_on_target(target, w)) {
        return Ok(());
    }
    if let Some(id) = &target.worker {
        let Some(w) = workers.iter().find(|w| &w.id == id) else {
            return Err(format!(
                "no worker `{id}` is registered: see `cla-hub workers` for the ids"
            ));
        };
        let missing: Vec<&str> = target
            .tags
            .iter()
            .filter(|t| !w.tags.contains(t))
            .map(String::as_str)
            .collect();
        let mut why = Vec::new();
        if !missing.is_empty() {
            why.push(format!(
                "does not have tags [{}] (its tags: {})",
                missing.join(", "),
                in_use(w.tags.iter())
            ));
        }
        if let Some(env) = target.env.as_ref().filter(|e| !w.envs.contains(e)) {
            why.push(format!(
                "is not in env {env} (its envs: {})",
                in_use(w.envs.iter())
            ));
        }
        return Err(format!("worker {id} {}", why.join(" and ")));
    }
    if workers.is_empty() {
        return Err(
            "no worker is registered yet: register one with `cla-worker register --url URL --passkey KEY`"
                .into(),
        );
    }
    let mut wanted = Vec::new();
    if !target.tags.is_empty() {
        let all = if target.tags.len() > 1 { "all of " } else { "" };
        wanted.push(format!("{all}tags [{}]", target.tags.join(", ")));
    }
    if let Some(env) = &target.env {
        wanted.push(format!("env {env}"));
    }
    let mut msg = format!("no registered worker has {}", wanted.join(" and "));
    if !target.tags.is_empty() {
        msg.push_str(&format!(
            "; tags in use: {}",
            in_use(workers.iter().flat_map(|w| &w.tags))
        ));
    }
    if target.env.is_some() {
        msg.push_str(&format!(
            "; envs in use: {}",
            in_use(workers.iter().flat_map(|w| &w.envs))
        ));
    }
    Err(msg)
}

/// Why a queued job is still waiting, for `jobs` and the waiting client: whether the workers that
/// could take it are offline, too old, draining, disabled or busy, naming them. `registered` gives
/// the registered workers (asked for only when no connected worker matches).
pub(super) fn why_waiting(
    job: &LiveJob,
    sessions: &HashMap<String, Session>,
    registered: &dyn Fn() -> Arc<Vec<WorkerRecord>>,
) -> String {
    let spec = &job.record.spec;
    let target = spec.target.describe();
    let on: Vec<&Session> = sessions
        .values()
        .filter(|s| on_target(&spec.target, &s.id, &s.hello))
        .collect();
    if on.is_empty() {
        let offline: Vec<String> = registered()
            .iter()
            .filter(|w| record_on_target(&spec.target, w))
            .map(|w| match &w.last_seen {
                Some(seen) => format!("{} (last seen {seen})", w.id),
                None => format!("{} (never connected)", w.id),
            })
            .collect();
        return match offline.as_slice() {
            [] => format!("no registered worker matches {target}"),
            [one] => format!("{one} is offline"),
            _ => format!(
                "the {} matching workers are offline: {}",
                offline.len(),
                named(&offline)
            ),
        };
    }
    let able: Vec<&Session> = on.into_iter().filter(|s| knows(spec, &s.hello)).collect();
    if able.is_empty() {
        return format!(
            "the connected workers matching {target} are too old for {} (no `{FEATURE_TRANSFER}` feature): upgrade them",
            spec.task.verb()
        );
    }
    let closed: Vec<String> = able
        .iter()
        .filter_map(|s| {
            let state = if s.disabled {
                "is disabled (`cla-hub worker enable` it)"
            } else if s.draining {
                "is draining"
            } else if job.refused_by.contains(&s.session) {
                "refused the job"
            } else {
                return None;
            };
            Some(format!("{} {state}", s.id))
        })
        .collect();
    let open: Vec<&Session> = able
        .into_iter()
        .filter(|s| !s.draining && !s.disabled && !job.refused_by.contains(&s.session))
        .collect();
    if open.is_empty() {
        return named(&closed);
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
        _ => {
            let busy: Vec<String> = open
                .iter()
                .map(|s| format!("{} {}/{}", s.id, s.exec_running(), s.hello.capacity))
                .collect();
            format!("all {} matching workers are busy ({})", open.len(), named(&busy))
        }
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

    /// Runs a dispatch pass as its own task (from code that cannot wait for one).
    pub(super) fn dispatch_soon(&self) {
        if let Some(hub) = self.me.upgrade() {
            tokio::spawn(async move { hub.dispatch().await });
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
                if job.awaiting_client {
                    waiting.push_back(job_id);
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
                    let why = why_waiting(job, sessions, &|| self.registered());
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
    r.error_code = Some(cla_protocol::api::QUEUE_TIMEOUT.into());
    r.error = Some(format!(
        "was not started within its queue timeout of {secs}s: {why}; check `cla-hub workers` and the \
         target's tags/env"
    ));
}

#[cfg(test)]
mod target_tests {
    use super::*;

    fn worker(id: &str, tags: &[&str], envs: &[&str]) -> WorkerRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "token_hash": "", "projects": ["p"],
            "tags": tags, "envs": envs, "host": null, "version": null,
            "capacity": 1, "registered": "2026-12-07T00:00:00Z", "last_seen": null,
        }))
        .unwrap()
    }

    fn target(worker: Option<&str>, tags: &[&str], env: Option<&str>) -> Target {
        Target {
            worker: worker.map(str::to_owned),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            env: env.map(str::to_owned),
            queue_timeout_secs: None,
        }
    }

    #[test]
    fn a_target_is_refused_only_when_no_registered_worker_can_match_it() {
        let fleet = [
            worker("web-1", &["linux", "web"], &["dev"]),
            worker("db-1", &["linux", "db"], &[]),
        ];
        assert!(check_registered(&target(None, &["web"], None), &fleet).is_ok());
        assert!(check_registered(&target(None, &["web"], Some("dev")), &fleet).is_ok());
        assert!(check_registered(&target(Some("db-1"), &["db"], None), &fleet).is_ok());
        assert_eq!(
            check_registered(&target(None, &["gpu"], None), &fleet).unwrap_err(),
            "no registered worker has tags [gpu]; tags in use: db, linux, web"
        );
        assert_eq!(
            check_registered(&target(None, &["web", "db"], Some("qa")), &fleet).unwrap_err(),
            "no registered worker has all of tags [web, db] and env qa; tags in use: db, linux, web; envs in use: dev"
        );
        assert_eq!(
            check_registered(&target(Some("web-1"), &["db"], Some("qa")), &fleet).unwrap_err(),
            "worker web-1 does not have tags [db] (its tags: linux, web) and is not in env qa (its envs: dev)"
        );
        assert!(
            check_registered(&target(Some("web-9"), &[], None), &fleet)
                .unwrap_err()
                .contains("no worker `web-9` is registered")
        );
        assert!(
            check_registered(&target(None, &["web"], None), &[])
                .unwrap_err()
                .contains("no worker is registered yet")
        );
    }

    #[test]
    fn the_tags_in_use_are_listed_up_to_twenty() {
        let tags: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
        let listed = in_use(tags.iter());
        assert!(listed.starts_with("t00, t01"), "{listed}");
        assert!(listed.ends_with("t19 and 5 more"), "{listed}");
        assert_eq!(
            named(&(0..7).map(|i| format!("w{i}")).collect::<Vec<_>>()),
            "w0, w1, w2, w3, w4 and 2 more"
        );
    }
}
