//! [`Connection`]: one WebSocket, typed. It owns the tungstenite stream so that `worker/` and `hub/` deal
//! only in [`Frame`]s and our message types.
//!
//! A connection is split once into a [`ConnectionReader`] (one task reads) and a [`ConnectionWriter`]
//! (one task writes); other tasks hand frames to the writer through a channel.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::ProtocolError;
use super::codec::{Chunk, Frame, encode_binary, encode_text};
use super::message::SUBPROTOCOL;
use cla_common::tls::{ClientIdentity, Trust};

/// Any byte stream a WebSocket can run over (TCP or TLS), boxed so one type serves all.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

type Stream = WebSocketStream<Box<dyn Io>>;

/// The largest message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How long the client waits for TCP connect plus the upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How much a connection reads from its socket at a time, which is also the read buffer it starts with
/// (tungstenite ties the two together and allocates the buffer up front; a frame larger than what is
/// free grows the buffer as needed, as a transfer's 1 MiB chunks do once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSize {
    /// 8 KiB: for the hub's worker connections, of which it holds thousands. At tungstenite's default
    /// (128 KiB) 10,000 workers would cost the hub over a gigabyte.
    Small,
    /// 64 KiB: for connections that carry bulk data and are few — a worker's one connection, an admin
    /// client's. A 1 GiB transfer then takes 16,000 reads instead of 131,000 (each a system call, and
    /// tungstenite zero-fills the window before it).
    Bulk,
}

impl ReadSize {
    fn bytes(self) -> usize {
        match self {
            ReadSize::Small => 8 << 10,
            ReadSize::Bulk => 64 << 10,
        }
    }
}

fn ws_config(read: ReadSize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
        .read_buffer_size(read.bytes())
}

/// Malformed or unsupported frames a peer may send within [`BAD_FRAME_WINDOW`] before its connection
/// is closed: each one is answered with an `error`, and a peer flooding them would otherwise get the
/// other side to write (and log) one answer per frame forever.
pub const MAX_BAD_FRAMES: u32 = 100;
/// See [`MAX_BAD_FRAMES`].
pub const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);

/// Counts a peer's bad frames (see [`MAX_BAD_FRAMES`]).
#[derive(Debug)]
pub struct BadFrames {
    since: std::time::Instant,
    count: u32,
}

impl Default for BadFrames {
    fn default() -> Self {
        BadFrames {
            since: std::time::Instant::now(),
            count: 0,
        }
    }
}

impl BadFrames {
    /// Counts one; true when the peer is over the limit and its connection should be closed.
    pub fn record(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now.duration_since(self.since) > BAD_FRAME_WINDOW {
            self.since = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > MAX_BAD_FRAMES
    }
}

/// What a reader gets: a data frame, or a sign of life (ping/pong) that only refreshes liveness.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(Frame),
    Alive,
}

/// An open WebSocket.
pub struct Connection {
    inner: Stream,
}

impl Connection {
    /// Opens a plain WebSocket to `url` (an `https://` URL is refused: it needs a [`Trust`]).
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Connection, ProtocolError> {
        Connection::connect_with(url, headers, &Trust::Unset).await
    }

    /// Opens a WebSocket to `url` (`http(s)://host:port/path`, mapped to `ws(s)`), asking for the `cla.v1`
    /// subprotocol and sending `headers` with the upgrade (credentials go there, never in the URL). On
    /// `https://`, the hub's certificate must satisfy `trust`.
    pub async fn connect_with(
        url: &str,
        headers: &[(&str, &str)],
        trust: &Trust,
    ) -> Result<Connection, ProtocolError> {
        Connection::connect_tls(url, headers, trust, None).await
    }

    /// [`Connection::connect_with`], presenting `identity` if the hub asks for a client certificate.
    pub async fn connect_tls(
        url: &str,
        headers: &[(&str, &str)],
        trust: &Trust,
        identity: Option<&ClientIdentity>,
    ) -> Result<Connection, ProtocolError> {
        let ws_url = to_ws_url(url);
        // Errors name the hub (scheme, host and port), not the API path behind it.
        let base = base_of(url);
        let connect_err = |reason: String| ProtocolError::Connect {
            url: base.clone(),
            reason: explain(&base, &reason),
        };
        let mut request = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| connect_err(e.to_string()))?;
        let tls = match ws_url.starts_with("wss://") {
            true => Some(
                trust
                    .client_config_for(url, identity)
                    .map_err(|e| connect_err(e.to_string()))?,
            ),
            false => None,
        };
        let h = request.headers_mut();
        h.insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        for (name, value) in headers {
            let value =
                HeaderValue::from_str(value).map_err(|_| connect_err(format!("bad header {name}")))?;
            let name: tokio_tungstenite::tungstenite::http::HeaderName = name
                .parse()
                .map_err(|_| connect_err(format!("bad header name {name}")))?;
            h.insert(name, value);
        }
        let uri = request.uri().clone();
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(config) => {
                    let name = cla_common::tls::server_name(&host).map_err(|e| connect_err(e.to_string()))?;
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| connect_err(cla_common::tls::handshake_failure(&e)))?;
                    Box::new(tls)
                }
            };
            tokio_tungstenite::client_async_with_config(request, io, Some(ws_config(ReadSize::Bulk)))
                .await
                .map_err(|e| match e {
                    WsError::Http(resp) => ProtocolError::Refused {
                        url: base.clone(),
                        status: resp.status().as_u16(),
                        body: resp
                            .body()
                            .as_ref()
                            .map(|b| api_error_text(b))
                            .unwrap_or_default(),
                    },
                    other => connect_err(other.to_string()),
                })
        };
        let (inner, _response) = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| ProtocolError::Timeout("connect"))??;
        Ok(Connection { inner })
    }

    /// Wraps the byte stream of an HTTP connection the server has just upgraded (it already answered 101).
    pub async fn from_upgraded(io: impl Io, read: ReadSize) -> Connection {
        let io: Box<dyn Io> = Box::new(io);
        Connection {
            inner: WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config(read))).await,
        }
    }

    /// Splits into a writer and a reader.
    pub fn split(self) -> (ConnectionWriter, ConnectionReader) {
        let (sink, stream) = self.inner.split();
        (ConnectionWriter { sink }, ConnectionReader { stream })
    }
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (server side of the upgrade).
pub fn accept_key(client_key: &[u8]) -> String {
    derive_accept_key(client_key)
}

