//! `cla-hub run RULEBOOK.yml`: runs a rulebook and shows each step as it goes — a spinner per step on a
//! terminal, plain lines otherwise, or (`--json`) only the run report at the end.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};

use super::print_json;
use crate::error::{Error, Result};
use cla_client::AdminClient;
use cla_common::exit::ExitCode;
use cla_rulebook::Rulebook;
use cla_rulebook::run::{self, Options, Reporter, RunReport, StepReport, StepStart};

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// The rulebook (YAML).
    #[arg(value_name = "RULEBOOK.yml")]
    pub rulebook: PathBuf,
    /// Set a variable (repeatable); wins over the rulebook's `vars:`.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Run this event section (`build`, `test`, `deploy`, ...) instead of `do:`.
    #[arg(long, value_name = "NAME")]
    pub event: Option<String>,
    /// Only check the rulebook (YAML, ops, keys, sections); run nothing and need no hub.
    #[arg(long)]
    pub check: bool,
}

/// Largest rulebook read (a real one is a few KiB).
pub(crate) const MAX_RULEBOOK_BYTES: u64 = 4 << 20;

/// Reads and parses a rulebook file; errors name the file and line.
pub(crate) fn load(path: &std::path::Path) -> Result<Rulebook> {
    let text = cla_common::util::read_capped(path, MAX_RULEBOOK_BYTES, "rulebook")?;
    Rulebook::parse(&path.display().to_string(), &text).map_err(|e| Error::Other(e.to_string()))
}

/// `cla-hub run`; the rulebook is checked before `client` looks for the hub.
pub(crate) async fn run_cmd(
    client: impl FnOnce() -> Result<AdminClient>,
    a: RunArgs,
    json: bool,
) -> Result<ExitCode> {
    let book = load(&a.rulebook)?;
    let vars = super::pairs("--var", "NAME", &a.vars)?;
    // The section is checked before the hub is contacted.
    let section = book
        .section(a.event.as_deref())
        .map_err(|e| Error::Usage(e.to_string()))?;
    if a.check {
        let names: Vec<&str> = book.sections.iter().map(|s| s.name.as_str()).collect();
        let n = count(&section.steps);
        println!(
            "{}: ok ({n} step{} in `{}`; sections: {})",
            book.file,
            if n == 1 { "" } else { "s" },
            section.name,
            names.join(", ")
        );
        return Ok(ExitCode::Success);
    }
    let c = &client()?;
    let (cancel, give_up, signals) = super::on_ctrl_c("stopping the rulebook: cancelling the running step");
    let opts = Options {
        vars,
        event: a.event,
        cancel,
    };
    let mut reporter: Box<dyn Reporter> = if json {
        Box::new(Quiet)
    } else if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
        // Live draws on stderr and prints output there too; with stdout redirected, output and echoes
        // go to stdout line by line instead (Plain), so `> log` gets them.
        Box::new(Live::new())
    } else {
        Box::new(Plain::default())
    };
    let report = tokio::select! {
        r = run::run(c, &book, opts, reporter.as_mut()) => r,
        _ = give_up.cancelled() => return Ok(ExitCode::Interrupted),
    };
    signals.abort();
    drop(reporter);
    conclude(&report, json)
}

/// Prints the end of a run and picks the exit code: 0 ok, 130 cancelled, 1 failed.
pub(crate) fn conclude(report: &RunReport, json: bool) -> Result<ExitCode> {
    if json {
        print_json(report)?;
    } else {
        let failed = report.steps.iter().filter(|s| !s.ok).count();
        let ignored = report.steps.iter().filter(|s| s.ignored).count();
        match &report.error {
            None => eprintln!(
                "rulebook {} ({}): {} worker step{} in {:.1} s{}",
                report.rulebook,
                report.section,
                report.steps.len(),
                if report.steps.len() == 1 { "" } else { "s" },
                report.seconds,
                if ignored > 0 {
                    format!(", {ignored} failed but ignored")
                } else {
                    String::new()
                }
            ),
            Some(_) if report.cancelled => eprintln!("cla-hub: rulebook {} cancelled", report.rulebook),
            Some(e) => eprintln!(
                "cla-hub: rulebook failed: {e}{}",
                if failed > 1 {
                    format!(" ({failed} steps failed)")
                } else {
                    String::new()
                }
            ),
        }
    }
    Ok(if report.ok {
        ExitCode::Success
    } else if report.cancelled {
        ExitCode::Interrupted
    } else {
        ExitCode::Failure
    })
}

/// Steps in a list, counting those inside `if` and `foreach`.
fn count(steps: &[cla_rulebook::Step]) -> usize {
    use cla_rulebook::Op;
    steps
        .iter()
        .map(|s| {
            1 + match &s.op {
                Op::If { then, otherwise, .. } => count(then) + count(otherwise),
                Op::Foreach { body, .. } => count(body),
                _ => 0,
            }
        })
        .sum()
}

