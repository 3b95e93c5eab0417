//! The hub's listener: one port serving the HTTP API and the WebSocket endpoints (axum), plus
//! [`run`], which opens the store, writes `hub.json` and serves until the shutdown token fires.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::gate::{ConnTicket, Gate, GateLimits};
use super::jobs::ApiFail;
use super::listener::{HubListener, serve};
use super::store::{RedbStore, Store};
use super::{Hub, HubConfig, HubFile, admin, api};
use crate::error::{Error, Result};
use cla_common::token;
use cla_protocol::connection::{ReadSize, accept_key};
use cla_protocol::{Connection, SUBPROTOCOL, WS_PATH};

/// Serves the hub on `listener` until `shutdown` is cancelled.
pub async fn run(listener: TcpListener, cfg: HubConfig, shutdown: CancellationToken) -> Result<()> {
    let store: Box<dyn Store> = Box::new(RedbStore::open(&cfg.data_dir)?);
    let addr = listener.local_addr()?;
    // Over TLS the hub issues client certificates at registration (its client CA), and asks for them.
    let client_ca = match &cfg.tls {
        Some(_) => Some(cla_common::tls::ClientCa::load_or_create(&cfg.data_dir)?),
        None => None,
    };
    let identity = match &cfg.tls {
        None => None,
        Some(t) => {
            let mut names = cla_common::tls::default_names(Some(addr.ip()));
            names.extend(t.names.iter().cloned());
            Some(cla_common::tls::server_identity(
                t.cert.as_deref(),
                t.key.as_deref(),
                &cfg.data_dir,
                &names,
                client_ca.as_ref(),
            )?)
        }
    };
    let url = local_url(addr, identity.is_some());
    let pin = identity.as_ref().map(|i| i.fingerprint.to_string());
    let admin_hash = admin_token(store.as_ref(), &cfg.data_dir, &url, pin.clone())?;
    let hub = Hub::new(store, cfg, admin_hash, shutdown.clone(), client_ca);
    hub.reload().await?;
    if let Some(id) = &identity {
        tracing::info!(
            certificate = %id.cert_path.display(),
            "TLS certificate {}{} (workers pin it when they register)",
            id.fingerprint,
            if id.generated { ", self-signed just now" } else { "" }
        );
    }
    if hub.cfg.tls.as_ref().is_some_and(|t| t.mtls) {
        tracing::info!("mTLS: workers must present the client certificate issued at their registration");
    }
    let nofile = cla_common::util::raise_open_file_limit();
    if let Some(n) = nofile {
        tracing::info!("open file limit: {n} (each worker session and client connection uses one)");
    }
    let limits =
        (hub.cfg.pending_connections).unwrap_or_else(|| GateLimits::for_file_limit(nofile.unwrap_or(16_384)));
    tracing::info!(
        "unauthenticated connections: at most {} in all, {} per source address; request heads within {} s",
        limits.total,
        limits.per_source,
        hub.cfg.header_timeout.as_secs()
    );
    tracing::info!(data_dir = %hub.cfg.data_dir.display(), "listening on {addr}");
    let listener = HubListener::new(listener, identity.map(|i| i.config), Gate::new(limits));
    let header_timeout = hub.cfg.header_timeout;
    serve(listener, router(hub), header_timeout, shutdown).await;
    tracing::info!("hub stopped");
    Ok(())
}

