//! Nothing lost, nothing run twice (docs/architecture.md, "Durability rules"): connections cut mid-job
//! through a proxy the test controls, a hub killed with SIGKILL and restarted, workers killed mid-job.
//! Each job appends a line to a file when it starts, so a second run would show.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::*;

/// A job that says when it runs (one line in `runs`) and prints numbered lines on both streams.
fn script(runs: &Path, lines: u32, pause: &str) -> String {
    format!(
        "echo run >> {}; for i in $(seq 1 {lines}); do echo out $i; echo err $i >&2; sleep {pause}; done",
        runs.display()
    )
}

fn expected(prefix: &str, lines: u32) -> String {
    (1..=lines).map(|i| format!("{prefix} {i}\n")).collect()
}

/// Waits until a job has produced at least `n` bytes of stdout.
fn wait_output(hub: &Hub, id: &str, n: u64) {
    wait_until(&format!("job {id} to print {n} bytes"), 30, || {
        job_json(hub, id, false)["stdout_bytes"].as_u64().unwrap_or(0) >= n
    });
}

/// Waits until worker `id`'s spool holds no job (the hub acknowledged every end).
fn wait_spool_empty(dir: &Path, id: &str) {
    let spool = dir.join("spool").join(id);
    wait_until("the spool to empty", 10, || {
        std::fs::read_dir(&spool).is_ok_and(|d| {
            !d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        })
    });
}

/// A hub, a proxy to it the test can cut, and worker `w1` connected through the proxy.
fn proxied_worker(dir: &Path) -> (Hub, Proxy, WorkerSetup, Proc) {
    let hub = Hub::start(dir);
    let proxy = Proxy::start(&hub.addr);
    let setup = register(&hub, dir, "w1", "t");
    let worker = run_worker(&setup, &["--url", &proxy.url]);
    hub.wait_worker_state("w1", "idle", 20);
    (hub, proxy, setup, worker)
}

/// A `cla-hub exec` client whose stdout goes to a file; killed on drop.
struct Client {
    child: std::process::Child,
}

impl Client {
    fn exec(hub: &Hub, out: &Path, args: &[&str]) -> Client {
        let child = hub
            .cmd()
            .arg("exec")
            .args(args)
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Client { child }
    }

    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut status = None;
        wait_until("the exec client to exit", secs, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_connection_cut_mid_job_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, proxy, _setup, worker) = proxied_worker(dir.path());

    // A client streams the job straight from the hub while the worker's link is cut and restored.
    let runs = dir.path().join("runs");
    let streamed = dir.path().join("streamed.txt");
    let mut client = Client::exec(
        &hub,
        &streamed,
        &["--worker", "w1", "--", &script(&runs, 60, "0.05")],
    );
    wait_until("the job to start printing", 30, || {
        std::fs::read_to_string(&streamed).is_ok_and(|s| s.lines().count() >= 5)
    });
    proxy.cut();
    hub.wait_worker_state("w1", "offline", 20);
    // The job goes on while its worker is cut off; its output is spooled.
    std::thread::sleep(Duration::from_millis(1500));
    proxy.restore();

    let status = client.wait(90);
    assert!(status.success(), "exec client: {status}");
    assert_eq!(std::fs::read_to_string(&streamed).unwrap(), expected("out", 60));
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let id = jobs[0]["id"].as_str().unwrap();
    let v = job_json(&hub, id, true);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["stdout"], expected("out", 60));
    assert!(
        v["error"].is_null(),
        "the hub got every byte the worker counted: {v}"
    );
    assert_eq!(v["stderr"], expected("err", 60));
    assert_eq!(
        v["stdout_bytes"].as_u64().unwrap() as usize,
        expected("out", 60).len()
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "the job ran once"
    );
    assert!(proxy.connections() >= 2, "the worker reconnected");
    worker.wait_for_line("resent the output", 10);
    // The hub acknowledged the end: the worker's spool is empty.
    wait_spool_empty(dir.path(), "w1");
}

#[test]
fn a_hub_killed_mid_job_and_restarted_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let runs = dir.path().join("runs");
    let id = hub.detach("w1", &[], &script(&runs, 40, "0.05"));
    wait_output(&hub, &id, 20);
    let addr = hub.addr.clone();
    hub.proc.signal(Signal::SIGKILL);
    hub.proc.kill();
    // The job goes on while the hub is down.
    std::thread::sleep(Duration::from_millis(700));
    let hub = Hub::start_at(dir.path(), &addr);
    let v = job_json(&hub, &id, true);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["stdout"], expected("out", 40));
    assert!(
        v["error"].is_null(),
        "the hub got every byte the worker counted: {v}"
    );
    assert_eq!(v["stderr"], expected("err", 40));
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "the job ran once"
    );
    wait_spool_empty(dir.path(), "w1");
}

