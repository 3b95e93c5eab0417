//! Runs a rulebook section through the hub's admin API, step by step: worker ops become jobs (exec,
//! eval, ship, fetch) on the matching worker, the others run here. A [`Reporter`] sees each step as it
//! goes; the [`RunReport`] says what happened.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::template::{self, Vars, render, to_text, truthy};
use super::yaml::Node;
use super::{Op, Rulebook, Step};
use cla_client::{self as transfer, Update};
use cla_client::{AdminClient, ExecEvent};
use cla_protocol::CommandLine;
use cla_protocol::api::{EvalTask, JobRecord, JobSpec, JobState, Target, Task};

mod ops;

use ops::failure;

/// Most output kept for a shell step's `output` (stdout and stderr as they came); `stdout` and `stderr`
/// are the hub's captured copies.
const MAX_CAPTURED_OUTPUT: usize = 4 << 20;

/// What a run is told from outside.
#[derive(Debug, Default)]
pub struct Options {
    /// `--var name=value`, in order; they win over the rulebook's `vars:`.
    pub vars: Vec<(String, String)>,
    /// `--event NAME`: the section to run instead of `do:`.
    pub event: Option<String>,
    /// Fired to stop the run: the running job is cancelled and no further step starts.
    pub cancel: CancellationToken,
}

/// A step that starts, as the reporter sees it.
#[derive(Debug)]
pub struct StepStart<'a> {
    /// How the step is shown: its `name:`, its capture, or its op and argument.
    pub label: &'a str,
    pub op: &'static str,
    pub line: usize,
    /// Nesting inside `if`/`foreach`.
    pub depth: usize,
    /// What it targets (`tags [java]`).
    pub target: &'a str,
}

/// What a run reports as it goes (the CLI draws it; tests may record it).
pub trait Reporter: Send {
    fn step_started(&mut self, step: &StepStart<'_>);
    /// The step's job is queued, for this reason.
    fn waiting(&mut self, why: &str);
    /// The step's job started on `worker`.
    fn started(&mut self, worker: &str);
    /// Output of the running step, as it comes.
    fn output(&mut self, data: &[u8], stderr: bool);
    /// Bytes moved by a ship or fetch.
    fn progress(&mut self, done: u64, total: u64);
    fn step_ended(&mut self, step: &StepReport);
    /// An `echo`.
    fn echo(&mut self, text: &str);
}

/// How one step went.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub line: usize,
    pub op: &'static str,
    pub name: String,
    pub worker: Option<String>,
    pub job: Option<String>,
    /// `succeeded`, or the job's end state (`failed`, `timed_out`, `cancelled`, `lost`), or `error`
    /// when the step could not be run at all.
    pub state: String,
    pub ok: bool,
    /// Failed, but `ignore_errors: true` let the run go on.
    pub ignored: bool,
    pub rc: Option<i32>,
    pub seconds: f64,
    pub error: Option<String>,
}

/// How the run went (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub rulebook: String,
    pub section: String,
    pub ok: bool,
    pub cancelled: bool,
    pub seconds: f64,
    /// Why the run stopped: `FILE:LINE: step `NAME`: reason`.
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
}

enum Stop {
    Failed(String),
    Cancelled,
}

struct Runner<'a> {
    client: &'a AdminClient,
    book: &'a Rulebook,
    vars: Vars,
    /// Variables that hold a worker step's capture (trimmed in an eval's default stash).
    captures: std::collections::HashSet<String>,
    reporter: &'a mut dyn Reporter,
    cancel: CancellationToken,
    steps: Vec<StepReport>,
}

/// Runs `book`'s `do:` (or `--event`) section. Errors that stop the run are in the report.
pub async fn run(
    client: &AdminClient,
    book: &Rulebook,
    opts: Options,
    reporter: &mut dyn Reporter,
) -> RunReport {
    let started = Instant::now();
    let section_name = opts.event.clone().unwrap_or_else(|| "do".into());
    let mut runner = Runner {
        client,
        book,
        vars: Vars::new(),
        captures: Default::default(),
        reporter,
        cancel: opts.cancel.clone(),
        steps: Vec::new(),
    };
    let outcome = match book.section(opts.event.as_deref()) {
        Err(e) => Err(Stop::Failed(e.to_string())),
        Ok(section) => match runner.start(&opts) {
            Err(e) => Err(Stop::Failed(e)),
            Ok(()) => runner.run_steps(&section.steps, 0).await,
        },
    };
    let (ok, cancelled, error) = match outcome {
        Ok(()) => (true, false, None),
        Err(Stop::Cancelled) => (false, true, Some("cancelled".to_owned())),
        Err(Stop::Failed(e)) => (false, false, Some(e)),
    };
    RunReport {
        rulebook: book.file.clone(),
        section: section_name,
        ok,
        cancelled,
        seconds: started.elapsed().as_secs_f64(),
        error,
        steps: runner.steps,
    }
}

