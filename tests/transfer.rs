//! `cla-hub ship` / `cla-hub fetch` through a real hub and worker: files of every size, trees with modes,
//! times and links, corruption, cancels, concurrency, a full disk, and the clear errors.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

use crate::common::*;

/// One chunk on the wire (`cla_transfer::CHUNK`).
const CHUNK: usize = 1 << 20;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic bytes of any length.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}\n{}", o.status, stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn ship(hub: &Hub, worker: &str, local: &Path, remote: &str) -> Output {
    hub.run(&[
        "--json",
        "ship",
        "--worker",
        worker,
        local.to_str().unwrap(),
        remote,
    ])
}

fn fetch(hub: &Hub, worker: &str, remote: &str, local: &Path) -> Output {
    hub.run(&[
        "--json",
        "fetch",
        "--worker",
        worker,
        remote,
        local.to_str().unwrap(),
    ])
}

/// Names in `dir` that look like transfer staging (`.NAME.cla-XXXX.part`), recursively.
fn staging_left(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().ends_with(".part") {
            found.push(p.clone());
        }
        if p.is_dir() && !p.is_symlink() {
            found.extend(staging_left(&p));
        }
    }
    found
}

#[test]
fn files_of_every_size_round_trip_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    let remote = dir.path().join("remote");
    let back = dir.path().join("back");
    for (name, size) in [
        ("empty", 0),
        ("one", 1),
        ("odd", 12_345),
        ("multi", 2 * CHUNK + 17),
    ] {
        let local = dir.path().join(name);
        let data = bytes(size, size as u8);
        std::fs::write(&local, &data).unwrap();
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();

        // Into a directory that does not exist yet (`dest/` = put it inside).
        let v = json(&ship(&hub, "w1", &local, &format!("{}/", remote.display())));
        assert_eq!(v["sha256"], sha256_hex(&data), "{name}");
        assert_eq!(v["bytes"], size as u64);
        assert_eq!(v["worker"], "w1");
        let there = remote.join(name);
        assert_eq!(std::fs::read(&there).unwrap(), data, "{name} shipped");
        let (src_meta, there_meta) = (
            std::fs::metadata(&local).unwrap(),
            std::fs::metadata(&there).unwrap(),
        );
        assert_eq!(there_meta.mode() & 0o777, 0o640, "{name}: mode kept");
        assert_eq!(
            (there_meta.mtime(), there_meta.mtime_nsec()),
            (src_meta.mtime(), src_meta.mtime_nsec()),
            "{name}: mtime kept"
        );

        // And back, to an exact file name.
        let out = back.join(format!("{name}.copy"));
        let v = json(&fetch(&hub, "w1", there.to_str().unwrap(), &out));
        assert_eq!(v["sha256"], sha256_hex(&data));
        assert_eq!(v["to"], out.display().to_string());
        assert_eq!(std::fs::read(&out).unwrap(), data, "{name} fetched");
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o640);
    }
    assert!(staging_left(dir.path()).is_empty());

    // The hub keeps each transfer as a job.
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 8);
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"));
    assert_eq!(jobs.iter().filter(|j| j["spec"]["ship"].is_object()).count(), 4);
    assert_eq!(jobs.iter().filter(|j| j["spec"]["fetch"].is_object()).count(), 4);
    assert!(
        jobs.iter()
            .all(|j| j["transfer"]["sha256"].as_str().unwrap().len() == 64)
    );
    let listing = hub.ok(&["jobs"]);
    assert!(
        listing.contains("ship ") && listing.contains("fetch "),
        "{listing}"
    );

    // Without --json: one summary line with the size, rate and checksum.
    let local = dir.path().join("odd");
    let o = hub.run(&[
        "ship",
        "--worker",
        "w1",
        local.to_str().unwrap(),
        remote.join("plain").to_str().unwrap(),
    ]);
    let line = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        line.starts_with("shipped ")
            && line.contains("MB/s")
            && line.contains(&sha256_hex(&bytes(12_345, 12_345u32 as u8))),
        "{line}"
    );
}

