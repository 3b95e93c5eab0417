//! One established session: the request dispatch (one `match` over what the hub sends), starting a
//! job in its handler, acknowledgements, and the session's end.

use super::*;

impl<'w> Live<'w> {
    pub(super) fn new(
        s: &WorkerSettings,
        writer: ConnectionWriter,
        reporter: Arc<Reporter>,
        heartbeat: Duration,
        opts: RunOptions,
        worker: &'w mut WorkerJobs,
    ) -> Live<'w> {
        let (tx, rx) = mpsc::channel(256);
        let dead = CancellationToken::new();
        let writer = tokio::spawn(write_loop(writer, rx, dead.clone()));
        worker.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Live {
            reporter,
            heartbeat,
            opts,
            ctx: ExecCtx {
                worker_id: s.id.clone(),
                hub_url: s.url.clone(),
                tags: s.tags.clone(),
                envs: s.envs.clone(),
                workdir: s.workdir.clone(),
                out: tx,
                routes: worker.routes.clone(),
                policy: Arc::new(Enforcer::new(s.policy.clone(), s.source.clone())),
                masks: worker.masks.clone(),
            },
            capacity: s.capacity as usize,
            worker,
            dead,
            cancelled_early: BoundedIds::new(EARLY_CANCELS),
            writer,
            relinks: Vec::new(),
        }
    }

    pub(super) async fn send(&self, msg: WorkerMessage) {
        let _ = self.ctx.out.send(Out::msg(msg)).await;
    }

    pub(super) async fn serve(
        &mut self,
        reader: &mut ConnectionReader,
        shutdown: &CancellationToken,
        settings: &mut WorkerSettings,
        hup: &mut Hup,
    ) -> End {
        let opts = &self.opts.clone();
        let silence = self.heartbeat * 3;
        // Draining: no new jobs; the worker stops once the running ones end. A signal drains with a
        // deadline (then the kill ladder); the hub's `drain` without one.
        let mut draining = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut bad = cla_protocol::connection::BadFrames::default();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                    let running = self.worker.running();
                    tracing::info!(running, "draining: no new jobs; running ones get {:?}", opts.drain_timeout);
                    if !draining {
                        self.start_draining().await;
                        draining = true;
                    }
                    drain_deadline = Some(tokio::time::Instant::now() + opts.drain_timeout);
                    continue;
                }
                _ = self.worker.tracker.wait(), if draining => return End::Shutdown,
                _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                    tracing::warn!("drain deadline passed: cancelling running jobs");
                    self.worker.stop_all().await;
                    return End::Shutdown;
                }
                _ = self.dead.cancelled() => return lost("connection to the hub failed".into()),
                _ = hup.recv() => {
                    // Jobs started from now on get the new policy, masks and workdir; running ones keep
                    // theirs.
                    let changed = reload(opts, settings, &self.reporter, &mut self.worker.masks);
                    self.ctx.policy = Arc::new(Enforcer::new(settings.policy.clone(), settings.source.clone()));
                    self.ctx.masks = self.worker.masks.clone();
                    self.ctx.workdir = settings.workdir.clone();
                    if let Some((tags, envs)) = changed {
                        self.ctx.tags = tags.clone();
                        self.ctx.envs = envs.clone();
                        self.send(WorkerMessage::Update { tags, envs }).await;
                    }
                    continue;
                }
                r = tokio::time::timeout(silence, reader.read()) => r,
            };
            let frame = match incoming {
                Err(_) => return lost(format!("no word from the hub for {silence:?}")),
                Ok(Err(e)) => return lost(e.to_string()),
                Ok(Ok(None)) => return lost("the hub closed the connection".into()),
                Ok(Ok(Some(Incoming::Alive))) => continue,
                Ok(Ok(Some(Incoming::Frame(f)))) => f,
            };
            let text = match frame {
                Frame::Text(t) => t,
                Frame::Binary(chunk) => {
                    let stream = chunk.stream();
                    if !transfer::route(&self.ctx.routes, None, Some(stream), Piece::Data(chunk)) {
                        tracing::debug!(stream, "binary frame for no running transfer ignored");
                    }
                    continue;
                }
            };
            let msg = match decode_text::<HubMessage>(&text) {
                Ok(m) => m,
                Err(e) => {
                    let code = match e {
                        ProtocolError::UnknownType(_) => ErrorCode::Unsupported,
                        _ => ErrorCode::Malformed,
                    };
                    tracing::warn!("{e}");
                    if bad.record() {
                        return lost(format!(
                            "the hub sent more than {} malformed or unsupported frames within {:?}",
                            cla_protocol::connection::MAX_BAD_FRAMES,
                            cla_protocol::connection::BAD_FRAME_WINDOW
                        ));
                    }
                    self.send(WorkerMessage::Error {
                        code,
                        message: e.to_string(),
                    })
                    .await;
                    continue;
                }
            };
            match msg {
                HubMessage::Exec(req) => {
                    let kind = Kind::Journaled {
                        streams: [req.stdout, req.stderr],
                        on_disconnect: req.on_disconnect,
                    };
                    let (job, what) = (req.job.clone(), req.command.display());
                    let denied = self.ctx.policy.verb("exec").err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Journal(journal) = keep else {
                            unreachable!("exec jobs have a journal")
                        };
                        exec::handle(req, &ctx, journal, cancel).await
                    };
                    self.start_job(job, what, kind, draining, denied, work).await
                }
                HubMessage::Eval(req) => {
                    let kind = Kind::Journaled {
                        streams: [req.stdout, 0],
                        on_disconnect: req.on_disconnect,
                    };
                    let (job, what) = (
                        req.job.clone(),
                        format!("eval ({} bytes of JavaScript)", req.code.len()),
                    );
                    let denied = self.ctx.policy.verb("eval").err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Journal(journal) = keep else {
                            unreachable!("eval jobs have a journal")
                        };
                        eval::handle(req, &ctx, journal, cancel).await
                    };
                    self.start_job(job, what, kind, draining, denied, work).await
                }
                HubMessage::Ship(req) => {
                    let (job, what, stream) = (req.job.clone(), format!("ship → {}", req.dest), req.stream);
                    let policy = &self.ctx.policy;
                    let denied = policy
                        .verb("ship")
                        .and_then(|()| {
                            let dest = std::path::Path::new(&req.dest);
                            policy.path("ship", Access::Write, dest, self.ctx.workdir.as_deref())
                        })
                        .err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Leg(leg) = keep else {
                            unreachable!("transfers have a leg")
                        };
                        transfer::ship(req, &ctx, leg, cancel).await
                    };
                    self.start_job(job, what, Kind::Transfer { stream }, draining, denied, work)
                        .await
                }
                HubMessage::Fetch(req) => {
                    let (job, what, stream) = (req.job.clone(), format!("fetch {}", req.path), req.stream);
                    let policy = &self.ctx.policy;
                    let denied = policy
                        .verb("fetch")
                        .and_then(|()| {
                            let path = std::path::Path::new(&req.path);
                            policy.path("fetch", Access::Read, path, self.ctx.workdir.as_deref())
                        })
                        .err();
                    let work = move |ctx: ExecCtx, keep: Keep, cancel| async move {
                        let Keep::Leg(leg) = keep else {
                            unreachable!("transfers have a leg")
                        };
                        transfer::fetch(req, &ctx, leg, cancel).await
                    };
                    self.start_job(job, what, Kind::Transfer { stream }, draining, denied, work)
                        .await
                }
                HubMessage::Ack { job } => self.acknowledged(&job).await,
                HubMessage::Transfer(TransferFrame {
                    job,
                    op: TransferOp::Resume { received },
                }) => self.relink_transfer(&job, received),
                HubMessage::Transfer(TransferFrame { job, op }) => {
                    if !transfer::route(&self.ctx.routes, Some(&job), None, Piece::Op(op)) {
                        tracing::debug!(job = %job, "transfer frame for no running transfer ignored");
                    }
                }
                HubMessage::Cancel { job, reason } => {
                    match self.worker.table.lock().expect("jobs lock").get(&job) {
                        Some(t) => {
                            tracing::info!(job = %job, "cancel: {reason}");
                            t.cancel.cancel();
                        }
                        None => {
                            // The offer may still be on its way (sent after the cancel): remember it, bounded.
                            tracing::debug!(job = %job, "cancel for a job not running here (yet)");
                            self.cancelled_early.insert(job);
                        }
                    }
                }
                HubMessage::Drain { reason } => {
                    let running = self.worker.running();
                    tracing::warn!(
                        running,
                        "the hub asked this worker to drain ({reason}): no new jobs; exiting when the running ones end"
                    );
                    if !draining {
                        self.start_draining().await;
                        draining = true;
                    }
                }
                HubMessage::Unregistered { reason } => {
                    tracing::warn!(
                        "the hub deleted this worker's registration ({reason}): cancelling its jobs and exiting"
                    );
                    self.worker.stop_all().await;
                    return End::Unregistered(reason);
                }
                HubMessage::Shutdown { reason } => {
                    tracing::warn!("the hub ordered a shutdown: {reason}");
                    self.worker.stop_all().await;
                    return End::HubShutdown(reason);
                }
                HubMessage::Rotate { token } => {
                    let answer = save_rotated_token(settings, token);
                    self.send(answer).await;
                }
                HubMessage::Error { code, message } => tracing::warn!(?code, "hub reported: {message}"),
                HubMessage::Welcome(_) | HubMessage::Reject(_) => {
                    tracing::debug!("handshake message mid-session ignored")
                }
            }
        }
    }

    /// The hub has stored the job's end: forget it.
    pub(super) async fn acknowledged(&mut self, job: &str) {
        let keep = self
            .worker
            .table
            .lock()
            .expect("jobs lock")
            .get(job)
            .map(|t| t.keep.clone());
        let Some(keep) = keep else { return };
        // The task marks its entry ended only after `finished` went out, so the ack can come first:
        // the journal (or leg) knows.
        if !keep.ended().await {
            return;
        }
        let removed = self.worker.table.lock().expect("jobs lock").remove(job);
        if let Some(Keep::Journal(j)) = removed.map(|t| t.keep) {
            j.remove().await;
            tracing::debug!(job, "end acknowledged by the hub; spool dropped");
        }
    }

    /// Accepts (or refuses) an offered job and runs `work` for it as a tracked task.
    /// `denied`: the local policy's refusal, if it refuses the job: it is accepted (so that the hub does not
    /// offer it elsewhere) and ends at once with the `policy` error, having done nothing.
    pub(super) async fn start_job<F, Fut>(
        &mut self,
        job: String,
        what: String,
        kind: Kind,
        draining: bool,
        denied: Option<String>,
        work: F,
    ) where
        F: FnOnce(ExecCtx, Keep, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobResult> + Send + 'static,
    {
        let is_transfer = matches!(kind, Kind::Transfer { .. });
        if !self.worker.seen.insert(job.clone()) {
            // Taken here before (a late answer to an offer whose lease ran out, or a transfer stopped by
            // a dropped connection): never run twice here; refusing lets the hub place it elsewhere.
            tracing::warn!(job = %job, "job offered again; not running it twice");
            let reason = "this worker took the job before; it does not run it twice".to_owned();
            self.send(WorkerMessage::Refused { job, reason }).await;
            return;
        }
        if self.cancelled_early.remove(&job) {
            let result = JobResult::not_run(job, Outcome::Cancelled, "cancelled before it started");
            self.send(WorkerMessage::Finished(result)).await;
            return;
        }
        let busy = self
            .worker
            .table
            .lock()
            .expect("jobs lock")
            .values()
            .filter(|t| !t.ended && t.keep.is_transfer() == is_transfer)
            .count();
        let limit = if is_transfer {
            cla_transfer::MAX_CONCURRENT
        } else {
            self.capacity
        };
        let refusal = if draining {
            Some("the worker is draining".to_owned())
        } else if busy >= limit {
            let what = if is_transfer { "transfers" } else { "capacity" };
            Some(format!("at {what} limit ({busy}/{limit})"))
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.worker.seen.remove(&job);
            self.send(WorkerMessage::Refused { job, reason }).await;
            return;
        }
        // The journal (and its spool file) exists before the hub hears the job is taken.
        let (keep, on_disconnect) = match kind {
            Kind::Journaled {
                streams,
                on_disconnect,
            } => {
                let link = Link {
                    out: self.ctx.out.clone(),
                    streams,
                };
                (
                    Keep::Journal(Journal::create(&self.worker.spool, &job, link)),
                    on_disconnect,
                )
            }
            Kind::Transfer { stream } => (
                Keep::Leg(transfer::Leg::new(&job, stream, self.ctx.out.clone())),
                OnDisconnect::Continue,
            ),
        };
        self.send(WorkerMessage::Accepted { job: job.clone() }).await;
        let cancel = CancellationToken::new();
        self.worker.table.lock().expect("jobs lock").insert(
            job.clone(),
            Taken {
                cancel: cancel.clone(),
                keep: keep.clone(),
                on_disconnect,
                ended: false,
            },
        );
        let (ctx, table, reporter) = (self.ctx.clone(), self.worker.table.clone(), self.reporter.clone());
        reporter.update(|s| s.running = running(&table));
        let span = tracing::info_span!("job", job_id = %job);
        self.worker.tracker.spawn(tracing::Instrument::instrument(
            async move {
                let result = match denied {
                    Some(why) => {
                        tracing::warn!("refused {what}: {why}");
                        JobResult::refused_by_policy(job, why)
                    }
                    None => {
                        tracing::info!("running {what}");
                        let masks = ctx.masks.clone();
                        let mut result = work(ctx, keep.clone(), cancel).await;
                        // Secrets never leave in a result either.
                        result.error = result.error.map(|e| masks.text(&e));
                        if let Some(ev) = result.eval.as_mut() {
                            crate::eval::mask_output(&masks, ev);
                        }
                        result
                    }
                };
                tracing::info!(outcome = ?result.outcome, rc = ?result.rc, ms = result.duration_ms, "finished");
                let job = result.job.clone();
                // Sent (now, or after a reconnect) and kept until the hub's ack.
                keep.finish(result).await;
                if let Some(t) = table.lock().expect("jobs lock").get_mut(&job) {
                    t.ended = true;
                }
                let now_running = running(&table);
                reporter.update(|s| s.running = now_running);
                if now_running == 0 {
                    // Idle: once it has stayed so for a moment, hand back the memory busy times took.
                    let table = table.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(IDLE_TRIM_AFTER).await;
                        if running(&table) == 0 {
                            cla_common::util::release_free_memory();
                        }
                    });
                }
            },
            span,
        ));
    }

    /// Ends the session. When the connection was lost, the writer may be stuck in a write to a peer that
    /// is gone: it is aborted first, so tasks sending to it fail at once. Jobs go on, their journals and
    /// legs keeping what they produce for the next connection, unless their policy cancels them after a
    /// while.
    pub(super) async fn finish(self, connection_lost: bool) {
        if connection_lost {
            self.writer.abort();
        }
        for r in &self.relinks {
            r.abort();
        }
        let kept: Vec<Keep> = {
            let table = self.worker.table.lock().expect("jobs lock");
            let epoch = self.worker.epoch.load(std::sync::atomic::Ordering::SeqCst);
            for (id, t) in table.iter().filter(|(_, t)| !t.ended) {
                match t.on_disconnect {
                    OnDisconnect::Continue => {}
                    OnDisconnect::CancelAfter(secs) => {
                        let (cancel, epochs, id) = (t.cancel.clone(), self.worker.epoch.clone(), id.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(secs)).await;
                            if epochs.load(std::sync::atomic::Ordering::SeqCst) == epoch {
                                tracing::warn!(job = %id, "still disconnected after {secs}s: cancelling the job (its on_disconnect policy)");
                                cancel.cancel();
                            }
                        });
                    }
                }
            }
            table.values().map(|t| t.keep.clone()).collect()
        };
        for k in kept {
            match k {
                Keep::Journal(j) => j.unlink().await,
                Keep::Leg(l) => l.detach().await,
            }
        }
        drop(self.ctx);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer).await;
    }
}
