//! The path a user walks: passkey → register → run → workers → exec, and the job commands.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn register_run_and_exec_with_split_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, _worker) = hub_with_worker(dir.path(), "w1", "linux,java");

    // --save wrote the token into a private file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&setup.config).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(
        std::fs::read_to_string(&setup.config)
            .unwrap()
            .contains(&setup.token)
    );

    let workers = hub.workers_json();
    let w = &workers.as_array().unwrap()[0];
    for key in [
        "id",
        "projects",
        "tags",
        "envs",
        "state",
        "running",
        "capacity",
        "version",
        "host",
        "last_seen",
    ] {
        assert!(w.get(key).is_some(), "workers --json lacks `{key}`: {w}");
    }
    assert_eq!(w["state"], "idle");
    assert_eq!(w["tags"], serde_json::json!(["linux", "java"]));
    assert_eq!(w["projects"], serde_json::json!(["proj"]));

    // Shell form: stdout and stderr arrive apart, the exit code comes back.
    let out = hub.run(&[
        "exec",
        "--tags",
        "java",
        "--",
        "echo out-line; echo err-line >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out-line\n");
    assert!(stderr(&out).contains("err-line"));
    assert!(!stdout(&out).contains("err-line"));

    // Argv form: no shell, the words arrive untouched.
    let out = hub.run(&[
        "exec", "--worker", "w1", "--", "printf", "%s|", "a b", "$HOME", "*",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "a b|$HOME|*|");

    // The job's environment.
    let out = hub.run(&[
        "exec",
        "--worker",
        "w1",
        "--setenv",
        "GREETING=hi there",
        "--",
        "echo $CLA_WORKER_ID/$CLA_HUB_URL/${#CLA_JOB_ID}/$GREETING",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(line.starts_with(&format!("w1/{}/", hub.url)), "{line}");
    assert!(line.trim_end().ends_with("/hi there"), "{line}");

    // Could not run: 255 and a clear line.
    let out = hub.run(&["exec", "--worker", "w1", "--", "no-such-command-xyz", "arg"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("cannot run `no-such-command-xyz arg`"),
        "{}",
        stderr(&out)
    );

    // No registered worker has the tag: refused at once (exit 252), naming the tags in use.
    let out = hub.run(&["exec", "--tags", "gpu", "--", "true"]);
    assert_eq!(out.status.code(), Some(252), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no registered worker has tags [gpu]; tags in use: java, linux"),
        "{}",
        stderr(&out)
    );
    // A worker id that is not registered at all: the same.
    let out = hub.run(&["exec", "--worker", "nosuch", "--", "true"]);
    assert_eq!(out.status.code(), Some(252));
    assert!(
        stderr(&out).contains("no worker `nosuch` is registered"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let pidfile = dir.path().join("grandchild.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let t0 = Instant::now();
    let out = hub.run(&["exec", "--worker", "w1", "--timeout", "1", "--", &script]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out after 1s"), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(30));
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    wait_until("the grandchild sleep to be gone", 10, || !pid_alive(pid));
    let job = &serde_json::from_str::<serde_json::Value>(&hub.ok(&["jobs", "--json"])).unwrap()[0];
    assert_eq!(job["state"], "timed_out");
}

#[test]
fn jobs_table_keeps_one_row_per_job_and_the_exit_code_exec_gave() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let out = hub.run(&["exec", "--worker", "w1", "--timeout", "1", "--", "sleep 30"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    hub.ok(&["exec", "--worker", "w1", "--", "echo one\necho two"]);
    let table = hub.ok(&["jobs"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one row per job:\n{table}");
    let timed_out = lines
        .iter()
        .find(|l| l.contains("timed_out"))
        .expect("the timed-out job's row");
    assert!(timed_out.split_whitespace().any(|c| c == "124"), "{table}");
    assert!(!timed_out.contains("143"), "{table}");
    assert!(table.contains("echo one…"), "{table}");
}

#[test]
fn output_streams_live() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let mut child = hub
        .cmd()
        .args(["exec", "--worker", "w1", "--", "echo first; sleep 6; echo second"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    // The first line arrived while the command was still running (it sleeps 6 s before its second line).
    assert_eq!(first, "first");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the CLI ended before the remote command did"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(child.wait().unwrap().success());
}

#[test]
fn ctrl_c_on_exec_cancels_the_remote_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let pidfile = dir.path().join("gc.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let mut cmd = hub.cmd();
    cmd.args(["exec", "--worker", "w1", "--", &script]);
    let mut cli = Proc::spawn(cmd);
    wait_until("the remote command to start", 20, || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    cli.signal(nix::sys::signal::Signal::SIGINT);
    let status = cli.wait_exit(20);
    assert_eq!(status.code(), Some(130), "{}", cli.log_text());
    wait_until("the grandchild sleep to be gone", 10, || !pid_alive(pid));
}

/// SIGTERM cancels like Ctrl-C, and if the hub does not answer the command still ends (supervisors
/// that send SIGTERM expect the process to go).
#[test]
fn sigterm_cancels_and_gives_up_when_the_hub_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let started = dir.path().join("started");
    let script = format!("touch {}; sleep 300", started.display());
    // A healthy hub: the job is cancelled and the command exits 130.
    let mut cmd = hub.cmd();
    cmd.args(["exec", "--worker", "w1", "--", &script]);
    let mut cli = Proc::spawn(cmd);
    wait_until("the remote command to start", 20, || started.exists());
    cli.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(cli.wait_exit(20).code(), Some(130), "{}", cli.log_text());
    // A hub that does not answer (stopped): the command gives up after its grace period.
    std::fs::remove_file(&started).unwrap();
    let mut cmd = hub.cmd();
    cmd.args(["exec", "--worker", "w1", "--", &script]);
    let mut cli = Proc::spawn(cmd);
    wait_until("the remote command to start", 20, || started.exists());
    hub.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let t = std::time::Instant::now();
    cli.signal(nix::sys::signal::Signal::SIGTERM);
    let status = cli.wait_exit(30);
    hub.proc.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(status.code(), Some(130), "{}", cli.log_text());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    assert!(cli.log_text().contains("giving up in 10 s"), "{}", cli.log_text());
}

#[test]
fn detach_show_wait_jobs_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");

    let id = hub
        .ok(&[
            "exec",
            "--worker",
            "w1",
            "--detach",
            "--",
            "sleep 0.3; echo detached",
        ])
        .trim()
        .to_owned();
    assert!(!id.is_empty() && !id.contains(' '), "{id}");
    let shown: serde_json::Value =
        serde_json::from_str(&hub.ok(&["job", "show", &id, "--wait", "--json"])).unwrap();
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["rc"], 0);
    assert_eq!(shown["worker"], "w1");
    assert_eq!(shown["stdout"], "detached\n");
    for key in ["started", "ended", "stderr"] {
        assert!(shown.get(key).is_some(), "{key}");
    }

    // A long job, cancelled: its state says so and `job show --wait` exits 130.
    let id2 = hub
        .ok(&["exec", "--worker", "w1", "--detach", "--", "sleep 300"])
        .trim()
        .to_owned();
    wait_until("the job to run", 20, || {
        serde_json::from_str::<serde_json::Value>(&hub.ok(&["job", "show", &id2, "--json"])).unwrap()["state"]
            == "running"
    });
    assert!(hub.ok(&["job", "cancel", &id2]).contains("cancel requested"));
    let out = hub.run(&["job", "show", &id2, "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(130));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["state"], "cancelled");

    let running: serde_json::Value =
        serde_json::from_str(&hub.ok(&["jobs", "--state", "succeeded", "--json"])).unwrap();
    assert_eq!(running.as_array().unwrap().len(), 1);
    let table = hub.ok(&["jobs"]);
    assert!(
        table.contains(&id) && table.contains(&id2) && table.contains("cancelled"),
        "{table}"
    );

    let out = hub.run(&["job", "cancel", &id2]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already ended"), "{}", stderr(&out));
    let out = hub.run(&["job", "show", "nosuchjob"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no job nosuchjob"), "{}", stderr(&out));
}

#[test]
fn demo_runs_and_cleans_up() {
    let out = std::process::Command::new(HUB).arg("demo").output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("out| hello from demo-worker"), "{text}");
    assert!(text.contains("err| to stderr"), "{text}");
    assert!(text.contains("exit 3"), "{text}");
    assert!(text.contains("timed_out"), "{text}");
    assert!(text.contains("detached work done"), "{text}");
    // Its `cla-hub jobs` is the real table: a row per job, the first line of a script, the exit code
    // `exec` gave (124 for the timeout, not the killed process's 143).
    let table = text.split("$ cla-hub jobs").nth(1).unwrap_or("");
    let table = table.split("==>").next().unwrap_or(table);
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_start().starts_with('1'))
        .collect();
    assert!(
        rows.iter()
            .any(|r| r.contains("timed_out") && r.contains(" 124 ")),
        "{table}"
    );
    assert!(rows.iter().any(|r| r.contains("set -e…")), "{table}");
    assert!(!table.contains("rm -rf"), "{table}");
    assert!(text.contains("console| demo-worker sees"), "{text}");
    assert!(text.contains("stash:  {\"visits\":42}"), "{text}");
    // The example rulebook ran: built, shipped, smoke-tested, checked.
    assert!(text.contains("$ cla-hub run docs/examples/release.yml"), "{text}");
    assert!(text.contains("    built app 1.4.2 on demo-worker"), "{text}");
    assert!(
        text.contains("    release 1.4.2 is live on demo-worker: 2-line report"),
        "{text}"
    );
}

#[test]
fn jobs_do_not_inherit_the_workers_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "envw", "t");
    // The token passed the recommended way, through the environment.
    let cmd = worker_from_flags(&hub, dir.path(), "envw", &setup.token, &[("CLA_HUB_TOKEN", "x")]);
    let _worker = Proc::spawn(cmd);
    hub.wait_worker_state("envw", "idle", 20);
    let out = hub.run(&[
        "exec",
        "--worker",
        "envw",
        "--",
        "echo ${CLA_WORKER_TOKEN:-unset} ${CLA_HUB_TOKEN:-unset}",
    ]);
    assert_eq!(stdout(&out), "unset unset\n", "{}", stderr(&out));
}

#[test]
fn a_background_process_holding_the_pipe_does_not_hold_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let t = Instant::now();
    // The background sleep keeps stdout open after the shell exits; the worker gives it up 2 s after
    // the last byte.
    let out = hub.run(&["exec", "--worker", "w1", "--", "sleep 30 & echo main done"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "main done\n");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}
