//! `cla-worker start | stop | status`, signals (drain on SIGTERM, reload on SIGHUP), completions and man.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;

use crate::common::*;

/// A worker command for `config`. (Tests never use the default daemon paths: as root those are
/// /run/cla-worker and /var/log/cla-worker.)
fn worker_in(_dir: &Path, config: &Path) -> Command {
    let mut c = Command::new(WORKER);
    c.arg("-c").arg(config);
    c
}

/// Kills the daemon holding a pidfile when the test ends, failed or not.
struct Reap(std::path::PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = cla_worker_core::daemon::running(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Puts `pidfile:` and `logfile:` for worker `id` under `dir` into its config.
fn daemon_files(dir: &Path, config: &Path, id: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!(
        "pidfile: {}/run/{id}.pid\nlogfile: {}/log/{id}.log\n",
        dir.display(),
        dir.display()
    ));
    std::fs::write(config, text).unwrap();
}

#[test]
fn start_status_stop_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let a = register(&hub, dir.path(), "da", "t");
    let b = register(&hub, dir.path(), "db", "t");
    daemon_files(dir.path(), &a.config, "da");
    daemon_files(dir.path(), &b.config, "db");
    let _reap = (
        Reap(dir.path().join("run/da.pid")),
        Reap(dir.path().join("run/db.pid")),
    );

    for w in [&a, &b] {
        let out = worker_in(dir.path(), &w.config).arg("start").output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains(&format!("started worker {}", w.id))
                && text.contains("logfile:")
                && text.contains("pidfile:"),
            "{text}"
        );
    }
    let pidfile = dir.path().join("run/da.pid");
    assert!(pidfile.exists(), "the pidfile named in the config");
    // A SIGHUP the moment `start` returns must not kill it (handlers exist before the pidfile does).
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    hub.wait_worker_state("da", "idle", 20);
    hub.wait_worker_state("db", "idle", 20);

    // status: exit 0, connected, and as JSON.
    wait_until("status to say connected", 20, || {
        let out = worker_in(dir.path(), &a.config)
            .args(["status", "--json"])
            .output()
            .unwrap();
        out.status.success()
            && serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["status"]["state"]
                == "connected"
    });
    let out = worker_in(dir.path(), &a.config).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("is running") && stdout(&out).contains("connected"),
        "{}",
        stdout(&out)
    );

    // A second start of the same id is refused.
    let out = worker_in(dir.path(), &a.config).arg("start").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));

    // stop: exit 0, pidfile gone, then status 3 and stop 3.
    let out = worker_in(dir.path(), &a.config).arg("stop").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!pidfile.exists());
    assert_eq!(
        worker_in(dir.path(), &a.config)
            .arg("status")
            .status()
            .unwrap()
            .code(),
        Some(3)
    );
    assert_eq!(
        worker_in(dir.path(), &a.config)
            .arg("stop")
            .status()
            .unwrap()
            .code(),
        Some(3)
    );
    hub.wait_worker_state("da", "offline", 20);

    // The other one was not touched.
    assert_eq!(
        worker_in(dir.path(), &b.config)
            .arg("status")
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    let log = std::fs::read_to_string(dir.path().join("log/db.log")).unwrap();
    assert!(log.contains("connected to hub"), "{log}");
    assert!(!log.contains(&b.token), "the token is in the log");
    assert!(
        worker_in(dir.path(), &b.config)
            .arg("stop")
            .status()
            .unwrap()
            .success()
    );

    // A stale pidfile (its process is gone) does not block a start.
    std::fs::write(&pidfile, "999999\n").unwrap();
    let out = worker_in(dir.path(), &a.config).arg("start").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        worker_in(dir.path(), &a.config)
            .arg("stop")
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn sigterm_lets_a_running_job_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, mut worker) = hub_with_worker(dir.path(), "drain", "t");
    let id = hub
        .ok(&[
            "exec",
            "--worker",
            "drain",
            "--detach",
            "--",
            "sleep 1; echo finished",
        ])
        .trim()
        .to_owned();
    wait_until("the job to run", 20, || {
        serde_json::from_str::<serde_json::Value>(&hub.ok(&["job", "show", &id, "--json"])).unwrap()["state"]
            == "running"
    });
    worker.signal(Signal::SIGTERM);
    let v: serde_json::Value =
        serde_json::from_str(&hub.ok(&["job", "show", &id, "--wait", "--json"])).unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["stdout"], "finished\n");
    assert_eq!(worker.wait_exit(20).code(), Some(0));
    assert!(worker.log_text().contains("draining"), "{}", worker.log_text());
}

