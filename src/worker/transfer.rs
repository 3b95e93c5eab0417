//! `ship` and `fetch` on the worker: the transfer engine ([`crate::transfer`]) over the hub session.
//!
//! The session's reader routes a transfer's frames (by job) and binary chunks (by stream) to the job's
//! task through [`Routes`]; the task registers its route before it reports `started`, and the hub sends
//! nothing for the transfer before that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::exec::ExecCtx;
use super::session::Out;
use crate::protocol::{
    FetchRequest, JobResult, Outcome, ShipRequest, TransferFrame, TransferSummary, WorkerMessage,
};
use crate::transfer::{self, Link, Piece, Received, Source, TransferError};

/// Where the session's reader delivers a transfer's pieces.
pub(crate) struct Route {
    pub stream: u64,
    pub tx: mpsc::UnboundedSender<Piece>,
}

/// Running transfers by job id.
pub(crate) type Routes = Arc<Mutex<HashMap<String, Route>>>;

/// Hands a piece from the hub to its transfer; false when no transfer of that job (or stream) runs.
pub(crate) fn route(routes: &Routes, job: Option<&str>, stream: Option<u64>, piece: Piece) -> bool {
    let routes = routes.lock().expect("routes lock");
    let found = match (job, stream) {
        (Some(j), _) => routes.get(j),
        (None, Some(s)) => routes.values().find(|r| r.stream == s),
        (None, None) => None,
    };
    found.is_some_and(|r| r.tx.send(piece).is_ok())
}

/// A transfer's link: pieces out through the session writer, in from the route.
struct SessionLink {
    job: String,
    stream: u64,
    out: mpsc::Sender<Out>,
    inbox: mpsc::UnboundedReceiver<Piece>,
    routes: Routes,
}

impl SessionLink {
    /// Registers the route of `job` and returns its link (the route goes when the link is dropped).
    fn open(ctx: &ExecCtx, job: &str, stream: u64) -> SessionLink {
        let (tx, inbox) = mpsc::unbounded_channel();
        ctx.routes
            .lock()
            .expect("routes lock")
            .insert(job.to_owned(), Route { stream, tx });
        SessionLink {
            job: job.to_owned(),
            stream,
            out: ctx.out.clone(),
            inbox,
            routes: ctx.routes.clone(),
        }
    }
}

impl Drop for SessionLink {
    fn drop(&mut self) {
        self.routes.lock().expect("routes lock").remove(&self.job);
    }
}

impl Link for SessionLink {
    async fn send(&mut self, piece: Piece) -> Result<(), String> {
        let out = match piece {
            Piece::Op(op) => Out::msg(WorkerMessage::Transfer(TransferFrame {
                job: self.job.clone(),
                op,
            })),
            Piece::Data(chunk) => Out::Chunk(chunk, self.stream),
        };
        self.out
            .send(out)
            .await
            .map_err(|_| "the connection to the hub was lost".to_owned())
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
        eval: None,
        transfer,
        output_bytes: None,
    }
}

/// Receives files from the hub at `req.dest` (relative to the worker's workdir).
pub(crate) async fn ship(req: ShipRequest, ctx: &ExecCtx, cancel: CancellationToken) -> JobResult {
    let start = Instant::now();
    let mut link = SessionLink::open(ctx, &req.job, req.stream);
    ctx.started(&req.job, None).await;
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
pub(crate) async fn fetch(req: FetchRequest, ctx: &ExecCtx, cancel: CancellationToken) -> JobResult {
    let start = Instant::now();
    let path = transfer::from_base(ctx.workdir.as_deref(), &req.path);
    let src = match Source::open(path).await {
        Ok(s) => s,
        Err(e) => return result(&req.job, start, Err(TransferError::Failed(e))),
    };
    let mut link = SessionLink::open(ctx, &req.job, req.stream);
    ctx.started(&req.job, None).await;
    let done = transfer::send(src, &mut link, &cancel, |_| {}).await;
    result(&req.job, start, done)
}
