//! `cla-hub` command line: `serve`, the admin commands, and `demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use super::jobs;
use super::table::{or_dash, render};
use super::{print_json, print_out};
use crate::error::{Error, Result};
use cla_client::AdminClient;
use cla_common::exit::ExitCode;
use cla_common::secret::Secret;
use cla_hub_core::{HubConfig, default_data_dir, server};
use cla_protocol::api::{JobState, WorkerAction};

/// cla-hub: the server cla-workers connect to, and its admin commands.
#[derive(Debug, Parser)]
#[command(name = "cla-hub", version, about, propagate_version = true, after_help = EXIT_CODES)]
pub struct Args {
    /// Where the hub keeps its store and hub.json (default: the platform data dir, e.g. ~/.local/share/cla-hub).
    #[arg(long, global = true, env = "CLA_HUB_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Talk to the hub at this URL (with the admin token in CLA_HUB_TOKEN) instead of reading DATA_DIR/hub.json.
    #[arg(long, global = true, value_name = "URL")]
    pub hub: Option<String>,
    /// The admin token for --hub.
    #[arg(
        long,
        global = true,
        env = "CLA_HUB_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub token: Option<Secret>,
    /// With --hub on https: the SHA-256 fingerprint of the hub's certificate to trust (as `serve` logs it).
    #[arg(long, global = true, env = "CLA_HUB_PIN", value_name = "SHA256")]
    pub pin: Option<String>,
    /// With --hub on https: trust certificates issued by the CA(s) in this PEM file instead of a pin.
    #[arg(long, global = true, env = "CLA_HUB_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The exit codes, for `--help` (docs/operations.md has the same table).
pub const EXIT_CODES: &str = "\
Exit codes of the job commands (exec, eval, ship, fetch, run, job show --wait, job logs --follow):
  0        the job succeeded
  1-123    the remote command's own exit status (exec), or an error cla-hub printed (1)
  2        the command line could not be used
  124      the job hit its --timeout (its process tree was killed)
  130      cancelled (Ctrl-C, `cla-hub job cancel`)
  252      no registered worker can match the target (unknown id, tags or env): nothing was queued
  253      no worker started the job within --queue-timeout
  254      lost the connection to the hub and could not get it back (--reconnect-for); the job goes on
  255      the command could not be run on the worker, or the job was lost";

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub.
    #[command(after_help = "Examples:
  cla-hub serve                                    # 127.0.0.1:8780, plain HTTP, for this machine
  cla-hub serve --tls --listen 0.0.0.0:8780        # over the network: TLS, a self-signed certificate kept
  cla-hub serve --listen 0.0.0.0:8780 --cert hub.crt --key hub.key   # your own certificate")]
    Serve(ServeArgs),
    /// Manage project passkeys (what workers register with).
    #[command(subcommand)]
    Passkey(PasskeyCommand),
    /// List registered workers and their state.
    #[command(after_help = "Examples:
  cla-hub workers
  cla-hub workers --json | jq -r '.[] | select(.state == \"offline\") | .id'")]
    Workers,
    /// Control a worker from here: drain, disable, enable, shutdown, unregister it, or rotate its token.
    #[command(after_help = "Examples:
  cla-hub worker disable web-1         # no new jobs until `enable`
  cla-hub worker unregister web-1      # forget it (also the way out when its config is lost)
  cla-hub worker rotate web-1 --overlap 10m")]
    Worker {
        #[arg(value_enum)]
        action: ActionArg,
        /// The worker id (see `cla-hub workers`).
        id: String,
        /// rotate: how long the old token stays valid after the new one is sent, if the worker does not
        /// confirm saving it (e.g. 90s, 1h; default 1h).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        overlap: Option<Duration>,
    },
    /// Run a command on a worker and stream its output; exits with the command's exit code.
    #[command(after_help = "Examples:
  cla-hub exec --tags web -- 'systemctl restart nginx && echo ok'   # one string: through sh -c
  cla-hub exec --worker web-1 -- ls -la /var/log                   # several words: argv, no shell
  cla-hub exec --tags web --env prod --timeout 60 -- ./migrate.sh
  cla-hub exec --tags web --setenv RELEASE=1.4.2 -- ./deploy.sh
  JOB=$(cla-hub exec --tags web --detach -- make release) && cla-hub job logs \"$JOB\" --follow

The exit codes are listed in `cla-hub --help`.")]
    Exec(ExecArgs),
    /// Evaluate JavaScript on a worker; prints the result as JSON.
    #[command(after_help = "Examples:
  cla-hub eval --tags web '1 + 1'
  cla-hub eval --worker web-1 --stash '{\"dir\": \"/etc\"}' --json 'cla.listDir(stash.dir).length'
  cla-hub eval --tags web --file check.js")]
    Eval(EvalArgs),
    /// Send a file or directory to a worker: verified (SHA-256) and atomic on the worker.
    #[command(after_help = "Examples:
  cla-hub ship --tags web ./dist /opt/app/        # -> /opt/app/dist on the worker
  cla-hub ship --worker web-1 app.tar.gz /tmp/    # -> /tmp/app.tar.gz")]
    Ship(ShipArgs),
    /// Bring a file or directory back from a worker: verified (SHA-256) and atomic here.
    #[command(after_help = "Examples:
  cla-hub fetch --worker web-1 /var/log/nginx ./logs/    # -> ./logs/nginx
  cla-hub fetch --worker web-1 /etc/hosts ./hosts.web-1")]
    Fetch(FetchArgs),
    /// List jobs, newest first.
    #[command(after_help = "Examples:
  cla-hub jobs                               # the newest 50
  cla-hub jobs --worker web-1 --since 2h
  cla-hub jobs --state failed -o wide
  cla-hub jobs -q --state queued | xargs -n1 cla-hub job cancel")]
    Jobs(JobsArgs),
    /// Look at, follow or cancel one job (an id, or a unique start of one, as `cla-hub jobs` shows).
    #[command(subcommand)]
    Job(JobCommand),
    /// Run a rulebook (YAML steps: shell, ship, fetch, eval, ...) against the connected workers.
    #[command(after_help = "Examples:
  cla-hub run docs/examples/hello.yml --var who=ops
  cla-hub run release.yml --check            # parse and check it, run nothing
  cla-hub run release.yml --var version=1.4.2 --json")]
    Run(super::rulebook::RunArgs),
    /// Start an embedded hub and a local worker, run a few commands, clean up.
    #[command(after_help = "Example:
  cla-hub demo          # needs nothing else: the hub and the worker live in this process")]
    Demo,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:
  cla-hub completions bash > /etc/bash_completion.d/cla-hub
  cla-hub completions zsh > \"${fpath[1]}/_cla-hub\"")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff); with --dir, write it and one page per subcommand there.
    #[command(after_help = "Examples:
  cla-hub man | man -l -
  sudo cla-hub man --dir /usr/share/man/man1      # cla-hub.1, cla-hub-exec.1, ...")]
    Man {
        /// Write cla-hub.1 and a page for every subcommand (cla-hub-exec.1, ...) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// What `cla-hub worker` does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ActionArg {
    /// Take no new jobs, let the running ones finish, then exit (code 0).
    Drain,
    /// Stay connected but get no jobs until `enable` (kept across restarts).
    Disable,
    /// Take jobs again after `disable`.
    Enable,
    /// Exit now with code 10; running jobs are cancelled.
    Shutdown,
    /// Delete the registration; a connected worker removes it from its config and exits.
    Unregister,
    /// Give the worker a new token, which it saves into its config file; the old one then stops working.
    Rotate,
}

