//! [`fork_and_collect`]: thaw N clones of one snapshot, give each its own input and end of
//! input, and gather what each printed and how it ended — each clone within its own deadline,
//! an overrunning clone killed. What `pf goblin fork` does, as a library call: the shape of an
//! agent exploring N branches from one warm state.

use std::os::fd::AsFd as _;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::goblin::Goblin;
use crate::pump::{Event, Pipes, Stream, wait_exit};
use crate::thaw::Source;

/// How to run the clones of a fork-and-collect. No `Default`: the inputs and the deadline are
/// the caller's to choose.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// One input per clone, in order: clone K (counting from 1) gets `inputs[K-1]`, then end of
    /// input (its stdin is closed). The number of clones is `inputs.len()`.
    /// [`inputs_from_template`] makes them from one text with `{i}` in it.
    pub inputs: Vec<Vec<u8>>,
    /// How long each clone may take, counted from the moment it runs until it has exited and
    /// closed its output; a clone still running then is killed ([`Collected::timed_out`]).
    /// `None`: no limit.
    pub deadline: Option<Duration>,
}

/// What one clone did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Its number, counting from 1 (its input was `inputs[clone - 1]`).
    pub clone: usize,
    /// Its pid (the host's).
    pub pid: i32,
    /// How it ended: its exit code, or the signal that killed it.
    pub status: ExitStatus,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote on stderr (empty when its stderr was its stdout, or not a pipe).
    pub stderr: Vec<u8>,
    /// It overran [`CollectOptions::deadline`] and was killed.
    pub timed_out: bool,
    /// The cancel reached it (it got the cancel's signal, or SIGKILL).
    pub cancelled: bool,
}

/// After a cancel passed its signal on, how long a clone may take to end before SIGKILL.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// After a clone is killed, how long to keep reading what it had written (its namespace dies
/// with it, so its pipes close at once unless something outside holds them).
const AFTER_KILL: Duration = Duration::from_secs(2);

/// Thaw `options.inputs.len()` clones of `source` ([`crate::fork`]) and [`collect`] them.
///
/// Either every clone is collected (in clone order), or an error comes back and no clone is
/// left running.
pub fn fork_and_collect(
    source: &Source<'_>,
    options: &CollectOptions,
    cancel: &Cancel,
) -> Result<Vec<Collected>> {
    let goblins = crate::fork(source, options.inputs.len())?;
    collect(goblins, options, cancel)
}

