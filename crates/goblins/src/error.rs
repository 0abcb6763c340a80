//! The crate's error type: each variant names the pid, path or snapshot it was working on and keeps
//! its cause as the source.

use std::path::PathBuf;

use crate::stdio::Streams;

pub use pf_world_procs::ErrorKind;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong spawning, freezing, thawing or forking a goblin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `spawn` was given no program.
    #[error("no command to run: the command line is empty")]
    EmptyCommand,
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program, as given.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The working directory asked for is not one this process can enter.
    #[error("cannot start {program} in {}: that working directory {}", .dir.display(), cwd_problem(.source))]
    Cwd {
        /// The program, as given.
        program: String,
        /// The working directory asked for.
        dir: std::path::PathBuf,
        /// Why it cannot be used.
        #[source]
        source: std::io::Error,
    },
    /// The pid to freeze does not exist (or has exited and is waiting to be reaped).
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// The process's stdin, stdout or stderr cannot be reconnected at a thaw: a terminal, a
    /// socket, or a stdout that is not a pipe.
    #[error(
        "process {pid} is not a goblin: {streams}; {} (start it with `pf goblin spawn`, or with \
         `setsid` and its stdout on a pipe)",
        crate::freeze::stdio_problem(streams).unwrap_or("its stdio cannot be reconnected")
    )]
    NotPipes {
        /// The process.
        pid: i32,
        /// What its descriptors 0–2 are.
        streams: Streams,
    },
    /// A process of the tree a freeze would take reads the goblin's stdout or stderr: a thawed
    /// copy of that reader would take the answers meant for pf.
    #[error(
        "process {pid} cannot be frozen as a goblin: its {} (pipe:[{}]) is read by {}, inside \
         the tree a freeze takes, so a thawed copy of that reader would take the answers meant \
         for pf; start the goblin with its {} on a pipe only its caller reads (not through a \
         process substitution such as `> >(cat)`), or end that reader first",
        .reader.stream,
        .reader.pipe,
        reader_words(*.pid, .reader),
        .reader.stream
    )]
    OutputReadInTree {
        /// The process.
        pid: i32,
        /// Who reads its output.
        reader: crate::freeze::OutputReader,
    },
    /// The process does not lead its own session, so CRIU would need `--shell-job`.
    #[error(
        "process {pid} does not lead its session (its session leader is {sid}); start it with \
         setsid (as `pf goblin spawn` does) or freeze it as a shell job"
    )]
    NotSessionLeader {
        /// The process.
        pid: i32,
        /// Its session id.
        sid: i32,
    },
    /// The process runs in a pid namespace that pf did not make (a thawed copy, whose
    /// namespace pf made, is frozen from inside it).
    #[error(
        "process {pid} runs in a pid namespace that pf did not make (a container's?): freeze it \
         with a pf running inside that namespace"
    )]
    OtherPidNamespace {
        /// The process.
        pid: i32,
    },
    /// Freezing failed in CRIU or while storing the images.
    #[error("cannot freeze process {pid}")]
    Freeze {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: Box<pf_world_procs::Error>,
    },
    /// Restoring failed in CRIU or while reading the snapshot.
    #[error("cannot thaw {snapshot}")]
    Thaw {
        /// The digest or images directory.
        snapshot: String,
        /// The cause.
        #[source]
        source: Box<pf_world_procs::Error>,
    },
    /// Files the goblin had open, mapped or as its working directory are gone or have another
    /// size than at the freeze. CRIU reopens such a file by its path (its contents are not in
    /// the snapshot) and refuses one that changed, so the thaw was not tried. Its kind is
    /// [`ErrorKind::CriuFailed`]: the restore CRIU would have refused.
    #[error(
        "cannot thaw {snapshot}: the goblin had open {}; CRIU reopens a file by its path (the \
         snapshot holds only its name and size) and refuses one that is gone or changed: put \
         the files back as they were at the freeze, or freeze the goblin again once it has closed \
         them",
        files_changed(.files)
    )]
    FilesChanged {
        /// The digest or images directory.
        snapshot: String,
        /// Each file's path and what is wrong with it (`is gone`, `has changed since the
        /// freeze (292 bytes then, 692 now)`).
        files: Vec<(String, String)>,
    },
    /// The snapshot exists but is not of a goblin.
    #[error("{snapshot} is not a goblin snapshot: {reason}")]
    NotAGoblin {
        /// The digest or images directory.
        snapshot: String,
        /// What is missing or wrong.
        reason: NotAGoblinReason,
    },
    /// Waiting for or killing a thawed goblin failed.
    #[error("cannot wait for goblin {pid}")]
    Wait {
        /// The goblin.
        pid: i32,
        /// The cause.
        #[source]
        source: Box<pf_world_procs::Error>,
    },
    /// A goblin thawed lazily was killed because its memory could not be served (a page that
    /// failed its hash, the restore failing midway, pf's lazy-pages daemon gone).
    #[error("goblin {pid} was killed: its memory could not be served")]
    PagesFailed {
        /// The goblin.
        pid: i32,
        /// Why.
        #[source]
        source: Box<pf_world_procs::Error>,
    },
    /// The goblin metadata beside an images directory cannot be read or written.
    #[error("cannot {op} goblin metadata {}{}", .path.display(), metadata_hint(op))]
    Metadata {
        /// `read`, `write`, `decode`.
        op: &'static str,
        /// The metadata file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The unread stdin bytes could not be read from the images.
    #[error("cannot read the unread stdin bytes saved in the images")]
    PipeData(#[source] pf_world_procs::images::ImageError),
    /// A file-system operation on a named path failed.
    #[error("cannot {op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor was given for a thawed goblin's stdin, but the snapshot holds bytes that
    /// were waiting unread in its stdin pipe; they must reach the goblin first, through a pipe
    /// of pf's.
    #[error(
        "{snapshot} has {bytes} unread bytes waiting for its stdin: give it a new pipe \
         (`Wire::NewPipe`) and copy your input after them"
    )]
    StdinBacklog {
        /// The digest or images directory.
        snapshot: String,
        /// How many bytes were waiting.
        bytes: usize,
    },
    /// What the goblin wrote on `stream` could not be passed on (pf's own stdout is a full
    /// disk, `/dev/full`): the rest of it is lost. The goblin has ended, with `status`.
    #[error(
        "cannot pass on the goblin's {stream}, so what it wrote from then on is lost (the goblin \
         ended: {})",
        pf_os::Exit::from(*.status)
    )]
    Output {
        /// `"stdout"` or `"stderr"`.
        stream: &'static str,
        /// How the goblin ended.
        status: std::process::ExitStatus,
        /// Why the write failed.
        source: std::io::Error,
    },
    /// A system call on a pipe or process failed.
    #[error("cannot {op}")]
    Sys {
        /// What was being done: `create a pipe`, `wait for goblin 123`, …
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel does not let pf read the process's descriptors (`/proc/PID/fd`), nor would it
    /// let CRIU dump it.
    #[error(
        "pf may not look into process {pid} ({name}): the kernel refuses to show its open files \
         (/proc/{pid}/fd: permission denied), and would refuse CRIU too; it is another user's, \
         or more privileged than pf (capabilities pf lacks), or not dumpable (it called prctl(PR_SET_DUMPABLE, 0), or \
         runs a setuid or unreadable program), or in a user namespace pf cannot enter. Only a \
         process pf may ptrace can be frozen"
    )]
    Hidden {
        /// The pid.
        pid: i32,
        /// Its name (`/proc/PID/comm`).
        name: String,
    },
    /// The pid is a kernel thread (kthreadd, a worker): it has no memory or stdio of its own to
    /// freeze.
    #[error(
        "process {pid} is a kernel thread ({name}), not a program: only user processes can be \
         frozen"
    )]
    KernelThread {
        /// The pid.
        pid: i32,
        /// Its name (`/proc/PID/comm`).
        name: String,
    },
    /// CRIU cannot be used here, found before a warm-up starts anything.
    #[error("cannot freeze goblins on this machine")]
    CriuUnavailable(#[source] Box<pf_world_procs::Error>),
    /// The readiness pattern of a warm-up is not a valid regular expression.
    #[error("{pattern:?} is not a valid regular expression")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// The cause.
        #[source]
        source: Box<regex::Error>,
    },
    /// A warm-up's tag cannot be used, or the snapshot cannot be named.
    #[error("cannot name the snapshot {tag:?}")]
    Tag {
        /// The name.
        tag: String,
        /// The cause.
        #[source]
        source: Box<pf_core::Error>,
    },
    /// The store a warm-up is to freeze into cannot be written (read-only, not ours): found
    /// before the command was started, so no warm-up is lost.
    #[error(
        "cannot warm up a goblin to freeze into this store: {}",
        if *.handed { "the goblin handed in was stopped, nothing was frozen" } else { "nothing was started" }
    )]
    StoreUnwritable {
        /// Whether a goblin was handed in (it was stopped), rather than a command to start.
        handed: bool,
        /// The cause (it says what to do).
        #[source]
        source: Box<pf_core::Error>,
    },
    /// A warm-up was asked to name a snapshot written to an images directory.
    #[error("cannot name the snapshot {tag:?}: only a snapshot frozen into the store has names")]
    TagWithImages {
        /// The name.
        tag: String,
    },
    /// A warm-up's goblin was not warm by its deadline; it has been stopped.
    #[error(
        "goblin {pid} was not warm after {} s{}; it has been stopped",
        crate::error::seconds(*.waited),
        not_warm_hint(*.quiet, *.on_stderr, *.input_taken)
    )]
    NotWarm {
        /// The goblin.
        pid: i32,
        /// How long it was given.
        waited: std::time::Duration,
        /// Whether it was waited on for quiet (else for a pattern).
        quiet: bool,
        /// Whether the pattern matched what it printed on stderr (a pattern watches stdout).
        on_stderr: bool,
        /// When it had not taken all of its input: how many bytes it had, of how many (it is
        /// warm only once it has them all).
        input_taken: Option<(usize, usize)>,
    },
    /// A warm-up's goblin exited before it was warm.
    #[error("goblin {pid} exited ({}) before it was warm", pf_os::Exit::from(*.status))]
    ExitedWarming {
        /// The goblin.
        pid: i32,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// A warm-up's goblin was warm, then exited on its own before it could be frozen.
    #[error(
        "goblin {pid} exited ({}) right after it was warm, before it could be frozen; nothing \
         was stored (a goblin must wait for its input once it is ready: does it read stdin?)",
        pf_os::Exit::from(*.status)
    )]
    ExitedWhenWarm {
        /// The goblin.
        pid: i32,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// A warm-up's goblin closed its stdin before it took all the input.
    #[error("goblin {pid} closed its stdin before taking all the input; it has been stopped")]
    InputRefused {
        /// The goblin.
        pid: i32,
        /// The cause (a broken pipe).
        #[source]
        source: std::io::Error,
    },
    /// The caller cancelled the work ([`crate::Cancel`]) before the snapshot was made; the
    /// goblin (if one was started) has been stopped.
    #[error("cancelled{}{}", cancelled_by(*.signal), cancelled_pid(*.pid))]
    Cancelled {
        /// The goblin, when one was running.
        pid: Option<i32>,
        /// The signal the cancel carried.
        signal: Option<i32>,
    },
    /// A collect was given a different number of inputs than goblins.
    #[error("{inputs} inputs for {goblins} goblins: give one input per goblin")]
    InputCount {
        /// How many inputs.
        inputs: usize,
        /// How many goblins.
        goblins: usize,
    },
}

