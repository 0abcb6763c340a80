//! [`thaw_async`] and [`AsyncGoblin`]: a thawed goblin driven from tokio (feature `tokio`).

use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use crate::error::{Error, Result};
use crate::goblin::{Goblin, Killer};
use crate::sys;
use crate::thaw::{Source, ThawOptions, thaw};

/// A running goblin with tokio pipes: [`tokio::io::AsyncWrite`] into its stdin,
/// [`tokio::io::AsyncRead`] from its stdout and stderr.
///
/// Like [`Goblin`], dropping it unwaited kills the goblin and reaps it.
#[derive(Debug)]
pub struct AsyncGoblin {
    /// Our end of the goblin's stdin; drop it (or call `shutdown`) to send EOF.
    pub stdin: Option<pipe::Sender>,
    /// Our end of the goblin's stdout.
    pub stdout: Option<pipe::Receiver>,
    /// Our end of the goblin's stderr; `None` when it shares the stdout pipe.
    pub stderr: Option<pipe::Receiver>,
    inner: Goblin,
    /// A pidfd of the goblin: readable once it has exited.
    exited: AsyncFd<OwnedFd>,
}

/// [`thaw`], with the goblin's pipes registered with the current tokio runtime.
///
/// CRIU's restore is a blocking subprocess (tens of milliseconds for a small goblin, about a
/// second per GiB): on a multi-threaded runtime it runs inside
/// [`tokio::task::block_in_place`], so other tasks move to other workers meanwhile; on a
/// current-thread runtime it blocks the runtime for that long.
///
/// Must be called from within a tokio runtime with I/O enabled.
pub async fn thaw_async(source: &Source<'_>, options: &ThawOptions) -> Result<AsyncGoblin> {
    let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let goblin = if multi_thread {
        tokio::task::block_in_place(|| thaw(source, options))?
    } else {
        thaw(source, options)?
    };
    AsyncGoblin::new(goblin)
}

impl AsyncGoblin {
    /// Move a goblin's pipes onto the current tokio runtime.
    pub fn new(mut inner: Goblin) -> Result<AsyncGoblin> {
        let pid = inner.pid();
        let register =
            |e: std::io::Error| Error::sys(format!("register goblin {pid} with tokio"), e);
        let stdin = inner
            .stdin
            .take()
            .map(|w| pipe::Sender::from_owned_fd(OwnedFd::from(w)))
            .transpose()
            .map_err(register)?;
        let stdout = inner
            .stdout
            .take()
            .map(|r| pipe::Receiver::from_owned_fd(OwnedFd::from(r)))
            .transpose()
            .map_err(register)?;
        let stderr = inner
            .stderr
            .take()
            .map(|r| pipe::Receiver::from_owned_fd(OwnedFd::from(r)))
            .transpose()
            .map_err(register)?;
        let exited = sys::watch_pidfd(inner.pidfd()?).map_err(register)?;
        Ok(AsyncGoblin {
            stdin,
            stdout,
            stderr,
            inner,
            exited,
        })
    }

    /// The goblin's pid as seen from here.
    pub fn pid(&self) -> i32 {
        self.inner.pid()
    }

    /// Close stdin, wait (asynchronously) for the goblin to exit, reap it and return its status.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        drop(self.stdin.take());
        if let Some(status) = self.inner.try_wait()? {
            return Ok(status);
        }
        let pid = self.pid();
        // The pidfd turns readable when the goblin's main process exits.
        let mut guard = self
            .exited
            .readable()
            .await
            .map_err(|e| Error::sys(format!("wait for goblin {pid}"), e))?;
        guard.retain_ready();
        // A thawed goblin's namespace init exits right after it: reap both without blocking.
        let mut pause = Duration::from_micros(200);
        loop {
            if let Some(status) = self.inner.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Kill the goblin (SIGKILL) and reap it.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.inner.killer().kill()?;
        self.wait().await
    }

    /// A handle that can signal the goblin from anywhere.
    pub fn killer(&self) -> Killer {
        self.inner.killer()
    }
}