type StepsFuture<'s> = Pin<Box<dyn Future<Output = Result<(), Stop>> + Send + 's>>;

impl<'a> Runner<'a> {
    /// The variables before the first step: built-ins, `--var`s, then `vars:` (each may use the ones
    /// before it).
    fn start(&mut self, opts: &Options) -> Result<(), String> {
        self.vars.insert("rulebook".into(), json!(self.book.file));
        self.vars.insert(
            "event".into(),
            json!(opts.event.clone().unwrap_or_else(|| "do".into())),
        );
        for (k, v) in &opts.vars {
            if !template::is_name(k) {
                return Err(format!("--var {k}=…: `{k}` is not a variable name"));
            }
            // A list or an object given as JSON stays one (`--var 'hosts=["a","b"]'`).
            let value = match v.trim_start().chars().next() {
                Some('[' | '{') => serde_json::from_str(v).unwrap_or_else(|_| json!(v)),
                _ => json!(v),
            };
            self.vars.insert(k.clone(), value);
        }
        for (k, node) in &self.book.vars {
            if opts.vars.iter().any(|(name, _)| name == &k.name) {
                continue;
            }
            let v = render(&node.to_json(), &self.vars)
                .map_err(|e| self.at(node.line, &format!("vars: {}", k.name), &e))?;
            self.vars.insert(k.name.clone(), v);
        }
        Ok(())
    }

    /// `FILE:LINE: step `NAME`: message`.
    fn at(&self, line: usize, name: &str, message: &str) -> String {
        format!("{}:{line}: step `{name}`: {message}", self.book.file)
    }

    fn run_steps<'s>(&'s mut self, steps: &'a [Step], depth: usize) -> StepsFuture<'s>
    where
        'a: 's,
    {
        Box::pin(async move {
            for step in steps {
                if self.cancel.is_cancelled() {
                    return Err(Stop::Cancelled);
                }
                self.run_step(step, depth).await?;
            }
            Ok(())
        })
    }

    fn fill(&self, node: &Node, label: &str) -> Result<Json, Stop> {
        render(&node.to_json(), &self.vars).map_err(|e| Stop::Failed(self.at(node.line, label, &e)))
    }

    /// A worker op's arguments, filled in. An eval's code is sent as written: JavaScript has `${}` of its
    /// own (template literals), and the code reads the rulebook's variables from `stash`.
    fn fill_args(&self, step: &Step) -> Result<Json, String> {
        match &step.op {
            Op::Eval(n) => match n.to_json() {
                Json::Object(mut m) => {
                    let code = m.remove("code");
                    let mut filled = render(&Json::Object(m), &self.vars)?;
                    if let (Json::Object(f), Some(code)) = (&mut filled, code) {
                        f.insert("code".into(), code);
                    }
                    Ok(filled)
                }
                code => Ok(code),
            },
            Op::Shell(n) | Op::Ship(n) | Op::Fetch(n) => render(&n.to_json(), &self.vars),
            _ => unreachable!("worker ops only"),
        }
    }

