//! `cla-hub` admin commands: passkeys, authentication, and what must never be written in the clear.

use std::process::Command;

use crate::common::*;

#[test]
fn passkeys_list_revoke_and_revoked_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let key = hub.passkey("shop");
    assert!(key.starts_with("clapk_") && key.len() == 6 + 64, "{key}");
    let list = hub.ok(&["passkey", "list"]);
    assert!(
        list.contains(&key[..14]) && list.contains("shop") && list.contains("active"),
        "{list}"
    );
    assert!(
        !list.contains(&key),
        "the whole passkey must not be listed: {list}"
    );

    let out = hub.run(&["passkey", "revoke", "clapk_"]);
    assert_eq!(out.status.code(), Some(1), "a too-short prefix must not match");
    hub.ok(&["passkey", "revoke", &key[..14]]);
    let listed: serde_json::Value = serde_json::from_str(&hub.ok(&["passkey", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["revoked"], true);

    let out = Command::new(WORKER)
        .current_dir(dir.path())
        .args(["register", "--url", &hub.url, "--passkey", &key, "--id", "w"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
}

#[test]
fn admin_commands_need_the_admin_token_and_a_running_hub() {
    let dir = tempfile::tempdir().unwrap();
    // No hub: the error says how to fix it.
    let out = Command::new(HUB)
        .arg("--data-dir")
        .arg(dir.path().join("none"))
        .arg("workers")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cla-hub serve"), "{}", stderr(&out));

    let hub = Hub::start(dir.path());
    let out = Command::new(HUB)
        .args(["--hub", &hub.url, "workers"])
        .env("CLA_HUB_TOKEN", "claad_wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("admin token"), "{}", stderr(&out));

    let hub_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hub.data_dir.join("hub.json")).unwrap()).unwrap();
    let out = Command::new(HUB)
        .args(["--hub", &hub.url, "workers", "--json"])
        .env("CLA_HUB_TOKEN", hub_json["admin_token"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "[]");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(hub.data_dir.join("hub.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}

/// Every file under `dir`, as bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn secrets_never_appear_in_logs_or_hub_files() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, worker) = hub_with_worker(dir.path(), "w1", "t");
    let key = hub.passkey("other");
    hub.ok(&["exec", "--worker", "w1", "--", "true"]);
    let out = hub.run(&["exec", "--worker", "w1", "-v", "--", "echo verbose"]);
    assert!(out.status.success());
    let logs = format!("{}\n{}\n{}", hub.proc.log_text(), worker.log_text(), stderr(&out));
    for secret in [&setup.token, &key] {
        assert!(!logs.contains(secret.as_str()), "a secret is in the logs");
        for (path, bytes) in files_under(&hub.data_dir) {
            assert!(
                !contains(&bytes, secret),
                "a secret is in {} in plain text",
                path.display()
            );
        }
    }
}
