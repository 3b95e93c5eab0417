//! Secret masking: the worker's token and configured secrets never leave the worker in job output.

use crate::common::*;

const SECRET: &str = "Pa55-w0rd/for+the_DB";

#[test]
fn secrets_are_masked_in_streamed_output_results_and_eval() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "mask-1", "linux");
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str("mask:\n  envs: [DB_PASSWORD, NOT_SET_HERE]\n  patterns: ['AKIA[0-9A-Z]{16}']\n");
    std::fs::write(&setup.config, text).unwrap();
    let worker = run_worker_env(&setup, &[], &[("DB_PASSWORD", SECRET)]);
    hub.wait_worker_state("mask-1", "idle", 20);
    assert!(
        worker.log_text().contains("mask.envs: NOT_SET_HERE is not set"),
        "{}",
        worker.log_text()
    );

    // The value itself, its base64 and hex, split across writes, and a pattern match.
    let script = r#"echo "plain: $DB_PASSWORD"
printf '%s' "$DB_PASSWORD" | base64
printf 'x%s' "$DB_PASSWORD" | base64
printf '%s' "$DB_PASSWORD" | od -An -tx1 | tr -d ' \n'; echo
printf 'split: %s' "$(printf '%s' "$DB_PASSWORD" | cut -c1-7)"; sleep 0.3; printf '%s\n' "$(printf '%s' "$DB_PASSWORD" | cut -c8-)"
echo "key AKIAABCDEFGHIJKLMNOP end"
echo "to stderr: $DB_PASSWORD" >&2"#;
    let out = hub.run(&["exec", "--worker", "mask-1", "--", script]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (so, se) = (stdout(&out), stderr(&out));
    let b64 = |s: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let forbidden = [
        SECRET.to_owned(),
        b64(SECRET.as_bytes())[..20].to_owned(),
        b64(format!("x{SECRET}").as_bytes())[4..24].to_owned(),
        hex::encode(SECRET)[..24].to_owned(),
        "AKIAABCDEFGHIJKLMNOP".to_owned(),
        "Pa55-w0".to_owned(), // no piece of the split write either
        "rd/for+the_DB".to_owned(),
    ];
    for f in &forbidden {
        assert!(
            !so.contains(f.as_str()) && !se.contains(f.as_str()),
            "{f} leaked:\n{so}\n{se}"
        );
    }
    assert!(so.contains("plain: ***\n"), "{so}");
    assert!(so.contains("split: ***\n"), "{so}");
    assert!(so.contains("key *** end"), "{so}");
    assert!(se.contains("to stderr: ***"), "{se}");
    assert!(so.lines().filter(|l| l.contains("***")).count() >= 6, "{so}");

    // The start of what could have been a secret, left in the pipe by a command whose background child
    // keeps the pipe open: sent once the job ends, not lost.
    let out = hub.run(&[
        "exec",
        "--worker",
        "mask-1",
        "--",
        "printf 'tail: Pa55'; sleep 30 &",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "tail: Pa55");

    // The stored output and the worker's own token (read from its config by a job).
    let id = hub.detach("mask-1", &[], &format!("cat {}", setup.config.display()));
    hub.wait_job_state(&id, "succeeded", 20);
    let job = job_json(&hub, &id, false);
    let stored = job["stdout"].as_str().unwrap();
    assert!(
        stored.contains("token: ***") && !stored.contains(&setup.token),
        "{stored}"
    );

    // Eval: console lines, the result, the stash and the error message.
    let code = "console.log('pw=' + cla.env('DB_PASSWORD')); stash.copy = cla.env('DB_PASSWORD'); \
                'result ' + cla.env('DB_PASSWORD')";
    let out = hub.run(&["eval", "--worker", "mask-1", "--json", code]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = stdout(&out) + &stderr(&out);
    assert!(!all.contains(SECRET), "{all}");
    assert!(all.contains("pw=***") && all.contains("result ***"), "{all}");
    let out = hub.run(&[
        "eval",
        "--worker",
        "mask-1",
        "throw new Error('boom ' + cla.env('DB_PASSWORD'))",
    ]);
    assert!(!out.status.success());
    let all = stdout(&out) + &stderr(&out);
    assert!(all.contains("boom ***") && !all.contains(SECRET), "{all}");
    // Nothing of it in the worker's spool or the hub's store either.
    for base in [dir.path().join("spool"), hub.data_dir.clone()] {
        for f in walk(&base) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "the secret is in {}",
                f.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_bad_mask_pattern_is_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yml");
    std::fs::write(
        &config,
        "id: w\ntoken: clatk_x\nurl: http://127.0.0.1:1\nmask:\n  patterns: ['ok[0-9]+', 'broken(']\n",
    )
    .unwrap();
    let out = std::process::Command::new(WORKER)
        .arg("-c")
        .arg(&config)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bad.yml") && err.contains("mask.patterns[1]") && err.contains("broken("),
        "{err}"
    );
}
