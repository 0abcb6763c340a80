//! The one way this workspace runs `criu`.
//!
//! Every call gets `--no-default-config` (no `/etc/criu/default.conf` surprises), CRIU's default
//! log level `-v2` (errors and warnings: what pf reads of a failed run; `PF_CRIU_LOG_LEVEL=4`
//! logs every step, which cost a 64 MiB goblin's dump 6 ms of its 88 and 4 ms of its 66 ms
//! pause, 12 pairs by hand, and a failed run's error says so), a
//! private work directory (`--work-dir`, 0700, outside any images directory: criu writes its
//! stats files there) holding `criu.log`, `criu.stdout` and `criu.stderr`; stdin is `/dev/null`
//! and the child starts with only fds 0–2 and the descriptors the caller passes on purpose.
//! Each call has a deadline after which criu is SIGKILLed by its pid. A dump also watches its
//! target: criu 4.1.1 can hang for good (a futex wait in its SIGCHLD handler) when the target is
//! killed mid-dump, so once the target is gone criu gets [`TARGET_GONE_GRACE`] to exit by itself
//! and is then SIGKILLed, and the failure carries the errors it logged.
//!
//! The work directory is `$TMPDIR/pf-criu-<action>-<our pid>-…`, `flock`ed while criu runs, so
//! the one a pf killed mid-restore leaves is swept by the next run (`pf_os::scratch`). On success
//! it is removed. On failure it is renamed `pf-criu-failed-<action>-…` and kept (only the
//! [`FAILED_LOGS_KEPT`] newest stay), and the error carries its log path and criu's `Error (…)`
//! lines, minus the harmless `rlimit: Can't setup RLIMIT_NOFILE` that appears in every log on
//! machines without CAP_SYS_RESOURCE.
//!
//! A restore into a new PID namespace runs criu the same way, as the child of a small init of
//! ours ([`Invocation::run_in_new_pidns`], `nsinit.rs`): same command line, work directory,
//! deadline and errors.
//!
//! stdout and stderr go to files, not pipes, so there is no pipe to fill up and deadlock on.

use std::ffi::{OsStr, OsString};
use std::io::Read as _;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pf_os::Exit;
use pf_os::scratch::Scratch;

use crate::criu::{Criu, Privilege};
use crate::criu_log;
use crate::error::{Error, Result};
use crate::nsinit;

/// How many work directories of failed criu runs are kept (the newest).
pub(crate) const FAILED_LOGS_KEPT: usize = 16;

/// CRIU's default log level: errors and warnings.
const LOG_LEVEL: u8 = 2;

/// The log level criu runs with: `PF_CRIU_LOG_LEVEL` (0–4) if set to one, else [`LOG_LEVEL`].
pub(crate) fn log_level() -> u8 {
    parse_log_level(std::env::var("PF_CRIU_LOG_LEVEL").ok().as_deref())
}

fn parse_log_level(value: Option<&str>) -> u8 {
    value
        .and_then(|v| v.trim().parse::<u8>().ok())
        .filter(|l| *l <= 4)
        .unwrap_or(LOG_LEVEL)
}
/// The name prefix of a kept work directory of a failed criu run.
const FAILED_PREFIX: &str = "pf-criu-failed-";

/// A prepared criu call: the full command line and its work directory.
#[derive(Debug)]
pub(crate) struct Invocation {
    action: &'static str,
    /// The program to exec (criu, or sudo).
    pub(crate) program: PathBuf,
    /// Arguments after the program.
    pub(crate) args: Vec<OsString>,
    work: Scratch,
    log: PathBuf,
    deadline: Duration,
    keep_fds: Vec<RawFd>,
    /// The dump's target: when it is gone, criu has [`TARGET_GONE_GRACE`] left.
    target: Option<i32>,
    /// criu runs under `sudo`, which we may not SIGKILL through: stop it with SIGTERM (which
    /// sudo relays to criu) before SIGKILL.
    through_sudo: bool,
    /// criu's stdin is ours (a shell job's terminal, whose session criu hands to the restored
    /// tree) rather than `/dev/null`.
    pub(crate) stdin_is_ours: bool,
    /// For a restore in a new pid namespace: a descriptor its init holds (`InitPlan::hold`).
    pub(crate) hold: Option<RawFd>,
    /// For a dump of a process in a pid namespace below ours: criu runs in its namespaces.
    pub(crate) enter: Option<crate::nsenter::Enter>,
}

