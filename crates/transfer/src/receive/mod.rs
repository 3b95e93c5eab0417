//! The receiving side: a writer thread stages everything beside its destination and puts it in place only
//! once every file is verified.
//!
//! - A **file** is written to `.NAME.cla-XXXX.part` in the target directory, fsynced, given its mode and
//!   mtime, and renamed over the target at the end.
//! - A **directory** whose target does not exist is built in `.NAME.cla-XXXX.part` beside the target and
//!   renamed into place at once. One merged into an existing directory is staged in `.cla-XXXX.part`
//!   inside it, and the staged entries are moved in (files replace files, each atomically; a file never
//!   replaces a directory: that is refused before anything moves). Directory modes and mtimes are applied
//!   last, deepest first, best effort, and never to an existing destination.
//! - Until that commit nothing is visible at the target; a failure or cancel removes the staging area and
//!   any parent directory the transfer created.
//! - The wire paths are checked ([`super::path::components`]) and every entry's parent must be a
//!   directory of this transfer, so nothing is ever written through a symlink or outside the staging area.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::path::{components, join, resolve, temp_beside};
use super::{ACK_EVERY, Link, Piece, Progress, TransferError, hex, hooks};
use cla_protocol::{TransferOp, TransferSummary};

mod commit;

use commit::{create_dir, io_error, make_symlink, set_mode, system_time};

/// The writer's error when its input ends early (the real reason is the link's).
const STOPPED: &str = "the transfer stopped before its end";

/// The writer's error when a cancel came before the commit.
const CANCELLED: &str = "cancelled";

/// Pieces queued for the writer thread (the window bounds what arrives; this bounds what waits).
const QUEUE: usize = 64;

/// What [`receive`] was asked to do.
#[derive(Debug, Clone)]
pub struct Received {
    /// The destination as given (`dir/` means "into dir").
    pub dest: String,
    /// Relative destinations are taken from here (the worker's workdir).
    pub base: Option<PathBuf>,
    /// Create missing parent directories.
    pub mkdir: bool,
    /// The name the transfer's root must have (a fetch asks for `…/NAME`): a sender cannot pick another
    /// name to write under the destination.
    pub expect_name: Option<String>,
}

/// Receives a transfer from `link` into `to`: acks as it writes, verifies every file, commits at `end`.
/// On any failure (or `cancel`) the sender is told with `abort` and nothing is left behind.
pub async fn receive(
    to: Received,
    link: &mut impl Link,
    cancel: &CancellationToken,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<TransferSummary, TransferError> {
    let (tx, rx) = mpsc::channel::<Piece>(QUEUE);
    let (report, mut reports) = mpsc::unbounded_channel::<(u64, Progress)>();
    let cancelled = Arc::new(AtomicBool::new(false));
    let stage = Stage::new(&to, cancelled.clone());
    let mut writer = tokio::task::spawn_blocking(move || stage.run(rx, report));
    let mut tx = Some(tx);
    let mut acked = 0u64;
    // Success returns from inside the loop; what breaks out of it is the reason to tell the sender.
    let error = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                cancelled.store(true, Ordering::SeqCst);
                drop(tx.take());
                // The writer may have committed just before: then the transfer did complete.
                if let Ok(Ok(summary)) = (&mut writer).await {
                    return Ok(summary);
                }
                break TransferError::Cancelled;
            }
            done = &mut writer => {
                break match done {
                    Ok(Ok(summary)) => {
                        while let Ok((_, p)) = reports.try_recv() {
                            progress(p);
                        }
                        return Ok(summary);
                    }
                    Ok(Err(e)) => TransferError::Failed(e),
                    Err(e) => TransferError::Failed(format!("the writer thread failed: {e}")),
                };
            }
            Some((consumed, p)) = reports.recv() => {
                progress(p);
                if consumed >= acked + ACK_EVERY {
                    acked = consumed;
                    if let Err(e) = link.send(Piece::Op(TransferOp::Ack { consumed })).await {
                        drop(tx.take());
                        let _ = (&mut writer).await;
                        return Err(TransferError::Failed(e));
                    }
                }
            }
            piece = link.recv(), if tx.is_some() => {
                let stop = match piece {
                    None => Some("the sender went away before the end of the transfer".to_owned()),
                    Some(Piece::Op(TransferOp::Abort { error })) => Some(format!("the sender stopped the transfer: {error}")),
                    Some(Piece::Op(TransferOp::Ack { .. } | TransferOp::Committed(_) | TransferOp::Resume { .. })) => None,
                    Some(p) => {
                        let end = matches!(p, Piece::Op(TransferOp::End { .. }));
                        // A closed queue means the writer failed: its error comes from the join handle.
                        if tx.as_ref().expect("checked").send(p).await.is_err() || end {
                            drop(tx.take());
                        }
                        None
                    }
                };
                if let Some(why) = stop {
                    cancelled.store(true, Ordering::SeqCst);
                    drop(tx.take());
                    // If the writer had already failed on what arrived, that is the reason to report; if it
                    // had committed, the transfer did complete.
                    return match (&mut writer).await {
                        Ok(Ok(summary)) => Ok(summary),
                        Ok(Err(e)) if e != STOPPED && e != CANCELLED => Err(TransferError::Failed(e)),
                        _ => Err(TransferError::Failed(format!("{why}; nothing was kept"))),
                    };
                }
            }
        }
    };
    let abort = TransferOp::Abort {
        error: error.to_string(),
    };
    let _ = link.send(Piece::Op(abort)).await;
    Err(error)
}

