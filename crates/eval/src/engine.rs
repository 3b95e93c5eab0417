//! One script, one fresh boa context: limits set, host API installed, `stash` as a global, the value of
//! the last expression and the final `stash` converted to JSON the way `JSON.stringify` does (dates become
//! ISO strings, `undefined` members vanish), exceptions turned into a message and a stack.

use boa_engine::property::Attribute;
use boa_engine::{Context, JsError, JsValue, Source, js_string};

use super::EvalInput;
use super::host;
pub use cla_protocol::codec::{MAX_DEPTH, depth};
use cla_protocol::{ConsoleLine, EvalError, EvalOutput};

/// Frames of a JS stack kept in an error.
const MAX_STACK_FRAMES: usize = 30;

/// Runs `input.code`. `stream` (if any) sees each console line as it is logged.
pub fn evaluate(input: &EvalInput, stream: Option<fn(&ConsoleLine)>) -> EvalOutput {
    let mut ctx = Context::default();
    let limits = ctx.runtime_limits_mut();
    limits.set_loop_iteration_limit(input.limits.loop_iterations);
    limits.set_recursion_limit(input.limits.recursion);
    let mut out = EvalOutput::default();
    host::begin(stream, input.limits.max_console_bytes, input.policy.clone());
    let mut run = || -> Result<(), EvalError> {
        host::install(&mut ctx, &input.worker).map_err(|e| describe(&e, &mut ctx))?;
        let stash = match &input.stash {
            serde_json::Value::Null => serde_json::json!({}),
            s => s.clone(),
        };
        let stash = JsValue::from_json(&stash, &mut ctx).map_err(|e| describe(&e, &mut ctx))?;
        ctx.register_global_property(js_string!("stash"), stash, Attribute::all())
            .map_err(|e| describe(&e, &mut ctx))?;
        let value = ctx
            .eval(Source::from_bytes(input.code.as_bytes()))
            .map_err(|e| describe(&e, &mut ctx));
        // The stash is returned even when the code threw: what it did before the error may matter.
        let stash = ctx
            .global_object()
            .get(js_string!("stash"), &mut ctx)
            .map_err(|e| describe(&e, &mut ctx))?;
        out.stash = to_json(&stash, "the stash", input.limits.max_result_bytes, &mut ctx)?;
        out.result = to_json(&value?, "the result", input.limits.max_result_bytes, &mut ctx)?;
        Ok(())
    };
    out.error = run().err();
    (out.console, out.console_truncated) = host::end();
    out
}

/// Converts a value with `JSON.stringify` semantics; functions, symbols and cyclic values are errors.
fn to_json(v: &JsValue, what: &str, max: usize, ctx: &mut Context) -> Result<serde_json::Value, EvalError> {
    let plain = |message: String| EvalError {
        message,
        stack: Vec::new(),
    };
    if v.is_undefined() {
        return Ok(serde_json::Value::Null);
    }
    if v.is_callable() {
        return Err(plain(format!(
            "TypeError: {what} is a function, which has no JSON form"
        )));
    }
    if v.is_symbol() {
        return Err(plain(format!(
            "TypeError: {what} is a symbol, which has no JSON form"
        )));
    }
    let text = stringify(v, ctx).map_err(|e| {
        let inner = describe(&e, ctx);
        plain(format!(
            "TypeError: {what} cannot be converted to JSON: {}",
            strip_kind(&inner.message)
        ))
    })?;
    let Some(text) = text else {
        return Ok(serde_json::Value::Null);
    };
    if text.len() > max {
        return Err(plain(format!(
            "RangeError: {what} is {} bytes of JSON, over the {max}-byte limit",
            text.len()
        )));
    }
    if depth(&text) > MAX_DEPTH {
        return Err(plain(format!(
            "RangeError: {what} nests deeper than {MAX_DEPTH} levels"
        )));
    }
    serde_json::from_str(&text).map_err(|e| plain(format!("TypeError: {what} gave invalid JSON: {e}")))
}

/// `JSON.stringify(v)` — the built-in one, saved before the script ran (a script may replace or delete the
/// global) — or `None` when it returns `undefined`.
pub(super) fn stringify(v: &JsValue, ctx: &mut Context) -> Result<Option<String>, JsError> {
    let f = host::builtin_stringify().ok_or_else(|| {
        JsError::from(boa_engine::JsNativeError::error().with_message("JSON.stringify is unavailable"))
    })?;
    let s = f.call(&JsValue::undefined(), std::slice::from_ref(v), ctx)?;
    if s.is_undefined() {
        Ok(None)
    } else {
        Ok(Some(s.to_string(ctx)?.to_std_string_escaped()))
    }
}

/// `TypeError: x (unknown at :1:7)` → `x (unknown at :1:7)`.
fn strip_kind(message: &str) -> &str {
    message.split_once(": ").map(|(_, m)| m).unwrap_or(message)
}

/// An exception as message + stack. Error objects render as `Kind: message (location)` followed by
/// `at ...` lines; other thrown values are rendered on one line.
fn describe(e: &JsError, ctx: &mut Context) -> EvalError {
    let text = e.to_string();
    let (mut stack, mut message) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("at ") {
            stack.push(t.to_owned());
        } else if !t.is_empty() {
            message.push(t);
        }
    }
    let mut message = message.join(" ");
    if e.as_opaque().is_some() && e.try_native(ctx).is_err() {
        message = format!("Uncaught {message}");
    }
    let frames = stack.len();
    if frames > MAX_STACK_FRAMES {
        stack.truncate(MAX_STACK_FRAMES);
        stack.push(format!("... {} more frames", frames - MAX_STACK_FRAMES));
    }
    EvalError { message, stack }
}

#[cfg(test)]
mod tests;
