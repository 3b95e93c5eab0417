//! What a script can reach besides the language: `console.log/info/warn/error` and the `cla` object
//! (`docs/eval.md` has the reference):
//!
//! | call | returns |
//! |---|---|
//! | `cla.readFile(path)` | the file's text (UTF-8) |
//! | `cla.listDir(path)` | `[{name, type, size}]`, sorted by name; `type` is `file`, `dir`, `symlink` or `other` |
//! | `cla.exists(path)` | `true`/`false` |
//! | `cla.env(name)` | the variable's value or `null` |
//! | `cla.worker` | `{id, tags, envs}` |
//! | `cla.run(cmd)` / `cla.run([argv..])` | `{rc, stdout, stderr}` once the command has ended |
//!
//! Every call that touches the system goes through [`check`] first: the one place where the worker's
//! local policy applies to scripts. Reads (`readFile`, `listDir`, `exists`) must be under
//! `policy.paths.read`; `cla.run` needs the `exec` verb (a script may not run what the hub could not).

use std::cell::RefCell;
use std::path::Path;

use boa_engine::object::ObjectInitializer;
use boa_engine::property::Attribute;
use boa_engine::{
    Context, JsArgs, JsError, JsNativeError, JsObject, JsResult, JsValue, NativeFunction, js_string,
};

use super::WorkerInfo;
use cla_common::process::{exit_status, shell};
use cla_protocol::ConsoleLine;

/// What a host call is about to do, for the policy check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Exec,
    Env,
}

/// The policy gate for host calls, so that scripts never do more than the worker's owner allows.
fn check(access: Access, target: &str) -> JsResult<()> {
    let verdict = POLICY.with(|p| {
        let p = p.borrow();
        match access {
            Access::Read => p.path("eval", cla_config::policy::Access::Read, Path::new(target), None),
            Access::Exec => p.verb("exec").map_err(|e| format!("{e} (cla.run)")),
            Access::Env => Ok(()),
        }
    });
    verdict.map_err(|e| JsNativeError::error().with_message(e).into())
}

/// Console state of the eval running on this thread.
struct Console {
    stream: Option<fn(&ConsoleLine)>,
    lines: Vec<ConsoleLine>,
    bytes: usize,
    max_bytes: usize,
    truncated: bool,
}

thread_local! {
    static CONSOLE: RefCell<Option<Console>> = const { RefCell::new(None) };
    /// The built-in `JSON.stringify`, saved before the script runs.
    static STRINGIFY: RefCell<Option<JsObject>> = const { RefCell::new(None) };
    /// The worker's local policy, for [`check`].
    static POLICY: RefCell<cla_config::policy::Enforcer> = RefCell::new(Default::default());
}

/// The saved built-in `JSON.stringify`.
pub(super) fn builtin_stringify() -> Option<JsObject> {
    STRINGIFY.with(|s| s.borrow().clone())
}

/// Starts collecting console output for an eval on this thread.
pub(super) fn begin(
    stream: Option<fn(&ConsoleLine)>,
    max_bytes: usize,
    policy: cla_config::policy::Enforcer,
) {
    POLICY.with(|p| *p.borrow_mut() = policy);
    CONSOLE.with(|c| {
        *c.borrow_mut() = Some(Console {
            stream,
            lines: Vec::new(),
            bytes: 0,
            max_bytes,
            truncated: false,
        })
    });
}

/// Stops collecting; returns the lines kept and whether some were dropped.
pub(super) fn end() -> (Vec<ConsoleLine>, bool) {
    STRINGIFY.with(|s| *s.borrow_mut() = None);
    CONSOLE.with(|c| {
        c.borrow_mut()
            .take()
            .map(|c| (c.lines, c.truncated))
            .unwrap_or_default()
    })
}

fn log(level: &str, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let mut parts = Vec::with_capacity(args.len());
    for a in args {
        parts.push(render(a, ctx));
    }
    let line = ConsoleLine {
        level: level.to_owned(),
        text: parts.join(" "),
    };
    CONSOLE.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            if let Some(stream) = c.stream {
                stream(&line);
            }
            // Counted as JSON, as it travels (escapes included).
            let size = serde_json::to_string(&line.text)
                .map(|t| t.len())
                .unwrap_or(line.text.len());
            if c.bytes + size <= c.max_bytes {
                c.bytes += size;
                c.lines.push(line);
            } else {
                c.truncated = true;
            }
        }
    });
    Ok(JsValue::undefined())
}

/// How console shows a value: strings as they are, objects as JSON, the rest as JavaScript prints them.
fn render(v: &JsValue, ctx: &mut Context) -> String {
    if let Some(s) = v.as_string() {
        return s.to_std_string_escaped();
    }
    if v.is_object()
        && !v.is_callable()
        && let Ok(Some(json)) = super::engine::stringify(v, ctx)
    {
        return json;
    }
    v.display().to_string()
}

fn console_log(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    log("log", args, ctx)
}
fn console_info(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    log("info", args, ctx)
}
fn console_warn(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    log("warn", args, ctx)
}
fn console_error(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    log("error", args, ctx)
}

