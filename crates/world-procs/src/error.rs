//! The crate's error type: every variant names what it was working on (pid, path, digest) and,
//! for CRIU failures, carries CRIU's own `Error (…)` lines and the path of the kept log.

use std::path::PathBuf;
use std::time::Duration;

use pf_core::Digest256;

use crate::criu::Unavailable;
use crate::criu_log::CriuFailure;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong capturing or restoring a process tree.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable criu on this machine (missing, refused by pf's policy, `criu check` fails, no
    /// privileges).
    #[error("criu is not usable here")]
    Unavailable(#[from] Unavailable),
    /// criu ran and exited unsuccessfully.
    #[error(
        "criu {action} failed ({exit}){}{}; full log kept in {}{}",
        error_lines(.errors),
        failure.map(|f| format!("; {}", f.fix())).unwrap_or_default(),
        .log.display(),
        more_log()
    )]
    Criu {
        /// `dump`, `restore`, `check`.
        action: &'static str,
        /// How it ended.
        exit: crate::Exit,
        /// What CRIU's log says went wrong, when it is a failure pf knows
        /// ([`crate::criu_log::classify`]).
        failure: Option<CriuFailure>,
        /// CRIU's `Error (…)` lines from its log (harmless ones left out).
        errors: Vec<String>,
        /// The kept log file.
        log: PathBuf,
    },
    /// criu did not finish within its deadline and was killed.
    #[error(
        "criu {action} did not finish within {after:?} and was killed; log kept in {}{}",
        .log.display(),
        more_log()
    )]
    Timeout {
        /// `dump`, `restore`, `check`.
        action: &'static str,
        /// The deadline.
        after: Duration,
        /// The kept log file.
        log: PathBuf,
    },
    /// A program could not be started.
    #[error("cannot run {}", .program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The pid to capture does not exist (or is a zombie).
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// The pid is a kernel thread (kthreadd, a worker): CRIU dumps user processes only.
    #[error(
        "process {pid} is a kernel thread ({name}), not a program: only user processes can be captured"
    )]
    KernelThread {
        /// The pid asked for.
        pid: i32,
        /// Its name (`/proc/PID/comm`).
        name: String,
    },
    /// The tree to capture holds pf itself: `pid` is pf or one of its ancestors.
    #[error(
        "process {pid} is {what}, so its tree holds the pf doing the capture (and criu): \
         capture a process that is not an ancestor of pf, started apart from it (setsid)"
    )]
    HoldsPf {
        /// The pid asked for.
        pid: i32,
        /// "pf itself" or "an ancestor of pf (pid N)".
        what: String,
    },
    /// A task of the tree to dump is traced by another process (`TracerPid:`), so criu cannot
    /// seize it: another freeze or capture of it is under way (its criu is the tracer), or a
    /// debugger holds it. Found before criu runs, or after it failed to seize the task.
    #[error("{}", traced_message(*.root, *.pid, *.tid, *.tracer, .tracer_name, .tracer_parent))]
    Traced {
        /// The pid asked for.
        root: i32,
        /// The traced process (`root` or a process below it).
        pid: i32,
        /// Its traced thread (`pid` for its main thread).
        tid: i32,
        /// The tracer's pid.
        tracer: i32,
        /// The tracer's name (`/proc/PID/comm`): `criu` for another dump.
        tracer_name: String,
        /// The tracer's parent and its name (the pf that runs that criu).
        tracer_parent: Option<(i32, String)>,
        /// criu's failure, when it ran and could not seize the task.
        #[source]
        source: Option<Box<Error>>,
    },
    /// The process exited while criu was dumping it.
    #[error("process {pid} exited while criu was dumping it; nothing was stored")]
    ExitedDuringDump {
        /// The pid asked for.
        pid: i32,
        /// criu's failure.
        #[source]
        source: Box<Error>,
    },
    /// The directory to dump into already holds files.
    #[error(
        "the images directory {} is not empty; give a new or empty directory so two dumps never mix",
        .path.display()
    )]
    ImagesDirNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// A file-system operation failed.
    #[error("{op} {}", .path.display())]
    Io {
        /// What was being done: `create`, `read`, `write`, …
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The blob store failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: pf_core::Error,
    },
    /// A blob that should be a procs blob is not one.
    #[error(
        "blob {digest} is not a snapshot: it does not read as a procs record (`pf store show {digest}` says what it holds)"
    )]
    NotProcs {
        /// The blob.
        digest: Digest256,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },
    /// The procs blob is an honest placeholder: nothing was dumped, nothing can be restored.
    #[error("{digest} holds no process images (captured on {unsupported_on}: {note})")]
    Unsupported {
        /// The placeholder blob.
        digest: Digest256,
        /// Where it was made.
        unsupported_on: String,
        /// Why nothing was dumped.
        note: String,
    },
    /// The images tar holds something that must not be extracted.
    #[error("refusing to extract the images of {digest}: entry {entry:?} {reason}")]
    UnsafeTar {
        /// The criu_dump blob.
        digest: Digest256,
        /// The entry's path as written in the tar.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The images would not fit in the room left where they are extracted.
    #[error(
        "the images need at least {needed} bytes but only {available} are free in {}; free \
         some space there, or point TMPDIR at a larger file system",
        dir.display()
    )]
    NoRoom {
        /// Where they were to be extracted.
        dir: PathBuf,
        /// The bytes the entries read so far declare.
        needed: u64,
        /// The bytes free there (`statvfs`, available to us).
        available: u64,
    },
    /// The images tar is not a valid tar (or reading it failed).
    #[error("cannot read the images tar {digest}")]
    Tar {
        /// The criu_dump blob.
        digest: Digest256,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A CRIU image could not be read.
    #[error("cannot read {what} from the images")]
    Image {
        /// Which image (`the process tree (pstree.img)`).
        what: &'static str,
        /// The cause.
        #[source]
        source: crate::images::ImageError,
    },
    /// The pid to restore is held by a live process.
    #[error(
        "pid {pid} is in use by a running process ({holder}), so the tree cannot get its pid back; \
         stop that process or restore into a new pid namespace (--new-pidns)"
    )]
    PidInUse {
        /// The pid the tree needs.
        pid: i32,
        /// `/proc/<pid>/comm` of the holder.
        holder: String,
    },
    /// The pid to restore stayed a zombie too long.
    #[error(
        "pid {pid} is still taken by an exited process that its parent {ppid} has not reaped \
         after {waited:?}; reap it (wait for it in process {ppid}) or restore with --new-pidns"
    )]
    PidZombie {
        /// The pid the tree needs.
        pid: i32,
        /// The parent that should reap it.
        ppid: i32,
        /// How long we waited.
        waited: Duration,
    },
    /// Memory of the tree to dump is still being served by a lazy restore: CRIU dumps only
    /// the pages present, so the ones not yet in would be lost.
    #[error(
        "process {pid} is still being thawed lazily: its memory was not all in after {waited:?} \
         (the pf that thawed it serves it; is that pf stopped?); freeze it once every page is in"
    )]
    LazyMemoryPending {
        /// The process whose memory is not all in.
        pid: i32,
        /// How long we waited.
        waited: Duration,
    },
    /// A path criu needs is not in the mount namespace of the thawed copy it dumps.
    #[error(
        "{} is not there for process {pid}: criu dumps a thawed copy from inside its mount \
         namespace, made as the thawing pf saw the filesystems, and that one lacks it (mounted \
         since, or a private /tmp); set TMPDIR to a directory on a filesystem both see, such as \
         /dev/shm",
        .path.display()
    )]
    NotInCopyNamespace {
        /// The process.
        pid: i32,
        /// What criu would not find.
        path: PathBuf,
    },
    /// A process of the tree serves its own memory through a userfaultfd, which CRIU cannot
    /// dump.
    #[error(
        "process {pid} holds a userfaultfd (it serves memory of its own on demand, as a VMM or a \
         lazy restorer does): CRIU cannot dump it; freeze it when it holds none"
    )]
    OwnUserfaultfd {
        /// The process holding it.
        pid: i32,
    },
    /// criu said it restored the tree, but the root is not running.
    #[error("criu restored pid {pid} but it is not running any more ({status})")]
    RestoredDied {
        /// The root's pid.
        pid: i32,
        /// How it ended.
        status: String,
    },
    /// The restored root (in a pid namespace of its own) has ended, but another process reaped
    /// it, so its exit status is unknown: criu was run through something that forks it and
    /// reaps its children (a wrapper script, `strace -f`), whose child the root then was.
    #[error(
        "the restored process (pid {ns_pid} in its namespace) has ended, but not as the child of \
         pf's namespace init: another process reaped it, so its exit status is unknown (is \
         $PF_CRIU a wrapper that runs criu as its child, such as strace -f? pf needs criu itself \
         or a wrapper that execs it)"
    )]
    RootReapedElsewhere {
        /// The root's pid inside its namespace.
        ns_pid: i32,
    },
    /// A memory page of a `procs.criu.v2` snapshot does not match its recorded digest (or
    /// cannot be decoded): the snapshot is damaged. The page never reached a process: an eager
    /// restore fails before the tree runs, a lazy one kills the tree instead of serving it.
    #[error(
        "{}page {page} of {file}{} is corrupt: its stored bytes do not match their digest; \
         no process ran on that page (thaw another snapshot, or restore the store from a copy)",
        .snapshot.map(|s| format!("snapshot {s}: ")).unwrap_or_default(),
        .vaddr.map(|a| format!(" (address {a:#x})")).unwrap_or_default()
    )]
    CorruptPage {
        /// The procs blob, when known.
        snapshot: Option<Digest256>,
        /// The pages file, e.g. `pages-1.img`.
        file: String,
        /// The page's number in the file.
        page: u64,
        /// The page's address in the process, from the pagemap.
        vaddr: Option<u64>,
        /// What the pack said.
        #[source]
        source: Box<pf_core::pages::PagesError>,
    },
    /// Storing or rebuilding the memory pages of a `procs.criu.v2` snapshot failed.
    #[error("{what}")]
    Pages {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<pf_core::pages::PagesError>,
    },
    /// A lazy restore could not serve the tree's memory; the tree was killed (or never ran).
    #[error(
        "the memory of snapshot {snapshot} could not be served to the restored processes: {reason}"
    )]
    LazyFailed {
        /// The procs blob.
        snapshot: Digest256,
        /// What went wrong.
        reason: String,
    },
    /// A lazy restore must run in a new pid namespace (its init takes the tree down before the
    /// tree's userfaultfds close).
    #[error(
        "a lazy restore must run in a new pid namespace: thaw it in a new pid namespace, or \
         eagerly (--eager, lazy=False)"
    )]
    LazyNeedsPidns,
    /// A lazy restore needs userfaultfd, which cannot be used here.
    #[error(
        "userfaultfd cannot be used here (a kernel without CONFIG_USERFAULTFD, or a seccomp \
         filter forbids it), and lazy thaw needs it: thaw eagerly (--eager, lazy=False; see \
         `pf doctor`)"
    )]
    NoUserfaultfd,
    /// A lazy restore was asked of a snapshot whose memory is not stored page by page.
    #[error(
        "snapshot {snapshot} is a procs.criu.v1 snapshot, whose memory is one archive: only \
         procs.criu.v2 snapshots can be thawed lazily (thaw it without lazy, or freeze the \
         process again with PF_SNAPSHOT_FORMAT unset: pf writes v2 by default)"
    )]
    LazyNeedsV2 {
        /// The procs blob.
        snapshot: Digest256,
    },
    /// `$PF_SNAPSHOT_FORMAT` names no format this pf writes.
    #[error(
        "PF_SNAPSHOT_FORMAT={value:?} is not a snapshot format: set it to v2 or v1, or unset it (v2)"
    )]
    BadSnapshotFormat {
        /// The value found.
        value: String,
    },
    /// A restore of a snapshot holding deleted (ghost) files waited too long for its turn:
    /// criu recreates such files at fixed paths, so these restores take turns (see `ghosts.rs`).
    #[error(
        "another restore of a snapshot holding deleted files has held {} for {waited:?}: \
         such restores take turns (criu recreates the files at fixed paths); find the process \
         holding it with `lslocks`, end it or let it finish, and try again",
        .path.display()
    )]
    GhostLockBusy {
        /// The lock file.
        path: PathBuf,
        /// How long this restore waited.
        waited: Duration,
    },
    /// The namespace init reported a failure before criu could run.
    #[error("setting up the new pid namespace failed at {step} (errno {errno})")]
    Namespace {
        /// The step: `mount --make-rprivate /`, `mount /proc`, `fork`, `exec criu`.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
}

