//! Garbage collection: remove the blobs no name can reach, and temp files of dead writers.
//!
//! A blob is reachable when a name points at it, or when a reachable blob that is JSON text
//! holds its digest as a string (a procs blob keeps its CRIU dump alive that way). JSON is
//! recognised by its first non-white-space byte (`{` or `[`) and scanned as a stream, so a
//! large blob is never loaded into memory, and a binary blob (a tar, an image) is dropped after
//! its first bytes.
//!
//! A reachable digest with [forward records](crate::forward) (a pack a repack rewrote) keeps
//! them, and what they point at is reachable too; records nothing reachable needs are removed.

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::digest::Digest256;
use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::store::BlobStore;

/// How [`gc`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    /// Only report what would be removed.
    pub dry_run: bool,
    /// Unreachable blobs stored less than this long ago are kept, so a writer that has stored a
    /// blob but not yet named it (or a blob that names it) does not lose it to a concurrent gc.
    /// Stores that keep no times ([`BlobStore::modified`] is `None`) ignore it.
    pub grace: Duration,
}

/// A blob gc removed, or would remove in a dry run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcBlob {
    /// The blob's digest.
    pub digest: Digest256,
    /// Bytes it took in the store.
    pub stored_size: u64,
}

/// What [`gc`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Whether this was a dry run (nothing removed).
    pub dry_run: bool,
    /// Blobs kept because a name reaches them, sorted.
    pub reachable: Vec<Digest256>,
    /// Unreachable blobs removed (or that would be), sorted by digest.
    pub removed: Vec<GcBlob>,
    /// Unreachable blobs kept because they are younger than the grace period, sorted.
    pub recent: Vec<Digest256>,
    /// Digests a name or a reachable blob refers to that are not in the store, sorted.
    pub missing: Vec<Digest256>,
    /// Temp files of dead writers removed (or that would be), sorted.
    pub temp_files: Vec<PathBuf>,
    /// Forward records kept because a reachable blob names the pack they forward (see
    /// [`crate::forward`]); their targets are among `reachable`.
    pub forwards_kept: usize,
    /// Forward records removed (or that would be) because nothing reachable needs them, sorted.
    pub forwards_removed: Vec<Forward>,
    /// Hints (`<store>/index/<kind>/`, see [`crate::hint`]) removed (or that would be) because
    /// the blob they are about is gone.
    pub hints_removed: usize,
}

impl GcReport {
    /// Bytes of store space the removed blobs took.
    pub fn freed_bytes(&self) -> u64 {
        self.removed.iter().map(|b| b.stored_size).sum()
    }
}

/// Remove every blob that no name reaches (see the module docs), and temp files left by writers
/// that died. A reachable blob that cannot be read stops gc with its error: its children are
/// unknown, so removing anything could lose data.
///
/// gc holds the store's lock exclusively ([`BlobStore::gc_lock`]) from before it reads the names
/// until it has swept, waiting for writers that hold it shared: a blob a name points at when gc
/// returns exists, whatever the grace period. A dry run removes nothing and takes no lock.
pub fn gc(store: &dyn BlobStore, options: &GcOptions) -> Result<GcReport> {
    let _span = tracing::info_span!("gc", dry_run = options.dry_run).entered();
    let _lock = if options.dry_run {
        None
    } else {
        Some(store.gc_lock()?)
    };
    gc_locked(store, options)
}

/// [`gc`], for a caller that holds the gc lock (or runs a dry run).
pub(crate) fn gc_locked(store: &dyn BlobStore, options: &GcOptions) -> Result<GcReport> {
    let reachable = mark(store)?;
    let mut report = sweep(store, options, &reachable.reachable)?;
    report.temp_files = store.sweep_temp(options)?;
    report.forwards_kept = reachable.forwards.len();
    report.forwards_removed = sweep_forwards(store, options.dry_run, &reachable.forwards)?;
    report.hints_removed = crate::hint::sweep(store, options.dry_run)?;
    report.reachable = reachable.reachable.into_iter().collect();
    report.missing = reachable.missing.into_iter().collect();
    Ok(report)
}

/// Remove (or with `dry_run`, only list) the forward records outside `keep`.
pub(crate) fn sweep_forwards(
    store: &dyn BlobStore,
    dry_run: bool,
    keep: &BTreeSet<Forward>,
) -> Result<Vec<Forward>> {
    let mut removed = Vec::new();
    for forward in store.forwards()? {
        if keep.contains(&forward) {
            continue;
        }
        if dry_run || store.remove_forward(&forward)? {
            tracing::debug!(pack = %forward.pack, to = %forward.to, "unneeded forward record");
            removed.push(forward);
        }
    }
    Ok(removed)
}

