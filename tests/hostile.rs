//! Hostile input against the real binaries: clients that never authenticate, peers that send what no
//! honest one would. Each test names the defect it guards against.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A `cla-flood` child holding connections to the hub; they close when it is dropped.
struct Flood(Child);

impl Flood {
    /// Starts a child opening `count` connections to `addr`; returns once they are all opened, with
    /// how many connected.
    fn start(addr: &str, count: usize) -> (Flood, usize) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cla-flood"))
            .args([addr, &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("cla-flood to open its connections within 180 s");
        let held = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cla-flood said {line:?}"));
        (Flood(child), held)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cla-hub ARGS` and waits at most `secs`; `None` if it had not finished by then (it is killed).
fn run_within(hub: &Hub, args: &[&str], secs: f64) -> Option<(std::process::Output, Duration)> {
    let start = Instant::now();
    let mut child = hub
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while start.elapsed() < Duration::from_secs_f64(secs) {
        if child.try_wait().unwrap().is_some() {
            let took = start.elapsed();
            return Some((child.wait_with_output().unwrap(), took));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Defect: there was no timeout for a request's headers and no cap on unauthenticated connections, so
/// 20,000 half-sent requests from one client exhausted the hub's file descriptors: admin commands hung,
/// no worker could reconnect, and the hub logged `accept failed` every 50 ms.
#[test]
fn twenty_thousand_half_open_connections_cannot_lock_the_hub_up() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, mut worker) = hub_with_worker(dir.path(), "w1", "linux");
    hub.wait_worker_state("w1", "idle", 20);

    // The connections live in child processes, each within this process's open file limit.
    const TOTAL: usize = 20_000;
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let per_child = (soft as usize).saturating_sub(200).clamp(100, 10_000);
    let mut floods = Vec::new();
    let mut connected = 0;
    let mut left = TOTAL;
    let flood_start = Instant::now();
    while left > 0 {
        let n = left.min(per_child);
        let (flood, held) = Flood::start(&hub.addr, n);
        floods.push(flood);
        connected += held;
        left -= n;
    }
    let flood_time = flood_start.elapsed();
    assert_eq!(
        connected, TOTAL,
        "every flood connection was accepted by the kernel"
    );

    // The hub holds a bounded share of them, not one descriptor each.
    let fds = open_fds(hub.proc.pid());
    assert!(
        fds < 6_000,
        "the hub holds {fds} file descriptors under the flood"
    );

    // An admin command still answers at once.
    let (out, took) = run_within(&hub, &["workers", "--json"], 1.0)
        .expect("`cla-hub workers` to answer within 1 s during the flood");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"w1\""), "{}", stdout(&out));
    eprintln!("cla-hub workers answered in {took:?} with 20,000 half-open connections held");

    // A worker can still (re)connect.
    worker.kill();
    hub.wait_worker_state("w1", "offline", 20);
    let _worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "idle", 20);

    // The flood costs a few log lines, not one per connection or per failed accept.
    let log = hub.proc.log_text();
    let accept_failed = log.matches("accept failed").count();
    let evicted = log.matches("closed an unauthenticated connection").count();
    let allowed = 2 + flood_time.as_secs() as usize / 10;
    assert!(accept_failed <= allowed, "{accept_failed} `accept failed` lines");
    assert!(
        evicted <= allowed,
        "{evicted} eviction lines in {flood_time:?} of flood"
    );
    drop(floods);
}

/// Defect: a half-sent request kept its connection open forever.
#[test]
fn a_request_head_not_sent_in_time_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--header-timeout", "1"]);
    let mut s = TcpStream::connect(&hub.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let n = s
        .read_to_end(&mut buf)
        .expect("the hub closes the connection, not our read timeout");
    assert!(start.elapsed() < Duration::from_secs(9));
    // hyper answers a header timeout by closing; whatever it sent, the connection is over.
    let _ = n;

    // A kept-alive connection idle between requests is closed the same way.
    let mut s = TcpStream::connect(&hub.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut first = [0u8; 256];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let start = Instant::now();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the idle kept-alive connection is closed");
    assert!(start.elapsed() < Duration::from_secs(9));
}

/// Defect: connections the hub could not accept were retried and logged every 50 ms; now the caps are
/// stated in the startup log, with the open file limit.
#[test]
fn the_hub_states_its_connection_limits_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--max-pending", "40"]);
    let log = hub.proc.log_text();
    assert!(log.contains("open file limit: "), "{log}");
    assert!(
        log.contains("unauthenticated connections: at most 40 in all, 10 per source address"),
        "{log}"
    );
}

/// One HTTP/1.1 request on a fresh connection; the status and the body.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A body the hub refuses part-way may meet a closed socket: the answer is still there to read.
    let _ = s.write_all(body);
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json_of(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Defect: a tag, env or host over 65,535 characters was stored, and from then on `cla-hub workers`
/// panicked; a host with a newline forged a row; ids `.` and `..` were accepted.
#[test]
fn worker_strings_past_the_bounds_are_refused_at_every_door() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let key = hub.passkey("proj");
    let register = |body: serde_json::Value| {
        let body = serde_json::to_vec(&body).unwrap();
        http(
            &hub.addr,
            "POST",
            "/api/v1/register",
            &[("Content-Type", "application/json")],
            &body,
        )
    };
    let huge = "t".repeat(70_000);
    for (body, says) in [
        (
            serde_json::json!({"passkey": key, "id": "w-huge", "tags": [huge]}),
            "must be 1 to 64 characters",
        ),
        (
            serde_json::json!({"passkey": key, "id": "w-host", "host": "h\nprod-db  IDLE  0/1"}),
            "U+000A",
        ),
        (
            serde_json::json!({"passkey": key, "id": ".."}),
            "names a directory",
        ),
        (
            serde_json::json!({"passkey": key, "id": "."}),
            "names a directory",
        ),
    ] {
        let (status, text) = register(body);
        assert_eq!(status, 400, "{text}");
        let err = json_of(&text)["error"].as_str().unwrap().to_owned();
        assert!(err.contains(says), "{err}");
        assert!(err.len() < 300, "the error quotes a cut value: {err}");
    }

    // A registered worker's hello and updates are held to the same bounds.
    let setup = register_worker(&hub, dir.path(), "w1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use cla_protocol::{HubMessage, RejectCode, WorkerMessage};
        let (mut w, mut r) = raw_worker_with(&hub, "w1", &setup.token, |h| h.host = "x".repeat(70_000)).await;
        match next_message(&mut r).await {
            HubMessage::Reject(rej) => {
                assert_eq!(rej.code, RejectCode::Invalid);
                assert!(
                    rej.message.contains("host is 70000 characters long: at most 253"),
                    "{}",
                    rej.message
                );
            }
            other => panic!("expected a reject, got {other:?}"),
        }
        let _ = w.close().await;

        let (mut w, mut r) = raw_worker_with(&hub, "w1", &setup.token, |_| {}).await;
        assert!(matches!(next_message(&mut r).await, HubMessage::Welcome(_)));
        let update = |tags: Vec<String>| WorkerMessage::Update { tags, envs: vec![] };
        w.send(&update(vec!["a\u{1b}[2Jb".into()])).await.unwrap();
        match next_message(&mut r).await {
            HubMessage::Error { code, message } => {
                assert_eq!(code, cla_protocol::ErrorCode::Invalid);
                assert!(message.contains("U+001B"), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
        // Valid updates are rate-limited: the 11th within a minute is refused.
        for i in 0..10 {
            w.send(&update(vec![format!("t{i}")])).await.unwrap();
        }
        let refused = loop {
            match next_message(&mut r).await {
                HubMessage::Error { code, .. } => break code,
                _ => continue,
            }
        };
        assert_eq!(refused, cla_protocol::ErrorCode::RateLimited);
        let _ = w.close().await;
    });

    // The fleet view stands, one row per worker.
    let out = hub.ok(&["workers"]);
    assert_eq!(out.lines().count(), 2, "{out}");
}

/// A worker registered with the real binary and saved to `dir/<id>.yml`.
fn register_worker(hub: &Hub, dir: &std::path::Path, id: &str) -> WorkerSetup {
    register(hub, dir, id, "linux")
}

/// The next message from the hub, within 10 s.
async fn next_message(r: &mut cla_protocol::ConnectionReader) -> cla_protocol::HubMessage {
    use cla_protocol::connection::Incoming;
    let read = async {
        loop {
            match r.read().await.unwrap() {
                Some(Incoming::Frame(cla_protocol::Frame::Text(t))) => {
                    return cla_protocol::decode_text::<cla_protocol::HubMessage>(&t).unwrap();
                }
                Some(_) => continue,
                None => panic!("the hub closed the connection"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a message from the hub within 10 s")
}

/// Defects: unknown fields in a job request were dropped (a misspelt `timeout` gave a job with no
/// timeout); a 413 was plain text; `Authorization: bearer ...` was refused.
#[test]
fn the_admin_api_is_strict_and_answers_every_error_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let auth = format!("Bearer {}", hub.admin_token());
    let json = ("Content-Type", "application/json");
    let (status, text) = http(
        &hub.addr,
        "POST",
        "/api/v1/admin/jobs",
        &[("Authorization", &auth), json],
        br#"{"cmd":"sleep 60","timeout":1}"#,
    );
    assert_eq!(status, 400, "{text}");
    let err = json_of(&text)["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("unknown field `timeout`") && err.contains("timeout_secs"),
        "{err}"
    );

    let (status, text) = http(
        &hub.addr,
        "POST",
        "/api/v1/admin/passkeys",
        &[("Authorization", &auth), json],
        br#"{"project":"p","projekt":"q"}"#,
    );
    assert_eq!(status, 400, "{text}");
    assert!(
        json_of(&text)["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `projekt`"),
        "{text}"
    );

    // Too large: JSON, not plain text.
    let big = vec![b' '; 3 << 20];
    let (status, text) = http(&hub.addr, "POST", "/api/v1/register", &[json], &big);
    assert_eq!(status, 413, "{text}");
    assert_eq!(json_of(&text)["code"], "too_large");

    // Wrong method: JSON too.
    let (status, text) = http(&hub.addr, "DELETE", "/api/v1/register", &[], b"");
    assert_eq!(status, 405, "{text}");
    assert_eq!(json_of(&text)["code"], "method_not_allowed");

    // The scheme is case-insensitive.
    let lower = format!("bearer {}", hub.admin_token());
    let (status, text) = http(
        &hub.addr,
        "GET",
        "/api/v1/admin/workers",
        &[("Authorization", &lower)],
        b"",
    );
    assert_eq!(status, 200, "{text}");
}

/// Defect: every refused registration appended an audit line, even while its source was rate-limited:
/// 5,000 attempts added 520 KB in a second.
#[test]
fn a_rate_limited_registration_flood_costs_a_few_audit_lines() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let body = br#"{"passkey":"clapk_00000000000000000000000000000000000000000000000000000000deadbeef"}"#;
    let mut limited = 0;
    for _ in 0..2000 {
        let (status, _) = http(
            &hub.addr,
            "POST",
            "/api/v1/register",
            &[("Content-Type", "application/json")],
            body,
        );
        limited += usize::from(status == 429);
    }
    assert!(limited > 1900, "{limited} of 2000 were rate-limited");
    let audit = std::fs::read_to_string(hub.data_dir.join("audit.log")).unwrap();
    let lines = audit.lines().count();
    assert!(lines <= 20, "{lines} audit lines for 2000 attempts:\n{audit}");
    let log = hub.proc.log_text();
    let refused = log.matches("registration refused").count();
    assert!(refused <= 5, "{refused} log lines of refused registrations");
}

/// Defects: the spool directory was 0755 and each job's spool file 0644 (job output readable by every
/// local user); `-c /dev/zero` read without a cap.
#[test]
fn private_files_are_private_and_input_files_are_capped() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    hub.ok(&["exec", "--worker", "w1", "--", "echo secret-output"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let spool = dir.path().join("spool").join("w1");
    assert_eq!(mode(&spool), 0o700, "{}", spool.display());
    for entry in std::fs::read_dir(&spool).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    assert_eq!(mode(&hub.data_dir), 0o700);
    for f in ["hub.redb", "hub.json", "audit.log"] {
        let p = hub.data_dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    assert_eq!(mode(&setup.config), 0o600);

    let out = Command::new(WORKER)
        .args(["-c", "/dev/zero", "run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("config file /dev/zero is larger than 1 MiB"),
        "{err}"
    );
    let out = hub.run(&["run", "/dev/zero"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/dev/zero is larger than"),
        "{}",
        stderr(&out)
    );

    // A tag past the bounds is an error on the worker's side too, before it ever reaches the hub.
    let long = "t".repeat(65);
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&setup.config)
        .args(["run", "--tags", &long])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("must be 1 to 64 characters"),
        "{}",
        stderr(&out)
    );
}

/// Defect: during a `fetch` of a directory, a file swapped for a FIFO after planning blocked the
/// worker's transfer thread in `open()` for ever: the fetch hung, and SIGTERM logged `shutdown
/// completed` but the process never exited, holding its spool lock.
#[test]
fn a_fifo_swapped_into_a_fetch_fails_it_and_the_worker_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "w1", "linux");
    // A slow sender (debug hook: 100 ms per chunk), so the swap lands after planning.
    let mut worker = run_worker_env(&setup, &[], &[("CLA_TEST_CHUNK_DELAY_MS", "100")]);
    hub.wait_worker_state("w1", "idle", 20);
    let src = dir.path().join("tree");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), vec![5u8; 6 << 20]).unwrap();
    std::fs::write(src.join("z.txt"), b"planned").unwrap();
    let dest = dir.path().join("fetched");
    let mut fetch = hub
        .cmd()
        .args([
            "fetch",
            "--worker",
            "w1",
            src.to_str().unwrap(),
            dest.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(src.join("z.txt")).unwrap();
    nix::unistd::mkfifo(&src.join("z.txt"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = fetch.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the fetch hangs on the FIFO"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    fetch.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    assert!(!dest.exists(), "nothing half-written");

    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let status = worker.wait_exit(20);
    assert!(status.success(), "{status:?}");
}

/// Defect: `{{ js }}` templates had no time or memory limit, unlike `eval` on a worker: a backtracking
/// regex spun for ever and `new Array(1e8).join('x')` grew the process to 6.3 GB.
#[test]
fn templates_are_held_to_a_time_and_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    for (name, expr, says) in [
        (
            "spin.yml",
            "/(a+)+$/.test('a'.repeat(32) + 'b')",
            "took longer than 5 s (the template time limit)",
        ),
        (
            "grow.yml",
            "new Array(1e8).join('xy').length",
            "ran out of memory (the template limit is 512 MiB)",
        ),
    ] {
        let book = dir.path().join(name);
        std::fs::write(
            &book,
            format!("do:\n  - echo: start\n  - echo: \"{{{{ {expr} }}}}\"\n"),
        )
        .unwrap();
        let start = Instant::now();
        let (out, took) = run_within(&hub, &["run", book.to_str().unwrap()], 30.0)
            .unwrap_or_else(|| panic!("{name}: the rulebook still runs after 30 s"));
        let err = stderr(&out);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(
            err.contains(&format!("{name}:3")),
            "{name}: the error names the file and line: {err}"
        );
        eprintln!("{name}: stopped after {took:?} ({:?} in all)", start.elapsed());
    }
}