#[test]
fn queued_jobs_survive_a_hub_restart_and_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "w1", "t");
    let runs = dir.path().join("runs");
    // Detached: it waits in the queue for w1, which is not running yet.
    let id = hub.detach("w1", &[], &format!("echo run >> {}; echo hi", runs.display()));
    // Streamed, by a client that outlives the hub: it re-attaches, and the job runs for it.
    let back_out = dir.path().join("back.txt");
    let mut back = Client::exec(&hub, &back_out, &["--worker", "w1", "--", "echo watched"]);
    // Streamed, by a client that goes with the hub: its job must not run later.
    let gone_out = dir.path().join("gone.txt");
    let mut gone = Client::exec(&hub, &gone_out, &["--worker", "w1", "--", "echo nobody watches"]);
    wait_until("three queued jobs", 20, || {
        serde_json::from_str::<serde_json::Value>(&hub.ok(&["jobs", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            == 3
    });
    let addr = hub.addr.clone();
    hub.proc.signal(Signal::SIGKILL);
    hub.proc.kill();
    let _ = gone.child.kill();
    assert!(!gone.wait(20).success());

    // The grace outlasts the client's reconnect backoff (at most 5 s between tries) with room to spare.
    let hub = Hub::start_with(dir.path(), &addr, &["--client-grace", "30"]);
    let _worker = run_worker(&setup, &[]);
    let v = job_json(&hub, &id, true);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    let status = back.wait(30);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(back_out.with_extension("err")).unwrap_or_default()
    );
    assert_eq!(std::fs::read_to_string(&back_out).unwrap(), "watched\n");
    let find = |cmd: &str| -> serde_json::Value {
        let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j.to_string().contains(cmd))
            .unwrap()
            .clone()
    };
    wait_until("the unwatched job cancelled", 60, || {
        find("nobody watches")["state"] == "cancelled"
    });
    let other = find("nobody watches");
    assert!(
        other["error"]
            .as_str()
            .unwrap()
            .contains("did not come back within 30s"),
        "{other}"
    );
    assert_eq!(find("echo watched")["state"], "succeeded");
}

#[test]
fn a_worker_killed_mid_job_reports_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    // Long grace: the restarted worker, not the timer, must end the job.
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "w1", "t");
    let mut worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "idle", 20);
    let id = hub.detach("w1", &[], "sleep 20");
    hub.wait_job_state(&id, "running", 20);
    worker.signal(Signal::SIGKILL);
    worker.kill();
    // Restarted with the same spool: it finds the job it had taken, without an end.
    let _worker = run_worker(&setup, &[]);
    let v = job_json(&hub, &id, true);
    assert_eq!(v["state"], "lost", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("worker process stopped while the job ran"),
        "{v}"
    );
    wait_spool_empty(dir.path(), "w1");
}

#[test]
fn cancel_after_disconnect_stops_a_job_while_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, proxy, _setup, worker) = proxied_worker(dir.path());
    let id = hub.detach(
        "w1",
        &["--cancel-after-disconnect", "1"],
        "echo started; sleep 30",
    );
    wait_output(&hub, &id, 8);
    proxy.cut();
    worker.wait_for_line("cancelling the job (its on_disconnect policy)", 20);
    proxy.restore();
    let v = job_json(&hub, &id, true);
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(v["stdout"], "started\n");
}

#[test]
fn a_job_cancelled_while_its_worker_is_cut_off_is_cancelled_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, proxy, _setup, _worker) = proxied_worker(dir.path());
    let id = hub.detach("w1", &[], "echo started; sleep 30");
    wait_output(&hub, &id, 8);
    proxy.cut();
    hub.wait_worker_state("w1", "offline", 20);
    let v = job_json(&hub, &id, false);
    assert_eq!(v["state"], "running", "{v}");
    assert!(
        v["waiting"].as_str().unwrap().contains("w1 is disconnected"),
        "{v}"
    );
    hub.ok(&["job", "cancel", &id]);
    proxy.restore();
    let v = job_json(&hub, &id, true);
    assert_eq!(v["state"], "cancelled", "{v}");
}

#[test]
fn workers_are_drained_disabled_shut_down_and_unregistered_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "w1", "t");
    let mut worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "idle", 20);

    // Disable: no jobs, with the reason; kept across a reconnect; enable lets the job run.
    let out = hub.ok(&["worker", "disable", "w1"]);
    assert!(out.contains("disabled"), "{out}");
    assert_eq!(hub.worker_state("w1").as_deref(), Some("disabled"));
    let o = hub.run(&["exec", "--worker", "w1", "--queue-timeout", "1", "--", "echo no"]);
    assert_eq!(o.status.code(), Some(253), "a queue timeout: {}", stderr(&o));
    assert!(stderr(&o).contains("w1 is disabled"), "{}", stderr(&o));
    worker.kill();
    let mut worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "disabled", 20);
    hub.ok(&["worker", "enable", "w1"]);
    hub.wait_worker_state("w1", "idle", 5);
    assert_eq!(hub.ok(&["exec", "--worker", "w1", "--", "echo yes"]), "yes\n");

    // Drain: the running job finishes, nothing new starts, the worker exits 0.
    let id = hub.detach("w1", &[], "sleep 1; echo drained");
    hub.wait_job_state(&id, "running", 20);
    hub.ok(&["worker", "drain", "w1"]);
    assert_eq!(worker.wait_exit(30).code(), Some(0));
    let v = job_json(&hub, &id, true);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["stdout"], "drained\n");

    // Drain and shutdown need the worker connected.
    let o = hub.run(&["worker", "shutdown", "w1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not connected"), "{}", stderr(&o));

    // Shutdown: exit 10.
    let mut worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "idle", 20);
    hub.ok(&["worker", "shutdown", "w1"]);
    assert_eq!(worker.wait_exit(30).code(), Some(10));

    // Unregister: the worker forgets the registration and exits; the hub no longer knows it.
    let mut worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "idle", 20);
    hub.ok(&["worker", "unregister", "w1"]);
    assert_eq!(worker.wait_exit(30).code(), Some(0));
    let config = std::fs::read_to_string(&setup.config).unwrap();
    assert!(!config.contains("w1"), "{config}");
    assert_eq!(hub.worker_state("w1"), None);
    let o = hub.run(&["worker", "disable", "nope"]);
    assert!(stderr(&o).contains("no worker `nope`"), "{}", stderr(&o));
}

