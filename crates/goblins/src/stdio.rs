//! What a process's stdin, stdout and stderr are, and whether that makes it a goblin.
//!
//! A goblin's fds 0, 1 and 2 are pipes: `readlink /proc/PID/fd/N` says `pipe:[INODE]`. The inode
//! is how CRIU names the pipe in its images, and the key `criu restore --inherit-fd` matches, so it
//! is recorded at freeze and used at thaw to plug fresh pipes in place of the old ones.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// What one of a process's descriptors 0–2 refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdioKind {
    /// An anonymous pipe or FIFO, by inode: the only kind a goblin may have.
    Pipe(u64),
    /// A terminal (`/dev/pts/N`, `/dev/ttyN`, `/dev/console`…).
    Terminal(String),
    /// A socket, by inode.
    Socket(u64),
    /// A file or device by path (including `/dev/null`).
    File(String),
    /// A named pipe (FIFO) by path: CRIU would reopen that same FIFO in a thawed copy.
    Fifo(String),
    /// The descriptor is not open.
    Closed,
    /// Anything else the kernel shows, as it shows it (say `anon_inode:[eventfd]`).
    Other(String),
}

impl StdioKind {
    /// Classify the target of a `/proc/PID/fd/N` link (`None`: the fd is not open).
    pub(crate) fn from_link(link: Option<&str>) -> StdioKind {
        let Some(link) = link else {
            return StdioKind::Closed;
        };
        if let Some(ino) = pf_os::proc::link_inode(link, "pipe") {
            return StdioKind::Pipe(ino);
        }
        if let Some(ino) = pf_os::proc::link_inode(link, "socket") {
            return StdioKind::Socket(ino);
        }
        let is_tty = link.starts_with("/dev/pts/")
            || link == "/dev/ptmx"
            || link == "/dev/console"
            || link.starts_with("/dev/tty");
        if is_tty {
            return StdioKind::Terminal(link.to_owned());
        }
        if link.starts_with('/') {
            return StdioKind::File(link.to_owned());
        }
        StdioKind::Other(link.to_owned())
    }
}

impl StdioKind {
    /// The `/proc/PID/fd/N` link this was read from (the inverse of `from_link`).
    pub fn link(&self) -> String {
        match self {
            StdioKind::Pipe(ino) => pipe_key(*ino),
            StdioKind::Socket(ino) => format!("socket:[{ino}]"),
            StdioKind::Terminal(s)
            | StdioKind::File(s)
            | StdioKind::Fifo(s)
            | StdioKind::Other(s) => s.clone(),
            StdioKind::Closed => String::new(),
        }
    }
}

impl fmt::Display for StdioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StdioKind::Pipe(ino) => write!(f, "a pipe (pipe:[{ino}])"),
            StdioKind::Terminal(path) => write!(f, "a terminal ({path})"),
            StdioKind::Socket(ino) => write!(f, "a socket (socket:[{ino}])"),
            StdioKind::File(path) => write!(f, "a file ({path})"),
            StdioKind::Fifo(path) => write!(f, "a named pipe ({path})"),
            StdioKind::Closed => f.write_str("closed"),
            StdioKind::Other(link) => write!(f, "not a pipe ({link})"),
        }
    }
}

/// A process's stdin, stdout and stderr, in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streams(pub [StdioKind; 3]);

/// The names of descriptors 0, 1 and 2.
pub(crate) const STREAMS: [&str; 3] = ["stdin", "stdout", "stderr"];

impl Streams {
    /// Read `/proc/PID/fd/{0,1,2}`.
    pub(crate) fn of_pid(pid: i32) -> Result<Streams> {
        let read = |fd: i32| -> Result<StdioKind> {
            match pf_os::proc::fd_link(pid, fd) {
                Ok(link) => Ok(match StdioKind::from_link(link.as_deref()) {
                    // The link of a named pipe is its path, as a file's is.
                    StdioKind::File(path) if pf_os::proc::fd_is_fifo(pid, fd) => {
                        StdioKind::Fifo(path)
                    }
                    kind => kind,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NoSuchProcess { pid }),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Error::Hidden {
                    pid,
                    name: pf_os::proc::comm(pid).unwrap_or_else(|| "?".into()),
                }),
                Err(source) => Err(Error::Io {
                    op: "read",
                    path: PathBuf::from(format!("/proc/{pid}/fd/{fd}")),
                    source,
                }),
            }
        };
        Ok(Streams([read(0)?, read(1)?, read(2)?]))
    }

