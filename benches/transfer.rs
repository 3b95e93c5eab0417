//! Transfer benchmark: `cla-hub ship` and `cla-hub fetch` of one large file through a real hub and worker
//! (release builds) on loopback, with `cp` of the same file and SHA-256 of the same bytes measured in the
//! same run as baselines, and the peak RSS of the hub and the worker.
//!
//! `cargo bench --bench transfer` (1 GiB, 3 rounds) or `cargo bench --bench transfer -- --quick` (64 MiB,
//! 1 round); `--size-mib N` and `--rounds N` override. Files live on tmpfs (`/dev/shm`) when it exists, so
//! the disk is not what is measured (as for the `cp` baseline). Prints a table and writes
//! `target/bench/transfer.json`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

mod common;

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

/// Writes `size` pseudo-random bytes (xorshift; incompressible enough, cheap to make).
fn make_file(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size_mib = arg("--size-mib").unwrap_or(if quick { 64 } else { 1024 });
    let rounds = arg("--rounds").unwrap_or(if quick { 1 } else { 3 }).max(1);
    let size = size_mib << 20;
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
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
    for round in 0..rounds {
        let copy = d.join("cp.bin");
        cp.push(timed(|| {
            assert!(
                Command::new("cp")
                    .arg(&src)
                    .arg(&copy)
                    .status()
                    .unwrap()
                    .success()
            )
        }));
        std::fs::remove_file(&copy).unwrap();
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

        let remote = d.join("remote.bin");
        let run = |args: &[&str]| -> f64 {
            let mut out = None;
            let t = timed(|| out = Some(hub.cmd(args)));
            let v: serde_json::Value = serde_json::from_str(&out.unwrap()).unwrap();
            assert_eq!(v["sha256"], want.as_str(), "verified digest");
            assert_eq!(v["bytes"], size);
            t
        };
        ship.push(run(&[
            "--json",
            "ship",
            "--worker",
            "bench",
            src.to_str().unwrap(),
            remote.to_str().unwrap(),
        ]));
        let back = d.join("back.bin");
        fetch.push(run(&[
            "--json",
            "fetch",
            "--worker",
            "bench",
            remote.to_str().unwrap(),
            back.to_str().unwrap(),
        ]));
        assert_eq!(sha256_file(&back), want);
        std::fs::remove_file(&remote).unwrap();
        std::fs::remove_file(&back).unwrap();
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
        "hub_peak_rss_kib": proc_status(hub.pid(), "VmHWM:").unwrap_or(0),
        "worker_peak_rss_kib": proc_status(worker_pid, "VmHWM:").unwrap_or(0),
    });
    println!("{:<20} {:>12}", "metric", "value");
    for (k, v) in results.as_object().unwrap() {
        let shown = match v {
            serde_json::Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap()),
            other => other.to_string(),
        };
        println!("{k:<20} {shown:>12}");
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("transfer.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("transfer.json").display());
}