/// Take back blobs a writer stored and then gave up on (a failed pull), without taking one that
/// another writer has named meanwhile: under the gc lock (so every writer that found one of them
/// already in the store and relied on it has written its name), remove those of `candidates`
/// that no name reaches. The caller must not hold the writer lock. Returns what was removed.
pub fn remove_unreachable(
    store: &dyn BlobStore,
    candidates: &[Digest256],
) -> Result<Vec<Digest256>> {
    let _lock = store.gc_lock()?;
    let reachable = mark(store)?.reachable;
    let mut removed = Vec::new();
    for digest in candidates {
        if !reachable.contains(digest) && store.remove(digest)? {
            removed.push(*digest);
        }
    }
    Ok(removed)
}

/// The names that need `digest` without pointing at it: those from whose blob following
/// references (and forward records), as gc does, reaches it — the snapshots a pack, a page list
/// or an image blob is part of. Sorted. A blob that cannot be read counts as referring to
/// nothing (this answers "what would removing it break", which a damaged store must not stop).
pub fn names_reaching(store: &dyn BlobStore, digest: &Digest256) -> Result<Vec<String>> {
    let mut records: std::collections::BTreeMap<Digest256, Vec<Digest256>> =
        std::collections::BTreeMap::new();
    for f in store.forwards()? {
        records.entry(f.pack).or_default().push(f.to);
    }
    let mut edges: std::collections::HashMap<Digest256, Vec<Digest256>> =
        std::collections::HashMap::new();
    let mut names = Vec::new();
    for (name, root) in store.names()? {
        if root == *digest {
            continue;
        }
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([root]);
        while let Some(at) = queue.pop_front() {
            if at == *digest {
                names.push(name);
                break;
            }
            if !seen.insert(at) {
                continue;
            }
            if let Some(targets) = records.get(&at) {
                queue.extend(targets.iter().copied());
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = edges.entry(at) {
                let refs = if store.contains(&at)? {
                    children(store, &at).unwrap_or_else(|err| {
                        tracing::debug!(%err, digest = %at, "unreadable; taken as referring to nothing");
                        Vec::new()
                    })
                } else {
                    Vec::new()
                };
                slot.insert(refs);
            }
            queue.extend(edges[&at].iter().copied());
        }
    }
    names.sort();
    Ok(names)
}

/// What the names reach, and what they refer to that is missing.
pub(crate) struct Marked {
    pub(crate) reachable: BTreeSet<Digest256>,
    pub(crate) missing: BTreeSet<Digest256>,
    /// The forward records of reached digests (present or not); their targets are reached too.
    pub(crate) forwards: BTreeSet<Forward>,
}

/// Follow every name, and every reachable blob's children, to the blobs they reach. A digest
/// reached (present or gone) that has forward records keeps them, and their targets are reached
/// in turn; a gone digest with records is not missing.
pub(crate) fn mark(store: &dyn BlobStore) -> Result<Marked> {
    let mut records: std::collections::BTreeMap<Digest256, Vec<Digest256>> =
        std::collections::BTreeMap::new();
    for f in store.forwards()? {
        records.entry(f.pack).or_default().push(f.to);
    }
    let mut reachable = BTreeSet::new();
    let mut missing = BTreeSet::new();
    let mut forwards = BTreeSet::new();
    let mut gone = BTreeSet::new();
    let mut queue: VecDeque<Digest256> = store.names()?.into_iter().map(|(_, d)| d).collect();
    while let Some(digest) = queue.pop_front() {
        if reachable.contains(&digest) || missing.contains(&digest) || gone.contains(&digest) {
            continue;
        }
        if let Some(targets) = records.get(&digest) {
            for to in targets {
                forwards.insert(Forward {
                    pack: digest,
                    to: *to,
                });
                queue.push_back(*to);
            }
        }
        if !store.contains(&digest)? {
            if records.contains_key(&digest) {
                gone.insert(digest);
            } else {
                missing.insert(digest);
            }
            continue;
        }
        reachable.insert(digest);
        for child in children(store, &digest)? {
            queue.push_back(child);
        }
    }
    Ok(Marked {
        reachable,
        missing,
        forwards,
    })
}

/// Remove (or list, in a dry run) the blobs outside `reachable` that are older than the grace
/// period.
fn sweep(
    store: &dyn BlobStore,
    options: &GcOptions,
    reachable: &BTreeSet<Digest256>,
) -> Result<GcReport> {
    let now = SystemTime::now();
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    for digest in store.list()? {
        if reachable.contains(&digest) {
            continue;
        }
        let young = match store.modified(&digest) {
            Ok(Some(time)) => now.duration_since(time).unwrap_or_default() < options.grace,
            Ok(None) => false,
            // Removed meanwhile by someone else.
            Err(Error::NotFound { .. }) => continue,
            Err(err) => return Err(err),
        };
        if young {
            report.recent.push(digest);
            continue;
        }
        let stored_size = match store.stored_size(&digest) {
            Ok(size) => size,
            Err(Error::NotFound { .. }) => continue,
            Err(err) => return Err(err),
        };
        if !options.dry_run && !store.remove(&digest)? {
            continue;
        }
        tracing::debug!(%digest, stored_size, "unreachable blob");
        report.removed.push(GcBlob {
            digest,
            stored_size,
        });
    }
    Ok(report)
}

/// The digests a blob refers to, as gc follows them: the string tokens of a JSON blob that are
/// digests, sorted and deduplicated; none for a blob that is not JSON. Anything that moves a
/// snapshot's blob graph (pf-registry) walks it with this, so it carries exactly what gc keeps.
pub fn references(store: &dyn BlobStore, digest: &Digest256) -> Result<Vec<Digest256>> {
    children(store, digest)
}

/// The digests a blob refers to: the string tokens of a JSON blob that are digests.
fn children(store: &dyn BlobStore, digest: &Digest256) -> Result<Vec<Digest256>> {
    let mut reader = store.open(digest)?;
    let mut scan = JsonScan::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(Error::from_read(err, |source| Error::Read {
                    digest: *digest,
                    source,
                }));
            }
        };
        if n == 0 {
            return Ok(scan.finish());
        }
        if !scan.feed(&buf[..n]) {
            // Not JSON: no children, and no need to read the rest.
            return Ok(Vec::new());
        }
    }
}

