//! `pf._native`: the engine of the `pf` Python package (python/), a thin binding over pf-core and
//! pf-goblins.
//!
//! Everything here converts between Python and Rust values and releases the GIL around the work;
//! the logic (the store, CRIU, goblins) is the Rust crates'. The Python side (python/pf/) adds file
//! objects on the goblins' pipes, asyncio streams and the exception classes this module raises
//! (`pf.errors`, looked up by name when an error is raised).

use pyo3::prelude::*;

mod errors;
mod goblins;
mod registry;
mod store;

/// Run `work` on a thread of its own with the GIL released, while this thread watches for
/// Python signals: the first exception a signal handler raises (Ctrl-C's KeyboardInterrupt)
/// calls `interrupt` (which tells the work to stop) and is kept while the work winds down. Work
/// that failed after the interrupt raises the interrupt; work that still completes returns its
/// result, unless `always_raise` (the interrupt is raised then too: the work's effect stands);
/// any other failure is `error`'s exception.
pub(crate) fn interruptible<T: Send, E: Send>(
    py: Python<'_>,
    interrupt: impl Fn() + Sync,
    always_raise: bool,
    work: impl FnOnce() -> Result<T, E> + Send,
    error: impl FnOnce(E) -> PyErr,
) -> PyResult<T> {
    let (result, interrupted) = py.detach(|| {
        std::thread::scope(|scope| {
            let worker = scope.spawn(work);
            let mut interrupted = None;
            while !worker.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(20));
                if interrupted.is_none()
                    && let Err(err) = Python::attach(|py| py.check_signals())
                {
                    interrupt();
                    interrupted = Some(err);
                }
            }
            (worker.join(), interrupted)
        })
    });
    match (result, interrupted) {
        (Ok(Ok(_)), Some(interrupt)) if always_raise => Err(interrupt),
        (Ok(Ok(done)), _) => Ok(done),
        (Ok(Err(_)), Some(interrupt)) => Err(interrupt),
        (Ok(Err(err)), None) => Err(error(err)),
        (Err(panic), _) => std::panic::resume_unwind(panic),
    }
}

/// The native half of the `pf` package. Import `pf`, not this module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::Store>()?;
    m.add_class::<goblins::NativeGoblin>()?;
    m.add_class::<goblins::NativeLoaded>()?;
    m.add_function(wrap_pyfunction!(goblins::spawn, m)?)?;
    m.add_function(wrap_pyfunction!(goblins::freeze, m)?)?;
    m.add_function(wrap_pyfunction!(goblins::load, m)?)?;
    m.add_class::<goblins::PyCancel>()?;
    m.add_function(wrap_pyfunction!(goblins::warm_up, m)?)?;
    m.add_function(wrap_pyfunction!(goblins::fork_and_collect, m)?)?;
    m.add_function(wrap_pyfunction!(registry::push, m)?)?;
    m.add_function(wrap_pyfunction!(registry::pull, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
