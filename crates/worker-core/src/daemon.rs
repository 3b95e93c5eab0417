//! The worker as a background service (`start`/`stop`/`status`): where its pidfile, logfile and status
//! file live, how a running worker is recognised, and the status file the running worker keeps current.
//!
//! Defaults (per worker id, so several workers run side by side): as root, `/run/cla-worker/` for the
//! pidfile and status file and `/var/log/cla-worker/` for the log; otherwise the user's state dir
//! (`~/.local/state/cla-worker/`) for all three — not the runtime dir, which depends on the session's
//! environment and vanishes at logout.
//!
//! A running worker holds an exclusive `flock` on its pidfile for its whole life. That, not the pid in the
//! file, is what "running" means: no race between two starts, no confusion from a reused pid or a path
//! spelled differently, and a crash releases the lock by itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use cla_common::util::{now_rfc3339, write_atomic};

/// Files of one daemonized worker.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonPaths {
    pub pidfile: PathBuf,
    pub logfile: PathBuf,
    pub statusfile: PathBuf,
}

fn is_root() -> bool {
    #[cfg(unix)]
    {
        nix::unistd::geteuid().is_root()
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// The paths for worker `id`, with explicit choices taking precedence.
pub fn paths(id: &str, pidfile: Option<PathBuf>, logfile: Option<PathBuf>) -> DaemonPaths {
    let (run_dir, log_dir) = if is_root() {
        (
            PathBuf::from("/run/cla-worker"),
            PathBuf::from("/var/log/cla-worker"),
        )
    } else {
        let base = directories::BaseDirs::new();
        let state = base
            .as_ref()
            .and_then(|b| b.state_dir().map(Path::to_path_buf))
            .or_else(|| base.as_ref().map(|b| b.data_local_dir().to_path_buf()))
            .unwrap_or_else(std::env::temp_dir)
            .join("cla-worker");
        let run = base
            .as_ref()
            .and_then(|b| b.runtime_dir().map(|d| d.join("cla-worker")))
            .unwrap_or_else(|| state.clone());
        (run, state)
    };
    let pidfile = pidfile.unwrap_or_else(|| run_dir.join(format!("cla-worker-{id}.pid")));
    let statusfile = pidfile.with_extension("status.json");
    let logfile = logfile.unwrap_or_else(|| log_dir.join(format!("cla-worker-{id}.log")));
    DaemonPaths {
        pidfile,
        logfile,
        statusfile,
    }
}

/// The pid in a pidfile, if the file holds one.
pub fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// The pid of the worker holding `pidfile`'s lock, if one does.
pub fn running(pidfile: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use nix::fcntl::{Flock, FlockArg};
        let file = std::fs::File::open(pidfile).ok()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // We got the lock: nobody holds it (dropping the Flock releases it).
            Ok(_) => None,
            // Held: a worker runs. It writes its pid right after locking; give it a moment.
            Err(_) => (0..50).find_map(|_| {
                read_pid(pidfile).or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                })
            }),
        }
    }
    #[cfg(windows)]
    {
        // The running worker keeps its pidfile open without write sharing (see PidLock): if the file can be
        // opened for writing, nobody holds it.
        if std::fs::OpenOptions::new().write(true).open(pidfile).is_ok() {
            return None;
        }
        read_pid(pidfile)
    }
    #[cfg(not(any(unix, windows)))]
    {
        read_pid(pidfile)
    }
}

/// The lock file in a spool directory: held by the worker process using the spool, and naming it.
pub const SPOOL_LOCK: &str = "lock";

/// The status file of a worker without a pidfile (one started with `run` in a terminal) whose spool is
/// `spool_dir` (`SPOOL_DIR/ID`): `SPOOL_DIR/ID.status.json`, beside the spool rather than in it (the spool
/// holds the worker's private files only). A background worker's sits beside its pidfile.
pub fn foreground_status_file(spool_dir: &Path) -> PathBuf {
    let name = spool_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    spool_dir.with_file_name(format!("{name}.status.json"))
}

