//! [`warm_up`]: the whole road from a command to a warm snapshot — start (or take) a goblin, feed
//! it input, wait until it is ready (a pattern on its stdout, or quiet), freeze it, name the
//! snapshot, and drain what it printed — each wait bounded by a deadline and by a [`Cancel`].
//!
//! This is what `pf goblin spawn` does, as a library call an agent framework can make.

use std::ffi::OsString;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::freeze::{FreezeOptions, FreezeTarget, Frozen};
use crate::goblin::Goblin;
use crate::pump::{Event, Pipes, Stream, wait_exit};
use crate::spawn::SpawnOptions;

/// Which goblin to warm up.
#[derive(Debug)]
pub enum WarmFrom {
    /// Start this command ([`crate::spawn`]): program, then arguments.
    Command {
        /// The program and its arguments.
        command: Vec<OsString>,
        /// How to start it.
        spawn: SpawnOptions,
    },
    /// A goblin already running (from [`crate::spawn`]); its pipes must still be in it (the
    /// warm-up reads its stdout and stderr itself).
    Goblin(Goblin),
}

/// When a goblin counts as warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Its stdout — everything it printed since the warm-up began — matches this regular
    /// expression (`^` and `$` match at the start and end of every line). Checked once all
    /// the input is in its stdin pipe.
    Matches(String),
    /// Once all the input is in its stdin pipe, it printed nothing on stdout or stderr for
    /// this long.
    Quiet(Duration),
}

/// How to warm a goblin up and freeze it ([`warm_up`]). There is no `Default`: how long to
/// wait, and whether the goblin runs on, are the caller's decisions.
#[derive(Debug, Clone)]
pub struct WarmOptions {
    /// Written into the goblin's stdin first; stdin then stays open (a REPL exits at end of
    /// input). Bytes it has not read when it is frozen are kept in the snapshot.
    pub input: Vec<u8>,
    /// When it is warm.
    pub ready: Ready,
    /// Give up (and stop the goblin) when it is not warm this long after the warm-up began.
    pub timeout: Duration,
    /// How to freeze it once warm. With `leave_running` the goblin is handed back running, its
    /// pipes in place ([`Warmed::goblin`]); without, CRIU stops it and the warm-up reaps it.
    pub freeze: FreezeOptions,
    /// Name the snapshot in the store (only with [`FreezeTarget::Store`]).
    pub tag: Option<String>,
    /// After a freeze that stopped the goblin: how long to keep reading what it printed
    /// between being warm and being frozen. Its pipes close at once unless a process it
    /// started (say one that called `setsid`) still holds them; those are named in
    /// [`Drain::HeldOpen`] when the time is up.
    pub drain: Duration,
}

/// How the drain after the freeze ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drain {
    /// Every writer closed the goblin's stdout and stderr: all it printed is in
    /// [`Warmed::stdout`] and [`Warmed::stderr`].
    Complete,
    /// The drain time ran out while these processes still held the goblin's stdout or
    /// stderr open (descendants that left its process group). They are not touched.
    HeldOpen(Vec<PipeHolder>),
    /// The cancel came; the drain stopped there (the snapshot is complete).
    Cancelled,
    /// The goblin was left running ([`FreezeOptions::leave_running`]): nothing to drain; its
    /// pipes are back in [`Warmed::goblin`].
    LeftRunning,
}

/// A process holding one of a goblin's output pipes open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeHolder {
    /// Its pid.
    pub pid: i32,
    /// Its name (`/proc/PID/comm`).
    pub command: String,
}

/// A goblin warmed up and frozen.
#[derive(Debug)]
pub struct Warmed {
    /// The goblin's pid.
    pub pid: i32,
    /// The snapshot.
    pub frozen: Frozen,
    /// From the start of the warm-up until the goblin was warm.
    pub warmup: Duration,
    /// Everything it printed on stdout, from the start of the warm-up to the end of the drain.
    pub stdout: Vec<u8>,
    /// Everything it printed on stderr, likewise.
    pub stderr: Vec<u8>,
    /// With `leave_running`: the goblin, still running, its pipes back in place.
    pub goblin: Option<Goblin>,
    /// Without `leave_running`: how it ended (CRIU stopped it).
    pub status: Option<ExitStatus>,
    /// How the drain ended.
    pub drain: Drain,
}

