//! The sending side: plan (one `lstat` per entry), then read and hash on a blocking thread while the
//! async side paces the pieces by the receiver's acks.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::path::wire_name;
use super::{CHUNK, Link, Piece, Progress, TransferError, WINDOW, hex, hooks};
use cla_protocol::{Chunk, TransferOp, TransferSummary};

/// Pieces read ahead of the window (bounded: the reader waits when the network is slower).
const READ_AHEAD: usize = 4;

/// What a planned entry is.
enum Kind {
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    File {
        size: u64,
        mode: u32,
        mtime_ns: i64,
        /// (device, inode) as planned: the file read must be this one (Unix).
        id: (u64, u64),
    },
    Symlink {
        target: String,
    },
}

struct Item {
    wire: String,
    path: PathBuf,
    kind: Kind,
}

/// A file or directory ready to be sent: planned, with its reader thread started.
pub struct Source {
    rx: mpsc::Receiver<Result<Piece, String>>,
    /// What will be sent.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub skipped: u64,
    pub bytes: u64,
    /// The local path, as given.
    pub path: PathBuf,
}

impl Source {
    /// Plans the transfer of `path` (a symlink given as `path` itself is followed; links inside a
    /// directory are sent as links) and starts reading. Errors name the path and the problem.
    pub async fn open(path: PathBuf) -> Result<Source, String> {
        let p = path.clone();
        let (items, skipped) = tokio::task::spawn_blocking(move || plan(&p))
            .await
            .map_err(|e| format!("planning the transfer failed: {e}"))??;
        let (mut files, mut dirs, mut symlinks, mut bytes) = (0, 0, 0, 0);
        for i in &items {
            match i.kind {
                Kind::Dir { .. } => dirs += 1,
                Kind::File { size, .. } => {
                    files += 1;
                    bytes += size;
                }
                Kind::Symlink { .. } => symlinks += 1,
            }
        }
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let single_file = matches!(items.first().map(|i| &i.kind), Some(Kind::File { .. }));
        tokio::task::spawn_blocking(move || read_all(items, files, bytes, single_file, tx));
        Ok(Source {
            rx,
            files,
            dirs,
            symlinks,
            skipped,
            bytes,
            path,
        })
    }
}

