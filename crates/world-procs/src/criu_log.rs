//! What CRIU's own words say went wrong: a pure classifier of the lines of its log (and of what
//! it prints on stdout/stderr when it stops before logging), so that a failure a caller can act
//! on becomes a typed [`CriuFailure`] where the log is read, not a string to match further up.
//!
//! The lines recognised, as CRIU 4.1 and 4.2 write them (source file:line of 4.2.1):
//! - `sockets: Can't get 1:16 opt: Operation not supported` (criu/sockets.c:640; 1:34 is
//!   SO_PASSSEC): Linux ≥ 6.16 refuses SO_PASSCRED/SO_PASSSEC on TCP/UDP sockets, which a CRIU
//!   before 4.2 without pf's patch treats as fatal;
//! - `tty: No task found with sid N` (criu/tty.c:1453): the tree uses a terminal whose session
//!   leader is not in it (a shell job's terminal);
//! - `Can't fork for N: File exists` (criu/cr-restore.c:1237): pid N, which the tree needs, is
//!   taken;
//! - `CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability:`
//!   (criu/cr-check.c:1961), `Running as non-root requires '--unprivileged'` (:1946), and sudo's
//!   `sudo: a password is required`: criu has not the privileges it needs;
//! - `Can't create ghost regfile: File exists` (criu/files-reg.c:467; also `Can't create node for
//!   ghost file`, `Can't create ghost symlink`, `Can't make ghost dir`): the path where criu
//!   recreates a deleted file the tree had open is taken. pf's restores of such snapshots take
//!   turns (`ghosts.rs`), so this is a file left by a restore that was killed, or by a criu
//!   outside pf;
//! - `File <path> has bad size N (expect M)` (criu/files-reg.c:2175), `has bad build-ID` (:2153)
//!   and `has bad mode` (:2294): a file the tree had open, or its program or a library it
//!   mapped, is not the file it was at the dump (written to since, or upgraded);
//! - `Can't open file <path> on restore: No such file or directory` (criu/files-reg.c:2353): a
//!   file the tree had open is not there (removed since, or another machine);
//! - `Unable to interrupt task: N (Operation not permitted)` (compel/src/lib/infect.c:132, a
//!   warning, followed by `Unable to detach from N: No such process` and `Dumping FAILED`):
//!   `PTRACE_SEIZE` of a task of the tree was refused, as root because another process traces
//!   it (another dump of it under way, a debugger), or ptrace is forbidden outright (Yama's
//!   `ptrace_scope` 3);
//! - `A session leader of N(M) is outside of its pid namespace` (criu/cr-dump.c:1528, and `… of
//!   zombie process N(M) …` for a zombie): the task's session was begun by a process of an outer
//!   pid namespace (`getsid` says 0 inside), as for every process started without `setsid` in a
//!   container or `unshare --pid` whose first process kept its parent's session. CRIU refuses
//!   such a task whatever the options (`--shell-job` included).

use std::fmt;

/// A failure of CRIU's that a caller can act on, recognised from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CriuFailure {
    /// This criu cannot dump TCP/UDP sockets on this kernel (Linux ≥ 6.16, CRIU < 4.2).
    SocketsUnsupported,
    /// The tree uses a terminal of a session that is not part of it.
    ForeignTerminal {
        /// The session CRIU looked for.
        sid: i32,
    },
    /// A pid the restored tree needs is held by another process.
    PidInUse {
        /// The pid.
        pid: i32,
    },
    /// criu lacks the privileges it needs (not root, no capability, sudo wants a password).
    NoPrivilege,
    /// Where criu recreates a deleted file the tree had open (a ghost file), a file exists.
    GhostInTheWay,
    /// A file the tree had open or mapped is not the file it was at the dump.
    FileChanged,
    /// A file the tree had open or mapped is not there.
    FileMissing,
    /// criu could not seize a task of the tree: another process traced it (another dump of it
    /// under way, a debugger), or ptrace is forbidden here.
    AlreadyTraced {
        /// The task, as criu numbers it.
        pid: i32,
    },
    /// A task's session leader is in an outer pid namespace, which criu cannot dump.
    SessionOutsideNamespace {
        /// The task, as the dumping criu sees it.
        pid: i32,
    },
    /// A filesystem criu wrote to is full (`ENOSPC`): while dumping, the images directory.
    OutOfSpace,
}

