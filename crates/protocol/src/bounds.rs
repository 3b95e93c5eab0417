//! Bounds on what a worker says about itself (at registration, in `hello` and in `update`): its id, tags,
//! envs, host and the other labels the hub stores and shows. The hub refuses a value past them with an
//! error that names the value and the bound; the worker checks its own config against the same bounds
//! when it loads it, so the mistake shows on the machine where it was made.
//!
//! docs/protocol.md lists them.

use crate::api::RegisterRequest;
use crate::message::Hello;

/// Longest worker id.
pub const MAX_ID_LEN: usize = 128;
/// Longest tag or env name.
pub const MAX_LABEL_LEN: usize = 64;
/// Most tags, and most envs, one worker has.
pub const MAX_LABELS: usize = 64;
/// Longest host name (DNS allows 253).
pub const MAX_HOST_LEN: usize = 253;
/// Longest agent, os, arch, user or version string.
pub const MAX_INFO_LEN: usize = 128;
/// Most feature names in `hello`, and the longest one.
pub const MAX_FEATURES: usize = 32;
/// Most job ids a worker may ask to resume in `hello` (each at most [`MAX_ID_LEN`]).
pub const MAX_RESUME: usize = 4096;
/// Largest `capacity` (jobs at once) a worker may announce.
pub const MAX_CAPACITY: u32 = 4096;
/// Largest certificate signing request (PEM) at registration.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Checks a worker id: letters, digits and `- _ . @`, 1 to [`MAX_ID_LEN`] characters, not `.` or `..`
/// (ids name spool directories and appear in headers, paths and logs).
pub fn check_worker_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "worker id must be 1 to {MAX_ID_LEN} characters (got {})",
            id.chars().count()
        ));
    }
    if id == "." || id == ".." {
        return Err(format!("worker id `{id}` is not allowed: it names a directory"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.@".contains(*c)))
    {
        return Err(format!(
            "worker id `{}` contains {}: use letters, digits and - _ . @",
            shown(id),
            describe(c)
        ));
    }
    Ok(())
}

/// Checks a tag or env name (`what` is "tag" or "env"): 1 to [`MAX_LABEL_LEN`] characters, letters,
/// digits and `- _ . : / @ + =`.
pub fn check_label(what: &str, label: &str) -> Result<(), String> {
    let n = label.chars().count();
    if n == 0 || n > MAX_LABEL_LEN {
        return Err(format!(
            "{what} `{}` must be 1 to {MAX_LABEL_LEN} characters (got {n})",
            shown(label)
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_alphanumeric() || "-_.:/@+=".contains(*c)))
    {
        return Err(format!(
            "{what} `{}` contains {}: use letters, digits and - _ . : / @ + =",
            shown(label),
            describe(c)
        ));
    }
    Ok(())
}

/// Checks a list of tags or envs: at most [`MAX_LABELS`], each as [`check_label`].
pub fn check_labels(what: &str, labels: &[String]) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} {what}s (got {})", labels.len()));
    }
    labels.iter().try_for_each(|l| check_label(what, l))
}

/// Checks a free-text label (host, agent, os, ...): at most `max` characters, no control characters.
pub fn check_info(what: &str, value: &str, max: usize) -> Result<(), String> {
    let n = value.chars().count();
    if n > max {
        return Err(format!("{what} is {n} characters long: at most {max}"));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!("{what} `{}` contains {}", shown(value), describe(c)));
    }
    Ok(())
}

impl Hello {
    /// Checks every field a worker may fill against the bounds of this module.
    pub fn check(&self) -> Result<(), String> {
        check_labels("tag", &self.tags)?;
        check_labels("env", &self.envs)?;
        check_info("host", &self.host, MAX_HOST_LEN)?;
        check_info("agent", &self.agent, MAX_INFO_LEN)?;
        check_info("os", &self.os, MAX_INFO_LEN)?;
        check_info("arch", &self.arch, MAX_INFO_LEN)?;
        if self.capacity > MAX_CAPACITY {
            return Err(format!("capacity {} is over {MAX_CAPACITY}", self.capacity));
        }
        if self.features.len() > MAX_FEATURES {
            return Err(format!(
                "at most {MAX_FEATURES} features (got {})",
                self.features.len()
            ));
        }
        for f in &self.features {
            check_label("feature", f)?;
        }
        if self.resume.len() > MAX_RESUME {
            return Err(format!(
                "at most {MAX_RESUME} jobs to resume (got {})",
                self.resume.len()
            ));
        }
        for j in &self.resume {
            check_info("job id", j, MAX_ID_LEN)?;
        }
        Ok(())
    }
}

impl RegisterRequest {
    /// Checks every field a worker may fill (the passkey is checked against the store).
    pub fn check(&self) -> Result<(), String> {
        if let Some(id) = &self.id {
            check_worker_id(id)?;
        }
        check_labels("tag", &self.tags)?;
        check_labels("env", &self.envs)?;
        if let Some(h) = &self.host {
            check_info("host", h, MAX_HOST_LEN)?;
        }
        for (what, v) in [("user", &self.user), ("version", &self.version)] {
            if let Some(v) = v {
                check_info(what, v, MAX_INFO_LEN)?;
            }
        }
        if self.csr.as_ref().is_some_and(|c| c.len() > MAX_CSR_LEN) {
            return Err(format!("the certificate request is over {MAX_CSR_LEN} bytes"));
        }
        Ok(())
    }
}

/// A value cut to 40 characters with control characters escaped, for quoting in an error.
pub(crate) fn shown(s: &str) -> String {
    let cut: String = s.chars().take(40).flat_map(char::escape_debug).collect();
    if s.chars().count() > 40 {
        format!("{cut}…")
    } else {
        cut
    }
}

/// How a character is named in an error: `` `é` ``, `` ` ` (a space) ``, or `U+001B` for one that does
/// not print.
fn describe(c: char) -> String {
    if c == ' ' {
        "` ` (a space)".to_owned()
    } else if c.is_control() || c.is_whitespace() {
        format!("U+{:04X}", c as u32)
    } else {
        format!("`{c}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids() {
        for ok in ["w1", "builder@ci-node-3", "a.b_c-d", "...", ".hidden"] {
            assert!(check_worker_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "a?b", "é", &"x".repeat(129)] {
            assert!(check_worker_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_worker_id("a\u{1b}[2J").unwrap_err(),
            "worker id `a\\u{1b}[2J` contains U+001B: use letters, digits and - _ . @"
        );
    }

    #[test]
    fn labels() {
        for ok in ["linux", "java:21", "zone=eu-1", "team/web", "gpu+cuda", "größe"] {
            assert!(check_label("tag", ok).is_ok(), "{ok}");
        }
        for bad in ["", "two words", "a\nb", "a,b", &"t".repeat(65)] {
            assert!(check_label("tag", bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        assert_eq!(
            check_labels("tag", &many).unwrap_err(),
            "at most 64 tags (got 65)"
        );
    }

    #[test]
    fn a_hello_with_a_huge_or_forged_host_is_refused() {
        let mut h = Hello {
            version: 1,
            agent: "cla-worker 0.1.0".into(),
            tags: vec!["linux".into()],
            envs: vec![],
            capacity: 4,
            host: "web-1".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            pid: 1,
            resume: vec![],
            features: vec!["transfer".into()],
        };
        assert!(h.check().is_ok());
        h.host = "x".repeat(70_000);
        assert_eq!(
            h.check().unwrap_err(),
            "host is 70000 characters long: at most 253"
        );
        h.host = "h\nprod-db  IDLE  0/1".into();
        assert!(h.check().unwrap_err().contains("U+000A"));
    }
}