    async fn run_step(&mut self, step: &'a Step, depth: usize) -> Result<(), Stop> {
        let label = label(step);
        match &step.op {
            Op::Echo(n) => {
                let text = to_text(&self.fill(n, &label)?);
                self.reporter.echo(&text);
                if let Some(c) = &step.capture {
                    self.vars.insert(c.clone(), json!({ "output": text }));
                }
                Ok(())
            }
            Op::Fail(n) => {
                let text = to_text(&self.fill(n, &label)?);
                let message = if text.is_empty() {
                    "the rulebook failed here".to_owned()
                } else {
                    text
                };
                Err(Stop::Failed(self.at(
                    step.line,
                    &label,
                    &format!("fail: {message}"),
                )))
            }
            Op::Set(n) => {
                let values = self.fill(n, &label)?;
                if let Json::Object(m) = values {
                    self.vars.extend(m);
                }
                Ok(())
            }
            Op::If {
                cond,
                then,
                otherwise,
            } => {
                let holds = truthy(&self.fill(cond, &label)?);
                self.run_steps(if holds { then } else { otherwise }, depth + 1)
                    .await
            }
            Op::Foreach { items, var, body } => {
                let list = match self.fill(items, &label)? {
                    Json::Array(list) => list,
                    other => {
                        return Err(Stop::Failed(self.at(
                            items.line,
                            &label,
                            &format!("foreach needs a list, and this is {}", short(&other)),
                        )));
                    }
                };
                // The loop variables exist inside the loop only: what they shadowed comes back after it.
                let index = format!("{var}_index");
                let saved = (self.vars.get(var).cloned(), self.vars.get(&index).cloned());
                let mut result = Ok(());
                for (i, item) in list.into_iter().enumerate() {
                    self.vars.insert(var.clone(), item);
                    self.vars.insert(index.clone(), json!(i));
                    result = self.run_steps(body, depth + 1).await;
                    if result.is_err() {
                        break;
                    }
                }
                for (name, old) in [(var.clone(), saved.0), (index, saved.1)] {
                    match old {
                        Some(v) => self.vars.insert(name, v),
                        None => self.vars.remove(&name),
                    };
                }
                result
            }
            Op::Shell(_) | Op::Ship(_) | Op::Fetch(_) | Op::Eval(_) => {
                self.on_worker(step, &label, depth).await
            }
        }
    }

    /// A step that runs as a job on a worker.
    async fn on_worker(&mut self, step: &'a Step, label: &str, depth: usize) -> Result<(), Stop> {
        let started = Instant::now();
        let prepared = self.target(step).and_then(|mut t| {
            let args = self.fill_args(step)?;
            // `queue_timeout` may also sit in the op's mapping, beside its other options.
            if let Some(q) = args.get("queue_timeout") {
                t.queue_timeout_secs = Some(seconds(q).map_err(|e| format!("queue_timeout: {e}"))?);
            }
            Ok((t, args))
        });
        let (target, args) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.capture_failure(step, &e);
                return self.ended(step, label, None, Err(e), started);
            }
        };
        // Shown with its values filled in.
        let label = &named(step).unwrap_or_else(|| auto_label(step.op.name(), &args));
        self.reporter.step_started(&StepStart {
            label,
            op: step.op.name(),
            line: step.line,
            depth,
            target: &target.describe(),
        });
        let result = match &step.op {
            Op::Shell(_) => self.shell(target, args).await,
            Op::Eval(_) => self.eval(target, args).await,
            Op::Ship(_) => self.transfer(true, target, args).await,
            Op::Fetch(_) => self.transfer(false, target, args).await,
            _ => unreachable!("worker ops only"),
        };
        match result {
            Ok((record, capture)) => {
                let failure = failure(&record, self.cancel.is_cancelled());
                if let Some(c) = &step.capture {
                    let mut capture = capture;
                    if let Json::Object(m) = &mut capture {
                        m.insert("ok".into(), json!(failure.is_none()));
                        m.insert("worker".into(), json!(record.worker));
                        m.insert("job".into(), json!(record.id));
                        m.insert("state".into(), json!(record.state.as_str()));
                    }
                    self.vars.insert(c.clone(), capture);
                    self.captures.insert(c.clone());
                }
                if record.state == JobState::Cancelled && self.cancel.is_cancelled() {
                    let report = self.report(step, label, Some(&record), Some("cancelled".into()), started);
                    self.reporter.step_ended(&report);
                    self.steps.push(report);
                    return Err(Stop::Cancelled);
                }
                self.ended(step, label, Some(&record), failure.map_or(Ok(()), Err), started)
            }
            Err(e) => {
                self.capture_failure(step, &e);
                self.ended(step, label, None, Err(e), started)
            }
        }
    }

    /// A step that failed before its job could run still sets its capture, so that a step with
    /// `ignore_errors` can be followed by `if: "{{ !NAME.ok }}"`.
    fn capture_failure(&mut self, step: &Step, error: &str) {
        if let Some(c) = &step.capture {
            self.vars.insert(
                c.clone(),
                json!({"ok": false, "state": "error", "error": error, "worker": null, "job": null}),
            );
            self.captures.insert(c.clone());
        }
    }

    fn report(
        &self,
        step: &Step,
        label: &str,
        record: Option<&JobRecord>,
        error: Option<String>,
        started: Instant,
    ) -> StepReport {
        StepReport {
            line: step.line,
            op: step.op.name(),
            name: label.to_owned(),
            worker: record.and_then(|r| r.worker.clone()),
            job: record.map(|r| r.id.clone()),
            state: match record {
                Some(r) if error.is_some() && r.state == JobState::Succeeded => "failed".to_owned(),
                Some(r) => r.state.as_str().to_owned(),
                None => "error".to_owned(),
            },
            ok: error.is_none(),
            ignored: error.is_some() && step.ignore_errors,
            rc: record.and_then(|r| r.rc),
            seconds: started.elapsed().as_secs_f64(),
            error,
        }
    }

    /// Records the step's end; a failure stops the run unless the step ignores errors.
    fn ended(
        &mut self,
        step: &Step,
        label: &str,
        record: Option<&JobRecord>,
        outcome: Result<(), String>,
        started: Instant,
    ) -> Result<(), Stop> {
        let report = self.report(step, label, record, outcome.clone().err(), started);
        self.reporter.step_ended(&report);
        self.steps.push(report);
        match outcome {
            Err(e) if !step.ignore_errors => Err(Stop::Failed(self.at(step.line, label, &e))),
            _ => Ok(()),
        }
    }
}

