//! The docs run as written: the README tour (the block after `<!-- tested: tour -->`) runs against a real
//! hub and worker, every `cla-hub …`/`cla-worker …` flag the README and docs/ name exists in that
//! subcommand's `--help`, and the systemd units pass `systemd-analyze verify` where systemd is installed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// The repository's root (the tests run from it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page in docs/, with their names.
fn pages() -> Vec<(String, String)> {
    let mut out = vec![(
        "README.md".to_owned(),
        std::fs::read_to_string(root().join("README.md")).unwrap(),
    )];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = format!("docs/{}", path.file_name().unwrap().to_string_lossy());
            out.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    out.push((
        "packaging/README.md".to_owned(),
        std::fs::read_to_string(root().join("packaging/README.md")).unwrap(),
    ));
    out
}

/// `--help` of a binary's subcommand path, cached.
struct Helps {
    cache: HashMap<(String, Vec<String>), String>,
}

impl Helps {
    fn get(&mut self, bin: &str, path: &[String]) -> String {
        let key = (bin.to_owned(), path.to_vec());
        if let Some(h) = self.cache.get(&key) {
            return h.clone();
        }
        let exe = if bin == "cla-hub" { HUB } else { WORKER };
        let o = Command::new(exe).args(path).arg("--help").output().unwrap();
        let text = if o.status.success() {
            stdout(&o)
        } else {
            String::new()
        };
        self.cache.insert(key, text.clone());
        text
    }

    /// The subcommands `help` lists under `Commands:`.
    fn subcommands(help: &str) -> Vec<String> {
        let Some(rest) = help.split("Commands:\n").nth(1) else {
            return Vec::new();
        };
        rest.lines()
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

/// Each `cla-hub …` / `cla-worker …` command line in code (fenced blocks and inline `code`) of `text`.
fn commands(text: &str) -> Vec<(String, Vec<String>)> {
    let mut code = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            code.push(line.to_owned());
        } else {
            code.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
        }
    }
    let mut out = Vec::new();
    for line in code {
        for bin in ["cla-hub", "cla-worker"] {
            for (i, _) in line.match_indices(&format!("{bin} ")) {
                // `cla-hub-exec`, `mycla-hub`, a directory (`/var/lib/cla-hub`), a package (`--bin cla-hub`):
                // not a command. A binary's path (`target/release/cla-hub`, `/usr/bin/cla-hub`) is one.
                let head = &line[..i];
                let before = head.chars().last();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
                    || (before == Some('/')
                        && !["bin/", "release/", "debug/"].iter().any(|d| head.ends_with(d)))
                    || ["--bin ", "-p ", "-u ", "--package "]
                        .iter()
                        .any(|f| head.ends_with(f))
                {
                    continue;
                }
                let words: Vec<String> = line[i + bin.len()..]
                    .split_whitespace()
                    .take_while(|w| {
                        !["|", "||", "&&", ";", "#", ">", "2>&1"].contains(w) && !w.starts_with('#')
                    })
                    .map(|w| w.trim_matches(|c| c == '(' || c == ')' || c == ',').to_owned())
                    .collect();
                out.push((bin.to_owned(), words));
            }
        }
    }
    out
}

#[test]
fn every_flag_the_docs_name_is_in_its_subcommands_help() {
    let mut helps = Helps {
        cache: HashMap::new(),
    };
    let mut missing = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        for (bin, words) in commands(&text) {
            // The subcommand path: the words that name subcommands, from the top.
            let mut path: Vec<String> = Vec::new();
            let mut rest = words.as_slice();
            let mut globals = Vec::new();
            while let Some(w) = rest.first() {
                let subs = Helps::subcommands(&helps.get(&bin, &path));
                if subs.contains(w) {
                    path.push(w.clone());
                    rest = &rest[1..];
                } else if path.is_empty() && w.starts_with("--") && rest.len() > 1 {
                    // A global flag before the verb (`cla-hub --data-dir D passkey …`), with its value.
                    globals.push(w.clone());
                    let takes_value = !rest[1].starts_with('-') && !subs.contains(&rest[1]);
                    rest = &rest[if takes_value { 2 } else { 1 }..];
                } else {
                    break;
                }
            }
            // The binary's name as a word (`useradd … cla-hub`, `sudo -u cla-worker cla-worker …`): the
            // command, if any, is the next match.
            if path.is_empty() && globals.is_empty() && !rest.first().is_some_and(|w| w.starts_with("--")) {
                continue;
            }
            // Windows-only verbs are not in a Linux build's help.
            if rest.first().is_some_and(|w| w == "service") {
                continue;
            }
            let help = helps.get(&bin, &path);
            let top = helps.get(&bin, &[]);
            for w in rest {
                if w == "--" {
                    break; // the remote command's own arguments follow
                }
                let Some(flag) = w.strip_prefix("--") else {
                    continue;
                };
                let flag = flag.split('=').next().unwrap();
                if flag.is_empty() || !flag.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                    continue;
                }
                checked += 1;
                let needle = format!("--{flag}");
                let found = |h: &str| {
                    h.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
                        .any(|t| t == needle)
                };
                if !found(&help) && !found(&top) {
                    missing.push(format!("{page}: `{bin} {}` has no {needle}", path.join(" ")));
                }
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "flags the docs name that do not exist:\n{}",
        missing.join("\n")
    );
    assert!(
        checked > 50,
        "only {checked} flags found: is the parser still reading the docs?"
    );
}

