//! The config file's shape and its parsing: typed fields, `tags`/`envs` as list or comma string,
//! unknown keys reported as warnings, YAML and type errors reported with file, line and column.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::ConfigError;
use cla_common::secret::Secret;

/// The config file's fields (all optional). `cla-worker.example.yml` documents each one.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    pub url: Option<String>,
    pub id: Option<String>,
    pub token: Option<Secret>,
    pub passkey: Option<Secret>,
    #[serde(default, deserialize_with = "verbosity")]
    pub verbose: u8,
    #[serde(default, deserialize_with = "list")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "list")]
    pub envs: Vec<String>,
    pub capacity: Option<u32>,
    pub workdir: Option<PathBuf>,
    pub logfile: Option<PathBuf>,
    /// Rotate the logfile when it would pass this size (MiB, default 10).
    pub log_max_mb: Option<u64>,
    /// Rotated logfiles kept (`worker.log.1` … `.N`, default 5).
    pub log_keep: Option<u32>,
    pub pidfile: Option<PathBuf>,
    /// Where jobs' output and results wait for the hub's acknowledgement (`SPOOL_DIR/ID/`).
    pub spool_dir: Option<PathBuf>,
    /// Spool size limit in MiB (default 1024): output past it is not spooled.
    pub spool_max_mb: Option<u64>,
    #[serde(default)]
    pub registrations: Vec<Registration>,
    pub policy: Option<Policy>,
    pub tls: Option<TlsConfig>,
    pub mask: Option<MaskConfig>,
}

impl ConfigFile {
    /// Logfile rotation size in bytes.
    pub fn log_max_bytes(&self) -> u64 {
        self.log_max_mb.unwrap_or(10).max(1) << 20
    }

    /// Rotated logfiles to keep.
    pub fn log_keep(&self) -> u32 {
        self.log_keep.unwrap_or(5)
    }

    /// True when the file holds a token (top level or in a registration), so its mode matters.
    pub fn holds_token(&self) -> bool {
        self.token.is_some() || self.registrations.iter().any(|r| r.token.is_some())
    }
}

/// One saved registration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct Registration {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "list", skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<String>,
    /// The SHA-256 fingerprint of the hub's certificate, recorded at `register` over https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Or: the CA file that `register --ca` trusted for this hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The client certificate the hub issued at registration (mTLS), and its private key (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// What the hub may do on this worker (enforced by [`crate::policy::Enforcer`]).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
pub struct Policy {
    #[serde(default, deserialize_with = "list")]
    pub allow: Vec<String>,
    #[serde(default, deserialize_with = "list")]
    pub deny: Vec<String>,
    #[serde(default)]
    pub paths: PolicyPaths,
}

/// Path allow-lists of a [`Policy`].
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
pub struct PolicyPaths {
    #[serde(default)]
    pub read: Vec<PathBuf>,
    #[serde(default)]
    pub write: Vec<PathBuf>,
}

/// How the worker trusts the hub's certificate on https URLs: a pin (fingerprint) or a CA file.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct TlsConfig {
    pub ca: Option<PathBuf>,
    pub pin: Option<String>,
}

/// Secrets to mask in job output (besides the worker's own token, always masked).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct MaskConfig {
    /// Environment variables (of the worker process) whose values are secrets.
    #[serde(default, deserialize_with = "list")]
    pub envs: Vec<String>,
    /// Regexes whose matches are secrets (byte-oriented syntax, e.g. `AKIA[0-9A-Z]{16}`).
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// Verbs a policy may name.
const VERBS: &[&str] = &["exec", "ship", "fetch", "eval"];

/// Known keys per section, for the unknown-key warnings.
const TOP_KEYS: &[&str] = &[
    "url",
    "id",
    "token",
    "passkey",
    "verbose",
    "tags",
    "envs",
    "capacity",
    "workdir",
    "logfile",
    "log_max_mb",
    "log_keep",
    "pidfile",
    "spool_dir",
    "spool_max_mb",
    "registrations",
    "policy",
    "tls",
    "mask",
];
const REGISTRATION_KEYS: &[&str] = &["id", "token", "url", "tags", "envs", "pin", "ca", "cert", "key"];
const POLICY_KEYS: &[&str] = &["allow", "deny", "paths"];
const POLICY_PATH_KEYS: &[&str] = &["read", "write"];
const TLS_KEYS: &[&str] = &["ca", "pin"];
const MASK_KEYS: &[&str] = &["envs", "patterns"];

