//! Pull: a snapshot from a registry into the store, fetching only what the store lacks, every
//! byte verified before it enters, the name written last.

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pf_core::pack::Pack;
use pf_core::page_index::PageLoc;
use pf_core::{BlobStore, Digest256};

use crate::client::{Access, Client};
use crate::error::{Error, Result};
use crate::manifest::{
    BLOB_MEDIA_TYPE, CONFIG_MEDIA_TYPE, Descriptor, FORWARD_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
    Manifest,
};
use crate::reference::Reference;
use crate::{ConnectOptions, Event, Progress, parallel};

/// How [`pull`] runs.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// How to reach the registry.
    pub connect: ConnectOptions,
    /// The name to give the snapshot in the store, written once every blob is in.
    pub name: Option<String>,
    /// Set to cancel the pull (say on Ctrl-C): it stops at its next read or blob, removes what
    /// it stored, and fails with [`Error::Cancelled`]. A read the registry leaves waiting ends
    /// at the idle timeout.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// What [`pull`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The snapshot's root blob (the manifest's config).
    pub snapshot: Digest256,
    /// The name written, if any.
    pub name: Option<String>,
    /// Blobs in the snapshot (the root included).
    pub blobs: usize,
    /// Blobs fetched.
    pub fetched: usize,
    /// Blobs the store already had.
    pub skipped: usize,
    /// Raw bytes of every blob of the snapshot.
    pub bytes_total: u64,
    /// Raw bytes fetched.
    pub bytes_fetched: u64,
    /// Pages of the fetched page packs added to the store's page index (so a later freeze
    /// into this store stores none of them again).
    pub pages_indexed: usize,
}

