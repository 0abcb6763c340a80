//! [`Goblin`]: a running goblin — spawned or thawed — with our ends of its three pipes.

use std::io::{PipeReader, PipeWriter};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A running goblin and our ends of its stdin, stdout and stderr.
///
/// The pipes are public fields, like [`std::process::Child`]'s: take them (`goblin.stdout.take()`)
/// to move them into other threads. Read stdout and stderr concurrently (or one of them on a
/// thread) when the goblin may write much to both: a goblin blocked on a full stderr pipe never
/// answers on stdout.
///
/// Dropping a goblin that has not been waited for kills it (its whole process group, or its whole
/// pid namespace when thawed) and reaps it: no zombie and no helper process outlives the value.
/// Call [`Goblin::detach`] to leave it running instead.
#[derive(Debug)]
pub struct Goblin {
    /// Our end of the goblin's stdin: write to it; drop it to send EOF. `None` for a thawed
    /// goblin whose stdin was not a pipe when frozen (`/dev/null` or a file, which CRIU reopens
    /// as it was), or was wired to a descriptor of the caller's.
    pub stdin: Option<PipeWriter>,
    /// Our end of the goblin's stdout.
    pub stdout: Option<PipeReader>,
    /// Our end of the goblin's stderr; `None` when the goblin's stderr is the same pipe as its
    /// stdout (it was started with `2>&1`: its stderr then arrives on `stdout`), or was not a
    /// pipe when frozen (`/dev/null`, a log file: CRIU reopens it as it was).
    pub stderr: Option<PipeReader>,
    pid: i32,
    pidfd: Arc<OwnedFd>,
    /// For a goblin thawed in a pid namespace of its own, how to end that namespace.
    tree: Option<Tree>,
    process: Process,
}

/// A thawed goblin's namespace: a pidfd of its init, which exits with the goblin's status and
/// takes everything left in the namespace with it.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub(crate) init: Arc<OwnedFd>,
    /// The goblin had exited by the time it was thawed: the goblin's pid and pidfd are the
    /// init's, which stands in for it.
    pub(crate) stands_in: bool,
}

/// What the goblin's life is tied to.
#[derive(Debug)]
pub(crate) enum Process {
    /// A child of ours started by [`crate::spawn`].
    Spawned {
        child: Child,
        status: Option<ExitStatus>,
    },
    /// A tree restored by CRIU, possibly inside its own pid namespace.
    Thawed(Box<pf_world_procs::Restored>),
    /// Waited for or killed: nothing left to do.
    Done(ExitStatus),
}

impl Goblin {
    pub(crate) fn new(
        pid: i32,
        pidfd: OwnedFd,
        process: Process,
        stdin: Option<PipeWriter>,
        stdout: Option<PipeReader>,
        stderr: Option<PipeReader>,
    ) -> Goblin {
        Goblin {
            stdin,
            stdout,
            stderr,
            pid,
            pidfd: Arc::new(pidfd),
            tree: None,
            process,
        }
    }

    /// The goblin's tree is in a pid namespace of its own, whose init is `tree`.
    pub(crate) fn in_tree(mut self, tree: Tree) -> Goblin {
        self.tree = Some(tree);
        self
    }

