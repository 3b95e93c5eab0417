//! Filling in templates: `${name.member}` looks a variable up, `{{ js }}` evaluates JavaScript (boa, here
//! on the hub side, with the variables as globals). `$${` and `$${{` write a literal `${` and `{{`.
//!
//! A string that is nothing but one `${…}` or one `{{ … }}` keeps the value's type (a list stays a list,
//! `true` stays a boolean); inside longer text values are written out (strings as they are, other values
//! as JSON, null as nothing).

use serde_json::{Map, Value as Json};

/// The variables of a run: `--var`s, `vars:`, captures, loop variables.
pub type Vars = Map<String, Json>;

enum Part<'a> {
    Text(std::borrow::Cow<'a, str>),
    Var(&'a str),
    Js(&'a str),
}

/// Splits `text` into literal text, `${…}` and `{{ … }}` parts.
fn parts(text: &str) -> Result<Vec<Part<'_>>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("$${{") {
            lit.push_str("{{");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("$${") {
            lit.push_str("${");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r
                .find('}')
                .ok_or_else(|| format!("`${{` without its closing `}}` in `{text}`"))?;
            flush(&mut lit, &mut out);
            out.push(Part::Var(r[..end].trim()));
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("{{") {
            let end = js_end(r).ok_or_else(|| format!("`{{{{` without its closing `}}}}` in `{text}`"))?;
            flush(&mut lit, &mut out);
            out.push(Part::Js(r[..end].trim()));
            rest = &r[end + 2..];
        } else {
            let c = rest.chars().next().expect("not empty");
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    flush(&mut lit, &mut out);
    Ok(out)
}

fn flush(lit: &mut String, out: &mut Vec<Part<'_>>) {
    if !lit.is_empty() {
        out.push(Part::Text(std::mem::take(lit).into()));
    }
}

/// Where the `}}` closing a JS expression is: braces of object literals and blocks, and quoted strings,
/// are skipped over.
fn js_end(code: &str) -> Option<usize> {
    let b = code.as_bytes();
    let (mut depth, mut quote, mut i) = (0usize, None::<u8>, 0);
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                b'\'' | b'"' | b'`' => quote = Some(c),
                b'{' => depth += 1,
                b'}' if depth == 0 && b.get(i + 1) == Some(&b'}') => return Some(i),
                b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Fills in one string. An error is one line: the template text it quotes is escaped and cut.
pub fn render_str(text: &str, vars: &Vars) -> Result<Json, String> {
    fill(text, vars).map_err(|e| cla_common::util::one_line(&e, 400))
}

fn fill(text: &str, vars: &Vars) -> Result<Json, String> {
    let mut parts = parts(text)?;
    if parts.len() == 1 {
        match parts.pop().expect("one part") {
            Part::Var(path) => return lookup(path, vars),
            Part::Js(code) => return js(code, vars),
            Part::Text(t) => return Ok(Json::String(t.into_owned())),
        }
    }
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(&t),
            Part::Var(path) => out.push_str(&to_text(&lookup(path, vars)?)),
            Part::Js(code) => out.push_str(&to_text(&js(code, vars)?)),
        }
    }
    Ok(Json::String(out))
}

/// Fills in every string inside a value (mapping keys stay as written).
pub fn render(v: &Json, vars: &Vars) -> Result<Json, String> {
    Ok(match v {
        Json::String(s) => render_str(s, vars)?,
        Json::Array(items) => Json::Array(items.iter().map(|i| render(i, vars)).collect::<Result<_, _>>()?),
        Json::Object(m) => Json::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// A value written into text: strings as they are, null as nothing, the rest as JSON.
pub fn to_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

/// Whether a condition holds: false, null, 0, "" and the strings "false", "0", "no", "off" do not.
pub fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Json::String(s) => !matches!(s.trim(), "" | "false" | "0" | "no" | "off"),
        Json::Array(_) | Json::Object(_) => true,
    }
}

pub use cla_eval::template::is_name;

/// `name`, `name.member`, `name.list[0].member`.
fn lookup(path: &str, vars: &Vars) -> Result<Json, String> {
    let (name, mut rest) = match path.find(['.', '[']) {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let mut v = vars.get(name).ok_or_else(|| {
        let mut known: Vec<&str> = vars.keys().map(String::as_str).collect();
        known.sort_unstable();
        format!(
            "unknown variable `{name}` in `${{{path}}}` (known: {}); set it with `--var {name}=…`, `vars:` or a \
             capture, or write `$${{{path}}}` to pass it to the shell as written",
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        )
    })?;
    let mut at = name.to_owned();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let member = &r[..end];
            v = match v {
                Json::Object(m) => m.get(member).ok_or_else(|| {
                    let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                    format!("`{at}` has no `{member}` (it has: {})", keys.join(", "))
                })?,
                other => {
                    return Err(format!(
                        "`{at}` is {}, not an object with `{member}`",
                        kind(other)
                    ));
                }
            };
            at = format!("{at}.{member}");
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .ok_or_else(|| format!("`[` without `]` in `${{{path}}}`"))?;
            let index: usize = r[..end]
                .trim()
                .parse()
                .map_err(|_| format!("`[{}]` in `${{{path}}}` is not a list index", &r[..end]))?;
            v = match v {
                Json::Array(items) => items
                    .get(index)
                    .ok_or_else(|| format!("`{at}` has {} items; [{index}] is past the end", items.len()))?,
                other => return Err(format!("`{at}` is {}, not a list", kind(other))),
            };
            at = format!("{at}[{index}]");
            rest = &r[end + 1..];
        } else {
            return Err(format!(
                "`${{{path}}}` is not a variable reference like `${{name.member}}`"
            ));
        }
    }
    Ok(v.clone())
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// Evaluates a `{{ … }}` expression (`cla_eval::template`: a fresh context whose globals are the
/// variables, under time, memory, loop, call-depth and size limits).
fn js(code: &str, vars: &Vars) -> Result<Json, String> {
    cla_eval::template::evaluate(code, vars, &cla_eval::template::TemplateLimits::default())
        .map_err(|e| format!("`{{{{ {} }}}}`: {e}", cla_common::util::one_line(code.trim(), 60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Vars {
        json!({
            "app": "shop",
            "n": 3,
            "build": {"rc": 0, "output": "ok\n", "list": ["a", {"b": 2}]},
            "flag": true,
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn variables_and_members() {
        let v = vars();
        assert_eq!(
            render_str("deploy ${app} x${n}", &v).unwrap(),
            json!("deploy shop x3")
        );
        assert_eq!(render_str("${build.rc}", &v).unwrap(), json!(0));
        assert_eq!(render_str("${ build.list[1].b }", &v).unwrap(), json!(2));
        assert_eq!(render_str("${build.list}", &v).unwrap(), json!(["a", {"b": 2}]));
        assert_eq!(
            render_str("[${build.list}]", &v).unwrap(),
            json!("[[\"a\",{\"b\":2}]]")
        );
        assert_eq!(render_str("plain", &v).unwrap(), json!("plain"));
        assert_eq!(render_str("", &v).unwrap(), json!(""));
    }

    #[test]
    fn escapes_are_literal() {
        let v = vars();
        assert_eq!(
            render_str("echo $${HOME} $${{ x }}", &v).unwrap(),
            json!("echo ${HOME} {{ x }}")
        );
        assert_eq!(render_str("$HOME and $$", &v).unwrap(), json!("$HOME and $$"));
    }

    #[test]
    fn lookup_errors_say_what_exists() {
        let v = vars();
        let e = render_str("${nope}", &v).unwrap_err();
        assert!(
            e.contains("unknown variable `nope`") && e.contains("app, build, flag, n"),
            "{e}"
        );
        let e = render_str("${build.rcc}", &v).unwrap_err();
        assert!(
            e.contains("`build` has no `rcc` (it has: rc, output, list)"),
            "{e}"
        );
        let e = render_str("${build.list[5]}", &v).unwrap_err();
        assert!(e.contains("has 2 items"), "{e}");
        let e = render_str("${app.x}", &v).unwrap_err();
        assert!(e.contains("`app` is a string"), "{e}");
        assert!(
            render_str("${app", &v)
                .unwrap_err()
                .contains("without its closing")
        );
        assert!(
            render_str("{{ 1 + ", &v)
                .unwrap_err()
                .contains("without its closing")
        );
    }

    #[test]
    fn javascript_expressions() {
        let v = vars();
        assert_eq!(render_str("{{ n * 2 }}", &v).unwrap(), json!(6));
        assert_eq!(render_str("{{ build.rc != 0 }}", &v).unwrap(), json!(false));
        assert_eq!(
            render_str("{{ app.toUpperCase() }}-{{ n }}", &v).unwrap(),
            json!("SHOP-3")
        );
        assert_eq!(render_str("{{ ({a: {b: 1}}).a }}", &v).unwrap(), json!({"b": 1}));
        assert_eq!(render_str("{{ '}}' + app }}", &v).unwrap(), json!("}}shop"));
        assert_eq!(
            render_str("{{ [1,2].map(x => x * n) }}", &v).unwrap(),
            json!([3, 6])
        );
        assert_eq!(render_str("{{ undefined }}", &v).unwrap(), json!(null));
        let e = render_str("{{ missing + 1 }}", &v).unwrap_err();
        assert!(e.contains("ReferenceError") && e.contains("missing"), "{e}");
        let e = render_str("{{ while (true) {} }}", &v).unwrap_err();
        assert!(e.to_lowercase().contains("loop"), "{e}");
        let e = render_str("{{ (x) => x }}", &v).unwrap_err();
        assert!(e.contains("function"), "{e}");
    }

    #[test]
    fn javascript_globals_keep_their_meaning_and_quote_helps_the_shell() {
        let mut v = vars();
        v.insert("undefined".into(), json!(5));
        v.insert("JSON".into(), json!("shadow"));
        assert_eq!(render_str("{{ JSON.stringify([n]) }}", &v).unwrap(), json!("[3]"));
        assert_eq!(
            render_str("{{ typeof undefined }}", &v).unwrap(),
            json!("undefined")
        );
        v.insert("who".into(), json!("it's; rm -rf /"));
        assert_eq!(
            render_str("echo {{ quote(who) }}", &v).unwrap(),
            json!("echo 'it'\\''s; rm -rf /'")
        );
        // A variable named like the helper wins over it.
        v.insert("quote".into(), json!("q"));
        assert_eq!(render_str("{{ quote }}", &v).unwrap(), json!("q"));
    }

    #[test]
    fn render_walks_lists_and_maps() {
        let v = vars();
        let t = json!({"cmd": ["echo", "${app}"], "n": 1, "env": {"K": "{{ n + 1 }}"}});
        assert_eq!(
            render(&t, &v).unwrap(),
            json!({"cmd": ["echo", "shop"], "n": 1, "env": {"K": 4}})
        );
    }

    #[test]
    fn truthiness() {
        for f in [
            json!(null),
            json!(false),
            json!(0),
            json!(""),
            json!("false"),
            json!(" no "),
            json!("0"),
        ] {
            assert!(!truthy(&f), "{f}");
        }
        for t in [
            json!(true),
            json!(1),
            json!("yes"),
            json!([]),
            json!({}),
            json!("x"),
        ] {
            assert!(truthy(&t), "{t}");
        }
    }
}