/// Where the transfer's root goes.
enum Root {
    File {
        target: PathBuf,
        temp: PathBuf,
    },
    Dir {
        target: PathBuf,
        staging: PathBuf,
        /// The target existed: entries are merged into it, and its own mode and mtime are left.
        merging: bool,
    },
}

/// The file being written.
struct Current {
    wire: String,
    staged: PathBuf,
    file: File,
    hasher: Sha256,
    size: u64,
    got: u64,
    mode: u32,
    mtime_ns: i64,
}

/// The writer thread's state. Dropped without a commit, it removes what it wrote.
struct Stage {
    dest: PathBuf,
    into: bool,
    mkdir: bool,
    expect_name: Option<String>,
    root_name: Option<String>,
    root: Option<Root>,
    /// Parent directories of the destination this transfer created, outermost first.
    created: Vec<PathBuf>,
    /// Wire paths of the directories of this transfer (entries may only go into these).
    dirs: HashSet<String>,
    /// Directory modes and mtimes, applied after the commit: (path below the root, mode, mtime).
    dir_meta: Vec<(Vec<String>, u32, i64)>,
    current: Option<Current>,
    manifest: Sha256,
    last_sha: String,
    summary: TransferSummary,
    progress: Progress,
    consumed: u64,
    committed: bool,
    /// Set by the async side on a cancel: checked before the commit.
    cancelled: Arc<AtomicBool>,
    fail_after: Option<u64>,
}

