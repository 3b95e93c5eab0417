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
