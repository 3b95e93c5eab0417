//! `ship` and `fetch` on the worker: the transfer engine ([`cla_transfer`]) over the hub session.
//!
//! A transfer outlives its connection. Its [`Leg`] is its end of the hub connection: the session's
//! reader delivers the transfer's frames (by job) and binary chunks (by stream) to it through
//! [`Routes`], and it sends through whatever connection is up, keeping (in its [`Hop`]) what it sent
//! until the far receiver has it. While the worker is disconnected the engine goes on until the flow
//! control window is full, then waits. After a reconnect the hub resumes the job: each side says
//! what it received (`transfer {op: resume}`) and the other sends what follows ([`Leg::relink`]). The
//! job's result is kept until the hub acknowledges it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::exec::ExecCtx;
use super::session::Out;
use cla_protocol::{
    FetchRequest, JobResult, Outcome, ShipRequest, TransferFrame, TransferOp, TransferSummary, WorkerMessage,
};
use cla_transfer::{self as transfer, Hop, Link, Piece, Received, Source, TransferError};

/// Transfers whose engine runs, by job id (worker-wide: they outlive connections).
pub(crate) type Routes = Arc<Mutex<HashMap<String, Arc<Leg>>>>;

/// Hands a piece from the hub to its transfer; false when no transfer of that job (or stream) runs.
pub(crate) fn route(routes: &Routes, job: Option<&str>, stream: Option<u64>, piece: Piece) -> bool {
    let leg = {
        let routes = routes.lock().expect("routes lock");
        match (job, stream) {
            (Some(j), _) => routes.get(j).cloned(),
            (None, Some(s)) => routes.values().find(|l| l.stream == s).cloned(),
            (None, None) => None,
        }
    };
    leg.is_some_and(|l| l.deliver(piece))
}

/// A transfer's end of the hub connection, kept across reconnects until the hub acknowledges the job's
/// end.
pub(crate) struct Leg {
    pub job: String,
    /// The job's binary stream (it keeps it across reconnects).
    pub stream: u64,
    hop: Hop<Out>,
    inbox: mpsc::UnboundedSender<Piece>,
    /// The engine's end of `inbox`, until the engine takes it.
    taken: Mutex<Option<mpsc::UnboundedReceiver<Piece>>>,
    /// The transfer has told the hub it runs.
    started: AtomicBool,
    /// The job's end, kept until the hub's `ack`.
    result: Mutex<Option<JobResult>>,
}

impl Leg {
    pub(crate) fn new(job: &str, stream: u64, out: mpsc::Sender<Out>) -> Arc<Leg> {
        let (inbox, rx) = mpsc::unbounded_channel();
        Arc::new(Leg {
            job: job.to_owned(),
            stream,
            hop: Hop::new(out),
            inbox,
            taken: Mutex::new(Some(rx)),
            started: AtomicBool::new(false),
            result: Mutex::new(None),
        })
    }

    /// A piece from the hub, for the engine.
    fn deliver(&self, piece: Piece) -> bool {
        self.hop.incoming(&piece);
        self.inbox.send(piece).is_ok()
    }

    fn wire(&self, piece: Piece) -> Out {
        match piece {
            Piece::Op(op) => Out::msg(WorkerMessage::Transfer(TransferFrame {
                job: self.job.clone(),
                op,
            })),
            Piece::Data(chunk) => Out::Chunk(chunk, self.stream),
        }
    }

    /// A piece for the hub: kept, and sent now if connected.
    async fn send(&self, piece: Piece) {
        let piece = match piece {
            // Addressed before a copy is kept, so that sending it needs no copy of the data.
            Piece::Data(chunk) => Piece::Data(chunk.addressed(self.stream)),
            p => p,
        };
        self.hop.send(piece, |p| self.wire(p)).await;
    }

    fn start_message(&self) -> Out {
        Out::msg(WorkerMessage::Started {
            job: self.job.clone(),
            pid: None,
        })
    }

    /// The transfer runs: the hub is told (again after a reconnect).
    async fn started(&self) {
        self.hop
            .send_with(|| {
                self.started.store(true, Ordering::SeqCst);
                self.start_message()
            })
            .await;
    }

    /// The job's end: sent now if connected, and kept until the hub's `ack`.
    pub(crate) async fn finish(&self, result: JobResult) {
        self.hop
            .send_with(|| {
                *self.result.lock().expect("leg lock") = Some(result.clone());
                Out::msg(WorkerMessage::Finished(result))
            })
            .await;
    }

    pub(crate) fn ended(&self) -> bool {
        self.result.lock().expect("leg lock").is_some()
    }

    /// The connection went: what is sent from now on is only kept.
    pub(crate) async fn detach(&self) {
        self.hop.detach().await;
    }

