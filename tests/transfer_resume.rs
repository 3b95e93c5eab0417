//! Ship and fetch across a cut connection (docs/architecture.md, "Durability rules"): the worker's link
//! to the hub goes through a proxy the test severs mid-transfer and restores; the transfer resumes where
//! it was, and the receiver verifies every file's SHA-256 as always.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::*;

const MIB: usize = 1 << 20;

/// Deterministic bytes, different for each seed.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Bytes written so far into staging files (`.NAME.cla-XXXX.part`) under `dir`.
fn staged_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() && !p.is_symlink() {
            n += staged_bytes(&p);
        } else if name.ends_with(".part") || p.parent().is_some_and(|d| d.to_string_lossy().contains(".cla-"))
        {
            n += e.metadata().map_or(0, |m| m.len());
        }
    }
    n
}

/// A hub, a proxy to it, and worker `w1` connected through the proxy; `env` goes to the worker.
fn proxied_worker(dir: &Path, env: &[(&str, &str)]) -> (Hub, Proxy, Proc) {
    let hub = Hub::start(dir);
    let proxy = Proxy::start(&hub.addr);
    let setup = register(&hub, dir, "w1", "t");
    let worker = run_worker_env(&setup, &["--url", &proxy.url], env);
    hub.wait_worker_state("w1", "idle", 20);
    (hub, proxy, worker)
}

/// Cuts the worker's link once `staged` says the receiver has written at least `at` bytes, keeps it cut
/// until the hub has noticed and a moment more, and restores it.
fn cut_mid_transfer(hub: &Hub, proxy: &Proxy, at: u64, staged: impl Fn() -> u64) {
    wait_until("the receiver to be part-way", 60, || staged() >= at);
    proxy.cut();
    hub.wait_worker_state("w1", "offline", 20);
    std::thread::sleep(Duration::from_millis(800));
    proxy.restore();
}

/// The one job on the hub, once it ended.
fn only_job(hub: &Hub) -> serde_json::Value {
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "one job, run once: {jobs:?}");
    job_json(hub, jobs[0]["id"].as_str().unwrap(), true)
}

fn transfer_client(hub: &Hub, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = hub.cmd();
    cmd.arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// `cla-hub fetch` of `src` on w1 into the directory `local`.
fn fetch_into(hub: &Hub, src: &Path, local: &Path) -> std::process::Child {
    let into = format!("{}/", local.display());
    transfer_client(
        hub,
        &["fetch", "--worker", "w1", src.to_str().unwrap(), &into],
        &[],
    )
}

fn finish(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "transfer failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_ship_cut_mid_way_resumes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, proxy, worker) = proxied_worker(dir.path(), &[]);
    let data = bytes(40 * MIB, 3);
    let local = dir.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    let remote = dir.path().join("remote");
    std::fs::create_dir(&remote).unwrap();

    // A slow sender (debug hook: 50 ms per 1 MiB chunk), so that the cut lands mid-way.
    let client = transfer_client(
        &hub,
        &[
            "ship",
            "--worker",
            "w1",
            local.to_str().unwrap(),
            &format!("{}/", remote.display()),
        ],
        &[("CLA_TEST_CHUNK_DELAY_MS", "50")],
    );
    cut_mid_transfer(&hub, &proxy, 8 * MIB as u64, || staged_bytes(&remote));
    let summary = finish(client);

    assert_eq!(summary["sha256"], sha256_hex(&data), "{summary}");
    assert_eq!(std::fs::read(remote.join("big.bin")).unwrap(), data);
    let v = only_job(&hub);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(proxy.connections() >= 2, "the worker reconnected");
    worker.wait_for_line("transfer resumed", 10);
    assert_eq!(staged_bytes(&remote), 0, "no staging left");
}

#[test]
fn a_fetch_of_a_directory_cut_mid_way_resumes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    // A slow sender on the worker's side this time.
    let (hub, proxy, worker) = proxied_worker(dir.path(), &[("CLA_TEST_CHUNK_DELAY_MS", "40")]);
    let src = dir.path().join("src/tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for (i, (name, size)) in [
        ("a.bin", 9 * MIB),
        ("sub/b.bin", 12 * MIB + 5),
        ("sub/small.txt", 10),
        ("c.bin", 11 * MIB),
    ]
    .into_iter()
    .enumerate()
    {
        let content = bytes(size, i as u8 + 10);
        std::fs::write(src.join(name), &content).unwrap();
        files.push((PathBuf::from(name), content));
    }
    let local = dir.path().join("here");
    std::fs::create_dir(&local).unwrap();

    let client = fetch_into(&hub, &src, &local);
    cut_mid_transfer(&hub, &proxy, 12 * MIB as u64, || staged_bytes(&local));
    let summary = finish(client);

    assert_eq!(summary["files"], 4, "{summary}");
    for (name, content) in &files {
        let got = std::fs::read(local.join("tree").join(name)).unwrap();
        assert!(got == *content, "{} differs", name.display());
    }
    let v = only_job(&hub);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(proxy.connections() >= 2, "the worker reconnected");
    worker.wait_for_line("transfer resumed", 10);
    assert_eq!(staged_bytes(&local), 0, "no staging left");
}

#[test]
fn a_transfer_whose_worker_never_returns_ends_lost_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--lost-after", "2"]);
    let setup = register(&hub, dir.path(), "w1", "t");
    let mut worker = run_worker_env(&setup, &[], &[("CLA_TEST_CHUNK_DELAY_MS", "50")]);
    hub.wait_worker_state("w1", "idle", 20);
    let src = dir.path().join("big.bin");
    std::fs::write(&src, bytes(30 * MIB, 1)).unwrap();
    let local = dir.path().join("here");
    std::fs::create_dir(&local).unwrap();

    let client = fetch_into(&hub, &src, &local);
    wait_until("the fetch to be part-way", 60, || {
        staged_bytes(&local) >= 4 * MIB as u64
    });
    worker.kill();
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("w1 is disconnected: waiting up to 2s"),
        "the client says it waits: {err}"
    );
    assert!(err.contains("did not come back within 2s"), "{err}");
    let v = only_job(&hub);
    assert_eq!(v["state"], "lost", "{v}");
    assert_eq!(
        staged_bytes(&local),
        0,
        "the receiver removed what it had written"
    );
    assert!(!local.join("big.bin").exists());
}
