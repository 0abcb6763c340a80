//! Goblins for Python: spawn, freeze, load, thaw and fork through pf-goblins, with the GIL
//! released while they run.
//!
//! A goblin's pipes leave Rust as plain descriptors ([`NativeGoblin::take_fds`]); the Python
//! `pf.Goblin` wraps them in file objects or asyncio streams.

use std::ffi::OsString;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pf_goblins::{FreezeOptions, FreezeTarget, Goblin, Killer, Loaded, Source, ThawOptions};
use pyo3::prelude::*;

use crate::errors;
use crate::store::Store;

/// Python's returncode convention (as `subprocess.Popen.returncode`): the exit code, or minus
/// the signal that killed the process.
fn returncode(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => -signal,
        (None, None) => -1,
    }
}

/// A running goblin (spawned or thawed). Python code uses `pf.Goblin`, which wraps this.
///
/// Dropping it kills and reaps the goblin unless it was detached.
#[pyclass(frozen, module = "pf._native")]
#[derive(Debug)]
pub(crate) struct NativeGoblin {
    pid: i32,
    killer: Killer,
    goblin: Mutex<Option<Goblin>>,
}

impl NativeGoblin {
    fn new(goblin: Goblin) -> NativeGoblin {
        NativeGoblin {
            pid: goblin.pid(),
            killer: goblin.killer(),
            goblin: Mutex::new(Some(goblin)),
        }
    }

    /// Run `f` on the goblin, under its lock (a poisoned lock is still the same goblin).
    fn with<T>(&self, f: impl FnOnce(&mut Goblin) -> PyResult<T>) -> PyResult<T> {
        let mut guard = self
            .goblin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match guard.as_mut() {
            Some(goblin) => f(goblin),
            None => Err(errors::invalid(format!(
                "goblin {} was detached: pf no longer manages it",
                self.pid
            ))),
        }
    }
}

#[pymethods]
impl NativeGoblin {
    /// The goblin's pid as seen from here (a thawed copy has another one inside its own pid
    /// namespace).
    #[getter]
    fn pid(&self) -> i32 {
        self.pid
    }

    /// Our ends of the goblin's stdin, stdout and stderr as raw descriptors (each `None` when
    /// there is none, e.g. stderr shared with stdout), handed over once: the caller owns them.
    fn take_fds(&self) -> PyResult<(Option<i32>, Option<i32>, Option<i32>)> {
        self.with(|g| {
            let raw = |fd: Option<OwnedFd>| fd.map(IntoRawFd::into_raw_fd);
            Ok((
                raw(g.stdin.take().map(OwnedFd::from)),
                raw(g.stdout.take().map(OwnedFd::from)),
                raw(g.stderr.take().map(OwnedFd::from)),
            ))
        })
    }

    /// Wait for the goblin to exit and reap it; its returncode (minus the signal if killed).
    /// With `timeout` (seconds), raise `pf.errors.Timeout` if it is still running by then.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<i32> {
        let deadline = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(errors::invalid(format!(
                    "timeout must be a number of seconds >= 0, not {t}"
                )));
            }
        };
        let pid = self.pid;
        py.detach(|| {
            self.with(|g| match deadline {
                None => g.wait().map(returncode).map_err(errors::from_goblin),
                Some(deadline) => {
                    let mut nap = Duration::from_millis(1);
                    loop {
                        if let Some(s) = g.try_wait().map_err(errors::from_goblin)? {
                            return Ok(returncode(s));
                        }
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(errors::timeout(format!(
                                "goblin {pid} still runs after {:.3} s",
                                timeout.unwrap_or_default()
                            )));
                        }
                        std::thread::sleep(nap.min(deadline - now));
                        nap = (nap * 2).min(Duration::from_millis(20));
                    }
                }
            })
        })
    }

    /// The returncode if the goblin has exited (reaping it), else `None`. Never blocks: while
    /// another thread waits for the goblin, it is running as far as this call knows.
    fn poll(&self) -> PyResult<Option<i32>> {
        let mut guard = match self.goblin.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        match guard.as_mut() {
            Some(g) => g
                .try_wait()
                .map(|s| s.map(returncode))
                .map_err(errors::from_goblin),
            None => Ok(None),
        }
    }

    /// Send `signal` to the goblin's main process (an exited goblin is not an error).
    fn send_signal(&self, signal: i32) -> PyResult<()> {
        self.killer.signal(signal).map_err(errors::from_goblin)
    }

    /// SIGKILL the goblin (its whole process group, or its pid namespace when thawed), reap it
    /// and return its returncode. Killing an exited goblin is not an error.
    fn kill(&self, py: Python<'_>) -> PyResult<i32> {
        // The killer needs no lock, so this ends a `wait` blocked in another thread.
        self.killer.kill().map_err(errors::from_goblin)?;
        py.detach(|| self.with(|g| g.kill().map(returncode).map_err(errors::from_goblin)))
    }

    /// Leave the goblin running once pf lets go of it; nobody will reap it but init.
    fn detach(&self) {
        let goblin = self
            .goblin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(goblin) = goblin {
            goblin.detach();
        }
    }
}

