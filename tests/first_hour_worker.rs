//! A worker's first hour (tokens and config), with the real binaries: `register --save`
//! keeps the token off the terminal, `list` shows what is saved where, the messages of a lost config
//! name the way out, `status`/`stop` see a worker run in a terminal, and SIGHUP reloads what it can and
//! names what needs a restart.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sys::signal::Signal;

use crate::common::*;

/// A `cla-worker` command with its own home and working directory, and no config or token from the
/// environment: only the files a test writes are found.
fn worker_at(home: &Path, cwd: &Path) -> Command {
    let mut c = Command::new(WORKER);
    c.current_dir(cwd)
        .env("HOME", home)
        .env_remove("CLA_WORKER_CONFIG")
        .env_remove("CLA_WORKER_TOKEN")
        .env_remove("CLA_WORKER_PASSKEY");
    c
}

/// A fresh directory under `dir`.
fn mkdir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Writes a config file holding tokens, mode 0600 as `register --save` would.
fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The token saved for `id` in a config file.
fn saved_token(config: &Path, id: &str) -> String {
    let loaded = cla_config::load(Some(config), false, false).unwrap();
    let reg = loaded.file.registrations.iter().find(|r| r.id == id).unwrap();
    reg.token.as_ref().unwrap().expose().to_owned()
}

/// The stderr of a failed command, checked to be one line.
fn one_line_error(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line:\n{err}");
    err
}

#[test]
fn register_save_keeps_the_token_off_the_terminal_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let key = hub.passkey("proj");
    let home = mkdir(dir.path(), "home");
    let register = |id: &str, extra: &[&str]| {
        let out = worker_at(&home, dir.path())
            .args(["register", "--url", &hub.url, "--passkey", &key, "--id", id])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };

    // Saved: the token is in the file (0600) and nowhere on the terminal.
    let config = dir.path().join("a.yml");
    let text = register("a", &["--save", config.to_str().unwrap()]);
    let token = saved_token(&config, "a");
    assert!(token.len() > 20, "{token}");
    assert!(!text.contains(&token), "the saved token was printed:\n{text}");
    assert!(
        text.contains("registered worker a")
            && text.contains(&format!("saved in {}", config.display()))
            && text.contains("--show-token"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Asked for: printed too.
    let config_b = dir.path().join("b.yml");
    let text = register("b", &["--save", config_b.to_str().unwrap(), "--show-token"]);
    let token_b = saved_token(&config_b, "b");
    assert!(text.contains(&format!("token:    {token_b}")), "{text}");

    // Not saved: printed, with the commands that need it, as before (it is shown only this once).
    let text = register("c", &[]);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("token:"))
        .unwrap();
    let token_c = line.split_whitespace().nth(1).unwrap();
    assert!(
        token_c.len() > 20 && text.contains(&format!("--token {token_c}")),
        "{text}"
    );
}

#[test]
fn gitignore_lists_the_config_the_readme_tour_writes() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".gitignore")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for wanted in ["cla-worker.yml", "cla-worker-*.key"] {
        assert!(
            lines.contains(&wanted) || lines.contains(&format!("/{wanted}").as_str()),
            "{wanted} is not in .gitignore:\n{text}"
        );
    }
}

