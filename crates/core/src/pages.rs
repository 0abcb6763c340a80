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
//! A later version of a file (a re-freeze) may have its list written as the changes from an
//! earlier version's ([`DELTA_MAGIC`]): the manifest then names that list and the ones it
//! builds on in `bases`, and its `packs` begin with the earlier manifest's.
//!
//! [`PageWriter`] writes files this way in one session: pages are hashed on every thread asked
//! for, looked up in the store's [`PageIndex`] (and among the pages the session already wrote),
//! and only new ones go into packs, which are compressed on the same threads; the session's new
//! pages are added to the index when it is [committed](PageWriter::commit). [`read_pages`] does
//! the reverse into a file, never writing a page it has not checked.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError};

use serde::{Deserialize, Serialize};

use crate::digest::Digest256;
use crate::error::Error;
use crate::pack::{PACK_PAGES, PAGE_SIZE, PackBuilder, PackError, is_zero_page, page_digest};
use crate::page_index::{IndexError, PageIndex, PageLoc};
use crate::store::{BlobBatch, BlobStore};

const LIST_MAGIC: &[u8; 8] = b"PFPLST01";
/// A page list written as the changes from another (its *base*): `"PFPLDL01"`, `u64 N`, the
/// base list's 32-byte digest, the base's `u64` page count, `u64 K`, then K operations that
/// together make the N entries in order, each a `u64` kind and two `u64`s: kind 0 `(start,
/// count)` copies the base's entries `start..start + count`; kind 1 `(count, 0)` is followed by
/// `count` entries of 40 bytes as in a whole list. Between the header and the operations, `u64
/// M` and M `u32`s renumber the base's packs: base pack number `k` is this list's pack number
/// `map[k]` in copied entries (`u32::MAX - 1`: a pack this list does not use, which no copied
/// entry may name). Copies from anywhere in the base make a list whose pages moved (a heap that
/// grew in front of them) as small as one whose pages changed in place.
pub const DELTA_MAGIC: &[u8; 8] = b"PFPLDL01";
const LIST_ENTRY: usize = 40;
const DELTA_HEAD: usize = 8 + 8 + 32 + 8 + 8;
const DELTA_OP: usize = 24;
/// In a delta's renumbering: a base pack the list does not use.
const UNUSED: u32 = u32::MAX - 1;
/// A delta's base may itself be a delta, this many deep at most (a writer then writes a whole
/// list again), so reading a list reads at most this many more.
pub const MAX_DELTA_DEPTH: usize = 8;
/// Most pages a file stored page by page may have: 2^35 pages are 128 TiB, the whole of an
/// x86-64 process's address space. A manifest or page list that claims more is refused before
/// anything is sized from its claim.
pub const MAX_PAGES: u64 = 1 << 35;
const ZERO_PACK: u32 = u32::MAX;
/// Pages read (and hashed) per batch by each thread: 1 MiB.
const BATCH_PAGES: usize = 256;
/// How often the packer tells its caller how far it has read a file for the last time (so the
/// file's memory can be freed as the packing goes on): every 32 MiB, a multiple of a batch.
const READ_STEP_PAGES: usize = 32 * BATCH_PAGES;
/// Runs of pages shorter than this are read with `pread`, longer ones mapped (`mapped.rs`):
/// mapping and unmapping cost about 10-20 us whatever the length (the unmapping's TLB
/// shootdown), against about 1.5 us to copy a page. A re-freeze packs its changed pages from
/// a file in runs of one page: mapped each, 851 of them took 22 ms instead of 15.
const MAP_MIN_PAGES: usize = 16;
/// Finished packs (8 MiB raw each, less compressed) waiting for the store, besides the ones
/// being written: none (writing a pack into a batch is quick).
const PUT_QUEUE: usize = 0;
/// Threads naming and writing finished packs, at most one more than the writer's threads: naming
/// a pack (SHA-256 of its bytes) is the slowest step, and a pack's direct writes wait for the
/// disk. By hand, 1 GiB: two rather than one, time after the pause of a re-freeze -8% (16
/// pairs), of a first freeze -4% (5 pairs); three rather than two on 2 cores once packs were
/// written with direct I/O, first freeze 1.55 -> 1.49 s and 1.78 -> 1.61 s (5 and 6 pairs;
/// four: 1.48 s, 10 MiB more memory each).
const PUTTERS: usize = 3;

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
    /// When `list` is a delta (see [`DELTA_MAGIC`]): the page lists it is a delta of, nearest
    /// first, down to a whole one. Named here so that everything that follows a manifest's
    /// `sha256:` strings (gc, push, verify) keeps and carries them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<Digest256>,
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
    /// A read asked for pages the file does not have, or for a part of a page.
    #[error(
        "cannot read {len} bytes from page {first} of a file of {pages} pages: reads are whole \
         pages inside the file"
    )]
    OutOfRange {
        /// The first page asked for.
        first: u64,
        /// Bytes asked for.
        len: usize,
        /// Pages in the file.
        pages: u64,
    },
    /// A page list claims more pages than this machine has the memory to read (a hostile one
    /// can claim any number; see [`MAX_PAGES`]).
    #[error(
        "page list {digest} claims {pages} pages ({}): reading it (with its base) needs {:.1} \
         GiB of memory, more than the {:.1} GiB this machine has available; read it on a \
         machine with more memory, or delete the snapshot if it came from someone you do not \
         trust",
        human_pages(*.pages),
        *.need as f64 / (1u64 << 30) as f64,
        *.available as f64 / (1u64 << 30) as f64
    )]
    TooLarge {
        /// The page list.
        digest: Digest256,
        /// The pages it claims.
        pages: u64,
        /// Bytes of memory reading it would take.
        need: u64,
        /// Bytes of memory available (`MemAvailable` and `SwapFree`).
        available: u64,
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
    /// Pages whose base (an earlier version of the file) lists them at the same place: placed
    /// where it has them, not looked up in the page index.
    pub from_base_pages: u64,
}

/// Where a session knows a page to be: (the pack's number in the session's pack table, slot).
type Loc = (u32, u32);

/// A session that stores files page by page into one store.
///
/// Its packs, page lists and manifests go into one [`BlobBatch`] of the store: written as they
/// are made, but made durable and visible together by [`commit`](Self::commit), with one sync
/// round, before the session's pages enter the page index. So the caller must commit before it
/// puts anything that names a manifest (the manifests' digests are known at once). Dropping the
/// session without committing (or after an error, which leaves it unusable) removes what it
/// wrote and leaves the index untouched.
#[derive(Debug)]
pub struct PageWriter<'a> {
    store: &'a dyn BlobStore,
    batch: Option<Box<dyn BlobBatch + 'a>>,
    index: PageIndex,
    threads: usize,
    /// The session's pack table: every pack it knows pages in (named by the index and found in
    /// the store, or written by the session), by number.
    packs: Vec<Digest256>,
    /// Whether the session wrote the pack of the same number (its pages go into the index).
    written: Vec<bool>,
    pack_ids: crate::DigestMap<u32>,
    /// Packs the index named that are no longer in the store.
    missing: std::collections::HashSet<Digest256>,
    /// Every distinct page the session knows where to find: 40 bytes each.
    known: crate::DigestMap<Loc>,
    /// The manifests the session wrote, with their packs: at commit each pack's
    /// [`MANIFEST_HINT`] names the latest manifest using it.
    manifests: Vec<(Digest256, Vec<Digest256>)>,
    /// Packs numbered below this one were packed during a capture ([`Self::with_prepacked`]).
    prepacked: u32,
}

/// The hint kind ([`BlobStore::hint_path`]) naming, per pack, the latest manifest written that
/// uses it: how a writer not told the base of a file finds one (the manifest naming the pack
/// that holds most of the file's known pages), so the page list of a re-freeze is written as
/// a delta whoever calls. Only ever a guess: a base changes how a list is written, never what
/// it reads back as.
pub const MANIFEST_HINT: &str = "manifest-of-pack";

/// Whole pages for [`prepack`]: `digests[i]` is the SHA-256 of the `i`-th page of `bytes`
/// (which holds whole pages only, at least as many as `digests` names).
#[derive(Debug, Default)]
pub struct PagesIn {
    /// The pages, one after another.
    pub bytes: Vec<u8>,
    /// Their digests, computed by the sender from these very bytes.
    pub digests: Vec<Digest256>,
}

/// Packs [`prepack`] made while a capture still ran, in a batch of their own that a
/// [`PageWriter`] takes over ([`PageWriter::with_prepacked`]): they become durable, visible and
/// indexed with its commit, or are removed with it.
pub struct PrePacked<'a> {
    batch: Box<dyn BlobBatch + 'a>,
    /// Each pack, in order, with its pages' digests by slot.
    packs: Vec<(Digest256, Vec<Digest256>)>,
    pack_bytes: u64,
}

impl std::fmt::Debug for PrePacked<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrePacked")
            .field("packs", &self.packs.len())
            .field("pages", &self.pages())
            .field("pack_bytes", &self.pack_bytes)
            .finish()
    }
}

impl PrePacked<'_> {
    /// Pages packed.
    pub fn pages(&self) -> u64 {
        self.packs.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// Raw bytes of the packs.
    pub fn pack_bytes(&self) -> u64 {
        self.pack_bytes
    }
}

/// Pack the pages that come through `pages` until every sender is gone, each distinct page once
/// (a page sent again is left out), into a new batch of `store`: compressed on this thread,
/// named and written on up to [`PUTTERS`] others. Each [`PagesIn`]'s buffer goes back through
/// `spare` once its pages are in a pack (dropped if `spare` is full or gone). This is how a
/// capture packs the pages it must keep while the dump still runs, instead of keeping them in a
/// file to pack afterwards. The digests are trusted, as the sender computed them: every page is
/// checked against its digest again whenever it is read.
pub fn prepack<'a>(
    store: &'a dyn BlobStore,
    threads: usize,
    pages: std::sync::mpsc::Receiver<PagesIn>,
    spare: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<PrePacked<'a>, PagesError> {
    let batch = store.batch().map_err(|source| PagesError::Store {
        what: "starting a batch of puts".to_owned(),
        source,
    })?;
    let mut slots: Vec<Vec<Digest256>> = Vec::new();
    let (stored, packed) = put_packs(&*batch, threads, |send, pack_spare, failed| {
        let mut seen = crate::DigestMap::<()>::default();
        let mut pack = PackBuilder::new(1);
        let mut in_pack: Vec<Digest256> = Vec::with_capacity(PACK_PAGES);
        let mut finish = |pack: &mut PackBuilder, in_pack: &mut Vec<Digest256>| {
            let mut bytes = pack_spare.try_recv().unwrap_or_default();
            let start = pack.finish_aligned(&mut bytes)?;
            send.send((slots.len() as u32, bytes, start))
                .map_err(|_| PagesError::Store {
                    what: "storing a pack".to_owned(),
                    source: crate::Error::Io {
                        op: "hand over",
                        path: std::path::PathBuf::new(),
                        source: std::io::Error::other("the pack writer stopped"),
                    },
                })?;
            slots.push(std::mem::replace(in_pack, Vec::with_capacity(PACK_PAGES)));
            Ok::<(), PagesError>(())
        };
        for batch in pages {
            // A pack was refused: stop taking pages at once (the put's error is reported).
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(PagesError::Store {
                    what: "storing a pack".to_owned(),
                    source: crate::Error::Io {
                        op: "hand over",
                        path: std::path::PathBuf::new(),
                        source: std::io::Error::other("the pack writer stopped"),
                    },
                });
            }
            for (page, digest) in batch.bytes.chunks_exact(PAGE_SIZE).zip(&batch.digests) {
                if seen.insert(*digest, ()).is_some() {
                    continue;
                }
                pack.push(page, *digest);
                in_pack.push(*digest);
                if pack.is_full() {
                    finish(&mut pack, &mut in_pack)?;
                }
            }
            let _ = spare.try_send(batch.bytes);
        }
        if !pack.is_empty() {
            finish(&mut pack, &mut in_pack)?;
        }
        Ok::<(), PagesError>(())
    });
    // A failed put closes the queue, so packing fails too: report the put's error.
    let stored = stored?;
    packed?;
    let pack_bytes = stored.iter().map(|(_, len)| len).sum();
    Ok(PrePacked {
        batch,
        packs: stored.into_iter().map(|(d, _)| d).zip(slots).collect(),
        pack_bytes,
    })
}

impl<'a> PageWriter<'a> {
    /// A session writing into `store`, deduplicating against `index`, on `threads` threads.
    pub fn new(store: &'a dyn BlobStore, index: PageIndex, threads: usize) -> Self {
        Self {
            store,
            batch: None,
            index,
            threads: threads.max(1),
            packs: Vec::new(),
            written: Vec::new(),
            pack_ids: crate::DigestMap::default(),
            missing: std::collections::HashSet::new(),
            known: crate::DigestMap::default(),
            manifests: Vec::new(),
            prepacked: 0,
        }
    }

    /// A session that starts with the packs `prepacked` made: its batch, with them in it, is the
    /// session's, and their pages are known to it as pages it wrote (indexed at commit), unless
    /// the page index has them already: a file's pages are then placed where the store had them.
    pub fn with_prepacked(
        store: &'a dyn BlobStore,
        index: PageIndex,
        threads: usize,
        prepacked: PrePacked<'a>,
    ) -> Self {
        let mut w = Self::new(store, index, threads);
        w.batch = Some(prepacked.batch);
        let pages = prepacked.packs.iter().map(|(_, d)| d.len()).sum();
        w.known.reserve(pages);
        for (pack, digests) in prepacked.packs {
            let id = w.packs.len() as u32;
            w.packs.push(pack);
            w.written.push(true);
            w.pack_ids.entry(pack).or_insert(id);
            for (slot, digest) in (0u32..).zip(digests) {
                w.known.entry(digest).or_insert((id, slot));
            }
        }
        w.prepacked = w.packs.len() as u32;
        w
    }

    /// Store the pages of `file` (at `path`, named in errors), whose length must be a multiple
    /// of 4096, and return its manifest (visible once the session is committed). The file is
    /// read twice (once to hash, once to pack the new pages), so it must not change meanwhile;
    /// it is read through mappings of it, so it must not shrink either (a page cut off while
    /// mapped is a SIGBUS): pf stores files of its own scratch directory.
    pub fn write_file(
        &mut self,
        file: &File,
        path: &std::path::Path,
    ) -> Result<PagesStored, PagesError> {
        self.write_file_prehashed(file, path, Vec::new(), None)
    }

    /// [`write_file`](Self::write_file) for a file whose first pages a [`PageFollower`] already
    /// hashed (`prehashed`, the digests its steps gave) while it was being written:
    /// only the rest is hashed here. The file must have only grown since.
    ///
    /// `base` names the manifest of an earlier version of the same file (the same process's
    /// previous snapshot), if the caller knows one: when most pages are where that one has
    /// them, the page list is written as the changes from its list ([`DELTA_MAGIC`]), about 48
    /// bytes per changed page instead of 40 per page. A base that cannot be read, whose packs
    /// are not all in the store, or whose chain of deltas is already [`MAX_DELTA_DEPTH`] deep
    /// is not used (a whole list is written); it never changes what the file reads back as.
    pub fn write_file_prehashed(
        &mut self,
        file: &File,
        path: &std::path::Path,
        prehashed: Vec<Option<Digest256>>,
        base_manifest: Option<&Digest256>,
    ) -> Result<PagesStored, PagesError> {
        self.write_file_then(file, path, prehashed, base_manifest, &mut |_| {})
    }

    /// [`write_file_prehashed`](Self::write_file_prehashed), calling `read(end)` whenever the
    /// bytes of the file before `end` were read for the last time (its pages hashed, and the
    /// new ones among them packed), with ends that grow, the last the file's length before the
    /// page list is made: the caller may free the file's memory as the packing goes on.
    pub fn write_file_then(
        &mut self,
        file: &File,
        path: &std::path::Path,
        prehashed: Vec<Option<Digest256>>,
        base_manifest: Option<&Digest256>,
        read: &mut dyn FnMut(u64),
    ) -> Result<PagesStored, PagesError> {
        self.write_file_kept(file, path, prehashed, (base_manifest, None), None, read)
    }

