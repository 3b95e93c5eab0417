//! Test harness: start hubs and workers as real processes, run CLI commands, wait for conditions.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use cla_tests::HUB;
pub use cla_tests::WORKER;

/// Polls `check` every 25 ms until it is true, panicking with `what` after `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {secs}s waiting for {what}");
}

/// A child process whose stderr is collected line by line; killed on drop.
pub struct Proc {
    pub child: Child,
    /// Its stderr lines, each with when the test read it.
    pub log: Arc<Mutex<Vec<String>>>,
    pub stamps: Arc<Mutex<Vec<Instant>>>,
    /// The thread reading stderr: done once it has read the last line.
    reader: std::thread::JoinHandle<()>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (sink, times) = (log.clone(), stamps.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push(line);
                times.lock().unwrap().push(Instant::now());
            }
        });
        Proc {
            child,
            log,
            stamps,
            reader,
        }
    }

    /// When each log line containing `needle` was read, in order.
    pub fn stamps_of(&self, needle: &str) -> Vec<Instant> {
        let log = self.log.lock().unwrap();
        let stamps = self.stamps.lock().unwrap();
        log.iter()
            .zip(stamps.iter())
            .filter(|(l, _)| l.contains(needle))
            .map(|(_, t)| *t)
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_line(&self, needle: &str, secs: u64) -> String {
        let mut found = None;
        wait_until(
            &format!("log line `{needle}` (log so far:\n{})", self.log_text()),
            secs,
            || {
                found = self
                    .log
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(needle))
                    .cloned();
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut status = None;
        wait_until("process exit", secs, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        // What the process wrote last may still be in the pipe: give the reader a moment to reach the
        // end, so `log_text` has it (bounded: a child of the process may hold the pipe open).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        status.unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `cla-hub serve` with its data dir.
pub struct Hub {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub addr: String,
    pub url: String,
}

impl Hub {
    /// Starts a hub on a free loopback port with a 1 s heartbeat.
    pub fn start(dir: &Path) -> Hub {
        Hub::start_at(dir, "127.0.0.1:0")
    }

    pub fn start_at(dir: &Path, listen: &str) -> Hub {
        Hub::start_with(dir, listen, &[])
    }

    /// A hub with extra `serve` flags (`--lost-after 3`).
    pub fn start_with(dir: &Path, listen: &str, extra: &[&str]) -> Hub {
        let data_dir = dir.join("hub");
        let mut cmd = Command::new(HUB);
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .args(["serve", "--listen", listen, "--heartbeat", "1"])
            .args(extra);
        let proc = Proc::spawn(cmd);
        let line = proc.wait_for_line("listening on ", 30);
        let addr = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        let tls = extra.iter().any(|a| ["--tls", "--mtls", "--cert"].contains(a));
        let url = format!("{}://{addr}", if tls { "https" } else { "http" });
        Hub {
            proc,
            data_dir,
            addr,
            url,
        }
    }

    /// A `cla-hub` admin command against this hub.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(HUB);
        c.arg("--data-dir").arg(&self.data_dir);
        c
    }

    /// Runs an admin command and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs an admin command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cla-hub {args:?} failed: {}\n{}",
            out.status,
            stderr(&out)
        );
        stdout(&out)
    }

    /// Queues `exec --worker WORKER --detach [FLAGS..] -- CMD` and returns the job id.
    pub fn detach(&self, worker: &str, flags: &[&str], cmd: &str) -> String {
        let mut args = vec!["exec", "--worker", worker, "--detach"];
        args.extend_from_slice(flags);
        args.extend(["--", cmd]);
        self.ok(&args).trim().to_owned()
    }

    /// Waits until job `id` is in `state`.
    pub fn wait_job_state(&self, id: &str, state: &str, secs: u64) {
        wait_until(&format!("job {id} to be {state}"), secs, || {
            job_json(self, id, false)["state"] == state
        });
    }

    /// The admin token the hub wrote into its `hub.json`.
    pub fn admin_token(&self) -> String {
        let file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.data_dir.join("hub.json")).unwrap()).unwrap();
        file["admin_token"].as_str().unwrap().to_owned()
    }

    pub fn passkey(&self, project: &str) -> String {
        self.ok(&["passkey", "create", "--project", project])
            .trim()
            .to_owned()
    }

    pub fn workers_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["workers", "--json"])).unwrap()
    }

    /// The state of worker `id` (`idle`, `offline`, ...) or `None` if not registered.
    pub fn worker_state(&self, id: &str) -> Option<String> {
        self.workers_json()
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .map(|w| w["state"].as_str().unwrap().to_owned())
    }

    pub fn wait_worker_state(&self, id: &str, state: &str, secs: u64) {
        wait_until(&format!("worker {id} to be {state}"), secs, || {
            self.worker_state(id).as_deref() == Some(state)
        });
    }
}

/// A worker config dir with a registration saved by the real `cla-worker register --save`.
pub struct WorkerSetup {
    pub config: PathBuf,
    pub id: String,
    pub token: String,
}

