use super::*;

#[test]
fn fingerprints_parse_in_the_usual_spellings() {
    let f = Fingerprint::of(b"certificate");
    let text = f.to_string();
    assert!(text.starts_with("sha256:") && text.len() == 7 + 64);
    assert_eq!(Fingerprint::parse(&text).unwrap(), f);
    let hexed = hex::encode_upper(f.0);
    let colons: Vec<String> = hexed
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into())
        .collect();
    assert_eq!(
        Fingerprint::parse(&format!("SHA256 Fingerprint={}", colons.join(":"))).unwrap(),
        f
    );
    assert_eq!(Fingerprint::parse(&hexed).unwrap(), f);
    for bad in ["", "sha256:", "sha256:abcd", "md5:00", &format!("{text}00")] {
        let err = Fingerprint::parse(bad).unwrap_err().to_string();
        assert!(err.contains("bad certificate fingerprint"), "{err}");
    }
}

#[test]
fn self_signed_identity_is_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let names = default_names(None);
    let first = server_identity(None, None, dir.path(), &names, None).unwrap();
    assert!(first.generated);
    let again = server_identity(None, None, dir.path(), &names, None).unwrap();
    assert!(!again.generated);
    assert_eq!(
        first.fingerprint, again.fingerprint,
        "a restart keeps the pin valid"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("tls").join(SELF_SIGNED_KEY);
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The same files given explicitly give the same identity.
    let tls = dir.path().join("tls");
    let given = server_identity(
        Some(&tls.join(SELF_SIGNED_CERT)),
        Some(&tls.join(SELF_SIGNED_KEY)),
        Path::new("/nonexistent"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(given.fingerprint, first.fingerprint);
}

#[test]
fn bad_identity_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not pem").unwrap();
    let err = server_identity(Some(&junk), Some(&junk), dir.path(), &[], None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("junk.pem") && err.contains("certificate"), "{err}");
    let err = server_identity(Some(&junk), None, dir.path(), &[], None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--cert and --key"), "{err}");
    let err = Trust::Unset
        .client_config("https://hub:1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("--pin") && err.contains("https://hub:1"), "{err}");
    let err = Trust::Ca(junk.clone())
        .client_config("https://hub:1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.pem") && err.contains("CA"), "{err}");
}

/// A real handshake over a local socket pair: the pinned certificate passes, another is refused with
/// a message naming both fingerprints, and first use records what it saw.
#[tokio::test]
async fn pins_accept_only_their_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let hub = server_identity(None, None, dir.path(), &default_names(None), None).unwrap();
    let other = server_identity(None, None, &dir.path().join("other"), &default_names(None), None).unwrap();
    assert_ne!(hub.fingerprint, other.fingerprint);

    async fn handshake(server: Arc<ServerConfig>, trust: &Trust) -> Result<(), String> {
        let (a, b) = tokio::io::duplex(64 << 10);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let srv = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
        let connector = tokio_rustls::TlsConnector::from(trust.client_config("https://127.0.0.1:1").unwrap());
        let r = connector
            .connect(server_name("127.0.0.1").unwrap(), a)
            .await
            .map(|_| ())
            .map_err(|e| handshake_failure(&e));
        let _ = srv.await;
        r
    }

    handshake(hub.config.clone(), &Trust::Pin(hub.fingerprint))
        .await
        .unwrap();
    let err = handshake(other.config.clone(), &Trust::Pin(hub.fingerprint))
        .await
        .unwrap_err();
    assert!(
        err.contains(&other.fingerprint.to_string())
            && err.contains(&hub.fingerprint.to_string())
            && err.contains("update tls.pin")
            && !err.contains("OtherError"),
        "{err}"
    );
    let (trust, seen) = Trust::first_use();
    handshake(other.config.clone(), &trust).await.unwrap();
    assert_eq!(seen.get(), Some(other.fingerprint));
    // A CA file holding the (self-signed) certificate trusts it for the names it carries.
    let ca = Trust::Ca(hub.cert_path.clone());
    handshake(hub.config.clone(), &ca).await.unwrap();
    assert!(handshake(other.config.clone(), &ca).await.is_err());
}
