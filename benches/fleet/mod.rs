//! Simulated workers for the fleet measurement: each registers through the hub's API, opens its own
//! WebSocket, says `hello`, waits for `welcome`, then only reads (which answers the hub's pings).

use std::sync::Arc;
use std::time::Instant;

use cla_client::AdminClient;
use cla_common::secret::Secret;
use cla_common::tls::Trust;
use cla_protocol::connection::Incoming;
use cla_protocol::{Connection, Frame, HubMessage, PROTOCOL_VERSION, WorkerMessage, decode_text};
use cla_worker_core::registration::{RegisterParams, register};
use tokio::sync::Semaphore;

/// Registers and connects `n` simulated workers; returns the seconds it took. They stay connected
/// (their tasks keep reading) until the runtime is dropped.
pub async fn connect(url: &str, admin: &AdminClient, passkey: &str, n: usize, trust: Trust) -> f64 {
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(32));
    let mut registered = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (url, passkey, trust) = (url.to_owned(), passkey.trim().to_owned(), trust.clone());
        registered.spawn(async move {
            let r = register(&RegisterParams {
                url,
                passkey: Secret::new(passkey),
                id: Some(format!("sim-{i:05}")),
                tags: vec!["sim".into()],
                envs: vec![],
                token: None,
                trust,
                csr: None,
            })
            .await
            .unwrap();
            drop(permit);
            (r.id, r.token)
        });
    }
    let mut creds = Vec::with_capacity(n);
    while let Some(r) = registered.join_next().await {
        creds.push(r.unwrap());
    }
    let mut welcomed = tokio::task::JoinSet::new();
    for (id, token) in creds {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let url = format!("{url}/ws/v1");
        let trust = trust.clone();
        welcomed.spawn(async move {
            let auth = format!("Bearer {token}");
            let conn = Connection::connect_with(
                &url,
                &[("authorization", &auth), ("x-cla-worker-id", &id)],
                &trust,
            )
            .await
            .unwrap();
            let (mut writer, mut reader) = conn.split();
            writer
                .send(&WorkerMessage::Hello(cla_protocol::Hello {
                    version: PROTOCOL_VERSION,
                    agent: "bench-sim".into(),
                    tags: vec!["sim".into()],
                    envs: vec![],
                    capacity: 1,
                    host: "sim".into(),
                    os: "linux".into(),
                    arch: "x86_64".into(),
                    pid: 0,
                    resume: vec![],
                    features: vec![],
                }))
                .await
                .unwrap();
            loop {
                match reader.read().await.unwrap() {
                    Some(Incoming::Frame(Frame::Text(t))) => match decode_text::<HubMessage>(&t).unwrap() {
                        HubMessage::Welcome(_) => break,
                        other => panic!("expected welcome, got {other:?}"),
                    },
                    Some(_) => {}
                    None => panic!("the hub closed a simulated worker's socket"),
                }
            }
            drop(permit);
            // Idle from now on: read (answering pings) until the hub or the runtime ends it.
            tokio::spawn(async move {
                let _writer = writer;
                while let Ok(Some(_)) = reader.read().await {}
            });
        });
    }
    while let Some(r) = welcomed.join_next().await {
        r.unwrap();
    }
    let _ = admin;
    t.elapsed().as_secs_f64()
}
