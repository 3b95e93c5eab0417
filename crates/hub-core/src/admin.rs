//! The admin API (`/api/v1/admin/...`, bearer admin token): workers, passkeys, jobs, and the live exec
//! stream that `cla-hub exec` attaches to.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::Hub;
use super::jobs::{ApiFail, JobEvent, Wait};
use super::server::{Admin, parse_body, parse_job_spec, upgrade};
use super::store::PasskeyRecord;
use cla_common::token;
use cla_common::util::now_rfc3339;
use cla_protocol::api::{
    AdminEvent, AdminRequest, JobQuery, JobRecord, JobSpec, PasskeyCreate, PasskeyCreated, PasskeyRevoke,
    PasskeyView, WorkerAction, WorkerActionDone, WorkerActionRequest, WorkerState, WorkerView,
};
use cla_protocol::connection::{Incoming, ReadSize};
use cla_protocol::{Connection, Frame, ProtocolError, decode_text};

/// Longest `job show --wait` a single request may block; clients loop for longer waits.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// `GET /api/v1/admin/workers`: every registered worker with its live state.
pub(crate) async fn workers(_: Admin, State(hub): State<Arc<Hub>>) -> Result<Json<Vec<WorkerView>>, ApiFail> {
    let records = hub.store.workers()?;
    let st = hub.state();
    let now = now_rfc3339();
    let views = records
        .into_iter()
        .map(|w| match st.sessions.get(&w.id) {
            Some(s) => WorkerView {
                state: if s.draining {
                    WorkerState::Draining
                } else if s.disabled {
                    WorkerState::Disabled
                } else if s.running.is_empty() {
                    WorkerState::Idle
                } else {
                    WorkerState::Busy
                },
                running: s.exec_running() as u32,
                capacity: s.hello.capacity,
                tags: s.hello.tags.clone(),
                envs: s.hello.envs.clone(),
                version: Some(s.hello.agent.clone()),
                host: Some(s.hello.host.clone()),
                last_seen: Some(now.clone()),
                connected_since: Some(s.connected_since.clone()),
                transfers: s.transfers.len() as u32,
                id: w.id,
                projects: w.projects,
            },
            None => WorkerView {
                id: w.id,
                projects: w.projects,
                tags: w.tags,
                envs: w.envs,
                state: WorkerState::Offline,
                running: 0,
                capacity: w.capacity,
                version: w.version,
                host: w.host,
                last_seen: w.last_seen,
                connected_since: None,
                transfers: 0,
            },
        })
        .collect();
    Ok(Json(views))
}

