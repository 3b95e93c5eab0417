use std::path::PathBuf;

use super::save::{remove_registration, save_registration};
use super::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_file(p: &Path) -> LoadedConfig {
    load(Some(p), false, false).unwrap()
}

#[test]
fn tags_as_list_or_comma_string() {
    let dir = tempfile::tempdir().unwrap();
    let a = load_file(&write(&dir, "a.yml", "tags: [linux, java]\nenvs: 'QA, PROD'\n"));
    assert_eq!(a.file.tags, ["linux", "java"]);
    assert_eq!(a.file.envs, ["QA", "PROD"]);
    let b = load_file(&write(&dir, "b.yml", "tags: linux,java\n"));
    assert_eq!(b.file.tags, ["linux", "java"]);
}

#[test]
fn unknown_keys_warn_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "c.yml",
        "url: http://h:1\ncolour: blue\nregistrations:\n  - id: a\n    tokn: x\n",
    );
    let l = load_file(&p);
    assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
    assert!(l.warnings[0].contains("unknown key `colour`"));
    assert!(l.warnings[1].contains("unknown key `registrations[0].tokn`"));
}

#[test]
fn parse_errors_carry_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "bad.yml", "url: http://h:1\ntags: [a, b\nid: x\n");
    let e = load(Some(&p), false, false).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::Parse { line, .. } if line >= 2), "{msg}");
    assert!(msg.starts_with(&format!("{}:", p.display())), "{msg}");
    assert!(
        !msg.contains("error:") && !msg.contains("column"),
        "location said twice: {msg}"
    );

    let p = write(&dir, "type.yml", "url: http://h:1\ncapacity: lots\n");
    let e = load(Some(&p), false, false).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
}

#[test]
fn multi_line_values_keep_errors_on_one_line() {
    // Found by the property tests: a quoted YAML string running over several lines.
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "ml.yml", "url: 'ttp://h:1\ntags: [a]\n'\n");
    let e = load(Some(&p), false, false).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.contains("must start with http://"), "{e}");
    let p = write(&dir, "mp.yml", "mask:\n  patterns: [\"(a\\nb\"]\n");
    let e = load(Some(&p), false, false).unwrap_err().to_string();
    assert!(!e.contains('\n') && e.contains("mask.patterns[0]"), "{e}");
}

#[test]
fn invalid_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "v.yml", "policy:\n  deny: [teleport]\n");
    let e = load(Some(&p), false, false).unwrap_err().to_string();
    assert!(e.contains("unknown verb `teleport`"), "{e}");
    let p = write(&dir, "u.yml", "url: hub.example.com\n");
    let e = load(Some(&p), false, false).unwrap_err().to_string();
    assert!(e.contains("must start with http://"), "{e}");
}

#[test]
fn explicit_missing_file_is_an_error_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.yml");
    assert!(matches!(
        load(Some(&p), false, false),
        Err(ConfigError::NotFound(_))
    ));
    let l = load(Some(&p), true, false).unwrap();
    assert_eq!(l.path.as_deref(), Some(p.as_path()));
}

#[test]
fn empty_and_comment_only_files_are_empty_configs() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load_file(&write(&dir, "e.yml", "")).file.url.is_none());
    assert!(
        load_file(&write(&dir, "f.yml", "# nothing\n\n"))
            .file
            .url
            .is_none()
    );
}

#[cfg(unix)]
#[test]
fn loose_permissions_warn_and_fail_under_strict() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "p.yml", "id: a\ntoken: clatk_x\n");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let l = load_file(&p);
    assert!(
        l.warnings.iter().any(|w| w.contains("chmod 600")),
        "{:?}",
        l.warnings
    );
    assert!(matches!(
        load(Some(&p), false, true),
        Err(ConfigError::Permissions { mode: 0o644, .. })
    ));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load(Some(&p), false, true).unwrap().warnings.is_empty());
}

fn reg(id: &str, token: &str) -> Registration {
    Registration {
        id: id.into(),
        token: Some(token.into()),
        url: Some("http://hub:1".into()),
        tags: vec!["t".into()],
        envs: vec![],
        pin: None,
        ca: None,
        cert: None,
        key: None,
    }
}

