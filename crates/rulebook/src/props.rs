//! Property tests over hostile input: the rulebook parser. Each property runs `PROPTEST_CASES` cases (proptest's
//! default 256 when unset); `.ci/run` runs every crate's `props` in release mode, over 100,000 cases in
//! all. The properties: no input makes them panic, every error is one line naming its source, and what
//! is accepted keeps the invariant the code promises.

use cla_common::fuzz::mutate;
use proptest::prelude::*;

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

proptest! {
    #[test]
    fn props_rulebook_parser_never_panics(edits in edits(), junk in any::<String>(), pick in 0..4u8) {
        let samples = [
            include_str!("../../../docs/examples/hello.yml"),
            include_str!("../../../docs/examples/release.yml"),
            include_str!("../../../docs/examples/events.yml"),
        ];
        let text = match pick {
            3 => junk,
            i => mutate(samples[i as usize], &edits),
        };
        if let Err(e) = crate::Rulebook::parse("props.yml", &text) {
            prop_assert!(e.to_string().starts_with("props.yml"), "{e}");
        }
    }

    /// Templates (`${...}` and `{{ js }}` parts, in this process: the engine's limits hold) never panic,
    /// and their errors are one line.
    #[test]
    fn props_templates_render_or_fail_in_one_line(edits in edits(), junk in any::<String>(), pick in 0..3u8) {
        let samples = [
            "release ${version} on ${build.worker}: {{ build.rc == 0 ? 'ok' : 'failed ' + build.rc }}",
            "{{ hosts.map(h => quote(h)).join(' ') }} $${literal} $${{ also }} ${hosts[1]}",
        ];
        let text = match pick {
            2 => junk,
            i => mutate(samples[i as usize], &edits),
        };
        let mut vars = serde_json::Map::new();
        vars.insert("version".into(), serde_json::json!("1.2.3"));
        vars.insert("hosts".into(), serde_json::json!(["web-1", "web-2"]));
        vars.insert("build".into(), serde_json::json!({"rc": 0, "output": "ok\n", "worker": "w1"}));
        if let Err(e) = crate::template::render_str(&text, &vars) {
            prop_assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
        }
    }
}
