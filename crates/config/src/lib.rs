//! The worker's YAML config (`docs/config.md`): where it is found, how it is parsed and
//! checked, and how command-line values override it to give one resolved [`WorkerSettings`].
//!
//! Search order: `--config` (or `CLA_WORKER_CONFIG`), `./cla-worker.yml`, `$HOME/cla-worker.yml`,
//! `/etc/cla-worker.yml`; the first file found is the only one loaded. Command-line values beat file
//! values. `--save` edits are in [`save`]; what `cla-worker list` shows, in [`saved`]. Nothing here sees
//! clap.

pub mod file;
pub mod policy;
pub mod save;
pub mod saved;

use cla_protocol::bounds;
use std::path::{Path, PathBuf};

pub use file::{ConfigFile, MaskConfig, Policy, PolicyPaths, Registration, TlsConfig};

use cla_common::secret::Secret;
use cla_common::tls::Trust;

/// File name looked for in the current directory, the home directory and `/etc`.
pub const FILE_NAME: &str = "cla-worker.yml";

/// Problems with config files and the values resolved from them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} not found (given with --config or CLA_WORKER_CONFIG)")]
    NotFound(PathBuf),
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A YAML or type error, located.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path} holds a token and is readable by other users (mode {mode:o}); run `chmod 600 {path}` (this is an error because of --strict)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{0}")]
    Missing(String),
    /// A file that could not be written.
    #[error(transparent)]
    Write(#[from] cla_common::Error),
}

/// A config file as loaded, with the warnings found while loading it.
#[derive(Debug, Clone, Default)]
pub struct LoadedConfig {
    /// Where it came from; `None` when no file was found (all defaults).
    pub path: Option<PathBuf>,
    pub file: ConfigFile,
    /// One line each: unknown keys, loose permissions.
    pub warnings: Vec<String>,
}

/// The places searched when no explicit path is given, in order.
pub fn search_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from(FILE_NAME)];
    if let Some(home) = directories::BaseDirs::new().map(|d| d.home_dir().to_path_buf()) {
        paths.push(home.join(FILE_NAME));
    }
    #[cfg(unix)]
    paths.push(PathBuf::from("/etc").join(FILE_NAME));
    // Windows' counterpart of /etc: %ProgramData%\cla-worker\cla-worker.yml.
    #[cfg(windows)]
    if let Some(data) = std::env::var_os("ProgramData") {
        paths.push(PathBuf::from(data).join("cla-worker").join(FILE_NAME));
    }
    paths
}

/// Finds the config file: `explicit` if given (it must exist unless `allow_missing`), else the first of
/// [`search_paths`] that exists.
pub fn locate(explicit: Option<&Path>, allow_missing: bool) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(p) = explicit {
        return if p.exists() || allow_missing {
            Ok(Some(p.to_path_buf()))
        } else {
            Err(ConfigError::NotFound(p.to_path_buf()))
        };
    }
    Ok(search_paths().into_iter().find(|p| p.is_file()))
}

/// Largest config file read (a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Locates and loads the config. `strict` turns the loose-permissions warning into an error.
/// With `allow_missing`, an explicit path that does not exist yet loads as empty (for `register --save`).
pub fn load(explicit: Option<&Path>, allow_missing: bool, strict: bool) -> Result<LoadedConfig, ConfigError> {
    let Some(path) = locate(explicit, allow_missing)? else {
        return Ok(LoadedConfig::default());
    };
    if !path.exists() {
        return Ok(LoadedConfig {
            path: Some(path),
            ..Default::default()
        });
    }
    let text =
        cla_common::util::read_capped(&path, MAX_CONFIG_BYTES, "config file").map_err(|e| match e {
            cla_common::Error::Io { source, .. } => ConfigError::Read {
                path: path.clone(),
                source,
            },
            other => ConfigError::Invalid {
                path: path.clone(),
                message: other.to_string(),
            },
        })?;
    let (file, mut warnings) = file::parse(&path, &text)?;
    if let Some(mode) = loose_mode(&path)
        && file.holds_token()
    {
        if strict {
            return Err(ConfigError::Permissions { path, mode });
        }
        warnings.push(format!(
            "{} holds a token and is readable by other users (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(LoadedConfig {
        path: Some(path),
        file,
        warnings,
    })
}

/// The file's permission bits when group or others may read it (Unix); `None` otherwise.
fn loose_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Values given on the command line; `None`/empty means "not given" and never clobbers the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub url: Option<String>,
    pub id: Option<String>,
    pub token: Option<Secret>,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    pub capacity: Option<u32>,
    pub workdir: Option<PathBuf>,
    pub spool_dir: Option<PathBuf>,
    /// `--pin`: the hub certificate's fingerprint to trust.
    pub pin: Option<String>,
    /// `--ca`: a PEM file of CA certificates to trust for the hub.
    pub ca: Option<PathBuf>,
    /// `--client-cert`/`--client-key`: the worker's client certificate and key (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Everything a running worker needs, resolved from file + flags.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub url: String,
    pub id: String,
    pub token: Secret,
    pub tags: Vec<String>,
    pub envs: Vec<String>,
    pub capacity: u32,
    pub workdir: Option<PathBuf>,
    pub policy: Policy,
    /// How the hub's certificate is trusted on an https URL.
    pub trust: Trust,
    /// The client certificate and key presented to a hub that asks (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Secrets to mask in job output, besides the token.
    pub mask: MaskConfig,
    /// This worker's spool directory (`SPOOL_DIR/ID`).
    pub spool_dir: PathBuf,
    /// The spool's size limit in bytes.
    pub spool_max_bytes: u64,
    /// The config file the registration was found in, if any.
    pub source: Option<PathBuf>,
    /// The config file the token came from (not a flag or the environment): where a rotated token is
    /// saved.
    pub token_file: Option<PathBuf>,
}

