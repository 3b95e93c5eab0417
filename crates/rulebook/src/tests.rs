use super::*;

fn parse(text: &str) -> Result<Rulebook, RulebookError> {
    Rulebook::parse("rb.yml", text)
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn the_forms_of_steps() {
    let book = parse(
        r#"
worker: { tags: [linux] }
vars:
  - app: shop
  - dir: /srv/${app}
do:
  - make test
  - out = shell:
      worker: { tags: [java] }
      cmd: [mvn, -q, package]
      ignore_errors: true
  - shell: ls -la
    name: list
  - ship: { from: dist/, to: /opt/app/ }
  - fetch: { from: /var/log/app.log, to: logs/ }
  - r = eval: "1 + 1"
  - echo: "${out.rc}"
  - set: { n: 1 }
  - if: "{{ out.rc != 0 }}"
    then:
      - fail: broken
    else:
      - echo: fine
  - foreach: [a, b]
    as: x
    do:
      - echo: ${x}
build:
  do:
    - shell: make
deploy:
  - shell: ./deploy.sh
"#,
    )
    .unwrap();
    let names: Vec<&str> = book.sections.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["do", "build", "deploy"]);
    assert_eq!(book.vars.len(), 2);
    let steps = &book.section(None).unwrap().steps;
    let ops: Vec<&str> = steps.iter().map(|s| s.op.name()).collect();
    assert_eq!(
        ops,
        [
            "shell", "shell", "shell", "ship", "fetch", "eval", "echo", "set", "if", "foreach"
        ]
    );
    assert_eq!(steps[0].line, 7);
    assert_eq!(steps[1].line, 8);
    assert_eq!(steps[1].capture.as_deref(), Some("out"));
    assert!(steps[1].ignore_errors);
    assert!(steps[1].worker.is_some(), "worker inside the op's mapping");
    assert_eq!(steps[2].name.as_deref(), Some("list"));
    assert_eq!(steps[5].capture.as_deref(), Some("r"));
    let Op::If { then, otherwise, .. } = &steps[8].op else {
        panic!()
    };
    assert_eq!((then.len(), otherwise.len()), (1, 1));
    assert_eq!(then[0].line, 21);
    let Op::Foreach { var, body, .. } = &steps[9].op else {
        panic!()
    };
    assert_eq!((var.as_str(), body.len()), ("x", 1));
    assert_eq!(book.section(Some("build")).unwrap().steps.len(), 1);
    assert!(
        book.section(Some("test"))
            .unwrap_err()
            .to_string()
            .contains("has: do, build, deploy")
    );
}

#[test]
fn errors_name_the_line() {
    assert_eq!(
        err("do:\n  - echo: hi\n  - shel: ls\n"),
        "rb.yml:3: unknown op `shel`: did you mean `shell`? (ops: shell, ship, fetch, eval, echo, if, foreach, fail, set)"
    );
    assert!(err("do:\n  - frobnicate: 1\n").starts_with("rb.yml:2: unknown op `frobnicate` (ops:"));
    assert_eq!(
        err("do:\n  - shell:\n      cmd: ls\n      cwd: /tmp\n"),
        "rb.yml:4: unknown key `cwd` for `shell` (it takes: worker, ignore_errors, queue_timeout, cmd, args, chdir, env, timeout)"
    );
    assert_eq!(
        err("do:\n  - ship: { to: /x }\n"),
        "rb.yml:2: `ship` needs `from:`"
    );
    assert!(err("do:\n  - echo: a\n    shell: b\n").contains("rb.yml:3: a step has one op"));
    assert!(err("do:\n  - name: x\n").contains("rb.yml:2: this step has no op"));
    assert!(err("do:\n  - if: true\n").contains("rb.yml:2: `if:` needs a `then:` list"));
    assert!(err("do:\n  - foreach: [1]\n").contains("`foreach:` needs a `do:` list"));
    assert!(err("do:\n  - x = if: true\n    then: []\n").contains("`if` has no result to capture"));
    assert!(err("do:\n  - 1x = shell: ls\n").contains("`1x` is not a variable name"));
    assert!(err("do:\n  - echo: hi\n    worker: w1\n").contains("`echo` runs here"));
    assert!(
        err("do:\n  - shell: ls\n    then: []\n").contains("rb.yml:3: `then:` does not go with `shell:`")
    );
    assert!(err("do:\n  - shell: { cmd: ls, env: [A] }\n").contains("`env:` is a mapping"));
    assert!(err("do:\n  - shell: ls\n    ignore_errors: maybe\n").contains("true or false"));
    assert!(err("vars:\n  - a-b: 1\ndo: []\n").contains("rb.yml:2: `a-b` is not a variable name"));
    assert!(err("do: 3\n").contains("`do:` is a number, not a list of ops"));
    assert!(err("- a\n").contains("is a mapping with `do:`"));
    assert!(err("vars: {}\n").contains("has no steps"));
    assert!(err("build:\n  branches: [main]\n  do: []\n").contains("rb.yml:2: unknown key `branches`"));
    // YAML syntax errors keep the parser's line.
    let e = err("do:\n  - shell: ls\n   - bad: [\n");
    assert!(
        e.starts_with("rb.yml:3: not valid YAML") || e.starts_with("rb.yml:4: not valid YAML"),
        "{e}"
    );
    assert_eq!(
        err("do:\n  - echo: a\ndo: []\n"),
        "rb.yml:3: not valid YAML: duplicate mapping key: do"
    );
}

#[test]
fn anchor_holders_are_not_sections() {
    let book =
        parse(".base: &base { worker: { tags: [x] } }\ndo:\n  - shell:\n      <<: *base\n      cmd: ls\n")
            .unwrap();
    assert_eq!(book.sections.len(), 1);
    assert!(book.sections[0].steps[0].worker.is_some());
}

#[test]
fn ignore_errors_is_for_worker_steps() {
    assert!(
        err("do:\n  - echo: hi\n    ignore_errors: true\n").contains(
            "rb.yml:3: `ignore_errors` applies to shell, ship, fetch and eval steps, not to `echo`"
        )
    );
}

#[test]
fn section_choice() {
    let book = parse("build:\n  - shell: make\n").unwrap();
    let e = book.section(None).unwrap_err().to_string();
    assert!(
        e.contains("no `do:` section: pick one of the event sections with --event (build)"),
        "{e}"
    );
}

#[test]
fn suggestions_are_near_only() {
    assert!(unknown_op("fech").contains("did you mean `fetch`"));
    assert!(!unknown_op("deploy").contains("did you mean"));
    assert_eq!(edit_distance("kitten", "sitting"), 3);
}

/// Found by fuzzing (`fuzz/`, target `rulebook`): a key holding carriage returns made a multi-line error.
#[test]
fn an_error_quoting_a_key_with_line_breaks_is_one_line() {
    let text = "# Event sectiond so on; without\ndo:` - [```````         env: { SERVI\r0BB#2\rE\r\r0E\r\r\r0BBCE: \"${svc}\" }\n";
    let raw = "do:\n  - shell: ls\n    \"a\\rb\\nc\": 1\n";
    for t in [text, raw] {
        if let Err(e) = crate::Rulebook::parse("rb.yml", t) {
            let e = e.to_string();
            assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
        }
    }
}
