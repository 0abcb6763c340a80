//! Page-level storage of a file made of 4 KiB pages: every distinct non-zero page stored once
//! per store (in a [pack](crate::pack)), and a manifest that rebuilds the file page by page,
//! each page checked against its own digest.
//!
//! A file's pages become two blobs:
//! - the **page list**, binary: `"PFPLST01"`, `u64 N`, then N × (32-byte page digest, `u32` pack
//!   number, `u32` slot), little endian, in file order; pack number `u32::MAX` marks a zero page
//!   (its digest is the digest of 4096 zero bytes, and it takes no space anywhere);
//! - the **manifest**, JSON, `{"kind":"pages.manifest.v1","page_size":4096,"pages":N,
//!   "zero_pages":Z,"packs":["sha256:…"],"list":"sha256:…"}`; pack number `k` in the list is
//!   `packs[k]`. Its `sha256:` strings make `gc` keep the list and the packs.
//!
//! [`PageWriter`] writes files this way in one session: pages are hashed on every thread asked
//! for, looked up in the store's [`PageIndex`] (and among the pages the session already wrote),
//! and only new ones go into packs, which are compressed on the same threads; the session's new
//! pages are added to the index when it is [committed](PageWriter::commit). [`read_pages`] does
//! the reverse into a file, never writing a page it has not checked.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;

use serde::{Deserialize, Serialize};

use crate::digest::Digest256;
use crate::error::Error;
use crate::pack::{PACK_PAGES, PAGE_SIZE, Pack, PackBuilder, PackError, is_zero_page, page_digest};
use crate::page_index::{IndexError, PageIndex, PageLoc};
use crate::store::BlobStore;

const LIST_MAGIC: &[u8; 8] = b"PFPLST01";
const LIST_ENTRY: usize = 40;
const ZERO_PACK: u32 = u32::MAX;
/// Pages read (and hashed) per batch by each thread: 1 MiB.
const BATCH_PAGES: usize = 256;
/// Finished packs (8 MiB raw each, less compressed) waiting for the store.
const PUT_QUEUE: usize = 1;

/// The manifest of one file stored page by page (the only serde type of this module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename = "pages.manifest.v1")]
pub struct PagesManifest {
    /// Always 4096.
    pub page_size: u32,
    /// Pages in the file.
    pub pages: u64,
    /// How many of them are zero pages (stored nowhere).
    pub zero_pages: u64,
    /// The packs the page list refers to, by number.
    pub packs: Vec<Digest256>,
    /// The page list blob.
    pub list: Digest256,
}

/// Why pages could not be stored or rebuilt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PagesError {
    /// The store failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: Error,
    },
    /// A pack is malformed or a frame does not decode.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// Page `page` (its number in the file) is wrong: its bytes in the pack do not hash to the
    /// digest the page list records, or it cannot be decoded.
    #[error("page {page} (byte offset {}) is corrupt", .page * PAGE_SIZE as u64)]
    BadPage {
        /// The page's number in the file.
        page: u64,
        /// What the pack said.
        #[source]
        source: PackError,
    },
    /// The page index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The file to store or rebuild could not be read or written.
    #[error("{op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file's length is not a whole number of pages.
    #[error("{} is {len} bytes long, not a whole number of 4096-byte pages", .path.display())]
    NotPages {
        /// The file.
        path: std::path::PathBuf,
        /// Its length.
        len: u64,
    },
    /// A manifest or page list is not what this version writes.
    #[error("blob {digest} is not a valid {what}: {reason}")]
    Malformed {
        /// The blob.
        digest: Digest256,
        /// `pages manifest` or `page list`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What storing one file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesStored {
    /// The manifest blob.
    pub manifest: Digest256,
    /// Pages in the file.
    pub pages: u64,
    /// Zero pages among them.
    pub zero_pages: u64,
    /// Pages this file added to the store (the rest were already there).
    pub new_pages: u64,
    /// Raw bytes of the packs this file wrote.
    pub pack_bytes: u64,
}