impl From<ActionArg> for WorkerAction {
    fn from(a: ActionArg) -> Self {
        match a {
            ActionArg::Drain => WorkerAction::Drain,
            ActionArg::Disable => WorkerAction::Disable,
            ActionArg::Enable => WorkerAction::Enable,
            ActionArg::Shutdown => WorkerAction::Shutdown,
            ActionArg::Unregister => WorkerAction::Unregister,
            ActionArg::Rotate => WorkerAction::Rotate,
        }
    }
}

#[derive(Debug, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8780", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Seconds between pings; a worker silent for 3 of them is marked OFFLINE.
    #[arg(long, default_value_t = 5, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat: u64,
    /// Seconds the jobs of a disconnected worker wait for it to come back (and resume them) before they
    /// are marked lost.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=604800))]
    pub lost_after: u64,
    /// After a restart, seconds a queued job that a client was streaming (`exec`) waits for that client
    /// to re-attach before it is cancelled; it is not started meanwhile.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub client_grace: u64,
    /// Seconds a worker has to accept or refuse an offered job before it is offered elsewhere.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub offer_lease: u64,
    /// Worker handshakes handled at once; more are asked to come back in a few seconds (a restarted
    /// hub with a large fleet sheds the reconnect storm).
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub max_handshakes: u64,
    /// Seconds a client has to send a request's head (request line and headers), on a new connection
    /// and between requests on a kept-alive one; slower ones are closed.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_timeout: u64,
    /// Connections that have not authenticated yet, held at once from all sources; at the cap the
    /// oldest is closed. Default: a quarter of the open file limit, at most 8192.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000000))]
    pub max_pending: Option<u64>,
    /// Connections that have not authenticated yet, held at once from one source address; at the cap
    /// that source's oldest is closed. Default: a quarter of --max-pending, at most 1024.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000000))]
    pub max_pending_per_source: Option<u64>,
    /// Serve HTTPS/WSS. Without --cert/--key, a self-signed certificate is made once in DATA_DIR/tls/
    /// and kept; workers pin its fingerprint when they register.
    #[arg(long)]
    pub tls: bool,
    /// Failed registrations (wrong or revoked passkey, bad request) allowed per source address and
    /// minute; past it the source gets HTTP 429 with a retry_after. 0 turns the limit off.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub register_limit: u32,
    /// Require mutual TLS: workers must present the client certificate the hub issued when they
    /// registered (over https); implies --tls.
    #[arg(long)]
    pub mtls: bool,
    /// The certificate chain (PEM) to serve; implies --tls.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// An extra name (host name or IP address) for the self-signed certificate (repeatable); used only
    /// when the certificate is made.
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PasskeyCommand {
    /// Create a passkey for a project; prints it alone on stdout (it is shown only this once).
    #[command(after_help = "Example:
  KEY=$(cla-hub passkey create --project shop)
  cla-worker register --url http://HUB:8780 --passkey \"$KEY\" --id web-1 --tags linux,web --save")]
    Create {
        /// The project the passkey registers workers into.
        #[arg(long)]
        project: String,
    },
    /// List passkeys (by prefix; the hub keeps only their hashes).
    #[command(after_help = "Example:
  cla-hub passkey list --json")]
    List,
    /// Revoke a passkey, given whole or by a unique prefix of at least 8 characters.
    #[command(after_help = "Example:
  cla-hub passkey list
  cla-hub passkey revoke 3f9a1c2e         # the prefix `passkey list` shows")]
    Revoke {
        /// The passkey, or a unique prefix of at least 8 characters (as `passkey list` shows).
        passkey: String,
    },
}