/// All routes.
fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(WS_PATH, get(api::worker_socket))
        .route("/api/v1/register", post(api::register))
        .route("/api/v1/unregister", post(api::unregister))
        .route("/api/v1/admin/workers", get(admin::workers))
        .route("/api/v1/admin/workers/{id}/{action}", post(admin::worker_action))
        .route(
            "/api/v1/admin/passkeys",
            get(admin::passkeys).post(admin::passkey_create),
        )
        .route("/api/v1/admin/passkeys/revoke", post(admin::passkey_revoke))
        .route("/api/v1/admin/jobs", get(admin::jobs).post(admin::job_create))
        .route("/api/v1/admin/jobs/{id}", get(admin::job_show))
        .route("/api/v1/admin/jobs/{id}/cancel", post(admin::job_cancel))
        .route("/api/v1/admin/exec", get(admin::exec_stream))
        .fallback(|| async { ApiFail::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(hub)
}

/// The URL local admin commands use: the bound address, with a wildcard IP replaced by loopback.
fn local_url(addr: SocketAddr, tls: bool) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".parse().expect("valid"),
        ip if ip.is_unspecified() => "::1".parse().expect("valid"),
        ip => ip,
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

/// Keeps the admin token across restarts: reuse the one in `hub.json` if it matches the stored hash,
/// else make a new one. Rewrites `hub.json` (0600) with the current URL. Returns the hash.
fn admin_token(store: &dyn Store, data_dir: &Path, url: &str, pin: Option<String>) -> Result<String> {
    let path = data_dir.join("hub.json");
    let stored = store.admin_token_hash()?;
    let existing = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<HubFile>(&b).ok());
    let token = match (existing, &stored) {
        (Some(f), Some(h)) if token::verify(&f.admin_token, h) => f.admin_token,
        _ => {
            let t = token::generate(token::ADMIN_TOKEN_PREFIX).expose().to_owned();
            store.set_admin_token_hash(&token::hash(&t))?;
            t
        }
    };
    let file = HubFile {
        url: url.to_owned(),
        admin_token: token.clone(),
        pin,
    };
    let json = serde_json::to_vec_pretty(&file).expect("hub.json serializes");
    cla_common::util::write_atomic(&path, &json, true)
        .map_err(|e| Error::Other(format!("cannot write {}: {e}", path.display())))?;
    Ok(token::hash(&token))
}

impl IntoResponse for ApiFail {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

/// The bearer token of a request, if any. The scheme is matched without regard to case (RFC 9110).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Parses a job request: [`parse_body`], refusing fields a job does not have.
pub(crate) fn parse_job_spec(body: &[u8]) -> Result<cla_protocol::api::JobSpec, ApiFail> {
    let bad = |m: String| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("bad request body: {e}")))?;
    cla_protocol::api::check_fields(&value, "job request", cla_protocol::api::JOB_SPEC_FIELDS)
        .map_err(bad)?;
    serde_json::from_value(value).map_err(|e| bad(format!("bad request body: {e}")))
}

/// Gives every error answer the documented JSON body (`{"code", "error"}`): axum's own rejections (a
/// body over the limit, a missing header, a wrong method) are plain text.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let (code, default) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "request body too large"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed on this endpoint"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("bad_request", "expected a JSON body"),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("bad_request", "bad request"),
    };
    let message = if text.is_empty() {
        default.to_owned()
    } else {
        cla_common::util::one_line(&text, 300)
    };
    let mut fail = ApiFail::new(status, code, message).into_response();
    for (k, v) in parts
        .headers
        .iter()
        .filter(|(k, _)| *k == header::RETRY_AFTER || *k == header::ALLOW)
    {
        fail.headers_mut().insert(k.clone(), v.clone());
    }
    fail
}

/// Extractor that admits only requests carrying the hub's admin token.
pub(crate) struct Admin;

impl FromRequestParts<Arc<Hub>> for Admin {
    type Rejection = ApiFail;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, ApiFail> {
        match bearer(&parts.headers) {
            Some(t) if token::verify(t, &hub.admin_hash) => {
                ConnTicket::authenticate(&parts.extensions);
                Ok(Admin)
            }
            _ => Err(ApiFail::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong admin token: run admin commands on the hub's machine (they read DATA_DIR/hub.json) \
                 or set CLA_HUB_TOKEN",
            )),
        }
    }
}

/// Parses a JSON body into `T`, answering 400 with the reason when it does not fit.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiFail> {
    serde_json::from_slice(body).map_err(|e| {
        ApiFail::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("bad request body: {e}"),
        )
    })
}

/// Completes a WebSocket upgrade with the `cla.v1` subprotocol and runs `on_open` on the connection,
/// which reads `read` bytes at a time.
pub(crate) fn upgrade<F, Fut>(mut req: Request, read: ReadSize, on_open: F) -> Result<Response, ApiFail>
where
    F: FnOnce(Connection) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let bad = |m: &str| ApiFail::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let h = req.headers();
    let wants_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| wants_ws)
        .ok_or_else(|| bad("expected a WebSocket upgrade"))?;
    let speaks = h
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
    if !speaks {
        return Err(bad("the `cla.v1` WebSocket subprotocol is required"));
    }
    let accept = accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => on_open(Connection::from_upgraded(TokioIo::new(upgraded), read).await).await,
            Err(e) => tracing::debug!("WebSocket upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
        .body(Body::empty())
        .expect("valid response"))
}
