//! The page index: which page digests the store's packs already hold, and where (pack + slot),
//! so a writer stores each page once per store.
//!
//! On disk it is a directory of *runs*, each a file of records sorted by page digest:
//!
//! ```text
//! "PFPIDX01", u32 N, N × 32-byte pack digests, u64 R,
//! R × (32-byte page digest, u32 pack number < N, u32 slot)     sorted by page digest
//! ```
//!
//! A writer adds one run per session (the pages it put into new packs) with temp file + rename,
//! so readers never see half a run and concurrent writers never collide. When there are more
//! than [`MAX_RUNS`] runs, the writer that notices merges the smallest of them into one (each
//! no larger than twice the smaller ones together: a large run is left alone until the runs
//! after it add up to its size), under an exclusive `flock` on the directory's `lock` file (readers take no lock: a run removed while read stays
//! readable through its open descriptor, and one missed only costs a missed dedup).
//!
//! A lookup takes the writer's page digests sorted and merge-joins them against each run,
//! reading runs sequentially: 40 bytes per page stored on disk (≈ 10 MiB per GiB of unique pages),
//! read once per lookup, and memory for the queried digests only (32 bytes per page looked up)
//! plus one buffered reader. The index is derived data: a hit names a pack that may since have
//! been removed by gc, so callers check that the pack is still in the store before trusting it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::Digest256;

/// A lookup binary-searches a run instead of reading it whole when the run holds more than this
/// many records per digest looked up: a search is about 20 `pread`s of a microsecond, a record
/// read in turn about a tenth of that.
const SPARSE: u64 = 256;

/// Runs kept before a writer merges them into one.
pub const MAX_RUNS: usize = 8;

const MAGIC: &[u8; 8] = b"PFPIDX01";
const RUN_PREFIX: &str = "run-";
const RUN_SUFFIX: &str = ".pidx";

/// Where a page lives: in which pack, at which slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageLoc {
    /// The pack blob.
    pub pack: Digest256,
    /// The page's slot in the pack.
    pub slot: u32,
}

