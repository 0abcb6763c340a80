//! The crate's error type: each variant names the pid, path or snapshot it was working on and keeps
//! its cause as the source.

use std::path::PathBuf;

use crate::stdio::Streams;

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
    /// The pid to freeze does not exist (or has exited and is waiting to be reaped).
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// The process's stdin, stdout and stderr are not all pipes.
    #[error(
        "process {pid} is not a goblin: {streams}; a goblin's stdin, stdout and stderr must all be \
         pipes (start it with `pf goblin spawn`, or with `setsid` and all three on pipes)"
    )]
    NotPipes {
        /// The process.
        pid: i32,
        /// What its descriptors 0–2 are.
        streams: Streams,
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
    /// The process runs in a pid namespace other than ours: a thawed copy.
    #[error(
        "process {pid} runs in a pid namespace of its own (it is a thawed copy); freezing a thawed \
         copy is not supported yet: freeze the original goblin instead"
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
    /// The snapshot exists but is not of a goblin.
    #[error("{snapshot} is not a goblin snapshot: {reason}")]
    NotAGoblin {
        /// The digest or images directory.
        snapshot: String,
        /// What is missing or wrong.
        reason: String,
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
    /// A system call on a pipe or process failed.
    #[error("cannot {op}")]
    Sys {
        /// What was being done: `create a pipe`, `wait for goblin 123`, …
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn metadata_hint(op: &str) -> &'static str {
    if op == "read" {
        " (an images directory made by `pf goblin freeze --images` has one)"
    } else {
        ""
    }
}

impl Error {
    pub(crate) fn sys(op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Sys {
            op: op.into(),
            source,
        }
    }
}
