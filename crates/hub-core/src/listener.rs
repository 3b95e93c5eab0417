//! [`HubListener`]: the hub's accept loop, plain TCP or TLS, as an axum [`Listener`].
//!
//! TLS handshakes run in their own tasks (bounded in number and time), so a slow or silent client cannot
//! hold up the others; only finished handshakes reach axum. Every connection carries its [`Peer`]
//! (the source address), which handlers read with `ConnectInfo<Peer>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use cla_protocol::connection::Io;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; connections beyond it are closed at once.
const MAX_HANDSHAKES: usize = 1024;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The fingerprint of the client certificate the peer presented (TLS only; it chains to the hub's
    /// client CA, or the handshake would have failed).
    pub client_cert: Option<cla_common::tls::Fingerprint>,
}

/// Accepts connections (with TLS when configured) and hands them to axum.
pub struct HubListener {
    rx: mpsc::Receiver<(Box<dyn Io>, Peer)>,
    local: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl HubListener {
    /// Starts accepting on `tcp`; with `tls`, each connection completes a TLS handshake first.
    pub fn new(tcp: TcpListener, tls: Option<Arc<ServerConfig>>) -> std::io::Result<HubListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(256);
        let accept = tokio::spawn(accept_loop(tcp, tls.map(tokio_rustls::TlsAcceptor::from), tx));
        Ok(HubListener { rx, local, accept })
    }
}

impl Drop for HubListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<(Box<dyn Io>, Peer)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // No Nagle: the hub writes small frames (offers, acks, cancels) that nobody answers at once, and a
        // small write held back for the peer's delayed ACK would cost a job 40 ms.
        let _ = stream.set_nodelay(true);
        let peer = Peer {
            addr,
            client_cert: None,
        };
        let Some(acceptor) = &tls else {
            if tx.send((Box::new(stream), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%addr, "too many TLS handshakes in progress: closing the connection");
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let client_cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| cla_common::tls::Fingerprint::of(c.as_ref()));
                    let _ = tx.send((Box::new(tls), Peer { client_cert, ..peer })).await;
                }
                Ok(Err(e)) => tracing::info!(%addr, "{}", cla_common::tls::handshake_failure(&e)),
                Err(_) => tracing::info!(%addr, "TLS handshake timed out"),
            }
        });
    }
}

impl Listener for HubListener {
    type Io = Box<dyn Io>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended: there is nothing more to accept.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            client_cert: None,
        })
    }
}

impl Connected<IncomingStream<'_, HubListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, HubListener>) -> Self {
        *stream.remote_addr()
    }
}
