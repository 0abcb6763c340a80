//! `pf.Store`: pf's content-addressed store on disk, as the `pf store` commands see it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pf_core::{BlobStore as _, Digest256, FsBlobStore, GcOptions};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors;

/// A pf store: blobs named by the SHA-256 of their bytes (`sha256:<64 hex>`) and names that
/// point at them.
///
/// `Store()` opens the store the `pf` command uses: `$PF_STORE`, else `$XDG_DATA_HOME/pf`, else
/// `~/.local/share/pf`; `Store(path)` opens (creating) the one at `path`. Every read is verified
/// against its digest: a corrupt blob raises `pf.errors.StoreCorrupt`, never wrong bytes.
#[pyclass(frozen, module = "pf")]
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) inner: Arc<FsBlobStore>,
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
    /// A digest or a name, resolved.
    pub(crate) fn resolve_ref(&self, reference: &str) -> PyResult<Digest256> {
        self.inner.resolve(reference).map_err(errors::from_core)
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
        let store = py
            .detach(|| FsBlobStore::open(&root))
            .map_err(errors::from_core)?;
        Ok(Store {
            inner: Arc::new(store),
        })
    }

    /// The store's root directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.root().to_path_buf()
    }

    /// Store `data` and return its digest (`sha256:…`). Storing bytes already there is cheap.
    fn put(&self, py: Python<'_>, data: &[u8]) -> PyResult<String> {
        let data = data.to_vec();
        let digest = py
            .detach(|| self.inner.put(&data))
            .map_err(errors::from_core)?;
        Ok(digest.to_string())
    }

    /// Store the file at `path`, streaming (memory stays flat whatever its size); return its
    /// digest.
    fn put_file(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        let put = py.detach(|| -> Result<_, pf_core::Error> {
            let mut file = std::fs::File::open(&path).map_err(|source| pf_core::Error::Io {
                op: "open",
                path: path.clone(),
                source,
            })?;
            self.inner.put_reader(&mut file)
        });
        Ok(put.map_err(errors::from_core)?.digest.to_string())
    }

    /// The bytes of the blob a digest or name refers to, verified.
    fn get<'py>(&self, py: Python<'py>, reference: &str) -> PyResult<Bound<'py, PyBytes>> {
        let digest = self.resolve_ref(reference)?;
        let bytes = py
            .detach(|| self.inner.get(&digest))
            .map_err(errors::from_core)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Whether the store holds the blob a digest refers to (a name must exist to be resolved).
    fn contains(&self, reference: &str) -> PyResult<bool> {
        match self.inner.resolve(reference) {
            Ok(digest) => self.inner.contains(&digest).map_err(errors::from_core),
            Err(pf_core::Error::NameNotFound { .. }) => Ok(false),
            Err(err) => Err(errors::from_core(err)),
        }
    }

    /// The digest a name (or a digest) refers to.
    fn resolve(&self, reference: &str) -> PyResult<String> {
        Ok(self.resolve_ref(reference)?.to_string())
    }

    /// Point `name` at the blob `target` (a digest or another name) refers to.
    fn tag(&self, name: &str, target: &str) -> PyResult<()> {
        let digest = self.resolve_ref(target)?;
        self.inner
            .set_name(name, &digest)
            .map_err(errors::from_core)
    }

    /// Remove `name`; the blob stays until `gc`. Returns whether the name existed.
    fn untag(&self, name: &str) -> PyResult<bool> {
        self.inner.remove_name(name).map_err(errors::from_core)
    }

    /// Every name and the digest it points at.
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let names = self.inner.names().map_err(errors::from_core)?;
        let dict = PyDict::new(py);
        for (name, digest) in names {
            dict.set_item(name, digest.to_string())?;
        }
        Ok(dict)
    }

    /// Every blob's digest, sorted.
    fn blobs(&self) -> PyResult<Vec<String>> {
        let mut list = self.inner.list().map_err(errors::from_core)?;
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
        let report = py
            .detach(|| pf_core::gc(self.inner.as_ref(), &options))
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
        let digests = match reference {
            Some(r) => vec![self.resolve_ref(r)?],
            None => self.inner.list().map_err(errors::from_core)?,
        };
        let bad = py.detach(|| {
            let mut bad = Vec::new();
            for digest in digests {
                if let Err(err) = self.inner.copy_to(&digest, &mut std::io::sink()) {
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
        format!("pf.Store({:?})", display(self.inner.root()))
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
