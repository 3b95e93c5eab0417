//! Rulebooks (`docs/rulebooks.md`): Clarive-style YAML pipelines that `cla-hub run` executes against connected
//! workers. This module parses them ([`Rulebook::parse`]), fills in templates ([`template`]) and runs them
//! ([`run`]) through the hub's admin API; docs/rulebooks.md is the guide.
//!
//! Parsing checks the whole file before anything runs: every step's op, keys and nesting, each with its
//! line. Values are filled in only when their step runs, since they may use what earlier steps captured.

pub mod run;
pub mod template;
pub mod yaml;

use std::fmt;

use yaml::{Key, Node, Value};

/// A parsed rulebook.
#[derive(Debug, Clone)]
pub struct Rulebook {
    /// How errors name the file.
    pub file: String,
    /// `vars:` in order (later ones may use earlier ones).
    pub vars: Vec<(Key, Node)>,
    /// The top-level `worker:`: the target of steps that name none.
    pub worker: Option<Node>,
    /// `do:` and the event sections (`build:`, `test:`, `deploy:`, ...), in file order.
    pub sections: Vec<Section>,
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub line: usize,
    pub steps: Vec<Step>,
}

/// One step: an op, and what applies to it.
#[derive(Debug, Clone)]
pub struct Step {
    pub line: usize,
    pub op: Op,
    /// `NAME = op:` keeps the op's result as variable NAME.
    pub capture: Option<String>,
    /// `name:`: how the step is shown.
    pub name: Option<String>,
    /// `ignore_errors: true`: a failure is reported and the run goes on.
    pub ignore_errors: bool,
    /// `worker:` for this step (overrides the rulebook's).
    pub worker: Option<Node>,
}

/// What a step does. Arguments stay YAML until the step runs (they may use templates).
#[derive(Debug, Clone)]
pub enum Op {
    /// A command: a string (through the worker's shell), a list (argv), or `{cmd, args, chdir, env,
    /// timeout}`.
    Shell(Node),
    /// `{from: <hub path>, to: <worker path>, mkdir}`.
    Ship(Node),
    /// `{from: <worker path>, to: <hub path>, mkdir}`.
    Fetch(Node),
    /// Code, or `{code, stash, timeout}`.
    Eval(Node),
    Echo(Node),
    Fail(Node),
    /// `{name: value, ...}`: sets variables.
    Set(Node),
    If {
        cond: Node,
        then: Vec<Step>,
        otherwise: Vec<Step>,
    },
    Foreach {
        items: Node,
        var: String,
        body: Vec<Step>,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Shell(_) => "shell",
            Op::Ship(_) => "ship",
            Op::Fetch(_) => "fetch",
            Op::Eval(_) => "eval",
            Op::Echo(_) => "echo",
            Op::Fail(_) => "fail",
            Op::Set(_) => "set",
            Op::If { .. } => "if",
            Op::Foreach { .. } => "foreach",
        }
    }

    /// True for the ops that run on a worker.
    pub fn on_worker(&self) -> bool {
        matches!(self, Op::Shell(_) | Op::Ship(_) | Op::Fetch(_) | Op::Eval(_))
    }
}

/// The ops, as written in a rulebook.
pub const OPS: &[&str] = &[
    "shell", "ship", "fetch", "eval", "echo", "if", "foreach", "fail", "set",
];

/// Keys of the rulebook's top level that are not sections.
const TOP_KEYS: &[&str] = &["vars", "worker", "name", "description"];

/// An error in a rulebook: `FILE:LINE: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct RulebookError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RulebookError {
    /// One line whatever the file holds: text quoted from it (a key with a carriage return, say) is
    /// escaped, and a very long message is cut.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let message = cla_common::util::one_line(&self.message, 1000);
        if self.line > 0 {
            write!(f, "{}:{}: {message}", self.file, self.line)
        } else {
            write!(f, "{}: {message}", self.file)
        }
    }
}

impl std::error::Error for RulebookError {}

/// Parsing context: the file name, for errors.
struct P<'a> {
    file: &'a str,
}

impl P<'_> {
    fn err(&self, line: usize, message: impl Into<String>) -> RulebookError {
        RulebookError {
            file: self.file.to_owned(),
            line,
            message: message.into(),
        }
    }
}