/// The worker process holding a spool directory, as its lock file names it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolHolder {
    pub pid: u32,
    /// A background worker's pidfile (absolute); `None` for a worker running in the foreground.
    pub pidfile: Option<PathBuf>,
}

impl SpoolHolder {
    /// The lock file's text: the pid on the first line, the pidfile (if any) on the second.
    pub(crate) fn record(&self) -> String {
        match &self.pidfile {
            Some(p) => format!("{}\n{}\n", self.pid, p.display()),
            None => format!("{}\n", self.pid),
        }
    }

    fn parse(text: &str) -> Option<SpoolHolder> {
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let pidfile = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
        Some(SpoolHolder { pid, pidfile })
    }
}

/// The worker process using the spool directory `spool_dir` (`SPOOL_DIR/ID`), if one does: its lock is
/// held, as with [`running`], so a crashed worker's leftovers do not count.
pub fn spool_holder(spool_dir: &Path) -> Option<SpoolHolder> {
    let lock = spool_dir.join(SPOOL_LOCK);
    let read = || SpoolHolder::parse(&std::fs::read_to_string(&lock).ok()?);
    #[cfg(unix)]
    {
        use nix::fcntl::{Flock, FlockArg};
        let file = std::fs::File::open(&lock).ok()?;
        if Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok() {
            return None;
        }
    }
    #[cfg(windows)]
    if std::fs::OpenOptions::new().write(true).open(&lock).is_ok() {
        return None;
    }
    // Held: the holder writes its record right after locking; give it a moment.
    (0..50).find_map(|_| {
        read().or_else(|| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            None
        })
    })
}

/// A pidfile held by this process: locked, holding our pid, removed when dropped.
pub struct PidLock {
    path: PathBuf,
    #[cfg(unix)]
    _lock: nix::fcntl::Flock<std::fs::File>,
    #[cfg(not(unix))]
    _file: std::fs::File,
}

impl PidLock {
    /// Takes the pidfile, or says which worker holds it.
    pub fn acquire(path: &Path) -> Result<PidLock> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut open = std::fs::OpenOptions::new();
        open.read(true).write(true).create(true).truncate(false);
        // Windows has no flock: the running worker holds the file open sharing reads only, so a second
        // one cannot open it for writing, and a crash releases it as well.
        #[cfg(windows)]
        std::os::windows::fs::OpenOptionsExt::share_mode(
            &mut open,
            // (Delete sharing: so that Drop can remove it while it is still open.)
            windows_sys::Win32::Storage::FileSystem::FILE_SHARE_READ
                | windows_sys::Win32::Storage::FileSystem::FILE_SHARE_DELETE,
        );
        #[cfg(windows)]
        let file = open.open(path).map_err(|e| match e.raw_os_error() {
            // ERROR_SHARING_VIOLATION
            Some(32) => {
                let pid = read_pid(path).map(|p| format!("pid {p}, ")).unwrap_or_default();
                Error::Other(format!(
                    "a worker is already running with this pidfile ({pid}{})",
                    path.display()
                ))
            }
            _ => Error::io(path, e),
        })?;
        #[cfg(not(windows))]
        let file = open.open(path).map_err(|e| Error::io(path, e))?;
        #[cfg(unix)]
        {
            use nix::fcntl::{Flock, FlockArg};
            use std::io::{Seek, Write};
            let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
                let pid = read_pid(path).map(|p| format!("pid {p}, ")).unwrap_or_default();
                Error::Other(format!(
                    "a worker is already running with this pidfile ({pid}{})",
                    path.display()
                ))
            })?;
            // Rewritten in place: the lock belongs to this inode.
            lock.set_len(0).map_err(|e| Error::io(path, e))?;
            lock.rewind().map_err(|e| Error::io(path, e))?;
            writeln!(lock, "{}", std::process::id()).map_err(|e| Error::io(path, e))?;
            lock.sync_all().map_err(|e| Error::io(path, e))?;
            Ok(PidLock {
                path: path.to_path_buf(),
                _lock: lock,
            })
        }
        #[cfg(not(unix))]
        {
            use std::io::Write;
            let mut file = file;
            file.set_len(0).map_err(|e| Error::io(path, e))?;
            writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(path, e))?;
            file.sync_all().map_err(|e| Error::io(path, e))?;
            Ok(PidLock {
                path: path.to_path_buf(),
                _file: file,
            })
        }
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Still locked by us: the file is ours to remove.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The connection state a worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Connecting,
    Connected,
    Reconnecting,
    Draining,
}

