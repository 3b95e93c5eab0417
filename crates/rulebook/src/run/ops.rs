//! The worker steps: where a step runs (`worker:` / `tags:`), and `shell`, `eval`, `ship` and `fetch`
//! submitted through the admin client, their output relayed to the [`Reporter`] and their result
//! turned into the step's captured value.

use super::*;

impl<'a> Runner<'a> {
    /// The step's `worker:` (or the rulebook's), filled in.
    pub(super) fn target(&self, step: &Step) -> Result<Target, String> {
        let node = step.worker.as_ref().or(self.book.worker.as_ref()).ok_or_else(|| {
            "no worker to run on: add `worker: {tags: [..]}` or `worker: {id: ..}` to the step (or at the \
             top of the rulebook)"
                .to_owned()
        })?;
        let v = render(&node.to_json(), &self.vars).map_err(|e| format!("worker: {e}"))?;
        let bad = |m: String| m;
        let mut t = Target::default();
        match v {
            Json::String(id) if !id.trim().is_empty() => t.worker = Some(id),
            Json::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("id", Json::String(id)) => t.worker = Some(id),
                        ("tags", Json::Array(tags)) => t.tags = tags.iter().map(to_text).collect(),
                        ("tags", Json::String(tags)) => t.tags = cla_common::util::split_list([&tags]),
                        ("env", Json::String(env)) => t.env = Some(env),
                        ("queue_timeout", v) => {
                            t.queue_timeout_secs =
                                Some(seconds(&v).map_err(|e| bad(format!("queue_timeout: {e}")))?)
                        }
                        (k @ ("id" | "tags" | "env"), v) => {
                            return Err(bad(format!("`worker: {{{k}: ..}}` cannot be {}", short(&v))));
                        }
                        (k, _) => {
                            return Err(bad(format!(
                                "unknown key `{k}` in `worker:` (it takes: id, tags, env, queue_timeout)"
                            )));
                        }
                    }
                }
            }
            other => {
                return Err(bad(format!(
                    "`worker:` is `{{tags: [..]}}`, `{{id: ..}}` or an id, not {}",
                    short(&other)
                )));
            }
        }
        if t.worker.is_none() && t.tags.is_empty() {
            return Err(bad("`worker:` needs `tags: [..]` or `id: ..`".into()));
        }
        Ok(t)
    }

    pub(super) async fn shell(&mut self, target: Target, args: Json) -> Result<(JobRecord, Json), String> {
        let mut spec = JobSpec {
            target: Target::default(),
            task: Task::Exec(CommandLine::Shell { cmd: String::new() }),
            workdir: None,
            env_vars: Default::default(),
            timeout_secs: None,
            on_disconnect: Default::default(),
        };
        let words = |v: &Json| -> Result<Vec<String>, String> {
            match v {
                Json::Array(items) if !items.is_empty() => Ok(items.iter().map(to_text).collect()),
                other => Err(format!(
                    "a command list is a non-empty list of words, not {}",
                    short(other)
                )),
            }
        };
        spec.task = Task::Exec(match &args {
            Json::String(cmd) => CommandLine::Shell { cmd: cmd.clone() },
            Json::Array(_) => CommandLine::Argv { argv: words(&args)? },
            Json::Object(m) => {
                let cmd = m.get("cmd").cloned().unwrap_or(Json::Null);
                let mut command = match &cmd {
                    Json::String(c) => CommandLine::Shell { cmd: c.clone() },
                    Json::Array(_) => CommandLine::Argv { argv: words(&cmd)? },
                    other => {
                        return Err(format!(
                            "`cmd:` is a command or a list of words, not {}",
                            short(other)
                        ));
                    }
                };
                if let Some(a) = m.get("args") {
                    let mut argv = match command {
                        CommandLine::Shell { cmd } => vec![cmd],
                        CommandLine::Argv { argv } => argv,
                    };
                    argv.extend(words(a)?);
                    command = CommandLine::Argv { argv };
                }
                if let Some(d) = m.get("chdir") {
                    spec.workdir = Some(to_text(d));
                }
                if let Some(Json::Object(env)) = m.get("env") {
                    spec.env_vars = env.iter().map(|(k, v)| (k.clone(), to_text(v))).collect();
                }
                if let Some(t) = m.get("timeout") {
                    spec.timeout_secs = Some(seconds(t).map_err(|e| format!("timeout: {e}"))?);
                }
                command
            }
            other => return Err(format!("`shell` takes a command, not {}", short(other))),
        });
        spec.target = target;
        let mut combined: Vec<u8> = Vec::new();
        let reporter = &mut *self.reporter;
        let record = self
            .client
            .exec(&spec, self.cancel.clone(), cla_client::RECONNECT_FOR, |ev| {
                if let ExecEvent::Stdout(b) | ExecEvent::Stderr(b) = &ev {
                    keep(&mut combined, b);
                }
                relay(reporter, ev);
            })
            .await
            .map_err(|e| e.to_string())?;
        let capture = json!({
            "rc": record.rc,
            "output": trim_end(&String::from_utf8_lossy(&combined)),
            "stdout": trim_end(&record.stdout),
            "stderr": trim_end(&record.stderr),
        });
        Ok((record, capture))
    }

    pub(super) async fn eval(&mut self, target: Target, args: Json) -> Result<(JobRecord, Json), String> {
        let (code, stash, timeout) = match &args {
            Json::String(code) => (code.clone(), None, None),
            Json::Object(m) => {
                let timeout = m
                    .get("timeout")
                    .map(seconds)
                    .transpose()
                    .map_err(|e| format!("timeout: {e}"))?;
                (
                    m.get("code").map(to_text).unwrap_or_default(),
                    m.get("stash").cloned(),
                    timeout,
                )
            }
            other => return Err(format!("`eval` takes code, not {}", short(other))),
        };
        // Without `stash:`, the stash is the rulebook's variables, and what the code sets on it comes back
        // as variables.
        let shared = stash.is_none();
        let stash = match stash {
            Some(s @ Json::Object(_)) => s,
            Some(other) => return Err(format!("`stash:` is a mapping, not {}", short(&other))),
            None => Json::Object(self.default_stash()),
        };
        let sent = stash.clone();
        let spec = JobSpec {
            target,
            task: Task::Eval(EvalTask { code, stash }),
            workdir: None,
            env_vars: Default::default(),
            timeout_secs: timeout,
            on_disconnect: Default::default(),
        };
        let reporter = &mut *self.reporter;
        let record = self
            .client
            .exec(&spec, self.cancel.clone(), cla_client::RECONNECT_FOR, |ev| {
                relay(reporter, ev)
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(out) = &record.eval else {
            return Ok((record, json!({})));
        };
        // What the code set or changed on the stash becomes variables; what it left alone stays as it
        // was (a capture sent trimmed keeps its output here).
        if shared
            && out.error.is_none()
            && let Json::Object(m) = &out.stash
        {
            for (k, v) in m {
                if !template::is_name(k) || sent.get(k).is_some_and(|s| same(s, v)) {
                    continue;
                }
                match (self.vars.get_mut(k), v) {
                    // A capture went in trimmed: only the members the code changed are taken back.
                    (Some(Json::Object(mine)), Json::Object(theirs)) if self.captures.contains(k) => {
                        let before = sent.get(k).and_then(Json::as_object);
                        for (member, value) in theirs {
                            if before.and_then(|b| b.get(member)).is_none_or(|b| !same(b, value)) {
                                mine.insert(member.clone(), value.clone());
                            }
                        }
                    }
                    _ => {
                        self.vars.insert(k.clone(), v.clone());
                        self.captures.remove(k);
                    }
                }
            }
        }
        let console: Vec<&str> = out.console.iter().map(|l| l.text.as_str()).collect();
        let capture = json!({
            "result": out.result,
            "stash": out.stash,
            "output": console.join("\n"),
            "error": out.error.as_ref().map(|e| e.message.clone()),
        });
        Ok((record, capture))
    }

    /// An eval's stash when the step gives none: the variables, with captures trimmed of what can be
    /// large (command output, an eval's stash) — it travels in the job, which has a size limit.
    pub(super) fn default_stash(&self) -> Vars {
        self.vars
            .iter()
            .map(|(k, v)| match v {
                Json::Object(m) if self.captures.contains(k) => {
                    let mut m = m.clone();
                    for big in ["output", "stdout", "stderr", "stash"] {
                        m.remove(big);
                    }
                    (k.clone(), Json::Object(m))
                }
                _ => (k.clone(), v.clone()),
            })
            .collect()
    }

    pub(super) async fn transfer(
        &mut self,
        ship: bool,
        target: Target,
        args: Json,
    ) -> Result<(JobRecord, Json), String> {
        let Json::Object(m) = &args else {
            return Err("ship and fetch take `from:` and `to:`".into());
        };
        let text = |k: &str| -> Result<String, String> {
            match m.get(k).map(to_text) {
                Some(s) if !s.trim().is_empty() => Ok(s),
                _ => Err(format!("`{k}:` is empty")),
            }
        };
        let (from, to) = (text("from")?, text("to")?);
        let mkdir = match m.get("mkdir") {
            None => true,
            Some(Json::Bool(b)) => *b,
            Some(other) => return Err(format!("`mkdir:` is true or false, not {}", short(other))),
        };
        let reporter = &mut *self.reporter;
        let on = |u: Update| match u {
            Update::Waiting(why) => reporter.waiting(&why),
            Update::Progress(p) => reporter.progress(p.done, p.total),
        };
        let cancel = self.cancel.clone();
        let record = if ship {
            transfer::ship(self.client, target, PathBuf::from(&from), to, mkdir, cancel, on).await
        } else {
            transfer::fetch(self.client, target, from, to, mkdir, cancel, on).await
        }
        .map_err(|e| e.to_string())?;
        let capture = match &record.transfer {
            Some(s) => json!({
                "path": s.path,
                "files": s.files,
                "dirs": s.dirs,
                "bytes": s.bytes,
                "sha256": s.sha256,
            }),
            None => json!({}),
        };
        Ok((record, capture))
    }
}

/// Passes what a job's stream reports on to the reporter.
pub(super) fn relay(reporter: &mut dyn Reporter, ev: ExecEvent) {
    match ev {
        ExecEvent::Stdout(b) => reporter.output(&b, false),
        ExecEvent::Stderr(b) => reporter.output(&b, true),
        ExecEvent::Waiting(why) => reporter.waiting(&why),
        ExecEvent::Started { worker, .. } => reporter.started(&worker),
        ExecEvent::Reconnecting { why, attempt, .. } => {
            reporter.waiting(&format!("lost the hub ({why}); reconnecting, attempt {attempt}"))
        }
        ExecEvent::Missing { stream, bytes } => reporter.waiting(&format!(
            "{bytes} bytes of {} sent while the hub was away are missing here (over its output cap)",
            if stream == cla_protocol::api::STDOUT_STREAM {
                "stdout"
            } else {
                "stderr"
            }
        )),
        ExecEvent::Created(_) => {}
    }
}

/// Why a finished job counts as a failed step, if it does.
pub(super) fn failure(r: &JobRecord, cancelling: bool) -> Option<String> {
    let why = r.error.clone().unwrap_or_default();
    if let Some(out) = &r.eval
        && let Some(e) = &out.error
    {
        return Some(format!("JavaScript error: {}", e.message));
    }
    match r.state {
        JobState::Succeeded if r.spec.task.is_transfer() && r.transfer.is_none() => {
            Some("the transfer ended without a verified summary".into())
        }
        JobState::Succeeded => None,
        JobState::Failed => Some(match r.rc {
            Some(rc) => format!(
                "exited with {rc} on {}",
                r.worker.as_deref().unwrap_or("the worker")
            ),
            None => why,
        }),
        JobState::TimedOut if r.timed_out_in_queue() => Some(why),
        JobState::TimedOut => Some(format!("timed out ({why})")),
        JobState::Cancelled if cancelling => Some("cancelled".into()),
        _ => Some(format!("{}: {why}", r.state.as_str())),
    }
}
