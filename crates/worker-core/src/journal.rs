//! A job's journal on the worker: its output, start and end, kept until the hub acknowledges the end,
//! so that neither a dropped connection nor a restarted hub loses any of it (`docs/reliability.md`).
//!
//! Everything a job produces is appended to its spool file and, while the worker is connected, sent on.
//! After a reconnect the hub says how much of each stream it has ([`cla_protocol::Resumed`]); the
//! journal replays the rest from the spool, then the job goes on live. The file goes when the hub's
//! `ack` says the job's end is stored.
//!
//! Spool file `SPOOL_DIR/JOB.spool`: records `[kind u8][length u32 LE][payload]`: 1 stdout bytes,
//! 2 stderr bytes, 3 started (pid as u32 LE, 0 for none), 4 the result (JSON [`JobResult`]). A record
//! cut short by a crash is ignored. The file is created when the job is accepted, so a worker
//! restarted after dying finds the jobs it had taken, and reports those without an end as lost.
//! Writes are not fsynced: the spool outlives the worker process, not the machine.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::session::Out;
use cla_protocol::{JobResult, Outcome, Resumed, WorkerMessage};

const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STARTED: u8 = 3;
const RESULT: u8 = 4;

/// Largest replay read (and frame) at a time.
const REPLAY_CHUNK: usize = 64 * 1024;

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout = 0,
    Stderr = 1,
}

/// The worker's spool directory: one file per job not yet acknowledged by the hub.
pub(crate) struct Spool {
    dir: PathBuf,
    /// Bytes in all spool files; writes past `max` are not spooled.
    used: AtomicU64,
    max: u64,
    #[cfg(unix)]
    _lock: nix::fcntl::Flock<std::fs::File>,
    #[cfg(not(unix))]
    _lock: std::fs::File,
}

impl Spool {
    /// Opens (creating it) the spool directory, locked against a second worker process using it. The
    /// lock file then names this process and its `pidfile` (a background worker's), which is how
    /// `cla-worker status` finds a worker started in the foreground ([`crate::daemon::spool_holder`]).
    pub(crate) fn open(dir: &Path, max_bytes: u64, pidfile: Option<&Path>) -> crate::error::Result<Spool> {
        use crate::error::Error;
        // Job output is private to the worker's user: the directory 0700, each file in it 0600.
        cla_common::util::create_private_dir(dir).map_err(|e| {
            Error::Usage(format!(
                "cannot create the spool directory {}: {e}; set `spool_dir` in the config to a writable directory",
                dir.display()
            ))
        })?;
        let busy = || {
            Error::Usage(format!(
                "the spool directory {} is in use by another cla-worker process; give each worker \
                 its own `spool_dir` (or stop the other one)",
                dir.display()
            ))
        };
        let mut open = cla_common::util::private_open_options();
        // Written (not appended to): the record below replaces what an earlier holder left.
        open.create(true).write(true).truncate(false);
        // Windows has no flock: the lock file is held open sharing reads only, which a second open for
        // writing fails with a sharing violation (and a crash releases).
        #[cfg(windows)]
        std::os::windows::fs::OpenOptionsExt::share_mode(
            &mut open,
            windows_sys::Win32::Storage::FileSystem::FILE_SHARE_READ,
        );
        let lock_path = dir.join(crate::daemon::SPOOL_LOCK);
        let file = open.open(&lock_path).map_err(|e| match e.raw_os_error() {
            #[cfg(windows)]
            Some(32) => busy(),
            _ => Error::io(dir, e),
        })?;
        #[cfg(unix)]
        let lock = {
            use nix::fcntl::{Flock, FlockArg};
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| busy())?
        };
        #[cfg(not(unix))]
        let lock = {
            let _ = &busy;
            file
        };
        // Rewritten in place, from its start (the lock belongs to this inode).
        let holder = crate::daemon::SpoolHolder {
            pid: std::process::id(),
            pidfile: pidfile.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
        };
        let record = |mut f: &std::fs::File| {
            f.set_len(0)?;
            f.write_all(holder.record().as_bytes())
        };
        record(&lock).map_err(|e| Error::io(&lock_path, e))?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            used: AtomicU64::new(0),
            max: max_bytes,
            _lock: lock,
        })
    }

    fn path(&self, job: &str) -> PathBuf {
        self.dir.join(format!("{job}.spool"))
    }

    /// The journals a previous worker process left: jobs it accepted whose end the hub has not
    /// acknowledged. Those without an end are given one: `lost` (the process running them is gone).
    pub(crate) fn recover(self: &Arc<Self>) -> Vec<Arc<Journal>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(job) = name.strip_suffix(".spool") else {
                continue;
            };
            if job.is_empty() || job.starts_with('.') {
                continue;
            }
            match self.reopen(job, &e.path()) {
                Ok(j) => found.push(j),
                Err(err) => {
                    tracing::warn!(job, "unreadable spool file {} skipped: {err}", e.path().display())
                }
            }
        }
        found.sort_by(|a, b| a.job.cmp(&b.job));
        found
    }

    fn reopen(self: &Arc<Self>, job: &str, path: &Path) -> std::io::Result<Arc<Journal>> {
        let mut state = State::default();
        let mut records = Records::open(path)?;
        while let Some((kind, payload)) = records.next_record()? {
            match kind {
                STDOUT => state.written[0] += payload.len() as u64,
                STDERR => state.written[1] += payload.len() as u64,
                STARTED => {
                    let pid = payload
                        .get(..4)
                        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                    state.started = Some(pid.filter(|p| *p != 0));
                }
                RESULT => state.result = serde_json::from_slice(&payload).ok(),
                _ => {}
            }
        }
        let valid = records.end;
        // Everything read was sent by the process that wrote it, as far as this one knows.
        state.sent = state.written;
        state.spooled_out = state.written;
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        // Drop a record a crash cut short, so new records follow whole ones.
        file.set_len(valid)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        self.used.fetch_add(valid, Ordering::Relaxed);
        state.file = Some(file);
        state.spooled = valid;
        let journal = Arc::new(Journal {
            job: job.to_owned(),
            path: path.to_path_buf(),
            spool: self.clone(),
            state: tokio::sync::Mutex::new(state),
        });
        Ok(journal)
    }
}

