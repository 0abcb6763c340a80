//! Repacking: gc, then rewrite the packs whose live fraction fell below a threshold, keeping
//! every snapshot digest as it is (see [`crate::forward`]).
//!
//! Under the gc lock, from the mark to the last removal (so no freeze runs meanwhile: writers
//! hold the lock shared from their first page-index lookup until they name what they stored):
//! 1. gc as [`crate::gc`] does (unreachable blobs, temp files, unneeded forward records);
//! 2. which page of which present pack some reachable page list uses, following forwards
//!    (manifests reached from blobs gc spared for their youth count as reachable);
//! 3. the live pages of every pack whose live fraction is below the threshold are copied,
//!    checked, into new packs (one batch, durable before anything names them);
//! 4. a forward record `old → new` per rewritten pack (durable, before the old pack goes);
//! 5. the page index's entries of the rewritten packs are moved to the new packs (or dropped);
//! 6. the old packs are removed, then the forward records nothing needs any more.
//!
//! Killed at any point, every snapshot stays readable: an old pack is removed only after its
//! forward record and its pages' new pack are durable. A pack still present that has forward
//! records (a repack killed before removing it) is removed by the next repack once its records'
//! targets hold all its live pages; new packs no record names are unreachable blobs plain gc
//! removes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::digest::Digest256;
use crate::error::{Error, Result};
use crate::forward::{Forward, Located, locate};
use crate::gc::{GcOptions, GcReport, gc_locked, mark, sweep_forwards};
use crate::pack::{Pack, PackBuilder, PackError};
use crate::page_index::PageLoc;
use crate::pages::{load_manifest, parse_list};
use crate::store::BlobStore;

/// How [`repack`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct RepackOptions {
    /// Only report what would be removed and rewritten.
    pub dry_run: bool,
    /// gc's grace period (see [`GcOptions::grace`]).
    pub grace: Duration,
    /// A pack is rewritten when the fraction of its pages some page list uses is below this
    /// (0 to 1; `pf store gc --repack` uses 0.5).
    pub threshold: f64,
    /// Threads compressing the new packs.
    pub threads: usize,
}

/// One pack a repack rewrote (or would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepackedPack {
    /// The old pack.
    pub pack: Digest256,
    /// Pages it held.
    pub pages: u32,
    /// Of them, pages some page list uses (copied to a new pack).
    pub live_pages: u32,
    /// Bytes it took in the store.
    pub stored_size: u64,
    /// The packs its live pages went to (empty in a dry run).
    pub to: Vec<Digest256>,
}

/// What [`repack`] found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RepackReport {
    /// The gc that ran first.
    pub gc: GcReport,
    /// Packs some reachable page list uses, and their stored bytes, before the repack.
    pub packs_before: u64,
    /// Their stored bytes.
    pub pack_bytes_before: u64,
    /// Packs rewritten (or that would be), sorted.
    pub rewritten: Vec<RepackedPack>,
    /// Packs still present that a killed repack had already forwarded, removed now.
    pub leftovers_removed: Vec<Digest256>,
    /// New packs written, and their stored bytes.
    pub new_packs: Vec<(Digest256, u64)>,
    /// Forward records written.
    pub forwards_written: u64,
    /// Forward records removed after the repack because nothing needs them any more.
    pub forwards_removed: u64,
    /// Page index entries moved to a new pack, and dropped (dead pages).
    pub index_moved: u64,
    /// Page index entries dropped.
    pub index_dropped: u64,
}

impl RepackReport {
    /// Stored bytes of the packs rewritten.
    pub fn rewritten_bytes(&self) -> u64 {
        self.rewritten.iter().map(|p| p.stored_size).sum()
    }

    /// Stored bytes of the new packs.
    pub fn new_bytes(&self) -> u64 {
        self.new_packs.iter().map(|(_, n)| n).sum()
    }
}

/// What a present pack holds and which of its slots are live.
#[derive(Debug)]
struct Live {
    /// The index's page digests, in slot order.
    index: Vec<Digest256>,
    /// Slots some reachable page list uses.
    slots: BTreeSet<u32>,
}

