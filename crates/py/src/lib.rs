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
mod store;

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
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
