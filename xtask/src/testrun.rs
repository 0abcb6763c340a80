//! Running the workspace's tests in two passes and counting what ran.
//!
//! A live test (root + CRIU) is one whose own name (the last `::` segment) starts with `live_`.
//! Pass 1 runs every other test, in parallel, with `PF_HAS_CRIU` unset. Pass 2 runs the live tests
//! one at a time, each in its own process with `PF_HAS_CRIU=1` and a deadline. Test binaries are built once with
//! `cargo test --no-run --message-format=json` and then run directly, so each pass knows which
//! binary is unit and which is integration, and a hung live test is killed alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::{self, Finished, Out};

/// How a live test's own name starts: pass 1 skips those tests, pass 2 runs only them.
pub(crate) const LIVE_PREFIX: &str = "live_";

/// Whether a libtest name (`module::live_x`) is a live test.
pub(crate) fn is_live(name: &str) -> bool {
    name.rsplit("::")
        .next()
        .is_some_and(|own| own.starts_with(LIVE_PREFIX))
}

/// Deadline of one non-live test binary.
const BINARY_DEADLINE: Duration = Duration::from_secs(600);
/// Deadline of the doc-test run (it compiles the doc tests too).
const DOC_DEADLINE: Duration = Duration::from_secs(900);
/// Default deadline of one live test; `PF_LIVE_DEADLINE_SECS` overrides.
const LIVE_DEADLINE: Duration = Duration::from_secs(180);

/// Unit tests live in library and binary targets; integration tests in `tests/` targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Unit,
    Integration,
}

/// One test executable cargo built.
#[derive(Debug)]
pub(crate) struct TestBinary {
    pub(crate) path: PathBuf,
    pub(crate) kind: Kind,
    /// The package's directory: tests run there, as under `cargo test`.
    pub(crate) manifest_dir: PathBuf,
    /// `pf-core (lib)`, `pf-tests (test it)`.
    pub(crate) label: String,
}

/// Passed, failed and ignored tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    pub(crate) ignored: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Everything that ran.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) unit: Counts,
    pub(crate) integration: Counts,
    pub(crate) doc: Counts,
    pub(crate) live: Counts,
    /// The Python package's pytest run (live tests included).
    pub(crate) python: Counts,
    /// Binaries or tests that crashed or hit their deadline, for the final report.
    pub(crate) problems: Vec<String>,
}

impl Tally {
    pub(crate) fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in [
            self.unit,
            self.integration,
            self.doc,
            self.live,
            self.python,
        ] {
            t += c;
        }
        t
    }
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Build every test target of the workspace (all features) and list the executables.
pub(crate) fn build(root: &Path) -> anyhow::Result<Vec<TestBinary>> {
    let mut cmd = process::command(cargo(), root, Out::Pipe, Out::Inherit);
    cmd.args([
        "test",
        "--workspace",
        "--all-features",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", process::display(&cmd), out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(bin) = parse_artifact(line) {
            bins.push(bin);
        }
    }
    if bins.is_empty() {
        bail!("`{}` built no test executables", process::display(&cmd));
    }
    // The `pf` the integration tests run, built as they build it (tests/it/support.rs
    // `pf_bin`): one package alone unifies its dependencies' features otherwise than the
    // workspace, so this compiles them again. Here, rather than inside the first test that
    // needs pf, which then ran for minutes.
    let mut pf = process::command(cargo(), root, Out::Inherit, Out::Inherit);
    pf.args(["build", "--quiet", "--package", "pf-cli", "--bin", "pf"]);
    process::run(&mut pf).context("cannot build pf for the integration tests")?;
    Ok(bins)
}

/// A test executable from one line of cargo's JSON messages, if the line is one.
fn parse_artifact(line: &str) -> Option<TestBinary> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
        return None;
    }
    let path = PathBuf::from(msg["executable"].as_str()?);
    let kinds: Vec<&str> = msg["target"]["kind"]
        .as_array()?
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    let kind = if kinds.contains(&"test") {
        Kind::Integration
    } else {
        Kind::Unit
    };
    let manifest_dir = Path::new(msg["manifest_path"].as_str()?)
        .parent()?
        .to_path_buf();
    let target = msg["target"]["name"].as_str().unwrap_or("?");
    let label = format!("{target} ({})", kinds.join(","));
    Some(TestBinary {
        path,
        kind,
        manifest_dir,
        label,
    })
}

