//! `cla-hub demo`: the README's main job. Starts an embedded hub on a loopback port in a temp dir,
//! creates a passkey, registers a worker and saves it to a config file, runs that worker in-process, then
//! drives a few jobs through the real admin API and prints what happens. Everything is removed at the end.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use cla_client::{AdminClient, ExecEvent};
use cla_common::exit::ExitCode;
use cla_common::secret::Secret;
use cla_config::{self as config, Overrides, Registration, save};
use cla_hub_core::{HubConfig, server};
use cla_protocol::CommandLine;
use cla_protocol::api::{EvalTask, JobSpec, Target, Task, WorkerState};
use cla_worker_core::registration::{RegisterParams, register};
use cla_worker_core::{RunOptions, run as run_worker};

fn step(s: &str) {
    println!("\n==> {s}");
}

/// Runs the demo.
pub async fn run(verbose: u8) -> Result<ExitCode> {
    cla_common::logging::init_from("warn", verbose);
    let tmp = tempfile::Builder::new().prefix("cla-demo-").tempdir()?;
    let data_dir = tmp.path().join("hub");
    let shutdown = CancellationToken::new();

    step(&format!(
        "starting an embedded hub (data in {})",
        data_dir.display()
    ));
    let listener = cla_hub_core::listener::bind(([127, 0, 0, 1], 0).into())?;
    let addr = listener.local_addr()?;
    let hub_task = tokio::spawn(server::run(
        listener,
        HubConfig::new(data_dir.clone()),
        shutdown.clone(),
    ));
    let hub_json = data_dir.join("hub.json");
    wait_for("the hub to write hub.json", || async { hub_json.exists() }).await?;
    let admin = AdminClient::locate(None, None, Default::default(), &data_dir)?;
    println!("    hub listening on http://{addr}");

    // The worker stops first (it drains), then the hub: no reconnect attempts on the way out.
    let worker_stop = CancellationToken::new();
    let mut worker_task = None;
    let result = drive(&admin, tmp.path(), &worker_stop, &mut worker_task).await;
    worker_stop.cancel();
    if let Some(t) = worker_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    step("shutting down the worker and the hub, removing the temp dir");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), hub_task).await;
    drop(tmp);
    result?;
    println!("    done. Next: README.md has the 5-minute tour with real processes.");
    Ok(ExitCode::Success)
}