#[test]
fn a_reconnect_storm_of_200_workers_is_absorbed_and_spread_out() {
    use cla_common::secret::Secret;
    use cla_worker_core::registration::{RegisterParams, register as api_register};
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(dir.path());
    let key = hub.passkey("storm");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let creds: Vec<(String, String)> = rt.block_on(async {
        let mut creds = Vec::new();
        for i in 0..N {
            let r = api_register(&RegisterParams {
                url: hub.url.clone(),
                passkey: Secret::new(key.clone()),
                id: Some(format!("s{i:03}")),
                tags: vec!["storm".into()],
                envs: vec![],
                token: None,
                trust: Default::default(),
                csr: None,
            })
            .await
            .unwrap();
            creds.push((r.id, r.token));
        }
        creds
    });
    let workers: Vec<Proc> = creds
        .iter()
        .map(|(id, token)| Proc::spawn(worker_from_flags(&hub, dir.path(), id, token, &[])))
        .collect();
    let connected = |hub: &Hub| {
        hub.workers_json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "idle")
            .count()
    };
    wait_until("all workers to connect", 120, || connected(&hub) == N);

    // The hub dies and comes back: every worker reconnects at once.
    let addr = hub.addr.clone();
    hub.proc.signal(Signal::SIGKILL);
    hub.proc.kill();
    let hub = Hub::start_at(dir.path(), &addr);
    wait_until("all workers to reconnect", 120, || connected(&hub) == N);
    let log = hub.proc.log_text();
    assert!(!log.contains("worker rejected"), "{log}");
    let stamps = hub.proc.stamps_of("worker connected");
    assert_eq!(stamps.len(), N, "each worker connected once");
    let span = *stamps.last().unwrap() - stamps[0];
    // The most connections that arrived within any 50 ms.
    let peak = (0..stamps.len())
        .map(|i| {
            stamps[i..]
                .iter()
                .take_while(|t| **t - stamps[i] < Duration::from_millis(50))
                .count()
        })
        .max()
        .unwrap();
    eprintln!("reconnect storm: {N} workers over {span:?}, at most {peak} within 50 ms");
    assert!(span >= Duration::from_millis(150), "not spread out: {span:?}");
    assert!(peak < N / 2, "{peak} of {N} connected within 50 ms");

    // A hub that takes one handshake at a time turns the rest away with `busy`; they all get in.
    let mut hub = hub;
    hub.proc.signal(Signal::SIGKILL);
    hub.proc.kill();
    let hub = Hub::start_with(dir.path(), &addr, &["--max-handshakes", "1"]);
    wait_until("all workers to reconnect past the busy hub", 120, || {
        connected(&hub) == N
    });
    let waited = workers
        .iter()
        .filter(|w| w.log_text().contains("the hub asked us to wait"))
        .count();
    eprintln!("with --max-handshakes 1: {waited} of {N} workers were asked to come back later");
}

#[test]
fn an_eval_that_ends_while_its_worker_is_cut_off_delivers_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, proxy, _setup, _worker) = proxied_worker(dir.path());
    let out = dir.path().join("eval.json");
    let code = r#"console.log("before"); cla.run("sleep 2"); console.log("after"); stash.n = 42; 6 * 7"#;
    let mut client = hub
        .cmd()
        .args(["--json", "eval", "--worker", "w1", code])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the eval to run", 30, || {
        serde_json::from_str::<serde_json::Value>(&hub.ok(&["jobs", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "running")
    });
    proxy.cut();
    // The eval ends while the worker is cut off; its result waits in the spool.
    std::thread::sleep(Duration::from_millis(2500));
    proxy.restore();
    let mut status = None;
    wait_until("the eval client to exit", 60, || {
        status = client.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["result"], 42, "{v}");
    assert_eq!(v["stash"]["n"], 42, "{v}");
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let job = &jobs.as_array().unwrap()[0];
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["stdout"], "before\nafter\n", "{job}");
}
