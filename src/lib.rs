//! What the integration tests (`tests/`) and the benchmarks (`benches/`) share: the real `cla-hub` and
//! `cla-worker` binaries, built from this workspace and found on disk.
//!
//! Cargo sets `CARGO_BIN_EXE_<name>` only for binaries of the package under test, and the binaries live
//! in packages of their own (`crates/cla-worker`, `crates/cla-hub`), so that the worker's dependency graph
//! holds no hub code. The first use of [`HUB`] or [`WORKER`] therefore runs `cargo build` for both binary
//! packages, in the profile, target directory and (with `--target`) target of the running test or
//! bench (a no-op when they are fresh), so `cargo test` never runs stale binaries. `CLA_TEST_BIN_DIR` points at prebuilt binaries
//! instead, and skips the build.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// One of the workspace's binaries, resolved (and built if need be) on first use; it can be passed
/// wherever a program path goes (`Command::new(HUB)`).
#[derive(Debug, Clone, Copy)]
pub struct Bin(&'static str);

/// The `cla-hub` binary.
pub const HUB: Bin = Bin("cla-hub");
/// The `cla-worker` binary.
pub const WORKER: Bin = Bin("cla-worker");

impl Bin {
    /// The binary's path.
    pub fn path(self) -> &'static Path {
        static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
        let (hub, worker) = PATHS.get_or_init(|| {
            let dir = bin_dir();
            let exe = |name: &str| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            (exe("cla-hub"), exe("cla-worker"))
        });
        if self.0 == "cla-hub" { hub } else { worker }
    }
}

impl AsRef<OsStr> for Bin {
    fn as_ref(&self) -> &OsStr {
        self.path().as_os_str()
    }
}

impl AsRef<Path> for Bin {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl From<Bin> for OsString {
    fn from(b: Bin) -> OsString {
        b.path().as_os_str().to_owned()
    }
}

impl fmt::Display for Bin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path().display().fmt(f)
    }
}

/// The directory holding fresh binaries: `CLA_TEST_BIN_DIR`, or this profile's output directory after
/// `cargo build -p cla-hub -p cla-worker` there.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLA_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // A test or bench runs as TARGET/PROFILE/deps/NAME-HASH (or TARGET/TRIPLE/PROFILE/deps/NAME-HASH).
    let exe = std::env::current_exe().expect("the test binary's own path");
    let deps = exe.parent().expect("test binaries live in a deps directory");
    let profile_dir = deps.parent().expect("deps lives in a profile directory");
    let mut target_dir = profile_dir
        .parent()
        .expect("a profile directory lives in a target directory");
    // Built with `--target TRIPLE`, the profile directory is TARGET/TRIPLE/PROFILE. Cargo marks the
    // target directory itself with CACHEDIR.TAG.
    let mut triple = None;
    if !target_dir.join("CACHEDIR.TAG").exists()
        && let Some(up) = target_dir.parent()
        && up.join("CACHEDIR.TAG").exists()
    {
        triple = target_dir.file_name().map(OsStr::to_owned);
        target_dir = up;
    }
    let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("cannot tell the build profile from {}", exe.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    // Cargo gives a running test or bench variables about itself (CARGO_PKG_*, CARGO_MANIFEST_DIR,
    // CARGO_PRIMARY_PACKAGE, OUT_DIR, ...). Passed on, they reach the crates this build compiles, and
    // those that read such a variable would be rebuilt here and again by the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_cargo_given(&name) {
            build.env_remove(&*name);
        }
    }
    let out = build
        .args([
            "build",
            "--quiet",
            "-p",
            "cla-hub",
            "-p",
            "cla-worker",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .args(
            triple
                .iter()
                .flat_map(|t| [OsStr::new("--target"), t.as_os_str()]),
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    assert!(
        out.status.success(),
        "building the binaries under test failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    profile_dir.to_path_buf()
}

/// A variable Cargo sets for the test or bench it runs, as opposed to one that configures Cargo.
fn is_cargo_given(name: &str) -> bool {
    const GIVEN: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    GIVEN.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
}
