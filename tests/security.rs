//! Guards of the hub's open endpoints, and where secrets must never appear.

use std::process::Command;

use crate::common::*;

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn failed_registrations_are_rate_limited_per_source_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--register-limit", "3"]);
    let key = hub.passkey("shop");
    let register = |passkey: &str, id: &str| {
        Command::new(WORKER)
            .env("HOME", dir.path())
            .env_remove("CLA_WORKER_CONFIG")
            .current_dir(dir.path())
            .args([
                "register",
                "--url",
                &hub.url,
                "--passkey",
                passkey,
                "--id",
                id,
                "--json",
            ])
            .output()
            .unwrap()
    };
    // A good registration does not count against the limit.
    let out = register(&key, "ok-1");
    assert!(out.status.success(), "{}", stderr(&out));
    let token = serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong = "clapk_00000000000000000000000000000000000000000000000000000000deadbeef";
    for i in 0..3 {
        let out = register(wrong, &format!("guess-{i}"));
        assert!(!out.status.success());
        assert!(stderr(&out).contains("invalid passkey"), "{}", stderr(&out));
    }
    // The fourth failure's source is now refused, even with the right passkey.
    let out = register(&key, "ok-2");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("too many failed registrations") && err.contains("try again in"),
        "{err}"
    );
    // The answer is a 429 with retry_after, as the protocol says.
    let text = {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(&hub.addr).unwrap();
        tcp.write_all(
            b"POST /api/v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).unwrap();
        text
    };
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("\"retry_after\":"), "{text}");
    assert!(text.contains("\"code\":\"rate_limited\""), "{text}");
    // Revoking is audited too.
    hub.ok(&["passkey", "revoke", &key]);
    let audit = std::fs::read_to_string(hub.data_dir.join("audit.log")).unwrap();
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "passkey_create");
    assert_eq!(kinds[1], "register");
    assert_eq!(events[1]["worker"], "ok-1");
    assert_eq!(events[1]["source"], "127.0.0.1");
    assert_eq!(events[1]["project"], "shop");
    assert!(
        kinds.iter().filter(|k| **k == "register_refused").count() >= 4,
        "{kinds:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(|r| r.contains("rate limited"))),
        "{audit}"
    );
    assert_eq!(*kinds.last().unwrap(), "passkey_revoke");
    // The audit log names passkeys by prefix only.
    assert!(
        !audit.contains(&key) && !audit.contains(wrong) && !audit.contains(&token),
        "{audit}"
    );
}

#[test]
fn tokens_and_passkeys_appear_in_no_log_and_no_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--tls"]);
    let key = hub.passkey("p");
    let setup = register(&hub, dir.path(), "sec-1", "linux");
    // Debug logging on both sides: the most a log ever says.
    let worker = run_worker(&setup, &["-vv"]);
    hub.wait_worker_state("sec-1", "idle", 20);
    assert_eq!(hub.ok(&["exec", "--worker", "sec-1", "--", "echo", "hi"]), "hi\n");
    let admin_token = hub.admin_token();
    let secrets = [key.as_str(), setup.token.as_str(), admin_token.as_str()];
    let logs = [hub.proc.log_text(), worker.log_text()];
    for secret in secrets {
        assert!(secret.len() > 40);
        for log in &logs {
            assert!(!log.contains(secret), "a secret in a log:\n{log}");
        }
        // hub.json holds the admin token on purpose (0600, for local admin commands); nothing else may.
        for f in files_under(&hub.data_dir)
            .iter()
            .filter(|f| !f.ends_with("hub.json"))
        {
            let bytes = std::fs::read(f).unwrap();
            assert!(!contains(&bytes, secret), "a secret in {}", f.display());
        }
    }
}

/// The `token` value saved for the one registration in a worker config.
fn saved_token(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .trim_matches(['"', '\''])
        .to_owned()
}

#[test]
fn rotating_a_token_saves_it_in_the_config_and_retires_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, mut worker) = hub_with_worker(dir.path(), "rot-1", "linux");
    let first = saved_token(&setup.config);
    assert_eq!(first, setup.token);
    let out = hub.ok(&["worker", "rotate", "rot-1"]);
    assert!(
        out.contains("saved in") && out.contains("no longer works"),
        "{out}"
    );
    let second = saved_token(&setup.config);
    assert_ne!(second, first);
    assert!(second.starts_with("clatk_") && second.len() == first.len());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&setup.config).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the rewritten config stays private");
    }
    // The old token is refused at once (the worker confirmed saving the new one).
    let unregister_with = |token: &str| {
        Command::new(WORKER)
            .env("HOME", dir.path())
            .current_dir(dir.path())
            .args(["unregister", "--url", &hub.url, "--id", "rot-1", "--token", token])
            .output()
            .unwrap()
    };
    let out = unregister_with(&first);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not registered"), "{}", stderr(&out));
    // The session goes on, and a restarted worker connects with the saved token.
    assert_eq!(
        hub.ok(&["exec", "--worker", "rot-1", "--", "echo", "still"]),
        "still\n"
    );
    worker.kill();
    hub.wait_worker_state("rot-1", "offline", 20);
    // Rotating an offline worker waits for it; it gets the new token when it connects.
    let out = hub.ok(&["worker", "rotate", "rot-1", "--overlap", "30s"]);
    assert!(out.contains("not connected"), "{out}");
    assert_eq!(
        saved_token(&setup.config),
        second,
        "nothing changes until it connects"
    );
    let _worker = run_worker(&setup, &[]);
    hub.wait_worker_state("rot-1", "idle", 20);
    wait_until("the new token to be saved", 20, || {
        saved_token(&setup.config) != second
    });
    let third = saved_token(&setup.config);
    assert_eq!(
        hub.ok(&["exec", "--worker", "rot-1", "--", "echo", "third"]),
        "third\n"
    );
    let audit = std::fs::read_to_string(hub.data_dir.join("audit.log")).unwrap();
    assert_eq!(audit.matches("\"token_rotated\"").count(), 2, "{audit}");
    for t in [&first, &second, &third] {
        assert!(!audit.contains(t.as_str()) && !hub.proc.log_text().contains(t.as_str()));
    }
}

#[test]
fn a_token_given_on_the_command_line_is_not_rotated_behind_the_users_back() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "rot-2", "linux");
    // The same registration, run from flags only: no config file holds the token.
    let mut cmd = worker_from_flags(&hub, dir.path(), "rot-2", &setup.token, &[]);
    cmd.env("HOME", dir.path())
        .current_dir(dir.path())
        .env_remove("CLA_WORKER_CONFIG");
    let _worker = Proc::spawn(cmd);
    hub.wait_worker_state("rot-2", "idle", 20);
    let out = hub.run(&["worker", "rotate", "rot-2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("could not save a new token") && err.contains("CLA_WORKER_TOKEN"),
        "{err}"
    );
    // Undone: the token the user holds still works, for the running worker and for a new connection.
    assert_eq!(
        hub.ok(&["exec", "--worker", "rot-2", "--", "echo", "same"]),
        "same\n"
    );
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&setup.config)
        .arg("doctor")
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("authenticated as rot-2"),
        "{}",
        stdout(&out)
    );
}