/// A session that stores files page by page into one store. Dropping it without
/// [`commit`](Self::commit) leaves the blobs it wrote (unreferenced until a caller names a
/// manifest, so gc removes them) and the index untouched.
#[derive(Debug)]
pub struct PageWriter<'a> {
    store: &'a dyn BlobStore,
    index: PageIndex,
    threads: usize,
    /// Pages this session put into packs, and pages the index or earlier files named, whose
    /// packs are known to be in the store.
    known: HashMap<Digest256, PageLoc>,
    packs_checked: HashMap<Digest256, bool>,
    /// The packs this session wrote (their pages go into the index on commit).
    new_packs: std::collections::HashSet<Digest256>,
}

impl<'a> PageWriter<'a> {
    /// A session writing into `store`, deduplicating against `index`, on `threads` threads.
    pub fn new(store: &'a dyn BlobStore, index: PageIndex, threads: usize) -> Self {
        Self {
            store,
            index,
            threads: threads.max(1),
            known: HashMap::new(),
            packs_checked: HashMap::new(),
            new_packs: std::collections::HashSet::new(),
        }
    }

    /// Store the pages of `file` (at `path`, named in errors), whose length must be a multiple
    /// of 4096, and return its manifest. The file is read twice (once to hash, once to pack the
    /// new pages), so it must not change meanwhile.
    pub fn write_file(
        &mut self,
        file: &File,
        path: &std::path::Path,
    ) -> Result<PagesStored, PagesError> {
        let len = file
            .metadata()
            .map_err(|source| PagesError::Io {
                op: "stat",
                path: path.to_owned(),
                source,
            })?
            .len();
        if len % PAGE_SIZE as u64 != 0 {
            return Err(PagesError::NotPages {
                path: path.to_owned(),
                len,
            });
        }
        let pages = (len / PAGE_SIZE as u64) as usize;
        // Pass 1: hash every page on every thread; None marks a zero page.
        let digests = self.hash_all(file, path, pages)?;
        // Which of them the store already has.
        let mut unknown: Vec<Digest256> = digests
            .iter()
            .flatten()
            .filter(|d| !self.known.contains_key(d))
            .copied()
            .collect();
        unknown.sort();
        unknown.dedup();
        let found = self.index.lookup(&unknown)?;
        drop(unknown);
        for (digest, loc) in found {
            if self.pack_present(&loc.pack)? {
                self.known.insert(digest, loc);
            }
        }
        // Pass 2: the new pages into packs, in file order. Packs are compressed here and stored
        // by a second thread (at most PUT_QUEUE finished packs wait for it), so the store's
        // writes and fsyncs overlap the next pack's reading and compression.
        let store = self.store;
        let threads = self.threads;
        let (stored, packed) = std::thread::scope(|s| {
            let (send, recv) = std::sync::mpsc::sync_channel::<Vec<u8>>(PUT_QUEUE);
            let putter = s.spawn(move || -> Result<Vec<(Digest256, u64)>, PagesError> {
                let mut done = Vec::new();
                for bytes in recv {
                    let digest = store.put(&bytes).map_err(|source| PagesError::Store {
                        what: "storing a pack".to_owned(),
                        source,
                    })?;
                    done.push((digest, bytes.len() as u64));
                }
                Ok(done)
            });
            let packed = self.pack_new_pages(file, path, &digests, threads, &send);
            drop(send);
            let stored = putter
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (stored, packed)
        });
        // A failed put closes the queue, so pack_new_pages fails too: report the put's error.
        let stored = stored?;
        let pending = packed?;
        let new_pages = pending.len() as u64;
        let pack_bytes = stored.iter().map(|(_, len)| len).sum();
        for (digest, (pack_no, slot)) in pending {
            let loc = PageLoc {
                pack: stored[pack_no as usize].0,
                slot,
            };
            self.known.insert(digest, loc);
        }
        for (digest, _) in &stored {
            self.packs_checked.insert(*digest, true);
            self.new_packs.insert(*digest);
        }
        // The page list, in file order.
        let mut packs: Vec<Digest256> = Vec::new();
        let mut pack_no: HashMap<Digest256, u32> = HashMap::new();
        let mut list = Vec::with_capacity(16 + pages * LIST_ENTRY);
        list.extend_from_slice(LIST_MAGIC);
        list.extend_from_slice(&(pages as u64).to_le_bytes());
        let zero = zero_page_digest();
        let mut zero_pages = 0u64;
        for digest in &digests {
            match digest {
                None => {
                    zero_pages += 1;
                    list.extend_from_slice(zero.as_bytes());
                    list.extend_from_slice(&ZERO_PACK.to_le_bytes());
                    list.extend_from_slice(&0u32.to_le_bytes());
                }
                Some(digest) => {
                    let loc = self.known[digest];
                    let n = *pack_no.entry(loc.pack).or_insert_with(|| {
                        packs.push(loc.pack);
                        (packs.len() - 1) as u32
                    });
                    list.extend_from_slice(digest.as_bytes());
                    list.extend_from_slice(&n.to_le_bytes());
                    list.extend_from_slice(&loc.slot.to_le_bytes());
                }
            }
        }
        let list = self.store.put(&list).map_err(|source| PagesError::Store {
            what: format!("storing the page list of {}", path.display()),
            source,
        })?;
        let manifest = PagesManifest {
            page_size: PAGE_SIZE as u32,
            pages: pages as u64,
            zero_pages,
            packs,
            list,
        };
        let json = serde_json::to_vec(&manifest).unwrap_or_default();
        let manifest = self.store.put(&json).map_err(|source| PagesError::Store {
            what: format!("storing the pages manifest of {}", path.display()),
            source,
        })?;
        Ok(PagesStored {
            manifest,
            pages: pages as u64,
            zero_pages,
            new_pages,
            pack_bytes,
        })
    }