/// Pull the snapshot `reference` tags into `store`. Blobs the store holds are not fetched; each
/// fetched blob is verified against its digest as it is stored, and a blob whose bytes do not
/// match is refused. Only when every blob the root reaches is in the store is the name written;
/// on any failure the blobs this pull stored are removed again, so nothing of it stays.
pub fn pull(
    store: &dyn BlobStore,
    reference: &Reference,
    options: &PullOptions,
    progress: Progress<'_>,
) -> Result<PullReport> {
    let _span = tracing::info_span!("pull", %reference).entered();
    if let Some(name) = &options.name {
        pf_core::validate_name(name)?;
    }
    let client = Client::connect(reference, &options.connect, Access::Pull)?;
    let (bytes, content_type) = client.get_manifest(reference.tag())?;
    let manifest = parse_manifest(reference, &bytes, content_type.as_deref())?;
    let root = manifest.config.digest;
    let mut blobs: Vec<Descriptor> = vec![manifest.config.clone()];
    let mut listed = BTreeSet::from([root]);
    for layer in &manifest.layers {
        if listed.insert(layer.digest) {
            blobs.push(layer.clone());
        }
    }
    let bytes_total = blobs.iter().map(|b| b.size).sum();
    progress(Event::Planned {
        blobs: blobs.len(),
        bytes: bytes_total,
    });

    // Held from the first blob stored until the name is written, so a concurrent gc never takes
    // a blob of this pull before its name keeps it.
    let writing = store.writer_lock()?;
    let added = Mutex::new(Vec::new());
    let pages = Mutex::new(Vec::new());
    let fetched = AtomicUsize::new(0);
    let bytes_fetched = AtomicU64::new(0);
    let forwards = Mutex::new(Vec::new());
    let mut forwards_added = Vec::new();
    // Forward records this store already has, by the digest of their bytes (what the manifest
    // names them by): a pull again of a repacked snapshot fetches none of them again.
    let forwards_here: BTreeSet<Digest256> =
        if blobs.iter().any(|b| b.media_type == FORWARD_MEDIA_TYPE) {
            store
                .forwards()?
                .iter()
                .map(|f| Digest256::of(&f.to_bytes()))
                .collect()
        } else {
            BTreeSet::new()
        };
    let cancelled = || {
        options
            .cancel
            .as_deref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    };
    let cancel_error = || Error::Cancelled {
        reference: reference.to_string(),
    };
    let outcome = parallel(&blobs, options.connect.parallel, |blob| {
        if cancelled() {
            return Err(cancel_error());
        }
        if blob.media_type == FORWARD_MEDIA_TYPE && forwards_here.contains(&blob.digest) {
            progress(Event::Skipped {
                digest: &blob.digest,
                size: blob.size,
            });
            return Ok(());
        }
        if blob.media_type == FORWARD_MEDIA_TYPE {
            let forward = fetch_forward(&client, reference, blob)?;
            forwards
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(forward);
            fetched.fetch_add(1, Ordering::Relaxed);
            bytes_fetched.fetch_add(blob.size, Ordering::Relaxed);
            return Ok(());
        }
        if sound_copy_here(store, blob)? {
            progress(Event::Skipped {
                digest: &blob.digest,
                size: blob.size,
            });
            return Ok(());
        }
        let found = fetch(store, &client, reference, blob, progress, &cancelled)?;
        added
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(blob.digest);
        pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(found);
        fetched.fetch_add(1, Ordering::Relaxed);
        bytes_fetched.fetch_add(blob.size, Ordering::Relaxed);
        progress(Event::Moved {
            digest: &blob.digest,
            size: blob.size,
        });
        Ok(())
    })
    .and_then(|()| {
        // Forward records of packs this store lacks, now that their targets are in.
        for f in forwards.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if !store.contains(&f.pack)? && !store.forwards_of(&f.pack)?.contains(&f.to) {
                store.add_forward(f)?;
                forwards_added.push(*f);
            }
        }
        Ok(())
    })
    .and_then(|()| check_whole(store, reference, &root))
    .and_then(|()| {
        if cancelled() {
            Err(cancel_error())
        } else {
            Ok(())
        }
    })
    // A read cut short by the cancel fails as a read: say why it stopped.
    .map_err(|err| if cancelled() { cancel_error() } else { err })
    .and_then(|()| match &options.name {
        Some(name) => Ok(store.set_name(name, &root)?),
        None => Ok(()),
    });
    drop(writing);
    if let Err(err) = outcome {
        // Another writer (a second pull of the same tag, a capture) may have found one of these
        // blobs here and named a snapshot that needs it: only what no name reaches goes.
        let added = added.into_inner().unwrap_or_else(|p| p.into_inner());
        for f in &forwards_added {
            if let Err(remove) = store.remove_forward(f) {
                tracing::warn!(error = %remove, "taking back a forward record of a failed pull; gc will remove it");
            }
        }
        if let Err(remove) = pf_core::remove_unreachable(store, &added) {
            tracing::warn!(error = %remove, "taking back the blobs of a failed pull; gc will remove them");
        }
        return Err(err);
    }
    // Derived data: a pull whose pages could not be indexed is still whole (later freezes only
    // store those pages again).
    let pages = pages.into_inner().unwrap_or_else(|p| p.into_inner());
    let pages_indexed = pages.len();
    let pages_indexed = match store.page_index().add(pages) {
        Ok(()) => pages_indexed,
        Err(err) => {
            tracing::warn!(error = %err, "adding the pulled pages to the page index");
            0
        }
    };
    // So that a thaw of this snapshot frozen again writes its page lists as deltas of these.
    match pf_core::pages_report::Graph::load(store, &[root]) {
        Ok(graph) => {
            for (manifest, m) in graph.manifests() {
                pf_core::pages::remember_manifest(store, manifest, &m.packs);
            }
        }
        Err(err) => tracing::debug!(error = %err, "no manifest hints for the pulled snapshot"),
    }
    let fetched = fetched.into_inner();
    Ok(PullReport {
        snapshot: root,
        name: options.name.clone(),
        blobs: blobs.len(),
        fetched,
        skipped: blobs.len() - fetched,
        bytes_total,
        bytes_fetched: bytes_fetched.into_inner(),
        pages_indexed,
    })
}