/// What kind of failure an [`Error`] is, for a caller that acts on it: the same enum for
/// pf-world-procs' and pf-goblins' errors (`pf_goblins::Error::kind` returns it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No usable criu: none found, refused by pf's policy (too old, a 4.1 without pf's patch),
    /// `criu check` fails, or not Linux. Fix: `cargo xtask install-criu`, or `$PF_CRIU`.
    CriuUnavailable,
    /// criu lacks the privileges it needs: run as root, allow sudo, or give criu the capability.
    NeedsPrivilege,
    /// This criu cannot dump TCP/UDP sockets on this kernel: install CRIU 4.2 or newer.
    SocketsUnsupported,
    /// The tree uses a terminal of a session outside it (CRIU's `No task found with sid`).
    ForeignTerminal,
    /// A pid the restored tree needs is taken (by a live process, or an unreaped zombie).
    PidInUse,
    /// criu ran and failed for another reason, timed out, or the restored tree died at once.
    CriuFailed,
    /// The process to capture does not exist or exited meanwhile.
    NoSuchProcess,
    /// The snapshot is not of a goblin (pf-goblins).
    NotAGoblin,
    /// The snapshot cannot be restored: not a procs blob, an honest placeholder, an unsafe or
    /// broken images tar, unreadable images.
    InvalidSnapshot,
    /// A blob or name is not in the store.
    NotFound,
    /// The store holds a blob or name that is corrupt.
    StoreCorrupt,
    /// The caller asked for something that cannot be done as asked (a non-empty images
    /// directory, an empty command, an invalid name …).
    InvalidInput,
    /// Not enough free space to extract the images, or for criu to write them (fix: free
    /// some, or point TMPDIR elsewhere).
    NoSpace,
    /// A goblin did not become warm (pf-goblins' warm-up): not by its deadline, or it exited or
    /// closed its stdin first. It has been stopped.
    NotWarm,
    /// The caller cancelled the work (pf-goblins' `Cancel`, say on Ctrl-C).
    Cancelled,
    /// A file-system or system-call failure.
    Io,
    /// The process to capture is traced by another process (another freeze of it under way, a
    /// debugger), so criu cannot seize it: try again once that one is done.
    Traced,
}

