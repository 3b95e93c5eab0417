//! `cla-worker service ...` (Windows): the worker as a Windows service, through the Service Control
//! Manager. `install` records `cla-worker -c CONFIG service run` as an automatically started service
//! that the SCM restarts after a crash; `run` is what the SCM starts: the same worker as `cla-worker run`,
//! logging to its logfile, whose Stop (or the machine's shutdown) drains jobs like Ctrl-C does.
//! (Linux uses systemd and macOS launchd: see `packaging/` and docs/install.md.)

use std::ffi::OsString;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Args as ClapArgs, Subcommand};
use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod, ServiceInfo,
    ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use super::worker::RunArgs;
use crate::error::{Error, Result};
use cla_common::exit::ExitCode;
use cla_config::LoadedConfig;

/// The service verbs.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Install the worker as a service started at boot (run as LocalSystem unless --user is given).
    Install(InstallArgs),
    /// Stop and remove the service.
    Uninstall(NameArg),
    /// Start the installed service.
    Start(NameArg),
    /// Stop the service: running jobs get the drain timeout, then it exits.
    Stop(NameArg),
    /// What the Service Control Manager runs (not for use by hand).
    #[command(hide = true)]
    Run {
        #[command(flatten)]
        name: NameArg,
        #[command(flatten)]
        run: Box<RunArgs>,
    },
}

#[derive(Debug, ClapArgs)]
pub struct NameArg {
    /// The service name (several workers can be installed under different names).
    #[arg(long, default_value = "cla-worker")]
    pub name: String,
}

#[derive(Debug, ClapArgs)]
pub struct InstallArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The account the service runs as (e.g. `.\deploy`); default LocalSystem.
    #[arg(long)]
    pub user: Option<String>,
    /// The account's password (with --user).
    #[arg(
        long,
        env = "CLA_WORKER_SERVICE_PASSWORD",
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
    /// Install it, but start it only by hand (`cla-worker service start`).
    #[arg(long)]
    pub manual: bool,
}

const TYPE: ServiceType = ServiceType::OWN_PROCESS;

fn scm(e: windows_service::Error, what: &str, name: &str) -> Error {
    let hint = match &e {
        windows_service::Error::Winapi(io) if io.raw_os_error() == Some(5) => {
            " (access denied: run it from an elevated prompt, as Administrator)"
        }
        windows_service::Error::Winapi(io) if io.raw_os_error() == Some(1060) => {
            " (no such service: install it with `cla-worker service install`)"
        }
        windows_service::Error::Winapi(io) if io.raw_os_error() == Some(1073) => {
            " (it is already installed: `cla-worker service uninstall` first, or use --name)"
        }
        _ => "",
    };
    let detail = match &e {
        windows_service::Error::Winapi(io) => io.to_string(),
        other => other.to_string(),
    };
    Error::Other(format!("cannot {what} service `{name}`: {detail}{hint}"))
}

/// Runs a `service` verb.
pub(crate) fn run(cmd: ServiceCommand, loaded: &LoadedConfig, verbose: u8) -> Result<ExitCode> {
    match cmd {
        ServiceCommand::Install(a) => install(a, loaded, verbose),
        ServiceCommand::Uninstall(n) => uninstall(&n.name),
        ServiceCommand::Start(n) => control(&n.name, true),
        ServiceCommand::Stop(n) => control(&n.name, false),
        ServiceCommand::Run { name, run } => serve(name.name, *run, loaded),
    }
}

fn install(a: InstallArgs, loaded: &LoadedConfig, verbose: u8) -> Result<ExitCode> {
    let name = a.name.name;
    // The service must find the same config whatever its working directory: an absolute path.
    let config = loaded.path.clone().ok_or_else(|| {
        Error::Usage(
            "service install needs a config file with a registration: run `cla-worker register --save` first"
                .into(),
        )
    })?;
    let config = std::path::absolute(&config).map_err(|e| Error::io(&config, e))?;
    let id = cla_config::resolve_id(loaded, None)?;
    let exe = std::env::current_exe()?;
    let mut launch: Vec<OsString> = vec!["-c".into(), config.clone().into_os_string()];
    launch.extend(std::iter::repeat_n(OsString::from("-v"), verbose.min(2) as usize));
    launch.extend([
        "service".into(),
        "run".into(),
        "--name".into(),
        name.clone().into(),
    ]);
    let info = ServiceInfo {
        name: name.clone().into(),
        display_name: format!("cla-worker ({id})").into(),
        service_type: TYPE,
        start_type: if a.manual {
            ServiceStartType::OnDemand
        } else {
            ServiceStartType::AutoStart
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.clone(),
        launch_arguments: launch,
        dependencies: vec![],
        account_name: a.user.map(Into::into),
        account_password: a.password.map(Into::into),
    };
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .map_err(|e| scm(e, "reach the Service Control Manager to install", &name))?;
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
        .map_err(|e| scm(e, "install", &name))?;
    let _ = service.set_description("Pull agent: connects out to a cla-hub and runs the jobs it is sent");
    // Restarted 5 s after a crash, 30 s after a second one; the count resets after a quiet day.
    let restart = |secs| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(secs),
    };
    if let Err(e) = service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart(5), restart(30), restart(30)]),
    }) {
        tracing::warn!("the service will not be restarted after a crash: {e}");
    }
    super::print_out(&format!(
        "installed service `{name}` for worker {id}\n  runs: {} -c {} service run --name {name}\n  start it with `cla-worker service start{}` (it starts at boot{})\n",
        exe.display(),
        config.display(),
        if name == "cla-worker" {
            String::new()
        } else {
            format!(" --name {name}")
        },
        if a.manual { " only when asked" } else { "" }
    ))?;
    Ok(ExitCode::Success)
}