    /// Parse the three `pipe:[N]` strings recorded in a snapshot.
    pub(crate) fn from_links(links: &[String]) -> Option<Streams> {
        match links {
            // A descriptor that was not open is recorded as "".
            [a, b, c] => {
                Some(Streams([a, b, c].map(|l| {
                    StdioKind::from_link((!l.is_empty()).then_some(l.as_str()))
                })))
            }
            _ => None,
        }
    }

    /// The three links as `/proc/PID/fd/N` shows them and snapshots record them: `pipe:[N]`,
    /// `/dev/null`, a path, `""` for a descriptor that is not open.
    pub fn links(&self) -> [String; 3] {
        self.0.clone().map(|k| k.link())
    }

    /// The three pipe inodes, when all three are pipes.
    pub fn pipes(&self) -> Option<[u64; 3]> {
        match &self.0 {
            [StdioKind::Pipe(a), StdioKind::Pipe(b), StdioKind::Pipe(c)] => Some([*a, *b, *c]),
            _ => None,
        }
    }
}

impl fmt::Display for Streams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, kind)) in STREAMS.iter().zip(&self.0).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} is {kind}")?;
        }
        Ok(())
    }
}

/// The key CRIU gives a pipe: `pipe:[INODE]`.
pub(crate) fn pipe_key(ino: u64) -> String {
    format!("pipe:[{ino}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_proc_fd_links() {
        let cases = [
            (Some("pipe:[21989]"), StdioKind::Pipe(21989)),
            (Some("socket:[77]"), StdioKind::Socket(77)),
            (Some("/dev/pts/3"), StdioKind::Terminal("/dev/pts/3".into())),
            (Some("/dev/tty1"), StdioKind::Terminal("/dev/tty1".into())),
            (
                Some("/dev/console"),
                StdioKind::Terminal("/dev/console".into()),
            ),
            (Some("/dev/null"), StdioKind::File("/dev/null".into())),
            (
                Some("/tmp/out (deleted)"),
                StdioKind::File("/tmp/out (deleted)".into()),
            ),
            (
                Some("anon_inode:[eventfd]"),
                StdioKind::Other("anon_inode:[eventfd]".into()),
            ),
            (Some("pipe:[x]"), StdioKind::Other("pipe:[x]".into())),
            (None, StdioKind::Closed),
        ];
        for (link, want) in cases {
            assert_eq!(StdioKind::from_link(link), want, "{link:?}");
        }
    }

    #[test]
    fn says_what_each_stream_is() {
        let stdio = Streams([
            StdioKind::Terminal("/dev/pts/0".into()),
            StdioKind::File("/tmp/log".into()),
            StdioKind::Pipe(5),
        ]);
        assert_eq!(
            stdio.to_string(),
            "stdin is a terminal (/dev/pts/0), stdout is a file (/tmp/log), stderr is a pipe (pipe:[5])"
        );
        assert_eq!(stdio.pipes(), None);
    }

    #[test]
    fn pipes_parse_from_recorded_links() {
        let stdio = Streams([StdioKind::Pipe(1), StdioKind::Pipe(2), StdioKind::Pipe(2)]);
        assert_eq!(stdio.pipes(), Some([1, 2, 2]));
        let links = ["pipe:[1]", "pipe:[2]", "pipe:[2]"].map(String::from);
        assert_eq!(Streams::from_links(&links), Some(stdio.clone()));
        assert_eq!(Streams::from_links(&links[..2]), None);
        assert_eq!(Streams::from_links(&stdio.links()), Some(stdio));
        let odd = ["", "/dev/null", "socket:[4]"].map(String::from);
        let parsed = Streams::from_links(&odd).expect("three");
        assert_eq!(parsed.0[0], StdioKind::Closed);
        assert_eq!(parsed.links(), odd);
    }

    #[test]
    fn reads_the_stdio_of_a_live_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let streams = Streams::of_pid(pid);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let streams = streams.expect("read fds");
        assert!(matches!(streams.0[0], StdioKind::Pipe(_)), "{streams}");
        assert!(matches!(streams.0[1], StdioKind::Pipe(_)), "{streams}");
        assert_eq!(streams.0[2], StdioKind::File("/dev/null".into()));
        assert!(matches!(
            Streams::of_pid(i32::MAX),
            Err(Error::NoSuchProcess { pid: i32::MAX })
        ));
    }
}
