//! `cla-worker doctor`: checks, one after the other, everything a worker needs to reach its hub — config
//! file permissions, credentials, DNS, TCP, TLS, HTTP, clock skew, the WebSocket upgrade and authentication
//! with the stored token — and says for each what is wrong and how to fix it.

use std::time::{Duration, Instant, SystemTime};

use cla_config::{LoadedConfig, Overrides, resolve};
use cla_protocol::connection::Incoming;
use cla_protocol::http::HttpClient;
use cla_protocol::{
    Connection, Frame, HubMessage, ProtocolError, RejectCode, WORKER_ID_HEADER, WS_PATH, WorkerMessage,
    decode_text,
};

/// Largest clock difference that passes.
const MAX_SKEW: Duration = Duration::from_secs(5);

/// The result of one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ok,
    Fail,
    /// Not applicable (e.g. TLS on a plain http URL), or not run because an earlier check failed.
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was found, or what is wrong and how to fix it.
    pub detail: String,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Ok,
        detail: detail.into(),
    }
}
fn fail(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Fail,
        detail: detail.into(),
    }
}
fn skip(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Skipped,
        detail: detail.into(),
    }
}

/// Runs every check; later checks are skipped when one they depend on failed.
pub async fn run(loaded: &LoadedConfig, cli: &Overrides) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match &loaded.path {
        None => skip("config", "no config file found (./cla-worker.yml, ~/cla-worker.yml, /etc/cla-worker.yml); using flags only"),
        Some(p) if loaded.warnings.iter().any(|w| w.contains("chmod 600")) => {
            fail("config", format!("{} holds a token but others can read it: run `chmod 600 {}`", p.display(), p.display()))
        }
        Some(p) => ok("config", format!("{} parsed{}", p.display(), if loaded.warnings.is_empty() { String::new() } else { format!(", {} warning(s): {}", loaded.warnings.len(), loaded.warnings.join("; ")) })),
    });
    let settings = match resolve(loaded, cli) {
        Ok(s) => {
            checks.push(ok(
                "credentials",
                format!("worker {} with a token, hub {}", s.id, s.url),
            ));
            s
        }
        Err(e) => {
            checks.push(fail("credentials", e.to_string()));
            return checks;
        }
    };
    let uri: hyper::Uri = match settings.url.parse() {
        Ok(u) => u,
        Err(e) => {
            checks.push(fail(
                "url",
                format!(
                    "`{}` is not a URL ({e}): fix `url` in the config or --url",
                    settings.url
                ),
            ));
            return checks;
        }
    };
    let host = uri
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

    let addrs = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect::<Vec<_>>(),
        Ok(Err(e)) => {
            checks.push(fail(
                "dns",
                format!("cannot resolve {host}: {e}; check the url and /etc/resolv.conf"),
            ));
            return checks;
        }
        Err(_) => {
            checks.push(fail(
                "dns",
                format!("resolving {host} took over 5 s; check the DNS servers in /etc/resolv.conf"),
            ));
            return checks;
        }
    };
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    checks.push(ok("dns", format!("{host} → {}", list.join(", "))));

    let t = Instant::now();
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&addrs[..])).await {
        Ok(Ok(_)) => checks.push(ok(
            "tcp",
            format!("connected to {host}:{port} in {:.1} ms", ms(t)),
        )),
        Ok(Err(e)) => {
            checks.push(fail("tcp", format!("cannot connect to {host}:{port}: {e}; is `cla-hub serve` running there, and does a firewall allow the port?")));
            return checks;
        }
        Err(_) => {
            checks.push(fail(
                "tcp",
                format!("no answer from {host}:{port} within 5 s; a firewall may drop the packets"),
            ));
            return checks;
        }
    }
    if https {
        match tls_check(&settings, &host, &addrs[..]).await {
            Ok(detail) => checks.push(ok("tls", detail)),
            Err(detail) => {
                checks.push(fail("tls", detail));
                return checks;
            }
        }
    } else {
        checks.push(skip("tls", "plain http: no TLS to check"));
    }

    let identity = settings.client_identity().ok().flatten();
    let client = match HttpClient::with_tls(&settings.url, &settings.trust, identity.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            checks.push(fail("http", e.to_string()));
            return checks;
        }
    };
    let t = Instant::now();
    match client.probe("/healthz").await {
        Ok((200, date)) => {
            checks.push(ok("http", format!("/healthz answered in {:.1} ms", ms(t))));
            checks.push(clock(date.as_deref()));
        }
        Ok((status, _)) => {
            checks.push(fail(
                "http",
                format!("/healthz answered HTTP {status}: is this URL a cla-hub (not a proxy's page)?"),
            ));
            return checks;
        }
        Err(e) => {
            checks.push(fail("http", e.to_string()));
            return checks;
        }
    }
    checks.push(handshake(&settings).await);
    checks
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Compares the hub's `Date` header with our clock.
fn clock(date: Option<&str>) -> Check {
    let Some(hub) = date.and_then(httpdate_parse) else {
        return skip("clock", "the hub sent no Date header");
    };
    let now = SystemTime::now();
    let skew = now.duration_since(hub).unwrap_or_else(|e| e.duration());
    // The header has 1 s resolution.
    if skew <= MAX_SKEW + Duration::from_secs(1) {
        ok(
            "clock",
            format!("worker and hub clocks agree (within {} s)", skew.as_secs()),
        )
    } else {
        fail(
            "clock",
            format!(
                "worker and hub clocks differ by {} s: run NTP on both (chrony, systemd-timesyncd)",
                skew.as_secs()
            ),
        )
    }
}

