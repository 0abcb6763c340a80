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

/// Where a live page went: (its digest, the new pack's number, its slot when known).
type Placed = (Digest256, usize, u32);

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
    let mut where_new: Vec<(Digest256, Vec<Placed>)> = Vec::new();
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
        let mut sink = |slot: u32, page: &[u8]| -> std::result::Result<(), PackError> {
            // `for_each_page` hands out only pages that hash to what the pack's index lists.
            let digest = l.index[slot as usize];
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
                // Kept until every new pack is written: not with room for a worst case.
                out.shrink_to_fit();
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
        out.shrink_to_fit();
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
        // A pack rewritten into the same bytes (a leftover whose pages are all live) is its
        // own new pack: it stays, with no record.
        to.remove(pack);
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
        if !digests.contains(&r.pack) {
            store.remove(&r.pack)?;
        }
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
    Ok(l.slots.iter().all(|s| have.contains(&l.index[*s as usize])))
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
        let list = parse_list(store, &m.list, &bytes, &m).map_err(|e| pages_error(manifest, e))?;
        for page in list {
            let Some((k, slot)) = page.at else { continue };
            let pack = m.packs[k as usize];
            let route = match routes.entry(pack) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(locate(store, &pack)?),
            };
            match route {
                Located::Here => {
                    let l = match live.entry(pack) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => e.insert(Live {
                            index: pack_index(store, &pack)?
                                .into_iter()
                                .map(|(d, _)| d)
                                .collect(),
                            slots: BTreeSet::new(),
                        }),
                    };
                    if (slot as usize) < l.index.len() {
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

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::pack::PAGE_SIZE;
    use crate::pages::{PageWriter, PagesError, PagesReader};
    use crate::{FsBlobStore, MemBlobStore};

    /// An incompressible page that is the same for the same `seed`.
    fn page(seed: u64) -> Vec<u8> {
        crate::pack::test_page(seed)
    }

    /// Store a file of the pages `seeds` and name a JSON record of its manifest `name`;
    /// returns the manifest and the file's bytes.
    fn snapshot(
        store: &dyn BlobStore,
        dir: &std::path::Path,
        name: &str,
        seeds: &[u64],
    ) -> (Digest256, Vec<u8>) {
        let path = dir.join(name);
        let bytes: Vec<u8> = seeds.iter().flat_map(|s| page(*s)).collect();
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        let mut w = PageWriter::new(store, store.page_index(), 2);
        let stored = w.write_file(&file, &path).expect("store");
        w.commit().expect("commit");
        let record = format!("{{\"kind\":\"test\",\"pages\":\"{}\"}}", stored.manifest);
        let root = store.put(record.as_bytes()).expect("put");
        store.set_name(name, &root).expect("name");
        (stored.manifest, bytes)
    }

    fn read_all(store: &dyn BlobStore, manifest: &Digest256) -> Result<Vec<u8>, PagesError> {
        let r = PagesReader::open(store, manifest)?;
        let mut out = vec![0u8; r.pages() as usize * PAGE_SIZE];
        r.read(0, &mut out)?;
        Ok(out)
    }

    fn options(threshold: f64) -> RepackOptions {
        RepackOptions {
            dry_run: false,
            grace: Duration::ZERO,
            threshold,
            threads: 2,
        }
    }

    fn stored_total(store: &dyn BlobStore) -> u64 {
        store
            .list()
            .expect("list")
            .iter()
            .map(|d| store.stored_size(d).expect("size"))
            .sum()
    }

    #[test]
    fn repack_keeps_digests_shrinks_the_store_and_redirects_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FsBlobStore::open(&dir.path().join("store")).expect("store");
        // Two packs' worth of pages; the kept snapshot uses 300 of them and 100 new ones.
        let old: Vec<u64> = (0..3000).collect();
        let kept: Vec<u64> = (2700..3000).chain(10_000..10_100).collect();
        let (old_m, _) = snapshot(&store, dir.path(), "old", &old);
        let (kept_m, kept_bytes) = snapshot(&store, dir.path(), "kept", &kept);
        let old_packs = crate::pages::load_manifest(&store, &old_m)
            .expect("m")
            .packs;
        assert!(store.remove_name("old").expect("untag"));
        let gc = crate::gc(
            &store,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert!(!gc.removed.is_empty());
        let before = stored_total(&store);

        let dry = repack(
            &store,
            &RepackOptions {
                dry_run: true,
                ..options(0.5)
            },
        )
        .expect("dry");
        assert!(!dry.rewritten.is_empty() && dry.new_packs.is_empty());
        assert_eq!(stored_total(&store), before, "a dry run changes nothing");

        let report = repack(&store, &options(0.5)).expect("repack");
        // The first pack was wholly dead (plain gc took it); the second is mostly dead.
        assert_eq!(report.rewritten.len(), 1, "{report:?}");
        assert_eq!(report.forwards_written, 1);
        for p in &old_packs {
            assert!(
                !store.contains(p).expect("contains"),
                "old pack {p} removed"
            );
        }
        let after = stored_total(&store);
        assert!(after < before * 2 / 3, "store shrank: {before} -> {after}");
        // The snapshot's digests did not change and it reads page for page.
        assert_eq!(read_all(&store, &kept_m).expect("read"), kept_bytes);
        let path = dir.path().join("rebuilt");
        let out = File::options()
            .create_new(true)
            .write(true)
            .open(&path)
            .expect("create");
        crate::pages::read_pages(&store, &kept_m, &out, &path, 2).expect("read_pages");
        assert_eq!(std::fs::read(&path).expect("read"), kept_bytes);
        // The index points the live pages at the new packs, and knows no dead one.
        let mut live: Vec<Digest256> = (2700..3000)
            .map(|s| crate::pack::page_digest(&page(s)))
            .collect();
        live.sort();
        let found = store.page_index().lookup(&live).expect("lookup");
        assert_eq!(found.len(), live.len());
        let new: BTreeSet<Digest256> = report.new_packs.iter().map(|(d, _)| *d).collect();
        assert!(found.values().all(|l| new.contains(&l.pack)));
        let dead = [crate::pack::page_digest(&page(2100))];
        assert!(store.page_index().lookup(&dead).expect("lookup").is_empty());
        // A new freeze deduplicates against the new packs.
        let (again_m, again) = snapshot(&store, dir.path(), "again", &kept);
        assert_eq!(read_all(&store, &again_m).expect("read"), again);
        let again_packs = crate::pages::load_manifest(&store, &again_m)
            .expect("m")
            .packs;
        assert!(
            again_packs
                .iter()
                .all(|p| new.contains(p) || !old_packs.contains(p))
        );
        // gc keeps the records and targets; verify is clean; a second repack has nothing to do.
        crate::gc(
            &store,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert_eq!(read_all(&store, &kept_m).expect("read"), kept_bytes);
        let roots: Vec<Digest256> = store
            .names()
            .expect("names")
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let graph = crate::pages_report::Graph::load(&store, &roots).expect("graph");
        let v = crate::pages_report::verify_pages(&store, &graph, 2);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let usage = crate::pages_report::pack_usage(&store, &graph).expect("usage");
        assert_eq!(usage.dead_pages(), 0, "{usage:?}");
        // `ls`/`show` sizes count the pack a forwarded pack's pages live in now.
        let kept_root = store.get_name("kept").expect("kept");
        let sizes = crate::pages_report::usage(&store, &graph, &[kept_root]).expect("usage");
        let new_bytes: u64 = report.new_packs.iter().map(|(_, n)| n).sum();
        assert!(sizes[0].stored_size > new_bytes, "{sizes:?}");
        assert!(graph.reach(&kept_root).iter().any(|d| new.contains(d)));
        let second = repack(&store, &options(0.5)).expect("repack");
        assert!(second.rewritten.is_empty());
        // Once no snapshot names the old packs, their records go.
        store.remove_name("kept").expect("untag");
        store.remove_name("again").expect("untag");
        let last = crate::gc(
            &store,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert_eq!(last.forwards_removed.len() as u64, report.forwards_written);
        assert!(store.forwards().expect("forwards").is_empty());
    }

    /// A pack with the pages of `from` whose slots `keep` says, in reverse order (so a pack of
    /// all of them is another pack), put raw; returns its digest.
    fn copy_pack(store: &dyn BlobStore, from: &Digest256, keep: impl Fn(u32) -> bool) -> Digest256 {
        let bytes = store.get(from).expect("get");
        let parsed = Pack::parse(*from, &bytes).expect("parse");
        let wanted: Vec<(u32, Digest256)> = parsed
            .entries()
            .map(|(d, s)| (s, d))
            .filter(|(s, _)| keep(*s))
            .collect();
        let mut pages = Vec::new();
        parsed
            .for_each_page(&wanted, &mut |_, p| -> std::result::Result<(), PackError> {
                pages.push(p.to_vec());
                Ok(())
            })
            .expect("copy");
        let mut b = PackBuilder::new(1);
        for p in pages.iter().rev() {
            b.push(p, crate::pack::page_digest(p));
        }
        store.put_raw(&b.finish().expect("finish")).expect("put")
    }

    #[test]
    fn readers_follow_chains_and_name_a_missing_target_or_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let seeds: Vec<u64> = (0..100).collect();
        let (m, bytes) = snapshot(&store, dir.path(), "s", &seeds);
        let p = crate::pages::load_manifest(&store, &m).expect("m").packs[0];
        // p -> q1 -> q2, p and q1 gone.
        let q1 = copy_pack(&store, &p, |_| true);
        store
            .add_forward(&Forward { pack: p, to: q1 })
            .expect("fwd");
        store.remove(&p).expect("rm");
        let q2 = copy_pack(&store, &q1, |_| true);
        store
            .add_forward(&Forward { pack: q1, to: q2 })
            .expect("fwd");
        store.remove(&q1).expect("rm");
        assert_eq!(read_all(&store, &m).expect("chain"), bytes);
        // gc keeps the chain's records and its end.
        let gc = crate::gc(
            &store,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert_eq!(gc.forwards_kept, 2);
        assert!(gc.missing.is_empty() && store.contains(&q2).expect("q2"));
        // A target lacking a page: the page is named, never wrong.
        let half = copy_pack(&store, &q2, |s| s < 50);
        store
            .add_forward(&Forward { pack: q1, to: half })
            .expect("fwd");
        store.remove(&q2).expect("rm");
        let r = PagesReader::open(&store, &m).expect("open");
        let mut out = vec![0u8; PAGE_SIZE];
        r.read(10, &mut out).expect("a page the target holds");
        assert_eq!(out, page(10));
        let err = r.read(70, &mut out).expect_err("a page no target holds");
        assert!(
            matches!(&err, PagesError::BadPage { page: 70, source: PackError::NotForwarded { pack, .. } } if *pack == p),
            "{err:?}"
        );
        let roots: Vec<Digest256> = store
            .names()
            .expect("names")
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let graph = crate::pages_report::Graph::load(&store, &roots).expect("graph");
        let v = crate::pages_report::verify_pages(&store, &graph, 1);
        assert!(
            v.problems.iter().any(|pr| matches!(&pr.fault, crate::pages_report::Fault::Unforwarded { pack, .. } if *pack == p)),
            "{:?}",
            v.problems
        );
        // A target gone: a clear error naming the pack.
        store.remove(&half).expect("rm");
        let err = read_all(&store, &m).expect_err("no target");
        assert!(err.to_string().contains(&p.to_string()), "{err}");
    }

    #[test]
    fn a_killed_repack_leaves_every_snapshot_readable_and_is_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemBlobStore::new();
        let seeds: Vec<u64> = (0..100).collect();
        let (m, bytes) = snapshot(&store, dir.path(), "s", &seeds);
        let p = crate::pages::load_manifest(&store, &m).expect("m").packs[0];
        // Killed after writing a new pack, before its forward record.
        let orphan = copy_pack(&store, &p, |_| true);
        assert_eq!(read_all(&store, &m).expect("read"), bytes);
        let gc = crate::gc(
            &store,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert!(gc.removed.iter().any(|b| b.digest == orphan));
        assert_eq!(read_all(&store, &m).expect("read"), bytes);
        // Killed after the forward record, before the old pack's removal.
        let q = copy_pack(&store, &p, |_| true);
        store.add_forward(&Forward { pack: p, to: q }).expect("fwd");
        assert_eq!(read_all(&store, &m).expect("read"), bytes);
        let gc = crate::gc(
            &store,
            &GcOptions {
                dry_run: false,
                grace: Duration::ZERO,
            },
        )
        .expect("gc");
        assert!(gc.removed.is_empty() && gc.forwards_kept == 1);
        // A rerun (whatever the threshold) finishes the job.
        let report = repack(&store, &options(0.0)).expect("repack");
        assert_eq!(report.leftovers_removed, vec![p]);
        assert!(!store.contains(&p).expect("p") && store.contains(&q).expect("q"));
        assert_eq!(read_all(&store, &m).expect("read"), bytes);
    }
}
