//! `pf.Store`: pf's content-addressed store on disk, as the `pf store` commands see it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pf_core::{BlobStore as _, Digest256, FsBlobStore, GcOptions};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors;

/// A pf store: blobs named by the SHA-256 of their bytes (`sha256:<64 hex>`) and names that
/// point at them.
///
/// `Store()` is the store the `pf` command uses: `$PF_STORE`, else `$XDG_DATA_HOME/pf`, else
/// `~/.local/share/pf`; `Store(path)` is the one at `path`. Making a `Store` creates nothing, as
/// the `pf` command does: a store comes into being with its first blob (`put`, `put_file`, or a
/// freeze or warm-up into it), and reading one that is not there (`get`, `names`, `tag`, a thaw
/// from it …) raises `pf.errors.NotFound` saying there is no store at that path, so a mistyped
/// path is not taken for an empty store. Every read is verified against its digest: a corrupt
/// blob raises `pf.errors.StoreCorrupt`, never wrong bytes.
#[pyclass(frozen, module = "pf")]
#[derive(Debug)]
pub(crate) struct Store {
    root: PathBuf,
    /// The store once it is known to be there (opened by a reader that found it, or created by
    /// a writer).
    opened: OnceLock<Arc<FsBlobStore>>,
}

/// The store root the `pf` command would use without `--store`.
fn default_root() -> PyResult<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = env("PF_STORE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env("XDG_DATA_HOME") {
        return Ok(PathBuf::from(dir).join("pf"));
    }
    match env("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/pf")),
        None => Err(errors::invalid(
            "cannot find the store: pass a path, or set $PF_STORE or $HOME".to_owned(),
        )),
    }
}

impl Store {
    /// The store's root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The store if it is there (`None`: nothing at its path; nothing is created).
    fn if_there(&self) -> PyResult<Option<Arc<FsBlobStore>>> {
        if let Some(store) = self.opened.get() {
            return Ok(Some(Arc::clone(store)));
        }
        match FsBlobStore::open_existing(&self.root) {
            Ok(store) => Ok(Some(self.keep(store))),
            Err(pf_core::Error::NoStore { .. }) => Ok(None),
            Err(err) => Err(errors::from_core(err)),
        }
    }

    /// The store to read, or to change what it already holds: `NotFound` when there is none at
    /// its path (and nothing is created).
    pub(crate) fn existing(&self) -> PyResult<Arc<FsBlobStore>> {
        self.if_there()?.ok_or_else(|| {
            errors::not_found(format!(
                "there is no store at {}: nothing was ever stored there (Store.put, \
                 Store.put_file, or pf.goblins.freeze or warm_up into it create it); is the \
                 path mistyped? (Store() is the store the `pf` command uses)",
                self.root.display()
            ))
        })
    }

    /// The store to write into, created (mode 0700) when there is none at its path.
    pub(crate) fn for_writing(&self) -> PyResult<Arc<FsBlobStore>> {
        if let Some(store) = self.opened.get() {
            return Ok(Arc::clone(store));
        }
        let store = FsBlobStore::open(&self.root).map_err(errors::from_core)?;
        Ok(self.keep(store))
    }

    /// Remember the opened store (another thread may have opened it first: either will do).
    fn keep(&self, store: FsBlobStore) -> Arc<FsBlobStore> {
        Arc::clone(self.opened.get_or_init(|| Arc::new(store)))
    }

    /// The store to write into, created when missing, but not remembered: for work that removes
    /// the store it made when it fails (a pull), so that this `Store` does not go on holding one
    /// that is gone. [`keep_opened`](Self::keep_opened) it once the work succeeded.
    pub(crate) fn open_unkept(&self) -> PyResult<Arc<FsBlobStore>> {
        if let Some(store) = self.opened.get() {
            return Ok(Arc::clone(store));
        }
        FsBlobStore::open(&self.root)
            .map(Arc::new)
            .map_err(errors::from_core)
    }

    /// Remember a store [`open_unkept`](Self::open_unkept) gave.
    pub(crate) fn keep_opened(&self, store: &Arc<FsBlobStore>) {
        let _ = self.opened.set(Arc::clone(store));
    }

    /// A digest, a unique prefix of one, or a name, resolved in the store (which must be there;
    /// see `pf_core::BlobStore::resolve`).
    pub(crate) fn resolve_ref(&self, reference: &str) -> PyResult<Digest256> {
        self.existing()?
            .resolve(reference)
            .map_err(errors::from_core)
    }
}

#[pymethods]
impl Store {
    #[new]
    #[pyo3(signature = (path=None))]
    fn new(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Store> {
        let root = match path {
            Some(p) => p,
            None => default_root()?,
        };
        let store = Store {
            root,
            opened: OnceLock::new(),
        };
        // A store that is there is checked now (one of another user's is refused at once); one
        // that is not is left to its first writer.
        match py.detach(|| FsBlobStore::open_existing(&store.root)) {
            Ok(opened) => {
                store.keep(opened);
            }
            Err(pf_core::Error::NoStore { .. }) => {}
            Err(err) => return Err(errors::from_core(err)),
        }
        Ok(store)
    }

    /// A store pickles as its path (for process pools): unpickled, it is the store at that
    /// path, checked again then.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, pyo3::types::PyType>, (PathBuf,))> {
        Ok((slf.get_type(), (slf.get().root.clone(),)))
    }

    /// The store's root directory (whether or not there is a store there yet).
    #[getter]
    fn path(&self) -> PathBuf {
        self.root.clone()
    }

    /// Whether there is a store at `path` (one was created by a write, here or by the `pf`
    /// command).
    #[getter]
    fn exists(&self) -> PyResult<bool> {
        Ok(self.if_there()?.is_some())
    }

