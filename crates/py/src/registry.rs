//! `pf.registry`: a snapshot's blobs to and from an OCI registry (pf-registry), as `pf push` and
//! `pf pull` move them. The transfer runs with the GIL released on a thread of its own while
//! this one watches for Python signals: a KeyboardInterrupt cancels it (a pull takes back what
//! it stored; a push writes no tag) and is raised once it has wound down.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pf_registry::{ConnectOptions, PullOptions, PushOptions, Reference};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;
use crate::store::Store;

/// How to reach the registry, from the keyword arguments push and pull share.
fn connect(
    insecure: bool,
    docker_config: Option<PathBuf>,
    anonymous: bool,
    parallel: usize,
    idle_timeout: f64,
) -> PyResult<ConnectOptions> {
    if !(1..=64).contains(&parallel) {
        return Err(errors::invalid(format!(
            "parallel is how many blobs move at once, 1 to 64, not {parallel}"
        )));
    }
    if !(idle_timeout.is_finite() && idle_timeout > 0.0) {
        return Err(errors::invalid(format!(
            "idle_timeout is a number of seconds > 0, not {idle_timeout}"
        )));
    }
    if anonymous && docker_config.is_some() {
        return Err(errors::invalid(
            "anonymous=True uses no credentials: give it or docker_config, not both".to_owned(),
        ));
    }
    Ok(ConnectOptions {
        insecure,
        docker_config: if anonymous {
            None
        } else {
            docker_config.or_else(pf_registry::default_docker_config)
        },
        parallel,
        idle_timeout: Duration::from_secs_f64(idle_timeout),
    })
}

fn reference(text: &str) -> PyResult<Reference> {
    Reference::parse(text).map_err(errors::from_registry)
}

/// Run `work` with the GIL released; a Python signal (Ctrl-C) sets `cancel`, the work winds
/// down, and the KeyboardInterrupt is raised (also when the transfer had just finished: it
/// stands, in the store or the registry).
fn cancellable<T: Send>(
    py: Python<'_>,
    cancel: &Arc<AtomicBool>,
    work: impl FnOnce() -> pf_registry::Result<T> + Send,
) -> PyResult<T> {
    crate::interruptible(
        py,
        || cancel.store(true, Ordering::SeqCst),
        true,
        work,
        errors::from_registry,
    )
}

/// Push the snapshot `snapshot` (a digest or name in `store`) to `reference`
/// (`REGISTRY/REPOSITORY:TAG`): the blobs the registry lacks, then the manifest that tags it.
#[pyfunction]
#[pyo3(signature = (store, snapshot, reference, *, insecure=false, docker_config=None, anonymous=false, parallel=4, idle_timeout=60.0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn push<'py>(
    py: Python<'py>,
    store: &Store,
    snapshot: &str,
    reference: &str,
    insecure: bool,
    docker_config: Option<PathBuf>,
    anonymous: bool,
    parallel: usize,
    idle_timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let target = self::reference(reference)?;
    let connect = connect(insecure, docker_config, anonymous, parallel, idle_timeout)?;
    let blobs = store.existing()?;
    let root = store.resolve_ref(snapshot)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let options = PushOptions {
        connect,
        sessions: Some(store.root().join("registry").join("uploads")),
        cancel: Some(Arc::clone(&cancel)),
    };
    let started = std::time::Instant::now();
    let report = cancellable(py, &cancel, || {
        pf_registry::push(blobs.as_ref(), &root, &target, &options, &|_| {})
    })?;
    let dict = PyDict::new(py);
    dict.set_item("reference", target.to_string())?;
    dict.set_item("snapshot", report.snapshot.to_string())?;
    dict.set_item("manifest_digest", report.manifest_digest)?;
    dict.set_item("blobs", report.blobs)?;
    dict.set_item("uploaded", report.uploaded)?;
    dict.set_item("skipped", report.skipped)?;
    dict.set_item("bytes_total", report.bytes_total)?;
    dict.set_item("bytes_uploaded", report.bytes_uploaded)?;
    dict.set_item("seconds", started.elapsed().as_secs_f64())?;
    Ok(dict)
}

/// Pull the snapshot at `reference` into `store` (created if missing), naming it `tag`: the
/// blobs the store lacks, each checked against its digest before it is stored.
#[pyfunction]
#[pyo3(signature = (store, reference, *, tag=None, insecure=false, docker_config=None, anonymous=false, parallel=4, idle_timeout=60.0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pull<'py>(
    py: Python<'py>,
    store: &Store,
    reference: &str,
    tag: Option<String>,
    insecure: bool,
    docker_config: Option<PathBuf>,
    anonymous: bool,
    parallel: usize,
    idle_timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let source = self::reference(reference)?;
    let connect = connect(insecure, docker_config, anonymous, parallel, idle_timeout)?;
    if let Some(tag) = &tag {
        pf_core::validate_name(tag).map_err(errors::from_core)?;
    }
    // A pull that fails leaves nothing of itself, not even the store it would have made.
    let made = !store.root().exists();
    let cancel = Arc::new(AtomicBool::new(false));
    let options = PullOptions {
        connect,
        name: tag,
        cancel: Some(Arc::clone(&cancel)),
    };
    let started = std::time::Instant::now();
    let pulled = store.open_unkept().and_then(|blobs| {
        cancellable(py, &cancel, || {
            pf_registry::pull(blobs.as_ref(), &source, &options, &|_| {})
        })
        .inspect(|_| store.keep_opened(&blobs))
    });
    let report = match pulled {
        Ok(report) => report,
        Err(err) => {
            if made {
                pf_core::FsBlobStore::forget_if_empty(store.root());
            }
            return Err(err);
        }
    };
    let dict = PyDict::new(py);
    dict.set_item("reference", source.to_string())?;
    dict.set_item("snapshot", report.snapshot.to_string())?;
    dict.set_item("name", report.name)?;
    dict.set_item("blobs", report.blobs)?;
    dict.set_item("fetched", report.fetched)?;
    dict.set_item("skipped", report.skipped)?;
    dict.set_item("bytes_total", report.bytes_total)?;
    dict.set_item("bytes_fetched", report.bytes_fetched)?;
    dict.set_item("pages_indexed", report.pages_indexed)?;
    dict.set_item("seconds", started.elapsed().as_secs_f64())?;
    Ok(dict)
}
