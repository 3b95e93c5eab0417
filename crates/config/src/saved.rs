//! The registrations a config file holds, as `cla-worker list` shows them: with the values `run` would
//! use for each (the [`resolve`](crate::resolve) rules: a top-level `url` beats a registration's, a
//! registration's tags and envs beat the top-level ones), and whether a token is saved — never the token.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ConfigFile;

/// One registration of a config file, without its secrets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SavedRegistration {
    pub id: String,
    /// The hub `run` would connect to for it, if the file names one.
    pub url: Option<String>,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    /// Whether the file holds a token for it.
    pub has_token: bool,
}

/// The file's registrations: the top-level `id` (when no entry of `registrations` has that id; when
/// one has, the top-level `token` counts for it) first, then `registrations` in order.
pub fn registrations(f: &ConfigFile) -> Vec<SavedRegistration> {
    let or_top = |own: &[String], top: &[String]| {
        if own.is_empty() {
            top.to_vec()
        } else {
            own.to_vec()
        }
    };
    let top_id = f.id.as_deref();
    let mut out = Vec::new();
    if let Some(id) = top_id
        && !f.registrations.iter().any(|r| r.id == id)
    {
        out.push(SavedRegistration {
            id: id.to_owned(),
            url: f.url.clone(),
            tags: f.tags.clone(),
            envs: f.envs.clone(),
            has_token: has(&f.token),
        });
    }
    for r in &f.registrations {
        let top_token = top_id == Some(r.id.as_str()) && has(&f.token);
        out.push(SavedRegistration {
            id: r.id.clone(),
            url: f.url.clone().or_else(|| r.url.clone()),
            tags: or_top(&r.tags, &f.tags),
            envs: or_top(&r.envs, &f.envs),
            has_token: has(&r.token) || top_token,
        });
    }
    out
}

fn has(token: &Option<cla_common::secret::Secret>) -> bool {
    token.as_ref().is_some_and(|t| !t.is_empty())
}

/// The registration `run` uses from this file without `--id`: the top-level `id`, else the only entry
/// of `registrations`; `None` when there are several (then `--id` must pick) or none.
pub fn default_id(f: &ConfigFile) -> Option<String> {
    if let Some(id) = &f.id {
        return Some(id.clone());
    }
    match (f.token.is_some(), f.registrations.as_slice()) {
        (false, [one]) => Some(one.id.clone()),
        _ => None,
    }
}

/// Where a candidate config file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `--config` or `CLA_WORKER_CONFIG`.
    Explicit,
    /// One of [`search_paths`](crate::search_paths).
    Searched,
}

/// Every place a config file is looked for, in order: `explicit` (if given), then the search paths.
/// A file reached twice (the home directory is the current one) is listed once, where first reached.
pub fn candidates(explicit: Option<&Path>) -> Vec<(PathBuf, Origin)> {
    let mut out: Vec<(PathBuf, Origin)> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let all = explicit
        .map(|p| (p.to_path_buf(), Origin::Explicit))
        .into_iter()
        .chain(super::search_paths().into_iter().map(|p| (p, Origin::Searched)));
    for (path, origin) in all {
        let key = std::fs::canonicalize(&path)
            .or_else(|_| std::path::absolute(&path))
            .unwrap_or_else(|_| path.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push((path, origin));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registration;

    fn file(text: &str) -> ConfigFile {
        crate::file::parse(Path::new("t.yml"), text).unwrap().0
    }

    #[test]
    fn registrations_show_what_run_would_use_and_never_the_token() {
        let f = file(
            "url: http://top:1\ntags: [top]\nregistrations:\n  - id: a\n    token: clatk_secret\n    url: http://own:2\n  - id: b\n    tags: [own]\n",
        );
        let regs = registrations(&f);
        assert_eq!(regs.len(), 2);
        assert_eq!(
            regs[0],
            SavedRegistration {
                id: "a".into(),
                url: Some("http://top:1".into()),
                tags: vec!["top".into()],
                envs: vec![],
                has_token: true,
            }
        );
        assert_eq!(
            (regs[1].has_token, regs[1].tags.as_slice()),
            (false, &["own".to_owned()][..])
        );
        let json = serde_json::to_string(&regs).unwrap();
        assert!(!json.contains("clatk_secret"), "{json}");
        // Several and no top-level id: `run` needs --id.
        assert_eq!(default_id(&f), None);
    }

    #[test]
    fn a_top_level_registration_is_listed_and_is_the_default() {
        let f = file("id: solo\ntoken: clatk_x\nurl: http://h:1\n");
        let regs = registrations(&f);
        assert_eq!(
            (regs.len(), regs[0].id.as_str(), regs[0].has_token),
            (1, "solo", true)
        );
        assert_eq!(default_id(&f).as_deref(), Some("solo"));
        // A top-level id naming an entry is that entry, with the top-level token.
        let mut f = file("id: r\ntoken: clatk_x\n");
        f.registrations = vec![Registration {
            id: "r".into(),
            ..Default::default()
        }];
        let regs = registrations(&f);
        assert_eq!((regs.len(), regs[0].has_token), (1, true));
        // One entry and no top-level id: that one.
        let f = file("registrations:\n  - id: only\n");
        assert_eq!(default_id(&f).as_deref(), Some("only"));
    }

    #[test]
    fn candidates_start_with_the_explicit_file_and_list_each_file_once() {
        let c = candidates(Some(Path::new("cla-worker.yml")));
        assert_eq!(c[0], (PathBuf::from("cla-worker.yml"), Origin::Explicit));
        // ./cla-worker.yml is the same file as the explicit one: not listed again.
        assert!(
            c[1..].iter().all(|(p, _)| p != Path::new(crate::FILE_NAME)),
            "{c:?}"
        );
        let c = candidates(None);
        assert_eq!(c[0], (PathBuf::from(crate::FILE_NAME), Origin::Searched));
    }
}
