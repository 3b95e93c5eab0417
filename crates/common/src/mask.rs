//! Secret masking: the worker replaces secrets with `***` in job output before it leaves the machine
//! (streamed output, the spool, results, eval console lines and values).
//!
//! What is a secret: the worker's own token, the values of the environment variables named in
//! `mask.envs`, and whatever matches a `mask.patterns` regex. Each value is also looked for in the forms
//! it usually takes when a program prints it: lower- and upper-case hex, percent-encoding (URL), and
//! standard and URL-safe base64. Base64 of a value depends on where it starts within 3-byte groups, so
//! the three alignments are looked for; the characters at the edges that also depend on neighbouring
//! bytes are not (at most 2 characters of the encoding stay visible at each end).
//!
//! The values' forms are searched with Aho-Corasick (SIMD-accelerated for literals), the patterns with a
//! DFA (regex-automata); each chunk is searched once by each. Streams are masked across chunk
//! boundaries: a [`StreamMasker`] holds back only the tail of the data that could still be the start of a
//! secret (the DFA is still alive from there), and emits everything before it at once. So output is not
//! delayed unless it ends in something that looks like the beginning of a secret, and a secret split
//! across any number of writes is still caught. Patterns are searched within a window of
//! [`PATTERN_WINDOW`] bytes across boundaries: a longer match of a pattern may slip through in parts.

use std::sync::Arc;

use aho_corasick::automaton::Automaton as _;
use aho_corasick::{AhoCorasick, MatchKind, StartKind};
use base64::Engine;
use regex_automata::dfa::{Automaton, dense, regex::Regex};
use regex_automata::{Anchored, Input};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Values shorter than this are not masked (they would mask ordinary output everywhere).
pub const MIN_SECRET_LEN: usize = 6;

/// How far back a pattern match may start when a chunk boundary cuts it.
pub const PATTERN_WINDOW: usize = 256;

/// A compiled set of secrets, shared by all the streams of a worker.
#[derive(Clone)]
pub struct Masks {
    inner: Option<Arc<Compiled>>,
}

struct Compiled {
    /// The values in all their forms: a fast leftmost-longest searcher (SIMD prefilter), one that also
    /// reports overlapping occurrences (run only around a match), and the needles as an anchored DFA (to
    /// tell whether a tail could still become one).
    literals: Option<(AhoCorasick, AhoCorasick, aho_corasick::dfa::DFA)>,
    /// The longest value form.
    longest: usize,
    patterns: Option<Regex>,
    /// The longest stretch held back across a chunk boundary.
    window: usize,
}

impl std::fmt::Debug for Masks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        write!(f, "Masks({})", if self.inner.is_some() { "on" } else { "none" })
    }
}

impl Masks {
    /// No masking.
    pub fn none() -> Masks {
        Masks { inner: None }
    }

    /// Compiles `values` (with their encodings) and `patterns` (regexes). Values shorter than
    /// [`MIN_SECRET_LEN`] are skipped. A pattern that does not compile is an error naming it.
    pub fn new<S: AsRef<str>>(values: &[S], patterns: &[String]) -> Result<Masks, String> {
        let mut needles: Vec<Vec<u8>> = Vec::new();
        // (Leftmost-longest: at one position, the longest form wins.)
        for v in values {
            let v = v.as_ref().as_bytes();
            if v.len() >= MIN_SECRET_LEN {
                needles.extend(encodings(v));
            }
        }
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        needles.dedup();
        needles.retain(|n| n.len() >= 4);
        let longest = needles.first().map(Vec::len).unwrap_or(0);
        let literals = if needles.is_empty() {
            None
        } else {
            let err = |e: aho_corasick::BuildError| format!("cannot build the masks: {e}");
            let search = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&needles)
                .map_err(err)?;
            // Every occurrence, overlapping ones included: two secrets that overlap are masked as one run.
            let overlapping = AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&needles)
                .map_err(err)?;
            let anchored = aho_corasick::dfa::DFA::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .start_kind(StartKind::Anchored)
                .build(&needles)
                .map_err(err)?;
            Some((search, overlapping, anchored))
        };
        for p in patterns {
            check_pattern(p)?;
        }
        let patterns_re = if patterns.is_empty() {
            None
        } else {
            Some(
                pattern_builder()
                    .build_many(patterns)
                    .map_err(|e| format!("cannot build the masks: {}", cause(&e)))?,
            )
        };
        if literals.is_none() && patterns_re.is_none() {
            return Ok(Masks::none());
        }
        let window = if patterns.is_empty() {
            longest
        } else {
            longest.max(PATTERN_WINDOW)
        };
        Ok(Masks {
            inner: Some(Arc::new(Compiled {
                literals,
                longest,
                patterns: patterns_re,
                window,
            })),
        })
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// A masker for one stream.
    pub fn stream(&self) -> StreamMasker {
        StreamMasker {
            masks: self.inner.clone(),
            held: Vec::new(),
            covered: 0,
        }
    }

    /// Masks a complete piece of text.
    pub fn text(&self, text: &str) -> String {
        if self.inner.is_none() {
            return text.to_owned();
        }
        let mut s = self.stream();
        let mut out = s.push(text.as_bytes());
        out.extend(s.finish());
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Masks every string in a JSON value (keys included).
    pub fn json(&self, value: &mut serde_json::Value) {
        if self.inner.is_none() {
            return;
        }
        match value {
            serde_json::Value::String(s) => *s = self.text(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.json(v)),
            serde_json::Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    self.json(&mut v);
                    map.insert(self.text(&k), v);
                }
            }
            _ => {}
        }
    }
}