/// Largest record a spool file may hold (output records are at most 64 KiB, a result at most a message);
/// a longer length is a corrupt header, read as the end of the file.
const MAX_RECORD: usize = 16 << 20;

/// The whole records of a spool file, in order; a torn or corrupt tail ends them.
struct Records {
    r: std::io::BufReader<std::fs::File>,
    /// File offset after the last record read.
    end: u64,
}

impl Records {
    fn open(path: &Path) -> std::io::Result<Records> {
        Ok(Records {
            r: std::io::BufReader::new(std::fs::File::open(path)?),
            end: 0,
        })
    }

    /// The next record's kind and payload.
    fn next_record(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        let mut head = [0u8; 5];
        if read_full(&mut self.r, &mut head)? < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD {
            return Ok(None);
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut self.r, &mut payload)? < len {
            return Ok(None);
        }
        self.end += 5 + len as u64;
        Ok(Some((head[0], payload)))
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where a journal sends what its job produces: the current connection's writer and stream ids.
pub(crate) struct Link {
    pub out: mpsc::Sender<Out>,
    pub streams: [u64; 2],
}

#[derive(Default)]
struct State {
    /// The spool file, while it takes writes.
    file: Option<std::fs::File>,
    /// Bytes in the spool file.
    spooled: u64,
    /// True once output was not spooled (limit or error): output stops being spooled for good, so the
    /// spool holds a prefix of each stream and a replay can tell what it is missing.
    gap: bool,
    /// Output bytes in the spool, per stream (a prefix of what was written).
    spooled_out: [u64; 2],
    /// Output bytes the job produced, per stream.
    written: [u64; 2],
    /// Output bytes handed to a connection, per stream (short of `written` when a send was interrupted).
    sent: [u64; 2],
    /// Output bytes a replay could not resend (they were past the spool limit).
    lost: u64,
    /// `Some(pid)` once the process runs.
    started: Option<Option<u32>>,
    result: Option<JobResult>,
    link: Option<Link>,
    /// The hub gave the job up: nothing more is kept or sent.
    abandoned: bool,
}

/// One job's journal (see the module docs).
pub(crate) struct Journal {
    pub job: String,
    path: PathBuf,
    spool: Arc<Spool>,
    state: tokio::sync::Mutex<State>,
}

impl Journal {
    /// Starts the journal of a job being accepted (its spool file exists from now on).
    pub(crate) fn create(spool: &Arc<Spool>, job: &str, link: Link) -> Arc<Journal> {
        let path = spool.path(job);
        let file = cla_common::util::private_open_options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                tracing::warn!(
                    job,
                    "cannot create spool file {}: {e}; output is not spooled",
                    path.display()
                )
            })
            .ok();
        Arc::new(Journal {
            job: job.to_owned(),
            path,
            spool: spool.clone(),
            state: tokio::sync::Mutex::new(State {
                gap: file.is_none(),
                file,
                link: Some(link),
                ..State::default()
            }),
        })
    }

