//! Logging setup for both binaries: `tracing`, `info` by default, `-v` for debug, `-vv` for trace,
//! `RUST_LOG` to override. To stderr with ANSI colours only on a terminal, or — for a daemonized worker —
//! plain lines to a logfile rotated by size ([`RotatingFile`]). `println!` stays for CLI output.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `verbose` is the number of `-v` flags. Safe to call more than once
/// (later calls are ignored), which in-process tests rely on.
pub fn init(verbose: u8) {
    init_from("info", verbose);
}

/// Like [`init`], with `quiet` as the level when no `-v` is given (the demo keeps logs to warnings).
pub fn init_from(quiet: &str, verbose: u8) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(quiet, verbose))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Logs to `file` instead of stderr, without colours.
pub fn init_to_file(verbose: u8, file: RotatingFile) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter("info", verbose))
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

fn filter(quiet: &str, verbose: u8) -> EnvFilter {
    let level = match verbose {
        0 => quiet,
        1 => "debug",
        _ => "trace",
    };
    // Our crate at the chosen level; chatty dependencies one step quieter.
    let default =
        format!("{level},hyper=warn,hyper_util=warn,tungstenite=warn,tokio_tungstenite=warn,redb=warn");
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// An append-only logfile that rotates by size: when a write would take it past `max_bytes`, `log` becomes
/// `log.1`, `log.1` becomes `log.2`, … and `log.<keep>` is dropped. Each log event is one write, so an
/// event is never split across files.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl RotatingFile {
    /// Opens (creating parent directories) or continues `path`.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_private(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
        })
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 0 {
            let _ = self.file.set_len(0);
        } else {
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
            }
            // The file may be gone (deleted by hand, its directory too): start a new one regardless.
            let _ = std::fs::rename(&self.path, self.numbered(1));
        }
        self.reopen()
    }

    /// Opens the log path again (recreating its directory), so logging survives a removed file or dir.
    fn reopen(&mut self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        self.file = open_private(&self.path)?;
        self.size = self.file.metadata()?.len();
        Ok(())
    }
}

/// Opens `path` for appending; a new file is created 0600 (Unix): logs may quote job output.
fn open_private(path: &Path) -> std::io::Result<File> {
    let mut open = OpenOptions::new();
    open.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    open.open(path)
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        } else if !self.path.exists() {
            // Deleted under us (logrotate without copytruncate, or by hand): write to a new file.
            self.reopen()?;
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Lets a log line through at most once per interval and counts the ones it held back, for lines a peer
/// can trigger at will (refused connections, failed accepts, bad frames): a flood then costs one line per
/// interval, and that line says how many it stands for.
pub struct Throttle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

struct ThrottleState {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::new(ThrottleState { last: None, held: 0 }),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines held back since the last one;
    /// `None` when this one is held back (and counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                st.held += 1;
                None
            }
            _ => {
                st.last = Some(now);
                Some(std::mem::take(&mut st.held))
            }
        }
    }

    /// `" (and N more like it in the last S s)"`, or nothing when `held` is 0: to append to the line.
    pub fn suffix(&self, held: u64) -> String {
        if held == 0 {
            String::new()
        } else {
            format!(
                " (and {held} more like it in the last {} s)",
                self.every.as_secs().max(1)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    #[test]
    fn a_new_logfile_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/worker.log");
        let mut f = super::RotatingFile::open(&path, 64, 2).unwrap();
        for _ in 0..10 {
            f.write_all(b"a line of more than a few bytes\n").unwrap();
        }
        for p in [path.clone(), dir.path().join("logs/worker.log.1")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let t = super::Throttle::new(std::time::Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow(t0 + std::time::Duration::from_secs(i)), None);
        }
        assert_eq!(t.allow(t0 + std::time::Duration::from_secs(10)), Some(5));
        assert_eq!(t.suffix(5), " (and 5 more like it in the last 10 s)");
        assert_eq!(t.suffix(0), "");
    }

    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/w.log");
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        for i in 0..10 {
            f.write_all(format!("line {i:02} {}\n", "x".repeat(30)).as_bytes())
                .unwrap();
        }
        // 40-byte lines, 100-byte files: two lines per file; the current file and 2 old ones are kept.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert!(read(&path).starts_with("line 08") && read(&path).lines().count() == 2);
        assert!(read(&dir.path().join("logs/w.log.1")).starts_with("line 06"));
        assert!(read(&dir.path().join("logs/w.log.2")).starts_with("line 04"));
        assert!(!dir.path().join("logs/w.log.3").exists());
        // Reopening continues the current file and its size.
        drop(f);
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        f.write_all(b"next\n").unwrap();
        assert!(
            read(&path).starts_with("line 08")
                && read(&path).ends_with("line 09 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nnext\n")
        );
        assert!(read(&dir.path().join("logs/w.log.1")).starts_with("line 06"));

        // The whole directory removed: logging goes on in a new file. (Windows cannot remove a
        // directory holding an open file.)
        #[cfg(unix)]
        {
            std::fs::remove_dir_all(dir.path().join("logs")).unwrap();
            f.write_all(b"after removal\n").unwrap();
            assert_eq!(read(&path), "after removal\n");
            for _ in 0..5 {
                f.write_all(format!("{}\n", "y".repeat(39)).as_bytes()).unwrap();
            }
            assert!(dir.path().join("logs/w.log.1").exists());
        }
    }
}