fn io_error(path: &Path, e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("{}: no such file or directory", path.display()),
        std::io::ErrorKind::PermissionDenied => format!(
            "{}: permission denied (run as a user who can read it)",
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    match m.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        },
        Err(_) => 0,
    }
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_id(_m: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

#[cfg(unix)]
fn mode(m: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o777
}

#[cfg(not(unix))]
fn mode(m: &std::fs::Metadata) -> u32 {
    match (m.is_dir(), m.permissions().readonly()) {
        (true, _) => 0o755,
        (false, true) => 0o444,
        (false, false) => 0o644,
    }
}

/// The entries to send, depth first with names sorted bytewise, and how many special files were skipped.
fn plan(root: &Path) -> Result<(Vec<Item>, u64), String> {
    let meta = std::fs::metadata(root).map_err(|e| io_error(root, e))?;
    let name = match root.file_name() {
        Some(n) => n.to_owned(),
        None => std::path::absolute(root)
            .ok()
            .and_then(|a| std::fs::canonicalize(a).ok())
            .and_then(|c| c.file_name().map(|n| n.to_owned()))
            .ok_or_else(|| {
                format!(
                    "{}: cannot send a file system root; name a directory",
                    root.display()
                )
            })?,
    };
    let name = wire_name(Path::new(&name))?.to_owned();
    let mut items = Vec::new();
    let mut skipped = 0;
    if meta.is_file() {
        // The root may be a link to the file (that is followed, as the user named it): read the file it
        // points to, so the no-follow open of `read_file` opens the file itself.
        let path = std::fs::canonicalize(root).map_err(|e| io_error(root, e))?;
        items.push(Item {
            wire: name,
            path,
            kind: Kind::File {
                size: meta.len(),
                mode: mode(&meta),
                mtime_ns: mtime_ns(&meta),
                id: file_id(&meta),
            },
        });
        return Ok((items, 0));
    }
    if !meta.is_dir() {
        return Err(format!(
            "{}: not a regular file or directory (sockets, fifos and devices are not sent)",
            root.display()
        ));
    }
    // Depth first; a stack of directories still to list.
    let mut stack = vec![(root.to_path_buf(), name, meta)];
    while let Some((dir, wire, meta)) = stack.pop() {
        items.push(Item {
            wire: wire.clone(),
            path: dir.clone(),
            kind: Kind::Dir {
                mode: mode(&meta),
                mtime_ns: mtime_ns(&meta),
            },
        });
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| io_error(&dir, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_error(&dir, e))?;
        children.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        let mut subdirs = Vec::new();
        for path in children {
            let m = std::fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
            let child = format!(
                "{wire}/{}",
                wire_name(Path::new(path.file_name().expect("read_dir entries have names")))?
            );
            let ft = m.file_type();
            if ft.is_dir() {
                subdirs.push((path, child, m));
            } else if ft.is_file() {
                items.push(Item {
                    wire: child,
                    kind: Kind::File {
                        size: m.len(),
                        mode: mode(&m),
                        mtime_ns: mtime_ns(&m),
                        id: file_id(&m),
                    },
                    path,
                });
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| io_error(&path, e))?;
                let target = wire_name(&target)?.to_owned();
                items.push(Item {
                    wire: child,
                    path,
                    kind: Kind::Symlink { target },
                });
            } else {
                tracing::warn!(path = %path.display(), "not sent: a socket, fifo or device");
                skipped += 1;
            }
        }
        // Files and links of a directory come before its subdirectories; subdirectories in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok((items, skipped))
}

/// The reader thread: every piece in order, then `end`. Stops quietly when the receiving end is dropped.
fn read_all(
    items: Vec<Item>,
    files: u64,
    bytes: u64,
    single_file: bool,
    tx: mpsc::Sender<Result<Piece, String>>,
) {
    let put = |p: Piece| tx.blocking_send(Ok(p)).is_ok();
    if !put(Piece::Op(TransferOp::Begin { files, bytes })) {
        return;
    }
    let mut manifest = Sha256::new();
    let mut last_sha = String::new();
    let mut corrupt = hooks::corrupt_first_chunk();
    for item in items {
        let op = match item.kind {
            Kind::Dir { mode, mtime_ns } => TransferOp::Dir {
                path: item.wire,
                mode,
                mtime_ns,
            },
            Kind::Symlink { target } => TransferOp::Symlink {
                path: item.wire,
                target,
            },
            Kind::File {
                size,
                mode,
                mtime_ns,
                id,
            } => {
                let header = TransferOp::File {
                    path: item.wire.clone(),
                    size,
                    mode,
                    mtime_ns,
                };
                if !put(Piece::Op(header)) {
                    return;
                }
                match read_file(&item.path, size, id, &put, &mut corrupt) {
                    Ok(Some(sha)) => {
                        manifest.update(super::manifest_line(&sha, &item.wire));
                        last_sha = sha.clone();
                        TransferOp::FileEnd { sha256: sha }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        };
        if !put(Piece::Op(op)) {
            return;
        }
    }
    let sha256 = if single_file {
        last_sha
    } else {
        hex(&manifest.finalize())
    };
    put(Piece::Op(TransferOp::End { files, bytes, sha256 }));
}

/// Opens a planned file without following a final symbolic link and without blocking (a FIFO swapped in
/// would otherwise block `open` until a writer came); regular files ignore the non-blocking flag.
fn open_planned(path: &Path) -> std::io::Result<std::fs::File> {
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW);
    // Windows: open a reparse point (a symbolic link) itself rather than its target.
    #[cfg(windows)]
    std::os::windows::fs::OpenOptionsExt::custom_flags(
        &mut open,
        windows_sys::Win32::Storage::FileSystem::FILE_FLAG_OPEN_REPARSE_POINT,
    );
    open.open(path)
}

/// Whether an OS error code is what opening a symbolic link with "no follow" gives.
fn is_link_error(code: i32) -> bool {
    #[cfg(unix)]
    {
        code == nix::libc::ELOOP || code == nix::libc::EMLINK
    }
    #[cfg(not(unix))]
    {
        let _ = code;
        false
    }
}

/// Sends one file's bytes in chunks; its SHA-256, or `None` when the receiving end went away.
fn read_file(
    path: &Path,
    size: u64,
    id: (u64, u64),
    put: &impl Fn(Piece) -> bool,
    corrupt: &mut bool,
) -> Result<Option<String>, String> {
    let mut f = open_planned(path).map_err(|e| match e.raw_os_error() {
        Some(code) if is_link_error(code) => format!(
            "{}: the file was replaced by a symbolic link while the transfer ran; send it again",
            path.display()
        ),
        _ => io_error(path, e),
    })?;
    // The file opened must be the one planned: a path swapped for a link, a FIFO, a device (or another
    // file) since then would otherwise send something else — anything the worker's user can read — or
    // block this thread. The type is checked on the opened handle, which nothing can swap.
    let now = f.metadata().map_err(|e| io_error(path, e))?;
    if !now.is_file() {
        return Err(format!(
            "{}: the file was replaced by something that is not a regular file (a FIFO, socket or \
             device) while the transfer ran; it is not sent",
            path.display()
        ));
    }
    if file_id(&now) != id {
        return Err(format!(
            "{}: the file was replaced while the transfer ran; send it again",
            path.display()
        ));
    }
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let delay = hooks::chunk_delay();
    loop {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        // Fill a whole chunk (reads may return less), so frames stay large; `read_to_end` into spare
        // capacity skips zeroing the buffer first.
        let mut buf = Chunk::room(CHUNK);
        (&mut f)
            .take(CHUNK as u64)
            .read_to_end(&mut buf)
            .map_err(|e| io_error(path, e))?;
        let filled = buf.len() - Chunk::HEADER;
        if filled == 0 {
            break;
        }
        total += filled as u64;
        if total > size {
            break;
        }
        hasher.update(&buf[Chunk::HEADER..]);
        if std::mem::take(corrupt) {
            buf[Chunk::HEADER] ^= 0xff;
        }
        if !put(Piece::Data(Chunk::filled(buf))) {
            return Ok(None);
        }
        if filled < CHUNK {
            break;
        }
    }
    if size == 0 && total > 0 {
        return Err(format!(
            "{}: the file reports a size of 0 bytes but has content: a pseudo file (as in /proc or /sys) \
             whose size is not known in advance; copy it to a regular file first (`cat {} > copy`) and \
             send the copy",
            path.display(),
            path.display()
        ));
    }
    if total != size {
        return Err(format!(
            "{}: the file changed while it was read (size was {size} bytes, read {total}); send it again",
            path.display()
        ));
    }
    Ok(Some(hex(&hasher.finalize())))
}

/// Sends `src` over `link`, at most [`WINDOW`] units ahead of the receiver's acks, until `end` is sent.
/// Returns what was sent (the receiver's verdict comes separately: the job's end, or `committed`).
pub async fn send(
    mut src: Source,
    link: &mut impl Link,
    cancel: &CancellationToken,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<TransferSummary, TransferError> {
    let (mut sent, mut acked, mut done) = (0u64, 0u64, 0u64);
    let total = src.bytes;
    // The next piece, read but not sent: it goes when it fits in the window.
    let mut pending: Option<Piece> = None;
    loop {
        if let Some(piece) = pending.take_if(|p| sent.saturating_sub(acked) + p.cost() <= WINDOW) {
            sent += piece.cost();
            if let Piece::Data(d) = &piece {
                done += d.payload().len() as u64;
                progress(Progress { done, total });
            }
            let end = match &piece {
                Piece::Op(TransferOp::End { files, bytes, sha256 }) => Some(TransferSummary {
                    path: src.path.display().to_string(),
                    files: *files,
                    dirs: src.dirs,
                    symlinks: src.symlinks,
                    skipped: src.skipped,
                    bytes: *bytes,
                    sha256: sha256.clone(),
                }),
                _ => None,
            };
            link.send(piece).await.map_err(TransferError::Failed)?;
            if let Some(summary) = end {
                return Ok(summary);
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                let error = TransferError::Cancelled.to_string();
                let _ = link.send(Piece::Op(TransferOp::Abort { error })).await;
                return Err(TransferError::Cancelled);
            }
            msg = link.recv() => match msg {
                Some(Piece::Op(TransferOp::Ack { consumed })) => acked = acked.max(consumed),
                Some(Piece::Op(TransferOp::Abort { error })) => {
                    return Err(TransferError::Failed(format!("the receiver stopped the transfer: {error}")));
                }
                Some(other) => tracing::debug!(?other, "unexpected transfer piece for a sender ignored"),
                None => return Err(TransferError::Failed("the connection to the receiver was lost".into())),
            },
            next = src.rx.recv(), if pending.is_none() => match next {
                Some(Ok(piece)) => pending = Some(piece),
                Some(Err(e)) => {
                    let _ = link.send(Piece::Op(TransferOp::Abort { error: e.clone() })).await;
                    return Err(TransferError::Failed(e));
                }
                None => return Err(TransferError::Failed("the file reader stopped unexpectedly".into())),
            },
        }
    }
}
