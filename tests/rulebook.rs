//! Scheduling and rulebooks against real hubs and workers: routing by tags and envs, queueing until a
//! matching worker connects, capacity, captures and templates, errors with lines, and the examples in
//! docs/examples run end to end.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// Writes a rulebook into `dir` and returns its path.
fn rulebook(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn run(hub: &Hub, args: &[&str]) -> std::process::Output {
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    hub.run(&a)
}

fn start_worker(hub: &Hub, dir: &Path, id: &str, tags: &str, extra: &[&str]) -> Proc {
    let setup = register(hub, dir, id, tags);
    let w = run_worker(&setup, extra);
    hub.wait_worker_state(id, "idle", 20);
    w
}

#[test]
fn steps_land_on_the_right_workers_with_captures_and_templates() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let _java = start_worker(&hub, dir.path(), "w-java", "java", &[]);
    let _qa = start_worker(&hub, dir.path(), "w-qa", "web", &["--envs", "QA"]);
    let _prod = start_worker(&hub, dir.path(), "w-prod", "web", &["--envs", "PROD"]);
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("payload.txt"), b"payload 42\n").unwrap();
    let book = rulebook(
        dir.path(),
        "book.yml",
        &format!(
            r#"
vars:
  greeting: hello
  files: {files}
do:
  - j = shell:
      worker: {{ tags: [java] }}
      cmd: echo "$CLA_WORKER_ID ${{greeting}}"
  - prod = shell:
      worker: {{ tags: [web], env: PROD }}
      cmd: [sh, -c, 'echo $CLA_WORKER_ID']
  - qa = shell:
      worker: {{ tags: [web], env: QA }}
      cmd: sh
      args: [-c, 'echo $CLA_WORKER_ID "$1"', sh, "${{greeting}}"]
  - echo: "java=${{j.output}} prod=${{prod.output}} qa=${{qa.output}} sum={{{{ j.rc + prod.rc + 40 }}}}"
  - e = eval:
      worker: {{ id: w-qa }}
      code: "stash.count = 41 + 1; stash.greeting.toUpperCase()"
  - echo: "eval=${{e.result}} count=${{count}} on ${{e.worker}}"
  - if: "{{{{ count == 42 }}}}"
    then:
      - echo: "count is right"
    else:
      - fail: "count is wrong"
  - foreach: "{{{{ ['a', 'b'] }}}}"
    as: letter
    do:
      - echo: "letter ${{letter}} at ${{letter_index}}"
  - bad = shell:
      worker: {{ tags: [java] }}
      cmd: echo out; echo err >&2; exit 3
    ignore_errors: true
  - echo: "bad rc=${{bad.rc}} ok=${{bad.ok}} stdout=${{bad.stdout}} stderr=${{bad.stderr}}"
  - shipped = ship:
      worker: {{ tags: [web], env: PROD }}
      from: "${{files}}/payload.txt"
      to: "${{files}}/remote/"
  - fetched = fetch:
      worker: {{ id: "${{shipped.worker}}" }}
      from: "${{shipped.path}}"
      to: "${{files}}/back/"
  - echo: "moved ${{shipped.bytes}} bytes to ${{shipped.worker}}, same={{{{ shipped.sha256 == fetched.sha256 }}}}"
  - set: {{ final: "${{greeting}}!" }}
  - echo: "$${{not_a_var}} ${{final}}"
"#,
            files = files.display()
        ),
    );
    let o = run(&hub, &[book.to_str().unwrap()]);
    let out = stdout(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    for want in [
        "java=w-java hello prod=w-prod qa=w-qa hello sum=40",
        "eval=HELLO count=42 on w-qa",
        "count is right",
        "letter a at 0",
        "letter b at 1",
        "bad rc=3 ok=false stdout=out stderr=err",
        "moved 11 bytes to w-prod, same=true",
        "${not_a_var} hello!",
    ] {
        assert!(out.lines().any(|l| l == want), "missing `{want}` in:\n{out}");
    }
    assert_eq!(
        std::fs::read(files.join("back/payload.txt")).unwrap(),
        b"payload 42\n"
    );
    // Plain progress lines on stderr name each step, its worker and its line.
    let err = stderr(&o);
    assert!(err.contains("✔ j (shell, line 6) on w-java, rc 0"), "{err}");
    assert!(
        err.contains("✘ (ignored) bad (shell, line 30) on w-java, rc 3"),
        "{err}"
    );

    // The JSON report: every worker step with its worker, state and line.
    let o = run(&hub, &["--json", book.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let steps = report["steps"].as_array().unwrap();
    let on: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["worker"].as_str().unwrap()))
        .collect();
    assert_eq!(
        on,
        [
            ("j", "w-java"),
            ("prod", "w-prod"),
            ("qa", "w-qa"),
            ("e", "w-qa"),
            ("bad", "w-java"),
            ("shipped", "w-prod"),
            ("fetched", "w-prod")
        ]
    );
    assert_eq!(steps[4]["ignored"], true);
    assert_eq!(steps[4]["rc"], 3);

    // Env routing on the command line too.
    let o = hub.run(&[
        "exec",
        "--tags",
        "web",
        "--env",
        "QA",
        "--",
        "sh",
        "-c",
        "echo $CLA_WORKER_ID",
    ]);
    assert_eq!(stdout(&o).trim(), "w-qa", "{}", stderr(&o));
}