/// A string argument, or a TypeError naming the call.
fn string_arg(args: &[JsValue], i: usize, call: &str, ctx: &mut Context) -> JsResult<String> {
    let v = args.get_or_undefined(i);
    if v.is_undefined() || v.is_null() {
        return Err(JsNativeError::typ()
            .with_message(format!("{call}: argument {} is required", i + 1))
            .into());
    }
    Ok(v.to_string(ctx)?.to_std_string_escaped())
}

fn fail(call: &str, target: &str, e: impl std::fmt::Display) -> JsError {
    JsNativeError::error()
        .with_message(format!("{call}({target}): {e}"))
        .into()
}

fn read_file(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let path = string_arg(args, 0, "cla.readFile", ctx)?;
    check(Access::Read, &path)?;
    let text = std::fs::read_to_string(&path).map_err(|e| fail("cla.readFile", &path, e))?;
    Ok(js_string!(text).into())
}

fn list_dir(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let path = string_arg(args, 0, "cla.listDir", ctx)?;
    check(Access::Read, &path)?;
    let mut entries = Vec::new();
    for e in std::fs::read_dir(&path).map_err(|e| fail("cla.listDir", &path, e))? {
        let e = e.map_err(|e| fail("cla.listDir", &path, e))?;
        let meta = e
            .path()
            .symlink_metadata()
            .map_err(|err| fail("cla.listDir", &path, err))?;
        let kind = match meta.file_type() {
            t if t.is_symlink() => "symlink",
            t if t.is_dir() => "dir",
            t if t.is_file() => "file",
            _ => "other",
        };
        entries.push(serde_json::json!({
            "name": e.file_name().to_string_lossy(),
            "type": kind,
            "size": meta.len(),
        }));
    }
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    JsValue::from_json(&serde_json::Value::Array(entries), ctx)
}

fn exists(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let path = string_arg(args, 0, "cla.exists", ctx)?;
    check(Access::Read, &path)?;
    Ok(Path::new(&path).exists().into())
}

fn env(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let name = string_arg(args, 0, "cla.env", ctx)?;
    check(Access::Env, &name)?;
    Ok(match std::env::var(&name) {
        Ok(v) => js_string!(v).into(),
        Err(_) => JsValue::null(),
    })
}

fn run(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let arg = args.get_or_undefined(0);
    let mut cmd = if arg.as_object().is_some_and(|o| o.is_array()) {
        let argv: Vec<String> = match arg.to_json(ctx)? {
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(|i| match i {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let Some((first, rest)) = argv.split_first() else {
            return Err(JsNativeError::typ()
                .with_message("cla.run: the argv array is empty")
                .into());
        };
        check(Access::Exec, first)?;
        let mut c = std::process::Command::new(first);
        c.args(rest);
        c
    } else {
        let line = string_arg(args, 0, "cla.run", ctx)?;
        check(Access::Exec, &line)?;
        shell(&line)
    };
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail("cla.run", "", e))?;
    let rc = exit_status(out.status).0.unwrap_or(-1);
    let result = serde_json::json!({
        "rc": rc,
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
    });
    JsValue::from_json(&result, ctx)
}

/// Installs `console` and `cla` as globals, and saves the built-in `JSON.stringify`.
pub(super) fn install(ctx: &mut Context, worker: &WorkerInfo) -> JsResult<()> {
    let json = ctx.global_object().get(js_string!("JSON"), ctx)?;
    let stringify = match json.as_object() {
        Some(o) => o
            .get(js_string!("stringify"), ctx)?
            .as_object()
            .filter(|f| f.is_callable()),
        None => None,
    };
    STRINGIFY.with(|s| *s.borrow_mut() = stringify);
    let console = ObjectInitializer::new(ctx)
        .function(NativeFunction::from_fn_ptr(console_log), js_string!("log"), 0)
        .function(NativeFunction::from_fn_ptr(console_info), js_string!("info"), 0)
        .function(NativeFunction::from_fn_ptr(console_warn), js_string!("warn"), 0)
        .function(NativeFunction::from_fn_ptr(console_error), js_string!("error"), 0)
        .build();
    ctx.register_global_property(js_string!("console"), console, Attribute::all())?;
    let info = JsValue::from_json(
        &serde_json::to_value(worker).expect("worker info serializes"),
        ctx,
    )?;
    let cla = ObjectInitializer::new(ctx)
        .function(NativeFunction::from_fn_ptr(read_file), js_string!("readFile"), 1)
        .function(NativeFunction::from_fn_ptr(list_dir), js_string!("listDir"), 1)
        .function(NativeFunction::from_fn_ptr(exists), js_string!("exists"), 1)
        .function(NativeFunction::from_fn_ptr(env), js_string!("env"), 1)
        .function(NativeFunction::from_fn_ptr(run), js_string!("run"), 1)
        .property(
            js_string!("worker"),
            info,
            Attribute::READONLY | Attribute::ENUMERABLE,
        )
        .build();
    ctx.register_global_property(
        js_string!("cla"),
        cla,
        Attribute::READONLY | Attribute::ENUMERABLE,
    )?;
    Ok(())
}