    /// Appends a record to the spool (if it still takes writes).
    fn spool_write(&self, st: &mut State, kind: u8, payload: &[u8]) {
        let output = kind == STDOUT || kind == STDERR;
        if output && st.gap {
            return;
        }
        let Some(file) = st.file.as_mut() else {
            st.gap |= output;
            return;
        };
        let size = 5 + payload.len() as u64;
        // The limit applies to output; the start and the end are always kept.
        if output && self.spool.used.load(Ordering::Relaxed) + size > self.spool.max {
            if !st.gap {
                tracing::warn!(
                    job = %self.job,
                    "spool limit of {} MiB reached: further output of this job is not spooled, and is lost if the connection drops",
                    self.spool.max >> 20
                );
            }
            st.gap = true;
            return;
        }
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let written = file.write_all(&head).and_then(|_| file.write_all(payload));
        match written {
            Ok(()) => {
                st.spooled += size;
                self.spool.used.fetch_add(size, Ordering::Relaxed);
                if output {
                    st.spooled_out[(kind - STDOUT) as usize] += payload.len() as u64;
                }
            }
            Err(e) => {
                tracing::warn!(job = %self.job, "spool write failed ({e}): output is no longer spooled");
                // A half-written record would corrupt what follows: stop writing this file.
                st.file = None;
                st.gap = true;
            }
        }
    }

    /// Sends through the link; a failed send (the connection went) unlinks.
    async fn send(st: &mut State, out: Out) {
        if let Some(l) = &st.link
            && l.out.send(out).await.is_err()
        {
            st.link = None;
        }
    }

    /// Output of the job.
    pub(crate) async fn output(&self, which: Stream, data: Bytes) {
        let mut st = self.state.lock().await;
        if st.abandoned {
            return;
        }
        let kind = STDOUT + which as u8;
        self.spool_write(&mut st, kind, &data);
        let i = which as usize;
        let n = data.len() as u64;
        st.written[i] += n;
        let Some(stream) = st.link.as_ref().map(|l| l.streams[i]) else {
            return;
        };
        let behind = st.sent[i] + n < st.written[i];
        if behind && !st.gap {
            // A send was interrupted (a pump stopped mid-send): catch up from the spool, which holds this
            // chunk too, so the order holds.
            let from = st.sent;
            if let Err(e) = self.replay(&mut st, from).await {
                tracing::warn!(job = %self.job, "resending unsent output failed: {e}");
            }
            return;
        }
        if behind {
            st.lost += st.written[i] - n - st.sent[i];
        }
        Self::send(&mut st, Out::Data(stream, data)).await;
        if st.link.is_some() {
            st.sent[i] = st.written[i];
        }
    }

    /// The job's process runs.
    pub(crate) async fn started(&self, pid: Option<u32>) {
        let mut st = self.state.lock().await;
        if st.abandoned {
            return;
        }
        self.spool_write(&mut st, STARTED, &pid.unwrap_or(0).to_le_bytes());
        st.started = Some(pid);
        let msg = WorkerMessage::Started {
            job: self.job.clone(),
            pid,
        };
        Self::send(&mut st, Out::msg(msg)).await;
    }

    /// The job ended: kept until the hub acknowledges it.
    pub(crate) async fn finish(&self, result: JobResult) {
        let mut st = self.state.lock().await;
        if st.abandoned {
            return;
        }
        // Output whose send was interrupted (a pump stopped mid-send) goes before the end.
        if st.link.is_some() && (st.sent[0] < st.written[0] || st.sent[1] < st.written[1]) {
            let from = st.sent;
            if let Err(e) = self.replay(&mut st, from).await {
                tracing::warn!(job = %self.job, "resending unsent output failed: {e}");
            }
        }
        let json = serde_json::to_vec(&result).expect("results serialize");
        self.spool_write(&mut st, RESULT, &json);
        if let Some(f) = st.file.as_mut() {
            let _ = f.flush();
        }
        st.result = Some(result);
        let end = self.end_message(&st);
        Self::send(&mut st, end).await;
    }

