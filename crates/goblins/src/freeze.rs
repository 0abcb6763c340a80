//! [`freeze`]: checkpoint a goblin into the store or into an images directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pf_core::{BlobStore, Digest256};

use crate::GOBLIN_LABEL;
use crate::error::{Error, Result};
use crate::stdio::{StdioKind, Streams};
use crate::wire::GoblinMeta;

/// Where a frozen goblin goes.
#[derive(Debug, Clone, Copy)]
pub enum FreezeTarget<'a> {
    /// Into the store: the images as a deterministic tar, plus a procs blob labelled
    /// `goblin=v1` that records the stdio pipe ids. [`Frozen::snapshot`] is its digest.
    Store(&'a dyn BlobStore),
    /// Into this directory (created if missing, must be empty): plain CRIU images plus
    /// `goblin.json`. Restorable by `pf goblin thaw --images DIR`, or by hand with
    /// `criu restore -D DIR --inherit-fd fd[K]:pipe:[N] …` for each pipe in `goblin.json`.
    Images(&'a Path),
}

/// How to freeze a goblin.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    /// Let the goblin run on after the dump (it then continues from the same state as the
    /// snapshot). When false, it is killed once the snapshot is stored; a freeze that fails
    /// (a full store) lets it run on.
    pub leave_running: bool,
    /// Dump a goblin that does not lead its own session (`criu --shell-job`). Thawing it then
    /// also restores it as a shell job.
    pub shell_job: bool,
}

/// A frozen goblin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    /// The pid that was frozen.
    pub pid: i32,
    /// Its stdin, stdout and stderr as they were at the freeze (`links()` gives them as CRIU
    /// names them).
    pub streams: Streams,
    /// Where the snapshot is.
    pub snapshot: Snapshot,
}

/// Where a snapshot was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    /// The digest of the procs blob in the store.
    Stored(Digest256),
    /// The images directory.
    Images(PathBuf),
}

impl Frozen {
    /// The digest of the procs blob, when frozen into the store.
    pub fn digest(&self) -> Option<&Digest256> {
        match &self.snapshot {
            Snapshot::Stored(d) => Some(d),
            Snapshot::Images(_) => None,
        }
    }
}

/// Checkpoint the goblin `pid` with CRIU.
///
/// Refused before CRIU runs, with an error saying what is wrong: a pid that does not exist
/// ([`Error::NoSuchProcess`]), a process in a pid namespace pf did not make, such as a
/// container's ([`Error::OtherPidNamespace`]; a thawed copy is frozen from inside the pid
/// namespace pf gave it), a kernel thread ([`Error::KernelThread`]), stdio that a thaw
/// could not give back — a terminal, a socket, a stdout that is not a pipe ([`Error::NotPipes`],
/// naming what each one is; stdin and stderr may be files or `/dev/null`) — and a process that
/// does not lead its session unless [`FreezeOptions::shell_job`] ([`Error::NotSessionLeader`]),
/// and a tree in which the goblin or a descendant reads its stdout or stderr
/// ([`Error::OutputReadInTree`]: bash's `> >(cat)`, whose copy would take the thaw's answers).
///
/// There is no default for [`FreezeOptions::leave_running`]: the seed's `freeze(pid, dir,
/// leave_running=True)` left the process running, and so does `pf goblin freeze`; a warm-up
/// ([`crate::warm_up`]) stops it.
///
/// Bytes written to the goblin's stdin but not yet read are kept in the snapshot (CRIU saves
/// pipe contents) and replayed into the stdin of every thawed copy.
pub fn freeze(pid: i32, target: FreezeTarget<'_>, options: &FreezeOptions) -> Result<Frozen> {
    let _span = tracing::info_span!("freeze", pid).entered();
    let streams = check_goblin(pid, options.shell_job)?;
    // Without a usable criu, `capture` would store an honest placeholder; a goblin freeze that
    // cannot dump is an error instead.
    pf_world_procs::criu::for_capture().map_err(|why| Error::Freeze {
        pid,
        source: Box::new(why.into()),
    })?;
    let capture = pf_world_procs::CaptureOptions {
        leave_running: options.leave_running,
        shell_job: options.shell_job,
        tcp_established: false,
        ext_unix_sk: false,
        file_locks: false,
        labels: BTreeMap::from([(GOBLIN_LABEL.0.to_owned(), GOBLIN_LABEL.1.to_owned())]),
        extra_args: Vec::new(),
    };
    let snapshot = match target {
        FreezeTarget::Store(store) => {
            let captured =
                pf_world_procs::capture(store, pid, &capture).map_err(|source| Error::Freeze {
                    pid,
                    source: Box::new(source),
                })?;
            Snapshot::Stored(captured.procs)
        }
        FreezeTarget::Images(dir) => {
            let report = pf_world_procs::dump_to_dir(pid, dir, &capture).map_err(|source| {
                Error::Freeze {
                    pid,
                    source: Box::new(source),
                }
            })?;
            GoblinMeta::V1 {
                pid,
                stdio: report.stdio,
                shell_job: options.shell_job,
                frozen_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            }
            .write(dir)?;
            Snapshot::Images(dir.to_owned())
        }
    };
    tracing::info!(pid, ?snapshot, "froze goblin");
    Ok(Frozen {
        pid,
        streams,
        snapshot,
    })
}

