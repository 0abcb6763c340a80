//! Push: a snapshot's blob graph from the store to a registry, sending only what it lacks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use pf_core::{BlobStore, Digest256};

use crate::client::{Access, Client};
use crate::error::{Error, Result};
use crate::manifest::{
    ARTIFACT_TYPE, BLOB_MEDIA_TYPE, CONFIG_MEDIA_TYPE, Descriptor, FORWARD_MEDIA_TYPE,
    JSON_BLOB_MEDIA_TYPE, KIND_ANNOTATION, MANIFEST_MEDIA_TYPE, Manifest,
};
use crate::reference::Reference;
use crate::resume::Sessions;
use crate::{ConnectOptions, Event, Progress, parallel};

/// How [`push`] runs.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// How to reach the registry.
    pub connect: ConnectOptions,
    /// Where uploads in progress are kept (one private file per blob) so that a push run again
    /// continues a blob cut off midway from where the registry has it, not from its start;
    /// `None` keeps nothing (an interrupted blob is sent whole again). `pf push` uses
    /// `<store>/registry/uploads`.
    pub sessions: Option<std::path::PathBuf>,
    /// Set to cancel the push (say on Ctrl-C): it stops at its next blob or read, and writes no
    /// manifest. What the registry took stays there: the same push run again skips it.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What [`push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The snapshot's root blob.
    pub snapshot: Digest256,
    /// The registry's digest of the manifest, when it said.
    pub manifest_digest: Option<String>,
    /// Blobs in the snapshot (the root included).
    pub blobs: usize,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs the registry already had.
    pub skipped: usize,
    /// Raw bytes of every blob of the snapshot.
    pub bytes_total: u64,
    /// Raw bytes sent (a blob continued from an earlier run counts only what this run sent).
    pub bytes_uploaded: u64,
}

/// One blob of a snapshot.
#[derive(Debug, Clone, Copy)]
struct Node {
    digest: Digest256,
    size: u64,
    refers: bool,
    /// A forward record sent as a layer of its own (its bytes are the record's), not a blob.
    forward: Option<pf_core::forward::Forward>,
}

/// Push the snapshot whose root blob is `root` to `reference`: every blob it reaches (as gc
/// follows them) that the registry lacks, then the manifest that tags it. Run again after an
/// interruption, it skips what arrived and sends the rest.
pub fn push(
    store: &dyn BlobStore,
    root: &Digest256,
    reference: &Reference,
    options: &PushOptions,
    progress: Progress<'_>,
) -> Result<PushReport> {
    let _span = tracing::info_span!("push", %root, %reference).entered();
    let kind = root_kind(store, root)?;
    let nodes = walk(store, root)?;
    let client = Client::connect(reference, &options.connect, Access::Push)?;
    let bytes_total = nodes.iter().map(|n| n.size).sum();
    progress(Event::Planned {
        blobs: nodes.len(),
        bytes: bytes_total,
    });
    let sessions = options.sessions.as_deref().map(Sessions::new);
    let uploaded = AtomicUsize::new(0);
    let bytes_uploaded = AtomicU64::new(0);
    let cancelled = || {
        options
            .cancel
            .as_deref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    };
    let cancel_error = || Error::PushCancelled {
        reference: reference.to_string(),
    };
    parallel(&nodes, options.connect.parallel, |node| {
        if cancelled() {
            return Err(cancel_error());
        }
        if client.has_blob(&node.digest)? {
            tracing::debug!(digest = %node.digest, "the registry has it");
            if let Some(sessions) = &sessions {
                client.forget_upload(sessions, &node.digest);
            }
            progress(Event::Skipped {
                digest: &node.digest,
                size: node.size,
            });
            return Ok(());
        }
        let inner: Box<dyn std::io::Read + Send> = match &node.forward {
            Some(f) => Box::new(std::io::Cursor::new(f.to_bytes())),
            None => store.open(&node.digest)?,
        };
        let mut reader = UntilCancelled {
            inner,
            cancelled: &cancelled,
        };
        let sent = client.upload(
            &node.digest,
            node.size,
            &mut reader,
            sessions.as_ref(),
            progress,
        )?;
        uploaded.fetch_add(1, Ordering::Relaxed);
        bytes_uploaded.fetch_add(sent, Ordering::Relaxed);
        progress(Event::Moved {
            digest: &node.digest,
            size: node.size,
        });
        Ok(())
    })
    // A read cut short by the cancel fails as a read: say why it stopped.
    .map_err(|err| if cancelled() { cancel_error() } else { err })?;
    if cancelled() {
        return Err(cancel_error());
    }
    let manifest = manifest(&nodes, kind);
    let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    let manifest_digest = client.put_manifest(reference.tag(), &bytes)?;
    let uploaded = uploaded.into_inner();
    Ok(PushReport {
        snapshot: *root,
        manifest_digest,
        blobs: nodes.len(),
        uploaded,
        skipped: nodes.len() - uploaded,
        bytes_total,
        bytes_uploaded: bytes_uploaded.into_inner(),
    })
}

