//! `cla-worker start | stop | status`: the worker as a background service.
//!
//! `start` re-executes this binary as `cla-worker run --pidfile P --logfile L …` in a new session with no
//! terminal (the token travels in the environment, not in `ps`), waits until the child has written its
//! pidfile, and prints where things are. Re-executing rather than forking keeps the child's tokio runtime
//! and threads clean. `stop` sends SIGTERM (the worker drains) and waits; `status` reads the status file
//! the running worker keeps current.
//!
//! A worker started with `run` in a terminal has no pidfile, but it holds its spool directory's lock,
//! which names its pid: `status` reports it as running in the foreground, and `stop` stops it the same
//! way (SIGTERM, then wait), as Ctrl-C in its terminal would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::worker::{RunArgs, StatusArgs, StopArgs, Which, overrides};
use crate::error::{Error, Result};
use cla_common::exit::ExitCode;
use cla_config::{self as config, LoadedConfig};
use cla_worker_core::daemon::{self, DaemonPaths, Status};

/// How long `start` waits for the child to come up.
const START_WAIT: Duration = Duration::from_secs(10);

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Starts the worker in the background.
pub(crate) fn start(a: RunArgs, loaded: &LoadedConfig, verbose: u8, strict: bool) -> Result<ExitCode> {
    let settings = config::resolve(loaded, &overrides(&a))?;
    let id = settings.id.clone();
    let paths = daemon::paths(
        &id,
        a.pidfile
            .clone()
            .or_else(|| loaded.file.pidfile.clone())
            .map(|p| absolute(&p)),
        a.logfile
            .clone()
            .or_else(|| loaded.file.logfile.clone())
            .map(|p| absolute(&p)),
    );
    let already = |pid: u32| {
        Error::Other(format!(
            "worker {id} is already running (pid {pid}, pidfile {}); `cla-worker stop --id {id}` first",
            paths.pidfile.display()
        ))
    };
    if let Some(pid) = daemon::running(&paths.pidfile) {
        return Err(already(pid));
    }
    // The same worker, run by hand in a terminal (or by `start` with another pidfile).
    if let Some(h) = daemon::spool_holder(&settings.spool_dir) {
        let how = match &h.pidfile {
            Some(p) => format!("in the background, pidfile {}", p.display()),
            None => "in the foreground, started with `cla-worker run`".to_owned(),
        };
        return Err(Error::Other(format!(
            "worker {id} is already running ({how}, pid {}); `cla-worker stop --id {id}` first",
            h.pid
        )));
    }
    for dir in [paths.pidfile.parent(), paths.logfile.parent()]
        .into_iter()
        .flatten()
    {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }

    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(c) = &loaded.path {
        cmd.arg("--config").arg(absolute(c));
    }
    for _ in 0..verbose {
        cmd.arg("-v");
    }
    if strict {
        cmd.arg("--strict");
    }
    // Only what was given on this command line: the child reads the rest from the config itself, so that a
    // SIGHUP there re-reads tags and envs from the file.
    cmd.args([
        "run",
        "--id",
        &id,
        "--drain-timeout",
        &a.drain_timeout.to_string(),
        "--startup-jitter",
        &a.startup_jitter.to_string(),
    ]);
    if let Some(url) = &a.who.url {
        cmd.args(["--url", url]);
    }
    if let Some(n) = a.capacity {
        cmd.args(["--capacity", &n.to_string()]);
    }
    for (flag, values) in [("--tags", a.labels.tags()), ("--envs", a.labels.envs())] {
        if !values.is_empty() {
            cmd.arg(flag).arg(values.join(","));
        }
    }
    if let Some(w) = &a.workdir {
        cmd.arg("--workdir").arg(absolute(w));
    }
    if let Some(d) = &a.spool_dir {
        cmd.arg("--spool-dir").arg(absolute(d));
    }
    cmd.arg("--pidfile")
        .arg(&paths.pidfile)
        .arg("--logfile")
        .arg(&paths.logfile);
    // The token in the environment, never in `ps`; when it came from the config, the child reads it there.
    match &a.who.token {
        Some(t) => cmd.env("CLA_WORKER_TOKEN", t.expose()),
        None => cmd.env_remove("CLA_WORKER_TOKEN"),
    };
    cmd.env_remove("CLA_WORKER_CONFIG");
    // What the child says before its logging starts (or if it panics) goes to the logfile too.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.logfile)
        .map_err(|e| Error::io(&paths.logfile, e))?;
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    detach(&mut cmd);
    let mut child = cmd.spawn()?;

    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            // Lost a race with another start of the same worker: say so.
            if let Some(pid) = daemon::running(&paths.pidfile) {
                return Err(already(pid));
            }
            return Err(Error::Other(format!(
                "worker {id} exited during start-up ({status}); the end of {}:\n{}",
                paths.logfile.display(),
                tail(&paths.logfile, 5)
            )));
        }
        if daemon::running(&paths.pidfile) == Some(child.id()) {
            break;
        }
        if started.elapsed() > START_WAIT {
            // Not left running unseen by status/stop.
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Other(format!(
                "worker {id} (pid {}) did not take its pidfile within {}s, and was stopped; see {}",
                child.id(),
                START_WAIT.as_secs(),
                paths.logfile.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    super::print_out(&format!(
        "started worker {id} (pid {})\n  logfile: {}\n  pidfile: {}\ncheck it with `cla-worker status --id {id}`, stop it with `cla-worker stop --id {id}`\n",
        child.id(),
        paths.logfile.display(),
        paths.pidfile.display()
    ))?;
    Ok(ExitCode::Success)
}

/// Puts the child in a session of its own: no controlling terminal, not in our process group.
fn detach(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe, as required between fork and exec.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
        }
    }
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt;
        use windows_sys::Win32::System::Threading::{CREATE_NEW_PROCESS_GROUP, DETACHED_PROCESS};
        // No console (closing ours must not end it), and out of our Ctrl-C group.
        cmd.creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP);
    }
    #[cfg(not(any(unix, windows)))]
    let _ = cmd;
}

