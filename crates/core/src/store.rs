//! The [`BlobStore`] trait: blobs by digest, and names (refs) that point at them.

use std::io::Read;

use crate::digest::Digest256;
use crate::error::{Error, Result};

/// What a streaming put stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// The digest of the raw bytes.
    pub digest: Digest256,
    /// How many raw bytes were read.
    pub size: u64,
}

/// A content-addressed store of immutable blobs, plus names (refs) that point at blobs.
///
/// Every read is verified: bytes that do not hash to their digest are an [`Error::Integrity`],
/// distinct from [`Error::NotFound`].
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Store `bytes`; storing a blob that is already there succeeds.
    fn put(&self, bytes: &[u8]) -> Result<Digest256>;

    /// Store everything `reader` yields, streaming: memory stays flat whatever the size.
    fn put_reader(&self, reader: &mut dyn Read) -> Result<Put>;

    /// The whole blob, verified.
    fn get(&self, digest: &Digest256) -> Result<Vec<u8>>;

    /// A reader over the blob's raw bytes that hashes while it reads and fails with
    /// [`Error::Integrity`] (as an `io::Error` of kind `InvalidData` wrapping it) at EOF when the
    /// bytes do not match.
    fn open(&self, digest: &Digest256) -> Result<Box<dyn Read + Send>>;

    /// Whether the blob is present (not verified).
    fn contains(&self, digest: &Digest256) -> Result<bool>;

    /// Remove the blob; `Ok(false)` when it was not there.
    fn remove(&self, digest: &Digest256) -> Result<bool>;

    /// Every digest in the store, sorted.
    fn list(&self) -> Result<Vec<Digest256>>;

    /// Bytes the blob takes in the store (compressed size on disk for `FsBlobStore`).
    fn stored_size(&self, digest: &Digest256) -> Result<u64>;

    /// Point `name` at `digest` (atomically replacing an old target). The blob must exist.
    fn set_name(&self, name: &str, digest: &Digest256) -> Result<()>;

    /// The digest `name` points at.
    fn get_name(&self, name: &str) -> Result<Digest256>;

    /// Every name with its digest, sorted by name.
    fn names(&self) -> Result<Vec<(String, Digest256)>>;

    /// Remove `name`; `Ok(false)` when it did not exist.
    fn remove_name(&self, name: &str) -> Result<bool>;

    /// A digest, or a name that points at one.
    fn resolve(&self, digest_or_name: &str) -> Result<Digest256> {
        if digest_or_name.starts_with("sha256:") {
            return Ok(digest_or_name.parse()?);
        }
        self.get_name(digest_or_name)
    }
}

/// Check that `name` is acceptable as a ref: 1–200 bytes, no `/`, no `\0` or other control
/// characters, not `.` or `..`, not starting with `.` (temp files), not a digest.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| Error::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 200 {
        return Err(invalid("it is longer than 200 bytes"));
    }
    if name.starts_with('.') {
        return Err(invalid("it starts with '.'"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(invalid("it contains a slash"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("it contains a control character"));
    }
    if name.starts_with("sha256:") {
        return Err(invalid("it looks like a digest"));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(invalid("it contains white space"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["repl", "python-3.11_warm", "a.b", "x@1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(201);
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a\0b", "a\nb", "sha256:00", "a b", &long] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