    /// Store `data` and return its digest (`sha256:…`). Storing bytes already there is cheap.
    fn put(&self, py: Python<'_>, data: &[u8]) -> PyResult<String> {
        let data = data.to_vec();
        let store = self.for_writing()?;
        let digest = py.detach(|| store.put(&data)).map_err(errors::from_core)?;
        Ok(digest.to_string())
    }

    /// Store the file at `path`, streaming (memory stays flat whatever its size); return its
    /// digest.
    fn put_file(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        // The file is opened first, so that a missing file creates no store.
        let mut file = std::fs::File::open(&path).map_err(|source| {
            errors::from_core(pf_core::Error::Io {
                op: "open",
                path: path.clone(),
                source,
            })
        })?;
        let store = self.for_writing()?;
        let put = py.detach(|| store.put_reader(&mut file));
        Ok(put.map_err(errors::from_core)?.digest.to_string())
    }

    /// The bytes of the blob a digest or name refers to, verified.
    fn get<'py>(&self, py: Python<'py>, reference: &str) -> PyResult<Bound<'py, PyBytes>> {
        let store = self.existing()?;
        let digest = self.resolve_ref(reference)?;
        let bytes = py
            .detach(|| store.get(&digest))
            .map_err(errors::from_core)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Whether the store holds the blob a digest refers to (a name must exist to be resolved, a
    /// prefix of a digest must be the start of one blob's only).
    fn contains(&self, reference: &str) -> PyResult<bool> {
        let store = self.existing()?;
        match store.resolve(reference) {
            Ok(digest) => store.contains(&digest).map_err(errors::from_core),
            Err(pf_core::Error::NameNotFound { .. } | pf_core::Error::PrefixNotFound { .. }) => {
                Ok(false)
            }
            Err(err) => Err(errors::from_core(err)),
        }
    }

    /// The digest a reference stands for: a name, a digest (`sha256:` and 64 hex digits, or the
    /// digits alone), or a unique prefix of one in the store (`sha256:` and at least 4 hex
    /// digits, or at least 8 alone; a name spelled so wins). An unknown name or prefix raises
    /// `NotFound`; a prefix several blobs start with raises `InvalidArgument` naming them.
    fn resolve(&self, reference: &str) -> PyResult<String> {
        Ok(self.resolve_ref(reference)?.to_string())
    }

    /// Point `name` at the blob `target` (a digest or another name) refers to. The blob must be
    /// in the store, so the store must be there: tagging never creates one.
    fn tag(&self, name: &str, target: &str) -> PyResult<()> {
        let store = self.existing()?;
        let digest = self.resolve_ref(target)?;
        store.set_name(name, &digest).map_err(errors::from_core)
    }

    /// Remove `name`; the blob stays until `gc`. Returns whether the name existed.
    fn untag(&self, name: &str) -> PyResult<bool> {
        self.existing()?
            .remove_name(name)
            .map_err(errors::from_core)
    }

    /// Every name and the digest it points at.
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let names = self.existing()?.names().map_err(errors::from_core)?;
        let dict = PyDict::new(py);
        for (name, digest) in names {
            dict.set_item(name, digest.to_string())?;
        }
        Ok(dict)
    }

    /// Every blob's digest, sorted.
    fn blobs(&self) -> PyResult<Vec<String>> {
        let mut list = self.existing()?.list().map_err(errors::from_core)?;
        list.sort();
        Ok(list.iter().map(ToString::to_string).collect())
    }

    /// Remove the blobs no name reaches (a snapshot's name keeps its images). Blobs stored less
    /// than `grace` seconds ago are kept, so a freeze running right now keeps its images.
    /// Returns `{"removed": [digests], "freed_bytes": n, "kept": n, "missing": [digests]}`.
    #[pyo3(signature = (*, grace=3600.0, dry_run=false))]
    fn gc<'py>(&self, py: Python<'py>, grace: f64, dry_run: bool) -> PyResult<Bound<'py, PyDict>> {
        if !grace.is_finite() || grace < 0.0 {
            return Err(errors::invalid(format!(
                "grace must be a number of seconds >= 0, not {grace}"
            )));
        }
        let options = GcOptions {
            dry_run,
            grace: Duration::from_secs_f64(grace),
        };
        let store = self.existing()?;
        let report = py
            .detach(|| pf_core::gc(store.as_ref(), &options))
            .map_err(errors::from_core)?;
        let dict = PyDict::new(py);
        let removed: Vec<String> = report
            .removed
            .iter()
            .map(|b| b.digest.to_string())
            .collect();
        dict.set_item("removed", removed)?;
        dict.set_item("freed_bytes", report.freed_bytes())?;
        dict.set_item("kept", report.reachable.len())?;
        let missing: Vec<String> = report.missing.iter().map(ToString::to_string).collect();
        dict.set_item("missing", missing)?;
        dict.set_item("dry_run", dry_run)?;
        Ok(dict)
    }

    /// Re-read every blob (or the one `reference` names) and check it against its digest.
    /// Returns `{digest: problem}` for each bad blob; empty when all are sound.
    #[pyo3(signature = (reference=None))]
    fn verify<'py>(
        &self,
        py: Python<'py>,
        reference: Option<&str>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let store = self.existing()?;
        let digests = match reference {
            Some(r) => vec![self.resolve_ref(r)?],
            None => store.list().map_err(errors::from_core)?,
        };
        let bad = py.detach(|| {
            let mut bad = Vec::new();
            for digest in digests {
                if let Err(err) = store.copy_to(&digest, &mut std::io::sink()) {
                    bad.push((digest.to_string(), err.to_string()));
                }
            }
            bad
        });
        let dict = PyDict::new(py);
        for (digest, why) in bad {
            dict.set_item(digest, why)?;
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!("pf.Store({:?})", display(&self.root))
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