/// Give each goblin its input and end of input, and gather what it writes on stdout and stderr
/// and how it ends, all at once (one thread per goblin, each reading both pipes, so a goblin
/// filling one pipe never stalls).
///
/// A goblin still running at its deadline is killed and reported with `timed_out`. A
/// [`Cancel`] passes its signal (SIGKILL when it has none) to every goblin still running; what
/// they print until they end is still collected, and one that has not ended
/// 5 s later is killed. A goblin that exits without reading all its input
/// is not an error.
pub fn collect(
    goblins: Vec<Goblin>,
    options: &CollectOptions,
    cancel: &Cancel,
) -> Result<Vec<Collected>> {
    if goblins.len() != options.inputs.len() {
        return Err(Error::InputCount {
            inputs: options.inputs.len(),
            goblins: goblins.len(),
        });
    }
    let n = goblins.len();
    let results: Vec<Result<Collected>> = std::thread::scope(|scope| {
        let handles: Vec<_> = goblins
            .into_iter()
            .zip(&options.inputs)
            .enumerate()
            .map(|(k, (goblin, input))| {
                scope.spawn(move || run_clone(k + 1, goblin, input.clone(), options, cancel))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::sys(
                        format!("collect {n} goblins"),
                        std::io::Error::other("a collecting thread panicked"),
                    ))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Clone `clone`'s whole conversation.
fn run_clone(
    clone: usize,
    mut goblin: Goblin,
    input: Vec<u8>,
    options: &CollectOptions,
    cancel: &Cancel,
) -> Result<Collected> {
    let pid = goblin.pid();
    let killer = goblin.killer();
    let mut deadline = options.deadline.map(|d| Instant::now() + d);
    let mut pipes = Pipes::new(
        goblin.stdin.take(),
        goblin.stdout.take(),
        goblin.stderr.take(),
        input,
        true,
    );
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut timed_out, mut cancelled) = (false, false);
    // After a kill, only this long is spent reading what is left.
    let mut killed_at: Option<Instant> = None;
    let watch = |cancelled: bool| (!cancelled).then_some(cancel);
    loop {
        let until = match killed_at {
            Some(t) => Some(t + AFTER_KILL),
            None => deadline,
        };
        match pipes.next(until, watch(cancelled))? {
            Event::Output(Stream::Stdout, bytes) => stdout.extend_from_slice(&bytes),
            Event::Output(Stream::Stderr, bytes) => stderr.extend_from_slice(&bytes),
            Event::Closed | Event::InputDone | Event::InputRefused(_) => {}
            Event::Idle => break,
            Event::Cancelled => {
                cancelled = true;
                killer.signal(cancel.signal().unwrap_or(libc::SIGKILL))?;
                let grace = Instant::now() + CANCEL_GRACE;
                deadline = Some(deadline.map_or(grace, |d| d.min(grace)));
            }
            Event::Deadline => {
                if killed_at.is_some() {
                    // Killed, and its pipes are still held open from outside: stop reading.
                    break;
                }
                timed_out = !cancelled;
                killer.kill()?;
                killed_at = Some(Instant::now());
            }
        }
    }
    // Its output is closed; wait for it to exit (a clone that closed its output and runs on is
    // held to the same deadline).
    if killed_at.is_none() {
        let pidfd = goblin.pidfd()?;
        let until = deadline;
        if !wait_exit(pidfd.as_fd(), until, watch(cancelled))? {
            if !cancelled && cancel.is_cancelled() {
                cancelled = true;
                killer.signal(cancel.signal().unwrap_or(libc::SIGKILL))?;
                let grace = Instant::now() + CANCEL_GRACE;
                let until = Some(deadline.map_or(grace, |d| d.min(grace)));
                if !wait_exit(pidfd.as_fd(), until, None)? {
                    killer.kill()?;
                }
            } else {
                timed_out = !cancelled;
                killer.kill()?;
            }
        }
    }
    let status = goblin.wait()?;
    Ok(Collected {
        clone,
        pid,
        status,
        stdout,
        stderr,
        timed_out,
        cancelled,
    })
}

/// `n` inputs made from `template`: in the K-th (counting from 1) every `{i}` is replaced by K,
/// and every `{{i}}` by a literal `{i}`.
/// `inputs_from_template(b"nth {i}\n", 3)` is `nth 1\n`, `nth 2\n`, `nth 3\n`.
pub fn inputs_from_template(template: &[u8], n: usize) -> Vec<Vec<u8>> {
    (1..=n)
        .map(|k| {
            let k = k.to_string();
            let mut out = Vec::with_capacity(template.len());
            let mut rest = template;
            while !rest.is_empty() {
                if let Some(after) = rest.strip_prefix(b"{{i}}") {
                    out.extend_from_slice(b"{i}");
                    rest = after;
                } else if let Some(after) = rest.strip_prefix(b"{i}") {
                    out.extend_from_slice(k.as_bytes());
                    rest = after;
                } else {
                    out.push(rest[0]);
                    rest = &rest[1..];
                }
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn spawn(script: &str) -> Goblin {
        let cmd: Vec<OsString> = vec!["sh".into(), "-c".into(), script.into()];
        crate::spawn(&cmd, &crate::SpawnOptions::in_dir("/".into())).expect("spawn")
    }

    #[test]
    fn templates_number_every_input() {
        assert_eq!(
            inputs_from_template(b"q{i} {i}\nend\n", 2),
            [b"q1 1\nend\n".to_vec(), b"q2 2\nend\n".to_vec()]
        );
        // `{{i}}` is a literal `{i}`.
        assert_eq!(
            inputs_from_template(b"{i} {{i}} {x}", 2),
            [b"1 {i} {x}".to_vec(), b"2 {i} {x}".to_vec()]
        );
        assert_eq!(inputs_from_template(b"same", 1), [b"same".to_vec()]);
        assert!(inputs_from_template(b"x", 0).is_empty());
    }

    #[test]
    fn collects_each_goblin_and_kills_the_one_that_overruns() {
        let goblins = vec![
            spawn("read x; echo got $x; echo warn >&2; exit 3"),
            spawn("cat; sleep 30"),
            spawn("exit 0"),
        ];
        let options = CollectOptions {
            inputs: vec![b"a\n".to_vec(), b"b\n".to_vec(), vec![0u8; 200_000]],
            deadline: Some(Duration::from_millis(1500)),
        };
        let cancel = Cancel::new().expect("cancel");
        let started = Instant::now();
        let got = collect(goblins, &options, &cancel).expect("collect");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].clone, got[0].status.code()), (1, Some(3)));
        assert_eq!(got[0].stdout, b"got a\n");
        assert_eq!(got[0].stderr, b"warn\n");
        assert!(!got[0].timed_out);
        assert_eq!(got[1].stdout, b"b\n");
        assert!(got[1].timed_out, "{:?}", got[1]);
        assert_eq!(got[1].status.signal(), Some(libc::SIGKILL));
        assert_eq!(
            got[2].status.code(),
            Some(0),
            "unread input is not an error"
        );
        assert!(!got[2].timed_out);
    }

    #[test]
    fn a_cancel_passes_its_signal_on() {
        let goblins = vec![spawn(
            "trap 'echo bye; exit 5' INT; echo up; while :; do sleep 0.05; done",
        )];
        let options = CollectOptions {
            inputs: vec![Vec::new()],
            deadline: None,
        };
        let cancel = Cancel::new().expect("cancel");
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.cancel_with_signal(libc::SIGINT);
        });
        let got = collect(goblins, &options, &cancel).expect("collect");
        t.join().expect("join");
        assert!(got[0].cancelled);
        assert!(!got[0].timed_out);
        assert_eq!(got[0].stdout, b"up\nbye\n");
        assert_eq!(got[0].status.code(), Some(5));
        let err = collect(Vec::new(), &options, &cancel).expect_err("count");
        assert!(
            matches!(
                err,
                Error::InputCount {
                    inputs: 1,
                    goblins: 0
                }
            ),
            "{err:?}"
        );
    }
}