#[test]
fn a_step_waits_for_a_matching_worker_and_runs_when_one_connects() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _w) = hub_with_worker(dir.path(), "w-cpu", "linux");
    // A gpu worker is registered but not running: the step waits for it, saying so.
    let gpu = register(&hub, dir.path(), "w-gpu", "gpu,linux");
    let marker = dir.path().join("ran-on");
    let book = rulebook(
        dir.path(),
        "gpu.yml",
        &format!(
            "do:\n  - shell:\n      worker: {{ tags: [gpu] }}\n      cmd: echo $CLA_WORKER_ID > {}\n",
            marker.display()
        ),
    );
    let mut cmd = hub.cmd();
    cmd.args(["run", book.to_str().unwrap()]);
    let mut running = Proc::spawn(cmd);
    // The job is queued, and says why.
    let why = "w-gpu (never connected) is offline";
    wait_until("a queued job waiting for [gpu]", 20, || {
        let jobs: serde_json::Value =
            serde_json::from_str(&hub.ok(&["jobs", "--json", "--state", "queued"])).unwrap();
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["waiting"].as_str() == Some(why))
    });
    let table = hub.ok(&["jobs"]);
    assert!(table.contains("queued") && table.contains(why), "{table}");
    running.wait_for_line(&format!("waiting for a worker: {why}"), 10);
    assert!(running.exited().is_none(), "the run must wait, not fail");
    assert!(!marker.exists());
    // The gpu worker connects: the step runs there and the run succeeds.
    let _gpu = run_worker(&gpu, &[]);
    let status = running.wait_exit(30);
    assert!(status.success(), "{}", running.log_text());
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "w-gpu");
    // A tag no registered worker has fails the step at once, naming the tags in use.
    let book = rulebook(
        dir.path(),
        "tpu.yml",
        "do:\n  - shell:\n      worker: { tags: [tpu] }\n      cmd: 'true'\n",
    );
    let o = run(&hub, &[book.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "tpu.yml:2: step `shell true`: no registered worker has tags [tpu]; tags in use: gpu, linux"
        ),
        "{}",
        stderr(&o)
    );
    // A queue timeout gives up with the reason (`queue_timeout` in `worker:` or beside the op's
    // other options).
    hub.ok(&["worker", "disable", "w-gpu"]);
    for (name, book) in [
        (
            "q1.yml",
            "do:\n  - shell:\n      worker: { tags: [gpu], queue_timeout: 0.5 }\n      cmd: 'true'\n",
        ),
        (
            "q2.yml",
            "do:\n  - shell:\n      worker: { tags: [gpu] }\n      queue_timeout: 0.5\n      cmd: 'true'\n",
        ),
    ] {
        let book = rulebook(dir.path(), name, book);
        let o = run(&hub, &[book.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains(&format!(
                "{name}:2: step `shell true`: was not started within its queue timeout of 0.5s: w-gpu is disabled"
            )),
            "{}",
            stderr(&o)
        );
    }
}