/// Parses config text as if read from `path` (no file access). Returns the typed file and the warnings
/// (unknown keys). Public for the fuzz targets (`fuzz/`).
pub fn parse(path: &Path, text: &str) -> Result<(ConfigFile, Vec<String>), ConfigError> {
    let located = |e: serde_saphyr::Error| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: cla_common::yaml::message(&e.to_string(), text, line),
        }
    };
    // An empty file (or one holding only comments) is an empty config.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok((ConfigFile::default(), Vec::new()));
    }
    let tree: serde_json::Value = serde_saphyr::from_str(text).map_err(located)?;
    if tree.is_null() {
        return Ok((ConfigFile::default(), Vec::new()));
    }
    if !tree.is_object() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            message: "the config must be a mapping of keys (url:, id:, tags:, ...)".into(),
        });
    }
    let mut warnings = Vec::new();
    unknown_keys(path, &tree, "", TOP_KEYS, &mut warnings);
    if let Some(regs) = tree.get("registrations").and_then(|r| r.as_array()) {
        for (i, r) in regs.iter().enumerate() {
            unknown_keys(
                path,
                r,
                &format!("registrations[{i}]."),
                REGISTRATION_KEYS,
                &mut warnings,
            );
        }
    }
    if let Some(p) = tree.get("policy") {
        unknown_keys(path, p, "policy.", POLICY_KEYS, &mut warnings);
        if let Some(paths) = p.get("paths") {
            unknown_keys(path, paths, "policy.paths.", POLICY_PATH_KEYS, &mut warnings);
        }
    }
    if let Some(t) = tree.get("tls") {
        unknown_keys(path, t, "tls.", TLS_KEYS, &mut warnings);
    }
    if let Some(m) = tree.get("mask") {
        unknown_keys(path, m, "mask.", MASK_KEYS, &mut warnings);
    }
    let file: ConfigFile = serde_saphyr::from_str(text).map_err(located)?;
    validate(path, &file)?;
    Ok((file, warnings))
}

fn validate(path: &Path, f: &ConfigFile) -> Result<(), ConfigError> {
    // Values are quoted in these messages: a multi-line YAML string must not break the one-line error.
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: cla_common::util::one_line(&message, 400),
    };
    if f.capacity == Some(0) {
        return Err(invalid("capacity must be at least 1".into()));
    }
    for (i, r) in f.registrations.iter().enumerate() {
        if r.id.trim().is_empty() {
            return Err(invalid(format!("registrations[{i}] has an empty id")));
        }
    }
    let pins = f
        .tls
        .iter()
        .filter_map(|t| t.pin.as_ref().map(|p| ("tls.pin".to_owned(), p)))
        .chain(
            f.registrations
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.pin.as_ref().map(|p| (format!("registrations[{i}].pin"), p))),
        );
    for (key, pin) in pins {
        if let Err(e) = cla_common::tls::Fingerprint::parse(pin) {
            return Err(invalid(format!("{key}: {e}")));
        }
    }
    if let Some(m) = &f.mask {
        for (i, p) in m.patterns.iter().enumerate() {
            cla_common::mask::check_pattern(p).map_err(|e| invalid(format!("mask.patterns[{i}]: {e}")))?;
        }
    }
    if let Some(p) = &f.policy {
        for verb in p.allow.iter().chain(&p.deny) {
            if !VERBS.contains(&verb.as_str()) {
                return Err(invalid(format!(
                    "policy names unknown verb `{verb}`: use {}",
                    VERBS.join(", ")
                )));
            }
        }
    }
    for url in f
        .url
        .iter()
        .chain(f.registrations.iter().filter_map(|r| r.url.as_ref()))
    {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(format!(
                "url `{url}` must start with http:// or https://"
            )));
        }
    }
    Ok(())
}

fn unknown_keys(path: &Path, node: &serde_json::Value, prefix: &str, known: &[&str], out: &mut Vec<String>) {
    if let Some(map) = node.as_object() {
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            out.push(format!(
                "{}: unknown key `{prefix}{key}` (ignored)",
                path.display()
            ));
        }
    }
}

/// `tags: [a, b]`, `tags: "a, b"` and `tags: a` all give `[a, b]` / `[a]`.
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => cla_common::util::split_list([&s]),
        Some(OneOrMany::Many(v)) => cla_common::util::split_list(&v),
    })
}

/// `verbose: true`, `verbose: 2` or absent.
fn verbosity<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrLevel {
        Bool(bool),
        Level(u8),
    }
    Ok(match Option::<BoolOrLevel>::deserialize(d)? {
        None | Some(BoolOrLevel::Bool(false)) => 0,
        Some(BoolOrLevel::Bool(true)) => 1,
        Some(BoolOrLevel::Level(n)) => n,
    })
}