impl ErrorKind {
    /// The kind of a store error.
    pub fn of_store(err: &pf_core::Error) -> Self {
        match err {
            pf_core::Error::NotFound { .. }
            | pf_core::Error::NameNotFound { .. }
            | pf_core::Error::PrefixNotFound { .. }
            | pf_core::Error::NoStore { .. } => Self::NotFound,
            pf_core::Error::Integrity { .. }
            | pf_core::Error::Decode { .. }
            | pf_core::Error::CorruptName { .. } => Self::StoreCorrupt,
            pf_core::Error::InvalidDigest(_)
            | pf_core::Error::InvalidName { .. }
            | pf_core::Error::PrefixTooShort { .. }
            | pf_core::Error::AmbiguousPrefix { .. }
            | pf_core::Error::NotAStore { .. }
            | pf_core::Error::EmptyStorePath => Self::InvalidInput,
            _ => Self::Io,
        }
    }
}

impl From<CriuFailure> for ErrorKind {
    fn from(failure: CriuFailure) -> Self {
        match failure {
            CriuFailure::SocketsUnsupported => Self::SocketsUnsupported,
            CriuFailure::ForeignTerminal { .. } => Self::ForeignTerminal,
            CriuFailure::PidInUse { .. } => Self::PidInUse,
            CriuFailure::NoPrivilege => Self::NeedsPrivilege,
            CriuFailure::GhostInTheWay
            | CriuFailure::FileChanged
            | CriuFailure::FileMissing
            | CriuFailure::SessionOutsideNamespace { .. } => Self::CriuFailed,
            CriuFailure::AlreadyTraced { .. } => Self::Traced,
            CriuFailure::OutOfSpace => Self::NoSpace,
        }
    }
}