/// What `cla-worker status` shows, as the running worker last wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub id: String,
    pub url: String,
    pub state: ConnState,
    /// When `state` last changed.
    pub since: String,
    /// When the process started.
    pub started: String,
    pub running: u32,
    pub capacity: u32,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    /// Why the last connection ended, while reconnecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub version: String,
}

/// How often at most the status file is rewritten: it is for `cla-worker status`, not a record.
const STATUS_WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Keeps the status (in memory, and in the status file when there is one) current. The file is written
/// once at once, then by a thread of its own at most every [`STATUS_WRITE_EVERY`] with the latest
/// status, so that a job's start and end never wait for the disk.
pub(crate) struct Reporter {
    status: Arc<Mutex<Status>>,
    file: Option<StatusWriter>,
}

/// The status file and the thread that writes it.
struct StatusWriter {
    path: PathBuf,
    /// Wakes the thread; when full, a write is pending already (and takes the latest status).
    wake: std::sync::mpsc::SyncSender<()>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn write_status(path: &Path, status: &Status) {
    let json = serde_json::to_vec_pretty(status).expect("status serializes");
    if let Err(e) = write_atomic(path, &json, false) {
        tracing::warn!("cannot write the status file: {e}");
    }
}

impl Reporter {
    pub(crate) fn new(
        path: Option<PathBuf>,
        id: &str,
        url: &str,
        capacity: u32,
        tags: &[String],
        envs: &[String],
    ) -> Reporter {
        let now = now_rfc3339();
        let status = Status {
            pid: std::process::id(),
            id: id.to_owned(),
            url: url.to_owned(),
            state: ConnState::Connecting,
            since: now.clone(),
            started: now,
            running: 0,
            capacity,
            tags: tags.to_vec(),
            envs: envs.to_vec(),
            last_error: None,
            version: cla_common::VERSION.to_owned(),
        };
        let status = Arc::new(Mutex::new(status));
        let file = path.map(|path| {
            write_status(&path, &status.lock().unwrap_or_else(|e| e.into_inner()));
            let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
            let stop = Arc::new(AtomicBool::new(false));
            let (status, stop_seen, file) = (status.clone(), stop.clone(), path.clone());
            let thread = std::thread::Builder::new()
                .name("status-file".into())
                .spawn(move || {
                    while woken.recv().is_ok() && !stop_seen.load(Ordering::SeqCst) {
                        let snapshot = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        write_status(&file, &snapshot);
                        std::thread::sleep(STATUS_WRITE_EVERY);
                    }
                })
                .map_err(|e| tracing::warn!("the status file is not kept current: {e}"))
                .ok();
            StatusWriter {
                path,
                wake,
                stop,
                thread: Mutex::new(thread),
            }
        });
        Reporter { status, file }
    }

    /// Changes the status; the file follows.
    pub(crate) fn update(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(f) = &self.file {
            let _ = f.wake.try_send(());
        }
    }

    /// A new connection state (stamps `since` when it changes).
    pub(crate) fn state(&self, state: ConnState, last_error: Option<String>) {
        self.update(|s| {
            if s.state != state {
                s.state = state;
                s.since = now_rfc3339();
            }
            s.last_error = last_error;
        });
    }

