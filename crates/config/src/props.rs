//! Property tests over hostile input: the config loader and the policy's path checks. Each property runs `PROPTEST_CASES` cases (proptest's
//! default 256 when unset); `.ci/run` runs every crate's `props` in release mode, over 100,000 cases in
//! all. The properties: no input makes them panic, every error is one line naming its source, and what
//! is accepted keeps the invariant the code promises.

use std::path::Path;

use cla_common::fuzz::mutate;
use proptest::prelude::*;

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

fn one_line(e: &impl std::fmt::Display) -> bool {
    !e.to_string().contains('\n')
}

proptest! {
    #[test]
    fn props_config_loader_never_panics(edits in edits(), junk in any::<String>(), pick in 0..3u8) {
        let path = Path::new("/etc/props/cla-worker.yml");
        let example = include_str!("../../../cla-worker.example.yml");
        let text = match pick {
            0 => mutate(example, &edits),
            1 => junk,
            _ => format!("{}\n{junk}", mutate("url: http://h:1\ntags: [a, b]\npolicy:\n  deny: [exec]\n", &edits)),
        };
        if let Err(e) = crate::file::parse(path, &text) {
            prop_assert!(one_line(&e), "{e}");
            prop_assert!(e.to_string().contains("/etc/props/cla-worker.yml"), "{e}");
        }
    }

}

/// A tree for the policy properties: `root/allowed/{a,b}/f`, `root/outside/f`, and a symlink
/// `root/allowed/link` to `root/outside`.
#[cfg(unix)]
fn policy_tree() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let allowed = root.join("allowed");
    for d in ["allowed/a", "allowed/b", "outside"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join("f"), "x").unwrap();
    }
    std::os::unix::fs::symlink(root.join("outside"), allowed.join("link")).unwrap();
    (dir, root, allowed)
}

#[cfg(unix)]
proptest! {
    /// Whatever the path (relative or absolute, `.`, `..`, symlinks, missing parts), the policy allows
    /// it only if the file the OS would open is inside the allowed directory.
    #[test]
    fn props_policy_paths_never_escape(
        parts in prop::collection::vec(prop_oneof![
            Just("a"), Just("b"), Just(".."), Just("."), Just("link"), Just("f"), Just("new"), Just("allowed"),
            Just("outside"),
        ], 0..7),
        absolute in any::<bool>(),
    ) {
        let (_dir, root, allowed) = policy_tree();
        let policy = crate::policy::Enforcer::new(
            crate::Policy {
                paths: crate::PolicyPaths { read: vec![allowed.clone()], write: vec![allowed.clone()] },
                ..Default::default()
            },
            None,
        );
        let rel: std::path::PathBuf = parts.iter().collect();
        let path = if absolute { root.join(&rel) } else { rel.clone() };
        let verdict = policy.path("fetch", crate::policy::Access::Read, &path, Some(&allowed));
        let full = if absolute { path.clone() } else { allowed.join(&rel) };
        if verdict.is_ok() {
            prop_assert!(crate::policy::resolve(&full).starts_with(&allowed), "{}", full.display());
            if let Ok(real) = std::fs::canonicalize(&full) {
                prop_assert!(real.starts_with(&allowed), "{} -> {}", full.display(), real.display());
            }
        } else if let Ok(real) = std::fs::canonicalize(&full) {
            prop_assert!(!real.starts_with(&allowed), "refused {} though it is {}", full.display(), real.display());
        }
    }
}