    /// Add the pages this session stored to the index.
    pub fn commit(self) -> Result<(), PagesError> {
        let added = self
            .known
            .iter()
            .filter(|(_, loc)| self.new_packs.contains(&loc.pack))
            .map(|(d, loc)| (*d, *loc))
            .collect();
        self.index.add(added)?;
        Ok(())
    }

    fn pack_present(&mut self, pack: &Digest256) -> Result<bool, PagesError> {
        if let Some(&present) = self.packs_checked.get(pack) {
            return Ok(present);
        }
        let present = self
            .store
            .contains(pack)
            .map_err(|source| PagesError::Store {
                what: format!("looking for pack {pack}"),
                source,
            })?;
        self.packs_checked.insert(*pack, present);
        Ok(present)
    }

    /// Put every page of `digests` the store does not hold into packs, in file order, and send
    /// each finished pack to `send`. Returns each new page's (pack number, slot).
    fn pack_new_pages(
        &self,
        file: &File,
        path: &std::path::Path,
        digests: &[Option<Digest256>],
        threads: usize,
        send: &std::sync::mpsc::SyncSender<Vec<u8>>,
    ) -> Result<HashMap<Digest256, (u32, u32)>, PagesError> {
        let pages = digests.len();
        let mut pack = PackBuilder::new(threads);
        let mut packs_sent = 0u32;
        let mut pending: HashMap<Digest256, (u32, u32)> = HashMap::new();
        let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
        let finish = |pack: &mut PackBuilder| -> Result<(), PagesError> {
            let full = std::mem::replace(pack, PackBuilder::new(threads));
            send.send(full.finish()?).map_err(|_| PagesError::Io {
                op: "store the packs of",
                path: path.to_owned(),
                source: std::io::Error::other("the pack writer stopped"),
            })?;
            Ok(())
        };
        for start in (0..pages).step_by(BATCH_PAGES) {
            let n = BATCH_PAGES.min(pages - start);
            let wants_bytes = digests[start..start + n]
                .iter()
                .flatten()
                .any(|d| !self.known.contains_key(d) && !pending.contains_key(d));
            if !wants_bytes {
                continue;
            }
            read_at(
                file,
                path,
                &mut buf[..n * PAGE_SIZE],
                start as u64 * PAGE_SIZE as u64,
            )?;
            for (i, page) in buf[..n * PAGE_SIZE].chunks_exact(PAGE_SIZE).enumerate() {
                let Some(digest) = digests[start + i] else {
                    continue;
                };
                if self.known.contains_key(&digest) || pending.contains_key(&digest) {
                    continue;
                }
                let slot = pack.push(page, digest);
                pending.insert(digest, (packs_sent, slot));
                if pack.is_full() {
                    finish(&mut pack)?;
                    packs_sent += 1;
                }
            }
        }
        if !pack.is_empty() {
            finish(&mut pack)?;
        }
        Ok(pending)
    }

