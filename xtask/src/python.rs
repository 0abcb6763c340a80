//! The Python package's tests: a virtual environment of our own (`target/py-venv`) with maturin
//! and pytest at pinned versions, the package built into it from `python/` (`maturin develop`,
//! which compiles crates/py against the workspace), then pytest on `python/tests`, the live tests
//! included (`PF_HAS_CRIU=1`, so a live test that would skip under `CI` fails instead).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::{self, Finished, Out};
use crate::testrun::Counts;

/// The versions pip installs into the test environment.
const TOOLS: &[&str] = &["maturin==1.16.0", "pytest==9.2.0", "mypy==2.4.1"];
/// Deadline of the package build and of the pytest run.
const BUILD_DEADLINE: Duration = Duration::from_secs(900);
const PYTEST_DEADLINE: Duration = Duration::from_secs(600);

/// The virtual environment's directory.
fn venv_dir(root: &Path) -> PathBuf {
    process::target_dir(root).join("py-venv")
}

/// Make (or reuse) the venv, install the tools and build the package into it; returns the venv.
pub(crate) fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = venv_dir(root);
    let python = venv.join("bin/python");
    if !python.is_file() {
        let mut cmd = process::command("python3", root, Out::Inherit, Out::Inherit);
        cmd.args(["-m", "venv"]).arg(&venv);
        process::run(&mut cmd).context(
            "cannot make a Python virtual environment: install python3-venv \
             (`apt-get install -y python3-venv`)",
        )?;
    }
    let mut pip = process::command(&python, root, Out::Inherit, Out::Inherit);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(TOOLS);
    process::run(&mut pip).with_context(|| {
        format!(
            "cannot install {} into {}: is PyPI reachable?",
            TOOLS.join(" "),
            venv.display()
        )
    })?;
    let mut maturin = in_venv(
        process::command(
            venv.join("bin/maturin"),
            &root.join("python"),
            Out::Inherit,
            Out::Inherit,
        ),
        &venv,
    );
    maturin.args(["develop", "--quiet"]);
    match process::run_streaming(&mut maturin, BUILD_DEADLINE)? {
        (Finished::Exited(status), _) if status.success() => Ok(venv),
        (Finished::Exited(status), _) => bail!(
            "`maturin develop` in python/ failed ({status}): the Python package does not build"
        ),
        (Finished::TimedOut, _) => {
            bail!("`maturin develop` in python/ did not finish within {BUILD_DEADLINE:?}")
        }
    }
}

/// Type-check the package as its users' checkers will see it: `mypy --strict` on python/pf
/// (the stubs of the native module included). A type error fails CI, as clippy's warnings do.
pub(crate) fn typecheck(root: &Path, venv: &Path) -> anyhow::Result<()> {
    let mut mypy = in_venv(
        process::command(
            venv.join("bin/python"),
            &root.join("python"),
            Out::Inherit,
            Out::Inherit,
        ),
        venv,
    );
    mypy.args(["-m", "mypy", "--strict", "--no-incremental", "pf"]);
    process::run(&mut mypy).context("python/pf has type errors (listed above by mypy --strict)")
}

/// Run pytest on python/tests with the live tests on; what it counted.
pub(crate) fn test(
    root: &Path,
    venv: &Path,
    criu: &Path,
    problems: &mut Vec<String>,
) -> anyhow::Result<Counts> {
    let mut pytest = in_venv(
        process::command(
            venv.join("bin/python"),
            &root.join("python"),
            Out::Pipe,
            Out::Inherit,
        ),
        venv,
    );
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .env("PF_HAS_CRIU", "1");
    if std::env::var_os("PF_CRIU").is_none() {
        pytest.env("PF_CRIU", criu);
    }
    let (finished, lines) = process::run_streaming(&mut pytest, PYTEST_DEADLINE)?;
    let counts = lines
        .iter()
        .rev()
        .find_map(|l| parse_summary(l))
        .unwrap_or_default();
    match finished {
        Finished::Exited(status) if status.success() && counts.passed > 0 => {}
        Finished::Exited(status) => {
            problems.push(format!("pytest python/tests exited with {status}"));
            if counts.failed == 0 {
                // Crashed, or collected nothing: count it as one failure.
                return Ok(Counts {
                    failed: 1,
                    ..counts
                });
            }
        }
        Finished::TimedOut => {
            problems.push(format!(
                "pytest python/tests hit its {PYTEST_DEADLINE:?} deadline"
            ));
            return Ok(Counts {
                failed: counts.failed + 1,
                ..counts
            });
        }
    }
    Ok(counts)
}

/// A command run inside the venv (as `source bin/activate` would set it up).
fn in_venv(mut cmd: std::process::Command, venv: &Path) -> std::process::Command {
    let mut path = std::ffi::OsString::from(venv.join("bin"));
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    cmd.env("VIRTUAL_ENV", venv)
        .env("PATH", path)
        .env_remove("PYTHONHOME");
    cmd
}

/// pytest's closing line, `==== 3 failed, 19 passed, 1 skipped in 2.10s ====` (or, with `-q`,
/// the same without the rules): passed, failed and skipped (counted as ignored).
fn parse_summary(line: &str) -> Option<Counts> {
    let line = line.trim().trim_matches('=').trim();
    let (counts, _) = line.rsplit_once(" in ")?;
    let mut out = Counts::default();
    let mut any = false;
    for part in counts.split(", ") {
        let (n, what) = part.trim().split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        match what {
            "passed" => out.passed += n,
            "failed" | "error" | "errors" => out.failed += n,
            "skipped" | "xfailed" | "xpassed" | "deselected" => out.ignored += n,
            _ => {}
        }
        any = true;
    }
    any.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pytest_summaries() {
        assert_eq!(
            parse_summary("22 passed in 3.01s"),
            Some(Counts {
                passed: 22,
                failed: 0,
                ignored: 0
            })
        );
        assert_eq!(
            parse_summary("==== 1 failed, 14 passed, 7 skipped in 0.61s ===="),
            Some(Counts {
                passed: 14,
                failed: 1,
                ignored: 7
            })
        );
        assert_eq!(
            parse_summary("2 passed, 1 error in 1.00s"),
            Some(Counts {
                passed: 2,
                failed: 1,
                ignored: 0
            })
        );
        assert_eq!(parse_summary("tests/test_store.py ....   [100%]"), None);
        assert_eq!(parse_summary("collected 0 items in 0.1s"), None);
    }
}
