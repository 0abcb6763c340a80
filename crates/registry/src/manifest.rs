//! The wire format: a snapshot as an OCI image manifest (see `agent_docs/formats.md`).

use std::collections::BTreeMap;

use pf_core::Digest256;
use serde::{Deserialize, Serialize};

/// The manifest's own media type: a plain OCI image manifest, which every registry stores.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The manifest's `artifactType`: what tools that list artifacts show.
pub const ARTIFACT_TYPE: &str = "application/vnd.pf.snapshot.v1+json";
/// The config's media type: the snapshot's root blob (a procs record).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.pf.snapshot.config.v1+json";
/// A layer that refers to other blobs through `sha256:` strings (a JSON blob, e.g. a manifest
/// of pages).
pub const JSON_BLOB_MEDIA_TYPE: &str = "application/vnd.pf.blob.v1+json";
/// Any other layer: raw bytes (an images tar, a pack of pages).
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.pf.blob.v1";
/// A forward record (`pf_core::forward::Forward`'s bytes): a pack the snapshot names was
/// repacked in the pushing store, and its pages are in the pack the record names (also a layer).
/// A pull stores it as a forward record, not as a blob.
pub(crate) const FORWARD_MEDIA_TYPE: &str = "application/vnd.pf.pack-forward.v1+json";

/// Annotation naming the root blob's `kind`.
pub(crate) const KIND_ANNOTATION: &str = "dev.pf.snapshot.kind";

/// An OCI image manifest, as much of it as pf writes and reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) artifact_type: Option<String>,
    pub(crate) config: Descriptor,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// The `kind` of an upload session file.
pub(crate) const UPLOAD_SESSION_KIND: &str = "pf.registry.upload.v1";

/// An upload in progress, kept by [`crate::resume`] so that a push run again continues it: where
/// the registry said the upload goes on, for which blob, and how many bytes it acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UploadSession {
    pub(crate) kind: String,
    /// `scheme://host[:port]` of the registry.
    pub(crate) registry: String,
    pub(crate) repository: String,
    pub(crate) digest: Digest256,
    pub(crate) size: u64,
    /// The upload URL from the registry's last answer (its `Location`).
    pub(crate) location: String,
    /// Bytes the registry acknowledged when it gave that location.
    pub(crate) offset: u64,
}

/// A blob in a manifest: media type, digest of its raw bytes, raw size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    pub(crate) media_type: String,
    pub(crate) digest: Digest256,
    pub(crate) size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in agent_docs/formats.md parses, and says what pf writes.
    #[test]
    fn formats_md_example_parses() {
        let doc = include_str!("../../../agent_docs/formats.md");
        let start = doc
            .find("```json\n{\n  \"schemaVersion\"")
            .expect("the manifest example in formats.md");
        let text = &doc[start + 8..];
        let text = &text[..text.find("```").unwrap()];
        let m: Manifest = serde_json::from_str(text).unwrap();
        assert_eq!(m.schema_version, 2);
        assert_eq!(m.media_type.as_deref(), Some(MANIFEST_MEDIA_TYPE));
        assert_eq!(m.artifact_type.as_deref(), Some(ARTIFACT_TYPE));
        assert_eq!(m.config.media_type, CONFIG_MEDIA_TYPE);
        assert!(m.layers.iter().all(|l| l.media_type == BLOB_MEDIA_TYPE
            || l.media_type == JSON_BLOB_MEDIA_TYPE
            || l.media_type == FORWARD_MEDIA_TYPE));
        assert!(m.annotations.contains_key(KIND_ANNOTATION));
    }
}
