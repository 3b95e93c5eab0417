//! Child processes as trees: each job runs in its own process group (Unix) or Job Object (Windows) so
//! that a timeout or a cancel reaches every process it started, not just the first one.
//!
//! The kill ladder: on Unix SIGTERM to the group, a grace period for it to exit, then SIGKILL to whatever
//! is left. On Windows Ctrl-Break to the job's console process group (console programs stop on it as on
//! Ctrl-C), the same grace period, then `TerminateJobObject`, which ends every process in the job.

use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Time between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// A running job process and, on Windows, the Job Object holding it and everything it starts.
pub struct Tree {
    pub child: Child,
    #[cfg(windows)]
    job: Option<job::Job>,
}

/// Starts `cmd` as the root of a tree of its own: the leader of a new process group (Unix), or a new
/// console process group inside a new Job Object (Windows).
pub fn spawn_tree(cmd: &mut Command) -> std::io::Result<Tree> {
    #[cfg(unix)]
    cmd.process_group(0);
    #[cfg(windows)]
    cmd.creation_flags(windows_sys::Win32::System::Threading::CREATE_NEW_PROCESS_GROUP);
    let child = cmd.spawn()?;
    Ok(Tree {
        #[cfg(windows)]
        job: job::Job::adopt(&child),
        child,
    })
}

/// The shell command for a one-string command line (`sh -c` / `cmd /C`). A std `Command`, so that the
/// eval child's synchronous `cla.run` uses it as well as the async exec (`tokio::process::Command::from`).
pub fn shell(cmd: &str) -> std::process::Command {
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
pub enum Ending {
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
pub async fn supervise(
    tree: &mut Tree,
    cancel: &CancellationToken,
    mut limit: impl FnMut() -> Option<String>,
) -> (Ending, Option<std::process::ExitStatus>) {
    let mut check = tokio::time::interval(Duration::from_millis(100));
    let ending = loop {
        tokio::select! {
            status = tree.child.wait() => return match status {
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
    kill_tree(tree, KILL_GRACE).await;
    (ending, tree.child.try_wait().ok().flatten())
}

/// Waits for reader tasks (pipes) to finish; after the process has ended, background processes may
/// keep a pipe open, so give up after `linger` (the processes are left alone).
pub async fn drain<T>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
    linger: Duration,
) -> Vec<Option<T>> {
    let start = tokio::time::Instant::now();
    drain_while_moving(tasks, linger, move || start).await
}

/// Like [`drain`], but the linger runs from the tasks' last progress (`progress()`: the time of it), so
/// pumps still moving output (held back by a slow connection) are not cut off, and pipes left open by
/// silent background processes are given up `linger` after the last byte.
pub async fn drain_while_moving<T>(
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

/// Kills the tree led by `tree.child`: TERM (Ctrl-Break on Windows), up to `grace` for the tree to
/// empty, then KILL (`TerminateJobObject`). Reaps the leader. Returns once the leader has exited.
pub async fn kill_tree(tree: &mut Tree, grace: Duration) {
    let child = &mut tree.child;
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
    #[cfg(windows)]
    {
        match (&tree.job, child.id()) {
            (Some(job), Some(pid)) => {
                // Ctrl-Break reaches the group only when we share a console with it (not as a service):
                // then the grace period is the program's chance to clean up.
                let asked = job::ctrl_break(pid);
                let start = Instant::now();
                while asked && job.active() > 0 && start.elapsed() < grace {
                    let _ = child.try_wait();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                job.terminate();
            }
            _ => {
                let _ = child.start_kill();
            }
        }
        let _ = child.wait().await;
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = (grace, Instant::now());
        let _ = child.kill().await;
    }
}

/// Job Objects: every process a job's command starts (unless it asks to break away) is in its job, so
/// one call ends them all.
#[cfg(windows)]
mod job {
    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
    use windows_sys::Win32::System::Console::{CTRL_BREAK_EVENT, GenerateConsoleCtrlEvent};
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JOBOBJECT_BASIC_ACCOUNTING_INFORMATION,
        JobObjectBasicAccountingInformation, QueryInformationJobObject, TerminateJobObject,
    };

    pub struct Job(HANDLE);

    // SAFETY: a Job Object handle may be used and closed from any thread.
    unsafe impl Send for Job {}
    unsafe impl Sync for Job {}

    impl Job {
        /// A new job holding `child` (and, from now on, whatever it starts). `None` if the OS refuses
        /// (then only the child itself can be killed).
        pub fn adopt(child: &tokio::process::Child) -> Option<Job> {
            let process = child.raw_handle()? as HANDLE;
            // SAFETY: plain Win32 calls; the job handle is owned by the returned Job (closed on drop), the
            // process handle stays owned by `child`.
            unsafe {
                let job = CreateJobObjectW(std::ptr::null(), std::ptr::null());
                if job.is_null() {
                    return None;
                }
                if AssignProcessToJobObject(job, process) == 0 {
                    CloseHandle(job);
                    tracing::debug!(
                        "cannot put the job process in a Job Object: {}",
                        std::io::Error::last_os_error()
                    );
                    return None;
                }
                Some(Job(job))
            }
        }

        /// How many processes of the job are alive.
        pub fn active(&self) -> u32 {
            let mut info: JOBOBJECT_BASIC_ACCOUNTING_INFORMATION = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is a properly sized, writable out-buffer for this information class.
            let ok = unsafe {
                QueryInformationJobObject(
                    self.0,
                    JobObjectBasicAccountingInformation,
                    (&mut info as *mut JOBOBJECT_BASIC_ACCOUNTING_INFORMATION).cast(),
                    std::mem::size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
                    std::ptr::null_mut(),
                )
            };
            if ok == 0 { 0 } else { info.ActiveProcesses }
        }

        /// Ends every process in the job.
        pub fn terminate(&self) {
            // SAFETY: the handle is valid until drop.
            unsafe { TerminateJobObject(self.0, 1) };
        }
    }

    impl Drop for Job {
        fn drop(&mut self) {
            // SAFETY: we own the handle. Closing it does not end the processes (no KILL_ON_JOB_CLOSE):
            // as on Unix, background processes a finished command left behind are left alone.
            unsafe { CloseHandle(self.0) };
        }
    }

    /// Sends Ctrl-Break to the console process group `pid` leads. False if it could not be sent.
    pub fn ctrl_break(pid: u32) -> bool {
        // SAFETY: plain Win32 call.
        unsafe { GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, pid) != 0 }
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
pub fn exit_status(status: std::process::ExitStatus) -> (Option<i32>, Option<i32>) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return (Some(128 + sig), Some(sig));
        }
    }
    (status.code(), None)
}