/// Parses an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn httpdate_parse(s: &str) -> Option<SystemTime> {
    // "Sun, 06 Nov 1994 08:49:37 GMT" → "1994-11-06T08:49:37Z" for humantime.
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x == month)? + 1;
    humantime::parse_rfc3339(&format!("{year}-{m:02}-{day:0>2}T{time}Z")).ok()
}

/// Opens the worker WebSocket with the stored credentials and says hello.
/// A TLS handshake with the hub, judged by the worker's trust settings.
async fn tls_check(
    s: &cla_config::WorkerSettings,
    host: &str,
    addrs: &[std::net::SocketAddr],
) -> Result<String, String> {
    let identity = s.client_identity().map_err(|e| e.to_string())?;
    let config = s
        .trust
        .client_config_for(&s.url, identity.as_ref())
        .map_err(|e| e.to_string())?;
    let name = cla_common::tls::server_name(host).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addrs)
            .await
            .map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| cla_common::tls::handshake_failure(&e))
    };
    let tls = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no TLS handshake within 10 s".to_owned())??;
    let (_, conn) = tls.get_ref();
    let version = conn.protocol_version().and_then(|v| v.as_str()).unwrap_or("TLS");
    let version = version.replace("TLSv1_", "TLS 1.");
    let how = match &s.trust {
        cla_common::tls::Trust::Pin(p) => format!("certificate {p} matches the pin"),
        cla_common::tls::Trust::Ca(path) => format!("certificate issued by a CA in {}", path.display()),
        _ => "certificate accepted".to_owned(),
    };
    Ok(format!("{version} in {:.1} ms; {how}", ms(t)))
}

async fn handshake(s: &cla_config::WorkerSettings) -> Check {
    let url = format!("{}{WS_PATH}", s.url);
    let auth = format!("Bearer {}", s.token.expose());
    let identity = s.client_identity().ok().flatten();
    let conn = match Connection::connect_tls(
        &url,
        &[("authorization", &auth), (WORKER_ID_HEADER, &s.id)],
        &s.trust,
        identity.as_ref(),
    )
    .await
    {
        Ok(c) => c,
        Err(ProtocolError::Refused { status, body, .. }) => {
            return fail(
                "websocket",
                format!(
                    "upgrade refused with HTTP {status} {body}: a proxy in between must pass WebSocket upgrades"
                ),
            );
        }
        Err(e) => return fail("websocket", e.to_string()),
    };
    let (mut w, mut r) = conn.split();
    let hello = super::session::hello(s, " (doctor)");
    if let Err(e) = w.send(&WorkerMessage::Hello(hello)).await {
        return fail("websocket", e.to_string());
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match r.read().await {
                Ok(Some(Incoming::Frame(Frame::Text(t)))) => return decode_text::<HubMessage>(&t).ok(),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten();
    w.close().await;
    match answer {
        Some(HubMessage::Welcome(_)) => ok(
            "websocket",
            format!("upgrade and hello accepted: authenticated as {}", s.id),
        ),
        Some(HubMessage::Reject(rj)) if rj.code == RejectCode::Duplicate => ok(
            "websocket",
            format!(
                "authenticated as {} (the worker itself is connected right now)",
                s.id
            ),
        ),
        Some(HubMessage::Reject(rj)) if rj.code == RejectCode::Unauthorized => fail(
            "websocket",
            format!(
                "the hub does not accept this token: {}; run `cla-worker register` again",
                rj.message
            ),
        ),
        Some(HubMessage::Reject(rj)) => fail("websocket", format!("refused: {}", rj.message)),
        _ => fail(
            "websocket",
            "no answer to hello within 10 s: is this a cla-hub of the same protocol version?",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let t = httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "1994-11-06T08:49:37Z"
        );
        assert!(httpdate_parse("yesterday").is_none());
        assert_eq!(clock(None).verdict, Verdict::Skipped);
        assert_eq!(
            clock(Some("Sun, 06 Nov 1994 08:49:37 GMT")).verdict,
            Verdict::Fail
        );
    }
}
