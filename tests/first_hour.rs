//! A new user's first hour, hub side: targets that no worker can match fail at once with their own
//! exit code, queue timeouts have theirs, `exec` outlives a hub restart (and says how to follow the job
//! when it gives up), `job logs` prints and follows, and admin commands print no log lines.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// `cla-hub exec` against `hub`, run through `sh` so that its stdout goes to `out` while the harness
/// reads its stderr.
fn exec_to_file(hub: &Hub, out: &Path, args: &[&str]) -> Proc {
    let mut line = format!("exec '{HUB}' --data-dir '{}' exec", hub.data_dir.display());
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    line.push_str(&format!(" > '{}'", out.display()));
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line]);
    Proc::spawn(cmd)
}

#[test]
fn a_target_no_registered_worker_has_fails_at_once_naming_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    // Nothing registered yet.
    let o = hub.run(&["exec", "--tags", "web", "--", "true"]);
    assert_eq!(o.status.code(), Some(252), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no worker is registered yet"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("cla-worker register --url"), "{}", stderr(&o));

    let _w = {
        let setup = register(&hub, dir.path(), "web-1", "linux,web");
        let w = run_worker(&setup, &["--envs", "dev"]);
        hub.wait_worker_state("web-1", "idle", 20);
        w
    };
    // Registered but offline workers count as existing (they wait; see below).
    register(&hub, dir.path(), "db-1", "linux,db");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--tags", "gpu"],
            "no registered worker has tags [gpu]; tags in use: db, linux, web",
        ),
        (
            &["--tags", "web,gpu"],
            "no registered worker has all of tags [web, gpu]; tags in use: db, linux, web",
        ),
        (
            &["--tags", "web", "--env", "prod"],
            "no registered worker has tags [web] and env prod; tags in use: db, linux, web; envs in use: dev",
        ),
        (&["--worker", "web-2"], "no worker `web-2` is registered"),
        (
            &["--worker", "web-1", "--env", "prod"],
            "worker web-1 is not in env prod (its envs: dev)",
        ),
    ];
    for (target, message) in cases {
        let t0 = Instant::now();
        let mut args = vec!["exec"];
        args.extend_from_slice(target);
        args.extend(["--", "true"]);
        let o = hub.run(&args);
        assert_eq!(o.status.code(), Some(252), "{target:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{target:?}: {}", stderr(&o));
        assert!(t0.elapsed() < Duration::from_secs(10), "{target:?} must not wait");
    }
    // eval and a detached job are refused the same way.
    let o = hub.run(&["eval", "--tags", "gpu", "1"]);
    assert_eq!(o.status.code(), Some(252), "{}", stderr(&o));
    let o = hub.run(&["exec", "--tags", "gpu", "--detach", "--", "true"]);
    assert_eq!(o.status.code(), Some(252), "{}", stderr(&o));

    // An offline worker that matches: the job waits, and a queue timeout (253, not 124) names it.
    let o = hub.run(&["exec", "--tags", "db", "--queue-timeout", "0.5", "--", "true"]);
    assert_eq!(o.status.code(), Some(253), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("db-1 (never connected) is offline"),
        "{}",
        stderr(&o)
    );
    // A disabled one: named with its state and the way out.
    hub.ok(&["worker", "disable", "web-1"]);
    let o = hub.run(&["exec", "--tags", "web", "--queue-timeout", "0.5", "--", "true"]);
    assert_eq!(o.status.code(), Some(253), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("web-1 is disabled (`cla-hub worker enable` it)"),
        "{}",
        stderr(&o)
    );
    // Not on a terminal, the waiting reason is a log line, shown only with -v; without it no log line
    // reaches the command's output.
    assert!(!stderr(&o).contains(" INFO "), "{}", stderr(&o));
    let o = hub.run(&[
        "-v",
        "exec",
        "--tags",
        "web",
        "--queue-timeout",
        "0.5",
        "--",
        "true",
    ]);
    assert!(
        stderr(&o).contains("waiting for a worker: web-1 is disabled"),
        "{}",
        stderr(&o)
    );
    // The command timeout keeps 124.
    hub.ok(&["worker", "enable", "web-1"]);
    let o = hub.run(&["exec", "--tags", "web", "--timeout", "0.5", "--", "sleep 30"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
}

#[test]
fn exec_survives_a_hub_restart_and_exits_with_the_jobs_code() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let out = dir.path().join("out.txt");
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; echo err $i >&2; sleep 0.3; done; exit 7";
    let mut exec = exec_to_file(&hub, &out, &["--worker", "w1", "--", script]);
    wait_until("the job's first lines", 20, || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("line 2"))
    });
    // The hub dies mid-job and comes back at the same address, with the same store.
    hub.proc.kill();
    let addr = hub.addr.clone();
    std::thread::sleep(Duration::from_millis(500));
    hub = Hub::start_at(dir.path(), &addr);
    let status = exec.wait_exit(60);
    let text = std::fs::read_to_string(&out).unwrap();
    let want: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text, want, "every line once, in order");
    let log = exec.log_text();
    let errs: Vec<&str> = log.lines().filter(|l| l.starts_with("err ")).collect();
    let want_errs: Vec<String> = (1..=10).map(|i| format!("err {i}")).collect();
    assert_eq!(errs, want_errs, "stderr too: {log}");
    assert_eq!(status.code(), Some(7), "the job's own exit code: {log}");
    assert!(log.contains("reconnecting to follow job"), "{log}");
    drop(hub);
}