/// How large the automata of `mask.patterns` may grow (each of the NFA, the DFA and its
/// determinization). A DFA can be exponentially larger than its pattern (`[0-9A-Z]{5000}`, `(a|b)*a.{20}`):
/// without a limit one line of config could take all the memory of the machine.
pub const PATTERN_SIZE_LIMIT: usize = 8 << 20;

/// The one way `mask.patterns` are compiled: bytes (not Unicode), and bounded in size.
fn pattern_builder() -> regex_automata::dfa::regex::Builder {
    let mut b = Regex::builder();
    b.syntax(
        regex_automata::util::syntax::Config::new()
            .unicode(false)
            .utf8(false),
    )
    .thompson(regex_automata::nfa::thompson::Config::new().nfa_size_limit(Some(PATTERN_SIZE_LIMIT)))
    .dense(
        dense::Config::new()
            .minimize(false)
            .dfa_size_limit(Some(PATTERN_SIZE_LIMIT))
            .determinize_size_limit(Some(PATTERN_SIZE_LIMIT)),
    );
    b
}

/// A checked regex for `mask.patterns`: compiles alone, and cannot match the empty string.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let shown = crate::util::one_line(p, 80);
    let re = pattern_builder().build(p).map_err(|e| {
        // The DFA's own limits, or (as its cause) the NFA's.
        if e.is_size_limit_exceeded() || cause(&e).contains("exceeded") {
            format!(
                "pattern `{shown}` is too large to search for as a stream (over {} MiB of automaton): use smaller \
                 repetition counts or fewer alternatives",
                PATTERN_SIZE_LIMIT >> 20
            )
        } else {
            format!("pattern `{shown}` is not a valid regex: {}", cause(&e))
        }
    })?;
    if re.find(b"").is_some() {
        return Err(format!(
            "pattern `{shown}` matches the empty string: make it match at least one character"
        ));
    }
    Ok(())
}

/// The most precise line of a regex build error: the innermost cause (the DFA error only says
/// "error building NFA"), and of a syntax error's picture of the pattern, its `error: ...` line.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let text = inner.to_string();
    match text.lines().rev().find_map(|l| l.trim().strip_prefix("error: ")) {
        Some(line) => line.to_owned(),
        None => first_line(&text),
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_owned()
}

/// Masks one stream fed in chunks of any size.
pub struct StreamMasker {
    masks: Option<Arc<Compiled>>,
    held: Vec<u8>,
    /// How many bytes at the start of `held` a `***` already sent stands for (a masked run reaching into
    /// what had to be held back): they are not shown, and a match overlapping them joins that run.
    covered: usize,
}

impl StreamMasker {
    /// Takes the next chunk; returns what can be sent now (masked). The rest is held until the next chunk
    /// or [`StreamMasker::finish`].
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(m) = self.masks.clone() else {
            return chunk.to_vec();
        };
        self.held.extend_from_slice(chunk);
        let hold_from = hold_point(&m, &self.held);
        let (out, covered_to) = mask_until(&m, &self.held, self.covered, hold_from);
        self.held.drain(..hold_from);
        self.covered = covered_to.saturating_sub(hold_from);
        out
    }

    /// The end of the stream: everything left, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let Some(m) = self.masks.clone() else {
            return Vec::new();
        };
        let held = std::mem::take(&mut self.held);
        let (out, _) = mask_until(&m, &held, std::mem::take(&mut self.covered), held.len());
        out
    }

    /// Bytes held back right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// The earliest position from which `buf` could still be the start of a match that more data would
/// complete or lengthen, looking back at most `window` bytes; `buf.len()` if none.
fn hold_point(m: &Compiled, buf: &[u8]) -> usize {
    let low = buf.len().saturating_sub(m.window);
    (low..buf.len())
        .find(|&p| {
            let tail = &buf[p..];
            m.literals
                .as_ref()
                .is_some_and(|(_, _, dfa)| literal_alive(dfa, tail))
                || m.patterns.as_ref().is_some_and(|re| pattern_alive(re, tail))
        })
        .unwrap_or(buf.len())
}