/// gc the store, then rewrite every pack whose live fraction is below `options.threshold`
/// (see the module docs). A dry run takes no lock, removes and writes nothing, and reports what
/// would be rewritten.
pub fn repack(store: &dyn BlobStore, options: &RepackOptions) -> Result<RepackReport> {
    let _span = tracing::info_span!("repack", dry_run = options.dry_run).entered();
    let _lock = if options.dry_run {
        None
    } else {
        Some(store.gc_lock()?)
    };
    let gc = gc_locked(
        store,
        &GcOptions {
            dry_run: options.dry_run,
            grace: options.grace,
        },
    )?;
    let mut roots: Vec<Digest256> = gc.reachable.clone();
    // Young unreachable blobs gc spared may be named soon: what they use stays live.
    roots.extend(gc.recent.iter().copied());
    let live = live_pages(store, &roots)?;
    let mut report = RepackReport {
        packs_before: live.len() as u64,
        ..RepackReport::default()
    };
    for pack in live.keys() {
        report.pack_bytes_before += size_or_zero(store.stored_size(pack))?;
    }
    // Leftovers of a killed repack: present packs with forward records.
    let mut rewrite: Vec<Digest256> = Vec::new();
    for (pack, l) in &live {
        let targets = store.forwards_of(pack)?;
        if !targets.is_empty() && !options.dry_run {
            if covered(store, pack, l, &targets)? {
                report.leftovers_removed.push(*pack);
                continue;
            }
            rewrite.push(*pack);
            continue;
        }
        let pages = l.index.len();
        if pages == 0 || l.slots.is_empty() {
            continue;
        }
        if (l.slots.len() as f64) < options.threshold * pages as f64 {
            rewrite.push(*pack);
        }
    }
    for pack in &rewrite {
        let l = &live[pack];
        report.rewritten.push(RepackedPack {
            pack: *pack,
            pages: l.index.len() as u32,
            live_pages: l.slots.len() as u32,
            stored_size: size_or_zero(store.stored_size(pack))?,
            to: Vec::new(),
        });
    }
    report.gc = gc;
    if options.dry_run {
        return Ok(report);
    }
    // Write the live pages into new packs, each distinct page once.
    let mut moved: HashMap<Digest256, HashMap<Digest256, PageLoc>> = HashMap::new();
    let mut placed: HashMap<Digest256, usize> = HashMap::new();
    let mut new_packs: Vec<Vec<u8>> = Vec::new();
    let mut where_new: Vec<(Digest256, Vec<(Digest256, usize, u32)>)> = Vec::new();
    let mut builder = PackBuilder::new(options.threads);
    let mut in_builder: Vec<(Digest256, u32)> = Vec::new();
    let mut pending: HashMap<Digest256, u32> = HashMap::new();
    for pack in &rewrite {
        let l = &live[pack];
        let bytes = store.get(pack)?;
        let parsed = Pack::parse(*pack, &bytes).map_err(|e| pack_error(pack, e))?;
        let wanted: Vec<(u32, Digest256)> =
            l.slots.iter().map(|s| (*s, l.index[*s as usize])).collect();
        let mut mine = Vec::with_capacity(wanted.len());
        let mut sink = |_slot: u32, page: &[u8]| -> std::result::Result<(), PackError> {
            let digest = crate::pack::page_digest(page);
            if let Some(&n) = placed.get(&digest) {
                mine.push((digest, n, 0u32));
                return Ok(());
            }
            if let Some(&slot) = pending.get(&digest) {
                mine.push((digest, new_packs.len(), slot));
                return Ok(());
            }
            let slot = builder.push(page, digest);
            pending.insert(digest, slot);
            in_builder.push((digest, slot));
            mine.push((digest, new_packs.len(), slot));
            if builder.is_full() {
                let mut out = Vec::new();
                builder.finish_into(&mut out)?;
                new_packs.push(out);
                for (d, _) in in_builder.drain(..) {
                    placed.insert(d, new_packs.len() - 1);
                }
                pending.clear();
            }
            Ok(())
        };
        parsed
            .for_each_page(&wanted, &mut sink)
            .map_err(|e| pack_error(pack, e))?;
        where_new.push((*pack, mine));
    }
    if !builder.is_empty() {
        let mut out = Vec::new();
        builder
            .finish_into(&mut out)
            .map_err(|e| pack_error(&rewrite[0], e))?;
        new_packs.push(out);
    }
    // Durable before any record names them.
    let batch = store.batch()?;
    let mut digests = Vec::with_capacity(new_packs.len());
    for bytes in &new_packs {
        digests.push(batch.put_raw(bytes)?);
    }
    batch.commit()?;
    drop(new_packs);
    for d in &digests {
        report
            .new_packs
            .push((*d, size_or_zero(store.stored_size(d))?));
    }
    // Each live page's slot in its new pack, from the new packs' indexes.
    let mut new_index: HashMap<Digest256, HashMap<Digest256, u32>> = HashMap::new();
    for d in &digests {
        new_index.insert(*d, pack_index(store, d)?.into_iter().collect());
    }
    for (r, (pack, mine)) in report.rewritten.iter_mut().zip(&where_new) {
        let mut to = BTreeSet::new();
        let pages = moved.entry(*pack).or_default();
        for (digest, n, _) in mine {
            let target = digests[*n];
            let Some(&slot) = new_index[&target].get(digest) else {
                unreachable!("the new pack holds every page put into it");
            };
            pages.insert(*digest, PageLoc { pack: target, slot });
            to.insert(target);
        }
        r.to = to.into_iter().collect();
        for target in &r.to {
            store.add_forward(&Forward {
                pack: *pack,
                to: *target,
            })?;
            report.forwards_written += 1;
        }
    }
    // Leftovers: their pages are where their records lead.
    for pack in &report.leftovers_removed {
        let pages = moved.entry(*pack).or_default();
        for target in store.forwards_of(pack)? {
            if store.contains(&target)? {
                for (d, s) in pack_index(store, &target)? {
                    pages.entry(d).or_insert(PageLoc {
                        pack: target,
                        slot: s,
                    });
                }
            }
        }
    }
    match store.page_index().redirect(&moved) {
        Ok((m, d)) => {
            report.index_moved = m;
            report.index_dropped = d;
        }
        // Derived data: a stale entry only costs a dedup (writers check the pack exists).
        Err(err) => tracing::warn!(error = %err, "moving the page index entries of repacked packs"),
    }
    for r in &report.rewritten {
        store.remove(&r.pack)?;
    }
    for pack in &report.leftovers_removed {
        store.remove(pack)?;
    }
    let needed = mark(store)?.forwards;
    report.forwards_removed = sweep_forwards(store, false, &needed)?.len() as u64;
    Ok(report)
}