/// `--json`: nothing while running.
struct Quiet;

impl Reporter for Quiet {
    fn step_started(&mut self, _: &StepStart<'_>) {}
    fn waiting(&mut self, _: &str) {}
    fn started(&mut self, _: &str) {}
    fn output(&mut self, _: &[u8], _: bool) {}
    fn progress(&mut self, _: u64, _: u64) {}
    fn step_ended(&mut self, _: &StepReport) {}
    fn echo(&mut self, _: &str) {}
}

/// The line that closes a step: `✔ build (shell) on w1, rc 0, 0.4 s`.
fn end_line(s: &StepReport) -> String {
    let mark = match (s.ok, s.ignored) {
        (true, _) => "✔",
        (false, true) => "✘ (ignored)",
        (false, false) => "✘",
    };
    let mut line = format!("{mark} {} ({}, line {})", s.name, s.op, s.line);
    if let Some(w) = &s.worker {
        line.push_str(&format!(" on {w}"));
    }
    if let (Some(rc), "shell") = (s.rc, s.op) {
        line.push_str(&format!(", rc {rc}"));
    }
    line.push_str(&format!(", {:.2} s", s.seconds));
    if let Some(e) = &s.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

fn indent(depth: usize) -> String {
    "  ".repeat(depth)
}

/// Not a terminal: one line per event, output passed through as it comes (or, with a prefix, line by
/// line behind it).
#[derive(Default)]
pub(crate) struct Plain {
    depth: usize,
    /// Put before every line (the demo indents what it shows).
    prefix: &'static str,
}

impl Plain {
    /// Lines behind `prefix` (the demo indents what it shows).
    pub(crate) fn with_prefix(prefix: &'static str) -> Plain {
        Plain { depth: 0, prefix }
    }
}

impl Reporter for Plain {
    fn step_started(&mut self, s: &StepStart<'_>) {
        self.depth = s.depth;
        eprintln!(
            "{}{}▶ {} ({} on {}, line {})",
            self.prefix,
            indent(s.depth),
            s.label,
            s.op,
            s.target,
            s.line
        );
    }
    fn waiting(&mut self, why: &str) {
        eprintln!(
            "{}{}  waiting for a worker: {why}",
            self.prefix,
            indent(self.depth)
        );
    }
    fn started(&mut self, _: &str) {}
    fn output(&mut self, data: &[u8], stderr: bool) {
        if !self.prefix.is_empty() {
            super::print_prefixed(&format!("{}  │ ", self.prefix), data);
        } else if stderr {
            let _ = std::io::stderr().write_all(data);
        } else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
    }
    fn progress(&mut self, _: u64, _: u64) {}
    fn step_ended(&mut self, s: &StepReport) {
        eprintln!("{}{}{}", self.prefix, indent(self.depth), end_line(s));
    }
    fn echo(&mut self, text: &str) {
        println!("{}{text}", self.prefix);
    }
}

/// A terminal: a spinner for the running step (with its worker, wait reason or bytes moved), its
/// output printed above it line by line.
struct Live {
    bar: Option<ProgressBar>,
    label: String,
    depth: usize,
    /// Output not yet ended by a newline.
    partial: Vec<u8>,
}

impl Live {
    fn new() -> Live {
        Live {
            bar: None,
            label: String::new(),
            depth: 0,
            partial: Vec::new(),
        }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.print(&format!("{}  │ {line}", indent(self.depth)));
        }
    }
}

impl Reporter for Live {
    fn step_started(&mut self, s: &StepStart<'_>) {
        self.depth = s.depth;
        self.label = format!("{}{} ({})", indent(s.depth), s.label, s.op);
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
        bar.set_message(format!("{} on {}", self.label, s.target));
        bar.enable_steady_tick(Duration::from_millis(120));
        self.bar = Some(bar);
    }
    fn waiting(&mut self, why: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{}: waiting — {why}", self.label));
        }
    }
    fn started(&mut self, worker: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{} on {worker}", self.label));
        }
    }
    fn output(&mut self, data: &[u8], _stderr: bool) {
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            self.print(&format!(
                "{}  │ {}",
                indent(self.depth),
                text.trim_end_matches('\r')
            ));
        }
    }
    fn progress(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_message(format!(
                "{}: {} / {}",
                self.label,
                indicatif::BinaryBytes(done),
                indicatif::BinaryBytes(total)
            ));
        }
    }
    fn step_ended(&mut self, s: &StepReport) {
        self.flush_partial();
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        eprintln!("{}{}", indent(self.depth), end_line(s));
    }
    fn echo(&mut self, text: &str) {
        self.print(text);
    }
}
