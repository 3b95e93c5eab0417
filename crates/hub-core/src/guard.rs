//! Guards of the unauthenticated endpoints: a per-source limit on failed passkey attempts, and the audit
//! log of registrations and passkey changes (`DATA_DIR/audit.log`, one JSON object per line).
//!
//! Neither ever holds a secret: the audit log names passkeys by their public prefix only.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use cla_common::logging::RotatingFile;

/// Sources tracked at most; past it, sources whose allowance has refilled are forgotten.
const MAX_SOURCES: usize = 10_000;

/// A token bucket per source address: `per_minute` failures allowed, refilled evenly over a minute.
/// While a source's bucket is empty, its requests are refused before they are looked at.
pub struct FailureLimit {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl FailureLimit {
    /// `per_minute` failures per source; 0 turns the limit off.
    pub fn new(per_minute: u32) -> FailureLimit {
        FailureLimit {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds)` to wait while `source` has no failures left.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let key = key(source);
        let buckets = self.buckets.lock().expect("not poisoned");
        match buckets.get(&key).map(|b| self.refilled(*b, now)) {
            Some(b) if b.tokens < 1.0 => {
                let per_token = 60.0 / f64::from(self.per_minute);
                Err(((1.0 - b.tokens) * per_token).ceil().max(1.0) as u64)
            }
            _ => Ok(()),
        }
    }

    /// Counts a failure from `source`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let full = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if buckets.len() >= MAX_SOURCES {
            buckets.retain(|_, b| self.refilled(*b, now).tokens < full);
        }
        let b = buckets.entry(key(source)).or_insert(Bucket {
            tokens: full,
            at: now,
        });
        let mut fresh = self.refilled(*b, now);
        fresh.tokens = (fresh.tokens - 1.0).max(0.0);
        *b = fresh;
    }

    fn refilled(&self, b: Bucket, now: Instant) -> Bucket {
        let full = f64::from(self.per_minute);
        let gained = now.saturating_duration_since(b.at).as_secs_f64() * full / 60.0;
        Bucket {
            tokens: (b.tokens + gained).min(full),
            at: now,
        }
    }
}

/// IPv4 addresses count one by one; IPv6 ones by /64, the block one host usually gets.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One audit record.
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    pub time: String,
    /// `register`, `register_refused`, `unregister`, `passkey_create`, `passkey_revoke`.
    pub event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<&'a str>,
    /// The passkey's public prefix (`clapk_` and 8 hex digits), never the passkey.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passkey: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// For a coalesced line: how many refusals it stands for, and when the first of them was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<&'a str>,
}

impl<'a> AuditEvent<'a> {
    pub fn new(event: &'a str) -> AuditEvent<'a> {
        AuditEvent {
            time: cla_common::util::now_rfc3339(),
            event,
            source: None,
            worker: None,
            project: None,
            passkey: None,
            host: None,
            reason: None,
            count: None,
            since: None,
        }
    }
}

/// The append-only audit log, rotated by size like the logfile ([`AUDIT_MAX_BYTES`], [`AUDIT_KEEP`]
/// files kept).
///
/// Refusals of a source that is already rate-limited are not written one by one: the first of each
/// [`COALESCE_WINDOW`] is, and the next line for that source (or the hub's exit) carries the count of
/// the others, so a flood costs one line per source and minute.
pub struct Audit {
    path: PathBuf,
    file: Mutex<Option<RotatingFile>>,
    held: Mutex<HashMap<IpAddr, Held>>,
}

/// Rate-limited refusals of one source held back in the current window.
struct Held {
    since: Instant,
    first: String,
    count: u64,
}

/// The audit log's file name in the data dir.
pub const AUDIT_FILE: &str = "audit.log";
/// Size at which the audit log rotates, and rotated files kept (`audit.log.1` ...).
pub const AUDIT_MAX_BYTES: u64 = 16 << 20;
pub const AUDIT_KEEP: u32 = 5;
/// Window over which a rate-limited source's refusals are counted into one line.
pub const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Audit {
    pub fn new(data_dir: &Path) -> Audit {
        Audit {
            path: data_dir.join(AUDIT_FILE),
            file: Mutex::new(None),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Records a refusal of `source` while it is rate-limited: written if it is the first in its window,
    /// else counted.
    pub fn rate_limited(&self, source: IpAddr, now: Instant) {
        let source = key(source);
        let flush = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.len() >= MAX_SOURCES {
                let stale: Vec<IpAddr> = held
                    .iter()
                    .filter(|(_, h)| now.saturating_duration_since(h.since) >= COALESCE_WINDOW)
                    .map(|(ip, _)| *ip)
                    .collect();
                for ip in stale {
                    if let Some(h) = held.remove(&ip) {
                        self.write_held(ip, &h);
                    }
                }
            }
            match held.get_mut(&source) {
                Some(h) if now.saturating_duration_since(h.since) < COALESCE_WINDOW => {
                    h.count += 1;
                    return;
                }
                _ => {
                    let fresh = Held {
                        since: now,
                        first: cla_common::util::now_rfc3339(),
                        count: 0,
                    };
                    held.insert(source, fresh)
                }
            }
        };
        if let Some(h) = flush {
            self.write_held(source, &h);
        }
        let mut e = AuditEvent::new("register_refused");
        e.source = Some(source);
        e.reason =
            Some("rate limited (further refusals of this source in the next 60 s are counted in one line)");
        self.record(&e);
    }

    /// Writes the count of a window's held-back refusals, if any.
    fn write_held(&self, source: IpAddr, h: &Held) {
        if h.count == 0 {
            return;
        }
        let mut e = AuditEvent::new("register_refused");
        e.source = Some(source);
        e.reason = Some("rate limited");
        e.count = Some(h.count);
        e.since = Some(&h.first);
        self.record(&e);
    }

    /// Appends `event` as one line (one `write`, so lines never interleave). A failure to write is logged
    /// and does not fail the request it records.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let mut line = serde_json::to_vec(event).expect("audit events serialize");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if file.is_none() {
            match RotatingFile::open(&self.path, AUDIT_MAX_BYTES, AUDIT_KEEP) {
                Ok(f) => *file = Some(f),
                Err(e) => {
                    tracing::error!("cannot open the audit log {}: {e}", self.path.display());
                    return;
                }
            }
        }
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write_all(&line)
        {
            tracing::error!("cannot write the audit log {}: {e}", self.path.display());
            *file = None;
        }
    }
}

impl Drop for Audit {
    /// Counts held back when the hub stops are written, not lost.
    fn drop(&mut self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        for (ip, h) in held {
            self.write_held(ip, &h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn failures_are_limited_per_source_and_refill() {
        let limit = FailureLimit::new(10);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limit.check(a, t0).is_ok());
            limit.failed(a, t0);
        }
        let wait = limit.check(a, t0).unwrap_err();
        assert_eq!(wait, 6, "one failure back every 6 s at 10 a minute");
        assert!(limit.check(b, t0).is_ok(), "another source is not affected");
        assert!(limit.check(a, t0 + Duration::from_secs(6)).is_ok());
        assert!(limit.check(a, t0 + Duration::from_secs(5)).is_err());
        // Two addresses of one IPv6 /64 share a bucket; another /64 does not.
        let (v1, v2, v3): (IpAddr, IpAddr, IpAddr) = (
            "2001:db8:1:2::1".parse().unwrap(),
            "2001:db8:1:2::ffff".parse().unwrap(),
            "2001:db8:1:3::1".parse().unwrap(),
        );
        for _ in 0..10 {
            limit.failed(v1, t0);
        }
        assert!(limit.check(v2, t0).is_err());
        assert!(limit.check(v3, t0).is_ok());
        assert!(FailureLimit::new(0).check(a, t0).is_ok(), "0 is off");
    }

    #[test]
    fn a_rate_limited_flood_costs_one_audit_line_per_window() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::new(dir.path());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..5000 {
            audit.rate_limited(a, t0 + Duration::from_millis(i));
        }
        audit.rate_limited(b, t0);
        // The next window of `a` writes the count of the last one.
        audit.rate_limited(a, t0 + COALESCE_WINDOW + Duration::from_secs(1));
        audit.rate_limited(a, t0 + COALESCE_WINDOW + Duration::from_secs(2));
        drop(audit);
        let text = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5, "{text}");
        let counts: Vec<u64> = lines.iter().filter_map(|l| l["count"].as_u64()).collect();
        assert_eq!(counts, [4999, 1], "{text}");
    }

    #[test]
    fn audit_lines_are_json_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::new(dir.path());
        let mut e = AuditEvent::new("register");
        e.worker = Some("w1");
        e.passkey = Some("clapk_0123abcd");
        audit.record(&e);
        audit.record(&AuditEvent::new("register_refused"));
        let text = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["worker"], "w1");
        assert_eq!(lines[1]["event"], "register_refused");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(AUDIT_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