#[test]
fn list_shows_every_config_file_and_which_one_run_uses() {
    let dir = tempfile::tempdir().unwrap();
    let (home, work) = (mkdir(dir.path(), "home"), mkdir(dir.path(), "work"));
    let home_file = home.join("cla-worker.yml");
    let work_file = work.join("cla-worker.yml");
    write_private(
        &home_file,
        "registrations:\n  - id: home-1\n    token: clatk_home_secret_value\n    url: http://127.0.0.1:9\n    tags: [db]\n",
    );
    write_private(
        &work_file,
        "url: http://127.0.0.1:8\nregistrations:\n  - id: w1\n    token: clatk_work_secret_value\n    tags: [linux, web]\n    envs: [QA]\n  - id: w2\n",
    );
    let list = |extra: &[&str]| {
        let out = worker_at(&home, &work).args(extra).arg("list").output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(!text.contains("secret_value"), "a token was printed:\n{text}");
        text
    };

    let text = list(&[]);
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("`{needle}` missing:\n{text}"))
    };
    // ./cla-worker.yml is found first: `run` uses it; the one in $HOME comes after, unused.
    let work_line = at(&format!("{}: used by `cla-worker run`", work_file.display()));
    let home_line = at(&format!("{}: not used", home_file.display()));
    assert!(work_line < home_line, "{text}");
    let row = |id: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    // The top-level url beats the registrations' own, as in `run`.
    assert_eq!(
        row("w1"),
        ["w1", "http://127.0.0.1:8", "linux,web", "QA", "saved"]
    );
    assert_eq!(row("w2"), ["w2", "http://127.0.0.1:8", "-", "-", "missing"]);
    assert_eq!(
        row("home-1"),
        ["home-1", "http://127.0.0.1:9", "db", "-", "saved"]
    );
    assert!(text.contains("`cla-worker run` needs --id ID"), "{text}");
    assert!(text.contains("`cla-worker run` would use home-1"), "{text}");
    // And `run` agrees: it reads the work file, which needs --id.
    let out = worker_at(&home, &work).arg("run").output().unwrap();
    assert!(
        !out.status.success() && stderr(&out).contains("2 registrations (w1, w2)"),
        "{}",
        stderr(&out)
    );

    // As JSON.
    let out = worker_at(&home, &work).args(["list", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("secret_value"), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let files = v["files"].as_array().unwrap();
    let file = |p: &Path| {
        files
            .iter()
            .find(|f| f["path"] == p.to_str().unwrap())
            .unwrap_or_else(|| panic!("{} not listed: {v}", p.display()))
    };
    assert_eq!(v["used"], work_file.to_str().unwrap());
    let w = file(&work_file);
    assert_eq!(
        (w["used"].as_bool(), w["exists"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(w["registrations"][0]["id"], "w1");
    assert_eq!(w["registrations"][0]["has_token"], true);
    assert_eq!(w["registrations"][1]["has_token"], false);
    assert_eq!(w["default"], serde_json::Value::Null);
    let h = file(&home_file);
    assert_eq!(
        (h["used"].as_bool(), h["default"].as_str()),
        (Some(false), Some("home-1"))
    );

    // --config names the only file `run` reads; the others are shown as not used.
    let text = list(&["-c", home_file.to_str().unwrap()]);
    assert!(
        text.contains(&format!(
            "{}: used by `cla-worker run` (--config)",
            home_file.display()
        )) && text.contains(&format!(
            "{}: not used while --config is given",
            work_file.display()
        )) && text.contains("`cla-worker run` uses home-1"),
        "{text}"
    );
    // A file that does not load is shown with its error; the listing goes on.
    let broken = work.join("broken.yml");
    std::fs::write(&broken, "registrations: [\n").unwrap();
    let text = list(&["-c", "broken.yml"]);
    assert!(
        text.contains(&format!("cannot be loaded: {}:1:", broken.display()))
            && text.contains("w1")
            && text.contains("home-1"),
        "{text}"
    );
    let text = list(&["-c", "nothere.yml"]);
    assert!(text.contains("nothere.yml (--config): not found"), "{text}");
}

#[test]
fn a_lost_config_is_met_with_messages_naming_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let (home, empty) = (mkdir(dir.path(), "home"), mkdir(dir.path(), "empty"));
    let setup = register(&hub, dir.path(), "lost", "t");
    std::fs::remove_file(&setup.config).unwrap();
    let key = hub.passkey("proj");

    // Registering the same id again is refused; with no token here, the hub's "unregister first" cannot
    // be followed, and the message says what can.
    let out = worker_at(&home, &empty)
        .args(["register", "--url", &hub.url, "--passkey", &key, "--id", "lost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(
        err.contains("already registered in project proj")
            && err.contains("no token for lost here")
            && err.contains("`cla-hub worker unregister lost`")
            && err.contains("run this register again"),
        "{err}"
    );
    // `unregister` has no token either: it says so, and the same way out.
    let out = worker_at(&home, &empty)
        .args(["unregister", "--url", &hub.url, "--id", "lost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(
        err.contains("no token for worker lost (no config file)")
            && err.contains("`cla-hub worker unregister lost`")
            && err.contains("`cla-worker register --id lost --save`"),
        "{err}"
    );
    // A config that kept the id but not the token.
    let partial = dir.path().join("partial.yml");
    std::fs::write(
        &partial,
        format!("registrations:\n  - id: lost\n    url: {}\n", hub.url),
    )
    .unwrap();
    let out = worker_at(&home, &empty)
        .arg("-c")
        .arg(&partial)
        .arg("unregister")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!(
            "{} has a registration lost but no token",
            partial.display()
        )) && err.contains("`cla-hub worker unregister lost`"),
        "{err}"
    );
    assert!(!err.contains(&setup.token));

    // The way out works: the admin deletes it on the hub, then register again, and unregister.
    hub.ok(&["worker", "unregister", "lost"]);
    let again = dir.path().join("again.yml");
    let out = worker_at(&home, &empty)
        .arg("-c")
        .arg(&again)
        .args([
            "register",
            "--url",
            &hub.url,
            "--passkey",
            &key,
            "--id",
            "lost",
            "--save",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = worker_at(&home, &empty)
        .arg("-c")
        .arg(&again)
        .arg("unregister")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // The other way round: deleted on the hub, still saved here. `unregister` says what is left to do.
    let gone = register(&hub, dir.path(), "gone", "t");
    hub.ok(&["worker", "unregister", "gone"]);
    let out = worker_at(&home, &empty)
        .arg("-c")
        .arg(&gone.config)
        .arg("unregister")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(
        err.contains("not registered on this hub")
            && err.contains(&format!("its entry in {} stays", gone.config.display()))
            && err.contains(&format!(
                "`cla-worker -c {} register --id gone --save`",
                gone.config.display()
            )),
        "{err}"
    );
    assert!(!err.contains(&gone.token));
}

/// Kills a worker that took this pidfile (a `start` that should have been refused), failed or not.
struct Reap(PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = cla_worker_core::daemon::running(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

#[test]
fn status_and_stop_see_a_worker_running_in_the_foreground() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, setup, mut worker) = hub_with_worker(dir.path(), "fg", "t");
    let cli = || {
        let mut c = Command::new(WORKER);
        c.arg("-c").arg(&setup.config);
        c
    };
    let pid = worker.pid();
    wait_until("status to report the foreground worker connected", 20, || {
        let out = cli().args(["status", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        out.status.success()
            && v["mode"] == "foreground"
            && v["pid"] == pid
            && v["status"]["state"] == "connected"
    });
    let out = cli().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("worker fg is running in the foreground (pid {pid})"))
            && text.contains("connected"),
        "{text}"
    );

    // `start` of the same worker is refused, naming the one that runs.
    let pidfile = dir.path().join("fg.pid");
    let _reap = Reap(pidfile.clone());
    let out = cli()
        .arg("start")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--logfile")
        .arg(dir.path().join("fg.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "already running (in the foreground, started with `cla-worker run`, pid {pid})"
        )),
        "{}",
        stderr(&out)
    );

    // `stop` drains it like Ctrl-C in its terminal.
    let out = cli().arg("stop").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("stopping worker fg (pid {pid}, in the foreground)"))
            && stdout(&out).contains("worker fg stopped"),
        "{}",
        stdout(&out)
    );
    assert_eq!(worker.wait_exit(20).code(), Some(0));
    assert!(
        worker.log_text().contains("shutdown completed"),
        "{}",
        worker.log_text()
    );
    let out = cli().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stdout(&out).contains("worker fg is not running"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn sighup_reloads_mask_and_workdir_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, setup, worker) = hub_with_worker(dir.path(), "hupm", "t");
    let exec = |cmd: &str| {
        let out = hub.run(&["exec", "--worker", "hupm", "--", cmd]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(exec("echo SECRETVALUE1234"), "SECRETVALUE1234\n");
    let wd = mkdir(dir.path(), "wd");
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str(&format!(
        "mask:\n  patterns: ['SECRET[A-Z0-9]+']\nworkdir: {}\ncapacity: 3\nlog_keep: 2\n",
        wd.display()
    ));
    std::fs::write(&setup.config, text).unwrap();
    worker.signal(Signal::SIGHUP);
    worker.wait_for_line("SIGHUP: mask reloaded", 20);
    worker.wait_for_line("SIGHUP: workdir reloaded", 20);
    let restart = worker.wait_for_line("only a restart of the worker applies it", 20);
    assert!(
        restart.contains("capacity") && restart.contains("log_keep") && !restart.contains("mask"),
        "{restart}"
    );
    // Jobs from now on are masked with the new pattern and run in the new workdir.
    assert_eq!(exec("echo SECRETVALUE1234"), "***\n");
    assert_eq!(exec("pwd"), format!("{}\n", wd.canonicalize().unwrap().display()));
    // Without a reconnect, and with the old capacity (a restart applies the new one).
    assert_eq!(
        worker.log_text().matches("connected to hub").count(),
        1,
        "it reconnected"
    );
    let w = hub.workers_json()[0].clone();
    assert_eq!(w["capacity"], 1, "{w}");
    assert!(
        !worker.log_text().contains(&setup.token),
        "the token is in the log"
    );
}