/// The reading half.
pub struct ConnectionReader {
    stream: SplitStream<Stream>,
}

impl ConnectionReader {
    /// The next frame; `Ok(None)` when the peer closed the connection cleanly.
    /// Pings are answered by the WebSocket layer itself and, like pongs, reported as [`Incoming::Alive`].
    pub async fn read(&mut self) -> Result<Option<Incoming>, ProtocolError> {
        loop {
            let msg = match self.stream.next().await {
                None => return Ok(None),
                Some(Ok(msg)) => msg,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(None),
                Some(Err(e)) => return Err(ProtocolError::Transport(e.to_string())),
            };
            return match msg {
                Message::Text(t) => Ok(Some(Incoming::Frame(Frame::Text(t.as_str().to_owned())))),
                Message::Binary(b) => Ok(Some(Incoming::Frame(Frame::Binary(Chunk::from_frame(b)?)))),
                Message::Ping(_) | Message::Pong(_) => Ok(Some(Incoming::Alive)),
                Message::Close(_) => Ok(None),
                Message::Frame(_) => continue,
            };
        }
    }
}

/// The writing half.
pub struct ConnectionWriter {
    sink: SplitSink<Stream, Message>,
}

impl ConnectionWriter {
    /// Sends one JSON message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtocolError> {
        self.send_text(encode_text(msg)).await
    }

    /// Sends an already encoded JSON message.
    pub async fn send_text(&mut self, text: String) -> Result<(), ProtocolError> {
        self.sink.send(Message::text(text)).await.map_err(transport)
    }

    /// Sends bytes on a stream.
    pub async fn send_binary(&mut self, stream: u64, data: &[u8]) -> Result<(), ProtocolError> {
        self.sink
            .send(Message::Binary(encode_binary(stream, data)))
            .await
            .map_err(transport)
    }

    /// Sends a chunk on `stream` (without copying its payload when it can; see [`Chunk::into_frame`]).
    pub async fn send_chunk(&mut self, chunk: Chunk, stream: u64) -> Result<(), ProtocolError> {
        self.sink
            .send(Message::Binary(chunk.into_frame(stream)))
            .await
            .map_err(transport)
    }

    /// Sends a ping (liveness probe).
    pub async fn ping(&mut self) -> Result<(), ProtocolError> {
        self.sink
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(transport)
    }

    /// Closes the connection politely; errors are ignored (the peer may be gone already).
    pub async fn close(&mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
        let _ = self.sink.close().await;
    }
}

fn transport(e: WsError) -> ProtocolError {
    ProtocolError::Transport(e.to_string())
}

/// `http://h/p` → `ws://h/p`, `https://` → `wss://`; other schemes are left alone.
pub fn to_ws_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_owned()
    }
}

/// `scheme://host:port` of a URL, without the path.
pub fn base_of(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url[..after_scheme + i].to_owned(),
        None => url.to_owned(),
    }
}

/// A connection failure's raw `reason` as something a person can act on: the usual mistakes (the wrong
/// scheme for the hub, nothing listening, a host name that does not resolve) get what to type; the
/// rest is kept as it is.
pub fn explain(base: &str, reason: &str) -> String {
    let https = base.starts_with("https://") || base.starts_with("wss://");
    let flip = |from: &str, to: &str| base.replacen(from, to, 1);
    let r = reason.to_ascii_lowercase();
    if https
        && (r.contains("invalidcontenttype")
            || r.contains("corrupt message")
            || r.contains("wrong version number"))
    {
        return format!(
            "the hub does not speak TLS there (plain HTTP): use {} instead",
            flip("https://", "http://")
        );
    }
    if !https
        && (r.contains("invalid http version")
            || r.contains("httparse")
            || r.contains("invalid status")
            || r.contains("connection reset"))
    {
        return format!(
            "no plain-HTTP answer there ({reason}); if the hub serves TLS (`serve --tls`), use {}",
            flip("http://", "https://")
        );
    }
    if r.contains("connection refused") {
        return "nothing is listening there: is the hub running (`cla-hub serve`), and are the host and port right?".into();
    }
    if r.contains("failed to lookup address")
        || r.contains("name or service not known")
        || r.contains("no such host")
    {
        return "the host name does not resolve: check the URL's host".into();
    }
    reason.to_owned()
}

/// The human text of an [`super::api::ApiError`] body, or the body itself.
fn api_error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<super::api::ApiError>(body) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        assert_eq!(to_ws_url("http://127.0.0.1:80/ws/v1"), "ws://127.0.0.1:80/ws/v1");
        assert_eq!(to_ws_url("https://hub/ws/v1"), "wss://hub/ws/v1");
    }
}