/// A blob's bytes on their way up, failing once the push is cancelled.
struct UntilCancelled<'a, R> {
    inner: R,
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl<R: std::io::Read> std::io::Read for UntilCancelled<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.cancelled)() {
            return Err(std::io::Error::other("the push was cancelled"));
        }
        self.inner.read(buf)
    }
}

/// The root blob's `kind`: it must be a JSON object that has one.
fn root_kind(store: &dyn BlobStore, root: &Digest256) -> Result<String> {
    if !store.contains(root)? {
        return Err(pf_core::Error::NotFound { digest: *root }.into());
    }
    let size = store.raw_size(root)?;
    if size > 16 << 20 {
        return Err(Error::NotSnapshotBlob {
            digest: *root,
            reason: "it is larger than any snapshot record",
        });
    }
    let bytes = store.get(root)?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| Error::NotSnapshotBlob {
            digest: *root,
            reason: "it is not JSON",
        })?;
    value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_owned)
        .ok_or(Error::NotSnapshotBlob {
            digest: *root,
            reason: "it is not a JSON object with a \"kind\"",
        })
}

/// Every blob `root` reaches, root first, breadth-first, each once; a missing one is an error,
/// unless it is a pack a repack forwarded: then its forward records go as layers, and the packs
/// they lead to are walked.
fn walk(store: &dyn BlobStore, root: &Digest256) -> Result<Vec<Node>> {
    let mut seen = BTreeSet::from([*root]);
    let mut queue = VecDeque::from([*root]);
    let mut nodes = Vec::new();
    while let Some(digest) = queue.pop_front() {
        if !store.contains(&digest)? {
            let targets = store.forwards_of(&digest)?;
            if targets.is_empty() {
                return Err(Error::SnapshotNotWhole {
                    root: *root,
                    missing: digest,
                });
            }
            for to in targets {
                let forward = pf_core::forward::Forward { pack: digest, to };
                let bytes = forward.to_bytes();
                nodes.push(Node {
                    digest: Digest256::of(&bytes),
                    size: bytes.len() as u64,
                    refers: false,
                    forward: Some(forward),
                });
                if seen.insert(to) {
                    queue.push_back(to);
                }
            }
            continue;
        }
        let children = pf_core::references(store, &digest)?;
        nodes.push(Node {
            digest,
            size: store.raw_size(&digest)?,
            refers: !children.is_empty(),
            forward: None,
        });
        for child in children {
            if seen.insert(child) {
                queue.push_back(child);
            }
        }
    }
    Ok(nodes)
}

/// The manifest of a walked snapshot: the root as config, the rest as layers in walk order.
fn manifest(nodes: &[Node], kind: String) -> Manifest {
    let descriptor = |node: &Node, media_type: &str| Descriptor {
        media_type: media_type.to_owned(),
        digest: node.digest,
        size: node.size,
    };
    Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
        artifact_type: Some(ARTIFACT_TYPE.to_owned()),
        config: descriptor(&nodes[0], CONFIG_MEDIA_TYPE),
        layers: nodes[1..]
            .iter()
            .map(|n| {
                descriptor(
                    n,
                    if n.forward.is_some() {
                        FORWARD_MEDIA_TYPE
                    } else if n.refers {
                        JSON_BLOB_MEDIA_TYPE
                    } else {
                        BLOB_MEDIA_TYPE
                    },
                )
            })
            .collect(),
        annotations: BTreeMap::from([(KIND_ANNOTATION.to_owned(), kind)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pf_core::MemBlobStore;

    #[test]
    fn walks_what_gc_keeps_and_refuses_holes() {
        let s = MemBlobStore::new();
        let pack = s.put(b"\x00pages").unwrap();
        let tar = s.put(b"\x00tar").unwrap();
        let pages = s
            .put(format!(r#"{{"packs":["{pack}","{pack}"]}}"#).as_bytes())
            .unwrap();
        let root = s
            .put(
                format!(r#"{{"kind":"procs.x","criu_dump":"{tar}","pages":"{pages}"}}"#).as_bytes(),
            )
            .unwrap();
        let nodes = walk(&s, &root).unwrap();
        let digests: Vec<_> = nodes.iter().map(|n| n.digest).collect();
        assert_eq!(digests[0], root);
        assert_eq!(digests.len(), 4);
        assert!(digests.contains(&pack) && digests.contains(&tar) && digests.contains(&pages));
        let m = manifest(&nodes, root_kind(&s, &root).unwrap());
        assert_eq!(m.config.digest, root);
        assert_eq!(m.annotations[KIND_ANNOTATION], "procs.x");
        let of = |d: Digest256| {
            m.layers
                .iter()
                .find(|l| l.digest == d)
                .unwrap()
                .media_type
                .clone()
        };
        assert_eq!(of(pages), JSON_BLOB_MEDIA_TYPE);
        assert_eq!(of(pack), BLOB_MEDIA_TYPE);
        assert_eq!(m.layers.iter().find(|l| l.digest == tar).unwrap().size, 4);

        s.remove(&pack).unwrap();
        assert!(matches!(
            walk(&s, &root),
            Err(Error::SnapshotNotWhole { missing, .. }) if missing == pack
        ));
        assert!(matches!(
            root_kind(&s, &tar),
            Err(Error::NotSnapshotBlob { .. })
        ));
    }
}
