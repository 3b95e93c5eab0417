//! The chaos harness (ignored by default; `cargo test --release --test integration -- --ignored chaos`).
//!
//! Each iteration submits a few jobs to one worker that reaches its hub through a proxy, then hurts the
//! system at a random moment: the worker's connection cut for a while, the hub killed with SIGKILL and
//! restarted, the worker killed with SIGKILL and restarted, or nothing (control). Every job appends a
//! line to its own file when it starts and prints numbered lines on stdout and stderr, so a job run twice
//! and a byte lost both show. Each iteration also ships or fetches a file of a few MiB (slowed down by
//! the debug builds' chunk delay hook, so that faults land mid-transfer) and compares what arrived. At
//! the end it prints the counts; it fails on any duplicate, any output missing from a job that
//! succeeded, any job lost other than by a killed process, and any transfer that arrived different or
//! half-written.
//!
//! `CLA_CHAOS_ITERATIONS` (default 100) and `CLA_CHAOS_SEED` (default: the clock) set the run;
//! `.ci/run` runs a few iterations.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;

/// xorshift64*: enough randomness for fault timing, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Cut,
    HubKill,
    WorkerKill,
}

#[derive(Default, Debug)]
struct Counts {
    submitted: u64,
    succeeded_once: u64,
    duplicated: u64,
    lost_worker_killed: u64,
    lost_other: u64,
    other_end: u64,
    bytes_expected: u64,
    bytes_missing: u64,
    /// Succeeded jobs whose record says the hub missed output (its own byte count check).
    flagged_incomplete: u64,
    transfers: u64,
    /// Transfers still running when their link was cut.
    transfers_cut_mid_way: u64,
    /// Succeeded, with the destination identical to the source.
    transfers_verified: u64,
    /// Lost (or never stored) because the hub or the worker was killed under them.
    transfers_lost_killed: u64,
    /// Anything else: lost to a cut, a failure, a destination that differs or is half-written, a client
    /// whose exit disagrees with the job.
    transfers_bad: u64,
}

/// One ship or fetch of an iteration, run by a `cla-hub` client in the background.
struct Transfer {
    child: Child,
    /// A name unique to this transfer (it is in the job's spec).
    src: PathBuf,
    dest: PathBuf,
    data: Vec<u8>,
}

impl Transfer {
    fn start(hub: &Hub, dir: &Path, it: u64, rng: &mut Rng) -> Transfer {
        let size = (4 + rng.below(8) as usize) * (1 << 20) + rng.below(4096) as usize;
        let data: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(it as u8))
            .collect();
        let base = dir.join(format!("transfer-{it}"));
        std::fs::create_dir_all(&base).unwrap();
        let (src, dest) = (base.join(format!("src-{it}.bin")), base.join("dest.bin"));
        std::fs::write(&src, &data).unwrap();
        // Ship and fetch in turn; client and worker share this machine's file system.
        let verb = if it.is_multiple_of(2) { "ship" } else { "fetch" };
        let child = hub
            .cmd()
            .env("CLA_TEST_CHUNK_DELAY_MS", CHUNK_DELAY_MS)
            .args([
                verb,
                "--worker",
                "cw",
                src.to_str().unwrap(),
                dest.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Transfer {
            child,
            src,
            dest,
            data,
        }
    }

    fn check(mut self, hub: &Hub, it: u64, fault: Fault, counts: &mut Counts) {
        counts.transfers += 1;
        let mut status = None;
        wait_until("the transfer client to exit", 180, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let ok = status.unwrap().success();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err);
        let jobs: serde_json::Value =
            serde_json::from_str(&hub.ok(&["jobs", "--json", "--limit", "0"])).unwrap();
        let name = self.src.file_name().unwrap().to_string_lossy().into_owned();
        let mine: Vec<&serde_json::Value> = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j.to_string().contains(&name))
            .collect();
        let killed = matches!(fault, Fault::HubKill | Fault::WorkerKill);
        let arrived = std::fs::read(&self.dest).ok();
        let whole = arrived.as_ref().is_none_or(|d| *d == self.data);
        let verdict = match (mine.as_slice(), arrived.is_some()) {
            _ if !whole => Err("the destination differs from the source (half-written?)".to_owned()),
            ([j], true) if ok && j["state"] == "succeeded" => Ok(true),
            ([j], _) if killed && !ok && j["state"] == "lost" => Ok(false),
            ([], false) if fault == Fault::HubKill && !ok => Ok(false),
            _ => Err(format!(
                "client ok={ok}, job(s) {:?}: {err}",
                mine.iter()
                    .map(|j| (&j["state"], &j["error"]))
                    .collect::<Vec<_>>()
            )),
        };
        match verdict {
            Ok(true) => counts.transfers_verified += 1,
            Ok(false) => counts.transfers_lost_killed += 1,
            Err(why) => {
                eprintln!("iteration {it} ({fault:?}): transfer of {name}: {why}");
                counts.transfers_bad += 1;
            }
        }
    }
}