/// `[start, end]` in nanoseconds, read from the files a job wrote.
fn span(dir: &Path, n: usize) -> (u128, u128) {
    let read = |what: &str| -> u128 {
        std::fs::read_to_string(dir.join(format!("{n}.{what}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (read("start"), read("end"))
}

#[test]
fn capacity_bounds_concurrent_jobs_and_the_rest_queue() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let _w = start_worker(&hub, dir.path(), "w-cap", "cap", &["--capacity", "2"]);
    let stamps = dir.path().join("stamps");
    std::fs::create_dir_all(&stamps).unwrap();
    let mut ids = Vec::new();
    for n in 0..6 {
        let script = format!(
            "date +%s%N > {d}/{n}.start; sleep 0.4; date +%s%N > {d}/{n}.end",
            d = stamps.display()
        );
        let id = hub.ok(&["exec", "--tags", "cap", "--detach", "--", &script]);
        ids.push(id.trim().to_owned());
    }
    // While they run: BUSY at 2/2, and the others queued behind the busy worker.
    wait_until("the worker busy with 2 of 2", 20, || {
        let ws = hub.workers_json();
        let w = &ws.as_array().unwrap()[0];
        w["state"] == "busy" && w["running"] == 2 && w["capacity"] == 2
    });
    let queued: serde_json::Value =
        serde_json::from_str(&hub.ok(&["jobs", "--json", "--state", "queued"])).unwrap();
    if let Some(j) = queued.as_array().unwrap().first() {
        assert_eq!(
            j["waiting"].as_str(),
            Some("the matching worker w-cap is busy (2/2 running)"),
            "{j}"
        );
    }
    for id in &ids {
        let o = hub.run(&["job", "show", "--wait", "--json", id]);
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["state"], "succeeded", "{r}");
    }
    // From the timestamps the jobs wrote: never more than 2 at once, and 2 at once at some point.
    let spans: Vec<(u128, u128)> = (0..6).map(|n| span(&stamps, n)).collect();
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(s2, e2)| s2 <= s && s < e2).count())
        .max()
        .unwrap();
    assert_eq!(most, 2, "at most 2 at once, and the capacity used: {spans:?}");
}