/// How long after the ready pattern matched a goblin's stderr (not its stdout, where it is
/// looked for) a warm-up says so, unless its stdout matched meanwhile.
const STDERR_HINT_AFTER: Duration = Duration::from_secs(2);

/// The ready pattern, matched against everything the goblin printed: `^` and `$` at the start
/// and end of each line, a line ending in `\n`, `\r\n` or a lone `\r` (a program that writes
/// CRLF is ready at `ready\r\n` for `^ready$`; `.` matches no `\r`).
fn ready_pattern(pattern: &str) -> Result<regex::bytes::Regex> {
    regex::bytes::RegexBuilder::new(pattern)
        .multi_line(true)
        .crlf(true)
        .build()
        .map_err(|e| Error::Pattern {
            pattern: pattern.to_owned(),
            source: Box::new(e),
        })
}

/// Warm a goblin up and freeze it.
///
/// In order: check what can be checked before anything runs (the pattern, the tag, that CRIU
/// can freeze here: [`Error::CriuUnavailable`]); start the command (or take the goblin); write
/// [`WarmOptions::input`] while reading its stdout and stderr; wait until it is
/// [`WarmOptions::ready`], at most [`WarmOptions::timeout`] ([`Error::NotWarm`]); freeze it into
/// `target` and name the snapshot; then drain its output for at most [`WarmOptions::drain`].
///
/// `on_output` sees every chunk the goblin prints, as it arrives (the CLI copies it to its
/// stderr); all of it is also returned in [`Warmed::stdout`] and [`Warmed::stderr`].
///
/// `cancel` is obeyed at every stage: before the freeze the goblin is stopped and the result is
/// [`Error::Cancelled`]; a cancel during the dump takes effect when CRIU returns (the dump is
/// bounded by the runner's deadline); after it, the drain ends at once ([`Drain::Cancelled`]).
///
/// On any error the goblin is stopped (killed with its process group) and reaped.
pub fn warm_up(
    from: WarmFrom,
    target: FreezeTarget<'_>,
    options: &WarmOptions,
    cancel: &Cancel,
    on_output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<Warmed> {
    let pattern = match &options.ready {
        Ready::Matches(p) => Some(ready_pattern(p)?),
        Ready::Quiet(_) => None,
    };
    let quiet = match options.ready {
        Ready::Quiet(q) => Some(q),
        Ready::Matches(_) => None,
    };
    if let Some(tag) = &options.tag {
        match target {
            FreezeTarget::Store(_) => pf_core::validate_name(tag).map_err(|source| Error::Tag {
                tag: tag.clone(),
                source: Box::new(source),
            })?,
            FreezeTarget::Images(_) => return Err(Error::TagWithImages { tag: tag.clone() }),
        }
    }
    criu_ready()?;
    // A store the snapshot cannot go into is said before the command starts, not after a
    // warm-up of minutes (the lock is let go at once: a gc may run while it warms up).
    if let FreezeTarget::Store(store) = target {
        drop(
            store
                .writer_lock()
                .map_err(|source| Error::StoreUnwritable {
                    handed: matches!(from, WarmFrom::Goblin(_)),
                    source: Box::new(source),
                })?,
        );
    }
    if cancel.is_cancelled() {
        return Err(Error::Cancelled {
            pid: None,
            signal: cancel.signal(),
        });
    }

    let mut goblin = match from {
        WarmFrom::Command { command, spawn } => crate::spawn(&command, &spawn)?,
        WarmFrom::Goblin(g) => g,
    };
    let pid = goblin.pid();
    let _span = tracing::info_span!("warm_up", pid).entered();
    if !options.input.is_empty() && goblin.stdin.is_none() {
        return Err(Error::InputRefused {
            pid,
            source: std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the goblin's stdin pipe was taken out of it",
            ),
        });
    }
    let started = Instant::now();
    let deadline = started + options.timeout;
    let mut pipes = Pipes::new(
        goblin.stdin.take(),
        goblin.stdout.take(),
        goblin.stderr.take(),
        options.input.clone(),
        false,
    );
    let mut out = Output::default();
    let mut last_output = Instant::now();
    // When the pattern matched its stderr (it is looked for on stdout): said once if stdout
    // has not matched [`STDERR_HINT_AFTER`] later, and in the error.
    let mut on_stderr: Option<Instant> = None;
    let mut hinted = false;
    let warm = loop {
        let wake = match quiet {
            Some(q) if pipes.input_done() => deadline.min(last_output + q),
            _ => deadline,
        };
        let wake = match on_stderr {
            Some(at) if !hinted => wake.min(at + STDERR_HINT_AFTER),
            _ => wake,
        };
        match pipes.next(Some(wake), Some(cancel))? {
            Event::Output(stream, bytes) => {
                on_output(stream, &bytes);
                last_output = Instant::now();
                out.push(stream, &bytes);
                if stream == Stream::Stderr
                    && on_stderr.is_none()
                    && pattern.as_ref().is_some_and(|re| re.is_match(&out.stderr))
                {
                    on_stderr = Some(Instant::now());
                }
                if stream == Stream::Stdout
                    && pipes.input_done()
                    && pattern.as_ref().is_some_and(|re| re.is_match(&out.stdout))
                {
                    break true;
                }
            }
            Event::InputDone => {
                if pattern.as_ref().is_some_and(|re| re.is_match(&out.stdout)) {
                    break true;
                }
            }
            Event::InputRefused(source) => {
                drop(goblin);
                return Err(Error::InputRefused { pid, source });
            }
            Event::Closed => {}
            Event::Idle => break false,
            Event::Deadline => {
                let now = Instant::now();
                if now >= deadline {
                    drop(goblin);
                    return Err(Error::NotWarm {
                        pid,
                        waited: options.timeout,
                        quiet: quiet.is_some(),
                        on_stderr: on_stderr.is_some(),
                        input_taken: pipes.input_taken(),
                    });
                }
                if let Some(at) = on_stderr
                    && !hinted
                    && now >= at + STDERR_HINT_AFTER
                {
                    hinted = true;
                    tracing::warn!(
                        pid,
                        "the ready pattern matched what the goblin printed on stderr, but it is \
                         looked for on its stdout only: still waiting (have it print a ready \
                         line of its own on stdout)"
                    );
                }
                if quiet.is_some_and(|q| pipes.input_done() && now >= last_output + q) {
                    break true;
                }
            }
            Event::Cancelled => {
                drop(goblin);
                return Err(Error::Cancelled {
                    pid: Some(pid),
                    signal: cancel.signal(),
                });
            }
        }
    };
    if !warm {
        // Both outputs closed before it was warm: it is exiting (or has).
        let pidfd = goblin.pidfd()?;
        if !wait_exit(pidfd.as_fd(), Some(deadline), Some(cancel))? {
            drop(goblin);
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    pid: Some(pid),
                    signal: cancel.signal(),
                });
            }
            return Err(Error::NotWarm {
                pid,
                waited: options.timeout,
                quiet: quiet.is_some(),
                on_stderr: on_stderr.is_some(),
                input_taken: pipes.input_taken(),
            });
        }
        let status = goblin.wait()?;
        return Err(Error::ExitedWarming { pid, status });
    }
    let warmup = started.elapsed();
    tracing::info!(pid, ?warmup, "goblin is warm; freezing");
    // Held from the first blob to the name, so a gc cannot remove the snapshot in between (see
    // agent_docs/formats.md).
    let writing = match (&options.tag, target) {
        (Some(tag), FreezeTarget::Store(store)) => {
            store.writer_lock().map(Some).map_err(|source| Error::Tag {
                tag: tag.clone(),
                source: Box::new(source),
            })
        }
        _ => Ok(None),
    };
    let (writing, frozen) = match writing {
        Err(e) => (None, Err(e)),
        Ok(lock) => (lock, crate::freeze(pid, target, &options.freeze)),
    };
    let frozen = match frozen {
        Ok(f) => f,
        Err(e) => {
            // A goblin that ended on its own just after its ready line: that is the news, not
            // criu's failure to seize a process that was gone.
            // (A failed freeze lets the goblin run on: one that has ended, ended by itself.)
            if let Ok(Some(status)) = goblin.try_wait() {
                // criu's log of a process that went away under it explains nothing here.
                if let Error::Freeze { source, .. } = &e {
                    source.discard_kept_log();
                }
                pipes.close_stdin();
                drain(&mut pipes, options.drain, cancel, &mut out, on_output)?;
                return Err(Error::ExitedWhenWarm { pid, status });
            }
            // Stop it, and still show what it said between being warm and the failed dump.
            let _ = goblin.kill();
            pipes.close_stdin();
            drain(&mut pipes, options.drain, cancel, &mut out, on_output)?;
            return Err(e);
        }
    };
    if let (Some(tag), FreezeTarget::Store(store), Some(digest)) =
        (&options.tag, target, frozen.digest())
    {
        store.set_name(tag, digest).map_err(|source| Error::Tag {
            tag: tag.clone(),
            source: Box::new(source),
        })?;
    }
    drop(writing);
    if options.freeze.leave_running {
        goblin.stdin = pipes.stdin.take();
        goblin.stdout = pipes.stdout.take();
        goblin.stderr = pipes.stderr.take();
        return Ok(Warmed {
            pid,
            frozen,
            warmup,
            stdout: out.stdout,
            stderr: out.stderr,
            goblin: Some(goblin),
            status: None,
            drain: Drain::LeftRunning,
        });
    }
    // The dump stopped the goblin: reap it (and its process group), then read what it said
    // between being warm and being frozen.
    let status = goblin.kill()?;
    pipes.close_stdin();
    let drained = drain(&mut pipes, options.drain, cancel, &mut out, on_output)?;
    Ok(Warmed {
        pid,
        frozen,
        warmup,
        stdout: out.stdout,
        stderr: out.stderr,
        goblin: None,
        status: Some(status),
        drain: drained,
    })
}