/// Why a snapshot is not a goblin's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotAGoblinReason {
    /// It is an honest placeholder: nothing was dumped.
    #[error("it holds no process images (captured on {unsupported_on}: {note})")]
    NoImages {
        /// Where it was made.
        unsupported_on: String,
        /// Why nothing was dumped.
        note: String,
    },
    /// It was captured as a plain process tree.
    #[error(
        "it has no {}={} label (it was captured as a plain process tree; restore it with \
         `pf procs restore`)",
        crate::GOBLIN_LABEL.0,
        crate::GOBLIN_LABEL.1
    )]
    NoGoblinLabel,
    /// It is a terminal shell, captured by `pf shell freeze` (label `shell=v1`).
    #[error(
        "it is a terminal shell (captured by `pf shell freeze`): thaw it with `pf shell thaw` \
         in a terminal"
    )]
    Shell,
    /// It records no stdio at all.
    #[error("it records no stdin/stdout/stderr")]
    NoStdio,
    /// It records other than three stdio entries.
    #[error("it records {found} stdio entries instead of 3")]
    StdioCount {
        /// How many it records.
        found: usize,
    },
    /// Its stdio cannot be given back at a thaw: a terminal, a socket, or a stdout that is not
    /// a pipe (stdin and stderr may be files or `/dev/null`).
    #[error(
        "its {streams}; {}",
        crate::freeze::stdio_problem(streams).unwrap_or("its stdio cannot be reconnected")
    )]
    NotPipes {
        /// What its descriptors 0–2 were.
        streams: Streams,
    },
    /// Its stdin is the pipe it writes to.
    #[error(
        "its stdin is the same pipe as its output (pipe:[{pipe}]); a goblin reading its own \
         output cannot be given separate pipes"
    )]
    StdinIsOutput {
        /// The pipe's inode.
        pipe: u64,
    },
    /// A process of its tree read its stdout or stderr when it was frozen (a pf older than the
    /// freeze's refusal froze such goblins).
    #[error(
        "its {stream} (pipe:[{pipe}]) was read by a process of its own tree when it was frozen \
         (a process substitution such as `> >(cat)`?): a thawed copy of that reader would take \
         the answers meant for pf; freeze it again with its {stream} read only by its caller"
    )]
    OutputReadInTree {
        /// `"stdout"` or `"stderr"`.
        stream: &'static str,
        /// The pipe's inode.
        pipe: u64,
    },
}