#[test]
fn resolve_prefers_flags_then_file_then_registration() {
    let mut l = LoadedConfig::default();
    l.file.url = Some("http://file:1".into());
    l.file.tags = vec!["filetag".into()];
    l.file.registrations = vec![reg("w1", "tok1")];
    // One registration and no id: it is used; the file's url beats the registration's.
    let s = resolve(&l, &Overrides::default()).unwrap();
    assert_eq!(
        (s.id.as_str(), s.token.expose(), s.url.as_str()),
        ("w1", "tok1", "http://file:1")
    );
    assert_eq!(s.tags, ["t"]);
    assert_eq!(s.capacity, 1);
    // Flags win.
    let cli = Overrides {
        url: Some("http://cli:2/".into()),
        tags: vec!["x".into()],
        capacity: Some(4),
        ..Default::default()
    };
    let s = resolve(&l, &cli).unwrap();
    assert_eq!(
        (s.url.as_str(), s.tags.as_slice(), s.capacity),
        ("http://cli:2", &["x".to_owned()][..], 4)
    );
}

#[test]
fn resolve_with_several_registrations_needs_an_id() {
    let mut l = LoadedConfig::default();
    l.file.registrations = vec![reg("w1", "tok1"), reg("w2", "tok2")];
    let e = resolve(&l, &Overrides::default()).unwrap_err().to_string();
    assert!(
        e.contains("2 registrations (w1, w2)") && e.contains("--id"),
        "{e}"
    );
    let s = resolve(
        &l,
        &Overrides {
            id: Some("w2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.token.expose(), "tok2");
    assert_eq!(s.url, "http://hub:1");
    // An explicit token beats the registration's.
    let s = resolve(
        &l,
        &Overrides {
            id: Some("w2".into()),
            token: Some("cli".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.token.expose(), "cli");
}

#[test]
fn resolve_names_what_is_missing() {
    let e = resolve(&LoadedConfig::default(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no worker id"), "{e}");
    let e = resolve(
        &LoadedConfig::default(),
        &Overrides {
            id: Some("a".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no token for worker a"), "{e}");
}

#[test]
fn a_missing_token_names_where_the_id_was_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    // The config kept the id but lost the token (or never had one).
    let p = write(
        &dir,
        "lost.yml",
        "registrations:\n  - id: w1\n    url: http://h:1\n",
    );
    let e = resolve(&load_file(&p), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{} has a registration w1 but no token", p.display())),
        "{e}"
    );
    assert!(
        e.contains("`cla-hub worker unregister w1`") && e.contains("`cla-worker register --id w1 --save`"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let p = write(&dir, "top.yml", "id: w2\nurl: http://h:1\n");
    let e = resolve(&load_file(&p), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("has `id: w2` but no token"), "{e}");
    // The config is gone: the id alone, from the command line.
    let cli = Overrides {
        id: Some("w3".into()),
        url: Some("http://h:1".into()),
        ..Default::default()
    };
    let e = resolve(&LoadedConfig::default(), &cli).unwrap_err().to_string();
    assert!(
        e.contains("(no config file)") && e.contains("cla-hub worker unregister w3"),
        "{e}"
    );
}

#[test]
fn save_merges_keeps_other_keys_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "cla-worker.yml",
        "url: http://hub:1\nverbose: 1\nregistrations:\n  - id: old\n    token: t0\n",
    );
    save_registration(&p, &reg("new", "t1")).unwrap();
    save_registration(&p, &reg("old", "t2")).unwrap();
    let l = load_file(&p);
    assert_eq!(l.file.url.as_deref(), Some("http://hub:1"));
    assert_eq!(l.file.verbose, 1);
    let ids: Vec<_> = l
        .file
        .registrations
        .iter()
        .map(|r| (r.id.as_str(), r.token.as_ref().unwrap().expose()))
        .collect();
    assert_eq!(ids, [("old", "t2"), ("new", "t1")]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Written 0644 by the test: the token makes it lose access for others, the rest is kept.
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o640);
    }
    assert!(remove_registration(&p, "old").unwrap());
    assert!(!remove_registration(&p, "old").unwrap());
    let l = load_file(&p);
    assert_eq!(l.file.registrations.len(), 1);
    assert_eq!(l.file.registrations[0].id, "new");
}

#[test]
fn save_creates_a_new_file_and_refuses_to_clobber_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fresh/cla-worker.yml");
    save_registration(&p, &reg("w", "t")).unwrap();
    assert_eq!(load_file(&p).file.registrations[0].id, "w");
    let bad = write(&dir, "bad.yml", "url: [unclosed\n");
    assert!(save_registration(&bad, &reg("w", "t")).is_err());
    assert_eq!(std::fs::read_to_string(&bad).unwrap(), "url: [unclosed\n");
}

#[test]
fn example_config_parses_without_warnings() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cla-worker.example.yml");
    let l = load(Some(&p), false, false).unwrap();
    assert!(
        l.warnings.iter().all(|w| !w.contains("unknown key")),
        "{:?}",
        l.warnings
    );
    assert!(!l.file.registrations.is_empty());
    assert!(l.file.policy.is_some());
}

#[test]
fn trust_comes_from_flags_then_the_registration_then_tls() {
    let dir = tempfile::tempdir().unwrap();
    let a = format!("sha256:{}", "a".repeat(64));
    let b = format!("sha256:{}", "b".repeat(64));
    let text = format!(
        "tls:\n  pin: {b}\nregistrations:\n  - id: w1\n    token: t\n    url: https://hub:1\n    pin: {a}\n  - id: w2\n    token: t\n    url: https://hub:2\n"
    );
    let p = write(&dir, "t.yml", &text);
    let l = load(Some(&p), false, false).unwrap();
    let pin_of = |o: &Overrides| match resolve(&l, o).unwrap().trust {
        cla_common::tls::Trust::Pin(f) => f.to_string(),
        other => format!("{other:?}"),
    };
    let w1 = Overrides {
        id: Some("w1".into()),
        ..Default::default()
    };
    assert_eq!(pin_of(&w1), a, "the registration's own pin");
    let w2 = Overrides {
        id: Some("w2".into()),
        ..Default::default()
    };
    assert_eq!(pin_of(&w2), b, "the file-wide tls.pin");
    let flag = Overrides {
        pin: Some(b.clone()),
        ..w1.clone()
    };
    assert_eq!(pin_of(&flag), b, "--pin wins");
    let ca = Overrides {
        ca: Some("ca.pem".into()),
        ..w1
    };
    assert!(
        matches!(resolve(&l, &ca).unwrap().trust, cla_common::tls::Trust::Ca(_)),
        "--ca replaces the pins"
    );
    // A bad pin in the file is named with its key.
    let bad = write(&dir, "bad.yml", "registrations:\n  - id: w\n    pin: sha256:12\n");
    let err = load(Some(&bad), false, false).unwrap_err().to_string();
    assert!(
        err.contains("registrations[0].pin") && err.contains("bad certificate fingerprint"),
        "{err}"
    );
}

#[test]
fn a_rotated_token_replaces_the_one_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let new = Secret::new("clatk_new");
    // In a registration: only that one changes; other keys and registrations stay.
    let p = write(
        &dir,
        "r.yml",
        "tags: [a]\nregistrations:\n  - id: w1\n    token: old1\n  - id: w2\n    token: old2\n",
    );
    super::save::replace_token(&p, "w2", &new).unwrap();
    let l = load(Some(&p), false, false).unwrap();
    assert_eq!(l.file.registrations[0].token.as_ref().unwrap().expose(), "old1");
    assert_eq!(
        l.file.registrations[1].token.as_ref().unwrap().expose(),
        "clatk_new"
    );
    assert_eq!(l.file.tags, ["a"]);
    // At top level, with or without an id.
    let p = write(&dir, "t.yml", "id: w3\ntoken: old\nurl: http://h:1\n");
    super::save::replace_token(&p, "w3", &new).unwrap();
    assert_eq!(
        load(Some(&p), false, false).unwrap().file.token.unwrap().expose(),
        "clatk_new"
    );
    // A file without that worker's token is left alone, and says so.
    let err = super::save::replace_token(&p, "w9", &new)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no token for worker w9"), "{err}");
}