/// Why the page index could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// A file-system operation failed.
    #[error("page index: {op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A run file is not in the format above (remove it: the index is derived data).
    #[error("page index run {} is malformed: {reason} (remove it; pf rebuilds what it needs)", .path.display())]
    Malformed {
        /// The run file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The store's page index, kept in a directory (or nowhere, for stores without one: then every
/// lookup misses).
#[derive(Debug, Clone)]
pub struct PageIndex {
    dir: Option<PathBuf>,
}

impl PageIndex {
    /// The index kept in `dir` (created on the first write).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: Some(dir.to_owned()),
        }
    }

    /// An index that holds nothing and forgets what it is told.
    pub fn none() -> Self {
        Self { dir: None }
    }

    /// The directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn runs(&self) -> Result<Vec<PathBuf>, IndexError> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let read = match std::fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io("list", dir, source)),
        };
        let mut out = Vec::new();
        for entry in read {
            let entry = entry.map_err(|source| io("list", dir, source))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(RUN_PREFIX) && name.ends_with(RUN_SUFFIX) {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Where each of `wanted` (sorted ascending, no duplicates) is, for those the index knows.
    pub fn lookup(&self, wanted: &[Digest256]) -> Result<HashMap<Digest256, PageLoc>, IndexError> {
        debug_assert!(wanted.windows(2).all(|w| w[0] < w[1]));
        let mut found = HashMap::new();
        if wanted.is_empty() {
            return Ok(found);
        }
        for path in self.runs()? {
            let file = match File::open(&path) {
                Ok(f) => f,
                // Merged away between listing and opening: its records are in the merged run,
                // which a later lookup sees; this one only misses some dedup.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(io("open", &path, source)),
            };
            let mut run = RunReader::new(file, &path)?;
            // A few digests against a long run: binary searches (about 18 small reads each for
            // a GiB of pages) instead of reading the whole run.
            if (wanted.len() as u64).saturating_mul(SPARSE) < run.left {
                run.check_len()?;
                for digest in wanted {
                    if let Some(loc) = run.find(digest)? {
                        found.entry(*digest).or_insert(loc);
                    }
                }
                continue;
            }
            let mut q = 0;
            while q < wanted.len() {
                let Some((digest, loc)) = run.next()? else {
                    break;
                };
                while q < wanted.len() && wanted[q] < digest {
                    q += 1;
                }
                if q < wanted.len() && wanted[q] == digest {
                    found.entry(digest).or_insert(loc);
                    q += 1;
                }
            }
        }
        Ok(found)
    }

    /// Record `entries` (any order) as a new run; then merge the runs if there are too many.
    pub fn add(&self, mut entries: Vec<(Digest256, PageLoc)>) -> Result<(), IndexError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        if entries.is_empty() {
            return Ok(());
        }
        entries.sort_by_key(|e| e.0);
        entries.dedup_by(|a, b| a.0 == b.0);
        create_dir(dir)?;
        write_run(dir, &entries)?;
        if self.runs()?.len() > MAX_RUNS {
            self.merge_smallest()?;
        }
        Ok(())
    }

    /// Move or drop the entries of packs a repack rewrote: every entry whose pack is a key of
    /// `moved` becomes the location that map gives its page (the page's new pack and slot), or
    /// is dropped when it has none. All runs are merged into one on the way, under the
    /// directory's lock (a run a writer adds meanwhile is kept as it is: a writer only adds
    /// pages of packs it wrote itself). Returns how many entries were moved and dropped.
    pub fn redirect(
        &self,
        moved: &HashMap<Digest256, HashMap<Digest256, PageLoc>>,
    ) -> Result<(u64, u64), IndexError> {
        let Some(dir) = &self.dir else {
            return Ok((0, 0));
        };
        create_dir(dir)?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| io("open", &lock_path, source))?;
        lock.lock()
            .map_err(|source| io("lock", &lock_path, source))?;
        let runs = self.runs()?;
        let (mut redirected, mut dropped) = (0u64, 0u64);
        let mut all = Vec::new();
        for path in &runs {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(io("open", path, source)),
            };
            let mut run = RunReader::new(file, path)?;
            while let Some((digest, loc)) = run.next()? {
                match moved.get(&loc.pack) {
                    None => all.push((digest, loc)),
                    Some(pages) => match pages.get(&digest) {
                        Some(new) => {
                            redirected += 1;
                            all.push((digest, *new));
                        }
                        None => dropped += 1,
                    },
                }
            }
        }
        if redirected == 0 && dropped == 0 {
            return Ok((0, 0));
        }
        all.sort_by_key(|e| e.0);
        all.dedup_by(|a, b| a.0 == b.0);
        let merged = write_run(dir, &all)?;
        for path in runs {
            if path != merged {
                std::fs::remove_file(&path).map_err(|source| io("remove", &path, source))?;
            }
        }
        Ok((redirected, dropped))
    }

    /// Merge every run into one, under the directory's lock.
    pub fn compact(&self) -> Result<(), IndexError> {
        self.merge_runs(|runs| runs.iter().map(|(path, _)| path.clone()).collect())
    }

    /// Merge the smallest runs into one, under the directory's lock: as many as are each no
    /// larger than twice the smaller ones together, and at least two. A writer does this when
    /// there are more than [`MAX_RUNS`] runs; merging them all every time instead rewrote the
    /// whole index every [`MAX_RUNS`] sessions (a 47 MB run for a 4.8 GB store: 0.58 s of a
    /// re-freeze, and its peak RSS from 83 to 141 MiB). Tiered, a run is rewritten about once
    /// each time the runs after it add up to its size.
    fn merge_smallest(&self) -> Result<(), IndexError> {
        self.merge_runs(|runs| {
            let sizes: Vec<u64> = runs.iter().map(|(_, size)| *size).collect();
            smallest_to_merge(&sizes)
                .into_iter()
                .map(|i| runs[i].0.clone())
                .collect()
        })
    }

    /// Merge the runs `pick` chooses (of every run and its size) into one, under the
    /// directory's lock.
    fn merge_runs(
        &self,
        pick: impl FnOnce(&[(PathBuf, u64)]) -> Vec<PathBuf>,
    ) -> Result<(), IndexError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        create_dir(dir)?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| io("open", &lock_path, source))?;
        lock.lock()
            .map_err(|source| io("lock", &lock_path, source))?;
        let sized: Vec<(PathBuf, u64)> = self
            .runs()?
            .into_iter()
            .map(|path| {
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                (path, size)
            })
            .collect();
        if sized.len() <= 1 {
            return Ok(());
        }
        let runs = pick(&sized);
        if runs.len() <= 1 {
            return Ok(());
        }
        // Runs are small next to the pages they describe (1% of them): merge in memory.
        let mut all = Vec::new();
        for path in &runs {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(io("open", path, source)),
            };
            let mut run = RunReader::new(file, path)?;
            while let Some(rec) = run.next()? {
                all.push(rec);
            }
        }
        all.sort_by_key(|e| e.0);
        all.dedup_by(|a, b| a.0 == b.0);
        let merged = write_run(dir, &all)?;
        for path in runs {
            if path != merged {
                std::fs::remove_file(&path).map_err(|source| io("remove", &path, source))?;
            }
        }
        Ok(())
    }
}

