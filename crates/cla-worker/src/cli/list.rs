//! `cla-worker list`: every config file of the search path that exists, with its registrations (id,
//! hub, tags, envs, whether a token is saved — never the token), and which file and registration `run`
//! would use. It reads files only: a file that does not parse is shown with its error, not fatal.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::worker::ListArgs;
use crate::error::Result;
use cla_common::exit::ExitCode;
use cla_config::saved::{self, Origin, SavedRegistration};
use cla_config::{self as config};

/// One place a config file is looked for, as listed.
#[derive(Debug, Serialize)]
struct FileEntry {
    /// The path, made absolute.
    path: PathBuf,
    origin: Origin,
    exists: bool,
    /// The file `run` loads (first found; an explicit `--config` is the only one looked at).
    used: bool,
    /// Why the file cannot be loaded, if it cannot.
    error: Option<String>,
    warnings: Vec<String>,
    /// The registration `run` picks from this file without `--id`.
    default: Option<String>,
    registrations: Vec<SavedRegistration>,
}

/// Lists the config files and their registrations.
pub(crate) fn list(a: &ListArgs, explicit: Option<&Path>) -> Result<ExitCode> {
    let candidates = saved::candidates(explicit);
    let used = match explicit {
        Some(p) => p.exists().then_some(0),
        None => candidates.iter().position(|(p, _)| p.is_file()),
    };
    let entries: Vec<FileEntry> = candidates
        .iter()
        .enumerate()
        .map(|(i, (path, origin))| entry(path, *origin, used == Some(i)))
        .collect();
    if a.json {
        let v = serde_json::json!({
            "used": used.map(|i| &entries[i].path),
            "files": entries,
        });
        super::print_json(&v)?;
        return Ok(ExitCode::Success);
    }
    super::print_out(&text(&entries, explicit.is_some()))?;
    Ok(ExitCode::Success)
}

fn entry(path: &Path, origin: Origin, used: bool) -> FileEntry {
    let exists = path.exists();
    let mut e = FileEntry {
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        origin,
        exists,
        used,
        error: None,
        warnings: Vec::new(),
        default: None,
        registrations: Vec::new(),
    };
    if !exists {
        return e;
    }
    // By its absolute path, so that the warnings name the file as the listing does.
    match config::load(Some(&e.path), false, false) {
        Ok(loaded) => {
            e.warnings = loaded.warnings;
            e.default = saved::default_id(&loaded.file);
            e.registrations = saved::registrations(&loaded.file);
        }
        Err(err) => e.error = Some(err.to_string()),
    }
    e
}

/// The listing for a terminal.
fn text(entries: &[FileEntry], explicit: bool) -> String {
    let mut out = String::new();
    let dash = |v: &[String]| {
        if v.is_empty() { "-".to_owned() } else { v.join(",") }
    };
    for e in entries {
        let path = e.path.display();
        match (e.exists, e.origin) {
            (false, Origin::Explicit) => {
                out += &format!("{path} (--config): not found; `cla-worker run` fails until it exists\n");
                continue;
            }
            (false, Origin::Searched) => continue,
            _ => {}
        }
        let role = match (e.used, e.origin, explicit) {
            (true, Origin::Explicit, _) => "used by `cla-worker run` (--config)",
            (true, _, _) => "used by `cla-worker run` (the first file found)",
            (false, _, true) => "not used while --config is given",
            (false, _, false) => "not used: a file earlier in the search is found first",
        };
        out += &format!("{path}: {role}\n");
        if let Some(err) = &e.error {
            out += &format!("  cannot be loaded: {err}\n");
            continue;
        }
        for w in &e.warnings {
            out += &format!("  warning: {w}\n");
        }
        if e.registrations.is_empty() {
            out += "  no registrations (`cla-worker register --save` adds one)\n";
            continue;
        }
        let rows: Vec<[String; 5]> = e
            .registrations
            .iter()
            .map(|r| {
                [
                    r.id.clone(),
                    r.url.clone().unwrap_or_else(|| "-".into()),
                    dash(&r.tags),
                    dash(&r.envs),
                    if r.has_token { "saved" } else { "missing" }.to_owned(),
                ]
            })
            .collect();
        let head = ["ID", "HUB", "TAGS", "ENVS", "TOKEN"].map(str::to_owned);
        let mut widths = head.clone().map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&head).chain(&rows) {
            let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out += &format!("  {}\n", cells.join("  ").trim_end());
        }
        let verb = if e.used { "uses" } else { "would use" };
        match &e.default {
            Some(id) => out += &format!("  `cla-worker run` {verb} {id} (without --id)\n"),
            None => out += "  `cla-worker run` needs --id ID to pick one\n",
        }
    }
    if !entries.iter().any(|e| e.exists) {
        out += "no config file found; `cla-worker register --save` creates ./cla-worker.yml\n";
    }
    let searched: Vec<String> = entries.iter().map(|e| e.path.display().to_string()).collect();
    out += &format!("searched, in order: {}\n", searched.join(", "));
    out
}