impl CriuFailure {
    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            Self::SocketsUnsupported => {
                "this criu cannot dump TCP/UDP sockets on Linux 6.16 and later (SO_PASSCRED/\
                 SO_PASSSEC); `cargo xtask install-criu` in pf's source tree builds CRIU 4.2.1, \
                 which can"
            }
            Self::ForeignTerminal { .. } => {
                "the tree uses a terminal whose session is not part of it: start the process \
                 with setsid, or dump it together with its session leader"
            }
            Self::PidInUse { .. } => {
                "another process holds a pid the tree needs: stop it, or restore into a new pid \
                 namespace"
            }
            Self::NoPrivilege => {
                "criu needs root: run pf as root, allow passwordless sudo for criu, or give criu \
                 the capability (sudo setcap cap_checkpoint_restore+eip <criu>)"
            }
            Self::GhostInTheWay => {
                "the tree had a deleted file open, which criu recreates at `/<path>.cr.<id>.ghost` \
                 (criu's log says `Opening ghost file 0x<id> for <path>`), and a file is already \
                 there, left by a restore that was killed: remove it and try again"
            }
            Self::FileChanged => {
                "a file the process had open, or its program or a library it mapped, has changed \
                 since it was frozen (criu's error names it, without its leading /); a \
                 snapshot restores only onto the files it was taken with: put that file back as \
                 it was, or freeze the process again after the change (a package upgrade \
                 changes programs and libraries)"
            }
            Self::FileMissing => {
                "a file the process had open or mapped, or its working directory, is not there \
                 (criu's error names it, without its leading /); a snapshot restores only onto \
                 the files it was taken with: \
                 put it back at that path as it was, or thaw where it exists (a machine with \
                 the same files)"
            }
            Self::AlreadyTraced { .. } => {
                "criu could not seize the process: another process was tracing it (another \
                 freeze or capture of it under way, or a debugger), or ptrace is forbidden here \
                 (kernel.yama.ptrace_scope = 3); let the other freeze finish or detach the \
                 debugger, then try again"
            }
            Self::SessionOutsideNamespace { .. } => {
                "the process's session was begun outside this pid namespace (it was started \
                 without setsid in a container or `unshare --pid` whose first process kept its \
                 parent's session), and criu cannot dump a session it cannot see, with \
                 --shell-job or without: start the process under `setsid`, or from a shell \
                 started with `setsid` inside this namespace"
            }
            Self::OutOfSpace => {
                "a filesystem criu wrote to is full: while freezing, the images directory, which \
                 pf makes in $TMPDIR when it is set, else in /dev/shm (the full log, kept beside \
                 it, names the directory); free space there, or set TMPDIR to a directory on a \
                 filesystem with room for the process's memory, and try again"
            }
        }
    }
}

impl fmt::Display for CriuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SocketsUnsupported => f.write_str("sockets unsupported on this kernel"),
            Self::ForeignTerminal { sid } => write!(f, "terminal of another session ({sid})"),
            Self::PidInUse { pid } => write!(f, "pid {pid} in use"),
            Self::NoPrivilege => f.write_str("missing privileges"),
            Self::GhostInTheWay => f.write_str("a ghost file's path is taken"),
            Self::FileChanged => f.write_str("a file changed since the dump"),
            Self::FileMissing => f.write_str("a file of the dump is missing"),
            Self::AlreadyTraced { pid } => write!(f, "process {pid} could not be seized"),
            Self::SessionOutsideNamespace { pid } => {
                write!(f, "process {pid}'s session is outside its pid namespace")
            }
            Self::OutOfSpace => f.write_str("no space left on a device"),
        }
    }
}

/// The failure one line of CRIU's log or output names, if any.
pub fn classify_line(line: &str) -> Option<CriuFailure> {
    if line.contains("Can't get 1:16 opt: Operation not supported")
        || line.contains("Can't get 1:34 opt: Operation not supported")
    {
        return Some(CriuFailure::SocketsUnsupported);
    }
    if let Some(rest) = line.split("No task found with sid ").nth(1) {
        return Some(CriuFailure::ForeignTerminal {
            sid: leading_number(rest)?,
        });
    }
    if let Some(rest) = line.split("Can't fork for ").nth(1)
        && rest.contains("File exists")
    {
        return Some(CriuFailure::PidInUse {
            pid: leading_number(rest)?,
        });
    }
    let privileges = [
        "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability",
        "Running as non-root requires '--unprivileged'",
        "sudo: a password is required",
    ];
    if privileges.iter().any(|p| line.contains(p)) {
        return Some(CriuFailure::NoPrivilege);
    }
    let ghost = [
        "Can't create ghost regfile",
        "Can't create node for ghost",
        "Can't create ghost symlink",
        "Can't make ghost dir",
    ];
    if ghost.iter().any(|g| line.contains(g)) && line.ends_with("File exists") {
        return Some(CriuFailure::GhostInTheWay);
    }
    let changed = [" has bad size ", " has bad build-ID", " has bad mode "];
    if line.contains("): File ") && changed.iter().any(|c| line.contains(c)) {
        return Some(CriuFailure::FileChanged);
    }
    if line.contains("Can't open file ") && line.ends_with(" on restore: No such file or directory")
    {
        return Some(CriuFailure::FileMissing);
    }
    if let Some(rest) = line.split("Unable to interrupt task: ").nth(1)
        && rest.ends_with("(Operation not permitted)")
    {
        return Some(CriuFailure::AlreadyTraced {
            pid: leading_number(rest)?,
        });
    }
    if line.contains("No space left on device") {
        return Some(CriuFailure::OutOfSpace);
    }
    if let Some(rest) = line.split("A session leader of ").nth(1)
        && rest.ends_with("is outside of its pid namespace")
    {
        let rest = rest.strip_prefix("zombie process ").unwrap_or(rest);
        return Some(CriuFailure::SessionOutsideNamespace {
            pid: leading_number(rest)?,
        });
    }
    None
}