/// Which of runs of these `sizes` to merge: the smallest, as many as are each no larger than
/// twice the smaller ones together, and at least two (indexes into `sizes`).
fn smallest_to_merge(sizes: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| sizes[i]);
    let mut sum = 0u64;
    let mut take = 0;
    for (n, &i) in order.iter().enumerate() {
        if n >= 2 && sizes[i] > sum.saturating_mul(2) {
            break;
        }
        sum = sum.saturating_add(sizes[i]);
        take = n + 1;
    }
    order.truncate(take.max(2));
    order
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> IndexError {
    IndexError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), IndexError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io("create", dir, source))
}

/// Write sorted, deduplicated `entries` as a run; returns its path (named by its content's hash,
/// so two writers of the same run agree).
fn write_run(dir: &Path, entries: &[(Digest256, PageLoc)]) -> Result<PathBuf, IndexError> {
    let mut packs: Vec<Digest256> = entries.iter().map(|(_, l)| l.pack).collect();
    packs.sort();
    packs.dedup();
    packs.shrink_to_fit();
    let number: crate::DigestMap<u32> = packs.iter().zip(0u32..).map(|(p, n)| (*p, n)).collect();
    // The whole run in memory (40 bytes an entry, 1% of the pages it describes), hashed and
    // written at once.
    let mut bytes = Vec::with_capacity(MAGIC.len() + 12 + packs.len() * 32 + entries.len() * 40);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in &packs {
        bytes.extend_from_slice(p.as_bytes());
    }
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (digest, loc) in entries {
        bytes.extend_from_slice(digest.as_bytes());
        bytes.extend_from_slice(&number[&loc.pack].to_le_bytes());
        bytes.extend_from_slice(&loc.slot.to_le_bytes());
    }
    let hash = Digest256::of(&bytes);
    let name = format!("{RUN_PREFIX}{}{RUN_SUFFIX}", &hash.hex()[..32]);
    let path = dir.join(name);
    let (mut file, tmp_path) = tempfile_in(dir)?;
    let written = file
        .write_all(&bytes)
        .map_err(|source| io("write", &tmp_path, source))
        .and_then(|()| {
            file.sync_all()
                .map_err(|source| io("sync", &tmp_path, source))
        })
        .and_then(|()| {
            std::fs::rename(&tmp_path, &path).map_err(|source| io("rename", &tmp_path, source))
        });
    if written.is_err() {
        // A full disk fails here: the half-written run would hold its space for good.
        let _ = std::fs::remove_file(&tmp_path);
    }
    written.map(|()| path)
}