impl Rulebook {
    /// Parses rulebook text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Rulebook, RulebookError> {
        let p = P { file };
        let root: Node = serde_saphyr::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line() as usize).unwrap_or(0);
            p.err(
                line,
                format!(
                    "not valid YAML: {}",
                    cla_common::yaml::message(&e.to_string(), text, line as u64)
                ),
            )
        })?;
        let Some(top) = root.as_map() else {
            return Err(p.err(
                root.line,
                format!(
                    "a rulebook is a mapping with `do:` (or event sections), not {}",
                    root.kind()
                ),
            ));
        };
        let mut book = Rulebook {
            file: file.to_owned(),
            vars: Vec::new(),
            worker: None,
            sections: Vec::new(),
        };
        for (k, v) in top {
            match k.name.as_str() {
                "vars" => book.vars = p.vars(v)?,
                "worker" => book.worker = Some(v.clone()),
                "name" | "description" => {}
                // `.base: &base {...}`: a holder for YAML anchors, as in GitLab CI files.
                k if k.starts_with('.') => {}
                _ => book.sections.push(p.section(k, v)?),
            }
        }
        if book.sections.is_empty() {
            return Err(p.err(root.line, "the rulebook has no steps: add a `do:` list of ops"));
        }
        Ok(book)
    }

    /// The section to run: `event`, or `do`.
    pub fn section(&self, event: Option<&str>) -> Result<&Section, RulebookError> {
        let want = event.unwrap_or("do");
        self.sections.iter().find(|s| s.name == want).ok_or_else(|| {
            let has: Vec<&str> = self.sections.iter().map(|s| s.name.as_str()).collect();
            RulebookError {
                file: self.file.clone(),
                line: 0,
                message: match event {
                    Some(e) => format!("no `{e}:` section (the rulebook has: {})", has.join(", ")),
                    None => format!(
                        "no `do:` section: pick one of the event sections with --event ({})",
                        has.join(", ")
                    ),
                },
            }
        })
    }
}