    /// `finished`, saying how much output was lost if a replay could not resend all of it.
    fn end_message(&self, st: &State) -> Out {
        let mut result = st.result.clone().expect("called once the job has ended");
        result.output_bytes = Some(st.written);
        if st.lost > 0 {
            let note = format!(
                "{} bytes of output were lost in a disconnect (past the spool limit of {} MiB)",
                st.lost,
                self.spool.max >> 20
            );
            result.error = Some(match result.error.take() {
                Some(e) => format!("{e}; {note}"),
                None => note,
            });
        }
        Out::msg(WorkerMessage::Finished(result))
    }

    /// True once the job has ended (its result is known).
    pub(crate) async fn ended(&self) -> bool {
        self.state.lock().await.result.is_some()
    }

    /// The connection went: keep everything for the next one.
    pub(crate) async fn unlink(&self) {
        self.state.lock().await.link = None;
    }

    /// A new connection takes the job back: sends what the hub is missing (output past its offsets, the
    /// start, the end), then links the job to the connection. Holding the journal meanwhile makes the
    /// job's new output wait, so it follows the replay in order.
    pub(crate) async fn relink(&self, link: Link, from: &Resumed) {
        let mut st = self.state.lock().await;
        if st.abandoned {
            return;
        }
        st.link = Some(link);
        let offsets = [from.stdout_offset, from.stderr_offset];
        // Until the replay is done, the hub has what it says it has.
        st.sent = [offsets[0].min(st.written[0]), offsets[1].min(st.written[1])];
        let missing = offsets[0] < st.written[0] || offsets[1] < st.written[1];
        if missing && let Err(e) = self.replay(&mut st, offsets).await {
            tracing::warn!(job = %self.job, "replaying the spool failed: {e}");
        }
        if let Some(pid) = st.started {
            let msg = WorkerMessage::Started {
                job: self.job.clone(),
                pid,
            };
            Self::send(&mut st, Out::msg(msg)).await;
        }
        if st.result.is_some() {
            let end = self.end_message(&st);
            Self::send(&mut st, end).await;
        }
    }

    /// Sends the spooled output past `offsets`, record by record; `sent` follows. Output past what the
    /// spool holds (the spool limit) cannot be resent: it is counted in `lost`, and `sent` moves past it
    /// so the live output that follows is not held back.
    async fn replay(&self, st: &mut State, offsets: [u64; 2]) -> std::io::Result<()> {
        let mut resent = 0u64;
        if let Some(f) = st.file.as_mut() {
            f.flush()?;
        }
        let mut records = Records::open(&self.path)?;
        let mut seen = [0u64; 2];
        while let Some((kind, payload)) = records.next_record()? {
            let which = match kind {
                STDOUT | STDERR => (kind - STDOUT) as usize,
                _ => continue,
            };
            let start = seen[which];
            seen[which] += payload.len() as u64;
            if seen[which] <= offsets[which] {
                continue;
            }
            let skip = offsets[which].saturating_sub(start) as usize;
            let data = Bytes::from(payload).slice(skip..);
            for c in (0..data.len()).step_by(REPLAY_CHUNK) {
                let Some(stream) = st.link.as_ref().map(|l| l.streams[which]) else {
                    return Ok(());
                };
                let piece = data.slice(c..data.len().min(c + REPLAY_CHUNK));
                let n = piece.len() as u64;
                Self::send(st, Out::Data(stream, piece)).await;
                if st.link.is_none() {
                    return Ok(());
                }
                st.sent[which] = start + skip as u64 + c as u64 + n;
                resent += n;
            }
        }
        for i in 0..2 {
            // Past both what was sent and what the spool holds: gone.
            let beyond = st.written[i].saturating_sub(st.sent[i].max(st.spooled_out[i]));
            if beyond > 0 {
                tracing::warn!(job = %self.job, bytes = beyond, "output past the spool limit could not be resent");
                st.lost += beyond;
                st.sent[i] = st.written[i];
            }
        }
        tracing::info!(job = %self.job, bytes = resent, "resent the output the hub had not received");
        Ok(())
    }

    /// The job is over for this worker (acknowledged by the hub, or given up by it): the spool file goes.
    pub(crate) async fn remove(&self) {
        let mut st = self.state.lock().await;
        st.abandoned = true;
        st.link = None;
        st.file = None;
        self.spool.used.fetch_sub(
            st.spooled.min(self.spool.used.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        st.spooled = 0;
        let _ = std::fs::remove_file(&self.path);
    }

    /// The result a recovered journal ends with when its process is gone.
    pub(crate) async fn end_if_unfinished(&self, why: &str) {
        if self.ended().await {
            return;
        }
        let result = JobResult::not_run(self.job.clone(), Outcome::Lost, why);
        self.finish(result).await;
    }
}

#[cfg(test)]
mod tests;