/// The last `n` lines of a file, indented.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The id and files a `stop`/`status` is about, and the worker's spool directory.
fn which(w: &Which, loaded: &LoadedConfig) -> Result<(String, DaemonPaths, PathBuf)> {
    let id = match (&w.id, &w.pidfile) {
        (None, Some(p)) => config::resolve_id(loaded, None).unwrap_or_else(|_| p.display().to_string()),
        (id, _) => config::resolve_id(loaded, id.as_deref())?,
    };
    let pidfile = w.pidfile.clone().or_else(|| loaded.file.pidfile.clone());
    let spool = w
        .spool_dir
        .clone()
        .or_else(|| loaded.file.spool_dir.clone())
        .unwrap_or_else(config::default_spool_base)
        .join(&id);
    Ok((
        id.clone(),
        daemon::paths(&id, pidfile, loaded.file.logfile.clone()),
        spool,
    ))
}

/// A running worker, as `stop` and `status` find it.
enum Found {
    /// Holding a pidfile: started with `start` (or `run --pidfile`).
    Background { pid: u32, paths: DaemonPaths },
    /// Holding its spool with no pidfile: `run` in a terminal. It keeps its status beside the spool.
    Foreground { pid: u32, statusfile: PathBuf },
}

impl Found {
    fn pid(&self) -> u32 {
        match self {
            Found::Background { pid, .. } | Found::Foreground { pid, .. } => *pid,
        }
    }
}

/// The running worker: the one holding the pidfile, else (unless `--pidfile` named the only place to
/// look) the one holding the spool, whichever way it was started.
fn find(id: &str, w: &Which, paths: &DaemonPaths, spool: &Path) -> Option<Found> {
    if let Some(pid) = daemon::running(&paths.pidfile) {
        return Some(Found::Background {
            pid,
            paths: paths.clone(),
        });
    }
    if w.pidfile.is_some() {
        return None;
    }
    let holder = daemon::spool_holder(spool)?;
    match holder.pidfile {
        // Started in the background with a pidfile other than the one looked at.
        Some(pidfile) => {
            let paths = daemon::paths(id, Some(pidfile), None);
            daemon::running(&paths.pidfile)
                .filter(|pid| *pid == holder.pid)
                .map(|pid| Found::Background { pid, paths })
        }
        None => Some(Found::Foreground {
            pid: holder.pid,
            statusfile: daemon::foreground_status_file(spool),
        }),
    }
}

