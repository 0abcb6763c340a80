//! The one way xtask starts a process: stdin closed, stdout and stderr chosen explicitly, a working
//! directory always given, and an optional deadline that kills the child's process group.
//!
//! Pipe hazard: a child whose stdout *and* stderr are both piped can block on a full stderr pipe
//! while we block reading stdout. [`output`] avoids that by reading both at once (std's `output`);
//! [`run_streaming`] pipes stdout only and leaves stderr on ours.

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Where a child's stdout or stderr goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Out {
    /// Our own stdout or stderr (the user sees it).
    Inherit,
    /// A pipe we read.
    Pipe,
    /// Discarded.
    Null,
}

impl Out {
    fn stdio(self) -> Stdio {
        match self {
            Out::Inherit => Stdio::inherit(),
            Out::Pipe => Stdio::piped(),
            Out::Null => Stdio::null(),
        }
    }
}

/// A command with stdin closed (CI has no stdin), `stdout`/`stderr` as chosen, running in `dir`.
pub(crate) fn command(program: impl AsRef<OsStr>, dir: &Path, stdout: Out, stderr: Out) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout.stdio())
        .stderr(stderr.stdio());
    cmd
}

/// How a command line reads in messages: `cargo fmt --all --check`.
/// `$CARGO` is shown as plain `cargo`.
pub(crate) fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut s = if program.file_name().is_some_and(|n| n == "cargo") {
        "cargo".to_owned()
    } else {
        program.to_string_lossy().into_owned()
    };
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Run to completion; fail unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Run to completion and collect stdout and stderr (both read concurrently, so no pipe deadlock).
/// The exit status is the caller's to judge.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))
}

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to `root` when relative), else
/// `root/target`.
pub(crate) fn target_dir(root: &Path) -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// How a deadline-bound run ended.
#[derive(Debug)]
pub(crate) enum Finished {
    Exited(ExitStatus),
    /// The deadline passed; the child's process group was killed.
    TimedOut,
}

/// Run `cmd` in a new process group with stdout piped: each line is echoed to our stdout and
/// collected. At `deadline` the whole group (the child and whatever it started without leaving the
/// group) gets SIGKILL. stderr should be `Out::Inherit` or `Out::Null`, never a pipe.
pub(crate) fn run_streaming(
    cmd: &mut Command,
    deadline: Duration,
) -> anyhow::Result<(Finished, Vec<String>)> {
    cmd.stdout(Stdio::piped()).process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("child stdout was not piped")?;
    let (tx, rx) = mpsc::channel::<String>();
    // The reader may outlive the child when a grandchild keeps the pipe open; it is detached then.
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches('\n')
                        .to_owned();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    let echo = |line: &str| {
        let mut out = std::io::stdout().lock();
        // A closed stdout (say `| head`) must not abort the run.
        let _ = writeln!(out, "{line}");
    };
    let finished = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                echo(&line);
                lines.push(line);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait().context("wait for child")? {
            break Finished::Exited(status);
        }
        if start.elapsed() >= deadline {
            kill_group(pid);
            // SIGKILL cannot be ignored: this wait returns promptly.
            child.wait().context("wait for killed child")?;
            break Finished::TimedOut;
        }
    };
    // Drain what the child wrote before it ended; give up after a grace period if a grandchild
    // still holds the pipe.
    let grace = Instant::now() + Duration::from_secs(2);
    while let Some(left) = grace.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                echo(&line);
                lines.push(line);
            }
            Err(_) => break,
        }
    }
    Ok((finished, lines))
}

/// SIGKILL the process group `pgid` that [`run_streaming`] created (its leader is our child).
fn kill_group(pgid: u32) {
    let mut kill = command("kill", Path::new("/"), Out::Null, Out::Null);
    kill.args(["-KILL", "--", &format!("-{pgid}")]);
    if let Err(err) = run(&mut kill) {
        warn(&format!("could not kill process group {pgid}: {err:#}"));
    }
}

/// xtask has no logger: warnings go straight to stderr.
#[allow(clippy::print_stderr)]
pub(crate) fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_collects_lines_and_status() {
        let mut cmd = command("sh", Path::new("/"), Out::Pipe, Out::Null);
        cmd.args(["-c", "echo one; echo two; exit 3"]);
        let (finished, lines) = run_streaming(&mut cmd, Duration::from_secs(30)).unwrap();
        match finished {
            Finished::Exited(status) => assert_eq!(status.code(), Some(3)),
            Finished::TimedOut => panic!("sh timed out"),
        }
        assert_eq!(lines, ["one", "two"]);
    }

    #[test]
    fn streaming_kills_at_deadline() {
        let mut cmd = command("sh", Path::new("/"), Out::Pipe, Out::Null);
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let start = Instant::now();
        let (finished, lines) = run_streaming(&mut cmd, Duration::from_millis(300)).unwrap();
        assert!(matches!(finished, Finished::TimedOut), "{finished:?}");
        assert_eq!(lines, ["started"]);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn run_reports_the_command_that_failed() {
        let mut cmd = command("false", Path::new("/"), Out::Null, Out::Null);
        let err = run(&mut cmd).unwrap_err();
        assert!(format!("{err:#}").starts_with("`false` failed"), "{err:#}");
    }
}