fn tempfile_in(dir: &Path) -> Result<(File, PathBuf), IndexError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    for n in 0u32.. {
        // `.tmp-<pid>-…`, as the store's other temp files: gc sweeps those of dead writers.
        let path = dir.join(format!(".tmp-{}-run-{n}", std::process::id()));
        match File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(source) => return Err(io("create", &path, source)),
        }
    }
    unreachable!("the loop returns")
}

/// Reads a run's records in order.
struct RunReader {
    input: BufReader<File>,
    path: PathBuf,
    packs: Vec<Digest256>,
    left: u64,
    last: Option<Digest256>,
    /// Where the records begin, and how many there are.
    records_at: u64,
    records: u64,
}

impl RunReader {
    fn new(file: File, path: &Path) -> Result<Self, IndexError> {
        let mut input = BufReader::with_capacity(256 * 1024, file);
        let mut head = [0u8; 12];
        read_exact(&mut input, &mut head, path)?;
        if &head[..8] != MAGIC {
            return Err(malformed(path, "bad magic"));
        }
        let n = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let mut packs = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let mut d = [0u8; 32];
            read_exact(&mut input, &mut d, path)?;
            packs.push(Digest256::from_bytes(d));
        }
        let mut count = [0u8; 8];
        read_exact(&mut input, &mut count, path)?;
        let records = u64::from_le_bytes(count);
        Ok(Self {
            input,
            path: path.to_owned(),
            packs,
            left: records,
            last: None,
            records_at: 12 + 32 * n as u64 + 8,
            records,
        })
    }

    /// Where `digest` is, by binary search over the records (read with `pread`, leaving the
    /// sequential reader where it was). A run that is not sorted can only make it miss.
    /// An error unless the file is exactly as long as its header says ([`find`](Self::find)
    /// reads records where the header puts them).
    fn check_len(&self) -> Result<(), IndexError> {
        let len = self
            .input
            .get_ref()
            .metadata()
            .map_err(|source| io("stat", &self.path, source))?
            .len();
        let end = self
            .records
            .checked_mul(40)
            .and_then(|n| n.checked_add(self.records_at));
        match end {
            Some(end) if end == len => Ok(()),
            Some(end) if end > len => Err(malformed(&self.path, "truncated")),
            _ => Err(malformed(&self.path, "not as long as its header says")),
        }
    }

    fn find(&self, digest: &Digest256) -> Result<Option<PageLoc>, IndexError> {
        use std::os::unix::fs::FileExt as _;
        let file = self.input.get_ref();
        let (mut lo, mut hi) = (0u64, self.records);
        let mut rec = [0u8; 40];
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            file.read_exact_at(&mut rec, self.records_at + mid * 40)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        malformed(&self.path, "truncated")
                    } else {
                        io("read", &self.path, e)
                    }
                })?;
            match rec[..32].cmp(digest.as_bytes()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let n = u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]) as usize;
                    let slot = u32::from_le_bytes([rec[36], rec[37], rec[38], rec[39]]);
                    let pack = *self.packs.get(n).ok_or_else(|| {
                        malformed(&self.path, "a record names a pack the run does not list")
                    })?;
                    return Ok(Some(PageLoc { pack, slot }));
                }
            }
        }
        Ok(None)
    }

    fn next(&mut self) -> Result<Option<(Digest256, PageLoc)>, IndexError> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut rec = [0u8; 40];
        read_exact(&mut self.input, &mut rec, &self.path)?;
        self.left -= 1;
        let mut d = [0u8; 32];
        d.copy_from_slice(&rec[..32]);
        let digest = Digest256::from_bytes(d);
        if self.last.is_some_and(|last| last >= digest) {
            return Err(malformed(&self.path, "records are not sorted"));
        }
        self.last = Some(digest);
        let n = u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]) as usize;
        let slot = u32::from_le_bytes([rec[36], rec[37], rec[38], rec[39]]);
        let pack = *self
            .packs
            .get(n)
            .ok_or_else(|| malformed(&self.path, "a record names a pack the run does not list"))?;
        Ok(Some((digest, PageLoc { pack, slot })))
    }
}