impl Error {
    /// What kind of failure this is: the same [`ErrorKind`] as pf-world-procs', whose errors a
    /// freeze, thaw or wait passes through.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::EmptyCommand
            | Self::StdinBacklog { .. }
            | Self::Pattern { .. }
            | Self::TagWithImages { .. }
            | Self::InputCount { .. } => ErrorKind::InvalidInput,
            Self::Tag { source, .. } | Self::StoreUnwritable { source, .. } => {
                ErrorKind::of_store(source)
            }
            Self::KernelThread { .. } => ErrorKind::NotAGoblin,
            Self::Hidden { .. } => ErrorKind::NeedsPrivilege,
            Self::CriuUnavailable(source) => source.kind(),
            Self::NotWarm { .. }
            | Self::ExitedWarming { .. }
            | Self::ExitedWhenWarm { .. }
            | Self::InputRefused { .. } => ErrorKind::NotWarm,
            Self::Cancelled { .. } => ErrorKind::Cancelled,
            Self::NoSuchProcess { .. } => ErrorKind::NoSuchProcess,
            Self::NotPipes { .. }
            | Self::OutputReadInTree { .. }
            | Self::NotSessionLeader { .. }
            | Self::OtherPidNamespace { .. }
            | Self::NotAGoblin { .. } => ErrorKind::NotAGoblin,
            Self::FilesChanged { .. } => ErrorKind::CriuFailed,
            Self::Freeze { source, .. }
            | Self::Thaw { source, .. }
            | Self::Wait { source, .. }
            | Self::PagesFailed { source, .. } => source.kind(),
            Self::Metadata {
                op: "read", source, ..
            } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotAGoblin,
            Self::Metadata { op: "decode", .. } | Self::PipeData(_) => ErrorKind::InvalidSnapshot,
            Self::Cwd { .. } => ErrorKind::InvalidInput,
            Self::Spawn { .. }
            | Self::Metadata { .. }
            | Self::Io { .. }
            | Self::Sys { .. }
            | Self::Output { .. } => ErrorKind::Io,
        }
    }
}