impl Invocation {
    /// Prepare `criu <action> <common options> <args>`; `keep_fds` are descriptors the child
    /// must inherit (for `--inherit-fd`).
    pub(crate) fn new(
        criu: &Criu,
        action: &'static str,
        args: Vec<OsString>,
        keep_fds: &[RawFd],
        deadline: Duration,
    ) -> Result<Self> {
        Self::new_in(
            &std::env::temp_dir(),
            criu,
            action,
            args,
            keep_fds,
            deadline,
        )
    }

    /// [`Invocation::new`] with its work directory in `base`.
    fn new_in(
        base: &Path,
        criu: &Criu,
        action: &'static str,
        args: Vec<OsString>,
        keep_fds: &[RawFd],
        deadline: Duration,
    ) -> Result<Self> {
        let work = pf_os::scratch::scratch_in(base, &format!("pf-criu-{action}-"))
            .map_err(crate::capture::os_error)?;
        let log = work.path().join("criu.log");
        let mut argv: Vec<OsString> = Vec::new();
        let program = match criu.privilege {
            Privilege::Root | Privilege::Unprivileged => criu.path.clone(),
            Privilege::Sudo => {
                argv.push("-n".into());
                if let Some(max) = keep_fds.iter().max() {
                    argv.push(format!("-C{}", max + 1).into());
                }
                argv.push(criu.path.clone().into());
                PathBuf::from("sudo")
            }
        };
        argv.push(action.into());
        argv.push("--no-default-config".into());
        argv.push(format!("-v{}", log_level()).into());
        argv.push("--work-dir".into());
        argv.push(work.path().into());
        argv.push("--log-file".into());
        argv.push(log.clone().into());
        if criu.privilege == Privilege::Unprivileged {
            argv.push("--unprivileged".into());
        }
        argv.extend(args);
        Ok(Self {
            action,
            program,
            args: argv,
            work,
            log,
            deadline,
            keep_fds: keep_fds.to_vec(),
            target: None,
            through_sudo: criu.privilege == Privilege::Sudo,
            stdin_is_ours: false,
            hold: None,
            enter: None,
        })
    }

    /// Watch `pid` while criu runs: once it is gone, criu gets [`TARGET_GONE_GRACE`] to exit.
    pub(crate) fn watching(mut self, pid: i32) -> Self {
        self.target = Some(pid);
        self
    }

    /// The work directory (for pidfiles and the like; removed on success).
    pub(crate) fn work_dir(&self) -> &Path {
        self.work.path()
    }

    pub(crate) fn stdout_path(&self) -> PathBuf {
        self.work.path().join("criu.stdout")
    }

    pub(crate) fn stderr_path(&self) -> PathBuf {
        self.work.path().join("criu.stderr")
    }

    /// Run criu as our child and wait for it (within the deadline). On success, returns the
    /// work directory (removed when dropped) for files such as a pidfile.
    pub(crate) fn run(self) -> Result<Scratch> {
        let _span = tracing::debug_span!("criu", action = self.action).entered();
        let child = self.spawn()?;
        let stop = if self.through_sudo {
            Stop::TermThenKill
        } else {
            Stop::Kill
        };
        match wait_watching(child, self.deadline, self.target, TARGET_GONE_GRACE, stop) {
            Ok(Waited::Exited(status)) => self.conclude(Exit::from(status)),
            Ok(Waited::TargetGone) => {
                // Its log says what it saw (`… was killed by 9 unexpectedly`).
                self.conclude(Exit::Signal(nix::sys::signal::Signal::SIGKILL as i32))
            }
            Ok(Waited::Deadline) => Err(Error::Timeout {
                action: self.action,
                after: self.deadline,
                log: self.keep(),
            }),
            Err(source) => Err(Error::Sys {
                op: "waiting for criu",
                source,
            }),
        }
    }

