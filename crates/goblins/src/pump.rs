//! The one loop that talks to a goblin for the workflows: write its input, read its stdout and
//! stderr as they come, notice a cancel or a deadline — all from one thread with `poll(2)`, so
//! nothing is left blocked in a read when the workflow returns, and no pipe can stall another
//! (a goblin blocked writing a full stderr never answers on stdout; here both are always read).

use std::io::{PipeReader, PipeWriter, Read as _, Write as _};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::cancel::Cancel;
use crate::error::{Error, Result};

/// One of a goblin's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

/// What happened next on a goblin's pipes.
#[derive(Debug)]
pub(crate) enum Event {
    /// Bytes from stdout or stderr.
    Output(Stream, Vec<u8>),
    /// The stream reached end of file (every writer closed it).
    Closed,
    /// All input is in the stdin pipe.
    InputDone,
    /// The goblin closed its stdin before taking all the input (`EPIPE`).
    InputRefused(std::io::Error),
    /// The deadline passed.
    Deadline,
    /// The cancel was triggered.
    Cancelled,
    /// Nothing left to wait for: no input pending and both outputs closed.
    Idle,
}

/// Our ends of a goblin's pipes, and the input still to write.
#[derive(Debug)]
pub(crate) struct Pipes {
    pub(crate) stdin: Option<PipeWriter>,
    pub(crate) stdout: Option<PipeReader>,
    pub(crate) stderr: Option<PipeReader>,
    input: Vec<u8>,
    written: usize,
    /// Close stdin once all input is written (a fork-and-collect's end of input).
    close_after_input: bool,
}

/// At most this much is written per `poll`: a pipe that polls writable has room for
/// `PIPE_BUF` bytes, so a blocking write of this size returns at once.
const WRITE_CHUNK: usize = 4096;
/// Read buffer size.
const READ_CHUNK: usize = 64 * 1024;

impl Pipes {
    pub(crate) fn new(
        stdin: Option<PipeWriter>,
        stdout: Option<PipeReader>,
        stderr: Option<PipeReader>,
        input: Vec<u8>,
        close_after_input: bool,
    ) -> Pipes {
        // Nothing to write and end of input wanted: the goblin sees it at once.
        let stdin = stdin.filter(|_| !(input.is_empty() && close_after_input));
        Pipes {
            stdin,
            stdout,
            stderr,
            input,
            written: 0,
            close_after_input,
        }
    }

    fn input_pending(&self) -> bool {
        self.stdin.is_some() && self.written < self.input.len()
    }

    /// How much of the input has been written, of how much, while some is still to be.
    pub(crate) fn input_taken(&self) -> Option<(usize, usize)> {
        self.input_pending()
            .then_some((self.written, self.input.len()))
    }

    /// Whether all input has been written (or there was none, or no stdin to write it to).
    pub(crate) fn input_done(&self) -> bool {
        !self.input_pending()
    }