/// The files of [`Error::FilesChanged`], in words: `/a/data.csv, which has changed …`.
fn files_changed(files: &[(String, String)]) -> String {
    files
        .iter()
        .map(|(path, why)| format!("{path}, which {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Who reads a goblin's output, in words: the goblin itself or one of its descendants.
fn reader_words(pid: i32, reader: &crate::freeze::OutputReader) -> String {
    if reader.pid == pid {
        format!("the process itself (its fd {})", reader.fd)
    } else {
        format!(
            "its own descendant {} ({}, fd {})",
            reader.pid, reader.command, reader.fd
        )
    }
}

/// What is wrong with a working directory, in words.
fn cwd_problem(err: &std::io::Error) -> &'static str {
    match err.kind() {
        std::io::ErrorKind::NotFound => "does not exist",
        std::io::ErrorKind::NotADirectory => "is not a directory",
        std::io::ErrorKind::PermissionDenied => "may not be entered",
        _ => "cannot be used",
    }
}

fn metadata_hint(op: &str) -> &'static str {
    if op == "read" {
        " (an images directory made by `pf goblin freeze --images` has one)"
    } else {
        ""
    }
}

fn not_warm_hint(quiet: bool, on_stderr: bool, input_taken: Option<(usize, usize)>) -> String {
    if let Some((taken, total)) = input_taken {
        return format!(
            " (it had taken only {taken} of the {total} bytes of its input: it is warm only once \
             its stdin has taken all of it, and it reads no more; does it read its stdin?)"
        );
    }
    if quiet {
        " (it never stopped printing for the quiet time)"
    } else if on_stderr {
        " (the ready pattern matched what it printed on stderr, but it is looked for on stdout \
         only: `python3 -i` and other REPLs prompt on stderr; have it print a ready line of its \
         own on stdout, e.g. with --input)"
    } else {
        " (its stdout never matched the ready pattern; is it buffering its output? try \
         `python3 -u` or `stdbuf -oL`)"
    }
    .to_owned()
}

fn cancelled_by(signal: Option<i32>) -> String {
    signal.map_or_else(String::new, |s| format!(" by signal {s}"))
}

fn cancelled_pid(pid: Option<i32>) -> String {
    pid.map_or_else(String::new, |p| format!("; goblin {p} has been stopped"))
}

impl Error {
    pub(crate) fn sys(op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Sys {
            op: op.into(),
            source,
        }
    }
}

/// A duration as a person gives one in seconds: `3`, `1.5`, `0.25`.
pub(crate) fn seconds(d: std::time::Duration) -> String {
    let text = format!("{:.3}", d.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stdio::StdioKind;

    #[test]
    fn kinds_tell_not_a_goblin_from_criu_failed_from_store_corrupt() {
        let criu = pf_world_procs::Error::Criu {
            action: "restore",
            exit: pf_world_procs::Exit::Code(1),
            failure: Some(pf_world_procs::criu_log::CriuFailure::PidInUse { pid: 4 }),
            errors: Vec::new(),
            log: PathBuf::from("/l"),
        };
        let corrupt = pf_world_procs::Error::Store {
            what: "loading".into(),
            source: pf_core::Error::Integrity {
                digest: pf_core::Digest256::of(b"x"),
                actual: pf_core::Digest256::of(b"y"),
                path: None,
            },
        };
        let cases = [
            (
                Error::NotAGoblin {
                    snapshot: "s".into(),
                    reason: NotAGoblinReason::NoGoblinLabel,
                },
                ErrorKind::NotAGoblin,
            ),
            (
                Error::NotPipes {
                    pid: 1,
                    streams: Streams([StdioKind::Pipe(1), StdioKind::Pipe(2), StdioKind::Pipe(3)]),
                },
                ErrorKind::NotAGoblin,
            ),
            (
                Error::NotSessionLeader { pid: 1, sid: 2 },
                ErrorKind::NotAGoblin,
            ),
            (
                Error::Thaw {
                    snapshot: "s".into(),
                    source: Box::new(criu),
                },
                ErrorKind::PidInUse,
            ),
            (
                Error::Thaw {
                    snapshot: "s".into(),
                    source: Box::new(corrupt),
                },
                ErrorKind::StoreCorrupt,
            ),
            (
                Error::Freeze {
                    pid: 1,
                    source: Box::new(pf_world_procs::Error::NoSuchProcess { pid: 1 }),
                },
                ErrorKind::NoSuchProcess,
            ),
            (
                Error::Metadata {
                    op: "read",
                    path: PathBuf::from("/d/goblin.json"),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                ErrorKind::NotAGoblin,
            ),
            (
                Error::Metadata {
                    op: "decode",
                    path: PathBuf::from("/d/goblin.json"),
                    source: std::io::Error::other("bad"),
                },
                ErrorKind::InvalidSnapshot,
            ),
            (Error::EmptyCommand, ErrorKind::InvalidInput),
            (Error::NoSuchProcess { pid: 1 }, ErrorKind::NoSuchProcess),
            (
                Error::Hidden {
                    pid: 1,
                    name: "init".into(),
                },
                ErrorKind::NeedsPrivilege,
            ),
            (
                Error::sys("create a pipe", std::io::Error::other("x")),
                ErrorKind::Io,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(err.kind(), kind, "{err}");
        }
    }

    #[test]
    fn not_a_goblin_reasons_read_as_before() {
        let err = Error::NotAGoblin {
            snapshot: "sha256:ab".into(),
            reason: NotAGoblinReason::NoImages {
                unsupported_on: "macos".into(),
                note: "no criu".into(),
            },
        };
        assert_eq!(
            err.to_string(),
            "sha256:ab is not a goblin snapshot: it holds no process images (captured on macos: \
             no criu)"
        );
        assert_eq!(
            ["3", "1.5", "0.25", "0", "300"].map(String::from),
            [3.0, 1.5, 0.25, 0.0, 300.0].map(|s| seconds(std::time::Duration::from_secs_f64(s)))
        );
        assert!(
            NotAGoblinReason::NoGoblinLabel
                .to_string()
                .contains("goblin=v1 label")
        );
    }
}
