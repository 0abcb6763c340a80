//! What a store's page-level data holds, and whether it is sound: the blob graph of named
//! snapshots with their [pages manifests](crate::pages), how much each name stands for and
//! stores, how much of the kept packs no page list uses any more, and a check of every pack and
//! page list.
//!
//! It reads the store only through [`BlobStore`] and the public parts of [`crate::pack`] and
//! [`crate::pages`], and knows nothing of what a snapshot is beyond that: a name's *logical size*
//! is what its blobs stand for (each pages manifest counts its pages × 4 KiB; its page list and
//! packs count nothing of their own; every other blob counts its raw size), its *stored size* the
//! bytes its blobs take in the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Read as _;

use crate::digest::Digest256;
use crate::error::Error;
use crate::pack::{PAGE_SIZE, Pack, PackError};
use crate::pages::{PagesManifest, parse_list};
use crate::store::BlobStore;

/// JSON blobs at most this large (stored) are looked at as possible pages manifests; a manifest
/// takes about 75 bytes per pack, so this covers files of tens of TiB.
const MANIFEST_MAX: u64 = 16 << 20;

/// Uses of one bad page or pack listed in a [`PageProblem`] per manifest (a file of a
/// snapshot), and manifests listed so; the rest are only counted ([`PageProblem::use_counts`]
/// still counts every manifest). Per manifest, so that a pack thousands of pages of one
/// snapshot use does not hide the other snapshots that use it.
const USES_LISTED_PER_MANIFEST: u64 = 4;
const MANIFESTS_LISTED: usize = 64;

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The store failed on something every answer depends on (listing names, reading a JSON blob
    /// the walk must follow).
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: Error,
    },
}

/// The blobs some roots reach, with the pages manifests among them, read once.
#[derive(Debug, Default)]
pub struct Graph {
    children: HashMap<Digest256, Vec<Digest256>>,
    manifests: BTreeMap<Digest256, PagesManifest>,
    missing: BTreeSet<Digest256>,
    /// Forward records of reached digests (see [`crate::forward`]): pack → packs it went to.
    forwards: BTreeMap<Digest256, Vec<Digest256>>,
    /// Reached blobs that could not be read (only with [`Graph::load_partial`]), with why; they
    /// are in `children` with no children, since what they refer to is unknown.
    unreadable: BTreeMap<Digest256, String>,
}

impl Graph {
    /// Walk from `roots` (digests, typically what the store's names point at) to every blob they
    /// reach, following `sha256:` strings in JSON blobs as gc does, and parse the pages manifests
    /// on the way. A reachable blob that cannot be read is an error: what it reaches is unknown.
    /// Digests referred to but absent are [`missing`](Self::missing).
    pub fn load(store: &dyn BlobStore, roots: &[Digest256]) -> Result<Self, ReportError> {
        Self::walk(store, roots, false)
    }

    /// [`load`](Self::load), except that a reached blob that cannot be read is recorded
    /// ([`unreadable`](Self::unreadable)) and the walk goes on: what a report or a check shows
    /// of everything else. What an unreadable blob refers to is unknown, so such a graph must
    /// never decide what is dead (gc and repack use [`load`](Self::load) or their own strict
    /// walk). Still an error: the store failing to list its forward records or to tell whether
    /// it has a blob.
    pub fn load_partial(store: &dyn BlobStore, roots: &[Digest256]) -> Result<Self, ReportError> {
        Self::walk(store, roots, true)
    }

    /// The walk of [`load`](Self::load) and [`load_partial`](Self::load_partial).
    fn walk(
        store: &dyn BlobStore,
        roots: &[Digest256],
        partial: bool,
    ) -> Result<Self, ReportError> {
        let mut graph = Self::default();
        let mut records: BTreeMap<Digest256, Vec<Digest256>> = BTreeMap::new();
        for f in store.forwards().map_err(|source| ReportError::Store {
            what: "listing the forward records".to_owned(),
            source,
        })? {
            records.entry(f.pack).or_default().push(f.to);
        }
        let mut queue: VecDeque<Digest256> = roots.iter().copied().collect();
        while let Some(digest) = queue.pop_front() {
            if graph.children.contains_key(&digest)
                || graph.missing.contains(&digest)
                || graph.forwards.contains_key(&digest)
            {
                continue;
            }
            if let Some(targets) = records.get(&digest) {
                graph.forwards.insert(digest, targets.clone());
                queue.extend(targets.iter().copied());
            }
            let present = store
                .contains(&digest)
                .map_err(|source| ReportError::Store {
                    what: format!("looking for blob {digest}"),
                    source,
                })?;
            if !present {
                if !graph.forwards.contains_key(&digest) {
                    graph.missing.insert(digest);
                }
                continue;
            }
            let read = crate::gc::references(store, &digest)
                .map_err(|source| ReportError::Store {
                    what: format!("reading blob {digest} to find what it refers to"),
                    source,
                })
                .and_then(|children| {
                    let manifest = if children.is_empty() {
                        None
                    } else {
                        read_manifest(store, &digest)?
                    };
                    Ok((children, manifest))
                });
            let (children, manifest) = match read {
                Ok(read) => read,
                Err(err) if partial => {
                    graph.unreadable.insert(digest, chain(&err));
                    graph.children.insert(digest, Vec::new());
                    continue;
                }
                Err(err) => return Err(err),
            };
            if let Some(manifest) = manifest {
                graph.manifests.insert(digest, manifest);
            }
            queue.extend(children.iter().copied());
            graph.children.insert(digest, children);
        }
        Ok(graph)
    }

    /// Reached blobs that could not be read, with why (empty unless loaded with
    /// [`load_partial`](Self::load_partial)).
    pub fn unreadable(&self) -> &BTreeMap<Digest256, String> {
        &self.unreadable
    }

    /// The missing digests `root` reaches, each with a blob that refers to it (or `root` itself
    /// when the root is missing), sorted.
    pub fn missing_from(&self, root: &Digest256) -> Vec<(Digest256, Option<Digest256>)> {
        if self.missing.contains(root) {
            return vec![(*root, None)];
        }
        let mut out = BTreeMap::new();
        for d in self.reach(root) {
            for c in self.children(&d) {
                if self.missing.contains(c) {
                    out.entry(*c).or_insert(d);
                }
            }
        }
        out.into_iter().map(|(c, d)| (c, Some(d))).collect()
    }

