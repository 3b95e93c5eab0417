//! Property tests over hostile input: the secret masker. Each property runs `PROPTEST_CASES` cases (proptest's
//! default 256 when unset); `.ci/run` runs every crate's `props` in release mode, over 100,000 cases in
//! all. The properties: no input makes them panic, every error is one line naming its source, and what
//! is accepted keeps the invariant the code promises.

use proptest::prelude::*;

proptest! {

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
