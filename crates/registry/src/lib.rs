//! pf-registry: move a snapshot's blob graph to and from any OCI distribution registry.
//!
//! A snapshot is a root blob (a procs record) and every blob it reaches through `sha256:` strings
//! in JSON blobs, exactly what [`pf_core::gc`] keeps (walked with [`pf_core::references`]). It
//! travels as one OCI image manifest: the root as its config, every other reachable blob as a
//! layer, each uploaded as its raw bytes so the registry names it by the same digest as the store
//! (see `agent_docs/formats.md`). [`push`] uploads only the blobs the registry lacks; [`pull`]
//! fetches only the blobs the store lacks, verifies every byte against its digest before it
//! enters the store, and names the snapshot last.
//!
//! The protocol (the distribution spec's `/v2/` API, its basic and bearer-token auth) is spoken
//! here over `ureq`, a small blocking HTTP client; see `docs/architecture.md` for why.

mod auth;
mod client;
mod error;
mod manifest;
mod pull;
mod push;
mod reference;
mod resume;
#[doc(hidden)]
pub mod test_support;

pub use crate::error::{Error, ErrorKind, Result};
pub use crate::manifest::{
    ARTIFACT_TYPE, BLOB_MEDIA_TYPE, CONFIG_MEDIA_TYPE, JSON_BLOB_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
};
pub use crate::pull::{PullOptions, PullReport, pull};
pub use crate::push::{PushOptions, PushReport, push};
pub use crate::reference::Reference;

use pf_core::Digest256;

/// How to reach a registry: options shared by [`push`] and [`pull`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Speak plain http to a registry that is not on a loopback address (a loopback registry is
    /// always spoken to in plain http). Without it every other registry is https, verified
    /// against the system's root certificates.
    pub insecure: bool,
    /// The docker config file to read credentials from (the credential helper
    /// `credHelpers.<host>` or `credsStore` names, else `auths.<host>.auth`, as docker reads
    /// them); `None` for anonymous access. [`default_docker_config`] gives docker's own choice.
    pub docker_config: Option<std::path::PathBuf>,
    /// How many blobs move at once.
    pub parallel: usize,
    /// How long a connection may move no byte, either way, before the transfer is given up
    /// ([`Error::Stalled`] for a blob). A slow transfer that keeps moving never times out.
    /// [`DEFAULT_IDLE_TIMEOUT`] is pf's choice.
    pub idle_timeout: std::time::Duration,
}

/// The idle timeout `pf push` and `pf pull` use: a minute without a byte either way.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Docker's credentials file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_docker_config() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(std::path::PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| {
            std::path::PathBuf::from(home)
                .join(".docker")
                .join("config.json")
        })
}

/// What a transfer reports while it runs, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// The blobs of the snapshot are known: how many, and their raw bytes in all.
    Planned { blobs: usize, bytes: u64 },
    /// A blob the other side already holds: it does not move.
    Skipped { digest: &'a Digest256, size: u64 },
    /// More bytes of some blob went over the wire.
    Transferred { bytes: u64 },
    /// A blob arrived whole (uploaded and committed, or fetched, verified and stored).
    Moved { digest: &'a Digest256, size: u64 },
}

/// A progress callback; called from several threads at once.
pub type Progress<'a> = &'a (dyn Fn(Event<'_>) + Sync);

/// Run `job` on every item, `workers` at a time; the first error stops the rest and is returned.
pub(crate) fn parallel<T: Sync>(
    items: &[T],
    workers: usize,
    job: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = items.get(i) else { break };
                    if let Err(err) = job(item) {
                        failed.store(true, Ordering::SeqCst);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(err);
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}