    /// Removes the status file (at exit), once its thread has stopped: nothing writes it again.
    pub(crate) fn remove(&self) {
        if let Some(f) = &self.file {
            f.stop.store(true, Ordering::SeqCst);
            let _ = f.wake.try_send(());
            let thread = f.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(t) = thread {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

/// Reads a status file.
pub fn read_status(path: &Path) -> Option<Status> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_paths_win_and_the_status_file_sits_by_the_pidfile() {
        let p = paths("w1", Some("/x/w.pid".into()), Some("/y/w.log".into()));
        assert_eq!(p.pidfile, PathBuf::from("/x/w.pid"));
        assert_eq!(p.statusfile, PathBuf::from("/x/w.status.json"));
        assert_eq!(p.logfile, PathBuf::from("/y/w.log"));
        let d = paths("w2", None, None);
        assert!(d.pidfile.ends_with("cla-worker-w2.pid") && d.logfile.ends_with("cla-worker-w2.log"));
        assert_eq!(d.pidfile.parent(), d.statusfile.parent());
    }

    #[test]
    fn only_a_held_pidfile_means_running() {
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("sub/w.pid");
        assert_eq!(running(&pf), None);
        // A pid in an unlocked file (left by a crash, or reused) does not count.
        std::fs::create_dir_all(pf.parent().unwrap()).unwrap();
        std::fs::write(&pf, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(running(&pf), None);
        let held = PidLock::acquire(&pf).unwrap();
        assert_eq!(running(&pf), Some(std::process::id()));
        // The same file by another spelling is the same lock.
        let other = dir.path().join("sub/../sub/w.pid");
        assert_eq!(running(&other), Some(std::process::id()));
        let e = PidLock::acquire(&other).err().unwrap().to_string();
        assert!(e.contains("already running"), "{e}");
        drop(held);
        assert!(!pf.exists());
        assert_eq!(running(&pf), None);
    }

    #[test]
    fn a_foreground_status_file_sits_beside_the_spool() {
        assert_eq!(
            foreground_status_file(Path::new("/s/web.1")),
            PathBuf::from("/s/web.1.status.json")
        );
    }

    #[test]
    fn a_spool_names_the_worker_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("w1");
        assert_eq!(spool_holder(&spool), None);
        let held = crate::journal::Spool::open(&spool, 1 << 20, None).unwrap();
        let me = std::process::id();
        assert_eq!(
            spool_holder(&spool),
            Some(SpoolHolder {
                pid: me,
                pidfile: None
            })
        );
        drop(held);
        // What the lock file still says does not count once nobody holds it.
        assert_eq!(spool_holder(&spool), None);
        let pidfile = dir.path().join("w1.pid");
        let _held = crate::journal::Spool::open(&spool, 1 << 20, Some(&pidfile)).unwrap();
        assert_eq!(
            spool_holder(&spool),
            Some(SpoolHolder {
                pid: me,
                pidfile: Some(pidfile)
            })
        );
    }

    #[test]
    fn reporter_writes_the_status_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.status.json");
        let r = Reporter::new(Some(path.clone()), "w", "http://h:1", 2, &["t".into()], &[]);
        // The first status is there at once; later ones follow within moments.
        assert_eq!(read_status(&path).unwrap().state, ConnState::Connecting);
        r.state(ConnState::Connected, None);
        r.update(|s| s.running = 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let current = |s: &Status| (s.state, s.running, s.capacity) == (ConnState::Connected, 1, 2);
        while !read_status(&path).is_some_and(|s| current(&s)) {
            assert!(std::time::Instant::now() < deadline, "{:?}", read_status(&path));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Updates just before the end are not written after the file is removed.
        for n in 0..20 {
            r.update(|s| s.running = n);
        }
        r.remove();
        assert!(!path.exists());
        std::thread::sleep(STATUS_WRITE_EVERY * 2);
        assert!(!path.exists(), "written again after its removal");
    }
}
