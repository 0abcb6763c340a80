//! The bench's baseline: raw `criu dump` into a tmpfs directory and raw `criu restore` from it,
//! run by hand the way a person would, and the frozen time CRIU records in its `stats-dump`.
//!
//! `stats-dump` is read by pf-world-procs' one CRIU image reader (`images::dump_stats`), the same
//! that reads it after pf's own dumps, so the baseline and pf are measured alike.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::bench_proc::{Collected, Guard, Lines};
use crate::process::{self, Out};

/// One raw dump: wall seconds and CRIU's frozen time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawDump {
    pub(crate) secs: f64,
    pub(crate) frozen_us: u64,
}

/// `criu dump -t PID -D DIR --leave-running` (DIR on tmpfs, empty), timed; the log and
/// `stats-dump` land in DIR, as they do for anyone who runs criu by hand.
pub(crate) fn dump(criu: &Path, pid: u32, dir: &Path) -> anyhow::Result<RawDump> {
    crate::bench_store::sync(dir)?;
    let mut cmd = process::command(criu, dir, Out::Null, Out::Pipe);
    cmd.args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(dir)
        .args(["--leave-running", "-o", "dump.log"]);
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}); see {}",
            process::display(&cmd),
            out.status,
            dir.join("dump.log").display()
        );
    }
    let frozen_us = pf_world_procs::images::dump_stats(dir)
        .context("raw criu's dump statistics")?
        .frozen_time_us;
    Ok(RawDump { secs, frozen_us })
}

/// Raw `criu restore` from `dir`, inside fresh pid and mount namespaces as pf's thaw does
/// (`unshare --pid --fork --mount-proc criu restore …`: the original still runs and holds the
/// pid), on fresh pipes passed with `--inherit-fd` for the goblin's pipe inodes `pipes`. Returns
/// the seconds from starting `unshare` to the goblin's answer to `question`, and the answer.
/// Closing its stdin then ends the goblin, criu and unshare; the guard kills them otherwise.
pub(crate) fn restore(
    criu: &Path,
    dir: &Path,
    pipes: [u64; 3],
    question: &str,
) -> anyhow::Result<(f64, String)> {
    crate::bench_store::sync(dir)?;
    let (stdin_r, mut stdin_w) = std::io::pipe().context("pipe")?;
    let (stdout_r, stdout_w) = std::io::pipe().context("pipe")?;
    let (stderr_r, stderr_w) = std::io::pipe().context("pipe")?;
    let mut cmd = process::command("unshare", dir, Out::Null, Out::Null);
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(criu)
        .args(["restore", "-D"])
        .arg(dir)
        .args(["-o", "restore.log"]);
    for (fd, ino) in pipes.iter().enumerate() {
        cmd.arg("--inherit-fd")
            .arg(format!("fd[{fd}]:pipe:[{ino}]"));
    }
    // criu logs to its file: the goblin's pipes are the only stdio it is given.
    cmd.stdin(Stdio::from(stdin_r))
        .stdout(Stdio::from(stdout_w))
        .stderr(Stdio::from(stderr_w));
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    // Our copies of the child's ends are closed now (moved into `cmd`, dropped with it).
    drop(cmd);
    let mut guard = Guard::new(child, "raw criu restore");
    let out = Lines::new(stdout_r);
    let err = Collected::from(stderr_r);
    use std::io::Write as _;
    writeln!(stdin_w, "{question}").context("write to the restored goblin")?;
    let answer = out.next(Duration::from_secs(120)).with_context(|| {
        format!(
            "the raw restore did not answer (see {}): {}",
            dir.join("restore.log").display(),
            err.tail()
        )
    })?;
    let secs = start.elapsed().as_secs_f64();
    drop(stdin_w);
    let status = guard.wait(Duration::from_secs(60))?;
    if !status.success() {
        bail!(
            "raw criu restore ended with {status} (see {})",
            dir.join("restore.log").display()
        );
    }
    Ok((secs, answer))
}
