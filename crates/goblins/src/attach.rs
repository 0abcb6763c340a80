//! [`attach`]: run a goblin as if it were this program — copy a reader into its stdin and its
//! stdout and stderr into writers, then wait for it. What `pf goblin thaw` does with its own
//! stdin, stdout and stderr when they cannot be handed over as they are ([`Wire::pipe_or_new`]).

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::process::ExitStatus;

use crate::error::{Error, Result};
use crate::goblin::Goblin;
use crate::thaw::Wire;

/// Where the streams of an [`attach`]ed goblin come from and go to. Each is used only for the
/// goblin's streams that are still in the [`Goblin`] (a stream wired straight to a descriptor
/// at thaw needs no copying).
pub struct Attach {
    /// Copied into the goblin's stdin; its end of input closes the goblin's stdin.
    pub stdin: Box<dyn Read + Send>,
    /// Receives the goblin's stdout, flushed after every chunk (a prompt with no newline shows
    /// at once).
    pub stdout: Box<dyn Write + Send>,
    /// Receives the goblin's stderr, likewise.
    pub stderr: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach").finish_non_exhaustive()
    }
}

/// Copy `io` to and from the goblin until it closes its stdout and stderr, then wait for it
/// and return its exit status.
///
/// The stdin copy runs on a thread of its own that is not waited for: it may sit in a read of
/// `io.stdin` after the goblin is gone (a terminal nobody types into), and ends with the
/// process. A writer that fails ends that copy, and the goblin then gets SIGPIPE (or EPIPE) on
/// its next write, as in a shell pipeline. A closed pipe on the other side is that pipeline's
/// business; any other failure (a full disk, `/dev/full`) lost what the goblin wrote, so once the
/// goblin has ended it is an error ([`Error::Output`]), as in `cat`.
pub fn attach(goblin: &mut Goblin, io: Attach) -> Result<ExitStatus> {
    let Attach {
        stdin,
        stdout,
        stderr,
    } = io;
    if let Some(to_goblin) = goblin.stdin.take() {
        std::thread::spawn(move || {
            let mut to_goblin = to_goblin;
            let mut from = stdin;
            let _ = pump(&mut from, &mut to_goblin);
            // Dropping our end is the goblin's end of input.
        });
    }
    let out = goblin.stdout.take().map(|r| {
        std::thread::spawn(move || {
            let mut to = stdout;
            pump(&mut { r }, &mut to)
        })
    });
    let err = goblin.stderr.take().map(|r| {
        std::thread::spawn(move || {
            let mut to = stderr;
            pump(&mut { r }, &mut to)
        })
    });
    let mut lost = None;
    for (stream, t) in [("stdout", out), ("stderr", err)] {
        let Some(Ok(Err(e))) = t.map(std::thread::JoinHandle::join) else {
            continue;
        };
        tracing::debug!(stream, error = %e, "a copy from the goblin ended early");
        if let Failed::Write(source) = e
            && source.kind() != std::io::ErrorKind::BrokenPipe
            && lost.is_none()
        {
            lost = Some((stream, source));
        }
    }
    let status = goblin.wait()?;
    match lost {
        Some((stream, source)) => Err(Error::Output {
            stream,
            status,
            source,
        }),
        None => Ok(status),
    }
}

/// Which side of a copy failed.
#[derive(Debug)]
enum Failed {
    Read(std::io::Error),
    Write(std::io::Error),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(e) => write!(f, "reading: {e}"),
            Self::Write(e) => write!(f, "writing: {e}"),
        }
    }
}

/// Copy `from` to `to` chunk by chunk, flushing each one. Ends at end of input, or when either
/// side fails.
fn pump(from: &mut dyn Read, to: &mut dyn Write) -> std::result::Result<(), Failed> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failed::Read(e)),
        };
        to.write_all(&buf[..n])
            .and_then(|()| to.flush())
            .map_err(Failed::Write)?;
    }
}

impl Wire {
    /// `fd` itself when it is a pipe (the goblin gets it and nothing is copied), else
    /// [`Wire::NewPipe`] (a terminal, a file or a named pipe is copied by the caller, say with
    /// [`attach`]). A named pipe (`mkfifo`) is not handed over: the goblin would hold it by its
    /// path, so a freeze of the thawed copy would refuse it (CRIU reopens a named pipe by path).
    pub fn pipe_or_new(fd: BorrowedFd<'_>) -> Result<Wire> {
        /// The filesystem of unnamed pipes (`PIPEFS_MAGIC` in linux/magic.h).
        const PIPEFS: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x5049_5045);
        let is_pipe = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
            && nix::sys::statfs::fstatfs(fd).is_ok_and(|fs| fs.filesystem_type() == PIPEFS);
        if !is_pipe {
            return Ok(Wire::NewPipe);
        }
        let own = fd
            .try_clone_to_owned()
            .map_err(|e| Error::sys("duplicate a descriptor for the goblin", e))?;
        Ok(Wire::Fd(own))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn pump_copies_everything() {
        let mut from: &[u8] = b"hello\nworld";
        let mut to = Vec::new();
        pump(&mut from, &mut to).expect("pump");
        assert_eq!(to, b"hello\nworld");
    }

    #[test]
    fn a_failed_write_is_told_from_a_failed_read() {
        let mut from: &[u8] = b"hello";
        let mut full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full");
        let err = pump(&mut from, &mut full).expect_err("no space");
        assert!(
            matches!(&err, Failed::Write(e) if e.raw_os_error() == Some(libc::ENOSPC)),
            "{err}"
        );
    }

    #[test]
    fn only_pipes_pass_through() {
        let (r, _w) = std::io::pipe().expect("pipe");
        assert!(matches!(
            Wire::pipe_or_new(r.as_fd()).expect("wire"),
            Wire::Fd(_)
        ));
        let file = tempfile::tempfile().expect("file");
        assert!(matches!(
            Wire::pipe_or_new(file.as_fd()).expect("wire"),
            Wire::NewPipe
        ));
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // Read and write, so that opening it does not wait for a writer.
        let named = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .expect("open fifo");
        assert!(matches!(
            Wire::pipe_or_new(named.as_fd()).expect("wire"),
            Wire::NewPipe
        ));
    }

    #[test]
    fn attach_runs_a_goblin_like_a_program() {
        let cmd: Vec<std::ffi::OsString> = vec![
            "sh".into(),
            "-c".into(),
            "read x; echo out $x; echo err >&2; exit 4".into(),
        ];
        let mut g = crate::spawn(&cmd, &crate::SpawnOptions::in_dir("/".into())).expect("spawn");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let status = attach(
            &mut g,
            Attach {
                stdin: Box::new(std::io::Cursor::new(b"in\n".to_vec())),
                stdout: Box::new(Shared(out.clone())),
                stderr: Box::new(Shared(err.clone())),
            },
        )
        .expect("attach");
        assert_eq!(status.code(), Some(4));
        assert_eq!(*out.lock().expect("lock"), b"out in\n");
        assert_eq!(*err.lock().expect("lock"), b"err\n");
    }
}
