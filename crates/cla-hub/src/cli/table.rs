//! Plain aligned tables for human output (`workers`, `jobs`, `passkey list`), with comfy-table.
//!
//! Every cell is made safe first ([`cell`]): most of what a table shows came from a worker, a job or a
//! user, so a newline, an escape sequence or a 70,000-character host must neither forge a row, reach the
//! terminal as a control sequence, nor break the layout.

use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table, Width};

/// Widest cell shown; longer values are cut with an ellipsis (`--json` has them whole).
pub(crate) const MAX_CELL: usize = 80;

/// Formats rows under headers, columns padded to their widest cell, two spaces apart.
pub(crate) fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().map(|h| cell(h)));
    for row in rows {
        t.add_row(row.iter().map(|c| cell(c)));
    }
    let last = headers.len().saturating_sub(1);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == last { 0 } else { 2 }));
        col.set_cell_alignment(CellAlignment::Left);
        col.set_constraint(ColumnConstraint::UpperBoundary(Width::Fixed(MAX_CELL as u16 + 2)));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A value as a table shows it: control characters escaped (`\n`, `\u{1b}`), one line, at most
/// [`MAX_CELL`] characters.
pub(crate) fn cell(s: &str) -> String {
    cla_common::util::one_line(s, MAX_CELL)
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
    use super::*;

    #[test]
    fn aligns_columns() {
        let t = render(
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
        assert_eq!(first_line("echo a\necho b"), "echo a…");
        assert_eq!(first_line("  uname -a \n"), "uname -a");
        assert_eq!(first_line("true"), "true");
    }

    #[test]
    fn no_cell_can_forge_a_row_reach_the_terminal_or_break_the_layout() {
        let host = "h\nprod-db  IDLE  0/1\u{1b}[2J";
        let huge = "x".repeat(70_000);
        let t = render(
            &["ID", "HOST", "TAGS"],
            &[
                vec!["w1".into(), host.into(), huge.clone()],
                vec!["w2".into(), "ok".into(), "-".into()],
            ],
        );
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(!t.contains('\u{1b}'));
        assert!(t.contains(r"h\nprod-db  IDLE  0/1\u{1b}[2J"), "{t}");
        assert!(t.lines().all(|l| l.chars().count() < 2 * MAX_CELL + 20), "{t}");
    }
}
