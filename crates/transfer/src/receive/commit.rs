//! Putting a verified transfer in place (renames, merges into an existing directory, modes and mtimes
//! last), cleaning up a stage that did not get there, and the filesystem helpers both need.

use super::*;

impl Stage {
    /// Puts everything in place (see the module docs).
    pub(super) fn commit(&mut self) -> Result<(), String> {
        let target = match self.root.as_ref().expect("end checked the root") {
            Root::File { target, temp } => {
                std::fs::rename(temp, target).map_err(|e| io_error("renaming into", target, e))?;
                target.clone()
            }
            Root::Dir {
                target,
                staging,
                merging,
            } => {
                if *merging {
                    check_merge(staging, target, true)?;
                    merge(staging, target, staging)?;
                    let _ = std::fs::remove_dir_all(staging);
                } else {
                    std::fs::rename(staging, target).map_err(|e| io_error("renaming into", target, e))?;
                }
                // The files are in place: directory modes and times are best effort from here on, and an
                // existing destination directory keeps its own.
                let mut meta = std::mem::take(&mut self.dir_meta);
                meta.retain(|(rel, ..)| !(*merging && rel.is_empty()));
                meta.sort_by_key(|(rel, ..)| std::cmp::Reverse(rel.len()));
                for (rel, mode, mtime_ns) in meta {
                    let p = join(target, &rel);
                    if let Err(e) = set_mode(&p, None, mode) {
                        tracing::warn!("{e}");
                    }
                    set_dir_mtime(&p, mtime_ns);
                }
                target.clone()
            }
        };
        self.committed = true;
        sync_parent(&target);
        self.summary.path = target.display().to_string();
        Ok(())
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.current = None;
        match &self.root {
            Some(Root::File { temp, .. }) => {
                let _ = std::fs::remove_file(temp);
            }
            Some(Root::Dir { staging, .. }) => {
                let _ = std::fs::remove_dir_all(staging);
            }
            None => {}
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Refuses a merge that would put a file or link where a directory is (checked before anything moves).
/// The destination itself may be a link to a directory (`current -> releases/7`); links below it are
/// entries like any other.
pub(super) fn check_merge(staged: &Path, target: &Path, top: bool) -> Result<(), String> {
    let meta = if top {
        std::fs::metadata(target)
    } else {
        std::fs::symlink_metadata(target)
    };
    if !meta.map(|m| m.is_dir()).unwrap_or(false) {
        return Ok(());
    }
    for entry in std::fs::read_dir(staged).map_err(|e| io_error("reading", staged, e))? {
        let entry = entry.map_err(|e| io_error("reading", staged, e))?;
        let t = target.join(entry.file_name());
        let is_dir = entry.file_type().map(|f| f.is_dir()).unwrap_or(false);
        let there = std::fs::symlink_metadata(&t).ok();
        match there {
            Some(m) if m.is_dir() && !is_dir => {
                return Err(format!(
                    "{} is a directory and the transfer has a file there: nothing was changed; remove it or \
                     choose another destination",
                    t.display()
                ));
            }
            Some(m) if m.is_dir() => check_merge(&entry.path(), &t, false)?,
            _ => {}
        }
    }
    Ok(())
}

/// Moves staged entries into an existing directory: files and links replace what is there (atomically
/// each), directories are merged (or replace a file or link of the same name). `staging` (inside the
/// target) is skipped.
pub(super) fn merge(staged: &Path, target: &Path, staging: &Path) -> Result<(), String> {
    for entry in std::fs::read_dir(staged).map_err(|e| io_error("reading", staged, e))? {
        let entry = entry.map_err(|e| io_error("reading", staged, e))?;
        let from = entry.path();
        if from == staging {
            continue;
        }
        let to = target.join(entry.file_name());
        let is_dir = entry.file_type().map(|f| f.is_dir()).unwrap_or(false);
        match std::fs::symlink_metadata(&to) {
            Ok(m) if is_dir && m.is_dir() => merge(&from, &to, staging)?,
            Ok(_) if is_dir => {
                std::fs::remove_file(&to).map_err(|e| io_error("replacing", &to, e))?;
                std::fs::rename(&from, &to).map_err(|e| io_error("renaming into", &to, e))?;
            }
            _ => std::fs::rename(&from, &to).map_err(|e| io_error("renaming into", &to, e))?,
        }
    }
    Ok(())
}

pub(super) fn create_dir(p: &Path) -> Result<(), String> {
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => format!("protocol error: {} was sent twice", p.display()),
        _ => io_error("creating", p, e),
    })
}

#[cfg(unix)]
pub(super) fn set_mode(p: &Path, file: Option<&File>, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let perms = std::fs::Permissions::from_mode(mode & 0o777);
    match file {
        Some(f) => f.set_permissions(perms),
        None => std::fs::set_permissions(p, perms),
    }
    .map_err(|e| io_error("setting the mode of", p, e))
}

#[cfg(not(unix))]
pub(super) fn set_mode(p: &Path, _file: Option<&File>, mode: u32) -> Result<(), String> {
    if mode & 0o200 == 0 && !p.is_dir() {
        let mut perms = std::fs::metadata(p)
            .map_err(|e| io_error("reading", p, e))?
            .permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(p, perms).map_err(|e| io_error("setting the mode of", p, e))?;
    }
    Ok(())
}

pub(super) fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Sets a directory's mtime and fsyncs it (Unix; best effort — a directory's time is not worth failing
/// a verified transfer over).
pub(super) fn set_dir_mtime(p: &Path, ns: i64) {
    #[cfg(unix)]
    if let Ok(d) = File::open(p) {
        let _ = d.set_modified(system_time(ns));
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = (p, ns);
}

/// Makes a rename durable: fsync of the directory holding `p` (Unix).
pub(super) fn sync_parent(p: &Path) {
    #[cfg(unix)]
    if let Some(parent) = p.parent()
        && let Ok(d) = File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
    {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = p;
}

#[cfg(unix)]
pub(super) fn make_symlink(target: &str, at: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, at)
}

#[cfg(windows)]
pub(super) fn make_symlink(target: &str, at: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(target, at)
}

/// A one-line error for a file-system failure, with the fix where there is an obvious one.
pub(super) fn io_error(doing: &str, p: &Path, e: std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let no_space = e.kind() == K::StorageFull || e.raw_os_error() == Some(28);
    if no_space {
        return format!(
            "no space left on the device {doing} {}: free some space (or choose another destination) and send \
             it again; nothing was kept",
            p.display()
        );
    }
    match e.kind() {
        K::PermissionDenied => format!(
            "permission denied {doing} {}: choose a destination this user may write to",
            p.display()
        ),
        K::QuotaExceeded => format!("disk quota exceeded {doing} {}; nothing was kept", p.display()),
        K::ReadOnlyFilesystem => format!("{} is on a read-only file system", p.display()),
        _ => format!("{doing} {}: {e}", p.display()),
    }
}
