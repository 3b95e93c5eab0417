use serde_json::json;

use super::*;
use crate::{EvalLimits, WorkerInfo};

fn run(code: &str) -> EvalOutput {
    run_with(code, json!({}))
}

fn run_with(code: &str, stash: serde_json::Value) -> EvalOutput {
    let input = EvalInput {
        code: code.into(),
        stash,
        worker: WorkerInfo {
            id: "w1".into(),
            tags: vec!["linux".into()],
            envs: vec!["QA".into()],
        },
        limits: EvalLimits {
            loop_iterations: 100_000,
            ..Default::default()
        },
        policy: Default::default(),
    };
    evaluate(&input, None)
}

#[test]
fn arithmetic_and_undefined() {
    assert_eq!(run("1+1").result, json!(2));
    assert_eq!(run("undefined").result, json!(null));
    assert_eq!(run("let x = 3;").result, json!(null));
    assert!(run("1+1").error.is_none());
}

#[test]
fn stash_goes_in_and_comes_back_changed() {
    let out = run_with(
        "stash.count += 1; stash.list.push('c'); stash.added = {ok: true}; stash.count",
        json!({"count": 41, "list": ["a", "b"]}),
    );
    assert_eq!(out.result, json!(42));
    assert_eq!(
        out.stash,
        json!({"count": 42, "list": ["a", "b", "c"], "added": {"ok": true}})
    );
    // Reassigning the global works too; a null stash starts as {}.
    let out = run_with("stash = {fresh: 1}; 0", serde_json::Value::Null);
    assert_eq!(out.stash, json!({"fresh": 1}));
}

#[test]
fn nested_values_convert_like_json_stringify() {
    let out = run(
        "({n: 1.5, s: 'x', b: true, nil: null, u: undefined, arr: [1, [2, {deep: 'y'}]], d: new Date(0)})",
    );
    assert_eq!(
        out.result,
        json!({"n": 1.5, "s": "x", "b": true, "nil": null, "arr": [1, [2, {"deep": "y"}]], "d": "1970-01-01T00:00:00.000Z"})
    );
}

#[test]
fn functions_and_cyclic_values_are_clear_errors() {
    let e = run("(function f() {})").error.unwrap();
    assert!(e.message.contains("the result is a function"), "{e:?}");
    let e = run("let a = {}; a.self = a; a").error.unwrap();
    assert!(
        e.message.contains("cannot be converted to JSON") && e.message.contains("cyclic"),
        "{e:?}"
    );
    let e = run("stash.me = stash; 1").error.unwrap();
    assert!(e.message.contains("the stash cannot be converted"), "{e:?}");
}

#[test]
fn syntax_errors_say_where() {
    let e = run("let = ;").error.unwrap();
    assert!(e.message.starts_with("SyntaxError:"), "{e:?}");
    assert!(e.message.contains("line 1"), "{e:?}");
}

#[test]
fn thrown_errors_carry_message_and_stack() {
    let e = run("function inner() { throw new Error('boom') }\nfunction outer() { inner() }\nouter()")
        .error
        .unwrap();
    assert!(e.message.starts_with("Error: boom"), "{e:?}");
    assert!(e.stack.iter().any(|f| f.contains("inner")), "{e:?}");
    assert!(e.stack.iter().any(|f| f.contains("outer")), "{e:?}");
    let e = run("throw 42").error.unwrap();
    assert_eq!(e.message, "Uncaught 42");
    let e = run("null.x").error.unwrap();
    assert!(e.message.starts_with("TypeError"), "{e:?}");
}

#[test]
fn runaway_loops_and_recursion_hit_the_limits() {
    let e = run("while (true) {}").error.unwrap();
    assert!(
        e.message.contains("RuntimeLimitError") && e.message.contains("loop"),
        "{e:?}"
    );
    let e = run("function f(n) { return f(n + 1) } f(0)").error.unwrap();
    assert!(
        e.message.contains("RuntimeLimitError") && e.message.contains("recursi"),
        "{e:?}"
    );
    assert!(e.stack.len() <= 31, "stack is capped: {}", e.stack.len());
}

