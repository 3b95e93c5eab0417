//! `{{ js }}` template expressions (rulebooks), under the same kinds of limits as an eval: loop
//! iterations, call depth and result size inside the engine; wall clock and memory around it.
//!
//! boa cannot stop a running script, and its regex engine backtracks without a bound, so the wall clock
//! and the memory cap need a process: once a binary has called [`use_child_process`] (both binaries do,
//! after [`crate::child::main`]), each expression runs in a child of the current executable, which is
//! killed at the deadline and whose address space is capped. Without it (library users, unit tests)
//! expressions run in this process with the engine's limits only.
//!
//! The expression sees the variables as globals (except names JavaScript already has, like `JSON`, which
//! keep their meaning) and a `quote(x)` helper; it has no host API: a template reads nothing and runs
//! nothing. The API is synchronous; an async caller runs it with `spawn_blocking`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use boa_engine::property::Attribute;
use boa_engine::{Context, JsString, JsValue, Source};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// Set (to `1`) in the environment of a template child.
pub const TEMPLATE_CHILD_ENV: &str = "CLA_TEMPLATE_CHILD";

/// Limits of one expression.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemplateLimits {
    pub timeout: Duration,
    pub memory_mib: u64,
    pub loop_iterations: u64,
    pub recursion: usize,
    /// Largest value (JSON bytes) an expression may give.
    pub max_result_bytes: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        TemplateLimits {
            timeout: Duration::from_secs(5),
            memory_mib: 512,
            loop_iterations: 1_000_000,
            recursion: 256,
            max_result_bytes: 1 << 20,
        }
    }
}

/// What a template child reads on stdin.
#[derive(Serialize, Deserialize)]
struct Input {
    code: String,
    vars: Map<String, Json>,
    limits: TemplateLimits,
}

/// What a template child writes on stdout: the value, or why not.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Output {
    Value(Json),
    Error(String),
}

static CHILD_EXE: OnceLock<PathBuf> = OnceLock::new();

/// Runs every expression from now on in a child process of `exe` (the current executable, which calls
/// [`crate::child::main`] first thing).
pub fn use_child_process(exe: PathBuf) {
    let _ = CHILD_EXE.set(exe);
}

/// Evaluates `code` with `vars` as globals. The error is one line, without the expression (the caller
/// names the rulebook, the line and the expression).
pub fn evaluate(code: &str, vars: &Map<String, Json>, limits: &TemplateLimits) -> Result<Json, String> {
    match CHILD_EXE.get() {
        Some(exe) => in_child(exe, code, vars, limits),
        None => evaluate_here(code, vars, limits),
    }
}

/// Helpers every expression can use: `quote(x)` makes `x` one word for a POSIX shell.
const HELPERS: &str = "if (!Object.prototype.hasOwnProperty.call(globalThis, 'quote')) \
    globalThis.quote = function (s) { return \"'\" + String(s).replace(/'/g, \"'\\\\''\") + \"'\"; };";

/// Evaluates in this process, with the engine's limits (loops, calls, result size) only.
pub fn evaluate_here(code: &str, vars: &Map<String, Json>, limits: &TemplateLimits) -> Result<Json, String> {
    let first = |e: String| e.lines().next().unwrap_or("error").to_owned();
    let mut ctx = Context::default();
    let rl = ctx.runtime_limits_mut();
    rl.set_loop_iteration_limit(limits.loop_iterations);
    rl.set_recursion_limit(limits.recursion);
    for (name, value) in vars {
        if !is_name(name) {
            continue;
        }
        let key = JsString::from(name.as_str());
        let global = ctx.global_object();
        if global.has_own_property(key.clone(), &mut ctx).unwrap_or(true) {
            continue;
        }
        let v = JsValue::from_json(value, &mut ctx).map_err(|e| first(e.to_string()))?;
        ctx.register_global_property(key, v, Attribute::all())
            .map_err(|e| first(e.to_string()))?;
    }
    ctx.eval(Source::from_bytes(HELPERS))
        .map_err(|e| first(e.to_string()))?;
    let v = ctx
        .eval(Source::from_bytes(code.as_bytes()))
        .map_err(|e| first(e.to_string()))?;
    if v.is_callable() {
        return Err("the expression is a function, which has no value to use".into());
    }
    let json = v
        .to_json(&mut ctx)
        .map_err(|e| first(e.to_string()))?
        .unwrap_or(Json::Null);
    let size = serde_json::to_vec(&json).map_or(0, |b| b.len());
    if size > limits.max_result_bytes {
        return Err(format!(
            "the value is {size} bytes of JSON: at most {} (the template limit)",
            limits.max_result_bytes
        ));
    }
    Ok(json)
}