    /// [`write_file_then`](Self::write_file_then) for a file whose every page was hashed as it
    /// was captured (`prehashed` covers the whole file) and in which only the pages `kept`
    /// marks were written (the others are holes: zero pages, pages seen earlier in the same
    /// file, pages the store already had). A page the store turns out to lack that was not
    /// kept is an error, never a packed hole. The base may come with its list already open
    /// (used only if it is that manifest's).
    pub fn write_file_kept(
        &mut self,
        file: &File,
        path: &std::path::Path,
        prehashed: Vec<Option<Digest256>>,
        (base_manifest, base_list): (Option<&Digest256>, Option<PagesReader<'a>>),
        kept: Option<&[bool]>,
        read: &mut dyn FnMut(u64),
    ) -> Result<PagesStored, PagesError> {
        let len = file
            .metadata()
            .map_err(|source| PagesError::Io {
                op: "stat",
                path: path.to_owned(),
                source,
            })?
            .len();
        if !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(PagesError::NotPages {
                path: path.to_owned(),
                len,
            });
        }
        let pages = (len / PAGE_SIZE as u64) as usize;
        self.start_batch()?;
        // Pass 1: hash every page not hashed yet on every thread; None marks a zero page.
        let started = std::time::Instant::now();
        if prehashed.len() > pages {
            return Err(PagesError::Io {
                op: "hash the pages of",
                path: path.to_owned(),
                source: std::io::Error::other(format!(
                    "the file shrank to {pages} pages after {} were hashed",
                    prehashed.len()
                )),
            });
        }
        let prehashed_pages = prehashed.len();
        let mut digests = prehashed;
        digests.resize(pages, None);
        // The base, known or guessed from a sample of pages: a page it lists at the same place
        // under the same digest is placed where it has it, without an index lookup.
        // Found and read on a thread of its own while the pages are hashed.
        let this = &*self;
        let given = base_manifest.copied();
        let (base, hashing) = std::thread::scope(|s| {
            let base = s.spawn(|| {
                let manifest = given.or_else(|| this.guess_base(file, path, pages));
                let opened = base_list.filter(|r| Some(r.manifest()) == manifest.as_ref());
                let list = opened.or_else(|| {
                    manifest.and_then(|m| {
                        PagesReader::open(this.store, &m)
                            .inspect_err(|e| tracing::debug!(base = %m, error = %e, "no base list"))
                            .ok()
                    })
                });
                (manifest, list, started.elapsed())
            });
            let hashing =
                this.hash_all(file, path, prehashed_pages, &mut digests[prehashed_pages..]);
            (
                base.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                hashing,
            )
        });
        hashing?;
        let (sampled, base_list, base_opened) = base;
        let base_manifest = sampled.as_ref();
        let hashed = started.elapsed();
        // Where the base has it, if that pack is still in the store. The digest is the page's
        // own hash, so a wrong base entry can only make the page unreadable (its bytes there do
        // not check), never wrong. Kept by page number (`placed`), not put into `known`: a
        // re-freeze's base lists most of its pages at their own place, and a map of them all
        // cost more than the rest of the lookups (a GiB's 160k distinct pages: 27-35 ms, then a
        // lookup in it per page to find the new ones).
        let mut from_base = 0u64;
        let mut placed: Vec<Option<Loc>> = Vec::new();
        if let Some(reader) = &base_list {
            // The session's number for each of the base's packs (None: not in the store), asked
            // once per pack, not once per page.
            let mut ids: Vec<Option<Option<u32>>> = Vec::new();
            placed.resize(digests.len(), None);
            for (i, digest) in digests.iter().enumerate() {
                let Some(digest) = digest else { continue };
                if self.known.contains_key(digest) {
                    continue;
                }
                let Some(ListedPage {
                    digest: listed,
                    at: Some((k, slot)),
                }) = reader.listed(i as u64)
                else {
                    continue;
                };
                if listed != *digest {
                    continue;
                }
                let k = k as usize;
                if ids.len() <= k {
                    ids.resize(k + 1, None);
                }
                let id = match ids[k] {
                    Some(id) => id,
                    None => {
                        let id = match reader.pack(k as u32) {
                            Some(pack) => self.present_pack(&pack)?,
                            None => None,
                        };
                        ids[k] = Some(id);
                        id
                    }
                };
                if let Some(id) = id {
                    placed[i] = Some((id, slot));
                    from_base += 1;
                }
            }
        }
        let is_placed = |i: usize| placed.get(i).is_some_and(Option::is_some);
        // Which of them the store already has: also those packed during the capture (which
        // could not look them up then), so that pages the store had are used where they are
        // (their copies in the capture's packs are then dead bytes, which `gc` reports and
        // `gc --repack` drops).
        let prepacked = self.prepacked;
        let mut unknown: Vec<Digest256> = digests
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_placed(*i))
            .filter_map(|(_, d)| *d)
            .filter(|d| self.known.get(d).is_none_or(|(id, _)| *id < prepacked))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        let found = self.index.lookup(&unknown)?;
        let looked_up = started.elapsed();
        // Without a base given, the latest manifest using the pack that holds most known pages.
        let guessed = match base_manifest {
            Some(_) => None,
            None => {
                let mut votes: HashMap<Digest256, usize> = HashMap::new();
                for loc in found.values() {
                    *votes.entry(loc.pack).or_default() += 1;
                }
                votes
                    .into_iter()
                    .max_by_key(|(pack, n)| (*n, *pack))
                    .and_then(|(pack, _)| self.manifest_using(&pack))
            }
        };
        let base_manifest = base_manifest.or(guessed.as_ref());
        tracing::debug!(file = %path.display(), base = ?base_manifest, "the base of its page list");
        let new_estimate = unknown.len().saturating_sub(found.len());
        drop(unknown);
        self.known.reserve(found.len() + new_estimate);
        for (digest, loc) in found {
            if let Some(id) = self.present_pack(&loc.pack)? {
                self.known.insert(digest, (id, loc.slot));
            }
        }
        // A page away from its own place that the base has at another page's (a copy, or a
        // moved page) and the index did not find (a store without one): taken from there.
        if !placed.is_empty() {
            let pending: crate::DigestMap<()> = digests
                .iter()
                .enumerate()
                .filter(|(i, _)| !is_placed(*i))
                .filter_map(|(_, d)| d.filter(|d| !self.known.contains_key(d)))
                .map(|d| (d, ()))
                .collect();
            if !pending.is_empty() {
                for (digest, loc) in digests.iter().zip(&placed) {
                    if let (Some(digest), Some(loc)) = (digest, loc)
                        && pending.contains_key(digest)
                    {
                        self.known.entry(*digest).or_insert(*loc);
                    }
                }
            }
        }
        // Pages a capture left out because the base lists them, at another place than here and
        // not found through the index (an entry there may name a pack that is gone): placed
        // where the base has them.
        if let (Some(kept), Some(reader)) = (kept, &base_list) {
            let needed: crate::DigestMap<()> = digests
                .iter()
                .zip(kept)
                .enumerate()
                .filter(|(i, _)| !is_placed(*i))
                .filter_map(|(_, (d, k))| d.filter(|d| !k && !self.known.contains_key(d)))
                .map(|d| (d, ()))
                .collect();
            if !needed.is_empty() {
                for listed in reader.list() {
                    if let Some((k, slot)) = listed.at
                        && needed.contains_key(&listed.digest)
                        && !self.known.contains_key(&listed.digest)
                        && let Some(pack) = reader.pack(k)
                        && let Some(id) = self.present_pack(&pack)?
                    {
                        self.known.insert(listed.digest, (id, slot));
                    }
                }
            }
        }
        // Pass 2: the new pages into packs, in file order. Packs are compressed here and handed
        // to threads that name them and write them into the batch (unsynced), so naming and
        // writing overlap the next packs' reading and compression. The k-th new pack is number
        // `base + k`, whichever thread puts it.
        let base = self.packs.len() as u32;
        let threads = self.threads;
        let batch: &dyn BlobBatch = self
            .batch
            .as_deref()
            .unwrap_or_else(|| unreachable!("the batch was just started"));
        let known = &mut self.known;
        let (stored, packed) = put_packs(batch, threads, |send, spare, _| {
            pack_new_pages(
                (file, path, kept),
                (&digests, &placed),
                known,
                (base, threads),
                (&send, spare),
                &mut *read,
            )
        });
        // A failed put closes the queue, so pack_new_pages fails too: report the put's error.
        let stored = stored?;
        let new_pages = packed?;
        read(len);
        tracing::debug!(
            file = %path.display(),
            prehashed_pages,
            from_base,
            ?base_opened,
            ?hashed,
            ?looked_up,
            packed = ?started.elapsed(),
            "pages hashed, looked up in the index, new ones packed"
        );
        let pack_bytes = stored.iter().map(|(_, len)| len).sum();
        for (digest, _) in &stored {
            self.packs.push(*digest);
            self.written.push(true);
            self.pack_ids
                .entry(*digest)
                .or_insert(self.packs.len() as u32 - 1);
        }
        // The page list, in file order: as the changes from the base's where that is small.
        // The base's list moves from its reader (not copied: a GiB's list is 11 MB).
        let parsed = base_list
            .filter(|r| Some(r.manifest()) == base_manifest)
            .map(PagesReader::into_list);
        let mut base = base_manifest.and_then(|b| self.usable_base(b, parsed));
        if let Some(b) = &mut base {
            // Where the base first lists each page that is not at its own place there, for the
            // page list and the delta alike (one pass over the base's list; a re-freeze's few
            // moved pages do not pay for a map of the whole base).
            // And the zero page's (a page that became zero is copied from a zero page there).
            let moved = digests.iter().enumerate().filter_map(|(i, digest)| {
                let digest = digest.as_ref()?;
                b.list
                    .get(i)
                    .is_none_or(|p| p.digest != *digest || p.at.is_none())
                    .then_some(*digest)
            });
            b.first = b.first_places(moved.chain([zero_page_digest()]));
        }
        let delta = base.as_ref().and_then(|base| {
            let (packs, list, zero_pages) = self.page_list((&digests, &placed), Some(base));
            let delta = delta_of(&list, &packs, base);
            tracing::debug!(
                file = %path.display(),
                whole = list.len(),
                delta = ?delta.as_ref().map(Vec::len),
                "page list against its base"
            );
            delta.map(|delta| (packs, delta, zero_pages))
        });
        let (manifest_packs, list, zero_pages, bases) = match delta {
            Some((packs, delta, zero_pages)) => {
                let base = base
                    .as_ref()
                    .unwrap_or_else(|| unreachable!("a delta has a base"));
                let mut bases = vec![base.manifest.list];
                bases.extend_from_slice(&base.manifest.bases);
                (packs, delta, zero_pages, bases)
            }
            None => {
                let (packs, list, zero_pages) = self.page_list((&digests, &placed), None);
                (packs, list, zero_pages, Vec::new())
            }
        };
        drop(digests);
        // Page digests do not compress: the list is stored as it is.
        let list = batch_of(&self.batch)
            .put_raw(&list)
            .map_err(|source| PagesError::Store {
                what: format!("storing the page list of {}", path.display()),
                source,
            })?;
        let manifest = PagesManifest {
            page_size: PAGE_SIZE as u32,
            pages: pages as u64,
            zero_pages,
            packs: manifest_packs,
            list,
            bases,
        };
        let packs_used = manifest.packs.clone();
        let json = serde_json::to_vec(&manifest).unwrap_or_default();
        let manifest = batch_of(&self.batch)
            .put(&json)
            .map_err(|source| PagesError::Store {
                what: format!("storing the pages manifest of {}", path.display()),
                source,
            })?;
        self.manifests.push((manifest, packs_used));
        Ok(PagesStored {
            manifest,
            pages: pages as u64,
            zero_pages,
            new_pages,
            pack_bytes,
            from_base_pages: from_base,
        })
    }

    fn start_batch(&mut self) -> Result<(), PagesError> {
        if self.batch.is_none() {
            let batch = self.store.batch().map_err(|source| PagesError::Store {
                what: "starting a batch of puts".to_owned(),
                source,
            })?;
            self.batch = Some(batch);
        }
        Ok(())
    }

    /// Store `bytes` (compressed, as [`BlobStore::put`]) with the session's pages: durable and
    /// visible with them at [`commit`](Self::commit), in the same sync round.
    pub fn put_beside(&mut self, bytes: &[u8]) -> Result<Digest256, PagesError> {
        self.start_batch()?;
        batch_of(&self.batch)
            .put(bytes)
            .map_err(|source| PagesError::Store {
                what: "storing a blob beside the pages".to_owned(),
                source,
            })
    }

    /// Make everything the session stored durable and visible (one sync round for all of it),
    /// then add the pages it put into new packs to the index.
    pub fn commit(mut self) -> Result<(), PagesError> {
        let batch = self.batch.take();
        let known = std::mem::take(&mut self.known);
        let count = known
            .values()
            .filter(|(id, _)| self.written[*id as usize])
            .count();
        let mut added = Vec::with_capacity(count);
        for (digest, (id, slot)) in known {
            if self.written[id as usize] {
                let pack = self.packs[id as usize];
                added.push((digest, PageLoc { pack, slot }));
            }
        }
        // The index run is sorted and written while the batch syncs: an entry whose pack did
        // not make it (a failed commit, a crash) is never used, as a writer only takes index
        // entries whose pack the store has.
        let index = &self.index;
        let (committed, indexed) = std::thread::scope(|s| {
            let indexed = s.spawn(move || index.add(added));
            let committed = batch.map_or(Ok(()), |batch| batch.commit());
            (
                committed,
                indexed
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            )
        });
        committed.map_err(|source| PagesError::Store {
            what: "syncing the packs, page lists and manifests".to_owned(),
            source,
        })?;
        indexed?;
        for (manifest, packs) in std::mem::take(&mut self.manifests) {
            remember_manifest(self.store, &manifest, &packs);
        }
        Ok(())
    }

    /// The manifest [`MANIFEST_HINT`] says last used `pack`, if any.
    fn manifest_using(&self, pack: &Digest256) -> Option<Digest256> {
        manifest_using(self.store, pack)
    }

    /// The whole page list of `digests` (every one known to the session): the manifest's pack
    /// table, the list's bytes and the count of zero pages. With a base, the table begins with
    /// the base's and a page the base has at the same number keeps the base's entry.
    fn page_list(
        &self,
        (digests, placed): (&[Option<Digest256>], &[Option<Loc>]),
        base: Option<&Base>,
    ) -> (Vec<Digest256>, Vec<u8>, u64) {
        let mut packs: Vec<Digest256> = Vec::new();
        // Numbered by digest (a pack the base has may also be one the session found), but
        // asked once per pack of either numbering, not once per page.
        let mut number_of: crate::DigestMap<u32> = crate::DigestMap::default();
        let mut by_base: Vec<u32> = Vec::new();
        let mut by_id: Vec<u32> = Vec::new();
        let mut number = |pack: Digest256, cache: &mut Vec<u32>, at: usize| -> u32 {
            if cache.len() <= at {
                cache.resize(at + 1, UNUSED);
            }
            if cache[at] == UNUSED {
                cache[at] = *number_of.entry(pack).or_insert_with(|| {
                    packs.push(pack);
                    (packs.len() - 1) as u32
                });
            }
            cache[at]
        };
        let mut list = Vec::with_capacity(16 + digests.len() * LIST_ENTRY);
        list.extend_from_slice(LIST_MAGIC);
        list.extend_from_slice(&(digests.len() as u64).to_le_bytes());
        let zero = zero_page_digest();
        let mut zero_pages = 0u64;
        let at_same_place = |b: &Base, i: usize, digest: &Digest256| {
            b.list
                .get(i)
                .filter(|p| p.digest == *digest)
                .and_then(|p| p.at)
        };
        let packed_now = |digest: &Digest256| {
            self.known
                .get(digest)
                .is_some_and(|&(id, _)| self.written[id as usize])
        };
        for (i, digest) in digests.iter().enumerate() {
            let Some(digest) = digest else {
                zero_pages += 1;
                list.extend_from_slice(zero.as_bytes());
                list.extend_from_slice(&ZERO_PACK.to_le_bytes());
                list.extend_from_slice(&0u32.to_le_bytes());
                continue;
            };
            // Where the base has it, if it does (so its entry can be copied), else where the
            // session found or put it.
            // (A page this session packed anew is not looked for elsewhere in the base: every
            // pack of a usable base is in the store, so a page the base lists at its own place
            // was placed from it; one it lists elsewhere is in a new pack only if the index
            // did not know it, and that pack holds it as well.)
            let in_base = base.and_then(|b| {
                at_same_place(b, i, digest).or_else(|| {
                    if packed_now(digest) {
                        return None;
                    }
                    b.first.get(digest).and_then(|&j| b.list[j].at)
                })
            });
            let (n, slot) = match base.zip(in_base) {
                Some((b, (k, slot))) => (
                    number(b.manifest.packs[k as usize], &mut by_base, k as usize),
                    slot,
                ),
                None => {
                    let (id, slot) = match placed.get(i).copied().flatten() {
                        Some(loc) => loc,
                        None => self.known[digest],
                    };
                    (
                        number(self.packs[id as usize], &mut by_id, id as usize),
                        slot,
                    )
                }
            };
            list.extend_from_slice(digest.as_bytes());
            list.extend_from_slice(&n.to_le_bytes());
            list.extend_from_slice(&slot.to_le_bytes());
        }
        (packs, list, zero_pages)
    }

    /// The base manifest `digest` and its whole list (`parsed`, if a reader has it already),
    /// if a delta may be written against it.
    fn usable_base(&self, digest: &Digest256, parsed: Option<Vec<ListedPage>>) -> Option<Base> {
        let why = match self.read_base(digest, parsed) {
            Ok(Ok(base)) => return Some(base),
            Ok(Err(why)) => why,
            Err(e) => e.to_string(),
        };
        tracing::debug!(base = %digest, %why, "writing a whole page list");
        None
    }

    fn read_base(
        &self,
        digest: &Digest256,
        parsed: Option<Vec<ListedPage>>,
    ) -> Result<Result<Base, String>, PagesError> {
        let manifest = load_manifest(self.store, digest)?;
        if manifest.bases.len() + 1 > MAX_DELTA_DEPTH {
            return Ok(Err("its chain of deltas is as deep as allowed".to_owned()));
        }
        for pack in &manifest.packs {
            if !self.has_pack(pack)? {
                return Ok(Err(format!("its pack {pack} is not in the store")));
            }
        }
        let list = match parsed {
            Some(list) => list,
            None => {
                let bytes = self
                    .store
                    .get(&manifest.list)
                    .map_err(|source| PagesError::Store {
                        what: format!("reading the page list {}", manifest.list),
                        source,
                    })?;
                parse_list(self.store, &manifest.list, &bytes, &manifest)?
            }
        };
        Ok(Ok(Base {
            manifest,
            list,
            first: crate::DigestMap::default(),
        }))
    }

    /// Whether the store holds `pack`.
    fn has_pack(&self, pack: &Digest256) -> Result<bool, PagesError> {
        self.store
            .contains(pack)
            .map_err(|source| PagesError::Store {
                what: format!("looking for pack {pack}"),
                source,
            })
    }

    /// The session's number for `pack`, a pack the index named, if it is still in the store.
    fn present_pack(&mut self, pack: &Digest256) -> Result<Option<u32>, PagesError> {
        if let Some(&id) = self.pack_ids.get(pack) {
            return Ok(Some(id));
        }
        if self.missing.contains(pack) {
            return Ok(None);
        }
        if !self.has_pack(pack)? {
            self.missing.insert(*pack);
            return Ok(None);
        }
        self.packs.push(*pack);
        self.written.push(false);
        let id = self.packs.len() as u32 - 1;
        self.pack_ids.insert(*pack, id);
        Ok(Some(id))
    }

    /// The digests (None for a zero page) of the pages from page `from` on into `out`, one
    /// per page, hashed on `threads` threads.
    fn hash_all(
        &self,
        file: &File,
        path: &std::path::Path,
        from: usize,
        out: &mut [Option<Digest256>],
    ) -> Result<(), PagesError> {
        let per = out.len().div_ceil(self.threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = out
                .chunks_mut(per)
                .enumerate()
                .map(|(t, out)| {
                    s.spawn(move || -> Result<(), PagesError> {
                        let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
                        hash_pages(file, path, from + t * per, out, &mut buf)
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    /// The manifest a file of `pages` pages is most likely a later version of: hash a sample
    /// of its pages (64, spread over it), find them in the index, and take the latest manifest
    /// ([`MANIFEST_HINT`]) using the pack that holds most. Only ever a guess.
    fn guess_base(&self, file: &File, path: &std::path::Path, pages: usize) -> Option<Digest256> {
        const SAMPLE: usize = 64;
        if pages == 0 {
            return None;
        }
        let mut page = vec![0u8; PAGE_SIZE];
        let mut digests = Vec::with_capacity(SAMPLE);
        for i in (0..pages).step_by(pages.div_ceil(SAMPLE)) {
            read_at(file, path, &mut page, (i * PAGE_SIZE) as u64).ok()?;
            if !is_zero_page(&page) {
                digests.push(page_digest(&page));
            }
        }
        guess_base_of(self.store, &self.index, digests)
    }
}

/// The manifest a file holding the pages `sample` (digests, any order) is most likely a later
/// version of: the latest manifest ([`MANIFEST_HINT`]) using the pack of `index` that holds
/// most of them. Only ever a guess.
pub fn guess_base_of(
    store: &dyn BlobStore,
    index: &PageIndex,
    mut sample: Vec<Digest256>,
) -> Option<Digest256> {
    sample.sort_unstable();
    sample.dedup();
    let found = index.lookup(&sample).ok()?;
    let mut votes: HashMap<Digest256, usize> = HashMap::new();
    for loc in found.values() {
        *votes.entry(loc.pack).or_default() += 1;
    }
    let (pack, _) = votes.into_iter().max_by_key(|(pack, n)| (*n, *pack))?;
    manifest_using(store, &pack)
}

/// The manifest [`MANIFEST_HINT`] says last used `pack`, if any.
fn manifest_using(store: &dyn BlobStore, pack: &Digest256) -> Option<Digest256> {
    let path = store.hint_path(MANIFEST_HINT, pack)?;
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok()
}

/// Hash the pages of `file` from page `first` on into `out` (None for a zero page), a
/// [`BATCH_PAGES`] at a time: mapped where they lie, or read into `buf` (a run shorter than
/// [`MAP_MIN_PAGES`], or mapping refused).
fn hash_pages(
    file: &File,
    path: &std::path::Path,
    first: usize,
    out: &mut [Option<Digest256>],
    buf: &mut [u8],
) -> Result<(), PagesError> {
    let mut at_index = Vec::with_capacity(BATCH_PAGES);
    let mut digests = Vec::with_capacity(BATCH_PAGES);
    for start in (0..out.len()).step_by(BATCH_PAGES) {
        let n = BATCH_PAGES.min(out.len() - start);
        let at = (first + start) as u64 * PAGE_SIZE as u64;
        let run = PagesRun::of((file, path), (at, n), true, buf)?;
        let bytes = run.bytes();
        let mut pages: Vec<&[u8]> = Vec::with_capacity(n);
        at_index.clear();
        for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            out[start + i] = None;
            if !is_zero_page(page) {
                pages.push(page);
                at_index.push(start + i);
            }
        }
        digests.clear();
        crate::pack::page_digests(&pages, &mut digests);
        for (&i, d) in at_index.iter().zip(&digests) {
            out[i] = Some(*d);
        }
    }
    Ok(())
}

/// Hashes the pages of a file another process is still appending to, a slice at a time, so
/// [`PageWriter::write_file_prehashed`] need only hash what came after. Made for CRIU's
/// `pages-<N>.img`, which `criu dump` writes front to back and never rewrites: a page below
/// the file's size is final. Only whole pages are hashed; each step hands over the digests of
/// its own pages only, so the caller keeps the one copy.
#[derive(Debug)]
pub struct PageFollower {
    file: File,
    path: std::path::PathBuf,
    hashed: usize,
    step: Vec<Option<Digest256>>,
    buf: Vec<u8>,
}

impl PageFollower {
    /// Pages hashed per [`step`](Self::step) at most: 4 MiB.
    pub const STEP_PAGES: usize = 4 * BATCH_PAGES;

    /// Follow `file`, opened at `path` (named in errors). It is read through mappings of it,
    /// so it must only ever grow (a page cut off while mapped is a SIGBUS).
    pub fn new(file: File, path: std::path::PathBuf) -> Self {
        Self {
            file,
            path,
            hashed: 0,
            step: Vec::new(),
            buf: vec![0u8; BATCH_PAGES * PAGE_SIZE],
        }
    }

    /// Hash up to [`STEP_PAGES`](Self::STEP_PAGES) whole pages written since the last step and
    /// return their digests, in file order (None for a zero page; empty: nothing new yet).
    pub fn step(&mut self) -> Result<&[Option<Digest256>], PagesError> {
        let len = self
            .file
            .metadata()
            .map_err(|source| PagesError::Io {
                op: "stat",
                path: self.path.clone(),
                source,
            })?
            .len();
        let whole = usize::try_from(len / PAGE_SIZE as u64).unwrap_or(usize::MAX);
        let n = whole.saturating_sub(self.hashed).min(Self::STEP_PAGES);
        self.step.clear();
        self.step.resize(n, None);
        if n > 0 {
            hash_pages(
                &self.file,
                &self.path,
                self.hashed,
                &mut self.step,
                &mut self.buf,
            )?;
            self.hashed += n;
        }
        Ok(&self.step)
    }

    /// Pages hashed so far.
    pub fn pages(&self) -> usize {
        self.hashed
    }

    /// The file followed.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Record that `manifest` is the latest to use each of `packs` ([`MANIFEST_HINT`]), so a later
/// freeze of the same memory finds it as the base of its page list. Best effort: a hint not
/// written only means a whole list later.
pub fn remember_manifest(store: &dyn BlobStore, manifest: &Digest256, packs: &[Digest256]) {
    for pack in packs {
        if let Some(path) = store.hint_path(MANIFEST_HINT, pack)
            && let Err(e) = crate::hint::overwrite(&path, manifest.to_string().as_bytes())
        {
            tracing::debug!(error = %e, path = %path.display(), "hint not written");
        }
    }
}

/// A base a page list may be written as the changes from: its manifest and whole list.
struct Base {
    manifest: PagesManifest,
    list: Vec<ListedPage>,
    /// The first place the base lists each page of the file that it does not list at the
    /// page's own place ([`Base::first_places`]).
    first: crate::DigestMap<usize>,
}

impl Base {
    /// The first place the base lists each of `wanted` it lists (zero pages under the zero
    /// page's digest), found in one pass over the list: a map of only these, not of the whole
    /// base (a GiB's would be 264k entries, ~20 MB, for a re-freeze's few moved pages).
    fn first_places(&self, wanted: impl Iterator<Item = Digest256>) -> crate::DigestMap<usize> {
        let wanted: crate::DigestMap<()> = wanted.map(|d| (d, ())).collect();
        let mut first = crate::DigestMap::default();
        if wanted.is_empty() {
            return first;
        }
        let zero = zero_page_digest();
        for (j, page) in self.list.iter().enumerate() {
            let digest = if page.at.is_none() { zero } else { page.digest };
            if wanted.contains_key(&digest) {
                first.entry(digest).or_insert(j);
            }
        }
        first
    }
}

/// `list` (a whole list numbering `packs`) as copies from `base`'s list and new entries, if the
/// new entries are at most a quarter of its pages. A copy continues where the last one ended
/// when it can (so runs of equal entries, zero pages, stay one copy), else starts at the first
/// place the base lists the entry; base entries are compared as they read once renumbered.
fn delta_of(list: &[u8], packs: &[Digest256], base: &Base) -> Option<Vec<u8>> {
    let body = &list[16..];
    let pages = body.len() / LIST_ENTRY;
    let entry = |i: usize| &body[i * LIST_ENTRY..(i + 1) * LIST_ENTRY];
    let zero = zero_page_digest();
    // The base's pack numbers as this list numbers them (UNUSED: a pack it does not use).
    let number_of: HashMap<&Digest256, u32> = packs
        .iter()
        .enumerate()
        .map(|(n, d)| (d, n as u32))
        .collect();
    let renumber: Vec<u32> = base
        .manifest
        .packs
        .iter()
        .map(|d| number_of.get(d).copied().unwrap_or(UNUSED))
        .collect();
    // Whether an entry names a pack the base has (or is a zero page): only such an entry can
    // equal a base entry, so only such an entry is looked for elsewhere in the base.
    let mut base_packs = vec![false; packs.len()];
    for &n in &renumber {
        if let Some(b) = base_packs.get_mut(n as usize) {
            *b = true;
        }
    }
    let could_be_in_base = |e: &[u8]| -> bool {
        let pack = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
        pack == ZERO_PACK || base_packs.get(pack as usize).copied().unwrap_or(false)
    };
    // Base entry `j` as this list would number it, compared where needed (not materialised:
    // a GiB's list is 10 MB).
    let same = |j: usize, e: &[u8]| -> bool {
        let Some(p) = base.list.get(j) else {
            return false;
        };
        let (pack, slot) = match p.at {
            Some((k, slot)) => (renumber[k as usize], slot),
            None => (ZERO_PACK, 0),
        };
        let digest = if p.at.is_none() { zero } else { p.digest };
        e[..32] == *digest.as_bytes()
            && e[32..36] == pack.to_le_bytes()
            && e[36..40] == slot.to_le_bytes()
    };
    enum Op {
        Copy(usize, usize),
        New(usize, usize),
    }
    let mut ops: Vec<Op> = Vec::new();
    let mut new_entries = 0usize;
    let mut next_in_base = usize::MAX;
    let mut i = 0;
    while i < pages {
        let start = if same(next_in_base, entry(i)) {
            Some(next_in_base)
        } else if same(i, entry(i)) {
            // Where the base has it at the same place (as page_list prefers).
            Some(i)
        } else {
            // The first place the base lists this digest, if its entry there is this one.
            <[u8; 32]>::try_from(&entry(i)[..32])
                .ok()
                .filter(|_| could_be_in_base(entry(i)))
                .and_then(|d| base.first.get(&Digest256::from_bytes(d)).copied())
                .filter(|&j| same(j, entry(i)))
        };
        match start {
            Some(j) => {
                let mut n = 1;
                while i + n < pages && same(j + n, entry(i + n)) {
                    n += 1;
                }
                match ops.last_mut() {
                    Some(Op::Copy(s, c)) if *s + *c == j => *c += n,
                    _ => ops.push(Op::Copy(j, n)),
                }
                next_in_base = j + n;
                i += n;
            }
            None => {
                new_entries += 1;
                if new_entries > pages / 4 {
                    return None;
                }
                match ops.last_mut() {
                    Some(Op::New(_, c)) => *c += 1,
                    _ => ops.push(Op::New(i, 1)),
                }
                i += 1;
            }
        }
    }
    let mut delta =
        Vec::with_capacity(DELTA_HEAD + ops.len() * DELTA_OP + new_entries * LIST_ENTRY);
    delta.extend_from_slice(DELTA_MAGIC);
    delta.extend_from_slice(&(pages as u64).to_le_bytes());
    delta.extend_from_slice(base.manifest.list.as_bytes());
    delta.extend_from_slice(&(base.list.len() as u64).to_le_bytes());
    delta.extend_from_slice(&(ops.len() as u64).to_le_bytes());
    delta.extend_from_slice(&(renumber.len() as u64).to_le_bytes());
    for n in &renumber {
        delta.extend_from_slice(&n.to_le_bytes());
    }
    for op in &ops {
        match *op {
            Op::Copy(start, count) => {
                delta.extend_from_slice(&0u64.to_le_bytes());
                delta.extend_from_slice(&(start as u64).to_le_bytes());
                delta.extend_from_slice(&(count as u64).to_le_bytes());
            }
            Op::New(at, count) => {
                delta.extend_from_slice(&1u64.to_le_bytes());
                delta.extend_from_slice(&(count as u64).to_le_bytes());
                delta.extend_from_slice(&0u64.to_le_bytes());
                delta.extend_from_slice(&body[at * LIST_ENTRY..(at + count) * LIST_ENTRY]);
            }
        }
    }
    // A delta no smaller than half the whole list is not worth its reading.
    (delta.len() < list.len() / 2).then_some(delta)
}

/// Finished packs, numbered, for the threads that put them: each a buffer and where in it the
/// pack starts ([`PackBuilder::finish_aligned`]).
type PackQueue = std::sync::mpsc::SyncSender<(u32, Vec<u8>, usize)>;

/// Run `pack`, which sends finished packs to the queue it is given (the k-th one numbered k)
/// and may take written packs' buffers back from the receiver it is given, while packs are
/// named and put into `batch` on up to [`PUTTERS`] threads at once (naming a pack, SHA-256 of
/// its bytes in one stream, is the slowest step of packing new pages). Returns the packs put,
/// in number order (digest, length), and what `pack` returned. A failed put closes the queue,
/// so that `pack`'s next send fails instead of waiting for a taker.
fn put_packs<R>(
    batch: &dyn BlobBatch,
    threads: usize,
    pack: impl FnOnce(PackQueue, &std::sync::mpsc::Receiver<Vec<u8>>, &AtomicBool) -> R,
) -> (Result<Vec<(Digest256, u64)>, PagesError>, R) {
    let (send, recv) = std::sync::mpsc::sync_channel::<(u32, Vec<u8>, usize)>(PUT_QUEUE);
    // Shared by the threads putting packs; the first to fail drops it (once the others let go
    // of it: until then `pack` can see `failed`).
    let recv = std::sync::Mutex::new(Some(recv));
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Written packs' buffers go back to be filled again.
        let (spare_send, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(PUTTERS);
        let putters: Vec<_> = (0..PUTTERS.min(threads + 1).max(1))
            .map(|_| {
                let (recv, failed) = (&recv, &failed);
                let spare_send = spare_send.clone();
                s.spawn(move || -> Result<Vec<(u32, Digest256, u64)>, PagesError> {
                    // Also when the queue ended: then nothing is sent any more.
                    let _closing = CloseOnDrop(recv);
                    let mut done = Vec::new();
                    loop {
                        let next = {
                            let recv = recv.lock().unwrap_or_else(PoisonError::into_inner);
                            match recv.as_ref() {
                                Some(recv) => recv.recv().ok(),
                                None => None,
                            }
                        };
                        let Some((k, bytes, start)) = next else {
                            return Ok(done);
                        };
                        let pack = &bytes[start..];
                        let digest = batch.put_raw(pack).map_err(|source| {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            PagesError::Store {
                                what: "storing a pack".to_owned(),
                                source,
                            }
                        })?;
                        done.push((k, digest, pack.len() as u64));
                        let _ = spare_send.try_send(bytes);
                    }
                })
            })
            .collect();
        drop(spare_send);
        // `send` is dropped when `pack` returns: the putters then end.
        let packed = pack(send, &spare, &failed);
        let mut stored = Vec::new();
        let mut failed = None;
        for putter in putters {
            match putter
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
            {
                Ok(done) => stored.extend(done),
                Err(err) => failed = failed.or(Some(err)),
            }
        }
        stored.sort_unstable_by_key(|(k, _, _)| *k);
        let stored = match failed {
            Some(err) => Err(err),
            None => Ok(stored.into_iter().map(|(_, d, len)| (d, len)).collect()),
        };
        (stored, packed)
    })
}

/// Drops the shared receiving end of the packs queue when a thread putting packs ends, so that
/// if it failed or panicked the packer's next send fails rather than waits for a taker.
struct CloseOnDrop<'r, T>(&'r std::sync::Mutex<Option<std::sync::mpsc::Receiver<T>>>);

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// The session's batch, which [`PageWriter::write_file`] starts before it puts anything.
fn batch_of<'b>(batch: &'b Option<Box<dyn BlobBatch + '_>>) -> &'b dyn BlobBatch {
    batch
        .as_deref()
        .unwrap_or_else(|| unreachable!("the batch was started"))
}

/// Put every page of `digests` that is neither placed from the base (`placed`, by page) nor in
/// `known` into packs, in file order, and send each finished pack to `send`; the k-th pack sent
/// is number `base + k`, and each new page goes into `known` as it is packed. Returns how many
/// pages were packed.
fn pack_new_pages(
    (file, path, kept): (&File, &std::path::Path, Option<&[bool]>),
    (digests, placed): (&[Option<Digest256>], &[Option<Loc>]),
    known: &mut crate::DigestMap<Loc>,
    (base, threads): (u32, usize),
    (send, spare): (&PackQueue, &std::sync::mpsc::Receiver<Vec<u8>>),
    read: &mut dyn FnMut(u64),
) -> Result<u64, PagesError> {
    let pages = digests.len();
    // Placed from the base at its own page: not new.
    let is_placed = |i: usize| placed.get(i).is_some_and(Option::is_some);
    let mut pack = PackBuilder::new(threads);
    let mut packs_sent = 0u32;
    let mut new_pages = 0u64;
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    let finish = |pack: &mut PackBuilder, k: u32| -> Result<(), PagesError> {
        let mut bytes = spare.try_recv().unwrap_or_default();
        let start = pack.finish_aligned(&mut bytes)?;
        send.send((k, bytes, start)).map_err(|_| PagesError::Io {
            op: "store the packs of",
            path: path.to_owned(),
            source: std::io::Error::other("the pack writer stopped"),
        })?;
        Ok(())
    };
    let mut want = Vec::with_capacity(BATCH_PAGES);
    for start in (0..pages).step_by(BATCH_PAGES) {
        if start > 0 && start.is_multiple_of(READ_STEP_PAGES) {
            read(start as u64 * PAGE_SIZE as u64);
        }
        let n = BATCH_PAGES.min(pages - start);
        want.clear();
        want.extend(
            (start..start + n)
                .filter(|&i| digests[i].is_some_and(|d| !is_placed(i) && !known.contains_key(&d))),
        );
        if want.is_empty() {
            continue;
        }
        // Only the runs of pages the store lacks are read (a re-freeze's changed pages are
        // scattered: reading whole batches would read the whole file again), unless they are
        // most of the batch.
        let runs: Vec<(usize, usize)> = if want.len() * 2 >= n {
            vec![(start, n)]
        } else {
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for &i in &want {
                match runs.last_mut() {
                    Some((first, len)) if *first + *len == i => *len += 1,
                    _ => runs.push((i, 1)),
                }
            }
            runs
        };
        for (first, len) in runs {
            let at = first as u64 * PAGE_SIZE as u64;
            // A streamed capture's file of kept pages has holes where the others would be
            // (and where pages packed during the dump would be): mapping a hole on tmpfs
            // allocates it (reading it does not), so a run of its with pages not wanted here
            // is read. A run of wanted pages only is all written.
            let holes = kept.is_some() && len > want.len();
            let run = PagesRun::of((file, path), (at, len), !holes, &mut buf)?;
            let bytes = run.bytes();
            for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                let Some(digest) = digests[first + i] else {
                    continue;
                };
                let at = first + i;
                if is_placed(at) || known.contains_key(&digest) {
                    continue;
                }
                if kept.is_some_and(|kept| !kept.get(at).copied().unwrap_or(false)) {
                    return Err(PagesError::Io {
                        op: "pack the pages of",
                        path: path.to_owned(),
                        source: std::io::Error::other(format!(
                            "page {at} was left out while it was captured, as a page the store \
                             already had, but the store no longer has it (removed by a gc \
                             meanwhile?): freeze again"
                        )),
                    });
                }
                let slot = pack.push(page, digest);
                known.insert(digest, (base + packs_sent, slot));
                new_pages += 1;
                if pack.is_full() {
                    finish(&mut pack, packs_sent)?;
                    packs_sent += 1;
                }
            }
        }
    }
    if !pack.is_empty() {
        finish(&mut pack, packs_sent)?;
    }
    Ok(new_pages)
}

/// A run of a file's pages: mapped where they lie, or read into a caller's buffer.
enum PagesRun<'b> {
    Mapped(crate::mapped::Mapped),
    Read(&'b [u8]),
}

impl<'b> PagesRun<'b> {
    /// `pages` pages of `file` (at `path`, named in errors) from byte `at`: mapped if `map`
    /// allows it and the run is long enough ([`MAP_MIN_PAGES`]) and the mapping is granted,
    /// else read into the front of `buf`.
    fn of(
        (file, path): (&File, &std::path::Path),
        (at, pages): (u64, usize),
        map: bool,
        buf: &'b mut [u8],
    ) -> Result<Self, PagesError> {
        let len = pages * PAGE_SIZE;
        if map
            && pages >= MAP_MIN_PAGES
            && let Some(mapped) = crate::mapped::Mapped::of(file, at, len)
        {
            return Ok(Self::Mapped(mapped));
        }
        read_at(file, path, &mut buf[..len], at)?;
        Ok(Self::Read(&buf[..len]))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(mapped) => mapped.bytes(),
            Self::Read(bytes) => bytes,
        }
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
    static ZERO: std::sync::OnceLock<Digest256> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| page_digest(&[0u8; PAGE_SIZE]))
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
    m.check().map_err(|reason| PagesError::Malformed {
        digest: *digest,
        what: "pages manifest",
        reason,
    })?;
    Ok(m)
}

impl PagesManifest {
    /// Whether the manifest's own claims can be true: 4 KiB pages, at most [`MAX_PAGES`] of
    /// them, no more zero pages than pages.
    pub fn check(&self) -> Result<(), String> {
        if self.page_size != PAGE_SIZE as u32 {
            return Err(format!(
                "page size {} (only 4096 is supported)",
                self.page_size
            ));
        }
        if self.pages > MAX_PAGES {
            return Err(format!(
                "it claims {} pages ({}), more than a process's whole address space (128 TiB)",
                self.pages,
                human_pages(self.pages)
            ));
        }
        if self.zero_pages > self.pages {
            return Err(format!(
                "it claims {} zero pages of {} pages",
                self.zero_pages, self.pages
            ));
        }
        Ok(())
    }
}

/// `pages` 4 KiB pages as a size a person reads ("1.5 GiB").
fn human_pages(pages: u64) -> String {
    let bytes = pages as f64 * PAGE_SIZE as f64;
    let (units, mut v) = (["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"], bytes);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Refuse to read the delta page list `digest` of `pages` pages on a base of `base_pages` when
/// the two lists would not fit in the memory this machine has free: a hostile delta can claim
/// any number of pages and make them from a few bytes of copies, so its claim is checked before
/// anything is built from it.
fn room_for_list(digest: &Digest256, pages: u64, base_pages: u64) -> Result<(), PagesError> {
    let too_many = |what: &str, n: u64| PagesError::Malformed {
        digest: *digest,
        what: "page list",
        reason: format!(
            "{what} {n} pages ({}), more than a process's whole address space (128 TiB)",
            human_pages(n)
        ),
    };
    if pages > MAX_PAGES {
        return Err(too_many("it claims", pages));
    }
    if base_pages > MAX_PAGES {
        return Err(too_many("it says its base has", base_pages));
    }
    let need = (pages + base_pages).saturating_mul(std::mem::size_of::<ListedPage>() as u64);
    match available_memory() {
        Some(available) if need > available => Err(PagesError::TooLarge {
            digest: *digest,
            pages,
            need,
            available,
        }),
        _ => Ok(()),
    }
}

/// `MemAvailable` and `SwapFree` from `/proc/meminfo`, in bytes (`None` where it cannot be
/// read).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |field: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let swap = kib("SwapFree:").unwrap_or(0);
    kib("MemAvailable:")?.checked_add(swap)?.checked_mul(1024)
}

/// One page as the page list records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedPage {
    /// The page's digest.
    pub digest: Digest256,
    /// Its pack (an index into the manifest's `packs`) and slot; `None` for a zero page.
    pub at: Option<(u32, u32)>,
}