/// A streaming scan of JSON text for string tokens that are digests.
///
/// It checks enough of the syntax to tell JSON from binary data (the first byte, the bytes
/// allowed outside strings, control bytes inside strings), not the nesting. Object keys count
/// like values: gc errs on the side of keeping. Strings with escapes are not digests (serde_json
/// writes a digest without any).
#[derive(Debug, Default)]
struct JsonScan {
    state: ScanState,
    token: Vec<u8>,
    token_escaped: bool,
    found: Vec<Digest256>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    #[default]
    Start,
    Outside,
    InString,
    Escape,
    NotJson,
}

/// `sha256:` and 64 hex digits.
const DIGEST_LEN: usize = 71;

impl JsonScan {
    /// Feed the next bytes; false once the text is known not to be JSON.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            self.state = match self.state {
                ScanState::Start => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => ScanState::Start,
                    b'{' | b'[' => ScanState::Outside,
                    _ => ScanState::NotJson,
                },
                ScanState::Outside => match b {
                    b'"' => {
                        self.token.clear();
                        self.token_escaped = false;
                        ScanState::InString
                    }
                    b' ' | b'\t' | b'\n' | b'\r' | b'{' | b'}' | b'[' | b']' | b',' | b':' => {
                        ScanState::Outside
                    }
                    b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' => ScanState::Outside,
                    b't' | b'r' | b'u' | b'f' | b'a' | b'l' | b's' | b'n' => ScanState::Outside,
                    _ => ScanState::NotJson,
                },
                ScanState::InString => match b {
                    b'"' => {
                        if !self.token_escaped
                            && self.token.len() == DIGEST_LEN
                            && let Ok(text) = std::str::from_utf8(&self.token)
                            && let Ok(digest) = text.parse()
                        {
                            self.found.push(digest);
                        }
                        ScanState::Outside
                    }
                    b'\\' => {
                        self.token_escaped = true;
                        ScanState::Escape
                    }
                    0..=0x1f => ScanState::NotJson,
                    _ => {
                        if self.token.len() <= DIGEST_LEN {
                            self.token.push(b);
                        }
                        ScanState::InString
                    }
                },
                ScanState::Escape => ScanState::InString,
                ScanState::NotJson => ScanState::NotJson,
            };
            if self.state == ScanState::NotJson {
                self.found.clear();
                return false;
            }
        }
        true
    }

    /// The digests found, once the input has ended; none when it was not complete JSON text.
    fn finish(mut self) -> Vec<Digest256> {
        if self.state != ScanState::Outside {
            return Vec::new();
        }
        self.found.sort();
        self.found.dedup();
        self.found
    }
}