/// Sum of libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; …` lines.
pub(crate) fn parse_results<'a>(lines: impl Iterator<Item = &'a str>) -> (Counts, usize) {
    let mut counts = Counts::default();
    let mut seen = 0;
    for line in lines {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        seen += 1;
        let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
        for part in rest.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => counts.passed += n,
                "failed" => counts.failed += n,
                "ignored" => counts.ignored += n,
                _ => {}
            }
        }
    }
    (counts, seen)
}

/// Run one test executable with `args`; count what it reports. A crash or a timeout counts as one
/// failure and is noted in `problems`.
fn run_binary(
    bin: &TestBinary,
    args: &[&str],
    live: Option<&Path>,
    deadline: Duration,
    problems: &mut Vec<String>,
) -> anyhow::Result<Counts> {
    let mut cmd = process::command(&bin.path, &bin.manifest_dir, Out::Pipe, Out::Inherit);
    cmd.args(args)
        .env("CARGO", cargo())
        .env("CARGO_MANIFEST_DIR", &bin.manifest_dir);
    match live {
        Some(criu) => {
            cmd.env("PF_HAS_CRIU", "1");
            if std::env::var_os("PF_CRIU").is_none() {
                cmd.env("PF_CRIU", criu);
            }
        }
        None => {
            cmd.env_remove("PF_HAS_CRIU");
        }
    }
    let (finished, lines) = process::run_streaming(&mut cmd, deadline)?;
    let (mut counts, seen) = parse_results(lines.iter().map(String::as_str));
    let what = format!("{} {}", bin.label, args.join(" "));
    match finished {
        Finished::TimedOut => {
            counts.failed += 1;
            problems.push(format!("{what}: killed after {} s", deadline.as_secs()));
        }
        Finished::Exited(status) if !status.success() && counts.failed == 0 => {
            counts.failed += 1;
            problems.push(format!("{what}: exited with {status} (crash?)"));
        }
        Finished::Exited(status) if status.success() && seen == 0 => {
            problems.push(format!("{what}: printed no `test result:` line"));
        }
        Finished::Exited(_) => {}
    }
    Ok(counts)
}

/// Pass 1: every non-live test of every binary, then the doc tests.
pub(crate) fn pass_non_live(
    root: &Path,
    bins: &[TestBinary],
    tally: &mut Tally,
) -> anyhow::Result<()> {
    for bin in bins {
        let live: Vec<String> = list_tests(bin)?
            .into_iter()
            .filter(|n| is_live(n))
            .collect();
        let mut args = vec!["--exact"];
        for name in &live {
            args.extend(["--skip", name.as_str()]);
        }
        let counts = run_binary(bin, &args, None, BINARY_DEADLINE, &mut tally.problems)?;
        match bin.kind {
            Kind::Unit => tally.unit += counts,
            Kind::Integration => tally.integration += counts,
        }
    }
    let mut cmd = process::command(cargo(), root, Out::Pipe, Out::Inherit);
    cmd.args(["test", "--workspace", "--all-features", "--doc"])
        .env_remove("PF_HAS_CRIU");
    let (finished, lines) = process::run_streaming(&mut cmd, DOC_DEADLINE)?;
    let (counts, _) = parse_results(lines.iter().map(String::as_str));
    tally.doc += counts;
    match finished {
        Finished::Exited(status) if status.success() => {}
        Finished::Exited(status) => {
            if counts.failed == 0 {
                tally.doc.failed += 1;
            }
            tally
                .problems
                .push(format!("`{}` exited with {status}", process::display(&cmd)));
        }
        Finished::TimedOut => {
            tally.doc.failed += 1;
            tally.problems.push(format!(
                "`{}` killed after {} s",
                process::display(&cmd),
                DOC_DEADLINE.as_secs()
            ));
        }
    }
    Ok(())
}

