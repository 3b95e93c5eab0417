//! Small helpers shared by the worker and the hub: timestamps, identity of this machine, atomic writes.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use crate::error::{Error, Result};

/// Now as RFC 3339 (UTC, seconds), the format of every timestamp we print or store.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Now as seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A uniform random number in [0, 1] from the OS random source (for jitter).
pub fn unit_random() -> f64 {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).expect("OS random source");
    u64::from_le_bytes(r) as f64 / u64::MAX as f64
}

/// This machine's host name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// The user running this process, from the environment (`USER`, `USERNAME` on Windows).
pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .ok()
        .map(|u| u.rsplit('\\').next().unwrap_or(&u).to_owned())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

/// Creates `dir` (and its parents) and makes it private: mode 0700 on Unix, also when it existed with
/// a looser mode. For directories that hold tokens, job output or the store.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700 | 0o700))?;
        }
    }
    Ok(())
}

/// Takes group and other access away from `file` (Unix), for files a library creates with its own
/// mode (the store).
pub fn make_private(file: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode & 0o7700))?;
        }
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// Open options for a new private file: mode 0600 on Unix from the moment it exists.
pub fn private_open_options() -> std::fs::OpenOptions {
    #[cfg(unix)]
    {
        let mut open = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
        open
    }
    #[cfg(not(unix))]
    std::fs::OpenOptions::new()
}

/// Reads a text file a user named, refusing one over `max` bytes (a config, a rulebook, a stash...): a
/// wrong path such as `/dev/zero` or a multi-gigabyte log then fails at once with the file and the
/// limit named, instead of filling memory. `what` names the file's role in the error ("config file").
pub fn read_capped(path: &Path, max: u64, what: &str) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(Error::Other(format!(
            "{what} {} is larger than {}: is it the right file?",
            path.display(),
            human_bytes(max)
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::Other(format!(
            "{what} {} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// `1 MiB`, `64 KiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// Writes `contents` to `path` atomically: a temp file in the same directory, fsynced, then renamed over
/// the target. With `private`, a new file is created with mode 0600 (Unix) before any byte is written,
/// and a replaced one keeps its owner and mode less any access for others, so a token is never readable
/// by others, not even for a moment. Either the old or the new file is there
/// afterwards, never half of one.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".cla-tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    // tempfile creates files 0600 on Unix. A file being replaced keeps its mode (an admin's 0640 for a
    // service group stays), less any access for others when private; a new one is 0600 when private,
    // else 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = match std::fs::metadata(path) {
            Ok(old) if private => Some(old.permissions().mode() & 0o7770),
            Ok(old) => Some(old.permissions().mode() & 0o7777),
            Err(_) if !private => Some(0o644),
            Err(_) => None,
        };
        if let Some(mode) = mode {
            let _ = tmp
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode));
        }
    }
    // Windows has no mode bits: a private file gets a protected DACL that grants only its owner, SYSTEM
    // and Administrators, so what it would inherit (Users may read C:\ProgramData) does not apply.
    #[cfg(windows)]
    if private && let Err(e) = restrict_to_owner(tmp.path()) {
        tracing::warn!("cannot restrict access to {} to its owner: {e}", path.display());
    }
    #[cfg(not(any(unix, windows)))]
    let _ = private;
    // Replacing a file keeps its owner (root editing /etc/cla-worker.yml must leave it readable by the
    // service's user). Only root may change owners; for anyone else the owner is already right.
    #[cfg(unix)]
    if let Ok(old) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(old.uid()), Some(old.gid()));
    }
    tmp.write_all(contents).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// The access list of a private file on Windows, in SDDL: protected (nothing inherited), full access for
/// the owner (OW), SYSTEM (SY) and Administrators (BA), nobody else.
#[cfg(windows)]
pub const PRIVATE_SDDL: &str = "D:P(A;;FA;;;OW)(A;;FA;;;SY)(A;;FA;;;BA)";

#[cfg(windows)]
fn restrict_to_owner(file: &Path) -> std::io::Result<()> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{
        DACL_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
        SetFileSecurityW,
    };
    let sddl: Vec<u16> = PRIVATE_SDDL.encode_utf16().chain(Some(0)).collect();
    let name: Vec<u16> = file.as_os_str().encode_wide().chain(Some(0)).collect();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: NUL-terminated wide strings; the descriptor the first call allocates is freed with LocalFree.
    unsafe {
        if ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        ) == 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let ok = SetFileSecurityW(
            name.as_ptr(),
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            sd,
        );
        let err = std::io::Error::last_os_error();
        LocalFree(sd);
        if ok == 0 { Err(err) } else { Ok(()) }
    }
}

/// The access list of `file` in SDDL (Windows), for tests.
#[cfg(all(windows, test))]
pub fn access_list(file: &Path) -> std::io::Result<String> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{DACL_SECURITY_INFORMATION, GetFileSecurityW};
    let name: Vec<u16> = file.as_os_str().encode_wide().chain(Some(0)).collect();
    let mut need = 0u32;
    // SAFETY: the first call only reports the size; the buffer is then that size; the string the
    // conversion allocates is freed with LocalFree.
    unsafe {
        GetFileSecurityW(
            name.as_ptr(),
            DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            0,
            &mut need,
        );
        if need == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize];
        if GetFileSecurityW(
            name.as_ptr(),
            DACL_SECURITY_INFORMATION,
            buf.as_mut_ptr().cast(),
            need,
            &mut need,
        ) == 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut text: windows_sys::core::PWSTR = std::ptr::null_mut();
        if ConvertSecurityDescriptorToStringSecurityDescriptorW(
            buf.as_mut_ptr().cast(),
            SDDL_REVISION_1,
            DACL_SECURITY_INFORMATION,
            &mut text,
            std::ptr::null_mut(),
        ) == 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let len = (0..).take_while(|&i| *text.add(i) != 0).count();
        let s = String::from_utf16_lossy(std::slice::from_raw_parts(text, len));
        LocalFree(text.cast());
        Ok(s)
    }
}