impl WorkerSettings {
    /// The masks of this worker's job output: its token, the values of `mask.envs` (from this process's
    /// environment), and `mask.patterns`. Returns warnings for names that are unset or too short.
    pub fn masks(&self) -> Result<(cla_common::mask::Masks, Vec<String>), String> {
        let mut values = vec![self.token.expose().to_owned()];
        let mut warnings = Vec::new();
        for name in &self.mask.envs {
            match std::env::var(name) {
                Ok(v) if v.len() >= cla_common::mask::MIN_SECRET_LEN => values.push(v),
                Ok(_) => warnings.push(format!(
                    "mask.envs: the value of {name} is shorter than {} characters and is not masked",
                    cla_common::mask::MIN_SECRET_LEN
                )),
                Err(_) => warnings.push(format!(
                    "mask.envs: {name} is not set in the worker's environment"
                )),
            }
        }
        let masks = cla_common::mask::Masks::new(&values, &self.mask.patterns)?;
        Ok((masks, warnings))
    }

    /// The client certificate and key (mTLS), read from their files, if configured.
    pub fn client_identity(
        &self,
    ) -> Result<Option<cla_common::tls::ClientIdentity>, cla_common::tls::TlsError> {
        self.identity
            .as_ref()
            .map(|(cert, key)| cla_common::tls::ClientIdentity::load(cert, key))
            .transpose()
    }
}

