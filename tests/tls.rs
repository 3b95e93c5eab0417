//! TLS between workers, admin commands and the hub: the self-signed certificate pinned on first use, a
//! hub that changes its certificate refused, a certificate from a CA, and remote admin with a pin.

use std::process::Command;

use crate::common::*;

/// The fingerprint `cla-hub serve --tls` logs.
fn logged_fingerprint(hub: &Hub) -> String {
    let line = hub.proc.wait_for_line("TLS certificate sha256:", 10);
    line.split("TLS certificate ")
        .nth(1)
        .unwrap()
        .split(|c: char| c == ',' || c.is_whitespace())
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn a_worker_registered_over_tls_pins_the_hub_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--tls"]);
    assert!(hub.url.starts_with("https://"));
    let fingerprint = logged_fingerprint(&hub);
    let setup = register(&hub, dir.path(), "tw1", "linux");
    let config = std::fs::read_to_string(&setup.config).unwrap();
    assert!(
        config.contains(&format!("pin: {fingerprint}")) || config.contains(&format!("pin: '{fingerprint}'")),
        "register --save records the hub's certificate:\n{config}"
    );
    let _worker = run_worker(&setup, &[]);
    hub.wait_worker_state("tw1", "idle", 20);
    // Admin commands on the hub's machine find the pin in hub.json.
    let out = hub.ok(&["exec", "--worker", "tw1", "--", "echo", "over", "tls"]);
    assert_eq!(out, "over tls\n");
    // A transfer rides the same connection.
    let src = dir.path().join("payload.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let dest = dir.path().join("shipped");
    std::fs::create_dir(&dest).unwrap();
    hub.ok(&[
        "ship",
        "--worker",
        "tw1",
        src.to_str().unwrap(),
        dest.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(dest.join("payload.bin")).unwrap(), data);
    // doctor checks the handshake against the pin.
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&setup.config)
        .arg("doctor")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("matches the pin"), "{text}");
}

#[test]
fn a_worker_refuses_a_hub_with_another_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--tls"]);
    let first = logged_fingerprint(&hub);
    let setup = register(&hub, dir.path(), "tw2", "linux");
    let addr = hub.addr.clone();
    drop(hub);
    // Same data dir and port, a new certificate: what an attacker in the middle would present.
    std::fs::remove_dir_all(dir.path().join("hub/tls")).unwrap();
    let hub = Hub::start_with(dir.path(), &addr, &["--tls"]);
    let second = logged_fingerprint(&hub);
    assert_ne!(first, second);
    let worker = run_worker(&setup, &[]);
    let line = worker.wait_for_line("refused the hub's certificate", 20);
    assert!(
        line.contains(&first) && line.contains(&second) && line.contains("tls.pin"),
        "the refusal names both certificates and the fix: {line}"
    );
    hub.proc.wait_for_line("TLS handshake", 10);
    assert_ne!(
        hub.worker_state("tw2").as_deref(),
        Some("idle"),
        "the worker never connected"
    );
    // Registering with a wrong --pin fails before anything is sent or saved.
    let config = dir.path().join("wrong.yml");
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&config)
        .args([
            "register",
            "--url",
            &hub.url,
            "--passkey",
            &hub.passkey("p"),
            "--pin",
            &first,
            "--save",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("refused the hub's certificate") && err.contains(&second),
        "{err}"
    );
    assert!(!config.exists(), "nothing saved");
    // Remote admin: --hub on https needs a pin (or a CA), and a wrong one is refused.
    let token = hub.admin_token();
    let remote = |pin: Option<&str>| {
        let mut c = Command::new(HUB);
        c.args(["--data-dir", "/nonexistent", "--hub", &hub.url, "workers"])
            .env("CLA_HUB_TOKEN", &token)
            .env_remove("CLA_HUB_PIN");
        if let Some(pin) = pin {
            c.args(["--pin", pin]);
        }
        c.output().unwrap()
    };
    let out = remote(None);
    assert!(
        !out.status.success() && stderr(&out).contains("--pin"),
        "{}",
        stderr(&out)
    );
    let out = remote(Some(&first));
    assert!(
        !out.status.success() && stderr(&out).contains(&second),
        "{}",
        stderr(&out)
    );
    let out = remote(Some(&second));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("tw2"));
}

