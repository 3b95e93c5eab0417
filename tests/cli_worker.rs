//! `cla-worker` commands: registration rules, config errors, unregister.

use std::process::Command;

use crate::common::*;

#[test]
fn same_id_twice_in_a_project_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let _first = register(&hub, dir.path(), "dup", "a");
    let key = hub.passkey("proj");
    let out = Command::new(WORKER)
        .args([
            "-c",
            "/nonexistent/ignored.yml",
            "register",
            "--url",
            &hub.url,
            "--passkey",
            &key,
            "--id",
            "dup",
        ])
        .output()
        .unwrap();
    // The explicit config is missing: register without --save must say so rather than guess.
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = Command::new(WORKER)
        .current_dir(dir.path())
        .args(["register", "--url", &hub.url, "--passkey", &key, "--id", "dup"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already registered in project proj"),
        "{}",
        stderr(&out)
    );

    let out = Command::new(WORKER)
        .current_dir(dir.path())
        .args([
            "register",
            "--url",
            &hub.url,
            "--passkey",
            "clapk_wrong",
            "--id",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid passkey"), "{}", stderr(&out));

    let out = Command::new(WORKER)
        .current_dir(dir.path())
        .args(["register", "--url", &hub.url, "--passkey", &key, "--id", "bad id"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("contains ` `"), "{}", stderr(&out));
}

#[test]
fn default_id_is_user_at_host_and_made_unique() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let key = hub.passkey("proj");
    let reg = |_: u8| {
        let out = Command::new(WORKER)
            .current_dir(dir.path())
            .env("USER", "deployer")
            .args(["register", "--url", &hub.url, "--passkey", &key, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a = reg(1);
    let b = reg(2);
    assert!(a.starts_with("deployer@"), "{a}");
    assert_eq!(b, format!("{a}-2"));
}

#[test]
fn unregister_removes_the_registration_and_the_worker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, mut worker) = hub_with_worker(dir.path(), "gone", "t");
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&setup.config)
        .arg("unregister")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("worker registration removed: gone"));
    // Removed from the config file it came from.
    assert!(
        !std::fs::read_to_string(&setup.config)
            .unwrap()
            .contains(&setup.token)
    );
    // The running worker is told and stops with a clear message.
    let status = worker.wait_exit(20);
    assert_eq!(status.code(), Some(1));
    assert!(
        worker.log_text().contains("registration revoked"),
        "{}",
        worker.log_text()
    );
    assert_eq!(hub.worker_state("gone"), None);
    // Running again with the old token is refused.
    let out = Command::new(WORKER)
        .args(["run", "--url", &hub.url, "--id", "gone", "--token", &setup.token])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("registration revoked"), "{}", stderr(&out));
    assert!(stderr(&out).contains("cla-worker register"), "{}", stderr(&out));
}

#[test]
fn config_errors_are_located_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "url: http://127.0.0.1:1\ntags: [a, b\n").unwrap();
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&bad)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("cla-worker: error: {}:", bad.display())),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let odd = dir.path().join("odd.yml");
    std::fs::write(&odd, "url: http://127.0.0.1:1\nfavourite_colour: blue\n").unwrap();
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&odd)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("unknown key `favourite_colour`"), "{err}");
    assert!(err.contains("no worker id"), "{err}");

    // CLA_WORKER_CONFIG is honoured like --config.
    let out = Command::new(WORKER)
        .env("CLA_WORKER_CONFIG", &bad)
        .arg("run")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("bad.yml:"), "{}", stderr(&out));

    let out = Command::new(WORKER)
        .args(["run", "--bogus-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn token_file_readable_by_others_warns_and_strict_refuses() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("loose.yml");
    std::fs::write(
        &cfg,
        "url: http://127.0.0.1:9\nid: w\ntoken: clatk_secret_value\n",
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&cfg)
        .args(["--strict", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("clatk_secret_value"), "{err}");
}