impl P<'_> {
    /// `vars:` as a mapping, or a list of one-key mappings (Clarive's form).
    fn vars(&self, v: &Node) -> Result<Vec<(Key, Node)>, RulebookError> {
        let mut out = Vec::new();
        match &v.value {
            Value::Map(m) => out.extend(m.iter().cloned()),
            Value::Seq(items) => {
                for item in items {
                    match item.as_map() {
                        Some(m) => out.extend(m.iter().cloned()),
                        None => {
                            return Err(self.err(
                                item.line,
                                format!(
                                    "each item of `vars:` is a `name: value` mapping, not {}",
                                    item.kind()
                                ),
                            ));
                        }
                    }
                }
            }
            Value::Null => {}
            _ => return Err(self.err(v.line, "`vars:` is a mapping of `name: value`")),
        }
        for (k, _) in &out {
            if !template::is_name(&k.name) {
                return Err(self.err(
                    k.line,
                    format!(
                        "`{}` is not a variable name (letters, digits and _, not starting with a digit)",
                        k.name
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// A section: a list of steps, or `{do: [...]}`.
    fn section(&self, k: &Key, v: &Node) -> Result<Section, RulebookError> {
        let steps = match &v.value {
            Value::Seq(_) => self.steps(v)?,
            Value::Map(m) => {
                for (key, _) in m {
                    if key.name != "do" {
                        return Err(self.err(
                            key.line,
                            format!("unknown key `{}` in section `{}`: a section is a list of ops, or `do:` with one", key.name, k.name),
                        ));
                    }
                }
                match v.get("do") {
                    Some(d) => self.steps(d)?,
                    None => return Err(self.err(v.line, format!("section `{}` has no `do:` list", k.name))),
                }
            }
            _ => {
                let hint = if TOP_KEYS.contains(&k.name.as_str()) {
                    ""
                } else {
                    " (a section is a list of ops)"
                };
                return Err(self.err(
                    v.line,
                    format!("`{}:` is {}, not a list of ops{hint}", k.name, v.kind()),
                ));
            }
        };
        Ok(Section {
            name: k.name.clone(),
            line: k.line,
            steps,
        })
    }

    fn steps(&self, v: &Node) -> Result<Vec<Step>, RulebookError> {
        match &v.value {
            Value::Seq(items) => items.iter().map(|i| self.step(i)).collect(),
            Value::Null => Ok(Vec::new()),
            _ => Err(self.err(v.line, format!("expected a list of ops, found {}", v.kind()))),
        }
    }

    fn step(&self, v: &Node) -> Result<Step, RulebookError> {
        // `- make test` is a shell step.
        if let Value::Str(_) = v.value {
            return Ok(Step {
                line: v.line,
                op: Op::Shell(v.clone()),
                capture: None,
                name: None,
                ignore_errors: false,
                worker: None,
            });
        }
        let Some(map) = v.as_map() else {
            return Err(self.err(
                v.line,
                format!("a step is an op like `shell: make`, not {}", v.kind()),
            ));
        };
        let mut op_key: Option<(&Key, &Node, &str, Option<String>)> = None;
        let mut step = Step {
            line: v.line,
            op: Op::Echo(v.clone()),
            capture: None,
            name: None,
            ignore_errors: false,
            worker: None,
        };
        let mut extra: Vec<(&Key, &Node)> = Vec::new();
        let mut ignore_key = None;
        for (k, val) in map {
            let (capture, name) = match k.name.split_once('=') {
                Some((c, o)) => (Some(c.trim().to_owned()), o.trim()),
                None => (None, k.name.trim()),
            };
            if OPS.contains(&name) {
                if let Some((first, ..)) = op_key {
                    return Err(self.err(
                        k.line,
                        format!(
                            "a step has one op, and this one has `{}` and `{}`: make them two steps",
                            first.name, k.name
                        ),
                    ));
                }
                if let Some(c) = &capture
                    && !template::is_name(c)
                {
                    return Err(self.err(k.line, format!("`{c}` is not a variable name to capture into")));
                }
                op_key = Some((k, val, name, capture));
                continue;
            }
            if capture.is_some() {
                return Err(self.err(k.line, unknown_op(name)));
            }
            match name {
                "name" => step.name = Some(self.string(val, "name")?),
                "ignore_errors" => {
                    step.ignore_errors = self.boolean(val, "ignore_errors")?;
                    ignore_key = Some(k.line);
                }
                "worker" => step.worker = Some(val.clone()),
                "then" | "else" | "do" | "as" => extra.push((k, val)),
                _ => return Err(self.err(k.line, unknown_op(name))),
            }
        }
        let Some((key, val, op, capture)) = op_key else {
            return Err(self.err(
                v.line,
                format!("this step has no op: use one of {}", OPS.join(", ")),
            ));
        };
        step.line = key.line;
        step.capture = capture;
        let allowed_extra: &[&str] = match op {
            "if" => &["then", "else"],
            "foreach" => &["do", "as"],
            _ => &[],
        };
        if let Some((k, _)) = extra
            .iter()
            .find(|(k, _)| !allowed_extra.contains(&k.name.as_str()))
        {
            return Err(self.err(k.line, format!("`{}:` does not go with `{op}:`", k.name)));
        }
        let get = |name: &str| extra.iter().find(|(k, _)| k.name == name).map(|(_, v)| *v);
        // Options may also sit inside the op's mapping (`shell: {cmd: .., worker: ..}`).
        let opts = |allowed: &[&str], required: &[&str]| -> Result<(), RulebookError> {
            let Some(m) = val.as_map() else { return Ok(()) };
            for (k, _) in m {
                if !allowed.contains(&k.name.as_str()) {
                    return Err(self.err(
                        k.line,
                        format!(
                            "unknown key `{}` for `{op}` (it takes: {})",
                            k.name,
                            allowed.join(", ")
                        ),
                    ));
                }
            }
            for r in required {
                if val.get(r).is_none() {
                    return Err(self.err(val.line, format!("`{op}` needs `{r}:`")));
                }
            }
            Ok(())
        };
        const TARGET: [&str; 3] = ["worker", "ignore_errors", "queue_timeout"];
        step.op = match op {
            "shell" => {
                match &val.value {
                    Value::Str(_) | Value::Seq(_) => {}
                    Value::Map(_) => opts(
                        &[&TARGET[..], &["cmd", "args", "chdir", "env", "timeout"]].concat(),
                        &["cmd"],
                    )?,
                    _ => {
                        return Err(self.err(
                            val.line,
                            format!("`shell` takes a command, a list or a mapping, not {}", val.kind()),
                        ));
                    }
                }
                if let Some(env) = val.get("env")
                    && !matches!(env.value, Value::Map(_))
                {
                    return Err(self.err(env.line, "`env:` is a mapping of NAME: value"));
                }
                Op::Shell(val.clone())
            }
            "ship" | "fetch" => {
                if val.as_map().is_none() {
                    return Err(self.err(val.line, format!("`{op}` takes a mapping with `from:` and `to:`")));
                }
                opts(&[&TARGET[..], &["from", "to", "mkdir"]].concat(), &["from", "to"])?;
                if op == "ship" {
                    Op::Ship(val.clone())
                } else {
                    Op::Fetch(val.clone())
                }
            }
            "eval" => {
                match &val.value {
                    Value::Str(_) => {}
                    Value::Map(_) => opts(&[&TARGET[..], &["code", "stash", "timeout"]].concat(), &["code"])?,
                    _ => {
                        return Err(self.err(
                            val.line,
                            format!("`eval` takes code or a mapping with `code:`, not {}", val.kind()),
                        ));
                    }
                }
                Op::Eval(val.clone())
            }
            "echo" => Op::Echo(val.clone()),
            "fail" => Op::Fail(val.clone()),
            "set" => {
                let Some(m) = val.as_map() else {
                    return Err(self.err(val.line, "`set` takes a mapping of `name: value`"));
                };
                if let Some((k, _)) = m.iter().find(|(k, _)| !template::is_name(&k.name)) {
                    return Err(self.err(k.line, format!("`{}` is not a variable name", k.name)));
                }
                Op::Set(val.clone())
            }
            "if" => Op::If {
                cond: val.clone(),
                then: match get("then") {
                    Some(t) => self.steps(t)?,
                    None => return Err(self.err(key.line, "`if:` needs a `then:` list")),
                },
                otherwise: get("else")
                    .map(|e| self.steps(e))
                    .transpose()?
                    .unwrap_or_default(),
            },
            "foreach" => Op::Foreach {
                items: val.clone(),
                var: match get("as") {
                    Some(a) => {
                        let name = self.string(a, "as")?;
                        if !template::is_name(&name) {
                            return Err(self.err(a.line, format!("`{name}` is not a variable name")));
                        }
                        name
                    }
                    None => "item".to_owned(),
                },
                body: match get("do") {
                    Some(d) => self.steps(d)?,
                    None => return Err(self.err(key.line, "`foreach:` needs a `do:` list")),
                },
            },
            _ => unreachable!("OPS lists every op"),
        };
        if step.op.on_worker() {
            if let Some(w) = val.get("worker") {
                if step.worker.is_some() {
                    return Err(self.err(w.line, "`worker:` is given twice for this step"));
                }
                step.worker = Some(w.clone());
            }
            if let Some(i) = val.get("ignore_errors") {
                step.ignore_errors = self.boolean(i, "ignore_errors")?;
            }
        }
        if let Some(line) = ignore_key
            && !step.op.on_worker()
        {
            return Err(self.err(
                line,
                format!("`ignore_errors` applies to shell, ship, fetch and eval steps, not to `{op}`"),
            ));
        }
        if step.capture.is_some()
            && matches!(
                step.op,
                Op::If { .. } | Op::Foreach { .. } | Op::Set(_) | Op::Fail(_)
            )
        {
            return Err(self.err(key.line, format!("`{op}` has no result to capture")));
        }
        if step.worker.is_some() && !step.op.on_worker() {
            return Err(self.err(
                key.line,
                format!("`{op}` runs here, on the hub side: `worker:` does not apply"),
            ));
        }
        Ok(step)
    }

    fn string(&self, v: &Node, what: &str) -> Result<String, RulebookError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.err(v.line, format!("`{what}:` is a string, not {}", v.kind())))
    }

    fn boolean(&self, v: &Node, what: &str) -> Result<bool, RulebookError> {
        match v.value {
            Value::Bool(b) => Ok(b),
            _ => Err(self.err(v.line, format!("`{what}:` is true or false, not {}", v.kind()))),
        }
    }
}

/// "unknown op `shel`: did you mean `shell`? (ops: ...)".
fn unknown_op(name: &str) -> String {
    let near = OPS.iter().find(|o| edit_distance(o, name) <= 2);
    match near {
        Some(o) => format!(
            "unknown op `{name}`: did you mean `{o}`? (ops: {})",
            OPS.join(", ")
        ),
        None => format!("unknown op `{name}` (ops: {})", OPS.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
