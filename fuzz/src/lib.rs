//! The bodies of the fuzz targets: each takes arbitrary bytes, feeds them to one decoder or parser that
//! reads input from outside, and checks what every property test checks too: no panic, and an error is
//! one line (a peer's bytes never make a multi-line log or terminal message).

use std::path::Path;

/// Panics (a finding) when an error message is not one line.
fn one_line(what: &str, e: &str) {
    assert!(!e.contains('\n') && !e.contains('\r'), "{what}: a multi-line error: {e:?}");
}

/// What a worker decodes: hub messages (text frames) and output/transfer chunks (binary frames).
pub fn worker_frames(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = cla_protocol::decode_text::<cla_protocol::HubMessage>(text) {
            one_line("hub message", &e.to_string());
        }
    }
    let _ = cla_protocol::decode_binary(bytes::Bytes::copy_from_slice(data));
}

/// What a hub decodes: worker messages, and an admin client's exec-stream requests.
pub fn hub_frames(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match cla_protocol::decode_text::<cla_protocol::WorkerMessage>(text) {
        Ok(cla_protocol::WorkerMessage::Hello(h)) => {
            if let Err(e) = h.check() {
                one_line("hello bounds", &e);
            }
        }
        Ok(cla_protocol::WorkerMessage::Update { tags, envs }) => {
            let _ = cla_protocol::bounds::check_labels("tag", &tags);
            let _ = cla_protocol::bounds::check_labels("env", &envs);
        }
        Ok(_) => {}
        Err(e) => one_line("worker message", &e.to_string()),
    }
    if let Err(e) = cla_protocol::decode_text::<cla_protocol::api::AdminRequest>(text) {
        one_line("admin request", &e.to_string());
    }
}

/// The admin API's and the registration endpoint's JSON bodies, checked as the hub checks them.
pub fn admin_json(data: &[u8]) {
    use cla_protocol::api::{JOB_SPEC_FIELDS, JobSpec, RegisterRequest, check_fields};
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Err(e) = check_fields(&v, "job request", JOB_SPEC_FIELDS) {
            one_line("job fields", &e);
        }
        if let Ok(spec) = serde_json::from_value::<JobSpec>(v) {
            // What was accepted survives a round trip.
            let again = serde_json::to_value(&spec).expect("a job spec serializes");
            let back: JobSpec = serde_json::from_value(again).expect("a serialized job spec reads back");
            assert_eq!(back, spec);
        }
    }
    if let Ok(req) = serde_json::from_slice::<RegisterRequest>(data)
        && let Err(e) = req.check()
    {
        one_line("registration bounds", &e);
    }
}

/// The worker's config file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = cla_config::file::parse(Path::new("/fuzz/cla-worker.yml"), text) {
        let e = e.to_string();
        one_line("config", &e);
        assert!(e.contains("/fuzz/cla-worker.yml"), "the error names the file: {e}");
    }
}

/// A rulebook file.
pub fn rulebook(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = cla_rulebook::Rulebook::parse("fuzz.yml", text) {
        let e = e.to_string();
        one_line("rulebook", &e);
        assert!(e.starts_with("fuzz.yml:"), "the error names the file: {e}");
    }
}

/// A template string with `${...}` and `{{ js }}` parts, rendered with a few variables (in this process:
/// the engine's loop, call-depth and size limits hold; the wall clock and memory cap of the child
/// process are tested apart).
pub fn template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut vars = serde_json::Map::new();
    vars.insert("version".into(), serde_json::json!("1.2.3"));
    vars.insert("hosts".into(), serde_json::json!(["web-1", "web-2"]));
    vars.insert("build".into(), serde_json::json!({"rc": 0, "output": "ok\n", "worker": "w1"}));
    if let Err(e) = cla_rulebook::template::render_str(text, &vars) {
        one_line("template", &e);
    }
}
