//! Child processes as trees: each job runs in its own process group (Unix) so that a timeout or a cancel
//! reaches every process it started, not just the first one.
//!
//! The kill ladder: SIGTERM to the group, a grace period for it to exit, then SIGKILL to whatever is left.
//! Windows (Job Objects) comes with the cross-platform issue; until then the direct child is killed.

use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Time between SIGTERM and SIGKILL.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);

/// Makes the command the leader of a new process group.
pub(crate) fn own_group(cmd: &mut Command) {
    #[cfg(unix)]
    cmd.process_group(0);
    #[cfg(not(unix))]
    let _ = cmd;
}

/// The shell command for a one-string command line (`sh -c` / `cmd /C`). A std `Command`, so that the
/// eval child's synchronous `cla.run` uses it as well as the async exec (`tokio::process::Command::from`).
pub(crate) fn shell(cmd: &str) -> std::process::Command {
    #[cfg(unix)]
    {
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c").arg(cmd);
        c
    }
    #[cfg(windows)]
    {
        let mut c = std::process::Command::new("cmd");
        c.arg("/C").arg(cmd);
        c
    }
}

/// Why [`supervise`] stopped waiting.
pub(crate) enum Ending {
    /// The process exited by itself.
    Exited(std::process::ExitStatus),
    /// `cancel` fired; the tree was killed.
    Cancelled,
    /// `limit` said why; the tree was killed.
    TimedOut(String),
    /// Waiting failed (should not happen).
    WaitFailed(String),
}

/// Waits for `child` to exit, for `cancel`, or for `limit` (polled every 100 ms) to return a reason to
/// stop; in the last two cases kills the whole tree. Returns why, and the exit status if there is one.
pub(crate) async fn supervise(
    child: &mut Child,
    cancel: &CancellationToken,
    mut limit: impl FnMut() -> Option<String>,
) -> (Ending, Option<std::process::ExitStatus>) {
    let mut check = tokio::time::interval(Duration::from_millis(100));
    let ending = loop {
        tokio::select! {
            status = child.wait() => return match status {
                Ok(s) => (Ending::Exited(s), Some(s)),
                Err(e) => (Ending::WaitFailed(format!("waiting for the process failed: {e}")), None),
            },
            _ = cancel.cancelled() => break Ending::Cancelled,
            _ = check.tick() => {
                if let Some(why) = limit() {
                    break Ending::TimedOut(why);
                }
            }
        }
    };
    kill_tree(child, KILL_GRACE).await;
    (ending, child.try_wait().ok().flatten())
}

/// Waits for reader tasks (pipes) to finish; after the process has ended, background processes may
/// keep a pipe open, so give up after `linger` (the processes are left alone).
pub(crate) async fn drain<T>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
    linger: Duration,
) -> Vec<Option<T>> {
    let start = tokio::time::Instant::now();
    drain_while_moving(tasks, linger, move || start).await
}

/// Like [`drain`], but the linger runs from the tasks' last progress (`progress()`: the time of it), so
/// pumps still moving output (held back by a slow connection) are not cut off, and pipes left open by
/// silent background processes are given up `linger` after the last byte.
pub(crate) async fn drain_while_moving<T>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
    linger: Duration,
    progress: impl Fn() -> tokio::time::Instant,
) -> Vec<Option<T>> {
    let mut out = Vec::new();
    for mut t in tasks {
        loop {
            let deadline = progress() + linger;
            tokio::select! {
                r = &mut t => {
                    out.push(r.ok());
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Progress may have come meanwhile: then the linger starts again from it.
                    if progress() + linger <= tokio::time::Instant::now() {
                        t.abort();
                        out.push(None);
                        break;
                    }
                }
            }
        }
    }
    out
}

/// Kills the tree led by `child`: TERM, up to `grace` for the group to empty, then KILL.
/// Reaps the leader. Returns once the leader has exited.
pub(crate) async fn kill_tree(child: &mut Child, grace: Duration) {
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let Some(pid) = child.id() else {
            // Already reaped: its group may still have members, but we no longer know it safely.
            return;
        };
        let group = Pid::from_raw(pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let start = Instant::now();
        loop {
            let _ = child.try_wait();
            if !group_alive(pid) {
                break;
            }
            if start.elapsed() >= grace {
                let _ = killpg(group, Signal::SIGKILL);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.wait().await;
    }
    #[cfg(not(unix))]
    {
        let _ = grace;
        let _ = Instant::now();
        let _ = child.kill().await;
    }
}

/// True while a process of group `pgid` is alive. Zombies do not count: an orphan that was killed stays a
/// zombie until its new parent reaps it, and in containers whose PID 1 never reaps, that is forever.
#[cfg(unix)]
fn group_alive(pgid: u32) -> bool {
    use nix::sys::signal::killpg;
    use nix::unistd::Pid;
    // ESRCH: no process at all in the group (a reaped leader no longer counts).
    if killpg(Pid::from_raw(pgid as i32), None).is_err() {
        return false;
    }
    #[cfg(target_os = "linux")]
    if let Ok(dir) = std::fs::read_dir("/proc") {
        return dir.flatten().any(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let (state, _ppid, pgrp) = (f.next(), f.next(), f.next());
            pgrp == Some(&pgid.to_string()) && !matches!(state, Some("Z") | Some("X"))
        });
    }
    true
}

/// Exit code and signal of an ended process; a signal death reports 128 + signal, as shells do.
pub(crate) fn exit_status(status: std::process::ExitStatus) -> (Option<i32>, Option<i32>) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return (Some(128 + sig), Some(sig));
        }
    }
    (status.code(), None)
}
