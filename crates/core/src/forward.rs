//! Pack forwarding: where the pages of a repacked pack went.
//!
//! A page list addresses a page as (pack, slot) and carries the page's own digest, so the pair
//! is a location hint: when `pf store gc --repack` rewrites a pack whose live fraction fell
//! below its threshold, it writes the live pages into a new pack and records `old → new` as a
//! *forward record* before it removes the old pack. Snapshot, manifest and page-list digests
//! never change. A reader that finds a pack missing follows its forward records (chains too,
//! at most [`MAX_HOPS`] deep) and finds each page by its digest in the target's index; the page
//! is still hashed against the page list's digest, so a forward can never produce wrong memory.
//!
//! A record is one small JSON text, the only serde type of this module:
//! `{"kind":"pf.pack_forward.v1","pack":"sha256:<old>","to":"sha256:<new>"}`. A pack may have
//! several records (two stores that repacked the same pack differently, merged by a pull); its
//! pages are looked for in every target. [`FsBlobStore`](crate::FsBlobStore) keeps them as
//! `<store>/index/forward/<old-hex>/<new-hex>` (temp file, fsync, rename, directory fsync), and
//! gc keeps a record (and its target) as long as something reachable names the old pack.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::digest::Digest256;
use crate::error::Result;
use crate::store::BlobStore;

/// Most forward records followed from one pack (a chain `a → b → c` is two hops).
pub const MAX_HOPS: usize = 16;

/// One forward record: the live pages of `pack` are in `to` (the wire and disk format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename = "pf.pack_forward.v1")]
pub struct Forward {
    /// The pack that was repacked (and may be gone).
    pub pack: Digest256,
    /// The pack its live pages were written to.
    pub to: Digest256,
}

impl Forward {
    /// The record's bytes: its JSON text and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            serde_json::to_vec(self).unwrap_or_else(|_| unreachable!("digests serialise"));
        out.push(b'\n');
        out
    }

    /// Parse a record's bytes; `None` when they are not one.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Where the pages of a pack are to be looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// The pack is in the store.
    Here,
    /// The pack is gone; these packs, reached through its forward records and present, hold
    /// its live pages (in the order to search them).
    Forwarded(Vec<Digest256>),
    /// The pack is gone and no present pack is forwarded to from it; `tried` names the packs
    /// its records led to (empty: it has no record).
    Missing {
        /// Packs the records named that are missing too (and have no records of their own).
        tried: Vec<Digest256>,
    },
}

/// Where the pages of `pack` are: itself when the store has it, else the present packs its
/// forward records lead to, breadth-first, at most [`MAX_HOPS`] hops.
pub fn locate(store: &dyn BlobStore, pack: &Digest256) -> Result<Located> {
    if store.contains(pack)? {
        return Ok(Located::Here);
    }
    let mut seen = BTreeSet::from([*pack]);
    let mut queue = VecDeque::from([(*pack, 0usize)]);
    let mut found = Vec::new();
    let mut tried = Vec::new();
    while let Some((at, hops)) = queue.pop_front() {
        for target in store.forwards_of(&at)? {
            if !seen.insert(target) {
                continue;
            }
            if store.contains(&target)? {
                found.push(target);
            } else if hops + 1 < MAX_HOPS {
                tried.push(target);
                queue.push_back((target, hops + 1));
            } else {
                tried.push(target);
            }
        }
    }
    Ok(if found.is_empty() {
        Located::Missing { tried }
    } else {
        Located::Forwarded(found)
    })
}

/// Every pack reachable from `pack` through forward records (not `pack` itself), present or not,
/// with the records followed: what gc keeps for a reachable `pack`.
pub fn closure(store: &dyn BlobStore, pack: &Digest256) -> Result<Vec<Forward>> {
    let mut seen = BTreeSet::from([*pack]);
    let mut queue = VecDeque::from([(*pack, 0usize)]);
    let mut out = Vec::new();
    while let Some((at, hops)) = queue.pop_front() {
        if hops >= MAX_HOPS {
            continue;
        }
        for target in store.forwards_of(&at)? {
            out.push(Forward {
                pack: at,
                to: target,
            });
            if seen.insert(target) {
                queue.push_back((target, hops + 1));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBlobStore;

    /// The example in agent_docs/formats.md is a record, written as pf writes it.
    #[test]
    fn formats_md_example_parses() {
        let doc = include_str!("../../../agent_docs/formats.md");
        let start = doc
            .find("```json\n{\"kind\":\"pf.pack_forward.v1\"")
            .expect("the forward record example in formats.md");
        let text = &doc[start + 8..];
        let text = &text[..text.find("```").expect("end")];
        let rec = Forward::parse(text.as_bytes()).expect("a record");
        assert_eq!(rec.to_bytes(), text.as_bytes());
    }

    #[test]
    fn records_round_trip_and_chains_are_followed_and_bounded() {
        let store = MemBlobStore::new();
        let a = Digest256::of(b"a");
        let b = Digest256::of(b"b");
        let c = store.put(b"c").expect("put");
        let rec = Forward { pack: a, to: b };
        assert_eq!(Forward::parse(&rec.to_bytes()), Some(rec));
        assert_eq!(Forward::parse(b"{\"kind\":\"other\"}"), None);
        assert_eq!(
            locate(&store, &a).expect("locate"),
            Located::Missing { tried: vec![] }
        );
        store.add_forward(&rec).expect("fwd");
        assert_eq!(
            locate(&store, &a).expect("locate"),
            Located::Missing { tried: vec![b] }
        );
        store.add_forward(&Forward { pack: b, to: c }).expect("fwd");
        assert_eq!(
            locate(&store, &a).expect("locate"),
            Located::Forwarded(vec![c])
        );
        assert_eq!(locate(&store, &c).expect("locate"), Located::Here);
        assert_eq!(closure(&store, &a).expect("closure").len(), 2);
        // A cycle ends; a chain longer than MAX_HOPS is not followed to its end.
        store.add_forward(&Forward { pack: b, to: a }).expect("fwd");
        assert_eq!(closure(&store, &a).expect("closure").len(), 3);
        let long: Vec<Digest256> = (0..=MAX_HOPS as u32)
            .map(|n| Digest256::of(&n.to_le_bytes()))
            .collect();
        for w in long.windows(2) {
            store
                .add_forward(&Forward {
                    pack: w[0],
                    to: w[1],
                })
                .expect("fwd");
        }
        store
            .add_forward(&Forward {
                pack: long[MAX_HOPS],
                to: c,
            })
            .expect("fwd");
        assert!(matches!(
            locate(&store, &long[0]).expect("locate"),
            Located::Missing { .. }
        ));
        assert_eq!(
            locate(&store, &long[1]).expect("locate"),
            Located::Forwarded(vec![c])
        );
    }
}
