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

use pf_goblins::{
    Cancel, FreezeOptions, FreezeTarget, Goblin, Killer, Loaded, Source, ThawOptions,
};
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
            None => Err(self.let_go()),
        }
    }

    /// The error of a handle that let go of its goblin.
    fn let_go(&self) -> PyErr {
        errors::invalid(format!(
            "goblin {} was detached (or handed to warm_up): pf no longer manages it here",
            self.pid
        ))
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
        // Waited in slices, with Python's signal handlers run between them: Ctrl-C ends a
        // wait for a goblin that never exits (as it does `subprocess.Popen.wait`).
        const SLICE: Duration = Duration::from_millis(50);
        loop {
            let slice = deadline.map_or(SLICE, |d| {
                d.saturating_duration_since(Instant::now()).min(SLICE)
            });
            let status =
                py.detach(|| self.with(|g| g.wait_timeout(slice).map_err(errors::from_goblin)))?;
            if let Some(status) = status {
                return Ok(returncode(status));
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(errors::timeout(format!(
                    "goblin {} still runs after {:.3} s",
                    self.pid,
                    timeout.unwrap_or_default()
                )));
            }
        }
    }

    /// The returncode if the goblin has exited (reaping it), else `None`. Never blocks: while
    /// another thread waits for the goblin, it is running as far as this call knows. A goblin
    /// let go of (detached, or handed to warm_up) is `InvalidArgument`, as for `wait`.
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
            None => Err(self.let_go()),
        }
    }

    /// Send `signal` to the goblin's main process (an exited goblin is not an error).
    fn send_signal(&self, signal: i32) -> PyResult<()> {
        self.killer.signal(signal).map_err(|err| match &err {
            // EINVAL: no such signal, a bad argument rather than a failure of the goblin.
            pf_goblins::Error::Sys { source, .. }
                if source.kind() == std::io::ErrorKind::InvalidInput =>
            {
                errors::invalid(format!("{signal} is not a signal number"))
            }
            _ => errors::from_goblin(err),
        })
    }

    /// SIGKILL the goblin (its whole process group, or its pid namespace when thawed), reap it
    /// and return its returncode. Killing an exited goblin is not an error.
    fn kill(&self, py: Python<'_>) -> PyResult<i32> {
        // A goblin let go of (detached, or handed to warm_up) is not killed through this handle.
        if let Ok(guard) = self.goblin.try_lock()
            && guard.is_none()
        {
            return Err(self.let_go());
        }
        // The killer needs no lock, so this ends a `wait` blocked in another thread.
        self.killer.kill().map_err(errors::from_goblin)?;
        py.detach(|| self.with(|g| g.kill().map(returncode).map_err(errors::from_goblin)))
    }

    /// For a goblin thawed lazily: wait until every page of its memory is in (True), at most
    /// `timeout` seconds (False when it ran out). Raises if serving failed (the goblin was
    /// killed). True at once for any other goblin.
    #[pyo3(signature = (timeout=None))]
    fn wait_pages(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(errors::invalid(format!(
                    "timeout must be a number of seconds >= 0, not {t}"
                )));
            }
            t => t.map(std::time::Duration::from_secs_f64),
        };
        py.detach(|| self.with(|g| g.wait_pages(timeout).map_err(errors::from_goblin)))
    }

    /// Pages of its memory served on demand so far (0 unless thawed lazily).
    #[getter]
    fn pages_served(&self) -> PyResult<u64> {
        self.with(|g| Ok(g.pages_served()))
    }

    /// Leave the goblin running once pf lets go of it; nobody will reap it but init. (A goblin
    /// thawed lazily is let go once every page is in: this waits for that, without the GIL.)
    fn detach(&self, py: Python<'_>) {
        let goblin = self
            .goblin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(goblin) = goblin {
            py.detach(|| goblin.detach());
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

    /// Whether its thaws serve memory on demand.
    #[getter]
    fn lazy(&self) -> bool {
        self.loaded.is_lazy()
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
    fn fork(&self, py: Python<'_>, n: i64) -> PyResult<Vec<NativeGoblin>> {
        // Taken signed, so that a negative n is told the same as 0 (not an OverflowError).
        let n = match usize::try_from(n) {
            Ok(n) if n >= 1 => n,
            _ => return Err(errors::invalid(format!("fork needs n >= 1, not {n}"))),
        };
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
            // A freeze into a store that is not there yet creates it.
            let store = store.for_writing()?;
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
/// to thaw and fork any number of times; `once`: for a single thaw, whose eager restore then
/// streams the memory from the store instead of extracting it first.
#[pyfunction]
#[pyo3(signature = (*, store=None, reference=None, images_dir=None, lazy=None, once=false))]
pub(crate) fn load(
    py: Python<'_>,
    store: Option<PyRef<'_, Store>>,
    reference: Option<String>,
    images_dir: Option<PathBuf>,
    lazy: Option<bool>,
    once: bool,
) -> PyResult<NativeLoaded> {
    let loaded = match (store, reference, images_dir) {
        (Some(store), Some(reference), None) if lazy != Some(false) => {
            let digest = store.resolve_ref(&reference)?;
            let store: std::sync::Arc<dyn pf_core::BlobStore> = store.existing()?;
            if lazy == Some(true) {
                py.detach(|| pf_goblins::load_lazy(store, &digest))
            } else if once {
                py.detach(|| pf_goblins::load_auto_once(store, &digest))
            } else {
                py.detach(|| pf_goblins::load_auto(store, &digest))
            }
        }
        (None, None, Some(_)) if lazy == Some(true) => {
            return Err(errors::invalid(
                "lazy thaws serve memory from a store: give a store and a reference, not an \
                 images directory"
                    .into(),
            ));
        }
        (Some(store), Some(reference), None) if once => {
            let digest = store.resolve_ref(&reference)?;
            let store = store.existing()?;
            py.detach(|| pf_goblins::load_streamed(store, &digest))
        }
        (Some(store), Some(reference), None) => {
            let digest = store.resolve_ref(&reference)?;
            let store = store.existing()?;
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

/// A cancellation token for `warm_up` and `fork_and_collect`: call `cancel()` from any thread
/// (a Ctrl-C in the thread that waits cancels too). It stays cancelled: work given a cancelled
/// token stops at once, so each call that may be cancelled wants a token of its own.
#[pyclass(frozen, module = "pf.goblins", name = "Cancel")]
#[derive(Debug)]
pub(crate) struct PyCancel {
    inner: Cancel,
}

#[pymethods]
impl PyCancel {
    #[new]
    fn new() -> PyResult<PyCancel> {
        Ok(PyCancel {
            inner: Cancel::new().map_err(errors::from_goblin)?,
        })
    }

    /// Cancel: a warm-up still waiting stops its goblin and raises `pf.Cancelled`; clones of a
    /// fork-and-collect are killed and what they printed is returned.
    fn cancel(&self) {
        self.inner.cancel();
    }

    /// Whether it was cancelled.
    #[getter]
    fn cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}

/// Run `work` on a thread of its own with the GIL released, while this thread watches for
/// Python signals: a KeyboardInterrupt (or any exception a signal handler raises) cancels the
/// work with SIGINT and waits for it to wind down. Work that still completes (a warm-up whose
/// drain the cancel cut short, clones collected until they were killed) returns its result;
/// work that the cancel stopped raises the KeyboardInterrupt.
fn cancellable<T: Send>(
    py: Python<'_>,
    cancel: &Cancel,
    work: impl FnOnce() -> pf_goblins::Result<T> + Send,
) -> PyResult<T> {
    crate::interruptible(
        py,
        || cancel.cancel_with_signal(libc_sigint()),
        false,
        work,
        errors::from_goblin,
    )
}

/// SIGINT's number (2 on every Linux architecture).
const fn libc_sigint() -> i32 {
    2
}

/// The warm-up's result as a dict for `pf.goblins.Warmed`.
fn warmed_dict<'py>(
    py: Python<'py>,
    warmed: pf_goblins::Warmed,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let dict = pyo3::types::PyDict::new(py);
    let snapshot = match &warmed.frozen.snapshot {
        pf_goblins::Snapshot::Stored(d) => d.to_string(),
        pf_goblins::Snapshot::Images(p) => p.display().to_string(),
    };
    dict.set_item("snapshot", snapshot)?;
    dict.set_item("pid", warmed.pid)?;
    dict.set_item("warmup", warmed.warmup.as_secs_f64())?;
    dict.set_item("stdout", pyo3::types::PyBytes::new(py, &warmed.stdout))?;
    dict.set_item("stderr", pyo3::types::PyBytes::new(py, &warmed.stderr))?;
    dict.set_item("returncode", warmed.status.map(returncode))?;
    let (drain, holders) = match &warmed.drain {
        pf_goblins::Drain::Complete => ("complete", Vec::new()),
        pf_goblins::Drain::HeldOpen(h) => (
            "held_open",
            h.iter().map(|p| (p.pid, p.command.clone())).collect(),
        ),
        pf_goblins::Drain::Cancelled => ("cancelled", Vec::new()),
        pf_goblins::Drain::LeftRunning => ("left_running", Vec::new()),
    };
    dict.set_item("drain", drain)?;
    dict.set_item("held_by", holders)?;
    dict.set_item("goblin", warmed.goblin.map(NativeGoblin::new))?;
    Ok(dict)
}

/// Warm a goblin up and freeze it: start `argv` (or take `goblin`), write `input`, wait until
/// its stdout matches `ready` (a regex) or it is quiet for `quiet` seconds — at most `timeout`
/// seconds — freeze it into `store` (naming it `tag`) or `images_dir`, and drain what it
/// printed for at most `drain` seconds.
#[pyfunction]
#[pyo3(signature = (*, argv=None, goblin=None, cwd, env, store=None, images_dir=None, input, ready=None, quiet=None, timeout, leave_running, tag=None, drain, cancel=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn warm_up<'py>(
    py: Python<'py>,
    argv: Option<Vec<OsString>>,
    goblin: Option<PyRef<'_, NativeGoblin>>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    store: Option<PyRef<'_, Store>>,
    images_dir: Option<PathBuf>,
    input: Vec<u8>,
    ready: Option<String>,
    quiet: Option<f64>,
    timeout: f64,
    leave_running: bool,
    tag: Option<String>,
    drain: f64,
    cancel: Option<PyRef<'_, PyCancel>>,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let seconds = |what: &str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(errors::invalid(format!(
                "{what} must be a number of seconds >= 0, not {v}"
            )))
        }
    };
    let ready = match (ready, quiet) {
        (Some(pattern), None) => pf_goblins::Ready::Matches(pattern),
        (None, Some(q)) => pf_goblins::Ready::Quiet(seconds("quiet", q)?),
        _ => {
            return Err(errors::invalid(
                "give exactly one of ready (a regex its stdout must match) and quiet (seconds \
                 of silence)"
                    .into(),
            ));
        }
    };
    let from = match (argv, goblin) {
        (Some(command), None) => pf_goblins::WarmFrom::Command {
            command,
            spawn: pf_goblins::SpawnOptions { cwd, env },
        },
        (None, Some(g)) => {
            let taken = g
                .goblin
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .ok_or_else(|| {
                    errors::invalid(format!("goblin {} was detached or already warmed", g.pid))
                })?;
            pf_goblins::WarmFrom::Goblin(taken)
        }
        _ => {
            return Err(errors::invalid(
                "give exactly one of argv and goblin".into(),
            ));
        }
    };
    let options = pf_goblins::WarmOptions {
        input,
        ready,
        timeout: seconds("timeout", timeout)?,
        freeze: FreezeOptions {
            leave_running,
            shell_job: false,
        },
        tag,
        drain: seconds("drain", drain)?,
    };
    let cancel = match cancel {
        Some(c) => c.inner.clone(),
        None => Cancel::new().map_err(errors::from_goblin)?,
    };
    // A warm-up into a store that is not there yet creates it.
    let store = store.map(|s| s.for_writing()).transpose()?;
    let target = match (&store, &images_dir) {
        (Some(store), None) => FreezeTarget::Store(store.as_ref()),
        (None, Some(dir)) => FreezeTarget::Images(dir),
        _ => {
            return Err(errors::invalid(
                "give exactly one of store and images_dir".into(),
            ));
        }
    };
    let warmed = cancellable(py, &cancel, || {
        pf_goblins::warm_up(from, target, &options, &cancel, &mut |_, _| {})
    })?;
    warmed_dict(py, warmed)
}