fn read_exact(input: &mut dyn Read, buf: &mut [u8], path: &Path) -> Result<(), IndexError> {
    input.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            malformed(path, "truncated")
        } else {
            io("read", path, e)
        }
    })
}

fn malformed(path: &Path, reason: &'static str) -> IndexError {
    IndexError::Malformed {
        path: path.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u32) -> Digest256 {
        Digest256::of(&n.to_le_bytes())
    }

    fn loc(p: u32, slot: u32) -> PageLoc {
        PageLoc {
            pack: d(1000 + p),
            slot,
        }
    }

    #[test]
    fn a_few_digests_are_found_in_a_long_run_by_binary_search() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let index = PageIndex::in_dir(&tmp.path().join("idx"));
        // Even numbers only, so odd ones fall between records.
        let entries: Vec<_> = (0..20_000u32).map(|i| (d(2 * i), loc(i % 7, i))).collect();
        let all: HashMap<_, _> = entries.iter().copied().collect();
        index.add(entries).expect("add");
        for picks in [
            vec![0u32, 2, 39_998],
            vec![1, 3, 40_001],
            vec![5, 6, 7, 8, 31_000],
        ] {
            let mut wanted: Vec<_> = picks.iter().map(|&i| d(i)).collect();
            wanted.sort();
            wanted.dedup();
            assert!((wanted.len() as u64) * SPARSE < 20_000, "the sparse path");
            let found = index.lookup(&wanted).expect("lookup");
            let expected: HashMap<_, _> = wanted
                .iter()
                .filter_map(|w| all.get(w).map(|l| (*w, *l)))
                .collect();
            assert_eq!(found, expected, "{picks:?}");
        }
        // A truncated run is an error, not a wrong answer.
        let run = index.runs().expect("runs").remove(0);
        let len = std::fs::metadata(&run).expect("stat").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&run)
            .expect("open");
        file.set_len(len / 2).expect("truncate");
        let err = index.lookup(&[d(39_998)]).expect_err("truncated");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn lookups_find_what_runs_hold_and_survive_compaction() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let index = PageIndex::in_dir(&tmp.path().join("idx"));
        let mut all = HashMap::new();
        for run in 0..(MAX_RUNS as u32 + 2) {
            let entries: Vec<_> = (0..50).map(|i| (d(run * 100 + i), loc(run, i))).collect();
            all.extend(entries.iter().copied());
            index.add(entries).expect("add");
        }
        assert!(index.runs().expect("runs").len() <= MAX_RUNS, "compacted");
        let mut wanted: Vec<_> = (0..1200).map(d).collect();
        wanted.sort();
        let found = index.lookup(&wanted).expect("lookup");
        assert_eq!(found, all);
        index.compact().expect("compact");
        assert_eq!(index.runs().expect("runs").len(), 1);
        assert_eq!(index.lookup(&wanted).expect("lookup"), all);
    }

    #[test]
    fn a_writer_merges_the_small_runs_and_leaves_a_large_one_alone() {
        assert_eq!(smallest_to_merge(&[5, 1000, 1, 1, 2]), vec![2, 3, 4, 0]);
        assert_eq!(smallest_to_merge(&[100, 1, 1000]), vec![1, 0]);
        assert_eq!(smallest_to_merge(&[3, 3]), vec![0, 1]);
        let mut even = smallest_to_merge(&[7; 9]);
        even.sort_unstable();
        assert_eq!(even, (0..9).collect::<Vec<_>>());
        // One large run, then sessions of a few pages each: the large run stays as it is.
        let tmp = tempfile::tempdir().expect("tempdir");
        let index = PageIndex::in_dir(&tmp.path().join("idx"));
        let mut all = HashMap::new();
        let large: Vec<_> = (0..5000).map(|i| (d(100_000 + i), loc(999, i))).collect();
        all.extend(large.iter().copied());
        index.add(large).expect("add");
        let large_run = index.runs().expect("runs");
        for run in 0..(3 * MAX_RUNS as u32) {
            let entries: Vec<_> = (0..20).map(|i| (d(run * 100 + i), loc(run, i))).collect();
            all.extend(entries.iter().copied());
            index.add(entries).expect("add");
            let runs = index.runs().expect("runs");
            assert!(runs.len() <= MAX_RUNS, "{} runs", runs.len());
            assert!(runs.contains(&large_run[0]), "the large run was rewritten");
        }
        let mut wanted: Vec<_> = all.keys().copied().collect();
        wanted.sort();
        assert_eq!(index.lookup(&wanted).expect("lookup"), all);
    }

    #[test]
    fn redirect_moves_the_pages_of_repacked_packs_and_drops_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = PageIndex::in_dir(dir.path());
        index
            .add(vec![
                (d(1), loc(1, 0)),
                (d(2), loc(1, 1)),
                (d(3), loc(2, 0)),
            ])
            .expect("add");
        index.add(vec![(d(4), loc(1, 2))]).expect("add");
        let old = loc(1, 0).pack;
        let new = PageLoc {
            pack: d(900),
            slot: 7,
        };
        let moved = HashMap::from([(old, HashMap::from([(d(2), new)]))]);
        assert_eq!(index.redirect(&moved).expect("redirect"), (1, 2));
        let found = index.lookup(&sorted(&[1, 2, 3, 4])).expect("lookup");
        assert_eq!(found.get(&d(2)), Some(&new));
        assert_eq!(found.get(&d(3)), Some(&loc(2, 0)));
        assert!(!found.contains_key(&d(1)) && !found.contains_key(&d(4)));
        assert_eq!(index.runs().expect("runs").len(), 1);
    }

    fn sorted(ns: &[u32]) -> Vec<Digest256> {
        let mut v: Vec<Digest256> = ns.iter().map(|n| d(*n)).collect();
        v.sort();
        v
    }

    #[test]
    fn no_dir_means_no_hits_and_a_bad_run_is_named() {
        let none = PageIndex::none();
        none.add(vec![(d(1), loc(0, 0))]).expect("add");
        assert!(none.lookup(&[d(1)]).expect("lookup").is_empty());
        let tmp = tempfile::tempdir().expect("tempdir");
        let index = PageIndex::in_dir(tmp.path());
        std::fs::write(tmp.path().join("run-x.pidx"), b"PFPIDX01\x01").expect("write");
        let err = index.lookup(&[d(1)]).expect_err("malformed");
        assert!(
            matches!(&err, IndexError::Malformed { path, .. } if path.ends_with("run-x.pidx")),
            "{err}"
        );
    }

    #[test]
    fn a_run_that_cannot_be_written_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let entries = [(d(1), loc(0, 0))];
        create_dir(&tmp.path().join("a")).expect("mkdir");
        let name = write_run(&tmp.path().join("a"), &entries)
            .expect("a run")
            .file_name()
            .expect("a name")
            .to_owned();
        // Where the run goes, a directory that is not empty: the rename fails, as a full disk
        // fails the write.
        let dir = tmp.path().join("b");
        std::fs::create_dir_all(dir.join(&name).join("x")).expect("mkdir");
        let err = write_run(&dir, &entries).expect_err("rename over a directory");
        assert!(matches!(&err, IndexError::Io { op: "rename", .. }), "{err}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n != &name)
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