    /// Start criu as our child: stdout and stderr to files in the work dir, stdin `/dev/null`
    /// (or ours for a shell job), only the descriptors asked for.
    fn spawn(&self) -> Result<Child> {
        let out = self.stdio_file(self.stdout_path())?;
        let err = self.stdio_file(self.stderr_path())?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .current_dir(self.work.path())
            .stdin(if self.stdin_is_ours {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stdout(out)
            .stderr(err);
        if !self.stdin_is_ours {
            // A process group of its own: a Ctrl-C typed at pf's terminal goes to pf's group, and
            // pf decides what it means (a warm-up obeys it once criu returns); killed half-way
            // through a dump, criu could leave its target with parasite code in it. A shell
            // job's restore keeps pf's group: it takes over the terminal criu has on stdin.
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        pf_os::fd::only_these_fds(&mut cmd, self.keep_fds.clone());
        if let Some(enter) = &self.enter {
            enter.hook(&mut cmd, self.work.path())?;
        }
        tracing::debug!(program = %self.program.display(), args = ?self.args, entered = self.enter.is_some(), "running criu");
        cmd.spawn().map_err(|source| Error::Spawn {
            program: self.program.clone(),
            source,
        })
    }

    pub(crate) fn stdio_file(&self, path: PathBuf) -> Result<std::fs::File> {
        std::fs::File::create(&path).map_err(|e| Error::io("create", path, e))
    }

    /// Run criu as the child of a fresh init of ours, PID 1 of new PID + mount namespaces
    /// (`nsinit.rs`; needs root), and wait for criu within the deadline. On success, returns the
    /// work directory and the running init, which now waits for the restored root.
    pub(crate) fn run_in_new_pidns(self, pidfile: &Path) -> Result<(Scratch, nsinit::Init)> {
        let _span = tracing::debug_span!("criu", action = self.action, new_pidns = true).entered();
        let stdout = self.stdio_file(self.stdout_path())?;
        let stderr = self.stdio_file(self.stderr_path())?;
        let plan = nsinit::InitPlan {
            program: &self.program,
            args: &self.args,
            stdout: &stdout,
            stderr: &stderr,
            keep: &self.keep_fds,
            hold: self.hold,
            pidfile,
            stdin_is_ours: self.stdin_is_ours,
        };
        tracing::debug!(program = %self.program.display(), args = ?self.args, "running criu in a new pid namespace");
        let mut init = nsinit::spawn(&plan).map_err(|source| Error::Sys {
            op: "starting an init in a new pid and mount namespace (needs root)",
            source,
        })?;
        drop((stdout, stderr));
        let kill_init = |init: &mut nsinit::Init| init.kill_and_reap();
        let mut record = match read_record(&mut init.report, self.deadline) {
            Ok(r) => r,
            Err(timed_out) => {
                kill_init(&mut init);
                if timed_out {
                    return Err(Error::Timeout {
                        action: self.action,
                        after: self.deadline,
                        log: self.keep(),
                    });
                }
                // The init died before criu was done, taking criu with it: nothing was restored.
                return Err(self.failure(Exit::Signal(libc::SIGKILL)));
            }
        };
        let mut setup_failure = None;
        while record.tag == nsinit::TAG_FAILED {
            setup_failure = Some(record);
            match read_record(&mut init.report, Duration::from_secs(10)) {
                Ok(r) => record = r,
                Err(_) => break,
            }
        }
        if record.tag != nsinit::TAG_CRIU_DONE || setup_failure.is_some() {
            kill_init(&mut init);
            let failed = setup_failure.unwrap_or(record);
            let _ = self.keep();
            return Err(Error::Namespace {
                step: nsinit::STEPS
                    .get(failed.a as usize)
                    .copied()
                    .unwrap_or("unknown step"),
                errno: failed.b,
            });
        }
        match self.conclude(Exit::from_wait_status(record.a)) {
            Ok(work) => Ok((work, init)),
            Err(e) => {
                kill_init(&mut init);
                Err(e)
            }
        }
    }

    /// Turn criu's exit into a result: success hands back the work dir (removed on drop);
    /// failure keeps it and collects criu's error lines.
    pub(crate) fn conclude(self, exit: Exit) -> Result<Scratch> {
        if exit == Exit::Code(0) {
            return Ok(self.work);
        }
        Err(self.failure(exit))
    }

    /// The error for criu's failed `exit`, with the `Error (…)` lines of its log and the failure
    /// they name ([`criu_log::classify`]); the work directory is kept.
    fn failure(self, exit: Exit) -> Error {
        let log_text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut errors = error_lines(&log_text);
        // What it printed: criu prints some refusals on stdout, sudo on stderr.
        let mut said = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        said.push('\n');
        said.push_str(&std::fs::read_to_string(self.stdout_path()).unwrap_or_default());
        if errors.is_empty() {
            // No log lines (criu never started, sudo refused, bad option, missing capability).
            errors = stderr_reasons(&said);
        }
        let failure = criu_log::classify(log_text.lines().chain(said.lines()));
        let action = self.action;
        let log = self.keep();
        tracing::debug!(action, %exit, ?failure, ?errors, log = %log.display(), "criu failed");
        Error::Criu {
            action,
            exit,
            failure,
            errors,
            log,
        }
    }

    /// Keep the work directory (renamed `pf-criu-failed-<action>-…`, only the
    /// [`FAILED_LOGS_KEPT`] newest stay); return the log's path.
    pub(crate) fn keep(self) -> PathBuf {
        let base = self.work.path().parent().map(Path::to_owned);
        let name = self
            .log
            .file_name()
            .map(|n| n.to_owned())
            .unwrap_or_default();
        let dir = self.work.keep_as(
            &format!("{FAILED_PREFIX}{}-", self.action),
            &format!("pf-criu-{}-", self.action),
        );
        if let Some(base) = base {
            pf_os::scratch::keep_newest(&base, FAILED_PREFIX, FAILED_LOGS_KEPT);
        }
        dir.join(name)
    }
}

/// Remove the kept work directory of the failed criu run `err` reports, when another error is
/// shown instead and explains the failure (a page that failed its check, which criu only saw
/// as a short read): a log nobody is told about must not pile up in `$TMPDIR`.
pub(crate) fn discard_kept_log(err: &Error) {
    let Error::Criu { log, .. } = err else {
        return;
    };
    let Some(dir) = log.parent() else {
        return;
    };
    let ours = dir
        .file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(FAILED_PREFIX.as_bytes()));
    if ours && let Err(err) = std::fs::remove_dir_all(dir) {
        tracing::debug!(dir = %dir.display(), %err, "cannot remove a failed criu run's log");
    }
}

/// Read one 12-byte record from the init's report pipe within `deadline`; `Err(true)` on
/// timeout, `Err(false)` on end of file or a read error.
pub(crate) fn read_record(
    report: &mut std::fs::File,
    deadline: Duration,
) -> std::result::Result<nsinit::Record, bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(true);
        }
        let timeout =
            PollTimeout::try_from(left.min(Duration::from_secs(60))).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(report.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Err(false),
        }
    }
    let mut buf = [0u8; 12];
    match report.read_exact(&mut buf) {
        Ok(()) => Ok(nsinit::Record::decode(&buf)),
        Err(_) => Err(false),
    }
}