/// Whether some value's form starts with `tail` (or is `tail` and a longer one could follow).
fn literal_alive(dfa: &aho_corasick::dfa::DFA, tail: &[u8]) -> bool {
    let anchored = aho_corasick::Anchored::Yes;
    let Ok(mut sid) = dfa.start_state(anchored) else {
        return false;
    };
    for &b in tail {
        sid = dfa.next_state(anchored, sid, b);
        if dfa.is_dead(sid) {
            return false;
        }
    }
    true
}

/// Whether a pattern match could start with `tail`.
fn pattern_alive(re: &Regex, tail: &[u8]) -> bool {
    let dfa = re.forward();
    let input = Input::new(tail).anchored(Anchored::Yes);
    let Ok(mut state) = dfa.start_state_forward(&input) else {
        return false;
    };
    for &b in tail {
        state = dfa.next_state(state, b);
        if dfa.is_dead_state(state) || dfa.is_quit_state(state) {
            return false;
        }
    }
    true
}

/// Masks `buf[..until]`: every match starting before `until` (values' forms and patterns; overlapping
/// ones merge into one run) becomes `***`, and the rest is copied unchanged. The first `covered` bytes
/// were masked already: they are not shown again, and a match overlapping them extends that run. Returns
/// the output and where the last run ends (which may be past `until`: those bytes stay held, covered).
fn mask_until(m: &Compiled, buf: &[u8], covered: usize, until: usize) -> (Vec<u8>, usize) {
    let mut found: Vec<(usize, usize)> = Vec::new();
    if let Some((fast, all, _)) = &m.literals {
        for x in fast.find_iter(buf).take_while(|x| x.start() < until) {
            found.push((x.start(), x.end()));
            // Others overlapping it start before its end, so end before its end plus the longest form.
            let around = aho_corasick::Input::new(buf).range(x.start()..buf.len().min(x.end() + m.longest));
            found.extend(all.find_overlapping_iter(around).map(|y| (y.start(), y.end())));
        }
    }
    if let Some(re) = &m.patterns {
        found.extend(
            re.find_iter(buf)
                .take_while(|x| x.start() < until)
                .map(|x| (x.start(), x.end())),
        );
    }
    found.sort_unstable();
    let mut out = Vec::with_capacity(until);
    // The run being built: (start, end), and whether its `***` was already sent.
    let mut run: Option<(usize, usize)> = (covered > 0).then_some((0, covered));
    let mut at = 0;
    let flush = |out: &mut Vec<u8>, at: &mut usize, (start, end): (usize, usize)| {
        if start >= *at {
            out.extend_from_slice(&buf[*at..start]);
            if !(start == 0 && covered > 0) {
                out.extend_from_slice(MASK.as_bytes());
            }
        }
        *at = end;
    };
    for (start, end) in found {
        match run {
            Some((s, e)) if start < e => run = Some((s, e.max(end))),
            Some(r) => {
                flush(&mut out, &mut at, r);
                run = Some((start, end));
            }
            None => run = Some((start, end)),
        }
    }
    if let Some(r) = run {
        flush(&mut out, &mut at, r);
    }
    if at < until {
        out.extend_from_slice(&buf[at..until]);
        at = until;
    }
    (out, at)
}

/// `value` and the forms it usually takes when printed.
fn encodings(value: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![value.to_vec()];
    out.push(hex::encode(value).into_bytes());
    out.push(hex::encode_upper(value).into_bytes());
    for upper in [false, true] {
        let enc = percent(value, upper);
        if enc != value {
            out.push(enc);
        }
    }
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    for engine in [STANDARD, URL_SAFE] {
        for k in 0..3usize {
            let mut padded = vec![0u8; k];
            padded.extend_from_slice(value);
            let enc = engine.encode(&padded).into_bytes();
            // Character i covers bits [6i, 6i+6): keep those wholly inside the value's bits.
            let first = (8 * k).div_ceil(6);
            let last = (8 * (k + value.len())) / 6; // exclusive
            if last > first {
                out.push(enc[first..last.min(enc.len())].to_vec());
            }
            // And the value at the very end of the encoded data: the last characters then hold its last
            // bits padded with zeros, with or without `=` padding.
            if enc.len() > first {
                let tail = &enc[first..];
                out.push(tail.to_vec());
                let unpadded = tail.iter().rposition(|&c| c != b'=').map_or(0, |i| i + 1);
                out.push(tail[..unpadded].to_vec());
            }
        }
    }
    out
}

/// Percent-encoding of everything but RFC 3986's unreserved characters.
fn percent(value: &[u8], upper: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else if upper {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests;
