//! `cla-hub eval` against a real worker: results, stash, console, errors, limits, parallel evals.

use std::io::Write;
use std::process::Stdio;

use crate::common::*;

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(out), stderr(out)))
}

#[test]
fn eval_returns_result_stash_and_console() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "js1", "js");

    let out = hub.run(&["eval", "--worker", "js1", "6 * 7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "42");

    let code = "console.log('hello', stash.n); console.warn('careful'); stash.n += 1; \
                ({when: new Date(0), list: [1, {deep: true}], me: cla.worker.id, job: cla.env('CLA_JOB_ID') !== null})";
    let out = hub.run(&["eval", "--tags", "js", "--stash", r#"{"n": 41}"#, "--json", code]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json_of(&out);
    assert_eq!(
        v["result"],
        serde_json::json!({"when": "1970-01-01T00:00:00.000Z", "list": [1, {"deep": true}], "me": "js1", "job": true})
    );
    assert_eq!(v["stash"], serde_json::json!({"n": 42}));
    assert_eq!(
        v["console"][0],
        serde_json::json!({"level": "log", "text": "hello 41"})
    );
    assert_eq!(v["console"][1]["level"], "warn");
    // Console lines are also streamed to stderr as they are logged.
    assert!(
        stderr(&out).contains("hello 41") && stderr(&out).contains("[warn] careful"),
        "{}",
        stderr(&out)
    );

    // Code from a file, and from stdin.
    let file = dir.path().join("script.js");
    std::fs::write(&file, "const xs = [1, 2, 3];\nxs.map(x => x * 2)\n").unwrap();
    let out = hub.run(&["eval", "--worker", "js1", "--file", file.to_str().unwrap()]);
    assert_eq!(json_of(&out), serde_json::json!([2, 4, 6]));
    let mut child = hub
        .cmd()
        .args(["eval", "--worker", "js1", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"cla.run(['printf', '%s', 'from stdin']).stdout")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(json_of(&out), serde_json::json!("from stdin"));

    // The job record keeps the eval's output.
    // Newest first: the first eval of this test is the last.
    let jobs: serde_json::Value = serde_json::from_str(&hub.ok(&["jobs", "--json"])).unwrap();
    let first = jobs.as_array().unwrap().last().unwrap();
    assert_eq!(first["eval"]["result"], 42);
    assert_eq!(first["state"], "succeeded");
}

#[test]
fn eval_errors_are_reported_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, _worker) = hub_with_worker(dir.path(), "js2", "js");

    let out = hub.run(&[
        "eval",
        "--worker",
        "js2",
        "function inner() { throw new Error('boom') }\ninner()",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("Error: boom") && err.contains("at inner"), "{err}");

    let out = hub.run(&["eval", "--worker", "js2", "--json", "let x = ;"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        json_of(&out)["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("SyntaxError")
    );

    let out = hub.run(&["eval", "--worker", "js2", "(function () {})"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is a function"), "{}", stderr(&out));

    let out = hub.run(&["eval", "--worker", "js2", "--stash", "[1]", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--stash must be a JSON object"),
        "{}",
        stderr(&out)
    );
    let out = hub.run(&["eval", "--worker", "js2"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn runaway_scripts_are_stopped_and_the_worker_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, mut worker) = hub_with_worker(dir.path(), "js3", "js");

    // Each loop stays under the iteration limit; only the wall clock stops this.
    let out = hub.run(&[
        "eval",
        "--worker",
        "js3",
        "--timeout",
        "1",
        "while (true) { for (let i = 0; i < 1000; i++) {} }",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));

    let out = hub.run(&["eval", "--worker", "js3", "while (true) {}"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("RuntimeLimitError"), "{}", stderr(&out));

    let out = hub.run(&[
        "eval",
        "--worker",
        "js3",
        "function f(n) { return f(n + 1) } f(0)",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("RuntimeLimitError"), "{}", stderr(&out));

    // A huge allocation ends the eval process, not the worker.
    let out = hub.run(&[
        "eval",
        "--worker",
        "js3",
        "--timeout",
        "20",
        "let s = 'x'.repeat(1 << 28); s = s + s + s + s + s + s + s + s + s; s.length",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));

    // A console line over the 16 MiB message limit is streamed in frames; the session survives.
    let out = hub.run(&["eval", "--worker", "js3", "let s = 'x'.repeat(1 << 20); for (let i = 0; i < 4; i++) s += s; console.log(s + s.slice(0, 1 << 20)); 'ok'"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(300)])
    );
    assert_eq!(stdout(&out).trim(), "\"ok\"");
    assert!(out.stderr.len() > 17 * 1024 * 1024);

    // Too deep to store safely: refused with a message, and the hub still lists its jobs.
    let out = hub.run(&[
        "eval",
        "--worker",
        "js3",
        "let o = 1; for (let i = 0; i < 125; i++) o = {a: o}; o",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nests deeper than 64"), "{}", stderr(&out));
    hub.ok(&["jobs", "--json"]);

    assert!(worker.exited().is_none(), "the worker died");
    let out = hub.run(&["eval", "--worker", "js3", "'still here'"]);
    assert_eq!(stdout(&out).trim(), "\"still here\"", "{}", stderr(&out));
}

#[test]
fn several_evals_run_in_parallel_on_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "js4", "js");
    let _worker = run_worker(&setup, &["--capacity", "3"]);
    hub.wait_worker_state("js4", "idle", 20);
    let children: Vec<_> = (0..3)
        .map(|i| {
            hub.cmd()
                .args(["eval", "--worker", "js4", "--stash", &format!(r#"{{"i": {i}}}"#)])
                .arg("let s = 0; for (let k = 0; k < 20000; k++) s += k; s + stash.i")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut results: Vec<i64> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            stdout(&out).trim().parse().unwrap()
        })
        .collect();
    results.sort();
    assert_eq!(results, [199990000, 199990001, 199990002]);
}