/// criu's `Error (…)` lines from a log, without the timestamp prefix and without the harmless
/// RLIMIT_NOFILE complaint; at most 8.
pub(crate) fn error_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.find("Error (").map(|i| l[i..].trim_end()))
        .filter(|l| !l.contains("Can't setup RLIMIT_NOFILE"))
        .take(8)
        .map(str::to_owned)
        .collect()
}

/// What criu printed (stderr, then stdout) when its log has no `Error (…)` line: its plain lines (a refusal
/// such as `CRIU needs to have the CAP_SYS_ADMIN …`), without the timestamped chatter
/// (`(00.000000) CRIU run id = …`) unless that is all there is; at most 8.
pub(crate) fn stderr_reasons(stderr: &str) -> Vec<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let timestamped = |l: &&str| {
        l.strip_prefix('(')
            .and_then(|rest| rest.split_once(") "))
            .is_some_and(|(t, _)| {
                !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.')
            })
    };
    let plain: Vec<&str> = lines.iter().copied().filter(|l| !timestamped(l)).collect();
    let chosen = if plain.is_empty() { lines } else { plain };
    chosen.into_iter().take(8).map(str::to_owned).collect()
}

/// How long criu may go on after the process it dumps is gone. A dump without
/// `--leave-running` kills its target itself and exits within milliseconds; a criu still running
/// seconds later is stuck.
pub(crate) const TARGET_GONE_GRACE: Duration = Duration::from_secs(5);