/// Where a job runs (`exec`, `eval`, `ship`, `fetch`).
#[derive(Debug, ClapArgs)]
pub struct TargetArgs {
    /// Run on this worker.
    #[arg(long, conflicts_with = "tags", value_name = "ID")]
    pub worker: Option<String>,
    /// Run on a worker carrying all these tags (comma-separated).
    #[arg(long, value_name = "A,B")]
    pub tags: Vec<String>,
    /// Only on a worker serving this environment.
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// Give up when no matching worker has started the job within this many seconds (exit 253). Without
    /// it the job waits in the hub's queue until a matching worker is free or connects. A target that
    /// no registered worker has fails at once (exit 252).
    #[arg(long, value_name = "SECS")]
    pub queue_timeout: Option<f64>,
}

#[derive(Debug, ClapArgs)]
pub struct ExecArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Kill the command's process tree after this many seconds (exit 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Directory on the worker to run in.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Set an environment variable for the command (repeatable).
    #[arg(long = "setenv", value_name = "KEY=VALUE")]
    pub setenv: Vec<String>,
    /// Queue the job and print its id instead of waiting.
    #[arg(long)]
    pub detach: bool,
    /// Cancel the command when its worker has been disconnected from the hub this many seconds (by
    /// default it keeps running and its output is delivered when the worker reconnects).
    #[arg(long, value_name = "SECS")]
    pub cancel_after_disconnect: Option<u64>,
    /// When the connection to the hub drops, keep reconnecting for this many seconds to follow the job
    /// on; then give up with exit 254, printing how to follow it (the job goes on).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub reconnect_for: u64,
    /// The command: one string runs through the worker's shell, several words run as argv.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct ShipArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Fail when the destination's parent directory does not exist, instead of creating it.
    #[arg(long)]
    pub no_mkdir: bool,
    /// The local file or directory.
    #[arg(value_name = "LOCAL")]
    pub local: PathBuf,
    /// The destination on the worker (relative to its workdir). A file goes into REMOTE when it is a
    /// directory or ends with `/`; a directory's contents go to REMOTE (merged if it exists), or to
    /// REMOTE/NAME when REMOTE ends with `/`.
    #[arg(value_name = "REMOTE")]
    pub remote: String,
}