/// Stops a worker: SIGTERM, then wait for it to drain and exit.
pub(crate) fn stop(a: StopArgs, loaded: &LoadedConfig) -> Result<ExitCode> {
    let (id, paths, spool) = which(&a.which, loaded)?;
    let Some(found) = find(&id, &a.which, &paths, &spool) else {
        super::print_out(&format!("worker {id} is not running\n"))?;
        return Ok(ExitCode::NotRunning);
    };
    let pid = found.pid();
    signal_term(pid)?;
    let place = match &found {
        Found::Background { .. } => "",
        Found::Foreground { .. } => ", in the foreground",
    };
    super::print_out(&format!(
        "stopping worker {id} (pid {pid}{place}): it finishes or cancels its jobs, then exits\n"
    ))?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let alive = || match &found {
        Found::Background { paths, .. } => daemon::running(&paths.pidfile) == Some(pid),
        Found::Foreground { .. } => daemon::spool_holder(&spool).is_some_and(|h| h.pid == pid),
    };
    while alive() {
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "worker {id} (pid {pid}) did not exit within {}s; it may still be draining long jobs (`kill -9 {pid}` forces it)",
                a.timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    super::print_out(&format!("worker {id} stopped\n"))?;
    Ok(ExitCode::Success)
}

fn signal_term(pid: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal, kill};
        kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM)
            .map_err(|e| Error::Other(format!("cannot signal pid {pid}: {e}")))
    }
    #[cfg(windows)]
    {
        cla_common::shutdown::stop_event::request(pid).map_err(|e| {
            Error::Other(format!(
                "cannot ask pid {pid} to stop ({e}): is it a cla-worker of this user's session? (`taskkill /PID {pid} /T /F` forces it)"
            ))
        })
    }
    #[cfg(not(any(unix, windows)))]
    {
        Err(Error::Other(format!(
            "stopping pid {pid} is not supported on this platform"
        )))
    }
}

/// Reports whether the worker runs (in the background or in the foreground), and its state.
pub(crate) fn status(a: StatusArgs, loaded: &LoadedConfig) -> Result<ExitCode> {
    let (id, paths, spool) = which(&a.which, loaded)?;
    let found = find(&id, &a.which, &paths, &spool);
    let (mode, pidfile, statusfile) = match &found {
        Some(Found::Background { paths, .. }) => (
            Some("background"),
            Some(paths.pidfile.clone()),
            paths.statusfile.clone(),
        ),
        Some(Found::Foreground { statusfile, .. }) => (Some("foreground"), None, statusfile.clone()),
        None => (None, Some(paths.pidfile.clone()), paths.statusfile.clone()),
    };
    let pid = found.as_ref().map(Found::pid);
    // A status file left by an earlier process is not this one's.
    let st = pid.and_then(|pid| daemon::read_status(&statusfile).filter(|s| s.pid == pid));
    if a.json {
        let v = serde_json::json!({
            "id": id,
            "running": pid.is_some(),
            "mode": mode,
            "pid": pid,
            "pidfile": pidfile,
            "status": st,
        });
        super::print_json(&v)?;
    } else {
        let how = match mode {
            Some("foreground") => " in the foreground",
            _ => "",
        };
        let text = match (pid, &st) {
            (None, _) => format!("worker {id} is not running\n"),
            (Some(pid), None) => format!(
                "worker {id} is running{how} (pid {pid}); no status file at {}\n",
                statusfile.display()
            ),
            (Some(pid), Some(s)) => status_text(pid, how, s),
        };
        super::print_out(&text)?;
    }
    Ok(if pid.is_some() {
        ExitCode::Success
    } else {
        ExitCode::NotRunning
    })
}

/// The status for a terminal; `how` says where the worker runs (" in the foreground", or nothing).
fn status_text(pid: u32, how: &str, s: &Status) -> String {
    let ago = |t: &str| {
        humantime::parse_rfc3339(t)
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "?".into())
    };
    let state = serde_json::to_value(s.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    let mut out = format!("worker {} is running{how} (pid {pid}), {}\n", s.id, s.version);
    out += &format!("  hub:     {} — {state} for {}\n", s.url, ago(&s.since));
    if let Some(e) = &s.last_error {
        out += &format!("  last error: {e}\n");
    }
    out += &format!("  jobs:    {} running, capacity {}\n", s.running, s.capacity);
    out += &format!("  tags:    {}\n  envs:    {}\n", list(&s.tags), list(&s.envs));
    out += &format!("  uptime:  {} (since {})\n", ago(&s.started), s.started);
    out
}
