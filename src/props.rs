//! Property tests over hostile input: the frame decoder, the config loader, the rulebook parser, policy
//! path checks and the secret masker. Each property runs `PROPTEST_CASES` cases (proptest's default
//! 256 when unset); `.ci/run` runs them in release mode with enough cases for over 100,000 in all.
//! The properties: no input makes them panic, every error is one line naming its source, and what is
//! accepted keeps the invariant the code promises.

use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;

use crate::protocol::api::{AdminEvent, AdminRequest};
use crate::protocol::{Chunk, HubMessage, WorkerMessage, decode_binary, decode_text, encode_binary};

/// Valid messages of every direction, to mutate.
const MESSAGES: &[&str] = &[
    r#"{"type":"hello","version":1,"agent":"cla-worker 0.1.0","tags":["a"],"envs":[],"capacity":2,"host":"h1","os":"linux","arch":"x86_64","pid":42,"resume":["j1"],"features":["transfer","rotate"]}"#,
    r#"{"type":"finished","job":"j","outcome":"succeeded","rc":0,"duration_ms":3,"output_bytes":[1,2]}"#,
    r#"{"type":"transfer","job":"j","op":"resume","received":7}"#,
    r#"{"type":"rotated","saved":true,"message":"/etc/cla-worker.yml"}"#,
    r#"{"type":"exec","job":"j","argv":["ls","-l"],"stdout":1,"stderr":2,"timeout_ms":5}"#,
    r#"{"type":"eval","job":"j","code":"1+1","stash":{"a":[1,{"b":null}]},"stdout":3}"#,
    r#"{"type":"welcome","session":"s","heartbeat_secs":5,"limits":{"max_frame_bytes":16777216},"resume":[]}"#,
    r#"{"type":"ship","job":"j","dest":"/tmp/x","stream":4}"#,
    r#"{"type":"rotate","token":"clatk_00"}"#,
    r#"{"type":"error","code":"unsupported","message":"m"}"#,
];