/// Parse a page list blob (`digest` names it in errors, `bytes` are its bytes) against its
/// manifest; a delta list's bases are read from `store` (each through the store's digest check).
pub fn parse_list(
    store: &dyn BlobStore,
    digest: &Digest256,
    bytes: &[u8],
    manifest: &PagesManifest,
) -> Result<Vec<ListedPage>, PagesError> {
    if manifest.bases.len() > MAX_DELTA_DEPTH {
        return Err(PagesError::Malformed {
            digest: *digest,
            what: "page list",
            reason: format!(
                "its manifest names {} bases, more than the {MAX_DELTA_DEPTH} allowed",
                manifest.bases.len()
            ),
        });
    }
    let packs = manifest.packs.len();
    let list = parse_any(store, digest, bytes, &manifest.bases, packs)?;
    if list.len() as u64 != manifest.pages {
        return Err(PagesError::Malformed {
            digest: *digest,
            what: "page list",
            reason: "its length does not match the manifest's page count".to_owned(),
        });
    }
    Ok(list)
}

/// A whole or delta list whose pack numbers must be below `packs`; `bases` is the chain of the
/// lists a delta builds on, nearest first.
fn parse_any(
    store: &dyn BlobStore,
    digest: &Digest256,
    bytes: &[u8],
    bases: &[Digest256],
    packs: usize,
) -> Result<Vec<ListedPage>, PagesError> {
    let bad = |reason: &str| PagesError::Malformed {
        digest: *digest,
        what: "page list",
        reason: reason.to_owned(),
    };
    if bytes.len() >= 8 && &bytes[..8] == DELTA_MAGIC {
        // The header, then the renumbering's `u64` count.
        if bytes.len() < DELTA_HEAD + 8 {
            return Err(bad("a delta shorter than its header"));
        }
        let u64_at = |at: usize| {
            let mut n = [0u8; 8];
            n.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(n)
        };
        let n = u64_at(8);
        let mut d = [0u8; 32];
        d.copy_from_slice(&bytes[16..48]);
        let base = Digest256::from_bytes(d);
        let base_pages = u64_at(48);
        let ops = u64_at(56);
        if bases.first() != Some(&base) {
            return Err(bad("its base is not the manifest's (bases)"));
        }
        // Its list and its base's are held together while it is read.
        room_for_list(digest, n, base_pages)?;
        let base_bytes = store.get(&base).map_err(|source| PagesError::Store {
            what: format!("reading the page list {base}, the base of {digest}"),
            source,
        })?;
        // The base's own numbering is checked by the renumbering below.
        let mut base_list = parse_any(store, &base, &base_bytes, &bases[1..], usize::MAX)?;
        drop(base_bytes);
        if base_list.len() as u64 != base_pages {
            return Err(bad("its base has another page count than it says"));
        }
        let n = usize::try_from(n).map_err(|_| bad("too many pages"))?;
        let m = usize::try_from(u64_at(DELTA_HEAD)).map_err(|_| bad("too many packs"))?;
        let mut at = DELTA_HEAD + 8;
        if m > (bytes.len() - at) / 4 {
            return Err(bad("it ends inside its pack renumbering"));
        }
        let renumber: Vec<u32> = bytes[at..at + 4 * m]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        at += 4 * m;
        if renumber.iter().any(|&k| k != UNUSED && k as usize >= packs) {
            return Err(bad("it renumbers a pack to one its manifest does not have"));
        }
        // A re-freeze's delta copies every page it keeps from the same place in its base: its
        // base's list becomes its own in place (renumbered, new entries written over), instead
        // of a new list per level of the chain (a GiB's list is 11 MB, and a chain 8 deep).
        if n == base_list.len() && keeps_places(bytes, at, ops, n) {
            renumber_in_place(bytes, at, ops, (&renumber, packs), &mut base_list).map_err(bad)?;
            return Ok(base_list);
        }
        // Sized by what the bytes can hold (the header's count is theirs to claim).
        let mut list: Vec<ListedPage> =
            Vec::with_capacity(n.min(base_list.len() + (bytes.len() - at) / LIST_ENTRY));
        for _ in 0..ops {
            if bytes.len() < at + DELTA_OP {
                return Err(bad("it ends inside an operation"));
            }
            let (kind, a, b) = (u64_at(at), u64_at(at + 8), u64_at(at + 16));
            at += DELTA_OP;
            match kind {
                0 => {
                    let from = usize::try_from(a).map_err(|_| bad("a copy past its base"))?;
                    let count = usize::try_from(b).map_err(|_| bad("a copy past its base"))?;
                    let end = from
                        .checked_add(count)
                        .filter(|&e| e <= base_list.len())
                        .ok_or_else(|| bad("a copy past its base's end"))?;
                    if count > n - list.len() {
                        return Err(bad("more pages than it says"));
                    }
                    for page in &base_list[from..end] {
                        let at = match page.at {
                            None => None,
                            Some((k, slot)) => match renumber.get(k as usize) {
                                Some(&n) if n != UNUSED => Some((n, slot)),
                                _ => return Err(bad("a copy names a pack it does not renumber")),
                            },
                        };
                        list.push(ListedPage {
                            digest: page.digest,
                            at,
                        });
                    }
                }
                1 => {
                    let count = usize::try_from(a).map_err(|_| bad("too many new entries"))?;
                    if count > n - list.len() || b != 0 {
                        return Err(bad("more pages than it says"));
                    }
                    let len = count
                        .checked_mul(LIST_ENTRY)
                        .filter(|&len| len <= bytes.len() - at)
                        .ok_or_else(|| bad("it ends inside its new entries"))?;
                    for e in bytes[at..at + len].chunks_exact(LIST_ENTRY) {
                        list.push(parse_entry(e, packs).map_err(&bad)?);
                    }
                    at += len;
                }
                _ => return Err(bad("an operation of an unknown kind")),
            }
        }
        if at != bytes.len() || list.len() != n {
            return Err(bad("its operations do not make exactly its pages"));
        }
        return Ok(list);
    }
    if !bases.is_empty() {
        return Err(bad("a whole list where the manifest names bases"));
    }
    if bytes.len() < 16 || &bytes[..8] != LIST_MAGIC {
        return Err(bad("bad magic"));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[8..16]);
    let n = u64::from_le_bytes(n);
    if (bytes.len() - 16) as u64 != n.saturating_mul(LIST_ENTRY as u64) {
        return Err(bad("its length does not match its page count"));
    }
    bytes[16..]
        .chunks_exact(LIST_ENTRY)
        .map(|e| parse_entry(e, packs).map_err(&bad))
        .collect()
}