#[test]
fn errors_name_the_line_and_a_failing_step_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _w) = hub_with_worker(dir.path(), "w1", "linux");
    let marker = dir.path().join("after");
    // Syntax and unknown ops: the file and line, nothing runs.
    let bad = rulebook(dir.path(), "bad.yml", "do:\n  - echo: one\n  - shel: ls\n");
    let o = run(&hub, &[bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.yml:3: unknown op `shel`: did you mean `shell`?"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty(), "nothing ran: {}", stdout(&o));
    let broken = rulebook(dir.path(), "broken.yml", "do:\n  - shell: [unclosed\n");
    let o = run(&hub, &[broken.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("broken.yml:"), "{}", stderr(&o));
    assert!(stderr(&o).contains("not valid YAML"), "{}", stderr(&o));
    // A missing event section is a usage error.
    let ok = rulebook(dir.path(), "ok.yml", "worker: w1\ndo:\n  - echo: hi\n");
    let o = run(&hub, &[ok.to_str().unwrap(), "--event", "deploy"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no `deploy:` section (the rulebook has: do)"),
        "{}",
        stderr(&o)
    );
    // A failing step stops the run: non-zero exit, the step and line named, later steps not run.
    let failing = rulebook(
        dir.path(),
        "failing.yml",
        &format!(
            "worker: {{ id: w1 }}\ndo:\n  - shell: 'true'\n  - compile = shell: exit 7\n  - shell: touch {}\n",
            marker.display()
        ),
    );
    let o = run(&hub, &[failing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("rulebook failed: ")
            && stderr(&o).contains("failing.yml:4: step `compile`: exited with 7 on w1"),
        "{}",
        stderr(&o)
    );
    assert!(!marker.exists(), "the step after the failure ran");
    // `fail:` and an unknown variable stop it the same way.
    let f = rulebook(dir.path(), "f.yml", "do:\n  - fail: \"stop ${rulebook}\"\n");
    let o = run(&hub, &[f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("f.yml:2: step `fail`: fail: stop "),
        "{}",
        stderr(&o)
    );
    let u = rulebook(dir.path(), "u.yml", "worker: w1\ndo:\n  - shell: echo ${nope}\n");
    let o = run(&hub, &[u.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("u.yml:3: step `shell echo ${nope}`: unknown variable `nope`"),
        "{}",
        stderr(&o)
    );
    // A step without any worker to run on.
    let n = rulebook(dir.path(), "n.yml", "do:\n  - shell: 'true'\n");
    let o = run(&hub, &[n.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("n.yml:2: step `shell true`: no worker to run on"),
        "{}",
        stderr(&o)
    );
    // The JSON report of a failed run.
    let o = run(&hub, &["--json", failing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["steps"][1]["state"], "failed");
    assert_eq!(r["steps"][1]["line"], 4);
    assert!(r["error"].as_str().unwrap().contains("exited with 7"));
}

/// The rulebooks in docs/examples, run against real workers.
#[test]
fn the_examples_run_end_to_end() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let _build = start_worker(&hub, dir.path(), "w-build", "build,linux", &["--envs", "QA"]);
    let _web = start_worker(&hub, dir.path(), "w-web", "web,linux", &["--envs", "PROD"]);
    let example = |name: &str| examples.join(name).display().to_string();

    let o = run(&hub, &[&example("hello.yml"), "--var", "who=tests"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("hello tests, from "), "{}", stdout(&o));

    let work = dir.path().join("work");
    let here = dir.path().join("here");
    let o = run(
        &hub,
        &[
            &example("release.yml"),
            "--var",
            &format!("work={}", work.display()),
            "--var",
            &format!("here={}", here.display()),
        ],
    );
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        stdout(&o).contains("built app 1.4.2 on w-build"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("release 1.4.2 is live on w-web: 2-line report"),
        "{}",
        stdout(&o)
    );
    assert!(here.join("artifacts/app-1.4.2.tar.gz").exists());
    let report = std::fs::read_to_string(here.join("reports/smoke-report.txt")).unwrap();
    assert!(report.starts_with("app 1.4.2 is up\n"), "{report}");

    let o = run(
        &hub,
        &[&example("events.yml"), "--event", "deploy", "--var", "env=PROD"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        [
            "deploying api to PROD",
            "deploying web to PROD",
            "deploying worker to PROD"
        ]
    );
    assert!(stderr(&o).contains("on w-web"), "{}", stderr(&o));
    let o = run(&hub, &[&example("events.yml"), "--event", "test"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("tests passed"), "{}", stdout(&o));
    assert!(stderr(&o).contains("on w-build"), "{}", stderr(&o));
    let _ = Command::new("true").status();
}

/// On a terminal (a pseudo-terminal from `script`), steps show as spinners and their output scrolls
/// above them, line by line.
#[test]
fn a_terminal_gets_live_progress() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _w) = hub_with_worker(dir.path(), "w1", "linux");
    let book = rulebook(
        dir.path(),
        "tty.yml",
        "worker: w1\ndo:\n  - greet = shell: printf 'one\\ntwo\\nthree'\n  - echo: \"got ${greet.output}\"\n",
    );
    let line = format!(
        "{} --data-dir {} run {}",
        HUB,
        hub.data_dir.display(),
        book.display()
    );
    let o = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    for want in [
        "│ one",
        "│ two",
        "│ three",
        "✔ greet (shell, line 3) on w1, rc 0",
        "got one\ntwo\nthree",
    ] {
        assert!(
            text.replace("\r\n", "\n").contains(want),
            "missing `{want}` in:\n{text}"
        );
    }
}

#[test]
fn failures_before_a_job_big_captures_and_eval_code_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _w) = hub_with_worker(dir.path(), "w1", "linux");
    let book = rulebook(
        dir.path(),
        "robust.yml",
        r#"
worker: { id: w1 }
do:
  # Fails before any job exists (an unknown worker): the capture is still set.
  - r = shell:
      worker: { id: nosuch }
      cmd: 'true'
    ignore_errors: true
  - echo: "r ok=${r.ok} state=${r.state}"
  # 3 MB of output captured, then an eval without `stash:`: the big output stays out of the stash.
  - big = shell: "head -c 3000000 /dev/zero | tr '\\0' x; echo"
  - e = eval: |
      stash.seen = typeof stash.big.output;
      `rc ${stash.big.rc}, ${Object.keys(stash).length > 0}`;
  - echo: "eval=${e.result} seen=${seen}"
  - foreach: ${hosts}
    do:
      - echo: "host ${item}"
  - echo: "after the loop: {{ typeof item }}"
"#,
    );
    let o = run(&hub, &[book.to_str().unwrap(), "--var", r#"hosts=["h1","h2"]"#]);
    // The big step's output goes to stdout too; look at the echoes only.
    let out = stdout(&o);
    let echoes: Vec<&str> = out.lines().filter(|l| l.len() < 200).collect();
    assert!(o.status.success(), "{}\n{}", echoes.join("\n"), stderr(&o));
    for want in [
        "r ok=false state=error",
        "eval=rc 0, true seen=undefined",
        "host h1",
        "host h2",
        "after the loop: undefined",
    ] {
        assert!(echoes.contains(&want), "missing `{want}` in {echoes:?}");
    }
    // The capture itself kept all of the output:
    let b2 = rulebook(
        dir.path(),
        "len.yml",
        "worker: w1\ndo:\n  - big = shell: \"head -c 3000000 /dev/zero | tr '\\\\0' x\"\n  - echo: \"{{ big.output.length }}\"\n",
    );
    let o = run(&hub, &[b2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with("3000000\n"),
        "{}",
        &stdout(&o)[stdout(&o).len().saturating_sub(100)..]
    );

    // --check: parsed and counted, nothing run, no hub needed.
    let o = Command::new(HUB)
        .args([
            "--data-dir",
            "/nonexistent",
            "run",
            "--check",
            book.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("robust.yml: ok (8 steps in `do`; sections: do)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_client_that_goes_away_takes_its_queued_job_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _w) = hub_with_worker(dir.path(), "w1", "linux");
    // A `late` worker is registered but never runs: the step waits for it.
    let late = register(&hub, dir.path(), "w-late", "late");
    let marker = dir.path().join("ran");
    let book = rulebook(
        dir.path(),
        "late.yml",
        &format!(
            "do:\n  - shell:\n      worker: {{ tags: [late] }}\n      cmd: touch {}\n",
            marker.display()
        ),
    );
    let queued = || -> usize {
        let jobs: serde_json::Value =
            serde_json::from_str(&hub.ok(&["jobs", "--json", "--state", "queued"])).unwrap();
        jobs.as_array().unwrap().len()
    };
    // Killed outright, and stopped with SIGTERM (exit 130): either way its waiting job is cancelled.
    for signal in [
        nix::sys::signal::Signal::SIGKILL,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let mut cmd = hub.cmd();
        cmd.args(["run", book.to_str().unwrap()]);
        let mut running = Proc::spawn(cmd);
        wait_until("the step queued", 20, || queued() == 1);
        running.signal(signal);
        let status = running.wait_exit(20);
        if signal == nix::sys::signal::Signal::SIGTERM {
            assert_eq!(status.code(), Some(130), "{}", running.log_text());
        }
        wait_until("the queued job cancelled", 20, || queued() == 0);
    }
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let states: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["cancelled", "cancelled"]);
    // A worker with the tag arriving later runs nothing.
    let _late = run_worker(&late, &[]);
    hub.wait_worker_state("w-late", "idle", 20);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!marker.exists(), "a job whose client was gone ran anyway");

    // A job pinned to a worker that is then unregistered fails instead of waiting for ever.
    let offline = register(&hub, dir.path(), "w-off", "linux");
    let id = hub.ok(&["exec", "--worker", "w-off", "--detach", "--", "true"]);
    let out = Command::new(WORKER)
        .arg("-c")
        .arg(&offline.config)
        .arg("unregister")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let o = hub.run(&["job", "show", "--wait", "--json", id.trim()]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("worker w-off was unregistered"),
        "{r}"
    );
    assert!(r.get("waiting").is_none(), "{r}");
}