/// Whether this store already holds a sound copy of `blob`, so that the pull can skip it: of
/// the size the manifest gives and, unless the store keeps it raw (a page pack: its every page
/// is checked whenever it is read, and by `pf store verify`), hashing to its digest (records,
/// page lists and images archives, which are small). A damaged copy is fetched again, and
/// storing the fetched bytes repairs it: pulling again is how a damaged snapshot is mended.
fn sound_copy_here(store: &dyn BlobStore, blob: &Descriptor) -> Result<bool> {
    if !store.contains(&blob.digest)? {
        return Ok(false);
    }
    let size = store.raw_size(&blob.digest);
    let damage = match size {
        Ok(size) if size != blob.size => Some(format!(
            "{size} bytes where the manifest says {}",
            blob.size
        )),
        Ok(_) if store.seekable(&blob.digest)? => None,
        Ok(_) => match store.copy_to(&blob.digest, &mut std::io::sink()) {
            Ok(_) => None,
            Err(err) if is_damage(&err) => Some(err.to_string()),
            Err(err) => return Err(err.into()),
        },
        Err(err) if is_damage(&err) => Some(err.to_string()),
        Err(err) => return Err(err.into()),
    };
    if let Some(damage) = &damage {
        tracing::warn!(digest = %blob.digest, %damage, "the copy here is damaged: fetching it again");
    }
    Ok(damage.is_none())
}

/// Whether a store error says a blob's bytes are bad (rather than that the store cannot be read).
fn is_damage(err: &pf_core::Error) -> bool {
    matches!(
        err,
        pf_core::Error::Integrity { .. } | pf_core::Error::Decode { .. }
    )
}

/// The most raw bytes a page pack can have (2048 pages of 4 KiB, compressed frames that may
/// grow a little, and its index): larger blobs are not tried as packs.
const PACK_LIMIT: u64 = 2 * (pf_core::pack::PACK_PAGES * pf_core::pack::PAGE_SIZE) as u64;

/// Store a fetched leaf blob whose bytes were checked against its digest: a page pack (it
/// parses as pf-core's pack format) as it is, with [`BlobStore::put_raw`], as a local freeze
/// stores it, so that thaws read its frames with one positional read each
/// ([`BlobStore::seekable`]); anything else with [`BlobStore::put`]. Returns the pack's pages
/// for the store's page index when its every page hashes to the digest its index gives (a later
/// freeze would refer to these pages without reading them); none for a pack that lies, which is
/// still stored (every reader of a pack checks each page against a page list of its own).
fn store_leaf(
    store: &dyn BlobStore,
    digest: &Digest256,
    bytes: &[u8],
) -> Result<Vec<(Digest256, PageLoc)>> {
    let Ok(pack) = Pack::parse(*digest, bytes) else {
        store.put(bytes)?;
        return Ok(Vec::new());
    };
    store.put_raw(bytes)?;
    if let Err(err) = pack.verify() {
        tracing::warn!(%digest, error = %err, "a pulled pack does not hold the pages its index names; not indexed");
        return Ok(Vec::new());
    }
    Ok(pack
        .entries()
        .map(|(page, slot)| {
            (
                page,
                PageLoc {
                    pack: *digest,
                    slot,
                },
            )
        })
        .collect())
}

/// Parse a manifest and check that it is a pf snapshot's.
fn parse_manifest(
    reference: &Reference,
    bytes: &[u8],
    content_type: Option<&str>,
) -> Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|err| Error::BadManifest {
        reference: reference.to_string(),
        reason: err.to_string(),
    })?;
    let media_type = manifest
        .media_type
        .as_deref()
        .or(content_type)
        .unwrap_or("");
    if media_type != MANIFEST_MEDIA_TYPE {
        return Err(Error::NotASnapshot {
            reference: reference.to_string(),
            what: "manifest media type",
            found: media_type.to_owned(),
            expected: MANIFEST_MEDIA_TYPE,
        });
    }
    if manifest.config.media_type != CONFIG_MEDIA_TYPE {
        return Err(Error::NotASnapshot {
            reference: reference.to_string(),
            what: "config media type",
            found: manifest.config.media_type.clone(),
            expected: CONFIG_MEDIA_TYPE,
        });
    }
    Ok(manifest)
}