/// Whether the live pages of `pack` are all held by present packs its records lead to.
fn covered(
    store: &dyn BlobStore,
    pack: &Digest256,
    l: &Live,
    targets: &[Digest256],
) -> Result<bool> {
    let mut have = BTreeSet::new();
    let mut queue: Vec<Digest256> = targets.to_vec();
    let mut seen = BTreeSet::from([*pack]);
    while let Some(t) = queue.pop() {
        if !seen.insert(t) || seen.len() > crate::forward::MAX_HOPS * 4 {
            continue;
        }
        if store.contains(&t)? {
            have.extend(pack_index(store, &t)?.into_iter().map(|(d, _)| d));
        } else {
            queue.extend(store.forwards_of(&t)?);
        }
    }
    Ok(l
        .slots
        .iter()
        .all(|s| have.contains(&l.index[*s as usize])))
}

/// For every present pack some page list reached from `roots` uses (directly, or through a
/// forward by the page's digest), its index and live slots.
fn live_pages(store: &dyn BlobStore, roots: &[Digest256]) -> Result<BTreeMap<Digest256, Live>> {
    let graph = crate::pages_report::Graph::load(store, roots).map_err(|e| match e {
        crate::pages_report::ReportError::Store { source, .. } => source,
    })?;
    let mut live: BTreeMap<Digest256, Live> = BTreeMap::new();
    let mut routes: HashMap<Digest256, Located> = HashMap::new();
    let mut by_digest: HashMap<Digest256, HashMap<Digest256, u32>> = HashMap::new();
    for manifest in graph.manifests().keys() {
        let m = load_manifest(store, manifest).map_err(|e| pages_error(manifest, e))?;
        let bytes = store.get(&m.list)?;
        let list = parse_list(&m.list, &bytes, &m).map_err(|e| pages_error(manifest, e))?;
        for page in list {
            let Some((k, slot)) = page.at else { continue };
            let pack = m.packs[k as usize];
            if !routes.contains_key(&pack) {
                routes.insert(pack, locate(store, &pack)?);
            }
            match &routes[&pack] {
                Located::Here => {
                    if !live.contains_key(&pack) {
                        let index = pack_index(store, &pack)?.into_iter().map(|(d, _)| d);
                        live.insert(
                            pack,
                            Live {
                                index: index.collect(),
                                slots: BTreeSet::new(),
                            },
                        );
                    }
                    if let Some(l) = live.get_mut(&pack)
                        && (slot as usize) < l.index.len()
                    {
                        l.slots.insert(slot);
                    }
                }
                Located::Forwarded(targets) => {
                    for t in targets {
                        if !by_digest.contains_key(t) {
                            let index = pack_index(store, t)?;
                            by_digest.insert(*t, index.iter().copied().collect());
                            live.entry(*t).or_insert_with(|| Live {
                                index: index.into_iter().map(|(d, _)| d).collect(),
                                slots: BTreeSet::new(),
                            });
                        }
                        if let Some(s) = by_digest[t].get(&page.digest) {
                            if let Some(l) = live.get_mut(t) {
                                l.slots.insert(*s);
                            }
                            break;
                        }
                    }
                }
                // gc reports it missing; nothing of it can be kept.
                Located::Missing { .. } => {}
            }
        }
    }
    Ok(live)
}

/// A pack's (page digest, slot) pairs, read with the store's verification.
fn pack_index(store: &dyn BlobStore, pack: &Digest256) -> Result<Vec<(Digest256, u32)>> {
    let bytes = store.get(pack)?;
    let parsed = Pack::parse(*pack, &bytes).map_err(|e| pack_error(pack, e))?;
    Ok(parsed.entries().collect())
}

fn size_or_zero(size: Result<u64>) -> Result<u64> {
    match size {
        Ok(n) => Ok(n),
        Err(Error::NotFound { .. }) => Ok(0),
        Err(e) => Err(e),
    }
}

fn pack_error(pack: &Digest256, source: PackError) -> Error {
    Error::Read {
        digest: *pack,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, source),
    }
}

fn pages_error(manifest: &Digest256, source: crate::pages::PagesError) -> Error {
    Error::Read {
        digest: *manifest,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, source),
    }
}
