//! Entry paths on the wire and where they land.

use std::path::{Path, PathBuf};

/// Splits a wire path (`dist/js/app.js`) into its components, refusing anything that could escape the
/// transfer's root: empty, `.` or `..` components, absolute paths, backslashes and NULs.
pub(super) fn components(wire: &str) -> Result<Vec<&str>, String> {
    let parts: Vec<&str> = wire.split('/').collect();
    for p in &parts {
        if p.is_empty()
            || *p == "."
            || *p == ".."
            || p.contains(['\\', '\0'])
            || (cfg!(windows) && p.contains(':'))
        {
            return Err(format!(
                "refused entry path `{}`: paths must be relative, without `.`, `..` or empty parts",
                wire.escape_debug()
            ));
        }
    }
    Ok(parts)
}

/// `base` joined with wire components.
pub(super) fn join(base: &Path, parts: &[impl AsRef<Path>]) -> PathBuf {
    let mut p = base.to_path_buf();
    for c in parts {
        p.push(c);
    }
    p
}

/// `path` taken from `base` when it is relative (an absolute `path` stands alone).
pub fn from_base(base: Option<&Path>, path: &str) -> PathBuf {
    match base {
        Some(b) => b.join(path),
        None => PathBuf::from(path),
    }
}

/// True when a destination names a directory to put things into (`dest/`).
pub(super) fn into_dir(dest: &str) -> bool {
    dest.ends_with('/') || (cfg!(windows) && dest.ends_with('\\'))
}

/// Where a transfer rooted at `name` lands for the destination `dest`: inside `dest` when it ends with a
/// separator, or (for a file) when it is an existing directory; else at `dest` itself.
pub(super) fn resolve(dest: &Path, into: bool, name: &str, root_is_dir: bool) -> PathBuf {
    if into || (!root_is_dir && dest.is_dir()) {
        dest.join(name)
    } else {
        dest.to_path_buf()
    }
}

/// A temp name beside `target`: `.NAME.cla-RANDOM.part`, hidden and recognisable.
pub(super) fn temp_beside(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "transfer".into());
    let tmp = format!(".{name}.cla-{}.part", cla_common::token::random_hex(4));
    target.with_file_name(tmp)
}

/// A path as UTF-8 for the wire, or an error naming it.
pub(super) fn wire_name(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| {
        format!(
            "{}: the name is not valid UTF-8 and cannot be sent; rename it",
            p.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_paths_are_refused() {
        for bad in ["", "/etc", "a/../b", "..", "a//b", "a/./b", "a/", "a\\b", "a\0b"] {
            assert!(components(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(components("dist/js/app.js").unwrap(), ["dist", "js", "app.js"]);
        assert_eq!(components("x").unwrap(), ["x"]);
    }

    #[test]
    fn destinations() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // A file into an existing dir, or into `dest/`; else exactly `dest`.
        assert_eq!(resolve(dir, false, "a.txt", false), dir.join("a.txt"));
        assert_eq!(
            resolve(&dir.join("new"), true, "a.txt", false),
            dir.join("new/a.txt")
        );
        assert_eq!(
            resolve(&dir.join("b.txt"), false, "a.txt", false),
            dir.join("b.txt")
        );
        // A directory lands at `dest` (merged if it exists), or inside `dest/`.
        assert_eq!(resolve(dir, false, "dist", true), dir.to_path_buf());
        assert_eq!(resolve(dir, true, "dist", true), dir.join("dist"));
        let t = temp_beside(&dir.join("a.txt"));
        assert_eq!(t.parent(), Some(dir));
        assert!(
            t.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(".a.txt.cla-")
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any wire path the receiver accepts, joined to a root, stays under the root, lexically and by
        /// component: no `.`, `..`, empty part, root, drive, backslash or NUL gets through.
        #[test]
        fn props_accepted_wire_paths_stay_under_the_root(
            parts in prop::collection::vec(prop_oneof![
                Just("a".to_owned()), Just("..".to_owned()), Just(".".to_owned()), Just(String::new()),
                Just("/".to_owned()), Just("\\".to_owned()), Just("\0".to_owned()), Just("c:".to_owned()),
                Just("é".to_owned()), Just("...".to_owned()), any::<String>(),
            ], 1..6),
            lead in prop_oneof![Just(""), Just("/"), Just("./"), Just("../")],
        ) {
            let wire = format!("{lead}{}", parts.join("/"));
            let root = Path::new("/srv/root");
            match components(&wire) {
                Ok(parts) => {
                    let joined = join(root, &parts);
                    prop_assert!(joined.starts_with(root));
                    prop_assert!(joined.components().all(|c| matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )), "{}", joined.display());
                    prop_assert_eq!(joined.components().count(), root.components().count() + parts.len());
                }
                Err(e) => prop_assert!(e.starts_with("refused entry path") && !e.contains('\n'), "{e}"),
            }
        }
    }
}