#[test]
fn exec_gives_up_with_254_and_says_how_to_follow_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let out = dir.path().join("out.txt");
    let mut exec = exec_to_file(
        &hub,
        &out,
        &[
            "--worker",
            "w1",
            "--reconnect-for",
            "2",
            "--",
            "echo started; sleep 30",
        ],
    );
    wait_until("the job to start", 20, || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("started"))
    });
    hub.proc.kill();
    let t0 = Instant::now();
    let status = exec.wait_exit(30);
    assert!(t0.elapsed() < Duration::from_secs(20), "gave up within its bound");
    assert_eq!(status.code(), Some(254), "{}", exec.log_text());
    let log = exec.log_text();
    let job = log
        .split("reconnecting to follow job ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in: {log}"))
        .to_owned();
    assert!(
        log.contains(&format!("`cla-hub job logs {job} --follow` follows it")),
        "{log}"
    );
}

#[test]
fn job_logs_prints_stored_output_and_follows_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let id = hub.detach(
        "w1",
        &[],
        "for i in 1 2 3 4 5; do echo out $i; echo err $i >&2; sleep 0.3; done; exit 3",
    );
    // Follow from the start while it runs: all of its output, then its exit code.
    let o = hub.run(&["job", "logs", &id, "--follow"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let want: String = (1..=5).map(|i| format!("out {i}\n")).collect();
    assert_eq!(stdout(&o), want);
    let want_err: String = (1..=5).map(|i| format!("err {i}\n")).collect();
    assert!(stderr(&o).starts_with(&want_err), "{}", stderr(&o));
    // After the end: the stored output, each stream to its own.
    let o = hub.run(&["job", "logs", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), want);
    assert_eq!(stderr(&o), want_err);
    // An unknown job.
    let o = hub.run(&["job", "logs", "0000000000000000", "-f"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no job 0000000000000000"), "{}", stderr(&o));
}

#[test]
fn jobs_filter_newest_first_and_ids_are_taken_by_unique_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _s1, _w1) = hub_with_worker(dir.path(), "w1", "t");
    let s2 = register(&hub, dir.path(), "w2", "t");
    let _w2 = run_worker(&s2, &[]);
    hub.wait_worker_state("w2", "idle", 20);
    let a = hub.detach("w1", &[], "echo a");
    hub.wait_job_state(&a, "succeeded", 20);
    let b = hub.detach("w2", &[], "echo b");
    hub.wait_job_state(&b, "succeeded", 20);
    let c = hub.detach("w1", &[], "exit 3");
    hub.wait_job_state(&c, "failed", 20);
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["jobs", "-q"];
        all.extend_from_slice(args);
        hub.ok(&all).lines().map(str::to_owned).collect()
    };
    assert_eq!(ids(&[]), [c.clone(), b.clone(), a.clone()], "newest first");
    assert_eq!(ids(&["--worker", "w2"]), std::slice::from_ref(&b));
    assert_eq!(ids(&["--state", "failed"]), std::slice::from_ref(&c));
    assert_eq!(ids(&["--limit", "2"]), [c.clone(), b.clone()]);
    assert_eq!(ids(&["--since", "1h"]).len(), 3);
    assert!(ids(&["--since", "2099-01-01T00:00:00Z"]).is_empty());
    let o = hub.run(&["jobs", "--since", "yesterday-ish"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("give an age like 30m"), "{}", stderr(&o));

    // The table: WORKER and AGE, one exit code per job; without headers; wide; YAML.
    let table = hub.ok(&["jobs"]);
    let header = table.lines().next().unwrap();
    for col in ["ID", "STATE", "WORKER", "RC", "AGE", "COMMAND"] {
        assert!(header.contains(col), "{table}");
    }
    let row = table.lines().find(|l| l.starts_with(&c)).unwrap();
    assert!(row.contains(" w1 ") && row.contains(" 3 "), "{table}");
    let bare = hub.ok(&["jobs", "--no-headers"]);
    assert_eq!(bare.lines().count(), 3, "{bare}");
    assert!(!bare.contains("STATE"), "{bare}");
    assert!(
        hub.ok(&["jobs", "-o", "wide"])
            .lines()
            .next()
            .unwrap()
            .contains("DURATION")
    );
    let yaml = hub.ok(&["jobs", "-o", "yaml", "--limit", "1"]);
    assert!(yaml.contains(&format!("id: {c}")), "{yaml}");

    // A unique prefix names a job wherever an id is taken; a shared one is refused, listing them.
    let prefix = &c[..c.len() - 3];
    let shown: serde_json::Value = serde_json::from_str(&hub.ok(&["job", "show", "--json", prefix])).unwrap();
    assert_eq!(shown["id"], c.as_str());
    let logs = hub.run(&["job", "logs", &b[..b.len() - 2]]);
    assert_eq!(stdout(&logs), "b\n");
    let common: String = a
        .chars()
        .zip(c.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    if common.len() >= 6 {
        let o = hub.run(&["job", "show", &common]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("is the start of several job ids"),
            "{}",
            stderr(&o)
        );
    }
    let o = hub.run(&["job", "show", "abc"]);
    assert!(stderr(&o).contains("no job abc"), "{}", stderr(&o));
}

#[test]
fn connection_mistakes_say_what_to_type() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Hub::start(&dir.path().join("plain"));
    let tls = Hub::start_with(&dir.path().join("tls"), "127.0.0.1:0", &["--tls"]);
    let token = plain.admin_token();
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let wrong_https = format!("https://{}", plain.addr);
    let wrong_http = format!("http://{}", tls.addr);
    let cases = [
        (
            wrong_https,
            format!(
                "the hub does not speak TLS there (plain HTTP): use http://{} instead",
                plain.addr
            ),
        ),
        (
            wrong_http.clone(),
            format!("if the hub serves TLS (`serve --tls`), use https://{}", tls.addr),
        ),
        (
            format!("http://{}/cla", plain.addr),
            "has a path: the hub serves at the root".to_owned(),
        ),
        (
            format!("http://127.0.0.1:{free}"),
            "nothing is listening there: is the hub running".to_owned(),
        ),
    ];
    for (url, want) in &cases {
        // The worker registering, and an admin command (its exec stream too, for the plain cases).
        let o = Command::new(WORKER)
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .args(["register", "--url", url, "--passkey", "x", "--id", "w1"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains(want.as_str()),
            "register {url}: {}",
            stderr(&o)
        );
        assert_eq!(stderr(&o).lines().count(), 1, "one line: {}", stderr(&o));
        if url.starts_with("https") {
            continue; // An admin command refuses an untrusted https hub before it connects.
        }
        for args in [&["workers"][..], &["exec", "--tags", "x", "--", "true"][..]] {
            let o = Command::new(HUB)
                .args([
                    "--data-dir",
                    dir.path().join("none").to_str().unwrap(),
                    "--hub",
                    url,
                ])
                .args(args)
                .env("CLA_HUB_TOKEN", &token)
                .output()
                .unwrap();
            assert!(
                stderr(&o).contains(want.as_str()),
                "{args:?} {url}: {}",
                stderr(&o)
            );
            assert!(
                !stderr(&o).contains("/api/v1"),
                "no internal path: {}",
                stderr(&o)
            );
        }
    }
}

#[test]
fn every_hub_subcommand_has_examples_and_every_man_page_it_references_exists() {
    let help = |args: &[&str]| -> String {
        let o = Command::new(HUB).args(args).arg("--help").output().unwrap();
        assert!(o.status.success(), "{args:?}");
        stdout(&o)
    };
    let top = help(&[]);
    for code in ["124", "252", "253", "254", "255"] {
        assert!(
            top.contains(&format!("  {code} ")),
            "exit code {code} in --help:\n{top}"
        );
    }
    let subcommands: &[&[&str]] = &[
        &["serve"],
        &["passkey", "create"],
        &["passkey", "list"],
        &["passkey", "revoke"],
        &["workers"],
        &["worker"],
        &["exec"],
        &["eval"],
        &["ship"],
        &["fetch"],
        &["jobs"],
        &["job", "show"],
        &["job", "cancel"],
        &["job", "logs"],
        &["run"],
        &["demo"],
        &["completions"],
        &["man"],
    ];
    for sub in subcommands {
        let text = help(sub);
        assert!(
            text.contains("Example"),
            "`cla-hub {} --help` has no examples:\n{text}",
            sub.join(" ")
        );
    }
    // Positional arguments are described.
    for sub in [
        &["job", "show"][..],
        &["job", "cancel"],
        &["job", "logs"],
        &["passkey", "revoke"],
    ] {
        let text = help(sub);
        let args = text
            .split("Arguments:")
            .nth(1)
            .unwrap_or_else(|| panic!("{sub:?}: {text}"));
        let first = args.lines().nth(1).unwrap();
        assert!(
            first.split_whitespace().count() > 1,
            "{sub:?} argument undescribed: {first}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(HUB)
        .args(["man", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut pages = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        pages += 1;
        for part in text.split("cla\\-hub\\-").skip(1) {
            let Some((name, _)) = part.split_once("(1)") else {
                continue;
            };
            let file = format!("cla-hub-{}.1", name.replace("\\-", "-"));
            assert!(
                dir.path().join(&file).exists(),
                "a page refers to {file}, which is not there"
            );
        }
    }
    assert!(pages > 15, "{pages} pages");
    let o = Command::new(HUB).args(["completions", "bash"]).output().unwrap();
    assert!(stdout(&o).contains("cla-hub"), "{}", stderr(&o));
}

#[test]
fn job_show_wait_outlives_a_hub_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "t");
    let id = hub.detach("w1", &[], "sleep 2; echo done; exit 5");
    let mut cmd = hub.cmd();
    cmd.args(["job", "show", &id, "--wait"]);
    let mut waiting = Proc::spawn(cmd);
    hub.wait_job_state(&id, "running", 20);
    hub.proc.kill();
    let addr = hub.addr.clone();
    std::thread::sleep(Duration::from_millis(700));
    hub = Hub::start_at(dir.path(), &addr);
    let status = waiting.wait_exit(60);
    assert_eq!(
        status.code(),
        Some(5),
        "the job's exit code: {}",
        waiting.log_text()
    );
    drop(hub);
}
