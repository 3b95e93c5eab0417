//! The worker's local policy (`policy:` in its config, `docs/security.md`): which verbs the hub may use
//! here, and which paths ship may write and fetch (and eval's host API) may read. Checked on the worker,
//! before any side effect; a refusal ends the job with a `policy` error naming the rule and the fix.
//!
//! Paths are judged after resolving them the way the OS will: relative to the job's directory, `.` and
//! `..` applied, and every symlink along the existing part followed (`std::fs::canonicalize` of the
//! deepest existing ancestor). A symlink inside an allowed directory that points outside is therefore
//! outside; a destination that does not exist yet is judged by its existing parent. Allowed roots are
//! resolved the same way, and compared component by component (`/srv/app2` is not under `/srv/app`).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Policy;

/// A policy, ready to check requests against; also handed to eval's child process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Enforcer {
    policy: Policy,
    /// The config file it came from, for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<PathBuf>,
}

/// Which list a path is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Enforcer {
    pub fn new(policy: Policy, source: Option<PathBuf>) -> Enforcer {
        Enforcer { policy, source }
    }

    /// True when the policy allows everything (no verb or path restriction).
    pub fn is_open(&self) -> bool {
        let p = &self.policy;
        p.allow.is_empty() && p.deny.is_empty() && p.paths.read.is_empty() && p.paths.write.is_empty()
    }

    fn in_file(&self) -> String {
        match &self.source {
            Some(p) => format!("in {}", p.display()),
            None => "in the worker's config".to_owned(),
        }
    }

    /// May the hub use `verb` (`exec`, `ship`, `fetch`, `eval`) here? `deny` wins; an empty `allow`
    /// allows every verb not denied.
    pub fn verb(&self, verb: &str) -> Result<(), String> {
        let p = &self.policy;
        if p.deny.iter().any(|v| v == verb) {
            return Err(format!(
                "policy: {verb} is refused on this worker (policy.deny {}); change the policy there to allow it",
                self.in_file()
            ));
        }
        if !p.allow.is_empty() && !p.allow.iter().any(|v| v == verb) {
            return Err(format!(
                "policy: {verb} is refused on this worker (not in policy.allow: {} {}); add it there to allow it",
                p.allow.join(", "),
                self.in_file()
            ));
        }
        Ok(())
    }

    /// May `verb` read (or write) `path`? `path` is resolved against `base` when relative. An empty list
    /// allows every path.
    pub fn path(&self, verb: &str, access: Access, path: &Path, base: Option<&Path>) -> Result<(), String> {
        let (roots, key) = match access {
            Access::Read => (&self.policy.paths.read, "policy.paths.read"),
            Access::Write => (&self.policy.paths.write, "policy.paths.write"),
        };
        if roots.is_empty() {
            return Ok(());
        }
        let full = match (path.is_absolute(), base) {
            (true, _) => path.to_path_buf(),
            (false, Some(b)) => b.join(path),
            (false, None) => std::env::current_dir().unwrap_or_default().join(path),
        };
        let resolved = resolve(&full);
        if roots.iter().any(|root| resolved.starts_with(resolve(root))) {
            return Ok(());
        }
        let shown = if resolved == full {
            full.display().to_string()
        } else {
            format!("{} (resolved: {})", full.display(), resolved.display())
        };
        Err(format!(
            "policy: {verb} of {shown} refused: not under {key} ({}) {}; add a directory holding it there to allow it",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.in_file()
        ))
    }
}

