//! What both benchmarks need: a real `cla-hub` (release build) on a loopback port and a registered
//! worker config, started the way a user would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub mod transfer;

pub use cla_tests::HUB;
pub use cla_tests::WORKER;

/// Kills (and reaps) a child process when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `/proc/PID/status` value in KiB (or a count), e.g. `VmRSS:`, `VmHWM:`, `Threads:`.
pub fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (user + system) process `pid` has used so far (Linux `/proc`; 0 elsewhere).
pub fn cpu_secs(pid: u32) -> f64 {
    stat_cpu(pid, 10)
}

/// CPU seconds of the children process `pid` has waited for (Linux `/proc`; 0 elsewhere).
pub fn children_cpu_secs_of(pid: u32) -> f64 {
    stat_cpu(pid, 12)
}

/// Two clock-tick fields of `/proc/PID/stat` added up, in seconds: `at` counts from the field after
/// the state.
fn stat_cpu(pid: u32, at: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Counting from the field after the state (the command name before it, in parentheses, may hold
    // spaces): utime, stime, cutime and cstime are at 10 to 13.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().skip(1).collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok());
    match (num(at), num(at + 1)) {
        (Some(u), Some(s)) => (u + s) / clock_ticks(),
        _ => 0.0,
    }
}

fn clock_ticks() -> f64 {
    // `libc` is a dependency on glibc Linux only; a musl Linux build assumes the usual USER_HZ of 100
    // (the figures matter only where `/proc` exists).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let t = 100;
    if t > 0 { t as f64 } else { 100.0 }
}

/// A running hub with its data dir under `dir`.
pub struct Hub {
    pub proc: Kill,
    pub data_dir: PathBuf,
    pub url: String,
}

impl Hub {
    pub fn start(dir: &Path) -> Hub {
        Hub::start_with(dir, &[])
    }

    /// A hub with extra `serve` flags (`--tls`: its URL is then https).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Hub {
        let data_dir = dir.join("hub");
        let mut child = Command::new(HUB)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start cla-hub");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("hub exited").unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Hub {
            proc: Kill(child),
            data_dir,
            url: format!(
                "{}://{addr}",
                if extra.contains(&"--tls") { "https" } else { "http" }
            ),
        }
    }

    /// The pin of a TLS hub, from its `hub.json` (what admin commands on its machine use).
    pub fn trust(&self) -> cla_common::tls::Trust {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.data_dir.join("hub.json")).unwrap()).unwrap();
        match file["pin"].as_str() {
            Some(pin) => cla_common::tls::Trust::Pin(pin.parse().unwrap()),
            None => cla_common::tls::Trust::Unset,
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Runs an admin command that must succeed; its stdout.
    pub fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new(HUB)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cla-hub {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers worker `id` (tags `bench`) with `cla-worker register --save` into `config`.
    pub fn register(&self, config: &Path, id: &str) {
        let key = self.cmd(&["passkey", "create", "--project", "bench"]);
        let reg = Command::new(WORKER)
            .arg("-c")
            .arg(config)
            .args([
                "register",
                "--url",
                &self.url,
                "--passkey",
                key.trim(),
                "--id",
                id,
                "--tags",
                "bench",
                "--save",
            ])
            .output()
            .unwrap();
        assert!(reg.status.success(), "{}", String::from_utf8_lossy(&reg.stderr));
    }
}

/// The worker binary the benches run: this build's, or the one `CLA_BENCH_WORKER` names (e.g. the
/// static `dist` build that is installed on servers, to measure what they run).
pub fn worker_bin() -> std::ffi::OsString {
    std::env::var_os("CLA_BENCH_WORKER").unwrap_or_else(|| WORKER.into())
}

/// Starts `cla-worker run` with a saved config, plus `extra` arguments.
pub fn run_worker(config: &Path, extra: &[&str]) -> Kill {
    Kill(
        Command::new(worker_bin())
            .arg("-c")
            .arg(config)
            .arg("run")
            .arg("--spool-dir")
            .arg(config.with_extension("spool"))
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Prints `results` (one JSON object) as a table and writes it to `target/bench/NAME.json`.
pub fn report(name: &str, results: &serde_json::Value) {
    let fields = results.as_object().expect("results are one object");
    let width = fields.keys().map(String::len).max().unwrap_or(6).max(6);
    println!("{:<width$} {:>12}", "metric", "value");
    for (k, v) in fields {
        let shown = match v {
            serde_json::Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap()),
            other => other.to_string(),
        };
        println!("{k:<width$} {shown:>12}");
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(results).unwrap()).unwrap();
    println!("wrote {}", file.display());
}
