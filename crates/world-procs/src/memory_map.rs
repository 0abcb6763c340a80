//! Where the pages of a `procs.criu.v2` snapshot sit in its process's memory, for tools that
//! name a page by address (`pf store verify`): the pagemaps of the snapshot's images, read
//! without rebuilding its pages files.

use std::collections::HashMap;

use pf_core::BlobStore;

use crate::error::{Error, Result};
use crate::images::Pagemap;
use crate::wire::CriuProcs;

/// The pagemap of every pages file of `procs`'s images, by the pages file's name
/// (`pages-<N>.img`). Extracts the images tar (never the pages) into a private scratch
/// directory that is removed before returning.
pub fn pagemaps_of(store: &dyn BlobStore, procs: &CriuProcs) -> Result<HashMap<String, Pagemap>> {
    let digest = &procs.criu_dump;
    let source = store
        .open(digest)
        .map_err(|e| Error::store(format!("opening the images {digest}"), e))?;
    let dir = crate::capture::scratch_dir("pf-pagemaps-")?;
    crate::tarball::extract(source, digest, dir.path())?;
    crate::v2::pagemaps(dir.path())
}