/// A variable name: a letter or `_`, then letters, digits and `_` (usable as a JavaScript global, and
/// in `${name}`).
pub fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn in_child(
    exe: &PathBuf,
    code: &str,
    vars: &Map<String, Json>,
    limits: &TemplateLimits,
) -> Result<Json, String> {
    let input = serde_json::to_vec(&Input {
        code: code.to_owned(),
        vars: vars.clone(),
        limits: *limits,
    })
    .map_err(|e| format!("cannot pass the variables to the template process: {e}"))?;
    let mut child = Command::new(exe)
        .env(TEMPLATE_CHILD_ENV, "1")
        .env_remove(crate::child::CHILD_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the template process {}: {e}", exe.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Bounded reads: the child writes one value of at most `max_result_bytes`, and a line on a crash.
    let cap = limits.max_result_bytes as u64 + 4096;
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(cap).read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limits.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("waiting for the template process failed: {e}")),
        }
    };
    let _ = writer.join();
    let out = out.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        return Err(format!(
            "took longer than {} s (the template time limit): keep templates to small expressions",
            limits.timeout.as_secs_f64()
        ));
    };
    match serde_json::from_slice::<Output>(&out) {
        Ok(Output::Value(v)) => Ok(v),
        Ok(Output::Error(e)) => Err(e),
        Err(_) if is_oom(&err) => Err(format!(
            "ran out of memory (the template limit is {} MiB)",
            limits.memory_mib
        )),
        Err(_) => Err(format!(
            "the template process ended without a value ({status}){}",
            err.lines()
                .next()
                .map(|l| format!(": {}", cla_common::util::one_line(l, 200)))
                .unwrap_or_default()
        )),
    }
}

/// What a child that hit its address-space cap says on stderr (Rust's allocation failure, or libc's).
fn is_oom(stderr: &str) -> bool {
    ["memory allocation", "out of memory", "Cannot allocate memory"]
        .iter()
        .any(|s| stderr.contains(s))
}

/// If this process is a template child, evaluates the expression on stdin, writes the result to stdout
/// and returns true; otherwise false. Called by [`crate::child::main`].
pub(crate) fn child_main() -> bool {
    if std::env::var_os(TEMPLATE_CHILD_ENV).is_none() {
        return false;
    }
    let mut raw = Vec::new();
    let out = match std::io::stdin().take(64 << 20).read_to_end(&mut raw) {
        Err(e) => Output::Error(format!("cannot read the expression: {e}")),
        Ok(_) => match serde_json::from_slice::<Input>(&raw) {
            Err(e) => Output::Error(format!("bad template request: {e}")),
            Ok(input) => {
                crate::child::cap_memory(input.limits.memory_mib);
                match evaluate_here(&input.code, &input.vars, &input.limits) {
                    Ok(v) => Output::Value(v),
                    Err(e) => Output::Error(e),
                }
            }
        },
    };
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, &out);
    let _ = stdout.flush();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_the_engine_limits_hold() {
        let limits = TemplateLimits::default();
        let vars = Map::new();
        let e = evaluate_here("while (true) {}", &vars, &limits).unwrap_err();
        assert!(e.contains("loop"), "{e}");
        let e = evaluate_here("new Array(700000).fill(1)", &vars, &limits).unwrap_err();
        assert!(e.contains("at most 1048576 (the template limit)"), "{e}");
        assert_eq!(
            evaluate_here("1 + 1", &vars, &limits).unwrap(),
            serde_json::json!(2)
        );
    }
}
