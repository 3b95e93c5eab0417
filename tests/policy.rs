//! The worker's local policy: verbs and path allow-lists, enforced on the worker before any side effect.

use std::path::Path;

use crate::common::*;

/// A hub and a worker whose config carries `policy` (YAML, appended to the saved registration).
fn with_policy(dir: &Path, id: &str, policy: &str) -> (Hub, WorkerSetup, Proc) {
    let hub = Hub::start(dir);
    let setup = register(&hub, dir, id, "linux");
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str(policy);
    std::fs::write(&setup.config, text).unwrap();
    let worker = run_worker(&setup, &[]);
    hub.wait_worker_state(id, "idle", 20);
    (hub, setup, worker)
}

/// The newest job on the hub, as JSON.
fn last_job(hub: &Hub) -> serde_json::Value {
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    jobs.as_array()
        .unwrap()
        .iter()
        .max_by_key(|j| j["created"].as_str().unwrap().to_owned() + j["id"].as_str().unwrap())
        .unwrap()
        .clone()
}

#[test]
fn a_denied_verb_fails_the_job_with_a_policy_error_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let (hub, _setup, worker) = with_policy(dir.path(), "p1", "policy:\n  deny: [exec]\n");
    let out = hub.run(&["exec", "--worker", "p1", "--", "touch", marker.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("policy: exec is refused on this worker"), "{err}");
    assert!(err.contains("policy.deny"), "{err}");
    assert!(!marker.exists(), "nothing ran");
    let job = last_job(&hub);
    assert_eq!(job["error_code"], "policy", "{job}");
    assert_eq!(job["worker"], "p1");
    assert_ne!(job["state"], "succeeded");
    assert!(worker.log_text().contains("refused"));
    assert!(
        !worker.log_text().contains("running as root with no policy"),
        "a policy is set"
    );
    // Other verbs still work, and an eval's cla.run needs exec too.
    let out = hub.run(&["eval", "--worker", "p1", "1+1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = hub.run(&["eval", "--worker", "p1", "cla.run(['true']).rc"]);
    assert!(!out.status.success());
    assert!(
        (stdout(&out) + &stderr(&out)).contains("policy: exec is refused"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn transfers_stay_inside_the_allowed_paths_symlinks_included() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let allowed = base.join("allowed");
    let secret = base.join("secret");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(allowed.join("ok.txt"), "fine").unwrap();
    std::fs::write(secret.join("key"), "s3cr3t").unwrap();
    std::os::unix::fs::symlink(&secret, allowed.join("escape")).unwrap();
    let policy = format!(
        "policy:\n  paths:\n    read: [{a}]\n    write: [{a}]\n",
        a = allowed.display()
    );
    let (hub, _setup, _worker) = with_policy(dir.path(), "p2", &policy);
    let here = base.join("here");
    std::fs::create_dir_all(&here).unwrap();
    // Allowed: fetch from, and ship into, the allowed directory.
    hub.ok(&[
        "fetch",
        "--worker",
        "p2",
        allowed.join("ok.txt").to_str().unwrap(),
        here.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(here.join("ok.txt")).unwrap(), "fine");
    let src = base.join("payload.txt");
    std::fs::write(&src, "shipped").unwrap();
    hub.ok(&[
        "ship",
        "--worker",
        "p2",
        src.to_str().unwrap(),
        allowed.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(allowed.join("payload.txt")).unwrap(),
        "shipped"
    );
    // Refused: fetch outside, fetch through a symlink out, ship outside, ship through the symlink.
    for (args, what) in [
        (
            vec![
                "fetch",
                "--worker",
                "p2",
                secret.join("key").to_str().unwrap(),
                here.to_str().unwrap(),
            ],
            "fetch of",
        ),
        (
            vec![
                "fetch",
                "--worker",
                "p2",
                allowed.join("escape/key").to_str().unwrap(),
                here.to_str().unwrap(),
            ],
            "fetch of",
        ),
        (
            vec![
                "ship",
                "--worker",
                "p2",
                src.to_str().unwrap(),
                secret.to_str().unwrap(),
            ],
            "ship of",
        ),
        (
            vec![
                "ship",
                "--worker",
                "p2",
                src.to_str().unwrap(),
                allowed.join("escape").to_str().unwrap(),
            ],
            "ship of",
        ),
    ] {
        let out = hub.run(&args);
        assert!(!out.status.success(), "{args:?} should be refused");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("policy: {what}")) && err.contains("policy.paths."),
            "{err}"
        );
        assert_eq!(last_job(&hub)["error_code"], "policy");
    }
    assert!(!here.join("key").exists(), "nothing fetched");
    assert!(!secret.join("payload.txt").exists(), "nothing shipped");
    // Eval's host API reads under the same rule.
    let read = |p: &Path| {
        hub.run(&[
            "eval",
            "--worker",
            "p2",
            &format!("cla.readFile({:?})", p.to_str().unwrap()),
        ])
    };
    let out = read(&allowed.join("ok.txt"));
    assert!(
        out.status.success() && stdout(&out).contains("fine"),
        "{}",
        stderr(&out)
    );
    let out = read(&allowed.join("escape/key"));
    assert!(!out.status.success());
    let text = stdout(&out) + &stderr(&out);
    assert!(
        text.contains("policy: eval of") && !text.contains("s3cr3t"),
        "{text}"
    );
}

#[test]
fn sighup_reloads_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, worker) = with_policy(dir.path(), "p3", "");
    assert!(hub.run(&["eval", "--worker", "p3", "2+2"]).status.success());
    // As root with no policy, the worker says what that means.
    let warned = worker.log_text().contains("running as root with no policy");
    assert_eq!(warned, nix::unistd::geteuid().is_root(), "{}", worker.log_text());
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str("policy:\n  allow: [exec]\n");
    std::fs::write(&setup.config, text).unwrap();
    worker.signal(nix::sys::signal::Signal::SIGHUP);
    worker.wait_for_line("SIGHUP: policy reloaded", 10);
    let out = hub.run(&["eval", "--worker", "p3", "2+2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not in policy.allow: exec"),
        "{}",
        stderr(&out)
    );
    assert_eq!(hub.ok(&["exec", "--worker", "p3", "--", "echo", "ok"]), "ok\n");
}
