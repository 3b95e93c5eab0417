//! What both benches use to measure ship and fetch: a test file, its digest, and one round of `cp`,
//! `cla-hub ship` and `cla-hub fetch` of it (each transfer's digest checked against the source's).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::{Hub, children_cpu_secs_of, cpu_secs};

/// Where transfer files go: tmpfs (`/dev/shm`) when there is one, so the disk is not what is measured.
pub fn scratch_base() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// Writes `size` pseudo-random bytes (xorshift; incompressible enough, cheap to make).
pub fn make_file(path: &Path, size: u64) {
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

pub fn sha256_file(path: &Path) -> String {
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

/// Seconds `f` took.
pub fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// CPU seconds each process spent on one transfer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// The `cla-hub ship|fetch` command: reads or writes the local file and hashes it.
    pub client: f64,
    pub hub: f64,
    pub worker: f64,
}

impl Cpu {
    pub fn total(&self) -> f64 {
        self.client + self.hub + self.worker
    }
}

/// Seconds of one `cp`, one ship and one fetch of `src` (`size` bytes, SHA-256 `want`) through `hub` to
/// worker `worker` (process `worker_pid`), using `dir` for the copies (removed again); and the CPU each
/// process spent on the ship and on the fetch.
pub struct Round {
    pub cp: f64,
    pub ship: f64,
    pub fetch: f64,
    pub ship_cpu: Cpu,
    pub fetch_cpu: Cpu,
}

pub fn round(
    hub: &Hub,
    (worker, worker_pid): (&str, u32),
    dir: &Path,
    src: &Path,
    size: u64,
    want: &str,
) -> Round {
    let copy = dir.join("cp.bin");
    let cp = timed(|| assert!(Command::new("cp").arg(src).arg(&copy).status().unwrap().success()));
    std::fs::remove_file(&copy).unwrap();
    let remote = dir.join("remote.bin");
    let run = |args: &[&str]| -> (f64, Cpu) {
        let mut out = None;
        let before = Cpu {
            client: children_cpu_secs_of(std::process::id()),
            hub: cpu_secs(hub.pid()),
            worker: cpu_secs(worker_pid),
        };
        let t = timed(|| out = Some(hub.cmd(args)));
        let cpu = Cpu {
            client: children_cpu_secs_of(std::process::id()) - before.client,
            hub: cpu_secs(hub.pid()) - before.hub,
            worker: cpu_secs(worker_pid) - before.worker,
        };
        let v: serde_json::Value = serde_json::from_str(&out.unwrap()).unwrap();
        assert_eq!(v["sha256"], want, "verified digest");
        assert_eq!(v["bytes"], size);
        (t, cpu)
    };
    let (ship, ship_cpu) = run(&[
        "--json",
        "ship",
        "--worker",
        worker,
        src.to_str().unwrap(),
        remote.to_str().unwrap(),
    ]);
    let back = dir.join("back.bin");
    let (fetch, fetch_cpu) = run(&[
        "--json",
        "fetch",
        "--worker",
        worker,
        remote.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert_eq!(sha256_file(&back), want);
    std::fs::remove_file(&remote).unwrap();
    std::fs::remove_file(&back).unwrap();
    Round {
        cp,
        ship,
        fetch,
        ship_cpu,
        fetch_cpu,
    }
}