/// The README's tour as a bash script: long-running commands in the background (each waited for),
/// port 8780 replaced by a free one, /tmp/ by the test's dir, and each command checked: it must exit 0,
/// or with the code its comment announces (`# exit 124`).
fn tour_script(readme: &str, port: u16, tmp: &Path) -> String {
    let block = readme
        .split("<!-- tested: tour -->")
        .nth(1)
        .expect("README.md marks its tour with <!-- tested: tour -->");
    let block = block
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("\n```")
        .next()
        .unwrap();
    // Join continued lines.
    let block = block.replace("\\\n", " ");
    let mut script = String::from(
        "trap 'kill $(jobs -p) 2>/dev/null' EXIT\nfail=0\n\
         check() { if [ \"$1\" != \"$2\" ]; then echo \"TOUR FAILED: line $3 exited $1, expected $2\" >&2; fail=1; fi; }\n",
    );
    for (n, line) in block.lines().enumerate() {
        let n = n + 1;
        let code = line.split(" #").next().unwrap().trim();
        if code.is_empty()
            || code.starts_with('#')
            || code.starts_with("cargo build")
            || code.starts_with("export PATH")
        {
            continue;
        }
        let code = code
            .replace("127.0.0.1:8780", &format!("127.0.0.1:{port}"))
            .replace("/tmp/", &format!("{}/", tmp.display()));
        let expect = line
            .split("# exit ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|c| c.parse::<i32>().ok())
            .unwrap_or(0);
        if code == "cla-hub serve" {
            script.push_str(&format!(
                "cla-hub serve --listen 127.0.0.1:{port} > serve.log 2>&1 &\n\
                 for i in $(seq 300); do [ -f \"$CLA_HUB_DATA_DIR/hub.json\" ] && break; sleep 0.1; done\n"
            ));
        } else if code == "cla-worker run" {
            script.push_str(
                "cla-worker run > worker.log 2>&1 &\n\
                 for i in $(seq 300); do cla-hub workers 2>/dev/null | grep -q IDLE && break; sleep 0.1; done\n",
            );
        } else {
            let shown = code.replace('\'', "'\\''");
            script.push_str(&format!(
                "printf '+ %s\\n' '{shown}' >&2\n{code}\ncheck $? {expect} {n}\n"
            ));
        }
    }
    script.push_str("exit $fail\n");
    script
}

#[test]
fn the_readme_tour_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("checkout");
    std::fs::create_dir_all(&work).unwrap();
    // The tour runs from the top of a checkout: it ships docs/examples and runs its rulebooks.
    let cp = Command::new("cp")
        .args([
            "-r",
            root().join("docs").to_str().unwrap(),
            work.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(cp.success());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let script = tour_script(&readme, port, &tmp);
    let bin_dir = HUB.path().parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let t0 = Instant::now();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env("PATH", path)
        .env("HOME", dir.path())
        .env("CLA_HUB_DATA_DIR", dir.path().join("hub"))
        .env_remove("CLA_WORKER_CONFIG")
        .env_remove("CLA_HUB_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a step that hangs fails the test instead of the suite.
    let deadline = Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let log = format!("{}\n{}", stdout(&out), stderr(&out));
    assert!(
        t0.elapsed() < deadline,
        "the tour hung:\n{log}\n--- script:\n{script}"
    );
    assert!(out.status.success(), "the tour failed:\n{log}");
    assert!(!log.contains("TOUR FAILED"), "{log}");
    // What it claims happened did.
    assert!(stdout(&out).contains("hello from web-1"), "{log}");
    assert!(work.join("fetched/examples/hello.yml").exists(), "{log}");
    assert!(work.join("cla-worker.yml").exists());
}

#[test]
fn the_systemd_units_verify() {
    let Ok(o) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed here: the units are not verified");
        return;
    };
    assert!(o.status.success());
    let dir = tempfile::tempdir().unwrap();
    for unit in ["cla-hub.service", "cla-worker.service"] {
        let text = std::fs::read_to_string(root().join("packaging/systemd").join(unit)).unwrap();
        // The units run the installed binaries; here, the ones under test stand in for them.
        let text = text
            .replace("/usr/bin/cla-hub", &HUB.path().display().to_string())
            .replace("/usr/bin/cla-worker", &WORKER.path().display().to_string());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "systemd-analyze verify {unit}:\n{}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}
