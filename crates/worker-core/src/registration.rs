//! `register` and `unregister` against the hub's HTTP API.

use crate::error::Result;
use cla_common::secret::Secret;
use cla_common::tls::{ClientIdentity, Trust};
use cla_protocol::WORKER_ID_HEADER;
use cla_protocol::api::{RegisterRequest, RegisterResponse, UnregisterResponse};
use cla_protocol::http::HttpClient;

/// What `register` sends.
#[derive(Debug, Clone)]
pub struct RegisterParams {
    pub url: String,
    pub passkey: Secret,
    pub id: Option<String>,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    /// The worker's current token, to add an existing worker to another project.
    pub token: Option<Secret>,
    /// How to trust the hub's certificate on https (first use records what it sees).
    pub trust: Trust,
    /// A certificate signing request for a client certificate (https hubs issue one).
    pub csr: Option<String>,
}

/// Registers with the hub's passkey; the hub answers with the id and a token (shown once).
pub async fn register(p: &RegisterParams) -> Result<RegisterResponse> {
    let client = HttpClient::with_trust(&p.url, &p.trust)?;
    let body = RegisterRequest {
        passkey: p.passkey.clone(),
        id: p.id.clone(),
        tags: p.tags.clone(),
        envs: p.envs.clone(),
        host: Some(cla_common::util::hostname()),
        user: Some(cla_common::util::username()),
        version: Some(cla_common::VERSION.to_owned()),
        csr: p.csr.clone(),
    };
    let auth = p.token.as_ref().map(|t| format!("Bearer {}", t.expose()));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    Ok(client.post("/api/v1/register", &headers, &body).await?)
}

/// Asks the hub to forget this worker (its own credentials prove who it is).
pub async fn unregister(
    url: &str,
    id: &str,
    token: &Secret,
    trust: &Trust,
    identity: Option<&ClientIdentity>,
) -> Result<UnregisterResponse> {
    let client = HttpClient::with_tls(url, trust, identity)?;
    let auth = format!("Bearer {}", token.expose());
    Ok(client
        .post(
            "/api/v1/unregister",
            &[("authorization", &auth), (WORKER_ID_HEADER, id)],
            &(),
        )
        .await?)
}