impl Error {
    /// What kind of failure this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable(Unavailable::NoPrivilege { .. }) => ErrorKind::NeedsPrivilege,
            Self::Unavailable(_) => ErrorKind::CriuUnavailable,
            Self::Criu { failure, .. } => failure.map_or(ErrorKind::CriuFailed, ErrorKind::from),
            Self::Timeout { .. }
            | Self::RestoredDied { .. }
            | Self::RootReapedElsewhere { .. }
            | Self::GhostLockBusy { .. } => ErrorKind::CriuFailed,
            Self::NoSuchProcess { .. } | Self::ExitedDuringDump { .. } => ErrorKind::NoSuchProcess,
            Self::Traced { .. } => ErrorKind::Traced,
            Self::ImagesDirNotEmpty { .. }
            | Self::KernelThread { .. }
            | Self::HoldsPf { .. }
            | Self::NotInCopyNamespace { .. } => ErrorKind::InvalidInput,
            Self::Spawn { .. } | Self::Io { .. } | Self::Sys { .. } => ErrorKind::Io,
            Self::Store { source, .. } => ErrorKind::of_store(source),
            Self::NotProcs { .. }
            | Self::Unsupported { .. }
            | Self::UnsafeTar { .. }
            | Self::Tar { .. }
            | Self::Image { .. } => ErrorKind::InvalidSnapshot,
            Self::NoRoom { .. } => ErrorKind::NoSpace,
            Self::CorruptPage { .. } => ErrorKind::StoreCorrupt,
            Self::BadSnapshotFormat { .. } | Self::LazyNeedsV2 { .. } => ErrorKind::InvalidInput,
            Self::LazyFailed { .. } => ErrorKind::CriuFailed,
            Self::NoUserfaultfd => ErrorKind::CriuUnavailable,
            Self::LazyNeedsPidns => ErrorKind::InvalidInput,
            Self::Pages { source, .. } => match source.as_ref() {
                pf_core::pages::PagesError::Store { source, .. } => ErrorKind::of_store(source),
                pf_core::pages::PagesError::Pack(_)
                | pf_core::pages::PagesError::BadPage { .. }
                | pf_core::pages::PagesError::Malformed { .. } => ErrorKind::StoreCorrupt,
                _ => ErrorKind::Io,
            },
            Self::PidInUse { .. } | Self::PidZombie { .. } => ErrorKind::PidInUse,
            Self::LazyMemoryPending { .. } | Self::OwnUserfaultfd { .. } => ErrorKind::CriuFailed,
            Self::Namespace { errno, .. } if *errno == libc::EPERM => ErrorKind::NeedsPrivilege,
            Self::Namespace { .. } => ErrorKind::Io,
        }
    }

    /// Remove the directory in which a failed criu run's log was kept, when this is (or wraps)
    /// one: for a caller that explains the failure otherwise and shows no log (a goblin that
    /// exited on its own mid-dump). Only a `pf-criu-failed-…` directory is removed.
    pub fn discard_kept_log(&self) {
        let log = match self {
            Self::Criu { log, .. } => log,
            Self::ExitedDuringDump { source, .. } => return source.discard_kept_log(),
            _ => return,
        };
        if let Some(dir) = log.parent()
            && dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pf-criu-failed-"))
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The CRIU failure its log named, when this is (or wraps) a failed criu run.
    pub fn criu_failure(&self) -> Option<CriuFailure> {
        match self {
            Self::Criu { failure, .. } => *failure,
            Self::ExitedDuringDump { source, .. } => source.criu_failure(),
            Self::Traced {
                source: Some(source),
                ..
            } => source.criu_failure(),
            _ => None,
        }
    }
}