/// A frozen goblin checked and ready to restore any number of times.
#[pyclass(frozen, module = "pf._native")]
#[derive(Debug)]
pub(crate) struct NativeLoaded {
    loaded: Loaded,
}

#[pymethods]
impl NativeLoaded {
    /// The digest or images directory it was loaded from.
    #[getter]
    fn name(&self) -> &str {
        self.loaded.name()
    }

    /// Restore one copy on fresh pipes.
    #[pyo3(signature = (*, new_pid_namespace=true))]
    fn thaw(&self, py: Python<'_>, new_pid_namespace: bool) -> PyResult<NativeGoblin> {
        let options = ThawOptions { new_pid_namespace };
        let goblin = py
            .detach(|| self.loaded.thaw(&options))
            .map_err(errors::from_goblin)?;
        Ok(NativeGoblin::new(goblin))
    }

    /// Restore `n` copies side by side, each in its own pid namespace: all of them, or none
    /// (and an error).
    fn fork(&self, py: Python<'_>, n: usize) -> PyResult<Vec<NativeGoblin>> {
        if n == 0 {
            return Err(errors::invalid("fork needs n >= 1".to_owned()));
        }
        let goblins = py
            .detach(|| self.loaded.fork(n))
            .map_err(errors::from_goblin)?;
        Ok(goblins.into_iter().map(NativeGoblin::new).collect())
    }
}

/// Start `argv` as a goblin: leader of its own session, stdin/stdout/stderr on fresh pipes, no
/// other descriptor open. `env` entries are added to (or replace) the inherited environment.
#[pyfunction]
#[pyo3(signature = (argv, cwd, env))]
pub(crate) fn spawn(
    py: Python<'_>,
    argv: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
) -> PyResult<NativeGoblin> {
    let options = pf_goblins::SpawnOptions { cwd, env };
    let goblin = py
        .detach(|| pf_goblins::spawn(&argv, &options))
        .map_err(errors::from_goblin)?;
    Ok(NativeGoblin::new(goblin))
}

/// Freeze the goblin `pid` into `store` (naming the snapshot `tag`, if given) or into the
/// images directory `images_dir`; return the snapshot's digest or the directory.
#[pyfunction]
#[pyo3(signature = (pid, *, store=None, images_dir=None, leave_running, tag=None, shell_job=false))]
pub(crate) fn freeze(
    py: Python<'_>,
    pid: i32,
    store: Option<PyRef<'_, Store>>,
    images_dir: Option<PathBuf>,
    leave_running: bool,
    tag: Option<String>,
    shell_job: bool,
) -> PyResult<String> {
    let options = FreezeOptions {
        leave_running,
        shell_job,
    };
    match (store, images_dir) {
        (Some(store), None) => {
            if let Some(name) = &tag {
                pf_core::validate_name(name).map_err(errors::from_core)?;
            }
            let store = std::sync::Arc::clone(&store.inner);
            py.detach(|| {
                // Held from the first blob to the name (see agent_docs/formats.md).
                let _writing =
                    pf_core::BlobStore::writer_lock(store.as_ref()).map_err(errors::from_core)?;
                let frozen = pf_goblins::freeze(pid, FreezeTarget::Store(store.as_ref()), &options)
                    .map_err(errors::from_goblin)?;
                let digest = frozen
                    .digest()
                    .cloned()
                    .ok_or_else(|| errors::invalid("freeze into a store gave no digest".into()))?;
                if let Some(name) = &tag {
                    pf_core::BlobStore::set_name(store.as_ref(), name, &digest)
                        .map_err(errors::from_core)?;
                }
                Ok(digest.to_string())
            })
        }
        (None, Some(dir)) => {
            if tag.is_some() {
                return Err(errors::invalid(
                    "tag names a snapshot in a store; an images directory has no names".into(),
                ));
            }
            py.detach(|| {
                pf_goblins::freeze(pid, FreezeTarget::Images(&dir), &options)
                    .map_err(errors::from_goblin)?;
                Ok(dir.display().to_string())
            })
        }
        _ => Err(errors::invalid(
            "give exactly one of store and images_dir".into(),
        )),
    }
}

/// Check a frozen goblin (a digest or name in `store`, or an images directory) and get it ready
/// to thaw and fork any number of times.
#[pyfunction]
#[pyo3(signature = (*, store=None, reference=None, images_dir=None))]
pub(crate) fn load(
    py: Python<'_>,
    store: Option<PyRef<'_, Store>>,
    reference: Option<String>,
    images_dir: Option<PathBuf>,
) -> PyResult<NativeLoaded> {
    let loaded = match (store, reference, images_dir) {
        (Some(store), Some(reference), None) => {
            let digest = store.resolve_ref(&reference)?;
            let store = std::sync::Arc::clone(&store.inner);
            py.detach(|| {
                pf_goblins::load(&Source::Store {
                    store: store.as_ref(),
                    digest: &digest,
                })
            })
        }
        (None, None, Some(dir)) => py.detach(|| pf_goblins::load(&Source::Images(&dir))),
        _ => {
            return Err(errors::invalid(
                "give a store and a reference, or an images directory".into(),
            ));
        }
    };
    Ok(NativeLoaded {
        loaded: loaded.map_err(errors::from_goblin)?,
    })
}
