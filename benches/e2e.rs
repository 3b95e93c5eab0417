//! End-to-end benchmark: a real `cla-hub` and `cla-worker` (release builds) on loopback, driven through
//! the hub's admin API from this process (so CLI start-up is not counted).
//!
//! `cargo bench --bench e2e` (full) or `cargo bench --bench e2e -- --quick`. Prints a table and writes
//! `target/bench/e2e.json`. Baselines are measured in the same run: ratios matter, not absolute figures.
//! `-- --tls` runs it all against a hub serving TLS and writes `target/bench/e2e-tls.json`.
//! Measures: exec round trip of `true` vs a local `sh -c true` (and `ssh 127.0.0.1 true` when an sshd
//! allows it), jobs per second vs spawning the same processes locally, stdout streaming, eval of `1+1`, the
//! idle worker's RSS and threads, connect time, and the hub holding a fleet of idle workers (simulated
//! clients, real hub), and ship/fetch of one file against `cp` of it (`benches/transfer.rs` goes deeper).

use std::process::Command;
use std::time::{Duration, Instant};

use cla_client::AdminClient;
use cla_protocol::CommandLine;
use cla_protocol::api::{EvalTask, JobSpec, JobState, Target, Task};
use tokio_util::sync::CancellationToken;

mod common;
mod fleet;

