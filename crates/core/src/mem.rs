//! An in-memory [`BlobStore`], for tests and embedding.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, RwLock};

use crate::digest::{Digest256, DigestHasher};
use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::lock::{SharedExclusive, StoreLock};
use crate::store::{BlobStore, Put, validate_name};

/// A [`BlobStore`] that keeps blobs and names in memory.
#[derive(Debug, Default)]
pub struct MemBlobStore {
    blobs: RwLock<BTreeMap<Digest256, Arc<[u8]>>>,
    names: RwLock<BTreeMap<String, Digest256>>,
    forwards: RwLock<std::collections::BTreeSet<(Digest256, Digest256)>>,
    lock: SharedExclusive,
}

impl MemBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace a stored blob's bytes without changing its digest: for tests of corruption.
    pub fn corrupt_for_test(&self, digest: &Digest256, bytes: &[u8]) {
        self.blobs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(*digest, bytes.into());
    }

    fn blob(&self, digest: &Digest256) -> Result<Arc<[u8]>> {
        self.blobs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(digest)
            .cloned()
            .ok_or(Error::NotFound { digest: *digest })
    }
}

impl BlobStore for MemBlobStore {
    fn put(&self, bytes: &[u8]) -> Result<Digest256> {
        let digest = Digest256::of(bytes);
        let mut blobs = self
            .blobs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A stored copy that differs is corrupt: the good bytes replace it.
        if blobs.get(&digest).is_none_or(|old| **old != *bytes) {
            blobs.insert(digest, bytes.into());
        }
        Ok(digest)
    }

    fn put_reader(&self, reader: &mut dyn Read) -> Result<Put> {
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(|source| Error::Input { source })?;
        let digest = self.put(&bytes)?;
        Ok(Put {
            digest,
            size: bytes.len() as u64,
        })
    }

    fn get(&self, digest: &Digest256) -> Result<Vec<u8>> {
        let bytes = self.blob(digest)?;
        let actual = Digest256::of(&bytes);
        if actual != *digest {
            return Err(Error::Integrity {
                digest: *digest,
                actual,
                path: None,
            });
        }
        Ok(bytes.to_vec())
    }

    fn open(&self, digest: &Digest256) -> Result<Box<dyn Read + Send>> {
        let bytes = self.blob(digest)?;
        Ok(Box::new(VerifyingReader::new(
            ArcReader { bytes, pos: 0 },
            *digest,
            None,
        )))
    }

    fn contains(&self, digest: &Digest256) -> Result<bool> {
        Ok(self
            .blobs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(digest))
    }

    fn remove(&self, digest: &Digest256) -> Result<bool> {
        Ok(self
            .blobs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(digest)
            .is_some())
    }

    fn list(&self) -> Result<Vec<Digest256>> {
        Ok(self
            .blobs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect())
    }

    fn stored_size(&self, digest: &Digest256) -> Result<u64> {
        Ok(self.blob(digest)?.len() as u64)
    }

    fn raw_size(&self, digest: &Digest256) -> Result<u64> {
        Ok(self.blob(digest)?.len() as u64)
    }

    fn seekable(&self, digest: &Digest256) -> Result<bool> {
        self.blob(digest).map(|_| true)
    }

    fn read_at(&self, digest: &Digest256, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bytes = self.blob(digest)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn set_name(&self, name: &str, digest: &Digest256) -> Result<()> {
        validate_name(name)?;
        // A gc must not remove the blob between this check and the name.
        let _writing = self.writer_lock()?;
        if !self.contains(digest)? {
            return Err(Error::NotFound { digest: *digest });
        }
        self.names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), *digest);
        Ok(())
    }

    fn get_name(&self, name: &str) -> Result<Digest256> {
        validate_name(name)?;
        self.names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
            .ok_or_else(|| Error::NameNotFound {
                name: name.to_owned(),
            })
    }

    fn names(&self) -> Result<Vec<(String, Digest256)>> {
        Ok(self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(n, d)| (n.clone(), *d))
            .collect())
    }

    fn remove_name(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        Ok(self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
            .is_some())
    }

    fn writer_lock(&self) -> Result<StoreLock> {
        Ok(self.lock.shared())
    }

    fn reader_lock(&self) -> Option<StoreLock> {
        self.lock.try_shared()
    }

    fn gc_lock(&self) -> Result<StoreLock> {
        Ok(self.lock.exclusive())
    }

    fn forwards_of(&self, pack: &Digest256) -> Result<Vec<Digest256>> {
        Ok(self
            .forwards
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .range(
                (*pack, Digest256::from_bytes([0; 32]))
                    ..=(*pack, Digest256::from_bytes([0xff; 32])),
            )
            .map(|(_, to)| *to)
            .collect())
    }

    fn add_forward(&self, forward: &Forward) -> Result<()> {
        self.forwards
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((forward.pack, forward.to));
        Ok(())
    }

    fn remove_forward(&self, forward: &Forward) -> Result<bool> {
        Ok(self
            .forwards
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(forward.pack, forward.to)))
    }

    fn forwards(&self) -> Result<Vec<Forward>> {
        Ok(self
            .forwards
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(pack, to)| Forward {
                pack: *pack,
                to: *to,
            })
            .collect())
    }
}

