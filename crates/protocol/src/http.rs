//! A small JSON-over-HTTP client (hyper), used by `cla-worker register/unregister` and by the hub's admin
//! commands. Non-2xx answers become [`HttpError::Status`] carrying the hub's one-line message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::ApiError;
use cla_common::tls::{ClientIdentity, TlsError, Trust};

/// What can go wrong talking HTTP to the hub.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad hub URL `{0}`: use http://HOST:PORT or https://HOST:PORT")]
    BadUrl(String),
    #[error("hub URL `{0}` has a path: the hub serves at the root, so use http(s)://HOST:PORT alone")]
    UrlWithPath(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot reach the hub at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("unexpected answer from the hub at {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("the hub at {0} did not answer in time")]
    Timeout(String),
}

impl HttpError {
    /// The HTTP status, for errors that have one.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client bound to one hub base URL (`http://host:port`, no trailing path).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
}

/// Default time for one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl HttpClient {
    /// A plain-HTTP client for `base` (an `https://` base is refused: it needs a [`Trust`]).
    pub fn new(base: &str) -> Result<HttpClient, HttpError> {
        HttpClient::with_trust(base, &Trust::Unset)
    }

    /// A client for `base` (`http://` or `https://`); on `https://`, the hub's certificate must satisfy
    /// `trust`.
    pub fn with_trust(base: &str, trust: &Trust) -> Result<HttpClient, HttpError> {
        HttpClient::with_tls(base, trust, None)
    }

    /// [`HttpClient::with_trust`], presenting `identity` if the hub asks for a client certificate.
    pub fn with_tls(
        base: &str,
        trust: &Trust,
        identity: Option<&ClientIdentity>,
    ) -> Result<HttpClient, HttpError> {
        let base = base.trim_end_matches('/').to_owned();
        let https = base.starts_with("https://");
        if !(https || base.starts_with("http://")) {
            return Err(HttpError::BadUrl(base));
        }
        match base.parse::<hyper::Uri>() {
            Err(_) => return Err(HttpError::BadUrl(base)),
            // The API lives at the root: a path (`http://hub:8780/cla`) would only give 404s.
            Ok(uri) if !matches!(uri.path(), "" | "/") || uri.query().is_some() => {
                return Err(HttpError::UrlWithPath(base));
            }
            Ok(_) => {}
        }
        // A plain URL never uses the TLS side; it still needs a config, one that trusts nothing.
        let tls = match https {
            true => Arc::unwrap_or_clone(trust.client_config_for(&base, identity)?),
            false => rustls::ClientConfig::builder_with_provider(cla_common::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Setup(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(HttpClient { client, base })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path` without decoding: the status and the `Date` header (for `doctor`).
    pub async fn probe(&self, path: &str) -> Result<(u16, Option<String>), HttpError> {
        let url = format!("{}{}", self.base, path);
        let req = Request::get(&url)
            .body(Full::new(Bytes::new()))
            .map_err(|_| HttpError::BadUrl(url.clone()))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| HttpError::Timeout(self.base.clone()))?
            .map_err(|e| HttpError::Connect {
                url: self.base.clone(),
                reason: connect_reason(&e),
            })?;
        let date = resp
            .headers()
            .get(hyper::header::DATE)
            .and_then(|d| d.to_str().ok())
            .map(str::to_owned);
        Ok((resp.status().as_u16(), date))
    }

    /// `GET path`, decoding a JSON answer.
    pub async fn get<R: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<R, HttpError> {
        self.request(Method::GET, path, headers, None::<&()>, REQUEST_TIMEOUT)
            .await
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &B,
    ) -> Result<R, HttpError> {
        self.request(Method::POST, path, headers, Some(body), REQUEST_TIMEOUT)
            .await
    }

    /// Any request, with its own timeout (long polls need more than the default).
    pub async fn request<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<R, HttpError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header("accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(
                    serde_json::to_vec(b).expect("request bodies serialize"),
                ))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|_| HttpError::BadUrl(url.clone()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| HttpError::Connect {
                url: self.base.clone(),
                reason: crate::connection::explain(&self.base, &connect_reason(&e)),
            })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Connect {
                    url: self.base.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, HttpError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(self.base.clone()))??;
        if !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| HttpError::Decode {
            url: url.clone(),
            reason: e.to_string(),
        })
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> HttpError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => HttpError::Status {
            status: status.as_u16(),
            code: e.code,
            message: e.error,
            retry_after: e.retry_after,
        },
        Err(_) => HttpError::Status {
            status: status.as_u16(),
            code: "http".to_owned(),
            message: format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(body)
                    .chars()
                    .take(200)
                    .collect::<String>()
                    .trim()
            ),
            retry_after: None,
        },
    }
}

/// The innermost cause of a connection failure ("Connection refused (os error 111)"), which is the part
/// worth showing.
fn connect_reason(e: &hyper_util::client::legacy::Error) -> String {
    if let Some(tls) = cla_common::tls::find_rustls(e) {
        return cla_common::tls::describe(tls);
    }
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}
