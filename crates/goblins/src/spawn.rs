//! [`spawn`]: start a program as a goblin that CRIU can freeze later.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use crate::error::{Error, Result};
use crate::goblin::{Goblin, Process};

/// How to start a goblin.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The working directory (explicit: a goblin thawed later finds itself in the same one, so it
    /// must exist wherever the snapshot is thawed).
    pub cwd: PathBuf,
    /// Variables added to (or replacing in) the inherited environment.
    pub env: Vec<(OsString, OsString)>,
}

impl SpawnOptions {
    /// Run in `cwd` with the inherited environment.
    pub fn in_dir(cwd: PathBuf) -> SpawnOptions {
        SpawnOptions {
            cwd,
            env: Vec::new(),
        }
    }
}

/// Start `command` (program, then arguments) as a goblin: the leader of its own session, with
/// stdin, stdout and stderr on three fresh pipes, no other descriptor open, and no parent-death
/// signal. Everything a later [`crate::freeze`] needs.
///
/// Goblins that talk line by line must not block-buffer their output when it is a pipe: run
/// Python with `-u`, C programs with `stdbuf -oL`, and so on.
pub fn spawn(command: &[OsString], options: &SpawnOptions) -> Result<Goblin> {
    let (program, args) = command.split_first().ok_or(Error::EmptyCommand)?;
    // Checked first: a start that fails in a missing directory says only "No such file or
    // directory", as if the program were missing.
    let cwd_error = |source| Error::Cwd {
        program: program.to_string_lossy().into_owned(),
        dir: options.cwd.clone(),
        source,
    };
    match std::fs::metadata(&options.cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(cwd_error(std::io::ErrorKind::NotADirectory.into())),
        Err(e) => return Err(cwd_error(e)),
    }
    let pipe = |which: &str| {
        std::io::pipe().map_err(|e| Error::sys(format!("create the {which} pipe"), e))
    };
    let (stdin_r, stdin_w) = pipe("stdin")?;
    let (stdout_r, stdout_w) = pipe("stdout")?;
    let (stderr_r, stderr_w) = pipe("stderr")?;
    let child = {
        // Scoped so the goblin's ends of the pipes, held by `cmd`, close as soon as it runs:
        // otherwise we would never see EOF on its stdout.
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&options.cwd)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin_r)
            .stdout(stdout_w)
            .stderr(stderr_w);
        pf_os::fd::new_session_only_stdio(&mut cmd);
        cmd.spawn().map_err(|source| Error::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })?
    };
    let pid = i32::try_from(child.id()).map_err(|_| {
        Error::sys(
            "use the goblin's pid",
            std::io::Error::other("pid out of range"),
        )
    })?;
    let pidfd = match pf_os::fd::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::sys(format!("open a pidfd for goblin {pid}"), e));
        }
    };
    tracing::debug!(pid, program = %program.to_string_lossy(), "spawned goblin");
    Ok(Goblin::new(
        pid,
        pidfd,
        Process::Spawned {
            child,
            status: None,
        },
        Some(stdin_w),
        Some(stdout_r),
        Some(stderr_r),
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;
    use crate::stdio::{StdioKind, Streams};

    fn cmd(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn root() -> SpawnOptions {
        SpawnOptions::in_dir(PathBuf::from("/"))
    }

    #[test]
    fn talks_on_pipes_and_reports_the_real_exit_code() {
        let mut g = spawn(
            &cmd(&[
                "sh",
                "-c",
                "read x; echo got $x; echo oops >&2; pwd; exit 7",
            ]),
            &root(),
        )
        .expect("spawn");
        let streams = Streams::of_pid(g.pid()).expect("stdio");
        assert!(streams.pipes().is_some(), "{streams}");
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(g.pid()))).expect("sid");
        assert_eq!(sid.as_raw(), g.pid());
        g.stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"hi\n")
            .expect("write");
        let mut out = String::new();
        g.stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        assert_eq!(out, "got hi\n/\n");
        let mut err = String::new();
        g.stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read");
        assert_eq!(err, "oops\n");
        assert_eq!(g.wait().expect("wait").code(), Some(7));
        assert_eq!(
            g.try_wait().expect("again").map(|s| s.code()),
            Some(Some(7))
        );
    }

    #[test]
    fn wait_closes_stdin_so_eof_arrives() {
        let mut g = spawn(&cmd(&["sh", "-c", "cat >/dev/null; exit 3"]), &root()).expect("spawn");
        assert_eq!(g.try_wait().expect("try_wait"), None);
        assert_eq!(g.wait().expect("wait").code(), Some(3));
    }

    #[test]
    fn kill_and_drop_leave_no_zombie() {
        let mut g = spawn(&cmd(&["sleep", "30"]), &root()).expect("spawn");
        let pid = g.pid();
        let status = g.kill().expect("kill");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

        let g = spawn(&cmd(&["sh", "-c", "sleep 30 & wait"]), &root()).expect("spawn");
        let pid = g.pid();
        let mut out = BufReader::new(g.stdout.as_ref().expect("stdout").try_clone().expect("dup"));
        drop(g);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // The background sleep, killed with its group, no longer holds stdout open.
        let mut line = String::new();
        assert_eq!(out.read_line(&mut line).expect("read"), 0);
    }

    #[test]
    fn killer_works_from_another_thread() {
        let mut g = spawn(&cmd(&["sleep", "30"]), &root()).expect("spawn");
        let killer = g.killer();
        let t = std::thread::spawn(move || killer.kill());
        assert_eq!(g.wait().expect("wait").signal(), Some(libc::SIGKILL));
        t.join().expect("join").expect("kill");
        g.killer().kill().expect("killing an exited goblin is fine");
    }

    #[test]
    fn explains_what_cannot_start() {
        assert!(matches!(spawn(&[], &root()), Err(Error::EmptyCommand)));
        let err = spawn(&cmd(&["/nonexistent/prog"]), &root()).expect_err("no such program");
        assert!(
            matches!(&err, Error::Spawn { program, source } if program == "/nonexistent/prog"
                && source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
        let mut opts = root();
        opts.cwd = PathBuf::from("/nonexistent/dir");
        let err = spawn(&cmd(&["true"]), &opts).expect_err("no such directory");
        assert!(matches!(&err, Error::Cwd { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "cannot start true in /nonexistent/dir: that working directory does not exist"
        );
        opts.cwd = PathBuf::from("/etc/passwd");
        let err = spawn(&cmd(&["true"]), &opts).expect_err("not a directory");
        assert!(err.to_string().ends_with("is not a directory"), "{err}");
    }

    #[test]
    fn stdio_kinds_of_a_spawned_goblin_are_pipes() {
        let g = spawn(&cmd(&["sleep", "30"]), &root()).expect("spawn");
        let streams = Streams::of_pid(g.pid()).expect("stdio");
        assert!(streams.0.iter().all(|k| matches!(k, StdioKind::Pipe(_))));
    }
}