    /// The goblin's pid as seen from here (for a thawed goblin in its own pid namespace, the
    /// host's pid, not the one it sees itself).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Close stdin (so the goblin sees EOF), wait for the goblin to exit and reap it.
    ///
    /// The status is the goblin's own: its exit code, or the signal that killed it. Waiting again
    /// returns the same status.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        drop(self.stdin.take());
        self.reap()
    }

    /// Wait at most `timeout` for the goblin to exit, then reap it as [`Goblin::wait`] does;
    /// `Ok(None)` while it still runs. Unlike `wait`, it leaves stdin open. A caller that must
    /// stay responsive (to Ctrl-C, say) waits in slices of this.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let running = matches!(
            self.process,
            Process::Spawned { status: None, .. } | Process::Thawed(_)
        );
        if running
            && !crate::pump::wait_exit(self.pidfd.as_fd(), Some(Instant::now() + timeout), None)?
        {
            return Ok(None);
        }
        self.reap().map(Some)
    }

    /// Wait for the goblin to exit and reap it (the body of [`Goblin::wait`]).
    fn reap(&mut self) -> Result<ExitStatus> {
        let pid = self.pid;
        let status = match &mut self.process {
            Process::Spawned {
                status: Some(s), ..
            } => *s,
            Process::Spawned { child, status } => {
                let s = child
                    .wait()
                    .map_err(|e| Error::sys(format!("wait for goblin {pid}"), e))?;
                *status = Some(s);
                s
            }
            Process::Thawed(restored) => {
                let code = match restored.wait() {
                    Ok(code) => code,
                    Err(source) => {
                        // Ended, but how is unknown: nothing is left to kill or wait for.
                        if let Some(end) = restored.ended() {
                            self.finish(pf_os::Exit::to_status(end));
                        }
                        return Err(Error::Wait {
                            pid,
                            source: Box::new(source),
                        });
                    }
                };
                // Killed because its memory could not be served: that is the error to report.
                if code == pf_os::Exit::Signal(libc::SIGKILL)
                    && let Some(source) = restored.lazy_error()
                {
                    self.finish(pf_os::Exit::to_status(code));
                    return Err(Error::PagesFailed {
                        pid,
                        source: Box::new(source),
                    });
                }
                pf_os::Exit::to_status(code)
            }
            Process::Done(s) => *s,
        };
        self.finish(status);
        Ok(status)
    }

    /// For a goblin thawed lazily ([`crate::load_lazy`]): wait until every page of its memory
    /// is in, at most `timeout` (`Ok(false)` when it ran out). From then on it owes pf nothing
    /// (it may be detached). If serving failed, the goblin has been killed and this is the error
    /// saying why. Any other goblin has nothing to wait for (`Ok(true)`).
    pub fn wait_pages(&mut self, timeout: Option<std::time::Duration>) -> Result<bool> {
        let pid = self.pid;
        match &mut self.process {
            Process::Thawed(restored) => {
                restored
                    .wait_pages(timeout)
                    .map_err(|source| Error::PagesFailed {
                        pid,
                        source: Box::new(source),
                    })
            }
            _ => Ok(true),
        }
    }

    /// Whether the goblin was thawed lazily and still needs pages served by this process.
    pub fn owes_pages(&self) -> bool {
        matches!(&self.process, Process::Thawed(r) if r.owes_pages())
    }

    /// Pages of its memory served on demand so far (0 unless thawed lazily).
    pub fn pages_served(&self) -> u64 {
        match &self.process {
            Process::Thawed(r) => r.pages_served(),
            _ => 0,
        }
    }

    /// The exit status if the goblin has exited (and reap it then), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let pid = self.pid;
        let status = match &mut self.process {
            Process::Spawned {
                status: Some(s), ..
            } => Some(*s),
            Process::Spawned { child, status } => {
                let s = child
                    .try_wait()
                    .map_err(|e| Error::sys(format!("check on goblin {pid}"), e))?;
                *status = s;
                s
            }
            Process::Thawed(restored) => restored
                .try_wait()
                .map_err(|source| Error::Wait {
                    pid,
                    source: Box::new(source),
                })?
                .map(pf_os::Exit::to_status),
            Process::Done(s) => Some(*s),
        };
        if let Some(s) = status {
            self.finish(s);
        }
        Ok(status)
    }

    /// Kill the goblin with SIGKILL (its process group, or its whole pid namespace when thawed)
    /// and reap it. Killing a goblin that has already exited is not an error.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let pid = self.pid;
        if let Process::Spawned { status: None, .. } = &self.process {
            kill_group(pid);
        }
        if let Process::Thawed(restored) = &mut self.process {
            restored.kill().map_err(|source| Error::Wait {
                pid,
                source: Box::new(source),
            })?;
        }
        self.wait()
    }

    /// A handle that can kill this goblin from another thread (say, a signal handler thread)
    /// while this one waits on it.
    pub fn killer(&self) -> Killer {
        Killer {
            pid: self.pid,
            pidfd: Arc::clone(&self.pidfd),
            tree: self.tree.clone(),
        }
    }

    /// A duplicate of the goblin's pidfd (readable once it has exited).
    pub(crate) fn pidfd(&self) -> Result<OwnedFd> {
        self.pidfd
            .try_clone()
            .map_err(|e| Error::sys(format!("duplicate the pidfd of goblin {}", self.pid), e))
    }

    /// Leave the goblin running after this value is dropped; our pipe ends close (so the goblin
    /// sees EOF on stdin and SIGPIPE on output). Nobody will reap it but init. A goblin thawed
    /// lazily is detached only once every page is in (this waits for that).
    pub fn detach(mut self) {
        // `self` is consumed, so the placeholder status is never observed: it only tells Drop
        // that there is nothing left to kill.
        let placeholder = Process::Done(ExitStatus::from_raw(0));
        match std::mem::replace(&mut self.process, placeholder) {
            Process::Thawed(restored) => restored.detach(),
            Process::Spawned { child, .. } => drop(child),
            Process::Done(_) => {}
        }
    }

    fn finish(&mut self, status: ExitStatus) {
        let process = std::mem::replace(&mut self.process, Process::Done(status));
        // A thawed tree's handle is dropped only once reaped: its Drop then has nothing to kill.
        drop(process);
    }
}

impl Drop for Goblin {
    fn drop(&mut self) {
        let unfinished = matches!(
            self.process,
            Process::Spawned { status: None, .. } | Process::Thawed(_)
        );
        if unfinished && let Err(err) = self.kill() {
            tracing::warn!(pid = self.pid, error = %err, "could not kill a dropped goblin");
        }
    }
}