/// Fetch one blob into the store, verified against its digest and size before the store takes
/// it. A leaf blob small enough to be a page pack is read into memory, checked, and stored as
/// [`store_leaf`] says (its pages returned for the page index); any other blob streams into the
/// store through [`BlobStore::put_reader_expecting`].
fn fetch(
    store: &dyn BlobStore,
    client: &Client,
    reference: &Reference,
    blob: &Descriptor,
    progress: Progress<'_>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<(Digest256, PageLoc)>> {
    let (reader, url) = client.get_blob(&blob.digest)?;
    let mut counting = Counting {
        inner: reader,
        progress,
        cancelled,
    };
    let body_error = |source| Error::BodyRead {
        digest: blob.digest,
        url: url.clone(),
        source,
    };
    let length_error = |actual: u64| {
        body_error(std::io::Error::other(format!(
            "the registry sent {actual} bytes where the manifest says {}",
            blob.size
        )))
    };
    if blob.media_type == BLOB_MEDIA_TYPE && blob.size <= PACK_LIMIT {
        let mut bytes = Vec::with_capacity(blob.size as usize);
        (&mut counting)
            .take(blob.size + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| client.stalled(body_error(source), &blob.digest, "downloading"))?;
        if bytes.len() as u64 != blob.size {
            return Err(length_error(bytes.len() as u64));
        }
        let actual = Digest256::of(&bytes);
        if actual != blob.digest {
            return Err(Error::Tampered {
                reference: reference.to_string(),
                digest: blob.digest,
                actual,
            });
        }
        return store_leaf(store, &blob.digest, &bytes);
    }
    match store.put_reader_expecting(&mut counting, blob.size, &blob.digest) {
        Ok(_) => Ok(Vec::new()),
        Err(pf_core::Error::Integrity { digest, actual, .. }) => Err(Error::Tampered {
            reference: reference.to_string(),
            digest,
            actual,
        }),
        Err(pf_core::Error::InputLength { actual, .. }) => Err(length_error(actual)),
        Err(pf_core::Error::Input { source }) => {
            Err(client.stalled(body_error(source), &blob.digest, "downloading"))
        }
        Err(other) => Err(other.into()),
    }
}

/// Fetch a forward record layer into memory (a few hundred bytes), verified against its digest.
fn fetch_forward(
    client: &Client,
    reference: &Reference,
    blob: &Descriptor,
) -> Result<pf_core::forward::Forward> {
    let refuse = || Error::BadManifest {
        reference: reference.to_string(),
        reason: format!(
            "layer {} claims to be a forward record but is not one",
            blob.digest
        ),
    };
    if blob.size > 4096 {
        return Err(refuse());
    }
    let (reader, url) = client.get_blob(&blob.digest)?;
    let mut bytes = Vec::new();
    reader
        .take(4097)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::BodyRead {
            digest: blob.digest,
            url,
            source,
        })?;
    let actual = Digest256::of(&bytes);
    if actual != blob.digest {
        return Err(Error::Tampered {
            reference: reference.to_string(),
            digest: blob.digest,
            actual,
        });
    }
    pf_core::forward::Forward::parse(&bytes).ok_or_else(refuse)
}

/// Every blob the root reaches is in the store (the manifest left none out), packs gone but
/// forwarded standing for the packs their records lead to.
fn check_whole(store: &dyn BlobStore, reference: &Reference, root: &Digest256) -> Result<()> {
    let mut seen = BTreeSet::from([*root]);
    let mut queue = VecDeque::from([*root]);
    while let Some(digest) = queue.pop_front() {
        if !store.contains(&digest)? {
            let targets = store.forwards_of(&digest)?;
            if targets.is_empty() {
                return Err(Error::Incomplete {
                    reference: reference.to_string(),
                    missing: digest,
                });
            }
            for to in targets {
                if seen.insert(to) {
                    queue.push_back(to);
                }
            }
            continue;
        }
        for child in pf_core::references(store, &digest)? {
            if seen.insert(child) {
                queue.push_back(child);
            }
        }
    }
    Ok(())
}

/// A reader that reports the bytes it yields, and fails once the pull is cancelled.
struct Counting<'a, R> {
    inner: R,
    progress: Progress<'a>,
    cancelled: &'a dyn Fn() -> bool,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.cancelled)() {
            return Err(std::io::Error::other("the pull was cancelled"));
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            (self.progress)(Event::Transferred { bytes: n as u64 });
        }
        Ok(n)
    }
}