/// Check, before anything runs, that CRIU can freeze here (installed, recent enough, and the
/// privileges to run it). [`warm_up`] calls it first; `Err` is [`Error::CriuUnavailable`] with
/// what to install or change.
pub fn criu_ready() -> Result<()> {
    pf_world_procs::criu::for_capture()
        .map(drop)
        .map_err(|why| Error::CriuUnavailable(Box::new(why.into())))
}

/// Everything a goblin printed, by stream.
#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Output {
    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(bytes),
            Stream::Stderr => self.stderr.extend_from_slice(bytes),
        }
    }
}

/// Read the goblin's remaining output until its pipes close, `within` passes, or the cancel.
fn drain(
    pipes: &mut Pipes,
    within: Duration,
    cancel: &Cancel,
    out: &mut Output,
    on_output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<Drain> {
    let deadline = Instant::now() + within;
    loop {
        match pipes.next(Some(deadline), Some(cancel))? {
            Event::Output(stream, bytes) => {
                on_output(stream, &bytes);
                out.push(stream, &bytes);
            }
            Event::Closed | Event::InputDone | Event::InputRefused(_) => {}
            Event::Idle => return Ok(Drain::Complete),
            Event::Cancelled => return Ok(Drain::Cancelled),
            Event::Deadline => {
                let inodes: Vec<u64> = [pipes.stdout.as_ref(), pipes.stderr.as_ref()]
                    .into_iter()
                    .flatten()
                    .filter_map(|r| {
                        let fd = r.as_fd().try_clone_to_owned().ok()?;
                        let file = std::fs::File::from(fd);
                        file.metadata().ok().map(|m| m.ino())
                    })
                    .collect();
                return Ok(Drain::HeldOpen(pipe_holders(&inodes)));
            }
        }
    }
}

/// The processes other than this one that hold any of the pipes `inodes` open, from `/proc`.
fn pipe_holders(inodes: &[u64]) -> Vec<PipeHolder> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let links: Vec<String> = inodes.iter().map(|i| format!("pipe:[{i}]")).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders: Vec<PipeHolder> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|t| links.iter().any(|l| t.as_os_str() == l.as_str()))
                })
            })
        })
        .map(|pid| PipeHolder {
            pid,
            command: pf_os::proc::comm(pid).unwrap_or_default(),
        })
        .collect();
    holders.sort_by_key(|h| h.pid);
    holders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_pattern_matches_whole_lines_ended_by_lf_or_crlf() {
        let re = ready_pattern("^ready$").expect("pattern");
        assert!(re.is_match(b"ready\n"));
        assert!(re.is_match(b"loading\r\nready\r\n"), "CRLF lines");
        assert!(
            re.is_match(b"loading\nready"),
            "the last line, not ended yet"
        );
        assert!(!re.is_match(b"ready now\r\n"));
        assert!(!re.is_match(b"not ready\n"));
    }

    #[test]
    fn finds_who_holds_a_pipe() {
        let (r, w) = std::io::pipe().expect("pipe");
        let ino = std::fs::File::from(std::os::fd::OwnedFd::from(r.try_clone().expect("dup")))
            .metadata()
            .expect("stat")
            .ino();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .stdout(w)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let holders = pipe_holders(&[ino]);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let pid = i32::try_from(child.id()).expect("pid");
        assert_eq!(
            holders,
            [PipeHolder {
                pid,
                command: "sleep".into()
            }]
        );
        drop(r);
    }

    #[test]
    fn refuses_a_bad_pattern_and_a_tag_without_a_store_before_starting_anything() {
        let options = |ready, tag: Option<&str>| WarmOptions {
            input: Vec::new(),
            ready,
            timeout: Duration::from_secs(5),
            freeze: FreezeOptions {
                leave_running: false,
                shell_job: false,
            },
            tag: tag.map(str::to_owned),
            drain: Duration::from_secs(1),
        };
        let cancel = Cancel::new().expect("cancel");
        let marker = tempfile::tempdir().expect("tempdir");
        let touched = marker.path().join("started");
        let from = || WarmFrom::Command {
            command: vec!["touch".into(), touched.clone().into()],
            spawn: SpawnOptions::in_dir("/".into()),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let err = warm_up(
            from(),
            FreezeTarget::Images(dir.path()),
            &options(Ready::Matches("(".into()), None),
            &cancel,
            &mut |_, _| {},
        )
        .expect_err("bad pattern");
        assert!(
            matches!(&err, Error::Pattern { pattern, .. } if pattern == "("),
            "{err:?}"
        );
        let err = warm_up(
            from(),
            FreezeTarget::Images(dir.path()),
            &options(Ready::Quiet(Duration::from_millis(10)), Some("t")),
            &cancel,
            &mut |_, _| {},
        )
        .expect_err("tag without a store");
        assert!(
            matches!(&err, Error::TagWithImages { tag } if tag == "t"),
            "{err:?}"
        );
        let store = pf_core::MemBlobStore::default();
        let err = warm_up(
            from(),
            FreezeTarget::Store(&store),
            &options(Ready::Quiet(Duration::from_millis(10)), Some(".x")),
            &cancel,
            &mut |_, _| {},
        )
        .expect_err("bad tag");
        assert!(
            matches!(&err, Error::Tag { tag, .. } if tag == ".x"),
            "{err:?}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(!touched.exists(), "nothing was started");
    }
}