    /// Every blob reached (present in the store), sorted.
    pub fn blobs(&self) -> BTreeSet<Digest256> {
        self.children.keys().copied().collect()
    }

    /// Digests referred to that are not in the store, sorted.
    pub fn missing(&self) -> &BTreeSet<Digest256> {
        &self.missing
    }

    /// What blob `digest` refers to (empty when it was not reached or refers to nothing).
    pub fn children(&self, digest: &Digest256) -> &[Digest256] {
        self.children.get(digest).map_or(&[], Vec::as_slice)
    }

    /// The pages manifests reached, by digest.
    pub fn manifests(&self) -> &BTreeMap<Digest256, PagesManifest> {
        &self.manifests
    }

    /// The forward records followed: each reached pack that has some, and where they lead.
    pub fn forwards(&self) -> &BTreeMap<Digest256, Vec<Digest256>> {
        &self.forwards
    }

    /// The blobs `root` reaches (itself included, forward records followed), from what
    /// [`load`](Self::load) read.
    pub fn reach(&self, root: &Digest256) -> BTreeSet<Digest256> {
        let mut seen = BTreeSet::new();
        let mut followed = BTreeSet::new();
        let mut stack = vec![*root];
        while let Some(d) = stack.pop() {
            if let Some(targets) = self.forwards.get(&d)
                && followed.insert(d)
            {
                stack.extend(targets.iter().copied());
            }
            if let Some(children) = self.children.get(&d)
                && seen.insert(d)
            {
                stack.extend(children.iter().copied());
            }
        }
        seen
    }
}

/// The manifest in blob `digest`, if it is one.
fn read_manifest(
    store: &dyn BlobStore,
    digest: &Digest256,
) -> Result<Option<PagesManifest>, ReportError> {
    let stored = store
        .stored_size(digest)
        .map_err(|source| ReportError::Store {
            what: format!("reading the size of blob {digest}"),
            source,
        })?;
    if stored > MANIFEST_MAX {
        return Ok(None);
    }
    let bytes = store.get(digest).map_err(|source| ReportError::Store {
        what: format!("reading blob {digest}"),
        source,
    })?;
    let kind = b"\"pages.manifest.v1\"";
    if !bytes.windows(kind.len()).any(|w| w == kind) {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<PagesManifest>(&bytes)
        .ok()
        .filter(|m| m.check().is_ok()))
}

/// How much one root stands for and stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The root.
    pub root: Digest256,
    /// Blobs it reaches (itself included).
    pub blobs: u64,
    /// Pages in its pages manifests (zero pages included).
    pub pages: u64,
    /// Zero pages among them (stored nowhere).
    pub zero_pages: u64,
    /// What it stands for: pages × 4 KiB plus the raw size of every blob that is not a pages
    /// manifest, page list or pack.
    pub logical_size: u64,
    /// Bytes its blobs take in the store.
    pub stored_size: u64,
    /// Of `stored_size`, bytes in blobs that another of the roots asked about also reaches.
    pub shared_size: u64,
}

/// The [`Usage`] of each of `roots` (deduplicated, sorted), each against the others: `shared_size`
/// counts the blobs another root reaches too. `graph` must have been loaded from (at least) the
/// same roots.
pub fn usage(
    store: &dyn BlobStore,
    graph: &Graph,
    roots: &[Digest256],
) -> Result<Vec<Usage>, ReportError> {
    let roots: BTreeSet<Digest256> = roots.iter().copied().collect();
    let reaches: Vec<(Digest256, BTreeSet<Digest256>)> =
        roots.iter().map(|r| (*r, graph.reach(r))).collect();
    // How many roots reach each blob.
    let mut reached_by: HashMap<Digest256, u32> = HashMap::new();
    for (_, reach) in &reaches {
        for d in reach {
            *reached_by.entry(*d).or_default() += 1;
        }
    }
    // Page lists and packs count nothing logical of their own.
    let mut structure: BTreeSet<Digest256> = BTreeSet::new();
    for m in graph.manifests.values() {
        structure.insert(m.list);
        structure.extend(m.bases.iter().copied());
        structure.extend(m.packs.iter().copied());
    }
    for targets in graph.forwards.values() {
        structure.extend(targets.iter().copied());
    }
    let mut stored_of: HashMap<Digest256, u64> = HashMap::new();
    let mut raw_of: HashMap<Digest256, u64> = HashMap::new();
    let mut out = Vec::with_capacity(reaches.len());
    for (root, reach) in reaches {
        let mut u = Usage {
            root,
            blobs: reach.len() as u64,
            pages: 0,
            zero_pages: 0,
            logical_size: 0,
            stored_size: 0,
            shared_size: 0,
        };
        for d in &reach {
            let stored = match stored_of.get(d) {
                Some(n) => *n,
                None => {
                    let n = size_or_zero(store.stored_size(d), d)?;
                    stored_of.insert(*d, n);
                    n
                }
            };
            u.stored_size += stored;
            if reached_by.get(d).copied().unwrap_or(0) > 1 {
                u.shared_size += stored;
            }
            if let Some(m) = graph.manifests.get(d) {
                u.pages += m.pages;
                u.zero_pages += m.zero_pages;
                u.logical_size += m.pages * PAGE_SIZE as u64;
            } else if !structure.contains(d) && !graph.unreadable.contains_key(d) {
                let raw = match raw_of.get(d) {
                    Some(n) => *n,
                    None => {
                        let n = size_or_zero(store.raw_size(d), d)?;
                        raw_of.insert(*d, n);
                        n
                    }
                };
                u.logical_size += raw;
            }
        }
        out.push(u);
    }
    Ok(out)
}

/// A size, or 0 for a blob removed meanwhile.
fn size_or_zero(size: Result<u64, Error>, digest: &Digest256) -> Result<u64, ReportError> {
    match size {
        Ok(n) => Ok(n),
        Err(Error::NotFound { .. }) => Ok(0),
        Err(source) => Err(ReportError::Store {
            what: format!("reading the size of blob {digest}"),
            source,
        }),
    }
}