/// Thaw one clone of a loaded snapshot per input, give each its input then end of input, and
/// gather each one's stdout, stderr and returncode, each within `deadline` seconds (a clone
/// still running then is killed). Returns one dict per clone, in order.
#[pyfunction]
#[pyo3(signature = (loaded, inputs, *, deadline=None, cancel=None))]
pub(crate) fn fork_and_collect<'py>(
    py: Python<'py>,
    loaded: PyRef<'_, NativeLoaded>,
    inputs: Vec<Vec<u8>>,
    deadline: Option<f64>,
    cancel: Option<PyRef<'_, PyCancel>>,
) -> PyResult<Vec<Bound<'py, pyo3::types::PyDict>>> {
    if inputs.is_empty() {
        return Err(errors::invalid(
            "fork_and_collect needs at least one input".into(),
        ));
    }
    let deadline = match deadline {
        None => None,
        Some(d) if d.is_finite() && d >= 0.0 => Some(Duration::from_secs_f64(d)),
        Some(d) => {
            return Err(errors::invalid(format!(
                "deadline must be a number of seconds >= 0, not {d}"
            )));
        }
    };
    let options = pf_goblins::CollectOptions { inputs, deadline };
    let cancel = match cancel {
        Some(c) => c.inner.clone(),
        None => Cancel::new().map_err(errors::from_goblin)?,
    };
    let source: &Loaded = &loaded.loaded;
    let collected = cancellable(py, &cancel, || {
        let goblins = source.fork(options.inputs.len())?;
        pf_goblins::collect(goblins, &options, &cancel)
    })?;
    collected
        .into_iter()
        .map(|c| {
            let dict = pyo3::types::PyDict::new(py);
            dict.set_item("clone", c.clone)?;
            dict.set_item("pid", c.pid)?;
            dict.set_item("returncode", returncode(c.status))?;
            dict.set_item("stdout", pyo3::types::PyBytes::new(py, &c.stdout))?;
            dict.set_item("stderr", pyo3::types::PyBytes::new(py, &c.stderr))?;
            dict.set_item("timed_out", c.timed_out)?;
            dict.set_item("cancelled", c.cancelled)?;
            Ok(dict)
        })
        .collect()
}