use common::transfer as xfer;
use common::{Hub, children_cpu_secs_of, cpu_secs, proc_status, run_worker};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `f` `n` times after `warm` warm-up runs; returns sorted durations in µs.
fn sample(n: usize, warm: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warm {
        f();
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--tls`: the same run with the hub serving TLS (workers and clients pinning its certificate).
    let tls = std::env::args().any(|a| a == "--tls");
    let (n_exec, n_eval) = if quick { (50, 20) } else { (500, 200) };
    if std::env::var_os("CLA_BENCH_WORKER").is_some() {
        println!("worker binary: {}", common::worker_bin().to_string_lossy());
    }
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), if tls { &["--tls"] } else { &[] });
    let data_dir = hub.data_dir.clone();
    let config = dir.path().join("w.yml");
    hub.register(&config, "bench");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = AdminClient::locate(None, None, Default::default(), &data_dir).unwrap();
    let connect_start = Instant::now();
    let worker = run_worker(&config, &["--capacity", "8"]);
    let worker_pid = worker.0.id();
    let connect_ms = rt.block_on(async {
        loop {
            if admin
                .workers()
                .await
                .unwrap()
                .iter()
                .any(|w| w.id == "bench" && w.running == 0 && w.connected_since.is_some())
            {
                return connect_start.elapsed().as_secs_f64() * 1e3;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });

    let spec = |task: Task| JobSpec {
        target: Target {
            worker: Some("bench".into()),
            tags: vec![],
            env: None,
            queue_timeout_secs: None,
        },
        task,
        workdir: None,
        env_vars: Default::default(),
        timeout_secs: None,
        on_disconnect: Default::default(),
    };
    let run = |s: &JobSpec| {
        let r = rt
            .block_on(admin.exec(s, CancellationToken::new(), cla_client::RECONNECT_FOR, |_| {}))
            .unwrap();
        assert_eq!(r.state, JobState::Succeeded, "{r:?}");
    };

    let exec_spec = spec(Task::Exec(CommandLine::Argv {
        argv: vec!["true".into()],
    }));
    let exec = sample(n_exec, 10, || run(&exec_spec));
    let fork = sample(n_exec, 10, || {
        assert!(
            Command::new("sh")
                .args(["-c", "true"])
                .status()
                .unwrap()
                .success()
        );
    });
    // What the store's durability costs on this disk: a job is fsynced twice (stored before it is offered,
    // its end stored before it is reported; docs/architecture.md, "Durability rules"), so a round trip
    // cannot beat a local fork plus two of these. Measured like the store syncs: a page written then
    // `fdatasync`, in the hub's data dir.
    let fsync = {
        use std::io::{Seek, Write};
        let path = data_dir.join("bench-fsync.tmp");
        let mut f = std::fs::File::create(&path).unwrap();
        let page = [7u8; 4096];
        f.write_all(&page).unwrap();
        f.sync_all().unwrap();
        // The same page rewritten: a sync without a size change, the cheaper kind (redb writes into
        // space it has allocated), so the floor is not flattered.
        let v = sample(n_exec, 10, || {
            f.rewind().unwrap();
            f.write_all(&page).unwrap();
            f.sync_data().unwrap();
        });
        std::fs::remove_file(&path).unwrap();
        v
    };
    // The baseline of the claim "faster than ssh": `ssh 127.0.0.1 true`, when an sshd there lets this
    // user in without a password (BatchMode); otherwise skipped, and the report says why.
    let ssh = |args: &[&str]| {
        Command::new("ssh")
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=2",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args(["127.0.0.1", "true"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ssh_p50 = if ssh(&[]) {
        let v = sample(if quick { 5 } else { 30 }, 1, || assert!(ssh(&[])));
        Some(percentile(&v, 0.5))
    } else {
        println!("ssh baseline skipped: no sshd on 127.0.0.1 that lets this user in with a key");
        None
    };

    let eval_spec = spec(Task::Eval(EvalTask {
        code: "1+1".into(),
        stash: serde_json::Value::Null,
    }));
    let eval = sample(n_eval, 3, || run(&eval_spec));

    // Throughput: many small jobs through the queue to a worker running 8 at once, kept fed by a bounded
    // number of clients that each submit a job and wait for its end.
    let n_jobs = if quick { 500 } else { 5000 };
    // Where the CPU goes meanwhile: the hub, the worker, the `true` processes it runs (its children),
    // and the clients (this process).
    let cpu = || {
        [
            cpu_secs(hub.pid()),
            cpu_secs(worker_pid),
            children_cpu_secs_of(worker_pid),
            cpu_secs(std::process::id()),
        ]
    };
    let cpu_before = cpu();
    let jobs_per_sec = rt.block_on(async {
        let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut set = tokio::task::JoinSet::new();
        let t = Instant::now();
        for _ in 0..n_jobs {
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let (admin, spec) = (admin.clone(), exec_spec.clone());
            set.spawn(async move {
                let r = admin.submit(&spec).await.unwrap();
                let r = admin.wait(&r.id, cla_client::RECONNECT_FOR).await.unwrap();
                assert_eq!(r.state, JobState::Succeeded, "{r:?}");
                drop(permit);
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        n_jobs as f64 / t.elapsed().as_secs_f64()
    });
    // CPU µs per job, by process.
    let [job_cpu_hub, job_cpu_worker, job_cpu_children, job_cpu_clients] = {
        let after = cpu();
        std::array::from_fn(|i| (after[i] - cpu_before[i]) * 1e6 / n_jobs as f64)
    };

    // The ceiling for that: the same number of `true` processes spawned here, 8 at a time.
    let self_before = cpu_secs(std::process::id()) + children_cpu_secs_of(std::process::id());
    let spawns_per_sec = {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n_jobs {
                        assert!(Command::new("true").status().unwrap().success());
                    }
                });
            }
        });
        n_jobs as f64 / t.elapsed().as_secs_f64()
    };
    // CPU µs per spawned `true` (this process spawning and waiting, plus the child itself).
    let spawn_cpu_us =
        (cpu_secs(std::process::id()) + children_cpu_secs_of(std::process::id()) - self_before) * 1e6
            / n_jobs as f64;

    // Streaming: a command writing to stdout as fast as it can; every byte is counted here.
    let stream_bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let stream_spec = spec(Task::Exec(CommandLine::Shell {
        cmd: format!("head -c {stream_bytes} /dev/zero"),
    }));
    let stream_mb_s = rt.block_on(async {
        let mut got = 0u64;
        let t = Instant::now();
        let r = admin
            .exec(
                &stream_spec,
                CancellationToken::new(),
                cla_client::RECONNECT_FOR,
                |ev| {
                    if let cla_client::ExecEvent::Stdout(b) = ev {
                        got += b.len() as u64;
                    }
                },
            )
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(r.state, JobState::Succeeded, "{r:?}");
        assert_eq!(got, stream_bytes, "bytes lost in the stream");
        stream_bytes as f64 / secs / 1e6
    });

    // Idle: a connected worker that has run jobs, left alone for 5 s.
    std::thread::sleep(Duration::from_secs(if quick { 1 } else { 5 }));
    let idle_rss_kib = proc_status(worker_pid, "VmRSS:").unwrap_or(0);
    let idle_threads = proc_status(worker_pid, "Threads:").unwrap_or(0);
    // RSS splits into the worker's own memory (anonymous: heap, stacks) and pages of its executable it has
    // touched (file-backed: shared, clean, dropped by the kernel under pressure).
    let idle_anon_kib = proc_status(worker_pid, "RssAnon:").unwrap_or(0);
    let idle_file_kib = proc_status(worker_pid, "RssFile:").unwrap_or(0);
    // What the idle worker actually touches (its working set): the kernel's referenced bits are cleared,
    // and after two heartbeats' time the pages referenced again are counted (Linux).
    let idle_touched_kib = {
        let cleared = std::fs::write(format!("/proc/{worker_pid}/clear_refs"), "1").is_ok();
        std::thread::sleep(Duration::from_secs(if quick { 1 } else { 11 }));
        let rollup = std::fs::read_to_string(format!("/proc/{worker_pid}/smaps_rollup"));
        let referenced = rollup.ok().and_then(|r| {
            r.lines()
                .find(|l| l.starts_with("Referenced:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        });
        referenced.filter(|_| cleared).unwrap_or(0)
    };

    // Ship and fetch of one file (verified), with `cp` of it as the baseline, on tmpfs when there is one
    // (`cargo bench --bench transfer` has rounds, SHA-256 baselines and peak memory).
    let xfer_bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let scratch = tempfile::Builder::new()
        .prefix("cla-bench-")
        .tempdir_in(xfer::scratch_base())
        .unwrap();
    let src = scratch.path().join("src.bin");
    xfer::make_file(&src, xfer_bytes);
    // Fault in what the copies will use, so that neither the baseline nor the transfers pay for it.
    xfer::make_file(&scratch.path().join("warm.bin"), 3 * xfer_bytes);
    std::fs::remove_file(scratch.path().join("warm.bin")).unwrap();
    let want = xfer::sha256_file(&src);
    let r = xfer::round(
        &hub,
        ("bench", worker_pid),
        scratch.path(),
        &src,
        xfer_bytes,
        &want,
    );
    let mb_s = |secs: f64| xfer_bytes as f64 / secs / 1e6;
    let gib = (1u64 << 30) as f64 / xfer_bytes as f64;
    drop(scratch);
    drop(worker);

    // Fleet: the real hub holding many idle connected workers, simulated by light protocol clients in
    // this process (registered through the API like real ones, each with its own WebSocket).
    let n_fleet = if quick { 500 } else { 10_000 };
    let hub_rss_before_kib = proc_status(hub.pid(), "VmRSS:").unwrap_or(0);
    let fleet_secs = rt.block_on(fleet::connect(
        &hub.url,
        &admin,
        &hub.cmd(&["passkey", "create", "--project", "fleet"]),
        n_fleet,
        hub.trust(),
    ));
    std::thread::sleep(Duration::from_secs(2));
    let hub_rss_kib = proc_status(hub.pid(), "VmRSS:").unwrap_or(0);
    let connected = rt
        .block_on(admin.workers())
        .unwrap()
        .iter()
        .filter(|w| w.connected_since.is_some())
        .count();

    // The least a durable round trip can take here: the local fork plus the job's two fsyncs.
    let floor_us = percentile(&fork, 0.5) + 2.0 * percentile(&fsync, 0.5);
    let mut results = serde_json::json!({
        "mode": if quick { "quick" } else { "full" },
        "tls": tls,
        "exec_p50_us": percentile(&exec, 0.5),
        "exec_p99_us": percentile(&exec, 0.99),
        "fork_p50_us": percentile(&fork, 0.5),
        "exec_vs_fork": percentile(&exec, 0.5) / percentile(&fork, 0.5),
        "fsync_p50_us": percentile(&fsync, 0.5),
        "exec_floor_us": floor_us,
        "exec_vs_floor": percentile(&exec, 0.5) / floor_us,
        "eval_p50_us": percentile(&eval, 0.5),
        "eval_p99_us": percentile(&eval, 0.99),
        "idle_rss_kib": idle_rss_kib,
        "idle_threads": idle_threads,
        "idle_rss_anon_kib": idle_anon_kib,
        "idle_rss_file_kib": idle_file_kib,
        "idle_touched_kib": idle_touched_kib,
        "connect_ms": connect_ms,
        "jobs": n_jobs,
        "jobs_per_sec": jobs_per_sec,
        "spawns_per_sec": spawns_per_sec,
        "jobs_vs_spawns": jobs_per_sec / spawns_per_sec,
        "job_cpu_us": job_cpu_hub + job_cpu_worker + job_cpu_children + job_cpu_clients,
        "job_cpu_hub_us": job_cpu_hub,
        "job_cpu_worker_us": job_cpu_worker,
        "job_cpu_process_us": job_cpu_children,
        "job_cpu_clients_us": job_cpu_clients,
        "spawn_cpu_us": spawn_cpu_us,
        "stream_mb_s": stream_mb_s,
        "ship_mb_s": mb_s(r.ship),
        "fetch_mb_s": mb_s(r.fetch),
        "cp_mb_s": mb_s(r.cp),
        "ship_vs_cp": r.cp / r.ship,
        "fetch_vs_cp": r.cp / r.fetch,
        // CPU seconds per GiB moved, all three processes (client, hub, worker): on 2 cores, a transfer
        // cannot beat 2 / this GiB/s.
        "ship_cpu_s_per_gib": r.ship_cpu.total() * gib,
        "fetch_cpu_s_per_gib": r.fetch_cpu.total() * gib,
        "hub_workers": connected,
        "hub_rss_mib": hub_rss_kib as f64 / 1024.0,
        "hub_rss_before_fleet_mib": hub_rss_before_kib as f64 / 1024.0,
        "fleet_connect_s": fleet_secs,
    });
    if let Some(ssh) = ssh_p50 {
        results["ssh_p50_us"] = serde_json::json!(ssh);
        results["ssh_vs_exec"] = serde_json::json!(ssh / percentile(&exec, 0.5));
    }
    common::report(if tls { "e2e-tls" } else { "e2e" }, &results);
    // Not a goal check (the machines are noisy): a guard against gross regressions, such as a small
    // frame held back by Nagle's algorithm for a delayed ACK (40 ms a job, 60× fork, seen once).
    let ratio = percentile(&exec, 0.5) / percentile(&fork, 0.5);
    assert!(
        ratio < 20.0,
        "an exec round trip costs {ratio:.0}× a local fork (normally about 3×): something waits"
    );
}
