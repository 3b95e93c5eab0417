use super::*;

const SECRET: &str = "hunter2-Sup3r/S3cret+value";

fn masks() -> Masks {
    Masks::new(&[SECRET, "clatk_0123456789abcdef"], &[]).unwrap()
}

fn b64(engine: base64::engine::GeneralPurpose, prefix: &[u8]) -> String {
    let mut data = prefix.to_vec();
    data.extend_from_slice(SECRET.as_bytes());
    engine.encode(data)
}

#[test]
fn every_encoding_is_masked() {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    let m = masks();
    // Each form, and how many of its characters may show: none, except those of a base64 form that
    // (also) encode the bytes before the value.
    let forms = [
        (SECRET.to_owned(), 0),
        (hex::encode(SECRET), 0),
        (hex::encode_upper(SECRET), 0),
        (String::from_utf8(percent(SECRET.as_bytes(), false)).unwrap(), 0),
        (String::from_utf8(percent(SECRET.as_bytes(), true)).unwrap(), 0),
        (b64(STANDARD, b""), 0),
        (b64(STANDARD, b"x"), 2),
        (b64(STANDARD, b"xy"), 3),
        (b64(URL_SAFE, b"xyz"), 4),
        (b64(URL_SAFE, b"x"), 2),
        (b64(URL_SAFE_NO_PAD, b"xy"), 3),
    ];
    for (form, may_show) in forms {
        let out = m.text(&format!("before {form} after"));
        assert!(out.contains(MASK), "{form} -> {out}");
        assert!(out.starts_with("before ") && out.ends_with(" after"), "{out}");
        let visible = out.len() - "before  after".len() - MASK.len();
        assert!(visible <= may_show, "{form} -> {out}");
    }
}

#[test]
fn text_without_secrets_passes_unchanged() {
    let m = masks();
    let text = "hunter2 is not it; hex 68756e746572 is short; normal output\n";
    assert_eq!(m.text(text), text);
    assert_eq!(Masks::none().text(text), text);
}

/// A secret split at every possible boundary, byte by byte, and in random pieces: never emitted whole
/// or in part, and the output equals masking the whole text at once.
#[test]
fn secrets_split_across_chunks_are_caught() {
    let m = masks();
    let text = format!("a{SECRET}b {} c {SECRET}{SECRET} end", hex::encode(SECRET));
    let whole = m.text(&text);
    assert_eq!(whole, "a***b *** c ****** end");
    for cut in 0..=text.len() {
        let mut s = m.stream();
        let mut out = s.push(&text.as_bytes()[..cut]);
        out.extend(s.push(&text.as_bytes()[cut..]));
        out.extend(s.finish());
        assert_eq!(String::from_utf8(out).unwrap(), whole, "cut at {cut}");
    }
    let mut s = m.stream();
    let mut out = Vec::new();
    for b in text.as_bytes() {
        let piece = s.push(std::slice::from_ref(b));
        assert!(
            !String::from_utf8_lossy(&piece).contains("Sup3r"),
            "no part of it leaks early"
        );
        out.extend(piece);
    }
    out.extend(s.finish());
    assert_eq!(String::from_utf8(out).unwrap(), whole);
    // Pseudo-random pieces.
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..200 {
        let mut s = m.stream();
        let (mut out, mut at) = (Vec::new(), 0);
        while at < text.len() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = 1 + (seed % 9) as usize;
            let end = (at + n).min(text.len());
            out.extend(s.push(&text.as_bytes()[at..end]));
            at = end;
        }
        out.extend(s.finish());
        assert_eq!(String::from_utf8(out).unwrap(), whole);
    }
}

#[test]
fn output_is_held_only_when_it_could_be_a_secret() {
    let m = masks();
    let mut s = m.stream();
    assert_eq!(s.push(b"progress 10%\n"), b"progress 10%\n", "nothing held");
    assert_eq!(s.push(b"token: hunt"), b"token: ", "the possible start is held");
    assert_eq!(s.held(), 4);
    assert_eq!(
        s.push(b"ing season"),
        b"hunting season",
        "and let go once it cannot be one"
    );
    assert_eq!(s.finish(), b"");
}

#[test]
fn a_secret_that_prefixes_another_and_overlaps() {
    let m = Masks::new(&["abcdef12", "abcdef1234"], &[]).unwrap();
    assert_eq!(m.text("xabcdef1234y"), "x***y", "the longer one wins");
    assert_eq!(m.text("xabcdef12y"), "x***y");
    assert_eq!(m.text("abcdef12abcdef12"), "******");
}

#[test]
fn overlapping_secrets_are_one_run_at_any_cut() {
    let m = Masks::new(&["abcdefgh", "efghijkl"], &[]).unwrap();
    let text = "x abcdefghijkl y abcdefgh z";
    let whole = m.text(text);
    assert_eq!(whole, "x *** y *** z");
    for cut in 0..=text.len() {
        for cut2 in cut..=text.len() {
            let mut s = m.stream();
            let mut out = s.push(&text.as_bytes()[..cut]);
            out.extend(s.push(&text.as_bytes()[cut..cut2]));
            out.extend(s.push(&text.as_bytes()[cut2..]));
            out.extend(s.finish());
            assert_eq!(String::from_utf8(out).unwrap(), whole, "cuts at {cut}, {cut2}");
        }
    }
}

#[test]
fn patterns_are_masked_and_checked() {
    let m = Masks::new::<&str>(&[], &["clatk_[0-9a-f]{16}".to_owned()]).unwrap();
    assert_eq!(m.text("t=clatk_0123456789abcdef."), "t=***.");
    let mut s = m.stream();
    let mut out = s.push(b"t=clatk_01234567");
    out.extend(s.push(b"89abcdef."));
    out.extend(s.finish());
    assert_eq!(out, b"t=***.");
    let e = Masks::new::<&str>(&[], &["(".to_owned()]).err().unwrap();
    assert!(
        e.contains("pattern `(`") && e.contains("not a valid regex"),
        "{e}"
    );
    assert!(e.contains("unclosed group"), "the syntax error's own words: {e}");
    let e = Masks::new::<&str>(&[], &["x*".to_owned()]).err().unwrap();
    assert!(e.contains("empty string"), "{e}");
}

#[test]
fn patterns_whose_automaton_explodes_are_refused_quickly() {
    // Found by the property tests: `[0-9A-Z]{16}` mutated into a large count made the DFA take
    // gigabytes. Each of these is refused with a one-line error, in bounded memory.
    for p in ["[0-9A-Z]{16666}", "(a|b)*a(a|b){24}", "x{1000}{1000}"] {
        let e = check_pattern(p)
            .err()
            .unwrap_or_else(|| panic!("{p} was accepted"));
        assert!(e.contains("too large"), "{p}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    check_pattern("AKIA[0-9A-Z]{16}").unwrap();
    check_pattern("[0-9a-f]{64}").unwrap();
}

#[test]
fn short_values_are_not_masked_and_json_is() {
    let m = Masks::new(&["abc", SECRET], &[]).unwrap();
    assert_eq!(m.text("abc"), "abc");
    let mut v = serde_json::json!({"k": [SECRET, 1, {"n": format!("x{SECRET}")}], SECRET: true});
    m.json(&mut v);
    assert_eq!(
        v,
        serde_json::json!({"k": ["***", 1, {"n": "x***"}], "***": true})
    );
    assert!(!format!("{m:?}").contains(SECRET));
}