struct ArcReader {
    bytes: Arc<[u8]>,
    pos: usize,
}

impl Read for ArcReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.bytes[self.pos..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

/// Wraps a reader of a blob's raw bytes; at EOF, fails unless they hash to `digest`. Once it
/// failed, every later read fails too, so a caller that retries never sees a clean EOF.
pub(crate) struct VerifyingReader<R> {
    inner: R,
    hasher: Option<DigestHasher>,
    digest: Digest256,
    path: Option<std::path::PathBuf>,
    mismatch: Option<Digest256>,
}

impl<R: Read> VerifyingReader<R> {
    pub(crate) fn new(inner: R, digest: Digest256, path: Option<std::path::PathBuf>) -> Self {
        Self {
            inner,
            hasher: Some(DigestHasher::new()),
            digest,
            path,
            mismatch: None,
        }
    }

    fn integrity_error(&self, actual: Digest256) -> std::io::Error {
        Error::Integrity {
            digest: self.digest,
            actual,
            path: self.path.clone(),
        }
        .into_read_error()
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(actual) = self.mismatch {
            return Err(self.integrity_error(actual));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        match (n, self.hasher.as_mut()) {
            (0, Some(_)) => {
                let actual = self.hasher.take().map(DigestHasher::finish);
                if let Some(actual) = actual
                    && actual != self.digest
                {
                    self.mismatch = Some(actual);
                    return Err(self.integrity_error(actual));
                }
                Ok(0)
            }
            (n, Some(h)) => {
                h.update(&buf[..n]);
                Ok(n)
            }
            (n, None) => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_open_round_trip() {
        let s = MemBlobStore::new();
        let d = s.put(b"hello").unwrap();
        assert_eq!(d, Digest256::of(b"hello"));
        assert_eq!(s.get(&d).unwrap(), b"hello");
        let mut out = Vec::new();
        s.open(&d).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
        let p = s.put_reader(&mut &b"hello"[..]).unwrap();
        assert_eq!(p, Put { digest: d, size: 5 });
        assert_eq!(s.list().unwrap(), vec![d]);
    }

    #[test]
    fn corruption_is_an_integrity_error() {
        let s = MemBlobStore::new();
        let d = s.put(b"hello").unwrap();
        s.corrupt_for_test(&d, b"jello");
        assert!(matches!(s.get(&d), Err(Error::Integrity { .. })));
        let mut out = Vec::new();
        let err = s.open(&d).unwrap().read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&d.to_string()), "{err}");
        assert!(matches!(
            Error::from_read_error(&err),
            Some(Error::Integrity { digest, .. }) if *digest == d
        ));
    }

    #[test]
    fn a_failed_reader_keeps_failing() {
        let s = MemBlobStore::new();
        let d = s.put(b"hello").unwrap();
        s.corrupt_for_test(&d, b"jello");
        let mut r = s.open(&d).unwrap();
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        let mut buf = [0u8; 4];
        assert!(r.read(&mut buf).is_err());
    }

    #[test]
    fn read_at_reads_raw_bytes_unverified_and_short_only_at_the_end() {
        let s = MemBlobStore::new();
        let d = s.put(b"0123456789").unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.read_at(&d, 3, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"3456");
        assert_eq!(s.read_at(&d, 8, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"89");
        assert_eq!(s.read_at(&d, 10, &mut buf).unwrap(), 0);
        assert_eq!(s.read_at(&d, u64::MAX, &mut buf).unwrap(), 0);
        // Not verified: the caller checks what it reads.
        s.corrupt_for_test(&d, b"0123x56789");
        assert_eq!(s.read_at(&d, 3, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"3x56");
        assert!(matches!(
            s.read_at(&Digest256::of(b"nope"), 0, &mut buf),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn unknown_digest_is_not_found() {
        let s = MemBlobStore::new();
        let d = Digest256::of(b"nope");
        assert!(matches!(s.get(&d), Err(Error::NotFound { .. })));
        assert!(matches!(s.open(&d), Err(Error::NotFound { .. })));
        assert!(matches!(s.set_name("x", &d), Err(Error::NotFound { .. })));
    }

    #[test]
    fn names_point_at_blobs() {
        let s = MemBlobStore::new();
        let d = s.put(b"a").unwrap();
        s.set_name("snap", &d).unwrap();
        assert_eq!(s.resolve("snap").unwrap(), d);
        assert_eq!(s.resolve(&d.to_string()).unwrap(), d);
        assert!(matches!(s.resolve("nope"), Err(Error::NameNotFound { .. })));
        assert!(s.remove_name("snap").unwrap());
        assert!(!s.remove_name("snap").unwrap());
    }
}