/// Checks that [`write_atomic`] can replace `path`: a temp file can be created in its directory. Used
/// before an action whose result must be saved (registering returns a token shown only once).
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("."));
    tempfile::Builder::new().prefix(".cla-tmp-").tempfile_in(existing).map(drop).map_err(|e| {
        Error::Other(format!(
            "cannot write {}: {e} (creating files in {}); run as a user who can (e.g. sudo), or pick another file with -c",
            path.display(),
            existing.display()
        ))
    })
}

/// `text` made safe for a one-line message: control characters escaped (`\n`, `\u{1b}`), and cut to
/// `max` characters with an ellipsis. For peer-supplied text quoted in errors and logs.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        // Control characters, and the invisible ones that reorder or hide text (bidi overrides,
        // zero-width spaces), are shown as escapes.
        if c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
        {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits comma-separated values, trims them and drops empty ones (`"a, b,,c"` → `[a, b, c]`).
pub fn split_list<'a>(values: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    // A set beside the list keeps this linear: a config with 100,000 tags must fail fast on the bound,
    // not spend minutes deduplicating first.
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<String> = Vec::new();
    for v in values {
        for part in v.split(',') {
            let part = part.trim();
            if !part.is_empty() && seen.insert(part.to_owned()) {
                out.push(part.to_owned());
            }
        }
    }
    out
}

/// Keeps glibc's allocator from handing 1 MiB transfer buffers back to the kernel and faulting them in
/// again. A transfer keeps the chunks it sent until the receiver acknowledges them (for a resume), and
/// frees them four at a time; with glibc's defaults that trims the heap and maps fresh pages for the
/// next chunks, which cost the hub about a quarter more CPU per transfer (`docs/benchmarks.md`). Chunks
/// now always come from the heap (below a 4 MiB mmap threshold), and up to 64 MiB of free heap is kept.
/// Other platforms' allocators are left as they are.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Gives the allocator's free memory back to the OS (glibc's `malloc_trim`): for a worker that has gone
/// idle, since [`tune_allocator`] keeps up to 64 MiB of free heap for busy times. A no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit of open files to the hard limit (each connection is one); returns the limit in
/// force, or `None` where there is no such limit (Windows) or it cannot be read.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        // macOS refuses a soft limit above OPEN_MAX even when the hard limit is "unlimited".
        #[cfg(target_os = "macos")]
        let hard = hard.min(10_240);
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            return Some(hard);
        }
        Some(soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn read_capped_refuses_big_and_endless_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.yml");
        std::fs::write(&ok, "id: w1\n").unwrap();
        assert_eq!(read_capped(&ok, 16, "config file").unwrap(), "id: w1\n");
        let big = dir.path().join("big.yml");
        std::fs::write(&big, vec![b'x'; 17]).unwrap();
        let e = read_capped(&big, 16, "config file").unwrap_err().to_string();
        assert!(
            e.starts_with("config file ") && e.ends_with("is larger than 16 B: is it the right file?"),
            "{e}"
        );
        #[cfg(unix)]
        {
            let e = read_capped(Path::new("/dev/zero"), 1 << 20, "rulebook")
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                "rulebook /dev/zero is larger than 1 MiB: is it the right file?"
            );
        }
    }

    use super::*;

    #[test]
    fn split_list_trims_and_dedups() {
        let v = vec!["a, b,,c".to_owned(), "b".to_owned(), " d ".to_owned()];
        assert_eq!(split_list(&v), ["a", "b", "c", "d"]);
    }

    #[test]
    fn check_writable_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(&dir.path().join("new/sub/cla-worker.yml")).is_ok());
        #[cfg(unix)]
        if !nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
            let e = check_writable(&dir.path().join("c.yml")).unwrap_err().to_string();
            assert!(e.contains("cannot write") && e.contains("sudo"), "{e}");
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_keeps_the_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("owned.yml");
        std::fs::write(&p, "x").unwrap();
        // As root, hand the file to another user first; otherwise it is ours either way.
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (65534, 65534)
        } else {
            let m = std::fs::metadata(&p).unwrap();
            (m.uid(), m.gid())
        };
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"y", true).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid));
        assert_eq!(m.permissions().mode() & 0o777, 0o640, "the mode is kept");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "y");
    }

    #[test]
    fn write_atomic_private_is_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/f.yml");
        write_atomic(&p, b"one", true).unwrap();
        write_atomic(&p, b"two", true).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Run under Wine by packaging/smoke-windows.sh. Wine accepts the DACL but keeps only what Unix
        // modes can say (owner and SYSTEM), so the exact list (protected, BA) is not checked there.
        #[cfg(windows)]
        {
            restrict_to_owner(&p).unwrap();
            let acl = access_list(&p).unwrap();
            assert!(
                !acl.contains(";;;BU)") && !acl.contains(";;;WD)") && !acl.contains(";;;AU)"),
                "no access for users, everyone or authenticated users: {acl}"
            );
        }
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
