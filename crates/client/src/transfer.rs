//! Ship and fetch through the hub, as a library: the admin CLI and the rulebook runner both call
//! [`ship`] and [`fetch`], and show [`Update`]s their own way (a progress bar, a step's line).

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::{AdminClient, Error, JobStream, Result};
use cla_protocol::TransferOp;
use cla_protocol::api::{FetchTask, JobRecord, JobSpec, ShipTask, Target, Task};
use cla_transfer::{self as transfer, Link, Piece, Progress, Received, Source, TransferError};

/// What a transfer reports as it goes.
pub enum Update {
    /// Still queued, for this reason.
    Waiting(String),
    Progress(Progress),
}

/// Creates a transfer job and waits until a worker has started it (or the job ended first).
async fn open(
    c: &AdminClient,
    target: Target,
    task: Task,
    cancel: CancellationToken,
    on: &mut (dyn FnMut(Update) + Send),
) -> Result<std::result::Result<JobStream, Box<JobRecord>>> {
    let spec = JobSpec {
        target,
        task,
        workdir: None,
        env_vars: Default::default(),
        timeout_secs: None,
        on_disconnect: Default::default(),
    };
    c.open_transfer(&spec, cancel, &mut |why| on(Update::Waiting(why)))
        .await
}

/// Ships `local` to `remote` on a worker of `target`: the job's record, with what the worker verified.
pub async fn ship(
    c: &AdminClient,
    target: Target,
    local: PathBuf,
    remote: String,
    mkdir: bool,
    cancel: CancellationToken,
    mut on: impl FnMut(Update) + Send,
) -> Result<JobRecord> {
    // The source is checked (and planned) before anything is asked of the hub.
    let src = Source::open(local.clone()).await.map_err(Error::Other)?;
    let task = Task::Ship(ShipTask {
        dest: remote,
        mkdir,
        source: Some(local.display().to_string()),
    });
    let mut stream = match open(c, target, task, cancel, &mut on).await? {
        Ok(s) => s,
        Err(record) => return Ok(*record),
    };
    on(Update::Progress(Progress {
        done: 0,
        total: src.bytes,
    }));
    // Cancels go through the hub (the stream sends them), so the worker ends the job as cancelled.
    let progress = |p| on(Update::Progress(p));
    let sent = transfer::send(src, &mut stream, &CancellationToken::new(), progress).await;
    if let Err(TransferError::Failed(e)) = &sent {
        tracing::debug!("sending stopped: {e}");
    }
    stream.finish().await
}

/// Fetches `remote` from a worker of `target` into `local`.
pub async fn fetch(
    c: &AdminClient,
    target: Target,
    remote: String,
    local: String,
    mkdir: bool,
    cancel: CancellationToken,
    mut on: impl FnMut(Update) + Send,
) -> Result<JobRecord> {
    // The worker sends what was asked for under its own name: it may not choose another one here.
    let expect_name = std::path::Path::new(&remote)
        .components()
        .next_back()
        .and_then(|c| match c {
            std::path::Component::Normal(n) => n.to_str().map(str::to_owned),
            _ => None,
        });
    let task = Task::Fetch(FetchTask {
        path: remote,
        dest: Some(local.clone()),
    });
    let mut stream = match open(c, target, task, cancel, &mut on).await? {
        Ok(s) => s,
        Err(record) => return Ok(*record),
    };
    let progress = |p| on(Update::Progress(p));
    let to = Received {
        dest: local,
        base: None,
        mkdir,
        expect_name,
    };
    // A cancel goes to the hub; the worker stops sending and the receiver drops what it staged.
    match transfer::receive(to, &mut stream, &CancellationToken::new(), progress).await {
        // The hub holds a fetch the worker has finished sending until this side's verdict.
        Ok(summary) => {
            let committed = Piece::Op(TransferOp::Committed(summary));
            stream.send(committed).await.map_err(Error::Other)?;
        }
        Err(e) => {
            tracing::debug!("receiving stopped: {e}");
            let abort = TransferOp::Abort { error: e.to_string() };
            let _ = stream.send(Piece::Op(abort)).await;
        }
    }
    stream.finish().await
}