/// A text mutated by `edits`: (position, kind, byte) — replace, insert or delete.
fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> String {
    let mut b = text.as_bytes().to_vec();
    for &(pos, kind, byte) in edits {
        let at = if b.is_empty() { 0 } else { pos % (b.len() + 1) };
        match kind % 3 {
            0 if at < b.len() => b[at] = byte,
            1 => b.insert(at, byte),
            _ if at < b.len() => {
                b.remove(at);
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

/// Text that is mostly JSON punctuation and keywords, so the decoder goes deep.
fn jsonish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("\"type\"".to_owned()),
        Just("\"hello\"".to_owned()),
        Just("\"exec\"".to_owned()),
        Just("\"job\"".to_owned()),
        Just("null".to_owned()),
        Just("1e400".to_owned()),
        Just("-1".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

fn one_line(e: &impl std::fmt::Display) -> bool {
    !e.to_string().contains('\n')
}

proptest! {
    #[test]
    fn props_frames_decode_or_fail_cleanly(text in prop_oneof![any::<String>(), jsonish()]) {
        if let Err(e) = decode_text::<WorkerMessage>(&text) { prop_assert!(one_line(&e), "{e}"); }
        if let Err(e) = decode_text::<HubMessage>(&text) { prop_assert!(one_line(&e), "{e}"); }
        let _ = decode_text::<AdminRequest>(&text);
        let _ = decode_text::<AdminEvent>(&text);
    }

    #[test]
    fn props_mutated_messages_decode_or_fail_cleanly(i in 0..MESSAGES.len(), edits in edits()) {
        let text = mutate(MESSAGES[i], &edits);
        for r in [decode_text::<WorkerMessage>(&text).map(|_| ()), decode_text::<HubMessage>(&text).map(|_| ())] {
            if let Err(e) = r { prop_assert!(one_line(&e), "{e}"); }
        }
        // What decodes encodes and decodes again to the same thing.
        if let Ok(m) = decode_text::<WorkerMessage>(&text) {
            let again = crate::protocol::encode_text(&m);
            prop_assert_eq!(decode_text::<WorkerMessage>(&again).unwrap(), m);
        }
        if let Ok(m) = decode_text::<HubMessage>(&text) {
            let again = crate::protocol::encode_text(&m);
            prop_assert_eq!(decode_text::<HubMessage>(&again).unwrap(), m);
        }
    }

    #[test]
    fn props_binary_frames(frame in prop::collection::vec(any::<u8>(), 0..64)) {
        let chunk = Chunk::from_frame(Bytes::from(frame.clone()));
        let plain = decode_binary(Bytes::from(frame.clone()));
        if frame.len() < 8 {
            prop_assert!(chunk.is_err() && plain.is_err());
        } else {
            let id = u64::from_be_bytes(frame[..8].try_into().unwrap());
            let chunk = chunk.unwrap();
            prop_assert_eq!(chunk.stream(), id);
            prop_assert_eq!(chunk.payload(), &frame[8..]);
            let (s, data) = plain.unwrap();
            prop_assert_eq!(s, id);
            prop_assert_eq!(&data[..], &frame[8..]);
        }
    }

    #[test]
    fn props_binary_round_trip(stream in any::<u64>(), data in prop::collection::vec(any::<u8>(), 0..256)) {
        let (s, d) = decode_binary(encode_binary(stream, &data)).unwrap();
        prop_assert_eq!(s, stream);
        prop_assert_eq!(&d[..], &data[..]);
    }

    #[test]
    fn props_config_loader_never_panics(edits in edits(), junk in any::<String>(), pick in 0..3u8) {
        let path = Path::new("/etc/props/cla-worker.yml");
        let example = include_str!("../cla-worker.example.yml");
        let text = match pick {
            0 => mutate(example, &edits),
            1 => junk,
            _ => format!("{}\n{junk}", mutate("url: http://h:1\ntags: [a, b]\npolicy:\n  deny: [exec]\n", &edits)),
        };
        if let Err(e) = crate::config::file::parse(path, &text) {
            prop_assert!(one_line(&e), "{e}");
            prop_assert!(e.to_string().contains("/etc/props/cla-worker.yml"), "{e}");
        }
    }

    #[test]
    fn props_rulebook_parser_never_panics(edits in edits(), junk in any::<String>(), pick in 0..4u8) {
        let samples = [
            include_str!("../docs/examples/hello.yml"),
            include_str!("../docs/examples/release.yml"),
            include_str!("../docs/examples/events.yml"),
        ];
        let text = match pick {
            3 => junk,
            i => mutate(samples[i as usize], &edits),
        };
        if let Err(e) = crate::rulebook::Rulebook::parse("props.yml", &text) {
            prop_assert!(e.to_string().starts_with("props.yml"), "{e}");
        }
    }

    #[test]
    fn props_masking_streams_like_the_whole(
        parts in prop::collection::vec(prop_oneof![
            Just("Pa55".to_owned()), Just("-w0rd/".to_owned()), Just("for+the_DB".to_owned()),
            Just("50613535".to_owned()), Just("UGE1NS13".to_owned()), Just(" ".to_owned()),
            Just("\n".to_owned()),
            prop::collection::vec(prop::sample::select(b"0123456789abcdef".to_vec()), 0..6)
                .prop_map(|v| String::from_utf8(v).unwrap()),
            any::<String>(),
        ], 0..30),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        const SECRET: &str = "Pa55-w0rd/for+the_DB";
        let masks = crate::mask::Masks::new(&[SECRET], &[]).unwrap();
        let text = parts.concat();
        let whole = masks.text(&text);
        prop_assert!(!whole.contains(SECRET), "{whole}");
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (text.len() + 1)).collect();
        cuts.sort_unstable();
        let mut s = masks.stream();
        let (mut out, mut at) = (Vec::new(), 0);
        for c in cuts.into_iter().chain([text.len()]) {
            out.extend(s.push(&text.as_bytes()[at..c]));
            at = c;
        }
        out.extend(s.finish());
        prop_assert_eq!(String::from_utf8_lossy(&out), whole);
    }
}

/// A tree for the policy properties: `root/allowed/{a,b}/f`, `root/outside/f`, and a symlink
/// `root/allowed/link` to `root/outside`.
#[cfg(unix)]
fn policy_tree() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let allowed = root.join("allowed");
    for d in ["allowed/a", "allowed/b", "outside"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join("f"), "x").unwrap();
    }
    std::os::unix::fs::symlink(root.join("outside"), allowed.join("link")).unwrap();
    (dir, root, allowed)
}

#[cfg(unix)]
proptest! {
    /// Whatever the path (relative or absolute, `.`, `..`, symlinks, missing parts), the policy allows
    /// it only if the file the OS would open is inside the allowed directory.
    #[test]
    fn props_policy_paths_never_escape(
        parts in prop::collection::vec(prop_oneof![
            Just("a"), Just("b"), Just(".."), Just("."), Just("link"), Just("f"), Just("new"), Just("allowed"),
            Just("outside"),
        ], 0..7),
        absolute in any::<bool>(),
    ) {
        let (_dir, root, allowed) = policy_tree();
        let policy = crate::policy::Enforcer::new(
            crate::config::Policy {
                paths: crate::config::PolicyPaths { read: vec![allowed.clone()], write: vec![allowed.clone()] },
                ..Default::default()
            },
            None,
        );
        let rel: std::path::PathBuf = parts.iter().collect();
        let path = if absolute { root.join(&rel) } else { rel.clone() };
        let verdict = policy.path("fetch", crate::policy::Access::Read, &path, Some(&allowed));
        let full = if absolute { path.clone() } else { allowed.join(&rel) };
        if verdict.is_ok() {
            prop_assert!(crate::policy::resolve(&full).starts_with(&allowed), "{}", full.display());
            if let Ok(real) = std::fs::canonicalize(&full) {
                prop_assert!(real.starts_with(&allowed), "{} -> {}", full.display(), real.display());
            }
        } else if let Ok(real) = std::fs::canonicalize(&full) {
            prop_assert!(!real.starts_with(&allowed), "refused {} though it is {}", full.display(), real.display());
        }
    }
}