/// The goblin checks that come before CRIU: the pid exists, is not a kernel thread and lives in
/// our pid namespace, its stdio can be reconnected at thaw ([`stdio_problem`]), it leads its
/// session (unless it is to be dumped as a shell job).
fn check_goblin(pid: i32, shell_job: bool) -> Result<Streams> {
    if pid <= 0 || is_gone(pid) {
        return Err(Error::NoSuchProcess { pid });
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    if let (Some(theirs), Some(ours)) = (ns(&pid.to_string()), ns("self"))
        && theirs != ours
        && !pf_world_procs::restored_by_pf(pid)
    {
        return Err(Error::OtherPidNamespace { pid });
    }
    if let Some(name) = kernel_thread(pid) {
        return Err(Error::KernelThread { pid, name });
    }
    let streams = Streams::of_pid(pid)?;
    if stdio_problem(&streams).is_some() {
        return Err(Error::NotPipes { pid, streams });
    }
    if let Some(reader) = output_reader(pid, &streams) {
        return Err(Error::OutputReadInTree { pid, reader });
    }
    if !shell_job {
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid)))
            .map_err(|_| Error::NoSuchProcess { pid })?
            .as_raw();
        if sid != pid {
            return Err(Error::NotSessionLeader { pid, sid });
        }
    }
    Ok(streams)
}

/// A process in the tree a freeze takes (the goblin or a descendant) that holds the reading
/// end of the goblin's stdout or stderr pipe: a child reading it through a process substitution
/// (`python3 > >(cat > log)`), or the goblin itself on another descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputReader {
    /// `"stdout"` or `"stderr"`.
    pub stream: &'static str,
    /// The pipe's inode.
    pub pipe: u64,
    /// The process holding its reading end.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`).
    pub command: String,
    /// The descriptor it holds it on.
    pub fd: i32,
}