#[test]
fn console_is_captured_in_order() {
    let out = run(
        "console.log('a', 1, {k: [1]}); console.warn('careful'); console.error(new Error('x').message); console.info(null, undefined); 7",
    );
    let lines: Vec<(String, String)> = out
        .console
        .iter()
        .map(|l| (l.level.clone(), l.text.clone()))
        .collect();
    assert_eq!(
        lines,
        [
            ("log".into(), "a 1 {\"k\":[1]}".into()),
            ("warn".into(), "careful".into()),
            ("error".into(), "x".into()),
            ("info".into(), "null undefined".into()),
        ]
    );
    assert_eq!(out.result, json!(7));
}

#[test]
fn console_output_is_capped() {
    let input = EvalInput {
        code: "for (let i = 0; i < 100; i++) console.log('0123456789')".into(),
        limits: EvalLimits {
            max_console_bytes: 55,
            ..Default::default()
        },
        ..Default::default()
    };
    let out = evaluate(&input, None);
    // Counted as JSON strings: 12 bytes a line.
    assert_eq!(out.console.len(), 4);
    assert!(out.console_truncated);
}

// Unix paths and `sh` syntax in the script.
#[cfg(unix)]
#[test]
fn host_api() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "hello file").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let d = dir.path().display();
    let out = run(&format!(
        r#"({{
            text: cla.readFile('{d}/a.txt'),
            list: cla.listDir('{d}').map(e => e.name + ':' + e.type),
            yes: cla.exists('{d}/a.txt'),
            no: cla.exists('{d}/missing'),
            path: cla.env('PATH') !== null,
            none: cla.env('CLA_SURELY_UNSET_VARIABLE'),
            me: cla.worker,
            shell: cla.run('echo out; echo err >&2; exit 3'),
            argv: cla.run(['printf', '%s', 'a b']).stdout,
        }})"#
    ));
    assert!(out.error.is_none(), "{:?}", out.error);
    let r = out.result;
    assert_eq!(r["text"], "hello file");
    assert_eq!(r["list"], json!(["a.txt:file", "sub:dir"]));
    assert_eq!((r["yes"].clone(), r["no"].clone()), (json!(true), json!(false)));
    assert_eq!(r["path"], true);
    assert_eq!(r["none"], json!(null));
    assert_eq!(r["me"], json!({"id": "w1", "tags": ["linux"], "envs": ["QA"]}));
    assert_eq!(r["shell"], json!({"rc": 3, "stdout": "out\n", "stderr": "err\n"}));
    assert_eq!(r["argv"], "a b");
    let e = run(&format!("cla.readFile('{d}/missing')")).error.unwrap();
    assert!(
        e.message.contains("cla.readFile") && e.message.contains("missing"),
        "{e:?}"
    );
    let e = run("cla.readFile()").error.unwrap();
    assert!(
        e.message
            .starts_with("TypeError: cla.readFile: argument 1 is required"),
        "{e:?}"
    );
}

#[test]
fn scripts_cannot_break_the_json_conversion() {
    let out = run("JSON.stringify = null; ({a: 1})");
    assert_eq!(out.result, json!({"a": 1}), "{:?}", out.error);
    let out = run("delete globalThis.JSON; console.log({k: 1}); stash.x = [1]; 2");
    assert_eq!(
        (out.result.clone(), out.stash.clone()),
        (json!(2), json!({"x": [1]})),
        "{:?}",
        out.error
    );
    assert_eq!(out.console[0].text, "{\"k\":1}");
    let out = run("JSON.stringify = () => 'nope'; [1]");
    assert_eq!(out.result, json!([1]));
}

#[test]
fn deep_nesting_is_refused() {
    let e = run("let o = 1; for (let i = 0; i < 65; i++) o = {a: o}; o")
        .error
        .unwrap();
    assert!(e.message.contains("nests deeper than 64"), "{e:?}");
    assert_eq!(
        run("let o = 1; for (let i = 0; i < 60; i++) o = [o]; o").error,
        None
    );
    let e = run("let o = 1; for (let i = 0; i < 200; i++) o = {a: o}; stash.deep = o; 1")
        .error
        .unwrap();
    assert!(e.message.contains("the stash nests deeper"), "{e:?}");
}

#[test]
fn json_depth_ignores_brackets_in_strings() {
    assert_eq!(depth("1"), 0);
    assert_eq!(depth(r#"[1,{"a":[2]}]"#), 3);
    assert_eq!(depth(r#"{"s":"[[[{{{\"]]]"}"#), 1);
}