/// How much of the packs that `graph`'s page lists use is dead (no page list uses the page).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackUsage {
    /// Packs the manifests name (and the store holds).
    pub packs: u64,
    /// Pages in them.
    pub pages: u64,
    /// Pages some page list uses.
    pub live_pages: u64,
    /// Bytes the packs take in the store.
    pub stored_size: u64,
    /// Of `stored_size`, the part of each pack in proportion to its dead pages (frames compress
    /// differently, so this is an estimate).
    pub dead_stored_size: u64,
    /// Packs a page list that cannot be read uses: which of their pages it uses is unknown, so
    /// all of them count as live (never a dead figure too high; `pf store verify` names the
    /// list).
    pub unknown_packs: u64,
    /// Per pack: (pack, pages, live pages, stored size), sorted by pack.
    pub per_pack: Vec<(Digest256, u32, u32, u64)>,
}

impl PackUsage {
    /// Pages no page list uses.
    pub fn dead_pages(&self) -> u64 {
        self.pages - self.live_pages
    }
}

/// How much of the packs `graph`'s manifests name is used by their page lists. Reads every page
/// list (verified) and each pack's trailer and frame table only ([`BlobStore::read_at`], one or
/// two small unverified reads: this is a report, and a damaged pack is `pf store verify`'s to
/// name); packs or lists that cannot be read are left out.
pub fn pack_usage(store: &dyn BlobStore, graph: &Graph) -> Result<PackUsage, ReportError> {
    let (used, unknown) = used_slots(store, graph);
    let mut out = PackUsage::default();
    for (pack, slots) in used {
        let pages = match pack_pages(store, &pack) {
            Ok(n) => n,
            Err(Error::NotFound { .. }) => continue,
            Err(err) => {
                tracing::warn!(%pack, error = %chain(&err), "pack unreadable");
                continue;
            }
        };
        let live = if unknown.contains(&pack) {
            out.unknown_packs += 1;
            pages
        } else {
            slots.iter().filter(|s| **s < pages).count() as u32
        };
        let stored = size_or_zero(store.stored_size(&pack), &pack)?;
        out.packs += 1;
        out.pages += u64::from(pages);
        out.live_pages += u64::from(live);
        out.stored_size += stored;
        if pages > 0 {
            out.dead_stored_size += stored * u64::from(pages - live) / u64::from(pages);
        }
        out.per_pack.push((pack, pages, live, stored));
    }
    Ok(out)
}

