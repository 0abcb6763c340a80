//! Helpers for running the `pf` binary in tests.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The path of a freshly built `pf` binary (built once per test run, in the test's profile).
///
/// `CARGO_BIN_EXE_pf` exists only for tests of the package that owns the binary, so this builds it
/// with the same cargo that runs the tests and finds it beside the test executable.
pub(crate) fn pf_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/it-<hash> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--package", "pf-cli", "--bin", "pf"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .stdin(Stdio::null())
            .status()
            .expect("run cargo build for the pf binary");
        assert!(status.success(), "cargo build of pf failed: {status}");
        let bin = profile_dir.join("pf");
        assert!(bin.is_file(), "pf binary not found at {}", bin.display());
        bin
    })
    .clone()
}

/// A `pf` command with stdin closed, a private store in `store`, and no inherited `PF_*` settings.
pub(crate) fn pf(store: &std::path::Path) -> Command {
    let mut cmd = Command::new(pf_bin());
    cmd.stdin(Stdio::null())
        .env_remove("PF_STORE")
        .env_remove("RUST_LOG")
        .arg("--store")
        .arg(store);
    cmd
}