/// Whether the `ops` operations of a delta, from `at` in `bytes`, are well formed and make `n`
/// pages with every copy taken from the same place in the base (checked again as they apply).
fn keeps_places(bytes: &[u8], mut at: usize, ops: u64, n: usize) -> bool {
    let u64_at = |at: usize| -> Option<u64> {
        let b = bytes.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };
    let mut pos = 0usize;
    for _ in 0..ops {
        let (Some(kind), Some(a), Some(b)) = (u64_at(at), u64_at(at + 8), u64_at(at + 16)) else {
            return false;
        };
        at += DELTA_OP;
        let Ok(count) = usize::try_from(if kind == 0 { b } else { a }) else {
            return false;
        };
        match kind {
            0 if a == pos as u64 => {}
            1 if b == 0 => {
                let Some(end) = count
                    .checked_mul(LIST_ENTRY)
                    .and_then(|len| at.checked_add(len))
                    .filter(|&end| end <= bytes.len())
                else {
                    return false;
                };
                at = end;
            }
            _ => return false,
        }
        match pos.checked_add(count).filter(|&p| p <= n) {
            Some(p) => pos = p,
            None => return false,
        }
    }
    pos == n && at == bytes.len()
}

/// Apply a delta that [`keeps_places`] to its base's `list` in place: copied entries take the
/// delta's pack numbers (`renumber`, each below `packs`), new entries are written over theirs.
fn renumber_in_place(
    bytes: &[u8],
    mut at: usize,
    ops: u64,
    (renumber, packs): (&[u32], usize),
    list: &mut [ListedPage],
) -> Result<(), &'static str> {
    let u64_at = |at: usize| -> Result<u64, &'static str> {
        let end = at.checked_add(8).ok_or("it ends inside an operation")?;
        let b = bytes.get(at..end).ok_or("it ends inside an operation")?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| "it ends inside an operation")?,
        ))
    };
    let mut pos = 0usize;
    for _ in 0..ops {
        // Each read checks its end, so `at + DELTA_OP` is within `bytes` after them.
        let (kind, a, b) = (
            u64_at(at)?,
            u64_at(at.saturating_add(8))?,
            u64_at(at.saturating_add(16))?,
        );
        at += DELTA_OP;
        match kind {
            0 => {
                let count = usize::try_from(b).map_err(|_| "a copy past its base")?;
                let run = list
                    .get_mut(pos..pos.checked_add(count).ok_or("a copy past its base's end")?)
                    .ok_or("a copy past its base's end")?;
                for page in run {
                    if let Some((k, slot)) = page.at {
                        match renumber.get(k as usize) {
                            Some(&n) if n != UNUSED => page.at = Some((n, slot)),
                            _ => return Err("a copy names a pack it does not renumber"),
                        }
                    }
                }
                pos += count;
            }
            1 => {
                let count = usize::try_from(a).map_err(|_| "too many new entries")?;
                let len = count
                    .checked_mul(LIST_ENTRY)
                    .ok_or("too many new entries")?;
                let entries = bytes
                    .get(
                        at..at
                            .checked_add(len)
                            .ok_or("it ends inside its new entries")?,
                    )
                    .ok_or("it ends inside its new entries")?;
                let run = list
                    .get_mut(pos..pos.checked_add(count).ok_or("more pages than it says")?)
                    .ok_or("more pages than it says")?;
                for (page, e) in run.iter_mut().zip(entries.chunks_exact(LIST_ENTRY)) {
                    *page = parse_entry(e, packs)?;
                }
                at += len;
                pos += count;
            }
            _ => return Err("an operation of an unknown kind"),
        }
    }
    if at != bytes.len() || pos != list.len() {
        return Err("its operations do not make exactly its pages");
    }
    Ok(())
}

/// One 40-byte list entry whose pack number must be below `packs`.
fn parse_entry(e: &[u8], packs: usize) -> Result<ListedPage, &'static str> {
    let mut d = [0u8; 32];
    d.copy_from_slice(&e[..32]);
    let digest = Digest256::from_bytes(d);
    let pack = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
    let slot = u32::from_le_bytes([e[36], e[37], e[38], e[39]]);
    if pack == ZERO_PACK {
        if digest != zero_page_digest() {
            return Err("a zero page carries another page's digest");
        }
        return Ok(ListedPage { digest, at: None });
    }
    if pack as usize >= packs || slot as usize >= PACK_PAGES {
        return Err("a page names a pack or slot that cannot exist");
    }
    Ok(ListedPage {
        digest,
        at: Some((pack, slot)),
    })
}

/// Decoded frames a [`PagesReader`] keeps, most recently used first.
const FRAME_CACHE: usize = 64;
/// Whole packs a [`PagesReader`] keeps of those it cannot read in place (at most 8 MiB each).
const WHOLE_PACKS: usize = 4;

/// The store a [`PagesReader`] reads from: borrowed, or shared so the reader can be `'static`.
#[derive(Debug)]
enum StoreRef<'s> {
    Borrowed(&'s dyn BlobStore),
    Shared(std::sync::Arc<dyn BlobStore>),
}

impl StoreRef<'_> {
    fn get(&self) -> &dyn BlobStore {
        match self {
            Self::Borrowed(store) => *store,
            Self::Shared(store) => &**store,
        }
    }
}

/// A pack a [`PagesReader`] reads from: the manifest's own, or one a forward record leads to.
#[derive(Debug)]
struct Phys {
    /// Its number in the reader (names its frames in the cache).
    id: u32,
    pack: Digest256,
    /// Whether [`BlobStore::read_at`] of it is cheap (else it is read whole).
    seekable: bool,
    frames: Vec<crate::pack::Frame>,
}

/// Where the pages of one of the manifest's packs are read from.
#[derive(Debug)]
enum Route {
    /// The pack itself: the page list's slots hold.
    Direct(Arc<Phys>),
    /// The pack was repacked (see [`crate::forward`]): each page is found by its digest in a
    /// pack its forward records lead to.
    Forwarded {
        to: Vec<Digest256>,
        slots: HashMap<Digest256, (Arc<Phys>, u32)>,
    },
}

/// A decoded frame in the cache: (pack id, frame number, its pages).
type CachedFrame = (u32, usize, Arc<DecodedFrame>);

/// A page as stored: its decoded frame, its place in it, and the pack and slot it was read from.
type StoredPage = (Arc<DecodedFrame>, usize, (Digest256, u32));

/// A frame's pages as decoded, and the digest each page was found to have once it was checked,
/// so a page that many places of a file hold (the same stored page) is hashed once while its
/// frame stays decoded: the bytes it was checked in are the bytes handed out again, never read
/// anew.
#[derive(Debug)]
struct DecodedFrame {
    bytes: Vec<u8>,
    checked: Vec<std::sync::OnceLock<Digest256>>,
}

impl DecodedFrame {
    fn new(bytes: Vec<u8>) -> Self {
        let pages = bytes.len() / PAGE_SIZE;
        Self {
            bytes,
            checked: (0..pages).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }
}

/// A pack and the (slot, page number) pairs wanted from it.
type PhysWant = (Arc<Phys>, Vec<(u32, u64)>);

/// A page [`PagesReader::read`] copied out before checking it: its place in the output, the
/// pack and slot it came from, the digest it must have, and its frame (to remember the check).
struct Unchecked {
    at: usize,
    pack: Digest256,
    slot: u32,
    digest: Digest256,
    /// The kept frame it was copied from and its place there (none: decoded straight into
    /// the output, see `whole_frame_into`).
    frame: Option<(Arc<DecodedFrame>, usize)>,
}

/// Random access to the pages of a file stored by [`PageWriter`]: any run of pages, each one
/// decoded from its frame alone and checked against its digest before it is handed out.
///
/// Opening reads and verifies the manifest and the page list whole (40 bytes a page); a pack's
/// trailer and frame table are read once, on its first use, with
/// [`BlobStore::read_at`] (unverified: a damaged table can only point at bytes that then fail
/// the page check, never yield a wrong page); each frame is read with one `read_at` and decoded
/// alone. The last [`FRAME_CACHE`] (64) decoded frames are kept, so consecutive single-page
/// reads inside one 128 KiB frame decode it once; a page is hashed the first time it is read
/// from a kept frame against a listed digest, and handed out again from the very bytes that
/// checked while the frame is kept. Many threads may call [`read`](Self::read) at once.
///
/// A pack that is gone but [forwarded](crate::forward) by a repack is read from the packs its
/// forward records lead to, each page found by its digest in their indexes (read whole once,
/// 32 bytes a page); a pack removed by a repack while the reader is open is looked up again
/// once, so a reader outlives a concurrent `pf store gc --repack`.
#[derive(Debug)]
pub struct PagesReader<'s> {
    store: StoreRef<'s>,
    manifest: Digest256,
    packs: Vec<Digest256>,
    list: Vec<ListedPage>,
    routes: Vec<std::sync::RwLock<Option<Arc<Route>>>>,
    phys: std::sync::Mutex<HashMap<Digest256, Arc<Phys>>>,
    next_id: std::sync::atomic::AtomicU32,
    cache: std::sync::Mutex<std::collections::VecDeque<CachedFrame>>,
    whole: std::sync::Mutex<std::collections::VecDeque<(Digest256, Arc<Vec<u8>>)>>,
    /// Frames once decoded straight into a caller's buffer (pack id, frame number).
    direct: std::sync::Mutex<std::collections::HashSet<(u32, usize)>>,
}

/// Whether `err` says a pack is not (or no longer) in the store.
fn is_gone(err: &PagesError) -> bool {
    matches!(
        err,
        PagesError::Store {
            source: Error::NotFound { .. },
            ..
        }
    )
}

impl<'s> PagesReader<'s> {
    /// Open the file whose manifest is `manifest` in `store`.
    pub fn open(store: &'s dyn BlobStore, manifest: &Digest256) -> Result<Self, PagesError> {
        Self::with_store(StoreRef::Borrowed(store), manifest)
    }

