//! [`HubListener`]: the hub's accept loop, plain TCP or TLS, and [`serve`], which runs HTTP/1 on each
//! connection it accepts.
//!
//! Each connection is admitted by the [`Gate`] first (a cap on connections that have not authenticated),
//! and its [`Ticket`] rides along until the connection authenticates or closes. TLS handshakes run in
//! their own tasks (bounded in number and time), so a slow or silent client cannot hold up the others.
//! Every connection carries its [`Peer`] (the source address), which handlers read with
//! `ConnectInfo<Peer>`. A connection that does not send a complete request head within the header
//! timeout ([`DEFAULT_HEADER_TIMEOUT`] unless configured; counted on a new connection and between requests
//! on a kept-alive one) is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::gate::{ConnTicket, Gate, Ticket};
use cla_common::logging::Throttle;
use cla_protocol::connection::Io;

/// How long a connection may take to send a request's head (request line and headers), counted from
/// when the hub starts waiting for it: on a new connection, and between requests on a kept-alive one.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutting-down hub waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed accepts, and failed or refused TLS handshakes, are logged at most this often.
static ACCEPT_FAILED_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static HANDSHAKE_LOG: Throttle = Throttle::new(Duration::from_secs(10));

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
    rx: mpsc::Receiver<Accepted>,
    accept: tokio::task::JoinHandle<()>,
}

/// A connection ready for HTTP: its stream, who is on the other end, and its place in the gate.
type Accepted = (Box<dyn Io>, Peer, Ticket);

impl HubListener {
    /// Starts accepting on `tcp`; with `tls`, each connection completes a TLS handshake first. Every
    /// connection is admitted by `gate`.
    pub fn new(tcp: TcpListener, tls: Option<Arc<ServerConfig>>, gate: Arc<Gate>) -> HubListener {
        let (tx, rx) = mpsc::channel(256);
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let accept = tokio::spawn(accept_loop(tcp, tls, tx, gate));
        HubListener { rx, accept }
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
    tx: mpsc::Sender<Accepted>,
    gate: Arc<Gate>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(s) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // Out of file descriptors and the like: back off (up to 1 s) rather than spin, and say
                // so once per interval, not once per attempt.
                if let Some(held) = ACCEPT_FAILED_LOG.allow(Instant::now()) {
                    let hint = if e.raw_os_error() == Some(emfile()) {
                        ": the hub is out of file descriptors; raise its limit (LimitNOFILE= in the \
                         systemd unit, ulimit -n) or look for a client holding many connections"
                    } else {
                        ""
                    };
                    tracing::warn!("accept failed: {e}{hint}{}", ACCEPT_FAILED_LOG.suffix(held));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let ticket = gate.admit(addr.ip());
        // No Nagle: the hub writes small frames (offers, acks, cancels) that nobody answers at once, and a
        // small write held back for the peer's delayed ACK would cost a job 40 ms.
        let _ = stream.set_nodelay(true);
        let peer = Peer {
            addr,
            client_cert: None,
        };
        let Some(acceptor) = &tls else {
            if tx.send((Box::new(stream), peer, ticket)).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            if let Some(held) = HANDSHAKE_LOG.allow(Instant::now()) {
                tracing::warn!(
                    %addr,
                    "too many TLS handshakes in progress: closing the connection{}",
                    HANDSHAKE_LOG.suffix(held)
                );
            }
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let done = tokio::select! {
                done = handshake => done,
                () = ticket.evicted() => return,
            };
            match done {
                Ok(Ok(tls)) => {
                    let client_cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| cla_common::tls::Fingerprint::of(c.as_ref()));
                    let _ = tx
                        .send((Box::new(tls), Peer { client_cert, ..peer }, ticket))
                        .await;
                }
                Ok(Err(e)) => {
                    if let Some(held) = HANDSHAKE_LOG.allow(Instant::now()) {
                        let why = cla_common::tls::handshake_failure(&e);
                        tracing::info!(%addr, "{why}{}", HANDSHAKE_LOG.suffix(held));
                    }
                }
                Err(_) => {
                    if let Some(held) = HANDSHAKE_LOG.allow(Instant::now()) {
                        tracing::info!(%addr, "TLS handshake timed out{}", HANDSHAKE_LOG.suffix(held));
                    }
                }
            }
        });
    }
}

/// Connections the kernel queues for the hub before it accepts them. The standard library's 128 is
/// small for a hub: a fleet reconnecting after a restart, or a flood, fills it, and every SYN dropped
/// then costs its client a 1 s retransmit. The kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket on `addr` with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library does: a restarted hub can bind its port again at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `EMFILE` ("too many open files") on this platform.
fn emfile() -> i32 {
    #[cfg(unix)]
    {
        nix::errno::Errno::EMFILE as i32
    }
    #[cfg(not(unix))]
    {
        // WSAEMFILE.
        10024
    }
}

/// Serves `app` over HTTP/1 (with upgrades, for the WebSocket endpoints) on every connection `listener`
/// accepts, until `shutdown` fires; then lets requests in flight finish for up to [`DRAIN_TIMEOUT`]. A
/// connection that takes longer than `header_timeout` to send a request head is closed.
pub async fn serve(
    mut listener: HubListener,
    app: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    loop {
        let (io, peer, ticket) = tokio::select! {
            c = listener.rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        let ticket = Arc::new(ticket);
        let (app, shutdown) = (app.clone(), shutdown.clone());
        conns.spawn(async move {
            let for_requests = ConnTicket(ticket.clone());
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(for_requests.clone());
                app.clone().call(req.map(Body::new))
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = http.serve_connection(TokioIo::new(io), service).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(addr = %peer.addr, "connection ended: {e}");
                    }
                }
                () = ticket.evicted() => {}
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
                }
            }
        });
    }
    drop(listener);
    conns.close();
    if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connection(s) still open after the drain timeout: closing them",
            conns.len()
        );
    }
}