/// The tests one binary holds, from `--list` (`path::name: test` lines).
fn list_tests(bin: &TestBinary) -> anyhow::Result<Vec<String>> {
    let mut cmd = process::command(&bin.path, &bin.manifest_dir, Out::Pipe, Out::Pipe);
    cmd.arg("--list")
        .env("CARGO", cargo())
        .env("CARGO_MANIFEST_DIR", &bin.manifest_dir);
    let out = process::output(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            process::display(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
}

/// Test names from libtest's `--list` output (benchmarks left out).
fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// Pass 2: each live test alone, serially, with `PF_HAS_CRIU=1`, `PF_CRIU` set to `criu` unless
/// the caller set it, and a deadline.
pub(crate) fn pass_live(bins: &[TestBinary], criu: &Path, tally: &mut Tally) -> anyhow::Result<()> {
    let deadline = std::env::var("PF_LIVE_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(LIVE_DEADLINE, Duration::from_secs);
    for bin in bins {
        for name in list_tests(bin)?.into_iter().filter(|n| is_live(n)) {
            let counts = run_binary(
                bin,
                &["--exact", &name, "--test-threads=1"],
                Some(criu),
                deadline,
                &mut tally.problems,
            )?;
            tally.live += counts;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let out = "running 3 tests\ntest a ... ok\n\
                   test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.01s\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
        let (counts, seen) = parse_results(out.lines());
        assert_eq!(seen, 2);
        assert_eq!(
            counts,
            Counts {
                passed: 5,
                failed: 1,
                ignored: 1
            }
        );
        assert_eq!(parse_results("running 0 tests\n".lines()).1, 0);
    }

    #[test]
    fn lists_tests_and_tells_live_ones() {
        let out = "doctor::live_doctor_passes: test\ndoctor::json_parses: test\n\
                   x::live_bench: benchmark\n\n2 tests, 1 benchmark\n";
        assert_eq!(
            parse_list(out),
            ["doctor::live_doctor_passes", "doctor::json_parses"]
        );
        assert!(is_live("doctor::live_doctor_passes"));
        assert!(is_live("live_top_level"));
        assert!(is_live("live::live_capture"));
        assert!(!is_live("live::capture_is_honest"));
        assert!(!is_live("proc::tests::own_process_is_alive_with_stdio"));
        assert!(!is_live("fs::tests::dead_writers_swept_and_live_ones_kept"));
    }

    #[test]
    fn reads_cargo_test_artifacts() {
        let unit = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/core#pf-core@0.1.0","manifest_path":"/w/crates/core/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"pf_core","src_path":"/w/crates/core/src/lib.rs","edition":"2024","doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/w/target/debug/deps/pf_core-1"],"executable":"/w/target/debug/deps/pf_core-1","fresh":true}"#;
        let bin = parse_artifact(unit).unwrap();
        assert_eq!(bin.kind, Kind::Unit);
        assert_eq!(bin.path, Path::new("/w/target/debug/deps/pf_core-1"));
        assert_eq!(bin.manifest_dir, Path::new("/w/crates/core"));
        assert_eq!(bin.label, "pf_core (lib)");

        let it = unit
            .replace(r#""kind":["lib"]"#, r#""kind":["test"]"#)
            .replace(r#""name":"pf_core""#, r#""name":"it""#);
        assert_eq!(parse_artifact(&it).unwrap().kind, Kind::Integration);

        let not_test = unit.replace(r#""test":true}"#, r#""test":false}"#);
        assert!(parse_artifact(&not_test).is_none());
        let no_exe = unit.replace(
            r#""executable":"/w/target/debug/deps/pf_core-1""#,
            r#""executable":null"#,
        );
        assert!(parse_artifact(&no_exe).is_none());
        assert!(parse_artifact(r#"{"reason":"build-finished","success":true}"#).is_none());
        assert!(parse_artifact("not json").is_none());
    }
}
