//! Worker-facing endpoints: registration with a passkey, unregistration with the worker's own
//! credentials, and the WebSocket upgrade at `/ws/v1`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::Hub;
use super::gate::ConnTicket;
use super::guard::AuditEvent;
use super::jobs::ApiFail;
use super::listener::Peer;
use super::server::{bearer, parse_body, upgrade};
use super::session::{self, Auth};
use super::store::WorkerRecord;
use cla_common::token;
use cla_common::util::now_rfc3339;
use cla_protocol::WORKER_ID_HEADER;
use cla_protocol::api::{RegisterRequest, RegisterResponse, UnregisterResponse};
use cla_protocol::connection::ReadSize;

/// Refused registrations are logged at most this often (the audit log has each, or their count).
static REFUSED_LOG: cla_common::logging::Throttle =
    cla_common::logging::Throttle::new(std::time::Duration::from_secs(10));

/// `POST /api/v1/register`. Every attempt is audited; failed ones count against the source's limit, and
/// a source past it is refused with `429` before its request is read.
pub(crate) async fn register(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<RegisterResponse>, ApiFail> {
    let source = peer.addr.ip();
    let now = std::time::Instant::now();
    if let Err(secs) = hub.register_limit.check(source, now) {
        let mut fail = ApiFail::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many failed registrations from {source}: try again in {secs}s"),
        );
        fail.1.retry_after = Some(secs);
        hub.audit.rate_limited(source, now);
        return Err(fail);
    }
    let result = register_checked(&hub, &headers, &body).await;
    match &result {
        Ok((resp, project, prefix, host)) => {
            let mut e = AuditEvent::new("register");
            e.source = Some(source);
            e.worker = Some(&resp.id);
            e.project = Some(project);
            e.passkey = Some(prefix);
            e.host = host.as_deref();
            hub.audit.record(&e);
        }
        Err(fail) => {
            // A worker id already taken is a user's mistake, not a guess: it does not count.
            if fail.0 != StatusCode::CONFLICT {
                hub.register_limit.failed(source, now);
            }
            if let Some(held) = REFUSED_LOG.allow(now) {
                tracing::warn!(%source, "registration refused: {}{}", fail.1.error, REFUSED_LOG.suffix(held));
            }
            let mut e = AuditEvent::new("register_refused");
            e.source = Some(source);
            e.reason = Some(&fail.1.error);
            hub.audit.record(&e);
        }
    }
    result.map(|(resp, ..)| Json(resp))
}

/// A registration, checked: the response, and for the audit log the project, the passkey's prefix and
/// the host the worker said it runs on.
async fn register_checked(
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(RegisterResponse, String, String, Option<String>), ApiFail> {
    let req: RegisterRequest = parse_body(body)?;
    req.check()
        .map_err(|m| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", m))?;
    let unauthorized = |m: &str| ApiFail::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let passkey_hash = token::hash(req.passkey.expose().trim());
    let passkey = hub
        .store
        .passkey(&passkey_hash)?
        .ok_or_else(|| unauthorized("invalid passkey"))?;
    if passkey.revoked {
        return Err(unauthorized(
            "this passkey was revoked: ask the hub admin for a new one",
        ));
    }
    let prefix = passkey.prefix;
    let project = passkey.project;
    let id = match &req.id {
        Some(id) => id.clone(),
        None => generate_id(hub, &req, &project)?,
    };
    let (record, token) = match hub.store.worker(&id)? {
        Some(mut existing) => {
            if existing.projects.contains(&project) {
                return Err(ApiFail::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "worker id {id} is already registered in project {project}: pick another --id, \
                         or run `cla-worker unregister --id {id}` first"
                    ),
                ));
            }
            // Another project's worker joins this one: only with proof that the caller owns it.
            match bearer(headers) {
                Some(t) if existing.check_token(t, cla_common::util::unix_now()).is_some() => {
                    existing.projects.push(project.clone());
                    (existing, t.to_owned())
                }
                _ => {
                    return Err(ApiFail::new(
                        StatusCode::CONFLICT,
                        "conflict",
                        format!(
                            "worker id {id} exists in another project: pass its token with --token to add it to {project}"
                        ),
                    ));
                }
            }
        }
        None => {
            let t = token::generate(token::WORKER_TOKEN_PREFIX).expose().to_owned();
            let rec = WorkerRecord {
                id: id.clone(),
                token_hash: token::hash(&t),
                projects: vec![project.clone()],
                tags: req.tags.clone(),
                envs: req.envs.clone(),
                host: req.host.clone(),
                version: req.version.clone(),
                capacity: 1,
                registered: now_rfc3339(),
                last_seen: None,
                disabled: false,
                old_token_hash: None,
                old_token_until: None,
                rotation: None,
                cert_sha256: None,
            };
            (rec, t)
        }
    };
    let mut record = record;
    let certificate = match (&req.csr, &hub.client_ca) {
        (Some(csr), Some(ca)) => {
            let (pem, fingerprint) = ca
                .sign(csr, &id)
                .map_err(|m| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", m))?;
            record.cert_sha256 = Some(fingerprint.to_string());
            Some(pem)
        }
        _ => None,
    };
    hub.store.put_worker(&record)?;
    tracing::info!(worker = %id, project = %project, "worker registered");
    Ok((
        RegisterResponse {
            id,
            token,
            projects: record.projects,
            certificate,
        },
        project,
        prefix,
        req.host.clone(),
    ))
}

/// `user@host`, or `user@host-2`, `-3`, ... when taken: stable and readable, like the original's default.
fn generate_id(hub: &Hub, req: &RegisterRequest, project: &str) -> Result<String, ApiFail> {
    let clean = |s: &str| {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect::<String>()
    };
    let user = req
        .user
        .as_deref()
        .map(clean)
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "worker".into());
    let host = req
        .host
        .as_deref()
        .map(clean)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let base: String = format!("{user}@{host}")
        .chars()
        .take(cla_protocol::bounds::MAX_ID_LEN - 6)
        .collect();
    for n in 1..1000 {
        let id = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if hub.store.worker(&id)?.is_none() {
            return Ok(id);
        }
    }
    Err(ApiFail::new(
        StatusCode::CONFLICT,
        "conflict",
        format!("no free worker id like {base} in {project}: pass --id"),
    ))
}