/// Kills one goblin from anywhere, race-free: it holds a pidfd, which can never reach a process
/// that merely reuses the goblin's pid.
#[derive(Debug, Clone)]
pub struct Killer {
    pid: i32,
    pidfd: Arc<OwnedFd>,
    tree: Option<Tree>,
}

/// How long [`Killer::forward`] lets the namespace of a goblin that has exited end by itself.
const TREE_GRACE: Duration = Duration::from_secs(1);

impl Killer {
    /// Send SIGKILL to the goblin. Its owner's `wait` then returns. A goblin that has already
    /// exited is not an error.
    pub fn kill(&self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Send `signal` (say `libc::SIGINT`) to the goblin's main process. A goblin that has
    /// already exited is not an error.
    pub fn signal(&self, signal: i32) -> Result<()> {
        match pf_os::fd::pidfd_send_signal(self.pidfd.as_fd(), signal) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(Error::sys(format!("signal goblin {}", self.pid), e)),
        }
    }

    /// Pass on a signal this process received, as a program that runs a goblin as itself does
    /// (`pf goblin thaw`): send it to the goblin ([`Killer::signal`]). When the goblin has exited
    /// already but its namespace still stands 1 s later (its init should end the moment the
    /// goblin does), end the namespace (SIGKILL to its init): whoever waits for the goblin then
    /// gets an answer, rather than the signal going nowhere and the wait on forever.
    pub fn forward(&self, signal: i32) -> Result<()> {
        let exited = match &self.tree {
            Some(tree) if tree.stands_in => true,
            // Exited already (a zombie nobody reaps, or gone): the signal can change nothing.
            _ if crate::pump::wait_exit(self.pidfd.as_fd(), Some(Instant::now()), None)? => true,
            _ => match pf_os::fd::pidfd_send_signal(self.pidfd.as_fd(), signal) {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => true,
                Err(e) => return Err(Error::sys(format!("signal goblin {}", self.pid), e)),
            },
        };
        let Some(tree) = self.tree.as_ref().filter(|_| exited) else {
            return Ok(());
        };
        if crate::pump::wait_exit(tree.init.as_fd(), Some(Instant::now() + TREE_GRACE), None)? {
            return Ok(());
        }
        tracing::warn!(
            pid = self.pid,
            signal,
            "the goblin has exited but its pid namespace has not ended: ending it"
        );
        match pf_os::fd::pidfd_send_signal(tree.init.as_fd(), libc::SIGKILL) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(Error::sys(
                format!("end the pid namespace of goblin {}", self.pid),
                e,
            )),
            _ => Ok(()),
        }
    }
}

/// SIGKILL the process group `pgid` (a spawned goblin leads its own). Safe from pid reuse while
/// the leader is our unreaped child: its pid, and so the group id, cannot be handed out again.
fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::{Command, Stdio};

    use super::*;

    /// A child running `sh -c SCRIPT` and a pidfd for it.
    fn child(script: &str) -> (Child, Arc<OwnedFd>) {
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let pidfd = pf_os::fd::pidfd_open(child.id() as i32).expect("pidfd");
        (child, Arc::new(pidfd))
    }

    #[test]
    fn a_signal_for_a_goblin_gone_ends_its_namespace_unless_it_ends_by_itself() {
        // The goblin has exited; its "init" would wait on for good: it is ended.
        let (mut goblin, goblin_fd) = child("exit 0");
        goblin.wait().expect("reap the goblin");
        let (mut init, init_fd) = child("exec sleep 60");
        let killer = Killer {
            pid: goblin.id() as i32,
            pidfd: goblin_fd,
            tree: Some(Tree {
                init: init_fd,
                stands_in: false,
            }),
        };
        killer.forward(libc::SIGTERM).expect("forward");
        assert_eq!(init.wait().expect("reap").signal(), Some(libc::SIGKILL));

        // An init that ends by itself within the grace is left to do so.
        let (mut init, init_fd) = child("sleep 0.3; exit 3");
        let killer = Killer {
            pid: init.id() as i32,
            pidfd: Arc::clone(&init_fd),
            tree: Some(Tree {
                init: init_fd,
                stands_in: true,
            }),
        };
        killer.forward(libc::SIGTERM).expect("forward");
        assert_eq!(init.wait().expect("reap").code(), Some(3));

        // A goblin that runs gets the signal, and its init is left alone.
        let (mut goblin, goblin_fd) = child("exec sleep 60");
        let (mut init, init_fd) = child("exec sleep 60");
        let killer = Killer {
            pid: goblin.id() as i32,
            pidfd: goblin_fd,
            tree: Some(Tree {
                init: init_fd,
                stands_in: false,
            }),
        };
        killer.forward(libc::SIGTERM).expect("forward");
        assert_eq!(goblin.wait().expect("reap").signal(), Some(libc::SIGTERM));
        assert_eq!(init.try_wait().expect("look"), None, "the init runs on");
        init.kill().expect("kill");
        init.wait().expect("reap");
    }
}