#[derive(Debug, ClapArgs)]
pub struct FetchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Fail when the destination's parent directory does not exist, instead of creating it.
    #[arg(long)]
    pub no_mkdir: bool,
    /// The file or directory on the worker (relative to its workdir).
    #[arg(value_name = "REMOTE")]
    pub remote: String,
    /// Where it goes here (same rules as ship's REMOTE).
    #[arg(value_name = "LOCAL")]
    pub local: String,
}

#[derive(Debug, ClapArgs)]
pub struct EvalArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The `stash` global, as JSON (default `{}`); printed back, changed, with --json.
    #[arg(long, value_name = "JSON")]
    pub stash: Option<String>,
    /// Stop the script after this many seconds (default 30; exit 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Read the code from this file.
    #[arg(long, short, value_name = "FILE", conflicts_with = "code")]
    pub file: Option<PathBuf>,
    /// The code; `-` reads it from stdin.
    pub code: Option<String>,
}

#[derive(Debug, ClapArgs)]
pub struct JobsArgs {
    /// Only jobs in this state (queued, running, succeeded, failed, ...).
    #[arg(long)]
    pub state: Option<JobState>,
    /// Only jobs that ran (or run) on this worker.
    #[arg(long, value_name = "ID")]
    pub worker: Option<String>,
    /// Only jobs created within this long (30m, 2h, 7d) or since this time (2026-12-07T10:00:00Z).
    #[arg(long, value_name = "AGE|TIME")]
    pub since: Option<String>,
    /// At most this many jobs, newest first; 0 lists them all.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub limit: usize,
    /// How to print the list: a table, a wide table (times and whole notes), JSON or YAML.
    #[arg(long, short, value_enum, value_name = "FORMAT")]
    pub output: Option<Output>,
    /// Print the table without its header line.
    #[arg(long)]
    pub no_headers: bool,
    /// Print only the job ids, one per line (for scripts: `cla-hub jobs -q --state queued`).
    #[arg(long, short)]
    pub quiet: bool,
}

/// How a listing is printed (`--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show a job, with its captured output.
    #[command(after_help = "Examples:
  cla-hub job show 1a2512fc0c69            # a unique start of the id is enough
  cla-hub job show \"$JOB\" --wait --json")]
    Show {
        /// The job id (see `cla-hub jobs`).
        id: String,
        /// Block until the job has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a job (a running one has its process tree killed).
    #[command(after_help = "Example:
  cla-hub job cancel 1a2512fc0c69")]
    Cancel {
        /// The job id (see `cla-hub jobs`).
        id: String,
    },
    /// Print a job's output as the hub stored it (stdout to stdout, stderr to stderr); with --follow,
    /// then its live output until it ends, exiting with its exit code.
    #[command(after_help = "Examples:
  cla-hub job logs 1a2512fc0c69
  cla-hub job logs \"$JOB\" --follow        # Ctrl-C stops following; the job goes on")]
    Logs {
        /// The job id (see `cla-hub jobs`).
        id: String,
        /// Follow a job that is still running, as `exec` would have (reconnecting if the hub restarts).
        #[arg(short, long)]
        follow: bool,
    },
}