/// Everything about a tree that must survive a round trip: per path, its kind, mode, mtime (files and
/// directories), content or link target.
fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.mode() & 0o777;
            if m.file_type().is_symlink() {
                out.push(format!("{rel} -> {}", std::fs::read_link(&p).unwrap().display()));
            } else if m.is_dir() {
                out.push(format!("{rel}/ {mode:o} {}.{}", m.mtime(), m.mtime_nsec()));
                stack.push(p);
            } else {
                let sum = sha256_hex(&std::fs::read(&p).unwrap());
                out.push(format!("{rel} {mode:o} {}.{} {sum}", m.mtime(), m.mtime_nsec()));
            }
        }
    }
    out.sort();
    out
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("conf/deep/er")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("conf/app.yml"), b"a: 1\n").unwrap();
    std::fs::set_permissions(root.join("conf/app.yml"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(root.join("conf/deep/er/big.bin"), bytes(CHUNK + 5, 3)).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::os::unix::fs::symlink("conf/app.yml", root.join("link-in")).unwrap();
    // A link pointing out of the tree is kept as a link, never followed.
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-out")).unwrap();
    std::fs::set_permissions(root.join("conf/deep"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // Directory times are set last, after their contents (a write would change them).
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
    for d in ["conf/deep/er", "conf/deep", "conf", "bin", "empty-dir", ""] {
        std::fs::File::open(root.join(d))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
}

#[test]
fn directories_round_trip_exactly_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    let src = dir.path().join("site");
    make_tree(&src);
    let want = describe(&src);

    let remote = dir.path().join("remote/site");
    let v = json(&ship(&hub, "w1", &src, remote.to_str().unwrap()));
    assert_eq!(
        (v["files"].as_u64(), v["dirs"].as_u64(), v["symlinks"].as_u64()),
        (Some(4), Some(6), Some(2))
    );
    assert_eq!(describe(&remote), want, "shipped tree differs");
    let shipped_digest = v["sha256"].clone();

    // `LOCAL/` puts the directory inside LOCAL, under its own name.
    let back = dir.path().join("back");
    let v = json(&fetch(
        &hub,
        "w1",
        remote.to_str().unwrap(),
        &PathBuf::from(format!("{}/", back.display())),
    ));
    assert_eq!(describe(&back.join("site")), want, "fetched tree differs");
    assert_eq!(v["sha256"], shipped_digest, "same content, same manifest digest");

    // Shipping onto an existing directory merges: changed files are replaced, others stay.
    std::fs::write(src.join("conf/app.yml"), b"a: 2\n").unwrap();
    std::fs::write(remote.join("only-there"), b"keep me").unwrap();
    json(&ship(&hub, "w1", &src, remote.to_str().unwrap()));
    assert_eq!(std::fs::read(remote.join("conf/app.yml")).unwrap(), b"a: 2\n");
    assert_eq!(std::fs::read(remote.join("only-there")).unwrap(), b"keep me");
    assert!(staging_left(dir.path()).is_empty());
}

#[test]
fn corrupted_chunks_are_detected_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    let local = dir.path().join("data.bin");
    std::fs::write(&local, bytes(3 * CHUNK, 9)).unwrap();
    let remote = dir.path().join("remote");

    // Ship: the CLI flips a byte after hashing (debug-build test hook); the worker refuses the file.
    let o = hub
        .cmd()
        .env("CLA_TEST_CORRUPT_CHUNK", "1")
        .args([
            "ship",
            "--worker",
            "w1",
            local.to_str().unwrap(),
            remote.join("data.bin").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    assert!(
        !remote.exists(),
        "the created directory and the partial file are gone"
    );

    // Fetch from a worker that corrupts what it sends: the CLI refuses it.
    let w2 = register(&hub, dir.path(), "w2", "corrupt");
    let _bad = run_worker_env(&w2, &[], &[("CLA_TEST_CORRUPT_CHUNK", "1")]);
    hub.wait_worker_state("w2", "idle", 20);
    let out = dir.path().join("fetched/data.bin");
    let o = hub.run(&[
        "fetch",
        "--worker",
        "w2",
        local.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    assert!(!dir.path().join("fetched").exists());
    let jobs: serde_json::Value =
        serde_json::from_str(&hub.ok(&["jobs", "--json", "--state", "failed"])).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 2);
    drop(setup);
}

#[test]
fn cancelled_or_abandoned_transfers_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    let local = dir.path().join("slow.bin");
    std::fs::write(&local, bytes(20 * CHUNK, 1)).unwrap();
    let remote = dir.path().join("remote/deeper");

    for (how, signal) in [
        ("ctrl-c", nix::sys::signal::Signal::SIGINT),
        ("killed client", nix::sys::signal::Signal::SIGKILL),
    ] {
        // A slow sender (debug hook: 150 ms per chunk), stopped once the worker is writing.
        let mut cmd = hub.cmd();
        cmd.env("CLA_TEST_CHUNK_DELAY_MS", "150")
            .args([
                "ship",
                "--worker",
                "w1",
                local.to_str().unwrap(),
                remote.join("slow.bin").to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        wait_until("the worker to stage the file", 30, || {
            !staging_left(dir.path()).is_empty()
        });
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = child.wait().unwrap();
        if signal == nix::sys::signal::Signal::SIGINT {
            assert_eq!(status.code(), Some(130), "{how}");
        }
        wait_until(&format!("{how}: the staged file to be removed"), 20, || {
            staging_left(dir.path()).is_empty()
        });
        assert!(!remote.join("slow.bin").exists(), "{how}");
        wait_until(
            &format!("{how}: the created directories to be removed"),
            10,
            || !dir.path().join("remote").exists(),
        );
    }
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let states: Vec<_> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, ["cancelled", "cancelled"]);
    // The worker is free again.
    hub.wait_worker_state("w1", "idle", 10);
}

#[test]
fn concurrent_transfers_to_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    // Capacity 1: transfers do not use exec slots.
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    let remote = dir.path().join("remote");
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let local = dir.path().join(format!("f{i}"));
            std::fs::write(&local, bytes(CHUNK * 3 + i as usize, i)).unwrap();
            let mut cmd = hub.cmd();
            cmd.args([
                "--json",
                "ship",
                "--tags",
                "linux",
                local.to_str().unwrap(),
                &format!("{}/", remote.display()),
            ]);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    for h in handles {
        json(&h.join().unwrap());
    }
    for i in 0..4u8 {
        assert_eq!(
            std::fs::read(remote.join(format!("f{i}"))).unwrap(),
            bytes(CHUNK * 3 + i as usize, i)
        );
    }
}

/// A tmpfs of 1 MiB mounted on `at` (root only, where mounting is allowed), unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path) -> Option<SmallFs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        ok.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big.bin");
    std::fs::write(&local, bytes(3 * CHUNK, 5)).unwrap();
    let small = dir.path().join("small");
    // A real full file system where we may mount one; else the receiver's injected ENOSPC (debug hook).
    let fs = SmallFs::mount(&small);
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "w1", "linux");
    let mut env = vec![];
    if fs.is_none() {
        std::fs::create_dir_all(&small).unwrap();
        env.push(("CLA_TEST_FAIL_WRITE_AFTER", "1048576"));
    }
    let _worker = run_worker_env(&setup, &[], &env);
    hub.wait_worker_state("w1", "idle", 20);

    let o = hub.run(&[
        "ship",
        "--worker",
        "w1",
        local.to_str().unwrap(),
        small.join("big.bin").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("no space left on the device"), "{err}");
    assert!(err.contains("free some space"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
    assert!(
        left.is_empty(),
        "{left:?} left behind (real tmpfs: {})",
        fs.is_some()
    );
}

#[test]
fn bad_paths_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "w1", "linux");
    let file = dir.path().join("f.txt");
    std::fs::write(&file, b"x").unwrap();

    // A missing local source fails before any job is made.
    let o = hub.run(&["ship", "--worker", "w1", "/no/such/file", "/tmp/x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/no/such/file: no such file or directory"),
        "{}",
        stderr(&o)
    );
    // A missing remote source.
    let o = hub.run(&[
        "fetch",
        "--worker",
        "w1",
        "/no/such/remote",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/no/such/remote: no such file or directory"),
        "{}",
        stderr(&o)
    );
    // --no-mkdir refuses a missing parent, naming it.
    let missing = dir.path().join("nope/f.txt");
    let o = hub.run(&[
        "ship",
        "--worker",
        "w1",
        "--no-mkdir",
        file.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("does not exist") && stderr(&o).contains("--no-mkdir"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("nope").exists());
    // A file cannot replace a directory.
    let o = hub.run(&[
        "fetch",
        "--worker",
        "w1",
        file.to_str().unwrap(),
        &format!("{}", dir.path().join("hub").display()),
    ]);
    assert!(
        o.status.success(),
        "an existing directory takes the file inside: {}",
        stderr(&o)
    );
    assert!(dir.path().join("hub/f.txt").exists());
    // No worker matches.
    let o = hub.run(&[
        "ship",
        "--tags",
        "windows",
        "--queue-timeout",
        "0.5",
        file.to_str().unwrap(),
        "/tmp/x",
    ]);
    assert_eq!(o.status.code(), Some(252));
    assert!(
        stderr(&o).contains("no registered worker has tags [windows]"),
        "{}",
        stderr(&o)
    );
    // Transfers need their client: a detached job is refused by the API.
    let token = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(hub.data_dir.join("hub.json")).unwrap(),
    )
    .unwrap();
    let token = token["admin_token"].as_str().unwrap();
    let o = Command::new("curl")
        .args([
            "-s",
            "-H",
            &format!("authorization: Bearer {token}"),
            "-d",
            r#"{"worker":"w1","ship":{"dest":"/tmp/x"}}"#,
        ])
        .arg(format!("{}/api/v1/admin/jobs", hub.url))
        .output();
    if let Ok(o) = o {
        assert!(stdout(&o).contains("stream through the client"), "{}", stdout(&o));
    }
}

#[test]
fn permission_errors_name_the_path_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "w1", "linux");
    let locked = dir.path().join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"only the owner").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Root may write anywhere: run the worker as `nobody` then (its config copied where it can read it).
    let root = nix::unistd::Uid::effective().is_root();
    let mut cmd;
    if root {
        let home = dir.path().join("nobody");
        std::fs::create_dir_all(&home).unwrap();
        let config = home.join("w.yml");
        std::fs::copy(&setup.config, &config).unwrap();
        for p in [dir.path(), home.as_path(), config.as_path()] {
            nix::unistd::chown(
                p,
                Some(nix::unistd::Uid::from_raw(65534)),
                Some(nix::unistd::Gid::from_raw(65534)),
            )
            .unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&locked, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        nix::unistd::chown(&secret, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(WORKER)
            .arg("-c")
            .arg(&config);
    } else {
        cmd = Command::new(WORKER);
        cmd.arg("-c").arg(&setup.config);
        // Without root, a file we own and made unreadable stands in for someone else's.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    cmd.arg("run");
    let _worker = Proc::spawn(cmd);
    hub.wait_worker_state("w1", "idle", 20);

    let file = dir.path().join("f.txt");
    std::fs::write(&file, b"x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = hub.run(&[
        "ship",
        "--worker",
        "w1",
        file.to_str().unwrap(),
        locked.join("f.txt").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("permission denied") && stderr(&o).contains("locked"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&locked).unwrap().count(), 0);

    let o = hub.run(&[
        "fetch",
        "--worker",
        "w1",
        secret.to_str().unwrap(),
        dir.path().join("got.txt").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("secret.txt: permission denied"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("got.txt").exists());
}
