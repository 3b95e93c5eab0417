//! CLI output on stdout for both binaries: a closed pipe (`| head`) is an error the binaries turn into a
//! quiet success, never a panic as with `print!`.

/// Prints a value as pretty JSON on stdout (`--json` output). A closed pipe (`| head`) is an error that
/// the binaries turn into a quiet success, not a panic.
pub fn print_json<T: serde::Serialize>(v: &T) -> std::io::Result<()> {
    print_out(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).expect("serializes")
    ))
}

/// Writes text to stdout, reporting a closed pipe as an error instead of panicking like `print!`.
pub fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