    /// Whether stdout or stderr is still open.
    pub(crate) fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// Wait for the next event, until `deadline` (none: forever) or `cancel` (none: not
    /// watched; a triggered cancel stays triggered, so a caller that handled it passes `None`).
    pub(crate) fn next(
        &mut self,
        deadline: Option<Instant>,
        cancel: Option<&Cancel>,
    ) -> Result<Event> {
        loop {
            if cancel.is_some_and(Cancel::is_cancelled) {
                return Ok(Event::Cancelled);
            }
            let want_write = self.input_pending();
            if !want_write && !self.output_open() {
                return Ok(Event::Idle);
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Event::Deadline);
                    }
                    // Round up, so we never wake a millisecond early and spin.
                    let ms = left.as_micros().div_ceil(1000);
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let (out, err, inp) = {
                let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(4);
                let cancel_i = cancel.map(|c| {
                    fds.push(PollFd::new(c.fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let out_i = slot(
                    &mut fds,
                    self.stdout.as_ref().map(|r| r.as_fd()),
                    PollFlags::POLLIN,
                );
                let err_i = slot(
                    &mut fds,
                    self.stderr.as_ref().map(|r| r.as_fd()),
                    PollFlags::POLLIN,
                );
                let in_i = if want_write {
                    slot(
                        &mut fds,
                        self.stdin.as_ref().map(|w| w.as_fd()),
                        PollFlags::POLLOUT,
                    )
                } else {
                    None
                };
                match nix::poll::poll(&mut fds, timeout) {
                    Ok(0) => return Ok(Event::Deadline),
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(Error::sys("poll the goblin's pipes", e.into())),
                }
                let ready = |i: Option<usize>| {
                    i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
                };
                if ready(cancel_i) {
                    return Ok(Event::Cancelled);
                }
                (ready(out_i), ready(err_i), ready(in_i))
            };
            // Output first: a goblin that answers while we feed it must never wait on us.
            if out {
                return Ok(self.read(Stream::Stdout));
            }
            if err {
                return Ok(self.read(Stream::Stderr));
            }
            if inp && let Some(event) = self.write()? {
                return Ok(event);
            }
        }
    }

    fn read(&mut self, stream: Stream) -> Event {
        let reader = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        let Some(r) = reader.as_mut() else {
            return Event::Closed;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match r.read(&mut buf) {
                Ok(0) => {
                    *reader = None;
                    return Event::Closed;
                }
                Ok(n) => {
                    buf.truncate(n);
                    return Event::Output(stream, buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A pipe read fails only when something is badly wrong; treat it as the end.
                    tracing::warn!(?stream, error = %e, "reading the goblin's output failed");
                    *reader = None;
                    return Event::Closed;
                }
            }
        }
    }

    /// Write the next chunk of input; an event when the input is finished or refused.
    fn write(&mut self) -> Result<Option<Event>> {
        let Some(w) = self.stdin.as_mut() else {
            return Ok(None);
        };
        let end = (self.written + WRITE_CHUNK).min(self.input.len());
        match w.write(&self.input[self.written..end]) {
            Ok(n) => self.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.written = self.input.len();
                if self.close_after_input {
                    self.stdin = None;
                }
                return Ok(Some(Event::InputRefused(e)));
            }
            Err(e) => return Err(Error::sys("write into the goblin's stdin", e)),
        }
        if self.written >= self.input.len() {
            if self.close_after_input {
                self.stdin = None;
            }
            return Ok(Some(Event::InputDone));
        }
        Ok(None)
    }

    /// Close stdin now (end of input for the goblin), whatever input is still pending.
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
        self.written = self.input.len();
    }
}

/// Add `fd` (if any) to `fds`, returning its index.
fn slot<'fd>(
    fds: &mut Vec<PollFd<'fd>>,
    fd: Option<BorrowedFd<'fd>>,
    flags: PollFlags,
) -> Option<usize> {
    fd.map(|fd| {
        fds.push(PollFd::new(fd, flags));
        fds.len() - 1
    })
}

/// Wait until the process behind `pidfd` has exited (its pidfd turns readable), `deadline`
/// passes (`false`) or `cancel` is triggered (`false`).
pub(crate) fn wait_exit(
    pidfd: BorrowedFd<'_>,
    deadline: Option<Instant>,
    cancel: Option<&Cancel>,
) -> Result<bool> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                // A deadline already passed still looks once: what has exited by then has.
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![PollFd::new(pidfd, PollFlags::POLLIN)];
        if let Some(c) = cancel {
            if c.is_cancelled() {
                return Ok(false);
            }
            fds.push(PollFd::new(c.fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => return Ok(false),
            Ok(_) => {
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return Ok(true);
                }
                return Ok(false);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::sys("poll the goblin's pidfd", e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn never() -> Cancel {
        Cancel::new().expect("cancel")
    }

    #[test]
    fn feeds_input_reads_both_streams_and_reports_ends() {
        let (in_r, in_w) = std::io::pipe().expect("pipe");
        let (out_r, mut out_w) = std::io::pipe().expect("pipe");
        let (err_r, mut err_w) = std::io::pipe().expect("pipe");
        // The "goblin": echoes stdin to stdout, says bye on stderr.
        let echo = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut in_r = in_r;
            in_r.read_to_end(&mut all).expect("read input");
            out_w.write_all(&all).expect("echo");
            err_w.write_all(b"bye").expect("bye");
        });
        // Much more than a pipe holds, so the writes must interleave with the reads.
        let input: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut pipes = Pipes::new(Some(in_w), Some(out_r), Some(err_r), input.clone(), true);
        let cancel = never();
        let deadline = Some(Instant::now() + Duration::from_secs(20));
        let (mut out, mut err, mut done) = (Vec::new(), Vec::new(), false);
        loop {
            match pipes.next(deadline, Some(&cancel)).expect("next") {
                Event::Output(Stream::Stdout, b) => out.extend(b),
                Event::Output(Stream::Stderr, b) => err.extend(b),
                Event::InputDone => done = true,
                Event::Closed => {}
                Event::Idle => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        echo.join().expect("join");
        assert!(done);
        assert_eq!(out, input);
        assert_eq!(err, b"bye");
    }

    #[test]
    fn a_deadline_and_a_cancel_end_the_wait() {
        let (out_r, out_w) = std::io::pipe().expect("pipe");
        let mut pipes = Pipes::new(None, Some(out_r), None, Vec::new(), false);
        let cancel = never();
        let start = Instant::now();
        let event = pipes
            .next(Some(start + Duration::from_millis(100)), Some(&cancel))
            .expect("next");
        assert!(matches!(event, Event::Deadline), "{event:?}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c.cancel();
        });
        let event = pipes.next(None, Some(&cancel)).expect("next");
        t.join().expect("join");
        assert!(matches!(event, Event::Cancelled), "{event:?}");
        drop(out_w);
    }
}