/// The worker a request's `Authorization` + `X-Cla-Worker-Id` headers prove, or why not.
fn authenticate(hub: &Hub, headers: &HeaderMap) -> Result<WorkerRecord, String> {
    authenticate_which(hub, headers).map(|(rec, _)| rec)
}

/// With `--mtls`: the worker must present the client certificate issued at its registration.
fn check_client_cert(hub: &Hub, rec: &WorkerRecord, peer: &Peer) -> Result<(), String> {
    if !hub.cfg.tls.as_ref().is_some_and(|t| t.mtls) {
        return Ok(());
    }
    let id = &rec.id;
    match (&rec.cert_sha256, peer.client_cert) {
        (None, _) => Err(format!(
            "this hub requires a client certificate and worker {id} was never issued one: register it again over https"
        )),
        (Some(_), None) => Err(format!(
            "this hub requires a client certificate and worker {id} presented none: give it the certificate from its registration (the registration's cert/key in its config)"
        )),
        (Some(want), Some(got)) if *want != got.to_string() => Err(format!(
            "worker {id} presented a client certificate that is not the one issued at its registration"
        )),
        _ => Ok(()),
    }
}

/// [`authenticate`], also telling whether the token was the one before a rotation.
fn authenticate_which(hub: &Hub, headers: &HeaderMap) -> Result<(WorkerRecord, bool), String> {
    let id = headers
        .get(WORKER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or("missing X-Cla-Worker-Id header")?;
    let presented = bearer(headers).ok_or("missing bearer token")?;
    let revoked = || format!("worker {id} is not registered on this hub (unregistered, or wrong token)");
    match hub.store.worker(id) {
        Ok(Some(rec)) => match rec.check_token(presented, cla_common::util::unix_now()) {
            Some(old) => Ok((rec, old)),
            None => Err(revoked()),
        },
        Ok(None) => Err(revoked()),
        Err(e) => Err(e.to_string()),
    }
}

/// `POST /api/v1/unregister`: forget the worker and close its session.
pub(crate) async fn unregister(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Result<Json<UnregisterResponse>, ApiFail> {
    let rec = authenticate(&hub, &headers)
        .and_then(|rec| check_client_cert(&hub, &rec, &peer).map(|()| rec))
        .map_err(|m| ApiFail::new(StatusCode::UNAUTHORIZED, "unauthorized", m))?;
    let mut e = AuditEvent::new("unregister");
    e.source = Some(peer.addr.ip());
    e.worker = Some(&rec.id);
    hub.audit.record(&e);
    hub.store.remove_worker(&rec.id)?;
    if let Some(s) = hub.state().sessions.get(&rec.id) {
        s.close.cancel();
    }
    tracing::info!(worker = %rec.id, "worker unregistered");
    hub.worker_unregistered(&rec.id).await;
    Ok(Json(UnregisterResponse {
        id: rec.id,
        projects: rec.projects,
    }))
}

/// `GET /ws/v1`: the worker's WebSocket. Credentials are checked now; a failure is reported on the
/// socket as `reject`, after the worker's `hello`, so the worker learns why.
pub(crate) async fn worker_socket(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
) -> Result<Response, ApiFail> {
    let checked = authenticate_which(&hub, req.headers())
        .and_then(|(rec, old)| check_client_cert(&hub, &rec, &peer).map(|()| (rec, old)));
    let ticket = req.extensions().get::<ConnTicket>().cloned();
    let auth = match checked {
        Ok((rec, old)) => {
            ConnTicket::authenticate(req.extensions());
            Auth::Ok(Box::new(rec), old)
        }
        Err(why) => Auth::Denied(why),
    };
    // One per connected worker, and the hub holds thousands: memory first.
    upgrade(req, ReadSize::Small, move |conn| async move {
        // A refused connection still counts against the gate until it has read its `reject`.
        // (An authenticated one has left the gate: it is never evicted.)
        match ticket {
            Some(t) => tokio::select! {
                () = session::run(hub, conn, auth) => {}
                () = t.0.evicted() => {}
            },
            None => session::run(hub, conn, auth).await,
        }
    })
}