    fn with_store(store: StoreRef<'s>, manifest: &Digest256) -> Result<Self, PagesError> {
        let m = load_manifest(store.get(), manifest)?;
        // Parsed while it is hashed: nothing of it is used unless it matches.
        let list = crate::store::get_parsed(store.get(), &m.list, |bytes| {
            parse_list(store.get(), &m.list, bytes, &m)
        })
        .map_err(|source| PagesError::Store {
            what: format!("reading the page list {}", m.list),
            source,
        })??;
        Ok(Self {
            store,
            manifest: *manifest,
            routes: (0..m.packs.len())
                .map(|_| std::sync::RwLock::new(None))
                .collect(),
            packs: m.packs,
            list,
            phys: std::sync::Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU32::new(0),
            cache: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(FRAME_CACHE)),
            whole: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(WHOLE_PACKS)),
            direct: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Pages in the file.
    pub fn pages(&self) -> u64 {
        self.list.len() as u64
    }

    /// The manifest this reader was opened on.
    pub fn manifest(&self) -> &Digest256 {
        &self.manifest
    }

    /// The whole page list, in file order.
    pub fn list(&self) -> &[ListedPage] {
        &self.list
    }

    /// The whole page list, taken out of the reader.
    pub fn into_list(self) -> Vec<ListedPage> {
        self.list
    }

    /// The manifest's pack number `n`.
    pub fn pack(&self, n: u32) -> Option<Digest256> {
        self.packs.get(n as usize).copied()
    }

    /// The manifest's packs that hold pages, in the order a reading of the file from its start
    /// first needs them: (the first page that needs it, the pack's number, how many places of
    /// the file it holds). A pack that only pages past others need comes after them, so reading
    /// ahead along this order follows the reader's own.
    pub fn packs_by_first_use(&self) -> Vec<(u64, u32, u64)> {
        let mut first = vec![(u64::MAX, 0u64); self.packs.len()];
        for (n, page) in self.list.iter().enumerate() {
            if let Some((pack, _)) = page.at {
                let (at, used) = &mut first[pack as usize];
                *at = (*at).min(n as u64);
                *used += 1;
            }
        }
        let mut order: Vec<(u64, u32, u64)> = first
            .into_iter()
            .enumerate()
            .filter(|&(_, (page, _))| page != u64::MAX)
            .map(|(pack, (page, used))| (page, pack as u32, used))
            .collect();
        order.sort_unstable();
        order
    }

    /// The packs that hold pack `n`'s pages now: the pack itself, or for a pack that was
    /// repacked, the packs its pages moved to (none when it is missing). For reading ahead
    /// ([`BlobStore::prefetch`]): nothing is read from the packs, and a failure is quiet (the
    /// read that wants the pages meets the same problem and reports it).
    pub fn pack_sites(&self, n: u32) -> Vec<Digest256> {
        let cached = self.routes.get(n as usize).and_then(|cell| {
            cell.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        });
        if let Some(route) = cached {
            return match &*route {
                Route::Direct(phys) => vec![phys.pack],
                Route::Forwarded { to, .. } => to.clone(),
            };
        }
        let Some(pack) = self.pack(n) else {
            return Vec::new();
        };
        match crate::forward::locate(self.store.get(), &pack) {
            Ok(crate::forward::Located::Here) => vec![pack],
            Ok(crate::forward::Located::Forwarded(to)) => to,
            Ok(crate::forward::Located::Missing { .. }) => Vec::new(),
            Err(err) => {
                tracing::debug!(%pack, %err, "cannot tell where a pack's pages are");
                Vec::new()
            }
        }
    }

    /// The store this reader reads from.
    pub fn store(&self) -> &dyn BlobStore {
        self.store.get()
    }

    /// What the page list records for page `page` (its digest, and whether it is a zero page:
    /// `at` is `None`), or `None` past the end of the file.
    pub fn listed(&self, page: u64) -> Option<ListedPage> {
        usize::try_from(page)
            .ok()
            .and_then(|n| self.list.get(n))
            .copied()
    }

    /// Fill `out` (a whole number of pages) with the pages from `first` on, each checked
    /// against the page list's digest; zero pages are zero-filled. A page whose bytes do not
    /// check is [`PagesError::BadPage`] naming it (and `out` must then be discarded).
    pub fn read(&self, first: u64, out: &mut [u8]) -> Result<(), PagesError> {
        let count = (out.len() / PAGE_SIZE) as u64;
        let fits = first
            .checked_add(count)
            .is_some_and(|end| end <= self.pages());
        if !out.len().is_multiple_of(PAGE_SIZE) || !fits {
            return Err(PagesError::OutOfRange {
                first,
                len: out.len(),
                pages: self.pages(),
            });
        }
        // Copy every page out first, noting those whose frame has not checked them against
        // this digest yet; then hash those copies many at once, and remember what checked.
        let mut frame_now: Option<CachedFrame> = None;
        let mut unchecked: Vec<Unchecked> = Vec::new();
        let mut queued_once = std::collections::HashSet::new();
        let mut i = 0;
        while i < count as usize {
            let page = first + i as u64;
            let listed = self.list[page as usize];
            let Some((pack_no, slot)) = listed.at else {
                out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(0);
                i += 1;
                continue;
            };
            let took =
                self.whole_frame_into(page, pack_no, slot, &mut out[i * PAGE_SIZE..], |k, u| {
                    unchecked.push(Unchecked { at: i + k, ..u });
                });
            if took > 0 {
                i += took;
                continue;
            }
            let dst = &mut out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            let (decoded, k, (pack, slot)) =
                match self.stored_page(page, &listed, pack_no, slot, &mut frame_now) {
                    Err(err) if is_gone(&err) => {
                        // Removed by a repack since it was first looked up: look again, once.
                        self.forget(pack_no);
                        frame_now = None;
                        self.stored_page(page, &listed, pack_no, slot, &mut frame_now)?
                    }
                    other => other?,
                };
            dst.copy_from_slice(&decoded.bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
            // A stored page this read copies to several places is hashed once: the copies are
            // of the same bytes of the same kept frame.
            let queued = (Arc::as_ptr(&decoded) as usize, k, listed.digest);
            if decoded.checked[k].get() != Some(&listed.digest) && queued_once.insert(queued) {
                unchecked.push(Unchecked {
                    at: i,
                    pack,
                    slot,
                    digest: listed.digest,
                    frame: Some((decoded, k)),
                });
            }
            i += 1;
        }
        if unchecked.is_empty() {
            return Ok(());
        }
        let pages: Vec<(Digest256, u32, &[u8], Digest256)> = unchecked
            .iter()
            .map(|u| {
                let copy = &out[u.at * PAGE_SIZE..(u.at + 1) * PAGE_SIZE];
                (u.pack, u.slot, copy, u.digest)
            })
            .collect();
        if let Err((i, source)) = crate::pack::check_pages(&pages) {
            return Err(PagesError::BadPage {
                page: first + unchecked[i].at as u64,
                source,
            });
        }
        for u in &unchecked {
            // The copy hashed as listed, and it is the frame's bytes: the frame's page checks.
            if let Some((frame, k)) = &u.frame {
                let _ = frame.checked[*k].set(u.digest);
            }
        }
        Ok(())
    }

    /// When page `page` (listed in slot `slot` of the manifest's pack `pack_no`) begins a frame
    /// whose pages are all wanted next, in order, from `out` on (and that frame is not kept
    /// decoded), decode the frame straight into `out`, tell `unchecked` about each of its
    /// pages (their place from `page` on, and what they must hash to), and return how many
    /// pages it filled. Else (or on any error, which the page-at-a-time path then meets and
    /// reports) 0. Reading a pages file front to back, this saves a copy of every page and the
    /// frame cache's churn.
    fn whole_frame_into(
        &self,
        page: u64,
        pack_no: u32,
        slot: u32,
        out: &mut [u8],
        mut unchecked: impl FnMut(usize, Unchecked),
    ) -> usize {
        let Ok(route) = self.route(pack_no) else {
            return 0;
        };
        let Route::Direct(phys) = &*route else {
            return 0;
        };
        let Ok(frame_no) = frame_no(phys, slot) else {
            return 0;
        };
        let f = phys.frames[frame_no];
        let n = f.pages as usize;
        if f.first != slot || n == 0 || out.len() < n * PAGE_SIZE {
            return 0;
        }
        let in_order = (1..n).all(|k| {
            self.list
                .get(page as usize + k)
                .is_some_and(|l| l.at == Some((pack_no, slot + k as u32)))
        });
        let kept = || {
            self.cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|(p, fr, _)| *p == phys.id && *fr == frame_no)
        };
        // A frame met a second time (a stored page many places hold, as a repeated text
        // is) goes the cached way, where its pages are hashed once while it is kept.
        let first_time = || {
            self.direct
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((phys.id, frame_no))
        };
        if !in_order || kept() || !first_time() {
            return 0;
        }
        let Ok(bytes) = self.pack_bytes(&phys.pack, phys.seekable) else {
            return 0;
        };
        let dst = &mut out[..n * PAGE_SIZE];
        // A frame of pages that did not compress is read straight into place.
        let head_len = f.len.wrapping_sub(dst.len());
        if (1..=crate::pack::RAW_HEAD_MAX).contains(&head_len) {
            let mut head = [0u8; crate::pack::RAW_HEAD_MAX];
            let head = &mut head[..head_len];
            let raw = self
                .read_pack(&phys.pack, &bytes, f.offset as u64, head)
                .is_ok()
                && crate::pack::is_raw_frame_head(head, dst.len())
                && self
                    .read_pack(&phys.pack, &bytes, (f.offset + head_len) as u64, dst)
                    .is_ok();
            if !raw {
                return 0;
            }
        } else {
            let decoded = DECODER.with(|decoder| {
                SRC.with(|src| {
                    let mut src = src.borrow_mut();
                    src.resize(f.len, 0);
                    self.read_pack(&phys.pack, &bytes, f.offset as u64, &mut src)
                        .ok()
                        .and_then(|()| {
                            crate::pack::decode_frame_into(&mut decoder.borrow_mut(), &src, dst)
                                .ok()
                        })
                })
            });
            if decoded.is_none() {
                return 0;
            }
        }
        for k in 0..n {
            unchecked(
                k,
                Unchecked {
                    at: 0,
                    pack: phys.pack,
                    slot: slot + k as u32,
                    digest: self.list[page as usize + k].digest,
                    frame: None,
                },
            );
        }
        n
    }

    /// The decoded frame holding page `page` (listed as `listed`, in slot `slot` of the
    /// manifest's pack `pack_no`), unchecked, the page's place in it, and the pack and slot it
    /// was found in (a repack's forward may have moved it); `frame_now` is the last frame
    /// decoded, reused when it holds it.
    fn stored_page(
        &self,
        page: u64,
        listed: &ListedPage,
        pack_no: u32,
        slot: u32,
        frame_now: &mut Option<CachedFrame>,
    ) -> Result<StoredPage, PagesError> {
        let route = self.route(pack_no)?;
        let (phys, slot) = self.site(&route, pack_no, listed, slot, page)?;
        let bad = |source| PagesError::BadPage { page, source };
        let frame_no = frame_no(&phys, slot).map_err(bad)?;
        if !matches!(frame_now, Some((p, f, _)) if *p == phys.id && *f == frame_no) {
            let decoded = self.cached_frame(&phys, frame_no, page)?;
            *frame_now = Some((phys.id, frame_no, decoded));
        }
        let Some((_, _, decoded)) = frame_now else {
            unreachable!("a frame was just decoded");
        };
        let k = (slot - phys.frames[frame_no].first) as usize;
        Ok((decoded.clone(), k, (phys.pack, slot)))
    }

    /// The pack and slot page `page` is read from, along `route` (the manifest's pack
    /// `pack_no`, where the page list puts it in `slot`).
    fn site(
        &self,
        route: &Route,
        pack_no: u32,
        listed: &ListedPage,
        slot: u32,
        page: u64,
    ) -> Result<(Arc<Phys>, u32), PagesError> {
        match route {
            Route::Direct(phys) => Ok((phys.clone(), slot)),
            Route::Forwarded { to, slots } => {
                slots
                    .get(&listed.digest)
                    .cloned()
                    .ok_or_else(|| PagesError::BadPage {
                        page,
                        source: PackError::NotForwarded {
                            pack: self.packs[pack_no as usize],
                            to: to.clone(),
                            digest: listed.digest,
                        },
                    })
            }
        }
    }

    /// Where the pages of the manifest's pack `pack_no` are read from, found on first use.
    fn route(&self, pack_no: u32) -> Result<Arc<Route>, PagesError> {
        let cell = &self.routes[pack_no as usize];
        if let Some(route) = cell
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            return Ok(route.clone());
        }
        let route = match self.make_route(pack_no) {
            Err(err) if is_gone(&err) => self.make_route(pack_no)?,
            other => other?,
        };
        let mut slot = cell
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(slot.get_or_insert(Arc::new(route)).clone())
    }