/// Registers worker `id` with `tags` and saves it to `dir/<id>.yml`.
pub fn register(hub: &Hub, dir: &Path, id: &str, tags: &str) -> WorkerSetup {
    let key = hub.passkey("proj");
    let config = dir.join(format!("{id}.yml"));
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&config)
        .args([
            "register",
            "--url",
            &hub.url,
            "--passkey",
            &key,
            "--id",
            id,
            "--tags",
            tags,
            "--save",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "register failed: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    // Each test's workers spool in its temp dir (not in the shared default under $HOME).
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("spool_dir: {}\n", dir.join("spool").display()));
    std::fs::write(&config, text).unwrap();
    WorkerSetup {
        config,
        id: id.to_owned(),
        token: v["token"].as_str().unwrap().to_owned(),
    }
}

/// Starts `cla-worker run` with a saved config, plus extra args.
pub fn run_worker(setup: &WorkerSetup, extra: &[&str]) -> Proc {
    run_worker_env(setup, extra, &[])
}

/// `cla-worker run` with `extra` flags and `env` variables set (test hooks).
pub fn run_worker_env(setup: &WorkerSetup, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(WORKER);
    cmd.arg("-c").arg(&setup.config).arg("run").args(extra);
    cmd.envs(env.iter().copied());
    Proc::spawn(cmd)
}

/// `cla-worker run` from flags alone, the token in `CLA_WORKER_TOKEN` (the recommended way), spooling
/// under `dir/spool`, with `env` added; returned unspawned, to adjust before [`Proc::spawn`].
pub fn worker_from_flags(hub: &Hub, dir: &Path, id: &str, token: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(WORKER);
    cmd.args(["run", "--url", &hub.url, "--id", id, "--spool-dir"])
        .arg(dir.join("spool"))
        .env("CLA_WORKER_TOKEN", token)
        .envs(env.iter().copied());
    cmd
}

/// A hub with one connected, idle worker tagged `tags`.
pub fn hub_with_worker(dir: &Path, id: &str, tags: &str) -> (Hub, WorkerSetup, Proc) {
    let hub = Hub::start(dir);
    let setup = register(&hub, dir, id, tags);
    let worker = run_worker(&setup, &[]);
    hub.wait_worker_state(id, "idle", 20);
    (hub, setup, worker)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// True while a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A TCP proxy on loopback that a test can cut (every open connection is shut down and new ones are
/// refused) and restore: a network outage between a worker and its hub.
pub struct Proxy {
    pub url: String,
    state: Arc<ProxyState>,
}

struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: Mutex<Vec<std::net::TcpStream>>,
    connections: std::sync::atomic::AtomicUsize,
}

impl Proxy {
    /// Forwards `127.0.0.1:<free port>` to `target` (`host:port`).
    pub fn start(target: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(ProxyState {
            cut: false.into(),
            stop: false.into(),
            open: Mutex::new(Vec::new()),
            connections: 0.into(),
        });
        let (st, target) = (state.clone(), target.to_owned());
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if st.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                client.set_nonblocking(false).unwrap();
                let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                {
                    let mut open = st.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(upstream.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { url, state }
    }

    /// The outage starts: open connections are shut down, new ones refused.
    pub fn cut(&self) {
        self.state.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.state.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The network is back.
    pub fn restore(&self) {
        self.state.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The JSON of `job show ID` (after `--wait` if `wait`).
pub fn job_json(hub: &Hub, id: &str, wait: bool) -> serde_json::Value {
    let mut args = vec!["job", "show", id, "--json"];
    if wait {
        args.push("--wait");
    }
    let out = hub.run(&args);
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("job show {id}: {e}: {}", stderr(&out)))
}

/// A raw protocol connection as worker `id` (with `token`) that has sent its `hello`: for tests that
/// play a misbehaving worker.
pub async fn raw_worker(
    hub: &Hub,
    id: &str,
    token: &str,
) -> (cla_protocol::ConnectionWriter, cla_protocol::ConnectionReader) {
    raw_worker_with(hub, id, token, |_| {}).await
}

/// [`raw_worker`] with its `hello` changed by `edit` first.
pub async fn raw_worker_with(
    hub: &Hub,
    id: &str,
    token: &str,
    edit: impl FnOnce(&mut cla_protocol::Hello),
) -> (cla_protocol::ConnectionWriter, cla_protocol::ConnectionReader) {
    use cla_protocol::{Connection, Hello, PROTOCOL_VERSION, WORKER_ID_HEADER, WorkerMessage};
    let auth = format!("Bearer {token}");
    let url = format!("{}/ws/v1", hub.url);
    let conn = Connection::connect(&url, &[("authorization", &auth), (WORKER_ID_HEADER, id)])
        .await
        .unwrap();
    let (mut w, r) = conn.split();
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        agent: "test".into(),
        tags: vec!["t".into()],
        envs: vec![],
        capacity: 1,
        host: "h".into(),
        os: "linux".into(),
        arch: "x".into(),
        pid: 1,
        resume: vec![],
        features: vec![],
    };
    edit(&mut hello);
    w.send(&WorkerMessage::Hello(hello)).await.unwrap();
    (w, r)
}
