//! Shared helpers: a store in a temp dir and deterministic test data that streams.

use std::io::{self, Read};
use std::path::Path;

use pf_core::{Digest256, DigestHasher, FsBlobStore};

/// A fresh store under a new temp dir (kept alive by the returned guard).
pub(crate) fn store() -> (tempfile::TempDir, FsBlobStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FsBlobStore::open(&dir.path().join("store")).expect("open store");
    (dir, store)
}

const BLOCK: usize = 64 * 1024;

/// `len` bytes of deterministic data, alternating 64 KiB of pseudo-random bytes and 64 KiB of
/// repetitive text, produced as it is read (never whole in memory).
#[derive(Debug, Clone)]
pub(crate) struct TestData {
    seed: u64,
    pos: u64,
    len: u64,
    block: Vec<u8>,
    block_index: Option<u64>,
}

impl TestData {
    pub(crate) fn new(seed: u64, len: u64) -> Self {
        Self {
            seed,
            pos: 0,
            len,
            block: vec![0; BLOCK],
            block_index: None,
        }
    }

    /// The digest of the whole stream.
    pub(crate) fn digest(&self) -> Digest256 {
        drain(&mut Self::new(self.seed, self.len))
            .expect("test data")
            .0
    }

    /// Write the stream to a file.
    pub(crate) fn write_to(&self, path: &Path) {
        let mut file = std::fs::File::create(path).expect("create test file");
        io::copy(&mut Self::new(self.seed, self.len), &mut file).expect("write test file");
    }

    fn make_block(&mut self, index: u64) {
        if index.is_multiple_of(2) {
            let mut state = (self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
            for word in self.block.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
        } else {
            let text = b"the quick brown fox jumps over the lazy dog ";
            for (i, b) in self.block.iter_mut().enumerate() {
                *b = text[i % text.len()];
            }
            self.block[..8].copy_from_slice(&index.to_le_bytes());
        }
        self.block_index = Some(index);
    }
}

impl Read for TestData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.len || buf.is_empty() {
            return Ok(0);
        }
        let index = self.pos / BLOCK as u64;
        if self.block_index != Some(index) {
            self.make_block(index);
        }
        let offset = (self.pos % BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(BLOCK - offset)
            .min((self.len - self.pos) as usize);
        buf[..n].copy_from_slice(&self.block[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Read a reader to its end, returning the digest and length of what it yielded.
pub(crate) fn drain(reader: &mut dyn Read) -> io::Result<(Digest256, u64)> {
    let mut hasher = DigestHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            let len = hasher.len();
            return Ok((hasher.finish(), len));
        }
        hasher.update(&buf[..n]);
    }
}

/// Every `.tmp-` file under `dir`, recursively.
pub(crate) fn temp_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(temp_files(&path));
        } else if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(path);
        }
    }
    out
}