/// Per pack, which of its slots `graph`'s page lists use: the slot a list names in a pack the
/// store holds, or for a pack gone and [forwarded](crate::forward), the slot that holds the
/// page's digest in a pack its records lead to (indexes read unverified, 32 bytes a page).
/// And the packs (or those they were forwarded to) of lists that cannot be read: which of
/// their slots are used is unknown.
fn used_slots(
    store: &dyn BlobStore,
    graph: &Graph,
) -> (BTreeMap<Digest256, BTreeSet<u32>>, BTreeSet<Digest256>) {
    let mut used: BTreeMap<Digest256, BTreeSet<u32>> = BTreeMap::new();
    let mut unknown: BTreeSet<Digest256> = BTreeSet::new();
    let mut routes: HashMap<Digest256, Vec<Digest256>> = HashMap::new();
    let mut indexes: HashMap<Digest256, HashMap<Digest256, u32>> = HashMap::new();
    for (digest, m) in &graph.manifests {
        for p in &m.packs {
            if graph.forwards.contains_key(p) && !graph.children.contains_key(p) {
                let targets = match crate::forward::locate(store, p) {
                    Ok(crate::forward::Located::Forwarded(t)) => t,
                    _ => Vec::new(),
                };
                for t in &targets {
                    if !indexes.contains_key(t) {
                        let index = pack_digests(store, t).unwrap_or_default();
                        indexes.insert(*t, index.into_iter().zip(0u32..).collect());
                    }
                }
                routes.insert(*p, targets);
            } else {
                used.entry(*p).or_default();
            }
        }
        let list = match store.get(&m.list) {
            Ok(bytes) => parse_list(store, &m.list, &bytes, m).map_err(|_| "malformed"),
            Err(_) => Err("unreadable"),
        };
        let list = match list {
            Ok(list) => list,
            Err(why) => {
                tracing::warn!(manifest = %digest, list = %m.list, "page list {why}: its packs count as live");
                for p in &m.packs {
                    match routes.get(p) {
                        Some(targets) => unknown.extend(targets.iter().copied()),
                        None => {
                            unknown.insert(*p);
                        }
                    }
                }
                continue;
            }
        };
        for page in list {
            if let Some((k, slot)) = page.at {
                let pack = m.packs[k as usize];
                match routes.get(&pack) {
                    None => {
                        used.entry(pack).or_default().insert(slot);
                    }
                    Some(targets) => {
                        for t in targets {
                            if let Some(s) = indexes.get(t).and_then(|i| i.get(&page.digest)) {
                                used.entry(*t).or_default().insert(*s);
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    // A forward's target no readable list uses is still one an unreadable list may use.
    for pack in &unknown {
        used.entry(*pack).or_default();
    }
    (used, unknown)
}

/// The page digests of pack `pack`'s index, in slot order (unverified reads).
fn pack_digests(store: &dyn BlobStore, pack: &Digest256) -> Result<Vec<Digest256>, Error> {
    use crate::pack::{TRAILER_LEN, parse_frames, parse_trailer};
    let malformed = |source: PackError| Error::Read {
        digest: *pack,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, source),
    };
    let len = store.raw_size(pack)?;
    let mut trailer = [0u8; TRAILER_LEN];
    read_exact_at(
        store,
        pack,
        len.saturating_sub(TRAILER_LEN as u64),
        &mut trailer,
    )?;
    let (index_at, index_len) = parse_trailer(*pack, len, &trailer).map_err(malformed)?;
    let mut index = vec![0u8; index_len];
    read_exact_at(store, pack, index_at as u64, &mut index)?;
    let (frames, pages) = parse_frames(*pack, &index, index_at, index_len).map_err(malformed)?;
    let at = crate::pack::INDEX_HEAD_LEN + frames.len() * crate::pack::FRAME_ENTRY_LEN;
    Ok(index[at..]
        .chunks_exact(32)
        .take(pages as usize)
        .map(|d| {
            let mut out = [0u8; 32];
            out.copy_from_slice(d);
            Digest256::from_bytes(out)
        })
        .collect())
}

/// How many pages pack `pack` holds, from its trailer and frame table (unverified reads).
fn pack_pages(store: &dyn BlobStore, pack: &Digest256) -> Result<u32, Error> {
    use crate::pack::{INDEX_HEAD_LEN, TRAILER_LEN, frame_count, parse_frames, parse_trailer};
    let malformed = |source: PackError| Error::Read {
        digest: *pack,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, source),
    };
    let len = store.raw_size(pack)?;
    let mut trailer = [0u8; TRAILER_LEN];
    read_exact_at(
        store,
        pack,
        len.saturating_sub(TRAILER_LEN as u64),
        &mut trailer,
    )?;
    let (index_at, index_len) = parse_trailer(*pack, len, &trailer).map_err(malformed)?;
    let mut head = vec![0u8; INDEX_HEAD_LEN];
    read_exact_at(store, pack, index_at as u64, &mut head)?;
    let table = frame_count(&head)
        .checked_mul(crate::pack::FRAME_ENTRY_LEN)
        .filter(|n| INDEX_HEAD_LEN + n <= index_len)
        .ok_or_else(|| {
            malformed(PackError::Malformed {
                pack: *pack,
                reason: "its frame table is longer than its index",
            })
        })?;
    head.resize(INDEX_HEAD_LEN + table, 0);
    read_exact_at(
        store,
        pack,
        index_at as u64 + INDEX_HEAD_LEN as u64,
        &mut head[INDEX_HEAD_LEN..],
    )?;
    let (_, pages) = parse_frames(*pack, &head, index_at, index_len).map_err(malformed)?;
    Ok(pages)
}

/// Fill `buf` from `offset` of blob `digest` with [`BlobStore::read_at`].
fn read_exact_at(
    store: &dyn BlobStore,
    digest: &Digest256,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    let mut done = 0;
    while done < buf.len() {
        let n = store.read_at(digest, offset + done as u64, &mut buf[done..])?;
        if n == 0 {
            return Err(Error::Read {
                digest: *digest,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        done += n;
    }
    Ok(())
}

/// Where a page list uses a page: page number `page` of the file manifest `manifest` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageUse {
    /// The pages manifest.
    pub manifest: Digest256,
    /// The page's number in its file.
    pub page: u64,
}

/// What is wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum Fault {
    /// A page in a pack does not hash to the digest the pack's index records, or its frame does
    /// not decode.
    BadPage {
        /// The pack.
        pack: Digest256,
        /// The page's slot.
        slot: u32,
        /// What the pack said.
        reason: String,
    },
    /// A pack cannot be read, or is not a pack; none of its pages can be trusted.
    BadPack {
        /// The pack.
        pack: Digest256,
        /// Why.
        reason: String,
    },
    /// A page list entry names a slot the pack does not have, or one holding another page.
    WrongSlot {
        /// The pack the entry names.
        pack: Digest256,
        /// The slot it names.
        slot: u32,
        /// What is wrong.
        reason: String,
    },
    /// A pack is gone and [forwarded](crate::forward), but no pack its records lead to holds
    /// a page a list needs from it.
    Unforwarded {
        /// The repacked pack.
        pack: Digest256,
        /// The present packs its records lead to.
        to: Vec<Digest256>,
        /// The page missing.
        digest: Digest256,
    },
    /// A manifest's page list cannot be read or does not match the manifest.
    BadList {
        /// The manifest naming it.
        manifest: Digest256,
        /// The page list.
        list: Digest256,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadPage { reason, .. } => write!(f, "{reason}"),
            Self::BadPack { pack, reason } => write!(f, "pack {pack} is unusable: {reason}"),
            Self::WrongSlot { pack, slot, reason } => {
                write!(
                    f,
                    "a page list names slot {slot} of pack {pack}, which {reason}"
                )
            }
            Self::Unforwarded { pack, to, digest } if to.is_empty() => write!(
                f,
                "pack {pack} was repacked, but its forward records lead to no pack in the store \
                 (page {digest} is lost)"
            ),
            Self::Unforwarded { pack, to, digest } => write!(
                f,
                "pack {pack} was repacked, but the packs it is forwarded to ({}) do not hold \
                 page {digest}",
                to.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::BadList { list, reason, .. } => {
                write!(f, "page list {list} is unusable: {reason}")
            }
        }
    }
}

/// One problem [`verify_pages`] found, with the places that use what is bad.
#[derive(Debug)]
pub struct PageProblem {
    /// What is wrong.
    pub fault: Fault,
    /// Some uses of the bad page (or of the pack's pages, or of the list's pages): up to 4 of
    /// each of the first 64 manifests that use it.
    pub uses: Vec<PageUse>,
    /// How many uses there are in all.
    pub use_count: u64,
    /// How many uses there are of each manifest's pages (they add up to `use_count`): a pack
    /// that thousands of pages of one file use is told as one file with a count, not page by
    /// page.
    pub use_counts: BTreeMap<Digest256, u64>,
}

/// What [`verify_pages`] checked and found.
#[derive(Debug, Default)]
pub struct PagesVerified {
    /// Pages manifests checked.
    pub manifests: u64,
    /// Packs checked.
    pub packs: u64,
    /// Pages decoded and hashed.
    pub pages: u64,
    /// Page list entries checked.
    pub list_entries: u64,
    /// What is wrong, sorted by pack, slot and list.
    pub problems: Vec<PageProblem>,
}

/// One pack, checked.
#[derive(Debug, Default)]
struct PackCheck {
    /// The index's digests, when the pack parsed.
    index: Option<Vec<Digest256>>,
    /// Why the whole pack is unusable, if it is.
    unusable: Option<String>,
    /// Bad slots and why.
    bad: BTreeMap<u32, String>,
}

/// Check every pack and page list of `graph`'s manifests: every pack decodes and every page in it
/// hashes to the digest its index records; every page list entry names a slot its pack has,
/// holding the page the list says. Packs are checked on `threads` threads, one pack in memory
/// per thread; the packs' indexes (32 bytes per stored page) are kept for the list check.
pub fn verify_pages(store: &dyn BlobStore, graph: &Graph, threads: usize) -> PagesVerified {
    // A pack gone but forwarded is checked through the packs its records lead to.
    let gone = |p: &Digest256| graph.forwards.contains_key(p) && !graph.children.contains_key(p);
    let mut routes: HashMap<Digest256, Vec<Digest256>> = HashMap::new();
    for m in graph.manifests.values() {
        for p in m.packs.iter().filter(|p| gone(p)) {
            let to = match crate::forward::locate(store, p) {
                Ok(crate::forward::Located::Forwarded(to)) => to,
                _ => Vec::new(),
            };
            routes.insert(*p, to);
        }
    }
    let packs: Vec<Digest256> = graph
        .manifests
        .values()
        .flat_map(|m| m.packs.iter().copied())
        .filter(|p| !gone(p))
        .chain(routes.values().flatten().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let checks: Vec<std::sync::Mutex<Option<PackCheck>>> =
        packs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let pages_checked = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(packs.len().max(1)) {
            s.spawn(|| {
                let mut bytes = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(pack) = packs.get(i) else { return };
                    let (check, n) = check_pack(store, pack, &mut bytes);
                    pages_checked.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut slot) = checks[i].lock() {
                        *slot = Some(check);
                    }
                }
            });
        }
    });
    let checks: HashMap<Digest256, PackCheck> = packs
        .iter()
        .zip(checks)
        .map(|(p, c)| {
            let c = c.into_inner().ok().flatten().unwrap_or_default();
            (*p, c)
        })
        .collect();
    let by_digest: HashMap<Digest256, HashMap<Digest256, u32>> = routes
        .values()
        .flatten()
        .filter_map(|t| {
            let index = checks.get(t)?.index.as_ref()?;
            Some((*t, index.iter().copied().zip(0u32..).collect()))
        })
        .collect();
    let mut report = PagesVerified {
        manifests: graph.manifests.len() as u64,
        packs: packs.len() as u64,
        pages: pages_checked.into_inner(),
        ..PagesVerified::default()
    };
    // Problems keyed for sorting and merging uses: (pack, slot) for page and slot faults,
    // (pack, MAX) for whole packs, lists by their digest.
    let mut by_page: BTreeMap<(Digest256, u32, u8), PageProblem> = BTreeMap::new();
    let mut by_list: BTreeMap<Digest256, PageProblem> = BTreeMap::new();
    let mut note = |key: (Digest256, u32, u8), fault: &dyn Fn() -> Fault, at: PageUse| {
        let p = by_page.entry(key).or_insert_with(|| PageProblem {
            fault: fault(),
            uses: Vec::new(),
            use_count: 0,
            use_counts: BTreeMap::new(),
        });
        p.use_count += 1;
        let of_manifest = p.use_counts.entry(at.manifest).or_default();
        *of_manifest += 1;
        let listed = match *of_manifest {
            // Its first use: listed while fewer manifests than the cap are.
            1 => p.use_counts.len() <= MANIFESTS_LISTED,
            // A few more, if its first was.
            n if n <= USES_LISTED_PER_MANIFEST => p.uses.iter().any(|u| u.manifest == at.manifest),
            _ => false,
        };
        if listed {
            p.uses.push(at);
        }
    };
    for (digest, m) in &graph.manifests {
        let list = match store.get(&m.list) {
            Ok(bytes) => parse_list(store, &m.list, &bytes, m).map_err(|e| e.to_string()),
            Err(e) => Err(chain(&e)),
        };
        let list = match list {
            Ok(list) => list,
            Err(reason) => {
                by_list.insert(
                    m.list,
                    PageProblem {
                        fault: Fault::BadList {
                            manifest: *digest,
                            list: m.list,
                            reason,
                        },
                        uses: Vec::new(),
                        use_count: m.pages,
                        use_counts: BTreeMap::from([(*digest, m.pages)]),
                    },
                );
                continue;
            }
        };
        for (n, page) in list.iter().enumerate() {
            report.list_entries += 1;
            let Some((k, slot)) = page.at else { continue };
            let mut pack = m.packs[k as usize];
            let mut slot = slot;
            let at = PageUse {
                manifest: *digest,
                page: n as u64,
            };
            if let Some(to) = routes.get(&pack) {
                let found = to.iter().find_map(|t| {
                    let s = by_digest.get(t)?.get(&page.digest)?;
                    Some((*t, *s))
                });
                match found {
                    Some((t, s)) => (pack, slot) = (t, s),
                    None => {
                        let old = pack;
                        note(
                            (old, u32::MAX, 2),
                            &|| Fault::Unforwarded {
                                pack: old,
                                to: to.clone(),
                                digest: page.digest,
                            },
                            at,
                        );
                        continue;
                    }
                }
            }
            let Some(check) = checks.get(&pack) else {
                continue;
            };
            if let Some(reason) = &check.unusable {
                note(
                    (pack, u32::MAX, 0),
                    &|| Fault::BadPack {
                        pack,
                        reason: reason.clone(),
                    },
                    at,
                );
                continue;
            }
            let Some(index) = &check.index else { continue };
            match index.get(slot as usize) {
                None => note(
                    (pack, slot, 1),
                    &|| Fault::WrongSlot {
                        pack,
                        slot,
                        reason: format!("has only {} pages", index.len()),
                    },
                    at,
                ),
                Some(d) if *d != page.digest => note(
                    (pack, slot, 1),
                    &|| Fault::WrongSlot {
                        pack,
                        slot,
                        reason: format!("holds page {d}, not {}", page.digest),
                    },
                    at,
                ),
                Some(_) => {
                    if let Some(err) = check.bad.get(&slot) {
                        note(
                            (pack, slot, 0),
                            &|| Fault::BadPage {
                                pack,
                                slot,
                                reason: err.clone(),
                            },
                            at,
                        );
                    }
                }
            }
        }
    }
    // Bad pages and unusable packs no list uses are problems too.
    for (pack, check) in &checks {
        if let Some(reason) = &check.unusable {
            by_page
                .entry((*pack, u32::MAX, 0))
                .or_insert_with(|| PageProblem {
                    fault: Fault::BadPack {
                        pack: *pack,
                        reason: reason.clone(),
                    },
                    uses: Vec::new(),
                    use_count: 0,
                    use_counts: BTreeMap::new(),
                });
        }
        for (slot, err) in &check.bad {
            by_page
                .entry((*pack, *slot, 0))
                .or_insert_with(|| PageProblem {
                    fault: Fault::BadPage {
                        pack: *pack,
                        slot: *slot,
                        reason: err.clone(),
                    },
                    uses: Vec::new(),
                    use_count: 0,
                    use_counts: BTreeMap::new(),
                });
        }
    }
    report.problems = by_page.into_values().chain(by_list.into_values()).collect();
    report
}

/// Read pack `pack` whole into `bytes` and check every page; returns the check and how many
/// pages were hashed. A pack whose blob does not hash to its digest is still parsed from the
/// bytes read, so the bad pages are named; if none is, the pack is unusable as a whole.
fn check_pack(store: &dyn BlobStore, pack: &Digest256, bytes: &mut Vec<u8>) -> (PackCheck, u64) {
    bytes.clear();
    let blob_error = match store.open(pack) {
        Ok(mut reader) => match reader.read_to_end(bytes) {
            Ok(_) => None,
            Err(err) => Some(match Error::from_read_error(&err) {
                Some(e) => chain(e),
                None => err.to_string(),
            }),
        },
        Err(err) => {
            return (
                PackCheck {
                    unusable: Some(chain(&err)),
                    ..PackCheck::default()
                },
                0,
            );
        }
    };
    let parsed = match Pack::parse(*pack, bytes) {
        Ok(p) => p,
        Err(err) => {
            return (
                PackCheck {
                    unusable: Some(blob_error.unwrap_or_else(|| err.to_string())),
                    ..PackCheck::default()
                },
                0,
            );
        }
    };
    let index: Vec<Digest256> = parsed.entries().map(|(d, _)| d).collect();
    let mut bad = BTreeMap::new();
    let mut hashed = 0u64;
    let mut from = 0usize;
    let wanted: Vec<(u32, Digest256)> = index
        .iter()
        .enumerate()
        .map(|(s, d)| (s as u32, *d))
        .collect();
    // Check every slot; after a bad one, go on from the next.
    while from < wanted.len() {
        let mut seen = 0usize;
        let result = parsed.for_each_page(&wanted[from..], &mut |_, _| -> Result<(), PackError> {
            seen += 1;
            Ok(())
        });
        hashed += seen as u64;
        match result {
            Ok(()) => break,
            Err(err) => {
                // A bad page names its slot (the pages of its frame before it checked); any
                // other error stops at the first slot not handed out.
                let at = match &err {
                    PackError::BadPage { slot, .. } => wanted[from..]
                        .iter()
                        .position(|(s, _)| s == slot)
                        .map(|p| from + p),
                    _ => None,
                }
                .filter(|&at| at >= from + seen)
                .unwrap_or(from + seen);
                hashed += (at - from - seen) as u64;
                bad.insert(wanted[at].0, err.to_string());
                from = at + 1;
            }
        }
    }
    let unusable = match (&blob_error, bad.is_empty()) {
        // The blob's bytes are wrong but every page is right: the damage is in the index or
        // the frames' framing, which no page check can place.
        (Some(e), true) => Some(e.clone()),
        _ => None,
    };
    (
        PackCheck {
            index: unusable.is_none().then_some(index),
            unusable,
            bad,
        },
        hashed,
    )
}

/// An error with its causes, `: `-separated.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBlobStore;
    use crate::page_index::PageIndex;
    use crate::pages::{PageWriter, load_manifest};

    /// An incompressible page that is the same for the same `seed`.
    fn page(seed: u64) -> Vec<u8> {
        crate::pack::test_page(seed)
    }

    /// Store a file of pages (`None`: a zero page) and a JSON root naming its manifest; returns
    /// (root, manifest).
    fn snapshot(
        store: &MemBlobStore,
        dir: &std::path::Path,
        name: &str,
        layout: &[Option<u64>],
    ) -> (Digest256, Digest256) {
        let path = dir.join(name);
        let mut bytes = Vec::new();
        for p in layout {
            match p {
                Some(seed) => bytes.extend_from_slice(&page(*seed)),
                None => bytes.extend_from_slice(&[0u8; PAGE_SIZE]),
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let mut w = PageWriter::new(store, PageIndex::none(), 2);
        let stored = w.write_file(&file, &path).expect("store");
        let extra = store
            .put(format!("images of {name}").as_bytes())
            .expect("put");
        let root = store
            .put(
                format!(
                    r#"{{"kind":"test","images":"{extra}","memory":["{}"]}}"#,
                    stored.manifest
                )
                .as_bytes(),
            )
            .expect("put");
        store.set_name(name, &root).expect("name");
        (root, stored.manifest)
    }

    /// Like [`snapshot`], written knowing the pages `index` holds (so it shares them) and
    /// adding its own to it; returns (root, manifest).
    fn indexed(
        store: &MemBlobStore,
        dir: &std::path::Path,
        index: &PageIndex,
        name: &str,
        layout: &[Option<u64>],
    ) -> (Digest256, Digest256) {
        let path = dir.join(name);
        let bytes: Vec<u8> = layout
            .iter()
            .flat_map(|p| p.map_or_else(|| vec![0u8; PAGE_SIZE], page))
            .collect();
        std::fs::write(&path, &bytes).expect("write");
        let mut w = PageWriter::new(store, index.clone(), 2);
        let stored = w
            .write_file(&std::fs::File::open(&path).expect("open"), &path)
            .expect("store");
        w.commit().expect("commit");
        let root = store
            .put(format!(r#"{{"memory":"{}"}}"#, stored.manifest).as_bytes())
            .expect("put");
        store.set_name(name, &root).expect("name");
        (root, stored.manifest)
    }

    fn roots(store: &MemBlobStore) -> Vec<Digest256> {
        store
            .names()
            .expect("names")
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    }

    #[test]
    fn usage_tells_logical_stored_and_shared_sizes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let base: Vec<Option<u64>> = (0..100).map(|i| (i % 4 != 0).then_some(i)).collect();
        let (a, ma) = snapshot(&store, tmp.path(), "a", &base);
        // b: the same pages with 5 changed, written by a session of its own without an index,
        // so into packs of its own.
        let changed: Vec<Option<u64>> = base
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i % 20 == 1 {
                    Some(1000 + i as u64)
                } else {
                    *p
                }
            })
            .collect();
        let (b, mb) = snapshot(&store, tmp.path(), "b", &changed);
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        assert_eq!(graph.manifests().len(), 2);
        assert!(graph.missing().is_empty());
        let u = usage(&store, &graph, &[a, b]).expect("usage");
        assert_eq!(u.len(), 2);
        let ua = u.iter().find(|u| u.root == a).expect("a");
        let ub = u.iter().find(|u| u.root == b).expect("b");
        for (u, name) in [(ua, "a"), (ub, "b")] {
            assert_eq!(u.pages, 100);
            assert_eq!(u.zero_pages, 25);
            let images = format!("images of {name}").len() as u64;
            let root = store.stored_size(&u.root).expect("size");
            assert_eq!(u.logical_size, 100 * 4096 + images + root, "{name}");
            // root, images, manifest, list, packs.
            let m = load_manifest(&store, if name == "a" { &ma } else { &mb }).expect("m");
            assert_eq!(u.blobs, 4 + m.packs.len() as u64, "{name}");
        }
        // Each wrote its own pack (no shared index): nothing is shared.
        assert_eq!(ua.shared_size, 0);
        // A third name on b's root: b's whole graph is shared with it, a's still is not.
        let c = store.put(format!(r#"["{b}"]"#).as_bytes()).expect("put");
        store.set_name("c", &c).expect("name");
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        let u = usage(&store, &graph, &[a, b, c]).expect("usage");
        let ub = u.iter().find(|u| u.root == b).expect("b");
        assert_eq!(ub.shared_size, ub.stored_size);
        assert_eq!(u.iter().find(|u| u.root == a).expect("a").shared_size, 0);
    }

    #[test]
    fn shared_packs_count_as_shared_and_dead_pages_are_counted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let index = PageIndex::in_dir(&tmp.path().join("index"));
        let write = |name: &str, layout: &[Option<u64>]| {
            indexed(&store, tmp.path(), &index, name, layout).0
        };
        let a = write("a", &(0..200).map(Some).collect::<Vec<_>>());
        // b shares 150 of a's pages and adds 50 of its own.
        let b = write("b", &(50..250).map(Some).collect::<Vec<_>>());
        let graph = Graph::load(&store, &[a, b]).expect("graph");
        let u = usage(&store, &graph, &[a, b]).expect("usage");
        let ub = u.iter().find(|u| u.root == b).expect("b");
        let a_pack = load_manifest(&store, graph.manifests().keys().next().expect("m"))
            .expect("m")
            .packs;
        assert!(
            ub.shared_size > 0 && ub.shared_size < ub.stored_size,
            "{ub:?}"
        );
        let both = pack_usage(&store, &graph).expect("usage");
        assert_eq!((both.packs, both.pages, both.live_pages), (2, 250, 250));
        assert_eq!(both.dead_pages(), 0);
        // Only b kept: a's first 50 pages are dead in a's pack.
        let graph = Graph::load(&store, &[b]).expect("graph");
        let only_b = pack_usage(&store, &graph).expect("usage");
        assert_eq!(
            (only_b.packs, only_b.pages, only_b.live_pages),
            (2, 250, 200)
        );
        assert_eq!(only_b.dead_pages(), 50);
        let a_stored = store.stored_size(&a_pack[0]).expect("size");
        assert_eq!(only_b.dead_stored_size, a_stored * 50 / 200);
        assert_eq!(only_b.unknown_packs, 0);
        // b's page list damaged: which pages it uses is unknown, so its packs (a's and its
        // own) count as live whole, never as dead.
        let b_list = graph
            .manifests()
            .values()
            .next()
            .expect("b's manifest")
            .list;
        store.corrupt_for_test(&b_list, b"not a page list");
        let damaged = pack_usage(&store, &graph).expect("usage");
        assert_eq!(
            (damaged.packs, damaged.pages, damaged.live_pages),
            (2, 250, 250)
        );
        assert_eq!(
            (
                damaged.dead_pages(),
                damaged.dead_stored_size,
                damaged.unknown_packs
            ),
            (0, 0, 2)
        );
    }

    #[test]
    fn a_clean_store_verifies_clean() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let layout: Vec<Option<u64>> = (0..3000).map(|i| (i % 7 != 0).then_some(i)).collect();
        snapshot(&store, tmp.path(), "a", &layout);
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        let v = verify_pages(&store, &graph, 2);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.manifests, v.packs), (1, 2));
        assert_eq!(v.pages, 3000 - 3000_u64.div_ceil(7));
        assert_eq!(v.list_entries, 3000);
    }

    #[test]
    fn a_corrupt_page_is_named_by_pack_slot_and_the_pages_that_use_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        // Page 10 is repeated at 90: both uses are named.
        let mut layout: Vec<Option<u64>> = (0..100).map(Some).collect();
        layout[90] = Some(10);
        let (_, manifest) = snapshot(&store, tmp.path(), "a", &layout);
        let m = load_manifest(&store, &manifest).expect("m");
        let pack = m.packs[0];
        // Damage the stored bytes of the page in slot 10, as a bad disk would: the blob no longer
        // hashes to its digest, but the pages around it are fine.
        let mut bytes = store.get(&pack).expect("pack");
        let needle = page(10)[200..232].to_vec();
        let at = bytes
            .windows(32)
            .position(|w| w == needle)
            .expect("raw page");
        bytes[at] ^= 1;
        store.corrupt_for_test(&pack, &bytes);
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        let v = verify_pages(&store, &graph, 2);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        let p = &v.problems[0];
        assert!(
            matches!(&p.fault, Fault::BadPage { pack: got, slot: 10, .. } if *got == pack),
            "{:?}",
            p.fault
        );
        assert_eq!(p.use_count, 2);
        assert_eq!(
            p.uses,
            vec![
                PageUse { manifest, page: 10 },
                PageUse { manifest, page: 90 }
            ]
        );
        assert!(p.fault.to_string().contains("slot 10"), "{}", p.fault);
    }

    /// A pack two snapshots share, gone: both are among its listed uses, however many pages
    /// the first one (in the order checked) has in it.
    #[test]
    fn a_missing_pack_lists_every_snapshot_that_uses_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        // b: a's 40 pages and one more, written knowing a's (the index): its pages are in a's
        // pack but for the new one.
        let index = PageIndex::in_dir(&tmp.path().join("index"));
        let manifest_of = |name: &str, seeds: std::ops::Range<u64>| {
            indexed(
                &store,
                tmp.path(),
                &index,
                name,
                &seeds.map(Some).collect::<Vec<_>>(),
            )
            .1
        };
        let ma = manifest_of("a", 0..40);
        let mb = manifest_of("b", 0..41);
        let a = load_manifest(&store, &ma).expect("m");
        let b = load_manifest(&store, &mb).expect("m");
        assert!(b.packs.contains(&a.packs[0]), "b shares a's pack");
        store.remove(&a.packs[0]).expect("rm");
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        let v = verify_pages(&store, &graph, 2);
        let problem = v
            .problems
            .iter()
            .find(|p| matches!(&p.fault, Fault::BadPack { .. }))
            .expect("the pack is named");
        assert_eq!(problem.use_count, 80);
        let listed: BTreeSet<Digest256> = problem.uses.iter().map(|u| u.manifest).collect();
        assert_eq!(listed, BTreeSet::from([ma, mb]));
        assert_eq!(problem.uses.len(), 2 * USES_LISTED_PER_MANIFEST as usize);
    }

    #[test]
    fn missing_packs_and_lists_and_wrong_slots_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let (_, ma) = snapshot(
            &store,
            tmp.path(),
            "a",
            &(0..10).map(Some).collect::<Vec<_>>(),
        );
        let (_, mb) = snapshot(
            &store,
            tmp.path(),
            "b",
            &(20..30).map(Some).collect::<Vec<_>>(),
        );
        let a = load_manifest(&store, &ma).expect("m");
        let b = load_manifest(&store, &mb).expect("m");
        store.remove(&a.packs[0]).expect("rm");
        store.remove(&b.list).expect("rm");
        // c: a manifest whose list points into b's pack at slots holding other pages.
        let path = tmp.path().join("c");
        let bytes: Vec<u8> = (21..31).flat_map(page).collect();
        std::fs::write(&path, &bytes).expect("write");
        let mut w = PageWriter::new(&store, PageIndex::none(), 1);
        let c = w
            .write_file(&std::fs::File::open(&path).expect("open"), &path)
            .expect("store");
        let cm = load_manifest(&store, &c.manifest).expect("m");
        let forged = PagesManifest {
            packs: vec![b.packs[0]],
            ..cm
        };
        let forged = store
            .put(&serde_json::to_vec(&forged).expect("json"))
            .expect("put");
        let root = store
            .put(format!(r#"["{forged}"]"#).as_bytes())
            .expect("put");
        store.set_name("c", &root).expect("name");
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        assert_eq!(graph.missing().iter().copied().collect::<Vec<_>>().len(), 2);
        let v = verify_pages(&store, &graph, 2);
        let faults: Vec<String> = v.problems.iter().map(|p| p.fault.to_string()).collect();
        assert!(
            v.problems.iter().any(
                |p| matches!(&p.fault, Fault::BadPack { pack, .. } if *pack == a.packs[0])
                    && p.use_count == 10
                    && p.use_counts == BTreeMap::from([(ma, 10)])
            ),
            "{faults:?}"
        );
        assert!(
            v.problems
                .iter()
                .any(|p| matches!(&p.fault, Fault::BadList { list, .. } if *list == b.list)),
            "{faults:?}"
        );
        // c's pages 0..9 are b's pages 1..10: slot 9 is past b's pack, the rest hold other pages.
        let wrong: Vec<u32> = v
            .problems
            .iter()
            .filter_map(|p| match &p.fault {
                Fault::WrongSlot { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect();
        assert_eq!(wrong, (0..10).collect::<Vec<_>>(), "{faults:?}");
    }
    #[test]
    fn a_partial_graph_names_an_unreadable_blob_and_walks_the_rest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let (a, _) = snapshot(&store, tmp.path(), "a", &[Some(1), Some(2)]);
        let (b, mb) = snapshot(&store, tmp.path(), "b", &[Some(3), Some(4)]);
        // a's root no longer hashes to its digest: what it refers to is unknown.
        store.corrupt_for_test(&a, b"{\"kind\":\"tes");
        assert!(Graph::load(&store, &roots(&store)).is_err());
        let graph = Graph::load_partial(&store, &roots(&store)).expect("graph");
        assert_eq!(
            graph.unreadable().keys().copied().collect::<Vec<_>>(),
            vec![a]
        );
        assert!(graph.reach(&a).contains(&a));
        assert_eq!(
            graph.manifests().keys().copied().collect::<Vec<_>>(),
            vec![mb]
        );
        let v = verify_pages(&store, &graph, 2);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.manifests, v.list_entries), (1, 2));
        let u = usage(&store, &graph, &[a, b]).expect("usage");
        assert_eq!(u.iter().find(|u| u.root == b).expect("b").pages, 2);
    }

    #[test]
    fn missing_from_names_each_missing_blob_a_root_reaches_and_who_refers_to_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let (a, ma) = snapshot(&store, tmp.path(), "a", &[Some(1), Some(2)]);
        let (b, _) = snapshot(&store, tmp.path(), "b", &[Some(3)]);
        let images = Digest256::of(b"images of a");
        store.remove(&images).expect("rm");
        store.remove(&ma).expect("rm");
        let gone = store.put(b"removed after naming").expect("put");
        store.set_name("gone", &gone).expect("name");
        store.remove(&gone).expect("rm");
        let graph = Graph::load(&store, &roots(&store)).expect("graph");
        let mut want = vec![(images, Some(a)), (ma, Some(a))];
        want.sort();
        assert_eq!(graph.missing_from(&a), want);
        assert_eq!(graph.missing_from(&b), vec![]);
        assert_eq!(graph.missing_from(&gone), vec![(gone, None)]);
    }
}