/// How a step is shown: `name:`, else its capture, else op and (short) argument as written.
fn label(step: &Step) -> String {
    let args = match &step.op {
        Op::Shell(n) | Op::Ship(n) | Op::Fetch(n) | Op::Eval(n) => n.to_json(),
        _ => Json::Null,
    };
    named(step).unwrap_or_else(|| auto_label(step.op.name(), &args))
}

fn named(step: &Step) -> Option<String> {
    step.name.clone().or_else(|| step.capture.clone())
}

/// `shell make test`, `ship dist/ → /opt/app/`: the op and the start of its argument.
fn auto_label(op: &str, args: &Json) -> String {
    let field = |k: &str| args.get(k).map(to_text).unwrap_or_default();
    let arg = match (op, args) {
        (_, Json::String(s)) => s.clone(),
        ("shell", Json::Array(words)) => words.iter().map(to_text).collect::<Vec<_>>().join(" "),
        ("shell", Json::Object(_)) => match args.get("cmd") {
            Some(Json::Array(words)) => words.iter().map(to_text).collect::<Vec<_>>().join(" "),
            _ => field("cmd"),
        },
        ("ship" | "fetch", _) => format!("{} → {}", field("from"), field("to")),
        ("eval", _) => field("code"),
        _ => String::new(),
    };
    let arg = arg.lines().next().unwrap_or("").trim().to_owned();
    let arg = match arg.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &arg[..i]),
        None => arg,
    };
    format!("{op} {arg}").trim_end().to_owned()
}

/// A value named in an error: its kind, and itself when short.
fn short(v: &Json) -> String {
    let text = v.to_string();
    let kind = match v {
        Json::Null => return "empty".into(),
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "a mapping",
    };
    if text.chars().count() <= 40 {
        format!("{kind} ({text})")
    } else {
        kind.to_owned()
    }
}

/// Seconds from a number or a numeric string.
fn seconds(v: &Json) -> Result<f64, String> {
    let n = match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.filter(|n| *n > 0.0 && n.is_finite())
        .ok_or_else(|| format!("a positive number of seconds, not {}", short(v)))
}

/// JSON equality that takes numbers by value: a stash round trip through JavaScript turns `2.0` into `2`
/// and big integers into floats, which is not a change the code made.
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Appends to a captured output, up to [`MAX_CAPTURED_OUTPUT`].
fn keep(buf: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_CAPTURED_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..room.min(data.len())]);
}

fn trim_end(s: &str) -> String {
    s.trim_end_matches(['\n', '\r']).to_owned()
}

#[cfg(test)]
mod tests;
