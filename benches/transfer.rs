//! Transfer benchmark: `cla-hub ship` and `cla-hub fetch` of one large file through a real hub and worker
//! (release builds) on loopback, with `cp` of the same file and SHA-256 of the same bytes measured in the
//! same run as baselines, and the peak RSS of the hub and the worker.
//!
//! `cargo bench --bench transfer` (1 GiB, 3 rounds) or `cargo bench --bench transfer -- --quick` (64 MiB,
//! 1 round); `--size-mib N` and `--rounds N` override. Files live on tmpfs (`/dev/shm`) when it exists, so
//! the disk is not what is measured (as for the `cp` baseline). Prints a table and writes
//! `target/bench/transfer.json`.

mod common;

use common::transfer::{self as xfer, make_file, scratch_base, sha256_file, timed};
use common::{Hub, proc_status, run_worker};

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size_mib = arg("--size-mib").unwrap_or(if quick { 64 } else { 1024 });
    let rounds = arg("--rounds").unwrap_or(if quick { 1 } else { 3 }).max(1);
    let size = size_mib << 20;
    let base = scratch_base();
    let dir = tempfile::Builder::new()
        .prefix("cla-bench-")
        .tempdir_in(&base)
        .unwrap();
    let d = dir.path();

    // Hub and worker, fresh: their peak RSS is what this run makes them use.
    let hub = Hub::start(d);
    let config = d.join("w.yml");
    hub.register(&config, "bench");
    let worker = run_worker(&config, &[]);
    let worker_pid = worker.0.id();
    for _ in 0..200 {
        if hub.cmd(&["workers", "--json"]).contains("\"idle\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let src = d.join("src.bin");
    make_file(&src, size);
    // Virtual machines fault fresh guest memory in slowly the first time it is touched: write and drop
    // what the run will hold at most besides the source (the shipped and the fetched copy, and a spare),
    // so that neither the baselines nor the transfers pay for it.
    make_file(&d.join("warm.bin"), 3 * size);
    std::fs::remove_file(d.join("warm.bin")).unwrap();

    let want = sha256_file(&src);
    let (mut cp, mut sha, mut sha2x, mut ship, mut fetch) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut ship_cpu, mut fetch_cpu): (Vec<xfer::Cpu>, Vec<xfer::Cpu>) = (vec![], vec![]);
    for round in 0..rounds {
        sha.push(timed(|| assert_eq!(sha256_file(&src), want)));
        // A verified transfer hashes on both ends at once: two concurrent SHA-256 streams are its ceiling
        // (on SMT siblings they share one core's SHA unit).
        sha2x.push(timed(|| {
            std::thread::scope(|s| {
                let a = s.spawn(|| sha256_file(&src));
                assert_eq!(sha256_file(&src), want);
                assert_eq!(a.join().unwrap(), want);
            })
        }));

        let r = xfer::round(&hub, ("bench", worker_pid), d, &src, size, &want);
        cp.push(r.cp);
        ship.push(r.ship);
        fetch.push(r.fetch);
        ship_cpu.push(r.ship_cpu);
        fetch_cpu.push(r.fetch_cpu);
        let last = |v: &Vec<f64>| size as f64 / v[v.len() - 1] / 1e6;
        eprintln!(
            "round {}/{rounds}: cp {:.0}, sha256 {:.0}, 2x {:.0}, ship {:.0}, fetch {:.0} MB/s",
            round + 1,
            last(&cp),
            last(&sha),
            last(&sha2x),
            last(&ship),
            last(&fetch)
        );
    }

    let mb = |secs: f64| size as f64 / secs / 1e6;
    let gib = (1u64 << 30) as f64 / size as f64;
    let (cp_s, sha_s, ship_s, fetch_s) = (median(cp), median(sha), median(ship), median(fetch));
    let sha2x_s = median(sha2x);
    let results = serde_json::json!({
        "size_mib": size_mib,
        "rounds": rounds,
        "dir": base.display().to_string(),
        "cp_mb_s": mb(cp_s),
        "sha256_mb_s": mb(sha_s),
        "sha256_2x_mb_s": mb(sha2x_s),
        "ship_mb_s": mb(ship_s),
        "fetch_mb_s": mb(fetch_s),
        "ship_vs_cp": mb(ship_s) / mb(cp_s),
        "fetch_vs_cp": mb(fetch_s) / mb(cp_s),
        "ship_vs_sha256": mb(ship_s) / mb(sha_s),
        "fetch_vs_sha256": mb(fetch_s) / mb(sha_s),
        "ship_vs_sha256_2x": mb(ship_s) / mb(sha2x_s),
        "fetch_vs_sha256_2x": mb(fetch_s) / mb(sha2x_s),
        // CPU seconds per GiB moved (median over the rounds), by process: what bounds a transfer on a
        // machine with few cores; and one SHA-256 pass over a GiB, of which a verified transfer makes two.
        "ship_cpu_s_per_gib": median(ship_cpu.iter().map(|c| c.total() * gib).collect()),
        "ship_cpu_client_s_per_gib": median(ship_cpu.iter().map(|c| c.client * gib).collect()),
        "ship_cpu_hub_s_per_gib": median(ship_cpu.iter().map(|c| c.hub * gib).collect()),
        "ship_cpu_worker_s_per_gib": median(ship_cpu.iter().map(|c| c.worker * gib).collect()),
        "fetch_cpu_s_per_gib": median(fetch_cpu.iter().map(|c| c.total() * gib).collect()),
        "fetch_cpu_client_s_per_gib": median(fetch_cpu.iter().map(|c| c.client * gib).collect()),
        "fetch_cpu_hub_s_per_gib": median(fetch_cpu.iter().map(|c| c.hub * gib).collect()),
        "fetch_cpu_worker_s_per_gib": median(fetch_cpu.iter().map(|c| c.worker * gib).collect()),
        "sha256_cpu_s_per_gib": sha_s * gib,
        "hub_peak_rss_kib": proc_status(hub.pid(), "VmHWM:").unwrap_or(0),
        "worker_peak_rss_kib": proc_status(worker_pid, "VmHWM:").unwrap_or(0),
    });
    common::report("transfer", &results);
}