/// The debug builds' sender delay per 1 MiB chunk (see `src/transfer/mod.rs`, hooks).
const CHUNK_DELAY_MS: &str = "40";

const JOBS_PER_ITERATION: u32 = 3;
const LINES: u32 = 12;

fn expected(prefix: &str) -> String {
    (1..=LINES).map(|i| format!("{prefix} {i}\n")).collect()
}

fn submit(hub: &Hub, runs: &Path, pause_ms: u64) -> String {
    let script = format!(
        "echo run >> {}; for i in $(seq 1 {LINES}); do echo out $i; echo err $i >&2; sleep {}; done",
        runs.display(),
        pause_ms as f64 / 1000.0
    );
    hub.detach("cw", &[], &script)
}

#[test]
#[ignore = "long: the chaos harness (run with --ignored chaos)"]
fn chaos() {
    let iterations: u64 = std::env::var("CLA_CHAOS_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("CLA_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos: {iterations} iterations, seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--lost-after", "20"]);
    let addr = hub.addr.clone();
    let proxy = Proxy::start(&addr);
    let setup = register(&hub, dir.path(), "cw", "chaos");
    let worker_env = [("CLA_TEST_CHUNK_DELAY_MS", CHUNK_DELAY_MS)];
    let run = |setup| run_worker_env(setup, &["--url", &proxy.url, "--capacity", "2"], &worker_env);
    let mut worker = run(&setup);
    hub.wait_worker_state("cw", "idle", 30);

    let mut counts = Counts::default();
    let mut by_fault: std::collections::BTreeMap<String, u64> = Default::default();
    let started = Instant::now();
    for it in 0..iterations {
        let fault = match rng.below(4) {
            0 => Fault::None,
            1 => Fault::Cut,
            2 => Fault::HubKill,
            _ => Fault::WorkerKill,
        };
        *by_fault.entry(format!("{fault:?}")).or_default() += 1;
        let jobs: Vec<(String, std::path::PathBuf)> = (0..JOBS_PER_ITERATION)
            .map(|n| {
                let runs = dir.path().join(format!("runs-{it}-{n}"));
                (submit(&hub, &runs, 20 + rng.below(40)), runs)
            })
            .collect();
        counts.submitted += jobs.len() as u64;
        let mut transfer = Transfer::start(&hub, dir.path(), it, &mut rng);
        std::thread::sleep(Duration::from_millis(50 + rng.below(500)));
        match fault {
            Fault::None => {}
            Fault::Cut => {
                if transfer.child.try_wait().unwrap().is_none() {
                    counts.transfers_cut_mid_way += 1;
                }
                proxy.cut();
                std::thread::sleep(Duration::from_millis(200 + rng.below(1500)));
                proxy.restore();
            }
            Fault::HubKill => {
                hub.proc.signal(Signal::SIGKILL);
                hub.proc.kill();
                std::thread::sleep(Duration::from_millis(rng.below(800)));
                hub = Hub::start_with(dir.path(), &addr, &["--lost-after", "20"]);
            }
            Fault::WorkerKill => {
                worker.signal(Signal::SIGKILL);
                worker.kill();
                std::thread::sleep(Duration::from_millis(rng.below(500)));
                worker = run(&setup);
            }
        }
        for (id, runs) in &jobs {
            let v = job_json(&hub, id, true);
            let ran = std::fs::read_to_string(runs)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            let want = expected("out").len() + expected("err").len();
            match v["state"].as_str().unwrap() {
                "succeeded" => {
                    counts.bytes_expected += want as u64;
                    let got = [("out", "stdout"), ("err", "stderr")]
                        .iter()
                        .map(|(p, f)| {
                            let text = v[*f].as_str().unwrap();
                            if text == expected(p) { text.len() } else { 0 }
                        })
                        .sum::<usize>();
                    counts.bytes_missing += (want - got) as u64;
                    if got != want {
                        eprintln!("iteration {it} ({fault:?}): job {id} output differs: {v}");
                    }
                    if ran == 1 {
                        counts.succeeded_once += 1;
                    }
                    if v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("output incomplete"))
                    {
                        eprintln!("iteration {it} ({fault:?}): job {id} flagged: {}", v["error"]);
                        counts.flagged_incomplete += 1;
                    }
                }
                "lost" if fault == Fault::WorkerKill => counts.lost_worker_killed += 1,
                "lost" => {
                    eprintln!("iteration {it} ({fault:?}): job {id} lost: {}", v["error"]);
                    counts.lost_other += 1;
                }
                other => {
                    eprintln!(
                        "iteration {it} ({fault:?}): job {id} ended {other}: {}",
                        v["error"]
                    );
                    counts.other_end += 1;
                }
            }
            if ran > 1 {
                eprintln!("iteration {it} ({fault:?}): job {id} ran {ran} times");
                counts.duplicated += 1;
            }
        }
        transfer.check(&hub, it, fault, &mut counts);
        // The next iteration starts with the worker back.
        hub.wait_worker_state("cw", "idle", 60);
    }
    let secs = started.elapsed().as_secs_f64();
    println!("chaos: {iterations} iterations in {secs:.0}s, seed {seed}, faults {by_fault:?}");
    println!("  jobs submitted                  {}", counts.submitted);
    println!("  succeeded, run exactly once     {}", counts.succeeded_once);
    println!("  duplicated (run twice)          {}", counts.duplicated);
    println!("  lost: worker killed (expected)  {}", counts.lost_worker_killed);
    println!("  lost: otherwise                 {}", counts.lost_other);
    println!("  other ends                      {}", counts.other_end);
    println!(
        "  output bytes missing            {} of {}",
        counts.bytes_missing, counts.bytes_expected
    );
    println!("  flagged incomplete by the hub   {}", counts.flagged_incomplete);
    println!("  transfers                       {}", counts.transfers);
    println!(
        "  cut mid-way                     {}",
        counts.transfers_cut_mid_way
    );
    println!("  verified at the destination     {}", counts.transfers_verified);
    println!(
        "  lost: hub/worker killed (exp.)  {}",
        counts.transfers_lost_killed
    );
    println!("  lost otherwise, or bad          {}", counts.transfers_bad);
    assert_eq!(counts.duplicated, 0, "{counts:?}");
    assert_eq!(counts.lost_other, 0, "{counts:?}");
    assert_eq!(counts.other_end, 0, "{counts:?}");
    assert_eq!(counts.bytes_missing, 0, "{counts:?}");
    assert_eq!(counts.flagged_incomplete, 0, "{counts:?}");
    assert_eq!(counts.transfers_bad, 0, "{counts:?}");
    assert_eq!(
        counts.succeeded_once + counts.lost_worker_killed,
        counts.submitted,
        "{counts:?}"
    );
}