/// The first failure the lines name, in their order.
pub fn classify<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<CriuFailure> {
    lines.into_iter().find_map(classify_line)
}

/// Of CRIU's `Error (…)` lines, the one that says most: the first that does not merely report a
/// helper's exit (`Error (criu/util.c:642): exited, status=1` comes first in 3.17's `criu check`
/// log and says nothing), else the first.
pub fn telling_line(errors: &[String]) -> Option<&str> {
    errors
        .iter()
        .find(|l| !is_helper_exit(l))
        .or_else(|| errors.first())
        .map(String::as_str)
}

/// `Error (criu/util.c:642): exited, status=1`: a helper's exit, not a cause.
fn is_helper_exit(line: &str) -> bool {
    line.split_once("): ")
        .is_some_and(|(_, msg)| msg.starts_with("exited, status="))
}

fn leading_number(text: &str) -> Option<i32> {
    let digits: String = text
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_unsupported_on_6_16() {
        // criu 4.1.1 dumping a process with a TCP listener on Linux 6.18.
        let line = "(00.021413) Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: \
                    Operation not supported";
        assert_eq!(classify_line(line), Some(CriuFailure::SocketsUnsupported));
        let passsec = "Error (criu/sockets.c:640): sockets: Can't get 1:34 opt: Operation not \
                       supported";
        assert_eq!(
            classify_line(passsec),
            Some(CriuFailure::SocketsUnsupported)
        );
        assert_eq!(
            classify_line("Error (criu/sockets.c:640): sockets: Can't get 1:16 opt: Bad file"),
            None
        );
    }

    #[test]
    fn terminal_of_another_session() {
        let line = "(00.004211) Error (criu/tty.c:1453): tty: No task found with sid 4242";
        assert_eq!(
            classify_line(line),
            Some(CriuFailure::ForeignTerminal { sid: 4242 })
        );
    }

    #[test]
    fn pid_in_use() {
        let line = "(00.031190) 12345: Error (criu/cr-restore.c:1237): Can't fork for 12345: \
                    File exists";
        assert_eq!(
            classify_line(line),
            Some(CriuFailure::PidInUse { pid: 12345 })
        );
        // Another fork failure is not a pid in use.
        assert_eq!(
            classify_line("Error (criu/cr-restore.c:1237): Can't fork for 7: Resource busy"),
            None
        );
    }

    #[test]
    fn a_ghost_file_in_the_way() {
        // What criu 4.2.1 logged when two restores of one snapshot recreated its deleted file.
        let line = "(00.070956)  16260: Error (criu/files-reg.c:467): Can't create ghost regfile: \
                    File exists";
        assert_eq!(classify_line(line), Some(CriuFailure::GhostInTheWay));
        assert_eq!(
            classify_line("Error (criu/files-reg.c:467): Can't make ghost dir: File exists"),
            Some(CriuFailure::GhostInTheWay)
        );
        // Another reason to fail making it is not a file in the way.
        assert_eq!(
            classify_line("Error (criu/files-reg.c:467): Can't create ghost regfile: No space"),
            None
        );
        assert!(CriuFailure::GhostInTheWay.fix().contains("remove it"));
    }

    #[test]
    fn a_file_changed_or_missing_since_the_dump() {
        // What criu 4.2.1 logged restoring a goblin whose stderr log had grown since the dump,
        // and one whose stderr log had been removed.
        let grown = "(00.013600) Error (criu/files-reg.c:2175): File work/scratch/err.log has bad \
                     size 6 (expect 0)";
        assert_eq!(classify_line(grown), Some(CriuFailure::FileChanged));
        let rebuilt = "Error (criu/files-reg.c:2153): File usr/lib/libpython3.11.so.1.0 has bad \
                       build-ID";
        assert_eq!(classify_line(rebuilt), Some(CriuFailure::FileChanged));
        let gone = "(00.013461) Error (criu/files-reg.c:2353): Can't open file \
                    tmp/bash_jobs.0/9ff0669b3f32/stderr on restore: No such file or directory";
        assert_eq!(classify_line(gone), Some(CriuFailure::FileMissing));
        // Another reason it cannot be opened is not a missing file.
        assert_eq!(
            classify_line(
                "Error (criu/files-reg.c:2353): Can't open file x on restore: Permission denied"
            ),
            None
        );
        assert!(
            CriuFailure::FileChanged
                .fix()
                .contains("freeze the process again")
        );
        assert!(CriuFailure::FileMissing.fix().contains("put it back"));
    }

    #[test]
    fn a_session_begun_outside_the_pid_namespace() {
        // What criu 4.2.1 logged dumping a loop started without setsid under
        // `unshare --pid --fork --mount-proc` (its session leader is the outer shell).
        let line = "(00.011902) Error (criu/cr-dump.c:1528): A session leader of 2(2) is outside \
                    of its pid namespace";
        assert_eq!(
            classify_line(line),
            Some(CriuFailure::SessionOutsideNamespace { pid: 2 })
        );
        let zombie = "Error (criu/cr-dump.c:1290): A session leader of zombie process 7(7) is \
                      outside of its pid namespace";
        assert_eq!(
            classify_line(zombie),
            Some(CriuFailure::SessionOutsideNamespace { pid: 7 })
        );
        let fix = CriuFailure::SessionOutsideNamespace { pid: 2 }.fix();
        assert!(fix.contains("setsid") && fix.contains("--shell-job or without"));
    }

    #[test]
    fn a_full_images_directory() {
        // What criu 4.2.1 logged dumping a 64 MiB goblin into a 16 MiB tmpfs: the first line
        // names the cause.
        let lines = [
            "Error (criu/page-xfer.c:263): page-xfer: Unable to spice data: No space left on \
             device",
            "Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device",
            "Error (criu/mem.c:718): Can't dump page with parasite",
        ];
        assert_eq!(classify(lines), Some(CriuFailure::OutOfSpace));
        let fix = CriuFailure::OutOfSpace.fix();
        assert!(fix.contains("TMPDIR") && fix.contains("/dev/shm"), "{fix}");
    }

    #[test]
    fn missing_privileges() {
        // What criu 4.2.1 prints on stdout, run as `nobody` with --unprivileged and no
        // capability, and what it prints without --unprivileged; sudo without a rule.
        for line in [
            "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: ",
            "Running as non-root requires '--unprivileged'",
            "sudo: a password is required",
        ] {
            assert_eq!(
                classify_line(line),
                Some(CriuFailure::NoPrivilege),
                "{line}"
            );
        }
    }

    #[test]
    fn a_task_another_process_traces_cannot_be_seized() {
        // criu 4.2.1, the second of two dumps of one goblin started at once (its log's tail).
        let log = "(00.032211) Detected cgroup V1 freezer\n\
                   (00.032218) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: \
                   12756 (Operation not permitted)\n\
                   (00.032231) net: Unlock network\n\
                   (00.032289) Unfreezing tasks into 1\n\
                   (00.032292) \tUnseizing 12756 into 1\n\
                   (00.032295) Error (compel/src/lib/infect.c:417): Unable to detach from 12756: \
                   No such process\n\
                   (00.032305) Error (criu/cr-dump.c:1975): Dumping FAILED.\n";
        assert_eq!(
            classify(log.lines()),
            Some(CriuFailure::AlreadyTraced { pid: 12756 })
        );
        // A task that went away is no tracer's doing.
        assert_eq!(
            classify_line(
                "Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 7 (No such process)"
            ),
            None
        );
    }

    #[test]
    fn unrelated_lines_are_no_class() {
        let log = "(00.000100) Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self\n\
                   (00.000200) Error (criu/vdso.c:2): vdso: Unexpected rt vDSO area bounds\n\
                   (00.004211) Error (criu/tty.c:1453): tty: No task found with sid 9\n";
        assert_eq!(
            classify(log.lines()),
            Some(CriuFailure::ForeignTerminal { sid: 9 })
        );
        assert_eq!(classify(log.lines().take(2)), None);
        assert_eq!(classify(std::iter::empty()), None);
    }

    #[test]
    fn picks_the_criu_error_that_names_the_cause() {
        let errors: Vec<String> = [
            "Error (criu/util.c:642): exited, status=1",
            "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds",
            "Error (criu/crtools.c:260): Could not initialize kernel features detection.",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            telling_line(&errors),
            Some("Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds")
        );
        assert_eq!(telling_line(&errors[..1]), Some(errors[0].as_str()));
        assert_eq!(telling_line(&[]), None);
    }
}