/// `path` as the OS will see it: the deepest existing ancestor canonicalized (symlinks followed, `..`
/// applied), the rest appended with `.` dropped and `..` applied lexically.
pub fn resolve(path: &Path) -> PathBuf {
    let parts: Vec<Component> = path.components().collect();
    for split in (0..=parts.len()).rev() {
        let head: PathBuf = parts[..split].iter().collect();
        if head.as_os_str().is_empty() {
            continue;
        }
        if let Ok(mut out) = std::fs::canonicalize(&head) {
            for c in &parts[split..] {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
    }
    // Nothing of it exists (not even the root): judge it lexically.
    let mut out = PathBuf::new();
    for c in parts {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::PolicyPaths;

    fn enforcer(allow: &[&str], deny: &[&str], read: &[&Path], write: &[&Path]) -> Enforcer {
        Enforcer::new(
            Policy {
                allow: allow.iter().map(|s| s.to_string()).collect(),
                deny: deny.iter().map(|s| s.to_string()).collect(),
                paths: PolicyPaths {
                    read: read.iter().map(|p| p.to_path_buf()).collect(),
                    write: write.iter().map(|p| p.to_path_buf()).collect(),
                },
            },
            Some("/etc/cla-worker.yml".into()),
        )
    }

    #[test]
    fn verbs_deny_wins_and_empty_allow_allows_all() {
        let open = Enforcer::default();
        assert!(open.is_open());
        for v in ["exec", "ship", "fetch", "eval"] {
            open.verb(v).unwrap();
        }
        let p = enforcer(&["exec", "fetch"], &["fetch"], &[], &[]);
        assert!(!p.is_open());
        p.verb("exec").unwrap();
        let e = p.verb("fetch").unwrap_err();
        assert!(
            e.contains("policy.deny") && e.contains("/etc/cla-worker.yml"),
            "{e}"
        );
        let e = p.verb("eval").unwrap_err();
        assert!(
            e.starts_with("policy: eval is refused") && e.contains("policy.allow: exec, fetch"),
            "{e}"
        );
        enforcer(&[], &["exec"], &[], &[]).verb("ship").unwrap();
    }

    #[test]
    fn paths_are_judged_after_dots_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let app = root.join("app");
        std::fs::create_dir_all(app.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("app2")).unwrap();
        std::fs::create_dir_all(root.join("secret")).unwrap();
        std::fs::write(root.join("secret/key"), "k").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), app.join("escape")).unwrap();
        std::os::unix::fs::symlink(app.join("sub"), root.join("alias")).unwrap();
        let p = enforcer(&[], &[], &[&app], &[&app]);
        let ok = |access, path: &Path| p.path("fetch", access, path, Some(&root)).is_ok();
        assert!(ok(Access::Read, &app.join("sub")));
        assert!(
            ok(Access::Read, Path::new("app/sub/new-file")),
            "relative to the job's dir"
        );
        assert!(
            ok(Access::Write, &app.join("sub/not/yet/there")),
            "judged by its existing parent"
        );
        assert!(
            ok(Access::Read, &root.join("alias")),
            "a symlink into the allowed dir is inside"
        );
        assert!(!ok(Access::Read, &app.join("../secret/key")), "`..` out of it");
        assert!(!ok(Access::Read, Path::new("app/sub/../../secret")));
        assert!(!ok(Access::Read, &app.join("escape/key")), "a symlink out of it");
        assert!(
            !ok(Access::Write, &app.join("escape/new")),
            "writing through a symlink out of it"
        );
        assert!(
            !ok(Access::Read, &root.join("app2/x")),
            "a sibling with the same prefix"
        );
        assert!(!ok(Access::Read, Path::new("/etc/passwd")));
        assert!(!ok(Access::Write, &app.join("sub/../../app2/x")));
        let e = p
            .path("fetch", Access::Read, &app.join("escape/key"), None)
            .unwrap_err();
        assert!(
            e.contains("resolved: ") && e.contains("policy.paths.read") && e.contains("/etc/cla-worker.yml"),
            "{e}"
        );
        // An empty list allows any path; the other list is separate.
        let only_read = enforcer(&[], &[], &[&app], &[]);
        assert!(
            only_read
                .path("ship", Access::Write, Path::new("/etc/x"), None)
                .is_ok()
        );
    }

    #[test]
    fn an_allowed_root_that_is_a_symlink_is_followed_too() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = enforcer(&[], &[], &[&link], &[]);
        assert!(p.path("fetch", Access::Read, &real.join("f"), None).is_ok());
        assert!(p.path("fetch", Access::Read, &link.join("f"), None).is_ok());
    }
}