impl Stage {
    fn new(to: &Received, cancelled: Arc<AtomicBool>) -> Stage {
        Stage {
            dest: super::path::from_base(to.base.as_deref(), &to.dest),
            into: super::path::into_dir(&to.dest),
            mkdir: to.mkdir,
            root_name: None,
            expect_name: to.expect_name.clone(),
            root: None,
            created: Vec::new(),
            dirs: HashSet::new(),
            dir_meta: Vec::new(),
            current: None,
            manifest: Sha256::new(),
            last_sha: String::new(),
            summary: TransferSummary::default(),
            progress: Progress::default(),
            consumed: 0,
            committed: false,
            cancelled,
            fail_after: hooks::fail_write_after(),
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Piece>,
        report: mpsc::UnboundedSender<(u64, Progress)>,
    ) -> Result<TransferSummary, String> {
        while let Some(piece) = rx.blocking_recv() {
            self.consumed += piece.cost();
            let end = self.apply(piece)?;
            let _ = report.send((self.consumed, self.progress));
            if end {
                return Ok(self.summary.clone());
            }
        }
        Err(STOPPED.into())
    }

    /// Applies one piece; true once the transfer is committed.
    fn apply(&mut self, piece: Piece) -> Result<bool, String> {
        let op = match piece {
            Piece::Data(d) => {
                self.write(d.payload())?;
                return Ok(false);
            }
            Piece::Op(op) => op,
        };
        if self.current.is_some() && !matches!(op, TransferOp::FileEnd { .. }) {
            return Err("protocol error: a file's bytes did not end with `file_end`".into());
        }
        match op {
            TransferOp::Begin { bytes, .. } => self.progress.total = bytes,
            TransferOp::Dir { path, mode, mtime_ns } => self.dir(&path, mode, mtime_ns)?,
            TransferOp::File {
                path,
                size,
                mode,
                mtime_ns,
            } => self.file(&path, size, mode, mtime_ns)?,
            TransferOp::FileEnd { sha256 } => self.file_end(&sha256)?,
            TransferOp::Symlink { path, target } => self.symlink(&path, &target)?,
            TransferOp::End { files, bytes, sha256 } => {
                self.end(files, bytes, &sha256)?;
                return Ok(true);
            }
            TransferOp::Ack { .. }
            | TransferOp::Abort { .. }
            | TransferOp::Committed(_)
            | TransferOp::Resume { .. } => {}
        }
        Ok(false)
    }

    /// Checks an entry path and returns its components below the root (empty for the root itself).
    fn place(&mut self, wire: &str, is_dir: bool) -> Result<Vec<String>, String> {
        let parts = components(wire)?;
        if self.root.is_none() {
            if parts.len() != 1 {
                return Err(format!(
                    "protocol error: the first entry `{wire}` is not the transfer's root"
                ));
            }
            // The path asked for is the worker's: on a Windows worker `C:\\dir\\NAME` ends in NAME too.
            if let Some(want) = &self.expect_name
                && want != parts[0]
                && want.rsplit('\\').next() != Some(parts[0])
            {
                return Err(format!(
                    "refused the transfer: its root is named `{}`, but `{want}` was asked for",
                    parts[0].escape_debug()
                ));
            }
            self.start(parts[0], is_dir)?;
            return Ok(Vec::new());
        }
        let root = self.root_name.as_deref().unwrap_or_default();
        if parts.len() < 2 || parts[0] != root {
            return Err(format!(
                "refused entry `{wire}`: it is outside the transfer's root `{root}`"
            ));
        }
        if !matches!(self.root, Some(Root::Dir { .. })) {
            return Err(format!("protocol error: entry `{wire}` after a single-file root"));
        }
        let parent = parts[..parts.len() - 1].join("/");
        if !self.dirs.contains(&parent) {
            return Err(format!(
                "protocol error: entry `{wire}` comes before its directory `{parent}`"
            ));
        }
        Ok(parts[1..].iter().map(|s| (*s).to_owned()).collect())
    }

    /// The staged location of an entry below the root.
    fn staged(&self, rel: &[String]) -> PathBuf {
        match &self.root {
            Some(Root::Dir { staging, .. }) => join(staging, rel),
            Some(Root::File { temp, .. }) => temp.clone(),
            None => unreachable!("placed entries have a root"),
        }
    }

    /// Sets up the destination for the root entry `name`.
    fn start(&mut self, name: &str, is_dir: bool) -> Result<(), String> {
        let target = resolve(&self.dest, self.into, name, is_dir);
        match std::fs::metadata(&target) {
            Ok(m) if is_dir && !m.is_dir() => {
                return Err(format!(
                    "{} exists and is not a directory: remove it or choose another destination",
                    target.display()
                ));
            }
            Ok(m) if !is_dir && m.is_dir() => {
                return Err(format!(
                    "{} is a directory: give a file name, or end the destination with `/` to put the file inside",
                    target.display()
                ));
            }
            _ => {}
        }
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        self.make_parent(&parent)?;
        // A directory merged into an existing one is staged inside it: same file system (it may be a
        // mount point), and its parent need not be writable.
        let merging = is_dir && target.is_dir();
        let temp = if merging {
            target.join(format!(".cla-{}.part", cla_common::token::random_hex(4)))
        } else {
            temp_beside(&target)
        };
        self.root_name = Some(name.to_owned());
        if is_dir {
            create_dir(&temp)?;
            self.root = Some(Root::Dir {
                target,
                staging: temp,
                merging,
            });
            self.dirs.insert(name.to_owned());
        } else {
            self.root = Some(Root::File { target, temp });
        }
        Ok(())
    }

    /// Creates the destination's missing parent directories (remembered, to remove them on failure).
    fn make_parent(&mut self, parent: &Path) -> Result<(), String> {
        if parent.is_dir() {
            return Ok(());
        }
        if !self.mkdir {
            return Err(format!(
                "{} does not exist: create it first, or allow the transfer to create it (drop --no-mkdir)",
                parent.display()
            ));
        }
        let mut missing = Vec::new();
        let mut p = parent;
        while !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(up) => p = up,
                None => break,
            }
        }
        for dir in missing.into_iter().rev() {
            match std::fs::create_dir(&dir) {
                Ok(()) => self.created.push(dir),
                // Another transfer made it meanwhile: fine, and not ours to remove.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(io_error("creating", &dir, e)),
            }
        }
        if !parent.is_dir() {
            return Err(format!("{} is not a directory", parent.display()));
        }
        Ok(())
    }

    fn dir(&mut self, wire: &str, mode: u32, mtime_ns: i64) -> Result<(), String> {
        let rel = self.place(wire, true)?;
        if !rel.is_empty() {
            let staged = self.staged(&rel);
            create_dir(&staged)?;
            self.dirs.insert(wire.to_owned());
        }
        self.dir_meta.push((rel, mode, mtime_ns));
        self.summary.dirs += 1;
        Ok(())
    }

    fn file(&mut self, wire: &str, size: u64, mode: u32, mtime_ns: i64) -> Result<(), String> {
        let rel = self.place(wire, false)?;
        let staged = self.staged(&rel);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(&staged).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!("protocol error: `{wire}` was sent twice"),
            _ => io_error("creating", &staged, e),
        })?;
        self.current = Some(Current {
            wire: wire.to_owned(),
            staged,
            file,
            hasher: Sha256::new(),
            size,
            got: 0,
            mode,
            mtime_ns,
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        let Some(cur) = self.current.as_mut() else {
            return Err("protocol error: file bytes outside a file".into());
        };
        cur.got += data.len() as u64;
        if cur.got > cur.size {
            return Err(format!(
                "`{}`: more bytes than the announced {} were sent",
                cur.wire, cur.size
            ));
        }
        if let Some(limit) = self.fail_after
            && self.progress.done + data.len() as u64 > limit
        {
            let e = std::io::Error::from(std::io::ErrorKind::StorageFull);
            return Err(io_error("writing", &cur.staged, e));
        }
        cur.file
            .write_all(data)
            .map_err(|e| io_error("writing", &cur.staged, e))?;
        cur.hasher.update(data);
        self.progress.done += data.len() as u64;
        Ok(())
    }

    fn file_end(&mut self, sha256: &str) -> Result<(), String> {
        let Some(cur) = self.current.take() else {
            return Err("protocol error: `file_end` outside a file".into());
        };
        if cur.got != cur.size {
            return Err(format!(
                "`{}`: {} bytes arrived, {} were announced",
                cur.wire, cur.got, cur.size
            ));
        }
        let got = hex(&cur.hasher.finalize());
        if got != sha256 {
            return Err(format!(
                "checksum mismatch for `{}`: the sender's SHA-256 is {sha256}, the bytes received hash to {got}; \
                 the data was corrupted on the way and nothing was kept — send it again",
                cur.wire
            ));
        }
        set_mode(&cur.staged, Some(&cur.file), cur.mode)?;
        cur.file
            .set_modified(system_time(cur.mtime_ns))
            .map_err(|e| io_error("setting the mtime of", &cur.staged, e))?;
        cur.file
            .sync_all()
            .map_err(|e| io_error("syncing", &cur.staged, e))?;
        self.manifest.update(super::manifest_line(&got, &cur.wire));
        self.last_sha = got;
        self.summary.files += 1;
        self.summary.bytes += cur.size;
        Ok(())
    }

    fn symlink(&mut self, wire: &str, target: &str) -> Result<(), String> {
        if self.root.is_none() {
            return Err("protocol error: a symlink cannot be the transfer's root".into());
        }
        let rel = self.place(wire, false)?;
        let staged = self.staged(&rel);
        make_symlink(target, &staged).map_err(|e| io_error("creating the symlink", &staged, e))?;
        self.summary.symlinks += 1;
        Ok(())
    }

    fn end(&mut self, files: u64, bytes: u64, sha256: &str) -> Result<(), String> {
        let digest = match &self.root {
            None => return Err("protocol error: the transfer ended before its first entry".into()),
            Some(Root::File { .. }) => std::mem::take(&mut self.last_sha),
            Some(Root::Dir { .. }) => hex(&std::mem::take(&mut self.manifest).finalize()),
        };
        if files != self.summary.files || bytes != self.summary.bytes || digest != sha256 {
            return Err(format!(
                "the transfer does not add up: the sender sent {files} files, {bytes} bytes (digest {sha256}); \
                 received {} files, {} bytes (digest {digest})",
                self.summary.files, self.summary.bytes
            ));
        }
        self.summary.sha256 = digest;
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(CANCELLED.into());
        }
        self.commit()
    }
}
