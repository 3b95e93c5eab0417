//! YAML parse errors in the user's words: the parser's and serde's messages name Rust types
//! (`invalid u32`, `untagged enum OneOrMany`, `struct Policy`) and parser options; [`message`] turns them
//! into what the file should hold, and names the key the error is at.

/// The first line of a parser error, reworded, with the key at `line` (1-based) of `text` named when
/// there is one: ``"`capacity`: expected a whole number, 0 or more"``.
pub fn message(error: &str, text: &str, line: u64) -> String {
    let first = error.lines().next().unwrap_or("").trim();
    let mut m = first.strip_prefix("error: ").unwrap_or(first);
    if m.starts_with("line ")
        && let Some((_, rest)) = m.split_once(": ")
    {
        m = rest;
    }
    let m = reword(m);
    match key_at(text, line) {
        Some(key) if !m.contains(&format!("`{key}`")) && !m.ends_with(&format!(": {key}")) => {
            format!("`{key}`: {m}")
        }
        _ => m,
    }
}

/// The key of a `key: value` line, if the line is one.
fn key_at(text: &str, line: u64) -> Option<String> {
    let l = text.lines().nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let l = l.trim_start().trim_start_matches("- ").trim_start();
    let (key, _) = l.split_once(':')?;
    let key = key.trim().trim_matches(['"', '\'']);
    (!key.is_empty() && key.len() <= 64 && key.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c)))
        .then(|| key.to_owned())
}

fn reword(m: &str) -> String {
    if m.contains("did not match any variant of untagged enum OneOrMany") {
        return "expected a value or a list of values".into();
    }
    if m == "expected mapping start" {
        return "expected a mapping (`key: value` lines, indented below it)".into();
    }
    if m == "expected sequence start" {
        return "expected a list (`- item` lines, or `[a, b]`)".into();
    }
    if let Some(what) = m.strip_prefix("invalid ").and_then(type_words) {
        return format!("expected {what}");
    }
    if let Some(rest) = m.strip_prefix("invalid type: ")
        && let Some((got, want)) = rest.split_once(", expected ")
    {
        return format!(
            "expected {}, not {got}",
            type_words(want).unwrap_or_else(|| want.to_owned())
        );
    }
    if let Some(rest) = m.strip_prefix("invalid value: ")
        && let Some((got, want)) = rest.split_once(", expected ")
    {
        return format!(
            "expected {}, not {got}",
            type_words(want).unwrap_or_else(|| want.to_owned())
        );
    }
    m.split(", set DuplicateKeyPolicy").next().unwrap_or(m).to_owned()
}

/// What a Rust type name means to someone writing YAML.
fn type_words(ty: &str) -> Option<String> {
    let ty = ty.trim();
    let words = match ty {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "bool" | "a boolean" => "true or false",
        "a string" | "string" | "char" => "a string",
        "a sequence" | "sequence" => "a list",
        "a map" | "map" => "a mapping (`key: value` lines)",
        t if t.starts_with("struct ") => "a mapping (`key: value` lines)",
        t if t.starts_with("a borrowed") || t == "unit" => "a value",
        _ => return None,
    };
    Some(words.to_owned())
}

#[cfg(test)]
mod tests {
    use super::message;

    #[test]
    fn rust_words_become_yaml_words_and_the_key_is_named() {
        let text = "id: w1\ncapacity: \"x\"\ntags: 5\npolicy: []\nurl: a\nurl: b\n";
        assert_eq!(
            message("invalid u32", text, 2),
            "`capacity`: expected a whole number, 0 or more"
        );
        assert_eq!(
            message(
                "data did not match any variant of untagged enum OneOrMany",
                text,
                3
            ),
            "`tags`: expected a value or a list of values"
        );
        assert_eq!(
            message("expected mapping start", text, 4),
            "`policy`: expected a mapping (`key: value` lines, indented below it)"
        );
        assert_eq!(
            message(
                "duplicate mapping key: url, set DuplicateKeyPolicy in Options if acceptable",
                text,
                6
            ),
            "duplicate mapping key: url"
        );
        assert_eq!(
            message(
                "invalid type: sequence, expected struct Policy",
                "policy: []\n",
                1
            ),
            "`policy`: expected a mapping (`key: value` lines), not sequence"
        );
        assert_eq!(
            message("error: line 1 column 3: something else", "", 1),
            "something else"
        );
    }
}