/// The command line as clap sees it.
pub fn command() -> clap::Command {
    command_with(true)
}

/// [`command`]; without `help` subcommands for the man pages (one page each would only repeat the
/// others).
fn command_with(help_subcommands: bool) -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Args::command();
    if !help_subcommands {
        cmd = cmd.disable_help_subcommand(true);
        for sub in ["passkey", "job"] {
            cmd = cmd.mut_subcommand(sub, |s| s.disable_help_subcommand(true));
        }
    }
    cmd
}

/// Parses the process's arguments (exits with the usage message on an error, as clap does).
pub fn parse() -> Args {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Runs the command line.
pub fn run(args: Args) -> Result<ExitCode> {
    // Neither needs a hub nor a runtime.
    match &args.command {
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command(), "cla-hub", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            return Ok(ExitCode::Success);
        }
        Command::Man { dir } => {
            let cmd = command_with(false);
            match dir {
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
                Some(dir) => std::fs::create_dir_all(dir)
                    .and_then(|()| clap_mangen::generate_to(cmd, dir))
                    .map_err(|e| {
                        Error::Other(format!("cannot write the man pages into {}: {e}", dir.display()))
                    })?,
            }
            return Ok(ExitCode::Success);
        }
        _ => {}
    }
    // A transfer's disk work and hashing run on a blocking thread; one thread for its network side moves
    // the data with fewer hand-offs than a pool (measured: docs/benchmarks.md).
    let rt = if matches!(
        args.command,
        Command::Ship(_) | Command::Fetch(_) | Command::Run(_)
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    rt.block_on(execute(args))
}

async fn execute(args: Args) -> Result<ExitCode> {
    // The hub logs at info; an admin command only warns unless asked (-v), so that no log line lands
    // in a command's output.
    match args.command {
        Command::Serve(_) => cla_common::logging::init(args.verbose),
        Command::Demo => {}
        _ => cla_common::logging::init_from("warn", args.verbose),
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let trust = cla_common::tls::Trust::from_options(args.pin.as_deref(), args.ca.as_deref())?;
    let client = || {
        AdminClient::locate(args.hub.as_deref(), args.token.clone(), trust.clone(), &data_dir)
            .map_err(Error::from)
    };
    let json = args.json;
    match args.command {
        Command::Serve(a) => serve(a, data_dir.clone()).await,
        Command::Passkey(p) => passkey(&client()?, p, json).await,
        Command::Workers => workers(&client()?, json).await,
        Command::Worker { action, id, overlap } => {
            if overlap.is_some() && !matches!(action, ActionArg::Rotate) {
                return Err(Error::Usage("--overlap goes with `worker rotate` only".into()));
            }
            let req = cla_protocol::api::WorkerActionRequest {
                overlap_secs: overlap.map(|d| d.as_secs().max(1)),
            };
            let done = client()?.worker_action(&id, action.into(), &req).await?;
            if json {
                print_json(&done)?;
            } else {
                println!("{}", done.message);
            }
            Ok(ExitCode::Success)
        }
        Command::Exec(a) => {
            let spec = jobs::exec_spec(&a)?;
            let reconnect_for = Duration::from_secs(a.reconnect_for);
            jobs::exec(&client()?, spec, a.detach, reconnect_for, json).await
        }
        Command::Eval(a) => {
            let spec = jobs::eval_spec(&a)?;
            jobs::eval(&client()?, spec, json).await
        }
        Command::Ship(a) => super::transfer::ship_cmd(&client()?, a, json).await,
        Command::Fetch(a) => super::transfer::fetch_cmd(&client()?, a, json).await,
        Command::Jobs(a) => jobs::list(&client()?, a, json).await,
        Command::Job(j) => jobs::job(&client()?, j, json).await,
        Command::Run(a) => super::rulebook::run_cmd(client, a, json).await,
        Command::Demo => super::demo::run(args.verbose).await,
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled in `run`"),
    }
}

async fn serve(a: ServeArgs, data_dir: PathBuf) -> Result<ExitCode> {
    let listener = cla_hub_core::listener::bind(a.listen)
        .map_err(|e| Error::Other(format!("cannot listen on {}: {e}", a.listen)))?;
    let mut cfg = HubConfig::new(data_dir);
    cfg.heartbeat = Duration::from_secs(a.heartbeat);
    cfg.lost_after = Duration::from_secs(a.lost_after);
    cfg.client_grace = Duration::from_secs(a.client_grace);
    cfg.offer_lease = Duration::from_secs(a.offer_lease);
    cfg.max_handshakes = a.max_handshakes as usize;
    cfg.register_failures_per_minute = a.register_limit;
    cfg.header_timeout = Duration::from_secs(a.header_timeout);
    cfg.pending_connections = match (a.max_pending, a.max_pending_per_source) {
        (None, None) => None,
        (total, per_source) => {
            let limits = cla_hub_core::gate::GateLimits::for_file_limit(
                cla_common::util::raise_open_file_limit().unwrap_or(16_384),
            );
            let total = total.map_or(limits.total, |n| n as usize);
            let per_source = per_source.map_or((total / 4).clamp(1, 1024), |n| n as usize);
            Some(cla_hub_core::gate::GateLimits { total, per_source })
        }
    };
    if a.tls || a.mtls || a.cert.is_some() {
        cfg.tls = Some(cla_hub_core::TlsOptions {
            cert: a.cert,
            key: a.key,
            names: a.tls_names,
            mtls: a.mtls,
        });
    }
    server::run(listener, cfg, cla_common::shutdown::on_signals()).await?;
    Ok(ExitCode::Success)
}

async fn passkey(c: &AdminClient, cmd: PasskeyCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        PasskeyCommand::Create { project } => {
            let k = c.passkey_create(&project).await?;
            if json {
                print_json(&k)?;
            } else {
                println!("{}", k.passkey);
            }
        }
        PasskeyCommand::List => {
            let keys = c.passkeys().await?;
            if json {
                print_json(&keys)?;
            } else {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            format!("{}…", k.prefix),
                            k.project.clone(),
                            k.created.clone(),
                            if k.revoked { "revoked" } else { "active" }.into(),
                        ]
                    })
                    .collect();
                print_out(&render(&["PASSKEY", "PROJECT", "CREATED", "STATUS"], &rows))?;
            }
        }
        PasskeyCommand::Revoke { passkey } => {
            let k = c.passkey_revoke(&passkey).await?;
            if json {
                print_json(&k)?;
            } else {
                println!("revoked passkey {}… of project {}", k.prefix, k.project);
            }
        }
    }
    Ok(ExitCode::Success)
}

/// Prints the workers table (also used by the demo).
pub(crate) async fn workers(c: &AdminClient, json: bool) -> Result<ExitCode> {
    let ws = c.workers().await?;
    if json {
        print_json(&ws)?;
        return Ok(ExitCode::Success);
    }
    let rows: Vec<_> = ws
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.state.label().to_owned(),
                match w.transfers {
                    0 => format!("{}/{}", w.running, w.capacity),
                    n => format!("{}/{} +{n} transfers", w.running, w.capacity),
                },
                or_dash(w.tags.join(",")),
                or_dash(w.envs.join(",")),
                or_dash(w.host.clone().unwrap_or_default()),
                or_dash(w.version.clone().unwrap_or_default()),
                or_dash(w.last_seen.clone().unwrap_or_default()),
                w.projects.join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "ID",
                "STATE",
                "RUNNING",
                "TAGS",
                "ENVS",
                "HOST",
                "VERSION",
                "LAST SEEN",
                "PROJECTS"
            ],
            &rows
        )
    );
    Ok(ExitCode::Success)
}