/// The first process of `pid`'s tree that reads `pid`'s stdout or stderr pipe, if any. CRIU
/// would restore that reader with the thaw's pipe too (it reopens every end of an inherited
/// pipe from the descriptor it is given), so it would take the answers meant for pf.
fn output_reader(pid: i32, streams: &Streams) -> Option<OutputReader> {
    let [_, stdout, stderr] = &streams.0;
    let outputs: Vec<(&'static str, u64)> = [("stdout", stdout), ("stderr", stderr)]
        .into_iter()
        .filter_map(|(name, kind)| match kind {
            StdioKind::Pipe(ino) => Some((name, *ino)),
            _ => None,
        })
        .collect();
    for holder in pf_os::proc::tree(pid) {
        for (fd, link) in pf_os::proc::open_fds(holder) {
            let Some(ino) = pf_os::proc::link_inode(&link, "pipe") else {
                continue;
            };
            let Some(&(stream, _)) = outputs.iter().find(|(_, out)| *out == ino) else {
                continue;
            };
            if pf_os::proc::fd_flags(holder, fd).is_some_and(pf_os::proc::flags_read) {
                return Some(OutputReader {
                    stream,
                    pipe: ino,
                    pid: holder,
                    command: pf_os::proc::comm(holder).unwrap_or_default(),
                    fd,
                });
            }
        }
    }
    None
}

/// Why a goblin with these stdin, stdout and stderr could not be thawed again (`None`: it
/// can). Its stdout must be a pipe — it is how a goblin answers, and what a thaw wires to fresh
/// pipes. Its stdin and stderr may be pipes, files (`/dev/null` included: CRIU reopens them by
/// path) or closed. A terminal or a socket cannot come back: CRIU cannot hand a thawed copy the
/// terminal or the other end of the connection. Nor can a named pipe: CRIU would reopen the
/// FIFO by path, and the copy would read the original's input (a thaw's stdin never reaches it).
pub(crate) fn stdio_problem(streams: &Streams) -> Option<&'static str> {
    let [stdin, stdout, stderr] = &streams.0;
    let all = [stdin, stdout, stderr];
    if all.iter().any(|k| matches!(k, StdioKind::Terminal(_))) {
        return Some(
            "a terminal cannot be handed to a thawed copy (freeze a job on a terminal with \
             `pf shell freeze`)",
        );
    }
    if all.iter().any(|k| matches!(k, StdioKind::Socket(_))) {
        return Some("a socket cannot be reconnected to a thawed copy");
    }
    if all.iter().any(|k| matches!(k, StdioKind::Fifo(_))) {
        return Some(
            "CRIU reopens a named pipe by path, so a thawed copy would share the original's \
             FIFO instead of getting pipes of its own",
        );
    }
    if !matches!(stdout, StdioKind::Pipe(_)) {
        return Some(
            "a goblin's stdout must be a pipe: it is how it answers (its stdin and stderr may \
             also be files or /dev/null)",
        );
    }
    let reopenable = |k: &StdioKind| {
        matches!(
            k,
            StdioKind::Pipe(_) | StdioKind::File(_) | StdioKind::Closed
        )
    };
    if !reopenable(stdin) || !reopenable(stderr) {
        return Some("only pipes, files and /dev/null can be reconnected to a thawed copy");
    }
    None
}

/// The name of `pid` when it is a kernel thread (`PF_KTHREAD` in `/proc/PID/stat`).
fn kernel_thread(pid: i32) -> Option<String> {
    pf_os::proc::stat(pid).filter(pf_os::proc::Stat::is_kernel_thread)?;
    Some(pf_os::proc::comm(pid).unwrap_or_default())
}