    /// After a reconnect that resumed the job: its start again, and how much of the hub's pieces this
    /// side has (the hub sends what follows).
    pub(crate) fn resume_messages(&self) -> Vec<Out> {
        let mut msgs = Vec::new();
        if self.started.load(Ordering::SeqCst) {
            msgs.push(self.start_message());
        }
        msgs.push(Out::msg(WorkerMessage::Transfer(TransferFrame {
            job: self.job.clone(),
            op: TransferOp::Resume {
                received: self.hop.received(),
            },
        })));
        msgs
    }

    /// The hub has `received` units of this side's pieces: sends what follows (and the latest ack, and
    /// the end if the job has one), then sends on `out` from now on.
    pub(crate) async fn relink(&self, out: mpsc::Sender<Out>, received: u64) -> Result<(), String> {
        let end = || {
            let result = self.result.lock().expect("leg lock").clone();
            result
                .map(|r| Out::msg(WorkerMessage::Finished(r)))
                .into_iter()
                .collect()
        };
        let n = self.hop.relink(out, received, |p| self.wire(p), end).await?;
        tracing::info!(job = %self.job, pieces = n, "transfer resumed");
        Ok(())
    }
}

/// The engine's link: pieces out through the leg, in from its inbox. The route goes when it is dropped.
struct LegLink {
    leg: Arc<Leg>,
    inbox: mpsc::UnboundedReceiver<Piece>,
    routes: Routes,
}

impl LegLink {
    fn open(ctx: &ExecCtx, leg: &Arc<Leg>) -> LegLink {
        let inbox = leg
            .taken
            .lock()
            .expect("leg lock")
            .take()
            .expect("a leg's engine runs once");
        ctx.routes
            .lock()
            .expect("routes lock")
            .insert(leg.job.clone(), leg.clone());
        LegLink {
            leg: leg.clone(),
            inbox,
            routes: ctx.routes.clone(),
        }
    }
}

impl Drop for LegLink {
    fn drop(&mut self) {
        self.routes.lock().expect("routes lock").remove(&self.leg.job);
    }
}

impl Link for LegLink {
    async fn send(&mut self, piece: Piece) -> Result<(), String> {
        // Never fails: without a connection the piece waits in the backlog (the window bounds it).
        self.leg.send(piece).await;
        Ok(())
    }

    async fn recv(&mut self) -> Option<Piece> {
        self.inbox.recv().await
    }
}

fn result(job: &str, start: Instant, done: Result<TransferSummary, TransferError>) -> JobResult {
    let (outcome, error, transfer) = match done {
        Ok(summary) => {
            let secs = start.elapsed().as_secs_f64().max(1e-6);
            tracing::info!(
                path = %summary.path,
                files = summary.files,
                bytes = summary.bytes,
                sha256 = %summary.sha256,
                "{:.1} MB/s",
                summary.bytes as f64 / secs / 1e6
            );
            (Outcome::Succeeded, None, Some(summary))
        }
        Err(e) => {
            tracing::warn!("transfer failed: {e}");
            let outcome = match e {
                TransferError::Cancelled => Outcome::Cancelled,
                TransferError::Failed(_) => Outcome::Failed,
            };
            (outcome, Some(e.to_string()), None)
        }
    };
    JobResult {
        job: job.to_owned(),
        outcome,
        rc: None,
        signal: None,
        duration_ms: start.elapsed().as_millis() as u64,
        error,
        code: None,
        eval: None,
        transfer,
        output_bytes: None,
    }
}

/// Receives files from the hub at `req.dest` (relative to the worker's workdir).
pub(crate) async fn ship(
    req: ShipRequest,
    ctx: &ExecCtx,
    leg: Arc<Leg>,
    cancel: CancellationToken,
) -> JobResult {
    let start = Instant::now();
    let mut link = LegLink::open(ctx, &leg);
    leg.started().await;
    let to = Received {
        dest: req.dest.clone(),
        base: ctx.workdir.clone(),
        mkdir: req.mkdir,
        expect_name: None,
    };
    let done = transfer::receive(to, &mut link, &cancel, |_| {}).await;
    result(&req.job, start, done)
}

/// Sends the file or directory at `req.path` (relative to the worker's workdir) to the hub.
pub(crate) async fn fetch(
    req: FetchRequest,
    ctx: &ExecCtx,
    leg: Arc<Leg>,
    cancel: CancellationToken,
) -> JobResult {
    let start = Instant::now();
    let path = transfer::from_base(ctx.workdir.as_deref(), &req.path);
    let src = match Source::open(path).await {
        Ok(s) => s,
        Err(e) => return result(&req.job, start, Err(TransferError::Failed(e))),
    };
    let mut link = LegLink::open(ctx, &leg);
    leg.started().await;
    let done = transfer::send(src, &mut link, &cancel, |_| {}).await;
    result(&req.job, start, done)
}