async fn drive(
    admin: &AdminClient,
    dir: &std::path::Path,
    shutdown: &CancellationToken,
    worker_task: &mut Option<tokio::task::JoinHandle<Result<()>>>,
) -> Result<()> {
    step("$ cla-hub passkey create --project demo");
    let key = admin.passkey_create("demo").await?;
    println!(
        "    {}…  (the whole passkey is shown once; the hub keeps only its hash)",
        &key.passkey[..14]
    );

    // `build` and `web` are the tags the example rulebook targets.
    let tags: Vec<String> = ["demo", std::env::consts::OS, "build", "web"]
        .map(str::to_owned)
        .to_vec();
    step(&format!(
        "$ cla-worker register --url {} --passkey … --id demo-worker --tags {} --save",
        admin.url(),
        tags.join(",")
    ));
    let params = RegisterParams {
        url: admin.url().to_owned(),
        passkey: Secret::new(key.passkey),
        id: Some("demo-worker".into()),
        tags: tags.clone(),
        envs: vec!["DEV".into()],
        token: None,
        trust: Default::default(),
        csr: None,
    };
    let reg = register(&params).await?;
    let config_path = dir.join("cla-worker.yml");
    save::save_registration(
        &config_path,
        &Registration {
            id: reg.id.clone(),
            token: Some(Secret::new(reg.token)),
            url: Some(admin.url().to_owned()),
            tags,
            envs: vec!["DEV".into()],
            pin: None,
            ca: None,
            cert: None,
            key: None,
        },
    )?;
    println!(
        "    registered {} in project(s) {}; token saved to {} (mode 0600)",
        reg.id,
        reg.projects.join(","),
        config_path.display()
    );

    step("$ cla-worker run   (in-process here; a real install runs it as a service)");
    let loaded = config::load(Some(&config_path), false, true)?;
    let settings = config::resolve(
        &loaded,
        &Overrides {
            capacity: Some(2),
            // The demo's own spool, removed with its temp dir.
            spool_dir: config_path.parent().map(|d| d.join("spool")),
            ..Default::default()
        },
    )?;
    let worker = run_worker(settings, RunOptions::default(), shutdown.child_token());
    *worker_task = Some(tokio::spawn(async move { worker.await.map_err(Error::from) }));
    wait_for("the worker to connect", || async {
        admin.workers().await.is_ok_and(|ws| {
            ws.iter()
                .any(|w| w.id == "demo-worker" && w.state == WorkerState::Idle)
        })
    })
    .await?;

    step("$ cla-hub workers");
    super::hub::workers(admin, false).await?;

    let by_tag = |cmd: CommandLine, timeout: Option<f64>| JobSpec {
        target: Target {
            worker: None,
            tags: vec!["demo".into()],
            env: None,
            queue_timeout_secs: None,
        },
        task: Task::Exec(cmd),
        workdir: None,
        env_vars: Default::default(),
        timeout_secs: timeout,
        on_disconnect: Default::default(),
    };
    let shell = |s: &str| CommandLine::Shell { cmd: s.to_owned() };
    let runs = [
        (
            "a shell command, with the job's environment",
            by_tag(
                shell("echo \"hello from $CLA_WORKER_ID, job $CLA_JOB_ID\"; uname -sm"),
                None,
            ),
        ),
        (
            "stdout and stderr stay apart; the exit code comes back",
            by_tag(shell("echo to stdout; echo to stderr >&2; exit 3"), None),
        ),
        (
            "argv form (no shell): the words arrive as they are",
            by_tag(
                CommandLine::Argv {
                    argv: vec![
                        "printf".into(),
                        "%s|".into(),
                        "a b".into(),
                        "$HOME".into(),
                        "*".into(),
                    ],
                },
                None,
            ),
        ),
        (
            "output streams live, line by line",
            by_tag(shell("for i in 1 2 3; do echo tick $i; sleep 0.3; done"), None),
        ),
        (
            "a timeout kills the whole process tree (exit 124)",
            by_tag(shell("sleep 60 & sleep 60"), Some(1.0)),
        ),
    ];
    for (what, spec) in runs {
        step(&format!(
            "{what}\n$ cla-hub exec --tags demo{} -- {}",
            spec.timeout_secs
                .map(|t| format!(" --timeout {t}"))
                .unwrap_or_default(),
            quoted(&spec.task)
        ));
        let t0 = Instant::now();
        let record = admin
            .exec(
                &spec,
                CancellationToken::new(),
                cla_client::RECONNECT_FOR,
                |ev| match ev {
                    ExecEvent::Stdout(b) => super::print_prefixed("    out| ", &b),
                    ExecEvent::Stderr(b) => super::print_prefixed("    err| ", &b),
                    _ => {}
                },
            )
            .await?;
        let code = super::jobs::exit_code(&record);
        println!(
            "    [{} on {}, exit {}, {} ms{}]",
            record.state.as_str(),
            record.worker.as_deref().unwrap_or("-"),
            code.code(),
            t0.elapsed().as_millis(),
            record
                .error
                .as_deref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        );
    }

    let script = "const entries = cla.listDir('/');\n\
                  console.log(`${cla.worker.id} sees ${entries.length} entries in /`);\n\
                  stash.visits = (stash.visits || 0) + 1;\n\
                  ({ worker: cla.worker.id, kernel: cla.run(['uname', '-r']).stdout.trim(), dirs: entries.filter(e => e.type === 'dir').length })";
    step(&format!(
        "JavaScript on the worker (boa), with a stash and the host API\n$ cla-hub eval --tags demo --stash '{{\"visits\": 41}}' --json '…'\n{}",
        script
            .lines()
            .map(|l| format!("    js| {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    let spec = JobSpec {
        task: Task::Eval(EvalTask {
            code: script.to_owned(),
            stash: serde_json::json!({"visits": 41}),
        }),
        ..by_tag(shell("true"), None)
    };
    let record = admin
        .exec(&spec, CancellationToken::new(), cla_client::RECONNECT_FOR, |ev| {
            if let ExecEvent::Stdout(b) = ev {
                super::print_prefixed("    console| ", &b)
            }
        })
        .await?;
    match &record.eval {
        Some(out) => println!(
            "    result: {}\n    stash:  {}{}",
            out.result,
            out.stash,
            out.error
                .as_ref()
                .map(|e| format!("\n    error:  {}", e.message))
                .unwrap_or_default()
        ),
        None => println!(
            "    [{}: {}]",
            record.state.as_str(),
            record.error.as_deref().unwrap_or("")
        ),
    }

    // Ship a small release to the worker and fetch it back: both sides verify every file's SHA-256.
    let release = dir.join("release");
    std::fs::create_dir_all(release.join("bin"))?;
    std::fs::write(release.join("VERSION"), "1.4.2\n")?;
    std::fs::write(release.join("bin/start.sh"), "#!/bin/sh\nexec ./app \"$@\"\n")?;
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(release.join("bin/app"), blob)?;
    #[cfg(unix)]
    for f in ["bin/start.sh", "bin/app"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(release.join(f), std::fs::Permissions::from_mode(0o755))?;
    }
    let remote = dir.join("worker-disk/opt/app/");
    let remote_s = remote.display().to_string();
    step(&format!(
        "$ cla-hub ship --tags demo {} {remote_s}",
        release.display()
    ));
    let tags = by_tag(shell("true"), None).target;
    let t0 = Instant::now();
    let shipped = cla_client::ship(
        admin,
        tags.clone(),
        release.clone(),
        remote_s.clone(),
        true,
        CancellationToken::new(),
        |_| {},
    )
    .await?;
    let shipped_digest = report_transfer("ship", release.display().to_string(), &shipped, t0);
    let back = dir.join("fetched/");
    let there = remote.join("release").display().to_string();
    step(&format!("$ cla-hub fetch --tags demo {there} {}", back.display()));
    let t0 = Instant::now();
    let fetched = cla_client::fetch(
        admin,
        tags,
        there.clone(),
        back.display().to_string(),
        true,
        CancellationToken::new(),
        |_| {},
    )
    .await?;
    let fetched_digest = report_transfer("fetch", there, &fetched, t0);
    let same_meta = ["VERSION", "bin/start.sh", "bin/app"].iter().all(|f| {
        let meta = |root: &std::path::Path| {
            std::fs::metadata(root.join(f))
                .ok()
                .map(|m| (m.len(), m.modified().ok(), m.permissions()))
        };
        meta(&release).is_some() && meta(&release) == meta(&dir.join("fetched/release"))
    });
    if shipped_digest.is_some() && shipped_digest == fetched_digest && same_meta {
        println!(
            "    the round trip is exact: the same manifest SHA-256 on both sides, and sizes, modes and mtimes match"
        );
    }

    rulebook(admin, dir).await?;

    step("$ cla-hub exec --detach …  then  cla-hub job show ID --wait");
    let job = admin
        .submit(&by_tag(shell("sleep 0.2; echo detached work done"), None))
        .await?;
    println!("    queued {}", job.id);
    let done = admin.wait(&job.id, cla_client::RECONNECT_FOR).await?;
    println!(
        "    {} → {}, stdout: {:?}",
        done.id,
        done.state.as_str(),
        done.stdout.trim()
    );

    step("$ cla-hub jobs");
    for line in super::jobs::table(&admin.jobs(&Default::default()).await?).lines() {
        println!("    {line}");
    }
    Ok(())
}

/// The example rulebook docs/examples/release.yml (built into the binary), run against the demo worker:
/// build, fetch the artifact, ship it, smoke-test, fetch the report, check it in JavaScript.
async fn rulebook(admin: &AdminClient, dir: &std::path::Path) -> Result<()> {
    const FILE: &str = "docs/examples/release.yml";
    let book = cla_rulebook::Rulebook::parse(FILE, include_str!("../../../../docs/examples/release.yml"))
        .map_err(|e| Error::Other(e.to_string()))?;
    let work = dir.join("worker-disk/release");
    let here = dir.join("hub-side");
    step(&format!(
        "A rulebook: build on a `build` worker, bring the artifact back, ship it to a `web` worker,\n\
         smoke-test it, fetch the report, check it in JavaScript\n\
         $ cla-hub run {FILE} --var work={} --var here={}",
        work.display(),
        here.display()
    ));
    let opts = cla_rulebook::run::Options {
        vars: vec![
            ("work".into(), work.display().to_string()),
            ("here".into(), here.display().to_string()),
        ],
        ..Default::default()
    };
    let mut reporter = super::rulebook::Plain::with_prefix("    ");
    let report = cla_rulebook::run::run(admin, &book, opts, &mut reporter).await;
    super::rulebook::conclude(&report, false)?;
    if !report.ok {
        return Err(Error::Other(format!(
            "the example rulebook failed: {}",
            report.error.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Prints a transfer job's summary line (or why it failed); its digest when it succeeded.
fn report_transfer(
    direction: &'static str,
    from: String,
    record: &cla_protocol::api::JobRecord,
    t0: Instant,
) -> Option<String> {
    match &record.transfer {
        Some(s) if record.state == cla_protocol::api::JobState::Succeeded => {
            let r = super::transfer::Report::new(direction, record, from, s, t0.elapsed());
            println!("    {}", r.line());
            Some(s.sha256.clone())
        }
        _ => {
            println!(
                "    [{}: {}]",
                record.state.as_str(),
                record.error.as_deref().unwrap_or("")
            );
            None
        }
    }
}

fn quoted(t: &Task) -> String {
    match t {
        Task::Exec(CommandLine::Shell { cmd }) => format!("'{cmd}'"),
        Task::Eval(e) => format!("'{}'", e.code),
        Task::Ship(_) | Task::Fetch(_) => t.display(),
        Task::Exec(CommandLine::Argv { argv }) => argv
            .iter()
            .map(|a| {
                if a.contains([' ', '$', '*', '|', '%']) {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Polls `check` every 50 ms for up to 15 s.
async fn wait_for<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::Other(format!("timed out waiting for {what}")))
}