    /// Every page's digest (None for a zero page), hashed on `threads` threads.
    fn hash_all(
        &self,
        file: &File,
        path: &std::path::Path,
        pages: usize,
    ) -> Result<Vec<Option<Digest256>>, PagesError> {
        let mut digests: Vec<Option<Digest256>> = vec![None; pages];
        let per = pages.div_ceil(self.threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = digests
                .chunks_mut(per)
                .enumerate()
                .map(|(t, out)| {
                    s.spawn(move || -> Result<(), PagesError> {
                        let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
                        let first = t * per;
                        for start in (0..out.len()).step_by(BATCH_PAGES) {
                            let n = BATCH_PAGES.min(out.len() - start);
                            let at = (first + start) as u64 * PAGE_SIZE as u64;
                            read_at(file, path, &mut buf[..n * PAGE_SIZE], at)?;
                            for (i, page) in
                                buf[..n * PAGE_SIZE].chunks_exact(PAGE_SIZE).enumerate()
                            {
                                out[start + i] = (!is_zero_page(page)).then(|| page_digest(page));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })?;
        Ok(digests)
    }
}

fn read_at(file: &File, path: &std::path::Path, buf: &mut [u8], at: u64) -> Result<(), PagesError> {
    file.read_exact_at(buf, at)
        .map_err(|source| PagesError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })
}

/// The digest of a 4 KiB page of zeros.
pub fn zero_page_digest() -> Digest256 {
    page_digest(&[0u8; PAGE_SIZE])
}

/// Read and check the manifest blob `digest`.
pub fn load_manifest(
    store: &dyn BlobStore,
    digest: &Digest256,
) -> Result<PagesManifest, PagesError> {
    let bytes = store.get(digest).map_err(|source| PagesError::Store {
        what: format!("reading the pages manifest {digest}"),
        source,
    })?;
    let m: PagesManifest = serde_json::from_slice(&bytes).map_err(|e| PagesError::Malformed {
        digest: *digest,
        what: "pages manifest",
        reason: e.to_string(),
    })?;
    if m.page_size != PAGE_SIZE as u32 {
        return Err(PagesError::Malformed {
            digest: *digest,
            what: "pages manifest",
            reason: format!("page size {} (only 4096 is supported)", m.page_size),
        });
    }
    Ok(m)
}

/// One page as the page list records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedPage {
    /// The page's digest.
    pub digest: Digest256,
    /// Its pack (an index into the manifest's `packs`) and slot; `None` for a zero page.
    pub at: Option<(u32, u32)>,
}

/// Parse a page list blob (`digest` names it in errors) against its manifest.
pub fn parse_list(
    digest: &Digest256,
    bytes: &[u8],
    manifest: &PagesManifest,
) -> Result<Vec<ListedPage>, PagesError> {
    let bad = |reason: &str| PagesError::Malformed {
        digest: *digest,
        what: "page list",
        reason: reason.to_owned(),
    };
    if bytes.len() < 16 || &bytes[..8] != LIST_MAGIC {
        return Err(bad("bad magic"));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[8..16]);
    let n = u64::from_le_bytes(n);
    if n != manifest.pages || (bytes.len() - 16) as u64 != n * LIST_ENTRY as u64 {
        return Err(bad("its length does not match the manifest's page count"));
    }
    let zero = zero_page_digest();
    bytes[16..]
        .chunks_exact(LIST_ENTRY)
        .map(|e| {
            let mut d = [0u8; 32];
            d.copy_from_slice(&e[..32]);
            let digest = Digest256::from_bytes(d);
            let pack = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
            let slot = u32::from_le_bytes([e[36], e[37], e[38], e[39]]);
            if pack == ZERO_PACK {
                if digest != zero {
                    return Err(bad("a zero page carries another page's digest"));
                }
                return Ok(ListedPage { digest, at: None });
            }
            if pack as usize >= manifest.packs.len() || slot as usize >= PACK_PAGES {
                return Err(bad("a page names a pack or slot that cannot exist"));
            }
            Ok(ListedPage {
                digest,
                at: Some((pack, slot)),
            })
        })
        .collect()
}

/// Rebuild the file described by manifest `manifest` into `out` (which must be empty), checking
/// every page against its digest before writing it; zero pages are left as holes. Packs are
/// read one at a time per thread, on `threads` threads. Returns the file's length.
pub fn read_pages(
    store: &dyn BlobStore,
    manifest: &Digest256,
    out: &File,
    out_path: &std::path::Path,
    threads: usize,
) -> Result<u64, PagesError> {
    let m = load_manifest(store, manifest)?;
    let list_bytes = store.get(&m.list).map_err(|source| PagesError::Store {
        what: format!("reading the page list {}", m.list),
        source,
    })?;
    let list = parse_list(&m.list, &list_bytes, &m)?;
    drop(list_bytes);
    let len = m.pages * PAGE_SIZE as u64;
    out.set_len(len).map_err(|source| PagesError::Io {
        op: "size",
        path: out_path.to_owned(),
        source,
    })?;
    // For each pack, the (slot, digest, page number) it must give, sorted by slot.
    let mut wanted: Vec<Vec<Wanted>> = vec![Vec::new(); m.packs.len()];
    for (n, page) in list.iter().enumerate() {
        if let Some((pack, slot)) = page.at {
            wanted[pack as usize].push((slot, page.digest, n as u64));
        }
    }
    drop(list);
    for w in &mut wanted {
        w.sort_by_key(|(slot, _, page)| (*slot, *page));
    }
    let jobs: Vec<(Digest256, Vec<Wanted>)> = m.packs.iter().copied().zip(wanted).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = threads.max(1).min(jobs.len().max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), PagesError> {
                    // One pack's bytes at a time, the allocation reused from pack to pack.
                    let mut bytes = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((pack, want)) = jobs.get(i) else {
                            return Ok(());
                        };
                        write_from_pack(store, pack, want, out, out_path, &mut bytes)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(len)
}

/// A page to take from a pack: (slot, digest, page number in the file).
type Wanted = (u32, Digest256, u64);

fn write_from_pack(
    store: &dyn BlobStore,
    pack: &Digest256,
    want: &[Wanted],
    out: &File,
    out_path: &std::path::Path,
    bytes: &mut Vec<u8>,
) -> Result<(), PagesError> {
    if want.is_empty() {
        return Ok(());
    }
    bytes.clear();
    store
        .copy_to(pack, bytes)
        .map_err(|source| PagesError::Store {
            what: format!("reading pack {pack}"),
            source,
        })?;
    let parsed = Pack::parse(*pack, bytes)?;
    // One stored page may be used at several places: decode each distinct slot once.
    let mut distinct: Vec<(u32, Digest256)> = want.iter().map(|(s, d, _)| (*s, *d)).collect();
    distinct.dedup_by_key(|(s, _)| *s);
    let first_page = |slot: u32| {
        let k = want.partition_point(|(s, _, _)| *s < slot);
        want.get(k).map_or(0, |(_, _, n)| *n)
    };
    // Pages that follow each other in the file are written with one call (up to WRITE_RUN
    // bytes): a first snapshot's packs hold pages in file order, so most writes are long.
    let mut run = Run::new(out, out_path);
    let mut write = |slot: u32, page: &[u8]| -> Result<(), PagesError> {
        let k = want.partition_point(|(s, _, _)| *s < slot);
        for (_, _, n) in want[k..].iter().take_while(|(s, _, _)| *s == slot) {
            run.push(*n, page)?;
        }
        Ok(())
    };
    parsed
        .for_each_page(&distinct, &mut write)
        .map_err(|err| match err {
            PagesError::Pack(source @ PackError::BadPage { slot, .. }) => PagesError::BadPage {
                page: first_page(slot),
                source,
            },
            other => other,
        })?;
    run.flush()
}

/// Most bytes written by one call when rebuilding a file.
const WRITE_RUN: usize = 256 * 1024;

/// Consecutive pages gathered for one `pwrite`.
struct Run<'a> {
    out: &'a File,
    path: &'a std::path::Path,
    first: u64,
    buf: Vec<u8>,
}

impl<'a> Run<'a> {
    fn new(out: &'a File, path: &'a std::path::Path) -> Self {
        Self {
            out,
            path,
            first: 0,
            buf: Vec::with_capacity(WRITE_RUN),
        }
    }

    /// Add page number `n`; write what is gathered first when `n` does not follow it.
    fn push(&mut self, n: u64, page: &[u8]) -> Result<(), PagesError> {
        let next = self.first + (self.buf.len() / PAGE_SIZE) as u64;
        if !self.buf.is_empty() && (n != next || self.buf.len() >= WRITE_RUN) {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.first = n;
        }
        self.buf.extend_from_slice(page);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PagesError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.out
            .write_all_at(&self.buf, self.first * PAGE_SIZE as u64)
            .map_err(|source| PagesError::Io {
                op: "write",
                path: self.path.to_owned(),
                source,
            })?;
        self.buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBlobStore;

    /// A page that is the same for the same `seed` and incompressible.
    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut p = vec![0u8; PAGE_SIZE];
        for c in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    /// A file of pages: `Some(seed)` a page from `seed`, `None` a zero page.
    fn file_of(
        dir: &std::path::Path,
        name: &str,
        pages: &[Option<u64>],
    ) -> (File, std::path::PathBuf) {
        let path = dir.join(name);
        let mut bytes = Vec::new();
        for p in pages {
            match p {
                Some(seed) => bytes.extend_from_slice(&page(*seed)),
                None => bytes.extend_from_slice(&[0u8; PAGE_SIZE]),
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        (File::open(&path).expect("open"), path)
    }

    fn rebuild(
        store: &dyn BlobStore,
        manifest: &Digest256,
        dir: &std::path::Path,
    ) -> Result<Vec<u8>, PagesError> {
        let path = dir.join(format!("out-{}", manifest.hex()));
        let _ = std::fs::remove_file(&path);
        let out = File::options()
            .create_new(true)
            .write(true)
            .open(&path)
            .expect("create");
        read_pages(store, manifest, &out, &path, 2)?;
        Ok(std::fs::read(&path).expect("read back"))
    }

    #[test]
    fn files_round_trip_and_zero_pages_take_no_space() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let mut layout: Vec<Option<u64>> = (0..3000).map(Some).collect();
        for i in (0..3000).step_by(3) {
            layout[i] = None;
        }
        layout[7] = Some(1); // a repeat inside the file
        let (file, path) = file_of(tmp.path(), "a", &layout);
        let mut w = PageWriter::new(&store, PageIndex::none(), 2);
        let stored = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        assert_eq!(stored.pages, 3000);
        assert_eq!(stored.zero_pages, 1000);
        assert_eq!(stored.new_pages, 1999, "distinct non-zero pages only");
        // Incompressible pages: the packs are about the new pages' size, zero pages add nothing.
        let raw = 1999 * PAGE_SIZE as u64;
        assert!(stored.pack_bytes < raw + raw / 50, "{}", stored.pack_bytes);
        let m = load_manifest(&store, &stored.manifest).expect("manifest");
        assert_eq!(m.packs.len(), 1999_usize.div_ceil(PACK_PAGES));
        assert_eq!(
            rebuild(&store, &stored.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path).expect("original")
        );
        // All zero: no pack at all.
        let (file, path) = file_of(tmp.path(), "z", &[None; 40]);
        let mut w = PageWriter::new(&store, PageIndex::none(), 2);
        let before = store.list().expect("list").len();
        let stored = w.write_file(&file, &path).expect("store");
        assert_eq!((stored.new_pages, stored.pack_bytes), (0, 0));
        assert_eq!(
            store.list().expect("list").len(),
            before + 2,
            "list + manifest only"
        );
        assert_eq!(
            rebuild(&store, &stored.manifest, tmp.path()).expect("rebuild"),
            vec![0u8; 40 * PAGE_SIZE]
        );
    }

    #[test]
    fn a_second_file_stores_only_its_changed_pages() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let index = PageIndex::in_dir(&tmp.path().join("index"));
        let first: Vec<Option<u64>> = (0..1000).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "one", &first);
        let mut w = PageWriter::new(&store, index.clone(), 2);
        let one = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        assert_eq!(one.new_pages, 1000);
        // 5% changed, in a new session that knows only the on-disk index.
        let second: Vec<Option<u64>> = (0..1000)
            .map(|i| Some(if i % 20 == 0 { 10_000 + i } else { i }))
            .collect();
        let (file, path) = file_of(tmp.path(), "two", &second);
        let mut w = PageWriter::new(&store, index.clone(), 2);
        let two = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        assert_eq!(two.new_pages, 50);
        assert!(two.pack_bytes < 51 * PAGE_SIZE as u64, "{}", two.pack_bytes);
        let m = load_manifest(&store, &two.manifest).expect("manifest");
        assert_eq!(m.packs.len(), 2, "the old pack and one new one");
        assert_eq!(
            rebuild(&store, &two.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path).expect("original")
        );
        // A pack gc removed is not trusted from the index: its pages are stored again.
        let old_pack = load_manifest(&store, &one.manifest)
            .expect("manifest")
            .packs[0];
        store.remove(&old_pack).expect("remove");
        let mut w = PageWriter::new(&store, index, 2);
        let again = w.write_file(&file, &path).expect("store");
        assert_eq!(again.new_pages, 950);
        assert_eq!(
            rebuild(&store, &again.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path).expect("original")
        );
    }

    #[test]
    fn a_corrupt_page_is_named_and_never_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let layout: Vec<Option<u64>> = (0..100).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "a", &layout);
        let mut w = PageWriter::new(&store, PageIndex::none(), 1);
        let stored = w.write_file(&file, &path).expect("store");
        let m = load_manifest(&store, &stored.manifest).expect("manifest");
        // A pack whose page 42 differs from what the page list says (the store's blob check
        // cannot catch it: the pack is stored under its own digest), with a manifest naming it.
        let mut pack_bytes = store.get(&m.packs[0]).expect("pack");
        let needle = page(42)[64..96].to_vec();
        let at = pack_bytes
            .windows(32)
            .position(|w| w == needle)
            .expect("raw");
        pack_bytes[at] ^= 1;
        let bad_pack = store.put(&pack_bytes).expect("put");
        let forged = PagesManifest {
            packs: vec![bad_pack],
            ..m.clone()
        };
        let forged = store
            .put(&serde_json::to_vec(&forged).expect("json"))
            .expect("put");
        let err = rebuild(&store, &forged, tmp.path()).expect_err("corrupt");
        assert!(matches!(err, PagesError::BadPage { page: 42, .. }), "{err}");
        assert!(err.to_string().contains("page 42"), "{err}");
        // The whole pack's check names the slot too.
        let parsed = Pack::parse(bad_pack, &pack_bytes).expect("parse");
        assert!(matches!(
            parsed.verify(),
            Err(PackError::BadPage { slot: 42, .. })
        ));
    }

    #[test]
    fn files_that_are_not_pages_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("odd");
        std::fs::write(&path, [1u8; 4097]).expect("write");
        let store = MemBlobStore::new();
        let mut w = PageWriter::new(&store, PageIndex::none(), 1);
        let err = w
            .write_file(&File::open(&path).expect("open"), &path)
            .expect_err("odd");
        assert!(
            matches!(err, PagesError::NotPages { len: 4097, .. }),
            "{err}"
        );
    }
}