/// `POST /api/v1/admin/workers/{id}/{action}`: drain, disable, enable, shut down or unregister a worker.
pub(crate) async fn worker_action(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<WorkerActionDone>, ApiFail> {
    let action: WorkerAction = action
        .parse()
        .map_err(|e: String| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", e))?;
    let req: WorkerActionRequest = if body.is_empty() {
        WorkerActionRequest::default()
    } else {
        parse_body(&body)?
    };
    Ok(Json(hub.worker_action(&id, action, req).await?))
}

/// `GET /api/v1/admin/passkeys`.
pub(crate) async fn passkeys(
    _: Admin,
    State(hub): State<Arc<Hub>>,
) -> Result<Json<Vec<PasskeyView>>, ApiFail> {
    Ok(Json(
        hub.store.passkeys()?.iter().map(|(_, p)| p.view()).collect(),
    ))
}

/// `POST /api/v1/admin/passkeys`: a new passkey for a project, returned once.
pub(crate) async fn passkey_create(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> Result<Json<PasskeyCreated>, ApiFail> {
    let req: PasskeyCreate = parse_body(&body)?;
    let project = req.project.trim();
    if project.is_empty() || project.len() > 128 || project.chars().any(|c| c.is_control()) {
        return Err(ApiFail::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "project name must be 1 to 128 printable characters",
        ));
    }
    let key = token::generate(token::PASSKEY_PREFIX);
    let rec = PasskeyRecord {
        prefix: key
            .expose()
            .chars()
            .take(token::PASSKEY_PREFIX.len() + 8)
            .collect(),
        project: project.to_owned(),
        created: now_rfc3339(),
        revoked: false,
    };
    hub.store.put_passkey(&token::hash(key.expose()), &rec)?;
    tracing::info!(project, prefix = %rec.prefix, "passkey created");
    let mut e = super::guard::AuditEvent::new("passkey_create");
    e.project = Some(project);
    e.passkey = Some(&rec.prefix);
    hub.audit.record(&e);
    Ok(Json(PasskeyCreated {
        passkey: key.expose().to_owned(),
        project: rec.project,
    }))
}

/// `POST /api/v1/admin/passkeys/revoke`: by the whole passkey or a unique prefix.
pub(crate) async fn passkey_revoke(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> Result<Json<PasskeyView>, ApiFail> {
    let req: PasskeyRevoke = parse_body(&body)?;
    let given = req.passkey.expose().trim();
    let all = hub.store.passkeys()?;
    let by_hash = token::hash(given);
    let hits: Vec<_> = all
        .into_iter()
        .filter(|(h, p)| *h == by_hash || (given.len() >= 8 && p.prefix.starts_with(given)))
        .collect();
    let (hash, mut rec) = match <[_; 1]>::try_from(hits) {
        Ok([one]) => one,
        Err(v) if v.is_empty() => {
            return Err(ApiFail::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no passkey matches `{}…`: see `cla-hub passkey list`",
                    given.chars().take(14).collect::<String>()
                ),
            ));
        }
        Err(v) => {
            return Err(ApiFail::new(
                StatusCode::CONFLICT,
                "ambiguous",
                format!("`{given}` matches {} passkeys: give more of it", v.len()),
            ));
        }
    };
    rec.revoked = true;
    hub.store.put_passkey(&hash, &rec)?;
    tracing::info!(prefix = %rec.prefix, project = %rec.project, "passkey revoked");
    let mut e = super::guard::AuditEvent::new("passkey_revoke");
    e.project = Some(&rec.project);
    e.passkey = Some(&rec.prefix);
    hub.audit.record(&e);
    Ok(Json(rec.view()))
}

/// `GET /api/v1/admin/jobs[?state=S&worker=W&since=T&limit=N]`, newest first.
pub(crate) async fn jobs(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    Query(q): Query<JobQuery>,
) -> Result<Json<Vec<JobRecord>>, ApiFail> {
    Ok(Json(hub.jobs(&q)?))
}

/// `POST /api/v1/admin/jobs`: create a job and return at once (`exec --detach`).
pub(crate) async fn job_create(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> Result<Json<JobRecord>, ApiFail> {
    let spec: JobSpec = parse_job_spec(&body)?;
    Ok(Json(hub.create_job(spec, None).await?))
}

#[derive(Deserialize)]
pub(crate) struct ShowQuery {
    /// Block up to this many seconds (capped at 60) for the job to end.
    wait: Option<u64>,
}

/// `GET /api/v1/admin/jobs/{id}[?wait=SECS]`.
pub(crate) async fn job_show(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<JobRecord>, ApiFail> {
    let id = hub.resolve_job(&id)?;
    let Some(secs) = q.wait else {
        return Ok(Json(hub.job(&id)?));
    };
    match hub.wait_job(&id)? {
        Wait::Done(r) => Ok(Json(*r)),
        Wait::Pending(rx) => match tokio::time::timeout(Duration::from_secs(secs).min(MAX_WAIT), rx).await {
            Ok(Ok(r)) => Ok(Json(r)),
            _ => Ok(Json(hub.job(&id)?)),
        },
    }
}

/// `POST /api/v1/admin/jobs/{id}/cancel`.
pub(crate) async fn job_cancel(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiFail> {
    let id = hub.resolve_job(&id)?;
    Ok(Json(hub.cancel_job(&id).await?))
}

/// `GET /api/v1/admin/exec`: a WebSocket that creates one job and streams it to the end.
pub(crate) async fn exec_stream(
    _: Admin,
    State(hub): State<Arc<Hub>>,
    req: Request,
) -> Result<Response, ApiFail> {
    // Few, and they carry ship and fetch data.
    upgrade(req, ReadSize::Bulk, move |conn| stream_job(hub, conn))
}

async fn stream_job(hub: Arc<Hub>, conn: Connection) {
    let (mut writer, mut reader) = conn.split();
    let first = match first_request(&mut reader).await {
        Ok(s) => s,
        Err(e) => {
            let fail = ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
            let _ = writer.send(&AdminEvent::Error(fail.1)).await;
            return writer.close().await;
        }
    };
    let (spec, attach) = match first {
        First::Exec(spec) => (Some(*spec), None),
        First::Attach { job, have } => (None, Some((job, have))),
    };
    let transfer = spec.as_ref().is_some_and(|s| s.task.is_transfer());
    // A worker's session reader waits when this channel is full, which would stall its other jobs. A
    // transfer's window bounds what can be in flight to (window / frame cost) frames, so a channel that
    // large never fills for a worker that keeps the protocol (tokio allocates its slots as they are used).
    let capacity = if transfer {
        (cla_transfer::WINDOW / cla_transfer::FRAME_COST) as usize + 64
    } else {
        64
    };
    let (tx, mut rx) = mpsc::channel(capacity);
    let job = match (spec, attach) {
        (Some(spec), _) => match hub.create_job(spec, Some(tx)).await {
            Ok(r) => r.id,
            Err(fail) => {
                let _ = writer.send(&AdminEvent::Error(fail.1)).await;
                return writer.close().await;
            }
        },
        (None, Some((job, have))) => {
            let job = match hub.resolve_job(&job) {
                Ok(id) => id,
                Err(fail) => {
                    let _ = writer.send(&AdminEvent::Error(fail.1)).await;
                    return writer.close().await;
                }
            };
            match hub.attach(&job, have, tx).await {
                Ok(a) => {
                    if send_attachment(&mut writer, &job, a).await.is_err() {
                        return;
                    }
                }
                Err(fail) => {
                    let _ = writer.send(&AdminEvent::Error(fail.1)).await;
                }
            }
            // An attached client follows the job; leaving changes nothing for it.
            return follow(&hub, &job, writer, reader, rx).await;
        }
        (None, None) => unreachable!("the first request is exec or attach"),
    };
    if writer
        .send(&AdminEvent::Created { job: job.clone() })
        .await
        .is_err()
    {
        hub.client_gone(&job).await;
        return;
    }
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let sent = match ev {
                    Some(JobEvent::Started { worker, stream }) => writer.send(&AdminEvent::Started { job: job.clone(), worker, stream }).await,
                    Some(JobEvent::Waiting(reason)) => writer.send(&AdminEvent::Waiting { job: job.clone(), reason }).await,
                    Some(JobEvent::Output { stream, data }) => writer.send_binary(stream, &data).await,
                    Some(JobEvent::Transfer(frame)) => writer.send(&AdminEvent::Transfer(frame)).await,
                    Some(JobEvent::Chunk(chunk)) => {
                        let stream = chunk.stream();
                        writer.send_chunk(chunk, stream).await
                    }
                    Some(JobEvent::Ended(record)) => {
                        let _ = writer.send(&AdminEvent::Ended(record)).await;
                        break;
                    }
                    None => break,
                };
                if sent.is_err() {
                    // The client went away (see `Hub::client_gone` for what becomes of the job).
                    hub.client_gone(&job).await;
                    return;
                }
            }
            msg = reader.read() => match msg {
                Ok(Some(Incoming::Frame(Frame::Text(t)))) => match decode_text::<AdminRequest>(&t) {
                    Ok(AdminRequest::Cancel) => {
                        let _ = hub.cancel_job(&job).await;
                    }
                    Ok(AdminRequest::Transfer(mut frame)) if transfer => {
                        // A client speaks for its own job only.
                        frame.job = job.clone();
                        hub.transfer_from_client(frame).await;
                    }
                    Ok(other) => tracing::debug!(job = %job, ?other, "unexpected message on an exec stream ignored"),
                    Err(e) => tracing::debug!(job = %job, "bad message on an exec stream ignored: {e}"),
                },
                Ok(Some(Incoming::Frame(Frame::Binary(chunk)))) if transfer => {
                    hub.transfer_data_from_client(&job, chunk).await;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    hub.client_gone(&job).await;
                    return;
                }
            },
        }
    }
    writer.close().await;
}

/// The largest binary frame of replayed output.
const REPLAY_FRAME: usize = 64 << 10;

/// The first message of an exec stream.
enum First {
    Exec(Box<JobSpec>),
    Attach { job: String, have: (u64, u64) },
}

async fn first_request(reader: &mut cla_protocol::ConnectionReader) -> Result<First, ProtocolError> {
    let read = async {
        loop {
            match reader.read().await? {
                Some(Incoming::Frame(Frame::Text(t))) => {
                    return match decode_text::<AdminRequest>(&t)? {
                        AdminRequest::Exec(spec) => Ok(First::Exec(spec)),
                        AdminRequest::Attach { job, stdout, stderr } => Ok(First::Attach {
                            job,
                            have: (stdout, stderr),
                        }),
                        AdminRequest::Cancel => Err(ProtocolError::Malformed("nothing to cancel yet".into())),
                        AdminRequest::Transfer(_) => Err(ProtocolError::Malformed(
                            "the first message must be `exec` or `attach`".into(),
                        )),
                    };
                }
                Some(_) => continue,
                None => return Err(ProtocolError::Transport("closed".into())),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .map_err(|_| ProtocolError::Timeout("the exec request"))?
}

/// Sends an attaching client where its output resumes, what the hub kept from there, and where the
/// job is.
async fn send_attachment(
    writer: &mut cla_protocol::ConnectionWriter,
    job: &str,
    a: crate::jobs::Attachment,
) -> Result<(), ProtocolError> {
    writer.send(&AdminEvent::Created { job: job.to_owned() }).await?;
    writer
        .send(&AdminEvent::Attached {
            job: job.to_owned(),
            stdout: a.stdout_from,
            stderr: a.stderr_from,
        })
        .await?;
    for (stream, bytes) in a.replay {
        for piece in bytes.chunks(REPLAY_FRAME) {
            writer.send_binary(stream, piece).await?;
        }
    }
    match a.now {
        JobEvent::Started { worker, stream } => {
            writer
                .send(&AdminEvent::Started {
                    job: job.to_owned(),
                    worker,
                    stream,
                })
                .await
        }
        JobEvent::Waiting(reason) => {
            writer
                .send(&AdminEvent::Waiting {
                    job: job.to_owned(),
                    reason,
                })
                .await
        }
        JobEvent::Ended(record) => writer.send(&AdminEvent::Ended(record)).await,
        _ => Ok(()),
    }
}

/// The rest of an attached stream: the job's events until it ends; the client may cancel it.
async fn follow(
    hub: &Hub,
    job: &str,
    mut writer: cla_protocol::ConnectionWriter,
    mut reader: cla_protocol::ConnectionReader,
    mut rx: mpsc::Receiver<JobEvent>,
) {
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let sent = match ev {
                    Some(JobEvent::Started { worker, stream }) => writer.send(&AdminEvent::Started { job: job.to_owned(), worker, stream }).await,
                    Some(JobEvent::Waiting(reason)) => writer.send(&AdminEvent::Waiting { job: job.to_owned(), reason }).await,
                    Some(JobEvent::Output { stream, data }) => writer.send_binary(stream, &data).await,
                    Some(JobEvent::Ended(record)) => {
                        let _ = writer.send(&AdminEvent::Ended(record)).await;
                        break;
                    }
                    Some(_) => Ok(()),
                    None => break,
                };
                if sent.is_err() {
                    return;
                }
            }
            msg = reader.read() => match msg {
                Ok(Some(Incoming::Frame(Frame::Text(t)))) => {
                    if let Ok(AdminRequest::Cancel) = decode_text::<AdminRequest>(&t) {
                        let _ = hub.cancel_job(job).await;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
        }
    }
    writer.close().await;
}