#[test]
fn sighup_reloads_tags_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, worker) = hub_with_worker(dir.path(), "hup", "old");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(&setup.config, text.replace("- old", "- new\n  - extra")).unwrap();
    worker.signal(Signal::SIGHUP);
    wait_until("the hub to see the new tags", 20, || {
        hub.workers_json()[0]["tags"] == serde_json::json!(["new", "extra"])
    });
    let out = hub.run(&["exec", "--tags", "extra", "--", "echo routed"]);
    assert_eq!(stdout(&out), "routed\n", "{}", stderr(&out));
    assert!(worker.log_text().contains("SIGHUP"), "{}", worker.log_text());
    assert_eq!(
        worker.log_text().matches("connected to hub").count(),
        1,
        "it reconnected"
    );
}

#[test]
fn completions_and_man_page() {
    let out = Command::new(WORKER)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success() && stdout(&out).contains("cla-worker") && stdout(&out).contains("register"));
    let out = Command::new(WORKER).arg("man").output().unwrap();
    assert!(
        out.status.success() && stdout(&out).contains(".TH cla-worker"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn doctor_against_a_running_and_a_stopped_hub() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "doc", "t");
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&setup.config)
        .arg("doctor")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for check in [
        "config",
        "credentials",
        "dns",
        "tcp",
        "http",
        "clock",
        "websocket",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with("ok") && l.contains(check)),
            "{check} not ok:\n{text}"
        );
    }
    assert!(
        text.contains("all checks passed") && !text.contains(&setup.token),
        "{text}"
    );
    hub.proc.kill();
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&setup.config)
        .arg("doctor")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("tcp") && l.contains("cla-hub serve")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn concurrent_starts_leave_one_worker_and_paths_may_be_spelled_differently() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let w = register(&hub, dir.path(), "once", "t");
    let _reap = Reap(dir.path().join("w.pid"));
    let start = || {
        Command::new(WORKER)
            .current_dir(dir.path())
            .arg("-c")
            .arg(&w.config)
            .args(["start", "--pidfile", "./w.pid", "--logfile", "w.log"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        ok,
        1,
        "exactly one start wins: {:?}",
        outs.iter().map(stderr).collect::<Vec<_>>()
    );
    assert!(
        outs.iter().any(|o| stderr(o).contains("already running")),
        "{:?}",
        outs.iter().map(stderr).collect::<Vec<_>>()
    );
    hub.wait_worker_state("once", "idle", 20);
    // Another spelling of the same pidfile finds the same worker.
    let status = |pidfile: &str| {
        Command::new(WORKER)
            .current_dir(dir.path())
            .arg("-c")
            .arg(&w.config)
            .args(["status", "--pidfile", pidfile])
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(status("w.pid"), Some(0));
    assert_eq!(status(&format!("{}/./w.pid", dir.path().display())), Some(0));
    let out = Command::new(WORKER)
        .current_dir(dir.path())
        .arg("-c")
        .arg(&w.config)
        .args(["stop", "--pidfile", "w.pid"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status("./w.pid"), Some(3));
    assert!(!dir.path().join("w.pid").exists());
}

#[test]
fn a_worker_failing_at_start_up_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yml");
    std::fs::write(&config, "id: early\ntoken: clatk_x\nurl: https://hub.example:1\n").unwrap();
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&config)
        .args(["start", "--pidfile"])
        .arg(dir.path().join("p.pid"))
        .arg("--logfile")
        .arg(dir.path().join("l.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // The child's own error (written before its logging starts) reaches the logfile, and so the user.
    assert!(
        stderr(&out).contains("exited during start-up") && stderr(&out).contains("no certificate is trusted"),
        "{}",
        stderr(&out)
    );
}