    /// Forget where the pages of pack `pack_no` were found (its pack has gone).
    fn forget(&self, pack_no: u32) {
        let cell = &self.routes[pack_no as usize];
        let old = cell
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(Route::Direct(phys)) = old.as_deref() {
            self.phys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&phys.pack);
        }
    }

    fn make_route(&self, pack_no: u32) -> Result<Route, PagesError> {
        let pack = self.packs[pack_no as usize];
        let store = self.store.get();
        let located = crate::forward::locate(store, &pack).map_err(|source| PagesError::Store {
            what: format!("looking for pack {pack} and its forward records"),
            source,
        })?;
        match located {
            crate::forward::Located::Here => Ok(Route::Direct(self.open_phys(&pack, false)?.0)),
            crate::forward::Located::Forwarded(to) => {
                let mut slots = HashMap::new();
                for target in &to {
                    let (phys, digests) = self.open_phys(target, true)?;
                    for (slot, digest) in digests.into_iter().enumerate() {
                        slots
                            .entry(digest)
                            .or_insert_with(|| (phys.clone(), slot as u32));
                    }
                }
                Ok(Route::Forwarded { to, slots })
            }
            crate::forward::Located::Missing { tried } => Err(PagesError::Store {
                what: if tried.is_empty() {
                    format!("reading pack {pack}")
                } else {
                    format!(
                        "reading pack {pack}: it was repacked, and the packs its forward records \
                         lead to are not in the store either ({})",
                        tried
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                source: Error::NotFound { digest: pack },
            }),
        }
    }

    /// Pack `pack` opened for reading (its trailer and frame table read), and with `digests`
    /// its index's page digests, in slot order (else none).
    fn open_phys(
        &self,
        pack: &Digest256,
        digests: bool,
    ) -> Result<(Arc<Phys>, Vec<Digest256>), PagesError> {
        let known = self
            .phys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(pack)
            .cloned();
        if let Some(phys) = &known
            && !digests
        {
            return Ok((phys.clone(), Vec::new()));
        }
        let store = self.store.get();
        let seekable = match &known {
            Some(phys) => phys.seekable,
            None => store.seekable(pack).map_err(|source| PagesError::Store {
                what: format!("looking for pack {pack}"),
                source,
            })?,
        };
        let bytes = self.pack_bytes(pack, seekable)?;
        let (frames, index) = self.read_index(pack, &bytes, digests)?;
        let mut all = self
            .phys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let phys = all
            .entry(*pack)
            .or_insert_with(|| {
                Arc::new(Phys {
                    id: self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    pack: *pack,
                    seekable,
                    frames,
                })
            })
            .clone();
        Ok((phys, index))
    }

    /// Rebuild the whole file into `out` (empty, or holding only zeros), on `threads` threads:
    /// each thread takes a pack at a time, reads each frame that holds wanted pages once (one
    /// `read_at`), decodes it, hashes each distinct page once against the page list and writes
    /// it (consecutive pages in one `pwrite`). Zero pages are left as holes. Nothing is written
    /// that has not been checked. Returns the file's length.
    pub fn write_to(
        &self,
        out: &File,
        out_path: &std::path::Path,
        threads: usize,
    ) -> Result<u64, PagesError> {
        let len = self.pages() * PAGE_SIZE as u64;
        out.set_len(len).map_err(|source| PagesError::Io {
            op: "size",
            path: out_path.to_owned(),
            source,
        })?;
        // For each pack, its (slot, page number) pairs, sorted by slot.
        let mut wanted: Vec<Vec<(u32, u64)>> = vec![Vec::new(); self.packs.len()];
        for (n, page) in self.list.iter().enumerate() {
            if let Some((pack, slot)) = page.at {
                wanted[pack as usize].push((slot, n as u64));
            }
        }
        for w in &mut wanted {
            w.sort_unstable();
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = threads.max(1).min(wanted.len().max(1));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<(), PagesError> {
                        let mut decoder = None;
                        let mut src = Vec::new();
                        let mut frame = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(want) = wanted.get(i) else {
                                return Ok(());
                            };
                            if want.is_empty() {
                                continue;
                            }
                            let mut bufs = FrameBufs {
                                decoder: &mut decoder,
                                src: &mut src,
                                out: &mut frame,
                            };
                            match self.write_pack(i as u32, want, out, out_path, &mut bufs) {
                                Err(err) if is_gone(&err) => {
                                    // Removed by a repack meanwhile: look again, once.
                                    self.forget(i as u32);
                                    self.write_pack(i as u32, want, out, out_path, &mut bufs)?;
                                }
                                other => other?,
                            }
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

    /// Write the pages `want` ((slot, page number), sorted) of the manifest's pack `pack_no`
    /// into `out`, from the pack itself or the packs it is forwarded to.
    fn write_pack(
        &self,
        pack_no: u32,
        want: &[(u32, u64)],
        out: &File,
        out_path: &std::path::Path,
        bufs: &mut FrameBufs<'_>,
    ) -> Result<(), PagesError> {
        let route = self.route(pack_no)?;
        if let Route::Direct(phys) = &*route {
            return self.write_phys(phys, want, out, out_path, bufs);
        }
        // Forwarded: each page by its digest, grouped by the pack that holds it.
        let mut by_pack: HashMap<u32, PhysWant> = HashMap::new();
        for &(slot, page) in want {
            let listed = self.list[page as usize];
            let (phys, slot) = self.site(&route, pack_no, &listed, slot, page)?;
            by_pack
                .entry(phys.id)
                .or_insert_with(|| (phys, Vec::new()))
                .1
                .push((slot, page));
        }
        for (phys, mut want) in by_pack.into_values() {
            want.sort_unstable();
            self.write_phys(&phys, &want, out, out_path, bufs)?;
        }
        Ok(())
    }

    /// Write the pages `want` ((slot, page number), sorted) of pack `phys` into `out`.
    fn write_phys(
        &self,
        phys: &Phys,
        want: &[(u32, u64)],
        out: &File,
        out_path: &std::path::Path,
        bufs: &mut FrameBufs<'_>,
    ) -> Result<(), PagesError> {
        let pack = phys.pack;
        let bytes = self.pack_bytes(&pack, phys.seekable)?;
        let mut run = Run::new(out, out_path);
        let mut k = 0;
        while k < want.len() {
            let (slot, page) = want[k];
            let frame_no =
                frame_no(phys, slot).map_err(|source| PagesError::BadPage { page, source })?;
            let f = phys.frames[frame_no];
            self.decode_frame(phys, &bytes, frame_no, page, bufs)?;
            let end = f.first + f.pages;
            let from = k;
            while k < want.len() && want[k].0 < end {
                k += 1;
            }
            let here = &want[from..k];
            let page_at = |slot: u32| {
                let at = (slot - f.first) as usize * PAGE_SIZE;
                &bufs.out[at..at + PAGE_SIZE]
            };
            // Each stored page once per digest its places list (the same stored page may
            // stand at several places in the file; a place listing another digest fails),
            // all of the frame's hashed at once, before any is written.
            let mut checks: Vec<(Digest256, u32, &[u8], Digest256)> = Vec::new();
            let mut check_page_no = Vec::new();
            for places in here.chunk_by(|a, b| a.0 == b.0) {
                let slot = places[0].0;
                let digest = self.list[places[0].1 as usize].digest;
                checks.push((pack, slot, page_at(slot), digest));
                check_page_no.push(places[0].1);
                for &(_, n) in &places[1..] {
                    let expected = self.list[n as usize].digest;
                    if expected != digest {
                        checks.push((pack, slot, page_at(slot), expected));
                        check_page_no.push(n);
                    }
                }
            }
            crate::pack::check_pages(&checks).map_err(|(i, source)| PagesError::BadPage {
                page: check_page_no[i],
                source,
            })?;
            for &(slot, n) in here {
                run.push(n, page_at(slot))?;
            }
        }
        run.flush()
    }

    /// How pack `pack`'s bytes are read. A pack the store keeps where `read_at` is cheap is
    /// read in place; any other (a store that compressed it) is read whole once, verified by
    /// the store, and kept among the last [`WHOLE_PACKS`] such packs.
    fn pack_bytes(&self, pack: &Digest256, seekable: bool) -> Result<PackBytes, PagesError> {
        if seekable {
            return Ok(PackBytes::Seekable);
        }
        {
            let mut whole = self
                .whole
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(k) = whole.iter().position(|(p, _)| p == pack) {
                let hit = whole.remove(k).unwrap_or_else(|| unreachable!("found"));
                let bytes = hit.1.clone();
                whole.push_front(hit);
                return Ok(PackBytes::Whole(bytes));
            }
        }
        let mut bytes = Vec::new();
        self.store
            .get()
            .copy_to(pack, &mut bytes)
            .map_err(|source| PagesError::Store {
                what: format!("reading pack {pack}"),
                source,
            })?;
        let bytes = Arc::new(bytes);
        let mut whole = self
            .whole
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !whole.iter().any(|(p, _)| p == pack) {
            whole.truncate(WHOLE_PACKS - 1);
            whole.push_front((*pack, bytes.clone()));
        }
        Ok(PackBytes::Whole(bytes))
    }

    /// Pack `pack`'s frame table and, with `digests`, its page digests in slot order.
    fn read_index(
        &self,
        pack: &Digest256,
        bytes: &PackBytes,
        digests: bool,
    ) -> Result<(Vec<crate::pack::Frame>, Vec<Digest256>), PagesError> {
        use crate::pack::{FRAME_ENTRY_LEN, INDEX_HEAD_LEN, TRAILER_LEN};
        let pack = *pack;
        let len = match bytes {
            PackBytes::Whole(bytes) => bytes.len() as u64,
            PackBytes::Seekable => {
                self.store
                    .get()
                    .raw_size(&pack)
                    .map_err(|source| PagesError::Store {
                        what: format!("reading the size of pack {pack}"),
                        source,
                    })?
            }
        };
        let mut trailer = [0u8; TRAILER_LEN];
        let trailer_at = len.saturating_sub(TRAILER_LEN as u64);
        self.read_pack(&pack, bytes, trailer_at, &mut trailer)?;
        let (index_at, index_len) = crate::pack::parse_trailer(pack, len, &trailer)?;
        let mut head = [0u8; INDEX_HEAD_LEN];
        self.read_pack(&pack, bytes, index_at as u64, &mut head)?;
        let table_len = crate::pack::frame_count(&head)
            .checked_mul(FRAME_ENTRY_LEN)
            .and_then(|n| n.checked_add(INDEX_HEAD_LEN))
            .filter(|&n| n <= index_len)
            .ok_or(PackError::Malformed {
                pack,
                reason: "its index length does not match its counts",
            })?;
        let mut index = vec![0u8; if digests { index_len } else { table_len }];
        self.read_pack(&pack, bytes, index_at as u64, &mut index)?;
        let (frames, _) = crate::pack::parse_frames(pack, &index, index_at, index_len)?;
        let found = if digests {
            index[table_len..]
                .chunks_exact(32)
                .map(|d| {
                    let mut out = [0u8; 32];
                    out.copy_from_slice(d);
                    Digest256::from_bytes(out)
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok((frames, found))
    }

    /// Fill `buf` from pack `pack` at `at` (unverified when read in place: see
    /// [`BlobStore::read_at`]); a pack shorter than its own index says is malformed.
    fn read_pack(
        &self,
        pack: &Digest256,
        bytes: &PackBytes,
        at: u64,
        buf: &mut [u8],
    ) -> Result<(), PagesError> {
        let n = match bytes {
            PackBytes::Seekable => {
                self.store
                    .get()
                    .read_at(pack, at, buf)
                    .map_err(|source| PagesError::Store {
                        what: format!("reading pack {pack}"),
                        source,
                    })?
            }
            PackBytes::Whole(bytes) => {
                let start = usize::try_from(at).unwrap_or(usize::MAX).min(bytes.len());
                let n = buf.len().min(bytes.len() - start);
                buf[..n].copy_from_slice(&bytes[start..start + n]);
                n
            }
        };
        if n < buf.len() {
            return Err(PackError::Malformed {
                pack: *pack,
                reason: "it is shorter than its index says",
            }
            .into());
        }
        Ok(())
    }

    /// Frame `frame_no` of pack `phys` decoded, from the cache or read and decoded now (and
    /// cached). `page` names the page wanted in errors.
    fn cached_frame(
        &self,
        phys: &Phys,
        frame_no: usize,
        page: u64,
    ) -> Result<Arc<DecodedFrame>, PagesError> {
        let id = phys.id;
        {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(k) = cache
                .iter()
                .position(|(p, f, _)| *p == id && *f == frame_no)
            {
                let hit = cache.remove(k).unwrap_or_else(|| unreachable!("found"));
                let decoded = hit.2.clone();
                cache.push_front(hit);
                return Ok(decoded);
            }
        }
        let bytes = self.pack_bytes(&phys.pack, phys.seekable)?;
        let mut decoded = Vec::new();
        DECODER.with(|decoder| {
            SRC.with(|src| {
                let mut bufs = FrameBufs {
                    decoder: &mut decoder.borrow_mut(),
                    src: &mut src.borrow_mut(),
                    out: &mut decoded,
                };
                self.decode_frame(phys, &bytes, frame_no, page, &mut bufs)
            })
        })?;
        let decoded = Arc::new(DecodedFrame::new(decoded));
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !cache.iter().any(|(p, f, _)| *p == id && *f == frame_no) {
            cache.truncate(FRAME_CACHE - 1);
            cache.push_front((id, frame_no, decoded.clone()));
        }
        Ok(decoded)
    }

    /// Read frame `frame_no` of pack `phys` and decode it into `bufs.out`; `page` names a page
    /// wanted from it in errors: a frame that does not decode is that page's
    /// [`PagesError::BadPage`].
    fn decode_frame(
        &self,
        phys: &Phys,
        bytes: &PackBytes,
        frame_no: usize,
        page: u64,
        bufs: &mut FrameBufs<'_>,
    ) -> Result<(), PagesError> {
        let f = phys.frames[frame_no];
        bufs.src.resize(f.len, 0);
        self.read_pack(&phys.pack, bytes, f.offset as u64, bufs.src)?;
        crate::pack::decode_frame_bytes(bufs.decoder, bufs.src, f.pages, bufs.out).map_err(
            |source| PagesError::BadPage {
                page,
                source: PackError::Frame {
                    pack: phys.pack,
                    frame: frame_no,
                    source,
                },
            },
        )
    }
}

/// The frame of pack `phys` that holds `slot`.
fn frame_no(phys: &Phys, slot: u32) -> Result<usize, PackError> {
    crate::pack::frame_holding(&phys.frames, slot).ok_or_else(|| PackError::NoSuchSlot {
        pack: phys.pack,
        slot,
        pages: phys.frames.last().map_or(0, |f| f.first + f.pages),
    })
}

thread_local! {
    /// A thread's zstd decoder for [`PagesReader`]'s frames.
    static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// A thread's buffer for one frame's compressed bytes, kept from frame to frame.
    static SRC: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread's buffers for decoding frames: its decoder, a frame's compressed bytes, its pages.
struct FrameBufs<'b> {
    decoder: &'b mut Option<zstd::bulk::Decompressor<'static>>,
    src: &'b mut Vec<u8>,
    out: &'b mut Vec<u8>,
}

/// How a [`PagesReader`] reads one pack's bytes.
#[derive(Debug, Clone)]
enum PackBytes {
    /// In place, with [`BlobStore::read_at`].
    Seekable,
    /// From a verified copy of the whole pack.
    Whole(Arc<Vec<u8>>),
}

impl PagesReader<'static> {
    /// Like [`open`](Self::open), for a reader that owns a share of the store (one that can be
    /// kept by a long-lived server, or moved to another thread).
    pub fn open_shared(
        store: std::sync::Arc<dyn BlobStore>,
        manifest: &Digest256,
    ) -> Result<Self, PagesError> {
        Self::with_store(StoreRef::Shared(store), manifest)
    }
}

/// Rebuild the file described by manifest `manifest` into `out` (which must be empty), checking
/// every page against its digest before writing it; zero pages are left as holes. Runs on
/// `threads` threads (see [`PagesReader::write_to`]). Returns the file's length.
pub fn read_pages(
    store: &dyn BlobStore,
    manifest: &Digest256,
    out: &File,
    out_path: &std::path::Path,
    threads: usize,
) -> Result<u64, PagesError> {
    PagesReader::open(store, manifest)?.write_to(out, out_path, threads)
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
    use crate::pack::Pack;

    /// A page that is the same for the same `seed` and incompressible.
    /// An incompressible page that is the same for the same `seed`.
    fn page(seed: u64) -> Vec<u8> {
        crate::pack::test_page(seed)
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

    /// Item: pages hashed while the file was still being written (a follower stepping behind an
    /// appending writer, partial pages left for later) give the same manifest as hashing the
    /// whole file after, and a file shorter than what was hashed is an error.
    #[test]
    fn pages_hashed_while_the_file_grows_store_what_hashing_after_stores() {
        use std::io::Write as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let seeds: Vec<Option<u64>> = (0..3000)
            .map(|i| (i % 7 != 3).then_some(i % 1000))
            .collect();
        let (_, whole) = file_of(tmp.path(), "whole", &seeds);
        let bytes = std::fs::read(&whole).expect("read");
        let path = tmp.path().join("growing");
        let mut out = File::create(&path).expect("create");
        let mut follower = PageFollower::new(File::open(&path).expect("open"), path.clone());
        assert!(follower.step().expect("empty").is_empty());
        // Appended in pieces that end mid-page: only whole pages are hashed.
        let mut prehashed = Vec::new();
        for piece in bytes[..2000 * PAGE_SIZE + 100].chunks(PAGE_SIZE * 333 + 17) {
            out.write_all(piece).expect("append");
            loop {
                let step = follower.step().expect("step");
                if step.is_empty() {
                    break;
                }
                prehashed.extend_from_slice(step);
            }
        }
        assert_eq!(prehashed.len(), 2000);
        assert_eq!(follower.pages(), 2000);
        assert_eq!(prehashed[3], None, "a zero page");
        out.write_all(&bytes[2000 * PAGE_SIZE + 100..])
            .expect("append");
        drop(out);

        let store = MemBlobStore::new();
        let mut w = PageWriter::new(&store, PageIndex::none(), 2);
        let file = File::open(&path).expect("open");
        let early = w
            .write_file_prehashed(&file, &path, prehashed.clone(), None)
            .expect("store prehashed");
        let after = w
            .write_file(&File::open(&whole).expect("open"), &whole)
            .expect("store after");
        w.commit().expect("commit");
        assert_eq!(early.manifest, after.manifest);
        assert_eq!(
            early.zero_pages,
            seeds.iter().filter(|s| s.is_none()).count() as u64
        );
        assert_eq!(
            rebuild(&store, &early.manifest, tmp.path()).expect("rebuild"),
            bytes
        );

        let (short, short_path) = file_of(tmp.path(), "short", &seeds[..1000]);
        let mut w = PageWriter::new(&store, PageIndex::none(), 2);
        let err = w
            .write_file_prehashed(&short, &short_path, prehashed, None)
            .expect_err("shrank");
        let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        assert!(chain.contains("shrank to 1000 pages after 2000"), "{chain}");
    }

    /// Item: a re-freeze's page list is written as the changes from its parent's: about 48
    /// bytes per changed page, every version reads back whole, a chain stops at
    /// MAX_DELTA_DEPTH, a base that is gone means a whole list, and a damaged or missing base
    /// is an error, never wrong pages.
    #[test]
    fn page_lists_of_later_versions_are_the_changes_from_their_base() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let index = PageIndex::in_dir(&tmp.path().join("index"));
        let store_version = |k: u64, base: Option<&Digest256>| {
            // 2000 pages, a zero page in every 50th, version k rewrites every 20th from k.
            let seeds: Vec<Option<u64>> = (0..2000u64 + k)
                .map(|i| {
                    (i % 50 != 49).then(|| {
                        let changed = (1..=k).rev().find(|v| i % 20 == v % 20);
                        changed.map_or(i, |v| 1_000_000 * v + i)
                    })
                })
                .collect();
            let (file, path) = file_of(tmp.path(), &format!("v{k}"), &seeds);
            let mut w = PageWriter::new(&store, index.clone(), 2);
            let stored = w
                .write_file_prehashed(&file, &path, Vec::new(), base)
                .expect("store");
            w.commit().expect("commit");
            assert_eq!(
                rebuild(&store, &stored.manifest, tmp.path()).expect("rebuild"),
                std::fs::read(&path).expect("original"),
                "version {k} reads back whole"
            );
            stored.manifest
        };
        let mut manifests = vec![store_version(0, None)];
        for k in 1..=(MAX_DELTA_DEPTH as u64 + 1) {
            let base = *manifests.last().expect("one");
            manifests.push(store_version(k, Some(&base)));
        }
        let depth = |m: &Digest256| load_manifest(&store, m).expect("manifest").bases.len();
        assert_eq!(depth(&manifests[0]), 0);
        for (k, m) in manifests
            .iter()
            .enumerate()
            .take(MAX_DELTA_DEPTH + 1)
            .skip(1)
        {
            assert_eq!(depth(m), k, "version {k} is a delta");
        }
        assert_eq!(
            depth(&manifests[MAX_DELTA_DEPTH + 1]),
            0,
            "a whole list again"
        );
        let list_len = |m: &Digest256| {
            let m = load_manifest(&store, m).expect("manifest");
            store.get(&m.list).expect("list").len()
        };
        // 100 changed pages (every 20th) + 1 added: 101 new entries of 40 bytes, each with an
        // operation before it and a copy after, and the 64-byte header.
        assert_eq!(list_len(&manifests[0]), 16 + 2000 * 40);
        assert!(
            list_len(&manifests[1]) <= 64 + 8 + 4 * 4 + 101 * (40 + 2 * 24),
            "{}",
            list_len(&manifests[1])
        );

        // Pages that moved (10 new ones in front, as a grown heap puts them) are copies too.
        let moved: Vec<Option<u64>> = (0..10u64)
            .map(|i| Some(7_000_000 + i))
            .chain((0..2000u64).map(|i| (i % 50 != 49).then_some(i)))
            .collect();
        let (file, path) = file_of(tmp.path(), "moved", &moved);
        let mut w = PageWriter::new(&store, index.clone(), 2);
        let shifted = w
            .write_file_prehashed(&file, &path, Vec::new(), Some(&manifests[0]))
            .expect("store");
        w.commit().expect("commit");
        assert_eq!(depth(&shifted.manifest), 1);
        assert!(
            list_len(&shifted.manifest) <= 64 + 8 + 4 * 4 + 2 * 24 + 10 * 40,
            "{}",
            list_len(&shifted.manifest)
        );
        assert_eq!(
            rebuild(&store, &shifted.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path).expect("original")
        );

        // A base whose manifest is gone: a whole list, and it still reads back.
        let gone = Digest256::of(b"no such manifest");
        let whole = store_version(3, Some(&gone));
        assert_eq!(depth(&whole), 0);

        // A delta whose base list is damaged or missing is an error.
        let m2 = load_manifest(&store, &manifests[2]).expect("manifest");
        let base_list = m2.bases[0];
        let saved = store.get(&base_list).expect("base");
        store.remove(&base_list).expect("remove");
        let err = rebuild(&store, &manifests[2], tmp.path()).expect_err("no base");
        assert!(err.to_string().contains(&base_list.to_string()), "{err}");
        store.put(&saved).expect("put back");
        assert!(rebuild(&store, &manifests[2], tmp.path()).is_ok());
        // A delta that names another base than its manifest says.
        let mut forged = store.get(&m2.list).expect("list").to_vec();
        forged[16..48].copy_from_slice(manifests[0].as_bytes());
        let err = parse_list(&store, &m2.list, &forged, &m2).expect_err("forged");
        assert!(
            err.to_string().contains("its base is not the manifest's"),
            "{err}"
        );
    }

    /// Item: a writer told no base finds the last version of a file through the store's
    /// manifest-of-pack hints, so whoever freezes again gets a delta list.
    #[test]
    fn a_writer_finds_the_base_itself_through_the_stores_hints() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let version = |k: u64| -> Vec<Option<u64>> {
            (0..3000u64)
                .map(|i| Some(if i % 20 == 0 { 1_000_000 * k + i } else { i }))
                .collect()
        };
        let mut manifests = Vec::new();
        for k in 0..3 {
            let (file, path) = file_of(tmp.path(), &format!("v{k}"), &version(k));
            let mut w = PageWriter::new(&store, store.page_index(), 2);
            let stored = w.write_file(&file, &path).expect("store");
            w.commit().expect("commit");
            assert_eq!(
                rebuild(&store, &stored.manifest, tmp.path()).expect("rebuild"),
                std::fs::read(&path).expect("original")
            );
            manifests.push(stored.manifest);
        }
        let bases = |m: &Digest256| load_manifest(&store, m).expect("manifest").bases;
        assert!(bases(&manifests[0]).is_empty());
        let first_list = load_manifest(&store, &manifests[0]).expect("m").list;
        let second_list = load_manifest(&store, &manifests[1]).expect("m").list;
        assert_eq!(bases(&manifests[1]), vec![first_list]);
        assert_eq!(bases(&manifests[2]), vec![second_list, first_list]);
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

    /// Item: the packer says how far it read a file for the last time as it goes, and never
    /// reads before that again (here, the caller scribbles over what it was told it may free).
    #[test]
    fn the_packer_never_reads_what_it_said_it_left_behind() {
        use std::os::unix::fs::FileExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let index = PageIndex::in_dir(&tmp.path().join("index"));
        // Distinct pages, then zero pages and pages repeating early ones.
        let pages: Vec<Option<u64>> = (0..READ_STEP_PAGES as u64 + 300)
            .map(|i| match i % 97 {
                0 => None,
                13 if i > 2000 => Some(i - 1000),
                _ => Some(i),
            })
            .collect();
        let (file, path) = file_of(tmp.path(), "pages", &pages);
        let original = std::fs::read(&path).expect("read");
        let scribbler = File::options().write(true).open(&path).expect("open");
        let mut ends = Vec::new();
        let mut w = PageWriter::new(&store, index, 2);
        let stored = w
            .write_file_then(&file, &path, Vec::new(), None, &mut |end| {
                let from = ends.last().copied().unwrap_or(0);
                if end > from {
                    let junk = vec![0xa5u8; (end - from) as usize];
                    scribbler.write_all_at(&junk, from).expect("scribble");
                }
                ends.push(end);
            })
            .expect("store");
        w.commit().expect("commit");
        let len = original.len() as u64;
        assert_eq!(ends, vec![(READ_STEP_PAGES * PAGE_SIZE) as u64, len]);
        assert_eq!(
            rebuild(&store, &stored.manifest, tmp.path()).expect("rebuild"),
            original
        );
    }

    #[test]
    fn a_file_of_kept_pages_packs_only_kept_ones_and_never_a_hole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let index = PageIndex::in_dir(&tmp.path().join("index"));
        let first: Vec<Option<u64>> = (0..600).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "one", &first);
        let mut w = PageWriter::new(&store, index.clone(), 2);
        let one = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        // The next version: every 10th page changed; only those were kept (written), the rest
        // are holes, as a streamed capture leaves them.
        // Pages 500..600 repeat the new page 490: only its first place was kept.
        let pages: Vec<Option<u64>> = (0..600)
            .map(|i| {
                Some(match i {
                    500.. => 50_490,
                    _ if i % 10 == 0 => 50_000 + i,
                    _ => i,
                })
            })
            .collect();
        let digests: Vec<Option<Digest256>> = pages
            .iter()
            .map(|p| p.map(|seed| page_digest(&page(seed))))
            .collect();
        let kept: Vec<bool> = (0..600).map(|i| i < 500 && i % 10 == 0).collect();
        let sparse: Vec<Option<u64>> = pages
            .iter()
            .zip(&kept)
            .map(|(p, k)| if *k { *p } else { None })
            .collect();
        let (file, path) = file_of(tmp.path(), "two", &sparse);
        let mut w = PageWriter::new(&store, index.clone(), 2);
        let two = w
            .write_file_kept(
                &file,
                &path,
                digests.clone(),
                (Some(&one.manifest), None),
                Some(&kept),
                &mut |_| {},
            )
            .expect("store");
        w.commit().expect("commit");
        assert_eq!(two.new_pages, 50);
        let (whole, _) = file_of(tmp.path(), "whole", &pages);
        drop(whole);
        assert_eq!(
            rebuild(&store, &two.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(tmp.path().join("whole")).expect("whole")
        );
        // Shifted by a page, so that nothing is where the base has it, and through a writer
        // without an index: the pages left out are placed where the base has them.
        let shifted: Vec<Option<u64>> = std::iter::once(Some(90_000))
            .chain(pages[..599].iter().copied())
            .collect();
        let (file3, path3) = file_of(
            tmp.path(),
            "three",
            &std::iter::once(Some(90_000))
                .chain(std::iter::repeat_n(None, 599))
                .collect::<Vec<_>>(),
        );
        let digests3: Vec<Option<Digest256>> = shifted
            .iter()
            .map(|p| p.map(|seed| page_digest(&page(seed))))
            .collect();
        let kept3: Vec<bool> = (0..600).map(|i| i == 0).collect();
        let reader = PagesReader::open(&store, &two.manifest).expect("open the base");
        let mut w = PageWriter::new(&store, PageIndex::none(), 2);
        let three = w
            .write_file_kept(
                &file3,
                &path3,
                digests3,
                (Some(&two.manifest), Some(reader)),
                Some(&kept3),
                &mut |_| {},
            )
            .expect("store");
        w.commit().expect("commit");
        assert_eq!(three.new_pages, 1);
        let (whole3, _) = file_of(tmp.path(), "whole3", &shifted);
        drop(whole3);
        assert_eq!(
            rebuild(&store, &three.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(tmp.path().join("whole3")).expect("whole")
        );
        // A page left out that the store lacks is an error, never a packed hole.
        let mut lacking = kept.clone();
        lacking[0] = false;
        let mut digests = digests;
        digests[0] = Some(page_digest(&page(77_777)));
        let mut w = PageWriter::new(&store, index, 2);
        let err = w
            .write_file_kept(
                &file,
                &path,
                digests,
                (None, None),
                Some(&lacking),
                &mut |_| {},
            )
            .expect_err("a hole would be packed");
        assert!(
            format!("{err:?}").contains("page 0 was left out"),
            "{err:?}"
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

    /// A file of `n` pages (every 7th a zero page, the rest distinct) stored in `store`.
    fn stored_file(store: &dyn BlobStore, dir: &std::path::Path, n: u64) -> (Digest256, Vec<u8>) {
        let layout: Vec<Option<u64>> = (0..n).map(|i| (i % 7 != 3).then_some(i)).collect();
        let (file, path) = file_of(dir, &format!("f{n}"), &layout);
        let mut w = PageWriter::new(store, PageIndex::none(), 2);
        let stored = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        (stored.manifest, std::fs::read(&path).expect("original"))
    }

    #[test]
    fn pages_reader_reads_any_run_of_pages_from_either_store() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PagesReader<'static>>();
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let mem = MemBlobStore::new();
        let stores: [&dyn BlobStore; 2] = [&fs, &mem];
        for store in stores {
            let (manifest, original) = stored_file(store, tmp.path(), 5000);
            let reader = PagesReader::open(store, &manifest).expect("open");
            assert_eq!(reader.pages(), 5000);
            // The whole file in one read, and in runs that cross frames and packs.
            let mut all = vec![0u8; original.len()];
            reader.read(0, &mut all).expect("read all");
            assert_eq!(all, original);
            for (first, n) in [(0u64, 1usize), (31, 2), (2040, 20), (4999, 1), (3, 1)] {
                let mut out = vec![0xaau8; n * PAGE_SIZE];
                reader.read(first, &mut out).expect("read run");
                let at = first as usize * PAGE_SIZE;
                assert_eq!(out, original[at..at + out.len()], "pages {first}+{n}");
            }
            // Random single pages (a fixed xorshift sequence), zero pages zero-filled.
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut page = vec![0u8; PAGE_SIZE];
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = x % 5000;
                page.fill(0x55);
                reader.read(n, &mut page).expect("read page");
                let at = n as usize * PAGE_SIZE;
                assert_eq!(page, original[at..at + PAGE_SIZE], "page {n}");
                assert_eq!(reader.listed(n).expect("listed").at.is_none(), n % 7 == 3);
            }
            // Many threads at once.
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let (reader, original) = (&reader, &original);
                    s.spawn(move || {
                        let mut page = vec![0u8; PAGE_SIZE];
                        for n in (t..5000).step_by(37) {
                            reader.read(n, &mut page).expect("read");
                            let at = n as usize * PAGE_SIZE;
                            assert_eq!(page, original[at..at + PAGE_SIZE]);
                        }
                    });
                }
            });
            // Reads past the end, or of part of a page, are refused.
            for (first, len) in [(5000u64, PAGE_SIZE), (4999, 2 * PAGE_SIZE), (0, 100)] {
                let mut out = vec![0u8; len];
                assert!(
                    matches!(
                        reader.read(first, &mut out),
                        Err(PagesError::OutOfRange { pages: 5000, .. })
                    ),
                    "{first}+{len}"
                );
            }
        }
        // The shared form outlives the borrow and moves between threads.
        let shared: std::sync::Arc<dyn BlobStore> = std::sync::Arc::new(mem);
        let (manifest, original) = stored_file(&*shared, tmp.path(), 100);
        let reader = PagesReader::open_shared(shared, &manifest).expect("open");
        let page = std::thread::spawn(move || {
            let mut page = vec![0u8; PAGE_SIZE];
            reader.read(99, &mut page).expect("read");
            page
        })
        .join()
        .expect("thread");
        assert_eq!(page, original[99 * PAGE_SIZE..]);
    }

    #[test]
    fn pages_reader_names_a_corrupt_page_and_never_hands_it_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let (manifest, original) = stored_file(&fs, tmp.path(), 100);
        let m = load_manifest(&fs, &manifest).expect("manifest");
        // Packs are stored raw: flip one byte of page 42's (incompressible) bytes in the file.
        let path = fs.blob_path(&m.packs[0]);
        assert!(
            path.to_string_lossy().ends_with(".raw"),
            "{}",
            path.display()
        );
        let mut bytes = std::fs::read(&path).expect("pack");
        let needle = &original[42 * PAGE_SIZE + 64..42 * PAGE_SIZE + 96];
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("page 42 in the pack");
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).expect("corrupt");
        let reader = PagesReader::open(&fs, &manifest).expect("open");
        let mut page = vec![0u8; PAGE_SIZE];
        let err = reader.read(42, &mut page).expect_err("corrupt page");
        assert!(matches!(err, PagesError::BadPage { page: 42, .. }), "{err}");
        assert!(err.to_string().contains("page 42"), "{err}");
        // A run that holds it fails the same way; its neighbours in the same frame still read.
        let mut run = vec![0u8; 10 * PAGE_SIZE];
        let err = reader.read(40, &mut run).expect_err("corrupt run");
        assert!(matches!(err, PagesError::BadPage { page: 42, .. }), "{err}");
        reader.read(43, &mut page).expect("neighbour");
        assert_eq!(page, original[43 * PAGE_SIZE..44 * PAGE_SIZE]);
        // The store's own check of the whole blob sees it too.
        assert!(matches!(fs.get(&m.packs[0]), Err(Error::Integrity { .. })));
    }

    #[test]
    fn whole_frames_read_straight_into_the_output_are_checked_too() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        // No zero pages: every frame's 32 pages are 32 pages of the file in a row.
        let layout: Vec<Option<u64>> = (0..200).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "dense", &layout);
        let mut w = PageWriter::new(&fs, PageIndex::none(), 2);
        let manifest = w.write_file(&file, &path).expect("store").manifest;
        w.commit().expect("commit");
        let original = std::fs::read(&path).expect("original");
        let m = load_manifest(&fs, &manifest).expect("manifest");
        let mut bytes = std::fs::read(fs.blob_path(&m.packs[0])).expect("pack");
        let needle = &original[70 * PAGE_SIZE + 64..70 * PAGE_SIZE + 96];
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("page 70 in the pack");
        bytes[at] ^= 1;
        std::fs::write(fs.blob_path(&m.packs[0]), &bytes).expect("corrupt");
        let reader = PagesReader::open(&fs, &manifest).expect("open");
        let mut all = vec![0u8; 200 * PAGE_SIZE];
        let err = reader
            .read(0, &mut all)
            .expect_err("a bad page in a whole frame");
        assert!(matches!(err, PagesError::BadPage { page: 70, .. }), "{err}");
        // Whole frames without it read, the first time straight into the output and then
        // through the cache: the same bytes each time.
        for _ in 0..3 {
            let mut run = vec![0u8; 64 * PAGE_SIZE];
            reader.read(0, &mut run).expect("two clean frames");
            assert_eq!(run, original[..64 * PAGE_SIZE]);
            reader.read(96, &mut run).expect("two clean frames");
            assert_eq!(run, original[96 * PAGE_SIZE..160 * PAGE_SIZE]);
        }
        let direct = reader
            .direct
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        assert!(
            direct >= 4,
            "{direct} frames were read straight into the output"
        );
    }

    #[test]
    fn whole_frames_that_compressed_and_frames_that_did_not_read_alike() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        // Frames of text (decoded into place) between frames of noise (read into place), and
        // a last frame of 8 pages, each page distinct.
        let mut original = Vec::new();
        for i in 0..104u64 {
            if (i / 32) % 2 == 1 {
                let line = format!("page {i}: a line of text that repeats. ");
                original.extend(line.bytes().cycle().take(PAGE_SIZE));
            } else {
                original.extend_from_slice(&page(i));
            }
        }
        let path = tmp.path().join("mixed");
        std::fs::write(&path, &original).expect("write");
        let mut w = PageWriter::new(&fs, PageIndex::none(), 2);
        let file = File::open(&path).expect("open");
        let manifest = w.write_file(&file, &path).expect("store").manifest;
        w.commit().expect("commit");
        let reader = PagesReader::open(&fs, &manifest).expect("open");
        let mut all = vec![0u8; 104 * PAGE_SIZE];
        reader.read(0, &mut all).expect("read");
        assert!(all == original, "the pages read back differ");
        let direct = reader
            .direct
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        assert_eq!(direct, 4, "every frame went straight into the output");
        let m = load_manifest(&fs, &manifest).expect("manifest");
        let stored = std::fs::metadata(fs.blob_path(&m.packs[0]))
            .expect("pack")
            .len();
        assert!(
            stored < 80 * PAGE_SIZE as u64,
            "{stored} bytes: the text frames were not compressed"
        );
    }

    /// A store in `dir` holding a first version of a file: 3000 pages, every 9th a zero page.
    fn stored_first_version(
        dir: &std::path::Path,
    ) -> (crate::FsBlobStore, Vec<Option<u64>>, PagesStored) {
        let fs = crate::FsBlobStore::open(&dir.join("store")).expect("store");
        let first: Vec<Option<u64>> = (0..3000u64).map(|i| (i % 9 != 4).then_some(i)).collect();
        let (file, path) = file_of(dir, "v1", &first);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        let v1 = w.write_file(&file, &path).expect("v1");
        w.commit().expect("commit");
        (fs, first, v1)
    }

    #[test]
    fn a_later_version_places_its_unchanged_pages_where_its_base_has_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fs, first, v1) = stored_first_version(tmp.path());
        assert_eq!(v1.from_base_pages, 0, "no base yet");
        // Every 10th page rewritten, two zero pages filled, one filled page zeroed.
        let mut second = first.clone();
        for (i, p) in second.iter_mut().enumerate() {
            if i % 10 == 7 {
                *p = Some(100_000 + i as u64);
            }
        }
        second[4] = Some(7_777_777);
        second[13] = Some(8_888_888);
        second[5] = None;
        let (file, path) = file_of(tmp.path(), "v2", &second);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        let v2 = w.write_file(&file, &path).expect("v2");
        w.commit().expect("commit");
        let unchanged = first
            .iter()
            .zip(&second)
            .filter(|(a, b)| a.is_some() && a == b)
            .count() as u64;
        assert_eq!(
            v2.from_base_pages, unchanged,
            "the base was found by its sample"
        );
        // The page list is what hashing every page gives, and the file reads back.
        let reader = PagesReader::open(&fs, &v2.manifest).expect("open");
        let bytes = std::fs::read(&path).expect("v2 bytes");
        for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let listed = reader.listed(i as u64).expect("listed");
            if is_zero_page(page) {
                assert_eq!(listed.at, None, "page {i}");
            } else {
                assert_eq!(listed.digest, page_digest(page), "page {i}");
            }
        }
        let mut all = vec![0u8; bytes.len()];
        reader.read(0, &mut all).expect("read");
        assert_eq!(all, bytes);
        // A file that is not a later version of anything has no base: every page is looked up.
        let other: Vec<Option<u64>> = (0..3000u64).map(|i| Some(500_000 + i)).collect();
        let (file, path) = file_of(tmp.path(), "other", &other);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        assert_eq!(
            w.write_file(&file, &path).expect("other").from_base_pages,
            0
        );
    }

    /// Item: a later version's page that copies a page its base has at its own place is not
    /// packed again even where the page index cannot find it (a writer without one): it is
    /// taken from where the base has it; only the page new to the store is packed, and the file
    /// reads back.
    #[test]
    fn a_copy_of_a_page_placed_from_the_base_is_not_packed_again_without_an_index() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fs, first, v1) = stored_first_version(tmp.path());
        let mut second = first.clone();
        second[2000] = Some(5);
        second[2001] = Some(900_001);
        let (file, path) = file_of(tmp.path(), "v2", &second);
        let mut w = PageWriter::new(&fs, PageIndex::none(), 2);
        let v2 = w
            .write_file_prehashed(&file, &path, Vec::new(), Some(&v1.manifest))
            .expect("v2");
        w.commit().expect("commit");
        assert_eq!(v2.new_pages, 1, "the copy of page 5 is taken from the base");
        assert_eq!(
            rebuild(&fs, &v2.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path).expect("v2 bytes")
        );
    }

    /// Item: pages of a later version that moved (three pages inserted near the start shift all
    /// the others; one page is a copy of one from elsewhere) are placed where the base has them:
    /// only the inserted pages are new, the list is a small delta (a copy from each page's
    /// first place in the base, found for the moved pages only), names no pack twice, and the
    /// file reads back whole.
    #[test]
    fn moved_pages_are_placed_where_the_base_has_them_and_the_delta_stays_small() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fs, first, v1) = stored_first_version(tmp.path());
        let mut second = first.clone();
        second.splice(100..100, [Some(900_001), Some(900_002), Some(900_003)]);
        second[2000] = Some(5);
        let (file, path) = file_of(tmp.path(), "v2", &second);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        let v2 = w
            .write_file_prehashed(&file, &path, Vec::new(), Some(&v1.manifest))
            .expect("v2");
        w.commit().expect("commit");
        assert_eq!(v2.new_pages, 3, "only the inserted pages are new");
        let manifest = load_manifest(&fs, &v2.manifest).expect("manifest");
        assert_eq!(manifest.bases.len(), 1, "written as the changes from v1");
        let mut packs = manifest.packs.clone();
        packs.sort_unstable();
        packs.dedup();
        assert_eq!(packs.len(), manifest.packs.len(), "no pack named twice");
        let list = fs.get(&manifest.list).expect("list");
        let whole = 16 + second.len() * LIST_ENTRY;
        assert!(
            list.len() < whole / 10,
            "a delta of {} bytes for a whole list of {whole}",
            list.len()
        );
        assert_eq!(
            rebuild(&fs, &v2.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path).expect("v2 bytes")
        );
    }

    /// Item: a reader lists its packs in the order reading the file from the start first needs
    /// them (a pack of the base that only later pages use comes after the new pages' pack), with
    /// how many places each holds; reading them ahead reads each whole and leaves every page as
    /// it was; a pack the store no longer has has no site to read ahead, and the read that
    /// wants it reports it.
    #[test]
    fn packs_are_read_ahead_in_the_order_the_file_first_needs_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let first: Vec<Option<u64>> = (0..3000u64).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "v1", &first);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        let v1 = w.write_file(&file, &path).expect("v1");
        w.commit().expect("commit");
        // The first 2000 pages rewritten (and page 1 zeroed): they need a new pack first, then
        // the base's pack of pages 0..2048 from page 2000 on, then its other pack.
        let mut second = first.clone();
        for (i, p) in second.iter_mut().enumerate().take(2000) {
            *p = Some(1_000_000 + i as u64);
        }
        second[1] = None;
        let (file, path) = file_of(tmp.path(), "v2", &second);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        let v2 = w.write_file(&file, &path).expect("v2");
        w.commit().expect("commit");
        let base = PagesReader::open(&fs, &v1.manifest).expect("open v1");
        let base_pack_of = |page: u64| {
            let (n, _) = base.listed(page).expect("listed").at.expect("stored");
            base.pack(n).expect("pack")
        };
        let reader = PagesReader::open(&fs, &v2.manifest).expect("open v2");
        let order = reader.packs_by_first_use();
        let firsts: Vec<(u64, u64)> = order.iter().map(|&(page, _, used)| (page, used)).collect();
        assert_eq!(
            firsts,
            [
                (0, 1999),
                (2000, 48),
                (PACK_PAGES as u64, 3000 - PACK_PAGES as u64)
            ],
            "(first use, places held)"
        );
        let packs: Vec<Digest256> = order
            .iter()
            .map(|&(_, n, _)| reader.pack(n).expect("pack"))
            .collect();
        assert!(
            !load_manifest(&fs, &v1.manifest)
                .expect("v1 manifest")
                .packs
                .contains(&packs[0])
        );
        assert_eq!(packs[1..], [base_pack_of(0), base_pack_of(2999)]);
        for &(_, n, _) in &order {
            let sites = reader.pack_sites(n);
            assert_eq!(sites, [reader.pack(n).expect("pack")]);
            let size = reader.store().raw_size(&sites[0]).expect("size");
            assert_eq!(
                reader.store().prefetch(&sites[0]).expect("read ahead"),
                size
            );
        }
        let bytes = std::fs::read(&path).expect("v2 bytes");
        let mut all = vec![0u8; bytes.len()];
        reader.read(0, &mut all).expect("read");
        assert!(
            all == bytes,
            "the file reads back after its packs were read ahead"
        );
        // Gone from the store: nowhere to read it ahead, and reading its pages is the error.
        assert!(fs.remove(&packs[2]).expect("remove"));
        let reader = PagesReader::open(&fs, &v2.manifest).expect("open v2 again");
        assert_eq!(reader.pack_sites(order[2].1), []);
        let mut page_buf = vec![0u8; PAGE_SIZE];
        let err = reader
            .read(2999, &mut page_buf)
            .expect_err("its pack is gone");
        assert!(is_gone(&err), "{err}");
    }

    #[test]
    fn a_page_many_places_hold_is_checked_against_each_places_digest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        // Pages 0..8 distinct, then the same eight again and again: one stored page each.
        let layout: Vec<Option<u64>> = (0..64u64).map(|i| Some(i % 8)).collect();
        let (file, path) = file_of(tmp.path(), "repeats", &layout);
        let mut w = PageWriter::new(&store, PageIndex::none(), 2);
        let stored = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        let original = std::fs::read(&path).expect("original");
        let reader = PagesReader::open(&store, &stored.manifest).expect("open");
        let mut all = vec![0u8; original.len()];
        reader.read(0, &mut all).expect("read");
        assert_eq!(all, original);
        // A list that gives page 20 (stored page 4) the digest of stored page 5, where
        // stored page 4 lives: once page 4 was checked and its frame is still decoded, page 20
        // is still checked against its own digest, and fails.
        let m = load_manifest(&store, &stored.manifest).expect("manifest");
        let mut list = store.get(&m.list).expect("list");
        let entry = |i: usize| 16 + i * LIST_ENTRY;
        let five: [u8; 32] = list[entry(5)..entry(5) + 32].try_into().expect("digest");
        list[entry(20)..entry(20) + 32].copy_from_slice(&five);
        let forged_list = store.put(&list).expect("put list");
        let forged = PagesManifest {
            list: forged_list,
            ..m.clone()
        };
        let forged = store
            .put(&serde_json::to_vec(&forged).expect("json"))
            .expect("put manifest");
        let reader = PagesReader::open(&store, &forged).expect("open forged");
        let mut page = vec![0u8; PAGE_SIZE];
        reader.read(4, &mut page).expect("page 4 itself");
        let err = reader.read(20, &mut page).expect_err("page 20 forged");
        assert!(matches!(err, PagesError::BadPage { page: 20, .. }), "{err}");
        let mut run = vec![0u8; 32 * PAGE_SIZE];
        let err = reader.read(0, &mut run).expect_err("a run holding page 20");
        assert!(matches!(err, PagesError::BadPage { page: 20, .. }), "{err}");
    }

    #[test]
    fn a_damaged_pack_index_is_an_error_never_a_wrong_page() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let (manifest, original) = stored_file(&store, tmp.path(), 100);
        let m = load_manifest(&store, &manifest).expect("manifest");
        let pack = m.packs[0];
        let good = store.get(&pack).expect("pack");
        // Everything after the frames: the index (counts, frame table, page digests) and the
        // trailer. Flip each byte in turn (every byte of the counts, frame table and trailer,
        // a sample of the digests): each read gives the right pages or fails.
        let parsed = Pack::parse(pack, &good).expect("parse");
        let index_at = {
            let t = &good[good.len() - 24..];
            u64::from_le_bytes(t[..8].try_into().expect("8 bytes")) as usize
        };
        assert_eq!(parsed.pages(), 86, "100 pages less the 14 zero ones");
        let table_end = index_at + 8 + 3 * 20;
        let mut failures = 0;
        let offsets: Vec<usize> = (index_at..table_end)
            .chain((table_end..good.len() - 24).step_by(97))
            .chain(good.len() - 24..good.len())
            .collect();
        for at in offsets {
            for flip in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                store.corrupt_for_test(&pack, &bad);
                let reader = PagesReader::open(&store, &manifest).expect("open");
                let mut all = vec![0u8; original.len()];
                match reader.read(0, &mut all) {
                    Ok(()) => assert_eq!(all, original, "byte {at} ^ {flip:#x}"),
                    Err(_) => failures += 1,
                }
                // Page by page too (each page decoded from its own frame).
                let mut page = vec![0u8; PAGE_SIZE];
                for n in [0u64, 33, 64, 99] {
                    if reader.read(n, &mut page).is_ok() {
                        let at = n as usize * PAGE_SIZE;
                        assert_eq!(page, original[at..at + PAGE_SIZE], "page {n}");
                    }
                }
            }
        }
        assert!(
            failures > 100,
            "most damage to the table is noticed: {failures}"
        );
        store.corrupt_for_test(&pack, &good);
    }

    #[test]
    fn packs_a_store_compressed_are_read_whole_and_verified() {
        // A store written before packs were kept raw (or a pack pulled from a registry): the
        // same pack as a `.zst` file.
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let (manifest, original) = stored_file(&fs, tmp.path(), 3000);
        let m = load_manifest(&fs, &manifest).expect("manifest");
        for pack in &m.packs {
            assert!(fs.seekable(pack).expect("seekable"));
            let bytes = fs.get(pack).expect("pack");
            fs.put(&bytes).expect("put");
            std::fs::remove_file(fs.blob_path(pack)).expect("remove the raw copy");
            fs.put(&bytes).expect("put compressed");
            assert!(fs.blob_path(pack).to_string_lossy().ends_with(".zst"));
            assert!(!fs.seekable(pack).expect("seekable"));
        }
        assert_eq!(
            rebuild(&fs, &manifest, tmp.path()).expect("rebuild"),
            original
        );
        let reader = PagesReader::open(&fs, &manifest).expect("open");
        let mut page = vec![0u8; PAGE_SIZE];
        for n in [2999u64, 0, 2100, 5] {
            reader.read(n, &mut page).expect("read");
            let at = n as usize * PAGE_SIZE;
            assert_eq!(page, original[at..at + PAGE_SIZE]);
        }
        // Read whole, such a pack is verified by the store: a flipped byte is its error.
        let path = fs.blob_path(&m.packs[0]);
        let mut other = fs.get(&m.packs[0]).expect("pack");
        other[5000] ^= 1;
        std::fs::write(&path, zstd::encode_all(&other[..], 1).expect("zstd")).expect("write");
        let err = rebuild(&fs, &manifest, tmp.path()).expect_err("corrupt");
        assert!(
            matches!(
                &err,
                PagesError::Store {
                    source: Error::Integrity { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_session_becomes_visible_and_indexed_only_when_committed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let layout: Vec<Option<u64>> = (0..3000).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "a", &layout);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        let stored = w.write_file(&file, &path).expect("store");
        // A second file in the same session shares the first one's (uncommitted) packs.
        let (file2, path2) = file_of(tmp.path(), "b", &layout[..100]);
        let second = w.write_file(&file2, &path2).expect("store");
        assert_eq!(second.new_pages, 0);
        // A blob stored beside the pages (the images tar of a freeze) goes with them.
        let beside = w
            .put_beside(b"images beside the pages")
            .expect("put beside");
        assert!(!fs.contains(&stored.manifest).expect("contains"));
        assert!(fs.list().expect("list").is_empty(), "nothing visible yet");
        let digests: Vec<Digest256> = (0..3000u64).map(|i| page_digest(&page(i))).collect();
        let mut sorted = digests.clone();
        sorted.sort();
        assert!(fs.page_index().lookup(&sorted).expect("lookup").is_empty());
        w.commit().expect("commit");
        let m = load_manifest(&fs, &stored.manifest).expect("visible");
        assert_eq!(m.packs.len(), 2);
        assert_eq!(
            fs.get(&beside).expect("beside, visible"),
            b"images beside the pages"
        );
        assert_eq!(
            fs.page_index().lookup(&sorted).expect("lookup").len(),
            3000,
            "indexed"
        );
        assert_eq!(
            rebuild(&fs, &second.manifest, tmp.path()).expect("rebuild"),
            std::fs::read(&path2).expect("original")
        );
        // A session dropped uncommitted leaves nothing behind.
        let before = fs.list().expect("list");
        let other: Vec<Option<u64>> = (5000..5100).map(Some).collect();
        let (file3, path3) = file_of(tmp.path(), "c", &other);
        let mut w = PageWriter::new(&fs, fs.page_index(), 2);
        w.write_file(&file3, &path3).expect("store");
        drop(w);
        assert_eq!(fs.list().expect("list"), before);
        assert!(
            fs.sweep_temp(&crate::GcOptions::dry_run_now())
                .expect("sweep")
                .is_empty()
        );
    }

    #[test]
    fn pages_packed_during_a_capture_are_the_sessions_own() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        // The file: 3000 distinct pages, a zero page, and page 10 again at the end. Pages
        // 0..2500 were packed while captured (holes in the file, not kept), 300 of them sent
        // twice; the rest were kept in the file.
        let mut layout: Vec<Option<u64>> = (0..3000).map(Some).collect();
        layout.push(None);
        layout.push(Some(10));
        let original = {
            let (_, path) = file_of(tmp.path(), "original", &layout);
            std::fs::read(path).expect("read")
        };
        let digests: Vec<Option<Digest256>> = layout
            .iter()
            .map(|p| p.map(|seed| page_digest(&page(seed))))
            .collect();
        let captured: Vec<Option<u64>> = layout
            .iter()
            .enumerate()
            .map(|(i, p)| if (2500..=3000).contains(&i) { *p } else { None })
            .collect();
        let (file, path) = file_of(tmp.path(), "captured", &captured);
        let kept: Vec<bool> = (0..layout.len())
            .map(|i| (2500..3000).contains(&i))
            .collect();
        fn prepack_in(store: &crate::FsBlobStore) -> PrePacked<'_> {
            let (send, pages) = std::sync::mpsc::channel::<PagesIn>();
            let (spare, _spares) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            for range in [0..1000u64, 700..1000, 1000..2500] {
                let mut batch = PagesIn::default();
                for seed in range {
                    batch.bytes.extend_from_slice(&page(seed));
                    batch.digests.push(page_digest(&page(seed)));
                }
                send.send(batch).expect("send");
            }
            drop(send);
            prepack(store, 2, pages, spare).expect("prepack")
        }
        let prepacked = prepack_in(&fs);
        assert_eq!(prepacked.pages(), 2500, "each page once");
        assert!(fs.list().expect("list").is_empty(), "nothing visible yet");
        let mut w = PageWriter::with_prepacked(&fs, fs.page_index(), 2, prepacked);
        let stored = w
            .write_file_kept(
                &file,
                &path,
                digests,
                (None, None),
                Some(&kept),
                &mut |_| {},
            )
            .expect("store");
        assert_eq!(stored.new_pages, 500, "only the pages kept in the file");
        w.commit().expect("commit");
        assert_eq!(
            rebuild(&fs, &stored.manifest, tmp.path()).expect("rebuild"),
            original
        );
        let mut sorted: Vec<Digest256> = (0..3000u64).map(|i| page_digest(&page(i))).collect();
        sorted.sort();
        assert_eq!(
            fs.page_index().lookup(&sorted).expect("lookup").len(),
            3000,
            "the prepacked pages are indexed too"
        );
        // Packed again during a later capture (which cannot look pages up): the store's copies
        // are used, those packed again are dead.
        let first_pack = |store: &crate::FsBlobStore, manifest: &Digest256| {
            let r = PagesReader::open(store, manifest).expect("reader");
            let (k, _) = r.listed(0).and_then(|p| p.at).expect("placed");
            r.pack(k).expect("pack")
        };
        let old_pack = first_pack(&fs, &stored.manifest);
        let again: Vec<Option<u64>> = (0..100).chain(9000..9100).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "again", &[None; 200]);
        let (send, pages) = std::sync::mpsc::channel::<PagesIn>();
        let (spare, _spares) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let mut batch = PagesIn::default();
        for seed in again.iter().flatten() {
            batch.bytes.extend_from_slice(&page(*seed));
            batch.digests.push(page_digest(&page(*seed)));
        }
        send.send(batch).expect("send");
        drop(send);
        let prepacked = prepack(&fs, 2, pages, spare).expect("prepack");
        assert_eq!(prepacked.pages(), 200);
        let digests: Vec<Option<Digest256>> = again
            .iter()
            .map(|p| p.map(|seed| page_digest(&page(seed))))
            .collect();
        let mut w = PageWriter::with_prepacked(&fs, fs.page_index(), 2, prepacked);
        let second = w
            .write_file_kept(
                &file,
                &path,
                digests,
                (None, None),
                Some(&[false; 200]),
                &mut |_| {},
            )
            .expect("store");
        w.commit().expect("commit");
        assert_eq!(first_pack(&fs, &second.manifest), old_pack);
        let expected: Vec<u8> = again.iter().flatten().flat_map(|s| page(*s)).collect();
        assert!(rebuild(&fs, &second.manifest, tmp.path()).expect("rebuild") == expected);
        // Packed during a capture that then failed: nothing visible, nothing left.
        let before = fs.list().expect("list");
        let fresh = crate::FsBlobStore::open(&tmp.path().join("other")).expect("store");
        drop(prepack_in(&fresh));
        assert!(fresh.list().expect("list").is_empty());
        assert!(
            fresh
                .sweep_temp(&crate::GcOptions::dry_run_now())
                .expect("sweep")
                .is_empty()
        );
        assert_eq!(fs.list().expect("list"), before);
    }

    #[test]
    fn hostile_deltas_are_errors_never_panics() {
        let store = MemBlobStore::new();
        let digests: Vec<Digest256> = (0..4u64).map(|i| page_digest(&page(i))).collect();
        let mut whole = LIST_MAGIC.to_vec();
        whole.extend_from_slice(&4u64.to_le_bytes());
        for (i, d) in digests.iter().enumerate() {
            whole.extend_from_slice(&entry_bytes(d, Some((0, i as u32))));
        }
        let base = store.put(&whole).expect("put");
        let bases = [base];
        let parse = |bytes: &[u8]| parse_any(&store, &Digest256::of(bytes), bytes, &bases, 2);
        let good = delta_bytes(
            (&base, 4, 4),
            &[1],
            &[
                (0, 0, 1, Vec::new()),
                (1, 1, 0, entry_bytes(&digests[3], Some((0, 7)))),
                (0, 2, 2, Vec::new()),
            ],
        );
        assert!(parse(&good).is_ok());
        // Cut anywhere, the header included (a delta of 64-71 bytes once read past its end).
        for len in 8..good.len() {
            assert!(parse(&good[..len]).is_err(), "cut at {len}");
        }
        // Counts that overflow when added or multiplied, on either path.
        for (kind, a, b) in [
            (1, u64::MAX, 0),
            (1, 1 << 60, 0),
            (0, 0, u64::MAX),
            (0, u64::MAX, 1),
        ] {
            for first in [Vec::new(), vec![(0, 0, 1, Vec::new())]] {
                let mut ops = first;
                ops.push((kind, a, b, Vec::new()));
                let d = delta_bytes((&base, 4, 4), &[1], &ops);
                assert!(parse(&d).is_err(), "{kind} {a} {b}");
            }
        }
        let huge = delta_bytes((&base, 4, usize::MAX), &[1], &[(1, 1 << 58, 0, Vec::new())]);
        assert!(parse(&huge).is_err());
        // A few bytes of copies of a large base can claim any number of pages: a claim that
        // would not fit in memory is refused before its base is even read (this base is not
        // in the store).
        let absent = Digest256::of(b"a base list nobody stored");
        for (claim, base_pages, says) in [
            (MAX_PAGES, 1 << 28, "GiB this machine has available"),
            (MAX_PAGES + 1, 1 << 28, "address space"),
            (1 << 20, MAX_PAGES + 1, "its base has"),
        ] {
            let copies: Vec<(u64, u64, u64, Vec<u8>)> =
                (0..64).map(|_| (0, 0, 1 << 28, Vec::new())).collect();
            let d = delta_bytes(
                (&absent, base_pages as usize, claim as usize),
                &[1],
                &copies,
            );
            let err = parse_any(&store, &Digest256::of(&d), &d, &[absent], 2)
                .expect_err("a claim past memory");
            assert!(err.to_string().contains(says), "{err}");
        }
        // Random damage to the good delta: an error or a list, never a panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut d = good.clone();
            for _ in 0..1 + (x % 3) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 48 + (x as usize) % (d.len() - 48);
                d[at] = (x >> 32) as u8;
            }
            let _ = parse(&d);
        }
    }

    /// A store whose raw puts (packs, page lists) fail once `left` of them went through.
    #[derive(Debug)]
    struct FailingPuts {
        inner: MemBlobStore,
        left: std::sync::atomic::AtomicUsize,
    }

    impl BlobStore for FailingPuts {
        fn put(&self, bytes: &[u8]) -> crate::Result<Digest256> {
            self.inner.put(bytes)
        }
        fn put_raw(&self, bytes: &[u8]) -> crate::Result<Digest256> {
            use std::sync::atomic::Ordering;
            if self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Err(Error::io(
                    "write",
                    "/full",
                    std::io::Error::other("no space left (test)"),
                ));
            }
            self.inner.put_raw(bytes)
        }
        fn put_reader(&self, reader: &mut dyn std::io::Read) -> crate::Result<crate::Put> {
            self.inner.put_reader(reader)
        }
        fn get(&self, digest: &Digest256) -> crate::Result<Vec<u8>> {
            self.inner.get(digest)
        }
        fn open(&self, digest: &Digest256) -> crate::Result<Box<dyn std::io::Read + Send>> {
            self.inner.open(digest)
        }
        fn contains(&self, digest: &Digest256) -> crate::Result<bool> {
            self.inner.contains(digest)
        }
        fn remove(&self, digest: &Digest256) -> crate::Result<bool> {
            self.inner.remove(digest)
        }
        fn list(&self) -> crate::Result<Vec<Digest256>> {
            self.inner.list()
        }
        fn stored_size(&self, digest: &Digest256) -> crate::Result<u64> {
            self.inner.stored_size(digest)
        }
        fn set_name(&self, name: &str, digest: &Digest256) -> crate::Result<()> {
            self.inner.set_name(name, digest)
        }
        fn get_name(&self, name: &str) -> crate::Result<Digest256> {
            self.inner.get_name(name)
        }
        fn names(&self) -> crate::Result<Vec<(String, Digest256)>> {
            self.inner.names()
        }
        fn remove_name(&self, name: &str) -> crate::Result<bool> {
            self.inner.remove_name(name)
        }
        fn writer_lock(&self) -> crate::Result<crate::StoreLock> {
            self.inner.writer_lock()
        }
        fn reader_lock(&self) -> Option<crate::StoreLock> {
            self.inner.reader_lock()
        }
        fn gc_lock(&self) -> crate::Result<crate::StoreLock> {
            self.inner.gc_lock()
        }
        fn forwards_of(&self, pack: &Digest256) -> crate::Result<Vec<Digest256>> {
            self.inner.forwards_of(pack)
        }
        fn add_forward(&self, forward: &crate::forward::Forward) -> crate::Result<()> {
            self.inner.add_forward(forward)
        }
        fn remove_forward(&self, forward: &crate::forward::Forward) -> crate::Result<bool> {
            self.inner.remove_forward(forward)
        }
        fn forwards(&self) -> crate::Result<Vec<crate::forward::Forward>> {
            self.inner.forwards()
        }
    }

    #[test]
    fn a_pack_the_store_refuses_fails_the_file_and_never_hangs_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // 5 packs' worth of distinct pages: the first, the third or none of them stored.
        let pages: Vec<Option<u64>> = (0..(5 * PACK_PAGES as u64)).map(Some).collect();
        let (file, path) = file_of(tmp.path(), "many", &pages);
        // Leaked, so that a writer that hangs cannot hang the test with it: it fails instead.
        let file: &'static File = Box::leak(Box::new(file));
        let path: &'static std::path::Path = Box::leak(path.into_boxed_path());
        for left in [0, 2] {
            let store: &'static FailingPuts = Box::leak(Box::new(FailingPuts {
                inner: MemBlobStore::new(),
                left: std::sync::atomic::AtomicUsize::new(left),
            }));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut w = PageWriter::new(store, PageIndex::none(), 2);
                let _ = tx.send(w.write_file(file, path).map(|_| ()));
            });
            let result = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the writer answered (no hang)");
            let err = result.expect_err("a pack the store refused");
            assert!(err.to_string().contains("storing a pack"), "{err}");
        }
    }

    #[test]
    fn a_pack_the_store_refuses_fails_prepacking_and_its_senders_never_hang() {
        for left in [0, 2] {
            let store: &'static FailingPuts = Box::leak(Box::new(FailingPuts {
                inner: MemBlobStore::new(),
                left: std::sync::atomic::AtomicUsize::new(left),
            }));
            let (send, pages) = std::sync::mpsc::sync_channel::<PagesIn>(2);
            let (spare, _spares) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
            // As a capture's file thread: chunks of 256 new pages until a send fails (the packer
            // stops at the first chunk after a pack was refused; a few packs may be taken
            // before that).
            let sender = std::thread::spawn(move || {
                for chunk in 0..(20 * PACK_PAGES as u64 / 256) {
                    let mut batch = PagesIn::default();
                    for seed in chunk * 256..(chunk + 1) * 256 {
                        batch.bytes.extend_from_slice(&page(seed));
                        batch.digests.push(page_digest(&page(seed)));
                    }
                    if send.send(batch).is_err() {
                        return true;
                    }
                }
                false
            });
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(prepack(store, 2, pages, spare).map(|p| p.pages()));
            });
            let result = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the packer answered (no hang)");
            let err = result.expect_err("a pack the store refused");
            assert!(err.to_string().contains("storing a pack"), "{err}");
            assert!(
                sender.join().expect("sender"),
                "the sender's next send failed"
            );
        }
    }

    /// A list entry's 40 bytes.
    fn entry_bytes(digest: &Digest256, at: Option<(u32, u32)>) -> Vec<u8> {
        let mut e = digest.as_bytes().to_vec();
        let (pack, slot) = at.unwrap_or((ZERO_PACK, 0));
        e.extend_from_slice(&pack.to_le_bytes());
        e.extend_from_slice(&slot.to_le_bytes());
        e
    }

    /// A delta of `base` (`base_pages` pages) by hand: `renumber`, then each op `(kind, a, b,
    /// new entries)`.
    fn delta_bytes(
        (base, base_pages, n): (&Digest256, usize, usize),
        renumber: &[u32],
        ops: &[(u64, u64, u64, Vec<u8>)],
    ) -> Vec<u8> {
        let mut d = DELTA_MAGIC.to_vec();
        d.extend_from_slice(&(n as u64).to_le_bytes());
        d.extend_from_slice(base.as_bytes());
        d.extend_from_slice(&(base_pages as u64).to_le_bytes());
        d.extend_from_slice(&(ops.len() as u64).to_le_bytes());
        d.extend_from_slice(&(renumber.len() as u64).to_le_bytes());
        for k in renumber {
            d.extend_from_slice(&k.to_le_bytes());
        }
        for (kind, a, b, entries) in ops {
            for v in [kind, a, b] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d.extend_from_slice(entries);
        }
        d
    }

    #[test]
    fn a_delta_that_keeps_places_is_applied_in_place_as_any_other_would_be() {
        let store = MemBlobStore::new();
        // Base: 6 pages in packs 0 and 1, one zero page.
        let digests: Vec<Digest256> = (0..8u64).map(|i| page_digest(&page(i))).collect();
        let base_at = [
            Some((0, 0)),
            Some((0, 1)),
            None,
            Some((1, 0)),
            Some((1, 1)),
            Some((0, 2)),
        ];
        let mut whole = LIST_MAGIC.to_vec();
        whole.extend_from_slice(&6u64.to_le_bytes());
        for (i, at) in base_at.iter().enumerate() {
            let d = if at.is_some() {
                digests[i]
            } else {
                zero_page_digest()
            };
            whole.extend_from_slice(&entry_bytes(&d, *at));
        }
        let base = store.put(&whole).expect("put");
        // This list: base packs 0 and 1 are its 1 and 0; page 3 is new (its pack 2, slot 5).
        let renumber = [1u32, 0];
        let new = entry_bytes(&digests[7], Some((2, 5)));
        let listed = |digest: Digest256, at: Option<(u32, u32)>| ListedPage { digest, at };
        let expected = |third: ListedPage| {
            vec![
                listed(digests[0], Some((1, 0))),
                listed(digests[1], Some((1, 1))),
                listed(zero_page_digest(), None),
                third,
                listed(digests[4], Some((0, 1))),
                listed(digests[5], Some((1, 2))),
            ]
        };
        let third = listed(digests[7], Some((2, 5)));
        let in_place = delta_bytes(
            (&base, 6, 6),
            &renumber,
            &[
                (0, 0, 3, Vec::new()),
                (1, 1, 0, new.clone()),
                (0, 4, 2, Vec::new()),
            ],
        );
        let d = Digest256::of(&in_place);
        let bases = [base];
        assert!(keeps_places(&in_place, DELTA_HEAD + 8 + 8, 3, 6));
        assert_eq!(
            parse_any(&store, &d, &in_place, &bases, 3).expect("in place"),
            expected(third)
        );
        // The same list through copies that do not keep places (page 3 copied from page 4's
        // place, then page 4 from its own): the copying path, the same result for that list.
        let moved = delta_bytes(
            (&base, 6, 6),
            &renumber,
            &[
                (0, 0, 3, Vec::new()),
                (0, 4, 1, Vec::new()),
                (0, 4, 2, Vec::new()),
            ],
        );
        assert!(!keeps_places(&moved, DELTA_HEAD + 8 + 8, 3, 6));
        let moved_list =
            parse_any(&store, &Digest256::of(&moved), &moved, &bases, 3).expect("copied");
        assert_eq!(moved_list, expected(listed(digests[4], Some((0, 1)))));
        // Hostile deltas that keep places fail as the copying path fails them.
        let unrenumbered = delta_bytes(
            (&base, 6, 6),
            &[1, UNUSED],
            &[
                (0, 0, 3, Vec::new()),
                (1, 1, 0, new.clone()),
                (0, 4, 2, Vec::new()),
            ],
        );
        let err = parse_any(
            &store,
            &Digest256::of(&unrenumbered),
            &unrenumbered,
            &bases,
            3,
        )
        .expect_err("a copy of a pack it does not renumber");
        assert!(err.to_string().contains("does not renumber"), "{err}");
        let bad_entry = delta_bytes(
            (&base, 6, 6),
            &renumber,
            &[
                (0, 0, 3, Vec::new()),
                (1, 1, 0, entry_bytes(&digests[7], Some((9, 0)))),
                (0, 4, 2, Vec::new()),
            ],
        );
        let err = parse_any(&store, &Digest256::of(&bad_entry), &bad_entry, &bases, 3)
            .expect_err("a new entry naming a pack the manifest lacks");
        assert!(err.to_string().contains("cannot exist"), "{err}");
        let mut cut = in_place.clone();
        cut.truncate(cut.len() - 3);
        assert!(!keeps_places(&cut, DELTA_HEAD + 8 + 8, 3, 6));
        assert!(parse_any(&store, &Digest256::of(&cut), &cut, &bases, 3).is_err());
        let short = delta_bytes(
            (&base, 6, 6),
            &renumber,
            &[(0, 0, 3, Vec::new()), (1, 1, 0, new)],
        );
        assert!(!keeps_places(&short, DELTA_HEAD + 8 + 8, 2, 6));
        assert!(parse_any(&store, &Digest256::of(&short), &short, &bases, 3).is_err());
    }

    #[test]
    fn manifests_that_claim_impossible_counts_are_refused() {
        let store = MemBlobStore::new();
        let list = Digest256::of(b"list");
        for (pages, zero_pages, says) in [
            (MAX_PAGES + 1, 0, "address space"),
            (u64::MAX, 0, "address space"),
            (10, 11, "zero pages"),
        ] {
            let m = PagesManifest {
                page_size: PAGE_SIZE as u32,
                pages,
                zero_pages,
                packs: Vec::new(),
                list,
                bases: Vec::new(),
            };
            let d = store
                .put(&serde_json::to_vec(&m).expect("json"))
                .expect("put");
            let err = load_manifest(&store, &d).expect_err("impossible counts");
            assert!(
                err.to_string().contains(says),
                "{pages} {zero_pages}: {err}"
            );
        }
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