/// The installed service `name`, opened for `access`.
fn open(name: &str, access: ServiceAccess) -> Result<windows_service::service::Service> {
    ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(|e| scm(e, "reach the Service Control Manager for", name))?
        .open_service(name, access)
        .map_err(|e| scm(e, "open", name))
}

fn uninstall(name: &str) -> Result<ExitCode> {
    let service = open(
        name,
        ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
    )?;
    if service
        .query_status()
        .map(|s| s.current_state != ServiceState::Stopped)
        .unwrap_or(false)
    {
        let _ = service.stop();
        wait_for(&service, ServiceState::Stopped, Duration::from_secs(150));
    }
    service.delete().map_err(|e| scm(e, "remove", name))?;
    super::print_out(&format!("removed service `{name}`\n"))?;
    Ok(ExitCode::Success)
}

fn control(name: &str, start: bool) -> Result<ExitCode> {
    let service = open(
        name,
        ServiceAccess::QUERY_STATUS | ServiceAccess::START | ServiceAccess::STOP,
    )?;
    let (want, verb) = if start {
        service.start::<&str>(&[]).map_err(|e| scm(e, "start", name))?;
        (ServiceState::Running, "started")
    } else {
        service.stop().map_err(|e| scm(e, "stop", name))?;
        (ServiceState::Stopped, "stopped")
    };
    if wait_for(&service, want, Duration::from_secs(150)) {
        super::print_out(&format!("service `{name}` {verb}\n"))?;
        Ok(ExitCode::Success)
    } else {
        Err(Error::Other(format!(
            "service `{name}` did not reach the {want:?} state within 150s; see its logfile"
        )))
    }
}

fn wait_for(service: &windows_service::service::Service, state: ServiceState, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        match service.query_status() {
            Ok(s) if s.current_state == state => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            Err(_) => return false,
        }
    }
    false
}

/// What the SCM-started thread needs (the dispatcher calls a plain function).
static PENDING: Mutex<Option<(String, RunArgs, LoadedConfig)>> = Mutex::new(None);
static OUTCOME: Mutex<Option<Result<ExitCode>>> = Mutex::new(None);

define_windows_service!(ffi_service_main, service_main);

/// Hands the process to the SCM; returns when the service has stopped.
fn serve(name: String, run: RunArgs, loaded: &LoadedConfig) -> Result<ExitCode> {
    *PENDING.lock().expect("not poisoned") = Some((name.clone(), run, loaded.clone()));
    service_dispatcher::start(&name, ffi_service_main).map_err(|e| {
        Error::Other(format!(
            "`service run` is started by the Service Control Manager ({e}); to run in a console use `cla-worker run`"
        ))
    })?;
    OUTCOME
        .lock()
        .expect("not poisoned")
        .take()
        .unwrap_or(Ok(ExitCode::Failure))
}

fn service_main(_args: Vec<OsString>) {
    let Some((name, run, loaded)) = PENDING.lock().expect("not poisoned").take() else {
        return;
    };
    let outcome = run_service(&name, run, &loaded);
    if let Err(e) = &outcome {
        tracing::error!("{e}");
    }
    *OUTCOME.lock().expect("not poisoned") = Some(outcome);
}

fn run_service(name: &str, run: RunArgs, loaded: &LoadedConfig) -> Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handler = move |event| match event {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            tracing::info!("the Service Control Manager asked the worker to stop");
            stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let status = service_control_handler::register(name, handler)
        .map_err(|e| Error::Other(format!("cannot register with the Service Control Manager: {e}")))?;
    let report = |state, code: u32, wait: Duration| {
        let _ = status.set_service_status(ServiceStatus {
            service_type: TYPE,
            current_state: state,
            controls_accepted: if state == ServiceState::Running {
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
            } else {
                ServiceControlAccept::empty()
            },
            exit_code: ServiceExitCode::Win32(code),
            checkpoint: 0,
            wait_hint: wait,
            process_id: None,
        });
    };
    report(ServiceState::Running, 0, Duration::ZERO);
    let drain = Duration::from_secs(run.drain_timeout);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stopping = shutdown.clone();
    let result = rt.block_on(async {
        let watch = async {
            stopping.cancelled().await;
            // Tell the SCM how long the drain may take, so it does not give up on us.
            report(ServiceState::StopPending, 0, drain + Duration::from_secs(10));
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = super::worker::run_worker_until(run, loaded, false, shutdown) => r,
            _ = watch => unreachable!("pending"),
        }
    });
    rt.shutdown_timeout(super::worker::BLOCKING_THREADS_GRACE);
    report(
        ServiceState::Stopped,
        if result.is_ok() { 0 } else { 1 },
        Duration::ZERO,
    );
    result
}