#[test]
fn a_hub_certificate_from_a_ca_is_checked_against_the_ca() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cla test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.path().join("ca.pem"),
        dir.path().join("hub.pem"),
        dir.path().join("hub.key"),
    );
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, leaf.pem() + &ca_cert.pem()).unwrap();
    std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();
    let hub = Hub::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--cert",
            cert_pem.to_str().unwrap(),
            "--key",
            key_pem.to_str().unwrap(),
        ],
    );
    assert!(
        !hub.data_dir.join("tls/hub.crt").exists(),
        "no self-signed certificate is made"
    );
    let config = dir.path().join("ca-worker.yml");
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&config)
        .args([
            "register",
            "--url",
            &hub.url,
            "--passkey",
            &hub.passkey("p"),
            "--id",
            "tw3",
        ])
        .args(["--ca", ca_pem.to_str().unwrap(), "--save"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("ca: ") && !text.contains("pin:"), "{text}");
    std::fs::write(
        &config,
        format!("{text}spool_dir: {}\n", dir.path().join("spool").display()),
    )
    .unwrap();
    let mut cmd = Command::new(WORKER);
    cmd.arg("-c").arg(&config).arg("run");
    let _worker = Proc::spawn(cmd);
    hub.wait_worker_state("tw3", "idle", 20);
    assert_eq!(hub.ok(&["exec", "--worker", "tw3", "--", "echo", "ca"]), "ca\n");
    // The same CA does not vouch for another name: `localhost.localdomain` is not in the certificate.
    let other_ca = dir.path().join("other-ca.pem");
    let other = CertificateParams::new(vec!["x".to_owned()]).unwrap();
    std::fs::write(
        &other_ca,
        other.self_signed(&KeyPair::generate().unwrap()).unwrap().pem(),
    )
    .unwrap();
    let out = Command::new(WORKER)
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .env_remove("CLA_WORKER_CONFIG")
        .args(["register", "--url", &hub.url, "--passkey", "clapk_x"])
        .args(["--ca", other_ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refused the hub's certificate"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn with_mtls_a_worker_needs_the_client_certificate_issued_at_its_registration() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--mtls"]);
    hub.proc.wait_for_line("mTLS: workers must present", 10);
    let a = register(&hub, dir.path(), "m1", "linux");
    let b = register(&hub, dir.path(), "m2", "linux");
    let config = std::fs::read_to_string(&a.config).unwrap();
    let field = |name: &str| {
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap()
            .trim_matches(['"', '\''])
            .to_owned()
    };
    let (cert, key) = (field("cert"), field("key"));
    assert!(
        cert.ends_with("cla-worker-m1.crt") && key.ends_with("cla-worker-m1.key"),
        "{config}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the private key is private");
    }
    assert!(
        std::fs::read_to_string(&cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let _worker = run_worker(&a, &[]);
    hub.wait_worker_state("m1", "idle", 20);
    assert_eq!(
        hub.ok(&["exec", "--worker", "m1", "--", "echo", "mutual"]),
        "mutual\n"
    );

    // Without its certificate, worker m2 is turned away with the reason.
    let plain = dir.path().join("m2-nocert.yml");
    let text: String = std::fs::read_to_string(&b.config)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("cert:") && !l.trim_start().starts_with("key:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&plain, text).unwrap();
    let mut cmd = Command::new(WORKER);
    cmd.arg("-c").arg(&plain).arg("run");
    let mut worker = Proc::spawn(cmd);
    assert_eq!(worker.wait_exit(20).code(), Some(1));
    assert!(
        worker.log_text().contains("presented none"),
        "{}",
        worker.log_text()
    );
    // With another worker's certificate, too.
    let mut cmd = Command::new(WORKER);
    cmd.arg("-c")
        .arg(&plain)
        .args(["run", "--client-cert", &cert, "--client-key", &key]);
    let mut worker = Proc::spawn(cmd);
    assert_eq!(worker.wait_exit(20).code(), Some(1));
    assert!(
        worker
            .log_text()
            .contains("not the one issued at its registration"),
        "{}",
        worker.log_text()
    );
    assert_ne!(hub.worker_state("m2").as_deref(), Some("idle"));

    // Unregistering m2 removes the certificate and key made for it (over mTLS: it presents them).
    let (cert2, key2) = (cert.replace("m1.crt", "m2.crt"), key.replace("m1.key", "m2.key"));
    assert!(std::path::Path::new(&key2).exists());
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&b.config)
        .arg("unregister")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !std::path::Path::new(&cert2).exists() && !std::path::Path::new(&key2).exists(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(std::path::Path::new(&key).exists(), "m1's key stays");
}
