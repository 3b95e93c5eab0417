//! Editing the config file on `register --save` and `unregister`: the file is re-read as a generic YAML
//! tree, only `registrations` (and, on unregister, a matching top-level `id`/`token`) is touched, every
//! other key and the order of keys and registrations is kept, and the result replaces the file atomically
//! with mode 0600. Comments in the file are not kept (the YAML crates do not round-trip them);
//! `docs/config.md` says so.

use std::path::Path;

use serde_json::{Map, Value};

use super::ConfigError;

type Result<T, E = ConfigError> = std::result::Result<T, E>;
use super::file::Registration;
use cla_common::util::write_atomic;

/// Adds `reg` to the file's `registrations` (replacing one with the same id), creating the file if needed.
pub fn save_registration(path: &Path, reg: &Registration) -> Result<()> {
    let mut root = read_tree(path)?;
    let entry = serde_json::to_value(RegistrationOut(reg)).expect("registrations serialize");
    let regs = root
        .entry("registrations")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !regs.is_array() {
        *regs = Value::Array(Vec::new());
    }
    let list = regs.as_array_mut().expect("made an array above");
    match list
        .iter_mut()
        .find(|r| r.get("id").and_then(Value::as_str) == Some(reg.id.as_str()))
    {
        Some(existing) => *existing = entry,
        None => list.push(entry),
    }
    write_tree(path, &root)
}

/// Removes the registration `id` from the file (and a top-level `id`/`token` pair naming it).
/// Returns whether anything was removed; a missing file removes nothing.
pub fn remove_registration(path: &Path, id: &str) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let mut root = read_tree(path)?;
    let mut removed = false;
    if let Some(Value::Array(list)) = root.get_mut("registrations") {
        let before = list.len();
        list.retain(|r| r.get("id").and_then(Value::as_str) != Some(id));
        removed = list.len() != before;
    }
    if root.get("id").and_then(Value::as_str) == Some(id) {
        root.shift_remove("id");
        root.shift_remove("token");
        removed = true;
    }
    if removed {
        write_tree(path, &root)?;
    }
    Ok(removed)
}

/// Replaces the token of worker `id` in the file (in its registration, or the top-level `token` that goes
/// with the top-level `id`), keeping everything else; atomic, and the file's mode is kept.
pub fn replace_token(path: &Path, id: &str, token: &cla_common::secret::Secret) -> Result<()> {
    let mut root = read_tree(path)?;
    let new = Value::String(token.expose().to_owned());
    let in_list = match root.get_mut("registrations") {
        Some(Value::Array(list)) => list
            .iter_mut()
            .find(|r| r.get("id").and_then(Value::as_str) == Some(id))
            .and_then(Value::as_object_mut),
        _ => None,
    };
    if let Some(entry) = in_list {
        entry.insert("token".into(), new);
    } else if root.contains_key("token") && root.get("id").and_then(Value::as_str).is_none_or(|top| top == id)
    {
        root.insert("token".into(), new);
    } else {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("holds no token for worker {id}"),
        });
    }
    write_tree(path, &root)
}

fn read_tree(path: &Path) -> Result<Map<String, Value>> {
    if !path.exists() {
        return Ok(Map::new());
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    // Refuse to rewrite a file we cannot read: the user's edits would be lost.
    let tree: Value = serde_saphyr::from_str(&text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: format!(
                "{}; fix it before saving a registration into it",
                e.to_string().lines().next().unwrap_or("")
            ),
        }
    })?;
    match tree {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            message: "the config must be a mapping of keys; not rewriting it".into(),
        }),
    }
}

fn write_tree(path: &Path, root: &Map<String, Value>) -> Result<()> {
    let yaml = serde_saphyr::to_string(root).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: format!("cannot write YAML: {e}"),
    })?;
    let text = format!("# cla-worker config (see cla-worker.example.yml for every field)\n{yaml}");
    Ok(write_atomic(path, text.as_bytes(), true)?)
}

/// Serializes a registration with its token exposed: this is the one place a token is written on purpose.
struct RegistrationOut<'a>(&'a Registration);

impl serde::Serialize for RegistrationOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &r.id)?;
        if let Some(t) = &r.token {
            m.serialize_entry("token", t.expose())?;
        }
        if let Some(u) = &r.url {
            m.serialize_entry("url", u)?;
        }
        if !r.tags.is_empty() {
            m.serialize_entry("tags", &r.tags)?;
        }
        if !r.envs.is_empty() {
            m.serialize_entry("envs", &r.envs)?;
        }
        if let Some(pin) = &r.pin {
            m.serialize_entry("pin", pin)?;
        }
        if let Some(ca) = &r.ca {
            m.serialize_entry("ca", ca)?;
        }
        if let Some(cert) = &r.cert {
            m.serialize_entry("cert", cert)?;
        }
        if let Some(key) = &r.key {
            m.serialize_entry("key", key)?;
        }
        m.end()
    }
}
