//! Property tests over hostile input: the frame decoders. Each property runs `PROPTEST_CASES` cases (proptest's
//! default 256 when unset); `.ci/run` runs every crate's `props` in release mode, over 100,000 cases in
//! all. The properties: no input makes them panic, every error is one line naming its source, and what
//! is accepted keeps the invariant the code promises.

use bytes::Bytes;
use cla_common::fuzz::mutate;
use proptest::prelude::*;

use crate::api::{AdminEvent, AdminRequest};
use crate::{Chunk, HubMessage, WorkerMessage, decode_binary, decode_text, encode_binary};

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
            let again = crate::encode_text(&m);
            prop_assert_eq!(decode_text::<WorkerMessage>(&again).unwrap(), m);
        }
        if let Ok(m) = decode_text::<HubMessage>(&text) {
            let again = crate::encode_text(&m);
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

    /// Admin API bodies: the unknown-field check and the job spec never panic, their errors are one line,
    /// and an accepted spec survives a round trip; a registration's bound checks never panic.
    #[test]
    fn props_admin_json_is_checked_cleanly(text in prop_oneof![jsonish(), job_json()]) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Err(e) = crate::api::check_fields(&v, "job request", crate::api::JOB_SPEC_FIELDS) {
                prop_assert!(one_line(&e), "{e}");
            }
            if let Ok(spec) = serde_json::from_value::<crate::api::JobSpec>(v) {
                let back: crate::api::JobSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
                prop_assert_eq!(back, spec);
            }
        }
        if let Ok(req) = serde_json::from_str::<crate::api::RegisterRequest>(&text)
            && let Err(e) = req.check()
        {
            prop_assert!(one_line(&e), "{e}");
        }
    }
}

/// JSON objects made of job-spec and registration keys with values of every type.
fn job_json() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "worker",
        "tags",
        "env",
        "cmd",
        "argv",
        "code",
        "stash",
        "ship",
        "fetch",
        "workdir",
        "env_vars",
        "timeout_secs",
        "queue_timeout_secs",
        "on_disconnect",
        "passkey",
        "id",
        "host",
        "envs",
        "csr",
        "x",
    ]);
    let value = prop_oneof![
        Just("\"a\"".to_owned()),
        Just("[\"a\",\"b c\"]".to_owned()),
        Just("{\"dest\":\"/x\",\"path\":\"/y\"}".to_owned()),
        Just("{\"cancel_after\":5}".to_owned()),
        Just("1.5".to_owned()),
        Just("-1".to_owned()),
        Just("null".to_owned()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    prop::collection::vec((key, value), 0..6).prop_map(|kv| {
        let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}
