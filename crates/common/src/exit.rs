//! Exit codes as values: commands return an [`ExitCode`], and only `main` turns it into a
//! process exit status.
//!
//! `cla-hub`'s own codes sit at the top of the range (252–255), where a remote command's status, which
//! `exec` passes through, rarely lands; 124 and 130 follow `timeout(1)` and the shell.

/// What a command ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// 0: everything went as asked.
    Success,
    /// 1: an error, already printed.
    Failure,
    /// 2: the command line could not be used.
    Usage,
    /// 3: `status`/`stop` found no running worker.
    NotRunning,
    /// 10: the hub ordered this worker to shut down.
    HubShutdown,
    /// 124: a remote command hit its timeout.
    TimedOut,
    /// 130: interrupted (Ctrl-C) or cancelled.
    Interrupted,
    /// 252: no registered worker can ever match the job's target (unknown id, tags or env).
    NoWorker,
    /// 253: no worker started the job within its queue timeout.
    QueueTimeout,
    /// 254: the connection to the hub was lost and could not be re-established; the job may still run.
    HubLost,
    /// 255: the remote command could not be run (or its job was lost).
    CouldNotRun,
    /// A remote command's own exit status, passed through.
    Remote(u8),
}

impl ExitCode {
    /// The numeric status.
    pub fn code(self) -> u8 {
        match self {
            ExitCode::Success => 0,
            ExitCode::Failure => 1,
            ExitCode::Usage => 2,
            ExitCode::NotRunning => 3,
            ExitCode::HubShutdown => 10,
            ExitCode::TimedOut => 124,
            ExitCode::Interrupted => 130,
            ExitCode::NoWorker => 252,
            ExitCode::QueueTimeout => 253,
            ExitCode::HubLost => 254,
            ExitCode::CouldNotRun => 255,
            ExitCode::Remote(rc) => rc,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code.code())
    }
}