/// How often a watched target is looked at.
const TARGET_POLL: Duration = Duration::from_millis(50);

/// How a child that has to go is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGKILL by its pid.
    Kill,
    /// SIGTERM, then SIGKILL after [`TERM_GRACE`]: for `sudo criu`, where our SIGKILL ends sudo
    /// but not the root criu below it, and sudo relays SIGTERM.
    TermThenKill,
}

/// How long a child stopped with SIGTERM has before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// How a wait for a child ended.
#[derive(Debug)]
pub(crate) enum Waited {
    /// It exited by itself.
    Exited(ExitStatus),
    /// It outlived its deadline and was killed.
    Deadline,
    /// Its target was gone for [`TARGET_GONE_GRACE`] and it was still running: it was killed.
    TargetGone,
}

/// Wait for `child`; after `deadline`, SIGKILL it by pid and return `None`.
pub(crate) fn wait_with_deadline(
    child: Child,
    deadline: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    Ok(
        match wait_watching(child, deadline, None, TARGET_GONE_GRACE, Stop::Kill)? {
            Waited::Exited(status) => Some(status),
            Waited::Deadline | Waited::TargetGone => None,
        },
    )
}

/// Wait for `child`, SIGKILLing it by pid after `deadline`, or `grace` after `target` (when
/// given) stopped being a live process.
///
/// The wait runs on a helper thread so that the common case returns the moment the child
/// exits; without a target nothing polls.
fn wait_watching(
    mut child: Child,
    deadline: Duration,
    target: Option<i32>,
    grace: Duration,
    stop: Stop,
) -> std::io::Result<Waited> {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let start = std::time::Instant::now();
    let mut gone_since: Option<std::time::Instant> = None;
    let ended = loop {
        let left = deadline.saturating_sub(start.elapsed());
        let slice = if target.is_some() {
            left.min(TARGET_POLL)
        } else {
            left
        };
        match rx.recv_timeout(slice) {
            Ok(status) => {
                let _ = waiter.join();
                return status.map(Waited::Exited);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = waiter.join();
                return Err(std::io::Error::other("the criu waiter thread stopped"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() >= deadline {
            tracing::warn!(pid, ?deadline, "child exceeded its deadline, killing it");
            break Waited::Deadline;
        }
        if let Some(target) = target
            && pf_os::proc::has_ended(target)
        {
            let since = *gone_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= grace {
                tracing::warn!(
                    pid,
                    target,
                    "the dumped process is gone and criu hangs, killing it"
                );
                break Waited::TargetGone;
            }
        }
    };
    // It may have exited since the last look: then its status wins, nothing is signalled.
    if let Ok(status) = rx.try_recv() {
        let _ = waiter.join();
        return status.map(Waited::Exited);
    }
    // A small window remains in which the waiter reaps it just before the signal below; the
    // pid is then free but not reused within that window in practice.
    let signal = |sig| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    };
    if stop == Stop::TermThenKill {
        signal(nix::sys::signal::Signal::SIGTERM);
        if rx.recv_timeout(TERM_GRACE).is_ok() {
            let _ = waiter.join();
            return Ok(ended);
        }
    }
    signal(nix::sys::signal::Signal::SIGKILL);
    let _ = rx.recv();
    let _ = waiter.join();
    Ok(ended)
}

/// Run `program args` (no criu conventions), capture its stdout, within `deadline`. For
/// `criu --version`.
pub(crate) fn output(program: &Path, args: &[&str], deadline: Duration) -> std::io::Result<String> {
    let out = tempfile::tempfile()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(Stdio::null());
    pf_os::fd::only_these_fds(&mut cmd, Vec::new());
    let child = cmd.spawn()?;
    match wait_with_deadline(child, deadline)? {
        Some(_) => {
            use std::io::{Read as _, Seek as _};
            let mut out = out;
            out.rewind()?;
            let mut text = String::new();
            out.take(1 << 16).read_to_string(&mut text)?;
            Ok(text)
        }
        None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {deadline:?}"),
        )),
    }
}

/// Add `--flag value`.
pub(crate) fn push_opt(args: &mut Vec<OsString>, flag: &str, value: impl AsRef<OsStr>) {
    args.push(flag.into());
    args.push(value.as_ref().to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_logs_errors_and_warnings_unless_asked_for_more() {
        assert_eq!(parse_log_level(None), 2);
        assert_eq!(parse_log_level(Some("4")), 4);
        assert_eq!(parse_log_level(Some(" 0 ")), 0);
        assert_eq!(parse_log_level(Some("5")), 2, "out of range");
        assert_eq!(parse_log_level(Some("debug")), 2);
    }

    #[test]
    fn error_lines_skip_rlimit_and_timestamps() {
        let log = "(00.000010) Version: 4.1.1\n\
(00.000100) Error (criu/util.c:633): rlimit: Can't setup RLIMIT_NOFILE for self\n\
(00.010000) Error (criu/cr-restore.c:1480): Can't fork for 1234: File exists\n\
(00.010100) Error (criu/cr-restore.c:2610): Restoring FAILED.\n";
        assert_eq!(
            error_lines(log),
            vec![
                "Error (criu/cr-restore.c:1480): Can't fork for 1234: File exists",
                "Error (criu/cr-restore.c:2610): Restoring FAILED.",
            ]
        );
        assert!(error_lines("").is_empty());
    }

    #[test]
    fn stderr_reasons_skip_timestamped_chatter() {
        let stderr = "(00.000000) CRIU run id = c9d3\n\
CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: \n\
setcap cap_checkpoint_restore+eip /usr/local/sbin/criu\n";
        assert_eq!(
            stderr_reasons(stderr),
            vec![
                "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability:",
                "setcap cap_checkpoint_restore+eip /usr/local/sbin/criu",
            ]
        );
        assert_eq!(
            stderr_reasons("(00.1) only chatter\n"),
            vec!["(00.1) only chatter"]
        );
        assert!(stderr_reasons("").is_empty());
    }

    #[test]
    fn deadline_kills_a_hung_child() {
        let child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let start = std::time::Instant::now();
        let got = wait_with_deadline(child, Duration::from_millis(100)).expect("wait");
        assert_eq!(got, None);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_child_outliving_its_target_is_killed_after_the_grace() {
        let gone_pid = crate::test_support::dead_pid();
        let child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let start = std::time::Instant::now();
        let got = wait_watching(
            child,
            Duration::from_secs(60),
            Some(gone_pid),
            Duration::from_millis(200),
            Stop::Kill,
        )
        .expect("wait");
        assert!(matches!(got, Waited::TargetGone), "{got:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_live_target_does_not_hurry_the_child() {
        let child = Command::new("sleep")
            .arg("0.3")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        let got = wait_watching(
            child,
            Duration::from_secs(60),
            Some(me),
            Duration::from_millis(50),
            Stop::Kill,
        )
        .expect("wait");
        assert!(matches!(got, Waited::Exited(s) if s.success()), "{got:?}");
    }

    #[test]
    fn a_child_under_sudo_gets_sigterm_first() {
        // A shell that leaves a mark when SIGTERM comes: it came before any SIGKILL.
        let dir = tempfile::tempdir().expect("tempdir");
        let mark = dir.path().join("termed");
        let child = Command::new("sh")
            .args([
                "-c",
                "trap 'touch \"$0\"; exit 3' TERM; while :; do sleep 0.05; done",
            ])
            .arg(&mark)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let got = wait_watching(
            child,
            Duration::from_millis(300),
            None,
            TARGET_GONE_GRACE,
            Stop::TermThenKill,
        )
        .expect("wait");
        assert!(matches!(got, Waited::Deadline), "{got:?}");
        assert!(mark.exists(), "SIGTERM first");
    }

    fn fake_criu(dir: &Path, script: &str) -> Criu {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("criu");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write fake criu");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Criu {
            path,
            version: crate::criu::CriuVersion {
                major: 4,
                minor: 2,
                sublevel: 1,
            },
            privilege: Privilege::Root,
        }
    }

    fn names(base: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(base)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn failed_runs_keep_only_the_newest_logs() {
        // A non-root `criu check` fails on every run: its logs must not pile up.
        let bin = tempfile::tempdir().expect("tempdir");
        let base = tempfile::tempdir().expect("tempdir");
        let criu = fake_criu(bin.path(), "echo 'Error (x): no' >&2; exit 1");
        let mut logs = Vec::new();
        for _ in 0..FAILED_LOGS_KEPT + 4 {
            let inv = Invocation::new_in(
                base.path(),
                &criu,
                "check",
                Vec::new(),
                &[],
                Duration::from_secs(10),
            )
            .expect("invocation");
            match inv.run() {
                Err(Error::Criu { log, .. }) => logs.push(log),
                other => panic!("expected a criu failure: {other:?}"),
            }
        }
        let left = names(base.path());
        assert_eq!(left.len(), FAILED_LOGS_KEPT, "{left:?}");
        assert!(
            left.iter().all(|n| n.starts_with("pf-criu-failed-check-")),
            "{left:?}"
        );
        let newest = logs.last().expect("a log");
        assert!(
            newest.parent().is_some_and(Path::is_dir),
            "the newest log stays: {newest:?}"
        );
        assert!(
            logs[0].parent().is_some_and(|p| !p.exists()),
            "the oldest is gone"
        );
    }

    #[test]
    fn a_log_another_error_explains_is_discarded() {
        let bin = tempfile::tempdir().expect("tempdir");
        let base = tempfile::tempdir().expect("tempdir");
        let criu = fake_criu(bin.path(), "echo 'Error (x): short read' >&2; exit 1");
        let inv = Invocation::new_in(
            base.path(),
            &criu,
            "restore",
            Vec::new(),
            &[],
            Duration::from_secs(10),
        )
        .expect("invocation");
        let err = inv.run().expect_err("a criu failure");
        let Error::Criu { log, .. } = &err else {
            panic!("expected a criu failure: {err:?}");
        };
        assert!(log.parent().is_some_and(Path::is_dir), "kept: {log:?}");
        discard_kept_log(&err);
        assert!(names(base.path()).is_empty(), "{:?}", names(base.path()));
        // Anything else is left alone.
        discard_kept_log(&Error::NoSuchProcess { pid: 1 });
    }

    #[test]
    fn a_killed_runs_work_dir_is_swept_and_a_good_run_leaves_nothing() {
        let bin = tempfile::tempdir().expect("tempdir");
        let base = tempfile::tempdir().expect("tempdir");
        // What a pf SIGKILLed during `criu restore` leaves: its unlocked work dir.
        let dead_pid = crate::test_support::dead_pid();
        let left = base
            .path()
            .join(format!("pf-criu-restore-{dead_pid}-abcdef"));
        std::fs::create_dir(&left).expect("mkdir");
        std::fs::write(left.join("criu.log"), b"x").expect("write");
        let criu = fake_criu(bin.path(), "exit 0");
        let inv = Invocation::new_in(
            base.path(),
            &criu,
            "restore",
            Vec::new(),
            &[],
            Duration::from_secs(10),
        )
        .expect("invocation");
        assert!(!left.exists(), "the killed run's work dir is swept");
        drop(inv.run().expect("fake restore succeeds"));
        assert!(names(base.path()).is_empty(), "{:?}", names(base.path()));
    }

    #[test]
    fn output_captures_stdout() {
        let out = output(
            Path::new("/bin/echo"),
            &["Version: 9.9"],
            Duration::from_secs(10),
        )
        .expect("echo");
        assert_eq!(out, "Version: 9.9\n");
    }
}