/// The worker id alone (for `stop`/`status`): the flag, the file's `id`, or its only registration.
pub fn resolve_id(loaded: &LoadedConfig, cli_id: Option<&str>) -> Result<String, ConfigError> {
    if let Some(id) = cli_id.map(str::to_owned).or_else(|| loaded.file.id.clone()) {
        return Ok(id);
    }
    match loaded.file.registrations.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(ConfigError::Missing(
            "which worker? pass --id (no id in the config)".into(),
        )),
        several => Err(ConfigError::Missing(format!(
            "which worker? the config has {} registrations ({}): pass --id",
            several.len(),
            several
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Merges a loaded file with command-line values into [`WorkerSettings`].
///
/// Registration rules (as the original worker): an id takes the token, url, tags and envs it was not
/// given from the registration with that id; with no id and exactly one registration, that one is
/// used; with several, `--id` must pick one.
pub fn resolve(loaded: &LoadedConfig, cli: &Overrides) -> Result<WorkerSettings, ConfigError> {
    let f = &loaded.file;
    let where_ = || {
        loaded
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "no config file".into())
    };
    let mut id = cli.id.clone().or_else(|| f.id.clone());
    let mut token = cli.token.clone().or_else(|| f.token.clone());
    let mut url = cli.url.clone().or_else(|| f.url.clone());
    let mut tags = (!cli.tags.is_empty()).then(|| cli.tags.clone());
    let mut envs = (!cli.envs.is_empty()).then(|| cli.envs.clone());
    let mut pin = cli.pin.clone();
    let mut reg_ca = None;
    let mut identity = cli.client_cert.clone().zip(cli.client_key.clone());

    let registration = match (&id, &token) {
        (Some(id), _) => f.registrations.iter().find(|r| &r.id == id),
        (None, None) => match f.registrations.as_slice() {
            [one] => Some(one),
            [] => None,
            several => {
                let ids: Vec<&str> = several.iter().map(|r| r.id.as_str()).collect();
                return Err(ConfigError::Missing(format!(
                    "{} has {} registrations ({}): pick one with --id",
                    where_(),
                    ids.len(),
                    ids.join(", ")
                )));
            }
        },
        _ => None,
    };
    if let Some(r) = registration {
        id.get_or_insert_with(|| r.id.clone());
        token = token.or_else(|| r.token.clone());
        if url.is_none() {
            url = r.url.clone();
        }
        if tags.is_none() && !r.tags.is_empty() {
            tags = Some(r.tags.clone());
        }
        if envs.is_none() && !r.envs.is_empty() {
            envs = Some(r.envs.clone());
        }
        if pin.is_none() && cli.ca.is_none() {
            pin = r.pin.clone();
            reg_ca = r.ca.clone();
        }
        if identity.is_none() {
            identity = r.cert.clone().zip(r.key.clone());
        }
    }
    // The command line, else the registration's own pin or CA, else the file-wide `tls:`.
    let file_tls = f.tls.clone().unwrap_or_default();
    let given = pin.is_some() || cli.ca.is_some() || reg_ca.is_some();
    if !given {
        pin = file_tls.pin.clone();
    }
    // A relative CA path in the file is relative to the file.
    let in_file = |ca: &PathBuf| {
        let base = loaded.path.as_ref().and_then(|p| p.parent());
        match base {
            Some(dir) if ca.is_relative() => dir.join(ca),
            _ => ca.clone(),
        }
    };
    let ca = match (&cli.ca, &reg_ca) {
        (Some(ca), _) => Some(ca.clone()),
        (None, Some(ca)) => Some(in_file(ca)),
        (None, None) if !given => file_tls.ca.as_ref().map(in_file),
        _ => None,
    };
    let trust = Trust::from_options(pin.as_deref(), ca.as_deref()).map_err(|e| ConfigError::Invalid {
        path: loaded.path.clone().unwrap_or_default(),
        message: e.to_string(),
    })?;
    let id = id.ok_or_else(|| {
        ConfigError::Missing(format!(
            "no worker id: pass --id, or register first with `cla-worker register --save` ({})",
            where_()
        ))
    })?;
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| no_token(loaded, &id, registration.is_some()))?;
    let url = url.ok_or_else(|| {
        ConfigError::Missing(format!(
            "no hub url for worker {id}: pass --url or set `url` in the config file"
        ))
    })?;
    let tags = tags.unwrap_or_else(|| f.tags.clone());
    let envs = envs.unwrap_or_else(|| f.envs.clone());
    // The hub refuses what is past the protocol's bounds; say so here, where it can be fixed.
    let bounds = bounds::check_worker_id(&id)
        .and_then(|()| bounds::check_labels("tag", &tags))
        .and_then(|()| bounds::check_labels("env", &envs));
    if let Err(why) = bounds {
        return Err(ConfigError::Missing(format!("{why} ({})", where_())));
    }
    let capacity = cli.capacity.or(f.capacity).unwrap_or(1);
    if capacity == 0 {
        return Err(ConfigError::Missing("capacity must be at least 1".into()));
    }
    Ok(WorkerSettings {
        url: url.trim_end_matches('/').to_owned(),
        token,
        tags,
        envs,
        capacity,
        workdir: cli.workdir.clone().or_else(|| f.workdir.clone()),
        policy: f.policy.clone().unwrap_or_default(),
        trust,
        identity,
        mask: f.mask.clone().unwrap_or_default(),
        spool_dir: cli
            .spool_dir
            .clone()
            .or_else(|| f.spool_dir.clone())
            .unwrap_or_else(default_spool_base)
            .join(&id),
        spool_max_bytes: f.spool_max_mb.unwrap_or(1024).max(1) << 20,
        source: loaded.path.clone(),
        token_file: cli.token.is_none().then(|| loaded.path.clone()).flatten(),
        id,
    })
}

/// The error for a worker id without a token: where the id was found without one, and the two ways out
/// (the token from elsewhere, or, when it is lost, the admin's delete on the hub and a new registration;
/// registering the same id again is refused while the hub still knows it).
fn no_token(loaded: &LoadedConfig, id: &str, in_registrations: bool) -> ConfigError {
    let here = match &loaded.path {
        Some(p) if in_registrations => format!("{} has a registration {id} but no token", p.display()),
        Some(p) if loaded.file.id.as_deref() == Some(id) => {
            format!("{} has `id: {id}` but no token", p.display())
        }
        Some(p) => format!("{} has no registration {id}", p.display()),
        None => "no config file".to_owned(),
    };
    ConfigError::Missing(format!(
        "no token for worker {id} ({here}): pass --token (or CLA_WORKER_TOKEN); if the token is lost, an \
         admin deletes the registration on the hub with `cla-hub worker unregister {id}`, then \
         `cla-worker register --id {id} --save` registers it again"
    ))
}

/// Where spools go by default: `/var/lib/cla-worker/spool` for root, else the user's local data dir
/// (`~/.local/share/cla-worker/spool` on Linux).
pub fn default_spool_base() -> PathBuf {
    #[cfg(unix)]
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/cla-worker/spool");
    }
    directories::ProjectDirs::from("", "", "cla-worker")
        .map(|d| d.data_local_dir().join("spool"))
        .unwrap_or_else(|| PathBuf::from(".cla-worker-spool"))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
