//! `cla-worker` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use super::list;
use crate::error::{Error, Result};
use cla_common::exit::ExitCode;
use cla_common::secret::Secret;
use cla_common::tls::Trust;
use cla_config::{self as config, Overrides, Registration, save};
use cla_protocol::http::HttpError;
use cla_worker_core::registration::{self, RegisterParams};
use cla_worker_core::{self as agent, RunOptions};

/// cla-worker: a pull agent that connects out to a cla-hub and runs what it is sent.
#[derive(Debug, Parser)]
#[command(name = "cla-worker", version, about, propagate_version = true)]
pub struct Args {
    /// Config file (default: ./cla-worker.yml, then $HOME/cla-worker.yml, then /etc/cla-worker.yml).
    #[arg(short, long, global = true, env = "CLA_WORKER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Treat config warnings that concern secrets (a token file readable by others) as errors.
    #[arg(long, global = true)]
    pub strict: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with a hub using a project passkey; prints the worker id, and its token unless --save
    /// saved it.
    Register(RegisterArgs),
    /// Remove this worker's registration from the hub and from the config file.
    Unregister(UnregisterArgs),
    /// Connect to the hub and run what it sends, in the foreground.
    Run(RunArgs),
    /// Like `run`, in the background: prints the logfile, pidfile and pid, then returns.
    Start(RunArgs),
    /// Stop a worker, in the background or in the foreground: it drains (running jobs get
    /// --drain-timeout), then exits.
    Stop(StopArgs),
    /// Is the worker running (in the background or in the foreground)? Exit 0 with its state, 3 when it
    /// is not.
    Status(StatusArgs),
    /// Show the registrations saved in each config file found, and which one `run` uses (no tokens).
    List(ListArgs),
    /// Check config, DNS, TCP, TLS, HTTP, clock skew and authentication against the hub, with fixes.
    Doctor(UnregisterArgs),
    /// Install, remove, start or stop the worker as a Windows service.
    #[cfg(windows)]
    #[command(subcommand)]
    Service(super::service::ServiceCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `cla-worker man > /usr/share/man/man1/cla-worker.1`.
    Man,
}

/// Which worker: by id (default from the config) or by pidfile.
#[derive(Debug, ClapArgs)]
pub struct Which {
    /// The worker id.
    #[arg(long)]
    pub id: Option<String>,
    /// The pidfile (default: per id in the runtime dir; /run/cla-worker as root).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// The --spool-dir the worker was run with, if not the config's: a worker in the foreground is found
    /// by its spool.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub struct ListArgs {
    /// Print the files and registrations as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
pub struct StopArgs {
    #[command(flatten)]
    pub which: Which,
    /// Seconds to wait for the worker to drain and exit.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub timeout: u64,
}

#[derive(Debug, ClapArgs)]
pub struct StatusArgs {
    #[command(flatten)]
    pub which: Which,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Tags and envs, as lists or repeated flags.
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct Labels {
    /// Capability tags, comma-separated (the hub sends a job only to workers carrying all its tags).
    #[arg(long, value_name = "A,B")]
    pub tags: Vec<String>,
    /// One tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tag: Vec<String>,
    /// Environments this worker serves (QA, PROD, ...), comma-separated.
    #[arg(long, value_name = "E,F")]
    pub envs: Vec<String>,
    /// One environment (repeatable).
    #[arg(long = "env", value_name = "ENV")]
    pub env: Vec<String>,
}

impl Labels {
    pub(crate) fn tags(&self) -> Vec<String> {
        list(&self.tags, &self.tag)
    }
    pub(crate) fn envs(&self) -> Vec<String> {
        list(&self.envs, &self.env)
    }
}

#[derive(Debug, ClapArgs)]
pub struct RegisterArgs {
    /// The hub's URL, e.g. http://hub.example.com:8780.
    #[arg(long)]
    pub url: Option<String>,
    /// The project passkey from `cla-hub passkey create`.
    #[arg(long, env = "CLA_WORKER_PASSKEY", hide_env_values = true)]
    pub passkey: Option<Secret>,
    /// The worker id to register (default: user@hostname, made unique by the hub).
    #[arg(long)]
    pub id: Option<String>,
    /// This worker's current token, to add an already registered id to another project.
    #[arg(long, env = "CLA_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    #[command(flatten)]
    pub labels: Labels,
    /// On https: without --pin or --ca, the hub's certificate is trusted on first use and its
    /// fingerprint recorded (printed, and saved with --save), like ssh's known_hosts.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Save the registration into the config file (default: the file that would be loaded, else
    /// ./cla-worker.yml), created with mode 0600 and written atomically.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub save: Option<Option<PathBuf>>,
    /// Also print the token when --save saved it (without --save it is always printed: it is shown
    /// only once).
    #[arg(long)]
    pub show_token: bool,
    /// Print {"id","token","projects"} as JSON (the token included, for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Which registration, and where: each defaults to the config file.
#[derive(Debug, ClapArgs)]
pub struct Credentials {
    /// The worker id (needed when the config holds several registrations).
    #[arg(long)]
    pub id: Option<String>,
    /// The worker's token (default: from the config).
    #[arg(long, env = "CLA_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// The hub's URL (default: from the config).
    #[arg(long)]
    pub url: Option<String>,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// The client certificate (PEM) to present to a hub requiring mTLS (default: the registration's).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// How to trust an https hub's certificate (default: the pin recorded at `register`).
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct TrustArgs {
    /// Trust exactly the hub certificate with this SHA-256 fingerprint (as `cla-hub serve` logs it).
    #[arg(long, value_name = "SHA256")]
    pub pin: Option<String>,
    /// Trust hub certificates issued by the CA(s) in this PEM file (checked against the URL's host name).
    #[arg(long, value_name = "FILE", conflicts_with = "pin")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub struct UnregisterArgs {
    #[command(flatten)]
    pub who: Credentials,
}

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    #[command(flatten)]
    pub who: Credentials,
    #[command(flatten)]
    pub labels: Labels,
    /// How many jobs may run at once (default 1).
    #[arg(long)]
    pub capacity: Option<u32>,
    /// Directory jobs run in unless they name one (default: where the worker was started).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Where jobs' output and results wait for the hub's acknowledgement (the spool of worker ID is
    /// SPOOL_DIR/ID; default ~/.local/share/cla-worker/spool, /var/lib/cla-worker/spool for root).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// On SIGINT/SIGTERM, seconds running jobs get to finish before they are killed.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub drain_timeout: u64,
    /// Wait a random 0..SECS before connecting the first time, so a fleet started together (a config
    /// push, a data-center power-up) does not reach the hub in the same instant.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub startup_jitter: f64,
    /// Write this pidfile (and a status file beside it for `cla-worker status`); `start` defaults it.
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// Log to this file, rotated by size, instead of stderr; `start` defaults it.
    #[arg(long, value_name = "PATH")]
    pub logfile: Option<PathBuf>,
}

/// Runs the command line.
pub fn run(args: Args) -> Result<ExitCode> {
    match &args.command {
        // Neither needs a config nor a runtime.
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Args as clap::CommandFactory>::command(),
                "cla-worker",
                &mut std::io::stdout(),
            );
            return Ok(ExitCode::Success);
        }
        Command::Man => {
            clap_mangen::Man::new(<Args as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            return Ok(ExitCode::Success);
        }
        // Reads every config file itself, and reports a broken one instead of failing on it.
        Command::List(a) => return super::list::list(a, args.config.as_deref()),
        _ => {}
    }
    let allow_missing = matches!(&args.command, Command::Register(r) if r.save.is_some());
    let loaded = config::load(args.config.as_deref(), allow_missing, args.strict)?;
    let verbose = args.verbose.max(loaded.file.verbose);
    // The log goes to a file for a background worker, and for a service (no console), by default the
    // worker's logfile.
    let logfile = match &args.command {
        Command::Run(a) => a.logfile.clone(),
        #[cfg(windows)]
        Command::Service(super::service::ServiceCommand::Run { run, .. }) => Some(match &run.logfile {
            Some(p) => p.clone(),
            None => {
                let id = config::resolve_id(&loaded, run.who.id.as_deref())?;
                cla_worker_core::daemon::paths(&id, None, loaded.file.logfile.clone()).logfile
            }
        }),
        _ => None,
    };
    match logfile {
        Some(path) => {
            let file = cla_common::logging::RotatingFile::open(
                &path,
                loaded.file.log_max_bytes(),
                loaded.file.log_keep(),
            )
            .map_err(|e| Error::io(&path, e))?;
            cla_common::logging::init_to_file(verbose, file);
        }
        None => cla_common::logging::init(verbose),
    }
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    match args.command {
        // Before any runtime exists: `start` spawns a process, `stop`/`status` only read files and signal.
        Command::Start(a) => super::daemon::start(a, &loaded, args.verbose, args.strict),
        Command::Stop(a) => super::daemon::stop(a, &loaded),
        Command::Status(a) => super::daemon::status(a, &loaded),
        // The SCM's dispatcher blocks this thread; the service makes its own runtime.
        #[cfg(windows)]
        Command::Service(c) => super::service::run(c, &loaded, verbose),
        command => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(async {
                match command {
                    Command::Register(a) => register(a, &loaded).await,
                    Command::Unregister(a) => unregister(a, &loaded).await,
                    Command::Run(a) => run_worker(a, &loaded, args.strict).await,
                    Command::Doctor(a) => doctor(a, &loaded).await,
                    _ => unreachable!("handled above"),
                }
            });
            // Dropping the runtime would wait for every blocking thread (a transfer or eval reader stuck
            // in a system call) without end; the work is done, so give them a moment and exit.
            rt.shutdown_timeout(BLOCKING_THREADS_GRACE);
            result
        }
    }
}

/// How long an ended worker waits for its blocking threads before it exits regardless.
pub(crate) const BLOCKING_THREADS_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn register(a: RegisterArgs, loaded: &config::LoadedConfig) -> Result<ExitCode> {
    let f = &loaded.file;
    let url = a
        .url
        .or_else(|| f.url.clone())
        .ok_or_else(|| Error::Usage("register needs --url (or `url:` in the config)".into()))?;
    let passkey = a
        .passkey
        .or_else(|| f.passkey.clone())
        .ok_or_else(|| Error::Usage("register needs --passkey (from `cla-hub passkey create`)".into()))?;
    let mut tags = a.labels.tags();
    if tags.is_empty() {
        tags = f.tags.clone();
    }
    let mut envs = a.labels.envs();
    if envs.is_empty() {
        envs = f.envs.clone();
    }
    let url = url.trim_end_matches('/').to_owned();
    // --pin/--ca, else what the config says, else trust on first use (https only).
    let file_tls = f.tls.clone().unwrap_or_default();
    let trust = match (&a.trust.pin, &a.trust.ca) {
        (None, None) => Trust::from_options(file_tls.pin.as_deref(), file_tls.ca.as_deref())?,
        (pin, ca) => Trust::from_options(pin.as_deref(), ca.as_deref())?,
    };
    let (trust, seen) = match trust {
        Trust::Unset => {
            let (t, seen) = Trust::first_use();
            (t, Some(seen))
        }
        given => (given, None),
    };
    // Over https, ask for a client certificate (mTLS): the key is made here and never sent.
    let client_key = match url.starts_with("https://") {
        true => Some(cla_common::tls::new_csr(a.id.as_deref().unwrap_or("worker"))?),
        false => None,
    };
    let params = RegisterParams {
        url: url.clone(),
        passkey,
        id: a.id,
        tags: tags.clone(),
        envs: envs.clone(),
        token: a.token,
        trust: trust.clone(),
        csr: client_key.as_ref().map(|(csr, _)| csr.clone()),
    };
    // The token is shown only once: make sure it can be saved before asking for it.
    let save_to = a.save.as_ref().map(|explicit| {
        explicit
            .clone()
            .or_else(|| loaded.path.clone())
            .unwrap_or_else(|| PathBuf::from(config::FILE_NAME))
    });
    if let Some(path) = &save_to {
        cla_common::util::check_writable(path)?;
    }
    let resp = match registration::register(&params).await {
        Ok(resp) => resp,
        // The hub knows this id already: `unregister` needs its token, which may be what was lost.
        Err(Error::Http(HttpError::Status {
            status: 409, message, ..
        })) => {
            let id = params.id.as_deref().unwrap_or_default();
            return Err(Error::Other(already_registered(
                message,
                id,
                loaded,
                params.token.is_some(),
            )));
        }
        Err(e) => return Err(e),
    };
    // The certificate to pin from now on (none on plain http, or when a CA is trusted instead).
    let pin = match (&trust, &seen) {
        (Trust::Pin(p), _) => Some(*p),
        (_, Some(seen)) if url.starts_with("https://") => seen.get(),
        _ => None,
    };
    // The issued client certificate and its key go beside the config file (or here, unsaved).
    let identity = match (&resp.certificate, &client_key) {
        (Some(cert), Some((_, key))) => {
            let dir = save_to
                .as_ref()
                .and_then(|p| p.parent())
                .filter(|d| !d.as_os_str().is_empty())
                .map(std::path::Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            let (cert_path, key_path) = (
                dir.join(format!("cla-worker-{}.crt", resp.id)),
                dir.join(format!("cla-worker-{}.key", resp.id)),
            );
            cla_common::util::write_atomic(&key_path, key.as_bytes(), true)?;
            cla_common::util::write_atomic(&cert_path, cert.as_bytes(), false)?;
            Some((cert_path, key_path))
        }
        _ => None,
    };
    let saved = match save_to {
        None => None,
        Some(path) => {
            let reg = Registration {
                id: resp.id.clone(),
                token: Some(Secret::new(resp.token.clone())),
                url: Some(url.clone()),
                tags,
                envs,
                pin: pin.map(|p| p.to_string()),
                // Absolute, so that the file works from any directory.
                ca: match &trust {
                    Trust::Ca(path) => Some(std::path::absolute(path).unwrap_or_else(|_| path.clone())),
                    _ => None,
                },
                cert: identity.as_ref().map(|(c, _)| c.clone()),
                key: identity.as_ref().map(|(_, k)| k.clone()),
            };
            if let Err(e) = save::save_registration(&path, &reg) {
                // Registered, but not saved: the token must not be lost with the error.
                eprintln!(
                    "cla-worker: registered worker {} but could not save it: {e}\nkeep its token (shown only now): {}",
                    resp.id, resp.token
                );
                return Ok(ExitCode::Failure);
            }
            Some(path)
        }
    };
    if a.json {
        println!("{}", serde_json::to_string(&resp).expect("serializes"));
        return Ok(ExitCode::Success);
    }
    println!("registered worker {}", resp.id);
    // Saved, the token stays out of the terminal (and its scrollback) unless asked for.
    match &saved {
        Some(path) if !a.show_token => println!(
            "  token:    saved in {} (not shown; --show-token prints it)",
            path.display()
        ),
        _ => println!("  token:    {}", resp.token),
    }
    println!("  projects: {}", resp.projects.join(", "));
    if let Some(pin) = pin {
        let how = match seen {
            Some(_) => "trusted on first use: compare it with the `TLS certificate` line of `cla-hub serve`",
            None => "pinned with --pin",
        };
        println!("  hub certificate: {pin} ({how})");
    }
    if let Some((cert, key)) = &identity {
        println!(
            "  client certificate: {} (key {}, mode 0600; for hubs requiring mTLS)",
            cert.display(),
            key.display()
        );
    }
    let mut pin_flag = match (pin, &saved) {
        (Some(pin), None) => format!(" --pin {pin}"),
        _ => String::new(),
    };
    if let (Some((cert, key)), None) = (&identity, &saved) {
        pin_flag.push_str(&format!(
            " --client-cert {} --client-key {}",
            cert.display(),
            key.display()
        ));
    }
    match &saved {
        Some(path) => {
            println!("saved to {} (mode 0600)", path.display());
            let config_flag = config_flag(path);
            println!("run it with:\n  cla-worker{config_flag} run --id {}", resp.id);
            println!(
                "unregister with:\n  cla-worker{config_flag} unregister --id {}",
                resp.id
            );
        }
        None => {
            println!("run it with (or register with --save to keep the token in the config file):");
            println!(
                "  cla-worker run --url {url} --id {} --token {}{pin_flag}",
                resp.id, resp.token
            );
            println!(
                "unregister with:\n  cla-worker unregister --url {url} --id {} --token {}{pin_flag}",
                resp.id, resp.token
            );
        }
    }
    Ok(ExitCode::Success)
}

/// ` -c PATH` for a command line about the config file `path`, unless it is the one found without `-c`.
fn config_flag(path: &std::path::Path) -> String {
    if config::locate(None, false).ok().flatten().as_deref() == Some(path) {
        String::new()
    } else {
        format!(" -c {}", path.display())
    }
}

/// The hub's refusal of an id it already has, with the way out when this machine holds no token for it
/// (so that `cla-worker unregister`, which the hub suggests, cannot work either).
fn already_registered(message: String, id: &str, loaded: &config::LoadedConfig, token_given: bool) -> String {
    let saved = config::saved::registrations(&loaded.file)
        .iter()
        .any(|r| r.id == id && r.has_token);
    if saved || token_given || id.is_empty() {
        return message;
    }
    let here = match &loaded.path {
        Some(p) => format!("{} has none", p.display()),
        None => "no config file found".to_owned(),
    };
    format!(
        "{message}; no token for {id} here to unregister it with ({here}): if its config was lost, an admin \
         deletes the registration on the hub with `cla-hub worker unregister {id}`, then run this register again"
    )
}

async fn unregister(a: UnregisterArgs, loaded: &config::LoadedConfig) -> Result<ExitCode> {
    let cli = Overrides {
        url: a.who.url,
        id: a.who.id,
        token: a.who.token,
        pin: a.who.trust.pin,
        ca: a.who.trust.ca,
        client_cert: a.who.client_cert,
        client_key: a.who.client_key,
        ..Default::default()
    };
    let s = config::resolve(loaded, &cli)?;
    let identity = s.client_identity()?;
    let resp = match registration::unregister(&s.url, &s.id, &s.token, &s.trust, identity.as_ref()).await {
        Ok(resp) => resp,
        // The hub does not take this token: perhaps an admin deleted the registration already.
        Err(Error::Http(HttpError::Status {
            status: 401, message, ..
        })) => {
            let (entry, config_flag) = match &s.source {
                Some(p) => (format!("its entry in {} stays", p.display()), config_flag(p)),
                None => ("nothing is saved here".to_owned(), String::new()),
            };
            return Err(Error::Other(format!(
                "{message}; nothing was removed ({entry}): if an admin deleted it on the hub \
                 (`cla-hub worker unregister {id}`), `cla-worker{config_flag} register --id {id} --save` \
                 registers it again and replaces the entry",
                id = s.id
            )));
        }
        Err(e) => return Err(e),
    };
    println!(
        "worker registration removed: {} (projects: {})",
        resp.id,
        resp.projects.join(", ")
    );
    if let Some(path) = &s.source
        && save::remove_registration(path, &s.id)?
    {
        println!("removed from {}", path.display());
    }
    // The client certificate and key `register` made for this id (not files the user named otherwise):
    // the hub no longer accepts them, and the key should not outlive the registration.
    if let Some((cert, key)) = &s.identity {
        let ours = |p: &std::path::Path, ext: &str| {
            p.file_name().and_then(|n| n.to_str()) == Some(format!("cla-worker-{}.{ext}", s.id).as_str())
        };
        if ours(cert, "crt") && ours(key, "key") {
            for p in [cert, key] {
                match std::fs::remove_file(p) {
                    Ok(()) => println!("removed {}", p.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("cannot remove {}: {e}", p.display()),
                }
            }
        }
    }
    Ok(ExitCode::Success)
}

async fn doctor(a: UnregisterArgs, loaded: &config::LoadedConfig) -> Result<ExitCode> {
    use cla_worker_core::doctor::{self, Verdict};
    let cli = Overrides {
        url: a.who.url,
        id: a.who.id,
        token: a.who.token,
        ..Default::default()
    };
    let checks = doctor::run(loaded, &cli).await;
    let mut failed = 0;
    for c in &checks {
        let mark = match c.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Fail => {
                failed += 1;
                "FAIL"
            }
            Verdict::Skipped => "-   ",
        };
        super::print_out(&format!("{mark}  {:<12} {}\n", c.name, c.detail))?;
    }
    if failed == 0 {
        super::print_out("all checks passed\n")?;
        Ok(ExitCode::Success)
    } else {
        super::print_out(&format!("{failed} check(s) failed\n"))?;
        Ok(ExitCode::Failure)
    }
}

/// The command-line values of `run`/`start` that override the config.
pub(crate) fn overrides(a: &RunArgs) -> Overrides {
    Overrides {
        url: a.who.url.clone(),
        id: a.who.id.clone(),
        token: a.who.token.clone(),
        tags: a.labels.tags(),
        envs: a.labels.envs(),
        capacity: a.capacity,
        workdir: a.workdir.clone(),
        spool_dir: a.spool_dir.clone(),
        pin: a.who.trust.pin.clone(),
        ca: a.who.trust.ca.clone(),
        client_cert: a.who.client_cert.clone(),
        client_key: a.who.client_key.clone(),
    }
}

/// The config keys outside [`config::WorkerSettings`] (the log's, the pidfile) that differ between the
/// file as the worker started with it and as it is now: only a restart applies them.
fn file_only_changes(was: &config::ConfigFile, now: &config::ConfigFile) -> Vec<String> {
    [
        ("verbose", was.verbose != now.verbose),
        ("logfile", was.logfile != now.logfile),
        ("log_max_mb", was.log_max_mb != now.log_max_mb),
        ("log_keep", was.log_keep != now.log_keep),
        ("pidfile", was.pidfile != now.pidfile),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_owned())
    .collect()
}

async fn run_worker(a: RunArgs, loaded: &config::LoadedConfig, strict: bool) -> Result<ExitCode> {
    // Signal handlers first: a SIGTERM or SIGHUP arriving once the pidfile exists must not kill us.
    let shutdown = cla_common::shutdown::on_signals();
    cla_common::shutdown::hold_sighup();
    run_worker_until(a, loaded, strict, shutdown).await
}

/// The worker of `run` (and of the Windows service), until `shutdown` is cancelled.
pub(crate) async fn run_worker_until(
    a: RunArgs,
    loaded: &config::LoadedConfig,
    strict: bool,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<ExitCode> {
    let cli = overrides(&a);
    let settings = config::resolve(loaded, &cli)?;
    // SIGHUP: the same file again, the same flags on top.
    let (path, cli_again, started) = (loaded.path.clone(), cli.clone(), loaded.file.clone());
    let reload: agent::Reload = std::sync::Arc::new(move || {
        let fresh = config::load(path.as_deref(), false, strict)?;
        for w in &fresh.warnings {
            tracing::warn!("{w}");
        }
        Ok(agent::Reloaded {
            settings: config::resolve(&fresh, &cli_again)?,
            restart_needed: file_only_changes(&started, &fresh.file),
        })
    });
    let mut opts = RunOptions {
        drain_timeout: Duration::from_secs(a.drain_timeout),
        startup_jitter: Duration::try_from_secs_f64(a.startup_jitter).map_err(|_| {
            Error::Usage(format!(
                "--startup-jitter must be a number of seconds, not {}",
                a.startup_jitter
            ))
        })?,
        status_file: None,
        pidfile: None,
        reload: Some(reload),
    };
    agent::session::check(&settings)?;
    let _pidfile = match &a.pidfile {
        Some(p) => {
            let lock = cla_worker_core::daemon::PidLock::acquire(p)?;
            opts.pidfile = Some(p.clone());
            opts.status_file =
                Some(cla_worker_core::daemon::paths(&settings.id, Some(p.clone()), None).statusfile);
            Some(lock)
        }
        None => None,
    };
    let result = agent::run(settings, opts, shutdown).await;
    result?;
    tracing::info!("shutdown completed");
    Ok(ExitCode::Success)
}
