//! Plain aligned tables for human output (`workers`, `jobs`, `passkey list`).

/// Formats rows under headers, columns padded to their widest cell, two spaces apart.
pub(crate) fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The first line of a multi-line value, with an ellipsis for the rest, so one record stays one row.
pub(crate) fn first_line(s: &str) -> String {
    let text = s.trim();
    match text.split_once('\n') {
        Some((first, _)) => format!("{}…", first.trim_end()),
        None => text.to_owned(),
    }
}

/// `-` for an empty value.
pub(crate) fn or_dash(s: impl AsRef<str>) -> String {
    let s = s.as_ref();
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let t = super::render(
            &["ID", "STATE"],
            &[
                vec!["w1".into(), "IDLE".into()],
                vec!["long-id".into(), "BUSY".into()],
            ],
        );
        assert_eq!(t, "ID       STATE\nw1       IDLE\nlong-id  BUSY\n");
    }

    #[test]
    fn first_line_cuts_at_the_first_newline() {
        assert_eq!(super::first_line("echo a\necho b"), "echo a…");
        assert_eq!(super::first_line("  uname -a \n"), "uname -a");
        assert_eq!(super::first_line("true"), "true");
    }
}