#[cfg(test)]
impl GcOptions {
    /// A dry run with no grace period.
    pub(crate) fn dry_run_now() -> Self {
        Self {
            dry_run: true,
            grace: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBlobStore;

    fn scan(text: &[u8]) -> Vec<Digest256> {
        let mut s = JsonScan::default();
        for chunk in text.chunks(7) {
            if !s.feed(chunk) {
                return Vec::new();
            }
        }
        s.finish()
    }

    const NOW: GcOptions = GcOptions {
        dry_run: false,
        grace: Duration::ZERO,
    };

    #[test]
    fn scan_finds_digests_at_any_depth() {
        let a = Digest256::of(b"a");
        let b = Digest256::of(b"b");
        let mut deep = String::new();
        for _ in 0..1000 {
            deep.push('[');
        }
        deep.push_str(&format!("\"{b}\""));
        for _ in 0..1000 {
            deep.push(']');
        }
        let text = format!(
            r#" {{"kind":"procs.criu.v1","criu_dump":"{a}","pids":[1,-2.5e3],"ok":true,"x":null,"d":{deep}}}"#
        );
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(scan(text.as_bytes()), want);
    }

    #[test]
    fn scan_ignores_non_digests_and_non_json() {
        let a = Digest256::of(b"a");
        assert!(scan(format!(r#"{{"x":"{a}0","y":"see {a}"}}"#).as_bytes()).is_empty());
        assert!(scan(format!(r#"{{"x":"\"{a}\""}}"#).as_bytes()).is_empty());
        // Binary data, and text that is not JSON.
        assert!(scan(format!("tar\0\0\"{a}\"").as_bytes()).is_empty());
        assert!(scan(format!("[\"{a}\", \x01]").as_bytes()).is_empty());
        assert!(scan(format!("[\"{a}\", #]").as_bytes()).is_empty());
        // Unterminated string.
        assert!(scan(format!("[\"{a}\", \"abc").as_bytes()).is_empty());
    }

    #[test]
    fn gc_keeps_named_and_json_children() {
        let s = MemBlobStore::new();
        let dump = s.put(b"\x00binary dump").unwrap();
        let grandchild = s.put(b"gc").unwrap();
        let child = s.put(format!(r#"["{grandchild}"]"#).as_bytes()).unwrap();
        let procs = s
            .put(format!(r#"{{"criu_dump":"{dump}","more":{{"c":"{child}"}}}}"#).as_bytes())
            .unwrap();
        let loose = s.put(b"loose").unwrap();
        let absent = Digest256::of(b"absent");
        let refers_absent = s.put(format!(r#"["{absent}"]"#).as_bytes()).unwrap();
        s.set_name("snap", &procs).unwrap();
        s.set_name("other", &refers_absent).unwrap();

        let dry = gc(&s, &GcOptions::dry_run_now()).unwrap();
        assert!(dry.dry_run);
        assert_eq!(dry.removed.len(), 1);
        assert_eq!(dry.removed[0].digest, loose);
        assert!(s.contains(&loose).unwrap());

        let report = gc(&s, &NOW).unwrap();
        let mut want = vec![dump, grandchild, child, procs, refers_absent];
        want.sort();
        assert_eq!(report.reachable, want);
        assert_eq!(
            report.removed,
            vec![GcBlob {
                digest: loose,
                stored_size: 5
            }]
        );
        assert_eq!(report.freed_bytes(), 5);
        assert_eq!(report.missing, vec![absent]);
        assert!(!s.contains(&loose).unwrap());
        assert_eq!(s.list().unwrap(), want);
    }

    #[test]
    fn names_reaching_a_blob_are_those_whose_graph_holds_it() {
        let s = MemBlobStore::new();
        let pack = s.put(b"\x00pages").unwrap();
        let list = s.put(format!(r#"["{pack}"]"#).as_bytes()).unwrap();
        let first = s
            .put(format!(r#"{{"pages":"{list}"}}"#).as_bytes())
            .unwrap();
        let second = s
            .put(format!(r#"{{"p":"{pack}","n":1}}"#).as_bytes())
            .unwrap();
        let unrelated = s.put(b"{}").unwrap();
        s.set_name("b", &second).unwrap();
        s.set_name("a", &first).unwrap();
        s.set_name("c", &unrelated).unwrap();
        s.set_name("direct", &pack).unwrap();
        assert_eq!(names_reaching(&s, &pack).unwrap(), vec!["a", "b"]);
        assert_eq!(names_reaching(&s, &list).unwrap(), vec!["a"]);
        // A name pointing at the blob itself is not among them; nothing reaches a root.
        assert!(names_reaching(&s, &first).unwrap().is_empty());
        // A blob that cannot be read refers to nothing, and does not stop the answer.
        s.corrupt_for_test(&list, b"[]");
        assert_eq!(names_reaching(&s, &pack).unwrap(), vec!["b"]);
    }

    #[test]
    fn gc_stops_on_a_corrupt_reachable_blob() {
        let s = MemBlobStore::new();
        let child = s.put(b"child").unwrap();
        let parent = s.put(format!(r#"["{child}"]"#).as_bytes()).unwrap();
        s.set_name("p", &parent).unwrap();
        s.corrupt_for_test(&parent, b"[]");
        let err = gc(&s, &NOW).unwrap_err();
        assert!(
            matches!(err, Error::Integrity { digest, .. } if digest == parent),
            "{err:?}"
        );
        assert!(s.contains(&child).unwrap());
    }
}
