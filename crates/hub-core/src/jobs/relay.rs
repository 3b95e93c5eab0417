//! The transfer relay: frames and chunks between the worker's leg and the client's leg of a ship or
//! fetch, each hop kept resendable (`cla_transfer::Hop`); the hub never reads file contents.

use super::*;

impl Hub {
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
    pub(super) fn relink(
        &self,
        job: String,
        relay: Arc<Hop<Outbound>>,
        tx: mpsc::Sender<Outbound>,
        received: u64,
    ) {
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
    pub(super) fn relay(&self, job: &str) -> Option<(Arc<Hop<Outbound>>, u64)> {
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

    /// The client of a transfer went away: the transfer cannot go on. A fetch it was receiving fails, and
    /// the job is cancelled on the worker (a ship's partial files are removed there).
    pub(super) async fn transfer_client_gone(&self, job: &str) {
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
}

/// A transfer's piece as it goes to the worker (a chunk keeps the stream it came with: the job's).
pub(super) fn transfer_piece(job: &str, piece: Piece) -> Outbound {
    match piece {
        Piece::Op(op) => Outbound::message(HubMessage::Transfer(TransferFrame {
            job: job.to_owned(),
            op,
        })),
        Piece::Data(chunk) => Outbound::Chunk(Box::new(chunk)),
    }
}