/// "process P is already being frozen: …" or "process P is traced by gdb (pid T): …".
fn traced_message(
    root: i32,
    pid: i32,
    tid: i32,
    tracer: i32,
    tracer_name: &str,
    tracer_parent: &Option<(i32, String)>,
) -> String {
    let mut what = if pid == root {
        format!("process {pid}")
    } else {
        format!("process {pid} (of the tree of {root})")
    };
    if tid != pid {
        what = format!("thread {tid} of {what}");
    }
    let by = match tracer_parent {
        Some((ppid, parent)) => {
            format!("{tracer_name} (pid {tracer}, run by {parent}, pid {ppid})")
        }
        None => format!("{tracer_name} (pid {tracer})"),
    };
    if tracer_name == "criu" {
        format!(
            "{what} is already being frozen: {by} traces it, so another freeze, capture or \
             dump of it is under way and criu cannot seize it twice; wait for that one to \
             finish, then freeze again"
        )
    } else {
        format!(
            "{what} is traced by {by}, and criu cannot freeze a process another one traces: \
             detach it (quit the debugger, stop the strace), then freeze again"
        )
    }
}

/// How to get CRIU's every step into the kept log, unless it has them already.
fn more_log() -> &'static str {
    if crate::runner::log_level() < 4 {
        " (errors and warnings; PF_CRIU_LOG_LEVEL=4 logs every step)"
    } else {
        ""
    }
}

