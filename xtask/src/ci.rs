//! `cargo xtask ci` and `cargo xtask live`: the project's whole test gate.
//!
//! `ci`: rustfmt, clippy (`-D warnings`, all targets), cargo-deny (bans, licenses, sources; the
//! advisory database cannot be fetched from the CI machines), the unit, integration and doc tests,
//! then the live tests against a real CRIU, then the Python package: `mypy --strict` and its
//! pytest suite (built into a virtual environment of its own, live tests included). A live test
//! that did not run is a failure here.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::install_criu;
use crate::process::{self, Out};
use crate::python;
use crate::testrun::{self, Tally};

/// cargo-deny version installed when none is present (`cargo install --locked`).
const CARGO_DENY_VERSION: &str = "0.20.2";

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Print a step header on stderr.
#[allow(clippy::print_stderr)]
fn header(what: &str) {
    eprintln!("\n==> {what}");
}

/// Run one cargo invocation as a CI step; on failure say what to run to fix it.
fn cargo_step(root: &Path, args: &[&str], fix: &str) -> anyhow::Result<()> {
    let mut cmd = process::command(cargo(), root, Out::Inherit, Out::Inherit);
    cmd.args(args);
    header(&process::display(&cmd));
    process::run(&mut cmd).with_context(|| fix.to_owned())
}

pub(crate) fn ci(root: &Path) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    cargo_step(
        root,
        &["fmt", "--all", "--check"],
        "run `cargo fmt --all` and commit the result",
    )?;
    cargo_step(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        "fix the clippy findings above",
    )?;
    ensure_cargo_deny(root)?;
    cargo_step(
        root,
        &["deny", "check", "bans", "licenses", "sources"],
        "fix the dependency or, with a reason, deny.toml",
    )?;

    header("programs the tests drive (python3, zstd, tmux, docker-registry, htpasswd, ip)");
    ensure_test_packages()?;
    header("build tests");
    let bins = testrun::build(root)?;
    let mut tally = Tally::default();
    header("unit, integration and doc tests (live_… skipped, PF_HAS_CRIU unset)");
    testrun::pass_non_live(root, &bins, &mut tally)?;

    header("CRIU for the live tests");
    let criu = ensure_criu(root)?;
    header("live tests (PF_HAS_CRIU=1, one at a time)");
    testrun::pass_live(&bins, &criu, &mut tally)?;
    header("Python package: maturin develop into target/py-venv");
    let venv = python::build(root)?;
    header("Python types: mypy --strict python/pf");
    python::typecheck(root, &venv)?;
    header("Python tests: pytest python/tests (PF_HAS_CRIU=1)");
    tally.python += python::test(root, &venv, &criu, &mut tally.problems)?;
    finish(&tally, true, start)
}

pub(crate) fn live(root: &Path) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    header("CRIU and the programs the live tests drive");
    ensure_test_packages()?;
    let criu = ensure_criu(root)?;
    header("build tests");
    let bins = testrun::build(root)?;
    let mut tally = Tally::default();
    header("live tests (PF_HAS_CRIU=1, one at a time)");
    testrun::pass_live(&bins, &criu, &mut tally)?;
    finish(&tally, false, start)
}

/// Debian packages the tests drive besides CRIU: python3 runs their goblins (and, with
/// python3-venv, the Python package's tests), zstd is the reference the store's interop tests
/// compare with, tmux runs the shells of `pf shell`'s tests, docker-registry (the CNCF
/// distribution server) is the real registry of pf-registry's and `pf push|pull`'s tests (each
/// starts its own on loopback; the package's service is not used), apache2-utils'
/// `htpasswd -B` writes the bcrypt password file of its basic-auth instance, openssl and
/// python3-cryptography make the key and sign the JWTs of its bearer-token instance's token
/// server, and iproute2's `ip` brings up the loopback of the network namespace a pulled goblin
/// thaws in.
const TEST_PACKAGES: &[&str] = &[
    "python3",
    "python3-venv",
    "zstd",
    "tmux",
    "docker-registry",
    "apache2-utils",
    "openssl",
    "python3-cryptography",
    "iproute2",
];

/// The programs the tests need besides CRIU (installed with apt when missing and root).
fn ensure_test_packages() -> anyhow::Result<()> {
    install_criu::ensure_debian_packages(TEST_PACKAGES).with_context(|| {
        format!(
            "the tests need {}: run `apt-get install -y {}`",
            TEST_PACKAGES.join(", "),
            TEST_PACKAGES.join(" ")
        )
    })
}

/// A working CRIU for the live tests (built when missing); its path.
fn ensure_criu(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    install_criu::ensure(root, &default_install())
        .context("the live tests need a working CRIU; CI fails without one")
}

fn default_install() -> install_criu::Options {
    install_criu::Options {
        force: false,
        dest: install_criu::DEFAULT_DEST.into(),
    }
}

/// Print the summary; fail when anything failed or no live test ran.
#[allow(clippy::print_stdout)]
fn finish(tally: &Tally, with_non_live: bool, start: Instant) -> anyhow::Result<ExitCode> {
    let total = tally.total();
    println!();
    for problem in &tally.problems {
        println!("problem: {problem}");
    }
    if with_non_live {
        println!(
            "unit: {} passed, integration: {} passed, doc: {} passed, live: {} passed, \
             python: {} passed ({:.0} s)",
            tally.unit.passed,
            tally.integration.passed,
            tally.doc.passed,
            tally.live.passed,
            tally.python.passed,
            start.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "live: {} passed ({:.0} s)",
            tally.live.passed,
            start.elapsed().as_secs_f64()
        );
    }
    if total.ignored > 0 {
        println!(
            "{} tests are marked ignored: the house style has none",
            total.ignored
        );
    }
    println!("{} passed, {} failed", total.passed, total.failed);
    if total.failed > 0 {
        bail!("{} tests failed", total.failed);
    }
    if tally.live.passed == 0 {
        bail!(
            "no live test ran: the live tests (named `{}…`) must run here",
            testrun::LIVE_PREFIX
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Install cargo-deny if `cargo deny` is not available.
#[allow(clippy::print_stderr)]
fn ensure_cargo_deny(root: &Path) -> anyhow::Result<()> {
    let mut probe = process::command(cargo(), root, Out::Null, Out::Null);
    probe.args(["deny", "--version"]);
    if probe.status().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    header(&format!(
        "cargo install --locked cargo-deny@{CARGO_DENY_VERSION} (about 2–3 minutes, once)"
    ));
    let mut install = process::command(cargo(), root, Out::Inherit, Out::Inherit);
    install.args([
        "install",
        "--locked",
        &format!("cargo-deny@{CARGO_DENY_VERSION}"),
    ]);
    process::run(&mut install).with_context(|| {
        format!("run `cargo install --locked cargo-deny@{CARGO_DENY_VERSION}` to see why")
    })
}