/// Whether `pid` is absent or a zombie (exited, not yet reaped: nothing left to freeze).
fn is_gone(pid: i32) -> bool {
    !matches!(pf_os::proc::pid_state(pid), pf_os::proc::PidState::Alive)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::process::{Command, Stdio};

    use super::*;

    fn sleeper(stdout: Stdio) -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sleep")
    }

    fn pid_of(child: &std::process::Child) -> i32 {
        i32::try_from(child.id()).expect("pid fits")
    }

    #[test]
    fn refuses_a_process_writing_to_a_file() {
        let file = tempfile::tempfile().expect("tempfile");
        let mut child = sleeper(Stdio::from(file));
        let result = check_goblin(pid_of(&child), false);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let err = result.expect_err("stdout is a file");
        let Error::NotPipes { streams, .. } = &err else {
            panic!("wrong error: {err:?}");
        };
        assert!(matches!(streams.0[0], StdioKind::Pipe(_)));
        assert!(
            matches!(&streams.0[1], StdioKind::File(p) if p.ends_with("(deleted)")),
            "{streams}"
        );
        let text = err.to_string();
        assert!(text.contains("stdout is a file"), "{text}");
    }

    #[test]
    fn refuses_a_process_reading_a_named_pipe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("in");
        let made = Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo: {made}");
        // Read and write: opening a FIFO so does not wait for the other end.
        let stdin = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&fifo)
            .expect("open the fifo");
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sleep");
        let result = check_goblin(pid_of(&child), false);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let err = result.expect_err("stdin is a named pipe");
        let Error::NotPipes { streams, .. } = &err else {
            panic!("wrong error: {err:?}");
        };
        assert_eq!(
            streams.0[0],
            StdioKind::Fifo(fifo.display().to_string()),
            "{streams}"
        );
        assert!(matches!(streams.0[1], StdioKind::Pipe(_)), "{streams}");
        let text = err.to_string();
        assert!(text.contains("stdin is a named pipe"), "{text}");
    }

    #[test]
    fn stdin_and_stderr_may_be_files_but_not_terminals_or_sockets() {
        let pipe = StdioKind::Pipe(1);
        let null = StdioKind::File("/dev/null".into());
        let ok = |a: &StdioKind, b: &StdioKind, c: &StdioKind| {
            stdio_problem(&Streams([a.clone(), b.clone(), c.clone()]))
        };
        assert_eq!(ok(&pipe, &pipe, &pipe), None);
        assert_eq!(ok(&null, &pipe, &null), None);
        assert_eq!(
            ok(
                &StdioKind::Closed,
                &pipe,
                &StdioKind::File("/tmp/log".into())
            ),
            None
        );
        let tty = StdioKind::Terminal("/dev/pts/0".into());
        assert!(
            ok(&tty, &pipe, &pipe)
                .expect("terminal")
                .contains("terminal")
        );
        let sock = StdioKind::Socket(9);
        assert!(ok(&pipe, &pipe, &sock).expect("socket").contains("socket"));
        assert!(
            ok(&pipe, &null, &pipe)
                .expect("stdout")
                .contains("stdout must be a pipe")
        );
        let other = StdioKind::Other("anon_inode:[eventfd]".into());
        assert!(
            ok(&other, &pipe, &pipe)
                .expect("other")
                .contains("only pipes, files")
        );
    }

    #[test]
    fn a_kernel_thread_is_named_as_one() {
        // kthreadd is pid 2 wherever the kernel's threads are visible.
        if kernel_thread(2).is_some() {
            let err = check_goblin(2, false).expect_err("kthreadd");
            assert!(
                matches!(&err, Error::KernelThread { pid: 2, name } if name == "kthreadd"),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("is a kernel thread (kthreadd)"),
                "{err}"
            );
        }
        assert_eq!(
            kernel_thread(i32::try_from(std::process::id()).expect("pid")),
            None
        );
    }

    #[test]
    fn freezes_a_goblin_with_stdin_and_stderr_on_dev_null() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let pid = pid_of(&child);
        // As a shell job: the session is not what this test is about.
        let result = check_goblin(pid, true);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let streams = result.expect("accepted");
        assert_eq!(streams.0[0], StdioKind::File("/dev/null".into()));
        assert!(matches!(streams.0[1], StdioKind::Pipe(_)));
    }

    #[test]
    fn refuses_a_process_that_does_not_lead_its_session() {
        let mut child = sleeper(Stdio::piped());
        let pid = pid_of(&child);
        let result = check_goblin(pid, false);
        let as_shell_job = check_goblin(pid, true);
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(matches!(
            result,
            Err(Error::NotSessionLeader { pid: p, sid }) if p == pid && sid != pid
        ));
        assert!(as_shell_job.expect("shell job is fine").pipes().is_some());
    }

    #[test]
    fn accepts_a_spawned_goblin_and_refuses_missing_or_exited_pids() {
        let cmd: Vec<OsString> = vec!["sleep".into(), "30".into()];
        let mut goblin =
            crate::spawn(&cmd, &crate::SpawnOptions::in_dir("/".into())).expect("spawn");
        let pid = goblin.pid();
        assert!(
            check_goblin(pid, false)
                .expect("a goblin")
                .pipes()
                .is_some()
        );
        let mut zombie = Command::new("true").spawn().expect("spawn true");
        let zpid = pid_of(&zombie);
        // Give it time to exit; it stays a zombie until reaped below.
        while !is_gone(zpid) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            matches!(check_goblin(zpid, false), Err(Error::NoSuchProcess { pid: p }) if p == zpid)
        );
        zombie.wait().expect("reap");
        goblin.kill().expect("kill");
        assert!(matches!(
            check_goblin(pid, false),
            Err(Error::NoSuchProcess { .. })
        ));
        assert!(matches!(
            check_goblin(0, false),
            Err(Error::NoSuchProcess { pid: 0 })
        ));
        assert!(matches!(
            check_goblin(-5, false),
            Err(Error::NoSuchProcess { pid: -5 })
        ));
    }
}