fn error_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines.join(" | "))
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// This error, naming the procs blob `snapshot` when it is about a page of it.
    pub(crate) fn in_snapshot(self, procs: &Digest256) -> Self {
        match self {
            Self::CorruptPage {
                snapshot: None,
                file,
                page,
                vaddr,
                source,
            } => Self::CorruptPage {
                snapshot: Some(*procs),
                file,
                page,
                vaddr,
                source,
            },
            other => other,
        }
    }

    pub(crate) fn store(what: impl Into<String>, source: pf_core::Error) -> Self {
        Self::Store {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::{CriuVersion, Refusal, Verdict};

    fn criu_error(failure: Option<CriuFailure>) -> Error {
        Error::Criu {
            action: "dump",
            exit: crate::Exit::Code(1),
            failure,
            errors: vec!["Error (criu/x.c:1): something".to_owned()],
            log: PathBuf::from("/tmp/pf-criu-dump-x/criu.log"),
        }
    }

    #[test]
    fn criu_failure_classes_have_their_kind_and_fix() {
        let cases = [
            (
                Some(CriuFailure::SocketsUnsupported),
                ErrorKind::SocketsUnsupported,
                "install-criu",
            ),
            (
                Some(CriuFailure::ForeignTerminal { sid: 5 }),
                ErrorKind::ForeignTerminal,
                "setsid",
            ),
            (
                Some(CriuFailure::PidInUse { pid: 9 }),
                ErrorKind::PidInUse,
                "new pid namespace",
            ),
            (
                Some(CriuFailure::NoPrivilege),
                ErrorKind::NeedsPrivilege,
                "setcap",
            ),
            (
                Some(CriuFailure::AlreadyTraced { pid: 9 }),
                ErrorKind::Traced,
                "another process was tracing it",
            ),
            (
                Some(CriuFailure::SessionOutsideNamespace { pid: 2 }),
                ErrorKind::CriuFailed,
                "start the process under `setsid`",
            ),
            (
                Some(CriuFailure::OutOfSpace),
                ErrorKind::NoSpace,
                "set TMPDIR to a directory on a filesystem with room",
            ),
            (None, ErrorKind::CriuFailed, "full log kept in"),
        ];
        for (failure, kind, says) in cases {
            let err = criu_error(failure);
            assert_eq!(err.kind(), kind, "{err}");
            assert_eq!(err.criu_failure(), failure);
            let msg = err.to_string();
            assert!(msg.contains(says), "{msg}");
            assert!(
                msg.starts_with("criu dump failed (exit status 1): Error"),
                "{msg}"
            );
        }
        let exited = Error::ExitedDuringDump {
            pid: 3,
            source: Box::new(criu_error(Some(CriuFailure::SocketsUnsupported))),
        };
        assert_eq!(exited.kind(), ErrorKind::NoSuchProcess);
        assert_eq!(exited.criu_failure(), Some(CriuFailure::SocketsUnsupported));
    }

    #[test]
    fn every_other_class_has_its_kind() {
        let v = CriuVersion {
            major: 4,
            minor: 1,
            sublevel: 1,
        };
        let digest = pf_core::Digest256::of(b"x");
        let io = || std::io::Error::other("x");
        let cases: Vec<(Error, ErrorKind)> = vec![
            (Unavailable::NotFound.into(), ErrorKind::CriuUnavailable),
            (
                Unavailable::Refused {
                    path: "/c".into(),
                    version: v,
                    gitid: None,
                    verdict: Verdict::Unpatched,
                }
                .into(),
                ErrorKind::CriuUnavailable,
            ),
            (
                Unavailable::NoPrivilege {
                    path: "/c".into(),
                    sudo: Refusal::NotInstalled,
                    unprivileged: Refusal::NoPrivilege("no cap".into()),
                }
                .into(),
                ErrorKind::NeedsPrivilege,
            ),
            (
                Error::Timeout {
                    action: "dump",
                    after: Duration::from_secs(1),
                    log: "/l".into(),
                },
                ErrorKind::CriuFailed,
            ),
            (Error::NoSuchProcess { pid: 1 }, ErrorKind::NoSuchProcess),
            (
                Error::PidInUse {
                    pid: 1,
                    holder: "sh".into(),
                },
                ErrorKind::PidInUse,
            ),
            (
                Error::PidZombie {
                    pid: 1,
                    ppid: 2,
                    waited: Duration::from_secs(1),
                },
                ErrorKind::PidInUse,
            ),
            (
                Error::store("loading", pf_core::Error::NotFound { digest }),
                ErrorKind::NotFound,
            ),
            (
                Error::store("loading", pf_core::Error::NameNotFound { name: "x".into() }),
                ErrorKind::NotFound,
            ),
            (
                Error::Unsupported {
                    digest,
                    unsupported_on: "macos".into(),
                    note: "n".into(),
                },
                ErrorKind::InvalidSnapshot,
            ),
            (
                Error::UnsafeTar {
                    digest,
                    entry: "../x".into(),
                    reason: "escapes",
                },
                ErrorKind::InvalidSnapshot,
            ),
            (
                Error::ImagesDirNotEmpty { path: "/d".into() },
                ErrorKind::InvalidInput,
            ),
            (Error::io("read", "/x", io()), ErrorKind::Io),
            (
                Error::BadSnapshotFormat { value: "v9".into() },
                ErrorKind::InvalidInput,
            ),
            (
                Error::CorruptPage {
                    snapshot: None,
                    file: "pages-1.img".into(),
                    page: 3,
                    vaddr: None,
                    source: Box::new(pf_core::pages::PagesError::NotPages {
                        path: "/x".into(),
                        len: 1,
                    }),
                },
                ErrorKind::StoreCorrupt,
            ),
            (
                Error::NoRoom {
                    dir: "/dev/shm/x".into(),
                    needed: 2,
                    available: 1,
                },
                ErrorKind::NoSpace,
            ),
            (
                Error::Namespace {
                    step: "fork",
                    errno: libc::EPERM,
                },
                ErrorKind::NeedsPrivilege,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(err.kind(), kind, "{err}");
        }
    }
}
